//! DELLA's MagPrune mask (Deep et al., arXiv:2406.11617): within each row, rank the task-vector
//! magnitudes, normalise the ranks to [0, 1] and keep each element with probability
//! `density − ε + 2ε·rank_norm`, so larger magnitudes survive more often.
//!
//! Equal magnitudes share their mean rank (the "mid-rank" `less + (equal − 1)/2`), so each is kept
//! with the mean of the probabilities of the ranks they span: exactly its chance under torch's
//! arbitrary tie order in mergekit, and the same for every copy of a value. A row of one element
//! keeps with probability `density` (mergekit divides by zero there). The draws are the 32-bit
//! counter-based stream of DARE (`rng::Draws`), so the mask, one bit per element, is a pure
//! function of (seed, tensor, model).
//!
//! No row is sorted. An element is kept when its draw is below the threshold of its doubled
//! mid-rank, and thresholds rise with rank. A histogram of the row's magnitudes, over buckets of
//! equal width in bit-pattern space (zeros apart), bounds each element's rank to its bucket's span,
//! and so its threshold to the span's least and greatest: a draw below the least keeps, one not
//! below the greatest drops. Coarse buckets (64, groups of the fine ones) decide ~98 % of a row
//! sixteen elements at a time, their bounds looked up from registers; the fine buckets decide
//! most of the rest, and the few left (a crowd of equal magnitudes, mostly) get their exact
//! mid-rank by counting among the members of their fine buckets, once per distinct value.

use super::rows::RowBuffer;
use crate::rng::{keep_threshold, Draws};
use multiversion::multiversion;

#[derive(Debug)]
pub struct MagPrune {
    rows: RowBuffer,
    /// Keep threshold by doubled mid-rank 2F = 0 ..= 2(m − 1): kept when the draw is below it.
    by_rank2: Vec<u32>,
    key: u64,
    bits: Vec<u64>,
    /// ‖δ‖₁ and ‖mask ⊙ δ‖₁ over the rows done, for the rescale, so that it needs no pass of
    /// its own.
    l1: [f64; 2],
    scratch: RowScratch,
}

/// Per-row scratch, kept between rows.
#[derive(Debug, Default)]
struct RowScratch {
    /// |δ| of the row.
    magnitudes: Vec<f32>,
    draws: Vec<u32>,
    ranks: RowRanks,
    kept: Vec<u64>,
    /// Positions the coarse buckets leave open.
    open: Vec<u32>,
    /// (magnitude bits, position) of those the fine buckets leave open too.
    exact: Vec<(u32, u32)>,
    /// The magnitudes of the fine buckets that exact ranks are counted in.
    members: Vec<f32>,
}

/// Coarse buckets: the zeros, then 63 groups of fine buckets. Their bounds fit four vector
/// registers per table, so judging needs no memory lookups.
const COARSE: usize = 64;

impl MagPrune {
    pub fn new(numel: usize, row_len: usize, density: f64, epsilon: f64, key: u64) -> MagPrune {
        let (low, span) = (density - epsilon, 2.0 * epsilon);
        let top2 = 2 * (row_len.max(1) - 1);
        let by_rank2 = (0..=top2)
            .map(|rank2| {
                let rank_norm = if top2 > 0 {
                    rank2 as f64 / top2 as f64
                } else {
                    0.5
                };
                keep_threshold(low + rank_norm * span)
            })
            .collect();
        MagPrune {
            rows: RowBuffer::new(row_len, 2),
            by_rank2,
            key,
            bits: vec![0; numel.div_ceil(64)],
            l1: [0.0; 2],
            scratch: RowScratch::default(),
        }
    }

    /// The next block of the model and the base, in index order.
    pub fn observe(&mut self, x: &[f32], base: &[f32]) {
        let Self {
            rows,
            by_rank2,
            key,
            bits,
            l1,
            scratch,
        } = self;
        rows.push(&[x, base], |row, inputs| {
            let first = row * inputs[0].len();
            let [full, masked] = scratch.judge_row(inputs[0], inputs[1], *key, first, by_rank2);
            l1[0] += full;
            l1[1] += masked;
            or_at(bits, first, &scratch.kept);
        });
    }

    /// The mask, one bit per element (bit i % 64 of word i / 64), and the task vector's L1
    /// norm before and after it.
    pub fn finish(self) -> (Vec<u64>, [f64; 2]) {
        (self.bits, self.l1)
    }
}

impl RowScratch {
    /// Decides the row starting at element `first` into `kept` and returns its L1 norms.
    fn judge_row(
        &mut self,
        x: &[f32],
        base: &[f32],
        key: u64,
        first: usize,
        by_rank2: &[u32],
    ) -> [f64; 2] {
        let m = x.len();
        self.magnitudes.resize(m, 0.0);
        let range = row_magnitudes(x, base, &mut self.magnitudes);
        self.draws.resize(m, 0);
        fill_draws(key, first as u64, &mut self.draws);
        self.kept.clear();
        self.kept.resize(m.div_ceil(64), 0);
        let (least, greatest) = (by_rank2[0], by_rank2[by_rank2.len() - 1]);
        if least == greatest {
            // Every rank keeps alike.
            for (j, &d) in self.draws.iter().enumerate() {
                self.kept[j / 64] |= ((d < least) as u64) << (j % 64);
            }
        } else {
            self.judge_ranked(range, by_rank2);
        }
        l1_norms(&self.magnitudes, &self.kept)
    }

    fn judge_ranked(&mut self, range: (u32, u32), by_rank2: &[u32]) {
        let Self {
            magnitudes,
            draws,
            ranks,
            kept,
            open,
            exact,
            members,
        } = self;
        ranks.index(magnitudes, range);
        let coarse = ranks.coarse_bounds(by_rank2);
        judge(draws, &ranks.fine, ranks.group_shift, &coarse, kept, open);
        exact.clear();
        let mut needed = [0u32; COARSE];
        for &j in open.iter() {
            let (j, f) = (j as usize, ranks.fine[j as usize] as usize);
            let (least, greatest) = ranks.fine_bounds(f, by_rank2);
            if draws[j] < least {
                kept[j / 64] |= 1 << (j % 64);
            } else if draws[j] < greatest {
                exact.push((magnitudes[j].to_bits(), j as u32));
                needed[f / 32] |= 1 << (f % 32);
            }
        }
        if exact.is_empty() {
            return;
        }
        // Exact ranks count within the fine buckets they fall in, whose members are gathered
        // in one pass; equal magnitudes share their rank, so each value is counted once.
        gather_members(magnitudes, &ranks.fine, &needed, members);
        exact.sort_unstable();
        let mut counted: Option<(u32, u32)> = None;
        for &(value, j) in exact.iter() {
            let threshold = match counted {
                Some((v, t)) if v == value => t,
                _ => {
                    let f = ranks.fine[j as usize] as usize;
                    let rank2 = ranks.mid_rank2(f, value, &needed, members);
                    let t = by_rank2[rank2];
                    counted = Some((value, t));
                    t
                }
            };
            let j = j as usize;
            kept[j / 64] |= ((draws[j] < threshold) as u64) << (j % 64);
        }
    }
}

/// How many of `values` (non-negative) have a bit pattern below `bound` and below `bound + 1`.
/// (Counted in u32 lanes, a row being shorter than 2³².)
fn count_below_pair(values: &[f32], bound: u32) -> (u32, u32) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        let (counts, from) = unsafe { count_below_pair_avx512(values, bound) };
        return count_below_pair_from(values, bound, from, counts);
    }
    count_below_pair_from(values, bound, 0, (0, 0))
}

/// `count_below_pair` continued from element `from`, with the counts so far.
fn count_below_pair_from(
    values: &[f32],
    bound: u32,
    from: usize,
    (mut less, mut not_above): (u32, u32),
) -> (u32, u32) {
    for v in &values[from..] {
        less += (v.to_bits() < bound) as u32;
        not_above += (v.to_bits() <= bound) as u32;
    }
    (less, not_above)
}

/// Sixteen values per compare, each count a masked subtraction of −1 (LLVM widens the mask to
/// a vector first), the last vector masked; returns the counts and where it stopped (the end).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn count_below_pair_avx512(values: &[f32], bound: u32) -> ((u32, u32), usize) {
    use std::arch::x86_64::*;
    let (below, not_above) = (
        _mm512_set1_epi32(bound as i32),
        _mm512_set1_epi32(bound.wrapping_add(1) as i32),
    );
    let minus_one = _mm512_set1_epi32(-1);
    let mut counts = [_mm512_setzero_si512(); 4];
    let mut i = 0;
    while i + 32 <= values.len() {
        for half in 0..2 {
            // SAFETY: i + 32 ≤ len for both loads.
            let x = unsafe { _mm512_loadu_si512(values.as_ptr().add(i + 16 * half).cast()) };
            let (a, b) = (2 * half, 2 * half + 1);
            let is_below = _mm512_cmplt_epu32_mask(x, below);
            counts[a] = _mm512_mask_sub_epi32(counts[a], is_below, counts[a], minus_one);
            let is_not_above = _mm512_cmplt_epu32_mask(x, not_above);
            counts[b] = _mm512_mask_sub_epi32(counts[b], is_not_above, counts[b], minus_one);
        }
        i += 32;
    }
    while i < values.len() {
        let lanes = (values.len() - i).min(16);
        let valid = (((1u32 << lanes) - 1) & 0xffff) as u16;
        let valid = if lanes == 16 { u16::MAX } else { valid };
        // SAFETY: the masked load reads only the lanes below len.
        let x = unsafe { _mm512_maskz_loadu_epi32(valid, values.as_ptr().add(i).cast()) };
        let is_below = _mm512_mask_cmplt_epu32_mask(valid, x, below);
        counts[0] = _mm512_mask_sub_epi32(counts[0], is_below, counts[0], minus_one);
        let is_not_above = _mm512_mask_cmplt_epu32_mask(valid, x, not_above);
        counts[1] = _mm512_mask_sub_epi32(counts[1], is_not_above, counts[1], minus_one);
        i += lanes;
    }
    let sum = |a: __m512i, b: __m512i| _mm512_reduce_add_epi32(_mm512_add_epi32(a, b)) as u32;
    let less = sum(counts[0], counts[2]);
    let not_above = sum(counts[1], counts[3]);
    ((less, not_above), i)
}

/// The draws of elements `first..first + out.len()`: `Draws::at(key, i).bits(i)`, one view per
/// stretch sharing the high 32 bits of the index.
fn fill_draws(key: u64, first: u64, out: &mut [u32]) {
    let mut at = 0;
    while at < out.len() {
        let index = first + at as u64;
        let left_in_stretch = (1u64 << 32) - (index & 0xffff_ffff);
        let end = out.len().min(at.saturating_add(left_in_stretch as usize));
        draw_stretch(Draws::at(key, index), index, &mut out[at..end]);
        at = end;
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn draw_stretch(draws: Draws, first: u64, out: &mut [u32]) {
    for (j, d) in out.iter_mut().enumerate() {
        *d = draws.bits(first + j as u64);
    }
}

/// (Σ values, Σ values kept by `words`) of one row of magnitudes: sixteen f32 lanes per sum,
/// added in f64 at the end of the row.
fn l1_norms(values: &[f32], words: &[u64]) -> [f64; 2] {
    assert!(words.len() >= values.len().div_ceil(64));
    let lanes = [[0f32; 16]; 2];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); `words` covers `values` (asserted).
        let (lanes, from) = unsafe { l1_lanes_avx512(values, words) };
        return l1_sum(l1_lanes(values, words, from, lanes));
    }
    l1_sum(l1_lanes(values, words, 0, lanes))
}

/// The lanes of `l1_norms` continued from element `from` (a multiple of 16).
fn l1_lanes(
    values: &[f32],
    words: &[u64],
    from: usize,
    mut lanes: [[f32; 16]; 2],
) -> [[f32; 16]; 2] {
    for (i, &v) in values.iter().enumerate().skip(from) {
        lanes[0][i % 16] += v;
        if words[i / 64] >> (i % 64) & 1 == 1 {
            lanes[1][i % 16] += v;
        }
    }
    lanes
}

fn l1_sum(lanes: [[f32; 16]; 2]) -> [f64; 2] {
    lanes.map(|lanes| lanes.iter().map(|&v| v as f64).sum::<f64>())
}

/// Sixteen elements at a time, the mask bits as the add's lane mask (LLVM scalarises the bit
/// test); returns the lanes and where it stopped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn l1_lanes_avx512(values: &[f32], words: &[u64]) -> ([[f32; 16]; 2], usize) {
    use std::arch::x86_64::*;
    let (mut full, mut masked) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 16 <= values.len() {
        // SAFETY: i + 16 ≤ len for the load.
        let v = unsafe { _mm512_loadu_ps(values.as_ptr().add(i)) };
        let keep = (words[i / 64] >> (i % 64)) as u16;
        full = _mm512_add_ps(full, v);
        masked = _mm512_mask_add_ps(masked, keep, masked, v);
        i += 16;
    }
    let mut lanes = [[0f32; 16]; 2];
    // SAFETY: each array holds 16 f32.
    unsafe {
        _mm512_storeu_ps(lanes[0].as_mut_ptr(), full);
        _mm512_storeu_ps(lanes[1].as_mut_ptr(), masked);
    }
    (lanes, i)
}

/// Per coarse bucket, the threshold at its least and at its greatest possible doubled mid-rank.
#[derive(Debug, Clone, Copy)]
struct CoarseBounds {
    least: [u32; COARSE],
    greatest: [u32; COARSE],
}

/// Judges every element by its coarse bucket (fine bucket `fine[j]` grouped by `group_shift`):
/// into `kept`, the mask words of the elements kept for sure, and into `open`, the positions
/// whose bucket does not decide.
fn judge(
    draws: &[u32],
    fine: &[u32],
    group_shift: u32,
    bounds: &CoarseBounds,
    kept: &mut [u64],
    open: &mut Vec<u32>,
) {
    assert!(fine.len() >= draws.len() && kept.len() >= draws.len().div_ceil(64));
    open.clear();
    let mut from = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the lengths are asserted above.
        from = unsafe { judge_avx512(draws, fine, group_shift, bounds, kept, open) };
    }
    judge_portable(draws, fine, group_shift, bounds, from, kept, open);
}

/// The coarse bucket of fine bucket `f`: 0 for the zeros, else 1 + (f − 1) / group size.
fn coarse_of(f: u32, group_shift: u32) -> usize {
    ((f + (1 << group_shift) - 1) >> group_shift) as usize & (COARSE - 1)
}

/// Gathers into `members` the values whose fine bucket is set in the bitmap `needed` (bit
/// f % 32 of word f / 32).
fn gather_members(values: &[f32], fine: &[u32], needed: &[u32; COARSE], members: &mut Vec<f32>) {
    assert!(fine.len() >= values.len());
    members.clear();
    let mut from = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the lengths are asserted above.
        from = unsafe { gather_members_avx512(values, fine, needed, members) };
    }
    for (&v, &f) in values.iter().zip(fine).skip(from) {
        let f = f as usize % (32 * COARSE);
        if needed[f / 32] >> (f % 32) & 1 == 1 {
            members.push(v);
        }
    }
}

/// `gather_members` sixteen at a time: the bitmap's words looked up from registers like the
/// coarse bounds, the members packed with a compress. Returns where it stopped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_members_avx512(
    values: &[f32],
    fine: &[u32],
    needed: &[u32; COARSE],
    members: &mut Vec<f32>,
) -> usize {
    use std::arch::x86_64::*;
    let table = RegisterTable::load(needed);
    let (five, low_bits, one) = (
        _mm_cvtsi32_si128(5),
        _mm512_set1_epi32(31),
        _mm512_set1_epi32(1),
    );
    let whole = values.len() / 16 * 16;
    members.reserve(whole + 16);
    let mut n = members.len();
    for at in (0..whole).step_by(16) {
        // SAFETY: at + 16 ≤ whole ≤ both lengths; the store writes 16 lanes at n ≤ at, within
        // the reserved capacity.
        unsafe {
            let f = _mm512_loadu_si512(fine.as_ptr().add(at).cast());
            let bits = table.lookup(_mm512_srl_epi32(f, five));
            let bit = _mm512_srlv_epi32(bits, _mm512_and_si512(f, low_bits));
            let member = _mm512_test_epi32_mask(bit, one);
            let v = _mm512_loadu_ps(values.as_ptr().add(at));
            _mm512_storeu_ps(
                members.as_mut_ptr().add(n),
                _mm512_maskz_compress_ps(member, v),
            );
            n += member.count_ones() as usize;
        }
    }
    // SAFETY: the first n elements were written above.
    unsafe { members.set_len(n) };
    whole
}

/// `judge` element by element, from element `from` (a multiple of 64).
fn judge_portable(
    draws: &[u32],
    fine: &[u32],
    group_shift: u32,
    bounds: &CoarseBounds,
    from: usize,
    kept: &mut [u64],
    open: &mut Vec<u32>,
) {
    for (j, &d) in draws.iter().enumerate().skip(from) {
        let c = coarse_of(fine[j], group_shift);
        let keep = d < bounds.least[c];
        kept[j / 64] |= (keep as u64) << (j % 64);
        if !keep && d < bounds.greatest[c] {
            open.push(j as u32);
        }
    }
}

/// A table of 64 u32 held in four vector registers.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct RegisterTable([std::arch::x86_64::__m512i; 4]);

#[cfg(target_arch = "x86_64")]
impl RegisterTable {
    #[target_feature(enable = "avx512f")]
    fn load(table: &[u32; COARSE]) -> RegisterTable {
        use std::arch::x86_64::*;
        // SAFETY: quarter q holds 16 u32 of the 64.
        RegisterTable(
            [0, 1, 2, 3].map(|q| unsafe { _mm512_loadu_si512(table.as_ptr().add(16 * q).cast()) }),
        )
    }

    /// The entries at sixteen indices below 64: two two-register permutes and a blend.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn lookup(&self, index: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let t = &self.0;
        let upper = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32));
        let low = _mm512_permutex2var_epi32(t[0], index, t[1]);
        let high = _mm512_permutex2var_epi32(t[2], index, t[3]);
        _mm512_mask_blend_epi32(upper, low, high)
    }
}

/// `judge` sixteen elements per vector, the coarse bounds in registers. Returns where it
/// stopped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn judge_avx512(
    draws: &[u32],
    fine: &[u32],
    group_shift: u32,
    bounds: &CoarseBounds,
    kept: &mut [u64],
    open: &mut Vec<u32>,
) -> usize {
    use std::arch::x86_64::*;
    let least = RegisterTable::load(&bounds.least);
    let greatest = RegisterTable::load(&bounds.greatest);
    let round = _mm512_set1_epi32((1 << group_shift) - 1);
    let shift = _mm_cvtsi32_si128(group_shift as i32);
    let whole = draws.len() / 64;
    // Open lanes are collected as words and listed after the loop: a push may call the
    // allocator, which would spill the tables around every call.
    let mut open_words = [0u64; 64];
    for (chunk, kept) in kept[..whole].chunks_mut(64).enumerate() {
        for (w, word) in kept.iter_mut().enumerate() {
            let mut undecided = 0u64;
            for g in 0..4 {
                let at = (chunk * 64 + w) * 64 + g * 16;
                // SAFETY: at + 16 ≤ whole · 64 ≤ both lengths (asserted by `judge`).
                let (f, d) = unsafe {
                    (
                        _mm512_loadu_si512(fine.as_ptr().add(at).cast()),
                        _mm512_loadu_si512(draws.as_ptr().add(at).cast()),
                    )
                };
                let c = _mm512_srl_epi32(_mm512_add_epi32(f, round), shift);
                let keep = _mm512_cmplt_epu32_mask(d, least.lookup(c));
                let open = _mm512_mask_cmplt_epu32_mask(!keep, d, greatest.lookup(c));
                *word |= (keep as u64) << (16 * g);
                undecided |= (open as u64) << (16 * g);
            }
            open_words[w] = undecided;
        }
        for (w, &word) in open_words.iter().enumerate().take(kept.len()) {
            push_positions((chunk * 64 + w) * 64, word, open);
        }
    }
    whole * 64
}

/// Appends `first` + the positions of the set bits of `word`.
fn push_positions(first: usize, mut word: u64, positions: &mut Vec<u32>) {
    while word != 0 {
        positions.push(first as u32 + word.trailing_zeros());
        word &= word - 1;
    }
}

/// ORs the row's mask words into the tensor's mask, the row starting at element `first`.
fn or_at(bits: &mut [u64], first: usize, row: &[u64]) {
    let (at, offset) = (first / 64, first % 64);
    for (i, &word) in row.iter().enumerate() {
        bits[at + i] |= word << offset;
        // Bits that spill over belong to elements of the row, so their word exists.
        let spill = if offset > 0 { word >> (64 - offset) } else { 0 };
        if spill != 0 {
            bits[at + i + 1] |= spill;
        }
    }
}

/// Rank bounds within one row of non-negative values: a histogram over fine buckets of equal
/// width on the row's range of bit patterns (an f32 bit pattern orders like a non-negative
/// float), zeros in bucket 0, the others in 63 groups of `1 << group_shift` fine buckets.
#[derive(Debug, Default)]
struct RowRanks {
    min: u32,
    shift: u32,
    group_shift: u32,
    /// Fine bucket b holds the ranks start[b]..start[b + 1].
    start: Vec<u32>,
    counts: Vec<u32>,
    fine: Vec<u32>,
}

impl RowRanks {
    /// Indexes `values`, whose least nonzero and greatest bit patterns are `(min, max)`.
    fn index(&mut self, values: &[f32], (min, max): (u32, u32)) {
        // About a fine bucket per four elements, at most 32 per coarse one (so that the needed
        // fine buckets fit a bitmap of 64 words). Task vectors of bf16 weights hold crowds of
        // equal magnitudes, and most exact ranks fall in them; buckets two or four times finer
        // measured no faster.
        let group = (values.len() / 4 / COARSE).next_power_of_two().clamp(1, 32);
        self.group_shift = group.trailing_zeros();
        let nonzero = (COARSE - 1) * group;
        let width = max.saturating_sub(min);
        self.min = min.min(max);
        self.shift = 0;
        while width >> self.shift > nonzero as u32 - 1 {
            self.shift += 1;
        }
        self.fine.resize(values.len(), 0);
        bucket_all(values, self.min, self.shift, &mut self.fine);
        // Two interleaved histograms, so that neighbours in one bucket do not wait on each
        // other's increment; a power-of-two size, so that masks spare the bounds checks.
        let size = COARSE * group;
        self.counts.clear();
        self.counts.resize(2 * size, 0);
        let (even, odd) = self.counts.split_at_mut(size);
        let last = size - 1;
        let mut pairs = self.fine.chunks_exact(2);
        for pair in &mut pairs {
            even[pair[0] as usize & last] += 1;
            odd[pair[1] as usize & last] += 1;
        }
        if let [b] = pairs.remainder() {
            even[*b as usize & last] += 1;
        }
        self.start.clear();
        self.start.resize(nonzero + 2, 0);
        running_totals(even, odd, &mut self.start);
    }

    /// The thresholds at the least and greatest doubled mid-rank of fine buckets `buckets`, the
    /// zeros being one value: their mid-rank is exact.
    #[inline]
    fn bounds(&self, buckets: std::ops::RangeInclusive<usize>, by_rank2: &[u32]) -> (u32, u32) {
        let (start, end) = (self.start[*buckets.start()], self.start[buckets.end() + 1]);
        let (start, end) = (start as usize, end as usize);
        if end == start {
            return (0, 0);
        }
        if *buckets.start() == 0 && *buckets.end() == 0 {
            let exact = by_rank2[start + end - 1];
            return (exact, exact);
        }
        (by_rank2[2 * start], by_rank2[2 * (end - 1)])
    }

    /// The doubled mid-rank of the bit pattern `value`, of fine bucket `bucket`, whose
    /// members are among `members` with those of the other buckets set in `needed`: the ranks
    /// below the bucket, plus its members below `value` counted twice, plus those equal, minus
    /// one.
    fn mid_rank2(
        &self,
        bucket: usize,
        value: u32,
        needed: &[u32; COARSE],
        members: &[f32],
    ) -> usize {
        // The members of lower buckets are below `value` too, and counted in `start` already.
        let mut lower = 0;
        for (w, &word) in needed.iter().enumerate().take(bucket / 32 + 1) {
            let mut word = word;
            while word != 0 {
                let f = w * 32 + word.trailing_zeros() as usize;
                if f >= bucket {
                    break;
                }
                lower += self.start[f + 1] - self.start[f];
                word &= word - 1;
            }
        }
        let (less, not_above) = count_below_pair(members, value);
        (2 * (self.start[bucket] - lower) + less + not_above) as usize - 1
    }

    fn fine_bounds(&self, bucket: usize, by_rank2: &[u32]) -> (u32, u32) {
        self.bounds(bucket..=bucket, by_rank2)
    }

    fn coarse_bounds(&self, by_rank2: &[u32]) -> CoarseBounds {
        let mut coarse = CoarseBounds {
            least: [0; COARSE],
            greatest: [0; COARSE],
        };
        let group = 1usize << self.group_shift;
        for c in 0..COARSE {
            let buckets = if c == 0 {
                0..=0
            } else {
                (c - 1) * group + 1..=c * group
            };
            (coarse.least[c], coarse.greatest[c]) = self.bounds(buckets, by_rank2);
        }
        coarse
    }
}

/// start[0] = 0 and start[i + 1] = start[i] + even[i] + odd[i].
fn running_totals(even: &[u32], odd: &[u32], start: &mut [u32]) {
    let n = start.len() - 1;
    assert!(even.len() >= n && odd.len() >= n);
    let mut from = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the lengths are asserted above.
        from = unsafe { running_totals_avx512(even, odd, start) };
    }
    for i in from..n {
        start[i + 1] = start[i] + even[i] + odd[i];
    }
}

/// `running_totals` sixteen at a time: a scan inside the vector in four shifted adds, then the
/// carry from the vectors before. Returns where it stopped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn running_totals_avx512(even: &[u32], odd: &[u32], start: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let n = start.len() - 1;
    let zero = _mm512_setzero_si512();
    let last = _mm512_set1_epi32(15);
    let mut carry = zero;
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n ≤ both inputs' lengths, and start has n + 1 elements.
        unsafe {
            let mut v = _mm512_add_epi32(
                _mm512_loadu_si512(even.as_ptr().add(i).cast()),
                _mm512_loadu_si512(odd.as_ptr().add(i).cast()),
            );
            v = _mm512_add_epi32(v, _mm512_alignr_epi32::<15>(v, zero));
            v = _mm512_add_epi32(v, _mm512_alignr_epi32::<14>(v, zero));
            v = _mm512_add_epi32(v, _mm512_alignr_epi32::<12>(v, zero));
            v = _mm512_add_epi32(v, _mm512_alignr_epi32::<8>(v, zero));
            v = _mm512_add_epi32(v, carry);
            _mm512_storeu_si512(start.as_mut_ptr().add(i + 1).cast(), v);
            carry = _mm512_permutexvar_epi32(last, v);
        }
        i += 16;
    }
    i
}

/// Bucket 0 for zero, else 1 + the distance of the bit pattern from the least nonzero one, in
/// steps of `1 << shift`.
fn bucket(v: f32, min: u32, shift: u32) -> u32 {
    let bits = v.to_bits();
    if bits == 0 {
        0
    } else {
        ((bits - min) >> shift) + 1
    }
}

/// Writes |x − base| into `magnitudes` and returns its least nonzero and its greatest bit
/// pattern (u32::MAX and 0 for none): one pass while the row is in L1.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn row_magnitudes(x: &[f32], base: &[f32], magnitudes: &mut [f32]) -> (u32, u32) {
    // Sixteen lanes of (bits − 1, wrapping: zero becomes the greatest) and bits.
    let (mut below, mut max) = ([u32::MAX; 16], [0u32; 16]);
    let mut lane = |l: usize, v: f32, b: f32, m: &mut f32| {
        *m = (v - b).abs();
        below[l] = below[l].min(m.to_bits().wrapping_sub(1));
        max[l] = max[l].max(m.to_bits());
    };
    let whole = x.len() / 16 * 16;
    let sixteens = x.chunks_exact(16).zip(base.chunks_exact(16));
    for ((x, b), m) in sixteens.zip(magnitudes.chunks_exact_mut(16)) {
        for l in 0..16 {
            lane(l, x[l], b[l], &mut m[l]);
        }
    }
    for i in whole..x.len() {
        lane(i - whole, x[i], base[i], &mut magnitudes[i]);
    }
    let (below, max) = (below.into_iter().min(), max.into_iter().max());
    let below = below.unwrap_or(u32::MAX);
    let min = if below == u32::MAX { below } else { below + 1 };
    (min, max.unwrap_or(0))
}

/// `bucket` of every value.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn bucket_all(values: &[f32], min: u32, shift: u32, buckets: &mut [u32]) {
    for (b, &v) in buckets.iter_mut().zip(values) {
        *b = bucket(v, min, shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;

    /// The doubled mid-ranks of a row by their definition: twice the values below, plus the
    /// equal ones, minus one.
    fn mid_ranks2(values: &[f32]) -> Vec<usize> {
        values
            .iter()
            .map(|v| {
                let less = values.iter().filter(|w| *w < v).count();
                let equal = values.iter().filter(|w| *w == v).count();
                2 * less + equal - 1
            })
            .collect()
    }

    fn mask_of(x: &[f32], row_len: usize, density: f64, epsilon: f64, key: u64) -> MagPrune {
        let base = vec![0f32; x.len()];
        let mut mask = MagPrune::new(x.len(), row_len, density, epsilon, key);
        for start in (0..x.len()).step_by(777) {
            let end = (start + 777).min(x.len());
            mask.observe(&x[start..end], &base[start..end]);
        }
        mask
    }

    #[test]
    fn keeps_larger_magnitudes_more_often() {
        let (rows, row_len) = (400, 100);
        let n = rows * row_len;
        // Every row holds the magnitudes 0..100 in a shuffled order.
        let x: Vec<f32> = (0..n).map(|i| ((i * 37) % row_len) as f32).collect();
        let (bits, _) = mask_of(&x, row_len, 0.5, 0.2, 9).finish();
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
    fn equal_magnitudes_share_their_mean_rank() {
        // Half of each row is one value: each copy keeps with the mean probability of the
        // ranks 0..50, 0.3 + 0.4·24.5/99.
        let (rows, row_len) = (2000, 100);
        let x: Vec<f32> = (0..rows * row_len)
            .map(|i| {
                if i % 2 == 0 {
                    1.0
                } else {
                    2.0 + (i % 100) as f32
                }
            })
            .collect();
        let (bits, _) = mask_of(&x, row_len, 0.5, 0.2, 4).finish();
        let kept = (0..x.len())
            .filter(|&i| i % 2 == 0 && bits[i / 64] >> (i % 64) & 1 == 1)
            .count() as f64;
        let p = 0.3 + 0.4 * 24.5 / 99.0;
        let share = kept / (x.len() / 2) as f64;
        assert!((share - p).abs() < 0.01, "{share} vs {p}");
    }

    #[test]
    fn l1_norm_paths_agree() {
        let key = rng::stream_key(8, "l1", 0);
        let values: Vec<f32> = (0..1000).map(|i| rng::uniform(key, i) as f32).collect();
        let words: Vec<u64> = (0..16).map(|i| rng::uniform_bits(key, 5000 + i)).collect();
        for len in [1000, 64, 17, 0] {
            let values = &values[..len];
            let portable = l1_sum(l1_lanes(values, &words, 0, [[0.0; 16]; 2]));
            assert_eq!(l1_norms(values, &words), portable, "{len}");
        }
    }

    #[test]
    fn judge_paths_agree() {
        let key = rng::stream_key(6, "judge", 0);
        let word = |i: u64| (rng::uniform_bits(key, i) >> 21) as u32;
        let mut bounds = CoarseBounds {
            least: [0; COARSE],
            greatest: [0; COARSE],
        };
        for c in 0..COARSE {
            let (x, y) = (word(c as u64), word((c + COARSE) as u64));
            (bounds.least[c], bounds.greatest[c]) = (x.min(y), x.max(y));
        }
        for (len, group_shift) in [(1000, 3), (640, 0), (63, 5), (1, 2)] {
            let draws: Vec<u32> = (0..len).map(|i| word(10_000 + i)).collect();
            let fine: Vec<u32> = (0..len)
                .map(|i| word(20_000 + i) % (63 << group_shift) + (i % 2) as u32)
                .collect();
            let mut kept = vec![0; (len as usize).div_ceil(64)];
            let mut open = Vec::new();
            judge(&draws, &fine, group_shift, &bounds, &mut kept, &mut open);
            let mut want_kept = vec![0; kept.len()];
            let mut want_open = Vec::new();
            let portable = (&draws, &fine, group_shift, &bounds);
            judge_portable(
                portable.0,
                portable.1,
                portable.2,
                portable.3,
                0,
                &mut want_kept,
                &mut want_open,
            );
            assert_eq!(kept, want_kept, "{len}");
            assert_eq!(open, want_open, "{len}");
            assert!(!open.is_empty() || len < 100, "{len}");
        }
    }

    #[test]
    fn vector_kernels_equal_their_loops() {
        let key = rng::stream_key(9, "totals", 0);
        let small = |i: u64| (rng::uniform_bits(key, i) % 50) as u32;
        for n in [0, 1, 15, 16, 17, 100, 513] {
            let even: Vec<u32> = (0..n).map(|i| small(i as u64)).collect();
            let odd: Vec<u32> = (0..n).map(|i| small(1000 + i as u64)).collect();
            let mut start = vec![0; n + 1];
            running_totals(&even, &odd, &mut start);
            let mut total = 0;
            for i in 0..n {
                total += even[i] + odd[i];
                assert_eq!(start[i + 1], total, "{n}: {i}");
            }
            let values: Vec<f32> = (0..n).map(|i| small(i as u64) as f32 / 8.0).collect();
            for bound in [0.0f32, 1.0, 3.125, 7.0] {
                let bits = bound.to_bits();
                let want = count_below_pair_from(&values, bits, 0, (0, 0));
                assert_eq!(count_below_pair(&values, bits), want, "{n}: {bound}");
            }
        }
    }

    #[test]
    fn draws_are_the_dare_stream_across_high_word_edges() {
        let key = rng::stream_key(1, "draws", 0);
        for first in [0u64, (1 << 32) - 5, 7 << 32] {
            let mut out = vec![0; 40];
            fill_draws(key, first, &mut out);
            for (j, &d) in out.iter().enumerate() {
                let i = first + j as u64;
                assert_eq!(d, Draws::at(key, i).bits(i), "{i}");
            }
        }
    }

    #[test]
    fn buckets_bound_the_mid_ranks() {
        let key = rng::stream_key(2, "sort", 0);
        let all: Vec<f32> = (0..5000u64)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => 0.25,
                _ => (rng::uniform(key, i) * 30.0 - 15.0).exp() as f32,
            })
            .collect();
        // Thresholds equal to the doubled rank, so that bounds read as ranks.
        let by_rank2: Vec<u32> = (0..2 * all.len() as u32).collect();
        for len in [5000, 4999, 70, 3, 2, 1] {
            let values = &all[all.len() - len..];
            let want = mid_ranks2(values);
            let mut magnitudes = vec![0.0; len];
            let range = row_magnitudes(values, &vec![0.0; len], &mut magnitudes);
            assert_eq!(magnitudes, values);
            let nonzero = values.iter().map(|v| v.to_bits()).filter(|&b| b != 0);
            let want_range = (
                nonzero.clone().min().unwrap_or(u32::MAX),
                nonzero.max().unwrap_or(0),
            );
            assert_eq!(range, want_range, "{len}");
            let mut ranks = RowRanks::default();
            ranks.index(values, range);
            let coarse = ranks.coarse_bounds(&by_rank2);
            for (j, &v) in values.iter().enumerate() {
                let (f, r) = (ranks.fine[j], want[j] as u32);
                let (least, greatest) = ranks.fine_bounds(f as usize, &by_rank2);
                assert!((least..=greatest).contains(&r), "{len}: {j} fine");
                let c = coarse_of(f, ranks.group_shift);
                let (least, greatest) = (coarse.least[c], coarse.greatest[c]);
                assert!((least..=greatest).contains(&r), "{len}: {j} coarse");
                // Counted among its bucket's members alone, and among those of more buckets.
                let mut needed = [0u32; COARSE];
                needed[f as usize / 32] |= 1 << (f % 32);
                let mut members = Vec::new();
                gather_members(values, &ranks.fine, &needed, &mut members);
                let rank2 = ranks.mid_rank2(f as usize, v.to_bits(), &needed, &members);
                assert_eq!(rank2, want[j], "{len}: {j}");
                let needed = needed.map(|w| 0xaaaa_aaaa | w);
                gather_members(values, &ranks.fine, &needed, &mut members);
                let rank2 = ranks.mid_rank2(f as usize, v.to_bits(), &needed, &members);
                assert_eq!(rank2, want[j], "{len}: {j}");
            }
        }
    }

    #[test]
    fn mask_equals_the_mid_rank_formula() {
        let key = rng::stream_key(4, "mask", 1);
        // Crowds of equal magnitudes (unchanged weights, one-ulp steps) leave many ranks to
        // count; spread magnitudes, a few.
        let magnitude = |crowded: bool, i: u64| match i % 7 {
            0 | 1 if crowded => 0.0,
            2 | 3 if crowded => 1.0 / 4096.0,
            4 if crowded => 1.0 / 4096.0 + (i % 3) as f32 / 65536.0,
            _ => (rng::uniform(key, i) * 12.0 - 9.0).exp() as f32,
        };
        let runs = [
            (true, 600, 0.4, 0.2),
            (true, 1, 0.5, 0.1),
            (true, 3000, 0.3, 0.0),
            (false, 600, 0.4, 0.2),
            (false, 100, 0.5, 0.3),
            (true, 1500, 0.5, 0.45),
        ];
        for (crowded, row_len, density, epsilon) in runs {
            let x: Vec<f32> = (0..6000).map(|i| magnitude(crowded, i)).collect();
            let (bits, l1) = mask_of(&x, row_len, density, epsilon, key).finish();
            let kept_sum: f64 = (0..x.len())
                .filter(|&i| bits[i / 64] >> (i % 64) & 1 == 1)
                .map(|i| x[i] as f64)
                .sum();
            let full_sum: f64 = x.iter().map(|&v| v as f64).sum();
            assert!(
                (l1[0] - full_sum).abs() <= 1e-5 * full_sum,
                "{l1:?} vs {full_sum}"
            );
            assert!(
                (l1[1] - kept_sum).abs() <= 1e-5 * kept_sum,
                "{l1:?} vs {kept_sum}"
            );
            let top2 = (2 * (row_len - 1)).max(1) as f64;
            for (r, row) in x.chunks(row_len).enumerate() {
                for (j, rank2) in mid_ranks2(row).into_iter().enumerate() {
                    let rank_norm = if row_len > 1 {
                        rank2 as f64 / top2
                    } else {
                        0.5
                    };
                    let p = density - epsilon + rank_norm * 2.0 * epsilon;
                    let i = r * row_len + j;
                    let want = Draws::at(key, i as u64).bits(i as u64) < keep_threshold(p);
                    assert_eq!(bits[i / 64] >> (i % 64) & 1 == 1, want, "{row_len}: {i}");
                }
            }
        }
    }
}
