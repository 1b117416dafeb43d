//! Does a model work? Perplexity of a causal LM on a text file, accuracy of a classifier
//! (a BERT encoder with a `classifier` head, or an MLP) on a JSONL file of
//! `{"text": …, "label": k}` or `{"input": [numbers…], "label": k}` lines.
//!
//! `head` evaluates a merged trunk with a task's own head: the head tensors (`classifier.*` or
//! `head.*`) and the label count are taken from that checkpoint instead.

use crate::models::bert::{mean_pool, Bert};
use crate::models::llama::Llama;
use crate::models::mlp::{self, Mlp};
use crate::ops::{linear, log_softmax_last_dim};
use crate::text::TextEncoder;
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum Task {
    /// Perplexity over `text`, cut into windows of `context` tokens.
    Perplexity { text: PathBuf, context: usize },
    /// Accuracy over a JSONL file of labelled examples.
    Classification { data: PathBuf },
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub batch_size: usize,
    /// Evaluate only the first this many examples (or windows).
    pub limit: Option<usize>,
    /// A checkpoint whose head replaces the model's own.
    pub head: Option<String>,
    /// Longest text, in tokens, for classification.
    pub max_len: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: 32,
            limit: None,
            head: None,
            max_len: 128,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub data: String,
    pub metric: &'static str,
    pub value: f64,
    /// Examples (classification) or predicted tokens (perplexity).
    pub count: usize,
    pub seconds: f64,
}

/// Runs `task` on `model`; `progress` is told how many examples (or windows) are done.
pub fn evaluate(
    model: &str,
    task: &Task,
    options: &EvalOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Report> {
    let started = std::time::Instant::now();
    let device = Device::Cpu;
    let mut weights = Weights::load(model, &device, false)?;
    if let Some(head) = &options.head {
        weights.take_head(&Weights::load(head, &device, false)?)?;
    }
    let (metric, value, count, data) = match task {
        Task::Perplexity { text, context } => {
            let (nll, count) = perplexity(&weights, text, *context, options, progress)?;
            ("perplexity", (nll / count.max(1) as f64).exp(), count, text)
        }
        Task::Classification { data } => {
            let (correct, count) = classify(&weights, data, options, progress)?;
            (
                "accuracy",
                correct as f64 / count.max(1) as f64,
                count,
                data,
            )
        }
    };
    Ok(Report {
        model: model.to_string(),
        data: data.display().to_string(),
        metric,
        value,
        count,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn model_type(w: &Weights) -> &str {
    w.config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

/// Total negative log-likelihood and the number of predicted tokens.
fn perplexity(
    w: &Weights,
    text: &Path,
    context: usize,
    options: &EvalOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<(f64, usize)> {
    if !is_decoder(w) {
        return Err(Error::model(
            &w.reference,
            "perplexity needs a causal LM (llama, mistral, qwen2)",
        ));
    }
    let model = Llama::new(w)?;
    let dir = crate::weights::model_dir(&w.reference)?;
    let body = std::fs::read_to_string(text).map_err(|e| fusekit::Error::io(text, e))?;
    let encoder = TextEncoder::from_model_dir(&dir, 0)?;
    let ids = encoder.ids(&body)?;
    let context = context.max(2);
    let mut windows: Vec<&[u32]> = ids.chunks(context).filter(|w| w.len() >= 2).collect();
    if let Some(limit) = options.limit {
        windows.truncate(limit);
    }
    let (mut nll, mut count) = (0f64, 0usize);
    for (done, batch) in windows.chunks(options.batch_size.max(1)).enumerate() {
        let longest = batch.iter().map(|w| w.len()).max().unwrap_or(0);
        let mut flat = Vec::new();
        let mut mask = Vec::new();
        for window in batch {
            flat.extend(
                window
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(0))
                    .take(longest),
            );
            mask.extend((0..longest).map(|i| u32::from(i < window.len())));
        }
        let shape = (batch.len(), longest);
        let ids = Tensor::from_vec(flat, shape, &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, shape, &Device::Cpu)?;
        let logits = model.forward(&ids, &mask)?.narrow(1, 0, longest - 1)?;
        let logp = log_softmax_last_dim(&logits.contiguous()?)?;
        let targets = ids.narrow(1, 1, longest - 1)?.contiguous()?;
        let picked = logp
            .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?;
        let valid = mask.narrow(1, 1, longest - 1)?.to_dtype(DType::F32)?;
        nll -= (picked * &valid)?.sum_all()?.to_scalar::<f32>()? as f64;
        count += valid.sum_all()?.to_scalar::<f32>()? as usize;
        progress(
            ((done + 1) * options.batch_size).min(windows.len()) as u64,
            windows.len() as u64,
        );
    }
    Ok((nll, count))
}

impl Example {
    pub fn label(&self) -> u32 {
        match self {
            Example::Text(_, l) | Example::Vector(_, l) => *l,
        }
    }
}

/// One labelled example of a JSONL file.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Text(String, u32),
    Vector(Vec<f32>, u32),
}

pub fn read_examples(data: &Path, limit: Option<usize>) -> Result<Vec<Example>> {
    let body = std::fs::read_to_string(data).map_err(|e| fusekit::Error::io(data, e))?;
    let bad = |line: usize, m: &str| fusekit::Error::bad_file(data, format!("line {line}: {m}"));
    let mut examples = Vec::new();
    for (i, line) in body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if limit.is_some_and(|l| examples.len() >= l) {
            break;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(i + 1, &format!("invalid JSON: {e}")))?;
        let label = value
            .get("label")
            .and_then(|l| l.as_u64())
            .and_then(|l| u32::try_from(l).ok())
            .ok_or_else(|| bad(i + 1, "`label` must be a class index"))?;
        let example = if let Some(text) = value.get("text").and_then(|t| t.as_str()) {
            Example::Text(text.to_string(), label)
        } else if let Some(input) = value.get("input").and_then(|t| t.as_array()) {
            let input = input
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| bad(i + 1, "`input` must be a list of numbers"))?;
            Example::Vector(input, label)
        } else {
            return Err(bad(i + 1, "needs `text` or `input`").into());
        };
        examples.push(example);
    }
    Ok(examples)
}

/// Correct predictions and examples.
fn classify(
    w: &Weights,
    data: &Path,
    options: &EvalOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<(usize, usize)> {
    let examples = read_examples(data, options.limit)?;
    let correct = correct(w, &examples, options, progress)?;
    Ok((correct, examples.len()))
}

/// The share of `examples` that `w` classifies right.
pub fn accuracy(w: &Weights, examples: &[Example], options: &EvalOptions) -> Result<f64> {
    let correct = correct(w, examples, options, &|_, _| {})?;
    Ok(correct as f64 / examples.len().max(1) as f64)
}

fn correct(
    w: &Weights,
    examples: &[Example],
    options: &EvalOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<usize> {
    let classifier = Classifier::new(w, options.max_len)?;
    let batch_size = options.batch_size.max(1);
    let mut correct = 0;
    for (done, batch) in examples.chunks(batch_size).enumerate() {
        let logits = classifier.logits(batch)?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct += batch
            .iter()
            .zip(predicted)
            .filter(|(e, p)| e.label() == *p)
            .count();
        progress(
            ((done + 1) * batch_size).min(examples.len()) as u64,
            examples.len() as u64,
        );
    }
    Ok(correct)
}

pub(crate) enum Classifier<'a> {
    Encoder(Bert<'a>, Box<TextEncoder>, &'a Weights, Pooling),
    Mlp(Mlp<'a>),
}

#[derive(Clone, Copy)]
pub(crate) enum Pooling {
    /// The BERT pooler's `tanh` output (`BertForSequenceClassification`).
    Pooler,
    /// The mean of the token vectors (sentence-transformers).
    Mean,
}

impl<'a> Classifier<'a> {
    pub(crate) fn new(w: &'a Weights, max_len: usize) -> Result<Classifier<'a>> {
        match model_type(w) {
            "bert" => {
                let dir = crate::weights::model_dir(&w.reference)?;
                let pooling = match w.config.get("fusekit_pooling").and_then(|p| p.as_str()) {
                    Some("mean") => Pooling::Mean,
                    _ => Pooling::Pooler,
                };
                if !w.contains("classifier.weight") {
                    return Err(Error::model(&w.reference, "has no `classifier` head"));
                }
                Ok(Classifier::Encoder(
                    Bert::new(w)?,
                    Box::new(TextEncoder::from_model_dir(&dir, max_len)?),
                    w,
                    pooling,
                ))
            }
            mlp::MODEL_TYPE => Ok(Classifier::Mlp(Mlp::new(w)?)),
            other => Err(Error::model(
                &w.reference,
                format!("cannot classify with a `{other}` model (bert or fusekit_mlp can)"),
            )),
        }
    }

    /// Class logits `[batch, classes]`.
    pub(crate) fn logits(&self, batch: &[Example]) -> Result<Tensor> {
        Ok(self.forward(batch)?.logits)
    }

    /// Logits with the hidden states behind them.
    pub(crate) fn forward(&self, batch: &[Example]) -> Result<Forward> {
        match self {
            Classifier::Encoder(bert, encoder, w, pooling) => {
                let texts: Vec<&str> = batch
                    .iter()
                    .map(|e| match e {
                        Example::Text(t, _) => Ok(t.as_str()),
                        Example::Vector(..) => Err(Error::model(
                            &w.reference,
                            "an encoder needs `text` examples",
                        )),
                    })
                    .collect::<Result<_>>()?;
                let tokens = encoder.batch(&texts, &Device::Cpu)?;
                let out = bert.forward(&tokens.ids, &tokens.mask)?;
                let pooled = match pooling {
                    Pooling::Mean => mean_pool(&out.last_hidden_state, &tokens.mask)?,
                    Pooling::Pooler => out
                        .pooler_output
                        .ok_or_else(|| Error::model(&w.reference, "has no pooler"))?,
                };
                let h = bert.config.hidden;
                let labels = w.head_labels("classifier.weight")?;
                let weight = w.get("classifier.weight", &[labels, h])?;
                w.observe_input("classifier.weight", &pooled)?;
                let bias = w.get("classifier.bias", &[labels])?;
                Ok(Forward {
                    logits: linear(&pooled, &weight, Some(&bias))?,
                    hidden_states: out.hidden_states,
                    mask: Some(tokens.mask),
                })
            }
            Classifier::Mlp(mlp) => {
                let width = mlp.config.trunk_sizes[0];
                let mut flat = Vec::with_capacity(batch.len() * width);
                for e in batch {
                    match e {
                        Example::Vector(v, _) if v.len() == width => flat.extend_from_slice(v),
                        _ => {
                            return Err(Error::model(
                                "data",
                                format!("an MLP needs `input` vectors of {width} numbers"),
                            ))
                        }
                    }
                }
                let x = Tensor::from_vec(flat, (batch.len(), width), &Device::Cpu)?;
                let hidden_states = mlp.hidden_states(&x)?;
                Ok(Forward {
                    logits: mlp.head(hidden_states.last().expect("starts with the input"))?,
                    hidden_states,
                    mask: None,
                })
            }
        }
    }
}

/// A classifier's outputs for a batch.
pub struct Forward {
    /// `[batch, classes]`
    pub(crate) logits: Tensor,
    /// The input representation, then each layer's output: `[batch, seq, hidden]` for an
    /// encoder, `[batch, width]` for an MLP.
    pub(crate) hidden_states: Vec<Tensor>,
    /// `[batch, seq]`, 1 for real tokens (encoders only).
    pub(crate) mask: Option<Tensor>,
}

/// The `text` of each JSONL line, at most `limit`.
pub(crate) fn read_texts(data: &Path, limit: usize) -> Result<Vec<String>> {
    let body = std::fs::read_to_string(data).map_err(|e| fusekit::Error::io(data, e))?;
    let mut texts = Vec::new();
    for (i, line) in body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .take(limit)
    {
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            fusekit::Error::bad_file(data, format!("line {}: invalid JSON: {e}", i + 1))
        })?;
        let text = value.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            fusekit::Error::bad_file(data, format!("line {}: needs `text`", i + 1))
        })?;
        texts.push(text.to_string());
    }
    if texts.is_empty() {
        return Err(Error::model(
            data.display().to_string(),
            "holds no examples",
        ));
    }
    Ok(texts)
}

/// Whether `w` is a causal LM this crate runs.
pub(crate) fn is_decoder(w: &Weights) -> bool {
    matches!(model_type(w), "llama" | "mistral" | "qwen2")
}
