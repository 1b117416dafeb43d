//! `pcb`: PCB-Merging, parameter competition balancing (Du et al., NeurIPS 2024,
//! arXiv:2410.02396), as the reference code `duguodong7/pcb-merging` (`PCB_merge`) computes it —
//! over each model's whole task vector. `pcb_per_tensor` takes every statistic per tensor instead
//! (a different method: it changes the results).
//!
//! With n task vectors τᵢ (one row per model over all its d parameters):
//! 1. clip: |τᵢ| clamped to [lo, hi], its values at sorted positions ⌊d·min_ratio⌋ and
//!    ⌊d·(1 − max_ratio)⌋ − 1; τcᵢ = sign(τᵢ)·clamped;
//! 2. intra-balancing: βintraᵢ = exp(n·((|τcᵢ| − lo)/(hi − lo))²);
//! 3. inter-balancing: βinterᵢ = tanh(τᵢ ⊙ Σⱼ τⱼ) — the code's form; the paper writes a softmax
//!    over pairwise products instead;
//! 4. βᵢ = βintraᵢ ⊙ βinterᵢ, raised to its value t at sorted position ⌊d·(1 − pcb_ratio)⌋ and
//!    min-max normalised: β̂ᵢ = (max(βᵢ, t) − t)/(max βᵢ − t), so only the top `pcb_ratio` keep
//!    a weight;
//! 5. θ = θ₀ + λ·Σᵢ β̂ᵢ·τcᵢ / max(Σᵢ β̂ᵢ, 1e-12).
//!
//! Divisions by a zero range (hi = lo, max = t) give 0. The quantiles are exact (two counting
//! passes each, `kernels::quantile`), so `pcb` reads the model four times before merging and
//! `pcb_per_tensor` reads each tensor four times. Defaults: pcb_ratio 0.1, min_ratio = max_ratio =
//! 0.0001 (the reference's), λ 1. Use it to merge several fine-tunes whose changes compete for
//! the same parameters: it keeps, per model, the changes that are both large for that model and
//! agreed on by the others.

use super::*;
use crate::error::Error;
use crate::kernels::math;
use crate::kernels::quantile::RadixSelect;
use multiversion::multiversion;
use std::sync::Arc;

pub struct Pcb;
pub struct PcbPerTensor;

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "pcb_ratio",
        scope: Scope::Global,
        ty: ParamType::Fraction,
        default: Some(Default::Float(0.1)),
        doc: "share of each model's balanced scores that keep a weight",
    },
    ParamSpec {
        name: "min_ratio",
        scope: Scope::Global,
        ty: ParamType::Fraction,
        default: Some(Default::Float(0.0001)),
        doc: "share of the smallest magnitudes clipped up",
    },
    ParamSpec {
        name: "max_ratio",
        scope: Scope::Global,
        ty: ParamType::Fraction,
        default: Some(Default::Float(0.0001)),
        doc: "share of the largest magnitudes clipped down",
    },
    super::gta::LAMBDA,
];

static SPEC: MethodSpec = MethodSpec {
    name: "pcb",
    summary: "clip, intra/inter-balance, drop and rescale over each whole task vector",
    reference: "https://arxiv.org/abs/2410.02396",
    params: PARAMS,
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: None,
};

static PER_TENSOR_SPEC: MethodSpec = MethodSpec {
    name: "pcb_per_tensor",
    summary: "PCB-Merging with every statistic per tensor (differs from the reference)",
    reference: "https://arxiv.org/abs/2410.02396",
    params: PARAMS,
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: None,
};

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    ratio: f64,
    min_ratio: f64,
    max_ratio: f64,
    lambda: f32,
}

impl Settings {
    fn of(params: &ResolvedParams, name: &str) -> Result<Settings> {
        let get = |key: &str, default: f64| params.float(key).unwrap_or(default);
        let s = Settings {
            ratio: get("pcb_ratio", 0.1),
            min_ratio: get("min_ratio", 0.0001),
            max_ratio: get("max_ratio", 0.0001),
            lambda: get("lambda", 1.0) as f32,
        };
        for (key, v) in [
            ("pcb_ratio", s.ratio),
            ("min_ratio", s.min_ratio),
            ("max_ratio", s.max_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::tensor(name, format!("{key} {v} must be in [0, 1]")));
            }
        }
        Ok(s)
    }
}

/// One model's row: its size, the clip range, then the score threshold and maximum.
struct Row {
    d: u64,
    clip: RadixSelect,
    lo_hi: (f32, f32),
    score: RadixSelect,
    threshold_max: (f32, f32),
}

/// What the merge needs per model (by plan model index, or input index per tensor).
#[derive(Debug, Clone, Default)]
pub struct Balance {
    rows: BTreeMap<usize, (f32, f32, f32, f32)>,
}

/// PCB's four statistics passes over a set of tensors (the whole model, or one tensor).
struct Statistics {
    settings: Settings,
    rows: BTreeMap<usize, Row>,
    /// What the finished passes have found so far.
    current: Balance,
}

impl Statistics {
    fn new(settings: Settings, sizes: BTreeMap<usize, u64>) -> Statistics {
        let rank = |d: u64, q: f64| ((d as f64 * q) as u64).min(d.saturating_sub(1));
        let rows = sizes
            .into_iter()
            .map(|(model, d)| {
                let lo = rank(d, settings.min_ratio);
                let hi = ((d as f64 * (1.0 - settings.max_ratio)) as u64)
                    .saturating_sub(1)
                    .max(lo);
                let row = Row {
                    d,
                    clip: RadixSelect::new(&[lo, hi]),
                    lo_hi: (0.0, 0.0),
                    score: RadixSelect::new(&[rank(d, 1.0 - settings.ratio), d.saturating_sub(1)]),
                    threshold_max: (0.0, 0.0),
                };
                (model, row)
            })
            .collect();
        Statistics {
            settings,
            rows,
            current: Balance::default(),
        }
    }

    /// One block of the inputs; `ids` names each input's row, `base` the base input.
    fn observe(&mut self, pass: usize, ids: &[usize], base: usize, inputs: &[&[f32]]) {
        let len = inputs[base].len();
        let tasks = task_inputs(ids, base);
        crate::kernels::with_scratch(len, |values| {
            if pass < 2 {
                for &(input, id) in &tasks {
                    let row = self.rows.get_mut(&id).expect("sized");
                    for ((v, x), b) in values.iter_mut().zip(inputs[input]).zip(inputs[base]) {
                        *v = (x - b).abs();
                    }
                    row.clip.observe(values);
                }
                return;
            }
            let n = tasks.len() as f32;
            crate::kernels::with_scratch(len, |sum| {
                task_sum(&tasks, base, inputs, sum);
                for &(input, id) in &tasks {
                    let (lo, hi, _, _) = self.current.rows[&id];
                    scores(inputs[input], inputs[base], sum, lo, hi, n, values);
                    self.rows.get_mut(&id).expect("sized").score.observe(values);
                }
            });
        });
    }

    fn end_pass(&mut self, pass: usize) {
        for row in self.rows.values_mut() {
            if pass < 2 {
                row.clip.end_pass();
                if let Some(r) = row.clip.result() {
                    row.lo_hi = (r[0], r[1]);
                }
            } else {
                row.score.end_pass();
                if let Some(r) = row.score.result() {
                    row.threshold_max = (r[0], r[1]);
                }
            }
        }
        self.current = self.balance_so_far();
    }

    fn balance_so_far(&self) -> Balance {
        Balance {
            rows: self
                .rows
                .iter()
                .map(|(id, r)| {
                    let (lo, hi) = r.lo_hi;
                    let (t, max) = r.threshold_max;
                    (*id, (lo, hi, t, max))
                })
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.values().all(|r| r.d == 0)
    }
}

/// `(input, row id)` of every input but the base.
fn task_inputs(ids: &[usize], base: usize) -> Vec<(usize, usize)> {
    ids.iter()
        .enumerate()
        .filter(|(i, _)| *i != base)
        .map(|(i, id)| (i, *id))
        .collect()
}

/// Σᵢ τᵢ over the task inputs, in their order.
fn task_sum(tasks: &[(usize, usize)], base: usize, inputs: &[&[f32]], sum: &mut [f32]) {
    sum.fill(0.0);
    for &(input, _) in tasks {
        for ((s, x), b) in sum.iter_mut().zip(inputs[input]).zip(inputs[base]) {
            *s += x - b;
        }
    }
}

/// βᵢ of one task over a block: intra- times inter-balancing, from its inputs `x`, the base
/// `b`, the task sum and its clip range [lo, hi]; `n` is the number of tasks.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn scores(x: &[f32], b: &[f32], sum: &[f32], lo: f32, hi: f32, n: f32, out: &mut [f32]) {
    let hi = hi.max(lo);
    let range = hi - lo;
    for (((o, x), b), s) in out.iter_mut().zip(x).zip(b).zip(sum) {
        let tau = x - b;
        let norm = if range > 0.0 {
            (tau.abs().clamp(lo, hi) - lo) / range
        } else {
            0.0
        };
        *o = math::exp(n * norm * norm) * math::tanh(tau * s);
    }
}

/// Writes the merged block from the balance.
fn merge_block(
    balance: &Balance,
    settings: &Settings,
    ids: &[usize],
    base: usize,
    inputs: &[&[f32]],
    out: &mut [f32],
) {
    let tasks = task_inputs(ids, base);
    let n = tasks.len() as f32;
    let len = out.len();
    crate::kernels::with_scratch(len, |sum| {
        crate::kernels::with_scratch(len, |beta| {
            crate::kernels::with_scratch(len, |total| {
                task_sum(&tasks, base, inputs, sum);
                out.fill(0.0);
                total.fill(0.0);
                for &(input, id) in &tasks {
                    let (lo, hi, t, max) = balance.rows[&id];
                    scores(inputs[input], inputs[base], sum, lo, hi, n, beta);
                    accumulate(
                        inputs[input],
                        inputs[base],
                        beta,
                        (lo, hi, t, max),
                        out,
                        total,
                    );
                }
                let lambda = settings.lambda;
                for ((o, b), total) in out.iter_mut().zip(inputs[base]).zip(&*total) {
                    *o = b + lambda * *o / total.max(1e-12);
                }
            })
        })
    });
}

/// Adds one task's weight β̂ᵢ·τcᵢ to `mixed` and β̂ᵢ to `total`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn accumulate(
    x: &[f32],
    b: &[f32],
    beta: &[f32],
    (lo, hi, t, max): (f32, f32, f32, f32),
    mixed: &mut [f32],
    total: &mut [f32],
) {
    let hi = hi.max(lo);
    let elements = mixed
        .iter_mut()
        .zip(total.iter_mut())
        .zip(x.iter().zip(b).zip(beta));
    for ((m, total), ((x, b), beta)) in elements {
        let tau = x - b;
        let clipped = tau.abs().clamp(lo, hi).copysign(tau);
        let weight = if max > t {
            (beta.max(t) - t) / (max - t)
        } else {
            0.0
        };
        *m += weight * clipped;
        *total += weight;
    }
}

// ---- pcb: statistics over the whole model ----

struct ModelWide(Statistics);

impl ModelStatistics for ModelWide {
    fn wants_pass(&self, pass: usize) -> bool {
        pass < 4 && !self.0.is_empty()
    }

    fn fork(&self) -> Box<dyn ModelStatistics> {
        let rows = self
            .0
            .rows
            .iter()
            .map(|(id, r)| {
                let row = Row {
                    d: r.d,
                    clip: r.clip.empty_like(),
                    lo_hi: r.lo_hi,
                    score: r.score.empty_like(),
                    threshold_max: r.threshold_max,
                };
                (*id, row)
            })
            .collect();
        Box::new(ModelWide(Statistics {
            settings: self.0.settings,
            rows,
            current: self.0.current.clone(),
        }))
    }

    fn absorb(&mut self, part: Box<dyn ModelStatistics>) {
        let part = part.into_any().downcast::<ModelWide>().expect("forked");
        for (id, row) in &mut self.0.rows {
            row.clip.add(&part.0.rows[id].clip);
            row.score.add(&part.0.rows[id].score);
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn observe(&mut self, pass: usize, tensor: &TensorContext, _start: usize, inputs: &[&[f32]]) {
        if let Some(base) = tensor.base {
            self.0.observe(pass, tensor.models, base, inputs);
        }
    }

    fn end_pass(&mut self, pass: usize) -> Result<()> {
        self.0.end_pass(pass);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        Arc::new((self.0.current, self.0.settings))
    }
}

struct ModelWideMerger {
    balance: Arc<(Balance, Settings)>,
    ids: Vec<usize>,
    base: usize,
}

impl TensorMerger for ModelWideMerger {
    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let (balance, settings) = &*self.balance;
        merge_block(balance, settings, &self.ids, self.base, inputs, out);
    }
}

impl Method for Pcb {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn model_statistics(
        &self,
        tensors: &[TensorContext],
    ) -> Result<Option<Box<dyn ModelStatistics>>> {
        let Some(first) = tensors.first() else {
            return Ok(None);
        };
        let settings = Settings::of(first.params, first.name)?;
        let mut sizes = BTreeMap::new();
        for t in tensors {
            for (input, &model) in t.models.iter().enumerate() {
                if Some(input) != t.base {
                    *sizes.entry(model).or_insert(0) += t.numel as u64;
                }
            }
        }
        Ok(Some(Box::new(ModelWide(Statistics::new(settings, sizes)))))
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "pcb needs `base_model`"))?;
        let stats = ctx
            .model_stats
            .and_then(|s| s.downcast_ref::<(Balance, Settings)>())
            .ok_or_else(|| Error::tensor(ctx.name, "pcb needs its model-wide statistics"))?;
        Ok(Box::new(ModelWideMerger {
            balance: Arc::new(stats.clone()),
            ids: ctx.models.to_vec(),
            base,
        }))
    }
}

// ---- pcb_per_tensor: the same statistics within each tensor ----

struct PerTensorMerger {
    stats: Statistics,
    ids: Vec<usize>,
    base: usize,
}

impl Method for PcbPerTensor {
    fn spec(&self) -> &'static MethodSpec {
        &PER_TENSOR_SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "pcb_per_tensor needs `base_model`"))?;
        let settings = Settings::of(ctx.params, ctx.name)?;
        // Rows by input index: within one tensor the inputs are the models.
        let ids: Vec<usize> = (0..ctx.n_inputs).collect();
        let sizes = ids
            .iter()
            .filter(|&&i| i != base)
            .map(|&i| (i, ctx.numel as u64))
            .collect();
        Ok(Box::new(PerTensorMerger {
            stats: Statistics::new(settings, sizes),
            ids,
            base,
        }))
    }
}

impl TensorMerger for PerTensorMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass < 4
    }

    fn observe(&mut self, pass: usize, _start: usize, inputs: &[&[f32]]) {
        self.stats.observe(pass, &self.ids, self.base, inputs);
    }

    fn end_pass(&mut self, pass: usize) -> Result<()> {
        self.stats.end_pass(pass);
        Ok(())
    }

    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        merge_block(
            &self.stats.current,
            &self.stats.settings,
            &self.ids,
            self.base,
            inputs,
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// `PCB_merge` of the reference code over one flattened task-vector matrix, by sorting.
    fn reference(
        base: &[f32],
        models: &[Vec<f32>],
        ratio: f64,
        clip: f64,
        lambda: f32,
    ) -> Vec<f32> {
        let (n, d) = (models.len(), base.len());
        let taus: Vec<Vec<f32>> = models
            .iter()
            .map(|m| m.iter().zip(base).map(|(x, b)| x - b).collect())
            .collect();
        let sorted = |v: &[f32]| {
            let mut s = v.to_vec();
            s.sort_by(f32::total_cmp);
            s
        };
        let sum: Vec<f32> = (0..d).map(|j| taus.iter().map(|t| t[j]).sum()).collect();
        let mut clipped = Vec::new();
        let mut scales = Vec::new();
        for tau in &taus {
            let abs: Vec<f32> = tau.iter().map(|x| x.abs()).collect();
            let s = sorted(&abs);
            let (lo, hi) = (
                s[(d as f64 * clip) as usize],
                s[(d as f64 * (1.0 - clip)) as usize - 1],
            );
            let abs_c: Vec<f32> = abs.iter().map(|a| a.clamp(lo, hi)).collect();
            let beta: Vec<f32> = (0..d)
                .map(|j| {
                    let norm = (abs_c[j] - lo) / (hi - lo);
                    (n as f32 * norm * norm).exp() * (tau[j] * sum[j]).tanh()
                })
                .collect();
            let s = sorted(&beta);
            let (t, max) = (s[(d as f64 * (1.0 - ratio)) as usize], s[d - 1]);
            scales.push(
                beta.iter()
                    .map(|b| (b.max(t) - t) / (max - t))
                    .collect::<Vec<f32>>(),
            );
            clipped.push(
                tau.iter()
                    .zip(&abs_c)
                    .map(|(x, a)| x.signum() * a)
                    .collect::<Vec<f32>>(),
            );
        }
        (0..d)
            .map(|j| {
                let total: f32 = scales.iter().map(|s| s[j]).sum();
                let mixed: f32 = scales.iter().zip(&clipped).map(|(s, c)| s[j] * c[j]).sum();
                base[j] + lambda * mixed / total.max(1e-12)
            })
            .collect()
    }

    #[test]
    fn both_variants_match_the_reference_on_one_tensor() {
        let d = 20_000;
        let base = data(d, 1, 1.0);
        let models: Vec<Vec<f32>> = (2..5)
            .map(|s| {
                base.iter()
                    .zip(data(d, s, 0.01))
                    .map(|(b, x)| b + x)
                    .collect()
            })
            .collect();
        let mut inputs = vec![base.clone()];
        inputs.extend(models.iter().cloned());
        let p = params(
            &[
                ("pcb_ratio", Scalar::Number(0.2)),
                ("min_ratio", Scalar::Number(0.001)),
                ("max_ratio", Scalar::Number(0.001)),
                ("lambda", Scalar::Number(1.5)),
            ],
            vec![vec![]; 4],
        );
        let want = reference(&base, &models, 0.2, 0.001, 1.5);
        for method in [&Pcb as &dyn Method, &PcbPerTensor] {
            let out = run(method, &inputs, Some(0), p.clone(), 0);
            let mut far = 0;
            for (i, (o, w)) in out.iter().zip(&want).enumerate() {
                // exp/tanh in another order can move a score across the drop threshold.
                if (o - w).abs() > 1e-5 {
                    far += 1;
                    assert!(far <= 3, "{} [{i}]: {o} vs {w}", method.spec().name);
                }
            }
            let kept = out.iter().zip(&base).filter(|(o, b)| o != b).count() as f64 / d as f64;
            assert!(kept > 0.2 && kept < 0.8, "{kept}");
        }
    }
}
