//! `fusekit finetune`: make an expert — a classifier fine-tuned on a JSONL task.

use anyhow::Result;
use fusekit_nn::train::{finetune, TrainOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The starting model (BERT encoder or fusekit MLP; a head is added if it has none).
    model: String,
    /// The task: JSONL of `{"text"|"input", "label"}` lines.
    #[arg(long)]
    data: PathBuf,
    /// Where the fine-tuned model goes.
    out: PathBuf,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Classes of the task (default: the largest label + 1).
    #[arg(long)]
    num_labels: Option<usize>,
    /// Only tensors whose names match this regex train (the head always does).
    #[arg(long)]
    train: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest text in tokens.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let options = TrainOptions {
        steps: args.steps,
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        batch_size: args.batch_size,
        examples: usize::MAX,
        num_labels: args.num_labels,
        trainable: args.train.clone(),
        seed: args.seed,
        max_len: args.max_len,
    };
    if !args.quiet {
        let parameters = fusekit_nn::memory::parameters(&args.model)?;
        let copies = fusekit_nn::memory::FINETUNE_COPIES;
        eprintln!(
            "about {} of memory",
            fusekit_nn::memory::gib(parameters * 4 * copies)
        );
    }
    let bar = crate::progress_bar(
        args.quiet,
        "{spinner} fine-tuning [{elapsed_precise}] {wide_bar} step {pos}/{len} eta {eta}",
    );
    let report = finetune(
        &args.model,
        &args.data,
        &args.out,
        &options,
        &crate::moves(&bar),
    )?;
    bar.finish_and_clear();
    if !args.quiet {
        let first = report.losses.first().copied().unwrap_or(f64::NAN);
        let last = report.losses.last().copied().unwrap_or(f64::NAN);
        eprintln!(
            "wrote {}: {} tensors trained, loss {first:.4} → {last:.4} in {:.1} s",
            args.out.display(),
            report.trained_tensors,
            report.seconds
        );
    }
    Ok(())
}
