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
    /// Row positions in ascending magnitude order, and the radix sort's scratch.
    order: Vec<u32>,
    scratch: Vec<u32>,
}

impl MagPrune {
    pub fn new(numel: usize, row_len: usize, density: f64, epsilon: f64, key: u64) -> MagPrune {
        MagPrune {
            rows: RowBuffer::new(row_len, 1),
            low: density - epsilon,
            span: 2.0 * epsilon,
            key,
            bits: vec![0; numel.div_ceil(64)],
            order: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The bytes a mask for `numel` elements with rows of `row_len` holds.
    pub fn memory(numel: usize, row_len: usize) -> usize {
        numel.div_ceil(64) * 8 + row_len * 12
    }

    /// The next block of the model and the base, in index order.
    pub fn observe(&mut self, x: &[f32], base: &[f32]) {
        let Self {
            rows,
            low,
            span,
            key,
            bits,
            order,
            scratch,
        } = self;
        super::with_scratch(x.len(), |magnitude| {
            for ((m, &v), &b) in magnitude.iter_mut().zip(x).zip(base) {
                *m = (v - b).abs();
            }
            rows.push(&[magnitude], |row, values| {
                let values = values[0];
                let first = row * values.len();
                sort_by_magnitude(values, order, scratch);
                let top = (values.len() - 1) as f64;
                for (rank, &j) in order.iter().enumerate() {
                    let rank_norm = if top > 0.0 { rank as f64 / top } else { 0.5 };
                    let p = *low + rank_norm * *span;
                    let index = first + j as usize;
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

/// Positions of `values` (non-negative) in ascending order, equal values by position: a stable
/// least-significant-digit radix sort of the f32 bit patterns (which order like non-negative
/// floats), 8 bits a pass, skipping bytes all values share. Several times faster than a
/// comparison sort on rows of thousands.
fn sort_by_magnitude(values: &[f32], order: &mut Vec<u32>, scratch: &mut Vec<u32>) {
    order.clear();
    order.extend(0..values.len() as u32);
    scratch.resize(values.len(), 0);
    for shift in [0u32, 8, 16, 24] {
        let digit = |i: u32| ((values[i as usize].to_bits() >> shift) & 0xFF) as usize;
        let mut counts = [0usize; 256];
        for &i in order.iter() {
            counts[digit(i)] += 1;
        }
        if counts.contains(&values.len()) {
            continue;
        }
        let mut next = 0;
        for c in counts.iter_mut() {
            (*c, next) = (next, next + *c);
        }
        for &i in order.iter() {
            let d = digit(i);
            scratch[counts[d]] = i;
            counts[d] += 1;
        }
        std::mem::swap(order, scratch);
    }
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
        let (mut order, mut scratch) = (Vec::new(), Vec::new());
        sort_by_magnitude(&values, &mut order, &mut scratch);
        let mut want: Vec<u32> = (0..values.len() as u32).collect();
        want.sort_by(|&a, &b| {
            values[a as usize]
                .total_cmp(&values[b as usize])
                .then(a.cmp(&b))
        });
        assert_eq!(order, want);
    }
}
