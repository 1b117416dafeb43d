//! `model_stock`: Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522), as in mergekit.
//!
//! With offsets oᵢ = wᵢ − w₀ from the base (N ≥ 2 models):
//! cos θ = mean over pairs i < j of clamp(oᵢ·oⱼ / max(‖oᵢ‖‖oⱼ‖, 1e-6), −1, 1),
//! t = N·cos θ / (1 + (N − 1)·cos θ)   (t = 0 where |1 + (N − 1)·cos θ| < 1e-6),
//! out = t·mean(wᵢ) + (1 − t)·w₀.
//! With `filter_wise` the same is done per row (the last dimension; a 1-D tensor is one row).
//! Dot products and norms are accumulated in f64, one statistics pass.

use super::*;
use crate::error::Error;
use crate::kernels::rows::row_segments;
use crate::kernels::{dot3_f64, dot_f64};

pub struct ModelStock;

static SPEC: MethodSpec = MethodSpec {
    name: "model_stock",
    summary: "interpolate between the base and the models' mean by the angle of their offsets",
    reference: "https://arxiv.org/abs/2403.19522",
    params: &[ParamSpec {
        name: "filter_wise",
        scope: Scope::Global,
        ty: ParamType::Bool,
        default: Some(Default::Bool(false)),
        doc: "one ratio per row instead of per tensor",
    }],
    base: BasePolicy::Required,
    min_inputs: 3,
    max_inputs: None,
};

struct ModelStockMerger {
    base: usize,
    /// The non-base inputs, in order.
    models: Vec<usize>,
    row_len: usize,
    /// Per row: ‖oᵢ‖² for every model, then oᵢ·oⱼ for every pair i < j.
    sums: Vec<f64>,
    /// Per row: the interpolation factor.
    t: Vec<f32>,
}

impl Method for ModelStock {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "model_stock needs `base_model`"))?;
        let models: Vec<usize> = (0..ctx.n_inputs).filter(|&i| i != base).collect();
        let row_len = match ctx.shape {
            [.., last]
                if ctx.params.flag("filter_wise").unwrap_or(false) && ctx.shape.len() >= 2 =>
            {
                (*last).max(1)
            }
            _ => ctx.numel.max(1),
        };
        let rows = ctx.numel.div_ceil(row_len).max(1);
        let n = models.len();
        Ok(Box::new(ModelStockMerger {
            base,
            models,
            row_len,
            sums: vec![0.0; rows * (n + n * (n - 1) / 2)],
            t: Vec::new(),
        }))
    }
}

impl ModelStockMerger {
    fn stride(&self) -> usize {
        let n = self.models.len();
        n + n * (n - 1) / 2
    }
}

impl TensorMerger for ModelStockMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0
    }

    fn observe(&mut self, _pass: usize, start: usize, inputs: &[&[f32]]) {
        let base = inputs[self.base];
        let len = base.len();
        let (n, stride) = (self.models.len(), self.stride());
        crate::kernels::with_scratch(n * len, |scratch| {
            for (&m, offset) in self.models.iter().zip(scratch.chunks_exact_mut(len)) {
                for ((o, &x), &b) in offset.iter_mut().zip(inputs[m]).zip(base) {
                    *o = x - b;
                }
            }
            let offsets: Vec<&[f32]> = scratch.chunks_exact(len).collect();
            for (row, range) in row_segments(start, len, self.row_len) {
                let sums = &mut self.sums[row * stride..(row + 1) * stride];
                if let [a, b] = offsets[..] {
                    // Two models, the common case: both norms and the dot in one read.
                    let [aa, bb, ab] = dot3_f64(&a[range.clone()], &b[range]);
                    sums[0] += aa;
                    sums[1] += bb;
                    sums[2] += ab;
                } else {
                    let mut slot = n;
                    for a in 0..n {
                        let oa = &offsets[a][range.clone()];
                        sums[a] += dot_f64(oa, oa);
                        for ob in &offsets[a + 1..] {
                            sums[slot] += dot_f64(oa, &ob[range.clone()]);
                            slot += 1;
                        }
                    }
                }
            }
        });
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        let (n, stride) = (self.models.len(), self.stride());
        self.t = self
            .sums
            .chunks_exact(stride)
            .map(|sums| {
                let mut cos_sum = 0.0;
                let mut slot = n;
                for a in 0..n {
                    for b in a + 1..n {
                        let norms = (sums[a].sqrt() * sums[b].sqrt()).max(1e-6);
                        cos_sum += (sums[slot] / norms).clamp(-1.0, 1.0);
                        slot += 1;
                    }
                }
                let cos = cos_sum / (n * (n - 1) / 2) as f64;
                let denominator = 1.0 + (n as f64 - 1.0) * cos;
                if denominator.abs() < 1e-6 {
                    0.0
                } else {
                    (n as f64 * cos / denominator) as f32
                }
            })
            .collect();
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let base = inputs[self.base];
        let count = self.models.len() as f32;
        // Σ models in input order, then the mean, as mergekit's `sum(ws) / count`.
        out.fill(0.0);
        for &m in &self.models {
            out.iter_mut().zip(inputs[m]).for_each(|(o, x)| *o += x);
        }
        for (row, range) in row_segments(start, out.len(), self.row_len) {
            let t = self.t[row];
            let base = &base[range.clone()];
            for (o, &b) in out[range].iter_mut().zip(base) {
                *o = t * (*o / count) + (1.0 - t) * b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// Model Stock written out densely over rows of `row_len`.
    fn reference(w0: &[f32], ws: &[Vec<f32>], row_len: usize) -> Vec<f32> {
        let n = ws.len();
        let mut out = vec![0f32; w0.len()];
        for r in 0..w0.len() / row_len {
            let range = r * row_len..(r + 1) * row_len;
            let offs: Vec<Vec<f64>> = ws
                .iter()
                .map(|w| range.clone().map(|i| (w[i] - w0[i]) as f64).collect())
                .collect();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let mut cos = 0.0;
            for a in 0..n {
                for b in a + 1..n {
                    let dot: f64 = offs[a].iter().zip(&offs[b]).map(|(x, y)| x * y).sum();
                    cos += (dot / (norm(&offs[a]) * norm(&offs[b])).max(1e-6)).clamp(-1.0, 1.0);
                }
            }
            cos /= (n * (n - 1) / 2) as f64;
            let t = (n as f64 * cos / (1.0 + (n as f64 - 1.0) * cos)) as f32;
            for i in range {
                let mean = ws.iter().fold(0f32, |s, w| s + w[i]) / n as f32;
                out[i] = t * mean + (1.0 - t) * w0[i];
            }
        }
        out
    }

    fn check(filter_wise: bool, shape: &[usize]) {
        let numel: usize = shape.iter().product();
        let w0 = data(numel, 1, 1.0);
        // Correlated offsets (a shared direction plus noise), so t is well inside (0, 1).
        let shared = data(numel, 9, 0.01);
        let ws: Vec<Vec<f32>> = (2..5)
            .map(|s| {
                w0.iter()
                    .zip(&shared)
                    .zip(data(numel, s, 0.01))
                    .map(|((w, c), d)| w + c + d)
                    .collect()
            })
            .collect();
        let mut inputs = vec![w0.clone()];
        inputs.extend(ws.iter().cloned());
        let p = params(
            &[("filter_wise", Scalar::Bool(filter_wise))],
            vec![vec![]; 4],
        );
        let keys = [0u64; 4];
        let ctx = TensorContext {
            name: "w",
            numel,
            shape,
            n_inputs: 4,
            base: Some(0),
            params: &p,
            rng_keys: &keys,
            compute: None,
            memory: 1 << 30,
            models: &[],
            model_stats: None,
        };
        let out = run_ctx(&ModelStock, &inputs, &ctx);
        let row_len = if filter_wise && shape.len() >= 2 {
            shape[shape.len() - 1]
        } else {
            numel
        };
        let expected = reference(&w0, &ws, row_len);
        for i in 0..numel {
            assert!(
                (out[i] - expected[i]).abs() < 1e-6,
                "filter_wise={filter_wise} {i}: {} vs {}",
                out[i],
                expected[i]
            );
        }
    }

    #[test]
    fn matches_dense_reference_per_tensor_and_per_row() {
        check(false, &[96, 300]);
        check(true, &[96, 300]);
        check(true, &[5000]);
    }
}
