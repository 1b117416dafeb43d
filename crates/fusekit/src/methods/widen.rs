//! `widen`: WIDEN, weight disentanglement (Yu et al., "Extend Model Merging from Fine-Tuned to
//! Pre-Trained Large Language Models via Weight Disentanglement", arXiv:2408.03092; reference
//! code yule-BUAA/MergeLLM `widen_merging`).
//!
//! Per 2-D weight W (rows × cols; token embeddings transposed, so their "columns" are the
//! vocabulary entries), for each model k against the base 0 and each column c:
//! - magnitude mₖ[c] = ‖Wₖ[:, c]‖₂, direction Dₖ[:, c] = Wₖ[:, c] / mₖ[c];
//! - ΔMₖ[c] = |mₖ[c] − m₀[c]|, ΔDₖ[c] = 1 − cos(Dₖ[:, c], D₀[:, c]) (0 where a norm is 0);
//! - each is replaced by its normalised rank within the model (rank/cols, ties by index);
//! - scores S = softmax over models of the ranks, overwritten with `score_calibration_value` s
//!   where a model's rank exceeds `above_average_value_ratio` t × its mean rank;
//! - wₖ[c] = ½(S_mag,k[c] + S_dir,k[c]); W = W₀ + Σₖ wₖ[c]·(Wₖ − W₀)[:, c] (not renormalised:
//!   with s = 1 two models can both get weight 1, as in the reference).
//!
//! Other tensors (norms, biases): scores = softmax over models of |Δₖ| per element, with the same
//! calibration against the mean |Δₖ| of the tensor; θ = θ₀ + Σₖ wₖ·Δₖ.
//!
//! Column sums are accumulated in f64 in one statistics pass; nothing tensor-sized is held.
//! Use it when merging models that moved far from the base (continued pre-training beside
//! instruction tuning), where task arithmetic and TIES break down.

use super::*;
use crate::error::Error;

pub struct Widen;

static SPEC: MethodSpec = MethodSpec {
    name: "widen",
    summary: "per-column magnitude/direction ranks, softmax over models, calibrated",
    reference: "https://arxiv.org/abs/2408.03092",
    params: &[
        ParamSpec {
            name: "above_average_value_ratio",
            scope: Scope::Global,
            ty: ParamType::NonNegative,
            default: Some(Default::Float(1.0)),
            doc: "t: ranks above t × the model's mean rank get the calibration score",
        },
        ParamSpec {
            name: "score_calibration_value",
            scope: Scope::Global,
            ty: ParamType::Float,
            default: Some(Default::Float(1.0)),
            doc: "s: the score those columns get",
        },
    ],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: None,
};

/// How elements map to the statistic they belong to.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Per column of a rows × cols matrix.
    Columns { cols: usize },
    /// Per row (a transposed embedding).
    Rows { cols: usize },
    /// Per element (1-D and scalar tensors).
    Elements,
}

impl Layout {
    fn slot(self, e: usize) -> usize {
        match self {
            Layout::Columns { cols } => e % cols,
            Layout::Rows { cols } => e / cols,
            Layout::Elements => e,
        }
    }
}

struct WidenMerger {
    base: usize,
    models: Vec<usize>,
    layout: Layout,
    t: f64,
    s: f64,
    /// Per slot: Σ W₀²; per model and slot: Σ Wₖ², Σ Wₖ·W₀ (matrices), or Σ|Δₖ| (elements).
    base_sq: Vec<f64>,
    model_sq: Vec<Vec<f64>>,
    model_dot: Vec<Vec<f64>>,
    abs_sum: Vec<f64>,
    numel: usize,
    /// Per model and slot: the merge weight (matrices).
    weights: Vec<Vec<f32>>,
}

impl Method for Widen {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "widen needs `base_model`"))?;
        let models: Vec<usize> = (0..ctx.n_inputs).filter(|&i| i != base).collect();
        let embedding = ["embed", "wte", "word_embeddings"]
            .iter()
            .any(|e| ctx.name.contains(e));
        let (layout, slots) = match ctx.shape {
            [rows, rest @ ..] if !rest.is_empty() => {
                let cols = rest.iter().product::<usize>().max(1);
                if embedding {
                    (Layout::Rows { cols }, *rows)
                } else {
                    (Layout::Columns { cols }, cols)
                }
            }
            _ => (Layout::Elements, 0),
        };
        let n = models.len();
        Ok(Box::new(WidenMerger {
            base,
            layout,
            t: ctx.params.float("above_average_value_ratio").unwrap_or(1.0),
            s: ctx.params.float("score_calibration_value").unwrap_or(1.0),
            base_sq: vec![0.0; slots],
            model_sq: vec![vec![0.0; slots]; n],
            model_dot: vec![vec![0.0; slots]; n],
            abs_sum: vec![0.0; n],
            numel: ctx.numel,
            weights: Vec::new(),
            models,
        }))
    }
}

/// Normalised ranks (0, 1/n, …, (n−1)/n) of `values`, ascending, ties by index.
fn normalised_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
    let mut ranks = vec![0.0; values.len()];
    let n = values.len() as f64;
    for (rank, &i) in order.iter().enumerate() {
        ranks[i] = rank as f64 / n;
    }
    ranks
}

/// The scores of the models at one slot: softmax over models of `values`, overwritten with `s`
/// where a model's value exceeds `t` × its mean.
fn calibrated(values: &[f64], means: &[f64], t: f64, s: f64) -> Vec<f64> {
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let total: f64 = values.iter().map(|v| (v - max).exp()).sum();
    values
        .iter()
        .zip(means)
        .map(|(v, mean)| {
            if *v > t * mean {
                s
            } else {
                (v - max).exp() / total
            }
        })
        .collect()
}

/// `calibrated` at every slot of per-model value vectors, against each model's mean.
fn calibrated_scores(values: &[Vec<f64>], t: f64, s: f64) -> Vec<Vec<f64>> {
    let slots = values.first().map_or(0, Vec::len);
    let means: Vec<f64> = values
        .iter()
        .map(|v| v.iter().sum::<f64>() / slots.max(1) as f64)
        .collect();
    let mut scores = vec![vec![0.0; slots]; values.len()];
    let mut at = vec![0.0; values.len()];
    for c in 0..slots {
        at.iter_mut().zip(values).for_each(|(a, v)| *a = v[c]);
        for (score, v) in scores.iter_mut().zip(calibrated(&at, &means, t, s)) {
            score[c] = v;
        }
    }
    scores
}

impl TensorMerger for WidenMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0
    }

    fn observe(&mut self, _pass: usize, start: usize, inputs: &[&[f32]]) {
        let base = inputs[self.base];
        if let Layout::Elements = self.layout {
            for (sum, &m) in self.abs_sum.iter_mut().zip(&self.models) {
                *sum += inputs[m]
                    .iter()
                    .zip(base)
                    .map(|(x, b)| (x - b).abs() as f64)
                    .sum::<f64>();
            }
            return;
        }
        for (j, &b) in base.iter().enumerate() {
            self.base_sq[self.layout.slot(start + j)] += (b as f64).powi(2);
        }
        for (k, &m) in self.models.iter().enumerate() {
            let (sq, dot) = (&mut self.model_sq[k], &mut self.model_dot[k]);
            for (j, (&x, &b)) in inputs[m].iter().zip(base).enumerate() {
                let c = self.layout.slot(start + j);
                sq[c] += (x as f64).powi(2);
                dot[c] += x as f64 * b as f64;
            }
        }
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        if let Layout::Elements = self.layout {
            return Ok(());
        }
        let base_norm: Vec<f64> = self.base_sq.iter().map(|s| s.sqrt()).collect();
        let (mut magnitude, mut direction) = (Vec::new(), Vec::new());
        for (sq, dot) in self.model_sq.iter().zip(&self.model_dot) {
            let norm: Vec<f64> = sq.iter().map(|s| s.sqrt()).collect();
            let dm: Vec<f64> = norm
                .iter()
                .zip(&base_norm)
                .map(|(a, b)| (a - b).abs())
                .collect();
            let dd: Vec<f64> = dot
                .iter()
                .zip(norm.iter().zip(&base_norm))
                .map(|(d, (a, b))| {
                    if *a > 0.0 && *b > 0.0 {
                        1.0 - (d / (a * b)).clamp(-1.0, 1.0)
                    } else {
                        0.0
                    }
                })
                .collect();
            magnitude.push(normalised_ranks(&dm));
            direction.push(normalised_ranks(&dd));
        }
        let sm = calibrated_scores(&magnitude, self.t, self.s);
        let sd = calibrated_scores(&direction, self.t, self.s);
        self.weights = sm
            .iter()
            .zip(&sd)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (0.5 * (x + y)) as f32)
                    .collect()
            })
            .collect();
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let base = inputs[self.base];
        out.copy_from_slice(base);
        if let Layout::Elements = self.layout {
            let means: Vec<f64> = self
                .abs_sum
                .iter()
                .map(|s| s / self.numel.max(1) as f64)
                .collect();
            let mut deltas = vec![0f64; self.models.len()];
            let mut magnitudes = vec![0f64; self.models.len()];
            for (j, o) in out.iter_mut().enumerate() {
                for ((d, a), &m) in deltas.iter_mut().zip(&mut magnitudes).zip(&self.models) {
                    *d = (inputs[m][j] - base[j]) as f64;
                    *a = d.abs();
                }
                let scores = calibrated(&magnitudes, &means, self.t, self.s);
                let merged: f64 = scores.iter().zip(&deltas).map(|(w, d)| w * d).sum();
                *o += merged as f32;
            }
            return;
        }
        for (weights, &m) in self.weights.iter().zip(&self.models) {
            for (j, (o, (&x, &b))) in out.iter_mut().zip(inputs[m].iter().zip(base)).enumerate() {
                *o += weights[self.layout.slot(start + j)] * (x - b);
            }
        }
    }
}

// The reference test (the paper's steps written out, on every layout of a small multi-tensor
// model) is `tests/research.rs`.
