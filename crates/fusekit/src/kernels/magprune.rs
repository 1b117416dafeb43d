//! DELLA's MagPrune mask (Deep et al., arXiv:2406.11617): within each row, rank the task-vector
//! magnitudes (1 = smallest), normalise the ranks to [0, 1] and keep each element with
//! probability `density − ε + 2ε·rank_norm`, so larger magnitudes survive more often.
//!
//! Built in one streamed pass: rows are reassembled from blocks, ranked by (magnitude, index) —
//! equal magnitudes rank by index, where torch's unstable argsort ranks them arbitrarily — and
//! the draws come from the counter-based stream of the model, so the mask is a pure function of
//! (seed, tensor, model). A row of one element keeps with probability `density` (mergekit
//! divides by zero there). The mask is one bit per element.
//!
//! No row is sorted. An element is kept when its draw is below the keep probability of its rank,
//! and that probability rises with rank. A histogram of the row's magnitudes bounds each
//! element's rank to its bucket's span, and so its keep probability to the span's least and
//! greatest: a draw below the least keeps, one not below the greatest drops, which decides all
//! but a few elements. Most draws need no bucket at all: those below density − ε keep and those
//! from density + ε on drop at any rank; only the 2ε between look their bucket up. The judging
//! compares the draws' top 32 bits, and only the undecided elements draw in full and get their
//! exact rank: by counting over the row when they are few, else by grouping the row by bucket
//! and sorting the buckets they fall in. Same mask as ranking by a full sort; della 9.2 s → 4.2 s
//! on the 1.2 B bench, where the sort had been half the time.

use super::rows::RowBuffer;
use crate::rng;
use multiversion::multiversion;

#[derive(Debug)]
pub struct MagPrune {
    rows: RowBuffer,
    /// Keep probability by rank, `density − ε + 2ε·rank/(m − 1)`: the same for every row.
    keep_by_rank: Vec<f64>,
    /// The same as bounds on a draw's top 32 bits (`Draw32`).
    draw32_by_rank: Vec<Draw32>,
    key: u64,
    bits: Vec<u64>,
    /// Per-row scratch: the draws' top 32 bits, the rank index, each bucket's draw bounds at its
    /// least and greatest rank, the row's mask words, its undecided positions and the packed
    /// draws of the judging.
    draws: Vec<u32>,
    ranks: RowRanks,
    least: Box<[u32; MAX_BUCKETS]>,
    greatest: Box<[u32; MAX_BUCKETS]>,
    kept: Vec<u64>,
    undecided: Vec<u32>,
    packed: Packed,
    /// ‖δ‖₁ and ‖mask ⊙ δ‖₁ over the rows done, for the rescale, so that it needs no pass of
    /// its own.
    l1: [f64; 2],
    /// The row's |δ|.
    magnitudes: Vec<f32>,
}

/// What the top 32 bits `d` of a draw's 53 (`rng::uniform_bits`) say about keeping it: it is
/// kept for sure when `d < sure`, and can be kept only when `d <= maybe`.
#[derive(Debug, Clone, Copy)]
struct Draw32 {
    sure: u32,
    maybe: u32,
}

impl Draw32 {
    /// For keep probability `p` in [0, 1): a draw u = D / 2⁵³ keeps when D < T = ⌈p·2⁵³⌉, and
    /// D lies in [d·2²¹, (d + 1)·2²¹).
    fn new(p: f64) -> Draw32 {
        let below = (p.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64;
        Draw32 {
            sure: (below >> 21).min(u32::MAX as u64) as u32,
            maybe: below
                .div_ceil(1 << 21)
                .saturating_sub(1)
                .min(u32::MAX as u64) as u32,
        }
    }
}

/// Up to this many undecided elements a row ranks each by counting over the row (a vectorised
/// pass); past it, grouping the row's keys by bucket once costs less. (Measured on task vectors
/// of bf16 weights: 16 and 64 were slower.)
const SCAN_LIMIT: usize = 32;

/// Buckets per row: a quarter of the row length's power of two, within 64..=MAX_BUCKETS. (Task
/// vectors of bf16 weights hold a few hundred distinct magnitudes per row of thousands; finer
/// buckets cost more to bound than they save in undecided elements, and 1/8 or 1/16 were slower.)
const MAX_BUCKETS: usize = 4096;

impl MagPrune {
    pub fn new(numel: usize, row_len: usize, density: f64, epsilon: f64, key: u64) -> MagPrune {
        let (low, span) = (density - epsilon, 2.0 * epsilon);
        let top = (row_len.max(1) - 1) as f64;
        let keep_by_rank = (0..row_len.max(1))
            .map(|rank| {
                let rank_norm = if top > 0.0 { rank as f64 / top } else { 0.5 };
                low + rank_norm * span
            })
            .collect::<Vec<f64>>();
        MagPrune {
            rows: RowBuffer::new(row_len, 2),
            draw32_by_rank: keep_by_rank.iter().map(|&p| Draw32::new(p)).collect(),
            keep_by_rank,
            key,
            bits: vec![0; numel.div_ceil(64)],
            draws: Vec::new(),
            ranks: RowRanks::default(),
            least: Box::new([0; MAX_BUCKETS]),
            greatest: Box::new([0; MAX_BUCKETS]),
            kept: Vec::new(),
            undecided: Vec::new(),
            packed: Packed::default(),
            l1: [0.0; 2],
            magnitudes: Vec::new(),
        }
    }

    /// The next block of the model and the base, in index order.
    pub fn observe(&mut self, x: &[f32], base: &[f32]) {
        let Self {
            rows,
            keep_by_rank,
            draw32_by_rank,
            key,
            bits,
            draws,
            ranks,
            least,
            greatest,
            kept,
            undecided,
            packed,
            l1,
            magnitudes,
        } = self;
        let ranked = keep_by_rank[keep_by_rank.len() - 1] > keep_by_rank[0];
        rows.push(&[x, base], |row, inputs| {
            magnitudes.resize(inputs[0].len(), 0.0);
            let range = row_magnitudes(inputs[0], inputs[1], magnitudes);
            let values = &magnitudes[..];
            let first = row * values.len();
            draws.resize(values.len(), 0);
            uniform_draws(*key, first as u64, draws);
            let band = Draw32 {
                sure: draw32_by_rank[0].sure,
                maybe: draw32_by_rank[draw32_by_rank.len() - 1].maybe,
            };
            let buckets = ranked.then(|| {
                ranks.index(values, range);
                ranks.keep_bounds(draw32_by_rank, &mut least[..], &mut greatest[..]);
                BucketBounds {
                    of: ranks.buckets(),
                    least,
                    greatest,
                }
            });
            judge(draws, band, buckets.as_ref(), kept, undecided, packed);
            let grouped = ranked && undecided.len() > SCAN_LIMIT;
            if grouped {
                ranks.group(values);
            }
            for &j in undecided.iter() {
                let j = j as usize;
                let rank = if !ranked {
                    0
                } else if grouped {
                    ranks.rank(j, values[j])
                } else {
                    rank_by_count(values, j)
                };
                let draw = rng::uniform(*key, (first + j) as u64);
                kept[j / 64] |= ((draw < keep_by_rank[rank]) as u64) << (j % 64);
            }
            let [full, masked] = l1_norms(values, kept);
            l1[0] += full;
            l1[1] += masked;
            or_at(bits, first, kept);
        });
    }

    /// The mask, one bit per element (bit i % 64 of word i / 64), and the task vector's L1
    /// norm before and after it.
    pub fn finish(self) -> (Vec<u64>, [f64; 2]) {
        (self.bits, self.l1)
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

/// The top 32 bits of `rng::uniform_bits(key, first + j)` for every j, in a loop the 64-bit
/// multiplies vectorise.
#[multiversion(targets("x86_64+avx512f+avx512dq+avx512vl", "x86_64+avx2+fma"))]
fn uniform_draws(key: u64, first: u64, draws: &mut [u32]) {
    for (j, d) in draws.iter_mut().enumerate() {
        *d = (rng::uniform_bits(key, first + j as u64) >> 21) as u32;
    }
}

/// Each element's bucket, and per bucket the sure bound at its least rank and the maybe bound
/// at its greatest (`RowRanks::keep_bounds`).
struct BucketBounds<'a> {
    of: &'a [u32],
    least: &'a [u32; MAX_BUCKETS],
    greatest: &'a [u32; MAX_BUCKETS],
}

/// Judges each element by its draw's top 32 bits (`Draw32`): into `kept`, the mask words of the
/// elements kept for sure, and into `undecided`, the positions whose full draw must decide.
/// `band` holds for every rank: a draw below its sure bound keeps, one above its maybe bound
/// drops, whatever the rank (most draws: keep probabilities span 2ε). Only the draws between
/// look up their bucket's bounds, or are undecided when the row has no buckets (every rank
/// keeps alike).
fn judge(
    draws: &[u32],
    band: Draw32,
    buckets: Option<&BucketBounds>,
    kept: &mut Vec<u64>,
    undecided: &mut Vec<u32>,
    packed: &mut Packed,
) {
    kept.clear();
    kept.resize(draws.len().div_ceil(64), 0);
    undecided.clear();
    let mut from = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("bmi2")
        && std::is_x86_feature_detected!("popcnt")
    {
        // SAFETY: the CPU has the features enabled (checked above); `judge_avx512` checks its
        // lengths.
        from = unsafe { judge_avx512(draws, band, buckets, kept, undecided, packed) };
    }
    judge_portable(draws, band, buckets, from, kept, undecided);
}

/// `judge` element by element, from element `from` (a multiple of 64).
fn judge_portable(
    draws: &[u32],
    band: Draw32,
    buckets: Option<&BucketBounds>,
    from: usize,
    kept: &mut [u64],
    undecided: &mut Vec<u32>,
) {
    for (j, &draw) in draws.iter().enumerate().skip(from) {
        let (keep, open) = if draw < band.sure {
            (true, false)
        } else if draw > band.maybe {
            (false, false)
        } else if let Some(buckets) = buckets {
            let b = buckets.of[j] as usize & (MAX_BUCKETS - 1);
            let keep = draw < buckets.least[b];
            (keep, !keep && draw <= buckets.greatest[b])
        } else {
            (false, true)
        };
        kept[j / 64] |= (keep as u64) << (j % 64);
        if open {
            undecided.push(j as u32);
        }
    }
}

/// Scratch of `judge_avx512`: the draws inside the band, packed, with their buckets; per word
/// of the row, which elements they are; and their verdicts, one bit each in packed order.
#[derive(Debug, Default)]
struct Packed {
    bucket: Vec<u32>,
    draw: Vec<u32>,
    band: Vec<u64>,
    keep: Vec<u64>,
    open: Vec<u64>,
}

/// `judge` 64 elements at a time, in three steps: sixteen draws per vector against the band,
/// packing the draws inside it (about 2ε of them) with their buckets; those looked up in the
/// bucket tables sixteen per gather; their verdict bits put back in place (`pdep`). Gathers
/// cost the same with lanes masked off, so packing is what spares them. Returns where it
/// stopped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,bmi2,popcnt")]
unsafe fn judge_avx512(
    draws: &[u32],
    band: Draw32,
    buckets: Option<&BucketBounds>,
    kept: &mut [u64],
    undecided: &mut Vec<u32>,
    packed: &mut Packed,
) -> usize {
    use std::arch::x86_64::*;
    let whole = draws.len() / 64;
    assert!(kept.len() >= whole && buckets.is_none_or(|b| b.of.len() >= draws.len()));
    let sure = _mm512_set1_epi32(band.sure as i32);
    let maybe = _mm512_set1_epi32(band.maybe as i32);
    packed.band.clear();
    packed.band.resize(whole, 0);
    if buckets.is_some() {
        packed.bucket.resize(whole * 64 + 16, 0);
        packed.draw.resize(whole * 64 + 16, 0);
    }
    let mut n = 0;
    for (w, (word, band_word)) in kept.iter_mut().zip(&mut packed.band).enumerate() {
        for g in 0..4 {
            let at = w * 64 + g * 16;
            // SAFETY: at + 16 ≤ whole · 64 ≤ draws.len() (and ≤ the buckets' length); the
            // packed stores write 16 lanes at n ≤ at, within whole · 64 + 16.
            let d = unsafe { _mm512_loadu_si512(draws.as_ptr().add(at).cast()) };
            let below = _mm512_cmplt_epu32_mask(d, sure);
            let inside = _mm512_cmple_epu32_mask(d, maybe) & !below;
            *word |= (below as u64) << (16 * g);
            *band_word |= (inside as u64) << (16 * g);
            if let Some(buckets) = buckets {
                unsafe {
                    let b = _mm512_loadu_si512(buckets.of.as_ptr().add(at).cast());
                    let (to_bucket, to_draw) =
                        (packed.bucket.as_mut_ptr(), packed.draw.as_mut_ptr());
                    _mm512_storeu_si512(
                        to_bucket.add(n).cast(),
                        _mm512_maskz_compress_epi32(inside, b),
                    );
                    _mm512_storeu_si512(
                        to_draw.add(n).cast(),
                        _mm512_maskz_compress_epi32(inside, d),
                    );
                }
                n += inside.count_ones() as usize;
            }
        }
    }
    let Some(buckets) = buckets else {
        // Every rank keeps alike: the band is what is undecided.
        for (w, &band_word) in packed.band.iter().enumerate() {
            push_positions(w, band_word, undecided);
        }
        return whole * 64;
    };
    let verdict_words = n.div_ceil(64) + 1;
    for bits in [&mut packed.keep, &mut packed.open] {
        bits.clear();
        bits.resize(verdict_words, 0);
    }
    let mask = _mm512_set1_epi32(MAX_BUCKETS as i32 - 1);
    for i in (0..n).step_by(16) {
        let valid = if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        };
        // SAFETY: i + 16 ≤ n + 15 < the packed arrays' length; the gather indices are masked
        // below MAX_BUCKETS, the tables' length.
        let (least, greatest, d) = unsafe {
            let b = _mm512_and_si512(
                _mm512_loadu_si512(packed.bucket.as_ptr().add(i).cast()),
                mask,
            );
            let zero = _mm512_setzero_si512();
            (
                _mm512_mask_i32gather_epi32::<4>(zero, valid, b, buckets.least.as_ptr().cast()),
                _mm512_mask_i32gather_epi32::<4>(zero, valid, b, buckets.greatest.as_ptr().cast()),
                _mm512_loadu_si512(packed.draw.as_ptr().add(i).cast()),
            )
        };
        let keep = _mm512_mask_cmplt_epu32_mask(valid, d, least);
        let open = _mm512_mask_cmple_epu32_mask(valid, d, greatest) & !keep;
        packed.keep[i / 64] |= (keep as u64) << (i % 64);
        packed.open[i / 64] |= (open as u64) << (i % 64);
    }
    let mut at = 0;
    for (w, (word, &band_word)) in kept.iter_mut().zip(&packed.band).enumerate() {
        *word |= _pdep_u64(bits_at(&packed.keep, at), band_word);
        push_positions(
            w,
            _pdep_u64(bits_at(&packed.open, at), band_word),
            undecided,
        );
        at += band_word.count_ones() as usize;
    }
    whole * 64
}

/// The 64 bits of `words` from bit `at` on (the word after the last must exist).
fn bits_at(words: &[u64], at: usize) -> u64 {
    let (i, shift) = (at / 64, at % 64);
    let low = words[i] >> shift;
    if shift == 0 {
        low
    } else {
        low | words[i + 1] << (64 - shift)
    }
}

/// Appends the positions of the set bits of word `w` of a row.
fn push_positions(w: usize, mut word: u64, positions: &mut Vec<u32>) {
    while word != 0 {
        positions.push((w * 64) as u32 + word.trailing_zeros());
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

/// The rank of `values[j]` by (value, position), counted: the values before it not above it
/// and those from it on below it.
fn rank_by_count(values: &[f32], j: usize) -> usize {
    let bits = values[j].to_bits();
    count_below(&values[..j], bits + 1) + count_below(&values[j..], bits)
}

/// How many of `values` (non-negative) have a bit pattern below `bound`. (Counted in u32, a row
/// being shorter than 2³², so that sixteen lanes count at once where a usize count took eight.)
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn count_below(values: &[f32], bound: u32) -> usize {
    values
        .iter()
        .map(|v| (v.to_bits() < bound) as u32)
        .sum::<u32>() as usize
}

/// Ranks within one row of non-negative values, by (value, position). A histogram over buckets
/// of equal width on the row's range of bit patterns (an f32 bit pattern orders like a
/// non-negative float) bounds every rank to its bucket's span. For exact ranks the row's keys,
/// the bit pattern over the position, are grouped by bucket in one scatter, in position order
/// within each bucket; a bucket is sorted only when a rank inside it is asked for (equal values,
/// the common crowd of a bucket, are already in order).
#[derive(Debug, Default)]
struct RowRanks {
    min: u32,
    shift: u32,
    /// Bucket b holds keys[start[b]..start[b + 1]].
    start: Vec<u32>,
    next: Vec<u32>,
    keys: Vec<u64>,
    sorted: Vec<bool>,
    counts: Vec<u32>,
    bucket_of: Vec<u32>,
}

impl RowRanks {
    /// Indexes `values`, whose least nonzero and greatest bit patterns are `(min, max)`.
    fn index(&mut self, values: &[f32], (min, max): (u32, u32)) {
        // Zeros, often a crowd (unchanged weights), get a bucket of their own, so that the
        // buckets spread over the range of the nonzero magnitudes only.
        let buckets = (values.len() / 4)
            .next_power_of_two()
            .clamp(64, MAX_BUCKETS);
        let width = max.saturating_sub(min);
        self.min = min.min(max);
        self.shift = 0;
        while width >> self.shift > buckets as u32 - 2 {
            self.shift += 1;
        }
        self.bucket_of.resize(values.len(), 0);
        bucket_all(values, self.min, self.shift, &mut self.bucket_of);
        // Two interleaved histograms, so that neighbours in one bucket do not wait on each
        // other's increment.
        self.counts.clear();
        self.counts.resize(2 * buckets, 0);
        let (even, odd) = self.counts.split_at_mut(buckets);
        // Buckets are below the power of two `buckets`: the masks only spare bounds checks.
        let last = buckets - 1;
        let mut pairs = self.bucket_of.chunks_exact(2);
        for pair in &mut pairs {
            even[pair[0] as usize & last] += 1;
            odd[pair[1] as usize & last] += 1;
        }
        if let [b] = pairs.remainder() {
            even[*b as usize & last] += 1;
        }
        self.start.clear();
        self.start.resize(buckets + 1, 0);
        let mut total = 0;
        for ((start, e), o) in self.start[1..].iter_mut().zip(even.iter()).zip(odd.iter()) {
            total += e + o;
            *start = total;
        }
    }

    /// Groups the row's keys by bucket, in position order within each (one scatter).
    fn group(&mut self, values: &[f32]) {
        let buckets = self.start.len() - 1;
        self.next.clear();
        self.next.extend_from_slice(&self.start[..buckets]);
        self.keys.resize(values.len(), 0);
        for (j, &v) in values.iter().enumerate() {
            let b = self.bucket(v);
            self.keys[self.next[b] as usize] = sort_key(j, v);
            self.next[b] += 1;
        }
        self.sorted.clear();
        self.sorted.resize(buckets, false);
    }

    fn bucket(&self, v: f32) -> usize {
        bucket(v, self.min, self.shift) as usize
    }

    /// The bucket of every value of the row indexed last.
    fn buckets(&self) -> &[u32] {
        &self.bucket_of
    }

    /// Per bucket, the sure bound at its least rank and the maybe bound at its greatest (an
    /// empty bucket's are unused).
    fn keep_bounds(&self, by_rank: &[Draw32], least: &mut [u32], greatest: &mut [u32]) {
        let top = by_rank.len() - 1;
        let bounds = least.iter_mut().zip(greatest.iter_mut());
        for ((least, greatest), span) in bounds.zip(self.start.windows(2)) {
            let (start, end) = (span[0] as usize, span[1] as usize);
            *least = by_rank[start.min(top)].sure;
            *greatest = by_rank[end.saturating_sub(1).min(top)].maybe;
        }
    }

    /// The exact rank of the value at `position` (`value`), once the row is grouped.
    fn rank(&mut self, position: usize, value: f32) -> usize {
        let b = self.bucket(value);
        let (start, end) = (self.start[b] as usize, self.start[b + 1] as usize);
        let bucket = &mut self.keys[start..end];
        if !self.sorted[b] {
            bucket.sort_unstable();
            self.sorted[b] = true;
        }
        let key = sort_key(position, value);
        start + bucket.partition_point(|&k| k < key)
    }
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

/// (value, position) as one integer that orders like the pair.
fn sort_key(position: usize, value: f32) -> u64 {
    (value.to_bits() as u64) << 32 | position as u64
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
        let (bits, _) = mask.finish();
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
    fn draw_bounds_never_contradict_the_full_draw() {
        let unit = 1.0 / (1u64 << 53) as f64;
        let edges = [
            0.0,
            unit,
            0.05,
            0.5,
            1.0 - unit,
            (1u64 << 21) as f64 * unit * 7.0,
        ];
        let key = rng::stream_key(3, "bounds", 0);
        let random = (0..200).map(|i| rng::uniform(key, i));
        for p in edges.into_iter().chain(random) {
            let Draw32 { sure, maybe } = Draw32::new(p);
            let threshold = (p * (1u64 << 53) as f64).ceil() as u64;
            let near = [0, 1, threshold.saturating_sub(1), threshold, threshold + 1];
            let spread = (0..64).map(|i| rng::uniform_bits(key, 1000 + i));
            for d in near.into_iter().chain(spread).filter(|&d| d < 1 << 53) {
                let kept = (d as f64) * unit < p;
                let top = (d >> 21) as u32;
                if top < sure {
                    assert!(kept, "{p}: {d} judged kept");
                }
                if top > maybe {
                    assert!(!kept, "{p}: {d} judged dropped");
                }
            }
        }
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
        let band = Draw32 {
            sure: 1 << 30,
            maybe: 3 << 30,
        };
        let mut least = Box::new([0u32; MAX_BUCKETS]);
        let mut greatest = Box::new([0u32; MAX_BUCKETS]);
        for b in 0..MAX_BUCKETS {
            let (x, y) = (word(b as u64), word((b + MAX_BUCKETS) as u64));
            (least[b], greatest[b]) = (x.min(y), x.max(y));
        }
        for len in [1000, 640, 63, 1] {
            let draws: Vec<u32> = (0..len).map(|i| word(10_000 + i)).collect();
            let of: Vec<u32> = (0..len).map(|i| word(20_000 + i) % 600).collect();
            let buckets = BucketBounds {
                of: &of,
                least: &least,
                greatest: &greatest,
            };
            for ranked in [Some(&buckets), None] {
                let (mut kept, mut undecided) = (Vec::new(), Vec::new());
                judge(
                    &draws,
                    band,
                    ranked,
                    &mut kept,
                    &mut undecided,
                    &mut Packed::default(),
                );
                let mut want_kept = vec![0; kept.len()];
                let mut want_undecided = Vec::new();
                judge_portable(&draws, band, ranked, 0, &mut want_kept, &mut want_undecided);
                assert_eq!(kept, want_kept, "{len}");
                assert_eq!(undecided, want_undecided, "{len}");
                assert!(!undecided.is_empty() || len < 100, "{len}");
            }
        }
    }

    /// Ranks by a stable sort of (value, position), the definition.
    fn sorted_ranks(values: &[f32]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
        let mut rank = vec![0; values.len()];
        for (r, &j) in order.iter().enumerate() {
            rank[j] = r;
        }
        rank
    }

    #[test]
    fn ranks_equal_a_stable_sort() {
        let key = rng::stream_key(2, "sort", 0);
        let all: Vec<f32> = (0..5000u64)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => 0.25,
                _ => (rng::uniform(key, i) * 30.0 - 15.0).exp() as f32,
            })
            .collect();
        for len in [5000, 4999, 70, 3, 2, 1] {
            let values = &all[all.len() - len..];
            let want = sorted_ranks(values);
            let mut ranks = RowRanks::default();
            let mut magnitudes = vec![0.0; len];
            let range = row_magnitudes(values, &vec![0.0; len], &mut magnitudes);
            assert_eq!(magnitudes, values);
            let nonzero = values.iter().map(|v| v.to_bits()).filter(|&b| b != 0);
            let want_range = (
                nonzero.clone().min().unwrap_or(u32::MAX),
                nonzero.max().unwrap_or(0),
            );
            assert_eq!(range, want_range, "{len}");
            ranks.index(values, range);
            for (j, &v) in values.iter().enumerate() {
                let (b, r) = (ranks.bucket(v), want[j]);
                let span = ranks.start[b] as usize..ranks.start[b + 1] as usize;
                assert!(
                    span.contains(&r),
                    "{len}: {j} has rank {r}, not in {span:?}"
                );
                assert_eq!(rank_by_count(values, j), r, "{len}: {j}");
                ranks.group(values);
                assert_eq!(ranks.rank(j, v), r, "{len}: {j}");
            }
        }
    }

    #[test]
    fn mask_equals_ranking_by_a_full_sort() {
        let key = rng::stream_key(4, "mask", 1);
        // Crowds of equal magnitudes (unchanged weights, one-ulp steps) leave many ranks to
        // look up in grouped buckets; spread magnitudes, a few to count.
        let magnitude = |crowded: bool, i: u64| match i % 7 {
            0 | 1 if crowded => 0.0,
            2 | 3 if crowded => 1.0 / 4096.0,
            _ => (rng::uniform(key, i) * 12.0 - 9.0).exp() as f32,
        };
        let runs = [
            (true, 600, 0.4, 0.2),
            (true, 1, 0.5, 0.1),
            (true, 6000, 0.3, 0.0),
            (false, 600, 0.4, 0.2),
            (false, 100, 0.5, 0.3),
        ];
        for (crowded, row_len, density, epsilon) in runs {
            let x: Vec<f32> = (0..6000).map(|i| magnitude(crowded, i)).collect();
            let base = vec![0f32; x.len()];
            let mut mask = MagPrune::new(x.len(), row_len, density, epsilon, key);
            for start in (0..x.len()).step_by(777) {
                let end = (start + 777).min(x.len());
                mask.observe(&x[start..end], &base[start..end]);
            }
            let (bits, l1) = mask.finish();
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
            let top = (row_len - 1).max(1) as f64;
            for (r, row) in x.chunks(row_len).enumerate() {
                for (j, rank) in sorted_ranks(row).into_iter().enumerate() {
                    let rank_norm = if row_len > 1 { rank as f64 / top } else { 0.5 };
                    let p = density - epsilon + rank_norm * 2.0 * epsilon;
                    let i = r * row_len + j;
                    let want = rng::uniform(key, i as u64) < p;
                    assert_eq!(bits[i / 64] >> (i % 64) & 1 == 1, want, "{row_len}: {i}");
                }
            }
        }
    }
}
