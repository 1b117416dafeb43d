//! The evaluator against answers known without running it: an MLP whose prediction is the
//! argmax of its input, a decoder whose logits are all zero (perplexity = vocabulary size), a
//! BERT classifier whose head always says class 1.

mod common;

use candle_core::{Device, Tensor};
use common::accuracy;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit_nn::eval::{evaluate, EvalOptions, Task};
use fusekit_nn::models::mlp::MlpConfig;
use fusekit_nn::weights::{save, Weights};
use std::path::Path;

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
}

/// An MLP `x ↦ P · relu(x)` on 3 inputs, `P` a permutation given as the row each class reads.
fn permutation_mlp(dir: &Path, rows: [usize; 3]) {
    let config = MlpConfig {
        trunk_sizes: vec![3, 3],
        num_labels: 3,
    };
    let identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let mut head = [0f32; 9];
    for (class, row) in rows.iter().enumerate() {
        head[class * 3 + row] = 1.0;
    }
    let tensors = vec![
        ("trunk.0.weight".to_string(), t(&identity, &[3, 3])),
        ("trunk.0.bias".to_string(), t(&[0.0; 3], &[3])),
        ("head.weight".to_string(), t(&head, &[3, 3])),
        ("head.bias".to_string(), t(&[0.0; 3], &[3])),
    ];
    save(dir, &config.to_json(), &tensors).unwrap();
}

#[test]
fn classification_accuracy_counts_correct_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    permutation_mlp(&d.join("mlp"), [0, 1, 2]);
    permutation_mlp(&d.join("reversed"), [2, 1, 0]);
    // Ten examples; the label is the argmax of the input for the first seven.
    let mut lines = String::new();
    for i in 0..10 {
        let hot = i % 3;
        let mut input = [0.1f32; 3];
        input[hot] = 2.0;
        let label = if i < 7 { hot } else { (hot + 1) % 3 };
        lines.push_str(&format!("{{\"input\": {input:?}, \"label\": {label}}}\n"));
    }
    std::fs::write(d.join("data.jsonl"), lines).unwrap();
    assert!((accuracy(&d.join("mlp"), &d.join("data.jsonl"), None) - 0.7).abs() < 1e-12);
    // The reversed head predicts 2 − argmax: right only where that equals the label
    // (inputs 1, 4 with hot = 1 among the first seven; i = 8 has hot 2, label 0).
    let swapped = accuracy(
        &d.join("mlp"),
        &d.join("data.jsonl"),
        Some(&d.join("reversed")),
    );
    assert!((swapped - 0.3).abs() < 1e-12, "{swapped}");

    std::fs::write(d.join("bad.jsonl"), "{\"input\": [1, 2, 3]}\n").unwrap();
    let err = evaluate(
        d.join("mlp").to_str().unwrap(),
        &Task::Classification {
            data: d.join("bad.jsonl"),
        },
        &EvalOptions::default(),
        &|_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("bad.jsonl") && err.contains("line 1") && err.contains("label"),
        "{err}"
    );
}

#[test]
fn perplexity_of_a_uniform_model_is_the_vocabulary_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    write_model(&spec, &d.join("llama")).unwrap();
    let w = Weights::load(d.join("llama").to_str().unwrap(), &Device::Cpu, false).unwrap();
    let tensors: Vec<(String, Tensor)> = w
        .tensors()
        .map(|(name, t)| {
            let t = t.clone();
            let t = if name == "lm_head.weight" {
                t.zeros_like().unwrap()
            } else {
                t
            };
            (name.to_string(), t)
        })
        .collect();
    save(&d.join("uniform"), &w.config, &tensors).unwrap();
    std::fs::copy(
        d.join("llama/tokenizer.json"),
        d.join("uniform/tokenizer.json"),
    )
    .unwrap();
    let words: Vec<String> = (0..200).map(|i| format!("t{}", i % 40)).collect();
    std::fs::write(d.join("text.txt"), words.join(" ")).unwrap();
    let task = Task::Perplexity {
        text: d.join("text.txt"),
        context: 16,
    };
    let options = EvalOptions {
        batch_size: 4,
        ..Default::default()
    };
    let report = evaluate(
        d.join("uniform").to_str().unwrap(),
        &task,
        &options,
        &|_, _| {},
    )
    .unwrap();
    assert!(
        (report.value - spec.vocab as f64).abs() < 1e-3,
        "{report:?}"
    );
    assert!(report.count > 100);
    let real = evaluate(
        d.join("llama").to_str().unwrap(),
        &task,
        &options,
        &|_, _| {},
    )
    .unwrap();
    assert!(real.value.is_finite() && real.value != report.value);
}

#[test]
fn bert_classifier_uses_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_model(
        &ModelSpec::tiny(Family::Bert, Dtype::F32, 1),
        &d.join("bert"),
    )
    .unwrap();
    let w = Weights::load(d.join("bert").to_str().unwrap(), &Device::Cpu, false).unwrap();
    let mut tensors: Vec<(String, Tensor)> = w
        .tensors()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    tensors.push(("classifier.weight".into(), t(&[0.0; 64], &[2, 32])));
    tensors.push(("classifier.bias".into(), t(&[0.0, 5.0], &[2])));
    save(&d.join("cls"), &w.config, &tensors).unwrap();
    std::fs::copy(d.join("bert/tokenizer.json"), d.join("cls/tokenizer.json")).unwrap();
    let data: String = (0..8)
        .map(|i| {
            format!(
                "{{\"text\": \"t{i} t{}\", \"label\": {}}}\n",
                i + 1,
                u32::from(i % 4 != 0)
            )
        })
        .collect();
    std::fs::write(d.join("data.jsonl"), data).unwrap();
    assert!((accuracy(&d.join("cls"), &d.join("data.jsonl"), None) - 0.75).abs() < 1e-12);
}
