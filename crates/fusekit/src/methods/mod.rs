//! Merge methods. Each file holds one method: its math and paper in a doc comment, its parameters
//! and defaults in a `MethodSpec`, the per-tensor merger, and a test against a plain formula.
//!
//! A method sees one output tensor at a time, in fixed-size blocks (`kernels::BLOCK`) of every
//! input decoded to f32. Methods that need whole-tensor statistics (TIES top-k, DARE's L1
//! rescale, SLERP's angle) ask for statistics passes over the blocks before `apply` (and may skip
//! blocks a pass does not need); every pass streams the blocks from the mapped files.

mod arcee_fusion;
mod breadcrumbs;
mod breadcrumbs_ties;
mod dare_linear;
mod dare_ties;
mod della;
mod della_linear;
mod fisher;
mod global_topk;
mod gta;
mod iso_c;
mod karcher;
mod linear;
mod model_stock;
mod multislerp;
mod nearswap;
mod nuslerp;
pub mod opcm;
mod passthrough;
mod pcb;
mod ram;
mod ramplus_tl;
mod sce;
mod slerp;
mod spectral;
mod task_arithmetic;
mod ties;
mod tsv;
mod varm;
mod widen;

use crate::config::Scalar;
use crate::error::Result;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One value per output tensor.
    Global,
    /// One value per input model, the base included.
    PerInput,
    /// One value per input model except the base.
    NonBase,
}

/// What a parameter accepts; values outside it are refused when the plan is built, with the
/// config line, before any tensor is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// Any finite number.
    Float,
    /// A number in [0, 1]: densities, ratios, shares.
    Fraction,
    /// A number ≥ 0: thresholds, tolerances.
    NonNegative,
    /// A whole number ≥ 1: iteration counts.
    Count,
    Bool,
}

impl ParamType {
    /// Why `value` is not a valid value of this type, if it is not.
    pub fn refuse(self, value: &Scalar) -> Option<String> {
        if self == ParamType::Bool {
            return value
                .as_bool()
                .is_none()
                .then(|| format!("{value} is not a boolean"));
        }
        let Some(x) = value.as_f64().filter(|x| x.is_finite()) else {
            return Some(format!("{value} is not a finite number"));
        };
        let outside = match self {
            ParamType::Fraction => !(0.0..=1.0).contains(&x),
            ParamType::NonNegative => x < 0.0,
            ParamType::Count => x < 1.0 || x.fract() != 0.0,
            ParamType::Float | ParamType::Bool => false,
        };
        outside.then(|| format!("{value} is outside {}", self.domain()))
    }

    /// The accepted values, in words.
    pub fn domain(self) -> &'static str {
        match self {
            ParamType::Float => "finite numbers",
            ParamType::Fraction => "[0, 1]",
            ParamType::NonNegative => "[0, ∞)",
            ParamType::Count => "the whole numbers ≥ 1",
            ParamType::Bool => "true and false",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub scope: Scope,
    pub ty: ParamType,
    /// `None` means required (except for the base model under `NonBase`).
    pub default: Option<Default>,
    pub doc: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    Float(f64),
    Bool(bool),
    /// Optional without a value (e.g. passthrough's `scale`).
    Unset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasePolicy {
    Unused,
    Optional,
    Required,
}

#[derive(Debug)]
pub struct MethodSpec {
    pub name: &'static str,
    pub summary: &'static str,
    pub reference: &'static str,
    pub params: &'static [ParamSpec],
    pub base: BasePolicy,
    pub min_inputs: usize,
    pub max_inputs: Option<usize>,
}

/// Parameter values resolved for one output tensor.
#[derive(Debug, Clone, Default)]
pub struct ResolvedParams {
    pub global: BTreeMap<&'static str, Scalar>,
    /// Indexed like the task's inputs.
    pub per_input: Vec<BTreeMap<&'static str, Scalar>>,
}

impl ResolvedParams {
    pub fn float(&self, name: &str) -> Option<f64> {
        self.global.get(name).and_then(Scalar::as_f64)
    }

    pub fn flag(&self, name: &str) -> Option<bool> {
        self.global.get(name).and_then(Scalar::as_bool)
    }

    pub fn input_float(&self, input: usize, name: &str) -> Option<f64> {
        self.per_input
            .get(input)?
            .get(name)
            .and_then(Scalar::as_f64)
    }
}

/// What a method knows about the tensor it merges.
pub struct TensorContext<'a> {
    pub name: &'a str,
    pub numel: usize,
    pub shape: &'a [usize],
    pub n_inputs: usize,
    pub base: Option<usize>,
    pub params: &'a ResolvedParams,
    /// One random stream key per input (see `rng`).
    pub rng_keys: &'a [u64],
    /// The config's compute dtype when narrower than f32: values mergekit converts into it (the
    /// per-model weights, their sums) are rounded to it.
    pub compute: Option<crate::dtype::Dtype>,
    /// Bytes of working memory this tensor's statistics may hold (a share of the budget).
    pub memory: usize,
    /// The plan's index of each input's model (the same model has the same index in every
    /// tensor; empty where unknown).
    pub models: &'a [usize],
    /// What the method's `ModelStatistics` gathered over the whole model, if it has any.
    pub model_stats: Option<&'a (dyn std::any::Any + Send + Sync)>,
}

/// How many statistics passes a method may ask for.
pub const MAX_PASSES: usize = 8;

/// The per-tensor state of a merge.
pub trait TensorMerger: Send + Sync {
    /// Whether statistics pass `pass` (0 .. MAX_PASSES, asked in order) is needed before `apply`.
    fn wants_pass(&self, _pass: usize) -> bool {
        false
    }
    /// Whether pass `pass` needs the block starting at `start` (others are not even read).
    fn wants_block(&self, _pass: usize, _start: usize) -> bool {
        true
    }
    /// One block of every input, in index order within a pass.
    fn observe(&mut self, _pass: usize, _start: usize, _inputs: &[&[f32]]) {}
    /// The length of rows that statistics passes work on whole (DELLA's masks), so that blocks
    /// can hold whole rows rather than pieces to reassemble.
    fn pass_row_len(&self) -> Option<usize> {
        None
    }
    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        Ok(())
    }
    /// Writes the merged values of one block. Blocks may come in any order.
    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]);
}

/// Statistics over every tensor of the model, gathered in passes before any tensor is merged
/// (the reference TIES's global top-k, PCB's quantiles). Tensors come in plan order, the blocks
/// of each in index order, so the result does not depend on scheduling.
pub trait ModelStatistics: Send {
    fn wants_pass(&self, pass: usize) -> bool;
    /// An empty copy that gathers one tensor's share of a pass (tensors run in parallel) …
    fn fork(&self) -> Box<dyn ModelStatistics>;
    /// … added back with this, in plan order, so sums come out the same whatever the threads.
    fn absorb(&mut self, part: Box<dyn ModelStatistics>);
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
    fn observe(&mut self, pass: usize, tensor: &TensorContext, start: usize, inputs: &[&[f32]]);
    fn end_pass(&mut self, pass: usize) -> Result<()>;
    /// What every tensor's merger then finds in `TensorContext::model_stats`.
    fn finish(self: Box<Self>) -> std::sync::Arc<dyn std::any::Any + Send + Sync>;
}

/// Per-model statistics a method reads beside the weights, from `data:` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Companion {
    /// The diagonal Fisher of each input model.
    Fisher,
}

impl Companion {
    /// The key under `data.MODEL` that names the statistics checkpoint.
    pub fn key(self) -> &'static str {
        match self {
            Companion::Fisher => "fisher",
        }
    }
}

pub trait Method: Send + Sync {
    fn spec(&self) -> &'static MethodSpec;
    /// Statistics each input model needs beside its weights. A method with a companion sees, in
    /// every block, the inputs' views followed by their companions' views in the same order
    /// (`views.len() == 2 · n_inputs`).
    fn companion(&self) -> Option<Companion> {
        None
    }
    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>>;
    /// Bytes a tensor's merge (or its share of a model-wide statistics pass) holds beyond the
    /// streaming share: whole matrices and their decompositions. The executor starts tensors
    /// only while these fit the memory budget.
    fn held_bytes(&self, _ctx: &TensorContext) -> usize {
        0
    }
    /// Model-wide statistics the merge of these tensors needs first, if any.
    fn model_statistics(
        &self,
        _tensors: &[TensorContext],
    ) -> Result<Option<Box<dyn ModelStatistics>>> {
        Ok(None)
    }
}

/// Methods that run the models over data first (`fusekit-nn`): the coefficient learners hand
/// the engine an ordinary `task_arithmetic` config; `regmean` solves its layers there.
pub const LEARNED: &[&str] = &["adamerging", "atlas", "expert_merging", "regmean"];

static METHODS: &[&dyn Method] = &[
    &linear::Linear,
    &task_arithmetic::TaskArithmetic,
    &ties::Ties,
    &dare_ties::DareTies,
    &dare_linear::DareLinear,
    &della::Della,
    &della_linear::DellaLinear,
    &slerp::Slerp,
    &passthrough::Passthrough,
    &nearswap::Nearswap,
    &breadcrumbs::Breadcrumbs,
    &breadcrumbs_ties::BreadcrumbsTies,
    &ram::Ram,
    &ramplus_tl::RamPlusTl,
    &sce::Sce,
    &multislerp::Multislerp,
    &karcher::Karcher,
    &nuslerp::Nuslerp,
    &model_stock::ModelStock,
    &arcee_fusion::ArceeFusion,
    &varm::Varm,
    &widen::Widen,
    &tsv::Tsv,
    &iso_c::IsoC,
    &pcb::Pcb,
    &pcb::PcbPerTensor,
    &opcm::Opcm,
    &fisher::Fisher,
];

pub fn all() -> &'static [&'static dyn Method] {
    METHODS
}

pub fn lookup(name: &str) -> Option<&'static dyn Method> {
    METHODS.iter().copied().find(|m| m.spec().name == name)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Runs a merger the way the executor does, over one in-memory tensor.
    use super::*;
    use crate::kernels::BLOCK;

    pub fn run(
        method: &dyn Method,
        inputs: &[Vec<f32>],
        base: Option<usize>,
        params: ResolvedParams,
        seed: u64,
    ) -> Vec<f32> {
        run_seeded(method, inputs, inputs.len(), base, params, seed)
    }

    /// Runs a method that reads companions: `inputs` holds the `n_models` models' tensors, then
    /// their companions' in the same order.
    pub fn run_companions(
        method: &dyn Method,
        inputs: &[Vec<f32>],
        n_models: usize,
        base: Option<usize>,
        params: ResolvedParams,
    ) -> Vec<f32> {
        run_seeded(method, inputs, n_models, base, params, 0)
    }

    fn run_seeded(
        method: &dyn Method,
        inputs: &[Vec<f32>],
        n_inputs: usize,
        base: Option<usize>,
        params: ResolvedParams,
        seed: u64,
    ) -> Vec<f32> {
        let numel = inputs[0].len();
        let keys: Vec<u64> = (0..n_inputs)
            .map(|i| crate::rng::stream_key(seed, "t", i))
            .collect();
        let ctx = TensorContext {
            name: "t",
            numel,
            shape: &[numel],
            n_inputs,
            base,
            params: &params,
            rng_keys: &keys,
            compute: None,
            memory: 1 << 30,
            models: &[],
            model_stats: None,
        };
        run_ctx(method, inputs, &ctx)
    }

    /// Runs a merger for an explicit context (shape, parameters, keys).
    pub fn run_ctx(method: &dyn Method, inputs: &[Vec<f32>], ctx: &TensorContext) -> Vec<f32> {
        let numel = ctx.numel;
        // Each input its own model, unless the test says otherwise.
        let ids: Vec<usize> = (0..ctx.n_inputs).collect();
        let models = if ctx.models.is_empty() {
            &ids[..]
        } else {
            ctx.models
        };
        let ctx = &TensorContext { models, ..*ctx };
        let stats = model_statistics(method, inputs, ctx);
        let ctx = &TensorContext {
            model_stats: stats.as_deref(),
            ..*ctx
        };
        let mut merger = method.merger(ctx).unwrap();
        for pass in 0..MAX_PASSES {
            if !merger.wants_pass(pass) {
                continue;
            }
            for start in (0..numel).step_by(BLOCK) {
                if !merger.wants_block(pass, start) {
                    continue;
                }
                let end = (start + BLOCK).min(numel);
                let blocks: Vec<&[f32]> = inputs.iter().map(|x| &x[start..end]).collect();
                merger.observe(pass, start, &blocks);
            }
            merger.end_pass(pass).unwrap();
        }
        assert!(
            !merger.wants_pass(MAX_PASSES),
            "statistics unfinished after MAX_PASSES"
        );
        let mut out = vec![0f32; numel];
        for start in (0..numel).step_by(BLOCK) {
            let end = (start + BLOCK).min(numel);
            let blocks: Vec<&[f32]> = inputs.iter().map(|x| &x[start..end]).collect();
            merger.apply(start, &blocks, &mut out[start..end]);
        }
        out
    }

    /// A context for tests: base 0, each input its own model, 1 MiB of statistics memory.
    pub fn context<'a>(
        name: &'a str,
        shape: &'a [usize],
        params: &'a ResolvedParams,
        keys: &'a [u64],
    ) -> TensorContext<'a> {
        TensorContext {
            name,
            numel: shape.iter().product(),
            shape,
            n_inputs: keys.len(),
            base: Some(0),
            params,
            rng_keys: keys,
            compute: None,
            memory: 1 << 20,
            models: &[],
            model_stats: None,
        }
    }

    /// The method's model-wide statistics over this one tensor, as the executor gathers them.
    fn model_statistics(
        method: &dyn Method,
        inputs: &[Vec<f32>],
        ctx: &TensorContext,
    ) -> Option<std::sync::Arc<dyn std::any::Any + Send + Sync>> {
        let mut stats = method
            .model_statistics(std::slice::from_ref(ctx))
            .unwrap()?;
        for pass in 0..MAX_PASSES {
            if !stats.wants_pass(pass) {
                continue;
            }
            for start in (0..ctx.numel).step_by(BLOCK) {
                let end = (start + BLOCK).min(ctx.numel);
                let blocks: Vec<&[f32]> = inputs.iter().map(|x| &x[start..end]).collect();
                stats.observe(pass, ctx, start, &blocks);
            }
            stats.end_pass(pass).unwrap();
        }
        Some(stats.finish())
    }

    pub fn params(
        global: &[(&'static str, Scalar)],
        per_input: Vec<Vec<(&'static str, Scalar)>>,
    ) -> ResolvedParams {
        ResolvedParams {
            global: global.iter().cloned().collect(),
            per_input: per_input
                .into_iter()
                .map(|p| p.into_iter().collect())
                .collect(),
        }
    }

    /// Deterministic pseudo-random test data.
    pub fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let key = crate::rng::stream_key(seed, "data", 0);
        (0..n)
            .map(|i| (crate::rng::uniform(key, i as u64) as f32 - 0.5) * 2.0 * scale)
            .collect()
    }
}

#[cfg(test)]
mod degenerate_inputs {
    //! Every method on the inputs that break naive formulas: identical models (zero task vectors),
    //! colinear task vectors, 1-element and tiny tensors. Merging copies of one model must give
    //! that model, and nothing may come out non-finite.
    use super::testing::*;
    use super::*;

    /// Parameters as the planner resolves them, with the required ones (and densities, so the
    /// sparsifiers run) set to middling values.
    fn params_for(spec: &MethodSpec, n: usize, base: Option<usize>) -> ResolvedParams {
        let value = |p: &ParamSpec| -> Option<Scalar> {
            let chosen = match p.name {
                "weight" | "density" | "t" => Some(0.5),
                "epsilon" => Some(0.1),
                _ => None,
            };
            match (chosen, p.default, p.ty) {
                (Some(v), _, _) => Some(Scalar::Number(v)),
                (None, Some(Default::Float(v)), _) => Some(Scalar::Number(v)),
                (None, Some(Default::Bool(b)), _) => Some(Scalar::Bool(b)),
                (None, None, ParamType::Bool) => Some(Scalar::Bool(false)),
                (None, None, _) => Some(Scalar::Number(0.5)),
                (None, Some(Default::Unset), _) => None,
            }
        };
        let mut resolved = ResolvedParams {
            global: BTreeMap::new(),
            per_input: vec![BTreeMap::new(); n],
        };
        for p in spec.params {
            let Some(v) = value(p) else { continue };
            match p.scope {
                Scope::Global => {
                    resolved.global.insert(p.name, v);
                }
                Scope::PerInput | Scope::NonBase => {
                    for (i, map) in resolved.per_input.iter_mut().enumerate() {
                        if p.scope == Scope::PerInput || Some(i) != base {
                            map.insert(p.name, v.clone());
                        }
                    }
                }
            }
        }
        resolved
    }

    fn merge(method: &dyn Method, inputs: &[Vec<f32>], shape: &[usize]) -> Vec<f32> {
        let spec = method.spec();
        let base = (spec.base != BasePolicy::Unused && inputs.len() > 1).then_some(0);
        let params = params_for(spec, inputs.len(), base);
        let keys: Vec<u64> = (0..inputs.len())
            .map(|i| crate::rng::stream_key(1, "edge", i))
            .collect();
        let ctx = TensorContext {
            base,
            ..context("edge", shape, &params, &keys)
        };
        if method.companion().is_none() {
            return run_ctx(method, inputs, &ctx);
        }
        // Companions (Fisher diagonals): positive, different per model.
        let mut with_stats = inputs.to_vec();
        for (i, x) in inputs.iter().enumerate() {
            with_stats.push(x.iter().map(|v| v * v + 0.1 * i as f32 + 0.01).collect());
        }
        run_ctx(method, &with_stats, &ctx)
    }

    fn input_count(spec: &MethodSpec) -> usize {
        spec.min_inputs.max(3).min(spec.max_inputs.unwrap_or(3))
    }

    #[test]
    fn copies_of_one_model_merge_to_that_model() {
        for method in all() {
            let name = method.spec().name;
            let n = input_count(method.spec());
            for shape in [vec![1], vec![3], vec![1, 3], vec![7, 5], vec![5000]] {
                let numel = shape.iter().product();
                let x = data(numel, 4, 1.0);
                let out = merge(*method, &vec![x.clone(); n], &shape);
                for (o, v) in out.iter().zip(&x) {
                    assert!(
                        (o - v).abs() <= 1e-6 * v.abs().max(1.0),
                        "{name} {shape:?}: {o} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn colinear_and_tiny_task_vectors_stay_finite() {
        for method in all() {
            let name = method.spec().name;
            let n = input_count(method.spec());
            for shape in [vec![1], vec![2], vec![3, 1], vec![64, 33]] {
                let numel = shape.iter().product();
                let base = data(numel, 5, 1.0);
                let direction = data(numel, 6, 0.01);
                // Model i is base + i·d: every task vector points the same way.
                let inputs: Vec<Vec<f32>> = (0..n)
                    .map(|i| {
                        base.iter()
                            .zip(&direction)
                            .map(|(b, d)| b + i as f32 * d)
                            .collect()
                    })
                    .collect();
                let out = merge(*method, &inputs, &shape);
                assert!(
                    out.iter().all(|v| v.is_finite()),
                    "{name} {shape:?}: {out:?}"
                );
                // Colinear models stay on their line, between its extremes (λ = 1 everywhere) —
                // except where a method reshapes the task vectors' spectrum (truncating or
                // flattening singular values leaves the line by design).
                if matches!(name, "tsv" | "iso_c") {
                    continue;
                }
                for (j, o) in out.iter().enumerate() {
                    let (lo, hi) = (0..n)
                        .map(|i| inputs[i][j])
                        .fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(v), h.max(v)));
                    let slack = 1e-5 + 2.0 * (hi - lo);
                    assert!(
                        *o >= lo - slack && *o <= hi + slack,
                        "{name} {shape:?}[{j}]: {o} outside [{lo}, {hi}]"
                    );
                }
            }
        }
    }
}
