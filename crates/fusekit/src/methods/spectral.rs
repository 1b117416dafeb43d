//! The machinery of the SVD-based merges (`tsv`, `iso_c`): a 2-D tensor's task vectors (or their
//! sum) are collected in one statistics pass, the method turns them into the merged task vector
//! once they are complete, and `apply` adds it to the base. Tensors of other ranks get the mean
//! task vector times the method's scale, as the reference does.
//!
//! These methods need whole matrices: a tensor's task vectors are held in memory (T·m·n f32 for
//! `tsv`, m·n for `iso_c`) while it is merged.

use super::*;
use crate::error::Error;
use faer::Mat;

/// What a method keeps of the task vectors while they stream past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    /// Σᵢ τᵢ.
    Sum,
    /// Every τᵢ.
    Each,
}

/// Turns the collected matrices (one, or one per task) of the named tensor into the merged task
/// vector.
pub type Combine = fn(&[Mat<f32>], &str) -> Result<Mat<f32>>;

pub struct SpectralMerger {
    base: usize,
    models: Vec<usize>,
    scale: f32,
    /// `rows × cols` for matrices; `None` for vectors (mean task vector).
    matrix: Option<(usize, usize)>,
    collected: Vec<Mat<f32>>,
    collect: Collect,
    merged: Option<Mat<f32>>,
    combine: Combine,
    name: String,
}

/// Bytes a tensor holds while merged: the collected matrices, the SVD's products and factors.
pub fn held_bytes(ctx: &TensorContext, collect: Collect) -> usize {
    match ctx.shape {
        [rows, rest @ ..] if !rest.is_empty() => {
            let tasks = ctx.n_inputs.saturating_sub(1);
            let collected = match collect {
                Collect::Sum => 1,
                Collect::Each => tasks,
            };
            crate::kernels::svd::held_bytes(*rows, rest.iter().product(), collected + 3)
        }
        _ => 0,
    }
}

impl SpectralMerger {
    pub fn boxed(
        ctx: &TensorContext,
        scale_param: &str,
        collect: Collect,
        combine: Combine,
    ) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "this method needs `base_model`"))?;
        let models: Vec<usize> = (0..ctx.n_inputs).filter(|&i| i != base).collect();
        let matrix = match ctx.shape {
            [rows, rest @ ..] if !rest.is_empty() => Some((*rows, rest.iter().product())),
            _ => None,
        };
        let count = match collect {
            Collect::Sum => 1,
            Collect::Each => models.len(),
        };
        let collected = match matrix {
            Some((rows, cols)) => (0..count).map(|_| Mat::zeros(rows, cols)).collect(),
            None => Vec::new(),
        };
        Ok(Box::new(SpectralMerger {
            base,
            scale: ctx.params.float(scale_param).unwrap_or(1.0) as f32,
            matrix,
            collected,
            collect,
            merged: None,
            combine,
            name: ctx.name.to_string(),
            models,
        }))
    }
}

impl TensorMerger for SpectralMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0 && self.matrix.is_some()
    }

    fn observe(&mut self, _pass: usize, start: usize, inputs: &[&[f32]]) {
        let (_, cols) = self.matrix.expect("matrices only");
        let base = inputs[self.base];
        for (k, &m) in self.models.iter().enumerate() {
            let target = match self.collect {
                Collect::Sum => &mut self.collected[0],
                Collect::Each => &mut self.collected[k],
            };
            for (j, (x, b)) in inputs[m].iter().zip(base).enumerate() {
                let e = start + j;
                target[(e / cols, e % cols)] += x - b;
            }
        }
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        let merged = (self.combine)(&self.collected, &self.name)?;
        self.collected.clear();
        self.merged = Some(merged);
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let base = inputs[self.base];
        match (&self.merged, self.matrix) {
            (Some(merged), Some((_, cols))) => {
                for (j, (o, b)) in out.iter_mut().zip(base).enumerate() {
                    let e = start + j;
                    *o = b + self.scale * merged[(e / cols, e % cols)];
                }
            }
            _ => {
                let t = self.models.len() as f32;
                for (j, (o, b)) in out.iter_mut().zip(base).enumerate() {
                    let sum: f32 = self.models.iter().map(|&m| inputs[m][j] - b).sum();
                    *o = b + self.scale * sum / t;
                }
            }
        }
    }
}
