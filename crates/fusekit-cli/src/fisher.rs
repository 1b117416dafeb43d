//! `fusekit fisher`: a classifier's diagonal Fisher on its task data, written as the statistics
//! checkpoint that `merge_method: fisher` reads from `data:`.

use anyhow::Result;
use fusekit_nn::fisher::{write_fisher, FisherKind, FisherOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FisherArgs {
    /// The classifier (BERT with a `classifier` head, or a fusekit MLP).
    model: String,
    /// Its task's examples: JSONL of `{"text"|"input", "label"}` lines.
    #[arg(long)]
    data: PathBuf,
    /// Where the Fisher checkpoint goes.
    out: PathBuf,
    /// exact (every class, weighted by p), sampled (one class drawn from p) or empirical (gold
    /// label).
    #[arg(long, default_value = "exact")]
    kind: FisherKind,
    /// Examples used (the first N of the data).
    #[arg(long, default_value_t = 256)]
    examples: usize,
    /// Seed of the sampled Fisher's class draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest text in tokens.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: FisherArgs) -> Result<()> {
    let options = FisherOptions {
        kind: args.kind,
        examples: args.examples,
        seed: args.seed,
        max_len: args.max_len,
    };
    let parameters = fusekit_nn::memory::parameters(&args.model)?;
    if !args.quiet {
        eprintln!(
            "{parameters} parameters: about {} of memory",
            fusekit_nn::memory::gib(parameters * 4 * fusekit_nn::memory::FISHER_COPIES)
        );
    }
    let bar = crate::progress_bar(
        args.quiet,
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} examples eta {eta}",
    );
    write_fisher(
        &args.model,
        &args.data,
        &args.out,
        &options,
        &crate::moves(&bar),
    )?;
    bar.finish_and_clear();
    eprintln!("wrote {} ({:?} Fisher)", args.out.display(), options.kind);
    Ok(())
}
