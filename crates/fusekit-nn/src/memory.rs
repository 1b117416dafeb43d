//! How much memory a data-aware computation needs, said before any work: every model it holds
//! is in f32 on the CPU, so the count follows from the checkpoint headers. A computation that
//! would not fit the machine is refused with the numbers instead of being killed halfway.

use crate::{Error, Result};
use fusekit::checkpoint::Checkpoint;

/// f32 copies of the model each computation holds: weights, gradients and running sums for the
/// Fisher; weights, gradients and AdamW's two moments for fine-tuning.
pub const FISHER_COPIES: u64 = 3;
pub const FINETUNE_COPIES: u64 = 4;

/// Learned coefficients over `experts` task vectors: the base, each expert and its task vector,
/// one merged model with its graph.
pub fn learned_copies(experts: usize) -> u64 {
    2 * experts as u64 + 3
}

/// RegMean over `models`: each model, the merged one and the Grams' share.
pub fn regmean_copies(models: usize) -> u64 {
    models as u64 + 2
}

/// Float parameters of a model, from its headers.
pub fn parameters(reference: &str) -> Result<u64> {
    let checkpoint = Checkpoint::open(reference)?;
    Ok(checkpoint
        .tensor_names()
        .filter_map(|n| checkpoint.source(n))
        .filter(|s| s.dtype.is_mergeable_float())
        .map(|s| s.numel() as u64)
        .sum())
}

/// Bytes of memory the machine can give now (`MemAvailable`), where the platform tells.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks that `copies` f32 copies of a `parameters`-sized model (weights, gradients, running
/// sums, task vectors — whatever the computation holds) fit in the available memory, with a
/// quarter left for activations and the rest of the system. Returns the bytes needed.
pub fn check(what: &str, parameters: u64, copies: u64) -> Result<u64> {
    let needed = parameters * 4 * copies;
    if let Some(free) = available() {
        if needed > free / 4 * 3 {
            return Err(Error::model(
                what,
                format!(
                    "needs about {} ({copies} f32 copies of {parameters} parameters) but only {} \
                     is available; nothing was started",
                    gib(needed),
                    gib(free)
                ),
            ));
        }
    }
    Ok(needed)
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_computation_larger_than_the_machine_is_refused_before_it_starts() {
        assert_eq!(check("small", 1000, 3).unwrap(), 12_000);
        if available().is_some() {
            let err = check("huge", 1 << 50, 3).unwrap_err().to_string();
            assert!(
                err.contains("huge") && err.contains("nothing was started"),
                "{err}"
            );
        }
    }
}
