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
pub mod kernels;
pub mod methods;
pub mod rng;

pub use error::{Error, Result};
