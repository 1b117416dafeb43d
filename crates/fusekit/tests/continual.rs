//! `fusekit continual` (OPCM): folding models in one at a time equals the batch computation of
//! the same recurrence, and the state does not grow with the number of models.

mod common;

use common::*;
use faer::MatRef;
use fusekit::continual::{self, State};
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit::methods::opcm::project;
use fusekit::MergeOptions;
use std::collections::BTreeMap;
use std::path::Path;

type Model = BTreeMap<String, Loaded>;

/// Bytes of the state's weights, and of everything else (config, card, `continual.json`).
fn state_bytes(dir: &Path) -> (u64, u64) {
    let mut sizes = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let len = entry.metadata().unwrap().len();
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            sizes.0 += len;
        } else {
            sizes.1 += len;
        }
    }
    sizes
}

/// The OPCM recurrence over whole models in memory, written out plainly.
fn batch(base: &Model, models: &[Model], alpha: f64) -> (Model, f64, Vec<f64>) {
    let delta_of = |m: &Model, name: &str| -> Vec<f32> {
        task_vectors(base, std::slice::from_ref(m), name).remove(0)
    };
    let norm = |m: &Model| -> f64 {
        base.keys()
            .map(|n| {
                delta_of(m, n)
                    .iter()
                    .map(|d| (*d as f64).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let mut merged: BTreeMap<String, Vec<f32>> = models[0]
        .iter()
        .map(|(n, t)| (n.clone(), t.values.clone()))
        .collect();
    let (mut lambda, mut norms) = (1.0f64, vec![norm(&models[0])]);
    for model in &models[1..] {
        norms.push(norm(model));
        let mut updates = BTreeMap::new();
        let mut update_sq = 0.0;
        for (name, t) in base {
            let delta: Vec<f32> = merged[name]
                .iter()
                .zip(&t.values)
                .map(|(x, b)| x - b)
                .collect();
            let tau = delta_of(model, name);
            // Linear layers: not the embeddings, not the output head (methods.md §15).
            let linear = t.shape.len() == 2 && !name.contains("embed") && !name.contains("lm_head");
            let projected = if linear {
                let (r, c) = (t.shape[0], t.shape[1]);
                let p = project(
                    MatRef::from_row_major_slice(&delta, r, c),
                    MatRef::from_row_major_slice(&tau, r, c),
                    alpha,
                )
                .unwrap();
                (0..r * c).map(|e| p[(e / c, e % c)]).collect()
            } else {
                tau.clone()
            };
            let u: Vec<f32> = delta
                .iter()
                .zip(&projected)
                .map(|(d, p)| lambda as f32 * d + p)
                .collect();
            update_sq += u.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
            updates.insert(name.clone(), u);
        }
        let mean = norms.iter().sum::<f64>() / norms.len() as f64;
        lambda = update_sq.sqrt() / mean;
        for (name, u) in updates {
            let b = &base[&name].values;
            merged.insert(
                name,
                b.iter()
                    .zip(&u)
                    .map(|(b, u)| b + u / lambda as f32)
                    .collect(),
            );
        }
    }
    let merged = merged
        .into_iter()
        .map(|(n, values)| {
            let t = &base[&n];
            (
                n,
                Loaded {
                    values,
                    ..t.clone()
                },
            )
        })
        .collect();
    (merged, lambda, norms)
}

#[test]
fn folding_models_in_equals_the_batch_recurrence() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    write_model(&spec, &dir.path().join("base")).unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("ft{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        write_model(
            &spec.clone().finetuned(10 + i as u64, 0.01),
            &dir.path().join(name),
        )
        .unwrap();
    }
    let path = |n: &str| dir.path().join(n).display().to_string();
    let state_dir = dir.path().join("state");
    let options = MergeOptions::default();
    continual::init(&path("base"), &path(&names[0]), 0.5, &state_dir, &options).unwrap();
    let (weights, _) = state_bytes(&state_dir);
    for name in &names[1..] {
        let state = continual::add(&state_dir, &path(name), &options).unwrap();
        assert_eq!(state, State::load(&state_dir).unwrap());
        // The state is one model and a few numbers (a norm and a path per model so far).
        let (now, rest) = state_bytes(&state_dir);
        assert_eq!(now, weights);
        assert!(rest < 16 << 10, "{rest}");
    }
    let state = State::load(&state_dir).unwrap();
    assert_eq!(state.models.len(), 10);

    let base = load_model(&dir.path().join("base"));
    let models: Vec<Model> = names
        .iter()
        .map(|n| load_model(&dir.path().join(n)))
        .collect();
    let (want, lambda, norms) = batch(&base, &models, 0.5);
    assert!(
        (state.lambda - lambda).abs() < 1e-6 * lambda,
        "{} vs {lambda}",
        state.lambda
    );
    for (a, b) in state.norms.iter().zip(&norms) {
        assert!((a - b).abs() < 1e-9 * b);
    }
    // λ grows roughly like √t for nearly orthogonal task vectors.
    assert!(lambda > 2.0 && lambda < 4.0, "{lambda}");
    let got = load_model(&state_dir);
    for (name, t) in &want {
        for (i, (x, y)) in got[name].values.iter().zip(&t.values).enumerate() {
            assert!((x - y).abs() < 1e-5, "{name}[{i}]: {x} vs {y}");
        }
    }
}
