//! `nearswap`: move to the other model only where the two are already close (NearSwap,
//! alchemonaut, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; as in mergekit).
//!
//! With a = base and b = the other model, per element:
//! w = clamp(t / max(|a − b|, 1e-6), 0, 1), out = w·b + (1 − w)·a.
//! Where |a − b| ≤ t the element is swapped for b; farther apart, it moves only t towards b.

use super::*;
use crate::error::Error;

pub struct Nearswap;

static SPEC: MethodSpec = MethodSpec {
    name: "nearswap",
    summary: "swap in the other model's values where they are close to the base",
    reference: "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    params: &[ParamSpec {
        name: "t",
        scope: Scope::Global,
        ty: ParamType::NonNegative,
        default: None,
        doc: "distance under which values are swapped",
    }],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: Some(2),
};

/// Distances are floored here before dividing, as mergekit does.
const MIN_DISTANCE: f32 = 1e-6;

struct NearswapMerger {
    base: usize,
    t: f32,
}

impl Method for Nearswap {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "nearswap needs `base_model`"))?;
        let t = ctx
            .params
            .float("t")
            .ok_or_else(|| Error::tensor(ctx.name, "nearswap needs `t`"))?;
        Ok(Box::new(NearswapMerger { base, t: t as f32 }))
    }
}

impl TensorMerger for NearswapMerger {
    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let (a, b) = (inputs[self.base], inputs[1 - self.base]);
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            let w = (self.t / (x - y).abs().max(MIN_DISTANCE)).clamp(0.0, 1.0);
            *o = w * y + (1.0 - w) * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn swaps_close_values_and_nudges_far_ones() {
        let a = vec![0.0, 1.0, 2.0, 5.0, 3.0];
        let b = vec![0.05, 1.5, 2.0, -5.0, 3.0000001];
        let out = run(
            &Nearswap,
            &[a.clone(), b.clone()],
            Some(0),
            params(&[("t", Scalar::Number(0.1))], vec![vec![], vec![]]),
            0,
        );
        assert_eq!(out[0], 0.05, "within t: swapped");
        assert!(
            (out[1] - (1.0 + 0.1)).abs() < 1e-6,
            "farther: moves t towards b"
        );
        assert_eq!(out[2], 2.0, "equal values stay");
        assert!((out[3] - (5.0 - 0.1)).abs() < 1e-6);
        assert!(
            (out[4] - b[4]).abs() < 1e-6,
            "the 1e-6 floor keeps the weight finite"
        );
        let plain: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| {
                let w = (0.1f32 / (x - y).abs().max(1e-6)).clamp(0.0, 1.0);
                w * y + (1.0 - w) * x
            })
            .collect();
        assert_eq!(out, plain);
    }
}
