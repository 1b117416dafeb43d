//! LoRA adapters applied on read: `model+adapter` references equal the plain formula
//! W + s·B·A, and broken adapters are refused with the file and tensor named.

mod common;

use common::*;
use fusekit::checkpoint::Checkpoint;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_lora, write_model, Family, LoraSpec, ModelSpec};
use fusekit::MergeOptions;
use std::collections::BTreeMap;
use std::path::Path;

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
        merge_yaml(
            dir.path(),
            "merge_method: passthrough\nmodels:\n  - model: ./base+./lora\n",
            "out",
            &MergeOptions::default(),
        )
        .unwrap();
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
