//! RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR
//! 2023, arXiv:2212.09849; `methods.md` §14.5): every linear layer is merged as the least-squares
//! fit to all models' outputs on their own inputs,
//!
//!   W* = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ,   Gᵢ = XᵢᵀXᵢ / Nᵢ,   G̃ᵢ = α·Gᵢ + (1 − α)·diag(Gᵢ)
//!
//! (Xᵢ the rows entering the layer when model i runs on its task's inputs, collected in a
//! forward pass; α < 1 shrinks the off-diagonals, which also makes singular Grams solvable).
//! Everything that is not a linear weight (biases, norms, embeddings) is averaged. The solve is an
//! LU with partial pivoting in f64 (faer), single-threaded so the bytes do not depend on the
//! thread count. All token rows count, padding included.
//!
//! The Grams are whole `in × in` matrices, which the streaming engine does not take as
//! companions, so the merged model is written here (f32), with the first model's `config.json`
//! and tokenizer files and a `regmean.json` of the settings.

use crate::coefficients::{experts_of, method_of, DataFile, Expert, LearnedModel};
use crate::eval::{read_examples, Classifier};
use crate::models::llama::Llama;
use crate::text::TextEncoder;
use crate::weights::{save_as, Gram, Weights};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use faer::linalg::solvers::Solve;
use faer::Mat;
use fusekit::dtype::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RegMeanOptions {
    /// Scale of the Grams' off-diagonal entries.
    pub alpha: f64,
    /// Examples per model (the first N of its file).
    pub examples: usize,
    pub batch_size: usize,
    pub max_len: usize,
    /// How the merged weights are stored (the config's `dtype`): solved in f64, rounded once.
    pub dtype: String,
}

impl Default for RegMeanOptions {
    fn default() -> Self {
        RegMeanOptions {
            alpha: 0.95,
            examples: 256,
            batch_size: 16,
            max_len: 128,
            dtype: "float32".into(),
        }
    }
}

/// The Gram of every linear layer of `model` on the inputs of `data`.
pub fn grams(model: &str, data: &Path, options: &RegMeanOptions) -> Result<BTreeMap<String, Gram>> {
    let mut w = Weights::load(model, &Device::Cpu, false)?;
    w.capture_inputs();
    if crate::eval::is_decoder(&w) {
        // A causal LM reads the `text` of each line (labels, if any, are not needed).
        let texts = crate::eval::read_texts(data, options.examples)?;
        let decoder = Llama::new(&w)?;
        let dir = crate::weights::model_dir(model)?;
        let encoder = TextEncoder::from_model_dir(&dir, options.max_len)?;
        for batch in texts.chunks(options.batch_size.max(1)) {
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            let tokens = encoder.batch(&refs, &Device::Cpu)?;
            decoder.forward(&tokens.ids, &tokens.mask)?;
        }
        return Ok(w.grams());
    }
    let classifier = Classifier::new(&w, options.max_len)?;
    let examples = read_examples(data, Some(options.examples))?;
    if examples.is_empty() {
        return Err(Error::model(
            data.display().to_string(),
            "holds no examples",
        ));
    }
    for batch in examples.chunks(options.batch_size.max(1)) {
        classifier.logits(batch)?;
    }
    Ok(w.grams())
}

/// `W*` of one linear layer from each model's weight `[out, in]` and Gram.
///
/// An input feature that no example of any model ever reached (a dead ReLU unit) has an
/// all-zero row in every Gram, which makes the system singular; its weight column is the plain
/// average of the models' columns instead (a unit diagonal in each Gram).
pub fn merge_linear(weights: &[Tensor], grams: &[&Gram], alpha: f64) -> Result<Tensor> {
    let (out, inp) = weights[0].dims2()?;
    let dead: Vec<bool> = (0..inp)
        .map(|i| grams.iter().all(|g| g.sum[i * inp + i] == 0.0))
        .collect();
    let mut a = Mat::<f64>::zeros(inp, inp);
    let mut b = Mat::<f64>::zeros(inp, out);
    for (w, g) in weights.iter().zip(grams) {
        let w = w.to_vec2::<f32>()?;
        let scale = 1.0 / g.rows.max(1) as f64;
        let regularized = Mat::<f64>::from_fn(inp, inp, |r, c| {
            let v = g.sum[r * inp + c] * scale;
            if r == c {
                if dead[r] {
                    1.0
                } else {
                    v
                }
            } else {
                alpha * v
            }
        });
        a += &regularized;
        // G̃ᵢ·Wᵢᵀ
        let wt = Mat::<f64>::from_fn(inp, out, |r, c| w[c][r] as f64);
        b += &regularized * &wt;
    }
    let solved = a.partial_piv_lu().solve(&b);
    let values: Vec<f32> = (0..out)
        .flat_map(|r| (0..inp).map(move |c| (r, c)))
        .map(|(r, c)| solved[(c, r)] as f32)
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::model(
            "regmean",
            "the summed Gram is singular (inputs never reached some features): lower `alpha`",
        ));
    }
    Ok(Tensor::from_vec(values, (out, inp), &Device::Cpu)?)
}

/// Merges `models` (each with its task's data) by RegMean into `out`.
pub fn regmean(
    models: &[Expert],
    out: &Path,
    options: &RegMeanOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let first = models
        .first()
        .ok_or_else(|| Error::model("regmean", "needs models"))?;
    let parameters = crate::memory::parameters(&first.model)?;
    crate::memory::check(
        &first.model,
        parameters,
        crate::memory::regmean_copies(models.len()),
    )?;
    faer::set_global_parallelism(faer::Par::Seq);
    let mut loaded = Vec::new();
    let mut all_grams = Vec::new();
    for (i, m) in models.iter().enumerate() {
        all_grams.push(grams(&m.model, &m.data, options)?);
        loaded.push(Weights::load(&m.model, &Device::Cpu, false)?);
        progress(i as u64 + 1, models.len() as u64 + 1);
    }
    let mut merged = Vec::new();
    for (name, t) in loaded[0].tensors() {
        let tensors: Vec<Tensor> = loaded
            .iter()
            .map(|w| w.get(name, t.dims()))
            .collect::<Result<_>>()?;
        let grams: Option<Vec<&Gram>> = all_grams.iter().map(|g| g.get(name)).collect();
        let value = match grams {
            Some(grams) if t.rank() == 2 => merge_linear(&tensors, &grams, options.alpha)
                .map_err(|e| Error::model(name, e.to_string()))?,
            _ => (Tensor::stack(&tensors, 0)?.sum(0)? / tensors.len() as f64)?,
        };
        merged.push((name.to_string(), value));
    }
    let mut files = vec![(
        "regmean.json",
        (serde_json::to_string_pretty(&serde_json::json!({
            "method": "regmean",
            "options": options,
            "models": models.iter().map(|m| serde_json::json!({"model": m.model, "data": m.data})).collect::<Vec<_>>(),
        }))
        .expect("plain JSON")
            + "\n")
            .into_bytes(),
    )];
    files.extend(crate::weights::tokenizer_files(&first.model)?);
    let dtype = Dtype::from_config(&options.dtype)?;
    save_as(out, &loaded[0].config, &merged, &files, dtype)?;
    progress(models.len() as u64 + 1, models.len() as u64 + 1);
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegMeanConfig {
    #[allow(dead_code)]
    merge_method: String,
    models: Vec<LearnedModel>,
    data: BTreeMap<String, DataFile>,
    #[serde(default)]
    parameters: RegMeanParameters,
    #[serde(default)]
    dtype: Option<String>,
}

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegMeanParameters {
    alpha: Option<f64>,
    examples: Option<usize>,
    batch_size: Option<usize>,
    max_len: Option<usize>,
}

/// The models and settings of a `merge_method: regmean` config (`data: {MODEL: {file}}`,
/// `parameters: {alpha, examples, batch_size, max_len}`, `dtype`); `None` for other methods.
pub fn regmean_config(text: &str) -> Result<Option<(Vec<Expert>, RegMeanOptions)>> {
    if method_of(text) != Some("regmean") {
        return Ok(None);
    }
    let config: RegMeanConfig =
        serde_saphyr::from_str(text).map_err(|e| Error::model("config", e.to_string()))?;
    let defaults = RegMeanOptions::default();
    let p = &config.parameters;
    let options = RegMeanOptions {
        alpha: p.alpha.unwrap_or(defaults.alpha),
        examples: p.examples.unwrap_or(defaults.examples),
        batch_size: p.batch_size.unwrap_or(defaults.batch_size),
        max_len: p.max_len.unwrap_or(defaults.max_len),
        dtype: config.dtype.clone().unwrap_or(defaults.dtype),
    };
    Dtype::from_config(&options.dtype)
        .map_err(|e| Error::model("config: `dtype`", e.to_string()))?;
    if !(0.0..=1.0).contains(&options.alpha) {
        return Err(Error::model(
            "config",
            format!("`parameters.alpha` {} is outside [0, 1]", options.alpha),
        ));
    }
    let models = experts_of("regmean", &config.models, &config.data)?;
    Ok(Some((models, options)))
}
