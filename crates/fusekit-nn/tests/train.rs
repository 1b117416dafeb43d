//! Fine-tuning makes experts: the loss falls, the task is learned, frozen tensors stay as they
//! were, a missing head is created, and the same seed gives the same model.

mod common;

use candle_core::Device;
use common::{accuracy, mlp};
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit_nn::train::{finetune, TrainOptions};
use fusekit_nn::weights::Weights;

#[test]
fn an_mlp_learns_its_task_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mlp(&d.join("base"), &[2, 16], 2, 1);
    let key = fusekit::rng::stream_key(4, "toy", 0);
    let lines: String = (0..200)
        .map(|i| {
            let (a, b) = (
                fusekit::rng::uniform(key, 2 * i) as f32 * 2.0 - 1.0,
                fusekit::rng::uniform(key, 2 * i + 1) as f32 * 2.0 - 1.0,
            );
            format!(
                "{{\"input\": [{a}, {b}], \"label\": {}}}\n",
                u32::from(a > b)
            )
        })
        .collect();
    std::fs::write(d.join("task.jsonl"), lines).unwrap();
    let before = accuracy(&d.join("base"), &d.join("task.jsonl"), None);
    let options = TrainOptions {
        steps: 300,
        learning_rate: 0.02,
        seed: 9,
        ..Default::default()
    };
    let base = d.join("base").display().to_string();
    let report = finetune(
        &base,
        &d.join("task.jsonl"),
        &d.join("ft"),
        &options,
        &|_, _| {},
    )
    .unwrap();
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    assert!(
        mean(&report.losses[..10]) > 2.0 * mean(&report.losses[290..]),
        "{:?}",
        &report.losses[..10]
    );
    let after = accuracy(&d.join("ft"), &d.join("task.jsonl"), None);
    assert!(
        after > 0.95 && after > before,
        "accuracy {before} → {after}"
    );
    assert!(d.join("ft/finetune.json").is_file());
    finetune(
        &base,
        &d.join("task.jsonl"),
        &d.join("again"),
        &options,
        &|_, _| {},
    )
    .unwrap();
    let bytes = |p: &str| std::fs::read(d.join(p).join("model.safetensors")).unwrap();
    assert_eq!(
        bytes("ft"),
        bytes("again"),
        "the same seed gives the same model"
    );
}

#[test]
fn an_encoder_gets_a_fresh_head_and_keeps_its_frozen_layers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_model(
        &ModelSpec::tiny(Family::Bert, Dtype::F32, 1),
        &d.join("bert"),
    )
    .unwrap();
    let lines: String = (0..64)
        .map(|i| {
            format!(
                "{{\"text\": \"t{} t{}\", \"label\": {}}}\n",
                i % 8,
                i % 5,
                u32::from(i % 8 < 4)
            )
        })
        .collect();
    std::fs::write(d.join("task.jsonl"), lines).unwrap();
    let options = TrainOptions {
        steps: 150,
        learning_rate: 0.02,
        batch_size: 16,
        trainable: Some(r"encoder\.layer\.3\.".into()),
        ..Default::default()
    };
    let report = finetune(
        d.join("bert").to_str().unwrap(),
        &d.join("task.jsonl"),
        &d.join("ft"),
        &options,
        &|_, _| {},
    )
    .unwrap();
    let n = report.losses.len();
    assert!(report.losses[n - 5..].iter().sum::<f64>() < report.losses[..5].iter().sum::<f64>());
    let (base, ft) = (
        Weights::load(d.join("bert").to_str().unwrap(), &Device::Cpu, false).unwrap(),
        Weights::load(d.join("ft").to_str().unwrap(), &Device::Cpu, false).unwrap(),
    );
    assert_eq!(ft.head_labels("classifier.weight").unwrap(), 2);
    assert_eq!(ft.config["fusekit_pooling"], "mean");
    for (name, t) in base.tensors() {
        let same = (t - ft.get(name, t.dims()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0;
        assert_eq!(same, !name.starts_with("encoder.layer.3."), "{name}");
    }
    let acc = accuracy(&d.join("ft"), &d.join("task.jsonl"), None);
    assert!(
        acc > 0.9,
        "accuracy {acc}, losses {:?}",
        &report.losses[n - 5..]
    );
}
