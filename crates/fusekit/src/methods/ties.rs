//! `ties`: TIES-Merging — trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023,
//! arXiv:2306.01708).
//!
//! Trim keeps the top-k |δᵢ| of each task vector per tensor (k = max(1, ⌊density·n⌋), mergekit's
//! per-tensor variant; the exact k-th magnitude without sorting, `kernels::select`, ties at the
//! threshold kept in index order).
//! The sign of each element is elected from the sum of weighted trimmed deltas (a zero sum counts
//! as +), and only deltas agreeing with it are averaged: out = base + λ·Σ kept wᵢδᵢ / Σ kept wᵢ.
//! Defaults as mergekit: normalize true, density 1, λ 1. With `global_topk: true` the trim is the
//! reference code's instead: each model keeps the top `density` of its whole task vector
//! (`global_topk`).

use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct Ties;

static SPEC: MethodSpec = MethodSpec {
    name: "ties",
    summary: "trimmed task vectors, sign election, disjoint mean",
    reference: "https://arxiv.org/abs/2306.01708",
    params: gta_params!(true, false, super::global_topk::GLOBAL_TOPK),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for Ties {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::Magnitude,
                consensus: true,
            },
            ctx,
        )
    }

    fn model_statistics(
        &self,
        tensors: &[TensorContext],
    ) -> Result<Option<Box<dyn ModelStatistics>>> {
        super::global_topk::statistics(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// TIES written out densely: full sort for the trim, then election and disjoint mean.
    fn reference(base: &[f32], fts: &[Vec<f32>], weights: &[f32], density: f64) -> Vec<f32> {
        let n = base.len();
        let trimmed: Vec<Vec<f32>> = fts
            .iter()
            .map(|ft| {
                let delta: Vec<f32> = ft.iter().zip(base).map(|(x, b)| x - b).collect();
                let k = ((density * n as f64) as usize).max(1);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| delta[b].abs().total_cmp(&delta[a].abs()).then(a.cmp(&b)));
                let mut out = vec![0f32; n];
                for &i in &order[..k] {
                    out[i] = delta[i];
                }
                out
            })
            .collect();
        (0..n)
            .map(|i| {
                let d: Vec<f32> = trimmed.iter().zip(weights).map(|(t, w)| t[i] * w).collect();
                let sign = if d.iter().sum::<f32>() >= 0.0 {
                    1.0
                } else {
                    -1.0
                };
                let (mut num, mut den) = (0f32, 0f32);
                for (x, w) in d.iter().zip(weights) {
                    if *x != 0.0 && x.signum() == sign {
                        num += x;
                        den += w;
                    }
                }
                base[i] + num / if den == 0.0 { 1.0 } else { den }
            })
            .collect()
    }

    #[test]
    fn matches_dense_reference_with_ties_at_threshold() {
        // Small enough for an exact sample, and large enough for the sampled window.
        for n in [3 * 4096 + 17, 80 * 4096 + 5] {
            check_against_reference(n);
        }
    }

    fn check_against_reference(n: usize) {
        let base = data(n, 1, 1.0);
        // Quantised deltas create many equal magnitudes, so tie breaking is exercised.
        let fts: Vec<Vec<f32>> = (2..5)
            .map(|s| {
                base.iter()
                    .zip(data(n, s, 8.0))
                    .map(|(b, d)| b + d.round() / 256.0)
                    .collect()
            })
            .collect();
        let weights = [1.0f32, 0.5, 0.8];
        let mut inputs = vec![base.clone()];
        inputs.extend(fts.iter().cloned());
        for density in [0.2, 0.5, 1.0] {
            let mut per = vec![vec![]];
            per.extend(weights.iter().map(|&w| {
                vec![
                    ("weight", Scalar::Number(w as f64)),
                    ("density", Scalar::Number(density)),
                ]
            }));
            let out = run(
                &Ties,
                &inputs,
                Some(0),
                params(&[("normalize", Scalar::Bool(true))], per),
                0,
            );
            let expected = reference(&base, &fts, &weights, density);
            for i in 0..n {
                assert!(
                    (out[i] - expected[i]).abs() <= 1e-6,
                    "density {density} i {i}: {} vs {}",
                    out[i],
                    expected[i]
                );
            }
        }
    }
}
