//! Faults during a merge, as a user meets them: the process killed at any moment, the disk
//! full. OUT is never left partial, a rerun completes, and the inputs never change.

use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Every file under `dir` with a hash of its bytes.
fn checksums(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut sums = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                std::fs::read(&path).unwrap().hash(&mut hasher);
                sums.insert(
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    hasher.finish(),
                );
            }
        }
    }
    sums
}

/// Base and two fine-tunes, large enough that a merge takes a noticeable time, and a TIES
/// config over them (two passes over every tensor) writing several shards.
fn setup(d: &Path) -> PathBuf {
    let mut base = ModelSpec::tiny(Family::Llama, Dtype::BF16, 1);
    (base.hidden, base.intermediate, base.vocab, base.layers) = (256, 768, 4096, 6);
    for (name, spec) in [
        ("base", base.clone()),
        ("ft1", base.clone().finetuned(2, 0.01)),
        ("ft2", base.finetuned(3, 0.01)),
    ] {
        write_model(&spec, &d.join("inputs").join(name)).unwrap();
    }
    let config = d.join("ties.yml");
    let text = "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 0.6, density: 0.5}\n  - model: ./ft2\n    parameters: {weight: 0.4, density: 0.5}\n";
    let inputs = format!("{}/", d.join("inputs").display());
    std::fs::write(&config, text.replace("./", &inputs)).unwrap();
    config
}

fn merge_command(config: &Path, out: &Path, force: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fusekit"));
    cmd.args([
        "merge",
        "--quiet",
        "--threads",
        "1",
        "--max-shard-size",
        "2M",
    ])
    .arg(config)
    .arg(out);
    if force {
        cmd.arg("--force");
    }
    cmd
}

/// Entries beside OUT that a run left behind.
fn leftovers(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".fusekit-"))
        .collect()
}

#[test]
fn killed_merges_never_leave_a_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = setup(d);
    let inputs = checksums(&d.join("inputs"));

    let reference = d.join("reference");
    let started = Instant::now();
    assert!(merge_command(&config, &reference, false)
        .status()
        .unwrap()
        .success());
    let full = started.elapsed();
    eprintln!("an uninterrupted merge takes {full:?}");
    let expected = checksums(&reference);
    assert!(expected.len() > 4, "several shards: {expected:?}");

    let out = d.join("out");
    // Kill points spread over the whole run (and a little past it), the same every time.
    let kills = 16;
    for k in 0..kills {
        // Even kills write a new OUT, odd ones replace an existing one.
        let replacing = k % 2 == 1;
        if !replacing && out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        if replacing && !out.exists() {
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join("marker"), "a previous output").unwrap();
        }
        let before = out.exists().then(|| checksums(&out));
        let delay = full.mul_f64((k as f64 * 0.618_034).fract() * 1.2);
        let mut child = merge_command(&config, &out, replacing)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let outcome = match out.exists().then(|| checksums(&out)) {
            None => {
                assert!(before.is_none(), "kill {k}: the previous OUT vanished");
                "no OUT"
            }
            Some(now) if now == expected => "complete",
            Some(now) => {
                assert!(
                    Some(&now) == before.as_ref(),
                    "kill {k} after {delay:?}: OUT is neither the old nor the complete new output"
                );
                "previous OUT"
            }
        };
        eprintln!(
            "kill {k} after {delay:?}: {outcome}, leftovers {:?}",
            leftovers(d)
        );
        assert_eq!(
            inputs,
            checksums(&d.join("inputs")),
            "kill {k}: inputs changed"
        );
    }
    // A rerun completes, equals the uninterrupted run, and cleans what the killed runs left.
    assert!(merge_command(&config, &out, true)
        .status()
        .unwrap()
        .success());
    assert_eq!(checksums(&out), expected);
    assert_eq!(leftovers(d), Vec::<String>::new());
    assert_eq!(inputs, checksums(&d.join("inputs")));
}

#[test]
fn a_full_disk_gives_a_clear_error_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = setup(d);
    let inputs = checksums(&d.join("inputs"));
    let full = d.join("full");
    std::fs::create_dir(&full).unwrap();
    // A 2 MiB file system in a private mount namespace: the merge writes about 12 MB.
    let script = format!(
        "mount -t tmpfs -o size=2m tmpfs {full} || exit 99; {merge} merge --quiet {config} {full}/out; echo \"rc=$?\"; ls -A {full}",
        full = full.display(),
        merge = env!("CARGO_BIN_EXE_fusekit"),
        config = config.display(),
    );
    let run = Command::new("unshare")
        .args(["--map-root-user", "--mount", "sh", "-c", &script])
        .output();
    let run = match run {
        Ok(run) if run.status.code() != Some(99) && run.status.success() => run,
        other => {
            eprintln!("skipped: cannot mount a small file system here ({other:?})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stdout.starts_with("rc=1\n"), "{stdout}{stderr}");
    assert_eq!(
        stdout.trim_end(),
        "rc=1",
        "nothing is left on the full disk"
    );
    assert!(
        stderr.contains("No space left on device") && stderr.contains(".safetensors"),
        "{stderr}"
    );
    assert_eq!(inputs, checksums(&d.join("inputs")));
}
