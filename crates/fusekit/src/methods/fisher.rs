//! `fisher`: Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted
//! Averaging", NeurIPS 2022, arXiv:2111.09832; reference code mmatena/model_merging).
//!
//! Every element is a mean of the models' values weighted by how much each model's predictions
//! depend on it, its diagonal Fisher Fᵢ (computed from data by `fusekit fisher`):
//!
//!   θ*(j) = Σᵢ λ'ᵢ F̃ᵢ(j) θᵢ(j) / Σᵢ λ'ᵢ F̃ᵢ(j)
//!
//! - `normalize` (default true): λ'ᵢ = λᵢ / ‖Fᵢ‖₂, the global L2 norm of model i's whole Fisher
//!   (a model-wide statistics pass), so models whose data gave larger gradients do not dominate.
//! - Floor (the reference's `favor_target_model`): F̃ = max(F, `floor`) for the target only (the
//!   base model if the config names one, else the first model), others unchanged. The divisor
//!   is then positive, and where no other model has any Fisher mass the target's value stays.
//!   (MergeLM and FusionBench add the floor to every model instead, which falls back to the
//!   plain λ-mean there.)
//!
//! Guards: a model whose whole Fisher is zero is refused under `normalize` (1/‖F‖ is undefined:
//! its data never reached the model); a divisor that is still zero (target weight 0) keeps the
//! target's value. Fishers are read in f32, never rounded to the compute dtype.

use super::*;
use crate::error::Error;
use std::collections::BTreeMap;

pub struct Fisher;

static SPEC: MethodSpec = MethodSpec {
    name: "fisher",
    summary: "average weighted by each model's diagonal Fisher (needs data: fisher per model)",
    reference: "https://arxiv.org/abs/2111.09832",
    params: &[
        ParamSpec {
            name: "weight",
            scope: Scope::PerInput,
            ty: ParamType::NonNegative,
            default: Some(Default::Float(1.0)),
            doc: "λ of each model",
        },
        ParamSpec {
            name: "normalize",
            scope: Scope::Global,
            ty: ParamType::Bool,
            default: Some(Default::Bool(true)),
            doc: "divide each λ by the global L2 norm of its model's Fisher",
        },
        ParamSpec {
            name: "floor",
            scope: Scope::Global,
            ty: ParamType::NonNegative,
            default: Some(Default::Float(1e-6)),
            doc: "lower bound of the target model's Fisher",
        },
    ],
    base: BasePolicy::Optional,
    min_inputs: 1,
    max_inputs: None,
};

/// ‖Fᵢ‖² of every model (by plan index), over every merged tensor.
#[derive(Default)]
struct FisherNorms {
    squared: BTreeMap<usize, f64>,
}

impl ModelStatistics for FisherNorms {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0
    }

    fn fork(&self) -> Box<dyn ModelStatistics> {
        Box::new(FisherNorms::default())
    }

    fn absorb(&mut self, part: Box<dyn ModelStatistics>) {
        let part = part.into_any().downcast::<FisherNorms>().expect("forked");
        for (model, s) in part.squared {
            *self.squared.entry(model).or_default() += s;
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn observe(&mut self, _pass: usize, ctx: &TensorContext, _start: usize, views: &[&[f32]]) {
        let fishers = &views[ctx.n_inputs..];
        for (i, f) in fishers.iter().enumerate() {
            let sum: f64 = f.iter().map(|&x| (x as f64) * (x as f64)).sum();
            *self.squared.entry(model_of(ctx, i)).or_default() += sum;
        }
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> std::sync::Arc<dyn std::any::Any + Send + Sync> {
        std::sync::Arc::new(self.squared)
    }
}

fn model_of(ctx: &TensorContext, input: usize) -> usize {
    ctx.models.get(input).copied().unwrap_or(input)
}

struct FisherMerger {
    /// λ'ᵢ per input.
    lambdas: Vec<f32>,
    target: usize,
    floor: f32,
}

impl Method for Fisher {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn companion(&self) -> Option<Companion> {
        Some(Companion::Fisher)
    }

    fn model_statistics(
        &self,
        tensors: &[TensorContext],
    ) -> Result<Option<Box<dyn ModelStatistics>>> {
        let normalize = tensors
            .first()
            .is_some_and(|t| t.params.flag("normalize").unwrap_or(true));
        Ok(normalize.then(|| Box::new(FisherNorms::default()) as Box<dyn ModelStatistics>))
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let norms = ctx
            .model_stats
            .and_then(|s| s.downcast_ref::<BTreeMap<usize, f64>>());
        let lambdas = (0..ctx.n_inputs)
            .map(|i| {
                let weight = ctx.params.input_float(i, "weight").unwrap_or(1.0);
                let Some(norms) = norms else {
                    return Ok(weight as f32);
                };
                let norm = norms.get(&model_of(ctx, i)).copied().unwrap_or(0.0).sqrt();
                if norm > 0.0 {
                    Ok((weight / norm) as f32)
                } else {
                    Err(Error::tensor(
                        ctx.name,
                        format!(
                            "fisher: the Fisher of input {i} is zero everywhere, so it cannot be \
                             normalized (was it computed on this model's data?)"
                        ),
                    ))
                }
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok(Box::new(FisherMerger {
            lambdas,
            target: ctx.base.unwrap_or(0),
            floor: ctx.params.float("floor").unwrap_or(1e-6) as f32,
        }))
    }
}

impl TensorMerger for FisherMerger {
    fn apply(&self, _start: usize, views: &[&[f32]], out: &mut [f32]) {
        let n = self.lambdas.len();
        let (thetas, fishers) = views.split_at(n);
        for (j, o) in out.iter_mut().enumerate() {
            let (mut num, mut den) = (0f32, 0f32);
            for i in 0..n {
                let f = if i == self.target {
                    fishers[i][j].max(self.floor)
                } else {
                    fishers[i][j]
                };
                let w = self.lambdas[i] * f;
                num += w * thetas[i][j];
                den += w;
            }
            *o = if den > 0.0 {
                num / den
            } else {
                thetas[self.target][j]
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// The formula on plain slices, with the norms given.
    fn reference(
        thetas: &[Vec<f32>],
        fishers: &[Vec<f32>],
        lambdas: &[f32],
        floor: f32,
    ) -> Vec<f32> {
        (0..thetas[0].len())
            .map(|j| {
                let mut num = 0f64;
                let mut den = 0f64;
                for i in 0..thetas.len() {
                    let f = if i == 0 {
                        fishers[i][j].max(floor)
                    } else {
                        fishers[i][j]
                    };
                    num += (lambdas[i] * f * thetas[i][j]) as f64;
                    den += (lambdas[i] * f) as f64;
                }
                if den > 0.0 {
                    (num / den) as f32
                } else {
                    thetas[0][j]
                }
            })
            .collect()
    }

    #[test]
    fn weights_each_element_by_its_fisher() {
        let n = 5000;
        let thetas: Vec<Vec<f32>> = (0..3).map(|s| data(n, s, 1.0)).collect();
        let mut fishers: Vec<Vec<f32>> = (0..3)
            .map(|s| data(n, 10 + s, 1.0).iter().map(|x| x * x).collect())
            .collect();
        // Where no model has Fisher mass the target (input 0) keeps its value.
        for f in fishers.iter_mut() {
            f[7] = 0.0;
        }
        let mut inputs = thetas.clone();
        inputs.extend(fishers.iter().cloned());
        let per = [0.5, 1.0, 2.0]
            .iter()
            .map(|&w| vec![("weight", Scalar::Number(w))])
            .collect();
        let p = params(
            &[
                ("normalize", Scalar::Bool(false)),
                ("floor", Scalar::Number(1e-6)),
            ],
            per,
        );
        let out = run_companions(&Fisher, &inputs, 3, None, p);
        let expected = reference(&thetas, &fishers, &[0.5, 1.0, 2.0], 1e-6);
        for j in 0..n {
            assert!(
                (out[j] - expected[j]).abs() <= 1e-5 * expected[j].abs().max(1.0),
                "{j}"
            );
        }
        assert_eq!(out[7], thetas[0][7]);
    }

    #[test]
    fn normalization_divides_by_each_models_global_fisher_norm() {
        let n = 3000;
        let thetas: Vec<Vec<f32>> = (0..2).map(|s| data(n, s, 1.0)).collect();
        let base: Vec<f32> = data(n, 9, 1.0).iter().map(|x| x * x).collect();
        // Model 1's Fisher is model 0's times 100: after normalization they weigh the same.
        let fishers = vec![
            base.clone(),
            base.iter().map(|x| x * 100.0).collect::<Vec<f32>>(),
        ];
        let mut inputs = thetas.clone();
        inputs.extend(fishers);
        let per = vec![vec![], vec![]];
        let out = run_companions(
            &Fisher,
            &inputs,
            2,
            None,
            params(&[("floor", Scalar::Number(0.0))], per),
        );
        for j in 0..n {
            let mean = (thetas[0][j] + thetas[1][j]) / 2.0;
            assert!((out[j] - mean).abs() <= 1e-5, "{j}: {} vs {mean}", out[j]);
        }
    }
}
