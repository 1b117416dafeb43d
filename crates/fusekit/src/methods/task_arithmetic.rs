//! `task_arithmetic`: add weighted task vectors to the base (Ilharco et al., ICLR 2023,
//! arXiv:2212.04089).
//!
//! out = base + λ · Σᵢ wᵢ (xᵢ − base)   (divided by Σᵢ wᵢ when `normalize`)
//!
//! Defaults as mergekit: normalize false, λ 1. The pipeline is in `gta`.

use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct TaskArithmetic;

static SPEC: MethodSpec = MethodSpec {
    name: "task_arithmetic",
    summary: "base plus the weighted sum of task vectors",
    reference: "https://arxiv.org/abs/2212.04089",
    params: gta_params!(false, false),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for TaskArithmetic {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::None,
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
    fn matches_plain_formula() {
        let base = data(9000, 1, 1.0);
        let ft: Vec<Vec<f32>> = (2..4)
            .map(|s| {
                base.iter()
                    .zip(data(9000, s, 0.01))
                    .map(|(b, d)| b + d)
                    .collect()
            })
            .collect();
        let inputs = vec![base.clone(), ft[0].clone(), ft[1].clone()];
        let per = vec![
            vec![],
            vec![("weight", Scalar::Number(0.7))],
            vec![("weight", Scalar::Number(-0.4))],
        ];
        for (normalize, lambda) in [(false, 1.0), (true, 0.5)] {
            let p = params(
                &[
                    ("normalize", Scalar::Bool(normalize)),
                    ("lambda", Scalar::Number(lambda)),
                ],
                per.clone(),
            );
            let out = run(&TaskArithmetic, &inputs, Some(0), p, 0);
            for i in 0..9000 {
                let tv = 0.7 * (ft[0][i] - base[i]) as f64 - 0.4 * (ft[1][i] - base[i]) as f64;
                let expected = base[i] as f64 + lambda * if normalize { tv / 0.3 } else { tv };
                assert!(
                    (out[i] as f64 - expected).abs() < 1e-6,
                    "{i}: {} vs {expected}",
                    out[i]
                );
            }
        }
    }
}
