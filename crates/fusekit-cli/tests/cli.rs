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
}
