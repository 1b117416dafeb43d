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
use multiversion::multiversion;

#[derive(Debug)]
pub struct MagPrune {
    rows: RowBuffer,
    /// Keep probability by rank, `density − ε + 2ε·rank/(m − 1)`: the same for every row.
    keep_by_rank: Vec<f64>,
    key: u64,
    bits: Vec<u64>,
    /// Per-row scratch: the (magnitude bits, position) keys in ascending order, the sort's
    /// buffer, the row's draws and its keep decisions by position.
    keys: Vec<u64>,
    scratch: Vec<u64>,
    draws: Vec<f64>,
    kept: Vec<bool>,
}

impl MagPrune {
    pub fn new(numel: usize, row_len: usize, density: f64, epsilon: f64, key: u64) -> MagPrune {
        let (low, span) = (density - epsilon, 2.0 * epsilon);
        let top = (row_len.max(1) - 1) as f64;
        let keep_by_rank = (0..row_len.max(1))
            .map(|rank| {
                let rank_norm = if top > 0.0 { rank as f64 / top } else { 0.5 };
                low + rank_norm * span
            })
            .collect();
        MagPrune {
            rows: RowBuffer::new(row_len, 1),
            keep_by_rank,
            key,
            bits: vec![0; numel.div_ceil(64)],
            keys: Vec::new(),
            scratch: Vec::new(),
            draws: Vec::new(),
            kept: Vec::new(),
        }
    }

    /// The next block of the model and the base, in index order.
    pub fn observe(&mut self, x: &[f32], base: &[f32]) {
        let Self {
            rows,
            keep_by_rank,
            key,
            bits,
            keys,
            scratch,
            draws,
            kept,
        } = self;
        super::with_scratch(x.len(), |magnitude| {
            for ((m, &v), &b) in magnitude.iter_mut().zip(x).zip(base) {
                *m = (v - b).abs();
            }
            rows.push(&[magnitude], |row, values| {
                let values = values[0];
                let first = row * values.len();
                sort_by_magnitude(values, keys, scratch);
                draws.resize(values.len(), 0.0);
                uniform_draws(*key, first as u64, draws);
                kept.resize(values.len(), false);
                for (&sorted, &p) in keys.iter().zip(keep_by_rank.iter()) {
                    let at = position(sorted);
                    kept[at] = draws[at] < p;
                }
                for (j, &keep) in kept.iter().enumerate() {
                    let index = first + j;
                    bits[index / 64] |= (keep as u64) << (index % 64);
                }
            });
        });
    }

    /// The mask, one bit per element (bit i % 64 of word i / 64).
    pub fn into_bits(self) -> Vec<u64> {
        self.bits
    }
}

/// `rng::uniform(key, first + j)` for every j, in a loop the 64-bit multiplies vectorise.
#[multiversion(targets("x86_64+avx512f+avx512dq+avx512vl", "x86_64+avx2+fma"))]
fn uniform_draws(key: u64, first: u64, draws: &mut [f64]) {
    for (j, d) in draws.iter_mut().enumerate() {
        *d = rng::uniform(key, first + j as u64);
    }
}

/// `values` (non-negative) in ascending order, equal values by position, as keys of the f32 bit
/// pattern (which orders like a non-negative float) over the position: a stable
/// least-significant-digit radix sort. Keys carry their position, so each pass reads one array
/// in order instead of looking values up through an index; several times faster than a
/// comparison sort on rows of thousands. The digits are the 8-bit groups of just the bits that
/// differ between values (task vectors of bf16 weights have about 16), and every digit's counts
/// come from one read of the values. Each pass scatters from both ends of the row at once, two
/// independent chains of bucket offsets where runs of keys in one bucket (magnitudes crowd a
/// few exponents) would make every store wait for the last. (Four parts with their own offsets
/// were measured slower: rows are short, and counting per part costs more than it saves.)
fn sort_by_magnitude(values: &[f32], keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
    let (any, all) = values.iter().fold((0u32, u32::MAX), |(any, all), v| {
        (any | v.to_bits(), all & v.to_bits())
    });
    let varying = any ^ all;
    keys.clear();
    keys.extend(
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (v.to_bits() as u64) << 32 | i as u64),
    );
    if varying == 0 {
        return;
    }
    let low = varying.trailing_zeros();
    let digits = (32 - varying.leading_zeros() - low).div_ceil(8) as usize;
    let mut counts = [[0usize; 256]; 4];
    for v in values {
        let bits = v.to_bits() >> low;
        for (digit, c) in counts[..digits].iter_mut().enumerate() {
            c[(bits >> (8 * digit) & 0xFF) as usize] += 1;
        }
    }
    scratch.resize(values.len(), 0);
    for (digit, counts) in counts[..digits].iter_mut().enumerate() {
        if counts.contains(&values.len()) {
            continue;
        }
        let shift = 32 + low + 8 * digit as u32;
        // Bucket d spans front[d]..back[d]: the first half of the keys fills it from the front
        // in order, the second half from the back in reverse order, so both meet in order.
        let (mut front, mut back) = ([0usize; 256], [0usize; 256]);
        let mut next = 0;
        for d in 0..256 {
            (front[d], back[d], next) = (next, next + counts[d], next + counts[d]);
        }
        let digit = |k: u64| ((k >> shift) & 0xFF) as usize;
        let (first, second) = keys.split_at(keys.len() / 2);
        for (&a, &b) in first.iter().zip(second.iter().rev()) {
            let (da, db) = (digit(a), digit(b));
            scratch[front[da]] = a;
            front[da] += 1;
            back[db] -= 1;
            scratch[back[db]] = b;
        }
        if second.len() > first.len() {
            let middle = second[0];
            back[digit(middle)] -= 1;
            scratch[back[digit(middle)]] = middle;
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
        let all: Vec<f32> = (0..5000u64)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => 0.25,
                _ => (rng::uniform(key, i) * 30.0 - 15.0).exp() as f32,
            })
            .collect();
        // Even and odd lengths: each pass fills buckets from both ends and meets in the middle.
        for len in [5000, 4999, 3, 2, 1] {
            let values = &all[all.len() - len..];
            let (mut keys, mut scratch) = (Vec::new(), Vec::new());
            sort_by_magnitude(values, &mut keys, &mut scratch);
            let order: Vec<u32> = keys.iter().map(|&k| position(k) as u32).collect();
            let mut want: Vec<u32> = (0..values.len() as u32).collect();
            want.sort_by(|&a, &b| {
                values[a as usize]
                    .total_cmp(&values[b as usize])
                    .then(a.cmp(&b))
            });
            assert_eq!(order, want, "{len}");
        }
    }
}
