//! `fusekit eval`: perplexity or accuracy of a model, as a table and as JSON.

use anyhow::{bail, Result};
use fusekit_nn::eval::{evaluate, EvalOptions, Task};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The model: a directory, `org/name` from the Hugging Face cache, or `model+adapter`.
    model: String,
    /// Perplexity of a causal LM on this text file.
    #[arg(long, conflicts_with = "data")]
    text: Option<PathBuf>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Accuracy of a classifier on this JSONL file of `{"text"|"input", "label"}` lines.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Use this checkpoint's task head (`classifier.*` / `head.*`), e.g. on a merged trunk.
    #[arg(long)]
    head: Option<String>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Only the first N examples (or windows).
    #[arg(long)]
    limit: Option<usize>,
    /// Longest text in tokens (classification).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let task = match (&args.text, &args.data) {
        (Some(text), None) => Task::Perplexity {
            text: text.clone(),
            context: args.context,
        },
        (None, Some(data)) => Task::Classification { data: data.clone() },
        _ => bail!("give --text FILE (perplexity) or --data FILE (accuracy)"),
    };
    let options = EvalOptions {
        batch_size: args.batch_size,
        limit: args.limit,
        head: args.head.clone(),
        max_len: args.max_len,
    };
    let bar = crate::progress_bar(
        args.quiet,
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} eta {eta}",
    );
    let report = evaluate(&args.model, &task, &options, &crate::moves(&bar))?;
    bar.finish_and_clear();
    println!("| model | data | {} | examples | seconds |", report.metric);
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.4} | {} | {:.1} |",
        report.model, report.data, report.value, report.count, report.seconds
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")?;
    }
    Ok(())
}
