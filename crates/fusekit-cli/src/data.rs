//! `fusekit data`: real datasets turned into JSONL task files (train/test splits, seeded).

use anyhow::Result;
use fusekit_nn::datasets::{split, wordnet, write_split};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// WordNet glosses as four tasks (noun, verb, pos, adj); `apt-get install -y wordnet-base`.
    Wordnet {
        out: PathBuf,
        #[arg(long, default_value = "/usr/share/wordnet")]
        dir: PathBuf,
        /// Training examples per task.
        #[arg(long, default_value_t = 800)]
        train: usize,
        /// Test examples per task.
        #[arg(long, default_value_t = 300)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Wordnet {
            out,
            dir,
            train,
            test,
            seed,
        } => {
            let synsets = wordnet::load(&dir)?;
            println!("| task | examples | classes | train | test | majority (test) |");
            println!("|---|---|---|---|---|---|");
            for name in wordnet::TASKS {
                let examples = wordnet::task(name, &synsets)?;
                let total = examples.len();
                let classes = examples.iter().map(|e| e.label).max().map_or(0, |m| m + 1);
                let (tr, te) = split(examples, train, test, seed);
                let mut counts = vec![0usize; classes as usize];
                te.iter().for_each(|e| counts[e.label as usize] += 1);
                let majority =
                    counts.iter().max().copied().unwrap_or(0) as f64 / te.len().max(1) as f64;
                write_split(&out, name, &tr, &te)?;
                println!(
                    "| {name} | {total} | {classes} | {} | {} | {majority:.3} |",
                    tr.len(),
                    te.len()
                );
            }
            Ok(())
        }
    }
}
