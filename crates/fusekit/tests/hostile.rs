//! Hostile and broken inputs: corrupt safetensors, index files that point outside the model,
//! bad configs, non-finite weights, inputs that change during a merge. Each is refused with a
//! message naming the file, tensor or key at fault; no output appears and no input changes.

mod common;

use common::*;
use fusekit::checkpoint::safetensors_file::{Header, SafetensorsFile};
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use std::path::Path;

const LINEAR_M: &str = "merge_method: linear\nmodels:\n  - model: ./m\n    parameters: {weight: 1}\n  - model: ./ok\n    parameters: {weight: 1}\n";

/// A safetensors file from its header text and the length of its data section.
fn safetensors(header: &[u8], data_len: usize) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}

fn entry(name: &str, dtype: &str, shape: &str, begin: u64, end: u64) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}"#)
}

#[test]
fn corrupt_safetensors_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(&d.join("m"), Family::Llama, Dtype::F32, 1, None);
    make(&d.join("ok"), Family::Llama, Dtype::F32, 2, None);
    let a = entry("a", "F32", "[2]", 0, 8);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("tiny file", vec![1, 2, 3], "shorter than the 8-byte"),
        (
            "absurd header length",
            [u64::MAX.to_le_bytes().as_slice(), b"{}"].concat(),
            "does not fit",
        ),
        (
            "header longer than the file",
            [200u64.to_le_bytes().as_slice(), b"{}"].concat(),
            "does not fit",
        ),
        (
            "invalid JSON",
            safetensors(b"{\"a\": ", 0),
            "corrupt header JSON",
        ),
        (
            "not an object",
            safetensors(b"[1, 2]", 0),
            "corrupt header JSON",
        ),
        (
            "overlapping offsets",
            safetensors(
                format!("{{{a},{}}}", entry("b", "F32", "[2]", 4, 12)).as_bytes(),
                12,
            ),
            "overlapping or gapped",
        ),
        (
            "gapped offsets",
            safetensors(
                format!("{{{a},{}}}", entry("b", "F32", "[1]", 12, 16)).as_bytes(),
                16,
            ),
            "overlapping or gapped",
        ),
        (
            "offsets past the end",
            safetensors(
                format!("{{{a},{}}}", entry("b", "F32", "[2]", 8, 16)).as_bytes(),
                8,
            ),
            "truncated",
        ),
        (
            "end before begin",
            safetensors(
                format!("{{{}}}", entry("a", "F32", "[0]", 8, 0)).as_bytes(),
                8,
            ),
            "end before begin",
        ),
        (
            "negative offset",
            safetensors(
                br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}"#,
                8,
            ),
            "bad data_offsets",
        ),
        (
            "dtype, shape and length disagree",
            safetensors(
                format!("{{{}}}", entry("a", "F32", "[3]", 0, 8)).as_bytes(),
                8,
            ),
            "do not hold shape",
        ),
        (
            "shape overflows",
            safetensors(
                format!("{{{}}}", entry("a", "F32", "[4294967296,4294967296]", 0, 8)).as_bytes(),
                8,
            ),
            "shape overflows",
        ),
        (
            "unknown dtype",
            safetensors(
                format!("{{{}}}", entry("a", "F9", "[2]", 0, 8)).as_bytes(),
                8,
            ),
            "unsupported dtype F9",
        ),
        (
            "duplicate names",
            safetensors(
                format!("{{{a},{}}}", entry("a", "F32", "[2]", 8, 16)).as_bytes(),
                16,
            ),
            "`a` appears twice",
        ),
        (
            "non-UTF-8 name",
            safetensors(
                &[b"{\"\xff\xfe\":".as_slice(), &a.as_bytes()[4..], b"}"].concat(),
                8,
            ),
            "corrupt header JSON",
        ),
        (
            "metadata not strings",
            safetensors(
                format!("{{\"__metadata__\":{{\"k\":1}},{a}}}").as_bytes(),
                8,
            ),
            "`__metadata__.k` is not a string",
        ),
        (
            "truncated data",
            safetensors(format!("{{{a}}}").as_bytes(), 5),
            "truncated",
        ),
        (
            "trailing bytes",
            safetensors(format!("{{{a}}}").as_bytes(), 9),
            "corrupt",
        ),
    ];
    let path = d.join("m/model.safetensors");
    for (what, bytes, expect) in cases {
        // The in-memory validator (the fuzz target) and the file reader agree.
        let err = Header::from_bytes(&bytes).unwrap_err();
        assert!(
            err.contains(expect),
            "{what}: `{err}` should mention `{expect}`"
        );
        std::fs::write(&path, &bytes).unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains(expect), "{what}: `{err}`");
        refused(d, LINEAR_M, &[expect, "m/model.safetensors"]);
    }
}

/// A llama fixture in five shards, and the text of its index.
fn sharded(dir: &Path) -> String {
    let mut spec = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    spec.max_shard_bytes = 40_000;
    write_model(&spec, dir).unwrap();
    std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()
}

#[test]
fn index_files_cannot_reach_outside_the_model_or_mislead() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(&d.join("ok"), Family::Llama, Dtype::F32, 2, None);
    let m = d.join("m");
    let index = sharded(&m);
    let shard = "model-00001-of-00005.safetensors";
    assert!(index.contains(shard), "{index}");
    let set_index =
        |text: &str| std::fs::write(m.join("model.safetensors.index.json"), text).unwrap();
    let first = format!("\"model.embed_tokens.weight\": \"{shard}\"");
    assert!(index.contains(&first), "{index}");
    let with_shard = |name: &str| {
        index.replace(
            &first,
            &format!("\"model.embed_tokens.weight\": \"{name}\""),
        )
    };

    for escape in [
        "../ok/model.safetensors",
        "/etc/passwd",
        "..",
        "sub/../x.safetensors",
        "",
    ] {
        set_index(&with_shard(escape));
        refused(
            d,
            LINEAR_M,
            &["not a file name in the model directory", "index.json"],
        );
    }
    set_index(&with_shard("model-00009-of-00009.safetensors"));
    refused(
        d,
        LINEAR_M,
        &["model-00009-of-00009.safetensors", "does not exist"],
    );
    set_index(&index.replacen(
        "\"weight_map\": {",
        &format!("\"weight_map\": {{\n    {first},"),
        1,
    ));
    refused(d, LINEAR_M, &["appears twice", "index.json"]);
    set_index(&with_shard("model-00002-of-00005.safetensors"));
    refused(
        d,
        LINEAR_M,
        &["model.embed_tokens.weight", "missing from this shard"],
    );
    set_index(&index.replace(&format!("{first},"), ""));
    refused(d, LINEAR_M, &["model.embed_tokens.weight", "does not list"]);
    set_index("{\"weight_map\": [1]}");
    refused(d, LINEAR_M, &["invalid index", "index.json"]);

    // A shard that is a symlink to a file outside the model directory.
    set_index(&index);
    let outside = d.join("elsewhere.safetensors");
    std::fs::rename(m.join(shard), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, m.join(shard)).unwrap();
    refused(d, LINEAR_M, &["outside the model directory", shard]);
    // Inside the directory, a link is fine (the Hugging Face cache is made of them).
    std::fs::remove_file(m.join(shard)).unwrap();
    std::fs::rename(&outside, m.join("real.safetensors")).unwrap();
    std::os::unix::fs::symlink("real.safetensors", m.join(shard)).unwrap();
    merge_yaml(d, LINEAR_M, "out", &Default::default()).unwrap();
}

#[test]
fn pickle_checkpoints_are_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(&d.join("ok"), Family::Llama, Dtype::F32, 2, None);
    make(&d.join("m"), Family::Llama, Dtype::F32, 1, None);
    std::fs::remove_file(d.join("m/model.safetensors")).unwrap();
    // A pickle that would run a shell command if it were unpickled.
    std::fs::write(
        d.join("m/pytorch_model.bin"),
        b"cos\nsystem\n(S'touch pwned'\ntR.",
    )
    .unwrap();
    refused(d, LINEAR_M, &["pickle", "never read", "m"]);
    assert!(!Path::new("pwned").exists());
}

#[test]
fn bad_config_values_are_refused_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(&d.join("base"), Family::Llama, Dtype::BF16, 1, None);
    make(
        &d.join("ft1"),
        Family::Llama,
        Dtype::BF16,
        1,
        Some((2, 0.01)),
    );
    let ties = |params: &str| {
        format!("merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {{{params}}}\n")
    };
    for (params, expect) in [
        ("weight: 1, density: -0.5", "-0.5 is outside [0, 1]"),
        ("weight: 1, density: 1.5", "1.5 is outside [0, 1]"),
        ("weight: .nan, density: 0.5", "non-finite float"),
        ("weight: .inf, density: 0.5", "non-finite float"),
        ("weight: [1, .nan], density: 0.5", "non-finite float"),
        ("weight: \"nan\"", "\"nan\" is not a finite number"),
        (
            "weight: 1, density: {filter: mlp, value: 2}",
            "2 is outside [0, 1]",
        ),
    ] {
        refused(d, &ties(params), &["line 5", expect]);
    }
    refused(d, "merge_method: karcher\nmodels:\n  - model: ./base\n  - model: ./ft1\nparameters: {max_iter: 2.5}\n", &["max_iter", "line 5", "whole numbers"]);
    refused(d, "merge_method: breadcrumbs\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1, gamma: -0.1}\n", &["gamma", "line 5", "outside [0, 1]"]);
    refused(
        d,
        "merge_method: linear\nmodels: 5\n",
        &["models", "line 2"],
    );
    refused(d, "merge_method: linear\nmodels:\n  - model: ./base\nparameters: {weight: 1}\nrandom_key: 3\n", &["random_key", "line 5"]);
    refused(d, "merge_method: passthrough\nslices:\n  - sources:\n      - model: ./base\n        layer_range: [0, 99]\n", &["layer_range", "line 5", "exceeds"]);
    refused(d, "merge_method: passthrough\nslices:\n  - sources:\n      - model: ./base\n        layer_range: [3, 1]\n", &["layer_range", "line 5", "empty"]);
    refused(d, "merge_method: passthrough\nslices:\n  - sources:\n      - model: ./base\n        layer_range: [-1, 2]\n", &["layer_range", "line 5"]);
    refused(d, "merge_method: widen\nbase_model: ./base\nmodels:\n  - model: ./ft1\nparameters: {above_average_value_ratio: -1}\n", &["above_average_value_ratio", "line 5"]);
    // A model used as both input and output.
    let config = d.join("c.yml");
    std::fs::write(
        &config,
        "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\n"
            .replace("./", &format!("{}/", d.display())),
    )
    .unwrap();
    let before = checksums(d);
    let err = fusekit::merge(&config, &d.join("base"), &Default::default(), &())
        .unwrap_err()
        .to_string();
    assert!(err.contains("overlaps input model"), "{err}");
    assert_eq!(before, checksums(d));
}

/// Overwrites element `at` of `tensor` in a bf16 model file with `value`.
fn poison(model: &Path, tensor: &str, at: usize, value: f32) {
    let path = model.join("model.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    let offset = file.tensors[tensor].start + 2 * at;
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let bits = half::bf16::from_f32(value).to_bits().to_le_bytes();
    bytes[offset..offset + 2].copy_from_slice(&bits);
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn nonfinite_weights_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(&d.join("ok"), Family::Llama, Dtype::BF16, 2, None);
    make(&d.join("m"), Family::Llama, Dtype::BF16, 1, None);
    poison(
        &d.join("m"),
        "model.layers.1.mlp.up_proj.weight",
        37,
        f32::NAN,
    );
    let err = refused(
        d,
        LINEAR_M,
        &[
            "model.layers.1.mlp.up_proj.weight",
            "NaN",
            "element 37",
            "--allow-nonfinite",
        ],
    );
    assert!(err.contains(&format!("{}/m", d.display())), "{err}");
    let allow = fusekit::MergeOptions {
        exec: fusekit::exec::ExecOptions {
            allow_nonfinite: true,
            ..Default::default()
        },
        ..Default::default()
    };
    merge_yaml(d, LINEAR_M, "allowed", &allow).unwrap();
    let out = load_model(&d.join("allowed"));
    assert!(out["model.layers.1.mlp.up_proj.weight"].values[37].is_nan());

    // Copied tensors are checked too (passthrough writes stored bytes as they are).
    make(&d.join("m"), Family::Llama, Dtype::BF16, 1, None);
    poison(&d.join("m"), "model.norm.weight", 3, f32::NEG_INFINITY);
    let pass = "merge_method: passthrough\nmodels:\n  - model: ./m\n";
    refused(d, pass, &["model.norm.weight", "-inf", "element 3"]);
    // Statistics passes see inputs first: TIES' trim reads every value before merging.
    make(&d.join("m"), Family::Llama, Dtype::BF16, 1, None);
    poison(
        &d.join("m"),
        "model.layers.0.self_attn.q_proj.weight",
        0,
        f32::INFINITY,
    );
    let ties = "merge_method: ties\nbase_model: ./ok\nmodels:\n  - model: ./m\n    parameters: {weight: 1, density: 0.5}\n";
    refused(d, ties, &["q_proj", "+inf", "element 0"]);
    let global = "merge_method: pcb\nbase_model: ./ok\nmodels:\n  - model: ./m\n";
    refused(d, global, &["q_proj", "+inf"]);
}

/// Plans a merge of `config`, lets `meddle` change an input, then executes: the output must be
/// refused.
fn changed_during_merge(d: &Path, meddle: impl FnOnce(&Path)) -> String {
    let config = d.join("c.yml");
    std::fs::write(
        &config,
        LINEAR_M.replace("./", &format!("{}/", d.display())),
    )
    .unwrap();
    let recipe = fusekit::config::recipe::load(&config).unwrap();
    let plan = fusekit::plan::build(&recipe.steps[0].loaded, &Default::default()).unwrap();
    meddle(&d.join("m/model.safetensors"));
    let out = d.join("out");
    let err = fusekit::write::write(&plan, &out, &Default::default(), &Default::default(), &())
        .unwrap_err()
        .to_string();
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    err
}

#[test]
fn inputs_that_change_during_a_merge_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(&d.join("ok"), Family::Llama, Dtype::BF16, 2, None);
    make(&d.join("m"), Family::Llama, Dtype::BF16, 1, None);
    // Truncated under the map: reading it would fault; it is noticed before.
    let err = changed_during_merge(d, |f| {
        let len = std::fs::metadata(f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    });
    assert!(
        err.contains("changed while being merged") && err.contains("m/model.safetensors"),
        "{err}"
    );
    // Rewritten in place with the same length: noticed by its modification time.
    make(&d.join("m"), Family::Llama, Dtype::BF16, 1, None);
    let err = changed_during_merge(d, |f| {
        let bytes = std::fs::read(f).unwrap();
        std::fs::write(f, bytes).unwrap();
        let past = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(past)
            .unwrap();
    });
    assert!(err.contains("changed while being merged"), "{err}");
}
