//! `multislerp`: barycentric interpolation on the hypersphere (Goddard,
//! goddard.blog/posts/multislerp-wow-what-a-cool-idea), as in mergekit.
//!
//! With vᵢ = xᵢ (or xᵢ − base when a base is given), normalised weights wᵢ and uᵢ = vᵢ/(‖vᵢ‖ + ε):
//! m = Σ wᵢuᵢ, m̂ = m/‖m‖; project onto the tangent space at m̂, tᵢ = uᵢ − (uᵢ·m̂)m̂, and take
//! t = Σ wᵢtᵢ; map back, r = cos‖t‖·m̂ + sin‖t‖/‖t‖·t (‖t‖ + ε); out = (Σ wᵢ‖vᵢ‖)·r (+ base).
//! A single model is returned as is; if ‖m‖ < ε two models fall back to Σ wᵢvᵢ, more are an error.
//!
//! Every vector above is a combination of the vᵢ, so one statistics pass computes their Gram
//! matrix (f64) and all the geometry runs on it; `apply` then forms Σ cᵢvᵢ element by element.

use super::*;
use crate::error::Error;
use crate::kernels::gram::{self, Span};

pub struct Multislerp;

static SPEC: MethodSpec = MethodSpec {
    name: "multislerp",
    summary: "spherical barycentre of several models (optionally around a base)",
    reference: "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    params: &[
        ParamSpec {
            name: "weight",
            scope: Scope::NonBase,
            ty: ParamType::Float,
            default: None,
            doc: "weight of each model",
        },
        ParamSpec {
            name: "normalize_weights",
            scope: Scope::Global,
            ty: ParamType::Bool,
            default: Some(Default::Bool(true)),
            doc: "divide the weights by their sum",
        },
        ParamSpec {
            name: "eps",
            scope: Scope::Global,
            ty: ParamType::NonNegative,
            default: Some(Default::Float(1e-8)),
            doc: "stabiliser of the norms",
        },
    ],
    base: BasePolicy::Optional,
    min_inputs: 1,
    max_inputs: None,
};

struct MultislerpMerger {
    name: String,
    base: Option<usize>,
    models: Vec<usize>,
    weights: Vec<f64>,
    eps: f64,
    /// Gram matrix of the vᵢ, row-major.
    gram: Vec<f64>,
    /// out = Σ cᵢvᵢ (+ base).
    coefficients: Vec<f64>,
}

impl Method for Multislerp {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let models: Vec<usize> = (0..ctx.n_inputs).filter(|&i| Some(i) != ctx.base).collect();
        let round = |x: f64| {
            ctx.compute
                .map_or(x as f32, |d| crate::kernels::convert::round_to(d, x as f32))
                as f64
        };
        let mut weights: Vec<f64> = models
            .iter()
            .map(|&i| round(ctx.params.input_float(i, "weight").unwrap_or(0.0)))
            .collect();
        if ctx.params.flag("normalize_weights").unwrap_or(true) {
            let sum = round(weights.iter().sum());
            if sum == 0.0 {
                return Err(Error::tensor(ctx.name, "multislerp: the weights sum to zero; set `normalize_weights: false` or change `weight`"));
            }
            weights.iter_mut().for_each(|w| *w = round(*w / sum));
        }
        let n = models.len();
        Ok(Box::new(MultislerpMerger {
            name: ctx.name.to_string(),
            base: ctx.base,
            coefficients: if n == 1 { vec![1.0] } else { Vec::new() },
            models,
            weights,
            eps: ctx.params.float("eps").unwrap_or(1e-8),
            gram: vec![0.0; n * n],
        }))
    }
}

impl MultislerpMerger {
    fn delta<'a>(&self, inputs: &[&'a [f32]], i: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let x = inputs[self.models[i]];
        match self.base {
            None => x,
            Some(b) => {
                scratch.clear();
                scratch.extend(x.iter().zip(inputs[b]).map(|(x, b)| x - b));
                scratch
            }
        }
    }

    /// The coefficients of the result over the vᵢ, from the Gram matrix.
    fn solve(&self) -> Result<Vec<f64>> {
        let n = self.models.len();
        let span = Span {
            n,
            gram: &self.gram,
        };
        let norms: Vec<f64> = (0..n).map(|i| span.norm_of(i)).collect();
        // Every model equal (to the base, or zero): nothing to interpolate. mergekit raises its
        // antipodal error here for three or more models; the answer is that common point.
        if norms.iter().all(|nm| *nm < self.eps) {
            return Ok(vec![0.0; n]);
        }
        // uᵢ = vᵢ/(‖vᵢ‖ + ε): coefficient unit[i] on vᵢ.
        let unit: Vec<f64> = norms.iter().map(|nm| 1.0 / (nm + self.eps)).collect();
        let mean: Vec<f64> = (0..n).map(|i| self.weights[i] * unit[i]).collect();
        let mean_norm = span.norm(&mean);
        if mean_norm < self.eps {
            if n == 2 {
                return Ok(self.weights.clone());
            }
            return Err(Error::tensor(&self.name, "multislerp: the weighted mean of the unit vectors is zero (antipodal models with balancing weights)"));
        }
        let m_hat: Vec<f64> = mean.iter().map(|c| c / mean_norm).collect();
        let weighted_dot: f64 = (0..n)
            .map(|i| {
                let mut u = vec![0.0; n];
                u[i] = unit[i];
                self.weights[i] * span.dot(&u, &m_hat)
            })
            .sum();
        let tangent: Vec<f64> = (0..n).map(|i| mean[i] - weighted_dot * m_hat[i]).collect();
        let tangent_norm = span.norm(&tangent) + self.eps;
        let scale: f64 = (0..n).map(|i| norms[i] * self.weights[i]).sum();
        Ok((0..n)
            .map(|i| {
                scale
                    * (m_hat[i] * tangent_norm.cos()
                        + tangent[i] * tangent_norm.sin() / tangent_norm)
            })
            .collect())
    }
}

impl TensorMerger for MultislerpMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0 && self.coefficients.is_empty()
    }

    fn observe(&mut self, _pass: usize, _start: usize, inputs: &[&[f32]]) {
        let mut scratch = Vec::new();
        let deltas: Vec<Vec<f32>> = (0..self.models.len())
            .map(|i| self.delta(inputs, i, &mut scratch).to_vec())
            .collect();
        let views: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
        gram::accumulate(&views, &mut self.gram);
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        self.coefficients = self.solve()?;
        Ok(())
    }

    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        if self.models.len() == 1 {
            // A single model is returned unchanged, base or not.
            out.copy_from_slice(inputs[self.models[0]]);
            return;
        }
        let mut scratch = Vec::new();
        out.fill(0.0);
        for (i, &c) in self.coefficients.iter().enumerate() {
            let v = self.delta(inputs, i, &mut scratch);
            out.iter_mut().zip(v).for_each(|(o, x)| *o += c as f32 * x);
        }
        if let Some(b) = self.base {
            out.iter_mut().zip(inputs[b]).for_each(|(o, x)| *o += x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// mergekit's algorithm on dense f64 vectors.
    fn reference(vs: &[Vec<f64>], w: &[f64], eps: f64) -> Vec<f64> {
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let n = vs[0].len();
        let norms: Vec<f64> = vs.iter().map(|v| norm(v)).collect();
        let units: Vec<Vec<f64>> = vs
            .iter()
            .zip(&norms)
            .map(|(v, nm)| v.iter().map(|x| x / (nm + eps)).collect())
            .collect();
        let mean: Vec<f64> = (0..n)
            .map(|j| units.iter().zip(w).map(|(u, w)| u[j] * w).sum())
            .collect();
        let mn = norm(&mean);
        let mean: Vec<f64> = mean.iter().map(|x| x / mn).collect();
        let tangents: Vec<Vec<f64>> = units
            .iter()
            .map(|u| {
                let d: f64 = u.iter().zip(&mean).map(|(a, b)| a * b).sum();
                u.iter().zip(&mean).map(|(a, b)| a - d * b).collect()
            })
            .collect();
        let t: Vec<f64> = (0..n)
            .map(|j| tangents.iter().zip(w).map(|(tv, w)| tv[j] * w).sum())
            .collect();
        let tn = norm(&t) + eps;
        let scale: f64 = norms.iter().zip(w).map(|(a, b)| a * b).sum();
        (0..n)
            .map(|j| scale * (mean[j] * tn.cos() + t[j] * tn.sin() / tn))
            .collect()
    }

    #[test]
    fn matches_dense_reference_with_and_without_base() {
        let n = 9000;
        let xs: Vec<Vec<f32>> = (1..4).map(|s| data(n, s, 1.0)).collect();
        let w = [0.5, 0.3, 0.2];
        let per: Vec<Vec<(&'static str, Scalar)>> = w
            .iter()
            .map(|&w| vec![("weight", Scalar::Number(w))])
            .collect();
        let p = params(
            &[
                ("normalize_weights", Scalar::Bool(true)),
                ("eps", Scalar::Number(1e-8)),
            ],
            per.clone(),
        );
        let out = run(&Multislerp, &xs, None, p, 0);
        let expected = reference(
            &xs.iter()
                .map(|v| v.iter().map(|x| *x as f64).collect())
                .collect::<Vec<_>>(),
            &w,
            1e-8,
        );
        for j in 0..n {
            assert!((out[j] as f64 - expected[j]).abs() < 1e-5, "{j}");
        }
        // Around a base: the same on the differences, base added back.
        let base = data(n, 7, 1.0);
        let mut with_base = vec![base.clone()];
        with_base.extend(xs.iter().map(|x| {
            x.iter()
                .zip(&base)
                .map(|(a, b)| a + b)
                .collect::<Vec<f32>>()
        }));
        let mut per_b = vec![vec![]];
        per_b.extend(per);
        let p = params(
            &[
                ("normalize_weights", Scalar::Bool(true)),
                ("eps", Scalar::Number(1e-8)),
            ],
            per_b,
        );
        let out = run(&Multislerp, &with_base, Some(0), p, 0);
        for j in 0..n {
            assert!(
                (out[j] as f64 - (expected[j] + base[j] as f64)).abs() < 1e-5,
                "{j}"
            );
        }
    }

    #[test]
    fn models_equal_to_the_base_give_the_base() {
        let base = data(50, 3, 1.0);
        let p = params(
            &[],
            vec![vec![]; 1]
                .into_iter()
                .chain(vec![vec![("weight", Scalar::Number(1.0))]; 3])
                .collect(),
        );
        let out = run(&Multislerp, &vec![base.clone(); 4], Some(0), p, 0);
        assert_eq!(out, base);
    }

    #[test]
    fn single_model_and_antipodal_pair() {
        let x = data(100, 1, 1.0);
        let p = params(&[], vec![vec![("weight", Scalar::Number(2.0))]]);
        assert_eq!(run(&Multislerp, std::slice::from_ref(&x), None, p, 0), x);
        let neg: Vec<f32> = x.iter().map(|v| -v).collect();
        let p = params(
            &[
                ("normalize_weights", Scalar::Bool(true)),
                ("eps", Scalar::Number(1e-8)),
            ],
            vec![vec![("weight", Scalar::Number(1.0))]; 2],
        );
        let out = run(&Multislerp, &[x.clone(), neg], None, p, 0);
        assert!(
            out.iter().all(|v| v.abs() < 1e-6),
            "antipodal pair falls back to the weighted sum"
        );
    }
}
