//! `della`: DELLA-Merging (Deep et al., arXiv:2406.11617) — MagPrune, then TIES sign election and
//! disjoint merge, as mergekit does it.
//!
//! MagPrune, per model and row (the last dimension; a 1-D tensor is one row): rank |δᵢ| within
//! the row (r = 0 for the smallest … m − 1; equal magnitudes share their mean rank), keep each
//! element independently with probability pᵣ = density − ε + 2ε·r/(m − 1) (sampled without
//! ranking, by comparison with a random partner: `kernels::magprune`), then (with `rescale`)
//! restore ‖δᵢ‖₁ over the whole tensor — mergekit's L1 match rather than the paper's
//! per-element 1/pᵣ. Then the GTA pipeline with sign consensus (`gta`). density ± ε must lie inside (0, 1); density ≥ 1 keeps everything and
//! density 0 nothing. Defaults: density 1, ε 0.15, normalize true, rescale true, λ 1.

use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct Della;

/// ε, shared by both DELLA variants.
pub(super) const EPSILON: ParamSpec = ParamSpec {
    name: "epsilon",
    scope: Scope::NonBase,
    ty: ParamType::Fraction,
    default: Some(Default::Float(0.15)),
    doc: "half-width of the keep probabilities around density",
};

static SPEC: MethodSpec = MethodSpec {
    name: "della",
    summary: "rank-based random drop and rescale, sign election, disjoint merge",
    reference: "https://arxiv.org/abs/2406.11617",
    params: gta_params!(true, true, EPSILON),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for Della {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::RankedRandom,
                consensus: true,
            },
            ctx,
        )
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::testing::*;
    use super::*;

    /// MagPrune by the kernel's rule applied element by element (its own tests check the rule
    /// against the mid-rank probabilities), then the L1 rescale.
    pub fn magprune(delta: &[f32], row_len: usize, density: f64, eps: f64, key: u64) -> Vec<f32> {
        let mask = crate::kernels::magprune::scalar_mask(delta, row_len, density, eps, key);
        let out: Vec<f32> = delta
            .iter()
            .zip(mask)
            .map(|(&d, keep)| if keep { d } else { 0.0 })
            .collect();
        let before: f64 = delta.iter().map(|d| d.abs() as f64).sum();
        let after: f64 = out.iter().map(|d| d.abs() as f64).sum();
        let scale = if before < 1e-7 || after < 1e-7 {
            1.0
        } else {
            (before / after) as f32
        };
        out.iter().map(|d| d * scale).collect()
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

    /// Runs `method` on a `rows × row_len` tensor with weights 0.7 / 0.5, densities 0.4 / 0.6
    /// and ε 0.1; returns the inputs, the output and the pruned deltas by the formula.
    pub fn run_pruned(
        method: &dyn Method,
        rows: usize,
        row_len: usize,
    ) -> (Vec<Vec<f32>>, Vec<f32>, Vec<Vec<f32>>) {
        let n = rows * row_len;
        let x = inputs(n);
        let per = |w: f64, d: f64| {
            vec![
                ("weight", Scalar::Number(w)),
                ("density", Scalar::Number(d)),
                ("epsilon", Scalar::Number(0.1)),
            ]
        };
        let p = params(&[], vec![vec![], per(0.7, 0.4), per(0.5, 0.6)]);
        let keys: Vec<u64> = (0..3).map(|i| crate::rng::stream_key(5, "t", i)).collect();
        let spec = method.spec();
        let mut global = p.global.clone();
        for param in spec.params.iter().filter(|p| p.scope == Scope::Global) {
            if let Some(Default::Bool(b)) = param.default {
                global.entry(param.name).or_insert(Scalar::Bool(b));
            }
        }
        let p = ResolvedParams { global, ..p };
        let shape = [rows, row_len];
        let out = run_ctx(method, &x, &context("t", &shape, &p, &keys));
        let pruned = [(1, 0.4), (2, 0.6)]
            .iter()
            .map(|&(i, d)| {
                let delta: Vec<f32> = x[i].iter().zip(&x[0]).map(|(a, b)| a - b).collect();
                magprune(&delta, row_len, d, 0.1, keys[i])
            })
            .collect();
        (x, out, pruned)
    }

    #[test]
    fn matches_dense_reference() {
        // Rows inside one block, rows across blocks.
        for (rows, row_len) in [(30, 50), (3, 5000)] {
            let (x, out, pruned) = run_pruned(&Della, rows, row_len);
            for i in 0..rows * row_len {
                let d = [0.7f32 * pruned[0][i], 0.5 * pruned[1][i]];
                let sign = if d[0] + d[1] >= 0.0 { 1.0 } else { -1.0 };
                let (mut mixed, mut divisor) = (0f32, 0f32);
                for (v, w) in d.iter().zip([0.7f32, 0.5]) {
                    if *v != 0.0 && v.signum() == sign {
                        mixed += v;
                        divisor += w;
                    }
                }
                let want = x[0][i] + mixed / if divisor == 0.0 { 1.0 } else { divisor };
                assert!((out[i] - want).abs() < 1e-6, "{i}: {} vs {want}", out[i]);
            }
        }
    }

    #[test]
    fn refuses_epsilon_outside_density() {
        let n = 10;
        let per = vec![
            vec![],
            vec![
                ("weight", Scalar::Number(1.0)),
                ("density", Scalar::Number(0.1)),
                ("epsilon", Scalar::Number(0.15)),
            ],
            vec![("weight", Scalar::Number(1.0))],
        ];
        let p = params(&[], per);
        let keys = [0u64; 3];
        let err = Della
            .merger(&context("w", &[n], &p, &keys))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("epsilon") && err.contains("`w`"), "{err}");
    }

    #[test]
    fn refuses_rows_past_the_partner_draws_range() {
        // A 1-D tensor is one row; partners are drawn from 32 bits (no data is read).
        let per = vec![
            vec![],
            vec![
                ("weight", Scalar::Number(1.0)),
                ("density", Scalar::Number(0.5)),
            ],
        ];
        let p = params(&[], per);
        let keys = [0u64; 2];
        let err = Della
            .merger(&context("w", &[(1 << 32) + 1], &p, &keys))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("2³²") && err.contains("`w`"), "{err}");
    }
}
