//! `slerp`: spherical linear interpolation between the base and one other model (Shoemake 1985;
//! as in mergekit).
//!
//! With a = base, b = other, both flattened: â = a/‖a‖, b̂ = b/‖b‖ (norms ≤ 1e-8 are taken as 1),
//! d = clamp(â·b̂, −1, 1). If |d| > 0.9995 the result is the lerp (1−t)a + tb; otherwise
//! θ = acos d and out = sin((1−t)θ)/sinθ · a + sin(tθ)/sinθ · b, on the un-normalised tensors.
//! `t = 0` gives the base. Norms and the dot product are accumulated in f64, one statistics pass.

use super::*;
use crate::error::Error;
use crate::kernels::dot3_f64;

pub struct Slerp;

static SPEC: MethodSpec = MethodSpec {
    name: "slerp",
    summary: "spherical interpolation between the base and one model",
    reference: "https://en.wikipedia.org/wiki/Slerp",
    params: &[ParamSpec {
        name: "t",
        scope: Scope::Global,
        ty: ParamType::Float,
        default: None,
        doc: "interpolation factor; 0 is the base",
    }],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: Some(2),
};

const DOT_THRESHOLD: f64 = 0.9995;
const NORM_EPS: f64 = 1e-8;

struct SlerpMerger {
    base: usize,
    t: f64,
    /// ‖a‖², ‖b‖², a·b
    sums: [f64; 3],
    coefficients: [f32; 2],
}

impl Method for Slerp {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "slerp needs `base_model`"))?;
        let t = ctx
            .params
            .float("t")
            .ok_or_else(|| Error::tensor(ctx.name, "slerp needs `t`"))?;
        Ok(Box::new(SlerpMerger {
            base,
            t,
            sums: [0.0; 3],
            coefficients: [0.0; 2],
        }))
    }
}

/// The two interpolation coefficients from ‖a‖, ‖b‖ and a·b.
pub fn coefficients(t: f64, norm_a: f64, norm_b: f64, dot: f64) -> [f64; 2] {
    let na = if norm_a > NORM_EPS { norm_a } else { 1.0 };
    let nb = if norm_b > NORM_EPS { norm_b } else { 1.0 };
    let d = (dot / (na * nb)).clamp(-1.0, 1.0);
    if d.abs() > DOT_THRESHOLD {
        return [1.0 - t, t];
    }
    let theta = d.acos();
    let s = theta.sin();
    [((1.0 - t) * theta).sin() / s, (t * theta).sin() / s]
}

impl TensorMerger for SlerpMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0
    }

    fn observe(&mut self, _pass: usize, _start: usize, inputs: &[&[f32]]) {
        let (a, b) = (inputs[self.base], inputs[1 - self.base]);
        let [aa, bb, ab] = dot3_f64(a, b);
        self.sums[0] += aa;
        self.sums[1] += bb;
        self.sums[2] += ab;
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        let [aa, bb, ab] = self.sums;
        let [ca, cb] = coefficients(self.t, aa.sqrt(), bb.sqrt(), ab);
        self.coefficients = [ca as f32, cb as f32];
        Ok(())
    }

    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let (a, b) = (inputs[self.base], inputs[1 - self.base]);
        let [ca, cb] = self.coefficients;
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = ca * x + cb * y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn matches_plain_slerp() {
        let a = data(10_000, 1, 1.0);
        let b = data(10_000, 2, 1.0);
        for t in [0.0, 0.3, 1.0] {
            let out = run(
                &Slerp,
                &[a.clone(), b.clone()],
                Some(0),
                params(&[("t", Scalar::Number(t))], vec![vec![], vec![]]),
                0,
            );
            let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nb = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let dot = a
                .iter()
                .zip(&b)
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum::<f64>()
                / (na * nb);
            let theta = dot.acos();
            for i in (0..10_000).step_by(97) {
                let e = ((1.0 - t) * theta).sin() / theta.sin() * a[i] as f64
                    + (t * theta).sin() / theta.sin() * b[i] as f64;
                assert!((out[i] as f64 - e).abs() < 1e-5, "t={t} i={i}");
            }
        }
    }

    #[test]
    fn nearly_parallel_falls_back_to_lerp_and_base_order_matters() {
        let a = data(5000, 1, 1.0);
        let b: Vec<f32> = a.iter().map(|x| x * 2.0).collect();
        let out = run(
            &Slerp,
            &[a.clone(), b.clone()],
            Some(0),
            params(&[("t", Scalar::Number(0.25))], vec![vec![], vec![]]),
            0,
        );
        for i in 0..5000 {
            assert!((out[i] - (0.75 * a[i] + 0.25 * b[i])).abs() < 1e-6);
        }
        // Base second: t = 0 still returns the base.
        let out = run(
            &Slerp,
            &[b.clone(), a.clone()],
            Some(1),
            params(&[("t", Scalar::Number(0.0))], vec![vec![], vec![]]),
            0,
        );
        assert_eq!(out, a);
        // Zero tensors do not divide by zero.
        assert!(coefficients(0.5, 0.0, 0.0, 0.0)
            .iter()
            .all(|c| c.is_finite()));
    }
}
