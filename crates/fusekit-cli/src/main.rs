//! The `fusekit` command line: a thin layer over the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fusekit::dtype::Dtype;
use fusekit::fixtures::{self, Family, ModelSpec};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

mod bench;
#[cfg(feature = "nn")]
mod data;
#[cfg(feature = "nn")]
mod eval;
#[cfg(feature = "nn")]
mod finetune;
#[cfg(feature = "nn")]
mod fisher;
#[cfg(feature = "nn")]
mod learn;
#[cfg(feature = "nn")]
mod quality;

#[derive(Parser)]
#[command(
    name = "fusekit",
    version,
    about = "Fuse neural networks: streaming, reproducible merges of Hugging Face checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models as described by a mergekit-style YAML config.
    Merge {
        config: PathBuf,
        out: PathBuf,
        /// Print the plan (tensors, method per tensor, shards, bytes) and stop.
        #[arg(long)]
        dry_run: bool,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Largest output shard in bytes (accepts K, M, G suffixes, powers of 1024).
        #[arg(long, default_value = "5000000000", value_parser = parse_bytes)]
        max_shard_size: usize,
        /// Working-memory bound in bytes (accepts K, M, G suffixes).
        #[arg(long, default_value = "1G", value_parser = parse_bytes)]
        memory_budget: usize,
        /// Worker threads (0 = all cores). The output does not depend on it.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Seed of random methods (DARE).
        #[arg(long, default_value_t = 0)]
        random_seed: u64,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Multi-document configs: where named steps write (default: OUT-steps beside OUT).
        #[arg(long)]
        intermediate_dir: Option<PathBuf>,
        /// Multi-document configs: merge named steps again even when their output exists.
        #[arg(long)]
        rerun_steps: bool,
        /// Merge inputs that hold NaN or infinity instead of refusing them.
        #[arg(long)]
        allow_nonfinite: bool,
    },
    /// List the merge methods with their parameters and defaults.
    Methods,
    /// Write a deterministic synthetic checkpoint (tests, examples, benchmarks).
    MakeModel {
        out: PathBuf,
        #[arg(long, default_value = "llama")]
        family: String,
        /// `tiny` (a few thousand parameters) or `1b` (Llama-shaped, ~1.2 B parameters).
        #[arg(long, default_value = "tiny")]
        size: String,
        #[arg(long, default_value = "bfloat16")]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Make a fine-tune of the base: the seed of its noise.
        #[arg(long)]
        finetune_seed: Option<u64>,
        /// Scale of the fine-tune noise.
        #[arg(long, default_value_t = 0.01)]
        finetune_scale: f32,
        #[arg(long, default_value_t = usize::MAX)]
        max_shard_size: usize,
        /// Which fixture tokenizer to write (0: the common one; others differ in a quarter of
        /// the vocabulary).
        #[arg(long, default_value_t = 0)]
        tokenizer_variant: u64,
    },
    /// Write a deterministic synthetic PEFT LoRA adapter for a model (tests, examples).
    MakeLora {
        /// The model the adapter is for.
        #[arg(long)]
        model: String,
        out: PathBuf,
        #[arg(long, default_value_t = 4)]
        rank: usize,
        #[arg(long, default_value_t = 8.0)]
        alpha: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Comma-separated last components of the module names to adapt.
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        /// `module=rank` pairs (PEFT's rank_pattern), comma-separated.
        #[arg(long, default_value = "")]
        rank_pattern: String,
        /// `module=alpha` pairs (PEFT's alpha_pattern), comma-separated.
        #[arg(long, default_value = "")]
        alpha_pattern: String,
        #[arg(long)]
        use_rslora: bool,
    },
    /// Extract a PEFT LoRA adapter from a fine-tune: a truncated SVD of (MODEL − BASE) per module.
    ExtractLora {
        /// The fine-tuned model.
        #[arg(long)]
        model: String,
        /// The model it was fine-tuned from.
        #[arg(long)]
        base: String,
        out: PathBuf,
        /// Rank of every module no pattern names.
        #[arg(long, default_value_t = 32)]
        rank: usize,
        /// `regex=rank` pairs, comma-separated; the first that matches a module name wins.
        #[arg(long, default_value = "")]
        rank_pattern: String,
        /// Extract embeddings too.
        #[arg(long)]
        embed_lora: bool,
        /// Dtype of the stored factors.
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Continual merging (OPCM): fold fine-tunes into a running merge one at a time.
    #[command(subcommand)]
    Continual(ContinualCommand),
    /// Benchmarks: speed against mergekit and the I/O roofline on a generated 1B model (no
    /// subcommand), or `quality` of the merged models on real tasks.
    Bench(bench::BenchArgs),
    /// Evaluate a model: perplexity on a text file, or accuracy on labelled JSONL.
    #[cfg(feature = "nn")]
    Eval(eval::EvalArgs),
    /// Compute a classifier's diagonal Fisher on its data (the statistics `fisher` merges read).
    #[cfg(feature = "nn")]
    Fisher(fisher::FisherArgs),
    /// Fine-tune a classifier on a JSONL task (make an expert to merge).
    #[cfg(feature = "nn")]
    Finetune(finetune::FinetuneArgs),
    /// Turn real datasets into JSONL task files.
    #[cfg(feature = "nn")]
    #[command(subcommand)]
    Data(data::DataCommand),
}

#[derive(Subcommand)]
enum ContinualCommand {
    /// Start a state directory from the base and the first fine-tune.
    Init {
        #[arg(long)]
        base: String,
        /// The first fine-tune.
        #[arg(long)]
        model: String,
        state: PathBuf,
        /// Share of the merged task vector's singular-value mass protected at each step.
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
        /// Replace STATE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Fold another fine-tune into the state (replaced when the new merge is complete).
    Add { state: PathBuf, model: String },
}

fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count"))?;
    let scale = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("unknown unit in `{text}`")),
    };
    Ok(n * scale)
}

/// `key=value,key=value` into a map.
fn pairs<T: std::str::FromStr>(text: &str) -> Result<std::collections::BTreeMap<String, T>> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("`{pair}` is not key=value"))?;
            let v = v
                .parse()
                .map_err(|_| anyhow::anyhow!("`{v}` in `{pair}` is not a number"))?;
            Ok((k.to_string(), v))
        })
        .collect()
}

/// The merge's progress bar, and the name of the step it shows.
struct Bar(ProgressBar, std::sync::Mutex<String>);

impl fusekit::exec::Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn step(&self, name: &str, total_bytes: u64) {
        *self.1.lock().expect("not poisoned") = name.to_string();
        self.0.set_message(name.to_string());
        self.0.set_length(total_bytes);
        self.0.set_position(0);
    }

    fn reused(&self, name: &str, dir: &std::path::Path) {
        self.0
            .println(format!("step `{name}`: reusing {}", dir.display()));
    }

    fn statistics(&self, pass: usize, done: usize, total: usize) {
        let step = self.1.lock().expect("not poisoned").clone();
        self.0.set_message(format!(
            "{step} model-wide statistics, pass {}: {done}/{total} tensors",
            pass + 1
        ));
        if done == total {
            self.0
                .set_message(self.1.lock().expect("not poisoned").clone());
        }
    }
}

/// `--dry-run`: the plan of every step whose inputs exist already.
fn print_plans(
    config: &std::path::Path,
    out: &std::path::Path,
    options: &fusekit::MergeOptions,
) -> Result<()> {
    let mut recipe = fusekit::config::recipe::load(config)?;
    let outputs = fusekit::step_outputs(&mut recipe, out, &options.steps);
    let several = recipe.steps.len() > 1;
    let mut stdout = std::io::stdout().lock();
    for (step, target) in recipe.steps.iter().zip(&outputs) {
        let name = step.name.as_deref().unwrap_or("final");
        if several {
            let _ = writeln!(stdout, "# step `{name}` → {}", target.display());
        }
        if step.needs.iter().any(|&n| !outputs[n].exists()) {
            let _ = writeln!(stdout, "(reads steps not merged yet: planned when run)\n");
            continue;
        }
        let plan = fusekit::plan::build(&step.loaded, &options.plan)?;
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = write!(stdout, "{plan}");
    }
    Ok(())
}

/// A progress bar with `template` (indicatif's syntax), hidden when `quiet`.
fn progress_bar(quiet: bool, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar
}

/// A progress callback (`done` of `total`) that moves `bar`.
#[cfg(feature = "nn")]
fn moves(bar: &ProgressBar) -> impl Fn(u64, u64) + '_ {
    move |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}

fn main() {
    // Rust ignores SIGPIPE, so `fusekit methods | head` would panic on the closed pipe; a
    // command-line tool should end quietly instead.
    #[cfg(unix)]
    // SAFETY: restores the default disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Merge {
            config,
            out,
            dry_run,
            force,
            max_shard_size,
            memory_budget,
            threads,
            random_seed,
            quiet,
            intermediate_dir,
            rerun_steps,
            allow_nonfinite,
        } => {
            let options = fusekit::MergeOptions {
                plan: fusekit::plan::PlanOptions {
                    max_shard_size,
                    seed: random_seed,
                },
                exec: fusekit::exec::ExecOptions {
                    threads,
                    memory_budget,
                    allow_nonfinite,
                },
                write: fusekit::write::WriteOptions { force },
                steps: fusekit::StepOptions {
                    intermediate_dir,
                    rerun: rerun_steps,
                },
            };
            if dry_run {
                return print_plans(&config, &out, &options);
            }
            #[cfg(feature = "nn")]
            let config = match learn::prepare(&config, &out, quiet, force)? {
                learn::Prepared::Merge(config) => config,
                learn::Prepared::Written => {
                    if !quiet {
                        eprintln!("wrote {}", out.display());
                    }
                    return Ok(());
                }
            };
            let bar = progress_bar(quiet, "{spinner} {msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
            let plan = fusekit::merge(
                &config,
                &out,
                &options,
                &Bar(bar.clone(), Default::default()),
            )?;
            bar.finish_and_clear();
            if !quiet {
                eprintln!(
                    "wrote {} ({} tensors, {} shards, {} bytes)",
                    out.display(),
                    plan.tensors.len(),
                    plan.shards.len(),
                    plan.total_bytes()
                );
            }
            Ok(())
        }
        Command::Methods => {
            for m in fusekit::methods::all() {
                let s = m.spec();
                println!("{:<16} {} — {}", s.name, s.summary, s.reference);
                for p in s.params {
                    let default = match p.default {
                        None => "required".to_string(),
                        Some(fusekit::methods::Default::Float(x)) => format!("default {x}"),
                        Some(fusekit::methods::Default::Bool(b)) => format!("default {b}"),
                        Some(fusekit::methods::Default::Unset) => "optional".to_string(),
                    };
                    println!(
                        "    {:<10} {:<9} {:<12} {:<14} {}",
                        p.name,
                        format!("{:?}", p.scope),
                        default,
                        p.ty.domain(),
                        p.doc
                    );
                }
            }
            Ok(())
        }
        Command::MakeModel {
            out,
            family,
            size,
            dtype,
            seed,
            finetune_seed,
            finetune_scale,
            max_shard_size,
            tokenizer_variant,
        } => {
            let family = Family::parse(&family).with_context(|| {
                format!("unknown family `{family}` (llama, mistral, qwen2, gpt2, bert)")
            })?;
            let dtype = Dtype::from_config(&dtype)?;
            let mut spec = match size.as_str() {
                "tiny" => ModelSpec::tiny(family, dtype, seed),
                "1b" if family == Family::Llama => ModelSpec {
                    dtype,
                    ..ModelSpec::llama_1b(seed)
                },
                other => bail!("unknown size `{other}` (tiny, or 1b for llama)"),
            };
            spec.max_shard_bytes = max_shard_size.min(spec.max_shard_bytes);
            spec.tokenizer_variant = tokenizer_variant;
            if let Some(s) = finetune_seed {
                spec = spec.finetuned(s, finetune_scale);
            }
            if out.exists() {
                bail!("{} already exists", out.display());
            }
            fixtures::write_model(&spec, &out)?;
            Ok(())
        }
        Command::MakeLora {
            model,
            out,
            rank,
            alpha,
            seed,
            targets,
            rank_pattern,
            alpha_pattern,
            use_rslora,
        } => {
            if out.exists() {
                bail!("{} already exists", out.display());
            }
            let spec = fixtures::LoraSpec {
                rank,
                alpha,
                seed,
                targets: targets.split(',').map(str::to_string).collect(),
                rank_pattern: pairs(&rank_pattern)?,
                alpha_pattern: pairs(&alpha_pattern)?,
                use_rslora,
            };
            let model = fusekit::checkpoint::Checkpoint::open(&model)?;
            fixtures::write_lora(&model, &spec, &out)?;
            Ok(())
        }
        Command::ExtractLora {
            model,
            base,
            out,
            rank,
            rank_pattern,
            embed_lora,
            dtype,
            force,
        } => {
            let rank_pattern = pairs::<usize>(&rank_pattern)?
                .into_iter()
                .map(|(p, r)| {
                    Ok((
                        regex::Regex::new(&p).with_context(|| format!("pattern `{p}`"))?,
                        r,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let options = fusekit::extract_lora::ExtractOptions {
                rank,
                rank_pattern,
                embeddings: embed_lora,
                dtype: Dtype::from_config(&dtype)?,
                force,
            };
            let extraction = fusekit::extract_lora::extract_lora(&model, &base, &out, &options)?;
            for m in &extraction.modules {
                println!(
                    "{:<50} rank {:>4}  ‖Δ‖ {:.4e}  truncation error {:.4e}",
                    m.module, m.rank, m.delta_norm, m.truncation_error
                );
            }
            for (name, why) in &extraction.left_out {
                println!("left out {name}: {why}");
            }
            eprintln!(
                "wrote {} ({} modules)",
                out.display(),
                extraction.modules.len()
            );
            Ok(())
        }
        Command::Continual(command) => {
            let mut options = fusekit::MergeOptions::default();
            let state = match command {
                ContinualCommand::Init {
                    base,
                    model,
                    state,
                    alpha,
                    force,
                } => {
                    options.write.force = force;
                    fusekit::continual::init(&base, &model, alpha, &state, &options)?
                }
                ContinualCommand::Add { state, model } => {
                    fusekit::continual::add(&state, &model, &options)?
                }
            };
            println!(
                "{} models merged, λ = {:.4}, mean ‖τ‖ = {:.4e}",
                state.models.len(),
                state.lambda,
                state.norms.iter().sum::<f64>() / state.norms.len() as f64
            );
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        #[cfg(feature = "nn")]
        Command::Eval(args) => eval::run(args),
        #[cfg(feature = "nn")]
        Command::Fisher(args) => fisher::run(args),
        #[cfg(feature = "nn")]
        Command::Finetune(args) => finetune::run(args),
        #[cfg(feature = "nn")]
        Command::Data(command) => data::run(command),
    }
}
