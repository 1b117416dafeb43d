//! Learned task-arithmetic coefficients: the merged model is θ = θ₀ + Σᵢ λᵢ,g · τᵢ (τᵢ the task
//! vector of expert i, g the coefficient group of a tensor), and the λ are trained by gradient
//! descent through the model itself, each task's batch run with that task's own head.
//!
//! - **AdaMerging** (Yang et al., ICLR 2024, arXiv:2310.02575; `methods.md` §14.6): the
//!   objective is the Shannon entropy of the predictions on *unlabeled* task inputs, summed over
//!   tasks. Layer-wise AdaMerging learns one λ per task and tensor, task-wise one per task.
//!   Defaults as the reference: λ initialised to 0.3, Adam with learning rate 10⁻³.
//! - **aTLAS** (Zhang et al., NeurIPS 2024, arXiv:2407.03093; `methods.md` §6): one λ per task
//!   and tensor, initialised to 0 (the pre-trained model), trained with AdamW (weight decay 0.1)
//!   on the cross-entropy of a few *labelled* examples.
//! - **Expert Merging** (Zhang et al., ICLR 2026; `methods.md` §5): coefficients c = sigmoid(a)
//!   per task and 2-D weight matrix (embeddings, norms, biases and heads keep the base), a
//!   initialised so that c = 0.1, trained to match each expert's predictions on its own unlabeled
//!   inputs (T²·CE(softmax(z_k/T), log_softmax(z/T))) plus λ_reg·Σ|c − init| / (coefficients per
//!   task); AdamW, lr 0.5, weight decay 10⁻⁵. Optionally also the hidden states of chosen layers
//!   are pulled towards the expert's: + w_h · mean_ℓ MSE(h^ℓ, h^ℓ_k) (`hidden_layers`,
//!   `hidden_weight`, default 1; padding tokens left out).
//! - **Expert Merging++**: a coefficient per contiguous chunk of a tensor (torch.chunk's
//!   split: ⌈N/C⌉ elements a chunk, fewer chunks when N is small), either `chunks` for every
//!   tensor or a `chunk_budget` shared out by importance: a first run with one coefficient per
//!   tensor scores I_p = mean_k c_{p,k}·‖τ_{p,k}‖₂ / numel_p, and tensor p gets
//!   max(1, round(budget · I_p / Σ I)) chunks (the spec's proposal: the paper does not give its
//!   formula).
//!
//! Task heads (`classifier.*`, `head.*`) are never merged: each task keeps its expert's. What
//! was learned is written out as a plain `task_arithmetic` config (one `filter` per tensor), so
//! the merge itself is the streaming engine's and can be rerun without training. Chunked
//! coefficients are finer than a config can say: that merge is written by the runtime, with
//! every coefficient in `learned.json` beside the weights.

use crate::eval::{read_examples, Classifier, Example, Forward};
use crate::ops::{cross_entropy, log_softmax_last_dim, softmax_last_dim};
use crate::weights::{is_head, Weights};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Entropy of the predictions, no labels (AdaMerging).
    Entropy,
    /// Cross-entropy against the labels (aTLAS).
    CrossEntropy,
    /// Cross-entropy against each expert's own softened predictions at this temperature
    /// (Expert Merging).
    Distill { temperature: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One λ per task.
    Task,
    /// One λ per task and tensor ("layer-wise").
    Tensor,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CoefficientOptions {
    pub objective: Objective,
    pub granularity: Granularity,
    /// The coefficient at the start.
    pub init: f64,
    /// Coefficients are `sigmoid(a)` of the trained `a`, kept in (0, 1) (Expert Merging), instead
    /// of the trained value itself.
    pub sigmoid: bool,
    /// Merge only 2-D weight matrices (not embeddings); everything else keeps the base.
    pub matrices_only: bool,
    /// Weight of the L1 pull of the coefficients towards `init`, per task.
    pub regularizer: f64,
    pub steps: usize,
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Examples per task per step.
    pub batch_size: usize,
    /// Examples read per task (the first N of its file).
    pub examples: usize,
    pub max_len: usize,
    /// Layers (indices into the hidden states: 0 the embeddings or input, ℓ the output of layer
    /// ℓ) whose states the merged model matches to the expert's (distillation only).
    pub hidden_layers: Vec<usize>,
    /// Weight of that hidden-state term.
    pub hidden_weight: f64,
    pub chunks: Chunks,
}

/// How many coefficients each tensor gets per expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Chunks {
    /// This many contiguous chunks of every tensor.
    Each(usize),
    /// Expert Merging++: this many in all, shared out by importance after a first run.
    Budget(usize),
}

impl CoefficientOptions {
    /// AdaMerging's defaults (layer-wise, entropy, Adam at 10⁻³, λ from 0.3).
    pub fn adamerging() -> Self {
        CoefficientOptions {
            objective: Objective::Entropy,
            granularity: Granularity::Tensor,
            init: 0.3,
            sigmoid: false,
            matrices_only: false,
            regularizer: 0.0,
            steps: 100,
            learning_rate: 1e-3,
            weight_decay: 0.0,
            batch_size: 16,
            examples: 256,
            max_len: 128,
            hidden_layers: Vec::new(),
            hidden_weight: 1.0,
            chunks: Chunks::Each(1),
        }
    }

    /// aTLAS's (per tensor, cross-entropy on a few labels, λ from 0, AdamW decay 0.1).
    pub fn atlas() -> Self {
        CoefficientOptions {
            objective: Objective::CrossEntropy,
            init: 0.0,
            weight_decay: 0.1,
            examples: 64,
            ..Self::adamerging()
        }
    }

    /// Expert Merging's (sigmoid coefficients of the weight matrices from 0.1, distillation at
    /// T = 1, λ_reg = 5, AdamW at 0.5 with decay 10⁻⁵, 5 prompts per task).
    pub fn expert_merging() -> Self {
        CoefficientOptions {
            objective: Objective::Distill { temperature: 1.0 },
            init: 0.1,
            sigmoid: true,
            matrices_only: true,
            regularizer: 5.0,
            learning_rate: 0.5,
            weight_decay: 1e-5,
            examples: 5,
            batch_size: 1,
            ..Self::adamerging()
        }
    }

    /// The defaults of method `name`.
    pub fn for_method(name: &str) -> Option<Self> {
        match name {
            "adamerging" => Some(Self::adamerging()),
            "atlas" => Some(Self::atlas()),
            "expert_merging" => Some(Self::expert_merging()),
            _ => None,
        }
    }

    /// The trained value that gives coefficient `c`.
    fn raw(&self, c: f64) -> f64 {
        if self.sigmoid {
            let c = c.clamp(1e-6, 1.0 - 1e-6);
            (c / (1.0 - c)).ln()
        } else {
            c
        }
    }

    /// The coefficient of trained value `a`.
    fn coefficient(&self, a: &Tensor) -> Result<Tensor> {
        Ok(if self.sigmoid {
            crate::ops::sigmoid(a)?
        } else {
            a.clone()
        })
    }
}

/// One expert and its task's data.
#[derive(Debug, Clone)]
pub struct Expert {
    pub model: String,
    pub data: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Learned {
    /// Per expert: λ by group (a tensor name, or `*` for task-wise), one per chunk.
    pub coefficients: Vec<BTreeMap<String, Vec<f64>>>,
    /// The objective at every step (summed over tasks).
    pub losses: Vec<f64>,
}

const TASK_GROUP: &str = "*";

/// What the coefficients are trained on: the base, each expert with its examples, and the task
/// vectors of the merged tensors.
struct Problem {
    base: Weights,
    tasks: Vec<(Weights, Vec<Example>)>,
    names: Vec<String>,
    vectors: Vec<BTreeMap<String, Tensor>>,
}

/// Trains the coefficients of `experts` over `base`.
pub fn learn(
    base: &str,
    experts: &[Expert],
    options: &CoefficientOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Learned> {
    learn_loaded(&load(base, experts, options)?, options, progress)
}

fn learn_loaded(
    problem: &Problem,
    options: &CoefficientOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Learned> {
    match options.chunks {
        Chunks::Each(n) => {
            let counts = problem.names.iter().map(|n_| (n_.clone(), n)).collect();
            train(problem, &counts, options, progress)
        }
        Chunks::Budget(budget) => {
            let whole = problem.names.iter().map(|n| (n.clone(), 1)).collect();
            let first = train(problem, &whole, options, &|done, total| {
                progress(done, 2 * total)
            })?;
            let counts = allocate(problem, &first, budget)?;
            train(problem, &counts, options, &|done, total| {
                progress(total + done, 2 * total)
            })
        }
    }
}

fn load(base: &str, experts: &[Expert], options: &CoefficientOptions) -> Result<Problem> {
    let device = Device::Cpu;
    crate::memory::check(
        base,
        crate::memory::parameters(base)?,
        crate::memory::learned_copies(experts.len()),
    )?;
    let base_w = Weights::load(base, &device, false)?;
    let mut tasks = Vec::new();
    for e in experts {
        let w = Weights::load(&e.model, &device, false)?;
        let examples = read_examples(&e.data, Some(options.examples))?;
        if examples.is_empty() {
            return Err(Error::model(
                e.data.display().to_string(),
                "holds no examples",
            ));
        }
        tasks.push((w, examples));
    }
    let names = merged_tensors(&base_w, options.matrices_only);
    if names.is_empty() {
        return Err(Error::model(base, "has no tensor to merge"));
    }
    let vectors = task_vectors(&base_w, &tasks, &names)?;
    Ok(Problem {
        base: base_w,
        tasks,
        names,
        vectors,
    })
}

/// Expert Merging++'s allocation of `budget` chunks over the tensors, by the importance the
/// first run's coefficients give them.
fn allocate(problem: &Problem, first: &Learned, budget: usize) -> Result<BTreeMap<String, usize>> {
    let mut importance = BTreeMap::new();
    for name in &problem.names {
        let numel = problem.vectors[0][name].elem_count().max(1) as f64;
        let mut sum = 0.0;
        for (k, vectors) in problem.vectors.iter().enumerate() {
            let c = first.coefficients[k]
                .get(name)
                .or_else(|| first.coefficients[k].get(TASK_GROUP))
                .map_or(0.0, |c| c[0]);
            let norm = vectors[name].sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            sum += c.abs() * norm.sqrt();
        }
        importance.insert(name.clone(), sum / problem.vectors.len() as f64 / numel);
    }
    let total: f64 = importance.values().sum();
    Ok(importance
        .into_iter()
        .map(|(name, i)| {
            let numel = problem.vectors[0][&name].elem_count().max(1);
            let share = if total > 0.0 { i / total } else { 0.0 };
            let chunks = ((budget as f64 * share).round() as usize).clamp(1, numel);
            (name, chunks)
        })
        .collect())
}

/// torch.chunk's split of `n` elements into at most `chunks`: ⌈n / chunks⌉ a chunk.
fn chunk_size(n: usize, chunks: usize) -> usize {
    n.div_ceil(chunks.max(1)).max(1)
}

/// The chunk of every element, as an index into the coefficients.
fn chunk_index(n: usize, chunks: usize, device: &Device) -> Result<Tensor> {
    let size = chunk_size(n, chunks);
    let index: Vec<u32> = (0..n).map(|i| (i / size) as u32).collect();
    Ok(Tensor::from_vec(index, n, device)?)
}

/// `tv` scaled by its chunks' coefficients `c` (`[chunks]`).
fn scale_chunks(tv: &Tensor, c: &Tensor, index: Option<&Tensor>) -> Result<Tensor> {
    Ok(match index {
        None => tv.broadcast_mul(c)?,
        Some(index) => {
            let per_element = c.index_select(index, 0)?.reshape(tv.shape())?;
            (tv * per_element)?
        }
    })
}

fn train(
    problem: &Problem,
    counts: &BTreeMap<String, usize>,
    options: &CoefficientOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Learned> {
    let device = Device::Cpu;
    let Problem {
        base: base_w,
        tasks,
        names,
        vectors,
    } = problem;
    let chunked = counts.values().any(|&c| c > 1);
    if chunked && options.granularity == Granularity::Task {
        return Err(Error::model(
            "config",
            "chunked coefficients need `granularity: tensor`",
        ));
    }
    // One trained vector per (expert, group): a group is a tensor, or every tensor (task-wise).
    let group = |name: &str| match options.granularity {
        Granularity::Task => TASK_GROUP.to_string(),
        Granularity::Tensor => name.to_string(),
    };
    let count_of = |g: &str| counts.get(g).copied().unwrap_or(1).max(1);
    let indices: BTreeMap<&str, Tensor> = names
        .iter()
        .filter(|n| count_of(n) > 1)
        .map(|n| {
            let numel = vectors[0][n].elem_count();
            Ok((n.as_str(), chunk_index(numel, count_of(n), &device)?))
        })
        .collect::<Result<_>>()?;
    let mut raw: Vec<BTreeMap<String, Var>> = Vec::new();
    for _ in tasks {
        let mut map = BTreeMap::new();
        for name in names {
            let g = group(name);
            let chunks = count_of(&g);
            if let std::collections::btree_map::Entry::Vacant(slot) = map.entry(g) {
                let start = vec![options.raw(options.init) as f32; chunks];
                slot.insert(Var::from_vec(start, chunks, &device)?);
            }
        }
        raw.push(map);
    }
    let all_vars: Vec<Var> = raw.iter().flat_map(|m| m.values().cloned()).collect();
    let per_task =
        (all_vars.iter().map(|v| v.elem_count()).sum::<usize>() / tasks.len().max(1)).max(1) as f64;
    let mut optimizer = AdamW::new(
        all_vars,
        ParamsAdamW {
            lr: options.learning_rate,
            weight_decay: options.weight_decay,
            ..Default::default()
        },
    )?;
    let mut losses = Vec::with_capacity(options.steps);
    for step in 0..options.steps {
        let coefficients: Vec<BTreeMap<&str, Tensor>> = raw
            .iter()
            .map(|m| {
                m.iter()
                    .map(|(g, v)| Ok((g.as_str(), options.coefficient(v.as_tensor())?)))
                    .collect::<Result<_>>()
            })
            .collect::<Result<_>>()?;
        let mut merged = BTreeMap::new();
        for (name, t) in base_w.tensors().filter(|(n, _)| !is_head(n)) {
            let mut theta = t.clone();
            // Tensors without a task vector (left out by `matrices_only`) keep the base.
            if vectors[0].contains_key(name) {
                for (tv, c) in vectors.iter().zip(&coefficients) {
                    let scaled =
                        scale_chunks(&tv[name], &c[group(name).as_str()], indices.get(name))?;
                    theta = (theta + scaled)?;
                }
            }
            merged.insert(name.to_string(), theta);
        }
        let mut total = Tensor::new(0f32, &device)?;
        for (w, examples) in tasks {
            let batch = batch_at(examples, step, options.batch_size);
            let mut values = merged.clone();
            for (name, t) in w.tensors().filter(|(n, _)| is_head(n)) {
                values.insert(name.to_string(), t.clone());
            }
            let model = Weights::from_tensors(&w.reference, w.config.clone(), values);
            let student = Classifier::new(&model, options.max_len)?.forward(&batch)?;
            let loss = match options.objective {
                Objective::Entropy => entropy(&student.logits)?,
                Objective::CrossEntropy => {
                    let labels: Vec<u32> = batch.iter().map(Example::label).collect();
                    cross_entropy(&student.logits, &Tensor::new(labels, &device)?)?
                }
                Objective::Distill { temperature } => {
                    let teacher = Classifier::new(w, options.max_len)?.forward(&batch)?;
                    let soft = distillation(&student.logits, &teacher.logits, temperature)?;
                    if options.hidden_layers.is_empty() {
                        soft
                    } else {
                        let hidden = hidden_alignment(&student, &teacher, &options.hidden_layers)?;
                        (soft + (hidden * options.hidden_weight)?)?
                    }
                }
            };
            total = (total + loss)?;
        }
        if options.regularizer > 0.0 {
            let mut pull = Tensor::new(0f32, &device)?;
            for c in coefficients.iter().flat_map(|m| m.values()) {
                pull = (pull + (c - options.init)?.abs()?.sum_all()?)?;
            }
            total = (total + (pull * (options.regularizer / per_task))?)?;
        }
        losses.push(total.to_scalar::<f32>()? as f64);
        optimizer.backward_step(&total)?;
        progress(step as u64 + 1, options.steps as u64);
    }
    let coefficients = raw
        .iter()
        .map(|m| {
            let value = |g: &str, used: usize| -> Result<Vec<f64>> {
                let all = options.coefficient(m[g].as_tensor())?.to_vec1::<f32>()?;
                Ok(all.iter().take(used).map(|&c| c as f64).collect())
            };
            if options.granularity == Granularity::Task && !options.matrices_only {
                return Ok([(TASK_GROUP.to_string(), value(TASK_GROUP, 1)?)].into());
            }
            names
                .iter()
                .map(|n| {
                    // torch.chunk makes fewer chunks than asked when a tensor is small.
                    let numel = vectors[0][n].elem_count();
                    let used = numel.div_ceil(chunk_size(numel, count_of(n))).max(1);
                    Ok((n.clone(), value(&group(n), used)?))
                })
                .collect::<Result<BTreeMap<_, _>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Learned {
        coefficients,
        losses,
    })
}

/// Mean over `layers` of the mean squared difference of the student's and the teacher's hidden
/// states (real tokens only).
fn hidden_alignment(student: &Forward, teacher: &Forward, layers: &[usize]) -> Result<Tensor> {
    let mut total = Tensor::new(0f32, student.logits.device())?;
    for &l in layers {
        let (Some(s), Some(t)) = (student.hidden_states.get(l), teacher.hidden_states.get(l))
        else {
            return Err(Error::model(
                "config",
                format!(
                    "`parameters.hidden_layers`: {l} is past the model's {} hidden states",
                    student.hidden_states.len()
                ),
            ));
        };
        let squared = (s - t.detach())?.sqr()?;
        let width = *squared.dims().last().unwrap_or(&1) as f64;
        let mse = match &student.mask {
            Some(mask) => {
                let mask = mask.to_dtype(candle_core::DType::F32)?;
                let per_token = squared.sum(D::Minus1)?;
                let count = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
                ((per_token * &mask)?.sum_all()? / (count * width))?
            }
            None => squared.mean_all()?,
        };
        total = (total + mse)?;
    }
    Ok((total / layers.len() as f64)?)
}

/// The tensors a learned merge changes: everything but the heads, or only the 2-D weight
/// matrices that are not embeddings.
fn merged_tensors(base: &Weights, matrices_only: bool) -> Vec<String> {
    base.tensors()
        .filter(|(n, t)| !is_head(n) && (!matrices_only || (t.rank() == 2 && !n.contains("embed"))))
        .map(|(n, _)| n.to_string())
        .collect()
}

/// τ = expert − base of every merged tensor, per expert.
fn task_vectors(
    base: &Weights,
    tasks: &[(Weights, Vec<Example>)],
    names: &[String],
) -> Result<Vec<BTreeMap<String, Tensor>>> {
    tasks
        .iter()
        .map(|(w, _)| {
            names
                .iter()
                .map(|name| {
                    let theta0 = tensor_of(base, name)?;
                    let theta = w.get(name, theta0.dims())?;
                    Ok((name.clone(), (theta - &theta0)?))
                })
                .collect()
        })
        .collect()
}

/// T² · mean over rows of CE(softmax(teacher/T), log_softmax(student/T)).
fn distillation(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let target = softmax_last_dim(&(teacher / temperature)?)?.detach();
    let log_q = log_softmax_last_dim(&(student / temperature)?)?;
    let ce = (target * log_q)?.sum(D::Minus1)?.neg()?.mean_all()?;
    Ok((ce * (temperature * temperature))?)
}

fn tensor_of(w: &Weights, name: &str) -> Result<Tensor> {
    w.tensors()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| t.clone())
        .ok_or_else(|| Error::model(&w.reference, format!("has no tensor `{name}`")))
}

/// The examples of step `step`: a window that walks through the data and wraps around.
fn batch_at(examples: &[Example], step: usize, size: usize) -> Vec<Example> {
    let size = size.max(1);
    (0..size)
        .map(|i| examples[(step * size + i) % examples.len()].clone())
        .collect()
}

/// Mean Shannon entropy of the rows' predictive distributions.
fn entropy(logits: &Tensor) -> Result<Tensor> {
    let p = softmax_last_dim(logits)?;
    let log_p = log_softmax_last_dim(logits)?;
    Ok((p * log_p)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

/// The learned merge as a `task_arithmetic` config: each expert's `weight` is its task-wise λ,
/// or one `filter` per tensor (the full name, which no other tensor name contains).
pub fn task_arithmetic_config(base: &str, experts: &[Expert], learned: &Learned) -> String {
    let mut yaml = format!("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n");
    for (expert, lambdas) in experts.iter().zip(&learned.coefficients) {
        yaml.push_str(&format!("  - model: {}\n    parameters:\n", expert.model));
        match lambdas.get(TASK_GROUP) {
            Some(l) => yaml.push_str(&format!("      weight: {}\n", l[0])),
            None => {
                yaml.push_str("      weight:\n");
                for (name, l) in lambdas {
                    yaml.push_str(&format!(
                        "        - filter: \"{name}\"\n          value: {}\n",
                        l[0]
                    ));
                }
                // Heads are not learned: they are not merged in use.
                yaml.push_str("        - value: 0\n");
            }
        }
    }
    yaml
}

/// A config of `merge_method: adamerging | atlas` as the YAML gives it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnedMergeConfig {
    merge_method: String,
    base_model: String,
    models: Vec<LearnedModel>,
    /// `MODEL: {file: JSONL}`: each expert's task data.
    data: BTreeMap<String, DataFile>,
    #[serde(default)]
    parameters: LearnParameters,
    #[serde(default)]
    dtype: Option<String>,
}

/// `models:` entries of a data-aware config.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LearnedModel {
    pub(crate) model: String,
}

/// `data: {MODEL: {file}}` entries.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DataFile {
    pub(crate) file: PathBuf,
}

/// The `merge_method` of a config, read from its text without parsing the rest.
pub(crate) fn method_of(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("merge_method:"))
        .map(|m| m.trim().trim_matches(['"', '\'']))
}

/// Each model with its `data` file; a model without one is an error naming it.
pub(crate) fn experts_of(
    method: &str,
    models: &[LearnedModel],
    data: &BTreeMap<String, DataFile>,
) -> Result<Vec<Expert>> {
    models
        .iter()
        .map(|m| {
            let entry = data.get(&m.model).ok_or_else(|| {
                Error::model(
                    "config",
                    format!("`{method}` needs `data: {{{}: {{file: JSONL}}}}`", m.model),
                )
            })?;
            Ok(Expert {
                model: m.model.clone(),
                data: entry.file.clone(),
            })
        })
        .collect()
}

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnParameters {
    steps: Option<usize>,
    learning_rate: Option<f64>,
    init: Option<f64>,
    /// `task` or `tensor`.
    granularity: Option<String>,
    batch_size: Option<usize>,
    examples: Option<usize>,
    max_len: Option<usize>,
    weight_decay: Option<f64>,
    regularizer: Option<f64>,
    /// Expert Merging's distillation temperature.
    temperature: Option<f64>,
    /// Expert Merging's hidden-state alignment: layers and weight.
    hidden_layers: Option<Vec<usize>>,
    hidden_weight: Option<f64>,
    /// Expert Merging++: chunks of every tensor, or a budget shared out by importance.
    chunks: Option<usize>,
    chunk_budget: Option<usize>,
}

/// What a learned merge leaves to do.
pub struct LearnedMerge {
    pub learned: Learned,
    /// The `task_arithmetic` config that merges with the learned coefficients (what was learned
    /// in its leading comments); `None` when they are chunked and the merged model was written
    /// to OUT here.
    pub config: Option<String>,
}

/// For an `adamerging | atlas | expert_merging` config: learns the coefficients; `None` for
/// any other method.
pub fn learned_config(
    text: &str,
    out: &std::path::Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Option<LearnedMerge>> {
    if !method_of(text).is_some_and(|m| fusekit::methods::LEARNED.contains(&m) && m != "regmean") {
        return Ok(None);
    }
    let config: LearnedMergeConfig =
        serde_saphyr::from_str(text).map_err(|e| Error::model("config", e.to_string()))?;
    let options = options_of(&config)?;
    let experts = experts_of(&config.merge_method, &config.models, &config.data)?;
    let problem = load(&config.base_model, &experts, &options)?;
    let learned = learn_loaded(&problem, &options, progress)?;
    let chunked = learned
        .coefficients
        .iter()
        .any(|m| m.values().any(|c| c.len() > 1));
    if chunked {
        let dtype =
            fusekit::dtype::Dtype::from_config(config.dtype.as_deref().unwrap_or("float32"))?;
        write_chunked(&config, &problem, &experts, &learned, &options, out, dtype)?;
        return Ok(Some(LearnedMerge {
            learned,
            config: None,
        }));
    }
    let mut yaml = format!(
        "# Learned by fusekit {} ({:?} objective, {:?} coefficients): {} steps, objective {:.6} → {:.6}.\n# Rerun this merge without training: fusekit merge THIS_FILE OUT\n",
        config.merge_method,
        options.objective,
        options.granularity,
        learned.losses.len(),
        learned.losses.first().copied().unwrap_or(f64::NAN),
        learned.losses.last().copied().unwrap_or(f64::NAN),
    );
    yaml.push_str(&task_arithmetic_config(
        &config.base_model,
        &experts,
        &learned,
    ));
    if let Some(dtype) = &config.dtype {
        yaml.push_str(&format!("dtype: {dtype}\n"));
    }
    Ok(Some(LearnedMerge {
        learned,
        config: Some(yaml),
    }))
}

/// The method's defaults with the config's `parameters` over them.
fn options_of(config: &LearnedMergeConfig) -> Result<CoefficientOptions> {
    let mut options =
        CoefficientOptions::for_method(&config.merge_method).expect("checked: a learned method");
    let p = &config.parameters;
    options.steps = p.steps.unwrap_or(options.steps);
    options.learning_rate = p.learning_rate.unwrap_or(options.learning_rate);
    options.init = p.init.unwrap_or(options.init);
    options.batch_size = p.batch_size.unwrap_or(options.batch_size);
    options.examples = p.examples.unwrap_or(options.examples);
    options.max_len = p.max_len.unwrap_or(options.max_len);
    options.weight_decay = p.weight_decay.unwrap_or(options.weight_decay);
    options.regularizer = p.regularizer.unwrap_or(options.regularizer);
    let bad = |m: String| Error::model("config", m);
    if let Objective::Distill { temperature } = &mut options.objective {
        *temperature = p.temperature.unwrap_or(*temperature);
        options.hidden_layers = p.hidden_layers.clone().unwrap_or_default();
        options.hidden_weight = p.hidden_weight.unwrap_or(options.hidden_weight);
    } else if p.temperature.is_some() || p.hidden_layers.is_some() || p.hidden_weight.is_some() {
        return Err(bad(format!(
            "`parameters`: temperature and hidden_layers belong to expert_merging, not `{}`",
            config.merge_method
        )));
    }
    options.chunks = match (p.chunks, p.chunk_budget) {
        (None, None) => options.chunks,
        (Some(n), None) if n >= 1 => Chunks::Each(n),
        (None, Some(b)) if b >= 1 => Chunks::Budget(b),
        (Some(_), Some(_)) => {
            return Err(bad(
                "`parameters`: give `chunks` or `chunk_budget`, not both".into(),
            ))
        }
        _ => return Err(bad("`parameters`: chunk counts must be at least 1".into())),
    };
    options.granularity = match p.granularity.as_deref() {
        None | Some("tensor") => Granularity::Tensor,
        Some("task") => Granularity::Task,
        Some(other) => {
            return Err(bad(format!(
                "`parameters.granularity`: `{other}` is neither `task` nor `tensor`"
            )))
        }
    };
    Ok(options)
}

/// Writes base + Σ_k τ_k scaled chunk by chunk to `out` (heads from the base, as the config
/// path leaves them), with every coefficient in `learned.json`.
fn write_chunked(
    config: &LearnedMergeConfig,
    problem: &Problem,
    experts: &[Expert],
    learned: &Learned,
    options: &CoefficientOptions,
    out: &std::path::Path,
    dtype: fusekit::dtype::Dtype,
) -> Result<()> {
    let device = Device::Cpu;
    let mut tensors = Vec::new();
    for (name, t) in problem.base.tensors() {
        let mut theta = t.clone();
        for (k, vectors) in problem.vectors.iter().enumerate() {
            let Some(tv) = vectors.get(name) else {
                continue;
            };
            let c = learned.coefficients[k]
                .get(name)
                .or_else(|| learned.coefficients[k].get(TASK_GROUP))
                .ok_or_else(|| Error::model(name, "has no learned coefficient"))?;
            let values: Vec<f32> = c.iter().map(|&v| v as f32).collect();
            let index = (c.len() > 1)
                .then(|| chunk_index(tv.elem_count(), c.len(), &device))
                .transpose()?;
            let c = Tensor::from_vec(values, c.len(), &device)?;
            theta = (theta + scale_chunks(tv, &c, index.as_ref())?)?;
        }
        tensors.push((name.to_string(), theta));
    }
    let about = serde_json::json!({
        "method": config.merge_method,
        "base_model": config.base_model,
        "options": options,
        "models": experts.iter().zip(&learned.coefficients).map(|(e, c)| serde_json::json!({
            "model": e.model, "data": e.data, "coefficients": c,
        })).collect::<Vec<_>>(),
        "losses": learned.losses,
    });
    let mut files = vec![(
        "learned.json",
        (serde_json::to_string_pretty(&about).expect("plain JSON") + "\n").into_bytes(),
    )];
    files.extend(crate::weights::tokenizer_files(&config.base_model)?);
    crate::weights::save_as(out, &problem.base.config, &tensors, &files, dtype)
}
