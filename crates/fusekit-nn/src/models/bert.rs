//! BERT encoders (`BertModel` in `transformers`; all-MiniLM-L6-v2 is the real test model):
//! word + position + token-type embeddings and LayerNorm, then per layer multi-head self-attention
//! and a GELU (erf) feed-forward block, each followed by a residual LayerNorm (post-norm), and the
//! `tanh` pooler over the first token.

use crate::ops::{layer_norm, linear, softmax_last_dim};
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f64,
}

impl BertConfig {
    pub fn from_weights(w: &Weights) -> Result<BertConfig> {
        let act = w.config.get("hidden_act").and_then(|v| v.as_str());
        if act.is_some_and(|a| a != "gelu") {
            return Err(Error::model(
                &w.reference,
                format!("hidden_act {act:?} is not supported (gelu is)"),
            ));
        }
        let config = BertConfig {
            hidden: w.config_usize("hidden_size")?,
            layers: w.config_usize("num_hidden_layers")?,
            heads: w.config_usize("num_attention_heads")?,
            intermediate: w.config_usize("intermediate_size")?,
            vocab: w.config_usize("vocab_size")?,
            max_positions: w.config_usize("max_position_embeddings")?,
            type_vocab: w.config_usize("type_vocab_size").unwrap_or(2),
            eps: w.config_f64("layer_norm_eps", 1e-12),
        };
        if config.heads == 0 || !config.hidden.is_multiple_of(config.heads) {
            return Err(Error::model(
                &w.reference,
                "hidden_size is not a multiple of num_attention_heads",
            ));
        }
        Ok(config)
    }
}

/// The encoder's outputs.
pub struct BertOutput {
    /// `[batch, seq, hidden]`
    pub last_hidden_state: Tensor,
    /// `[batch, hidden]`, `None` when the checkpoint has no pooler.
    pub pooler_output: Option<Tensor>,
    /// `transformers`' `hidden_states`: the embeddings, then each layer's output.
    pub hidden_states: Vec<Tensor>,
}

pub struct Bert<'a> {
    pub config: BertConfig,
    w: &'a Weights,
    /// Tensor-name prefix (`bert.` inside task models, empty for a bare `BertModel`).
    prefix: String,
}

impl<'a> Bert<'a> {
    pub fn new(w: &'a Weights) -> Result<Bert<'a>> {
        let prefix = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        Ok(Bert {
            config: BertConfig::from_weights(w)?,
            w,
            prefix: prefix.to_string(),
        })
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.w.get(&format!("{}{name}", self.prefix), shape)
    }

    fn dense(&self, x: &Tensor, name: &str, out: usize, inp: usize) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"), &[out, inp])?;
        self.w
            .observe_input(&format!("{}{name}.weight", self.prefix), x)?;
        let b = self.get(&format!("{name}.bias"), &[out])?;
        linear(x, &w, Some(&b))
    }

    fn norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let h = self.config.hidden;
        let g = self.get(&format!("{name}.weight"), &[h])?;
        let b = self.get(&format!("{name}.bias"), &[h])?;
        layer_norm(x, &g, &b, self.config.eps)
    }

    /// `input_ids [batch, seq]` (u32) and `attention_mask [batch, seq]` (1 for tokens, 0 for
    /// padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<BertOutput> {
        let c = &self.config;
        let (batch, seq) = input_ids.dims2()?;
        if seq > c.max_positions {
            return Err(Error::model(
                &self.w.reference,
                format!(
                    "{seq} tokens exceed max_position_embeddings {}",
                    c.max_positions
                ),
            ));
        }
        let h = c.hidden;
        let words = self.get("embeddings.word_embeddings.weight", &[c.vocab, h])?;
        let positions = self.get(
            "embeddings.position_embeddings.weight",
            &[c.max_positions, h],
        )?;
        let types = self.get(
            "embeddings.token_type_embeddings.weight",
            &[c.type_vocab, h],
        )?;
        let x = words
            .embedding(&input_ids.flatten_all()?)?
            .reshape((batch, seq, h))?
            .broadcast_add(&positions.narrow(0, 0, seq)?)?
            .broadcast_add(&types.narrow(0, 0, 1)?)?;
        let mut x = self.norm(&x, "embeddings.LayerNorm")?;
        // Padding keys get a large negative score, so their attention weight underflows to 0.
        let mask = attention_mask.to_dtype(DType::F32)?;
        let bias = ((mask - 1.0)? * 1e9)?.reshape((batch, 1, 1, seq))?;
        let mut hidden_states = vec![x.clone()];
        for l in 0..c.layers {
            x = self.layer(&x, &bias, &format!("encoder.layer.{l}"))?;
            hidden_states.push(x.clone());
        }
        let pooler_output = if self
            .w
            .contains(&format!("{}pooler.dense.weight", self.prefix))
        {
            let first = x.narrow(1, 0, 1)?.squeeze(1)?;
            Some(self.dense(&first, "pooler.dense", h, h)?.tanh()?)
        } else {
            None
        };
        Ok(BertOutput {
            last_hidden_state: x,
            pooler_output,
            hidden_states,
        })
    }

    fn layer(&self, x: &Tensor, bias: &Tensor, p: &str) -> Result<Tensor> {
        let c = &self.config;
        let (h, i) = (c.hidden, c.intermediate);
        let attention = self.attention(x, bias, p)?;
        let attention = self.dense(&attention, &format!("{p}.attention.output.dense"), h, h)?;
        let x = self.norm(
            &(attention + x)?,
            &format!("{p}.attention.output.LayerNorm"),
        )?;
        let up = self
            .dense(&x, &format!("{p}.intermediate.dense"), i, h)?
            .gelu_erf()?;
        let down = self.dense(&up, &format!("{p}.output.dense"), h, i)?;
        self.norm(&(down + x)?, &format!("{p}.output.LayerNorm"))
    }

    fn attention(&self, x: &Tensor, bias: &Tensor, p: &str) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq, h) = x.dims3()?;
        let d = h / c.heads;
        let heads = |name: &str| -> Result<Tensor> {
            let y = self.dense(x, &format!("{p}.attention.self.{name}"), h, h)?;
            Ok(y.reshape((batch, seq, c.heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (heads("query")?, heads("key")?, heads("value")?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let weights = softmax_last_dim(&scores.broadcast_add(bias)?)?;
        let context = weights.matmul(&v)?;
        Ok(context
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, h))?)
    }
}

/// The mean of the token vectors of each sequence, padding left out (sentence-transformers'
/// pooling).
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(summed.broadcast_div(&counts)?)
}
