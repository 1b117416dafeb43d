//! `dare_ties`: DARE's random drop with L1 rescale, then TIES sign election and disjoint merge
//! (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv:2311.03099).
//!
//! Each element of δᵢ survives with probability `density`; survivors are scaled so ‖δ̂ᵢ‖₁ = ‖δᵢ‖₁
//! (mergekit's rescale, equal to 1/density in expectation). This is mergekit's semantics: DARE
//! replaces the TIES trim rather than preceding it. Defaults: normalize false, rescale true.
//! The mask of element j of model i is `Draws(key(seed, tensor, i)).bits(j) < density·2³²`.

use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct DareTies;

static SPEC: MethodSpec = MethodSpec {
    name: "dare_ties",
    summary: "random drop and rescale, sign election, disjoint merge",
    reference: "https://arxiv.org/abs/2311.03099",
    params: gta_params!(false, true),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for DareTies {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::Random,
                consensus: true,
            },
            ctx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn keeps_density_and_signs_agree() {
        let n = 50_000;
        let base = data(n, 1, 1.0);
        let a: Vec<f32> = base
            .iter()
            .zip(data(n, 2, 0.01))
            .map(|(b, d)| b + d)
            .collect();
        let b: Vec<f32> = base
            .iter()
            .zip(data(n, 3, 0.01))
            .map(|(b, d)| b + d)
            .collect();
        let per = vec![
            vec![],
            vec![
                ("weight", Scalar::Number(1.0)),
                ("density", Scalar::Number(0.3)),
            ],
            vec![
                ("weight", Scalar::Number(1.0)),
                ("density", Scalar::Number(0.3)),
            ],
        ];
        let out = run(
            &DareTies,
            &[base.clone(), a.clone(), b.clone()],
            Some(0),
            params(&[("rescale", Scalar::Bool(true))], per.clone()),
            42,
        );
        let changed = out.iter().zip(&base).filter(|(o, b)| o != b).count() as f64 / n as f64;
        // An element changes if either model keeps it: 1 − 0.7² = 0.51.
        assert!((changed - 0.51).abs() < 0.01, "{changed}");
        for i in 0..n {
            let d = out[i] - base[i];
            let (da, db) = (a[i] - base[i], b[i] - base[i]);
            // The merged delta is a (rescaled) kept delta, or the sum of two that agree in sign.
            if d != 0.0 && da.signum() != db.signum() {
                assert!(d.signum() == da.signum() || d.signum() == db.signum());
            }
        }
        let again = run(
            &DareTies,
            &[base.clone(), a.clone(), b.clone()],
            Some(0),
            params(&[("rescale", Scalar::Bool(true))], per.clone()),
            42,
        );
        assert_eq!(out, again, "the same seed gives the same bits");
        let other = run(
            &DareTies,
            &[base, a, b],
            Some(0),
            params(&[("rescale", Scalar::Bool(true))], per),
            43,
        );
        assert_ne!(out, other);
    }
}
