//! LoRA extraction: a PEFT adapter that approximates a fine-tune as its base plus low-rank updates.
//!
//! Per 2-D module, Δ = FT − BASE in f32 and its thin SVD Δ = U·diag(σ)·Vᵀ (`kernels::svd`). The
//! best rank-r approximation (Eckart–Young) keeps the r largest σ: B = U_r·diag(√σ_r),
//! A = diag(√σ_r)·V_rᵀ, so ΔW = B·A with scale 1 (α = r). Its Frobenius error is
//! √(Σ_{i>r} σᵢ²), reported per module. Fan-in-fan-out layers (GPT-2's Conv1D) and embeddings
//! store the transpose, so there A = diag(√σ_r)·U_rᵀ and B = V_r·diag(√σ_r).
//!
//! Tensors an adapter cannot express (norms, biases, tensors missing from the base, embeddings
//! unless asked for) are left out and named, with the reason, in `extraction.json`.

use crate::checkpoint::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::checkpoint::{Checkpoint, TensorSource};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernels::convert::encode;
use crate::kernels::svd::thin_svd;
use crate::write::Staging;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The rank of modules no pattern names.
    pub rank: usize,
    /// `(regex, rank)`: the first pattern that matches a module name (without `.weight`) wins.
    pub rank_pattern: Vec<(regex::Regex, usize)>,
    /// Extract embeddings too (as `lora_embedding_A/B`).
    pub embeddings: bool,
    /// Dtype of the stored factors.
    pub dtype: Dtype,
    /// Replace an existing OUT.
    pub force: bool,
}

/// What was extracted, per module, and what was left out.
#[derive(Debug, serde::Serialize)]
pub struct Extraction {
    pub modules: Vec<ModuleReport>,
    /// Tensor name → why it is not in the adapter.
    pub left_out: BTreeMap<String, String>,
}

#[derive(Debug, serde::Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub rank: usize,
    /// ‖Δ‖_F and the error the truncation predicts, √(Σ_{i>r} σᵢ²).
    pub delta_norm: f64,
    pub truncation_error: f64,
}

struct Factors {
    report: ModuleReport,
    embedding: bool,
    /// `rank × fan_in` and `fan_out × rank`, row-major.
    a: Vec<f32>,
    b: Vec<f32>,
    a_shape: [usize; 2],
    b_shape: [usize; 2],
}

pub fn extract_lora(
    model: &str,
    base: &str,
    out: &Path,
    options: &ExtractOptions,
) -> Result<Extraction> {
    if options.rank == 0 {
        return Err(Error::config("`--rank` must be at least 1"));
    }
    let model = Checkpoint::open(model)?;
    let base = Checkpoint::open(base)?;
    if out.exists() && !options.force {
        return Err(Error::Output {
            path: out.to_path_buf(),
            message: "already exists (use --force to replace it)".into(),
        });
    }
    let gpt2 = model.config.get("model_type").and_then(|v| v.as_str()) == Some("gpt2");
    let mut left_out = BTreeMap::new();
    let mut modules = Vec::new();
    for name in model.tensor_names() {
        let theirs = model.source(name).expect("listed");
        match module_of(name, &theirs, base.source(name).as_ref(), options) {
            Ok(module) => modules.push((name.to_string(), module, theirs)),
            Err(reason) => {
                left_out.insert(name.to_string(), reason);
            }
        }
    }
    let factors: Vec<Option<Factors>> = modules
        .par_iter()
        .map(|(name, module, source)| {
            let base_source = base.source(name).expect("checked");
            let embedding = is_embedding(module);
            factorize(
                module,
                source,
                &base_source,
                embedding,
                embedding || (gpt2 && is_conv1d(module)),
                rank_for(module, options),
            )
        })
        .collect::<Result<_>>()?;
    let mut extracted = Vec::new();
    for ((name, _, _), f) in modules.iter().zip(factors) {
        match f {
            Some(f) => extracted.push(f),
            None => {
                left_out.insert(name.clone(), "unchanged from the base".into());
            }
        }
    }
    if extracted.is_empty() {
        return Err(Error::config(format!(
            "nothing to extract: no 2-D module of {} differs from {}",
            model.reference, base.reference
        )));
    }
    let staging = Staging::new(out)?;
    write_adapter(&staging.dir, &extracted, options, &base.reference, gpt2)?;
    let extraction = Extraction {
        modules: extracted.into_iter().map(|f| f.report).collect(),
        left_out,
    };
    let report = serde_json::to_string_pretty(&extraction).expect("plain values");
    let path = staging.dir.join("extraction.json");
    std::fs::write(&path, report + "\n").map_err(|e| Error::io(&path, e))?;
    staging.commit(out)?;
    Ok(extraction)
}

/// The module a tensor is the weight of, or why it cannot be extracted.
fn module_of(
    name: &str,
    tensor: &TensorSource,
    base: Option<&TensorSource>,
    options: &ExtractOptions,
) -> std::result::Result<String, String> {
    let base = base.ok_or("not in the base model")?;
    if !tensor.dtype.is_mergeable_float() {
        return Err(format!("{:?} is not a float dtype", tensor.dtype));
    }
    if tensor.shape != base.shape {
        return Err(format!(
            "shape {:?} differs from the base's {:?}",
            tensor.shape, base.shape
        ));
    }
    let module = name
        .strip_suffix(".weight")
        .filter(|_| tensor.shape.len() == 2)
        .ok_or("not a 2-D weight (norm, bias or buffer): a LoRA cannot express it")?;
    if is_embedding(module) && !options.embeddings {
        return Err("an embedding (ask for embeddings to extract it)".into());
    }
    Ok(module.to_string())
}

fn is_embedding(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    last.contains("embed") || matches!(last, "wte" | "wpe")
}

/// GPT-2's Conv1D layers, stored fan-in × fan-out (PEFT's `fan_in_fan_out`).
pub fn is_conv1d(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    matches!(last, "c_attn" | "c_proj" | "c_fc" | "q_attn")
}

fn rank_for(module: &str, options: &ExtractOptions) -> usize {
    options
        .rank_pattern
        .iter()
        .find(|(re, _)| re.is_match(module))
        .map_or(options.rank, |(_, r)| *r)
}

fn decode_all(source: &TensorSource) -> Vec<f32> {
    let mut values = vec![0f32; source.numel()];
    source.read_f32(0, &mut values);
    values
}

/// The rank-r factors of one module's Δ, or `None` if it is unchanged.
fn factorize(
    module: &str,
    tensor: &TensorSource,
    base: &TensorSource,
    embedding: bool,
    transposed: bool,
    rank: usize,
) -> Result<Option<Factors>> {
    let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
    let mut delta = decode_all(tensor);
    for (d, b) in delta.iter_mut().zip(decode_all(base)) {
        *d -= b;
    }
    if delta.iter().all(|d| *d == 0.0) {
        return Ok(None);
    }
    let svd = thin_svd(rows, cols, &delta).ok_or_else(|| {
        Error::tensor(
            format!("{module}.weight"),
            "the SVD of the task vector did not converge",
        )
    })?;
    let r = rank.min(svd.s.len());
    let sum_sq = |s: &[f32]| s.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
    let report = ModuleReport {
        module: module.to_string(),
        rank: r,
        delta_norm: sum_sq(&svd.s).sqrt(),
        truncation_error: sum_sq(&svd.s[r..]).sqrt(),
    };
    let root: Vec<f32> = svd.s[..r].iter().map(|s| s.sqrt()).collect();
    // Δ (as stored) = U·S·Vᵀ. PEFT's B·A is Δ itself, or Δᵀ for transposed layouts.
    let (left, right) = if transposed {
        (&svd.v, &svd.u)
    } else {
        (&svd.u, &svd.v)
    };
    let (fan_out, fan_in) = (left.nrows(), right.nrows());
    let mut b = vec![0f32; fan_out * r];
    let mut a = vec![0f32; r * fan_in];
    for k in 0..r {
        for i in 0..fan_out {
            b[i * r + k] = left[(i, k)] * root[k];
        }
        for j in 0..fan_in {
            a[k * fan_in + j] = right[(j, k)] * root[k];
        }
    }
    Ok(Some(Factors {
        report,
        embedding,
        a,
        b,
        a_shape: [r, fan_in],
        b_shape: [fan_out, r],
    }))
}

fn write_adapter(
    dir: &Path,
    extracted: &[Factors],
    options: &ExtractOptions,
    base: &str,
    fan_in_fan_out: bool,
) -> Result<()> {
    let dtype = options.dtype;
    let mut tensors: Vec<(String, [usize; 2], Vec<u8>)> = Vec::new();
    for f in extracted {
        let (a, b) = if f.embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        for (suffix, shape, values) in [(a, f.a_shape, &f.a), (b, f.b_shape, &f.b)] {
            let mut bytes = vec![0u8; values.len() * dtype.size()];
            encode(dtype, values, &mut bytes);
            let name = format!("base_model.model.{}.{suffix}", f.report.module);
            tensors.push((name, shape, bytes));
        }
    }
    let st_dtype = match dtype {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::BF16 => safetensors::Dtype::BF16,
        other => {
            return Err(Error::config(format!(
                "factors can be stored as float32, float16 or bfloat16, not {other:?}"
            )))
        }
    };
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.to_vec(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::tensor(name, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join(ADAPTER_WEIGHTS);
    safetensors::tensor::serialize_to_file(views, None, &path)
        .map_err(|e| Error::bad_file(&path, e.to_string()))?;

    // Scale 1 everywhere: α = r, with both patterns naming the modules of another rank.
    let default_rank = options.rank;
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for f in extracted.iter().filter(|f| f.report.rank != default_rank) {
        rank_pattern.insert(f.report.module.clone(), f.report.rank.into());
        alpha_pattern.insert(f.report.module.clone(), f.report.rank.into());
    }
    let targets: Vec<&str> = extracted.iter().map(|f| f.report.module.as_str()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "r": default_rank,
        "lora_alpha": default_rank,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": false,
        "bias": "none",
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("plain values") + "\n";
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}
