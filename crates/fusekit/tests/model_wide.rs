//! Methods whose statistics span the whole model (the model-wide statistics pass): TIES with the
//! reference code's global trim, and PCB — each equal to a computation over the flattened model.

mod common;

use common::*;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit::methods::{self, ResolvedParams, TensorContext, MAX_PASSES};
use fusekit::MergeOptions;
use std::collections::BTreeMap;
use std::path::Path;

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

/// The float tensors of a model, flattened in name order.
fn flattened(dir: &Path) -> (Vec<String>, Vec<f32>) {
    let model = load_model(dir);
    let names: Vec<String> = model
        .iter()
        .filter(|(_, t)| !t.values.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    let values = names.iter().flat_map(|n| model[n].values.clone()).collect();
    (names, values)
}

/// Runs `method` on one "tensor" holding every input's whole model, through the public method
/// API: model-wide statistics over it, then the merger.
fn merge_flat(method: &str, inputs: &[Vec<f32>], params: &ResolvedParams) -> Vec<f32> {
    let method = methods::lookup(method).unwrap();
    let n = inputs[0].len();
    let keys = vec![0u64; inputs.len()];
    let models: Vec<usize> = (0..inputs.len()).collect();
    let shape = [n];
    let mut ctx = TensorContext {
        name: "all",
        numel: n,
        shape: &shape,
        n_inputs: inputs.len(),
        base: Some(0),
        params,
        rng_keys: &keys,
        compute: None,
        memory: 1 << 30,
        models: &models,
        model_stats: None,
    };
    let block = fusekit::kernels::BLOCK;
    let blocks = |start: usize| -> Vec<&[f32]> {
        inputs
            .iter()
            .map(|x| &x[start..(start + block).min(n)])
            .collect()
    };
    let mut stats = method
        .model_statistics(std::slice::from_ref(&ctx))
        .unwrap()
        .unwrap();
    for pass in 0..MAX_PASSES {
        if !stats.wants_pass(pass) {
            continue;
        }
        for start in (0..n).step_by(block) {
            stats.observe(pass, &ctx, start, &blocks(start));
        }
        stats.end_pass(pass).unwrap();
    }
    let stats = stats.finish();
    ctx.model_stats = Some(&*stats);
    let merger = method.merger(&ctx).unwrap();
    let mut out = vec![0f32; n];
    for start in (0..n).step_by(block) {
        let end = (start + block).min(n);
        merger.apply(start, &blocks(start), &mut out[start..end]);
    }
    out
}

#[test]
fn pcb_balances_over_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    write_model(&base, &dir.path().join("base")).unwrap();
    for (name, seed, scale) in [("ft1", 2, 0.01), ("ft2", 3, 0.02), ("ft3", 4, 0.01)] {
        write_model(&base.clone().finetuned(seed, scale), &dir.path().join(name)).unwrap();
    }
    let config = "merge_method: pcb\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n  - model: ./ft3\nparameters: {pcb_ratio: 0.2, lambda: 1.2}\n";
    merge_yaml(dir.path(), config, "out", &MergeOptions::default()).unwrap();

    let inputs: Vec<Vec<f32>> = ["base", "ft1", "ft2", "ft3"]
        .iter()
        .map(|m| flattened(&dir.path().join(m)).1)
        .collect();
    let mut params = ResolvedParams::default();
    for (k, v) in [
        ("pcb_ratio", 0.2),
        ("min_ratio", 0.0001),
        ("max_ratio", 0.0001),
        ("lambda", 1.2),
    ] {
        params.global.insert(k, fusekit::config::Scalar::Number(v));
    }
    params.per_input = vec![BTreeMap::new(); 4];
    let want = merge_flat("pcb", &inputs, &params);
    let (names, got) = flattened(&dir.path().join("out"));
    assert_eq!(names.len(), 39);
    assert_eq!(
        got, want,
        "the engine's model-wide PCB is PCB over the flattened model"
    );
    // And it differs from balancing each tensor on its own.
    let per_tensor = config.replace("pcb\n", "pcb_per_tensor\n");
    merge_yaml(dir.path(), &per_tensor, "local", &MergeOptions::default()).unwrap();
    assert_ne!(flattened(&dir.path().join("local")).1, want);
}
