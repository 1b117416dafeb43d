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
pub mod dtype;
pub mod error;
pub mod exec;
pub mod fixtures;
pub mod kernels;
pub mod methods;
pub mod plan;
pub mod rng;
pub mod write;

pub use error::{Error, Result};

use std::path::Path;

/// Everything a merge can be told besides the config.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    pub plan: plan::PlanOptions,
    pub exec: exec::ExecOptions,
    pub write: write::WriteOptions,
}

/// Loads `config`, plans, merges and writes the model to `out` (atomically).
pub fn merge(
    config: &Path,
    out: &Path,
    options: &MergeOptions,
    progress: &dyn exec::Progress,
) -> Result<plan::Plan> {
    let loaded = config::load(config)?;
    let plan = plan::build(&loaded, &options.plan)?;
    write::write(&plan, out, &options.exec, &options.write, progress)?;
    Ok(plan)
}
