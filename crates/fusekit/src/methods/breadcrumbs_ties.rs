//! `breadcrumbs_ties`: the breadcrumbs band (see `breadcrumbs`), then TIES sign election and
//! disjoint merge (arXiv:2312.06795, arXiv:2306.01708). Defaults: γ 0.01, density 1, normalize
//! false, rescale false, as mergekit.

use super::breadcrumbs::GAMMA;
use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct BreadcrumbsTies;

static SPEC: MethodSpec = MethodSpec {
    name: "breadcrumbs_ties",
    summary: "breadcrumbs band, then sign election and disjoint merge",
    reference: "https://arxiv.org/abs/2312.06795",
    params: gta_params!(false, false, GAMMA),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for BreadcrumbsTies {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::Outliers,
                consensus: true,
            },
            ctx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::breadcrumbs::tests::{band, inputs};
    use super::testing::*;
    use super::*;

    #[test]
    fn band_then_disjoint_merge() {
        let n = 30 * 4096;
        let x = inputs(n);
        let per = vec![
            vec![],
            vec![
                ("weight", Scalar::Number(1.0)),
                ("density", Scalar::Number(0.4)),
                ("gamma", Scalar::Number(0.02)),
            ],
            vec![
                ("weight", Scalar::Number(0.5)),
                ("density", Scalar::Number(0.4)),
                ("gamma", Scalar::Number(0.02)),
            ],
        ];
        let out = run(
            &BreadcrumbsTies,
            &x,
            Some(0),
            params(
                &[
                    ("normalize", Scalar::Bool(true)),
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
        let keeps = [band(&deltas[0], 0.4, 0.02), band(&deltas[1], 0.4, 0.02)];
        for i in 0..n {
            let d: Vec<f32> = [1.0f32, 0.5]
                .iter()
                .zip(&deltas)
                .zip(&keeps)
                .map(|((w, d), k)| if k[i] { d[i] * w } else { 0.0 })
                .collect();
            let sign = if d.iter().sum::<f32>() >= 0.0 {
                1.0
            } else {
                -1.0
            };
            let (mut num, mut den) = (0f32, 0f32);
            for (v, w) in d.iter().zip([1.0f32, 0.5]) {
                if *v != 0.0 && v.signum() == sign {
                    num += v;
                    den += w;
                }
            }
            let expected = x[0][i] + num / if den == 0.0 { 1.0 } else { den };
            assert!((out[i] - expected).abs() < 1e-6, "{i}");
        }
    }
}
