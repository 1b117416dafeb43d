//! Llama-family decoders (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`):
//! token embeddings, then per layer RMSNorm → grouped-query self-attention with rotary position
//! embeddings (the `rotate_half` form of `transformers`) → residual, RMSNorm → SiLU-gated MLP →
//! residual; a final RMSNorm and the LM head (tied to the embeddings where the checkpoint has
//! none). Qwen2's q/k/v biases are used when present; Mistral's sliding window masks keys
//! further back than the window.

use crate::ops::{linear, rms_norm, softmax_last_dim};
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f64,
    pub rope_theta: f64,
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    pub fn from_weights(w: &Weights) -> Result<LlamaConfig> {
        let c = &w.config;
        let bad = |m: String| Error::model(&w.reference, m);
        if let Some(act) = c.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act `{act}` is not supported (silu is)"
                )));
            }
        }
        if c.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err(bad("rope_scaling is not supported yet".into()));
        }
        let hidden = w.config_usize("hidden_size")?;
        let heads = w.config_usize("num_attention_heads")?;
        let kv_heads = w.config_usize("num_key_value_heads").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "{heads} attention heads cannot share {kv_heads} key/value heads"
            )));
        }
        let head_dim = w.config_usize("head_dim").unwrap_or(hidden / heads);
        Ok(LlamaConfig {
            hidden,
            intermediate: w.config_usize("intermediate_size")?,
            layers: w.config_usize("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: w.config_usize("vocab_size")?,
            eps: w.config_f64("rms_norm_eps", 1e-6),
            rope_theta: w.config_f64("rope_theta", 10_000.0),
            sliding_window: w.config_usize("sliding_window").ok(),
        })
    }
}

pub struct Llama<'a> {
    pub config: LlamaConfig,
    w: &'a Weights,
}

impl<'a> Llama<'a> {
    pub fn new(w: &'a Weights) -> Result<Llama<'a>> {
        Ok(Llama {
            config: LlamaConfig::from_weights(w)?,
            w,
        })
    }

    fn proj(&self, x: &Tensor, name: &str, out: usize, inp: usize) -> Result<Tensor> {
        let w = self.w.get(&format!("{name}.weight"), &[out, inp])?;
        self.w.observe_input(&format!("{name}.weight"), x)?;
        let bias = format!("{name}.bias");
        let b = if self.w.contains(&bias) {
            Some(self.w.get(&bias, &[out])?)
        } else {
            None
        };
        linear(x, &w, b.as_ref())
    }

    fn norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        rms_norm(
            x,
            &self.w.get(name, &[self.config.hidden])?,
            self.config.eps,
        )
    }

    /// Logits `[batch, seq, vocab]` of `input_ids [batch, seq]` (u32); `attention_mask`
    /// (1 for tokens, 0 for right padding) keeps padding out of every other position.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask)?;
        let c = &self.config;
        let head = if self.w.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        linear(&hidden, &self.w.get(head, &[c.vocab, c.hidden])?, None)
    }

    /// The final normalised hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let embed = self
            .w
            .get("model.embed_tokens.weight", &[c.vocab, c.hidden])?;
        let mut x = embed
            .embedding(&input_ids.flatten_all()?)?
            .reshape((batch, seq, c.hidden))?;
        let bias = attention_bias(attention_mask, c.sliding_window)?;
        let (cos, sin) = rotary(seq, c.head_dim, c.rope_theta, device)?;
        for l in 0..c.layers {
            let p = format!("model.layers.{l}");
            let normed = self.norm(&x, &format!("{p}.input_layernorm.weight"))?;
            let attention = self.attention(&normed, &bias, &cos, &sin, &p)?;
            x = (x + attention)?;
            let normed = self.norm(&x, &format!("{p}.post_attention_layernorm.weight"))?;
            x = (x + self.mlp(&normed, &p)?)?;
        }
        self.norm(&x, "model.norm.weight")
    }

    fn attention(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        p: &str,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq, _) = x.dims3()?;
        let d = c.head_dim;
        let split = |name: &str, heads: usize| -> Result<Tensor> {
            let y = self.proj(x, &format!("{p}.self_attn.{name}"), heads * d, c.hidden)?;
            Ok(y.reshape((batch, seq, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rope(&split("q_proj", c.heads)?, cos, sin)?;
        let k = repeat_kv(
            &rope(&split("k_proj", c.kv_heads)?, cos, sin)?,
            c.heads / c.kv_heads,
        )?;
        let v = repeat_kv(&split("v_proj", c.kv_heads)?, c.heads / c.kv_heads)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let weights = softmax_last_dim(&scores.broadcast_add(bias)?)?;
        let context = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, c.heads * d))?;
        self.proj(
            &context,
            &format!("{p}.self_attn.o_proj"),
            c.hidden,
            c.heads * d,
        )
    }

    fn mlp(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        let (h, i) = (self.config.hidden, self.config.intermediate);
        let gate = self.proj(x, &format!("{p}.mlp.gate_proj"), i, h)?.silu()?;
        let up = self.proj(x, &format!("{p}.mlp.up_proj"), i, h)?;
        self.proj(&(gate * up)?, &format!("{p}.mlp.down_proj"), h, i)
    }
}

/// `[batch, 1, seq, seq]`: 0 where query i may see key j (j ≤ i, within the window, not
/// padding), a large negative number elsewhere.
fn attention_bias(attention_mask: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let (batch, seq) = attention_mask.dims2()?;
    let keys = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut bias = vec![0f32; batch * seq * seq];
    for (b, key_row) in keys.iter().enumerate() {
        for i in 0..seq {
            for (j, &key) in key_row.iter().enumerate() {
                let visible = j <= i && key > 0.0 && window.is_none_or(|w| i - j < w);
                if !visible {
                    bias[(b * seq + i) * seq + j] = -1e9;
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        bias,
        (batch, 1, seq, seq),
        attention_mask.device(),
    )?)
}

/// `cos` and `sin` of the rotary angles, `[seq, head_dim]` (each half repeated).
fn rotary(seq: usize, dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = dim / 2;
    let mut angles = vec![0f32; seq * dim];
    for pos in 0..seq {
        for j in 0..half {
            let freq = 1.0 / theta.powf(2.0 * j as f64 / dim as f64);
            let a = (pos as f64 * freq) as f32;
            angles[pos * dim + j] = a;
            angles[pos * dim + half + j] = a;
        }
    }
    let angles = Tensor::from_vec(angles, (seq, dim), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// `x · cos + rotate_half(x) · sin` on `[batch, heads, seq, dim]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Each key/value head repeated for the `times` query heads that share it.
fn repeat_kv(x: &Tensor, times: usize) -> Result<Tensor> {
    if times == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, times, s, d))?
        .contiguous()?
        .reshape((b, kv * times, s, d))?)
}
