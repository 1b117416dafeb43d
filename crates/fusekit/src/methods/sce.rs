//! `sce`: Select, Calculate, Erase — FuseChat 2.0's merge (Wan et al., arXiv:2408.07990), as in
//! mergekit.
//!
//! With task vectors τᵢ = xᵢ − base (n elements, M models):
//! 1. Select (when `select_topk` < 1): keep the k = ⌊select_topk · #{j: var_j ≠ 0}⌋ elements with
//!    the largest variance across models (population variance), zero τ elsewhere in every model.
//! 2. Calculate: wᵢ = mean(τᵢ²) / Σₘ mean(τₘ²) (uniform 1/M when that sum is below 1e-6).
//! 3. Erase: keep τᵢ where its sign matches sign(Σₘ τₘ) (a zero sum counts as +; zeros never).
//!
//! out = base + Σᵢ wᵢ·keptᵢ·τᵢ / max(Σᵢ wᵢ·keptᵢ, 1e-6).
//!
//! Statistics passes: the nonzero-variance count and the exact top-k of the variance (only when
//! selecting), then the weights. Ties in variance are broken by index.

use super::*;
use crate::error::Error;
use crate::kernels::dot_f64;
use crate::kernels::select::{magnitude_bits, Keep, TopK};

pub struct Sce;

static SPEC: MethodSpec = MethodSpec {
    name: "sce",
    summary: "select high-variance elements, weight models by energy, erase minority signs",
    reference: "https://arxiv.org/abs/2408.07990",
    params: &[
        ParamSpec {
            name: "select_topk",
            scope: Scope::Global,
            ty: ParamType::Fraction,
            default: Some(Default::Float(1.0)),
            doc: "fraction of the varying elements kept",
        },
        super::gta::INT8_MASK,
    ],
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

enum Stage {
    CountVarying,
    Select(Box<TopK>),
    Weigh,
    Ready,
}

struct SceMerger {
    base: usize,
    models: Vec<usize>,
    numel: usize,
    select: f64,
    stage: Stage,
    varying: usize,
    keep: Keep,
    energy: Vec<f64>,
    weights: Vec<f32>,
    memory: usize,
}

impl Method for Sce {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "sce needs `base_model`"))?;
        let models: Vec<usize> = (0..ctx.n_inputs).filter(|&i| i != base).collect();
        let select = ctx.params.float("select_topk").unwrap_or(1.0);
        let (stage, keep) = match select {
            s if s >= 1.0 => (Stage::Weigh, Keep::ALL),
            s if s <= 0.0 => (Stage::Weigh, Keep::NONE),
            _ => (Stage::CountVarying, Keep::ALL),
        };
        let n = models.len();
        Ok(Box::new(SceMerger {
            base,
            models,
            numel: ctx.numel,
            select,
            stage,
            varying: 0,
            keep,
            energy: vec![0.0; n],
            weights: vec![0.0; n],
            memory: ctx.memory,
        }))
    }
}

impl SceMerger {
    /// Task vectors of one block, model-major, and the variance across models per element.
    fn deltas(&self, inputs: &[&[f32]], deltas: &mut Vec<f32>, variance: &mut Vec<f32>) {
        let base = inputs[self.base];
        let n = base.len();
        deltas.clear();
        for &m in &self.models {
            deltas.extend(inputs[m].iter().zip(base).map(|(x, b)| x - b));
        }
        let count = self.models.len() as f32;
        variance.clear();
        variance.extend((0..n).map(|j| {
            let mean = (0..self.models.len())
                .map(|i| deltas[i * n + j])
                .sum::<f32>()
                / count;
            (0..self.models.len())
                .map(|i| (deltas[i * n + j] - mean).powi(2))
                .sum::<f32>()
                / count
        }));
    }

    /// Zeroes the task vectors where the variance selection drops the element.
    fn select(&self, start: usize, deltas: &mut [f32], variance: &[f32]) {
        let n = variance.len();
        for (j, &v) in variance.iter().enumerate() {
            if !self.keep.keeps(start + j, magnitude_bits(v)) {
                (0..self.models.len()).for_each(|i| deltas[i * n + j] = 0.0);
            }
        }
    }
}

impl TensorMerger for SceMerger {
    fn wants_pass(&self, _pass: usize) -> bool {
        !matches!(self.stage, Stage::Ready)
    }

    fn wants_block(&self, _pass: usize, start: usize) -> bool {
        match &self.stage {
            Stage::Select(search) => search.wants_block(start),
            _ => true,
        }
    }

    fn observe(&mut self, _pass: usize, start: usize, inputs: &[&[f32]]) {
        let (mut deltas, mut variance) = (Vec::new(), Vec::new());
        self.deltas(inputs, &mut deltas, &mut variance);
        match &mut self.stage {
            Stage::CountVarying => self.varying += variance.iter().filter(|v| **v != 0.0).count(),
            Stage::Select(search) => search.observe(start, &variance, &vec![0.0; variance.len()]),
            Stage::Weigh => {
                self.select(start, &mut deltas, &variance);
                let n = variance.len();
                for (i, e) in self.energy.iter_mut().enumerate() {
                    let d = &deltas[i * n..(i + 1) * n];
                    *e += dot_f64(d, d);
                }
            }
            Stage::Ready => {}
        }
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        self.stage = match std::mem::replace(&mut self.stage, Stage::Ready) {
            Stage::CountVarying => {
                let k = (self.varying as f64 * self.select) as usize;
                let search = Box::new(TopK::new(k, self.numel).with_memory(self.memory));
                match search.result() {
                    Some(keep) => {
                        self.keep = keep;
                        Stage::Weigh
                    }
                    None => Stage::Select(search),
                }
            }
            Stage::Select(mut search) => {
                search.end_pass();
                match search.result() {
                    Some(keep) => {
                        self.keep = keep;
                        Stage::Weigh
                    }
                    None => Stage::Select(search),
                }
            }
            Stage::Weigh => {
                let means: Vec<f64> = self
                    .energy
                    .iter()
                    .map(|e| e / self.numel.max(1) as f64)
                    .collect();
                let total: f64 = means.iter().sum();
                let m = means.len() as f64;
                self.weights = means.iter().map(|&x| if total.abs() < 1e-6 { 1.0 / m } else { x / total } as f32).collect();
                Stage::Ready
            }
            Stage::Ready => Stage::Ready,
        };
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let (mut deltas, mut variance) = (Vec::new(), Vec::new());
        self.deltas(inputs, &mut deltas, &mut variance);
        self.select(start, &mut deltas, &variance);
        let base = inputs[self.base];
        let n = base.len();
        for (j, o) in out.iter_mut().enumerate() {
            let sum: f32 = (0..self.models.len()).map(|i| deltas[i * n + j]).sum();
            let (mut merged, mut divisor) = (0f32, 0f32);
            for (i, &w) in self.weights.iter().enumerate() {
                let d = deltas[i * n + j];
                if (d > 0.0 && sum >= 0.0) || (d < 0.0 && sum < 0.0) {
                    merged += d * w;
                    divisor += w;
                }
            }
            *o = base[j] + merged / divisor.max(1e-6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// SCE written out densely with a full sort for the selection.
    fn reference(x: &[Vec<f32>], select: f64) -> Vec<f32> {
        let (base, fts) = (&x[0], &x[1..]);
        let n = base.len();
        let m = fts.len() as f32;
        let mut taus: Vec<Vec<f32>> = fts
            .iter()
            .map(|f| f.iter().zip(base).map(|(a, b)| a - b).collect())
            .collect();
        let var: Vec<f32> = (0..n)
            .map(|j| {
                let mean = taus.iter().map(|t| t[j]).sum::<f32>() / m;
                taus.iter().map(|t| (t[j] - mean).powi(2)).sum::<f32>() / m
            })
            .collect();
        if select < 1.0 {
            let k = (var.iter().filter(|v| **v != 0.0).count() as f64 * select) as usize;
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
            let mut keep = vec![false; n];
            order[..k].iter().for_each(|&i| keep[i] = true);
            taus.iter_mut().for_each(|t| {
                t.iter_mut().zip(&keep).for_each(|(v, k)| {
                    if !k {
                        *v = 0.0
                    }
                })
            });
        }
        let means: Vec<f64> = taus
            .iter()
            .map(|t| t.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64)
            .collect();
        let total: f64 = means.iter().sum();
        let w: Vec<f32> = means.iter().map(|x| (x / total) as f32).collect();
        (0..n)
            .map(|j| {
                let sum: f32 = taus.iter().map(|t| t[j]).sum();
                let (mut num, mut den) = (0f32, 0f32);
                for (t, w) in taus.iter().zip(&w) {
                    if t[j] != 0.0 && (t[j] > 0.0) == (sum >= 0.0) {
                        num += t[j] * w;
                        den += w;
                    }
                }
                base[j] + num / den.max(1e-6)
            })
            .collect()
    }

    #[test]
    fn matches_dense_reference() {
        for (n, select) in [(3000, 1.0), (3000, 0.3), (50 * 4096 + 9, 0.1)] {
            let base = data(n, 1, 1.0);
            let mut x = vec![base.clone()];
            x.extend((2..5).map(|s| {
                base.iter()
                    .zip(data(n, s, 0.01))
                    .map(|(b, d)| b + d)
                    .collect::<Vec<f32>>()
            }));
            let out = run(
                &Sce,
                &x,
                Some(0),
                params(&[("select_topk", Scalar::Number(select))], vec![vec![]; 4]),
                0,
            );
            let expected = reference(&x, select);
            for j in 0..n {
                assert!(
                    (out[j] - expected[j]).abs() < 1e-6,
                    "n={n} select={select} j={j}: {} vs {}",
                    out[j],
                    expected[j]
                );
            }
        }
    }
}
