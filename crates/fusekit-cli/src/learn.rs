//! What data-aware configs need before the engine merges: for `adamerging | atlas |
//! expert_merging` the coefficients are learned (fusekit-nn) and written beside OUT as a plain
//! task-arithmetic config (`OUT.learned.yml`); for `fisher` with task `file`s instead of Fisher
//! statistics, the Fisher of each model is computed into `OUT.fisher/N` and the config that
//! reads them is written as `OUT.fisher.yml`. That config is then merged.

use anyhow::Result;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};

/// What is left to do after the data-aware step.
pub enum Prepared {
    /// Merge this config.
    Merge(PathBuf),
    /// The method wrote OUT itself (RegMean).
    Written,
}

/// Runs the data-aware step a config needs, if any.
pub fn prepare(config: &Path, out: &Path, quiet: bool, force: bool) -> Result<Prepared> {
    let text = std::fs::read_to_string(config)?;
    if let Some((models, options)) = fusekit_nn::regmean::regmean_config(&text)? {
        if out.exists() && !force {
            anyhow::bail!(
                "output {}: already exists (use --force to replace it)",
                out.display()
            );
        }
        if !quiet {
            let parameters = fusekit_nn::memory::parameters(&models[0].model)?;
            let copies = fusekit_nn::memory::regmean_copies(models.len());
            eprintln!(
                "RegMean: about {} of memory",
                fusekit_nn::memory::gib(parameters * 4 * copies)
            );
        }
        let bar = progress_bar(quiet, "collecting Grams");
        fusekit_nn::regmean::regmean(&models, out, &options, &crate::moves(&bar))?;
        bar.finish_and_clear();
        return Ok(Prepared::Written);
    }
    learn(config, &text, out, quiet, force)
}

fn progress_bar(quiet: bool, what: &str) -> ProgressBar {
    crate::progress_bar(
        quiet,
        &format!("{{spinner}} {what} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}}"),
    )
}

/// The config to merge: `config` itself, or the learned config it leads to; or nothing, when
/// chunked coefficients had the runtime write OUT itself.
fn learn(config: &Path, text: &str, out: &Path, quiet: bool, force: bool) -> Result<Prepared> {
    let chunked = ["chunks:", "chunk_budget:"]
        .iter()
        .any(|k| text.contains(k));
    if chunked && out.exists() && !force {
        anyhow::bail!(
            "output {}: already exists (use --force to replace it)",
            out.display()
        );
    }
    let bar = progress_bar(quiet, "learning coefficients");
    let learned = fusekit_nn::coefficients::learned_config(text, out, &crate::moves(&bar))?;
    bar.finish_and_clear();
    let Some(learned) = learned else {
        return Ok(Prepared::Merge(fisher(config, text, out, quiet)?));
    };
    if !quiet {
        print_coefficients(&learned.learned.coefficients);
    }
    let Some(yaml) = learned.config else {
        if !quiet {
            eprintln!(
                "chunked coefficients: {}",
                out.join("learned.json").display()
            );
        }
        return Ok(Prepared::Written);
    };
    let path = beside(out, ".learned.yml");
    std::fs::write(&path, &yaml)?;
    if !quiet {
        eprintln!("learned config: {}", path.display());
    }
    Ok(Prepared::Merge(path))
}

/// `OUT` with `suffix` added to its name.
fn beside(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    out.with_file_name(name)
}

/// Computes the Fisher statistics a `fisher` config names only by task file.
fn fisher(config: &Path, text: &str, out: &Path, quiet: bool) -> Result<PathBuf> {
    let bar = progress_bar(quiet, "Fisher");
    let dir = beside(out, ".fisher");
    let rewritten = fusekit_nn::fisher::fisher_config(text, &dir, &crate::moves(&bar))?;
    bar.finish_and_clear();
    let Some(yaml) = rewritten else {
        return Ok(config.to_path_buf());
    };
    let path = beside(out, ".fisher.yml");
    std::fs::write(&path, yaml)?;
    if !quiet {
        eprintln!(
            "Fisher statistics in {}, config {}",
            dir.display(),
            path.display()
        );
    }
    Ok(path)
}

/// What was learned, per model and layer (the mean over a layer's tensors and chunks; `*` for
/// task-wise).
fn print_coefficients(coefficients: &[std::collections::BTreeMap<String, Vec<f64>>]) {
    for (i, lambdas) in coefficients.iter().enumerate() {
        let mut layers: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        for (name, value) in lambdas {
            let layer = match fusekit::arch::split_layer(name) {
                Some((_, index, _)) => format!("layer {index:>3}"),
                None => name.clone(),
            };
            let entry = layers.entry(layer).or_default();
            entry.0 += value.iter().sum::<f64>() / value.len().max(1) as f64;
            entry.1 += 1;
        }
        eprintln!("model {i}:");
        for (layer, (sum, count)) in layers {
            eprintln!("  {layer:<40} {:.4}  ({count} tensors)", sum / count as f64);
        }
    }
}
