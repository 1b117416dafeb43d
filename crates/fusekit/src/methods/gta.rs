//! The generalized task-arithmetic pipeline shared by `task_arithmetic`, `ties`, `dare_ties` and
//! `dare_linear` (mergekit's `generalized_task_arithmetic.py`), per output tensor:
//!
//! 1. task vectors δᵢ = xᵢ − base;
//! 2. sparsify each δᵢ with its own `density`: keep the top-k |δᵢ| (TIES, k = max(1, ⌊density·n⌋),
//!    ties at the threshold broken by index) or a Bernoulli(density) mask (DARE); with `rescale`,
//!    multiply the survivors by ‖δᵢ‖₁ / ‖masked δᵢ‖₁ (skipped when either is below 1e-7) — the
//!    L1 match mergekit uses, which equals 1/density only in expectation;
//! 3. dᵢ = wᵢ·δ̂ᵢ;
//! 4. with sign consensus (TIES): γ = +1 where Σᵢ dᵢ ≥ 0 else −1; keep dᵢ whose sign equals γ
//!    (exact zeros never do); mixed = Σ kept dᵢ, divisor = Σ kept wᵢ (0 → 1).
//!    Without: mixed = Σ dᵢ, divisor = Σ wᵢ (|·| < 1e-8 → 1);
//! 5. mixed /= divisor if `normalize`; mixed *= `lambda`; out = base + mixed.
//!
//! Deltas and masks are computed in f32. DARE masks come from `rng`, keyed by
//! (seed, tensor, model), so they are reproducible whatever the schedule.

use super::*;
use crate::error::Error;
use crate::kernels::block_sum;
use crate::kernels::select::{magnitude_bits, Threshold, TopKSearch};
use crate::kernels::BLOCK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the largest magnitudes (TIES trim).
    Magnitude,
    /// Keep each element with probability `density` (DARE).
    Random,
}

#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub sparsify: Sparsify,
    pub consensus: bool,
}

/// The parameters every variant shares, with the variant's defaults for normalize/rescale.
macro_rules! gta_params {
    ($normalize:expr, $rescale:expr) => {
        &[
            ParamSpec {
                name: "weight",
                scope: Scope::NonBase,
                ty: ParamType::Float,
                default: None,
                doc: "scale of each task vector",
            },
            ParamSpec {
                name: "density",
                scope: Scope::NonBase,
                ty: ParamType::Float,
                default: Some(Default::Float(1.0)),
                doc: "fraction of each task vector kept",
            },
            ParamSpec {
                name: "normalize",
                scope: Scope::Global,
                ty: ParamType::Bool,
                default: Some(Default::Bool($normalize)),
                doc: "divide by the sum of the (kept) weights",
            },
            ParamSpec {
                name: "rescale",
                scope: Scope::Global,
                ty: ParamType::Bool,
                default: Some(Default::Bool($rescale)),
                doc: "restore each sparsified task vector's L1 norm",
            },
            ParamSpec {
                name: "lambda",
                scope: Scope::Global,
                ty: ParamType::Float,
                default: Some(Default::Float(1.0)),
                doc: "scale of the merged task vector",
            },
            ParamSpec {
                name: "int8_mask",
                scope: Scope::Global,
                ty: ParamType::Bool,
                default: Some(Default::Bool(false)),
                doc: "accepted for compatibility; masks are exact either way",
            },
        ]
    };
}
pub(crate) use gta_params;

struct Model {
    input: usize,
    weight: f32,
    density: f64,
    key: u64,
    threshold: Threshold,
    search: Option<TopKSearch>,
    /// For tie breaking: how many threshold-equal elements precede each block.
    ties_before: Vec<u64>,
    l1: [f64; 2],
    scale: f32,
}

pub struct GtaMerger {
    variant: Variant,
    base: usize,
    models: Vec<Model>,
    normalize: bool,
    lambda: f32,
    rescale: bool,
    /// Divisor without consensus (constant over the tensor).
    plain_divisor: f32,
    round: fn(f32) -> f32,
}

pub fn merger(variant: Variant, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
    let base = ctx
        .base
        .ok_or_else(|| Error::tensor(ctx.name, "this method needs `base_model`"))?;
    let p = ctx.params;
    let mut models = Vec::new();
    for input in (0..ctx.n_inputs).filter(|&i| i != base) {
        let density = p.input_float(input, "density").unwrap_or(1.0);
        if density.is_nan() || density < 0.0 {
            return Err(Error::tensor(
                ctx.name,
                format!("density {density} must be in [0, 1]"),
            ));
        }
        let k = if density >= 1.0 {
            ctx.numel as u64
        } else if density <= 0.0 {
            0
        } else {
            ((density * ctx.numel as f64) as u64).max(1)
        };
        let (threshold, search) = match variant.sparsify {
            Sparsify::Magnitude if k == 0 => (Threshold::NONE, None),
            Sparsify::Magnitude if k < ctx.numel as u64 => {
                (Threshold::ALL, Some(TopKSearch::new(k)))
            }
            _ => (Threshold::ALL, None),
        };
        models.push(Model {
            input,
            weight: (ctx.round)(p.input_float(input, "weight").unwrap_or(0.0) as f32),
            density,
            key: ctx.rng_keys[input],
            threshold,
            search,
            ties_before: Vec::new(),
            l1: [0.0; 2],
            scale: 1.0,
        });
    }
    let weight_sum = (ctx.round)(models.iter().map(|m| m.weight).sum());
    Ok(Box::new(GtaMerger {
        variant,
        base,
        normalize: p.flag("normalize").unwrap_or(false),
        lambda: p.float("lambda").unwrap_or(1.0) as f32,
        rescale: p.flag("rescale").unwrap_or(false),
        plain_divisor: if weight_sum.abs() < 1e-8 {
            1.0
        } else {
            weight_sum
        },
        models,
        round: ctx.round,
    }))
}

impl Model {
    fn random_keeps(&self) -> bool {
        self.density < 1.0
    }

    #[inline]
    fn keep_random(&self, index: usize) -> bool {
        crate::rng::uniform(self.key, index as u64) < self.density
    }
}

impl GtaMerger {
    fn rescaling(&self) -> bool {
        self.rescale && self.variant.sparsify != Sparsify::None
    }

    /// Sparsified task vector of `model` over one block, times `scale` then `weight`.
    #[allow(clippy::too_many_arguments)]
    fn sparse_delta(
        &self,
        m: &Model,
        start: usize,
        x: &[f32],
        base: &[f32],
        scale: f32,
        weight: f32,
        out: &mut [f32],
    ) {
        match self.variant.sparsify {
            Sparsify::None => {
                for ((o, &v), &b) in out.iter_mut().zip(x).zip(base) {
                    *o = (v - b) * weight;
                }
            }
            Sparsify::Random => {
                for (j, ((o, &v), &b)) in out.iter_mut().zip(x).zip(base).enumerate() {
                    let keep = !m.random_keeps() || m.keep_random(start + j);
                    *o = if keep { (v - b) * scale * weight } else { 0.0 };
                }
            }
            Sparsify::Magnitude => {
                let t = m.threshold;
                let mut taken = m.ties_before.get(start / BLOCK).copied().unwrap_or(0);
                for ((o, &v), &b) in out.iter_mut().zip(x).zip(base) {
                    let d = v - b;
                    let bits = magnitude_bits(d);
                    let keep = bits > t.bits || (bits == t.bits && taken < t.take_equal);
                    taken += (bits == t.bits) as u64;
                    *o = if keep { d * scale * weight } else { 0.0 };
                }
            }
        }
    }
}

impl TensorMerger for GtaMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        match self.variant.sparsify {
            Sparsify::None => false,
            Sparsify::Random => {
                pass == 0 && self.rescaling() && self.models.iter().any(Model::random_keeps)
            }
            Sparsify::Magnitude => match pass {
                0 | 1 => self.models.iter().any(|m| m.search.is_some()),
                2 => self.models.iter().any(|m| m.threshold.needs_tie_break()),
                3 => self.rescaling(),
                _ => false,
            },
        }
    }

    fn observe(&mut self, pass: usize, start: usize, inputs: &[&[f32]]) {
        let base = inputs[self.base];
        match (self.variant.sparsify, pass) {
            (Sparsify::Random, _) => {
                for m in self.models.iter_mut().filter(|m| m.random_keeps()) {
                    let x = inputs[m.input];
                    m.l1[0] += block_sum(x.len(), |j| (x[j] - base[j]).abs() as f64);
                    m.l1[1] += block_sum(x.len(), |j| {
                        if m.keep_random(start + j) {
                            (x[j] - base[j]).abs() as f64
                        } else {
                            0.0
                        }
                    });
                }
            }
            (Sparsify::Magnitude, 0 | 1) => {
                for m in &mut self.models {
                    if let Some(search) = &mut m.search {
                        let x = inputs[m.input];
                        search.observe(x.iter().zip(base).map(|(v, b)| v - b));
                    }
                }
            }
            (Sparsify::Magnitude, 2) => {
                for m in self
                    .models
                    .iter_mut()
                    .filter(|m| m.threshold.needs_tie_break())
                {
                    let x = inputs[m.input];
                    let equal = x
                        .iter()
                        .zip(base)
                        .filter(|(v, b)| magnitude_bits(*v - *b) == m.threshold.bits)
                        .count();
                    let before = m.ties_before.last().copied().unwrap_or(0);
                    m.ties_before.push(before + equal as u64);
                }
            }
            (Sparsify::Magnitude, _) => {
                let mut kept = vec![0f32; base.len()];
                for i in 0..self.models.len() {
                    let x = inputs[self.models[i].input];
                    self.sparse_delta(&self.models[i], start, x, base, 1.0, 1.0, &mut kept);
                    let m = &mut self.models[i];
                    m.l1[0] += block_sum(x.len(), |j| (x[j] - base[j]).abs() as f64);
                    m.l1[1] += block_sum(x.len(), |j| kept[j].abs() as f64);
                }
            }
            (Sparsify::None, _) => {}
        }
    }

    fn end_pass(&mut self, pass: usize) -> Result<()> {
        let sparsify = self.variant.sparsify;
        for m in &mut self.models {
            match (sparsify, pass) {
                (Sparsify::Magnitude, 0 | 1) => {
                    if let Some(search) = &mut m.search {
                        if let Some(t) = search.finish_pass() {
                            m.threshold = t;
                            m.search = None;
                        }
                    }
                }
                // Entries were pushed after each block; shift so entry b counts ties before block b.
                (Sparsify::Magnitude, 2) if m.threshold.needs_tie_break() => {
                    m.ties_before.insert(0, 0)
                }
                _ => {}
            }
            if (sparsify == Sparsify::Random && pass == 0)
                || (sparsify == Sparsify::Magnitude && pass == 3)
            {
                let [before, after] = m.l1;
                m.scale = if before < 1e-7 || after < 1e-7 {
                    1.0
                } else {
                    (before / after) as f32
                };
            }
        }
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let base = inputs[self.base];
        let n = base.len();
        let mut deltas = vec![0f32; n * self.models.len()];
        for (m, d) in self.models.iter().zip(deltas.chunks_exact_mut(n)) {
            self.sparse_delta(m, start, inputs[m.input], base, m.scale, m.weight, d);
        }
        for j in 0..n {
            let (mut mixed, mut divisor) = (0f32, self.plain_divisor);
            if self.variant.consensus {
                let sum: f32 = (0..self.models.len()).map(|i| deltas[i * n + j]).sum();
                let majority = if sum >= 0.0 { 1.0 } else { -1.0 };
                divisor = 0.0;
                for (i, m) in self.models.iter().enumerate() {
                    let d = deltas[i * n + j];
                    if d != 0.0 && d.signum() == majority {
                        mixed += d;
                        divisor += m.weight;
                    }
                }
                divisor = (self.round)(divisor);
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                mixed = (0..self.models.len()).map(|i| deltas[i * n + j]).sum();
            }
            if self.normalize {
                mixed /= divisor;
            }
            out[j] = base[j] + mixed * self.lambda;
        }
    }
}
