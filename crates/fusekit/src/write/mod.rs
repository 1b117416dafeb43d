//! The output side: shards written header-first, then `model.safetensors.index.json`,
//! `config.json`, tokenizer files, the config used and a model card — all inside a temporary
//! directory beside OUT that is renamed to OUT only when everything succeeded.

pub mod shard;
pub mod staging;

pub use staging::{replace_dir, Staging};

use crate::checkpoint::{hub_cache, INDEX_FILE};
use crate::error::{Error, Result};
use crate::exec::{self, ExecOptions, Progress};
use crate::plan::Plan;
use std::path::{Path, PathBuf};

/// Files copied from the tokenizer donor when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Replace an existing OUT.
    pub force: bool,
}

/// Checks OUT against the inputs before anything is computed.
pub fn check_output(plan: &Plan, out: &Path, options: &WriteOptions) -> Result<()> {
    let target = absolute(out)?;
    let dirs = plan
        .models
        .iter()
        .chain(plan.companions.iter().flatten())
        .flat_map(|m| std::iter::once((m, &m.dir)).chain(m.adapter.as_ref().map(|a| (m, &a.dir))));
    for (model, dir) in dirs {
        let input = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        if target.starts_with(&input) || input.starts_with(&target) {
            return Err(Error::Output {
                path: out.to_path_buf(),
                message: format!(
                    "overlaps input model `{}` ({}); inputs are never written",
                    model.reference,
                    input.display()
                ),
            });
        }
    }
    if out.exists() && !options.force {
        return Err(Error::Output {
            path: out.to_path_buf(),
            message: "already exists (use --force to replace it)".into(),
        });
    }
    Ok(())
}

/// OUT with symlinks of its existing ancestors resolved.
fn absolute(path: &Path) -> Result<PathBuf> {
    let path = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name().unwrap_or_default().to_owned());
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let mut resolved = existing
        .canonicalize()
        .map_err(|e| Error::io(existing, e))?;
    resolved.extend(rest.iter().rev());
    Ok(resolved)
}

/// Executes the plan and writes the complete model to `out`.
pub fn write(
    plan: &Plan,
    out: &Path,
    exec_options: &ExecOptions,
    options: &WriteOptions,
    progress: &dyn Progress,
) -> Result<()> {
    check_output(plan, out, options)?;
    let staging = Staging::new(out)?;

    let paths: Vec<PathBuf> = plan
        .shards
        .iter()
        .map(|s| staging.dir.join(&s.name))
        .collect();
    let files = plan
        .shards
        .iter()
        .zip(&paths)
        .map(|(s, p)| shard::create(plan, s, p))
        .collect::<Result<Vec<_>>>()?;
    exec::run(
        plan,
        &exec::Output {
            files: &files,
            paths: &paths,
        },
        exec_options,
        progress,
    )?;
    for (f, p) in files.iter().zip(&paths) {
        f.sync(p)?;
    }
    write_small_files(plan, &staging.dir)?;
    // An output computed from an input that changed meanwhile may be wrong: it is not committed.
    let companions = plan.companions.iter().flatten();
    plan.models
        .iter()
        .chain(companions)
        .try_for_each(|m| m.check_unchanged())?;
    staging.commit(out)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON of plain values");
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn write_small_files(plan: &Plan, dir: &Path) -> Result<()> {
    if plan.shards.len() > 1 {
        let weight_map: serde_json::Map<String, serde_json::Value> = plan
            .tensors
            .iter()
            .map(|t| (t.name.clone(), plan.shards[t.shard].name.clone().into()))
            .collect();
        write_json(
            &dir.join(INDEX_FILE),
            &serde_json::json!({"metadata": {"total_size": plan.total_bytes()}, "weight_map": weight_map}),
        )?;
    }
    write_json(
        &dir.join(crate::checkpoint::CONFIG_FILE),
        &plan.output_config,
    )?;
    let donor = &plan.models[plan.tokenizer_donor].dir;
    for name in TOKENIZER_FILES {
        let from = donor.join(name);
        if from.is_file() {
            std::fs::copy(&from, dir.join(name)).map_err(|e| Error::io(&from, e))?;
        }
    }
    if let Some(vocabulary) = plan.vocabulary.as_ref().filter(|v| v.rewritten) {
        write_vocabulary(vocabulary, dir)?;
    }
    if let Some(template) = &plan.chat_template {
        let path = dir.join("tokenizer_config.json");
        let mut config = if path.is_file() {
            crate::checkpoint::read_json(&path)?
        } else {
            serde_json::json!({})
        };
        config["chat_template"] = template.clone().into();
        write_json(&path, &config)?;
        std::fs::write(dir.join("chat_template.jinja"), template)
            .map_err(|e| Error::io(dir.join("chat_template.jinja"), e))?;
    }
    std::fs::write(dir.join("mergekit_config.yml"), &plan.config_text)
        .map_err(|e| Error::io(dir.join("mergekit_config.yml"), e))?;
    std::fs::write(dir.join("README.md"), model_card(plan))
        .map_err(|e| Error::io(dir.join("README.md"), e))
}

/// The output tokenizer as `tokenizer.json`, and its added tokens in `tokenizer_config.json`.
fn write_vocabulary(vocabulary: &crate::vocab::Vocabulary, dir: &Path) -> Result<()> {
    let path = dir.join(crate::vocab::TOKENIZER_FILE);
    vocabulary
        .tokenizer
        .save(&path, true)
        .map_err(|e| Error::bad_file(&path, format!("cannot write the tokenizer: {e}")))?;
    let path = dir.join("tokenizer_config.json");
    let mut config = if path.is_file() {
        crate::checkpoint::read_json(&path)?
    } else {
        serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"})
    };
    config["added_tokens_decoder"] = vocabulary.added_tokens_decoder();
    write_json(&path, &config)
}

fn model_card(plan: &Plan) -> String {
    let spec = plan.method.spec();
    let hub: Vec<&str> = plan
        .models
        .iter()
        .map(|m| m.reference.as_str())
        .filter(|r| hub_cache::is_repo_id(r) && !Path::new(r).exists())
        .collect();
    let mut card = String::from("---\n");
    if !hub.is_empty() {
        card.push_str("base_model:\n");
        for r in &hub {
            card.push_str(&format!("- {r}\n"));
        }
    }
    card.push_str("library_name: transformers\ntags:\n- mergekit\n- merge\n- fusekit\n---\n\n# Merged model\n\n");
    card.push_str(&format!(
        "This model was merged with fusekit using the `{}` method ({}).\n\n## Models\n\n",
        spec.name, spec.reference
    ));
    for (i, m) in plan.models.iter().enumerate() {
        let role = if Some(i) == plan.base { " (base)" } else { "" };
        card.push_str(&format!("- `{}`{role}\n", m.reference));
    }
    card.push_str(&format!(
        "\n## Configuration\n\n```yaml\n{}\n```\n",
        plan.config_text.trim_end()
    ));
    card
}
