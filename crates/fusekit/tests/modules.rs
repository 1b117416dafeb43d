//! `modules:`: each part of a multi-module model (vision tower, projector, text decoder) merged
//! with its own inputs, slices and parameters.

mod common;

use common::*;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit::MergeOptions;

#[test]
fn each_module_merges_with_its_own_inputs_and_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny(Family::Llava, Dtype::F32, 1);
    write_model(&spec, &dir.path().join("a")).unwrap();
    write_model(&spec.finetuned(2, 0.1), &dir.path().join("b")).unwrap();
    // Module parameters set the default weight; the text decoder stacks layers 0–4 of a on
    // layers 2–4 of b (a passthrough needs one source per slice).
    let config = "\
merge_method: linear
parameters: {weight: 1.0}
modules:
  vision_tower:
    models:
      - model: ./a
      - model: ./b
    parameters: {weight: 3.0}
  multi_modal_projector:
    models:
      - model: ./a
        parameters: {weight: 1.0}
      - model: ./b
        parameters: {weight: 0.0}
  text_decoder:
    slices:
      - sources:
          - model: ./a
            layer_range: [0, 4]
            parameters: {weight: 0.25}
          - model: ./b
            layer_range: [0, 4]
            parameters: {weight: 0.75}
      - sources:
          - model: ./a
            layer_range: [2, 4]
          - model: ./b
            layer_range: [2, 4]
";
    merge_yaml(dir.path(), config, "out", &MergeOptions::default()).unwrap();
    let (a, b) = (
        load_model(&dir.path().join("a")),
        load_model(&dir.path().join("b")),
    );
    let out = load_model(&dir.path().join("out"));
    let mix = |name: &str, from: &str, wa: f32, wb: f32| {
        let (x, y) = (&a[from].values, &b[from].values);
        let got = &out[name].values;
        for i in 0..x.len() {
            let want = (wa * x[i] + wb * y[i]) / (wa + wb);
            assert!(
                (got[i] - want).abs() < 1e-6,
                "{name}[{i}]: {} vs {want}",
                got[i]
            );
        }
    };
    let vision = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight";
    mix(vision, vision, 3.0, 3.0);
    let projector = "multi_modal_projector.linear_1.weight";
    mix(projector, projector, 1.0, 0.0);
    let q = |l: usize| format!("language_model.model.layers.{l}.self_attn.q_proj.weight");
    mix(&q(1), &q(1), 0.25, 0.75);
    // Layers 2–4 again as output layers 4–6, with the top-level weight.
    mix(&q(5), &q(3), 1.0, 1.0);
    mix(
        "language_model.lm_head.weight",
        "language_model.lm_head.weight",
        1.0,
        1.0,
    );
    assert!(!out.contains_key(&q(6)) && out.contains_key(&q(5)));

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["text_config"]["num_hidden_layers"], 6);
    assert_eq!(config["vision_config"]["num_hidden_layers"], 2);
    let vision_layers = out
        .keys()
        .filter(|n| n.contains("encoder.layers.1."))
        .count();
    assert!(vision_layers > 0);

    // A model's module missing from `modules`, and an unknown module, are refused.
    let partial = "merge_method: linear\nmodules:\n  text_decoder:\n    models:\n      - model: ./a\n        parameters: {weight: 1.0}\n";
    let err = merge_yaml(dir.path(), partial, "bad", &MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multi_modal_projector") && err.contains("does not list"),
        "{err}"
    );
    let unknown = partial.replace("text_decoder", "audio_tower");
    let err = merge_yaml(dir.path(), &unknown, "bad", &MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("audio_tower") && err.contains("known"),
        "{err}"
    );
}
