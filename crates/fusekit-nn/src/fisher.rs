//! The diagonal Fisher information of a classifier's parameters on its task's data, the
//! statistics of Fisher merging (Matena & Raffel 2022, `methods.md` §1):
//!
//!   F(j) = (1/N) Σₓ Σ_y p(y|x) · (∂ log p(y|x) / ∂θⱼ)²        (exact: every class)
//!
//! squared per example before any sum (one backward pass per example and class; MergeLM's
//! batched form adds cross terms and is not this estimator). `Sampled` draws one y ~ p(·|x)
//! from a seeded counter-based stream, `Empirical` uses the gold label. The result is written
//! as a checkpoint with the model's tensor names, in f32 (bf16 Fishers underflow), beside a
//! `fisher.json` saying how it was made; `merge_method: fisher` reads it from `data:`.

use crate::eval::{read_examples, Classifier};
use crate::models::llama::Llama;
use crate::text::TextEncoder;
use crate::weights::{save_with, Weights};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FisherKind {
    /// Every class, weighted by the model's probability (the paper's estimator).
    Exact,
    /// One class drawn from the model's distribution per example.
    Sampled,
    /// The gold label.
    Empirical,
}

impl std::str::FromStr for FisherKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(FisherKind::Exact),
            "sampled" => Ok(FisherKind::Sampled),
            "empirical" => Ok(FisherKind::Empirical),
            other => Err(format!(
                "unknown Fisher `{other}` (exact, sampled, empirical)"
            )),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FisherOptions {
    pub kind: FisherKind,
    /// The first this many examples of the data (the reference uses 4096).
    pub examples: usize,
    pub seed: u64,
    /// Longest text in tokens.
    pub max_len: usize,
}

impl Default for FisherOptions {
    fn default() -> Self {
        FisherOptions {
            kind: FisherKind::Exact,
            examples: 256,
            seed: 0,
            max_len: 128,
        }
    }
}

/// The diagonal Fisher of every parameter of `model` (a BERT or MLP classifier) on `data`.
pub fn diagonal_fisher(
    model: &str,
    data: &Path,
    options: &FisherOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<(String, Tensor)>> {
    // Weights, their gradients and the running sums.
    crate::memory::check(
        model,
        crate::memory::parameters(model)?,
        crate::memory::FISHER_COPIES,
    )?;
    let w = Weights::load(model, &Device::Cpu, true)?;
    let mut sums: Sums = w
        .vars()
        .map(|(name, var)| Ok((name, var.as_tensor().zeros_like()?)))
        .collect::<Result<_>>()?;
    let count = if crate::eval::is_decoder(&w) {
        decoder_fisher(&w, data, options, &mut sums, progress)?
    } else {
        classifier_fisher(&w, data, options, &mut sums, progress)?
    };
    if count == 0 {
        return Err(Error::model(
            data.display().to_string(),
            "holds no examples",
        ));
    }
    sums.into_iter()
        .map(|(name, sum)| Ok((name.to_string(), (sum / count as f64)?)))
        .collect()
}

type Sums<'a> = BTreeMap<&'a str, Tensor>;

/// Adds `weight · g²` of every parameter's gradient in `grads` to its sum.
fn accumulate(
    w: &Weights,
    sums: &mut Sums,
    grads: &candle_core::backprop::GradStore,
    weight: f64,
) -> Result<()> {
    for (name, var) in w.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            let sum = sums.get_mut(name).expect("every var");
            *sum = (&*sum + (g.sqr()? * weight)?)?;
        }
    }
    Ok(())
}

/// Classifiers: every example, every class (exact) or one. Returns the number of examples.
fn classifier_fisher(
    w: &Weights,
    data: &Path,
    options: &FisherOptions,
    sums: &mut Sums,
    progress: &dyn Fn(u64, u64),
) -> Result<usize> {
    let classifier = Classifier::new(w, options.max_len)?;
    let examples = read_examples(data, Some(options.examples))?;
    for (index, example) in examples.iter().enumerate() {
        let logits = classifier
            .logits(std::slice::from_ref(example))?
            .squeeze(0)?;
        let log_p = crate::ops::log_softmax_last_dim(&logits)?;
        let p = log_p.exp()?.detach().to_vec1::<f32>()?;
        let classes: Vec<(usize, f32)> = match options.kind {
            FisherKind::Exact => p.iter().copied().enumerate().collect(),
            FisherKind::Sampled => {
                let key = fusekit::rng::stream_key(options.seed, "fisher", 0);
                vec![(sample(&p, fusekit::rng::uniform(key, index as u64)), 1.0)]
            }
            FisherKind::Empirical => {
                let label = example.label() as usize;
                if label >= p.len() {
                    return Err(Error::model(
                        data.display().to_string(),
                        format!(
                            "label {label} of example {index} exceeds the {} classes",
                            p.len()
                        ),
                    ));
                }
                vec![(label, 1.0)]
            }
        };
        for (class, weight) in classes {
            accumulate(w, sums, &log_p.get(class)?.backward()?, weight as f64)?;
        }
        progress(index as u64 + 1, examples.len() as u64);
    }
    Ok(examples.len())
}

/// Causal LMs: a "class" is the next token at every position (our extension of the paper,
/// `methods.md` §1): the gold next token (empirical) or one drawn from the model (sampled), one
/// backward pass per position, squared per position. Returns the number of positions.
fn decoder_fisher(
    w: &Weights,
    data: &Path,
    options: &FisherOptions,
    sums: &mut Sums,
    progress: &dyn Fn(u64, u64),
) -> Result<usize> {
    if options.kind == FisherKind::Exact {
        return Err(Error::model(
            &w.reference,
            "the exact Fisher of a causal LM sums over the whole vocabulary at every position: \
             use `sampled` or `empirical`",
        ));
    }
    let texts = crate::eval::read_texts(data, options.examples)?;
    let decoder = Llama::new(w)?;
    let encoder =
        TextEncoder::from_model_dir(&crate::weights::model_dir(&w.reference)?, options.max_len)?;
    let mut positions = 0;
    for (index, text) in texts.iter().enumerate() {
        let tokens = encoder.batch(&[text.as_str()], &Device::Cpu)?;
        let ids = tokens.ids.squeeze(0)?.to_vec1::<u32>()?;
        let log_p = crate::ops::log_softmax_last_dim(
            &decoder.forward(&tokens.ids, &tokens.mask)?.squeeze(0)?,
        )?;
        let key = fusekit::rng::stream_key(options.seed, "fisher", index);
        for t in 0..ids.len().saturating_sub(1) {
            let row = log_p.get(t)?;
            let next = match options.kind {
                FisherKind::Empirical => ids[t + 1] as usize,
                _ => sample(
                    &row.exp()?.detach().to_vec1::<f32>()?,
                    fusekit::rng::uniform(key, t as u64),
                ),
            };
            accumulate(w, sums, &row.get(next)?.backward()?, 1.0)?;
            positions += 1;
        }
        progress(index as u64 + 1, texts.len() as u64);
    }
    Ok(positions)
}

/// The class whose cumulative probability first exceeds `u` ∈ [0, 1).
fn sample(p: &[f32], u: f64) -> usize {
    let mut acc = 0f64;
    for (i, &pi) in p.iter().enumerate() {
        acc += pi as f64;
        if u < acc {
            return i;
        }
    }
    p.len() - 1
}

/// Computes the Fisher and writes it to `out` as a checkpoint, with `fisher.json` (kind,
/// examples, seed, data, model) beside it.
pub fn write_fisher(
    model: &str,
    data: &Path,
    out: &Path,
    options: &FisherOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let fisher = diagonal_fisher(model, data, options, progress)?;
    let config = fusekit::checkpoint::Checkpoint::open(model)?.config;
    let total: f64 = fisher
        .iter()
        .map(|(_, t)| Ok(t.sum_all()?.to_scalar::<f32>()? as f64))
        .sum::<Result<f64>>()?;
    let about = serde_json::json!({
        "statistics": "diagonal Fisher",
        "model": model,
        "data": data.display().to_string(),
        "options": options,
        "sum": total,
    });
    let about = serde_json::to_string_pretty(&about).expect("plain JSON") + "\n";
    save_with(
        out,
        &config,
        &fisher,
        &[("fisher.json", about.into_bytes())],
    )?;
    Ok(())
}

/// For a `merge_method: fisher` config whose `data:` gives a model's task `file` instead of its
/// `fisher` statistics: computes them into `dir/N` and returns the config with `fisher: dir/N`
/// in place of each `file` (options `kind` and `examples` read from the same entry). `None` when
/// there is nothing to compute.
pub fn fisher_config(
    text: &str,
    dir: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Option<String>> {
    let bad = |m: String| Error::model("config", m);
    let mut config: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| bad(e.to_string()))?;
    if config.get("merge_method").and_then(|m| m.as_str()) != Some("fisher") {
        return Ok(None);
    }
    let Some(data) = config.get_mut("data").and_then(|d| d.as_object_mut()) else {
        return Ok(None);
    };
    let mut computed = false;
    for (i, (model, entry)) in data.iter_mut().enumerate() {
        let Some(entry) = entry.as_object_mut() else {
            continue;
        };
        if entry.contains_key("fisher") {
            continue;
        }
        let Some(file) = entry.get("file").and_then(|f| f.as_str()) else {
            continue;
        };
        let mut options = FisherOptions::default();
        if let Some(kind) = entry.get("kind").and_then(|k| k.as_str()) {
            options.kind = kind
                .parse()
                .map_err(|e| bad(format!("`data.{model}.kind`: {e}")))?;
        }
        if let Some(n) = entry.get("examples").and_then(|n| n.as_u64()) {
            options.examples = n as usize;
        }
        let out = dir.join(i.to_string());
        write_fisher(model, Path::new(file), &out, &options, progress)?;
        entry.clear();
        entry.insert("fisher".into(), out.display().to_string().into());
        computed = true;
    }
    if !computed {
        return Ok(None);
    }
    serde_saphyr::to_string(&config)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}
