//! `karcher`: the Karcher (Riemannian) mean on the unit hypersphere (arXiv:2603.04972), as in
//! mergekit. Every input counts equally (αᵢ = 1/N); a base model is just another input.
//!
//! uᵢ = xᵢ/‖xᵢ‖ for the inputs with ‖xᵢ‖ > tol (weights renormalised over them); start from the
//! normalised weighted mean (or the first unit vector if that mean is shorter than tol); then up to
//! `max_iter` times: T = Σᵢ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·u) over θᵢ = acos(u·uᵢ) ≥ tol, stop when
//! ‖T‖ < tol, else u ← cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised. out = (Σᵢ αᵢ‖xᵢ‖)·u over all inputs.
//!
//! Every vector is a combination of the inputs, so the iteration runs on their f64 Gram matrix
//! from one statistics pass; `apply` forms Σ cᵢxᵢ element by element.

use super::*;
use crate::kernels::gram::{self, Span};

pub struct Karcher;

static SPEC: MethodSpec = MethodSpec {
    name: "karcher",
    summary: "Riemannian mean of the models on the hypersphere",
    reference: "https://arxiv.org/abs/2603.04972",
    params: &[
        ParamSpec {
            name: "max_iter",
            scope: Scope::Global,
            ty: ParamType::Count,
            default: Some(Default::Float(10.0)),
            doc: "iterations at most",
        },
        ParamSpec {
            name: "tol",
            scope: Scope::Global,
            ty: ParamType::NonNegative,
            default: Some(Default::Float(1e-5)),
            doc: "convergence and zero-norm tolerance",
        },
    ],
    base: BasePolicy::Optional,
    min_inputs: 1,
    max_inputs: None,
};

struct KarcherMerger {
    n: usize,
    max_iter: usize,
    tol: f64,
    gram: Vec<f64>,
    coefficients: Vec<f64>,
}

impl Method for Karcher {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let n = ctx.n_inputs;
        Ok(Box::new(KarcherMerger {
            n,
            max_iter: ctx.params.float("max_iter").unwrap_or(10.0).max(0.0) as usize,
            tol: ctx.params.float("tol").unwrap_or(1e-5),
            gram: vec![0.0; n * n],
            coefficients: if n == 1 { vec![1.0] } else { Vec::new() },
        }))
    }
}

impl KarcherMerger {
    fn solve(&self) -> Vec<f64> {
        let (n, tol) = (self.n, self.tol);
        let span = Span {
            n,
            gram: &self.gram,
        };
        let norms: Vec<f64> = (0..n)
            .map(|i| self.gram[i * n + i].max(0.0).sqrt())
            .collect();
        let unit = |i: usize| -> Vec<f64> {
            let mut e = vec![0.0; n];
            if norms[i] > 0.0 {
                e[i] = 1.0 / norms[i];
            }
            e
        };
        let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
        if valid.is_empty() {
            return vec![0.0; n];
        }
        let alpha = 1.0 / valid.len() as f64;
        let mut mean = vec![0.0; n];
        for &i in &valid {
            mean[i] += alpha / norms[i];
        }
        let mean_norm = span.norm(&mean);
        let mut u = if mean_norm < tol {
            unit(valid[0])
        } else {
            mean.iter().map(|c| c / mean_norm).collect()
        };
        for _ in 0..self.max_iter {
            let mut tangent = vec![0.0; n];
            for &i in &valid {
                let ui = unit(i);
                let dot = span.dot(&u, &ui).clamp(-1.0, 1.0);
                let theta = dot.acos();
                if theta < tol {
                    continue;
                }
                let f = alpha * theta / theta.sin();
                for k in 0..n {
                    tangent[k] += f * (ui[k] - dot * u[k]);
                }
            }
            let tn = span.norm(&tangent);
            if tn < tol {
                break;
            }
            u = (0..n)
                .map(|k| tn.cos() * u[k] + tn.sin() * tangent[k] / tn)
                .collect();
            let un = span.norm(&u);
            if un > tol {
                u.iter_mut().for_each(|c| *c /= un);
            }
        }
        let scale: f64 = norms.iter().map(|nm| nm / n as f64).sum();
        u.iter().map(|c| c * scale).collect()
    }
}

impl TensorMerger for KarcherMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0 && self.coefficients.is_empty()
    }

    fn observe(&mut self, _pass: usize, _start: usize, inputs: &[&[f32]]) {
        gram::accumulate(inputs, &mut self.gram);
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        self.coefficients = self.solve();
        Ok(())
    }

    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        out.fill(0.0);
        for (x, &c) in inputs.iter().zip(&self.coefficients) {
            out.iter_mut()
                .zip(x.iter())
                .for_each(|(o, v)| *o += c as f32 * v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// mergekit's loop on dense f64 vectors.
    fn reference(xs: &[Vec<f64>], max_iter: usize, tol: f64) -> Vec<f64> {
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let norm = |a: &[f64]| dot(a, a).sqrt();
        let n = xs.len();
        let norms: Vec<f64> = xs.iter().map(|x| norm(x)).collect();
        let units: Vec<Vec<f64>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, nm)| x.iter().map(|v| v / nm).collect())
            .collect();
        let alpha = 1.0 / n as f64;
        let mut u: Vec<f64> = (0..xs[0].len())
            .map(|j| units.iter().map(|un| alpha * un[j]).sum())
            .collect();
        let mn = norm(&u);
        u.iter_mut().for_each(|v| *v /= mn);
        for _ in 0..max_iter {
            let mut t = vec![0.0; u.len()];
            for un in &units {
                let d = dot(&u, un).clamp(-1.0, 1.0);
                let th = d.acos();
                if th < tol {
                    continue;
                }
                for j in 0..t.len() {
                    t[j] += alpha * th / th.sin() * (un[j] - d * u[j]);
                }
            }
            let tn = norm(&t);
            if tn < tol {
                break;
            }
            u = u
                .iter()
                .zip(&t)
                .map(|(a, b)| tn.cos() * a + tn.sin() * b / tn)
                .collect();
            let un = norm(&u);
            u.iter_mut().for_each(|v| *v /= un);
        }
        let scale: f64 = norms.iter().map(|nm| alpha * nm).sum();
        u.iter().map(|v| v * scale).collect()
    }

    #[test]
    fn matches_dense_reference() {
        let xs: Vec<Vec<f32>> = (1..5)
            .map(|s| data(7000, s, 1.0 + s as f32 * 0.1))
            .collect();
        let out = run(
            &Karcher,
            &xs,
            None,
            params(
                &[
                    ("max_iter", Scalar::Number(10.0)),
                    ("tol", Scalar::Number(1e-5)),
                ],
                vec![vec![]; 4],
            ),
            0,
        );
        let expected = reference(
            &xs.iter()
                .map(|v| v.iter().map(|x| *x as f64).collect())
                .collect::<Vec<_>>(),
            10,
            1e-5,
        );
        for j in 0..7000 {
            assert!((out[j] as f64 - expected[j]).abs() < 1e-5, "{j}");
        }
        // A zero input is left out of the mean but still counts in the scale (mergekit).
        let mut with_zero = xs[..2].to_vec();
        with_zero.push(vec![0.0; 7000]);
        let out = run(
            &Karcher,
            &with_zero,
            None,
            params(
                &[
                    ("max_iter", Scalar::Number(10.0)),
                    ("tol", Scalar::Number(1e-5)),
                ],
                vec![vec![]; 3],
            ),
            0,
        );
        assert!(out.iter().all(|v| v.is_finite()));
    }
}
