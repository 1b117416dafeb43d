//! Replays the fuzzers' kept corpus (`fuzz/seeds`: the seeds and the minimized corpus of the
//! long runs) and every crash they ever found (`fuzz/regressions`) through the same checks as
//! the fuzz targets, on every test run.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            found.push((path, bytes));
        }
    }
    found
}

fn replay(target: &str, check: fn(&[u8])) {
    let cases = inputs(target);
    assert!(!cases.is_empty(), "no stored inputs for {target}");
    for (path, bytes) in cases {
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{target} fails on {}", path.display());
    }
}

#[test]
fn safetensors_header_corpus() {
    replay("safetensors_header", fusekit::fuzzing::safetensors_header);
}

#[test]
fn index_corpus() {
    replay("index", fusekit::fuzzing::index);
}

#[test]
fn config_corpus() {
    replay("config", fusekit::fuzzing::config);
}
