//! Exact order statistics of streamed f32 values in two counting passes and bounded memory, with
//! no sampling: floats map to 32-bit keys that order like them (`key`), so the first pass counts
//! the high 16 bits of the keys to find each rank's bucket and the second counts the low 16 bits
//! inside those buckets.

const BUCKETS: usize = 1 << 16;
/// Up to this many ranks, the second pass gathers the values in their buckets first.
const FILTERED: usize = 4;

#[derive(Debug)]
pub struct RadixSelect {
    /// The 0-based ranks asked for, in ascending value order.
    ranks: Vec<u64>,
    seen: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    High(Vec<u64>),
    Low {
        /// Per rank: its bucket, the count of values in lower buckets, low-bit counts.
        prefix: Vec<u32>,
        below: Vec<u64>,
        counts: Vec<Vec<u64>>,
    },
    Done(Vec<f32>),
}

impl RadixSelect {
    /// The values of the given 0-based ranks among `n` values (each rank < n).
    pub fn new(ranks: &[u64]) -> RadixSelect {
        RadixSelect {
            ranks: ranks.to_vec(),
            seen: 0,
            state: State::High(vec![0; BUCKETS]),
        }
    }

    /// An empty copy at the same stage, to count a share of the values elsewhere.
    pub fn empty_like(&self) -> RadixSelect {
        let zeroed = |counts: &Vec<u64>| vec![0; counts.len()];
        RadixSelect {
            ranks: self.ranks.clone(),
            seen: 0,
            state: match &self.state {
                State::High(c) => State::High(zeroed(c)),
                State::Low {
                    prefix,
                    below,
                    counts,
                } => State::Low {
                    prefix: prefix.clone(),
                    below: below.clone(),
                    counts: counts.iter().map(zeroed).collect(),
                },
                State::Done(v) => State::Done(v.clone()),
            },
        }
    }

    /// Adds the counts of a copy made by `empty_like` (counts add exactly, in any order).
    pub fn add(&mut self, other: &RadixSelect) {
        self.seen += other.seen;
        let add = |a: &mut Vec<u64>, b: &Vec<u64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        match (&mut self.state, &other.state) {
            (State::High(a), State::High(b)) => add(a, b),
            (State::Low { counts: a, .. }, State::Low { counts: b, .. }) => {
                a.iter_mut().zip(b).for_each(|(a, b)| add(a, b))
            }
            _ => {}
        }
    }

    /// The memory the counters hold.
    pub fn memory(ranks: usize) -> usize {
        (ranks + 1) * BUCKETS * 8
    }

    /// The rank a quantile `q` of `n` values has by sorted-index rounding down: ⌊q·(n − 1)⌋.
    pub fn rank_of(q: f64, n: u64) -> u64 {
        (q * n.saturating_sub(1) as f64).floor() as u64
    }

    /// The next values of the pass (NaN is not allowed).
    pub fn observe(&mut self, values: &[f32]) {
        self.seen += values.len() as u64;
        match &mut self.state {
            State::High(counts) => {
                for v in values {
                    counts[(key(*v) >> 16) as usize] += 1;
                }
            }
            State::Low { prefix, counts, .. } => {
                let mut count = |bits: u32| {
                    for (p, c) in prefix.iter().zip(counts.iter_mut()) {
                        if bits >> 16 == *p {
                            c[(bits & 0xFFFF) as usize] += 1;
                        }
                    }
                };
                if prefix.len() > FILTERED {
                    values.iter().for_each(|v| count(key(*v)));
                    return;
                }
                // Few values fall in the ranks' buckets: gather those without a branch per
                // value, then count them (a branch per value and rank mispredicted often).
                let mut buckets = [u32::MAX; FILTERED];
                buckets[..prefix.len()].copy_from_slice(prefix);
                let mut hits = [0u32; 1024];
                for chunk in values.chunks(hits.len()) {
                    let mut found = 0;
                    for v in chunk {
                        let bits = key(*v);
                        hits[found] = bits;
                        found += buckets.iter().fold(false, |m, &b| m | (bits >> 16 == b)) as usize;
                    }
                    hits[..found].iter().for_each(|&bits| count(bits));
                }
            }
            State::Done(_) => {}
        }
    }

    pub fn end_pass(&mut self) {
        self.seen = 0;
        self.state = match std::mem::replace(&mut self.state, State::Done(Vec::new())) {
            State::High(counts) => {
                let located: Vec<(u32, u64)> =
                    self.ranks.iter().map(|&r| locate(&counts, r)).collect();
                State::Low {
                    prefix: located.iter().map(|l| l.0).collect(),
                    below: located.iter().map(|l| l.1).collect(),
                    counts: vec![vec![0; BUCKETS]; self.ranks.len()],
                }
            }
            State::Low {
                prefix,
                below,
                counts,
            } => State::Done(
                self.ranks
                    .iter()
                    .zip(prefix.iter().zip(&below))
                    .zip(&counts)
                    .map(|((&rank, (&p, &b)), c)| {
                        let (low, _) = locate(c, rank - b);
                        value(p << 16 | low)
                    })
                    .collect(),
            ),
            done => done,
        }
    }

    /// The values of the ranks, once both passes have run.
    pub fn result(&self) -> Option<&[f32]> {
        match &self.state {
            State::Done(values) => Some(values),
            _ => None,
        }
    }
}

/// A key that orders like the float: negative floats have their bits flipped, non-negative ones
/// their sign bit set.
fn key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

fn value(key: u32) -> f32 {
    f32::from_bits(if key >> 31 == 1 {
        key & !(1 << 31)
    } else {
        !key
    })
}

/// The bucket holding the value of 0-based rank `rank`, and how many values lie below it.
fn locate(counts: &[u64], rank: u64) -> (u32, u64) {
    let mut below = 0;
    for (bucket, &c) in counts.iter().enumerate() {
        if below + c > rank {
            return (bucket as u32, below);
        }
        below += c;
    }
    // Only reached with a rank past the values seen: the top bucket.
    (counts.len() as u32 - 1, below)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_a_sort() {
        let key = crate::rng::stream_key(1, "q", 0);
        // Wide magnitudes, many exact duplicates, zeros.
        let values: Vec<f32> = (0..50_000u64)
            .map(|i| {
                let u = crate::rng::uniform(key, i);
                if i % 7 == 0 {
                    0.0
                } else if i % 5 == 0 {
                    1.5
                } else if i % 3 == 0 {
                    -(u * 20.0 - 10.0).exp() as f32
                } else {
                    (u * 40.0 - 20.0).exp() as f32
                }
            })
            .collect();
        let mut sorted = values.clone();
        sorted.sort_by(f32::total_cmp);
        let n = values.len() as u64;
        // More ranks than the gathering second pass takes, then fewer (the Arcee Fusion case).
        let quantiles: [&[f64]; 3] = [&[0.0, 0.25, 0.5, 0.75, 1.0], &[0.25, 0.5, 0.75], &[0.9]];
        for qs in quantiles {
            let ranks: Vec<u64> = qs.iter().map(|&q| RadixSelect::rank_of(q, n)).collect();
            let mut select = RadixSelect::new(&ranks);
            for _ in 0..2 {
                for chunk in values.chunks(4096) {
                    select.observe(chunk);
                }
                select.end_pass();
            }
            let want: Vec<f32> = ranks.iter().map(|&r| sorted[r as usize]).collect();
            assert_eq!(select.result().unwrap(), &want[..], "{qs:?}");
        }
    }
}
