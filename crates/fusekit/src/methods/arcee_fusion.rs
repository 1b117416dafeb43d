//! `arcee_fusion`: keep the fine-tune's changes that matter most (Arcee AI, as in mergekit).
//!
//! With b the base and p the other model, per element i of row r (the last dimension; a 1-D
//! tensor is one row):
//! importanceᵢ = |pᵢ − bᵢ| · KLᵣ, KLᵣ = Σⱼ p̂ⱼ·ln(p̂ⱼ / q̂ⱼ), p̂ = softmax(pᵣ) + 1e-8,
//! q̂ = softmax(bᵣ) + 1e-8; threshold = Q₀.₅ + 1.5·(Q₀.₇₅ − Q₀.₂₅) of all importances, with
//! Q_q the value of sorted rank ⌊q·(n − 1)⌋; out = b + (p − b)·[importance ≥ threshold].
//!
//! Better than mergekit: the quantiles are exact over the whole tensor (mergekit samples 10⁶
//! elements without a seed beyond that size), and the output has the requested dtype (mergekit's
//! float32 mask promotes every output to float32, issue #604). KL sums run in f64, in eight
//! fixed lanes with polynomial `exp` and `ln` (a few ulp of libm's, `kernels::math`). Passes: the
//! row KLs, then two counting passes for the exact quantiles (`kernels::quantile`).

use super::*;
use crate::error::Error;
use crate::kernels::math;
use crate::kernels::quantile::RadixSelect;
use crate::kernels::rows::{row_length, row_segments, RowBuffer};
use multiversion::multiversion;

pub struct ArceeFusion;

static SPEC: MethodSpec = MethodSpec {
    name: "arcee_fusion",
    summary: "keep the changes whose magnitude times row KL divergence is an outlier",
    reference: "https://arcee.ai",
    params: &[],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: Some(2),
};

/// Added to both softmax distributions before the KL divergence, as mergekit does.
const PROBABILITY_FLOOR: f64 = 1e-8;
const QUANTILES: [f64; 3] = [0.25, 0.5, 0.75];

struct ArceeFusionMerger {
    base: usize,
    other: usize,
    row_len: usize,
    /// Pass 0 reassembles rows; then the KL of every row.
    rows: Option<RowBuffer>,
    kl: Vec<f32>,
    /// Scratch for one row's softmax exponentials of each model, reused from row to row.
    terms: [Vec<f64>; 2],
    select: RadixSelect,
    threshold: f32,
}

impl Method for ArceeFusion {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "arcee_fusion needs `base_model`"))?;
        let row_len = row_length(ctx.shape, ctx.numel);
        let n = ctx.numel as u64;
        let ranks: Vec<u64> = QUANTILES
            .iter()
            .map(|&q| RadixSelect::rank_of(q, n))
            .collect();
        Ok(Box::new(ArceeFusionMerger {
            base,
            other: 1 - base,
            row_len,
            rows: Some(RowBuffer::new(row_len, 2)),
            kl: Vec::with_capacity(ctx.numel.div_ceil(row_len)),
            terms: [Vec::with_capacity(row_len), Vec::with_capacity(row_len)],
            select: RadixSelect::new(&ranks),
            threshold: f32::INFINITY,
        }))
    }
}

/// KL(softmax(p) + floor ‖ softmax(q) + floor) of one row, in f64. Each exponential is taken
/// once, into `terms`, with the branch-free `exp` and `ln` of `kernels::math` and sums in eight
/// fixed lanes, so the loops vectorise and the result is the same on every CPU.
#[multiversion(targets("x86_64+avx512f+avx512dq+avx512vl", "x86_64+avx2+fma"))]
fn row_kl(p: &[f32], q: &[f32], terms: &mut [Vec<f64>; 2]) -> f32 {
    let softmax_terms = |x: &[f32], terms: &mut Vec<f64>| {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        terms.clear();
        terms.extend(x.iter().map(|&v| math::exp_f64(v as f64 - max)));
        sum_in_lanes(terms)
    };
    let [p_terms, q_terms] = terms;
    let (psum, qsum) = (softmax_terms(p, p_terms), softmax_terms(q, q_terms));
    for (a, &b) in p_terms.iter_mut().zip(q_terms.iter()) {
        let pa = *a / psum + PROBABILITY_FLOOR;
        let qb = b / qsum + PROBABILITY_FLOOR;
        *a = pa * math::ln_f64(pa / qb);
    }
    // Gibbs: never negative but for rounding; the quantile search needs non-negative values.
    sum_in_lanes(p_terms).max(0.0) as f32
}

/// Σ xs as eight interleaved partial sums added pairwise: one fixed order of additions.
#[inline(always)]
fn sum_in_lanes(xs: &[f64]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    for (lane, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane += x;
    }
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    let [a, b, c, d, e, f, g, h] = lanes;
    ((a + e) + (c + g)) + ((b + f) + (d + h))
}

impl ArceeFusionMerger {
    /// The importances of one block into `out`, a row's stretch at a time.
    fn importance(&self, start: usize, p: &[f32], b: &[f32], out: &mut [f32]) {
        for (row, range) in row_segments(start, out.len(), self.row_len) {
            let kl = self.kl[row];
            let (p, b) = (&p[range.clone()], &b[range.clone()]);
            for ((o, &x), &y) in out[range].iter_mut().zip(p).zip(b) {
                *o = (x - y).abs() * kl;
            }
        }
    }
}

impl TensorMerger for ArceeFusionMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass < 3
    }

    fn observe(&mut self, pass: usize, start: usize, inputs: &[&[f32]]) {
        let (p, b) = (inputs[self.other], inputs[self.base]);
        if pass == 0 {
            let rows = self.rows.as_mut().expect("pass 0 runs once");
            let (kl, terms) = (&mut self.kl, &mut self.terms);
            rows.push(&[p, b], |_, row| kl.push(row_kl(row[0], row[1], terms)));
            return;
        }
        crate::kernels::with_scratch(p.len(), |importance| {
            self.importance(start, p, b, importance);
            self.select.observe(importance);
        });
    }

    fn end_pass(&mut self, pass: usize) -> Result<()> {
        if pass == 0 {
            self.rows = None;
            return Ok(());
        }
        self.select.end_pass();
        if let Some([q1, median, q3]) = self.select.result().map(|r| [r[0], r[1], r[2]]) {
            self.threshold = median + 1.5 * (q3 - q1);
        }
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let (p, b) = (inputs[self.other], inputs[self.base]);
        self.importance(start, p, b, out);
        for ((o, &x), &y) in out.iter_mut().zip(p).zip(b) {
            *o = if *o >= self.threshold { x } else { y };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// Arcee Fusion written out densely: sorted quantiles over every importance.
    fn reference(b: &[f32], p: &[f32], row_len: usize) -> Vec<f32> {
        let mut importance = Vec::new();
        for (pr, br) in p.chunks(row_len).zip(b.chunks(row_len)) {
            let softmax = |x: &[f32]| {
                let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(|v| v / s + 1e-8).collect::<Vec<_>>()
            };
            let (ps, qs) = (softmax(pr), softmax(br));
            let kl: f64 = ps.iter().zip(&qs).map(|(a, c)| a * (a / c).ln()).sum();
            importance.extend(pr.iter().zip(br).map(|(x, y)| (x - y).abs() * kl as f32));
        }
        let mut sorted = importance.clone();
        sorted.sort_by(f32::total_cmp);
        let q = |f: f64| sorted[(f * (sorted.len() - 1) as f64) as usize];
        let threshold = q(0.5) + 1.5 * (q(0.75) - q(0.25));
        importance
            .iter()
            .zip(p.iter().zip(b))
            .map(|(i, (x, y))| if *i >= threshold { *x } else { *y })
            .collect()
    }

    #[test]
    fn matches_dense_reference() {
        // Rows inside blocks, rows across blocks, one 1-D row.
        for shape in [vec![40, 64], vec![3, 5000], vec![777]] {
            let n: usize = shape.iter().product();
            let b = data(n, 1, 1.0);
            // Changes of varied size, a few rows far more changed than others.
            let p: Vec<f32> = b
                .iter()
                .zip(data(n, 2, 0.05))
                .enumerate()
                .map(|(i, (x, d))| x + d * if (i / 64) % 7 == 0 { 20.0 } else { 1.0 })
                .collect();
            let row_len = *shape.last().unwrap();
            let want = reference(&b, &p, row_len);
            let keys = [0u64; 2];
            let params = ResolvedParams::default();
            let out = run_ctx(
                &ArceeFusion,
                &[b.clone(), p.clone()],
                &context("t", &shape, &params, &keys),
            );
            assert_eq!(out, want, "{shape:?}");
            let kept = out.iter().zip(&b).filter(|(o, x)| o != x).count();
            assert!(kept > 0 && kept < n / 2, "{shape:?}: {kept} of {n} kept");
        }
    }

    #[test]
    fn identical_models_give_the_base() {
        let b = data(300, 1, 1.0);
        let out = run(
            &ArceeFusion,
            &[b.clone(), b.clone()],
            Some(0),
            params(&[], vec![vec![], vec![]]),
            0,
        );
        assert_eq!(out, b);
    }
}
