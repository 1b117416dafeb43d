//! `breadcrumbs`: Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv:2312.06795) — drop the
//! smallest task-vector entries and the largest outliers, then task arithmetic.
//!
//! Per model and tensor (n elements): sorted by |δ| ascending, keep ranks [n_bot, n_bot + m) with
//! m = ⌊density·n⌋ and n_bot = max(0, n − m − ⌊γ·n⌋), i.e. drop the ⌊γ·n⌋ largest (fewer if the
//! density needs them) and everything below. mergekit 0.1.5 slices this way; 0.1.4 zeroed the
//! whole task vector when ⌊γ·n⌋ = 0, a bug not copied. Equal magnitudes at either edge are
//! ranked by index (as a stable descending sort would). Then out = base + λ·Σ wᵢ·δ̂ᵢ (÷ Σ wᵢ with
//! `normalize`). Defaults: γ 0.01, density 1, normalize false, rescale false. Pipeline in `gta`.

use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct Breadcrumbs;

/// γ, shared by both breadcrumbs variants.
pub(super) const GAMMA: ParamSpec = ParamSpec {
    name: "gamma",
    scope: Scope::NonBase,
    ty: ParamType::Fraction,
    default: Some(Default::Float(0.01)),
    doc: "fraction of the largest magnitudes removed as outliers",
};

static SPEC: MethodSpec = MethodSpec {
    name: "breadcrumbs",
    summary: "drop small and outlier task-vector entries, then task arithmetic",
    reference: "https://arxiv.org/abs/2312.06795",
    params: gta_params!(false, false, GAMMA),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for Breadcrumbs {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::Outliers,
                consensus: false,
            },
            ctx,
        )
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::testing::*;
    use super::*;

    /// The band, by a full sort: descending |δ|, equal magnitudes in index order (the order
    /// fusekit breaks ties in; torch's unstable sort breaks them arbitrarily).
    pub fn band(delta: &[f32], density: f64, gamma: f64) -> Vec<bool> {
        let n = delta.len();
        let target = (density * n as f64) as usize;
        let n_bot = n.saturating_sub(target + (gamma * n as f64) as usize);
        let dropped_top = n - n_bot - target;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| delta[b].abs().total_cmp(&delta[a].abs()).then(a.cmp(&b)));
        let mut keep = vec![false; n];
        for &i in &order[dropped_top..dropped_top + target] {
            keep[i] = true;
        }
        keep
    }

    pub fn inputs(n: usize) -> Vec<Vec<f32>> {
        let base = data(n, 1, 1.0);
        let mut all = vec![base.clone()];
        all.extend((2..4).map(|s| {
            base.iter()
                .zip(data(n, s, 0.01))
                .map(|(b, d)| b + d)
                .collect()
        }));
        all
    }

    #[test]
    fn matches_dense_reference() {
        // One exact sample, one sampled-window tensor; γ·n < 1 on the tiny one.
        for (n, gamma) in [(50, 0.01), (6000, 0.05), (40 * 4096 + 3, 0.01)] {
            let x = inputs(n);
            let per = vec![
                vec![],
                vec![
                    ("weight", Scalar::Number(0.6)),
                    ("density", Scalar::Number(0.3)),
                    ("gamma", Scalar::Number(gamma)),
                ],
                vec![
                    ("weight", Scalar::Number(0.9)),
                    ("density", Scalar::Number(0.5)),
                    ("gamma", Scalar::Number(gamma)),
                ],
            ];
            let out = run(
                &Breadcrumbs,
                &x,
                Some(0),
                params(
                    &[
                        ("normalize", Scalar::Bool(false)),
                        ("lambda", Scalar::Number(1.0)),
                        ("rescale", Scalar::Bool(false)),
                    ],
                    per,
                ),
                0,
            );
            let deltas: Vec<Vec<f32>> = x[1..]
                .iter()
                .map(|ft| ft.iter().zip(&x[0]).map(|(a, b)| a - b).collect())
                .collect();
            let keeps = [band(&deltas[0], 0.3, gamma), band(&deltas[1], 0.5, gamma)];
            assert!(
                keeps[0].iter().filter(|k| **k).count() == (0.3 * n as f64) as usize,
                "a small γ·n keeps the band instead of zeroing it"
            );
            for i in 0..n {
                let mixed = [0.6f32, 0.9]
                    .iter()
                    .zip(&deltas)
                    .zip(&keeps)
                    .fold(0f32, |s, ((w, d), k)| s + if k[i] { d[i] * w } else { 0.0 });
                assert!((out[i] - (x[0][i] + mixed)).abs() < 1e-6, "n={n} i={i}");
            }
        }
    }
}
