//! Exact top-k by magnitude without sorting or copying the tensor, fed block by block.
//!
//! For non-negative floats the IEEE bit pattern orders like the value, so selection works on the
//! bits of |x|. Elements equal to the k-th magnitude are kept in index order until exactly k are
//! kept (what a stable descending sort keeps), which `Keep` encodes as an index cutoff.
//!
//! 1. A sample — every element of every s-th block, ~64 K values, so the other blocks are not even
//!    read — brackets the k-th magnitude in a window [lo, hi]; when it is the whole tensor the
//!    answer is exact at once.
//! 2. One pass counts elements above the window and collects the magnitudes inside it, in index
//!    order, with how many each block gave; the exact k-th value comes from selecting in the
//!    window, and the tie cutoff, unless every equal element is kept, from reading the one block
//!    that holds it again (cheaper than an index per candidate).
//! 3. A window too crowded to hold within the memory bound (wide bf16 tie groups) is settled from
//!    counts of its values (kept from the moment the candidates overflow, those before added
//!    then), plus one pass for the tie cutoff.
//! 4. If the sample was unlucky (the k-th value fell outside the window), two 65536-bucket
//!    histogram passes over the high then low 16 bits find the value, and one more pass finds
//!    the tie cutoff.

use super::BLOCK;
use multiversion::multiversion;

/// Blocks read for the sample that brackets the k-th magnitude (16 × 4096 values).
const SAMPLE_BLOCKS: usize = 16;
const BUCKETS: usize = 1 << 16;

#[inline(always)]
pub fn magnitude_bits(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// Keeps elements whose magnitude bits exceed `bits`, and those equal to it up to `cutoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub bits: u32,
    /// Largest index of a kept element equal to the threshold (exclusive bound + 1 semantics:
    /// equal elements with `index < cutoff` are kept).
    pub cutoff: usize,
}

impl Keep {
    pub const ALL: Keep = Keep {
        bits: 0,
        cutoff: usize::MAX,
    };
    pub const NONE: Keep = Keep {
        bits: u32::MAX,
        cutoff: 0,
    };

    #[inline(always)]
    pub fn keeps(&self, index: usize, bits: u32) -> bool {
        bits > self.bits || (bits == self.bits && index < self.cutoff)
    }

    /// Over the indices `start..end`, the least magnitude bits kept, unless the tie cutoff falls
    /// inside (elements equal to the threshold are then kept throughout or nowhere).
    #[inline(always)]
    pub fn least_kept(&self, start: usize, end: usize) -> Option<u32> {
        if self.cutoff >= end {
            Some(self.bits)
        } else if self.cutoff <= start {
            // No magnitude reaches u32::MAX (the sign bit is clear), so saturating keeps none.
            Some(self.bits.saturating_add(1))
        } else {
            None
        }
    }
}

enum Stage {
    /// Every element of every `stride`-th block (all of them when `stride` is 1).
    Sample {
        stride: usize,
        values: Vec<(u32, usize)>,
    },
    /// Counts magnitudes above the window and collects those inside it with their indices
    /// (`bits` and `at` are one block of scratch for the scan, allocated once).
    Window {
        lo: u32,
        hi: u32,
        above: usize,
        inside: Vec<u32>,
        /// Per block with candidates, its start and how many candidates precede its own: the
        /// block of the tie cutoff, read again alone, instead of an index per candidate.
        blocks: Vec<(usize, usize)>,
        /// Counts of the window's values, from the moment the candidates outgrow their memory
        /// (wide tie groups): the k-th value is then read from here instead.
        histogram: WindowHistogram,
        overflowed: bool,
        bits: Vec<u32>,
    },
    Coarse {
        counts: Vec<usize>,
    },
    Fine {
        high: u32,
        above: usize,
        counts: Vec<usize>,
    },
    /// The `take`-th element equal to `bits` in index order, counting from block `from`, where
    /// `seen` of them are behind.
    Ties {
        bits: u32,
        take: usize,
        from: usize,
        seen: usize,
        cutoff: usize,
    },
    Done(Keep),
}

/// The search for the k largest magnitudes of an n-element tensor.
pub struct TopK {
    k: usize,
    n: usize,
    stage: Stage,
    /// Most window candidates kept in memory; a window that would hold more (wide tie groups
    /// in bf16 data) gives way to the histogram passes, whose memory is fixed.
    max_candidates: usize,
}

impl TopK {
    pub fn new(k: usize, n: usize) -> TopK {
        let stage = if k == 0 {
            Stage::Done(Keep::NONE)
        } else if k >= n {
            Stage::Done(Keep::ALL)
        } else {
            Stage::Sample {
                stride: n.div_ceil(BLOCK).div_ceil(SAMPLE_BLOCKS),
                values: Vec::with_capacity((SAMPLE_BLOCKS * BLOCK).min(n)),
            }
        };
        TopK {
            k,
            n,
            stage,
            max_candidates: usize::MAX,
        }
    }

    /// Bounds the memory of the window pass to about `bytes`.
    pub fn with_memory(mut self, bytes: usize) -> TopK {
        self.max_candidates = (bytes / 8).max(BLOCK);
        self
    }

    /// Whether the next pass needs the block starting at `start` (the sample reads few blocks).
    pub fn wants_block(&self, start: usize) -> bool {
        match &self.stage {
            Stage::Sample { stride, .. } => (start / BLOCK).is_multiple_of(*stride),
            // Once the tie cutoff is found, the rest of the pass is not read.
            Stage::Ties {
                seen, take, from, ..
            } => start >= *from && seen < take,
            Stage::Done(_) => false,
            _ => true,
        }
    }

    /// The answer, once no more passes are needed.
    pub fn result(&self) -> Option<Keep> {
        match self.stage {
            Stage::Done(keep) => Some(keep),
            _ => None,
        }
    }

    /// Feeds the block of |x − base| starting at element `start`; blocks come in index order.
    pub fn observe(&mut self, start: usize, x: &[f32], base: &[f32]) {
        let bits_at = |j: usize| magnitude_bits(x[j] - base[j]);
        match &mut self.stage {
            Stage::Sample { stride, values } => {
                if (start / BLOCK).is_multiple_of(*stride) {
                    values.extend((0..x.len()).map(|j| (bits_at(j), start + j)));
                }
            }
            Stage::Window { .. } => {
                let mut window = [self.window_out().expect("a window stage")];
                let [scanned] = window_scan(x, base, &mut window);
                self.take_window_block(start, scanned);
            }
            Stage::Coarse { counts } => {
                (0..x.len()).for_each(|j| counts[(bits_at(j) >> 16) as usize] += 1)
            }
            Stage::Fine { high, counts, .. } => {
                for j in 0..x.len() {
                    let bits = bits_at(j);
                    if bits >> 16 == *high {
                        counts[(bits & 0xFFFF) as usize] += 1;
                    }
                }
            }
            Stage::Ties {
                bits,
                take,
                from,
                seen,
                cutoff,
            } => {
                // Another search of the same merge may read blocks this one does not want.
                if *seen >= *take || start < *from {
                    return;
                }
                let equal = count_equal(x, base, *bits);
                if *seen + equal < *take {
                    *seen += equal;
                    return;
                }
                for j in 0..x.len() {
                    if bits_at(j) == *bits {
                        *seen += 1;
                        if *seen == *take {
                            *cutoff = start + j + 1;
                            return;
                        }
                    }
                }
            }
            Stage::Done(_) => {}
        }
    }

    /// Feeds the same block to two searches, reading it once when both are in their window pass.
    pub fn observe_both(
        first: &mut TopK,
        second: &mut TopK,
        start: usize,
        x: &[f32],
        base: &[f32],
    ) {
        if let (Some(a), Some(b)) = (first.window_out(), second.window_out()) {
            let [scanned_a, scanned_b] = window_scan(x, base, &mut [a, b]);
            first.take_window_block(start, scanned_a);
            second.take_window_block(start, scanned_b);
        } else {
            first.observe(start, x, base);
            second.observe(start, x, base);
        }
    }

    /// The window and its scan buffers, in the window pass.
    fn window_out(&mut self) -> Option<WindowOut<'_>> {
        match &mut self.stage {
            Stage::Window { lo, hi, bits, .. } => Some(WindowOut {
                lo: *lo,
                hi: *hi,
                bits,
            }),
            _ => None,
        }
    }

    /// Takes a block's window scan, `(above, found)` with the candidates in the scan buffers.
    fn take_window_block(&mut self, start: usize, (count, found): (usize, usize)) {
        let Stage::Window {
            lo,
            above,
            inside,
            blocks,
            histogram,
            overflowed,
            bits,
            ..
        } = &mut self.stage
        else {
            unreachable!("a window stage")
        };
        *above += count;
        if !*overflowed && inside.len() + found > self.max_candidates {
            // From here on only the counts: those of the candidates so far first.
            *overflowed = true;
            histogram.add(*lo, inside);
            (*inside, *blocks) = (Vec::new(), Vec::new());
        }
        if *overflowed {
            histogram.add(*lo, &bits[..found]);
        } else if found > 0 {
            blocks.push((start, inside.len()));
            inside.extend_from_slice(&bits[..found]);
        }
    }

    /// Ends a pass and moves to the next stage.
    pub fn end_pass(&mut self) {
        let (k, n) = (self.k, self.n);
        self.stage = match std::mem::replace(&mut self.stage, Stage::Done(Keep::ALL)) {
            Stage::Sample { stride, mut values } => {
                if stride == 1 {
                    Stage::Done(exact_from_candidates(&mut values, k))
                } else {
                    let mut sample: Vec<u32> = values.iter().map(|v| v.0).collect();
                    let rank = (k as f64 / n as f64 * sample.len() as f64) as usize;
                    // For a random sample the k-th element's rank has a standard deviation of at
                    // most √S/2, so ±4√S is eight of them; blocks are not independent draws, and a
                    // miss only costs the histogram fallback.
                    let margin = 4 * (sample.len() as f64).sqrt() as usize + 16;
                    let mut nth_largest =
                        |r: usize| *sample.select_nth_unstable_by(r, |a, b| b.cmp(a)).1;
                    // Near the top, the sample's largest value bounds the window rather than
                    // the largest float: elements above it are counted, and the window's value
                    // counts keep one value per bucket (breadcrumbs' outlier edge at 1 % fell
                    // back to three more passes over the embeddings without this).
                    let hi = nth_largest(rank.saturating_sub(margin));
                    let lo = if rank + margin < values.len() {
                        nth_largest(rank + margin)
                    } else {
                        0
                    };
                    // Room for the candidates the sample predicts, so the vectors do not copy
                    // themselves as they grow (that was ~2 % of a TIES merge).
                    let in_window = sample.iter().filter(|&&b| lo <= b && b <= hi).count();
                    let expected = in_window as f64 / sample.len() as f64 * n as f64;
                    let room = ((expected * 1.25) as usize + BLOCK).min(self.max_candidates);
                    Stage::Window {
                        lo,
                        hi,
                        above: 0,
                        inside: Vec::with_capacity(room),
                        blocks: Vec::new(),
                        histogram: WindowHistogram::new(lo, hi),
                        overflowed: false,
                        bits: vec![0; BLOCK],
                    }
                }
            }
            Stage::Window {
                above,
                inside,
                blocks,
                histogram,
                overflowed,
                ..
            } => {
                if overflowed {
                    histogram.settle(k, above)
                } else if above < k && k <= above + inside.len() {
                    let mut sorted = inside.clone();
                    let (_, &mut bits, _) =
                        sorted.select_nth_unstable_by(k - above - 1, |a, b| b.cmp(a));
                    let take = k - above - inside.iter().filter(|&&b| b > bits).count();
                    tie_cutoff(bits, take, &inside, &blocks)
                } else {
                    Stage::Coarse {
                        counts: vec![0; BUCKETS],
                    }
                }
            }
            Stage::Coarse { counts } => {
                let (high, above) = kth_bucket(&counts, k);
                Stage::Fine {
                    high: high as u32,
                    above,
                    counts: vec![0; BUCKETS],
                }
            }
            Stage::Fine {
                high,
                above,
                counts,
            } => {
                let (low, above_low) = kth_bucket(&counts, k - above);
                let take = k - above - above_low;
                Stage::Ties {
                    bits: (high << 16) | low as u32,
                    take,
                    from: 0,
                    seen: 0,
                    cutoff: 0,
                }
            }
            Stage::Ties { bits, cutoff, .. } => Stage::Done(Keep { bits, cutoff }),
            done => done,
        };
    }
}

/// Where the kept elements equal to the k-th value `bits` end, the first `take` of them in index
/// order: every such element is a candidate, and candidates are in index order. Keeping all of
/// them needs no cutoff; else the block holding the last one kept is read again, alone, to find
/// its index.
fn tie_cutoff(bits: u32, take: usize, inside: &[u32], blocks: &[(usize, usize)]) -> Stage {
    let equal = |range: &[u32]| range.iter().filter(|&&b| b == bits).count();
    if equal(inside) == take {
        return Stage::Done(Keep {
            bits,
            cutoff: usize::MAX,
        });
    }
    let mut seen = 0;
    for (i, &(start, first)) in blocks.iter().enumerate() {
        let end = blocks.get(i + 1).map_or(inside.len(), |next| next.1);
        let here = equal(&inside[first..end]);
        if seen + here >= take {
            return Stage::Ties {
                bits,
                take,
                from: start,
                seen,
                cutoff: 0,
            };
        }
        seen += here;
    }
    unreachable!("take ≤ the equal candidates")
}

/// Counts of the magnitudes inside a window [lo, hi] in at most 65536 buckets, with each
/// bucket's smallest and largest value, so a bucket holding a single value is known exactly.
struct WindowHistogram {
    shift: u32,
    counts: Vec<u64>,
    min: Vec<u32>,
    max: Vec<u32>,
}

impl WindowHistogram {
    fn new(lo: u32, hi: u32) -> WindowHistogram {
        let width = (hi.saturating_sub(lo) as u64) + 1;
        let shift = (0..=32)
            .find(|s| width >> s <= BUCKETS as u64)
            .unwrap_or(32);
        let buckets = (((hi.saturating_sub(lo) as u64) >> shift) + 1) as usize;
        WindowHistogram {
            shift,
            counts: vec![0; buckets],
            min: vec![u32::MAX; buckets],
            max: vec![0; buckets],
        }
    }

    fn add(&mut self, lo: u32, values: &[u32]) {
        for &v in values {
            let b = ((v - lo) >> self.shift) as usize;
            self.counts[b] += 1;
            self.min[b] = self.min[b].min(v);
            self.max[b] = self.max[b].max(v);
        }
    }

    /// The next stage once the window pass is over: the k-th value if it lies in a one-value
    /// bucket (then only the tie cutoff may need a pass), else the full histogram passes.
    fn settle(&self, k: usize, above: usize) -> Stage {
        let total: u64 = self.counts.iter().sum();
        if above >= k || k as u64 > above as u64 + total {
            return Stage::Coarse {
                counts: vec![0; BUCKETS],
            };
        }
        let mut greater = above as u64;
        for b in (0..self.counts.len()).rev() {
            let count = self.counts[b];
            if greater + count >= k as u64 {
                if self.min[b] != self.max[b] {
                    return Stage::Coarse {
                        counts: vec![0; BUCKETS],
                    };
                }
                let take = k - greater as usize;
                return if take as u64 == count {
                    Stage::Done(Keep {
                        bits: self.min[b],
                        cutoff: usize::MAX,
                    })
                } else {
                    Stage::Ties {
                        bits: self.min[b],
                        take,
                        from: 0,
                        seen: 0,
                        cutoff: 0,
                    }
                };
            }
            greater += count;
        }
        Stage::Coarse {
            counts: vec![0; BUCKETS],
        }
    }
}

/// How many of |x − base| have the magnitude bits `bits`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn count_equal(x: &[f32], base: &[f32], bits: u32) -> usize {
    x.iter()
        .zip(base)
        .map(|(&v, &b)| (magnitude_bits(v - b) == bits) as u32)
        .sum::<u32>() as usize
}

/// One window of a block scan: the bounds, and where the magnitudes inside it are packed (at the
/// front).
pub struct WindowOut<'a> {
    lo: u32,
    hi: u32,
    bits: &'a mut [u32],
}

/// Scans one block of |x − base| against each of `N` windows at once (breadcrumbs searches two
/// thresholds per model): per window, how many magnitudes exceed `hi` and how many lie in
/// [lo, hi], packed into its outputs.
fn window_scan<const N: usize>(
    x: &[f32],
    base: &[f32],
    windows: &mut [WindowOut; N],
) -> [(usize, usize); N] {
    assert!(x.len() == base.len());
    assert!(windows.iter().all(|w| x.len() <= w.bits.len()));
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above) and the slices were checked to be long
        // enough for every load and compressed store.
        return unsafe { window_scan_avx512(x, base, windows) };
    }
    window_scan_portable(x, base, windows, 0, [(0, 0); N])
}

/// Branch-free scalar form (from element `from`, continuing the counts in `acc`).
fn window_scan_portable<const N: usize>(
    x: &[f32],
    base: &[f32],
    windows: &mut [WindowOut; N],
    from: usize,
    mut acc: [(usize, usize); N],
) -> [(usize, usize); N] {
    for j in from..x.len() {
        let b = magnitude_bits(x[j] - base[j]);
        for (w, (above, found)) in windows.iter_mut().zip(&mut acc) {
            *above += (b > w.hi) as usize;
            w.bits[*found] = b;
            *found += ((b >= w.lo) & (b <= w.hi)) as usize;
        }
    }
    acc
}

/// 16 elements at a time; in-window elements are packed in a register and stored whole (a
/// compressed store straight to memory is microcoded and ~20× slower on AMD Zen 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn window_scan_avx512<const N: usize>(
    x: &[f32],
    base: &[f32],
    windows: &mut [WindowOut; N],
) -> [(usize, usize); N] {
    use std::arch::x86_64::*;
    let bounds = windows.each_ref().map(|w| {
        (
            _mm512_set1_epi32(w.lo as i32),
            _mm512_set1_epi32(w.hi as i32),
        )
    });
    let magnitude = _mm512_set1_epi32(0x7FFF_FFFF);
    let mut acc = [(0usize, 0usize); N];
    let mut j = 0;
    while j + 16 <= x.len() {
        // SAFETY (all pointer uses): j + 16 ≤ len for the loads; the stores write 16 values at
        // `found`, and found + 16 ≤ j + 16 ≤ bits.len() (checked by the caller).
        let d = unsafe {
            _mm512_sub_ps(
                _mm512_loadu_ps(x.as_ptr().add(j)),
                _mm512_loadu_ps(base.as_ptr().add(j)),
            )
        };
        let b = _mm512_and_si512(_mm512_castps_si512(d), magnitude);
        for ((w, &(lo_v, hi_v)), (above, found)) in windows.iter_mut().zip(&bounds).zip(&mut acc) {
            *above += _mm512_cmpgt_epu32_mask(b, hi_v).count_ones() as usize;
            let inside = _mm512_cmpge_epu32_mask(b, lo_v) & _mm512_cmple_epu32_mask(b, hi_v);
            unsafe {
                _mm512_storeu_si512(
                    w.bits.as_mut_ptr().add(*found).cast(),
                    _mm512_maskz_compress_epi32(inside, b),
                );
            }
            *found += inside.count_ones() as usize;
        }
        j += 16;
    }
    window_scan_portable(x, base, windows, j, acc)
}

/// Exact answer from all candidates at or around the k-th largest (k counted within them).
fn exact_from_candidates(candidates: &mut [(u32, usize)], k: usize) -> Keep {
    candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let (bits, index) = candidates[k - 1];
    Keep {
        bits,
        cutoff: index + 1,
    }
}

/// The bucket holding the `k`-th largest element (k ≥ 1) and how many elements lie above it.
fn kth_bucket(counts: &[usize], k: usize) -> (usize, usize) {
    let mut above = 0;
    for bucket in (0..counts.len()).rev() {
        if above + counts[bucket] >= k {
            return (bucket, above);
        }
        above += counts[bucket];
    }
    (0, above)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the whole search over an in-memory slice.
    fn top_k(values: &[f32], k: usize) -> Keep {
        top_k_passes(values, k).0
    }

    /// The answer and how many passes it took.
    fn top_k_passes(values: &[f32], k: usize) -> (Keep, usize) {
        let (keep, read) = run_search(TopK::new(k, values.len()), values);
        (keep, read.len())
    }

    /// Feeds `values` to `search` in executor blocks, pass after pass until it has an answer,
    /// skipping the blocks it does not want as the executor does: the answer, and the blocks
    /// read in each pass.
    fn run_search(mut search: TopK, values: &[f32]) -> (Keep, Vec<usize>) {
        let zeros = vec![0f32; BLOCK];
        let mut read = Vec::new();
        while search.result().is_none() {
            let mut blocks = 0;
            for start in (0..values.len()).step_by(BLOCK) {
                if search.wants_block(start) {
                    let x = &values[start..(start + BLOCK).min(values.len())];
                    search.observe(start, x, &zeros[..x.len()]);
                    blocks += 1;
                }
            }
            search.end_pass();
            read.push(blocks);
        }
        (search.result().expect("loop ends when done"), read)
    }

    /// Which elements `keep` keeps.
    fn kept(keep: Keep, values: &[f32]) -> Vec<bool> {
        values
            .iter()
            .enumerate()
            .map(|(i, x)| keep.keeps(i, magnitude_bits(*x)))
            .collect()
    }

    fn reference_keep(values: &[f32], k: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
        let mut keep = vec![false; values.len()];
        for &i in &order[..k] {
            keep[i] = true;
        }
        keep
    }

    fn check(values: &[f32], ks: &[usize]) {
        for &k in ks {
            let t = top_k(values, k);
            assert_eq!(
                kept(t, values),
                reference_keep(values, k),
                "n={} k={k}",
                values.len()
            );
        }
    }

    #[test]
    fn window_scan_paths_agree() {
        let x: Vec<f32> = (0..4093).map(|i| ((i as f32) * 0.37).sin()).collect();
        let base: Vec<f32> = (0..4093).map(|i| ((i as f32) * 0.11).cos() * 0.5).collect();
        let windows =
            [(0.2, 0.6), (0.5, 1.2)].map(|(lo, hi)| (magnitude_bits(lo), magnitude_bits(hi)));
        // Each window scanned alone, by both paths, and both at once.
        type Scan<'a> = &'a dyn Fn(&mut [WindowOut]) -> Vec<(usize, usize)>;
        let run = |f: Scan, which: &[usize]| {
            let mut buffers = vec![vec![0u32; BLOCK]; which.len()];
            let mut outs: Vec<WindowOut> = buffers
                .iter_mut()
                .zip(which)
                .map(|(bits, &w)| WindowOut {
                    lo: windows[w].0,
                    hi: windows[w].1,
                    bits,
                })
                .collect();
            let counts = f(&mut outs);
            counts
                .iter()
                .zip(&buffers)
                .map(|(&(above, found), bits)| (above, bits[..found].to_vec()))
                .collect::<Vec<_>>()
        };
        let one = |o: &mut [WindowOut]| -> Vec<(usize, usize)> {
            let o: &mut [WindowOut; 1] = o.try_into().unwrap();
            window_scan(&x, &base, o).to_vec()
        };
        let portable = |o: &mut [WindowOut]| -> Vec<(usize, usize)> {
            let o: &mut [WindowOut; 1] = o.try_into().unwrap();
            window_scan_portable(&x, &base, o, 0, [(0, 0)]).to_vec()
        };
        let both = |o: &mut [WindowOut]| -> Vec<(usize, usize)> {
            let o: &mut [WindowOut; 2] = o.try_into().unwrap();
            window_scan(&x, &base, o).to_vec()
        };
        let alone: Vec<_> = (0..2).flat_map(|w| run(&one, &[w])).collect();
        let alone_portable: Vec<_> = (0..2).flat_map(|w| run(&portable, &[w])).collect();
        assert_eq!(alone, alone_portable);
        assert_eq!(run(&both, &[0, 1]), alone);
        assert!(alone
            .iter()
            .all(|(above, inside)| *above > 100 && inside.len() > 100));
    }

    #[test]
    fn small_tensors_are_exact_from_the_sample() {
        let mut values: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 64.0)
            .collect();
        values[17] = f32::MIN_POSITIVE;
        values[18] = -0.0;
        check(&values, &[1, 2, 10, 999, 1000, 2500, 4999, 5000]);
        assert_eq!(top_k(&values, 0), Keep::NONE);
    }

    #[test]
    fn large_tensors_use_the_window_and_heavy_ties() {
        // Few distinct magnitudes, like bf16 task vectors: the threshold has thousands of ties.
        let values: Vec<f32> = (0..300_000u64)
            .map(|i| (((i * 2654435761) >> 7) % 41) as f32 - 20.0)
            .collect();
        check(&values, &[1, 7, 30_000, 150_000, 299_999]);
        let smooth: Vec<f32> = (0..200_003u64)
            .map(|i| ((i as f32) * 0.618).sin())
            .collect();
        check(&smooth, &[3, 20_000, 100_001]);
    }

    #[test]
    fn two_searches_fed_together_find_what_each_finds_alone() {
        let values: Vec<f32> = (0..200_003u64)
            .map(|i| ((i as f32) * 0.618).sin())
            .collect();
        let zeros = vec![0f32; BLOCK];
        // Breadcrumbs' pair: the top 21 % and the top 1 %; a tiny k ends after the sample.
        for (ka, kb) in [(42_000, 2_000), (42_000, 1)] {
            let (mut a, mut b) = (TopK::new(ka, values.len()), TopK::new(kb, values.len()));
            while a.result().is_none() || b.result().is_none() {
                for start in (0..values.len()).step_by(BLOCK) {
                    let x = &values[start..(start + BLOCK).min(values.len())];
                    // As a merge feeds them: both get every block either wants.
                    if a.wants_block(start) || b.wants_block(start) {
                        TopK::observe_both(&mut a, &mut b, start, x, &zeros[..x.len()]);
                    }
                }
                a.end_pass();
                b.end_pass();
            }
            assert_eq!(a.result(), Some(top_k(&values, ka)));
            assert_eq!(b.result(), Some(top_k(&values, kb)));
        }
    }

    #[test]
    fn the_tie_cutoff_reads_one_block_again() {
        // Few distinct magnitudes: the k-th value has thousands of equal elements, of which
        // only the first few are kept; the window holds them, but not their indices.
        let values: Vec<f32> = (0..300_000u64)
            .map(|i| (((i * 2654435761) >> 7) % 41) as f32 - 20.0)
            .collect();
        let blocks = values.len().div_ceil(BLOCK);
        for k in [30_000, 150_000] {
            let (t, read) = run_search(TopK::new(k, values.len()), &values);
            assert_eq!(kept(t, &values), reference_keep(&values, k), "k={k}");
            assert_eq!(read[1..], [blocks, 1], "k={k}: sample, window, one block");
        }
    }

    #[test]
    fn crowded_window_is_settled_from_its_histogram() {
        // Few distinct magnitudes put a wide tie group in the window; with no memory for the
        // candidates the window's value counts give the k-th value and one tie pass the cutoff.
        let values: Vec<f32> = (0..300_000u64)
            .map(|i| (((i * 2654435761) >> 7) % 41) as f32 - 20.0)
            .collect();
        for k in [7, 150_000] {
            let (t, read) = run_search(TopK::new(k, values.len()).with_memory(0), &values);
            assert_eq!(kept(t, &values), reference_keep(&values, k), "k={k}");
            assert_eq!(read.len(), 3, "k={k}: sample, window, ties");
        }
    }

    #[test]
    fn top_edge_window_is_settled_from_its_histogram() {
        // Breadcrumbs' outlier edge: k is 1 % of n, inside the sample's margin of the top. The
        // window then ends at the sample's largest value, so its value counts keep one value per
        // bucket and settle it without the two full histogram passes.
        let values: Vec<f32> = (0..300_000u64)
            .map(|i| (((i * 2654435761) >> 7) % 4001) as f32 / 64.0 - 31.25)
            .collect();
        let k = 3_000;
        let (t, read) = run_search(TopK::new(k, values.len()).with_memory(0), &values);
        assert_eq!(kept(t, &values), reference_keep(&values, k));
        assert!(read.len() <= 3, "{} passes", read.len());
    }

    #[test]
    fn tie_pass_stops_reading_once_the_cutoff_is_found() {
        let values: Vec<f32> = (0..300_000u64)
            .map(|i| (((i * 2654435761) >> 7) % 41) as f32 - 20.0)
            .collect();
        let (_, wanted) = run_search(TopK::new(7, values.len()).with_memory(0), &values);
        // Seven of the 20-magnitude elements sit in the first block: the tie pass reads one.
        assert_eq!(wanted.len(), 3);
        assert_eq!(wanted[2], 1, "blocks read per pass: {wanted:?}");
    }

    #[test]
    fn histogram_fallback_is_exact() {
        // The sample sees only every stride-th element; make those small and all others large, so
        // the window misses the k-th value and the histogram passes take over.
        let n: usize = 300_000;
        let stride = n.div_ceil(BLOCK).div_ceil(SAMPLE_BLOCKS);
        let values: Vec<f32> = (0..n)
            .map(|i| {
                if (i / BLOCK).is_multiple_of(stride) {
                    (i % 97) as f32 / 97.0
                } else {
                    1000.0 + (i % 5000) as f32
                }
            })
            .collect();
        let (_, passes) = top_k_passes(&values, 150_000);
        assert!(passes > 2, "fallback expected, took {passes} passes");
        check(&values, &[150_000, 5000, 299_000]);
    }
}
