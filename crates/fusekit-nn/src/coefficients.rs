//! Learned task-arithmetic coefficients: the merged model is θ = θ₀ + Σᵢ λᵢ,g · τᵢ (τᵢ the task
//! vector of expert i, g the coefficient group of a tensor), and the λ are trained by gradient
//! descent through the model itself, each task's batch run with that task's own head.
//!
//! - **AdaMerging** (Yang et al., ICLR 2024, arXiv:2310.02575; `methods.md` §14.6): the
//!   objective is the Shannon entropy of the predictions on *unlabeled* task inputs, summed over
//!   tasks. Layer-wise AdaMerging learns one λ per task and tensor, task-wise one per task.
//!   Defaults as the reference: λ initialised to 0.3, Adam with learning rate 10⁻³.
//! - **aTLAS** (Zhang et al., NeurIPS 2024, arXiv:2407.03093; `methods.md` §6): one λ per task
//!   and tensor, trained on the cross-entropy of a few *labelled* examples.
//!
//! Task heads (`classifier.*`, `head.*`) are never merged: each task keeps its expert's. What
//! was learned is written out as a plain `task_arithmetic` config (one `filter` per tensor), so
//! the merge itself is the streaming engine's and can be rerun without training.

use crate::eval::{read_examples, Classifier, Example};
use crate::ops::{cross_entropy, log_softmax_last_dim, softmax_last_dim};
use crate::weights::{is_head, Weights};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Entropy of the predictions, no labels (AdaMerging).
    Entropy,
    /// Cross-entropy against the labels (aTLAS).
    CrossEntropy,
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
    /// λ at the start.
    pub init: f64,
    pub steps: usize,
    pub learning_rate: f64,
    /// Examples per task per step.
    pub batch_size: usize,
    /// Examples read per task (the first N of its file).
    pub examples: usize,
    pub max_len: usize,
}

impl CoefficientOptions {
    /// AdaMerging's defaults (layer-wise, entropy).
    pub fn adamerging() -> Self {
        CoefficientOptions {
            objective: Objective::Entropy,
            granularity: Granularity::Tensor,
            init: 0.3,
            steps: 100,
            learning_rate: 1e-3,
            batch_size: 16,
            examples: 256,
            max_len: 128,
        }
    }

    /// aTLAS's (per tensor, cross-entropy on a few labels).
    pub fn atlas() -> Self {
        CoefficientOptions {
            objective: Objective::CrossEntropy,
            examples: 64,
            ..Self::adamerging()
        }
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
    /// Per expert: λ by group (a tensor name, or `*` for task-wise).
    pub coefficients: Vec<BTreeMap<String, f64>>,
    /// The objective at every step (summed over tasks).
    pub losses: Vec<f64>,
}

const TASK_GROUP: &str = "*";

/// Trains the coefficients of `experts` over `base`.
pub fn learn(
    base: &str,
    experts: &[Expert],
    options: &CoefficientOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Learned> {
    let device = Device::Cpu;
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
    // Task vectors of every merged (non-head) tensor.
    let names: Vec<String> = base_w
        .tensors()
        .map(|(n, _)| n.to_string())
        .filter(|n| !is_head(n))
        .collect();
    let mut vectors: Vec<BTreeMap<&str, Tensor>> = Vec::new();
    for (w, _) in &tasks {
        let mut tv = BTreeMap::new();
        for name in &names {
            let theta0 = tensor_of(&base_w, name)?;
            let theta = w.get(name, theta0.dims())?;
            tv.insert(name.as_str(), (theta - &theta0)?);
        }
        vectors.push(tv);
    }
    let group = |name: &str| match options.granularity {
        Granularity::Task => TASK_GROUP.to_string(),
        Granularity::Tensor => name.to_string(),
    };
    let mut lambdas: Vec<BTreeMap<String, Var>> = Vec::new();
    for _ in experts {
        let mut map = BTreeMap::new();
        for name in &names {
            map.entry(group(name))
                .or_insert(Var::new(options.init as f32, &device)?);
        }
        lambdas.push(map);
    }
    let all_vars: Vec<Var> = lambdas.iter().flat_map(|m| m.values().cloned()).collect();
    let mut optimizer = AdamW::new(
        all_vars,
        ParamsAdamW {
            lr: options.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut losses = Vec::with_capacity(options.steps);
    for step in 0..options.steps {
        let mut merged = BTreeMap::new();
        for name in &names {
            let mut theta = tensor_of(&base_w, name)?;
            for (tv, lambda) in vectors.iter().zip(&lambdas) {
                let l = lambda[&group(name)].as_tensor();
                theta = (theta + tv[name.as_str()].broadcast_mul(l)?)?;
            }
            merged.insert(name.clone(), theta);
        }
        let mut total: Option<Tensor> = None;
        for (w, examples) in &tasks {
            let mut values = merged.clone();
            for (name, t) in w.tensors().filter(|(n, _)| is_head(n)) {
                values.insert(name.to_string(), t.clone());
            }
            let model = Weights::from_tensors(&w.reference, w.config.clone(), values);
            let classifier = Classifier::new(&model, options.max_len)?;
            let batch = batch_at(examples, step, options.batch_size);
            let logits = classifier.logits(&batch)?;
            let loss = match options.objective {
                Objective::Entropy => entropy(&logits)?,
                Objective::CrossEntropy => {
                    let labels: Vec<u32> = batch.iter().map(Example::label).collect();
                    cross_entropy(&logits, &Tensor::new(labels, &device)?)?
                }
            };
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
        }
        let total = total.expect("at least one expert");
        losses.push(total.to_scalar::<f32>()? as f64);
        optimizer.backward_step(&total)?;
        progress(step as u64 + 1, options.steps as u64);
    }
    let coefficients = lambdas
        .iter()
        .map(|m| {
            m.iter()
                .map(|(g, v)| Ok((g.clone(), v.as_tensor().to_scalar::<f32>()? as f64)))
                .collect::<Result<BTreeMap<_, _>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Learned {
        coefficients,
        losses,
    })
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
            Some(l) => yaml.push_str(&format!("      weight: {l}\n")),
            None => {
                yaml.push_str("      weight:\n");
                for (name, l) in lambdas {
                    yaml.push_str(&format!(
                        "        - filter: \"{name}\"\n          value: {l}\n"
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnedModel {
    model: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    file: PathBuf,
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
}

/// For an `adamerging` or `atlas` config: learns the coefficients and returns the
/// `task_arithmetic` config that merges with them (what was learned in its leading comments);
/// `None` for any other method.
pub fn learned_config(
    text: &str,
    progress: &dyn Fn(u64, u64),
) -> Result<Option<(String, Learned)>> {
    let method = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("merge_method:"))
        .map(|m| m.trim().trim_matches(['"', '\'']).to_string());
    if !method
        .as_deref()
        .is_some_and(|m| fusekit::methods::LEARNED.contains(&m))
    {
        return Ok(None);
    }
    let config: LearnedMergeConfig =
        serde_saphyr::from_str(text).map_err(|e| Error::model("config", e.to_string()))?;
    let mut options = match config.merge_method.as_str() {
        "atlas" => CoefficientOptions::atlas(),
        _ => CoefficientOptions::adamerging(),
    };
    let p = &config.parameters;
    options.steps = p.steps.unwrap_or(options.steps);
    options.learning_rate = p.learning_rate.unwrap_or(options.learning_rate);
    options.init = p.init.unwrap_or(options.init);
    options.batch_size = p.batch_size.unwrap_or(options.batch_size);
    options.examples = p.examples.unwrap_or(options.examples);
    options.max_len = p.max_len.unwrap_or(options.max_len);
    options.granularity = match p.granularity.as_deref() {
        None | Some("tensor") => Granularity::Tensor,
        Some("task") => Granularity::Task,
        Some(other) => {
            return Err(Error::model(
                "config",
                format!("`parameters.granularity`: `{other}` is neither `task` nor `tensor`"),
            ))
        }
    };
    let experts = config
        .models
        .iter()
        .map(|m| {
            let data = config.data.get(&m.model).ok_or_else(|| {
                Error::model(
                    "config",
                    format!(
                        "`{}` needs `data: {{{}: {{file: JSONL}}}}`",
                        config.merge_method, m.model
                    ),
                )
            })?;
            Ok(Expert {
                model: m.model.clone(),
                data: data.file.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let learned = learn(&config.base_model, &experts, &options, progress)?;
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
    Ok(Some((yaml, learned)))
}
