//! `ram`: Reinforced Agent Merging (arXiv:2601.13572), as in mergekit.
//!
//! With task vectors τᵢ = xᵢ − base, an element is active in model i when |τᵢ| > ε, and
//! c = the number of models active there. Unique contributions (c = 1) are kept whole, shared
//! ones averaged over the models that share them:
//! out = base + Σᵢ activeᵢ·(c = 1 ? λᵢ·τᵢ : τᵢ / c), with λᵢ = 1 (`ramplus_tl` rescales the unique
//! part per model). Default ε 1e-5.

use super::*;
use crate::error::Error;

pub struct Ram;

pub(super) const EPSILON: ParamSpec = ParamSpec {
    name: "epsilon",
    scope: Scope::Global,
    ty: ParamType::NonNegative,
    default: Some(Default::Float(1e-5)),
    doc: "magnitude above which a task-vector entry counts as active",
};

static SPEC: MethodSpec = MethodSpec {
    name: "ram",
    summary: "keep unique task-vector entries, average the shared ones",
    reference: "https://arxiv.org/abs/2601.13572",
    params: &[EPSILON],
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

/// `ramplus_tl`'s per-model rescale of unique entries: λᵢ = 1 + r·clamp(ρᵢ, 0, α) with
/// ρᵢ = (#shared active) / max(#unique active, ε), counted over the tensor.
#[derive(Clone, Copy)]
pub(super) struct Plus {
    pub r: f64,
    pub alpha: f64,
}

pub(super) struct RamMerger {
    base: usize,
    models: Vec<usize>,
    epsilon: f32,
    plus: Option<Plus>,
    /// Per model: (shared, unique) active counts, for `plus`.
    counts: Vec<[u64; 2]>,
    lambdas: Vec<f32>,
}

impl Method for Ram {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        merger(ctx, None)
    }
}

pub(super) fn merger(ctx: &TensorContext, plus: Option<Plus>) -> Result<Box<dyn TensorMerger>> {
    let base = ctx
        .base
        .ok_or_else(|| Error::tensor(ctx.name, "this method needs `base_model`"))?;
    let models: Vec<usize> = (0..ctx.n_inputs).filter(|&i| i != base).collect();
    let n = models.len();
    Ok(Box::new(RamMerger {
        base,
        models,
        epsilon: ctx.params.float("epsilon").unwrap_or(1e-5) as f32,
        plus,
        counts: vec![[0; 2]; n],
        lambdas: vec![1.0; n],
    }))
}

impl RamMerger {
    fn active(&self, inputs: &[&[f32]], i: usize, j: usize) -> bool {
        (inputs[self.models[i]][j] - inputs[self.base][j]).abs() > self.epsilon
    }

    fn contributors(&self, inputs: &[&[f32]], j: usize) -> u64 {
        (0..self.models.len())
            .filter(|&i| self.active(inputs, i, j))
            .count() as u64
    }
}

impl TensorMerger for RamMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0 && self.plus.is_some()
    }

    fn observe(&mut self, _pass: usize, _start: usize, inputs: &[&[f32]]) {
        for j in 0..inputs[self.base].len() {
            let c = self.contributors(inputs, j);
            for i in 0..self.models.len() {
                if self.active(inputs, i, j) {
                    self.counts[i][(c == 1) as usize] += 1;
                }
            }
        }
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        if let Some(Plus { r, alpha }) = self.plus {
            let eps = self.epsilon as f64;
            self.lambdas = self
                .counts
                .iter()
                .map(|&[shared, unique]| {
                    (1.0 + r * (shared as f64 / (unique as f64).max(eps)).clamp(0.0, alpha)) as f32
                })
                .collect();
        }
        Ok(())
    }

    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let base = inputs[self.base];
        for (j, o) in out.iter_mut().enumerate() {
            let c = self.contributors(inputs, j);
            let mut merged = 0f32;
            for (i, &m) in self.models.iter().enumerate() {
                if self.active(inputs, i, j) {
                    let tau = inputs[m][j] - base[j];
                    merged += if c == 1 {
                        tau * self.lambdas[i]
                    } else {
                        tau / c as f32
                    };
                }
            }
            *o = base[j] + merged;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn unique_entries_kept_shared_averaged() {
        let base = vec![0.0f32; 6];
        let a = vec![0.5, 0.0, 0.3, 1e-6, -0.2, 0.0];
        let b = vec![0.0, 0.4, 0.1, 0.0, -0.4, 0.0];
        let out = run(
            &Ram,
            &[base, a, b],
            Some(0),
            params(&[("epsilon", Scalar::Number(1e-5))], vec![vec![]; 3]),
            0,
        );
        let expected = [0.5, 0.4, (0.3 + 0.1) / 2.0, 0.0, (-0.2 - 0.4) / 2.0, 0.0];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-7, "{out:?}");
        }
    }
}
