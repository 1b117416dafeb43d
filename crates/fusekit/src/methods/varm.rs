//! `varm`: FuseChat's variation-ratio merge (Wan et al., "FuseChat", arXiv:2402.16107, §merge;
//! reference code fanqiwan/FuseAI).
//!
//! Per tensor, with task vectors Δₖ = θₖ − θ_base:
//! wₖ = mean(Δₖ²) / Σⱼ mean(Δⱼ²),   θ = θ_base + Σₖ wₖ·Δₖ
//! (= Σₖ wₖ·θₖ, the weights summing to 1). Where every Δ is zero the weights are uniform (the
//! result is the base either way). The squares are summed in f64 in one statistics pass.
//! Use it to fuse models whose changes differ in size per matrix: each matrix follows the model
//! that changed it most.

use super::*;
use crate::error::Error;
use crate::kernels::dot_f64;

pub struct Varm;

static SPEC: MethodSpec = MethodSpec {
    name: "varm",
    summary: "weight each model per matrix by its share of the squared change",
    reference: "https://arxiv.org/abs/2402.16107",
    params: &[],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: None,
};

struct VarmMerger {
    base: usize,
    models: Vec<usize>,
    /// Σ Δₖ² per model, then the weights.
    energy: Vec<f64>,
    weights: Vec<f32>,
}

impl Method for Varm {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "varm needs `base_model`"))?;
        let models: Vec<usize> = (0..ctx.n_inputs).filter(|&i| i != base).collect();
        Ok(Box::new(VarmMerger {
            base,
            energy: vec![0.0; models.len()],
            weights: Vec::new(),
            models,
        }))
    }
}

impl TensorMerger for VarmMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0
    }

    fn observe(&mut self, _pass: usize, _start: usize, inputs: &[&[f32]]) {
        let base = inputs[self.base];
        crate::kernels::with_scratch(base.len(), |delta| {
            for (e, &m) in self.energy.iter_mut().zip(&self.models) {
                delta
                    .iter_mut()
                    .zip(inputs[m].iter().zip(base))
                    .for_each(|(d, (x, b))| *d = x - b);
                *e += dot_f64(delta, delta);
            }
        });
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        let total: f64 = self.energy.iter().sum();
        let k = self.energy.len() as f64;
        self.weights = self
            .energy
            .iter()
            .map(|e| if total > 0.0 { e / total } else { 1.0 / k } as f32)
            .collect();
        Ok(())
    }

    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let base = inputs[self.base];
        out.fill(0.0);
        for (&w, &m) in self.weights.iter().zip(&self.models) {
            out.iter_mut()
                .zip(inputs[m].iter().zip(base))
                .for_each(|(o, (x, b))| *o += w * (x - b));
        }
        out.iter_mut().zip(base).for_each(|(o, b)| *o += b);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn weights_follow_the_squared_change() {
        let n = 9000;
        let base = data(n, 1, 1.0);
        let scales = [0.01f32, 0.03, 0.02];
        let models: Vec<Vec<f32>> = scales
            .iter()
            .enumerate()
            .map(|(i, s)| {
                base.iter()
                    .zip(data(n, 10 + i as u64, *s))
                    .map(|(b, d)| b + d)
                    .collect()
            })
            .collect();
        let mut inputs = vec![base.clone()];
        inputs.extend(models.iter().cloned());
        let out = run(&Varm, &inputs, Some(0), params(&[], vec![vec![]; 4]), 0);
        // The plain formula, in f64.
        let energy: Vec<f64> = models
            .iter()
            .map(|m| {
                m.iter()
                    .zip(&base)
                    .map(|(x, b)| ((x - b) as f64).powi(2))
                    .sum::<f64>()
                    / n as f64
            })
            .collect();
        let total: f64 = energy.iter().sum();
        for i in 0..n {
            let want = base[i] as f64
                + models
                    .iter()
                    .zip(&energy)
                    .map(|(m, e)| e / total * (m[i] - base[i]) as f64)
                    .sum::<f64>();
            assert!((out[i] as f64 - want).abs() < 1e-6, "{i}");
        }
        assert!(energy[1] > energy[2] && energy[2] > energy[0]);
    }
}
