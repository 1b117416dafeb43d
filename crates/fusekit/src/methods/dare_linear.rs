//! `dare_linear`: DARE's random drop with L1 rescale, then task arithmetic
//! (Yu et al., ICML 2024, arXiv:2311.03099).
//!
//! out = base + λ·Σᵢ wᵢ·δ̂ᵢ (÷ Σᵢ wᵢ with `normalize`), δ̂ᵢ = mask ⊙ δᵢ · ‖δᵢ‖₁/‖mask ⊙ δᵢ‖₁.
//! Defaults: normalize false, rescale true. Masks as in `dare_ties`.

use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct DareLinear;

static SPEC: MethodSpec = MethodSpec {
    name: "dare_linear",
    summary: "random drop and rescale, then task arithmetic",
    reference: "https://arxiv.org/abs/2311.03099",
    params: gta_params!(false, true),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for DareLinear {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::Random,
                consensus: false,
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
    fn rescale_preserves_l1_and_keep_rate() {
        let n = 40_000;
        let base = data(n, 1, 1.0);
        let ft: Vec<f32> = base
            .iter()
            .zip(data(n, 2, 0.01))
            .map(|(b, d)| b + d)
            .collect();
        let per = |rescale| {
            (
                vec![
                    vec![],
                    vec![
                        ("weight", Scalar::Number(1.0)),
                        ("density", Scalar::Number(0.25)),
                    ],
                ],
                rescale,
            )
        };
        let (p, _) = per(true);
        let out = run(
            &DareLinear,
            &[base.clone(), ft.clone()],
            Some(0),
            params(&[("rescale", Scalar::Bool(true))], p),
            7,
        );
        let l1 = |v: &[f32]| {
            v.iter()
                .zip(&base)
                .map(|(x, b)| (x - b).abs() as f64)
                .sum::<f64>()
        };
        let kept = out.iter().zip(&base).filter(|(o, b)| o != b).count() as f64 / n as f64;
        assert!((kept - 0.25).abs() < 0.01, "{kept}");
        assert!((l1(&out) / l1(&ft) - 1.0).abs() < 1e-3);
        // Without rescale survivors keep their value: out − base equals δ where kept.
        let (p, _) = per(false);
        let plain = run(
            &DareLinear,
            &[base.clone(), ft.clone()],
            Some(0),
            params(&[("rescale", Scalar::Bool(false))], p),
            7,
        );
        for i in 0..n {
            assert!(plain[i] == base[i] || plain[i] == base[i] + (ft[i] - base[i]));
            assert_eq!(
                plain[i] != base[i],
                out[i] != base[i],
                "same mask with and without rescale"
            );
        }
    }
}
