//! The diagonal Fisher of a small MLP equals a hand computation: the per-class gradients of
//! log-softmax written out for one ReLU layer and a linear head, squared per example, weighted
//! by the model's probabilities (exact) or taken at the gold label (empirical).

// The hand computation indexes like the formulas it spells out.
#![allow(clippy::needless_range_loop)]

use candle_core::{Device, Tensor};
use fusekit_nn::fisher::{diagonal_fisher, write_fisher, FisherKind, FisherOptions};
use fusekit_nn::models::mlp::MlpConfig;
use fusekit_nn::weights::save;
use std::collections::BTreeMap;
use std::path::Path;

/// Values of every tensor by name, in f64.
type Params = BTreeMap<String, Vec<f64>>;

const D: usize = 4;
const H: usize = 5;
const C: usize = 3;

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}

/// The expected Fisher of every tensor, in f64.
fn by_hand(
    params: &BTreeMap<String, Vec<f64>>,
    xs: &[[f64; D]],
    labels: &[usize],
    kind: FisherKind,
) -> Params {
    let (w1, b1, w2, b2) = (
        &params["trunk.0.weight"],
        &params["trunk.0.bias"],
        &params["head.weight"],
        &params["head.bias"],
    );
    let mut f: Params = params
        .iter()
        .map(|(k, v)| (k.clone(), vec![0.0; v.len()]))
        .collect();
    for (x, &label) in xs.iter().zip(labels) {
        let z: Vec<f64> = (0..H)
            .map(|m| b1[m] + (0..D).map(|j| w1[m * D + j] * x[j]).sum::<f64>())
            .collect();
        let a: Vec<f64> = z.iter().map(|&v| v.max(0.0)).collect();
        let logits: Vec<f64> = (0..C)
            .map(|k| b2[k] + (0..H).map(|m| w2[k * H + m] * a[m]).sum::<f64>())
            .collect();
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        let classes: Vec<(usize, f64)> = match kind {
            FisherKind::Exact => p.iter().copied().enumerate().collect(),
            _ => vec![(label, 1.0)],
        };
        for (y, weight) in classes {
            let delta: Vec<f64> = (0..C).map(|k| f64::from(k == y) - p[k]).collect();
            let dz: Vec<f64> = (0..H)
                .map(|m| {
                    if z[m] > 0.0 {
                        (0..C).map(|k| w2[k * H + m] * delta[k]).sum()
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut add =
                |name: &str, i: usize, g: f64| f.get_mut(name).unwrap()[i] += weight * g * g;
            for k in 0..C {
                add("head.bias", k, delta[k]);
                for m in 0..H {
                    add("head.weight", k * H + m, delta[k] * a[m]);
                }
            }
            for m in 0..H {
                add("trunk.0.bias", m, dz[m]);
                for j in 0..D {
                    add("trunk.0.weight", m * D + j, dz[m] * x[j]);
                }
            }
        }
    }
    for v in f.values_mut() {
        v.iter_mut().for_each(|x| *x /= xs.len() as f64);
    }
    f
}

fn setup(dir: &Path) -> (Params, Vec<[f64; D]>, Vec<usize>) {
    let config = MlpConfig {
        trunk_sizes: vec![D, H],
        num_labels: C,
    };
    let tensors = config.init(5, &Device::Cpu).unwrap();
    save(&dir.join("mlp"), &config.to_json(), &tensors).unwrap();
    let params = tensors
        .iter()
        .map(|(n, t)| (n.clone(), values(t)))
        .collect();
    let xs: Vec<[f64; D]> = (0..12)
        .map(|i| std::array::from_fn(|j| ((i * 7 + j * 3) % 11) as f64 / 5.0 - 1.0))
        .collect();
    let labels: Vec<usize> = (0..12).map(|i| i % C).collect();
    let lines: String = xs
        .iter()
        .zip(&labels)
        .map(|(x, l)| format!("{{\"input\": {:?}, \"label\": {l}}}\n", x.map(|v| v as f32)))
        .collect();
    std::fs::write(dir.join("data.jsonl"), lines).unwrap();
    (params, xs, labels)
}

#[test]
fn fisher_of_an_mlp_equals_the_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (params, xs, labels) = setup(d);
    for kind in [FisherKind::Exact, FisherKind::Empirical] {
        let options = FisherOptions {
            kind,
            ..Default::default()
        };
        let got = diagonal_fisher(
            d.join("mlp").to_str().unwrap(),
            &d.join("data.jsonl"),
            &options,
            &|_, _| {},
        )
        .unwrap();
        let want = by_hand(&params, &xs, &labels, kind);
        assert_eq!(got.len(), want.len());
        for (name, t) in &got {
            let (g, w) = (values(t), &want[name]);
            assert!(w.iter().any(|&v| v > 0.0), "{name}");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
                    "{kind:?} {name}[{i}]: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn the_fisher_checkpoint_feeds_a_fisher_merge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let options = FisherOptions {
        kind: FisherKind::Sampled,
        seed: 3,
        ..Default::default()
    };
    write_fisher(
        d.join("mlp").to_str().unwrap(),
        &d.join("data.jsonl"),
        &d.join("fisher"),
        &options,
        &|_, _| {},
    )
    .unwrap();
    let about: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("fisher/fisher.json")).unwrap())
            .unwrap();
    assert_eq!(about["options"]["kind"], "sampled");
    // The same data and seed give the same bytes.
    write_fisher(
        d.join("mlp").to_str().unwrap(),
        &d.join("data.jsonl"),
        &d.join("again"),
        &options,
        &|_, _| {},
    )
    .unwrap();
    let read = |p: &str| std::fs::read(d.join(p).join("model.safetensors")).unwrap();
    assert_eq!(read("fisher"), read("again"));
    let m = d.join("mlp").display().to_string();
    let f = d.join("fisher").display().to_string();
    let config =
        format!("merge_method: fisher\nmodels:\n  - model: {m}\ndata:\n  {m}: {{fisher: {f}}}\n");
    std::fs::write(d.join("c.yml"), config).unwrap();
    fusekit::merge(
        &d.join("c.yml"),
        &d.join("merged"),
        &Default::default(),
        &(),
    )
    .unwrap();
    // One model merged alone is itself (to the rounding of λF·θ / λF).
    let a = fusekit_nn::weights::Weights::load(&m, &Device::Cpu, false).unwrap();
    let b =
        fusekit_nn::weights::Weights::load(d.join("merged").to_str().unwrap(), &Device::Cpu, false)
            .unwrap();
    for (name, t) in a.tensors() {
        let merged = values(&b.get(name, t.dims()).unwrap());
        for (x, y) in values(t).iter().zip(merged) {
            assert!(
                (x - y).abs() <= 2.0 * f32::EPSILON as f64 * x.abs(),
                "{name}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn a_fisher_config_with_task_files_gets_its_statistics_computed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let m = d.join("mlp").display().to_string();
    let data = d.join("data.jsonl").display().to_string();
    let text = format!("merge_method: fisher\nmodels:\n  - model: {m}\ndata:\n  {m}: {{file: {data}, kind: empirical, examples: 6}}\n");
    let rewritten = fusekit_nn::fisher::fisher_config(&text, &d.join("stats"), &|_, _| {})
        .unwrap()
        .unwrap();
    assert!(
        rewritten.contains("fisher:") && !rewritten.contains("file:"),
        "{rewritten}"
    );
    let options = FisherOptions {
        kind: FisherKind::Empirical,
        examples: 6,
        ..Default::default()
    };
    let direct = diagonal_fisher(&m, &d.join("data.jsonl"), &options, &|_, _| {}).unwrap();
    let stored = fusekit_nn::weights::Weights::load(
        d.join("stats/0").to_str().unwrap(),
        &Device::Cpu,
        false,
    )
    .unwrap();
    for (name, t) in &direct {
        assert_eq!(
            values(t),
            values(&stored.get(name, t.dims()).unwrap()),
            "{name}"
        );
    }
    std::fs::write(d.join("c.yml"), &rewritten).unwrap();
    fusekit::merge(
        &d.join("c.yml"),
        &d.join("merged"),
        &Default::default(),
        &(),
    )
    .unwrap();
    // Configs that have their statistics, or are no Fisher merge, are left alone.
    assert!(
        fusekit_nn::fisher::fisher_config(&rewritten, &d.join("x"), &|_, _| {})
            .unwrap()
            .is_none()
    );
    assert!(fusekit_nn::fisher::fisher_config(
        "merge_method: linear\nmodels: []\n",
        &d.join("x"),
        &|_, _| {}
    )
    .unwrap()
    .is_none());
    // The engine alone explains where the statistics come from.
    std::fs::write(d.join("raw.yml"), &text).unwrap();
    let err = fusekit::merge(&d.join("raw.yml"), &d.join("raw"), &Default::default(), &())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--features nn") && err.contains("`file`"),
        "{err}"
    );
}

#[test]
fn the_empirical_fisher_of_a_decoder_sums_every_positions_squared_gradient() {
    use fusekit::dtype::Dtype;
    use fusekit::fixtures::{write_model, Family, ModelSpec};
    use fusekit_nn::models::llama::Llama;
    use fusekit_nn::text::TextEncoder;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_model(
        &ModelSpec::tiny(Family::Llama, Dtype::F32, 1),
        &d.join("lm"),
    )
    .unwrap();
    let text = "t3 t9 t1 t27";
    std::fs::write(d.join("texts.jsonl"), format!("{{\"text\": \"{text}\"}}\n")).unwrap();
    let m = d.join("lm").display().to_string();
    let options = FisherOptions {
        kind: FisherKind::Empirical,
        ..Default::default()
    };
    let got = diagonal_fisher(&m, &d.join("texts.jsonl"), &options, &|_, _| {}).unwrap();

    // Independently: each position's gradient from a forward pass over that prefix alone.
    let w = fusekit_nn::weights::Weights::load(&m, &Device::Cpu, true).unwrap();
    let model = Llama::new(&w).unwrap();
    let ids = TextEncoder::from_model_dir(&d.join("lm"), 128)
        .unwrap()
        .ids(text)
        .unwrap();
    let mut want: BTreeMap<String, Tensor> = BTreeMap::new();
    for t in 0..ids.len() - 1 {
        let prefix = Tensor::new(&ids[..=t], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mask = prefix.ones_like().unwrap();
        let logits = model.forward(&prefix, &mask).unwrap().squeeze(0).unwrap();
        let log_p = fusekit_nn::ops::log_softmax_last_dim(&logits).unwrap();
        let grads = log_p
            .get(t)
            .unwrap()
            .get(ids[t + 1] as usize)
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in w.vars() {
            let g2 = grads.get(var.as_tensor()).unwrap().sqr().unwrap();
            let entry = want
                .entry(name.to_string())
                .or_insert_with(|| g2.zeros_like().unwrap());
            *entry = (&*entry + g2).unwrap();
        }
    }
    let positions = (ids.len() - 1) as f64;
    // Sequence and prefix passes round differently in f32 (other matrix shapes): compare
    // relative to each value and to the largest Fisher entry of the model.
    let scale = want.values().flat_map(values).fold(0.0, f64::max) / positions;
    for (name, t) in &got {
        let (g, w) = (values(t), values(&(&want[name] / positions).unwrap()));
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs() + 1e-5 * scale,
                "{name}[{i}]: {a} vs {b}"
            );
        }
    }
    let exact = FisherOptions::default();
    let err = diagonal_fisher(&m, &d.join("texts.jsonl"), &exact, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sampled") && err.contains("empirical"),
        "{err}"
    );
}
