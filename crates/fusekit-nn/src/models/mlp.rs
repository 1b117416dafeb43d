//! A plain MLP classifier: a ReLU trunk (`trunk.{i}.weight`, `trunk.{i}.bias`) and a linear
//! head (`head.weight`, `head.bias`). Experts of one task family share the trunk's shape and
//! differ in their heads, so a merge combines trunks and each task keeps its own head.
//!
//! `config.json`: `{"model_type": "fusekit_mlp", "trunk_sizes": [784, 512, 512],
//! "num_labels": 10}`.

use crate::ops::linear;
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::{Device, Tensor};

pub const MODEL_TYPE: &str = "fusekit_mlp";

#[derive(Debug, Clone, PartialEq)]
pub struct MlpConfig {
    /// Input width, then the width after each trunk layer.
    pub trunk_sizes: Vec<usize>,
    pub num_labels: usize,
}

impl MlpConfig {
    pub fn from_weights(w: &Weights) -> Result<MlpConfig> {
        let bad = |m: &str| Error::model(&w.reference, m.to_string());
        if w.config.get("model_type").and_then(|v| v.as_str()) != Some(MODEL_TYPE) {
            return Err(bad("config.json is not a fusekit_mlp"));
        }
        let trunk_sizes: Vec<usize> = w
            .config
            .get("trunk_sizes")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("config.json lacks `trunk_sizes`"))?
            .iter()
            .map(|v| v.as_u64().map(|v| v as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`trunk_sizes` holds a non-integer"))?;
        if trunk_sizes.len() < 2 {
            return Err(bad(
                "`trunk_sizes` needs the input width and at least one layer",
            ));
        }
        Ok(MlpConfig {
            trunk_sizes,
            num_labels: w.config_usize("num_labels")?,
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": MODEL_TYPE,
            "architectures": ["FusekitMlp"],
            "trunk_sizes": self.trunk_sizes,
            "num_labels": self.num_labels,
        })
    }

    /// Every tensor with its shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Vec::new();
        for (i, pair) in self.trunk_sizes.windows(2).enumerate() {
            shapes.push((format!("trunk.{i}.weight"), vec![pair[1], pair[0]]));
            shapes.push((format!("trunk.{i}.bias"), vec![pair[1]]));
        }
        let last = *self.trunk_sizes.last().expect("checked length");
        shapes.push(("head.weight".into(), vec![self.num_labels, last]));
        shapes.push(("head.bias".into(), vec![self.num_labels]));
        shapes
    }

    /// PyTorch's default initialisation (uniform ±1/√fan_in for weights and biases), from a
    /// seeded counter-based stream: the same seed gives the same model on any machine.
    pub fn init(&self, seed: u64, device: &Device) -> Result<Vec<(String, Tensor)>> {
        self.tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let fan_in = if name.starts_with("head") {
                    *self.trunk_sizes.last().expect("checked length")
                } else {
                    let layer: usize = name
                        .split('.')
                        .nth(1)
                        .and_then(|i| i.parse().ok())
                        .unwrap_or(0);
                    self.trunk_sizes[layer]
                };
                let bound = 1.0 / (fan_in as f64).sqrt();
                let key = fusekit::rng::stream_key(seed, &name, 0);
                let numel: usize = shape.iter().product();
                let values: Vec<f32> = (0..numel as u64)
                    .map(|i| ((fusekit::rng::uniform(key, i) * 2.0 - 1.0) * bound) as f32)
                    .collect();
                Ok((name, Tensor::from_vec(values, shape.as_slice(), device)?))
            })
            .collect()
    }
}

pub struct Mlp<'a> {
    pub config: MlpConfig,
    w: &'a Weights,
}

impl<'a> Mlp<'a> {
    pub fn new(w: &'a Weights) -> Result<Mlp<'a>> {
        Ok(Mlp {
            config: MlpConfig::from_weights(w)?,
            w,
        })
    }

    /// The input `x [batch, input]`, then each trunk layer's output (the last are the features
    /// the head reads).
    pub fn hidden_states(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut states = vec![x.clone()];
        for (i, pair) in self.config.trunk_sizes.windows(2).enumerate() {
            let w = self
                .w
                .get(&format!("trunk.{i}.weight"), &[pair[1], pair[0]])?;
            let b = self.w.get(&format!("trunk.{i}.bias"), &[pair[1]])?;
            let x = states.last().expect("starts with the input");
            self.w.observe_input(&format!("trunk.{i}.weight"), x)?;
            let next = linear(x, &w, Some(&b))?.relu()?;
            states.push(next);
        }
        Ok(states)
    }

    /// The head's logits `[batch, num_labels]` of the trunk's last hidden state.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        let last = *self.config.trunk_sizes.last().expect("checked length");
        let w = self.w.get("head.weight", &[self.config.num_labels, last])?;
        let b = self.w.get("head.bias", &[self.config.num_labels])?;
        self.w.observe_input("head.weight", features)?;
        linear(features, &w, Some(&b))
    }

    /// Class logits `[batch, num_labels]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let states = self.hidden_states(x)?;
        self.head(states.last().expect("starts with the input"))
    }
}
