//! Output vocabularies: mergekit's `tokenizer_source` / `tokenizer:` block (spec §2.7).
//!
//! The output tokenizer is a model's (`base`, or a model), or the union: the base tokenizer plus
//! every other model's tokens it lacks (appended as added tokens, models in config order, each
//! model's tokens in id order — mergekit walks a hash map, so its ids for new tokens vary from run
//! to run) and every added token with the settings it was first seen with. Tokens with an id at
//! or past a model's `vocab_size` are ignored (and stripped from the base's BPE tokenizer).
//! Tokens named in `tokens:` that the vocabulary lacks are added.
//!
//! Every embedding and LM head is then read through a row map into the new vocabulary. A model
//! that lacks a token (or every model, for a `force`d rule) gets a substitute row, in order of
//! preference: the token's rule; the only model that has it; the base's row; the mean over the
//! models that have it; zeros when none does. Rows added by `pad_to_multiple_of` are the mean of
//! the model's rows. Models without a `tokenizer.json` are taken to share the base's vocabulary.

use crate::checkpoint::rows::{Row, RowMap, Substitute};
use crate::checkpoint::{Checkpoint, TensorSource};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use tokenizers::{AddedToken, Tokenizer};

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Which tokenizer the output gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Union,
    Model(usize),
}

/// A per-token rule of the `tokenizer.tokens` block, models resolved to plan indices.
#[derive(Debug, Clone)]
pub struct TokenRule {
    pub from: RuleSource,
    pub force: bool,
}

#[derive(Debug, Clone)]
pub enum RuleSource {
    /// The model's row for the same token.
    Model(usize),
    /// The model's row for another token, by name or id.
    ModelToken {
        model: usize,
        token: Option<String>,
        token_id: Option<u32>,
    },
    Zero,
}

#[derive(Debug)]
pub struct VocabularySpec {
    pub source: Source,
    pub tokens: BTreeMap<String, TokenRule>,
    pub pad_to_multiple_of: Option<usize>,
}

/// A token rule with the rows it names.
#[derive(Debug, Clone, Copy)]
enum Resolved {
    Zero,
    /// The model's row for the same token.
    SameToken(usize),
    /// A given row of the model.
    Row(usize, u32),
}

/// The output vocabulary and where every model's rows go in it.
pub struct Vocabulary {
    pub tokenizer: Tokenizer,
    /// Output tokens by id.
    pub tokens: Vec<String>,
    /// Rows of the output embeddings (tokens plus padding).
    pub rows: usize,
    /// Whether the tokenizer differs from the donor's files (a union, added or stripped tokens),
    /// so `tokenizer.json` must be written rather than copied.
    pub rewritten: bool,
    /// Per plan model: output id → its row.
    maps: Vec<Vec<Option<u32>>>,
    /// Output id → its rule and whether it is forced.
    rules: HashMap<u32, (Resolved, bool)>,
    base: Option<usize>,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Vocabulary({} tokens, {} rows)",
            self.tokens.len(),
            self.rows
        )
    }
}

/// Whether a tensor is indexed by token (its rows follow the vocabulary).
pub fn is_vocabulary_tensor(name: &str) -> bool {
    [
        "embed_tokens.weight",
        "lm_head.weight",
        "wte.weight",
        "word_embeddings.weight",
        "embed_out.weight",
    ]
    .iter()
    .any(|suffix| name == *suffix || name.ends_with(&format!(".{suffix}")))
}

/// A model's `vocab_size` (or `text_config.vocab_size`).
pub fn config_vocab_size(config: &serde_json::Value) -> Option<usize> {
    config
        .get("vocab_size")
        .or_else(|| config.get("text_config").and_then(|t| t.get("vocab_size")))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
}

struct ModelTokenizer {
    tokenizer: Tokenizer,
    vocab: HashMap<String, u32>,
    vocab_size: usize,
    /// Whether tokens past `vocab_size` were stripped from the file's tokenizer.
    stripped: bool,
}

fn load_tokenizer(model: &Checkpoint, strip: bool) -> Result<Option<ModelTokenizer>> {
    let path = model.dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let probe = Tokenizer::from_str(&text).map_err(|e| Error::bad_file(&path, e.to_string()))?;
    let vocab_size = config_vocab_size(&model.config).unwrap_or_else(|| probe.get_vocab_size(true));
    let strip = strip
        && probe
            .get_vocab(true)
            .values()
            .any(|&id| id as usize >= vocab_size);
    let tokenizer = if strip {
        stripped(&text, vocab_size, &path)?
    } else {
        probe
    };
    let vocab = tokenizer.get_vocab(true);
    Ok(Some(ModelTokenizer {
        tokenizer,
        vocab,
        vocab_size,
        stripped: strip,
    }))
}

/// A BPE tokenizer without the tokens at or past `vocab_size` (mergekit's
/// `get_stripped_tokenizer`): vocabulary entries, added tokens and merges that use them.
fn stripped(text: &str, vocab_size: usize, path: &std::path::Path) -> Result<Tokenizer> {
    let mut json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::bad_file(path, e.to_string()))?;
    if json["model"]["type"] != "BPE" {
        return Err(Error::bad_file(
            path,
            format!(
                "has tokens past vocab_size {vocab_size}; only BPE tokenizers can be stripped of them"
            ),
        ));
    }
    let mut unused = std::collections::HashSet::new();
    if let Some(vocab) = json["model"]["vocab"].as_object_mut() {
        vocab.retain(|token, id| {
            let keep = id.as_u64().is_some_and(|i| (i as usize) < vocab_size);
            if !keep {
                unused.insert(token.clone());
            }
            keep
        });
    }
    if let Some(added) = json["added_tokens"].as_array_mut() {
        added.retain(|t| t["id"].as_u64().is_some_and(|i| (i as usize) < vocab_size));
    }
    if let Some(merges) = json["model"]["merges"].as_array_mut() {
        merges.retain(|m| {
            let parts: Vec<String> = match m {
                serde_json::Value::String(s) => s.split(' ').map(str::to_string).collect(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            !parts.iter().any(|p| unused.contains(p))
        });
    }
    Tokenizer::from_str(&json.to_string()).map_err(|e| Error::bad_file(path, e.to_string()))
}

impl Vocabulary {
    /// Builds the vocabulary for `models` (plan indices) with `base` (or the first model) as the
    /// reference. `None` when the tokenizer source has no `tokenizer.json` (nothing to permute
    /// by; the tokenizer files are copied as they are).
    pub fn build(
        spec: &VocabularySpec,
        all: &[Checkpoint],
        models: &[usize],
        base: Option<usize>,
    ) -> Result<Option<Vocabulary>> {
        let reference = base.unwrap_or(models[0]);
        let mut tokenizers: BTreeMap<usize, ModelTokenizer> = BTreeMap::new();
        for &m in std::iter::once(&reference).chain(models) {
            if tokenizers.contains_key(&m) {
                continue;
            }
            if let Some(t) = load_tokenizer(&all[m], m == reference)? {
                tokenizers.insert(m, t);
            }
        }
        let Some(base_tok) = tokenizers.get(&reference) else {
            return match spec.source {
                Source::Union => Err(Error::ModelNotFound {
                    model: all[reference].reference.clone(),
                    message: format!("has no {TOKENIZER_FILE}, which `union` needs"),
                }),
                Source::Model(_) => Ok(None),
            };
        };
        let mut out = match spec.source {
            Source::Union => union(&tokenizers, reference, models)?,
            Source::Model(m) if m == reference => base_tok.tokenizer.clone(),
            Source::Model(m) => match load_tokenizer(&all[m], false)? {
                Some(t) => t.tokenizer,
                None => return Ok(None),
            },
        };
        let present = out.get_vocab(true);
        let extra: Vec<AddedToken> = spec
            .tokens
            .keys()
            .filter(|t| !present.contains_key(*t))
            .map(|t| AddedToken::from(t.clone(), false))
            .collect();
        let rewritten = spec.source == Source::Union
            || !extra.is_empty()
            || (base_tok.stripped && spec.source == Source::Model(reference));
        out.add_tokens(extra)
            .map_err(|e| Error::config(format!("tokenizer.tokens: {e}")))?;

        let vocab = out.get_vocab(true);
        let mut tokens = vec![String::new(); vocab.len()];
        for (token, &id) in &vocab {
            let slot = tokens.get_mut(id as usize).ok_or_else(|| {
                Error::config(format!(
                    "the output tokenizer's ids are not contiguous (`{token}` has id {id} of {})",
                    vocab.len()
                ))
            })?;
            *slot = token.clone();
        }
        let rows = match spec.pad_to_multiple_of {
            Some(m) if m > 0 => tokens.len().div_ceil(m) * m,
            _ => tokens.len(),
        };
        let base_vocab = &base_tok.vocab;
        let maps = (0..all.len())
            .map(|m| {
                let (vocab, size) = match tokenizers.get(&m) {
                    Some(t) => (&t.vocab, t.vocab_size),
                    None => (base_vocab, base_tok.vocab_size),
                };
                tokens
                    .iter()
                    .map(|t| vocab.get(t).copied().filter(|&i| (i as usize) < size))
                    .collect()
            })
            .collect::<Vec<Vec<Option<u32>>>>();
        let mut rules = HashMap::new();
        for (token, rule) in &spec.tokens {
            let resolved = match &rule.from {
                RuleSource::Zero => Resolved::Zero,
                RuleSource::Model(m) => Resolved::SameToken(*m),
                RuleSource::ModelToken {
                    model,
                    token_id: Some(row),
                    ..
                } => Resolved::Row(*model, *row),
                RuleSource::ModelToken {
                    model, token: name, ..
                } => {
                    let name = name.as_deref().unwrap_or_default();
                    let vocab = tokenizers.get(model).map_or(base_vocab, |t| &t.vocab);
                    let row = vocab.get(name).ok_or_else(|| {
                        Error::config(format!(
                            "tokenizer.tokens.{token}: `{name}` is not a token of `{}`",
                            all[*model].reference
                        ))
                    })?;
                    Resolved::Row(*model, *row)
                }
            };
            rules.insert(vocab[token], (resolved, rule.force));
        }
        Ok(Some(Vocabulary {
            tokenizer: out,
            tokens,
            rows,
            rewritten,
            maps,
            rules,
            base,
        }))
    }

    /// The inputs of a vocabulary tensor read in the output vocabulary: `inputs` are
    /// `(plan model, stored tensor)` pairs, all 2-D with the same row width.
    pub fn permute(
        &self,
        tensor: &str,
        inputs: &[(usize, TensorSource)],
    ) -> Result<Vec<TensorSource>> {
        let cols = inputs[0].1.shape.get(1).copied().unwrap_or(0);
        for (m, source) in inputs {
            let max_row = self.maps[*m].iter().flatten().max().map_or(0, |r| r + 1);
            if source.shape.len() != 2
                || source.shape[1] != cols
                || source.shape[0] < max_row as usize
            {
                return Err(Error::tensor(
                    tensor,
                    format!(
                        "shape {:?} does not fit the vocabulary ({max_row} rows of {cols})",
                        source.shape
                    ),
                ));
            }
        }
        let donor_of = |model: usize| -> Result<usize> {
            inputs.iter().position(|(m, _)| *m == model).ok_or_else(|| {
                Error::tensor(
                    tensor,
                    "a tokenizer rule names a model that is not an input of this tensor",
                )
            })
        };
        let n = self.tokens.len();
        let mut substitutes: Vec<Substitute> = Vec::new();
        // Output id → the row every model lacking it (or all, if forced) gets.
        let mut defaults: Vec<Option<Row>> = vec![None; n];
        for (t, default) in defaults.iter_mut().enumerate() {
            let holders: Vec<usize> = (0..inputs.len())
                .filter(|&i| self.maps[inputs[i].0][t].is_some())
                .collect();
            let rule = self.rules.get(&(t as u32));
            let forced = rule.is_some_and(|r| r.1);
            if !forced && holders.len() == inputs.len() {
                continue;
            }
            let from: Option<Substitute> = match rule {
                Some((Resolved::Zero, _)) => None,
                Some((Resolved::SameToken(model), _)) => {
                    let row = self.maps[*model][t].ok_or_else(|| {
                        Error::tensor(
                            tensor,
                            format!(
                                "token `{}`: its rule's model does not have it",
                                self.tokens[t]
                            ),
                        )
                    })?;
                    Some(vec![(donor_of(*model)?, row)])
                }
                Some((Resolved::Row(model, row), _)) => {
                    let donor = donor_of(*model)?;
                    if *row as usize >= inputs[donor].1.shape[0] {
                        return Err(Error::tensor(
                            tensor,
                            format!("token `{}`: rule row {row} is out of range", self.tokens[t]),
                        ));
                    }
                    Some(vec![(donor, *row)])
                }
                None => {
                    let row_of = |i: usize| (i, self.maps[inputs[i].0][t].expect("holder"));
                    let base_holder = self
                        .base
                        .and_then(|b| holders.iter().copied().find(|&i| inputs[i].0 == b));
                    match (holders.len(), base_holder) {
                        (0, _) => None,
                        (1, _) => Some(vec![row_of(holders[0])]),
                        (_, Some(b)) => Some(vec![row_of(b)]),
                        _ => Some(holders.iter().map(|&i| row_of(i)).collect()),
                    }
                }
            };
            *default = Some(match from {
                Some(s) => {
                    substitutes.push(s);
                    Row::Substitute(substitutes.len() as u32 - 1)
                }
                None => Row::Zero,
            });
        }
        let substitutes = Arc::new(substitutes);
        let donors: Vec<TensorSource> = inputs.iter().map(|(_, s)| s.clone()).collect();
        inputs
            .iter()
            .enumerate()
            .map(|(own, (m, source))| {
                let rows: Vec<Row> = (0..self.rows)
                    .map(|t| {
                        if t >= n {
                            return Row::Pad;
                        }
                        let forced = self.rules.get(&(t as u32)).is_some_and(|r| r.1);
                        match (self.maps[*m][t], defaults[t]) {
                            (Some(row), _) if !forced => Row::Own(row),
                            (_, Some(default)) => default,
                            (Some(row), None) => Row::Own(row),
                            (None, None) => Row::Zero,
                        }
                    })
                    .collect();
                let identity = rows.len() == source.shape[0]
                    && rows
                        .iter()
                        .enumerate()
                        .all(|(t, r)| *r == Row::Own(t as u32));
                if identity {
                    return Ok(source.clone());
                }
                let mut map = RowMap {
                    cols,
                    rows,
                    donors: donors.clone(),
                    own,
                    substitutes: substitutes.clone(),
                    pad: Vec::new(),
                };
                if self.rows > n {
                    map.pad = map.mean_row();
                }
                let mut view = source.clone();
                view.shape = vec![self.rows, cols];
                view.rows = Some(Arc::new(map));
                Ok(view)
            })
            .collect()
    }

    /// `tokenizer_config.json`'s `added_tokens_decoder` for the output tokenizer.
    pub fn added_tokens_decoder(&self) -> serde_json::Value {
        let decoder = self.tokenizer.get_added_tokens_decoder();
        let mut ids: Vec<&u32> = decoder.keys().collect();
        ids.sort();
        let map: serde_json::Map<String, serde_json::Value> = ids
            .into_iter()
            .map(|id| {
                let t = &decoder[id];
                (
                    id.to_string(),
                    serde_json::json!({
                        "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                        "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                    }),
                )
            })
            .collect();
        serde_json::Value::Object(map)
    }
}

/// mergekit's `build_union_tokenizer`: the base tokenizer, then the other models' missing tokens
/// as added tokens, then every added token with its first-seen settings.
fn union(
    tokenizers: &BTreeMap<usize, ModelTokenizer>,
    reference: usize,
    models: &[usize],
) -> Result<Tokenizer> {
    let mut out_vocab: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut added: Vec<AddedToken> = Vec::new();
    let mut added_seen = std::collections::HashSet::new();
    let order =
        std::iter::once(reference).chain(models.iter().copied().filter(|&m| m != reference));
    let mut visited = std::collections::HashSet::new();
    for m in order {
        let Some(t) = tokenizers.get(&m).filter(|_| visited.insert(m)) else {
            continue;
        };
        let decoder = t.tokenizer.get_added_tokens_decoder();
        let added_contents: std::collections::HashSet<&str> =
            decoder.values().map(|a| a.content.as_str()).collect();
        let mut by_id: Vec<(&String, &u32)> = t.vocab.iter().collect();
        by_id.sort_by_key(|(_, id)| **id);
        for (token, &id) in by_id {
            if (id as usize) < t.vocab_size
                && !added_contents.contains(token.as_str())
                && seen.insert(token.clone())
            {
                out_vocab.push(token.clone());
            }
        }
        let mut added_ids: Vec<&u32> = decoder.keys().collect();
        added_ids.sort();
        for id in added_ids {
            let token = &decoder[id];
            if (*id as usize) < t.vocab_size && added_seen.insert(token.content.clone()) {
                added.push(token.clone());
            }
        }
    }
    let mut out = tokenizers[&reference].tokenizer.clone();
    let base_vocab = &tokenizers[&reference].vocab;
    let new: Vec<AddedToken> = out_vocab
        .into_iter()
        .filter(|t| !added_seen.contains(t) && !base_vocab.contains_key(t))
        .map(|t| AddedToken::from(t, false))
        .collect();
    out.add_tokens(new)
        .and_then(|_| out.add_tokens(added))
        .map_err(|e| Error::config(format!("building the union tokenizer: {e}")))?;
    Ok(out)
}
