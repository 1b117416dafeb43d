//! The research methods that merge tensor by tensor (`varm`, `widen`, `tsv`, `iso_c`), run by the
//! engine on a small multi-tensor model (embeddings, linear weights, norms), each tensor compared
//! with its formula written out here from the papers.

mod common;

use common::*;
use faer::MatRef;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit::kernels::svd::{polar, product, svd_of};
use fusekit::MergeOptions;
use std::collections::BTreeMap;
use std::path::Path;

type Model = BTreeMap<String, Loaded>;

/// Base, a fine-tune, and a model that moved far (continued pre-training); then `method` over
/// them; returns base, the two models and the merge.
fn merged(dir: &Path, method: &str, parameters: &str) -> (Model, Vec<Model>, Model) {
    let spec = ModelSpec::tiny(Family::Llama, Dtype::F32, 1);
    write_model(&spec, &dir.join("base")).unwrap();
    write_model(&spec.clone().finetuned(2, 0.01), &dir.join("ft")).unwrap();
    write_model(&spec.finetuned(3, 0.3), &dir.join("pt")).unwrap();
    let config = format!(
        "merge_method: {method}\nbase_model: ./base\nmodels:\n  - model: ./ft\n  - model: ./pt\nparameters: {parameters}\n"
    );
    merge_yaml(dir, &config, "out", &MergeOptions::default()).unwrap();
    let load = |m: &str| load_model(&dir.join(m));
    (load("base"), vec![load("ft"), load("pt")], load("out"))
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tolerance: f32) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * w.abs().max(1.0),
            "{name}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn varm_weighs_each_matrix_by_its_share_of_the_squared_change() {
    let dir = tempfile::tempdir().unwrap();
    let (base, models, out) = merged(dir.path(), "varm", "{}");
    for (name, t) in &base {
        let d = task_vectors(&base, &models, name);
        let energy: Vec<f64> = d
            .iter()
            .map(|d| d.iter().map(|x| (*x as f64).powi(2)).sum())
            .collect();
        let total: f64 = energy.iter().sum();
        let want: Vec<f32> = (0..t.values.len())
            .map(|i| {
                t.values[i]
                    + (0..2)
                        .map(|k| (energy[k] / total) as f32 * d[k][i])
                        .sum::<f32>()
            })
            .collect();
        assert_close(name, &out[name].values, &want, 1e-6);
    }
}

/// WIDEN written out from the paper's steps over a dense rows × cols matrix whose "columns"
/// are taken along `by_rows` (embeddings) or not.
fn reference(
    base: &[f32],
    models: &[Vec<f32>],
    rows: usize,
    cols: usize,
    by_rows: bool,
    t: f64,
    s: f64,
) -> Vec<f32> {
    let (slots, len) = if by_rows { (rows, cols) } else { (cols, rows) };
    let at = |c: usize, r: usize| if by_rows { c * cols + r } else { r * cols + c };
    let column =
        |w: &[f32], c: usize| -> Vec<f64> { (0..len).map(|r| w[at(c, r)] as f64).collect() };
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let rank = |v: &[f64]| {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[a].total_cmp(&v[b]).then(a.cmp(&b)));
        let mut r = vec![0.0; v.len()];
        for (i, &o) in order.iter().enumerate() {
            r[o] = i as f64 / v.len() as f64;
        }
        r
    };
    let (mut mags, mut dirs) = (Vec::new(), Vec::new());
    for m in models {
        let (mut dm, mut dd) = (vec![0.0; slots], vec![0.0; slots]);
        for c in 0..slots {
            let (a, b) = (column(m, c), column(base, c));
            let (na, nb) = (norm(&a), norm(&b));
            dm[c] = (na - nb).abs();
            let cos: f64 = a.iter().zip(&b).map(|(x, y)| x / na * y / nb).sum();
            dd[c] = 1.0 - cos;
        }
        mags.push(rank(&dm));
        dirs.push(rank(&dd));
    }
    let score = |ranks: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let means: Vec<f64> = ranks
            .iter()
            .map(|r| r.iter().sum::<f64>() / slots as f64)
            .collect();
        (0..ranks.len())
            .map(|k| {
                (0..slots)
                    .map(|c| {
                        let z: f64 = ranks.iter().map(|r| r[c].exp()).sum();
                        if ranks[k][c] > t * means[k] {
                            s
                        } else {
                            ranks[k][c].exp() / z
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let (sm, sd) = (score(&mags), score(&dirs));
    let mut out: Vec<f32> = base.to_vec();
    for (k, m) in models.iter().enumerate() {
        for c in 0..slots {
            let w = 0.5 * (sm[k][c] + sd[k][c]);
            for r in 0..len {
                out[at(c, r)] += (w * (m[at(c, r)] - base[at(c, r)]) as f64) as f32;
            }
        }
    }
    out
}

#[test]
fn widen_follows_the_papers_steps_on_every_layout() {
    for (t, s) in [(1.0, 1.0), (1.3, 0.7)] {
        let dir = tempfile::tempdir().unwrap();
        let parameters =
            format!("{{above_average_value_ratio: {t}, score_calibration_value: {s}}}");
        let (base, models, out) = merged(dir.path(), "widen", &parameters);
        for (name, tensor) in &base {
            let b = &tensor.values;
            let ms: Vec<Vec<f32>> = models.iter().map(|m| m[name].values.clone()).collect();
            let want = match tensor.shape[..] {
                [rows, cols] => reference(b, &ms, rows, cols, name.contains("embed"), t, s),
                _ => {
                    // Norms: softmax over models of |Δ|, calibrated against each model's mean |Δ|.
                    let d = task_vectors(&base, &models, name);
                    let means: Vec<f64> = d
                        .iter()
                        .map(|d| d.iter().map(|x| x.abs() as f64).sum::<f64>() / d.len() as f64)
                        .collect();
                    (0..b.len())
                        .map(|i| {
                            let z: f64 = d.iter().map(|d| (d[i].abs() as f64).exp()).sum();
                            let merged: f64 = (0..2)
                                .map(|k| {
                                    let a = d[k][i].abs() as f64;
                                    let w = if a > t * means[k] { s } else { a.exp() / z };
                                    w * d[k][i] as f64
                                })
                                .sum();
                            (b[i] as f64 + merged) as f32
                        })
                        .collect()
                }
            };
            assert_close(name, &out[name].values, &want, 1e-5);
        }
    }
}

/// A row-major matrix's SVD-based merge written out: `tsv` (top-k triplets of each task
/// vector, orthogonalised) or `iso_c` (spectrum of the sum flattened).
fn spectral_reference(method: &str, d: &[Vec<f32>], rows: usize, cols: usize) -> Vec<f32> {
    let k = rows.min(cols);
    let merged = if method == "iso_c" {
        let sum: Vec<f32> = (0..rows * cols)
            .map(|i| d.iter().map(|t| t[i]).sum())
            .collect();
        let svd = svd_of(MatRef::from_row_major_slice(&sum, rows, cols)).unwrap();
        let mean = svd.s.iter().sum::<f32>() / k as f32;
        let mut m = product(svd.u.as_ref(), svd.v.as_ref().transpose());
        for i in 0..rows {
            for j in 0..cols {
                m[(i, j)] *= mean;
            }
        }
        m
    } else {
        let per = (k / d.len()).max(1);
        let width = per * d.len();
        let mut u = faer::Mat::<f32>::zeros(rows, width);
        let mut v = faer::Mat::<f32>::zeros(cols, width);
        let mut sigma = Vec::new();
        for (t, tau) in d.iter().enumerate() {
            let svd = svd_of(MatRef::from_row_major_slice(tau, rows, cols)).unwrap();
            for j in 0..per {
                (0..rows).for_each(|r| u[(r, t * per + j)] = svd.u[(r, j)]);
                (0..cols).for_each(|r| v[(r, t * per + j)] = svd.v[(r, j)]);
                sigma.push(svd.s[j]);
            }
        }
        let (pu, pv) = (polar(u.as_ref()).unwrap(), polar(v.as_ref()).unwrap());
        faer::Mat::from_fn(rows, cols, |i, j| {
            (0..width).map(|c| pu[(i, c)] * sigma[c] * pv[(j, c)]).sum()
        })
    };
    (0..rows * cols)
        .map(|e| merged[(e / cols, e % cols)])
        .collect()
}

#[test]
fn tsv_and_iso_c_follow_their_formulas_on_every_tensor() {
    for (method, scale_key) in [("tsv", "alpha"), ("iso_c", "scale")] {
        let dir = tempfile::tempdir().unwrap();
        let (base, models, out) = merged(dir.path(), method, &format!("{{{scale_key}: 0.8}}"));
        for (name, tensor) in &base {
            let d = task_vectors(&base, &models, name);
            let delta: Vec<f32> = match tensor.shape[..] {
                [rows, cols] => spectral_reference(method, &d, rows, cols),
                // Vectors: the mean task vector.
                _ => (0..d[0].len()).map(|i| (d[0][i] + d[1][i]) / 2.0).collect(),
            };
            let want: Vec<f32> = tensor
                .values
                .iter()
                .zip(&delta)
                .map(|(b, x)| b + 0.8 * x)
                .collect();
            assert_close(&format!("{method} {name}"), &out[name].values, &want, 2e-5);
        }
    }
}
