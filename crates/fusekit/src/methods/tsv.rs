//! `tsv`: Task Singular Vectors merging, TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing
//! Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081; FusionBench `tsvm`).
//!
//! Per m×n tensor with T task vectors and k = max(1, ⌊min(m, n)/T⌋): keep each τᵢ's top-k
//! singular triplets (Uᵢ, σᵢ, Vᵢ); concatenate U = [U₁ … U_T], σ = [σ₁ … σ_T], V = [V₁ … V_T];
//! decorrelate Û = polar(U), V̂ = polar(V) (the nearest orthonormal matrices, U·Vᵀ of their thin
//! SVDs); θ = θ₀ + α·Û·diag(σ)·V̂ᵀ. Other tensors: θ = θ₀ + α·mean(τᵢ). Default α 1.
//! Low-rank task vectors that interfere little once their singular vectors are orthogonalised:
//! the strongest data-free method in FusionBench (ViT-B/32 × 8 tasks: 83.1 %). Holds the T task
//! vectors of one matrix in memory.

use super::spectral::{self, Collect, SpectralMerger};
use super::*;
use crate::error::Error;
use crate::kernels::svd::{polar, product, svd_of};
use faer::Mat;

pub struct Tsv;

static SPEC: MethodSpec = MethodSpec {
    name: "tsv",
    summary: "top singular vectors of each task vector, orthogonalised, recombined",
    reference: "https://arxiv.org/abs/2412.00081",
    params: &[ParamSpec {
        name: "alpha",
        scope: Scope::Global,
        ty: ParamType::Float,
        default: Some(Default::Float(1.0)),
        doc: "scale of the merged task vector",
    }],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: None,
};

impl Method for Tsv {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn held_bytes(&self, ctx: &TensorContext) -> usize {
        spectral::held_bytes(ctx, Collect::Each)
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        SpectralMerger::boxed(ctx, "alpha", Collect::Each, task_singular_vectors)
    }
}

fn task_singular_vectors(tasks: &[Mat<f32>], name: &str) -> Result<Mat<f32>> {
    let (m, n) = tasks[0].shape();
    let k = (m.min(n) / tasks.len()).max(1).min(m.min(n));
    let width = k * tasks.len();
    let failed = || Error::tensor(name, "an SVD of the task vectors did not converge");
    let (mut u, mut v) = (Mat::<f32>::zeros(m, width), Mat::<f32>::zeros(n, width));
    let mut sigma = Vec::with_capacity(width);
    for (i, tau) in tasks.iter().enumerate() {
        let d = svd_of(tau.as_ref()).ok_or_else(failed)?;
        for j in 0..k {
            let col = i * k + j;
            for r in 0..m {
                u[(r, col)] = d.u[(r, j)];
            }
            for r in 0..n {
                v[(r, col)] = d.v[(r, j)];
            }
            sigma.push(d.s[j]);
        }
    }
    let u = polar(u.as_ref()).ok_or_else(failed)?;
    let mut v = polar(v.as_ref()).ok_or_else(failed)?;
    // Û·diag(σ)·V̂ᵀ: scale V̂'s columns, then one product.
    for (col, s) in sigma.iter().enumerate() {
        for r in 0..n {
            v[(r, col)] *= s;
        }
    }
    Ok(product(u.as_ref(), v.as_ref().transpose()))
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use faer::MatRef;

    #[test]
    fn orthogonal_low_rank_tasks_are_kept_exactly() {
        // Two rank-2 task vectors in orthogonal subspaces, k = ⌊4/2⌋ = 2 triplets each (no
        // zero singular value whose arbitrary vectors would enter the orthogonalisation): TSV
        // keeps both exactly (α = 1).
        let (rows, cols) = (8, 4);
        let n = rows * cols;
        let base = data(n, 1, 1.0);
        let unit = |i: usize, len: usize| {
            (0..len)
                .map(|r| if r == i { 1.0f32 } else { 0.0 })
                .collect::<Vec<_>>()
        };
        let task = |pairs: &[(usize, usize, f32)]| -> Vec<f32> {
            let mut t = vec![0f32; n];
            for &(a, b, s) in pairs {
                let (x, y) = (unit(a, rows), unit(b, cols));
                for r in 0..rows {
                    for c in 0..cols {
                        t[r * cols + c] += s * x[r] * y[c];
                    }
                }
            }
            t
        };
        let t1 = task(&[(0, 0, 3.0), (1, 1, 2.0)]);
        let t2 = task(&[(2, 2, 1.5), (3, 3, 0.5)]);
        let mut inputs = vec![base.clone()];
        for t in [&t1, &t2] {
            inputs.push(base.iter().zip(t.iter()).map(|(b, d)| b + d).collect());
        }
        let p = params(&[("alpha", Scalar::Number(1.0))], vec![vec![]; 3]);
        let keys = [0u64; 3];
        let out = run_ctx(&Tsv, &inputs, &context("w", &[rows, cols], &p, &keys));
        for i in 0..n {
            let want = base[i] + t1[i] + t2[i];
            assert!((out[i] - want).abs() < 1e-5, "{i}: {} vs {want}", out[i]);
        }
    }

    #[test]
    fn matches_the_formula_on_random_task_vectors() {
        let (rows, cols, tasks) = (9, 7, 3);
        let n = rows * cols;
        let base = data(n, 1, 1.0);
        let taus: Vec<Vec<f32>> = (0..tasks).map(|s| data(n, 20 + s as u64, 0.1)).collect();
        let mut inputs = vec![base.clone()];
        inputs.extend(
            taus.iter()
                .map(|t| base.iter().zip(t).map(|(b, d)| b + d).collect::<Vec<_>>()),
        );
        let p = params(&[("alpha", Scalar::Number(0.7))], vec![vec![]; tasks + 1]);
        let keys = vec![0u64; tasks + 1];
        let out = run_ctx(&Tsv, &inputs, &context("w", &[rows, cols], &p, &keys));
        // The formula in f64 with plain loops: k = ⌊7/3⌋ = 2 triplets per task.
        let k = 2;
        let mut u = vec![vec![0f64; tasks * k]; rows];
        let mut v = vec![vec![0f64; tasks * k]; cols];
        let mut sigma = Vec::new();
        for (i, t) in taus.iter().enumerate() {
            let d = svd_of(MatRef::from_row_major_slice(t, rows, cols)).unwrap();
            for j in 0..k {
                (0..rows).for_each(|r| u[r][i * k + j] = d.u[(r, j)] as f64);
                (0..cols).for_each(|r| v[r][i * k + j] = d.v[(r, j)] as f64);
                sigma.push(d.s[j] as f64);
            }
        }
        let polar = |m: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            let flat: Vec<f32> = m.iter().flatten().map(|x| *x as f32).collect();
            let p = super::polar(MatRef::from_row_major_slice(&flat, m.len(), m[0].len())).unwrap();
            (0..m.len())
                .map(|r| (0..m[0].len()).map(|c| p[(r, c)] as f64).collect())
                .collect()
        };
        let (pu, pv) = (polar(&u), polar(&v));
        for r in 0..rows {
            for c in 0..cols {
                let delta: f64 = (0..tasks * k).map(|j| pu[r][j] * sigma[j] * pv[c][j]).sum();
                let want = base[r * cols + c] as f64 + 0.7 * delta;
                assert!((out[r * cols + c] as f64 - want).abs() < 1e-4, "{r},{c}");
            }
        }
    }
}
