//! Continual merging with OPCM (`methods::opcm`): models are folded into a running merge one at a
//! time, with memory constant in their number. The state is a directory: the merged model
//! (a normal Hugging Face checkpoint, usable as is) and `continual.json` with the base, α, λ and
//! the task-vector norms seen so far, so another model can be added months later.
//!
//! Each step reads the base, the running merge and the new model twice: once for the model-wide
//! norms (‖τₜ‖ and ‖U‖, which give λₜ), once to write the new merge. The new state is written
//! beside the old one and replaces it only when complete.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::methods::opcm::OpcmNorms;
use crate::MergeOptions;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "continual.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// The base model (absolute path or repo id).
    pub base: String,
    pub alpha: f64,
    /// λ of the current merge.
    pub lambda: f64,
    /// ‖τᵢ‖ of every model merged so far, in order.
    pub norms: Vec<f64>,
    pub models: Vec<String>,
}

impl State {
    pub fn load(dir: &Path) -> Result<State> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e.to_string()))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let text = serde_json::to_string_pretty(self).expect("plain values") + "\n";
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}

/// An absolute path for local models (the state must find them from anywhere later).
fn absolute(reference: &str) -> String {
    let path = Path::new(reference);
    if path.is_dir() {
        std::path::absolute(path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| reference.to_string())
    } else {
        reference.to_string()
    }
}

/// Starts a state at `out` from the first fine-tune: θ⁽¹⁾ = θ₁, λ₁ = 1, norms = [‖τ₁‖].
pub fn init(
    base: &str,
    first: &str,
    alpha: f64,
    out: &Path,
    options: &MergeOptions,
) -> Result<State> {
    if !(0.0..1.0).contains(&alpha) {
        return Err(Error::config(format!("alpha {alpha} must be in [0, 1)")));
    }
    let norm = distance(base, first)?;
    let config = format!(
        "merge_method: passthrough\nmodels:\n  - model: {}\n",
        absolute(first)
    );
    let state = State {
        base: absolute(base),
        alpha,
        lambda: 1.0,
        norms: vec![norm],
        models: vec![absolute(first)],
    };
    write_state(&config, out, &state, options)?;
    Ok(state)
}

/// Folds `new` into the state at `dir` (replaced in place when the new merge is complete).
pub fn add(dir: &Path, new: &str, options: &MergeOptions) -> Result<State> {
    let mut state = State::load(dir)?;
    let merged = absolute(&dir.display().to_string());
    let (base, alpha, previous) = (state.base.clone(), state.alpha, state.lambda);
    let config = |lambda: f64| {
        format!(
            "merge_method: opcm\nbase_model: {base}\nmodels:\n  - model: {merged}\n  - model: {new}\nparameters:\n  alpha: {alpha}\n  previous_lambda: {previous}\n  lambda: {lambda}\n",
            new = absolute(new),
        )
    };
    let loaded = crate::config::parse(&config(1.0), "continual step")?;
    let plan = crate::plan::build(&loaded, &options.plan)?;
    let stats = crate::exec::model_statistics(&plan, &options.exec)?
        .ok_or_else(|| Error::config("opcm gathers model-wide norms"))?;
    let norms = stats
        .downcast_ref::<OpcmNorms>()
        .copied()
        .ok_or_else(|| Error::config("opcm gathers model-wide norms"))?;
    state.norms.push(norms.tau_squared.sqrt());
    let mean = state.norms.iter().sum::<f64>() / state.norms.len() as f64;
    let update = norms.update_squared.sqrt();
    // ‖U‖ = 0 (nothing changed anywhere): keep the scale.
    let lambda = if update > 0.0 && mean > 0.0 {
        update / mean
    } else {
        state.lambda
    };
    state.lambda = lambda;
    state.models.push(absolute(new));
    let staging = sibling(dir, "next");
    let _ = std::fs::remove_dir_all(&staging);
    write_state(&config(lambda), &staging, &state, options)?;
    crate::write::replace_dir(&staging, dir)?;
    Ok(state)
}

fn write_state(config: &str, out: &Path, state: &State, options: &MergeOptions) -> Result<()> {
    let loaded = crate::config::parse(config, "continual step")?;
    let plan = crate::plan::build(&loaded, &options.plan)?;
    crate::write::write(&plan, out, &options.exec, &options.write, &())?;
    state.save(out)
}

fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    dir.with_file_name(format!(".{name}.continual-{tag}"))
}

/// ‖b − a‖₂ over every float tensor both models have, in f64.
fn distance(a: &str, b: &str) -> Result<f64> {
    let (a, b) = (Checkpoint::open(a)?, Checkpoint::open(b)?);
    let mut sum = 0.0;
    let chunk = crate::kernels::BLOCK * 64;
    let (mut x, mut y) = (vec![0f32; chunk], vec![0f32; chunk]);
    for name in a.tensor_names() {
        let (Some(sa), Some(sb)) = (a.source(name), b.source(name)) else {
            continue;
        };
        if !sa.dtype.is_mergeable_float() || sa.shape != sb.shape {
            continue;
        }
        let n = sa.numel();
        for first in (0..n).step_by(chunk) {
            let len = chunk.min(n - first);
            sa.read_f32(first, &mut x[..len]);
            sb.read_f32(first, &mut y[..len]);
            sum += x[..len]
                .iter()
                .zip(&y[..len])
                .map(|(p, q)| ((q - p) as f64).powi(2))
                .sum::<f64>();
        }
    }
    Ok(sum.sqrt())
}
