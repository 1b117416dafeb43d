//! DELLA's MagPrune mask (Deep et al., arXiv:2406.11617): within each row, rank the task-vector
//! magnitudes (1 = smallest), normalise the ranks to [0, 1] and keep each element with
//! probability `density − ε + 2ε·rank_norm`, so larger magnitudes survive more often.
//!
//! Built in one streamed pass: rows are reassembled from blocks, ranked by a sort of
//! (magnitude, index) — equal magnitudes rank by index, where torch's unstable argsort ranks them
//! arbitrarily — and the draws come from the counter-based stream of the model, so the mask is a
//! pure function of (seed, tensor, model). A row of one element keeps with probability `density`
//! (mergekit divides by zero there). The mask is one bit per element.

use super::rows::RowBuffer;
use crate::rng;

#[derive(Debug)]
pub struct MagPrune {
    rows: RowBuffer,
    low: f64,
    span: f64,
    key: u64,
    bits: Vec<u64>,
    /// The row's (magnitude bits, position) keys in ascending order, and the sort's scratch.
    keys: Vec<u64>,
    scratch: Vec<u64>,
}

impl MagPrune {
    pub fn new(numel: usize, row_len: usize, density: f64, epsilon: f64, key: u64) -> MagPrune {
        MagPrune {
            rows: RowBuffer::new(row_len, 1),
            low: density - epsilon,
            span: 2.0 * epsilon,
            key,
            bits: vec![0; numel.div_ceil(64)],
            keys: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The bytes a mask for `numel` elements with rows of `row_len` holds.
    pub fn memory(numel: usize, row_len: usize) -> usize {
        numel.div_ceil(64) * 8 + row_len * 16
    }

    /// The next block of the model and the base, in index order.
    pub fn observe(&mut self, x: &[f32], base: &[f32]) {
        let Self {
            rows,
            low,
            span,
            key,
            bits,
            keys,
            scratch,
        } = self;
        super::with_scratch(x.len(), |magnitude| {
            for ((m, &v), &b) in magnitude.iter_mut().zip(x).zip(base) {
                *m = (v - b).abs();
            }
            rows.push(&[magnitude], |row, values| {
                let values = values[0];
                let first = row * values.len();
                sort_by_magnitude(values, keys, scratch);
                let top = (values.len() - 1) as f64;
                for (rank, &sorted) in keys.iter().enumerate() {
                    let rank_norm = if top > 0.0 { rank as f64 / top } else { 0.5 };
                    let p = *low + rank_norm * *span;
                    let index = first + position(sorted);
                    if rng::uniform(*key, index as u64) < p {
                        bits[index / 64] |= 1 << (index % 64);
                    }
                }
            });
        });
    }

    /// The mask, one bit per element (bit i % 64 of word i / 64).
    pub fn into_bits(self) -> Vec<u64> {
        self.bits
    }
}

/// `values` (non-negative) in ascending order, equal values by position, as keys of the f32 bit
/// pattern (which orders like a non-negative float) over the position: a stable
/// least-significant-digit radix sort on the pattern's bytes, skipping bytes all values share.
/// Keys carry their position, so each pass reads one array in order instead of looking values
/// up through an index; several times faster than a comparison sort on rows of thousands.
fn sort_by_magnitude(values: &[f32], keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
    keys.clear();
    keys.extend(
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (v.to_bits() as u64) << 32 | i as u64),
    );
    scratch.resize(values.len(), 0);
    for shift in [32u32, 40, 48, 56] {
        let digit = |k: u64| ((k >> shift) & 0xFF) as usize;
        let mut counts = [0usize; 256];
        for &k in keys.iter() {
            counts[digit(k)] += 1;
        }
        if counts.contains(&values.len()) {
            continue;
        }
        let mut next = 0;
        for c in counts.iter_mut() {
            (*c, next) = (next, next + *c);
        }
        for &k in keys.iter() {
            let d = digit(k);
            scratch[counts[d]] = k;
            counts[d] += 1;
        }
        std::mem::swap(keys, scratch);
    }
}

/// The row position a sort key carries.
fn position(key: u64) -> usize {
    (key & 0xFFFF_FFFF) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_larger_magnitudes_more_often() {
        let (rows, row_len) = (400, 100);
        let n = rows * row_len;
        let base = vec![0f32; n];
        // Every row holds the magnitudes 0..100 in a shuffled order.
        let x: Vec<f32> = (0..n).map(|i| ((i * 37) % row_len) as f32).collect();
        let mut mask = MagPrune::new(n, row_len, 0.5, 0.2, 9);
        for start in (0..n).step_by(333) {
            let end = (start + 333).min(n);
            mask.observe(&x[start..end], &base[start..end]);
        }
        let bits = mask.into_bits();
        let kept = |i: usize| bits[i / 64] >> (i % 64) & 1 == 1;
        // Magnitude r has rank r: kept with probability 0.3 + 0.4·r/99.
        for r in [0usize, 50, 99] {
            let share = (0..n)
                .filter(|&i| (i * 37) % row_len == r && kept(i))
                .count() as f64
                / rows as f64;
            let p = 0.3 + 0.4 * r as f64 / 99.0;
            assert!((share - p).abs() < 0.08, "rank {r}: {share} vs {p}");
        }
        let total = (0..n).filter(|&i| kept(i)).count() as f64 / n as f64;
        assert!((total - 0.5).abs() < 0.01, "{total}");
    }

    #[test]
    fn radix_order_equals_a_stable_sort() {
        let key = rng::stream_key(2, "sort", 0);
        let values: Vec<f32> = (0..5000u64)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => 0.25,
                _ => (rng::uniform(key, i) * 30.0 - 15.0).exp() as f32,
            })
            .collect();
        let (mut keys, mut scratch) = (Vec::new(), Vec::new());
        sort_by_magnitude(&values, &mut keys, &mut scratch);
        let order: Vec<u32> = keys.iter().map(|&k| position(k) as u32).collect();
        let mut want: Vec<u32> = (0..values.len() as u32).collect();
        want.sort_by(|&a, &b| {
            values[a as usize]
                .total_cmp(&values[b as usize])
                .then(a.cmp(&b))
        });
        assert_eq!(order, want);
    }
}
