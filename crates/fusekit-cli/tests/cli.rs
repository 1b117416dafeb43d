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
