//! Learned merge coefficients on a toy where the right answer is known: two tasks read
//! disjoint inputs, so each expert's task vector touches only its own input columns (and the
//! biases) and λ ≈ 1 for both recovers both experts, while task arithmetic's usual λ = 0.3 loses
//! much of them. AdaMerging (entropy, no labels) and aTLAS (cross-entropy, few labels) must
//! lower their objective and beat task arithmetic at 0.3.

mod common;

use common::{accuracy, mlp};
use fusekit_nn::coefficients::{
    learn, learned_config, task_arithmetic_config, CoefficientOptions, Expert, Granularity,
};
use fusekit_nn::train::{finetune, TrainOptions};
use std::path::Path;

/// Task `t`'s examples: two uniform inputs in its own pair of columns, the others zero.
fn examples(t: usize, n: usize, seed: u64) -> (Vec<[f32; 4]>, Vec<u32>) {
    let key = fusekit::rng::stream_key(seed, "toy", t);
    let u = |i: usize| (fusekit::rng::uniform(key, i as u64) * 2.0 - 1.0) as f32;
    let mut xs = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let (a, b) = (u(2 * i), u(2 * i + 1));
        let mut x = [0f32; 4];
        x[2 * t] = a;
        x[2 * t + 1] = b;
        xs.push(x);
        labels.push(if t == 0 {
            u32::from(a > b)
        } else {
            u32::from(a + b > 0.0)
        });
    }
    (xs, labels)
}

fn write_jsonl(path: &Path, xs: &[[f32; 4]], labels: &[u32]) {
    let text: String = xs
        .iter()
        .zip(labels)
        .map(|(x, l)| format!("{{\"input\": {x:?}, \"label\": {l}}}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
}

/// Merges with a task-arithmetic config and returns the mean accuracy over both tasks.
fn merged_accuracy(d: &Path, name: &str, config: &str) -> f64 {
    std::fs::write(d.join(format!("{name}.yml")), config).unwrap();
    fusekit::merge(
        &d.join(format!("{name}.yml")),
        &d.join(name),
        &Default::default(),
        &(),
    )
    .unwrap();
    (0..2)
        .map(|t| {
            accuracy(
                &d.join(name),
                &d.join(format!("test{t}.jsonl")),
                Some(&d.join(format!("expert{t}"))),
            )
        })
        .sum::<f64>()
        / 2.0
}

/// The toy's base (an MLP 4-16) and two experts fine-tuned from it, with their data in `d`.
fn toy(d: &Path) -> Vec<Expert> {
    mlp(&d.join("base"), &[4, 16], 2, 1);
    let mut experts = Vec::new();
    for t in 0..2 {
        let (xs, labels) = examples(t, 200, 1);
        write_jsonl(&d.join(format!("train{t}.jsonl")), &xs, &labels);
        let (test_x, test_y) = examples(t, 300, 2);
        write_jsonl(&d.join(format!("test{t}.jsonl")), &test_x, &test_y);
        let options = TrainOptions {
            steps: 300,
            learning_rate: 0.02,
            seed: t as u64,
            ..Default::default()
        };
        let base = d.join("base").display().to_string();
        let train = d.join(format!("train{t}.jsonl"));
        finetune(
            &base,
            &train,
            &d.join(format!("expert{t}")),
            &options,
            &|_, _| {},
        )
        .unwrap();
        let own = accuracy(
            &d.join(format!("expert{t}")),
            &d.join(format!("test{t}.jsonl")),
            None,
        );
        assert!(own > 0.9, "expert {t} learned its task: {own}");
        experts.push(Expert {
            model: d.join(format!("expert{t}")).display().to_string(),
            data: d.join(format!("train{t}.jsonl")),
        });
    }
    experts
}

#[test]
fn learned_coefficients_lower_their_objective_and_beat_task_arithmetic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = toy(d);
    let base = d.join("base").display().to_string();
    let fixed = |l: f64| {
        let learned = fusekit_nn::coefficients::Learned {
            coefficients: vec![[("*".to_string(), vec![l])].into(); 2],
            losses: vec![],
        };
        task_arithmetic_config(&base, &experts, &learned)
    };
    let ta = merged_accuracy(d, "ta", &fixed(0.3));

    for (name, mut options) in [
        ("adamerging", CoefficientOptions::adamerging()),
        ("atlas", CoefficientOptions::atlas()),
        ("expert_merging", CoefficientOptions::expert_merging()),
    ] {
        // Fewer, larger steps than the references' defaults fit the toy; Expert Merging's pull
        // towards its start (λ_reg = 5 spread over an LLM's hundreds of matrices) is scaled to
        // this model's single matrix.
        (options.steps, options.batch_size, options.examples) = (80, 32, 200);
        if name == "expert_merging" {
            (options.learning_rate, options.regularizer) = (0.2, 0.01);
        } else {
            options.learning_rate = 0.05;
        }
        let learned = learn(&base, &experts, &options, &|_, _| {}).unwrap();
        // The objective over the first and the last few batches.
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let n = learned.losses.len();
        let (first, last) = (mean(&learned.losses[..5]), mean(&learned.losses[n - 5..]));
        assert!(last < first, "{name}: objective {first} → {last}");
        assert_eq!(options.granularity, Granularity::Tensor);
        assert!(
            !learned.coefficients[0].contains_key("*"),
            "one λ per tensor"
        );
        let acc = merged_accuracy(d, name, &task_arithmetic_config(&base, &experts, &learned));
        eprintln!("{name}: objective {first:.4} → {last:.4}, mean accuracy {acc:.3} (task arithmetic at 0.3: {ta:.3})");
        assert!(acc > ta, "{name}: {acc} vs task arithmetic {ta}");

        // The same merge from YAML: `data:` names each expert's file, parameters the training.
        let yaml = format!(
            "merge_method: {name}\nbase_model: {base}\nmodels:\n  - model: {e0}\n  - model: {e1}\ndata:\n  {e0}: {{file: {d0}}}\n  {e1}: {{file: {d1}}}\nparameters: {{steps: {steps}, learning_rate: {lr}, batch_size: {batch}, examples: 200, regularizer: {reg}}}\n",
            steps = options.steps,
            lr = options.learning_rate,
            batch = options.batch_size,
            reg = options.regularizer,
            e0 = experts[0].model,
            e1 = experts[1].model,
            d0 = experts[0].data.display(),
            d1 = experts[1].data.display(),
        );
        let from_yaml = learned_config(&yaml, &d.join("unused"), &|_, _| {})
            .unwrap()
            .unwrap();
        assert_eq!(
            from_yaml.learned.coefficients, learned.coefficients,
            "{name}: reproducible"
        );
        let text = from_yaml
            .config
            .expect("one coefficient per tensor: a config");
        assert!(
            text.starts_with("# Learned by fusekit")
                && text.contains("merge_method: task_arithmetic")
        );
        assert_eq!(merged_accuracy(d, &format!("{name}-yaml"), &text), acc);
    }
    let err = learned_config(
        "merge_method: atlas\nbase_model: b\nmodels:\n  - model: m\ndata: {}\n",
        &d.join("unused"),
        &|_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("needs `data: {m: {file: JSONL}}`"), "{err}");
}

/// The YAML of an Expert Merging run on the toy with extra `parameters`.
fn expert_merging_yaml(base: &str, experts: &[Expert], parameters: &str) -> String {
    format!(
        "merge_method: expert_merging\nbase_model: {base}\nmodels:\n  - model: {e0}\n  - model: {e1}\ndata:\n  {e0}: {{file: {d0}}}\n  {e1}: {{file: {d1}}}\nparameters: {{steps: 40, learning_rate: 0.2, batch_size: 32, examples: 200, regularizer: 0.01{parameters}}}\n",
        e0 = experts[0].model,
        e1 = experts[1].model,
        d0 = experts[0].data.display(),
        d1 = experts[1].data.display(),
    )
}

fn tensor(model: &Path, name: &str) -> Vec<f32> {
    let w = fusekit_nn::weights::Weights::load(
        model.to_str().unwrap(),
        &fusekit_nn::Device::Cpu,
        false,
    )
    .unwrap();
    let values = w
        .tensors()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values
}

/// Expert Merging++: with `chunks: 5` every merged matrix gets five coefficients per expert
/// (torch.chunk's split of 64 elements: 13, 13, 13, 13, 12), the runtime writes the merged
/// model itself, and each element of it is base + Σ_k c_k[chunk] · τ_k, computed here by hand
/// from `learned.json`. A `chunk_budget` shares its chunks out by importance: all of them go
/// to the one matrix Expert Merging merges.
#[test]
fn chunked_coefficients_write_the_merge_their_formula_gives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = toy(d);
    let base = d.join("base").display().to_string();
    let out = d.join("chunked");
    let merge = learned_config(
        &expert_merging_yaml(&base, &experts, ", chunks: 5"),
        &out,
        &|_, _| {},
    )
    .unwrap()
    .unwrap();
    assert!(
        merge.config.is_none(),
        "chunks cannot be a config: OUT written"
    );
    let c = &merge.learned.coefficients;
    assert_eq!(c[0].keys().collect::<Vec<_>>(), ["trunk.0.weight"]);
    assert_eq!(c[0]["trunk.0.weight"].len(), 5);
    assert!(
        c[0]["trunk.0.weight"].windows(2).any(|w| w[0] != w[1]),
        "{c:?}"
    );
    let n = merge.learned.losses.len();
    assert!(merge.learned.losses[n - 1] < merge.learned.losses[0]);

    let about: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("learned.json")).unwrap()).unwrap();
    let theta0 = tensor(&d.join("base"), "trunk.0.weight");
    let taus: Vec<Vec<f32>> = (0..2)
        .map(|t| {
            tensor(&d.join(format!("expert{t}")), "trunk.0.weight")
                .iter()
                .zip(&theta0)
                .map(|(a, b)| a - b)
                .collect()
        })
        .collect();
    let merged = tensor(&out, "trunk.0.weight");
    for (j, (&m, &b)) in merged.iter().zip(&theta0).enumerate() {
        let mut want = b;
        for (k, tau) in taus.iter().enumerate() {
            let ck = about["models"][k]["coefficients"]["trunk.0.weight"][j / 13]
                .as_f64()
                .unwrap() as f32;
            want += ck * tau[j];
        }
        assert!(
            (m - want).abs() <= 1e-6 * want.abs().max(1.0),
            "[{j}]: {m} vs {want}"
        );
    }
    // Everything the method leaves alone is the base's.
    assert_eq!(
        tensor(&out, "trunk.0.bias"),
        tensor(&d.join("base"), "trunk.0.bias")
    );
    assert_eq!(
        tensor(&out, "head.weight"),
        tensor(&d.join("base"), "head.weight")
    );

    let budget = learned_config(
        &expert_merging_yaml(&base, &experts, ", chunk_budget: 8"),
        &d.join("budget"),
        &|_, _| {},
    )
    .unwrap()
    .unwrap();
    assert_eq!(budget.learned.coefficients[1]["trunk.0.weight"].len(), 8);
    let both = learned_config(
        &expert_merging_yaml(&base, &experts, ", chunks: 2, chunk_budget: 8"),
        &d.join("both"),
        &|_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(both.contains("not both"), "{both}");
}

/// Hidden-state alignment adds w_h · MSE between the merged model's and the expert's chosen
/// hidden states: the objective falls with it too, a larger weight makes it larger at the
/// start, and a layer the model does not have is refused by name.
#[test]
fn expert_merging_aligns_hidden_states() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = toy(d);
    let base = d.join("base").display().to_string();
    let run = |extra: &str| {
        learned_config(
            &expert_merging_yaml(&base, &experts, extra),
            &d.join("x"),
            &|_, _| {},
        )
        .map(|m| m.unwrap().learned.losses)
    };
    let plain = run("").unwrap();
    let aligned = run(", hidden_layers: [1], hidden_weight: 10.0").unwrap();
    assert!(aligned[0] > plain[0], "{} vs {}", aligned[0], plain[0]);
    assert!(aligned[aligned.len() - 1] < aligned[0], "{aligned:?}");
    let err = run(", hidden_layers: [7]").unwrap_err().to_string();
    assert!(err.contains("hidden_layers") && err.contains('7'), "{err}");
    let wrong = learned_config(
        &expert_merging_yaml(&base, &experts, ", hidden_layers: [1]")
            .replace("expert_merging", "atlas"),
        &d.join("y"),
        &|_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(wrong.contains("belong to expert_merging"), "{wrong}");
}
