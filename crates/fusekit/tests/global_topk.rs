//! TIES with the reference code's global trim: each model keeps the top `density` share of its
//! whole task vector, computed by the model-wide statistics pass, equal to a dense computation.

mod common;

use common::*;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit::MergeOptions;

#[test]
fn global_trim_equals_the_dense_reference() {
    let dir = tempfile::tempdir().unwrap();
    let base = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    write_model(&base, &dir.path().join("base")).unwrap();
    write_model(&base.clone().finetuned(2, 0.01), &dir.path().join("ft1")).unwrap();
    // The second fine-tune moved some tensors much more than others.
    write_model(&base.finetuned(3, 0.02), &dir.path().join("ft2")).unwrap();
    let config = "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {density: 0.3, weight: 1.0}\n  - model: ./ft2\n    parameters: {density: 0.2, weight: 0.5}\nparameters: {global_topk: true}\n";
    merge_yaml(dir.path(), config, "out", &MergeOptions::default()).unwrap();

    let load = |m: &str| load_model(&dir.path().join(m));
    let (b, f1, f2, out) = (load("base"), load("ft1"), load("ft2"), load("out"));
    let names: Vec<&String> = b.keys().filter(|n| !b[*n].values.is_empty()).collect();
    // torch.kthvalue over the flattened |τ| of each model, k = ⌊n·(1 − density)⌋.
    let threshold = |ft: &std::collections::BTreeMap<String, Loaded>, density: f64| {
        let mut all: Vec<f32> = names
            .iter()
            .flat_map(|n| {
                ft[*n]
                    .values
                    .iter()
                    .zip(&b[*n].values)
                    .map(|(x, y)| (x - y).abs())
            })
            .collect();
        all.sort_by(f32::total_cmp);
        let k = (all.len() as f64 * (1.0 - density)).floor() as usize;
        all[k - 1]
    };
    let (t1, t2) = (threshold(&f1, 0.3), threshold(&f2, 0.2));
    let mut kept = [0usize; 2];
    let mut total = 0;
    for n in &names {
        for i in 0..b[*n].values.len() {
            let base = b[*n].values[i];
            let d = [f1[*n].values[i] - base, f2[*n].values[i] - base];
            let keep = [d[0].abs() >= t1, d[1].abs() >= t2];
            let w = [1.0f32, 0.5];
            let sum: f32 = (0..2)
                .map(|j| if keep[j] { w[j] * d[j] } else { 0.0 })
                .sum();
            let sign = if sum >= 0.0 { 1.0 } else { -1.0 };
            let (mut mixed, mut divisor) = (0f32, 0f32);
            for j in 0..2 {
                let v = if keep[j] { w[j] * d[j] } else { 0.0 };
                if v != 0.0 && v.signum() == sign {
                    mixed += v;
                    divisor += w[j];
                }
                kept[j] += keep[j] as usize;
            }
            let want = base + mixed / if divisor == 0.0 { 1.0 } else { divisor };
            let got = out[*n].values[i];
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{n}[{i}]: {got} vs {want}"
            );
            total += 1;
        }
    }
    // Each model kept its share of the whole model (the per-tensor shares vary).
    assert!(
        (kept[0] as f64 / total as f64 - 0.3).abs() < 0.001,
        "{kept:?} of {total}"
    );
    assert!(
        (kept[1] as f64 / total as f64 - 0.2).abs() < 0.001,
        "{kept:?} of {total}"
    );

    // One density per model is required.
    let mixed = config.replace("parameters: {global_topk: true}", "parameters:\n  global_topk: true\n  density:\n    - filter: mlp\n      value: 0.5\n    - value: 0.3");
    let mixed = mixed.replace("{density: 0.3, weight: 1.0}", "{weight: 1.0}");
    let err = merge_yaml(dir.path(), &mixed, "bad", &MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("one density per model"), "{err}");
}
