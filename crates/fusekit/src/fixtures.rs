//! Small and large checkpoints in the Hugging Face layout, built deterministically from a seed:
//! test inputs, the models the mergekit reference script runs on, and the benchmark's 1B model.
//! A fine-tune is its base plus seeded noise, so task vectors are small as in real fine-tunes.

use crate::checkpoint::{Checkpoint, CONFIG_FILE, INDEX_FILE};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernels::convert::encode;
use crate::plan::shards;
use crate::rng::{stream_key, uniform};
use crate::write::shard::{create_with_header, encode_header};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Gpt2,
    Bert,
    /// A LLaVA-shaped vision-language model: a vision tower, a projector and a Llama decoder
    /// under `language_model.` (for `modules:`).
    Llava,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Gpt2,
        Family::Bert,
        Family::Llava,
    ];

    pub fn parse(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Gpt2 => "gpt2",
            Family::Bert => "bert",
            Family::Llava => "llava",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub family: Family,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dtype: Dtype,
    /// Seed of the base weights.
    pub seed: u64,
    /// `(seed, scale)` of the noise added to make a fine-tune of the base.
    pub finetune: Option<(u64, f32)>,
    pub max_shard_bytes: usize,
    /// Which `tokenizer.json` to write (see `tokenizer_json`): 0 for the common one, others
    /// replace the last quarter of the vocabulary and add a special token of their own.
    pub tokenizer_variant: u64,
}

impl ModelSpec {
    pub fn tiny(family: Family, dtype: Dtype, seed: u64) -> ModelSpec {
        ModelSpec {
            family,
            hidden: 32,
            intermediate: 64,
            layers: 4,
            vocab: 64,
            heads: 4,
            kv_heads: 2,
            dtype,
            seed,
            finetune: None,
            max_shard_bytes: usize::MAX,
            tokenizer_variant: 0,
        }
    }

    /// A Llama shape of about 1.2 B parameters (bf16 ≈ 2.4 GB), for the benchmark.
    pub fn llama_1b(seed: u64) -> ModelSpec {
        ModelSpec {
            family: Family::Llama,
            hidden: 2048,
            intermediate: 5632,
            layers: 16,
            vocab: 32000,
            heads: 32,
            kv_heads: 8,
            dtype: Dtype::BF16,
            seed,
            finetune: None,
            max_shard_bytes: 1 << 30,
            tokenizer_variant: 0,
        }
    }

    pub fn finetuned(mut self, seed: u64, scale: f32) -> ModelSpec {
        self.finetune = Some((seed, scale));
        self
    }

    /// Every tensor: name, shape, and how it is initialised.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let kv = h / self.heads * self.kv_heads;
        let w = |fan_in: usize| Init::Uniform(1.0 / (fan_in as f32).sqrt());
        let mut t: Vec<(String, Vec<usize>, Init)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, init: Init| t.push((name, shape, init));
        match self.family {
            Family::Llava => {
                let hv = h / 2;
                let p = "vision_tower.vision_model";
                add(
                    format!("{p}.embeddings.patch_embedding.weight"),
                    vec![hv, 3, 2, 2],
                    w(12),
                );
                add(
                    format!("{p}.embeddings.position_embedding.weight"),
                    vec![16, hv],
                    Init::Uniform(0.1),
                );
                for l in 0..VISION_LAYERS {
                    let q = format!("{p}.encoder.layers.{l}");
                    for m in [
                        "self_attn.q_proj",
                        "self_attn.k_proj",
                        "self_attn.v_proj",
                        "self_attn.out_proj",
                    ] {
                        add(format!("{q}.{m}.weight"), vec![hv, hv], w(hv));
                        add(format!("{q}.{m}.bias"), vec![hv], Init::Uniform(0.1));
                    }
                    add(format!("{q}.layer_norm1.weight"), vec![hv], Init::Norm);
                    add(format!("{q}.mlp.fc1.weight"), vec![2 * hv, hv], w(hv));
                    add(format!("{q}.mlp.fc2.weight"), vec![hv, 2 * hv], w(2 * hv));
                }
                add(format!("{p}.post_layernorm.weight"), vec![hv], Init::Norm);
                add(
                    "multi_modal_projector.linear_1.weight".into(),
                    vec![h, hv],
                    w(hv),
                );
                add(
                    "multi_modal_projector.linear_1.bias".into(),
                    vec![h],
                    Init::Uniform(0.1),
                );
                add(
                    "multi_modal_projector.linear_2.weight".into(),
                    vec![h, h],
                    w(h),
                );
                let text = ModelSpec {
                    family: Family::Llama,
                    ..self.clone()
                };
                for (name, shape, init) in text.tensors() {
                    add(format!("language_model.{name}"), shape, init);
                }
            }
            Family::Llama | Family::Mistral | Family::Qwen2 => {
                add(
                    "model.embed_tokens.weight".into(),
                    vec![v, h],
                    Init::Uniform(0.5),
                );
                for l in 0..self.layers {
                    let p = format!("model.layers.{l}");
                    add(format!("{p}.input_layernorm.weight"), vec![h], Init::Norm);
                    add(
                        format!("{p}.post_attention_layernorm.weight"),
                        vec![h],
                        Init::Norm,
                    );
                    add(format!("{p}.self_attn.q_proj.weight"), vec![h, h], w(h));
                    add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], w(h));
                    add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], w(h));
                    add(format!("{p}.self_attn.o_proj.weight"), vec![h, h], w(h));
                    if self.family == Family::Qwen2 {
                        add(
                            format!("{p}.self_attn.q_proj.bias"),
                            vec![h],
                            Init::Uniform(0.1),
                        );
                        add(
                            format!("{p}.self_attn.k_proj.bias"),
                            vec![kv],
                            Init::Uniform(0.1),
                        );
                        add(
                            format!("{p}.self_attn.v_proj.bias"),
                            vec![kv],
                            Init::Uniform(0.1),
                        );
                    }
                    add(format!("{p}.mlp.gate_proj.weight"), vec![i, h], w(h));
                    add(format!("{p}.mlp.up_proj.weight"), vec![i, h], w(h));
                    add(format!("{p}.mlp.down_proj.weight"), vec![h, i], w(i));
                }
                add("model.norm.weight".into(), vec![h], Init::Norm);
                if self.family != Family::Qwen2 {
                    add("lm_head.weight".into(), vec![v, h], w(h));
                }
            }
            Family::Gpt2 => {
                add(
                    "transformer.wte.weight".into(),
                    vec![v, h],
                    Init::Uniform(0.5),
                );
                add(
                    "transformer.wpe.weight".into(),
                    vec![64, h],
                    Init::Uniform(0.1),
                );
                for l in 0..self.layers {
                    let p = format!("transformer.h.{l}");
                    for ln in ["ln_1", "ln_2"] {
                        add(format!("{p}.{ln}.weight"), vec![h], Init::Norm);
                        add(format!("{p}.{ln}.bias"), vec![h], Init::Uniform(0.1));
                    }
                    add(format!("{p}.attn.c_attn.weight"), vec![h, 3 * h], w(h));
                    add(
                        format!("{p}.attn.c_attn.bias"),
                        vec![3 * h],
                        Init::Uniform(0.1),
                    );
                    add(format!("{p}.attn.c_proj.weight"), vec![h, h], w(h));
                    add(format!("{p}.attn.c_proj.bias"), vec![h], Init::Uniform(0.1));
                    add(format!("{p}.mlp.c_fc.weight"), vec![h, i], w(h));
                    add(format!("{p}.mlp.c_fc.bias"), vec![i], Init::Uniform(0.1));
                    add(format!("{p}.mlp.c_proj.weight"), vec![i, h], w(i));
                    add(format!("{p}.mlp.c_proj.bias"), vec![h], Init::Uniform(0.1));
                }
                add("transformer.ln_f.weight".into(), vec![h], Init::Norm);
                add("transformer.ln_f.bias".into(), vec![h], Init::Uniform(0.1));
            }
            Family::Bert => {
                add(
                    "embeddings.word_embeddings.weight".into(),
                    vec![v, h],
                    Init::Uniform(0.5),
                );
                add(
                    "embeddings.position_embeddings.weight".into(),
                    vec![64, h],
                    Init::Uniform(0.1),
                );
                add(
                    "embeddings.token_type_embeddings.weight".into(),
                    vec![2, h],
                    Init::Uniform(0.1),
                );
                add("embeddings.LayerNorm.weight".into(), vec![h], Init::Norm);
                add(
                    "embeddings.LayerNorm.bias".into(),
                    vec![h],
                    Init::Uniform(0.1),
                );
                add(
                    "embeddings.position_ids".into(),
                    vec![1, 64],
                    Init::Positions,
                );
                for l in 0..self.layers {
                    let p = format!("encoder.layer.{l}");
                    for m in [
                        "attention.self.query",
                        "attention.self.key",
                        "attention.self.value",
                        "attention.output.dense",
                    ] {
                        add(format!("{p}.{m}.weight"), vec![h, h], w(h));
                        add(format!("{p}.{m}.bias"), vec![h], Init::Uniform(0.1));
                    }
                    add(format!("{p}.intermediate.dense.weight"), vec![i, h], w(h));
                    add(
                        format!("{p}.intermediate.dense.bias"),
                        vec![i],
                        Init::Uniform(0.1),
                    );
                    add(format!("{p}.output.dense.weight"), vec![h, i], w(i));
                    add(
                        format!("{p}.output.dense.bias"),
                        vec![h],
                        Init::Uniform(0.1),
                    );
                    for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
                        add(format!("{p}.{ln}.weight"), vec![h], Init::Norm);
                        add(format!("{p}.{ln}.bias"), vec![h], Init::Uniform(0.1));
                    }
                }
                add("pooler.dense.weight".into(), vec![h, h], w(h));
                add("pooler.dense.bias".into(), vec![h], Init::Uniform(0.1));
            }
        }
        t
    }

    pub fn config(&self) -> serde_json::Value {
        let dtype = self.dtype.torch_name();
        match self.family {
            Family::Llava => {
                let text = ModelSpec {
                    family: Family::Llama,
                    ..self.clone()
                };
                serde_json::json!({
                    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                    "text_config": text.config(),
                    "vision_config": {"model_type": "clip_vision_model", "hidden_size": self.hidden / 2,
                        "num_hidden_layers": VISION_LAYERS, "patch_size": 2, "image_size": 8},
                    "torch_dtype": dtype
                })
            }
            Family::Llama | Family::Mistral | Family::Qwen2 => {
                let (arch, ty) = match self.family {
                    Family::Llama => ("LlamaForCausalLM", "llama"),
                    Family::Mistral => ("MistralForCausalLM", "mistral"),
                    _ => ("Qwen2ForCausalLM", "qwen2"),
                };
                serde_json::json!({
                    "architectures": [arch], "model_type": ty, "hidden_size": self.hidden,
                    "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                    "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                    "vocab_size": self.vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
                    "hidden_act": "silu", "tie_word_embeddings": self.family == Family::Qwen2,
                    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype
                })
            }
            Family::Gpt2 => serde_json::json!({
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": self.hidden,
                "n_inner": self.intermediate, "n_layer": self.layers, "n_head": self.heads,
                "vocab_size": self.vocab, "n_positions": 64, "n_ctx": 64, "torch_dtype": dtype
            }),
            Family::Bert => serde_json::json!({
                "architectures": ["BertModel"], "model_type": "bert", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "vocab_size": self.vocab,
                "max_position_embeddings": 64, "type_vocab_size": 2, "torch_dtype": dtype
            }),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Uniform in (−a, a).
    Uniform(f32),
    /// Around 1, as norm gains are.
    Norm,
    /// 0, 1, 2, … stored as int64.
    Positions,
}

/// The value of element `index` of tensor `name` in the base model.
fn base_value(seed: u64, name: &str, init: Init, index: usize) -> f32 {
    let u = uniform(stream_key(seed, name, 0), index as u64) as f32 * 2.0 - 1.0;
    match init {
        Init::Uniform(a) => u * a,
        Init::Norm => 1.0 + 0.1 * u,
        Init::Positions => index as f32,
    }
}

/// Writes the model into `dir` (created; must not exist yet).
/// A config that exercises `method` on `dir/base` and its fine-tunes `dir/ft1`, `dir/ft2` in
/// bf16, with the parameters the benchmark uses.
pub fn method_config(method: &str, dir: &Path) -> String {
    let (base, a, b) = (dir.join("base"), dir.join("ft1"), dir.join("ft2"));
    let (base, a, b) = (base.display(), a.display(), b.display());
    let models = |params: &str| {
        format!("models:\n  - model: {a}\n    parameters: {{{params}}}\n  - model: {b}\n    parameters: {{{params}}}\n")
    };
    let body = match method {
        "linear" | "nuslerp" | "multislerp" => models("weight: 0.5"),
        "slerp" => format!("base_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters:\n  t: 0.5\n"),
        "nearswap" => format!("base_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters:\n  t: 0.001\n"),
        "arcee_fusion" => format!("base_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"),
        "passthrough" => format!("models:\n  - model: {a}\n"),
        // One continual step: ft1 stands for the running merge, ft2 is folded in.
        "opcm" => format!("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{previous_lambda: 1.0, lambda: 1.4}}\n"),
        "pcb" | "pcb_per_tensor" | "widen" | "varm" | "tsv" | "iso_c" | "model_stock" | "karcher"
        | "ram" | "ramplus_tl" => format!("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"),
        // Fisher diagonals in `dir/ft1.fisher`, `dir/ft2.fisher` (`write_fisher_stand_in`).
        "fisher" => format!("{}data:\n  {a}: {{fisher: {a}.fisher}}\n  {b}: {{fisher: {b}.fisher}}\n", models("weight: 1.0")),
        "sce" => format!("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{select_topk: 0.5}}\n"),
        _ => format!("base_model: {base}\n{}", models("weight: 0.5, density: 0.2")),
    };
    format!("merge_method: {method}\n{body}dtype: bfloat16\n")
}

pub fn write_model(spec: &ModelSpec, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = spec.tensors();
    let dtype_of = |init: &Init| {
        if matches!(init, Init::Positions) {
            Dtype::I64
        } else {
            spec.dtype
        }
    };
    let sizes: Vec<usize> = tensors
        .iter()
        .map(|(_, s, init)| s.iter().product::<usize>() * dtype_of(init).size())
        .collect();
    let assignment = shards::assign(&sizes, spec.max_shard_bytes);
    let count = assignment.last().map_or(1, |s| s + 1);
    let mut files = Vec::new();
    let mut offsets = vec![0; tensors.len()];
    for shard in 0..count {
        let members: Vec<usize> = (0..tensors.len())
            .filter(|&i| assignment[i] == shard)
            .collect();
        let entries: Vec<(&str, Dtype, usize)> = members
            .iter()
            .map(|&i| (tensors[i].0.as_str(), dtype_of(&tensors[i].2), sizes[i]))
            .collect();
        for (&i, o) in members.iter().zip(shards::layout(&entries)) {
            offsets[i] = o;
        }
        let header = encode_header(members.iter().map(|&i| {
            (
                tensors[i].0.as_str(),
                dtype_of(&tensors[i].2),
                tensors[i].1.as_slice(),
                offsets[i],
            )
        }));
        let path = dir.join(shards::shard_name(shard, count));
        files.push((
            create_with_header(&header, entries.iter().map(|e| e.2).sum(), &path)?,
            path,
        ));
    }
    tensors
        .par_iter()
        .enumerate()
        .try_for_each(|(i, (name, shape, init))| {
            let numel: usize = shape.iter().product();
            let bytes = match init {
                Init::Positions => (0..numel as i64).flat_map(|p| p.to_le_bytes()).collect(),
                _ => {
                    let values: Vec<f32> = (0..numel)
                        .into_par_iter()
                        .with_min_len(1 << 16)
                        .map(|j| {
                            let base = base_value(spec.seed, name, *init, j);
                            match spec.finetune {
                                Some((seed, scale)) => {
                                    base + scale
                                        * (uniform(stream_key(seed, name, 1), j as u64) as f32
                                            * 2.0
                                            - 1.0)
                                }
                                None => base,
                            }
                        })
                        .collect();
                    let mut bytes = vec![0u8; numel * spec.dtype.size()];
                    encode(spec.dtype, &values, &mut bytes);
                    bytes
                }
            };
            let (file, path) = &files[assignment[i]];
            file.write_at(offsets[i], &bytes, path)
        })?;
    for (file, path) in &files {
        file.flush(path)?;
    }
    if count > 1 {
        let weight_map: serde_json::Map<String, serde_json::Value> = tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _, _))| (n.clone(), shards::shard_name(assignment[i], count).into()))
            .collect();
        let index = serde_json::json!({"metadata": {"total_size": sizes.iter().sum::<usize>()}, "weight_map": weight_map});
        write_text(
            &dir.join(INDEX_FILE),
            &serde_json::to_string_pretty(&index).expect("plain JSON"),
        )?;
    }
    write_text(
        &dir.join(CONFIG_FILE),
        &serde_json::to_string_pretty(&spec.config()).expect("plain JSON"),
    )?;
    let tokenizer = serde_json::json!({"model_max_length": 128, "tokenizer_class": "PreTrainedTokenizerFast", "fixture_seed": spec.seed, "fixture_finetune_seed": spec.finetune.map(|f| f.0)});
    write_text(
        &dir.join("tokenizer_config.json"),
        &serde_json::to_string_pretty(&tokenizer).expect("plain JSON"),
    )?;
    if spec.vocab <= MAX_FIXTURE_TOKENIZER {
        write_text(
            &dir.join("tokenizer.json"),
            &tokenizer_json(spec.vocab, spec.tokenizer_variant),
        )?;
    }
    if spec.family != Family::Bert {
        write_text(
            &dir.join("generation_config.json"),
            "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n",
        )?;
    }
    Ok(())
}

/// Layers of the fixture vision tower.
const VISION_LAYERS: usize = 2;

/// Vocabularies larger than this get no `tokenizer.json` (the benchmark models).
const MAX_FIXTURE_TOKENIZER: usize = 4096;

/// A word-level BPE tokenizer (no merges) of `vocab` tokens: `<unk>`, `<s>`, `</s>` as special
/// added tokens, then `t3`, `t4`, …. Variant k > 0 renames the last quarter `t{i}_v{k}` and
/// makes the last one a special added token `<|v{k}|>`, so vocabularies of different variants
/// overlap in three quarters. Whole words are tokens of their own (`ignore_merges`: the BPE has
/// no merges, so without it every word would fall apart into unknown characters).
pub fn tokenizer_json(vocab: usize, variant: u64) -> String {
    let unique_from = vocab - vocab / 4;
    let token = |i: usize| match i {
        0 => "<unk>".to_string(),
        1 => "<s>".to_string(),
        2 => "</s>".to_string(),
        _ if variant > 0 && i == vocab - 1 => format!("<|v{variant}|>"),
        _ if variant > 0 && i >= unique_from => format!("t{i}_v{variant}"),
        _ => format!("t{i}"),
    };
    let special: Vec<usize> = [0, 1, 2]
        .into_iter()
        .chain((variant > 0).then_some(vocab - 1))
        .collect();
    let added: Vec<serde_json::Value> = special
        .iter()
        .map(|&i| {
            serde_json::json!({"id": i, "content": token(i), "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let words: serde_json::Map<String, serde_json::Value> =
        (0..vocab).map(|i| (token(i), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": true, "vocab": words, "merges": []},
    });
    serde_json::to_string_pretty(&json).expect("plain JSON")
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// A synthetic PEFT LoRA adapter for a model: which modules, rank, α, the patterns, the seed.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub seed: u64,
    /// Last components of the module names to adapt (`q_proj`, `c_attn`, `embed_tokens`, …).
    pub targets: Vec<String>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub use_rslora: bool,
}

impl LoraSpec {
    fn rank_of(&self, module: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .map_or(self.rank, |(_, r)| *r)
    }
}

/// Writes an adapter for `model` in PEFT's layout: `adapter_config.json` and
/// `adapter_model.safetensors` (f32 factors, both random so the update is not zero as it is at
/// PEFT's initialisation). Fan-in-fan-out is set for GPT-2 (Conv1D layers); targets that are
/// embeddings get `lora_embedding_A/B`.
pub fn write_lora(model: &Checkpoint, spec: &LoraSpec, dir: &Path) -> Result<()> {
    let gpt2 = model.config.get("model_type").and_then(|v| v.as_str()) == Some("gpt2");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in model.tensor_names() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let last = module.rsplit('.').next().unwrap_or(module);
        let shape = model.source(name).expect("listed").shape;
        if !spec.targets.iter().any(|t| t == last) || shape.len() != 2 {
            continue;
        }
        let embedding = last.contains("embed") || last == "wte";
        let r = spec.rank_of(module);
        // PEFT's shapes: A is r × fan-in, B fan-out × r.
        let transposed = embedding || (gpt2 && crate::extract_lora::is_conv1d(module));
        let (fan_in, fan_out) = if transposed {
            (shape[0], shape[1])
        } else {
            (shape[1], shape[0])
        };
        let (a_name, b_name) = if embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        for (suffix, shape, stream) in [(a_name, [r, fan_in], 0), (b_name, [fan_out, r], 1)] {
            let full = format!("base_model.model.{module}.{suffix}");
            let key = stream_key(spec.seed, &full, stream);
            let values: Vec<f32> = (0..shape[0] * shape[1])
                .map(|j| (uniform(key, j as u64) as f32 * 2.0 - 1.0) * 0.1)
                .collect();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((full, shape.to_vec(), bytes));
        }
    }
    if tensors.is_empty() {
        return Err(Error::config(format!(
            "no 2-D module of {} is named {:?}",
            model.reference, spec.targets
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("shape matches bytes");
            (name.clone(), view)
        })
        .collect();
    let path = dir.join(crate::checkpoint::lora::ADAPTER_WEIGHTS);
    safetensors::tensor::serialize_to_file(views, None, &path)
        .map_err(|e| Error::bad_file(&path, e.to_string()))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": spec.targets,
        "rank_pattern": spec.rank_pattern,
        "alpha_pattern": spec.alpha_pattern,
        "fan_in_fan_out": gpt2,
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    write_text(
        &dir.join(crate::checkpoint::lora::ADAPTER_CONFIG),
        &serde_json::to_string_pretty(&config).expect("plain JSON"),
    )
}

/// A stand-in for a model's diagonal Fisher (tests and benchmarks of `fisher` without running
/// the model): every float tensor's squares plus 10⁻³, in f32, with the model's `config.json`.
pub fn write_fisher_stand_in(model: &Path, out: &Path) -> Result<()> {
    let checkpoint = Checkpoint::open(&model.to_string_lossy())?;
    let mut tensors = Vec::new();
    for name in checkpoint.tensor_names() {
        let source = checkpoint.source(name).expect("listed");
        if !source.dtype.is_mergeable_float() {
            continue;
        }
        let mut values = vec![0f32; source.numel()];
        source.read_f32(0, &mut values);
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| (v * v + 1e-3).to_le_bytes())
            .collect();
        tensors.push((name.to_string(), source.shape.clone(), bytes));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let views = tensors.iter().map(|(name, shape, bytes)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .expect("shape and bytes agree");
        (name.as_str(), view)
    });
    let path = out.join(crate::checkpoint::SINGLE_FILE);
    safetensors::tensor::serialize_to_file(views, None, &path)
        .map_err(|e| Error::bad_file(&path, e.to_string()))?;
    let config = serde_json::to_string_pretty(&checkpoint.config).expect("plain JSON");
    std::fs::write(out.join(CONFIG_FILE), config).map_err(|e| Error::io(out, e))
}
