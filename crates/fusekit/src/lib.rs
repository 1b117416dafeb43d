//! fusekit: streaming, reproducible merges of Hugging Face checkpoints.
//!
//! The data flow is the module list: [`config`] (YAML → typed config) → [`plan`] (headers only →
//! every output tensor with its inputs, parameters, shard and offset) → [`exec`] (statistics and
//! merge passes under a memory budget) → [`write`] (shards, index, config, tokenizer, model card,
//! atomic rename). [`methods`] hold the math, [`kernels`] the numeric loops, [`checkpoint`] the
//! input side.

pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod continual;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod extract_lora;
pub mod fixtures;
pub mod fuzzing;
pub mod kernels;
pub mod methods;
pub mod plan;
pub mod rng;
pub mod vocab;
pub mod write;

pub use error::{Error, Result};

use std::path::{Path, PathBuf};

/// Everything a merge can be told besides the config.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    pub plan: plan::PlanOptions,
    pub exec: exec::ExecOptions,
    pub write: write::WriteOptions,
    pub steps: StepOptions,
}

/// How the named steps of a multi-document config are run.
#[derive(Debug, Clone, Default)]
pub struct StepOptions {
    /// Where named steps write (default: `OUT-steps` beside OUT).
    pub intermediate_dir: Option<PathBuf>,
    /// Merge named steps again even when their output exists.
    pub rerun: bool,
}

/// Loads `config`, plans, merges and writes the model to `out` (atomically). A multi-document
/// config runs its steps in dependency order; returns the final step's plan.
pub fn merge(
    config: &Path,
    out: &Path,
    options: &MergeOptions,
    progress: &dyn exec::Progress,
) -> Result<plan::Plan> {
    let mut recipe = config::recipe::load(config)?;
    let outputs = step_outputs(&mut recipe, out, &options.steps);
    let last = recipe.steps.len() - 1;
    for (i, (step, target)) in recipe.steps.iter().zip(&outputs).enumerate() {
        let name = step.name.as_deref().unwrap_or("final");
        let is_final = i == last;
        if !is_final && step_is_done(target, name)? && !options.steps.rerun {
            progress.reused(name, target);
            continue;
        }
        let plan = plan::build(&step.loaded, &options.plan)?;
        progress.step(
            if recipe.steps.len() > 1 { name } else { "" },
            plan.total_bytes() as u64,
        );
        let write = if is_final {
            options.write.clone()
        } else {
            write::WriteOptions { force: true }
        };
        write::write(&plan, target, &options.exec, &write, progress)?;
        if is_final {
            return Ok(plan);
        }
    }
    unreachable!("the final step returns")
}

/// Where every step of `recipe` writes, with step names in model references resolved to them.
pub fn step_outputs(
    recipe: &mut config::recipe::Recipe,
    out: &Path,
    options: &StepOptions,
) -> Vec<PathBuf> {
    let intermediate = options.intermediate_dir.clone().unwrap_or_else(|| {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push("-steps");
        out.with_file_name(name)
    });
    let outputs = recipe.outputs(out, &intermediate);
    recipe.resolve(&outputs);
    outputs
}

/// Whether a named step's output is already there. Outputs appear by atomic rename, so a
/// directory with a config and weights is complete; anything else there is not ours to replace.
fn step_is_done(dir: &Path, name: &str) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let complete = dir.join(checkpoint::CONFIG_FILE).is_file()
        && (dir.join(checkpoint::SINGLE_FILE).is_file()
            || dir.join(checkpoint::INDEX_FILE).is_file());
    if complete {
        Ok(true)
    } else {
        Err(Error::Output {
            path: dir.to_path_buf(),
            message: format!("the output of step `{name}` exists but holds no model; remove it"),
        })
    }
}
