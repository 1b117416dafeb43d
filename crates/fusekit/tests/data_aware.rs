//! The data-aware merges as the engine runs them, given their statistics (`data:` in the
//! config), against their formulas written out here.

mod common;

use common::*;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_fisher_stand_in, write_model, Family, ModelSpec};

const FISHER: &str = "merge_method: fisher\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1.0}\n  - model: ./ft2\n    parameters: {weight: 3.0}\ndata:\n  ./ft1: {fisher: ./ft1.fisher}\n  ./ft2: {fisher: ./ft2.fisher}\n";

#[test]
fn fisher_merge_equals_the_normalized_fisher_weighted_mean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = ModelSpec::tiny(Family::Llama, Dtype::BF16, 1);
    write_model(&spec.clone().finetuned(2, 0.05), &d.join("ft1")).unwrap();
    write_model(&spec.finetuned(3, 0.05), &d.join("ft2")).unwrap();
    for ft in ["ft1", "ft2"] {
        write_fisher_stand_in(&d.join(ft), &d.join(format!("{ft}.fisher"))).unwrap();
    }
    // The config names models as written (`./ft1`), data keys alike.
    let text = FISHER.replace("./", &format!("{}/", d.display()));
    std::fs::write(d.join("fisher.yml"), &text).unwrap();
    fusekit::merge(
        &d.join("fisher.yml"),
        &d.join("out"),
        &Default::default(),
        &(),
    )
    .unwrap();

    let models = [load_model(&d.join("ft1")), load_model(&d.join("ft2"))];
    let fishers = [
        load_model(&d.join("ft1.fisher")),
        load_model(&d.join("ft2.fisher")),
    ];
    let out = load_model(&d.join("out"));
    let norm = |f: &std::collections::BTreeMap<String, Loaded>| {
        f.values()
            .flat_map(|t| &t.values)
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let lambdas = [1.0 / norm(&fishers[0]), 3.0 / norm(&fishers[1])];
    let mut compared = 0;
    for (name, merged) in &out {
        if merged.dtype == Dtype::I64 {
            continue;
        }
        for j in 0..merged.values.len() {
            let f0 = (fishers[0][name].values[j] as f64).max(1e-6);
            let f1 = fishers[1][name].values[j] as f64;
            let (w0, w1) = (lambdas[0] * f0, lambdas[1] * f1);
            let want = (w0 * models[0][name].values[j] as f64
                + w1 * models[1][name].values[j] as f64)
                / (w0 + w1);
            let got = merged.values[j] as f64;
            assert!(
                (got - want).abs() <= ulp_at(Dtype::BF16, want as f32) as f64,
                "{name}[{j}]: {got} vs {want}"
            );
            compared += 1;
        }
    }
    assert!(compared > 1000);
}

#[test]
fn missing_or_stray_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(
        &d.join("ft1"),
        Family::Llama,
        Dtype::BF16,
        1,
        Some((2, 0.01)),
    );
    make(
        &d.join("ft2"),
        Family::Llama,
        Dtype::BF16,
        1,
        Some((3, 0.01)),
    );
    write_fisher_stand_in(&d.join("ft1"), &d.join("ft1.fisher")).unwrap();
    let no_data = FISHER.split("data:").next().unwrap();
    refused(
        d,
        no_data,
        &["fisher", "needs `data:", "ft1", "fusekit fisher"],
    );
    refused(
        d,
        &FISHER.replace(
            "./ft2: {fisher: ./ft2.fisher}",
            "./ft3: {fisher: ./ft2.fisher}",
        ),
        &["data.", "ft3", "not a model"],
    );
    refused(d, FISHER, &["ft2.fisher", "not found"]);
    refused(
        d,
        &FISHER.replace("fisher:", "fishr:"),
        &["fishr", "line 8"],
    );
    let linear = "merge_method: linear\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1.0}\ndata:\n  ./ft1: {fisher: ./ft1.fisher}\n";
    refused(d, linear, &["linear", "reads no data"]);
    // Statistics of another shape.
    let mut wide = ModelSpec::tiny(Family::Llama, Dtype::BF16, 1);
    wide.intermediate = 48;
    write_model(&wide, &d.join("wide")).unwrap();
    write_fisher_stand_in(&d.join("wide"), &d.join("ft2.fisher")).unwrap();
    refused(d, FISHER, &["ft2.fisher", "another shape"]);
}
