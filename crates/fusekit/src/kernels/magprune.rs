//! DELLA's MagPrune mask (Deep et al., arXiv:2406.11617): within each row, rank the task-vector
//! magnitudes, normalise the ranks to [0, 1] and keep each element independently with
//! probability `density − ε + 2ε·rank_norm`, so larger magnitudes survive more often.
//!
//! Equal magnitudes share their mean rank (the "mid-rank" `less + (equal − 1)/2`), so each is kept
//! with the mean of the probabilities of the ranks they span: exactly its chance under torch's
//! arbitrary tie order in mergekit, and the same for every copy of a value. A row of one element
//! keeps with probability `density` (mergekit divides by zero there).
//!
//! No rank is computed. The normalised mid-rank of element i in a row of m is the chance that a
//! partner j drawn uniformly from the other m − 1 elements has a smaller magnitude, counting an
//! equal one as half:
//!
//! ```text
//! rank_norm(i) = (less + (equal − 1)/2) / (m − 1) = P_j(|δⱼ| < |δᵢ|) + ½·P_j(|δⱼ| = |δᵢ|)
//! ```
//!
//! So with a uniform draw u and an independent partner j, the rule
//!
//! ```text
//! keep ⇔ u < density − ε                                  (at any rank)
//!      ∨ u < density + ε ∧ (|δⱼ| < |δᵢ| ∨ |δⱼ| = |δᵢ| ∧ u < density)
//! ```
//!
//! keeps element i with probability `density − ε + 2ε·rank_norm(i)`, exactly; each element's
//! verdict depends on its own draws alone, so the verdicts are independent, as mergekit's
//! Bernoulli draws are. One comparison with one gathered magnitude replaces ranking the row.
//! The draws are 32-bit counter-based streams (`rng::Draws`: u as in DARE, the partner from a
//! second stream by Lemire's unbiased multiply-and-reject), so the mask, one bit per element, is
//! a pure function of (seed, tensor, model).

use super::rows::RowBuffer;
use crate::rng::{keep_threshold, mix, Draws};
use multiversion::multiversion;

#[derive(Debug)]
pub struct MagPrune {
    rows: RowBuffer,
    rule: Rule,
    bits: Vec<u64>,
    /// ‖δ‖₁ and ‖mask ⊙ δ‖₁ over the rows done, for the rescale, so that it needs no pass of
    /// its own.
    l1: [f64; 2],
    scratch: RowScratch,
}

/// The keep rule of the module docs, its probabilities as 32-bit draw thresholds.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// A draw below `low` (density − ε) keeps at any rank, one from `high` (density + ε) on
    /// drops at any rank; between, the partner decides, and at equal magnitudes `tie` (density).
    low: u32,
    tie: u32,
    high: u32,
    key: u64,
    partner_key: u64,
}

/// Per-row scratch, kept between rows.
#[derive(Debug, Default)]
struct RowScratch {
    /// |δ| of the row.
    magnitudes: Vec<f32>,
    kept: Vec<u64>,
    /// Positions whose partner draw Lemire's method rejects (about one in 2³²/m), and the tail
    /// after the last whole sixteen: judged by the scalar rule.
    redo: Vec<u32>,
    queue: Queue,
}

impl MagPrune {
    /// A mask over `numel` elements in rows of `row_len` (at most 2³² of them).
    pub fn new(numel: usize, row_len: usize, density: f64, epsilon: f64, key: u64) -> MagPrune {
        assert!(
            row_len as u64 <= 1 << 32,
            "MagPrune rows hold at most 2³² elements"
        );
        MagPrune {
            rows: RowBuffer::new(row_len, 2),
            rule: Rule {
                low: keep_threshold(density - epsilon),
                tie: keep_threshold(density),
                high: keep_threshold(density + epsilon),
                key,
                partner_key: mix(key ^ PARTNER_STREAM),
            },
            bits: vec![0; numel.div_ceil(64)],
            l1: [0.0; 2],
            scratch: RowScratch::default(),
        }
    }

    /// The next block of the model and the base, in index order.
    pub fn observe(&mut self, x: &[f32], base: &[f32]) {
        let Self {
            rows,
            rule,
            bits,
            l1,
            scratch,
        } = self;
        rows.push(&[x, base], |row, inputs| {
            let first = row * inputs[0].len();
            let [full, masked] = scratch.judge_row(inputs[0], inputs[1], first, rule);
            l1[0] += full;
            l1[1] += masked;
            or_at(bits, first, &scratch.kept);
        });
    }

    /// The length of the rows it ranks within.
    pub fn row_len(&self) -> usize {
        self.rows.row_len()
    }

    /// The mask, one bit per element (bit i % 64 of word i / 64), and the task vector's L1
    /// norm before and after it.
    pub fn finish(self) -> (Vec<u64>, [f64; 2]) {
        (self.bits, self.l1)
    }
}

/// Salts the mask's key into the key of its partner stream.
const PARTNER_STREAM: u64 = 0x5041_5254_4e45_5253;

impl Rule {
    /// The verdict on element `j` of a row of `magnitudes`, element `index` of the tensor, given
    /// its draws.
    fn keeps(
        &self,
        magnitudes: &[f32],
        j: usize,
        draw: u32,
        partner_draw: u32,
        index: u64,
    ) -> bool {
        if draw < self.low || draw >= self.high {
            return draw < self.low;
        }
        let redraw = |attempt: u64| Draws::at(mix(self.partner_key ^ attempt), index).bits(index);
        let partner = partner(partner_draw, magnitudes.len(), j, redraw);
        let (mine, theirs) = (magnitudes[j].to_bits(), magnitudes[partner].to_bits());
        mine > theirs || (mine == theirs && draw < self.tie)
    }

    /// `keeps` with element `index`'s own draws from both streams.
    fn keeps_at(&self, magnitudes: &[f32], j: usize, index: u64) -> bool {
        let draw = Draws::at(self.key, index).bits(index);
        let partner_draw = Draws::at(self.partner_key, index).bits(index);
        self.keeps(magnitudes, j, draw, partner_draw, index)
    }
}

/// A partner for element `j` of a row of `len`, uniform over the other elements (`j` itself in a
/// row of one): Lemire's multiply-shift of a 32-bit draw, exact because it rejects the draws
/// that would favour some partners (`redraw(k)` gives the k-th fresh draw).
fn partner(draw: u32, len: usize, j: usize, redraw: impl Fn(u64) -> u32) -> usize {
    let others = len as u64 - 1;
    if others == 0 {
        return j;
    }
    let reject_below = (1u64 << 32) % others;
    let (mut draw, mut attempt) = (draw, 0);
    loop {
        let product = draw as u64 * others;
        if product & 0xffff_ffff >= reject_below {
            let p = (product >> 32) as usize;
            return p + (p >= j) as usize;
        }
        attempt += 1;
        draw = redraw(attempt);
    }
}

impl RowScratch {
    /// Decides the row starting at element `first` into `kept` and returns its L1 norms.
    fn judge_row(&mut self, x: &[f32], base: &[f32], first: usize, rule: &Rule) -> [f64; 2] {
        let m = x.len();
        self.magnitudes.resize(m, 0.0);
        self.kept.clear();
        self.kept.resize(m.div_ceil(64), 0);
        self.judge(rule, first as u64, x, base);
        l1_norms(&self.magnitudes, &self.kept)
    }

    /// Writes |x − base| into `magnitudes` and the verdicts into `kept` (cleared).
    fn judge(&mut self, rule: &Rule, first: u64, x: &[f32], base: &[f32]) {
        let Self {
            magnitudes,
            kept,
            redo,
            queue,
        } = self;
        let m = magnitudes.len();
        assert!(x.len() == m && base.len() == m);
        redo.clear();
        let mut from = 0;
        #[cfg(target_arch = "x86_64")]
        if m >= 2
            // The vector path hashes 32-bit indices: the row must lie within one 2³² stretch.
            && first >> 32 == (first + m as u64 - 1) >> 32
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("popcnt")
        {
            let views = (
                Draws::at(rule.key, first),
                Draws::at(rule.partner_key, first),
            );
            // Partners may lie in the tail that the vector loop leaves.
            let whole = m / 16 * 16;
            row_magnitudes(&x[whole..], &base[whole..], &mut magnitudes[whole..]);
            let row = Row {
                x,
                base,
                magnitudes,
            };
            // SAFETY: the CPU has AVX-512F, BMI2 and POPCNT (checked above); the row has two
            // elements or more and lies in one stretch of the draws.
            from = unsafe { judge_avx512(rule, views, first as u32, row, queue, kept, redo) };
        } else {
            row_magnitudes(x, base, magnitudes);
        }
        #[cfg(not(target_arch = "x86_64"))]
        row_magnitudes(x, base, magnitudes);
        redo.extend(from as u32..m as u32);
        for &j in redo.iter() {
            let j = j as usize;
            let keep = rule.keeps_at(magnitudes, j, first + j as u64);
            kept[j / 64] = kept[j / 64] & !(1 << (j % 64)) | (keep as u64) << (j % 64);
        }
    }
}

/// One row's model and base values, and where its magnitudes go.
struct Row<'a> {
    x: &'a [f32],
    base: &'a [f32],
    magnitudes: &'a mut [f32],
}

/// The elements whose draw falls between `low` and `high`, queued for their partners.
#[derive(Debug, Default)]
struct Queue {
    positions: Vec<u32>,
    /// Their magnitudes' bit patterns.
    magnitudes: Vec<u32>,
    /// Whether each would be kept at an equal partner (its draw below `tie`), in queue order.
    ties: Vec<u64>,
    /// Which elements are queued, a bit per element of the row.
    queued: Vec<u64>,
    /// The verdict on each queued element, in queue order.
    verdicts: Vec<u64>,
}

/// `Rule::keeps` for the row's elements up to the last whole sixteen, whose index it returns;
/// queued elements whose partner draw is rejected go to `redo`. Three steps, each vectorised:
/// draw the elements and settle those outside the band, queueing the rest; judge the queue
/// sixteen at a time, one gather of partners' magnitudes each; put the verdicts back in place.
/// Bits are gathered per 64 elements in registers and stored once. `views` are the draws and
/// partner draws of the row's stretch, `first` the low 32 bits of its first index. The
/// magnitudes are written as the draws are judged; those of the tail must be there already.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,bmi2,popcnt")]
unsafe fn judge_avx512(
    rule: &Rule,
    (draws, partners): (Draws, Draws),
    first: u32,
    row: Row,
    queue: &mut Queue,
    kept: &mut [u64],
    redo: &mut Vec<u32>,
) -> usize {
    use std::arch::x86_64::*;
    let Row {
        x,
        base,
        magnitudes,
    } = row;
    let m = magnitudes.len();
    assert!(m >= 2 && kept.len() * 64 >= m && first as u64 + m as u64 <= 1 << 32);
    assert!(x.len() == m && base.len() == m);
    let whole = m / 16 * 16;
    let splat = |v: u32| _mm512_set1_epi32(v as i32);
    let (low, tie, high) = (splat(rule.low), splat(rule.tie), splat(rule.high));
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    queue.positions.resize(whole + 16, 0);
    queue.magnitudes.resize(whole + 16, 0);
    queue.queued.clear();
    queue.queued.resize(m.div_ceil(64), 0);
    let positions = queue.positions.as_mut_ptr();
    let queued_magnitudes = queue.magnitudes.as_mut_ptr();
    let mut queued = 0;
    let mut ties = BitQueue::reusing(std::mem::take(&mut queue.ties));
    // Sixteen elements from `at`: their positions, (keep, band, tie) masks.
    let draw = |at: usize| {
        let position = _mm512_add_epi32(lanes, splat(at as u32));
        let u = draws.bits16(_mm512_add_epi32(position, splat(first)));
        let keep = _mm512_cmplt_epu32_mask(u, low);
        let band = _mm512_mask_cmplt_epu32_mask(!keep, u, high);
        (position, [keep, band, _mm512_cmplt_epu32_mask(u, tie)])
    };
    let words = kept.iter_mut().zip(queue.queued.iter_mut());
    for (w, (kept, queued_bits)) in words.enumerate().take(whole.div_ceil(64)) {
        // The word's 64 elements, or the sixteens left.
        let chunks = ((whole - 64 * w) / 16).min(4);
        let mut masks = [0u64; 3];
        let mut position = [_mm512_setzero_si512(); 4];
        for (c, position) in position.iter_mut().enumerate().take(chunks) {
            let (p, m) = draw(64 * w + 16 * c);
            *position = p;
            for (word, mask) in masks.iter_mut().zip(m) {
                *word |= (mask as u64) << (16 * c);
            }
        }
        let [keep, band, tie_keeps] = masks;
        *kept = keep;
        *queued_bits = band;
        ties.push(_pext_u64(tie_keeps, band), band.count_ones());
        for (c, &position) in position.iter().enumerate().take(chunks) {
            let (at, band) = (64 * w + 16 * c, (band >> (16 * c)) as u16);
            // SAFETY: at + 16 ≤ whole ≤ m for the load; the queues hold whole + 16 ≥
            // queued + 16 for the stores.
            unsafe {
                let delta = _mm512_sub_ps(
                    _mm512_loadu_ps(x.as_ptr().add(at)),
                    _mm512_loadu_ps(base.as_ptr().add(at)),
                );
                let mine = _mm512_andnot_si512(splat(1 << 31), _mm512_castps_si512(delta));
                _mm512_storeu_si512(magnitudes.as_mut_ptr().add(at).cast(), mine);
                let pack = |values: __m512i| _mm512_maskz_compress_epi32(band, values);
                _mm512_storeu_si512(positions.add(queued).cast(), pack(position));
                _mm512_storeu_si512(queued_magnitudes.add(queued).cast(), pack(mine));
            }
            queued += band.count_ones() as usize;
        }
    }
    queue.ties = ties.finish();

    queue.verdicts.clear();
    queue.verdicts.resize(queued.div_ceil(64) + 1, 0);
    let others = (m - 1) as u64;
    let reject_below = splat(((1u64 << 32) % others) as u32);
    let others = _mm512_set1_epi64(others as i64);
    let (zero, one) = (_mm512_setzero_si512(), splat(1));
    let mut verdicts = 0u64;
    for q in (0..queued).step_by(16) {
        let valid = if q + 16 <= queued {
            u16::MAX
        } else {
            (1u16 << (queued - q)) - 1
        };
        // SAFETY: the loads are masked to the queue's length; every gathered partner is below
        // m (Lemire's quotient of a draw times m − 1, plus one past the element itself).
        let (position, mine) = unsafe {
            let load =
                |list: &Vec<u32>| _mm512_maskz_loadu_epi32(valid, list.as_ptr().add(q).cast());
            (load(&queue.positions), load(&queue.magnitudes))
        };
        let tie_keeps = (queue.ties[q / 64] >> (q % 64)) as u16;
        let v = partners.bits16(_mm512_add_epi32(position, splat(first)));
        // Draw × (m − 1) in 64 bits, even and odd lanes apart: the high halves are the
        // partners, the low halves decide rejection.
        let even = _mm512_mul_epu32(v, others);
        let odd = _mm512_mul_epu32(_mm512_srli_epi64::<32>(v), others);
        let quotient = _mm512_mask_blend_epi32(0xaaaa, _mm512_srli_epi64::<32>(even), odd);
        let remainder = _mm512_mask_blend_epi32(0xaaaa, even, _mm512_slli_epi64::<32>(odd));
        let rejected = _mm512_mask_cmplt_epu32_mask(valid, remainder, reject_below);
        let past_self = _mm512_cmpge_epu32_mask(quotient, position);
        let partner = _mm512_mask_add_epi32(quotient, past_self, quotient, one);
        let theirs = unsafe {
            _mm512_mask_i32gather_epi32::<4>(zero, valid, partner, magnitudes.as_ptr().cast())
        };
        let outranks = _mm512_mask_cmpgt_epu32_mask(valid, mine, theirs);
        let equal = _mm512_mask_cmpeq_epi32_mask(valid, mine, theirs);
        verdicts |= ((outranks | (equal & tie_keeps)) as u64) << (q % 64);
        if q % 64 == 48 || q + 16 >= queued {
            queue.verdicts[q / 64] = verdicts;
            verdicts = 0;
        }
        let mut rejected = rejected;
        while rejected != 0 {
            redo.push(queue.positions[q + rejected.trailing_zeros() as usize]);
            rejected &= rejected - 1;
        }
    }

    let mut at = 0;
    for (word, &band) in kept.iter_mut().zip(&queue.queued) {
        if band != 0 {
            let (w, shift) = (at / 64, at % 64);
            let next = if shift > 0 {
                queue.verdicts[w + 1] << (64 - shift)
            } else {
                0
            };
            *word |= _pdep_u64(queue.verdicts[w] >> shift | next, band);
            at += band.count_ones() as usize;
        }
    }
    whole
}

/// Bits appended a run at a time, packed into words.
#[derive(Debug, Default)]
struct BitQueue {
    words: Vec<u64>,
    /// The word being filled, and how many of its bits are.
    last: u64,
    filled: u32,
}

impl BitQueue {
    /// An empty queue that fills `words` (cleared) again.
    fn reusing(mut words: Vec<u64>) -> BitQueue {
        words.clear();
        BitQueue {
            words,
            ..BitQueue::default()
        }
    }

    /// Appends the low `n` bits of `bits` (n ≤ 64; the bits above them clear).
    fn push(&mut self, bits: u64, n: u32) {
        if self.filled < 64 {
            self.last |= bits << self.filled;
        }
        let total = self.filled + n;
        if total >= 64 {
            self.words.push(self.last);
            self.last = if self.filled > 0 {
                bits >> (64 - self.filled)
            } else {
                0
            };
            self.filled = total - 64;
        } else {
            self.filled = total;
        }
    }

    /// The words, the last one padded with clear bits, and one clear word after them.
    fn finish(mut self) -> Vec<u64> {
        self.words.push(self.last);
        self.words.push(0);
        self.words
    }
}

/// Writes |x − base| into `magnitudes`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn row_magnitudes(x: &[f32], base: &[f32], magnitudes: &mut [f32]) {
    for ((m, &v), &b) in magnitudes.iter_mut().zip(x).zip(base) {
        *m = (v - b).abs();
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

/// The mask of `delta` by `Rule::keeps`, element by element: the reference the vector path and
/// the methods' tests compare with.
#[cfg(test)]
pub(crate) fn scalar_mask(
    delta: &[f32],
    row_len: usize,
    density: f64,
    epsilon: f64,
    key: u64,
) -> Vec<bool> {
    let rule = MagPrune::new(0, row_len, density, epsilon, key).rule;
    let mut mask = Vec::with_capacity(delta.len());
    for (r, row) in delta.chunks(row_len).enumerate() {
        let magnitudes: Vec<f32> = row.iter().map(|d| d.abs()).collect();
        for j in 0..row.len() {
            mask.push(rule.keeps_at(&magnitudes, j, (r * row_len + j) as u64));
        }
    }
    mask
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

    /// The keep probability of each element of a row by the mid-rank formula.
    fn probabilities(row: &[f32], density: f64, epsilon: f64) -> Vec<f64> {
        let top2 = 2 * (row.len() - 1);
        mid_ranks2(row)
            .into_iter()
            .map(|rank2| {
                let rank_norm = if top2 > 0 {
                    rank2 as f64 / top2 as f64
                } else {
                    0.5
                };
                density - epsilon + 2.0 * epsilon * rank_norm
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

    fn kept(bits: &[u64], i: usize) -> bool {
        bits[i / 64] >> (i % 64) & 1 == 1
    }

    /// A row pattern of `len` with zeros, crowds of equal values and spread ones.
    fn crowded_row(key: u64, len: usize) -> Vec<f32> {
        (0..len as u64)
            .map(|i| match rng::uniform_bits(key, i) % 7 {
                0 => 0.0,
                1 | 2 => 0.25,
                3 => 0.25 + 1.0 / 1024.0,
                _ => (rng::uniform(key, 1000 + i) * 12.0 - 9.0).exp() as f32,
            })
            .collect()
    }

    #[test]
    fn keeps_larger_magnitudes_more_often() {
        let (rows, row_len) = (400, 100);
        let n = rows * row_len;
        // Every row holds the magnitudes 0..100 in a shuffled order.
        let x: Vec<f32> = (0..n).map(|i| ((i * 37) % row_len) as f32).collect();
        let (bits, _) = mask_of(&x, row_len, 0.5, 0.2, 9).finish();
        // Magnitude r has rank r: kept with probability 0.3 + 0.4·r/99.
        for r in [0usize, 50, 99] {
            let share = (0..n)
                .filter(|&i| (i * 37) % row_len == r && kept(&bits, i))
                .count() as f64
                / rows as f64;
            let p = 0.3 + 0.4 * r as f64 / 99.0;
            assert!((share - p).abs() < 0.08, "rank {r}: {share} vs {p}");
        }
        let total = (0..n).filter(|&i| kept(&bits, i)).count() as f64 / n as f64;
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
            .filter(|&i| i % 2 == 0 && kept(&bits, i))
            .count() as f64;
        let p = 0.3 + 0.4 * 24.5 / 99.0;
        let share = kept / (x.len() / 2) as f64;
        assert!((share - p).abs() < 0.01, "{share} vs {p}");
    }

    #[test]
    fn keep_rates_are_the_mid_rank_probabilities() {
        // One row pattern repeated over many rows: each position's keep count against its
        // mid-rank probability, and their χ² over all positions.
        let key = rng::stream_key(3, "rates", 0);
        for (row_len, density, epsilon) in [(40, 0.4, 0.25), (17, 0.5, 0.45), (2, 0.3, 0.1)] {
            let row = crowded_row(key, row_len);
            let rows = 20_000;
            let x: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
            let (bits, _) = mask_of(&x, row_len, density, epsilon, key).finish();
            let mut chi2 = 0.0;
            for (j, p) in probabilities(&row, density, epsilon)
                .into_iter()
                .enumerate()
            {
                let count = (0..rows).filter(|r| kept(&bits, r * row_len + j)).count() as f64;
                let (mean, var) = (rows as f64 * p, rows as f64 * p * (1.0 - p));
                let z = (count - mean) / var.sqrt();
                assert!(z.abs() < 5.0, "{row_len}: position {j}: {count} vs {mean}");
                chi2 += z * z;
            }
            let dof = row_len as f64;
            assert!(
                chi2 < dof + 5.0 * (2.0 * dof).sqrt(),
                "{row_len}: χ² {chi2}"
            );
        }
    }

    #[test]
    fn verdicts_are_independent() {
        // Neighbours, and elements that are likely partners (a row of two), are kept together
        // as often as independent draws are.
        let key = rng::stream_key(5, "pairs", 0);
        for row_len in [2, 30] {
            let row = crowded_row(key, row_len);
            let p = probabilities(&row, 0.4, 0.3);
            let rows = 40_000;
            let x: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
            let (bits, _) = mask_of(&x, row_len, 0.4, 0.3, key).finish();
            let (mut both, mut expected, mut var) = (0.0, 0.0, 0.0);
            for r in 0..rows {
                for j in 0..row_len - 1 {
                    let i = r * row_len + j;
                    both += (kept(&bits, i) && kept(&bits, i + 1)) as u8 as f64;
                    let q = p[j] * p[j + 1];
                    expected += q;
                    var += q * (1.0 - q);
                }
            }
            let z = (both - expected) / var.sqrt();
            assert!(z.abs() < 5.0, "{row_len}: {both} vs {expected}");
        }
    }

    #[test]
    fn partners_are_uniform_over_the_others() {
        let key = rng::stream_key(6, "partners", 0);
        let draw = |i: u64| Draws::at(key, i).bits(i);
        let never = |_: u64| -> u32 { unreachable!() };
        assert_eq!(partner(draw(0), 1, 0, never), 0);
        let (len, j, n) = (6, 2, 600_000u64);
        let mut counts = [0f64; 6];
        for i in 0..n {
            counts[partner(draw(i), len, j, never)] += 1.0;
        }
        assert_eq!(counts[j], 0.0);
        let mean = n as f64 / 5.0;
        let chi2: f64 = counts
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != j)
            .map(|(_, c)| (c - mean) * (c - mean) / mean)
            .sum();
        assert!(chi2 < 25.0, "{counts:?}");
        // Lemire's rejection: with 3·2³⁰ others the draws whose low product half is below
        // 2³² mod 3·2³⁰ = 2³⁰ (a quarter of them) are drawn again.
        let len = (3 << 30) + 1;
        let others = len as u64 - 1;
        let reject_below = (1u64 << 32) % others;
        assert_eq!(reject_below, 1 << 30);
        let redraws = std::cell::Cell::new(0);
        let fresh = |k: u64| {
            redraws.set(redraws.get() + 1);
            draw(1_000_000 + k)
        };
        for v in [0u32, 1, 2, 3, u32::MAX] {
            redraws.set(0);
            let p = partner(v, len, 5, fresh);
            let product = v as u64 * others;
            let accepted = product & 0xffff_ffff >= reject_below;
            assert_eq!(redraws.get() == 0, accepted, "{v}");
            if accepted {
                let q = (product >> 32) as usize;
                assert_eq!(p, q + (q >= 5) as usize, "{v}");
            }
            assert!(p < len && p != 5, "{v}");
        }
    }

    #[test]
    fn vector_and_scalar_rules_agree() {
        let key = rng::stream_key(4, "mask", 1);
        let runs = [
            (600, 0.4, 0.2),
            (1, 0.5, 0.1),
            (2, 0.5, 0.1),
            (17, 0.3, 0.2),
            (3000, 0.3, 0.0),
            (1500, 0.5, 0.45),
        ];
        for (row_len, density, epsilon) in runs {
            let x = crowded_row(key, 6000 / row_len * row_len);
            let (bits, l1) = mask_of(&x, row_len, density, epsilon, key).finish();
            let want = scalar_mask(&x, row_len, density, epsilon, key);
            for (i, want) in want.into_iter().enumerate() {
                assert_eq!(kept(&bits, i), want, "{row_len}: {i}");
            }
            let full: f64 = x.iter().map(|&v| v as f64).sum();
            let masked: f64 = (0..x.len())
                .filter(|&i| kept(&bits, i))
                .map(|i| x[i] as f64)
                .sum();
            assert!((l1[0] - full).abs() <= 1e-5 * full, "{l1:?} vs {full}");
            assert!(
                (l1[1] - masked).abs() <= 1e-5 * masked,
                "{l1:?} vs {masked}"
            );
        }
    }

    #[test]
    fn the_rule_compares_with_one_partner() {
        // The rule by hand: below density − ε keeps, from density + ε drops, between keeps when
        // the partner is smaller, or equal and the draw below density.
        let rule = MagPrune::new(4, 4, 0.5, 0.25, 1).rule;
        let row = [1.0f32, 2.0, 2.0, 3.0];
        let never = |_: u64| -> u32 { unreachable!() };
        let quarter = 1u32 << 30;
        let partner_of = |v: u32, j: usize| partner(v, 4, j, never);
        // Partner draws 1, 2³⁰·1.5, 2³²−1 pick the first, second and third other element.
        let picks = [1u32, 3 << 29, u32::MAX];
        for j in 0..4 {
            for &v in &picks {
                let p = partner_of(v, j);
                assert_ne!(p, j);
                for (draw, want) in [
                    (quarter - 1, true),
                    (3 * quarter, false),
                    (quarter, row[p] <= row[j]),
                    (2 * quarter, row[p] < row[j]),
                ] {
                    assert_eq!(rule.keeps(&row, j, draw, v, 0), want, "{j} {v} {draw}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rejected_partner_draws_are_left_to_the_scalar_rule() {
        if !(std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("popcnt"))
        {
            return;
        }
        // Views aimed so that element 37 draws inside the band and partner draw 0, which
        // Lemire's method rejects for 99 others (2³² mod 99 = 4).
        let key = rng::stream_key(7, "redo", 0);
        let (row_len, first, aimed) = (100, 5000u32, 37u32);
        let rule = MagPrune::new(row_len, row_len, 0.5, 0.3, key).rule;
        let index = (first + aimed) as u64;
        let draws = Draws::from_parts(11, Draws::aimed_at(11, index, rule.low + 1));
        let partners = Draws::from_parts(22, Draws::aimed_at(22, index, 0));
        let magnitudes = crowded_row(key, row_len);
        let (mut queue, mut bits, mut redo) = (Queue::default(), vec![0; 2], Vec::new());
        // The tail's magnitudes are there already; the rest are written.
        let mut written = magnitudes.clone();
        written[..96].fill(0.0);
        let row = Row {
            x: &magnitudes,
            base: &[0.0; 100],
            magnitudes: &mut written,
        };
        // SAFETY: the CPU has AVX-512F, BMI2 and POPCNT (checked above).
        let whole = unsafe {
            judge_avx512(
                &rule,
                (draws, partners),
                first,
                row,
                &mut queue,
                &mut bits,
                &mut redo,
            )
        };
        assert_eq!(written, magnitudes);
        assert_eq!((whole, redo), (96, vec![aimed]));
        for j in (0..96).filter(|&j| j != aimed as usize) {
            let i = first as u64 + j as u64;
            let want = rule.keeps(&magnitudes, j, draws.bits(i), partners.bits(i), i);
            assert_eq!(kept(&bits, j), want, "{j}");
        }
    }

    #[test]
    fn rows_across_a_stretch_edge_follow_the_rule() {
        let key = rng::stream_key(2, "edge", 0);
        let rule = MagPrune::new(0, 300, 0.4, 0.3, key).rule;
        for first in [(1u64 << 32) - 100, (1 << 32) - 300, 1 << 32] {
            let mut scratch = RowScratch {
                magnitudes: vec![0.0; 300],
                kept: vec![0; 5],
                ..RowScratch::default()
            };
            scratch.judge(&rule, first, &crowded_row(key, 300), &[0.0; 300]);
            for j in 0..300 {
                let want = rule.keeps_at(&scratch.magnitudes, j, first + j as u64);
                assert_eq!(kept(&scratch.kept, j), want, "{first}: {j}");
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
}
