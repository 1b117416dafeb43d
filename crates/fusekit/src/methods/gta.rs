//! The generalized task-arithmetic pipeline shared by `task_arithmetic`, `ties`, `dare_ties` and
//! `dare_linear` (mergekit's `generalized_task_arithmetic.py`), per output tensor:
//!
//! 1. task vectors δᵢ = xᵢ − base;
//! 2. sparsify each δᵢ with its own `density`: keep the top-k |δᵢ| (TIES, k = max(1, ⌊density·n⌋),
//!    ties at the threshold broken by index), a band of ⌊density·n⌋ magnitudes below the ⌊γ·n⌋
//!    largest (breadcrumbs), or a Bernoulli(density) mask (DARE); with `rescale`,
//!    multiply the survivors by ‖δᵢ‖₁ / ‖masked δᵢ‖₁ (skipped when either is below 1e-7) — the
//!    L1 match mergekit uses, which equals 1/density only in expectation;
//! 3. dᵢ = wᵢ·δ̂ᵢ;
//! 4. with sign consensus (TIES): γ = +1 where Σᵢ dᵢ ≥ 0 else −1; keep dᵢ whose sign equals γ
//!    (exact zeros never do); mixed = Σ kept dᵢ, divisor = Σ kept wᵢ (0 → 1).
//!    Without: mixed = Σ dᵢ, divisor = Σ wᵢ (|·| < 1e-8 → 1);
//! 5. mixed /= divisor if `normalize`; mixed *= `lambda`; out = base + mixed.
//!
//! Deltas and masks are computed in f32. DARE masks come from `rng::Draws`, keyed by
//! (seed, tensor, model), so they are reproducible whatever the schedule. Statistics passes: the
//! top-k search (`kernels::select`, usually two cheap passes), then the L1 norms for `rescale`
//! (DELLA's mask pass sums them as it decides, so it needs no L1 pass).

use super::*;
use crate::dtype::Dtype;
use crate::error::Error;
use crate::kernels::convert::round_to;
use crate::kernels::magprune::MagPrune;
use crate::kernels::rows::row_length;
use crate::kernels::select::{Keep, TopK};
use crate::kernels::task_vectors::{self, Factor};
use crate::rng::{keep_threshold, Draws};
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the largest magnitudes (TIES trim).
    Magnitude,
    /// Keep a band of magnitudes: drop the smallest and the largest outliers (breadcrumbs).
    Outliers,
    /// Keep each element with probability `density` (DARE).
    Random,
    /// Keep with a probability that grows with the magnitude's rank in its row (DELLA).
    RankedRandom,
}

#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub sparsify: Sparsify,
    pub consensus: bool,
}

/// The parameters every variant shares, with the variant's defaults for normalize/rescale.
macro_rules! gta_params {
    ($normalize:expr, $rescale:expr $(, $extra:expr)*) => {
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
                ty: ParamType::Fraction,
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
            super::gta::LAMBDA,
            super::gta::INT8_MASK,
            $($extra,)*
        ]
    };
}
pub(crate) use gta_params;

/// λ, the scale of the merged task vector (default 1), for every method that has one.
pub(super) const LAMBDA: ParamSpec = ParamSpec {
    name: "lambda",
    scope: Scope::Global,
    ty: ParamType::Float,
    default: Some(Default::Float(1.0)),
    doc: "scale of the merged task vector",
};

/// mergekit's `int8_mask`: only the storage of its masks; fusekit's masks are exact either way.
pub(super) const INT8_MASK: ParamSpec = ParamSpec {
    name: "int8_mask",
    scope: Scope::Global,
    ty: ParamType::Bool,
    default: Some(Default::Bool(false)),
    doc: "accepted for compatibility; masks are exact either way",
};

struct Model {
    input: usize,
    weight: f32,
    /// Random masks: keep when the draw is below this (None: keep everything).
    keep_below: Option<u32>,
    key: u64,
    /// Magnitude masks: the searches while running, then their answers. An element survives if
    /// `keep` keeps it and `drop` does not (`drop` removes the largest outliers, breadcrumbs).
    search: Option<TopK>,
    keep: Keep,
    drop_search: Option<TopK>,
    drop: Keep,
    /// Rank-based random masks (DELLA): the builder while running, then its bits.
    prune: Option<MagPrune>,
    bits: Option<Vec<u64>>,
    /// ‖δ‖₁ and ‖mask ⊙ δ‖₁.
    l1: [f64; 2],
    scale: f32,
}

pub struct GtaMerger {
    variant: Variant,
    base: usize,
    numel: usize,
    models: Vec<Model>,
    normalize: bool,
    lambda: f32,
    /// Rescale pending (true until the L1 pass has run).
    rescale_pending: bool,
    in_l1_pass: bool,
    /// Divisor without consensus (constant over the tensor).
    plain_divisor: f32,
    /// The compute dtype that divisors are rounded to, as mergekit does.
    round: Option<Dtype>,
    /// Each model's weight, in model order (the consensus divisor adds them).
    weights: Vec<f32>,
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
        let sparse = density < 1.0;
        let n = ctx.numel;
        // DELLA: density 0 keeps nothing (an empty mask, no pass).
        let (prune, bits) = match variant.sparsify {
            Sparsify::RankedRandom if density <= 0.0 => (None, Some(vec![0; n.div_ceil(64)])),
            Sparsify::RankedRandom if sparse => (Some(magprune(ctx, input, density)?), None),
            _ => (None, None),
        };
        let global = global_threshold(ctx, input)?;
        let (keep_count, drop_count) = match variant.sparsify {
            Sparsify::Magnitude if global.is_some() => (None, None),
            // TIES: the top k = max(1, ⌊density·n⌋), none at all for density 0.
            Sparsify::Magnitude if sparse => (
                Some(if density <= 0.0 {
                    0
                } else {
                    ((density * n as f64) as usize).max(1)
                }),
                None,
            ),
            // Breadcrumbs: sorted ascending, keep ranks [n_bot, n_bot + ⌊density·n⌋) where
            // n_bot = max(0, n − ⌊density·n⌋ − ⌊γ·n⌋): the top n − n_bot minus the top
            // n − n_bot − ⌊density·n⌋ (mergekit 0.1.5's corrected slice).
            Sparsify::Outliers if sparse => {
                let gamma = p.input_float(input, "gamma").unwrap_or(0.01).max(0.0);
                let target = (density * n as f64) as usize;
                let n_bot = n.saturating_sub(target + (gamma * n as f64) as usize);
                (Some(n - n_bot), Some(n - n_bot - target))
            }
            _ => (None, None),
        };
        // The statistics memory is split over every search this tensor runs.
        let searches = (ctx.n_inputs - 1).max(1)
            * if variant.sparsify == Sparsify::Outliers {
                2
            } else {
                1
            };
        let memory = ctx.memory / searches;
        let search = keep_count.map(|k| TopK::new(k, n).with_memory(memory));
        let drop_search = drop_count.map(|k| TopK::new(k, n).with_memory(memory));
        models.push(Model {
            input,
            weight: round_as(
                ctx.compute,
                p.input_float(input, "weight").unwrap_or(0.0) as f32,
            ),
            keep_below: (variant.sparsify == Sparsify::Random && sparse)
                .then(|| keep_threshold(density)),
            key: ctx.rng_keys[input],
            keep: global
                .or_else(|| search.as_ref().and_then(TopK::result))
                .unwrap_or(Keep::ALL),
            search: search.filter(|s| s.result().is_none()),
            drop: drop_search
                .as_ref()
                .and_then(TopK::result)
                .unwrap_or(Keep::NONE),
            drop_search: drop_search.filter(|s| s.result().is_none()),
            prune,
            bits,
            l1: [0.0; 2],
            scale: 1.0,
        });
    }
    let weight_sum = round_as(ctx.compute, models.iter().map(|m| m.weight).sum());
    let sparse = models
        .iter()
        .any(|m| m.keep_below.is_some() || m.bits.is_some() || m.searching() || !m.keeps_all());
    Ok(Box::new(GtaMerger {
        variant,
        base,
        numel: ctx.numel,
        normalize: p.flag("normalize").unwrap_or(false),
        lambda: p.float("lambda").unwrap_or(1.0) as f32,
        rescale_pending: p.flag("rescale").unwrap_or(false) && sparse,
        in_l1_pass: false,
        plain_divisor: if weight_sum.abs() < 1e-8 {
            1.0
        } else {
            weight_sum
        },
        weights: models.iter().map(|m| m.weight).collect(),
        models,
        round: ctx.compute,
    }))
}

/// With `global_topk`, the model's threshold over its whole task vector: keep |δ| ≥ it.
fn global_threshold(ctx: &TensorContext, input: usize) -> Result<Option<Keep>> {
    if !ctx.params.flag("global_topk").unwrap_or(false) {
        return Ok(None);
    }
    let thresholds = ctx
        .model_stats
        .and_then(|s| s.downcast_ref::<super::global_topk::Thresholds>())
        .ok_or_else(|| {
            Error::tensor(ctx.name, "global_topk needs the model-wide statistics pass")
        })?;
    let model = ctx.models.get(input).copied().unwrap_or(input);
    let threshold = thresholds.0.get(&model).copied().unwrap_or(0.0);
    Ok(Some(Keep {
        bits: threshold.to_bits(),
        cutoff: usize::MAX,
    }))
}

/// DELLA's mask builder for one model, after mergekit's check that density ± ε lies in (0, 1).
fn magprune(ctx: &TensorContext, input: usize, density: f64) -> Result<MagPrune> {
    let epsilon = ctx.params.input_float(input, "epsilon").unwrap_or(0.15);
    if !(epsilon >= 0.0 && density - epsilon > 0.0 && density + epsilon < 1.0) {
        return Err(Error::tensor(
            ctx.name,
            format!("epsilon {epsilon} must keep density {density} ± epsilon inside (0, 1)"),
        ));
    }
    let row_len = row_length(ctx.shape, ctx.numel);
    if row_len as u64 > 1 << 32 {
        return Err(Error::tensor(
            ctx.name,
            format!("DELLA ranks within rows of at most 2³² elements; this one has {row_len}"),
        ));
    }
    Ok(MagPrune::new(
        ctx.numel,
        row_len,
        density,
        epsilon,
        ctx.rng_keys[input],
    ))
}

fn round_as(dtype: Option<Dtype>, x: f32) -> f32 {
    dtype.map_or(x, |d| round_to(d, x))
}

impl Model {
    /// Writes mask ⊙ δ · factor for one block (`Factor::ONE` for the L1 norms).
    fn masked_delta(&self, start: usize, x: &[f32], base: &[f32], factor: Factor, out: &mut [f32]) {
        if let Some(bits) = &self.bits {
            task_vectors::bitmask_delta(start, bits, x, base, factor, out);
        } else if let Some(below) = self.keep_below {
            let draws = Draws::at(self.key, start as u64);
            task_vectors::random_delta(start, draws, below, x, base, factor, out);
        } else if self.keeps_all() {
            task_vectors::scaled_delta(x, base, factor, out);
        } else {
            task_vectors::top_k_delta(start, self.keep, self.drop, x, base, factor, out);
        }
    }

    /// Whether the mask is a magnitude rule (`top_k_delta`), keeping everything included.
    fn masks_by_magnitude(&self) -> bool {
        self.bits.is_none() && self.keep_below.is_none()
    }

    fn factor(&self) -> Factor {
        Factor {
            scale: self.scale,
            weight: self.weight,
        }
    }

    fn keeps_all(&self) -> bool {
        self.keep == Keep::ALL && self.drop == Keep::NONE && self.bits.is_none()
    }

    /// Whether a mask is still being built (a top-k search or a DELLA mask).
    fn searching(&self) -> bool {
        self.search.is_some() || self.drop_search.is_some() || self.prune.is_some()
    }

    fn searches(&mut self) -> impl Iterator<Item = &mut TopK> {
        self.search.iter_mut().chain(self.drop_search.iter_mut())
    }
}

impl TensorMerger for GtaMerger {
    fn wants_pass(&self, _pass: usize) -> bool {
        self.models.iter().any(Model::searching) || self.rescale_pending
    }

    fn wants_block(&self, _pass: usize, start: usize) -> bool {
        let mut searches = self
            .models
            .iter()
            .flat_map(|m| m.search.iter().chain(m.drop_search.iter()))
            .peekable();
        searches.peek().is_none() || searches.any(|s| s.wants_block(start))
    }

    fn pass_row_len(&self) -> Option<usize> {
        self.models
            .iter()
            .find_map(|m| m.prune.as_ref().map(MagPrune::row_len))
    }

    fn observe(&mut self, _pass: usize, start: usize, inputs: &[&[f32]]) {
        let base = inputs[self.base];
        if self.models.iter().any(Model::searching) {
            for m in &mut self.models {
                let x = inputs[m.input];
                match (&mut m.search, &mut m.drop_search) {
                    (Some(keep), Some(drop)) => TopK::observe_both(keep, drop, start, x, base),
                    _ => m.searches().for_each(|s| s.observe(start, x, base)),
                }
                if let Some(prune) = &mut m.prune {
                    prune.observe(x, base);
                }
            }
            return;
        }
        self.in_l1_pass = true;
        let numel = self.numel;
        crate::kernels::with_scratch(base.len(), |kept| {
            for m in &mut self.models {
                let x = inputs[m.input];
                let (full, masked) = if let Some(below) = m.keep_below {
                    // DARE: the draws become a mask here, which the merge pass reads instead of
                    // drawing again (it takes `bits` over `keep_below`).
                    let bits = m.bits.get_or_insert_with(|| vec![0; numel.div_ceil(64)]);
                    let draws = Draws::at(m.key, start as u64);
                    task_vectors::random_mask_l1(start, draws, below, x, base, bits)
                } else {
                    m.masked_delta(start, x, base, Factor::ONE, kept);
                    task_vectors::l1_norms(x, base, kept)
                };
                m.l1[0] += full;
                m.l1[1] += masked;
            }
        });
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        // DELLA's masks come with their L1 norms: the other models' masks keep everything or
        // nothing, whose rescale is 1, so no L1 pass is left to run.
        let pruned = self.models.iter().any(|m| m.prune.is_some());
        for m in &mut self.models {
            m.searches().for_each(TopK::end_pass);
            if let Some(keep) = m.search.as_ref().and_then(TopK::result) {
                (m.keep, m.search) = (keep, None);
            }
            if let Some(drop) = m.drop_search.as_ref().and_then(TopK::result) {
                (m.drop, m.drop_search) = (drop, None);
            }
            if let Some(prune) = m.prune.take() {
                let (bits, l1) = prune.finish();
                m.bits = Some(bits);
                m.l1 = l1;
            }
            if self.in_l1_pass || (pruned && self.rescale_pending) {
                let [before, after] = m.l1;
                m.scale = if before < 1e-7 || after < 1e-7 {
                    1.0
                } else {
                    (before / after) as f32
                };
            }
        }
        if self.in_l1_pass || pruned {
            self.rescale_pending = false;
        }
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        // A piece at a time, so the deltas stay in the core's L1 cache between the loop that
        // makes them and the one that mixes them (elementwise: the same bytes at any piece size).
        for (piece, out) in out.chunks_mut(APPLY_PIECE).enumerate() {
            let first = piece * APPLY_PIECE;
            self.apply_piece(start, inputs, first..first + out.len(), out);
        }
    }
}

/// Elements per piece of `GtaMerger::apply`: its deltas, one input and the output fit L1.
const APPLY_PIECE: usize = 1024;

impl GtaMerger {
    /// Elements `range` of the block at `start`.
    fn apply_piece(&self, start: usize, inputs: &[&[f32]], range: Range<usize>, out: &mut [f32]) {
        let done = self.apply_bitmask_consensus(start, inputs, range.clone(), out);
        let (range, out) = (range.start + done..range.end, &mut out[done..]);
        let base = &inputs[self.base][range.clone()];
        let n = base.len();
        let models = self.models.len();
        if n == 0 {
            return;
        }
        if !self.variant.consensus && self.models.iter().all(Model::masks_by_magnitude) {
            // Each masked delta added straight into the sum (from +0.0, so that zero signs
            // come out as when the deltas were summed).
            crate::kernels::with_scratch(n, |mixed| {
                mixed.fill(0.0);
                for m in &self.models {
                    let x = &inputs[m.input][range.clone()];
                    let (at, factor) = (start + range.start, m.factor());
                    if m.keeps_all() {
                        task_vectors::scaled_add(x, base, factor, mixed);
                    } else {
                        task_vectors::top_k_add(at, m.keep, m.drop, x, base, factor, mixed);
                    }
                }
                self.finish_plain(base, mixed, out);
            });
            return;
        }
        crate::kernels::with_scratch(n * (models + 1), |scratch| {
            let (deltas, mixed) = scratch.split_at_mut(n * models);
            for (m, d) in self.models.iter().zip(deltas.chunks_exact_mut(n)) {
                let x = &inputs[m.input][range.clone()];
                m.masked_delta(start + range.start, x, base, m.factor(), d);
            }
            if self.variant.consensus {
                task_vectors::consensus_merge(deltas, &self.consensus(), base, out);
                return;
            }
            mixed.fill(0.0);
            for d in deltas.chunks_exact(n) {
                mixed.iter_mut().zip(d).for_each(|(s, x)| *s += x);
            }
            self.finish_plain(base, mixed, out);
        })
    }

    /// With sign consensus and bit masks (DELLA, DARE after its L1 pass), the masked deltas
    /// made and mixed in registers, without a pass through memory; returns how many of the
    /// piece's elements that did (none where the kernel does not apply).
    fn apply_bitmask_consensus(
        &self,
        start: usize,
        inputs: &[&[f32]],
        range: Range<usize>,
        out: &mut [f32],
    ) -> usize {
        let k = self.models.len();
        if !self.variant.consensus || k > 4 {
            return 0;
        }
        // On the stack: this runs for every piece of a thousand elements.
        let mut masks: [(&[u64], Factor); 4] = [(&[], Factor::ONE); 4];
        let mut models: [&[f32]; 4] = [&[]; 4];
        for (i, m) in self.models.iter().enumerate() {
            let Some(bits) = m.bits.as_deref() else {
                return 0;
            };
            masks[i] = (bits, m.factor());
            models[i] = &inputs[m.input][range.clone()];
        }
        let base = &inputs[self.base][range.clone()];
        let at = start + range.start;
        let masked = task_vectors::BitMasked {
            start: at,
            masks: &masks[..k],
            models: &models[..k],
        };
        task_vectors::bitmask_consensus(&masked, &self.consensus(), base, out)
    }

    fn consensus(&self) -> task_vectors::Consensus<'_> {
        task_vectors::Consensus {
            weights: &self.weights,
            round: self.round,
            normalize: self.normalize,
            lambda: self.lambda,
        }
    }

    /// out = base + the summed deltas, divided and scaled (the path without consensus).
    fn finish_plain(&self, base: &[f32], mixed: &[f32], out: &mut [f32]) {
        let (divisor, normalize) = (self.plain_divisor, self.normalize);
        task_vectors::finish(base, mixed, divisor, normalize, self.lambda, out);
    }
}
