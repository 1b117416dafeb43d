//! Whole rows out of streamed blocks: methods whose statistics are per row (DELLA's masks, Arcee
//! Fusion's softmax) see blocks in index order and rows that may straddle them.

/// Reassembles rows of `row_len` values of several parallel streams from blocks that arrive in
/// index order. Holds at most one partial row per stream.
#[derive(Debug)]
pub struct RowBuffer {
    row_len: usize,
    /// `streams` partial rows, `row_len` apart.
    partial: Vec<f32>,
    filled: usize,
    next_row: usize,
}

impl RowBuffer {
    pub fn new(row_len: usize, streams: usize) -> RowBuffer {
        RowBuffer {
            row_len: row_len.max(1),
            partial: vec![0.0; row_len.max(1) * streams],
            filled: 0,
            next_row: 0,
        }
    }

    /// Feeds the next block of every stream (all the same length) and calls `on_row(row, rows)`
    /// for every row it completes, with that row of each stream.
    pub fn push(&mut self, blocks: &[&[f32]], mut on_row: impl FnMut(usize, &[&[f32]])) {
        let len = blocks.first().map_or(0, |b| b.len());
        let mut at = 0;
        while at < len {
            let take = (self.row_len - self.filled).min(len - at);
            if self.filled == 0 && take == self.row_len {
                // A whole row inside the block: no copy.
                let rows: Vec<&[f32]> = blocks.iter().map(|b| &b[at..at + take]).collect();
                on_row(self.next_row, &rows);
                self.next_row += 1;
            } else {
                for (s, b) in blocks.iter().enumerate() {
                    let row = &mut self.partial[s * self.row_len..][..self.row_len];
                    row[self.filled..self.filled + take].copy_from_slice(&b[at..at + take]);
                }
                self.filled += take;
                if self.filled == self.row_len {
                    let rows: Vec<&[f32]> = self.partial.chunks_exact(self.row_len).collect();
                    on_row(self.next_row, &rows);
                    self.next_row += 1;
                    self.filled = 0;
                }
            }
            at += take;
        }
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Rows completed so far.
    pub fn rows_done(&self) -> usize {
        self.next_row
    }
}

/// The row length a per-row statistic uses: the last dimension, or the whole tensor when it has
/// fewer than two dimensions.
pub fn row_length(shape: &[usize], numel: usize) -> usize {
    match shape {
        [_, .., last] => (*last).max(1),
        _ => numel.max(1),
    }
}

/// The stretches of the block of `len` elements starting at element `start` that lie in one
/// row each, as (row, range within the block): per-row values applied blockwise without a
/// division per element.
pub fn row_segments(
    start: usize,
    len: usize,
    row_len: usize,
) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
    let mut at = 0;
    std::iter::from_fn(move || {
        (at < len).then(|| {
            let row = (start + at) / row_len;
            let end = len.min((row + 1) * row_len - start);
            let segment = (row, at..end);
            at = end;
            segment
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_segments_split_a_block_at_row_edges() {
        let segments: Vec<_> = row_segments(10, 12, 7).collect();
        assert_eq!(segments, vec![(1, 0..4), (2, 4..11), (3, 11..12)]);
        assert_eq!(row_segments(14, 7, 7).collect::<Vec<_>>(), vec![(2, 0..7)]);
        assert_eq!(row_segments(3, 0, 7).count(), 0);
    }

    #[test]
    fn rows_come_whole_across_block_edges() {
        let a: Vec<f32> = (0..70).map(|i| i as f32).collect();
        let b: Vec<f32> = a.iter().map(|x| -x).collect();
        for (row_len, block) in [(7, 3), (7, 7), (7, 20), (10, 64), (1, 5)] {
            let mut buffer = RowBuffer::new(row_len, 2);
            let mut seen = Vec::new();
            for start in (0..70).step_by(block) {
                let end = (start + block).min(70);
                buffer.push(&[&a[start..end], &b[start..end]], |row, rows| {
                    assert_eq!(rows[0], &a[row * row_len..(row + 1) * row_len]);
                    assert_eq!(rows[1], &b[row * row_len..(row + 1) * row_len]);
                    seen.push(row);
                });
            }
            assert_eq!(seen, (0..70 / row_len).collect::<Vec<_>>());
            assert_eq!(buffer.rows_done(), 70 / row_len);
        }
        assert_eq!(row_length(&[3, 4, 5], 60), 5);
        assert_eq!(row_length(&[8], 8), 8);
        assert_eq!(row_length(&[], 1), 1);
    }
}
