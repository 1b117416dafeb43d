//! Exact top-k by magnitude without sorting or copying the tensor.
//!
//! For non-negative floats the IEEE bit pattern orders like the value, so the k-th largest |x| is
//! found with two 65536-bucket histograms: one over the high 16 bits of |x|, then one over the low
//! 16 bits inside the bucket that holds the k-th element. Each pass is O(n) and streams blocks in
//! any order. Elements equal to the threshold are kept in index order until exactly k are kept,
//! which is what a stable descending sort would keep.

const BUCKETS: usize = 1 << 16;

#[inline(always)]
pub fn magnitude_bits(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// The rule that selects exactly `k` elements: everything above `bits`, plus the first
/// `take_equal` elements (in index order) equal to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    pub bits: u32,
    pub take_equal: u64,
    /// How many elements equal the threshold; when it exceeds `take_equal` ties must be broken.
    pub equal: u64,
}

impl Threshold {
    /// Keeps every element (k ≥ n).
    pub const ALL: Threshold = Threshold {
        bits: 0,
        take_equal: u64::MAX,
        equal: 0,
    };
    /// Keeps nothing (k = 0).
    pub const NONE: Threshold = Threshold {
        bits: u32::MAX,
        take_equal: 0,
        equal: 0,
    };

    pub fn needs_tie_break(&self) -> bool {
        self.equal > self.take_equal
    }
}

/// Two-pass histogram search for the k-th largest magnitude.
pub struct TopKSearch {
    k: u64,
    counts: Vec<u64>,
    high: Option<u32>,
    /// Elements in buckets above the chosen high bucket.
    above: u64,
}

impl TopKSearch {
    pub fn new(k: u64) -> Self {
        TopKSearch {
            k,
            counts: vec![0; BUCKETS],
            high: None,
            above: 0,
        }
    }

    /// Feeds values to the current pass.
    pub fn observe(&mut self, values: impl Iterator<Item = f32>) {
        match self.high {
            None => {
                for x in values {
                    self.counts[(magnitude_bits(x) >> 16) as usize] += 1;
                }
            }
            Some(high) => {
                for x in values {
                    let bits = magnitude_bits(x);
                    if bits >> 16 == high {
                        self.counts[(bits & 0xFFFF) as usize] += 1;
                    }
                }
            }
        }
    }

    /// Ends a pass; returns the threshold after the second one.
    pub fn finish_pass(&mut self) -> Option<Threshold> {
        let (bucket, above) = kth_bucket(&self.counts, self.k - self.above);
        let equal = self.counts[bucket];
        self.counts.iter_mut().for_each(|c| *c = 0);
        match self.high {
            None => {
                self.high = Some(bucket as u32);
                self.above = above;
                None
            }
            Some(high) => Some(Threshold {
                bits: (high << 16) | bucket as u32,
                take_equal: self.k - self.above - above,
                equal,
            }),
        }
    }
}

/// The bucket holding the `k`-th largest element (k ≥ 1) and how many elements lie above it.
fn kth_bucket(counts: &[u64], k: u64) -> (usize, u64) {
    let mut above = 0;
    for bucket in (0..counts.len()).rev() {
        if above + counts[bucket] >= k {
            return (bucket, above);
        }
        above += counts[bucket];
    }
    (0, above)
}

/// Computes the exact threshold over values available as one slice (for tests and small data).
pub fn threshold_of(values: &[f32], k: u64) -> Threshold {
    if k == 0 {
        return Threshold::NONE;
    }
    if k as usize >= values.len() {
        return Threshold::ALL;
    }
    let mut search = TopKSearch::new(k);
    search.observe(values.iter().copied());
    search.finish_pass();
    search.observe(values.iter().copied());
    search
        .finish_pass()
        .expect("second pass yields a threshold")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_keep(values: &[f32], k: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
        let mut keep = vec![false; values.len()];
        for &i in &order[..k] {
            keep[i] = true;
        }
        keep
    }

    fn keep_with(values: &[f32], t: Threshold) -> Vec<bool> {
        let mut taken = 0;
        values
            .iter()
            .map(|x| {
                let bits = magnitude_bits(*x);
                if bits > t.bits {
                    true
                } else if bits == t.bits && taken < t.take_equal {
                    taken += 1;
                    true
                } else {
                    false
                }
            })
            .collect()
    }

    #[test]
    fn matches_a_stable_sort_including_ties() {
        let mut values: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 64.0)
            .collect();
        values[17] = f32::MIN_POSITIVE;
        values[18] = -0.0;
        for k in [1usize, 2, 10, 999, 1000, 2500, 4999] {
            let t = threshold_of(&values, k as u64);
            assert_eq!(keep_with(&values, t), reference_keep(&values, k), "k={k}");
        }
        assert_eq!(threshold_of(&values, 0), Threshold::NONE);
        assert_eq!(threshold_of(&values, 5000), Threshold::ALL);
    }
}
