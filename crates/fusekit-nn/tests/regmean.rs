//! RegMean equals its closed form, computed here by hand: the Gram of every linear layer's inputs
//! on each model's own data, off-diagonals scaled by α, and W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ solved by
//! Gaussian elimination; everything else averaged.

// The hand computation indexes like the formulas it spells out.
#![allow(clippy::needless_range_loop)]

use candle_core::{Device, Tensor};
use fusekit_nn::coefficients::Expert;
use fusekit_nn::models::mlp::MlpConfig;
use fusekit_nn::regmean::{regmean, RegMeanOptions};
use fusekit_nn::weights::{save, Weights};
use std::path::Path;

const D: usize = 4;
const H: usize = 6;

type Matrix = Vec<Vec<f64>>;

fn matrix(t: &Tensor) -> Matrix {
    t.to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect()
}

/// Solves A X = B (A n×n, B n×m) by Gaussian elimination with partial pivoting.
fn solve(mut a: Matrix, mut b: Matrix) -> Matrix {
    let n = a.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            for k in 0..b[0].len() {
                b[row][k] -= f * b[col][k];
            }
        }
    }
    let m = b[0].len();
    let mut x = vec![vec![0.0; m]; n];
    for row in (0..n).rev() {
        for k in 0..m {
            let s: f64 = (row + 1..n).map(|j| a[row][j] * x[j][k]).sum();
            x[row][k] = (b[row][k] - s) / a[row][row];
        }
    }
    x
}

/// W* from each model's weight and input rows.
fn closed_form(weights: &[Matrix], inputs: &[Vec<Vec<f64>>], alpha: f64) -> Matrix {
    let (out, inp) = (weights[0].len(), weights[0][0].len());
    let mut a = vec![vec![0.0; inp]; inp];
    let mut b = vec![vec![0.0; out]; inp];
    for (w, x) in weights.iter().zip(inputs) {
        for r in 0..inp {
            for c in 0..inp {
                let g = x.iter().map(|row| row[r] * row[c]).sum::<f64>() / x.len() as f64;
                let g = if r == c { g } else { alpha * g };
                a[r][c] += g;
                for o in 0..out {
                    b[r][o] += g * w[o][c];
                }
            }
        }
    }
    let x = solve(a, b);
    (0..out)
        .map(|o| (0..inp).map(|i| x[i][o]).collect())
        .collect()
}

fn model(dir: &Path, seed: u64, xs: &[[f32; D]]) -> (Weights, String) {
    let config = MlpConfig {
        trunk_sizes: vec![D, H],
        num_labels: 3,
    };
    save(
        dir,
        &config.to_json(),
        &config.init(seed, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let lines: String = xs
        .iter()
        .map(|x| format!("{{\"input\": {x:?}, \"label\": 0}}\n"))
        .collect();
    let data = format!("{}.jsonl", dir.display());
    std::fs::write(&data, lines).unwrap();
    (
        Weights::load(dir.to_str().unwrap(), &Device::Cpu, false).unwrap(),
        data,
    )
}

#[test]
fn regmean_equals_the_closed_form() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let inputs = |seed: u64| -> Vec<[f32; D]> {
        let key = fusekit::rng::stream_key(seed, "x", 0);
        (0..20)
            .map(|i| {
                std::array::from_fn(|j| {
                    (fusekit::rng::uniform(key, (i * D + j) as u64) * 2.0 - 1.0) as f32
                })
            })
            .collect()
    };
    let (xa, xb) = (inputs(1), inputs(2));
    let (wa, da) = model(&d.join("a"), 1, &xa);
    let (wb, db) = model(&d.join("b"), 2, &xb);
    let experts = [
        Expert {
            model: d.join("a").display().to_string(),
            data: da.into(),
        },
        Expert {
            model: d.join("b").display().to_string(),
            data: db.into(),
        },
    ];
    let options = RegMeanOptions {
        alpha: 0.7,
        batch_size: 7,
        ..Default::default()
    };
    regmean(&experts, &d.join("merged"), &options, &|_, _| {}).unwrap();
    let merged = Weights::load(d.join("merged").to_str().unwrap(), &Device::Cpu, false).unwrap();

    let get = |w: &Weights, n: &str, shape: &[usize]| {
        matrix(
            &w.get(n, shape)
                .unwrap()
                .reshape((shape[0], shape.iter().skip(1).product::<usize>().max(1)))
                .unwrap(),
        )
    };
    let as_rows = |xs: &[[f32; D]]| -> Vec<Vec<f64>> {
        xs.iter()
            .map(|x| x.iter().map(|&v| v as f64).collect())
            .collect()
    };
    // The head's inputs are each model's own trunk features.
    let features = |w: &Weights, xs: &[[f32; D]]| -> Vec<Vec<f64>> {
        let wt = get(w, "trunk.0.weight", &[H, D]);
        let bt = get(w, "trunk.0.bias", &[H]);
        xs.iter()
            .map(|x| {
                (0..H)
                    .map(|h| {
                        (bt[h][0] + (0..D).map(|j| wt[h][j] * x[j] as f64).sum::<f64>()).max(0.0)
                    })
                    .collect()
            })
            .collect()
    };
    let cases = [
        ("trunk.0.weight", [H, D], vec![as_rows(&xa), as_rows(&xb)]),
        (
            "head.weight",
            [3, H],
            vec![features(&wa, &xa), features(&wb, &xb)],
        ),
    ];
    for (name, shape, xs) in cases {
        let want = closed_form(&[get(&wa, name, &shape), get(&wb, name, &shape)], &xs, 0.7);
        let got = get(&merged, name, &shape);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            for (c, (g, w)) in g.iter().zip(w).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{name}[{r},{c}]: {g} vs {w}"
                );
            }
        }
    }
    // Biases are averaged.
    let (ba, bb, bm) = (
        get(&wa, "trunk.0.bias", &[H]),
        get(&wb, "trunk.0.bias", &[H]),
        get(&merged, "trunk.0.bias", &[H]),
    );
    for h in 0..H {
        assert!((bm[h][0] - (ba[h][0] + bb[h][0]) / 2.0).abs() < 1e-6);
    }
}

#[test]
fn regmean_merges_decoders_on_text() {
    use fusekit::dtype::Dtype;
    use fusekit::fixtures::{write_model, Family, ModelSpec};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    let mut experts = Vec::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        write_model(&spec.clone().finetuned(i as u64 + 2, 0.05), &d.join(name)).unwrap();
        let lines: String = (0..6)
            .map(|k| format!("{{\"text\": \"t{} t{} t{}\"}}\n", k + i, 2 * k, 40 - k))
            .collect();
        std::fs::write(d.join(format!("{name}.jsonl")), lines).unwrap();
        experts.push(Expert {
            model: d.join(name).display().to_string(),
            data: d.join(format!("{name}.jsonl")),
        });
    }
    regmean(
        &experts,
        &d.join("merged"),
        &RegMeanOptions::default(),
        &|_, _| {},
    )
    .unwrap();
    let load = |n: &str| Weights::load(d.join(n).to_str().unwrap(), &Device::Cpu, false).unwrap();
    let (a, b, m) = (load("a"), load("b"), load("merged"));
    let mean = |name: &str, shape: &[usize]| {
        ((a.get(name, shape).unwrap() + b.get(name, shape).unwrap()).unwrap() / 2.0).unwrap()
    };
    let differs = |name: &str, shape: &[usize]| {
        let diff = (m.get(name, shape).unwrap() - mean(name, shape)).unwrap();
        diff.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // Linear layers are solved, norms averaged.
    assert!(differs("model.layers.0.self_attn.q_proj.weight", &[32, 32]) > 1e-4);
    assert!(differs("model.layers.1.mlp.down_proj.weight", &[32, 64]) > 1e-4);
    assert!(differs("model.norm.weight", &[32]) < 1e-6);
    // The merged decoder runs.
    std::fs::write(d.join("text.txt"), "t1 t2 t3 t4 t5 t6 t7 t8").unwrap();
    let task = fusekit_nn::eval::Task::Perplexity {
        text: d.join("text.txt"),
        context: 8,
    };
    let report = fusekit_nn::eval::evaluate(
        d.join("merged").to_str().unwrap(),
        &task,
        &Default::default(),
        &|_, _| {},
    )
    .unwrap();
    assert!(report.value.is_finite() && report.value > 1.0);
}

/// A feature that no input reached in any model (a dead ReLU unit) gets the models' mean column;
/// the live features still solve the closed form restricted to them.
#[test]
fn dead_features_are_averaged() {
    use fusekit_nn::regmean::merge_linear;
    use fusekit_nn::weights::Gram;
    // Feature 2 of 3 is never non-zero.
    let inputs: [Vec<Vec<f64>>; 2] = [
        vec![
            vec![1.0, 2.0, 0.0],
            vec![0.5, -1.0, 0.0],
            vec![2.0, 0.0, 0.0],
        ],
        vec![vec![-1.0, 1.0, 0.0], vec![3.0, 1.0, 0.0]],
    ];
    let gram = |xs: &Vec<Vec<f64>>| Gram {
        dim: 3,
        rows: xs.len() as u64,
        sum: (0..9)
            .map(|k| xs.iter().map(|x| x[k / 3] * x[k % 3]).sum())
            .collect(),
    };
    let grams: Vec<Gram> = inputs.iter().map(gram).collect();
    let weights: Vec<Matrix> = vec![
        vec![vec![1.0, 2.0, 3.0], vec![-1.0, 0.5, 4.0]],
        vec![vec![0.0, 1.0, -1.0], vec![2.0, 2.0, 0.0]],
    ];
    let tensors: Vec<Tensor> = weights
        .iter()
        .map(|w| {
            let flat: Vec<f32> = w.iter().flatten().map(|&v| v as f32).collect();
            Tensor::from_vec(flat, (2, 3), &Device::Cpu).unwrap()
        })
        .collect();
    let merged = matrix(&merge_linear(&tensors, &grams.iter().collect::<Vec<_>>(), 0.9).unwrap());
    let live: Vec<Matrix> = weights
        .iter()
        .map(|w| w.iter().map(|r| r[..2].to_vec()).collect())
        .collect();
    let live_inputs: Vec<Vec<Vec<f64>>> = inputs
        .iter()
        .map(|xs| xs.iter().map(|x| x[..2].to_vec()).collect())
        .collect();
    let expected = closed_form(&live, &live_inputs, 0.9);
    for r in 0..2 {
        for c in 0..2 {
            assert!(
                (merged[r][c] - expected[r][c]).abs() < 1e-4,
                "{merged:?} vs {expected:?}"
            );
        }
        let mean = (weights[0][r][2] + weights[1][r][2]) / 2.0;
        assert!(
            (merged[r][2] - mean).abs() < 1e-6,
            "dead column {r}: {}",
            merged[r][2]
        );
    }
}

/// `dtype: bfloat16` stores the f32 solution rounded once (round to nearest even, as the merge
/// engine rounds), and a binary SentencePiece `tokenizer.model` travels with the merged model.
#[test]
fn regmean_stores_the_requested_dtype_and_copies_binary_tokenizers() {
    use fusekit_nn::regmean::regmean_config;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let xs: Vec<[f32; D]> = (0..12)
        .map(|i| std::array::from_fn(|j| ((i * D + j) % 7) as f32 / 7.0 - 0.3))
        .collect();
    let (_, da) = model(&d.join("a"), 3, &xs);
    let (_, db) = model(&d.join("b"), 4, &xs);
    let sentencepiece: Vec<u8> = (0..=255u8).rev().chain([0, 0xff, 0x80]).collect();
    std::fs::write(d.join("a/tokenizer.model"), &sentencepiece).unwrap();
    let config = |dtype: &str| {
        format!(
            "merge_method: regmean\nmodels:\n  - model: {a}\n  - model: {b}\ndata:\n  {a}: {{file: {da}}}\n  {b}: {{file: {db}}}\ndtype: {dtype}\n",
            a = d.join("a").display(),
            b = d.join("b").display(),
        )
    };
    for (dtype, out) in [("float32", "f32"), ("bfloat16", "bf16")] {
        let (models, options) = regmean_config(&config(dtype)).unwrap().unwrap();
        regmean(&models, &d.join(out), &options, &|_, _| {}).unwrap();
    }
    let header = |out: &str| {
        let bytes = std::fs::read(d.join(out).join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        meta.tensors()["trunk.0.weight"].dtype
    };
    assert_eq!(header("bf16"), safetensors::Dtype::BF16);
    let config_json = std::fs::read_to_string(d.join("bf16/config.json")).unwrap();
    assert!(
        config_json.contains("\"torch_dtype\": \"bfloat16\""),
        "{config_json}"
    );
    let load = |out: &str| {
        Weights::load(d.join(out).to_str().unwrap(), &Device::Cpu, false)
            .unwrap()
            .get("trunk.0.weight", &[H, D])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let rounded: Vec<f32> = load("f32")
        .iter()
        .map(|&v| fusekit::kernels::convert::round_to(fusekit::dtype::Dtype::BF16, v))
        .collect();
    assert_eq!(load("bf16"), rounded);
    assert_eq!(
        std::fs::read(d.join("bf16/tokenizer.model")).unwrap(),
        sentencepiece
    );
    let bad = regmean_config(&config("int8")).unwrap_err().to_string();
    assert!(bad.contains("dtype") && bad.contains("int8"), "{bad}");
}
