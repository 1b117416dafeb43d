//! The reference TIES trim (Yadav et al.'s code, `ties_merging.py`): each model keeps the
//! `density` share of its *whole* task vector rather than of every tensor. With n the model's
//! parameter count and k = ⌊n·(1 − density)⌋, the threshold is the k-th smallest |δ| over all its
//! tensors (torch's `kthvalue`), and every |δ| ≥ threshold is kept (ties at the threshold
//! included, as the reference's `>=` does). The threshold is exact: two counting passes over the
//! model (`kernels::quantile`), before any tensor is merged.

use super::*;
use crate::error::Error;
use crate::kernels::quantile::RadixSelect;
use std::sync::Arc;

/// The parameter that turns it on (a `ties` option).
pub const GLOBAL_TOPK: ParamSpec = ParamSpec {
    name: "global_topk",
    scope: Scope::Global,
    ty: ParamType::Bool,
    default: Some(Default::Bool(false)),
    doc: "trim over each model's whole task vector (the reference code) instead of per tensor",
};

/// Per plan model: the magnitude at and above which its task-vector entries are kept.
#[derive(Debug)]
pub struct Thresholds(pub BTreeMap<usize, f32>);

struct Model {
    /// `None`: density ≥ 1 or k = 0, everything is kept.
    select: Option<RadixSelect>,
}

struct GlobalTopK {
    models: BTreeMap<usize, Model>,
}

/// The statistics for `tensors`, if they ask for the global trim.
pub fn statistics(tensors: &[TensorContext]) -> Result<Option<Box<dyn ModelStatistics>>> {
    let global: Vec<bool> = tensors
        .iter()
        .map(|t| t.params.flag(GLOBAL_TOPK.name).unwrap_or(false))
        .collect();
    if !global.contains(&true) {
        return Ok(None);
    }
    if global.contains(&false) {
        return Err(Error::config(
            "`global_topk` must be the same for every tensor (it trims over the whole model)",
        ));
    }
    // Per model: its density (one for the whole model) and parameter count.
    let mut seen: BTreeMap<usize, (f64, u64)> = BTreeMap::new();
    for t in tensors {
        for (input, &model) in t.models.iter().enumerate() {
            if Some(input) == t.base {
                continue;
            }
            let density = t.params.input_float(input, "density").unwrap_or(1.0);
            let entry = seen.entry(model).or_insert((density, 0));
            if entry.0 != density {
                return Err(Error::tensor(
                    t.name,
                    format!(
                        "density {density} differs from {} elsewhere; `global_topk` needs one \
                         density per model",
                        entry.0
                    ),
                ));
            }
            entry.1 += t.numel as u64;
        }
    }
    let models = seen
        .into_iter()
        .map(|(model, (density, n))| {
            let k = (n as f64 * (1.0 - density)).floor() as u64;
            let select = (density < 1.0 && k > 0).then(|| RadixSelect::new(&[k - 1]));
            (model, Model { select })
        })
        .collect();
    Ok(Some(Box::new(GlobalTopK { models })))
}

impl ModelStatistics for GlobalTopK {
    fn wants_pass(&self, pass: usize) -> bool {
        pass < 2 && self.models.values().any(|m| m.select.is_some())
    }

    fn fork(&self) -> Box<dyn ModelStatistics> {
        let models = self
            .models
            .iter()
            .map(|(id, m)| {
                let select = m.select.as_ref().map(RadixSelect::empty_like);
                (*id, Model { select })
            })
            .collect();
        Box::new(GlobalTopK { models })
    }

    fn absorb(&mut self, part: Box<dyn ModelStatistics>) {
        let part = part.into_any().downcast::<GlobalTopK>().expect("forked");
        for (id, m) in &mut self.models {
            if let (Some(a), Some(b)) = (&mut m.select, &part.models[id].select) {
                a.add(b);
            }
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn observe(&mut self, _pass: usize, tensor: &TensorContext, _start: usize, inputs: &[&[f32]]) {
        let Some(base) = tensor.base else { return };
        crate::kernels::with_scratch(inputs[base].len(), |magnitude| {
            for (input, &model) in tensor.models.iter().enumerate() {
                let Some(select) = self
                    .models
                    .get_mut(&model)
                    .and_then(|m| m.select.as_mut())
                    .filter(|_| input != base)
                else {
                    continue;
                };
                for ((m, x), b) in magnitude.iter_mut().zip(inputs[input]).zip(inputs[base]) {
                    *m = (x - b).abs();
                }
                select.observe(magnitude);
            }
        });
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        self.models
            .values_mut()
            .filter_map(|m| m.select.as_mut())
            .for_each(RadixSelect::end_pass);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        let thresholds = self
            .models
            .into_iter()
            .map(|(model, m)| {
                let t = m
                    .select
                    .as_ref()
                    .and_then(|s| s.result().map(|r| r[0]))
                    .unwrap_or(0.0);
                (model, t)
            })
            .collect();
        Arc::new(Thresholds(thresholds))
    }
}
