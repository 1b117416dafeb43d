//! mergekit's YAML config: typed schema, loading with line numbers, and parameter values.
//! Semantics follow mergekit (shared/specs/mergekit.md §2); see `params` for value resolution.

pub mod params;
pub mod recipe;

use crate::error::{Error, Result};
pub use params::{ParamMap, ParamValue, Scalar};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// The step's name in a multi-document config (see `recipe`).
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    pub merge_method: Spanned<String>,
    #[serde(default)]
    pub base_model: Option<Spanned<String>>,
    #[serde(default)]
    pub models: Option<Vec<InputModel>>,
    #[serde(default)]
    pub slices: Option<Vec<InputSlice>>,
    #[serde(default)]
    pub modules: Option<std::collections::BTreeMap<String, ModuleConfig>>,
    #[serde(default)]
    pub parameters: Option<ParamMap>,
    #[serde(default)]
    pub dtype: Option<Spanned<String>>,
    #[serde(default)]
    pub out_dtype: Option<Spanned<String>>,
    #[serde(default)]
    pub tokenizer_source: Option<Spanned<String>>,
    #[serde(default)]
    pub tokenizer: Option<TokenizerBlock>,
    #[serde(default)]
    pub chat_template: Option<Spanned<String>>,
    /// Per-model data of the data-aware methods, keyed by model reference as written.
    #[serde(default)]
    pub data: Option<std::collections::BTreeMap<String, DataEntry>>,
}

/// What a data-aware method knows about one input model.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataEntry {
    /// A statistics checkpoint of the model's diagonal Fisher (`fusekit fisher`): the same
    /// tensor names and shapes as the model.
    #[serde(default)]
    pub fisher: Option<Spanned<String>>,
    /// The model's task data (JSONL), from which `fusekit merge` built with the model runtime
    /// (`--features nn`) computes what the method needs (the Fisher; learned coefficients).
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    /// How the Fisher is estimated from `file`: `exact`, `sampled` or `empirical`.
    #[serde(default)]
    pub kind: Option<Spanned<String>>,
    /// How many examples of `file` are used.
    #[serde(default)]
    pub examples: Option<Spanned<u64>>,
}

/// One part of a multi-module model (`modules: {NAME: …}`), merged with its own inputs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    #[serde(default)]
    pub models: Option<Vec<InputModel>>,
    #[serde(default)]
    pub slices: Option<Vec<InputSlice>>,
    #[serde(default)]
    pub parameters: Option<ParamMap>,
}

/// mergekit's `tokenizer:` block: the output vocabulary and per-token embedding rules.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerBlock {
    /// `union` (default), `base`, or a model.
    #[serde(default)]
    pub source: Option<Spanned<String>>,
    #[serde(default)]
    pub tokens: Option<std::collections::BTreeMap<String, TokenRule>>,
    #[serde(default)]
    pub pad_to_multiple_of: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRule {
    pub source: Spanned<TokenSource>,
    /// Use the rule even for models that have the token.
    #[serde(default)]
    pub force: bool,
}

/// Where a token's embedding comes from: a model's row for the same token, a model's row for
/// another token (`kind: model_token`), or zeros (`kind: zero`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenSource {
    Model(String),
    Kind(TokenSourceKind),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenSourceKind {
    ModelToken {
        model: String,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        token_id: Option<u32>,
    },
    Zero,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputModel {
    pub model: Spanned<String>,
    #[serde(default)]
    pub parameters: Option<ParamMap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSlice {
    pub sources: Vec<SliceSource>,
    #[serde(default)]
    pub base_model: Option<Spanned<String>>,
    /// Parsed for compatibility; mergekit ignores it too.
    #[serde(default)]
    pub residual_weight: Option<f64>,
    #[serde(default)]
    pub parameters: Option<ParamMap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceSource {
    pub model: Spanned<String>,
    pub layer_range: Spanned<[usize; 2]>,
    #[serde(default)]
    pub parameters: Option<ParamMap>,
}

/// A config together with its source text (written beside the output) and where it came from.
#[derive(Debug)]
pub struct LoadedConfig {
    pub config: MergeConfig,
    pub text: String,
    pub origin: String,
}

pub fn line_of<T>(s: &Spanned<T>) -> u64 {
    s.referenced.line()
}

/// A config error that points at a line.
pub fn error_at<T>(s: &Spanned<T>, key: &str, message: impl std::fmt::Display) -> Error {
    Error::config(format!("`{key}` (line {}): {message}", line_of(s)))
}

pub fn load(path: &Path) -> Result<LoadedConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, origin: &str) -> Result<LoadedConfig> {
    let config: MergeConfig =
        serde_saphyr::from_str(text).map_err(|e| Error::config(format!("{origin}: {e}")))?;
    parse_document(config, text.to_string(), origin)
}

fn parse_document(config: MergeConfig, text: String, origin: &str) -> Result<LoadedConfig> {
    validate_shape(&config)?;
    Ok(LoadedConfig {
        config,
        text,
        origin: origin.to_string(),
    })
}

fn validate_shape(c: &MergeConfig) -> Result<()> {
    if let (Some(s), Some(_)) = (&c.tokenizer_source, &c.tokenizer) {
        return Err(error_at(
            s,
            "tokenizer_source",
            "give either `tokenizer_source` or a `tokenizer` block, not both",
        ));
    }
    for (token, rule) in c.tokenizer.iter().flat_map(|t| t.tokens.iter().flatten()) {
        if let TokenSource::Kind(TokenSourceKind::ModelToken {
            token: name,
            token_id,
            ..
        }) = &rule.source.value
        {
            if name.is_some() == token_id.is_some() {
                return Err(error_at(
                    &rule.source,
                    &format!("tokenizer.tokens.{token}.source"),
                    "`model_token` needs exactly one of `token` and `token_id`",
                ));
            }
        }
    }
    match &c.modules {
        Some(_) if c.models.is_some() || c.slices.is_some() => {
            return Err(Error::config(
                "give `modules`, or `models`/`slices` at the top level, not both",
            ))
        }
        Some(modules) if modules.is_empty() => return Err(Error::config("`modules` is empty")),
        Some(modules) => {
            for (name, m) in modules {
                inputs_shape(m.models.as_ref(), m.slices.as_ref())
                    .map_err(|e| Error::config(format!("modules.{name}: {e}")))?;
            }
        }
        None => inputs_shape(c.models.as_ref(), c.slices.as_ref()).map_err(Error::config)?,
    }
    let all_slices = c
        .slices
        .iter()
        .chain(
            c.modules
                .iter()
                .flat_map(|m| m.values().flat_map(|m| m.slices.iter())),
        )
        .flatten();
    for slice in all_slices {
        for source in &slice.sources {
            let [a, b] = source.layer_range.value;
            if a >= b {
                return Err(error_at(
                    &source.layer_range,
                    "layer_range",
                    format!("[{a}, {b}] is empty"),
                ));
            }
        }
    }
    Ok(())
}

/// One part's inputs: either `models` or `slices`, not empty.
fn inputs_shape(
    models: Option<&Vec<InputModel>>,
    slices: Option<&Vec<InputSlice>>,
) -> std::result::Result<(), &'static str> {
    match (models, slices) {
        (Some(_), Some(_)) => Err("give either `models` or `slices`, not both"),
        (None, None) => Err("one of `models` or `slices` is required"),
        (Some(m), None) if m.is_empty() => Err("`models` is empty"),
        (None, Some(s)) if s.is_empty() => Err("`slices` is empty"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIES: &str = "models:
  - model: a
    # no parameters necessary for base model
  - model: b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: c
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: a
parameters:
  normalize: true
dtype: float16
";

    #[test]
    fn parses_mergekit_ties_example() {
        let c = parse(TIES, "t.yml").unwrap().config;
        assert_eq!(c.merge_method.value, "ties");
        let models = c.models.unwrap();
        assert_eq!(models.len(), 3);
        let b = models[1].parameters.as_ref().unwrap();
        assert_eq!(b["density"].referenced.line(), 6);
        assert!(matches!(
            ParamValue::parse("weight", &b["weight"]).unwrap(),
            ParamValue::List(_)
        ));
    }

    #[test]
    fn misspelled_key_names_key_and_line() {
        let err = parse("merge_methd: linear\nmodels: []\n", "x.yml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("merge_methd") && err.contains("line 1"),
            "{err}"
        );
        let err = parse(
            "merge_method: linear\nmodels:\n  - model: a\n    paramters: {}\n",
            "x.yml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("paramters") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn rejects_empty_and_ambiguous_inputs() {
        assert!(parse("merge_method: linear\n", "x").is_err());
        let err = parse("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [3, 3]\n", "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer_range") && err.contains("line 5"),
            "{err}"
        );
    }
}
