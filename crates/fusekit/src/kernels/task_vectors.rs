//! Per-block loops of the task-arithmetic family, written branch-free so they vectorise, and
//! compiled for AVX-512 and AVX2 with runtime dispatch.

use super::convert::{round_bf16, round_to};
use super::select::Keep;
use crate::dtype::Dtype;

/// What a kept delta is multiplied by: first the rescale, then the model's weight, in that order
/// as mergekit does (the two roundings matter for bit equality).
#[derive(Debug, Clone, Copy)]
pub struct Factor {
    pub scale: f32,
    pub weight: f32,
}

impl Factor {
    pub const ONE: Factor = Factor {
        scale: 1.0,
        weight: 1.0,
    };

    #[inline(always)]
    fn of(self, delta: f32) -> f32 {
        delta * self.scale * self.weight
    }
}
use crate::rng::Draws;
use multiversion::multiversion;

/// out = (x − base)·factor.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn scaled_delta(x: &[f32], base: &[f32], factor: Factor, out: &mut [f32]) {
    for ((o, &v), &b) in out.iter_mut().zip(x).zip(base) {
        *o = factor.of(v - b);
    }
}

/// out = (x − base)·scale·weight where the `keep` top-k rule keeps the element and the `drop`
/// rule does not, else 0.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn top_k_delta(
    start: usize,
    keep: Keep,
    drop: Keep,
    x: &[f32],
    base: &[f32],
    factor: Factor,
    out: &mut [f32],
) {
    top_k_each(start, keep, drop, x, base, factor, out, |o, value| {
        *o = value
    });
}

/// Calls `put(out[j], value)` with `top_k_delta`'s value of every element j. Where neither tie
/// cutoff falls inside the range, the rules are two thresholds on the magnitude bits, without
/// the per-element index comparisons.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn top_k_each(
    start: usize,
    keep: Keep,
    drop: Keep,
    x: &[f32],
    base: &[f32],
    factor: Factor,
    out: &mut [f32],
    put: impl Fn(&mut f32, f32),
) {
    let end = start + out.len();
    let elements = out.iter_mut().zip(x).zip(base);
    if let (Some(keep_from), Some(drop_from)) =
        (keep.least_kept(start, end), drop.least_kept(start, end))
    {
        for ((o, &v), &b) in elements {
            let d = v - b;
            let bits = d.to_bits() & 0x7FFF_FFFF;
            let kept = (bits >= keep_from) & (bits < drop_from);
            put(o, if kept { factor.of(d) } else { 0.0 });
        }
    } else {
        for (j, ((o, &v), &b)) in elements.enumerate() {
            put(o, top_k_value(start + j, keep, drop, v - b, factor));
        }
    }
}

/// One element of `top_k_delta`: `delta`, at `index` in the tensor, weighted or 0.
#[inline(always)]
fn top_k_value(index: usize, keep: Keep, drop: Keep, delta: f32, factor: Factor) -> f32 {
    let bits = delta.to_bits() & 0x7FFF_FFFF;
    let kept = ((bits > keep.bits) | ((bits == keep.bits) & (index < keep.cutoff)))
        & !((bits > drop.bits) | ((bits == drop.bits) & (index < drop.cutoff)));
    if kept {
        factor.of(delta)
    } else {
        0.0
    }
}

/// sum += what `top_k_delta` writes: a sum over models without their deltas written out first.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn top_k_add(
    start: usize,
    keep: Keep,
    drop: Keep,
    x: &[f32],
    base: &[f32],
    factor: Factor,
    sum: &mut [f32],
) {
    top_k_each(start, keep, drop, x, base, factor, sum, |s, value| {
        *s += value
    });
}

/// sum += (x − base)·factor: `top_k_add` for a model that keeps everything.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn scaled_add(x: &[f32], base: &[f32], factor: Factor, sum: &mut [f32]) {
    for ((s, &v), &b) in sum.iter_mut().zip(x).zip(base) {
        *s += factor.of(v - b);
    }
}

/// out = (x − base)·scale·weight where the random draw is below `below`, else 0.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn random_delta(
    start: usize,
    draws: Draws,
    below: u32,
    x: &[f32],
    base: &[f32],
    factor: Factor,
    out: &mut [f32],
) {
    for (j, ((o, &v), &b)) in out.iter_mut().zip(x).zip(base).enumerate() {
        let kept = draws.bits((start + j) as u64) < below;
        *o = if kept { factor.of(v - b) } else { 0.0 };
    }
}

/// out = (x − base)·scale·weight where bit `start + j` of `bits` is set, else 0. From the first
/// 32-aligned index on, 32 elements per half word, each lane shifting the same half by its own
/// offset, which vectorises; the elements before and after, one at a time.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn bitmask_delta(
    start: usize,
    bits: &[u64],
    x: &[f32],
    base: &[f32],
    factor: Factor,
    out: &mut [f32],
) {
    let one = |j: usize| {
        let index = start + j;
        if bits[index / 64] >> (index % 64) & 1 == 1 {
            factor.of(x[j] - base[j])
        } else {
            0.0
        }
    };
    let lead = ((32 - start % 32) % 32).min(out.len());
    let body = lead + (out.len() - lead) / 32 * 32;
    for j in (0..lead).chain(body..out.len()) {
        out[j] = one(j);
    }
    let groups = out[lead..body]
        .chunks_exact_mut(32)
        .zip(x[lead..].chunks_exact(32))
        .zip(base[lead..].chunks_exact(32));
    for (group, ((o, x), b)) in groups.enumerate() {
        let index = start + lead + 32 * group;
        let half = (bits[index / 64] >> (index % 64)) as u32;
        let (o, x, b): (&mut [f32; 32], &[f32; 32], &[f32; 32]) = (
            o.try_into().expect("32"),
            x.try_into().expect("32"),
            b.try_into().expect("32"),
        );
        for j in 0..32 {
            let kept = half >> j & 1 == 1;
            o[j] = if kept { factor.of(x[j] - b[j]) } else { 0.0 };
        }
    }
}

/// TIES sign election and disjoint merge of one block, fused so every value is read once from
/// cache instead of once per step: `deltas` holds each model's weighted delta, `base.len()`
/// values per model in model order. The elected sign is that of their sum (≥ 0 counts as +);
/// the deltas that agree with it are added, and so are their models' `weights` (rounded to
/// `round` as mergekit rounds its divisor; 0 becomes 1); out = base + (agreeing / divisor, or
/// agreeing when not `normalize`)·lambda. 16 lanes at a time, each summing in model order (the
/// same bits as a step at a time over whole blocks, which this replaced).
pub fn consensus_merge(deltas: &[f32], mix: &Consensus, base: &[f32], out: &mut [f32]) {
    let n = base.len();
    assert!(deltas.len() == n * mix.weights.len() && out.len() == n);
    let mut from = 0;
    #[cfg(target_arch = "x86_64")]
    if mix.weights.len() <= 4 && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the lengths are asserted.
        from = unsafe { consensus_merge_avx512(deltas, mix, base, out) };
    }
    consensus_merge_from(from, deltas, mix, base, out);
}

/// `consensus_merge` from element `from` on.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn consensus_merge_from(
    from: usize,
    deltas: &[f32],
    mix: &Consensus,
    base: &[f32],
    out: &mut [f32],
) {
    let n = base.len();
    let body = from + (n - from) / LANES * LANES;
    for j in (from..body).step_by(LANES) {
        consensus_lanes::<LANES>(j, deltas, mix, base, out);
    }
    for j in body..n {
        consensus_lanes::<1>(j, deltas, mix, base, out);
    }
}

/// `consensus_merge` sixteen lanes at a time, for up to four models, up to the last whole
/// sixteen (returned).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn consensus_merge_avx512(
    deltas: &[f32],
    mix: &Consensus,
    base: &[f32],
    out: &mut [f32],
) -> usize {
    let n = base.len();
    assert!(mix.weights.len() <= 4 && deltas.len() == n * mix.weights.len() && out.len() == n);
    // SAFETY: j + 16 ≤ n (the lanes' contract), so the load stays inside model m's deltas.
    let delta = |m: usize, j: usize| unsafe {
        std::arch::x86_64::_mm512_loadu_ps(deltas.as_ptr().add(m * n + j))
    };
    // SAFETY: the CPU has AVX-512F.
    unsafe { consensus_lanes_avx512(mix, base, out, delta) }
}

/// Models whose deltas are masked by bits: model m's values `models[m]`, its mask `masks[m].0`
/// from bit `start` on, its factor `masks[m].1`.
pub struct BitMasked<'a> {
    pub start: usize,
    pub masks: &'a [(&'a [u64], Factor)],
    pub models: &'a [&'a [f32]],
}

/// `bitmask_delta` of every model, then `consensus_merge`, sixteen lanes at a time without
/// storing the deltas, for up to four models (else it does nothing); returns where it stopped.
pub fn bitmask_consensus(
    masked: &BitMasked,
    mix: &Consensus,
    base: &[f32],
    out: &mut [f32],
) -> usize {
    let (n, models) = (base.len(), masked.models);
    assert!(masked.masks.len() == models.len() && models.len() == mix.weights.len());
    assert!(models.iter().all(|x| x.len() == n) && out.len() == n);
    let end = masked.start + n;
    assert!(masked.masks.iter().all(|(bits, _)| bits.len() * 64 >= end));
    #[cfg(target_arch = "x86_64")]
    if models.len() <= 4 && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the lengths are asserted.
        return unsafe { bitmask_consensus_avx512(masked, mix, base, out) };
    }
    0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bitmask_consensus_avx512(
    masked: &BitMasked,
    mix: &Consensus,
    base: &[f32],
    out: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let BitMasked {
        start,
        masks,
        models,
    } = *masked;
    let delta = |m: usize, j: usize| {
        let (bits, factor) = masks[m];
        let index = start + j;
        let (w, shift) = (index / 64, index % 64);
        let mut word = bits[w] >> shift;
        if shift > 48 {
            word |= bits[w + 1] << (64 - shift);
        }
        // SAFETY: j + 16 ≤ n (the lanes' contract) for both loads.
        let (x, b) = unsafe {
            (
                _mm512_loadu_ps(models[m].as_ptr().add(j)),
                _mm512_loadu_ps(base.as_ptr().add(j)),
            )
        };
        let scaled = _mm512_mul_ps(_mm512_sub_ps(x, b), _mm512_set1_ps(factor.scale));
        _mm512_maskz_mul_ps(word as u16, scaled, _mm512_set1_ps(factor.weight))
    };
    // SAFETY: the CPU has AVX-512F.
    unsafe { consensus_lanes_avx512(mix, base, out, delta) }
}

/// The consensus of `consensus_merge` for up to four models whose deltas at lanes `j..j + 16`
/// `delta(m, j)` gives, up to the last whole sixteen (returned). The divisor of every subset of
/// agreeing models is summed and rounded once, ahead, and looked up per lane by the subset's
/// bits: the same values as summing per lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn consensus_lanes_avx512(
    mix: &Consensus,
    base: &[f32],
    out: &mut [f32],
    delta: impl Fn(usize, usize) -> std::arch::x86_64::__m512,
) -> usize {
    let mut divisors = [1f32; 16];
    for (subset, q) in divisors.iter_mut().enumerate().take(1 << mix.weights.len()) {
        let mut sum = 0f32;
        for (m, &w) in mix.weights.iter().enumerate() {
            if subset >> m & 1 == 1 {
                sum += w;
            }
        }
        let sum = mix.round.map_or(sum, |dtype| round_to(dtype, sum));
        *q = if sum == 0.0 { 1.0 } else { sum };
    }
    // SAFETY (all four): the CPU has AVX-512F.
    match mix.weights.len() {
        1 => unsafe { consensus_models_avx512::<1>(&divisors, mix, base, out, delta) },
        2 => unsafe { consensus_models_avx512::<2>(&divisors, mix, base, out, delta) },
        3 => unsafe { consensus_models_avx512::<3>(&divisors, mix, base, out, delta) },
        _ => unsafe { consensus_models_avx512::<4>(&divisors, mix, base, out, delta) },
    }
}

/// `consensus_lanes_avx512` for `M` models.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn consensus_models_avx512<const M: usize>(
    divisors: &[f32; 16],
    mix: &Consensus,
    base: &[f32],
    out: &mut [f32],
    delta: impl Fn(usize, usize) -> std::arch::x86_64::__m512,
) -> usize {
    use std::arch::x86_64::*;
    let n = base.len();
    assert!(out.len() == n);
    // SAFETY: sixteen f32 for the load.
    let divisors = unsafe { _mm512_loadu_ps(divisors.as_ptr()) };
    let (zero, lambda) = (_mm512_setzero_ps(), _mm512_set1_ps(mix.lambda));
    let body = n / LANES * LANES;
    for j in (0..body).step_by(LANES) {
        let mut d = [zero; M];
        for (m, d) in d.iter_mut().enumerate() {
            *d = delta(m, j);
        }
        let mut sum = zero;
        for &d in &d {
            sum = _mm512_add_ps(sum, d);
        }
        let positive = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(sum, zero);
        let (mut mixed, mut subset) = (zero, _mm512_setzero_si512());
        for (m, &d) in d.iter().enumerate() {
            let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(d, zero);
            let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d, zero);
            let agrees = (above & positive) | (below & !positive);
            mixed = _mm512_mask_add_ps(mixed, agrees, mixed, d);
            let bit = _mm512_set1_epi32(1 << m);
            subset = _mm512_mask_or_epi32(subset, agrees, subset, bit);
        }
        let merged = if mix.normalize {
            _mm512_div_ps(mixed, _mm512_permutexvar_ps(subset, divisors))
        } else {
            mixed
        };
        // SAFETY: j + 16 ≤ n for the load and the store.
        let b = unsafe { _mm512_loadu_ps(base.as_ptr().add(j)) };
        let o = _mm512_add_ps(b, _mm512_mul_ps(merged, lambda));
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(j), o) };
    }
    body
}

/// How `consensus_merge` mixes the agreeing deltas.
pub struct Consensus<'a> {
    /// Each model's weight, in model order.
    pub weights: &'a [f32],
    /// The dtype the divisor is rounded to.
    pub round: Option<Dtype>,
    /// Divide by the agreeing weights (else only add).
    pub normalize: bool,
    pub lambda: f32,
}

const LANES: usize = 16;

/// Elements `j..j + L` of `consensus_merge`.
#[inline(always)]
fn consensus_lanes<const L: usize>(
    j: usize,
    deltas: &[f32],
    mix: &Consensus,
    base: &[f32],
    out: &mut [f32],
) {
    let Consensus {
        weights,
        round,
        normalize,
        lambda,
    } = *mix;
    let n = base.len();
    let model = |m: usize| -> &[f32; L] { deltas[m * n + j..][..L].try_into().expect("L") };
    let mut sum = [0f32; L];
    for m in 0..weights.len() {
        let d = model(m);
        (0..L).for_each(|l| sum[l] += d[l]);
    }
    let (mut mixed, mut divisor) = ([0f32; L], [0f32; L]);
    for (m, &weight) in weights.iter().enumerate() {
        let d = model(m);
        for l in 0..L {
            let agrees = ((d[l] > 0.0) & (sum[l] >= 0.0)) | ((d[l] < 0.0) & (sum[l] < 0.0));
            mixed[l] += if agrees { d[l] } else { 0.0 };
            divisor[l] += if agrees { weight } else { 0.0 };
        }
    }
    match round {
        // The common case inline, so the lanes stay in registers.
        Some(Dtype::BF16) => divisor.iter_mut().for_each(|q| *q = round_bf16(*q)),
        Some(dtype) => divisor.iter_mut().for_each(|q| *q = round_to(dtype, *q)),
        None => {}
    }
    let (base, out): (&[f32; L], &mut [f32; L]) = (
        base[j..][..L].try_into().expect("L"),
        (&mut out[j..][..L]).try_into().expect("L"),
    );
    for l in 0..L {
        let q = if divisor[l] == 0.0 { 1.0 } else { divisor[l] };
        let merged = if normalize { mixed[l] / q } else { mixed[l] };
        out[l] = base[l] + merged * lambda;
    }
}

/// out = base + (mixed / divisor or mixed)·lambda.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn finish(
    base: &[f32],
    mixed: &[f32],
    divisor: f32,
    normalize: bool,
    lambda: f32,
    out: &mut [f32],
) {
    for ((o, &b), &m) in out.iter_mut().zip(base).zip(mixed) {
        let merged = if normalize { m / divisor } else { m };
        *o = b + merged * lambda;
    }
}

/// (‖x − base‖₁, ‖kept‖₁) of one block: 16 f32 lanes (element i into lane i mod 16; a lane sums
/// at most 256 values of a block, so its relative error stays below 2⁻¹⁶), added in f64 in lane
/// order. A fixed pattern, so the same block always gives the same bits.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn l1_norms(x: &[f32], base: &[f32], kept: &[f32]) -> (f64, f64) {
    let mut full = [0f32; 16];
    let mut masked = [0f32; 16];
    let lanes = x
        .chunks_exact(16)
        .zip(base.chunks_exact(16))
        .zip(kept.chunks_exact(16));
    for ((x, b), k) in lanes {
        for l in 0..16 {
            full[l] += (x[l] - b[l]).abs();
            masked[l] += k[l].abs();
        }
    }
    let tail = x.len() / 16 * 16;
    for i in tail..x.len() {
        full[i - tail] += (x[i] - base[i]).abs();
        masked[i - tail] += kept[i].abs();
    }
    let sum = |lanes: [f32; 16]| lanes.iter().map(|&v| v as f64).sum::<f64>();
    (sum(full), sum(masked))
}

/// DARE's rescale pass over one block in one read: sets bit `start + j` of `bits` where the
/// draw keeps element j (below `below`, as `random_delta` decides), so the merge pass reads the
/// mask instead of drawing again, and returns (‖x − base‖₁, ‖kept‖₁) summed exactly as
/// `l1_norms` sums them (the same bits). `start` is a multiple of 64 and `bits` starts zeroed.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn random_mask_l1(
    start: usize,
    draws: Draws,
    below: u32,
    x: &[f32],
    base: &[f32],
    bits: &mut [u64],
) -> (f64, f64) {
    assert!(start.is_multiple_of(64) && x.len() == base.len());
    let mut full = [0f32; 16];
    let mut masked = [0f32; 16];
    let body = x.len() / 16 * 16;
    for j in (0..body).step_by(16) {
        let lanes = (&mut full[..], &mut masked[..]);
        mask_l1_lanes::<16>(start + j, draws, below, &x[j..], &base[j..], lanes, bits);
    }
    for j in body..x.len() {
        let lanes = (&mut full[j - body..], &mut masked[j - body..]);
        mask_l1_lanes::<1>(start + j, draws, below, &x[j..], &base[j..], lanes, bits);
    }
    let sum = |lanes: [f32; 16]| lanes.iter().map(|&v| v as f64).sum::<f64>();
    (sum(full), sum(masked))
}

/// Elements `first..first + L` of `random_mask_l1`, into its first `L` lanes.
#[inline(always)]
fn mask_l1_lanes<const L: usize>(
    first: usize,
    draws: Draws,
    below: u32,
    x: &[f32],
    base: &[f32],
    (full, masked): (&mut [f32], &mut [f32]),
    bits: &mut [u64],
) {
    let (x, base): (&[f32; L], &[f32; L]) = (
        x[..L].try_into().expect("L"),
        base[..L].try_into().expect("L"),
    );
    let (full, masked): (&mut [f32; L], &mut [f32; L]) = (
        (&mut full[..L]).try_into().expect("L"),
        (&mut masked[..L]).try_into().expect("L"),
    );
    let mut kept_bits = 0u64;
    for l in 0..L {
        let kept = draws.bits((first + l) as u64) < below;
        let d = (x[l] - base[l]).abs();
        full[l] += d;
        masked[l] += if kept { d } else { 0.0 };
        kept_bits |= (kept as u64) << l;
    }
    bits[first / 64] |= kept_bits << (first % 64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_delta_follows_the_rule_wherever_the_cutoffs_fall() {
        let (start, n) = (100, 40);
        // Five magnitudes, so the thresholds have ties on both sides of every cutoff.
        let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.25).collect();
        let base = vec![0f32; n];
        let factor = Factor {
            scale: 2.0,
            weight: 0.5,
        };
        let cutoffs = [0, 99, 100, 117, 140, 141, usize::MAX];
        let rules = |bits: f32| {
            cutoffs.map(|cutoff| Keep {
                bits: bits.to_bits(),
                cutoff,
            })
        };
        let drops = rules(0.5).into_iter().chain([Keep::NONE]);
        for drop in drops {
            for keep in rules(0.25).into_iter().chain([Keep::ALL, Keep::NONE]) {
                let mut out = vec![f32::NAN; n];
                top_k_delta(start, keep, drop, &x, &base, factor, &mut out);
                for (j, (&o, &v)) in out.iter().zip(&x).enumerate() {
                    let bits = v.to_bits() & 0x7FFF_FFFF;
                    let kept = keep.keeps(start + j, bits) && !drop.keeps(start + j, bits);
                    let want = if kept { v * 2.0 * 0.5 } else { 0.0 };
                    assert_eq!(o.to_bits(), want.to_bits(), "{keep:?} {drop:?} {j}");
                }
            }
        }
    }

    #[test]
    fn the_adding_kernels_add_what_the_writing_ones_write() {
        let n = 70;
        let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7).sin()).collect();
        // Equal inputs give zero deltas, and a -0.0 weighted delta must leave a +0.0 sum.
        let base: Vec<f32> = (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    x[i]
                } else {
                    ((i as f32) * 0.3).cos()
                }
            })
            .collect();
        let keep = Keep {
            bits: 0.4f32.to_bits(),
            cutoff: 31,
        };
        let drop = Keep {
            bits: 1.2f32.to_bits(),
            cutoff: 0,
        };
        let factor = Factor {
            scale: 1.5,
            weight: -0.5,
        };
        let mut delta = vec![0f32; n];
        top_k_delta(3, keep, drop, &x, &base, factor, &mut delta);
        let mut every = vec![0f32; n];
        scaled_delta(&x, &base, factor, &mut every);
        let prior: Vec<f32> = (0..n).map(|i| (i as f32) * 0.01).collect();
        for start_sum in [vec![0f32; n], prior] {
            let mut sum = start_sum.clone();
            top_k_add(3, keep, drop, &x, &base, factor, &mut sum);
            let mut all = start_sum.clone();
            scaled_add(&x, &base, factor, &mut all);
            for i in 0..n {
                let want = start_sum[i] + delta[i];
                assert_eq!(sum[i].to_bits(), want.to_bits(), "{i}");
                assert_eq!(all[i].to_bits(), (start_sum[i] + every[i]).to_bits(), "{i}");
            }
        }
        assert!(delta.contains(&0.0) && delta.iter().any(|d| *d != 0.0));
    }

    #[test]
    fn consensus_merge_matches_the_plain_rule_on_every_lane_and_the_tail() {
        let n = 37;
        // One to five models (a negative weight among them): the vector path with its divisor
        // table up to four, the portable loop beyond.
        let weight_sets = [[0.3f32, 0.7, 0.45, -0.2, 0.25], [0.5, 0.5, 1.0, 0.25, 2.0]];
        for (all_weights, models) in weight_sets
            .iter()
            .flat_map(|w| (1..=5).map(move |k| (w, k)))
        {
            let weights = &all_weights[..models];
            // Zero deltas, ties of sign and a lane where no model agrees all occur.
            let deltas: Vec<f32> = (0..n * models)
                .map(|i| match i % 7 {
                    0 => 0.0,
                    _ => ((i as f32) * 0.91).sin(),
                })
                .collect();
            let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.23).cos()).collect();
            let cases = [
                (Some(Dtype::BF16), true),
                (Some(Dtype::F16), true),
                (None, true),
                (None, false),
            ];
            for (round, normalize) in cases {
                let mut out = vec![f32::NAN; n];
                let mix = Consensus {
                    weights,
                    round,
                    normalize,
                    lambda: 0.9,
                };
                consensus_merge(&deltas, &mix, &base, &mut out);
                for j in 0..n {
                    let d = |m: usize| deltas[m * n + j];
                    let sum = (0..models).fold(0f32, |s, m| s + d(m));
                    let agree = |m: usize| if sum >= 0.0 { d(m) > 0.0 } else { d(m) < 0.0 };
                    let (mut mixed, mut divisor) = (0f32, 0f32);
                    for m in (0..models).filter(|&m| agree(m)) {
                        mixed += d(m);
                        divisor += weights[m];
                    }
                    let divisor = round.map_or(divisor, |r| round_to(r, divisor));
                    let divisor = if divisor == 0.0 { 1.0 } else { divisor };
                    let merged = if normalize { mixed / divisor } else { mixed };
                    let want = base[j] + merged * 0.9;
                    assert_eq!(
                        out[j].to_bits(),
                        want.to_bits(),
                        "{models} models, {round:?} {normalize} lane {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn bitmask_consensus_equals_its_two_steps() {
        let n = 75;
        let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.23).cos()).collect();
        let x: Vec<Vec<f32>> = (0..4)
            .map(|m| {
                (0..n)
                    .map(|i| ((i * (m + 2)) as f32 * 0.37).sin())
                    .collect()
            })
            .collect();
        let bits: Vec<Vec<u64>> = (0..4u64)
            .map(|m| {
                (0..4)
                    .map(|w: u64| (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ m)
                    .collect()
            })
            .collect();
        let factors = [(1.5, 0.5), (0.75, 0.5), (1.0, 0.3), (2.0, -0.2)];
        for (models, start) in [(2, 0), (2, 53), (3, 7), (4, 100), (1, 40)] {
            let weights: Vec<f32> = factors[..models].iter().map(|f| f.1).collect();
            let mix = Consensus {
                weights: &weights,
                round: Some(Dtype::BF16),
                normalize: true,
                lambda: 1.0,
            };
            let mut deltas = vec![0f32; n * models];
            let masks: Vec<(&[u64], Factor)> = (0..models)
                .map(|m| {
                    let (scale, weight) = factors[m];
                    (&bits[m][..], Factor { scale, weight })
                })
                .collect();
            for (m, d) in deltas.chunks_exact_mut(n).enumerate() {
                bitmask_delta(start, masks[m].0, &x[m], &base, masks[m].1, d);
            }
            let mut want = vec![0f32; n];
            consensus_merge(&deltas, &mix, &base, &mut want);
            let inputs: Vec<&[f32]> = x[..models].iter().map(|v| &v[..]).collect();
            let mut out = vec![f32::NAN; n];
            let masked = BitMasked {
                start,
                masks: &masks,
                models: &inputs,
            };
            let done = bitmask_consensus(&masked, &mix, &base, &mut out);
            assert!(done == 0 || done == n / 16 * 16, "{done}");
            for j in 0..done {
                assert_eq!(out[j].to_bits(), want[j].to_bits(), "{models} {start}: {j}");
            }
        }
    }

    #[test]
    fn random_mask_l1_gives_the_draws_mask_and_the_norms_of_the_two_step_form() {
        let x: Vec<f32> = (0..205).map(|i| (i as f32 * 0.37).sin()).collect();
        let base: Vec<f32> = (0..205).map(|i| (i as f32 * 0.11).cos() * 0.5).collect();
        let below = u32::MAX / 3;
        for (start, len) in [(0usize, 205usize), (128, 64), (4096, 37)] {
            let draws = Draws::at(0x5eed, start as u64);
            let mut bits = vec![0u64; (start + len).div_ceil(64)];
            let (x, base) = (&x[..len], &base[..len]);
            let norms = random_mask_l1(start, draws, below, x, base, &mut bits);
            let mut kept = vec![f32::NAN; len];
            random_delta(start, draws, below, x, base, Factor::ONE, &mut kept);
            assert_eq!(norms, l1_norms(x, base, &kept), "start {start}");
            let mut from_bits = vec![f32::NAN; len];
            bitmask_delta(start, &bits, x, base, Factor::ONE, &mut from_bits);
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same(&kept, &from_bits), "start {start}");
        }
    }

    #[test]
    fn bitmask_delta_matches_the_plain_rule_at_any_start() {
        let bits: Vec<u64> = (0..8u64).map(|i| crate::rng::mix(i + 1)).collect();
        let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
        let base: Vec<f32> = (0..300).map(|i| (i as f32 * 0.11).cos() * 0.5).collect();
        let factor = Factor {
            scale: 1.5,
            weight: 0.25,
        };
        for (start, len) in [(0, 300), (64, 100), (32, 33), (5, 200), (96, 7)] {
            let mut out = vec![f32::NAN; len];
            bitmask_delta(start, &bits, &x[..len], &base[..len], factor, &mut out);
            for j in 0..len {
                let index = start + j;
                let want = if bits[index / 64] >> (index % 64) & 1 == 1 {
                    (x[j] - base[j]) * 1.5 * 0.25
                } else {
                    0.0
                };
                assert_eq!(
                    out[j].to_bits(),
                    want.to_bits(),
                    "start {start}, element {j}"
                );
            }
        }
    }
}
