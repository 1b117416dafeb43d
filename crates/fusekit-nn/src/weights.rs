//! A checkpoint's float tensors as candle variables, read through fusekit's validated reader
//! (so sharded models, Hugging Face cache ids and `model+adapter` references all load).

use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use fusekit::checkpoint::Checkpoint;
use fusekit::dtype::Dtype;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Named parameters, computed in f32 whatever the stored dtype. Trainable weights are candle
/// variables that collect gradients; frozen ones are plain tensors, so evaluation builds no
/// backward graph; weights computed from other tensors (a merge with learned coefficients)
/// carry their graph back to those.
pub struct Weights {
    pub reference: String,
    pub config: serde_json::Value,
    values: BTreeMap<String, Tensor>,
    /// The variables behind `values`, when trainable.
    vars: BTreeMap<String, Var>,
    /// Gram matrices of the inputs of every linear layer, when collecting them (RegMean).
    capture: Option<RefCell<BTreeMap<String, Gram>>>,
}

/// Σ xxᵀ over the input rows x of one linear layer, in f64.
#[derive(Debug, Clone)]
pub struct Gram {
    pub dim: usize,
    pub rows: u64,
    /// Row-major `dim × dim`.
    pub sum: Vec<f64>,
}

impl Weights {
    /// Loads every float tensor of `reference` (integer buffers such as `position_ids` are
    /// not parameters and are left out).
    pub fn load(reference: &str, device: &Device, trainable: bool) -> Result<Weights> {
        let checkpoint = Checkpoint::open(reference)?;
        let names: Vec<String> = checkpoint.tensor_names().map(str::to_string).collect();
        let mut values = BTreeMap::new();
        let mut vars = BTreeMap::new();
        for name in names {
            let source = checkpoint.source(&name).expect("listed tensors exist");
            if !source.dtype.is_mergeable_float() {
                continue;
            }
            let mut data = vec![0f32; source.numel()];
            source.read_f32(0, &mut data);
            let tensor = Tensor::from_vec(data, source.shape.as_slice(), device)?;
            if trainable {
                let var = Var::from_tensor(&tensor)?;
                values.insert(name.clone(), var.as_tensor().clone());
                vars.insert(name, var);
            } else {
                values.insert(name, tensor);
            }
        }
        Ok(Weights {
            reference: reference.to_string(),
            config: checkpoint.config.clone(),
            values,
            vars,
            capture: None,
        })
    }

    /// Weights made of given tensors (which may depend on trainable ones).
    pub fn from_tensors(
        reference: &str,
        config: serde_json::Value,
        values: BTreeMap<String, Tensor>,
    ) -> Weights {
        Weights {
            reference: reference.to_string(),
            config,
            values,
            vars: BTreeMap::new(),
            capture: None,
        }
    }

    /// From now on, the models add the inputs of every linear layer to its Gram matrix.
    pub fn capture_inputs(&mut self) {
        self.capture = Some(RefCell::default());
    }

    /// The Gram matrices collected so far, by weight name.
    pub fn grams(&self) -> BTreeMap<String, Gram> {
        self.capture
            .as_ref()
            .map(|c| c.borrow().clone())
            .unwrap_or_default()
    }

    /// Called by the models with the input `x [.., in]` of the linear layer whose weight is
    /// `weight`.
    pub fn observe_input(&self, weight: &str, x: &Tensor) -> Result<()> {
        let Some(capture) = &self.capture else {
            return Ok(());
        };
        let dim = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / dim.max(1);
        let x = x.detach().reshape((rows, dim))?;
        let product = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let mut grams = capture.borrow_mut();
        let gram = grams.entry(weight.to_string()).or_insert_with(|| Gram {
            dim,
            rows: 0,
            sum: vec![0.0; dim * dim],
        });
        gram.rows += rows as u64;
        for (s, p) in gram.sum.iter_mut().zip(product) {
            *s += p as f64;
        }
        Ok(())
    }

    /// The tensor `name`, with the shape the model expects.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self
            .values
            .get(name)
            .ok_or_else(|| Error::model(&self.reference, format!("has no tensor `{name}`")))?;
        if tensor.dims() != shape {
            return Err(Error::model(
                &self.reference,
                format!("`{name}` is {:?}, expected {shape:?}", tensor.dims()),
            ));
        }
        Ok(tensor.clone())
    }

    /// Every tensor by name.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Replaces this model's task head (`classifier.*`, `head.*`) and label count by `other`'s.
    pub fn take_head(&mut self, other: &Weights) -> Result<()> {
        if !other.values.keys().any(|n| is_head(n)) {
            return Err(Error::model(
                &other.reference,
                "has no `classifier` or `head` tensors",
            ));
        }
        self.values.retain(|n, _| !is_head(n));
        self.vars.retain(|n, _| !is_head(n));
        for (name, t) in other.values.iter().filter(|(n, _)| is_head(n)) {
            self.values.insert(name.clone(), t.clone());
        }
        for (name, v) in other.vars.iter().filter(|(n, _)| is_head(n)) {
            self.vars.insert(name.clone(), v.clone());
        }
        if let Some(labels) = other.config.get("num_labels") {
            self.config["num_labels"] = labels.clone();
        }
        Ok(())
    }

    /// The number of classes of a head: the rows of its weight.
    pub fn head_labels(&self, name: &str) -> Result<usize> {
        self.values
            .get(name)
            .map(|v| v.dims()[0])
            .ok_or_else(|| Error::model(&self.reference, format!("has no tensor `{name}`")))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// Every trainable parameter by name (none unless loaded trainable).
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// An integer field of `config.json`.
    pub fn config_usize(&self, key: &str) -> Result<usize> {
        self.config
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Error::model(&self.reference, format!("config.json lacks `{key}`")))
    }

    /// A float field of `config.json`, or `default`.
    pub fn config_f64(&self, key: &str, default: f64) -> f64 {
        self.config
            .get(key)
            .and_then(|v| v.as_f64())
            .unwrap_or(default)
    }
}

/// The directory a model reference resolves to (for its tokenizer files).
pub fn model_dir(reference: &str) -> Result<std::path::PathBuf> {
    Ok(Checkpoint::open(reference)?.dir)
}

/// The tokenizer files (and generation config) of a model, by name and bytes (a SentencePiece
/// `tokenizer.model` is binary), to write beside a model derived from it.
pub fn tokenizer_files(reference: &str) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let dir = model_dir(reference)?;
    Ok(fusekit::write::TOKENIZER_FILES
        .iter()
        .filter_map(|&name| Some((name, std::fs::read(dir.join(name)).ok()?)))
        .collect())
}

/// Writes `tensors` (f32) and `config` as a Hugging Face model directory at `out`, atomically.
pub fn save(
    out: &std::path::Path,
    config: &serde_json::Value,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    save_with(out, config, tensors, &[])
}

/// [`save`], with more small files (name, bytes) in the directory.
pub fn save_with(
    out: &std::path::Path,
    config: &serde_json::Value,
    tensors: &[(String, Tensor)],
    files: &[(&str, Vec<u8>)],
) -> Result<()> {
    save_as(out, config, tensors, files, Dtype::F32)
}

/// [`save_with`], storing the tensors in `dtype` (f32, bf16 or f16, rounded to nearest even as
/// the merge engine does) and naming it as `torch_dtype` in the config.
pub fn save_as(
    out: &std::path::Path,
    config: &serde_json::Value,
    tensors: &[(String, Tensor)],
    files: &[(&str, Vec<u8>)],
    dtype: Dtype,
) -> Result<()> {
    let stored = match dtype {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::BF16 => safetensors::Dtype::BF16,
        Dtype::F16 => safetensors::Dtype::F16,
        other => {
            return Err(Error::model(
                out.display().to_string(),
                format!("cannot store weights as {other}"),
            ))
        }
    };
    let staging = fusekit::write::Staging::new(out)?;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            let mut bytes = vec![0u8; values.len() * dtype.size()];
            fusekit::kernels::convert::encode(dtype, &values, &mut bytes);
            Ok((name.clone(), t.dims().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = data.iter().map(|(name, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(stored, shape.clone(), bytes)
            .expect("shape and bytes agree");
        (name.as_str(), view)
    });
    let path = staging.dir.join(fusekit::checkpoint::SINGLE_FILE);
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::tensor::serialize_to_file(views, metadata, &path)
        .map_err(|e| Error::model(path.display().to_string(), e.to_string()))?;
    let config_path = staging.dir.join(fusekit::checkpoint::CONFIG_FILE);
    let mut config = config.clone();
    if let Some(object) = config.as_object_mut() {
        object.insert("torch_dtype".into(), dtype.torch_name().into());
    }
    let text = serde_json::to_string_pretty(&config).expect("plain JSON");
    std::fs::write(&config_path, text).map_err(|e| fusekit::Error::io(&config_path, e))?;
    for (name, bytes) in files {
        let path = staging.dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| fusekit::Error::io(&path, e))?;
    }
    staging.commit(out)?;
    Ok(())
}

/// Task heads: the tensors a merge leaves to each task (`classifier.*`, `head.*`).
pub fn is_head(name: &str) -> bool {
    name.starts_with("classifier.") || name.starts_with("head.")
}
