//! LoRA adapters applied on read: `model+adapter` references equal the plain formula
//! W + s·B·A, and broken adapters are refused with the file and tensor named.

mod common;

use common::*;
use fusekit::checkpoint::Checkpoint;
use fusekit::dtype::Dtype;
use fusekit::extract_lora::{extract_lora, ExtractOptions, Extraction};
use fusekit::fixtures::{write_lora, write_model, Family, LoraSpec, ModelSpec};
use fusekit::MergeOptions;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `model` with `adapter` applied to `dir/out` (a passthrough merge).
fn merge_adapter(dir: &Path, model: &str, adapter: &str, out: &str) {
    let config = format!("merge_method: passthrough\nmodels:\n  - model: ./{model}+./{adapter}\n");
    merge_yaml(dir, &config, out, &MergeOptions::default()).unwrap();
}

fn spec(targets: &[&str], rslora: bool) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        seed: 3,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rank_pattern: BTreeMap::from([("model.layers.1.self_attn.q_proj".to_string(), 2)]),
        alpha_pattern: BTreeMap::from([("v_proj".to_string(), 3.0)]),
        use_rslora: rslora,
    }
}

/// W + s·B·A (or its transpose for fan-in-fan-out and embeddings), by plain loops.
fn merged_by_formula(base: &Path, adapter: &Path, lora: &LoraSpec) -> BTreeMap<String, Vec<f32>> {
    let mut weights: BTreeMap<String, Vec<f32>> = load_model(base)
        .into_iter()
        .map(|(k, v)| (k, v.values))
        .collect();
    let shapes: BTreeMap<String, Vec<usize>> = load_model(base)
        .into_iter()
        .map(|(k, v)| (k, v.shape))
        .collect();
    let factors = load_file(&adapter.join("adapter_model.safetensors"));
    for (name, a) in factors
        .iter()
        .filter(|(n, _)| n.contains("lora_A") || n.contains("lora_embedding_A"))
    {
        let module = name
            .trim_start_matches("base_model.model.")
            .split(".lora_")
            .next()
            .unwrap();
        let b = &factors[&name.replace("_A", "_B")];
        let r = a.shape[0];
        let alpha = if module.ends_with("v_proj") {
            3.0
        } else {
            lora.alpha
        };
        let s = (if lora.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }) as f32;
        let target = format!("{module}.weight");
        let [rows, cols] = shapes[&target][..] else {
            panic!()
        };
        let transposed = name.contains("embedding");
        let w = weights.get_mut(&target).unwrap();
        for i in 0..rows {
            for j in 0..cols {
                let mut dot = 0f32;
                for k in 0..r {
                    dot += if transposed {
                        a.values[k * rows + i] * b.values[j * r + k]
                    } else {
                        b.values[i * r + k] * a.values[k * cols + j]
                    };
                }
                w[i * cols + j] += s * dot;
            }
        }
    }
    weights
}

#[test]
fn adapters_merge_as_the_formula_says() {
    for rslora in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write_model(&ModelSpec::tiny(Family::Llama, Dtype::F32, 1), &base).unwrap();
        let lora = spec(&["q_proj", "v_proj", "embed_tokens"], rslora);
        let checkpoint = Checkpoint::open(base.to_str().unwrap()).unwrap();
        write_lora(&checkpoint, &lora, &dir.path().join("lora")).unwrap();
        merge_adapter(dir.path(), "base", "lora", "out");
        let want = merged_by_formula(&base, &dir.path().join("lora"), &lora);
        let got = load_model(&dir.path().join("out"));
        let before = load_model(&base);
        let mut changed = 0;
        for (name, values) in &want {
            for (i, (x, y)) in got[name].values.iter().zip(values).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                    "{name}[{i}]: {x} vs {y}"
                );
            }
            changed += (got[name].values != before[name].values) as usize;
        }
        // 4 layers × (q, v) and the embeddings.
        assert_eq!(changed, 9);
    }
}

#[test]
fn broken_adapters_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_model(&ModelSpec::tiny(Family::Llama, Dtype::F32, 1), &base).unwrap();
    let checkpoint = Checkpoint::open(base.to_str().unwrap()).unwrap();
    let lora = dir.path().join("lora");
    write_lora(&checkpoint, &spec(&["q_proj"], false), &lora).unwrap();
    let open = || {
        Checkpoint::open(&format!("{}+{}", base.display(), lora.display()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(open(), "");

    // A rank the config does not declare.
    let config_path = lora.join("adapter_config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, config.replace("\"r\": 4", "\"r\": 8")).unwrap();
    let err = open();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj") && err.contains("rank 4"),
        "{err}"
    );
    std::fs::write(&config_path, &config).unwrap();

    // Not a LoRA, and no weights.
    std::fs::write(&config_path, config.replace("\"LORA\"", "\"IA3\"")).unwrap();
    assert!(open().contains("IA3"), "{}", open());
    std::fs::write(&config_path, &config).unwrap();
    std::fs::rename(
        lora.join("adapter_model.safetensors"),
        lora.join("adapter_model.bin"),
    )
    .unwrap();
    assert!(open().contains("pickle"), "{}", open());

    // An adapter for another model shape.
    std::fs::remove_dir_all(&lora).unwrap();
    let other = dir.path().join("other");
    let mut wide = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    wide.hidden = 48;
    write_model(&wide, &other).unwrap();
    let other = Checkpoint::open(other.to_str().unwrap()).unwrap();
    write_lora(&other, &spec(&["q_proj"], false), &lora).unwrap();
    let err = open();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("q_proj.weight"),
        "{err}"
    );
}

/// ‖x − y‖_F over one tensor.
fn distance(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn extract(dir: &Path, model: &str, rank: usize, pattern: &[(&str, usize)]) -> Extraction {
    let options = ExtractOptions {
        rank,
        rank_pattern: pattern
            .iter()
            .map(|(p, r)| (regex::Regex::new(p).unwrap(), *r))
            .collect(),
        embeddings: false,
        dtype: Dtype::F32,
        force: true,
    };
    let path = |m: &str| dir.join(m).to_str().unwrap().to_string();
    extract_lora(
        &path(model),
        &path("base"),
        &dir.join("extracted"),
        &options,
    )
    .unwrap()
}

#[test]
fn extracted_adapters_rebuild_the_fine_tune_within_the_truncation_error() {
    for family in [Family::Llama, Family::Gpt2] {
        let dir = tempfile::tempdir().unwrap();
        let base = ModelSpec::tiny(family, Dtype::F32, 1);
        write_model(&base, &dir.path().join("base")).unwrap();
        write_model(&base.finetuned(2, 0.01), &dir.path().join("ft")).unwrap();
        let report = extract(dir.path(), "ft", 4, &[("mlp", 2)]);
        merge_adapter(dir.path(), "base", "extracted", "rebuilt");
        let ft = load_model(&dir.path().join("ft"));
        let rebuilt = load_model(&dir.path().join("rebuilt"));
        for m in &report.modules {
            let name = format!("{}.weight", m.module);
            let error = distance(&rebuilt[&name].values, &ft[&name].values);
            assert_eq!(m.rank, if m.module.contains("mlp") { 2 } else { 4 });
            // Eckart–Young: the error is exactly the dropped singular values' norm.
            assert!(
                (error - m.truncation_error).abs() <= 1e-3 * m.delta_norm,
                "{family:?} {}: error {error} vs predicted {}",
                m.module,
                m.truncation_error
            );
            assert!(m.truncation_error < m.delta_norm);
        }
        let left: Vec<&String> = report.left_out.keys().collect();
        assert!(
            left.iter().any(|n| n.contains("norm") || n.contains("ln_")),
            "{left:?}"
        );
        assert!(
            left.iter()
                .any(|n| n.contains("embed") || n.contains("wte")),
            "{left:?}"
        );
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("extracted/extraction.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written["left_out"].as_object().unwrap().len(), left.len());
    }
}

#[test]
fn a_low_rank_fine_tune_is_recovered_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_model(&ModelSpec::tiny(Family::Llama, Dtype::F32, 1), &base).unwrap();
    let checkpoint = Checkpoint::open(base.to_str().unwrap()).unwrap();
    let mut lora = spec(&["q_proj", "o_proj", "up_proj"], false);
    lora.alpha_pattern.clear();
    write_lora(&checkpoint, &lora, &dir.path().join("lora")).unwrap();
    // The fine-tune is the base with a rank-4 (rank 2 in one layer) update merged in.
    merge_adapter(dir.path(), "base", "lora", "ft");
    let report = extract(dir.path(), "ft", 4, &[]);
    assert_eq!(report.modules.len(), 12);
    for m in &report.modules {
        assert!(m.truncation_error <= 1e-5 * m.delta_norm, "{m:?}");
    }
    let rebuilt = dir.path().join("rebuilt");
    merge_adapter(dir.path(), "base", "extracted", "rebuilt");
    let (ft, rebuilt) = (load_model(&dir.path().join("ft")), load_model(&rebuilt));
    for (name, t) in &ft {
        assert!(distance(&t.values, &rebuilt[name].values) < 1e-5, "{name}");
    }
}
