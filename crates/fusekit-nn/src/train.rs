//! Fine-tuning a classifier on a JSONL task, to make the experts that merges combine
//! (`fusekit finetune`): AdamW on cross-entropy over seeded shuffled batches, with a fresh head
//! when the model has none for this task, and a pattern choosing which tensors train (the rest
//! stay frozen, e.g. the lower layers of an encoder).

use crate::eval::{read_examples, Classifier, Example};
use crate::models::mlp;
use crate::ops::cross_entropy;
use crate::weights::{is_head, save_with, Weights};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::path::Path;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainOptions {
    pub steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    /// Examples read (the first N of the file).
    pub examples: usize,
    /// Classes of the task; a head of another size (or none) is replaced by a fresh one.
    pub num_labels: Option<usize>,
    /// Tensors whose names match train; all others stay frozen. `None` trains everything.
    pub trainable: Option<String>,
    /// Seed of the batch order and of a fresh head.
    pub seed: u64,
    pub max_len: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 200,
            learning_rate: 1e-3,
            weight_decay: 0.01,
            batch_size: 32,
            examples: usize::MAX,
            num_labels: None,
            trainable: None,
            seed: 0,
            max_len: 128,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    /// The loss of every step.
    pub losses: Vec<f64>,
    pub trained_tensors: usize,
    pub seconds: f64,
}

/// Fine-tunes `model` on the JSONL file `data` and writes the result to `out` (with
/// `finetune.json`).
pub fn finetune(
    model: &str,
    data: &Path,
    out: &Path,
    options: &TrainOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<TrainReport> {
    let examples = read_examples(data, Some(options.examples))?;
    if examples.is_empty() {
        return Err(Error::model(
            data.display().to_string(),
            "holds no examples",
        ));
    }
    finetune_examples(
        model,
        &examples,
        &data.display().to_string(),
        out,
        options,
        progress,
    )
}

/// Fine-tunes `model` on `examples` (described as `data` in `finetune.json`) and writes the
/// result to `out`.
pub fn finetune_examples(
    model: &str,
    examples: &[Example],
    data: &str,
    out: &Path,
    options: &TrainOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<TrainReport> {
    let started = std::time::Instant::now();
    // Weights, gradients and AdamW's two moments.
    crate::memory::check(
        model,
        crate::memory::parameters(model)?,
        crate::memory::FINETUNE_COPIES,
    )?;
    if examples.is_empty() {
        return Err(Error::model(data, "holds no examples"));
    }
    let examples = &examples[..examples.len().min(options.examples)];
    let labels = options.num_labels.unwrap_or_else(|| {
        examples
            .iter()
            .map(|e| e.label() as usize + 1)
            .max()
            .unwrap_or(1)
    });
    let loaded = Weights::load(model, &Device::Cpu, false)?;
    let w = with_head(&loaded, labels, options.seed)?;
    let pattern = options
        .trainable
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| Error::model("--train", e.to_string()))?;
    // A fresh head always trains: nothing else could make it fit the task.
    let trains = |name: &str| is_head(name) || pattern.as_ref().is_none_or(|p| p.is_match(name));
    let mut vars = Vec::new();
    let mut values = std::collections::BTreeMap::new();
    for (name, t) in w.tensors() {
        if trains(name) {
            let var = Var::from_tensor(t)?;
            values.insert(name.to_string(), var.as_tensor().clone());
            vars.push((name.to_string(), var));
        } else {
            values.insert(name.to_string(), t.clone());
        }
    }
    let trainable = Weights::from_tensors(&w.reference, w.config.clone(), values);
    let classifier = Classifier::new(&trainable, options.max_len)?;
    let mut optimizer = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: options.learning_rate,
            weight_decay: options.weight_decay,
            ..Default::default()
        },
    )?;
    let order = fusekit::rng::permutation(options.seed, "batches", examples.len());
    let batch = options.batch_size.max(1);
    let mut losses = Vec::with_capacity(options.steps);
    for step in 0..options.steps {
        let picked: Vec<_> = (0..batch)
            .map(|i| examples[order[(step * batch + i) % order.len()]].clone())
            .collect();
        let targets: Vec<u32> = picked.iter().map(|e| e.label()).collect();
        let loss = cross_entropy(
            &classifier.logits(&picked)?,
            &Tensor::new(targets, &Device::Cpu)?,
        )?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        optimizer.backward_step(&loss)?;
        progress(step as u64 + 1, options.steps as u64);
    }
    let tensors: Vec<(String, Tensor)> = trainable
        .tensors()
        .map(|(n, t)| (n.to_string(), t.detach()))
        .collect();
    let report = TrainReport {
        losses,
        trained_tensors: vars.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let about =
        serde_json::json!({"model": model, "data": data, "options": options, "report": report});
    let mut files = vec![(
        "finetune.json",
        (serde_json::to_string_pretty(&about).expect("plain JSON") + "\n").into_bytes(),
    )];
    files.extend(crate::weights::tokenizer_files(model)?);
    save_with(out, &trainable.config, &tensors, &files)?;
    Ok(report)
}

/// Writes `model` with a fresh head of `labels` classes to `out`: the common starting point of
/// experts that will be merged (a merge needs every model, the base included, to have the same
/// tensors).
pub fn add_head(model: &str, labels: usize, seed: u64, out: &Path) -> Result<()> {
    let w = with_head(&Weights::load(model, &Device::Cpu, false)?, labels, seed)?;
    let tensors: Vec<(String, Tensor)> = w
        .tensors()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    save_with(
        out,
        &w.config,
        &tensors,
        &crate::weights::tokenizer_files(model)?,
    )
}

/// `w` with a head of `labels` classes: its own if it has one of that size, else a fresh one
/// (uniform ±1/√fan-in weights, zero bias, from `seed`). A BERT given a fresh head pools by
/// mean, the sentence-transformers convention.
fn with_head(w: &Weights, labels: usize, seed: u64) -> Result<Weights> {
    let is_mlp = w.config.get("model_type").and_then(|t| t.as_str()) == Some(mlp::MODEL_TYPE);
    let name = if is_mlp { "head" } else { "classifier" };
    let weight = format!("{name}.weight");
    if w.contains(&weight) && w.head_labels(&weight)? == labels {
        return Ok(Weights::from_tensors(
            &w.reference,
            w.config.clone(),
            w.tensors()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
        ));
    }
    let width = if is_mlp {
        *mlp::MlpConfig::from_weights(w)?
            .trunk_sizes
            .last()
            .expect("checked")
    } else {
        w.config_usize("hidden_size")?
    };
    let bound = 1.0 / (width as f64).sqrt();
    let key = fusekit::rng::stream_key(seed, &weight, 0);
    let init: Vec<f32> = (0..(labels * width) as u64)
        .map(|i| ((fusekit::rng::uniform(key, i) * 2.0 - 1.0) * bound) as f32)
        .collect();
    let mut values: std::collections::BTreeMap<String, Tensor> = w
        .tensors()
        .filter(|(n, _)| !is_head(n))
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    values.insert(
        weight,
        Tensor::from_vec(init, (labels, width), &Device::Cpu)?,
    );
    values.insert(
        format!("{name}.bias"),
        Tensor::zeros(labels, candle_core::DType::F32, &Device::Cpu)?,
    );
    let mut config = w.config.clone();
    config["num_labels"] = labels.into();
    if !is_mlp {
        config["fusekit_pooling"] = "mean".into();
    }
    Ok(Weights::from_tensors(&w.reference, config, values))
}
