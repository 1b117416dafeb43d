//! `linear`: a weighted average of the inputs (model soups, Wortsman et al. 2022,
//! arXiv:2203.05482).
//!
//! out = Σᵢ wᵢ·xᵢ / Σᵢ wᵢ   (without `normalize`: out = Σᵢ wᵢ·xᵢ)
//!
//! As in mergekit 0.1.5 the sum is accumulated in f32 in input order. A zero weight sum under
//! `normalize` is an error here, where mergekit writes inf/NaN.

use super::*;
use crate::error::Error;

pub struct Linear;

static SPEC: MethodSpec = MethodSpec {
    name: "linear",
    summary: "weighted average of the models",
    reference: "https://arxiv.org/abs/2203.05482",
    params: &[
        ParamSpec {
            name: "weight",
            scope: Scope::PerInput,
            ty: ParamType::Float,
            default: None,
            doc: "weight of each model",
        },
        ParamSpec {
            name: "normalize",
            scope: Scope::Global,
            ty: ParamType::Bool,
            default: Some(Default::Bool(true)),
            doc: "divide by the sum of the weights",
        },
    ],
    base: BasePolicy::Unused,
    min_inputs: 1,
    max_inputs: None,
};

struct LinearMerger {
    weights: Vec<f32>,
    divisor: f32,
}

impl Method for Linear {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let weights: Vec<f32> = (0..ctx.n_inputs)
            .map(|i| ctx.params.input_float(i, "weight").unwrap_or(0.0) as f32)
            .collect();
        let divisor = if ctx.params.flag("normalize").unwrap_or(true) {
            let sum: f32 = weights.iter().sum();
            if sum == 0.0 {
                return Err(Error::tensor(
                    ctx.name,
                    "linear: the weights sum to zero; set `normalize: false` or change `weight`",
                ));
            }
            sum
        } else {
            1.0
        };
        Ok(Box::new(LinearMerger { weights, divisor }))
    }
}

impl TensorMerger for LinearMerger {
    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        out.fill(0.0);
        for (x, &w) in inputs.iter().zip(&self.weights) {
            crate::kernels::fused_axpy(out, x, w);
        }
        if self.divisor != 1.0 {
            out.iter_mut().for_each(|o| *o /= self.divisor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn matches_weighted_average() {
        let xs: Vec<Vec<f32>> = (0..3).map(|s| data(10_000, s, 1.0)).collect();
        let w = [0.2, 0.5, 0.7];
        let per = w
            .iter()
            .map(|&w| vec![("weight", Scalar::Number(w))])
            .collect();
        let out = run(&Linear, &xs, None, params(&[], per), 0);
        for i in 0..10_000 {
            let expected =
                (xs[0][i] as f64 * 0.2 + xs[1][i] as f64 * 0.5 + xs[2][i] as f64 * 0.7) / 1.4;
            assert!((out[i] as f64 - expected).abs() < 1e-6, "{i}");
        }
        let per = w
            .iter()
            .map(|&w| vec![("weight", Scalar::Number(w))])
            .collect();
        let raw = run(
            &Linear,
            &xs,
            None,
            params(&[("normalize", Scalar::Bool(false))], per),
            0,
        );
        assert!(
            (raw[5] as f64
                - (xs[0][5] as f64 * 0.2 + xs[1][5] as f64 * 0.5 + xs[2][5] as f64 * 0.7))
                .abs()
                < 1e-6
        );
    }

    #[test]
    fn zero_weight_sum_is_an_error() {
        let p = params(
            &[],
            vec![
                vec![("weight", Scalar::Number(1.0))],
                vec![("weight", Scalar::Number(-1.0))],
            ],
        );
        let ctx = TensorContext {
            name: "w",
            numel: 4,
            shape: &[4],
            n_inputs: 2,
            base: None,
            params: &p,
            rng_keys: &[0, 0],
            compute: None,
            memory: 1 << 30,
            models: &[],
            model_stats: None,
        };
        let err = Linear.merger(&ctx).err().unwrap().to_string();
        assert!(err.contains("`w`") && err.contains("sum to zero"), "{err}");
    }
}
