//! Multi-document configs: named steps feed later steps, run in dependency order, and are reused.

mod common;

use common::*;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit::MergeOptions;
use std::path::Path;

const SOUP: &str = "name: soup\nmerge_method: linear\nmodels:\n  - model: ./ft1\n    parameters: {weight: 0.5}\n  - model: ./ft2\n    parameters: {weight: 0.5}\n";
const FINAL: &str = "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - model: soup\n    parameters: {weight: 2.0}\n";

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn named_steps_feed_the_final_merge_and_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let base = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    write_model(&base, &dir.path().join("base")).unwrap();
    write_model(&base.clone().finetuned(2, 0.01), &dir.path().join("ft1")).unwrap();
    write_model(&base.finetuned(3, 0.01), &dir.path().join("ft2")).unwrap();

    // The final merge first in the file: order comes from the references.
    let recipe = format!("{FINAL}---\n{SOUP}");
    merge_yaml(dir.path(), &recipe, "out", &MergeOptions::default()).unwrap();
    let soup = dir.path().join("out-steps/soup");
    assert!(soup.join("model.safetensors").is_file());

    // The same two merges by hand.
    merge_yaml(dir.path(), SOUP, "soup_by_hand", &MergeOptions::default()).unwrap();
    let by_hand = FINAL.replace("model: soup", "model: ./soup_by_hand");
    merge_yaml(
        dir.path(),
        &by_hand,
        "final_by_hand",
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(weights(&soup), weights(&dir.path().join("soup_by_hand")));
    assert_eq!(
        weights(&dir.path().join("out")),
        weights(&dir.path().join("final_by_hand"))
    );

    // Run again: the step's output is reused (a marker inside it survives) …
    std::fs::write(soup.join("marker"), "").unwrap();
    let mut again = MergeOptions::default();
    again.write.force = true;
    merge_yaml(dir.path(), &recipe, "out", &again).unwrap();
    assert!(soup.join("marker").exists());
    // … unless asked to rerun.
    again.steps.rerun = true;
    merge_yaml(dir.path(), &recipe, "out", &again).unwrap();
    assert!(!soup.join("marker").exists());
    assert_eq!(weights(&soup), weights(&dir.path().join("soup_by_hand")));

    // A step directory without a model is not silently replaced.
    std::fs::remove_dir_all(&soup).unwrap();
    std::fs::create_dir_all(&soup).unwrap();
    again.steps.rerun = false;
    let err = merge_yaml(dir.path(), &recipe, "out", &again)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("soup") && err.contains("holds no model"),
        "{err}"
    );
}
