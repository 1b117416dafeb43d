//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), applied to a base
//! model's tensors as they are read: W' = W + s·B·A with s = α/r (α/√r with `use_rslora`), r and
//! α taken per module from `rank_pattern` / `alpha_pattern` as PEFT matches them (a key matches a
//! module whose name is the key or ends in `.key`; keys are regular expressions). Fan-in-fan-out
//! layers (GPT-2's Conv1D) and embeddings take the transposed product. Other tensors in the
//! adapter (`modules_to_save`, trained biases) replace the base's.
//!
//! Nothing is materialised: the factors are small (r·(rows + cols) values per module), and the
//! executor adds the product block by block (`kernels::low_rank`).

use super::read_json;
use super::safetensors_file::SafetensorsFile;
use crate::error::{Error, Result};
use crate::kernels::convert::decode;
use crate::kernels::low_rank::LowRank;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix of every saved tensor name.
const PREFIX: &str = "base_model.model.";

#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub file: SafetensorsFile,
    /// Base tensor name → the update added to it.
    pub updates: BTreeMap<String, Arc<LowRank>>,
    /// Base tensor name → the adapter tensor that replaces it.
    pub replacements: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Settings {
    rank: usize,
    alpha: f64,
    rslora: bool,
    fan_in_fan_out: bool,
    rank_pattern: Vec<(regex::Regex, String, usize)>,
    alpha_pattern: Vec<(regex::Regex, String, f64)>,
}

/// The factors of one module, as found in the file.
#[derive(Default)]
struct Factors {
    a: Option<String>,
    b: Option<String>,
    embedding: bool,
}

impl Adapter {
    pub fn open(dir: &Path) -> Result<Adapter> {
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.is_file() {
            return Err(Error::ModelNotFound {
                model: dir.display().to_string(),
                message: format!("no {ADAPTER_CONFIG}: not a PEFT adapter directory"),
            });
        }
        let settings = Settings::parse(&read_json(&config_path)?, &config_path)?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        if !weights.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                " (adapter_model.bin is a pickle, never loaded: convert it to safetensors)"
            } else {
                ""
            };
            return Err(Error::bad_file(dir, format!("no {ADAPTER_WEIGHTS}{hint}")));
        }
        let file = SafetensorsFile::open(&weights)?;
        let mut modules: BTreeMap<String, Factors> = BTreeMap::new();
        let mut replacements = BTreeMap::new();
        for name in file.tensors.keys() {
            let rest = name.strip_prefix(PREFIX).ok_or_else(|| {
                Error::bad_file(&weights, format!("`{name}` does not start with `{PREFIX}`"))
            })?;
            let factor = [
                (".lora_A.weight", false, true),
                (".lora_B.weight", false, false),
                (".lora_embedding_A", true, true),
                (".lora_embedding_B", true, false),
            ]
            .into_iter()
            .find_map(|(suffix, embedding, is_a)| {
                rest.strip_suffix(suffix).map(|m| (m, embedding, is_a))
            });
            match factor {
                Some((module, embedding, is_a)) => {
                    let f = modules.entry(module.to_string()).or_default();
                    f.embedding = embedding;
                    *(if is_a { &mut f.a } else { &mut f.b }) = Some(name.clone());
                }
                None if rest.contains("lora_magnitude_vector") => {
                    return Err(Error::bad_file(
                        &weights,
                        format!("`{name}`: DoRA adapters are not supported"),
                    ))
                }
                None => {
                    replacements.insert(rest.to_string(), name.clone());
                }
            }
        }
        let mut updates = BTreeMap::new();
        for (module, factors) in &modules {
            let update = settings.update(&file, &weights, module, factors)?;
            updates.insert(format!("{module}.weight"), Arc::new(update));
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            file,
            updates,
            replacements,
        })
    }
}

impl Settings {
    fn parse(config: &serde_json::Value, path: &Path) -> Result<Settings> {
        let field = |key: &str| config.get(key).filter(|v| !v.is_null());
        if let Some(kind) = field("peft_type").and_then(|v| v.as_str()) {
            if kind != "LORA" {
                return Err(Error::bad_file(
                    path,
                    format!("`peft_type` {kind}: only LORA adapters can be merged"),
                ));
            }
        }
        let number = |key: &str| -> Result<f64> {
            let v =
                field(key).ok_or_else(|| Error::bad_file(path, format!("`{key}` is missing")))?;
            v.as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    Error::bad_file(path, format!("`{key}` = {v} is not a positive number"))
                })
        };
        let rank = number("r")?;
        let patterns = |key: &str| -> Result<Vec<(regex::Regex, String, f64)>> {
            let Some(map) = field(key) else {
                return Ok(Vec::new());
            };
            let map = map
                .as_object()
                .ok_or_else(|| Error::bad_file(path, format!("`{key}` is not a mapping")))?;
            map.iter()
                .map(|(pattern, v)| {
                    let value = v
                        .as_f64()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| {
                            Error::bad_file(
                                path,
                                format!("`{key}.{pattern}` = {v} is not a positive number"),
                            )
                        })?;
                    let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
                        .map_err(|e| Error::bad_file(path, format!("`{key}.{pattern}`: {e}")))?;
                    Ok((re, pattern.clone(), value))
                })
                .collect()
        };
        Ok(Settings {
            rank: rank as usize,
            alpha: number("lora_alpha")?,
            rslora: field("use_rslora")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            fan_in_fan_out: field("fan_in_fan_out")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            rank_pattern: patterns("rank_pattern")?
                .into_iter()
                .map(|(re, p, v)| (re, p, v as usize))
                .collect(),
            alpha_pattern: patterns("alpha_pattern")?,
        })
    }

    /// PEFT's choice among patterns: an exact key first, else the first that matches.
    fn lookup<T: Copy>(patterns: &[(regex::Regex, String, T)], module: &str) -> Option<T> {
        patterns
            .iter()
            .find(|(_, key, _)| key == module)
            .or_else(|| patterns.iter().find(|(re, _, _)| re.is_match(module)))
            .map(|(_, _, v)| *v)
    }

    fn update(
        &self,
        file: &SafetensorsFile,
        path: &Path,
        module: &str,
        factors: &Factors,
    ) -> Result<LowRank> {
        let (Some(a_name), Some(b_name)) = (&factors.a, &factors.b) else {
            return Err(Error::bad_file(
                path,
                format!("module `{module}` lacks its lora_A or lora_B factor"),
            ));
        };
        let load = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let entry = &file.tensors[name];
            if !entry.dtype.is_mergeable_float() || entry.shape.len() != 2 {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "`{name}` must be a 2-D float tensor, not {:?} {:?}",
                        entry.dtype, entry.shape
                    ),
                ));
            }
            let mut values = vec![0f32; entry.numel()];
            decode(
                entry.dtype,
                &file.map[entry.start..entry.start + entry.len],
                &mut values,
            );
            Ok((entry.shape.clone(), values))
        };
        let (a_shape, a) = load(a_name)?;
        let (b_shape, b) = load(b_name)?;
        // A is r × fan-in, B is fan-out × r.
        let rank = a_shape[0];
        if b_shape[1] != rank {
            return Err(Error::bad_file(
                path,
                format!(
                    "`{a_name}` has rank {rank} but `{b_name}` has {}",
                    b_shape[1]
                ),
            ));
        }
        let declared = Self::lookup(&self.rank_pattern, module).unwrap_or(self.rank);
        if declared != rank {
            return Err(Error::bad_file(
                path,
                format!("`{module}` has rank {rank} but the config says {declared}"),
            ));
        }
        let alpha = Self::lookup(&self.alpha_pattern, module).unwrap_or(self.alpha);
        let scale = if self.rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        } as f32;
        let a_transposed = transpose(&a, rank, a_shape[1]);
        // PEFT turns fan-in-fan-out off for plain Linear layers such as the LM head.
        let fan_in_fan_out = self.fan_in_fan_out && !module.ends_with("lm_head");
        Ok(if factors.embedding || fan_in_fan_out {
            LowRank {
                rank,
                rows: a_shape[1],
                cols: b_shape[0],
                p: a_transposed,
                q: b,
                scale,
            }
        } else {
            LowRank {
                rank,
                rows: b_shape[0],
                cols: a_shape[1],
                p: b,
                q: a_transposed,
                scale,
            }
        })
    }
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}
