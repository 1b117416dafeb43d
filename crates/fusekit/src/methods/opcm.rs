//! `opcm`: one step of OPCM, orthogonal-projection continual merging (Tang et al., "Merging
//! Models on the Fly Without Retraining", NeurIPS 2025, arXiv:2501.09522; FusionBench `opcm`).
//! `fusekit continual` runs it model after model (`continual.rs` keeps the state).
//!
//! Inputs: the base θ₀, the running merge θ⁽ᵗ⁻¹⁾ and the new model θₜ. With Δ = θ⁽ᵗ⁻¹⁾ − θ₀ and
//! τ = θₜ − θ₀, per linear weight (2-D, not an embedding): the thin SVD Δ = U·diag(σ)·Vᵀ (k
//! singular triplets), r = the first index where cumsum(σ)/Σσ exceeds α, and
//! τ' = τ − U_r·(U_rᵀ·τ·V_r)·V_rᵀ − Σ_{r≤i<k} (uᵢᵀ·τ·vᵢ)·uᵢ·vᵢᵀ,
//! which removes from τ every interaction inside Δ's dominant r-subspace and its component along
//! each remaining rank-1 direction of Δ — the reference's full-SVD projection (zero the diagonal
//! and the top-left r×r block of Uᵀ·τ·V) without its m×m and n×n matrices; a test proves them
//! equal. Where Δ = 0, τ' = τ. Other tensors: τ' = τ. Then U = λₜ₋₁·Δ + τ' and
//! θ⁽ᵗ⁾ = θ₀ + U/λₜ, where λₜ = ‖U‖/mean(‖τ₁‖ … ‖τₜ‖) over the whole model: the model-wide
//! statistics give ‖τₜ‖ and ‖U‖ (`OpcmNorms`), the continual driver turns them into λₜ.
//! Parameters: `alpha` (0.5), `previous_lambda` (λₜ₋₁), `lambda` (λₜ). Holds Δ and τ of one
//! matrix while it is merged.

use super::*;
use crate::error::Error;
use crate::kernels::svd::{product, svd_of};
use faer::{Mat, MatRef};
use std::sync::Arc;

pub struct Opcm;

static SPEC: MethodSpec = MethodSpec {
    name: "opcm",
    summary: "one continual step: project the new task vector off the merged one, rescale",
    reference: "https://arxiv.org/abs/2501.09522",
    params: &[
        ParamSpec {
            name: "alpha",
            scope: Scope::Global,
            ty: ParamType::Fraction,
            default: Some(Default::Float(0.5)),
            doc: "share of the merged task vector's singular-value mass that is protected",
        },
        ParamSpec {
            name: "previous_lambda",
            scope: Scope::Global,
            ty: ParamType::NonNegative,
            default: Some(Default::Float(1.0)),
            doc: "λ of the running merge",
        },
        ParamSpec {
            name: "lambda",
            scope: Scope::Global,
            ty: ParamType::Float,
            default: Some(Default::Float(1.0)),
            doc: "λ of the new merge (from the model-wide norms)",
        },
    ],
    base: BasePolicy::Required,
    min_inputs: 3,
    max_inputs: Some(3),
};

/// Whether a tensor is projected: a linear weight (2-D, not an embedding and not the output
/// head, which `methods.md` §15 classes apart from linear layers).
fn is_linear(ctx: &TensorContext) -> bool {
    ctx.shape.len() == 2
        && ![
            "embed",
            "wte",
            "wpe",
            "word_embeddings",
            "lm_head",
            "embed_out",
        ]
        .iter()
        .any(|e| ctx.name.contains(e))
}

/// τ' for one matrix: `delta` = Δ and `tau` = τ, both m×n.
pub fn project(delta: MatRef<'_, f32>, tau: MatRef<'_, f32>, alpha: f64) -> Option<Mat<f32>> {
    let d = svd_of(delta)?;
    let total: f64 = d.s.iter().map(|s| *s as f64).sum();
    let mut out = tau.to_owned();
    if total <= 0.0 {
        return Some(out);
    }
    let mut cumulative = 0.0;
    let r =
        d.s.iter()
            .position(|s| {
                cumulative += *s as f64;
                cumulative / total > alpha
            })
            .unwrap_or(d.s.len());
    let k = d.s.len();
    // U_r·(U_rᵀ·τ·V_r)·V_rᵀ
    if r > 0 {
        let (ur, vr) = (d.u.as_ref().subcols(0, r), d.v.as_ref().subcols(0, r));
        let inner = product(product(ur.transpose(), tau).as_ref(), vr);
        let removed = product(product(ur, inner.as_ref()).as_ref(), vr.transpose());
        out -= &removed;
    }
    // (uᵢᵀ·τ·vᵢ)·uᵢ·vᵢᵀ for r ≤ i < k, as two products: the coefficients are the diagonal of
    // U_restᵀ·τ·V_rest, and the sum is (U_rest scaled by them)·V_restᵀ.
    if r < k {
        let (rest_u, rest_v) = (
            d.u.as_ref().subcols(r, k - r),
            d.v.as_ref().subcols(r, k - r),
        );
        let projected = product(rest_u.transpose(), tau);
        let mut scaled = rest_u.to_owned();
        for i in 0..k - r {
            let coefficient: f32 = (0..rest_v.nrows())
                .map(|j| projected[(i, j)] * rest_v[(j, i)])
                .sum();
            for row in 0..scaled.nrows() {
                scaled[(row, i)] *= coefficient;
            }
        }
        out -= &product(scaled.as_ref(), rest_v.transpose());
    }
    Some(out)
}

/// Collects one matrix's Δ and τ from blocks, row-major.
struct MatrixPair {
    cols: usize,
    delta: Mat<f32>,
    tau: Mat<f32>,
}

impl MatrixPair {
    fn new(rows: usize, cols: usize) -> MatrixPair {
        MatrixPair {
            cols,
            delta: Mat::zeros(rows, cols),
            tau: Mat::zeros(rows, cols),
        }
    }

    fn observe(&mut self, start: usize, inputs: &[&[f32]]) {
        let [base, merged, new] = [inputs[0], inputs[1], inputs[2]];
        for j in 0..base.len() {
            let e = start + j;
            let at = (e / self.cols, e % self.cols);
            self.delta[at] = merged[j] - base[j];
            self.tau[at] = new[j] - base[j];
        }
    }

    /// U = λₜ₋₁·Δ + τ'.
    fn update(&self, previous_lambda: f32, alpha: f64, name: &str) -> Result<Mat<f32>> {
        let mut projected =
            project(self.delta.as_ref(), self.tau.as_ref(), alpha).ok_or_else(|| {
                Error::tensor(name, "the SVD of the merged task vector did not converge")
            })?;
        for row in 0..projected.nrows() {
            for col in 0..projected.ncols() {
                projected[(row, col)] += previous_lambda * self.delta[(row, col)];
            }
        }
        Ok(projected)
    }
}

/// The inputs in (base, merged, new) order.
fn ordered<'a>(base: usize, inputs: &[&'a [f32]]) -> [&'a [f32]; 3] {
    let others: Vec<usize> = (0..3).filter(|&i| i != base).collect();
    [inputs[base], inputs[others[0]], inputs[others[1]]]
}

struct Settings {
    alpha: f64,
    previous_lambda: f32,
    lambda: f32,
}

fn settings(ctx: &TensorContext) -> Settings {
    Settings {
        alpha: ctx.params.float("alpha").unwrap_or(0.5),
        previous_lambda: ctx.params.float("previous_lambda").unwrap_or(1.0) as f32,
        lambda: ctx.params.float("lambda").unwrap_or(1.0) as f32,
    }
}

/// ‖τₜ‖² and ‖U‖² over the whole model.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpcmNorms {
    pub tau_squared: f64,
    pub update_squared: f64,
}

struct NormStatistics {
    norms: OpcmNorms,
    /// The matrix being collected, with its tensor name.
    pending: Option<(String, MatrixPair)>,
}

impl ModelStatistics for NormStatistics {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0
    }

    fn fork(&self) -> Box<dyn ModelStatistics> {
        Box::new(NormStatistics {
            norms: OpcmNorms::default(),
            pending: None,
        })
    }

    fn absorb(&mut self, part: Box<dyn ModelStatistics>) {
        let part = part
            .into_any()
            .downcast::<NormStatistics>()
            .expect("forked");
        self.norms.tau_squared += part.norms.tau_squared;
        self.norms.update_squared += part.norms.update_squared;
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn observe(&mut self, _pass: usize, ctx: &TensorContext, start: usize, inputs: &[&[f32]]) {
        let [base, merged, new] = ordered(ctx.base.unwrap_or(0), inputs);
        let s = settings(ctx);
        for j in 0..base.len() {
            self.norms.tau_squared += ((new[j] - base[j]) as f64).powi(2);
        }
        if !is_linear(ctx) {
            for j in 0..base.len() {
                let u = s.previous_lambda * (merged[j] - base[j]) + (new[j] - base[j]);
                self.norms.update_squared += (u as f64).powi(2);
            }
            return;
        }
        let pair = &mut self
            .pending
            .get_or_insert_with(|| {
                (
                    ctx.name.to_string(),
                    MatrixPair::new(ctx.shape[0], ctx.shape[1]),
                )
            })
            .1;
        pair.observe(start, &[base, merged, new]);
        if start + base.len() == ctx.numel {
            let (name, pair) = self.pending.take().expect("collecting");
            // A failed SVD surfaces again, with its tensor, when the merge runs.
            if let Ok(update) = pair.update(s.previous_lambda, s.alpha, &name) {
                self.norms.update_squared += update.squared_norm_l2() as f64;
            }
        }
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        Arc::new(self.norms)
    }
}

struct OpcmMerger {
    settings: Settings,
    /// A linear weight's Δ and τ while they stream in, then U = λₜ₋₁·Δ + τ' and its width.
    linear: Option<MatrixPair>,
    update: Option<(Mat<f32>, usize)>,
    name: String,
    base: usize,
}

impl Method for Opcm {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn model_statistics(
        &self,
        _tensors: &[TensorContext],
    ) -> Result<Option<Box<dyn ModelStatistics>>> {
        Ok(Some(Box::new(NormStatistics {
            norms: OpcmNorms::default(),
            pending: None,
        })))
    }

    /// Δ, τ, the projected update and the SVD's products and factors of a linear weight.
    fn held_bytes(&self, ctx: &TensorContext) -> usize {
        if is_linear(ctx) {
            crate::kernels::svd::held_bytes(ctx.shape[0], ctx.shape[1], 6)
        } else {
            0
        }
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let base = ctx
            .base
            .ok_or_else(|| Error::tensor(ctx.name, "opcm needs `base_model`"))?;
        let s = settings(ctx);
        if !(s.lambda.is_finite() && s.lambda > 0.0) {
            return Err(Error::tensor(
                ctx.name,
                format!("lambda {} must be positive", s.lambda),
            ));
        }
        Ok(Box::new(OpcmMerger {
            settings: s,
            linear: is_linear(ctx).then(|| MatrixPair::new(ctx.shape[0], ctx.shape[1])),
            update: None,
            name: ctx.name.to_string(),
            base,
        }))
    }
}

impl TensorMerger for OpcmMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0 && self.linear.is_some()
    }

    fn observe(&mut self, _pass: usize, start: usize, inputs: &[&[f32]]) {
        self.linear
            .as_mut()
            .expect("linear")
            .observe(start, &ordered(self.base, inputs));
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        let pair = self.linear.take().expect("linear");
        let update = pair.update(
            self.settings.previous_lambda,
            self.settings.alpha,
            &self.name,
        )?;
        self.update = Some((update, pair.cols));
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let [base, merged, new] = ordered(self.base, inputs);
        let s = &self.settings;
        match &self.update {
            Some((update, cols)) => {
                for (j, o) in out.iter_mut().enumerate() {
                    let e = start + j;
                    *o = base[j] + update[(e / cols, e % cols)] / s.lambda;
                }
            }
            None => {
                for (j, o) in out.iter_mut().enumerate() {
                    let u = s.previous_lambda * (merged[j] - base[j]) + (new[j] - base[j]);
                    *o = base[j] + u / s.lambda;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::svd::full_svd_of;

    /// The reference's projection: full SVD, Pm = Uᵀ·τ·V, zero its diagonal and its top-left
    /// r×r block, τ' = U·Pm·Vᵀ.
    fn full_svd_projection(delta: MatRef<'_, f32>, tau: MatRef<'_, f32>, alpha: f64) -> Mat<f32> {
        let (m, n) = delta.shape();
        let k = m.min(n);
        let d = full_svd_of(delta).unwrap();
        let (u, v) = (d.u, d.v);
        assert_eq!((u.ncols(), v.ncols()), (m, n));
        let sigma: Vec<f64> = d.s.iter().map(|x| *x as f64).collect();
        let total: f64 = sigma.iter().sum();
        let mut cumulative = 0.0;
        let r = sigma
            .iter()
            .position(|x| {
                cumulative += x;
                cumulative / total > alpha
            })
            .unwrap_or(k);
        let mut pm = product(product(u.as_ref().transpose(), tau).as_ref(), v.as_ref());
        for i in 0..k {
            pm[(i, i)] = 0.0;
        }
        for i in 0..r {
            for j in 0..r {
                pm[(i, j)] = 0.0;
            }
        }
        product(
            product(u.as_ref(), pm.as_ref()).as_ref(),
            v.as_ref().transpose(),
        )
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
        let key = crate::rng::stream_key(seed, "opcm", 0);
        Mat::from_fn(rows, cols, |i, j| {
            crate::rng::uniform(key, (i * cols + j) as u64) as f32 - 0.5
        })
    }

    #[test]
    fn thin_projection_equals_the_full_svd_one() {
        for (rows, cols, alpha) in [(12, 7, 0.5), (7, 12, 0.5), (9, 9, 0.2), (10, 6, 0.95)] {
            let (delta, tau) = (random(rows, cols, 1), random(rows, cols, 2));
            let thin = project(delta.as_ref(), tau.as_ref(), alpha).unwrap();
            let full = full_svd_projection(delta.as_ref(), tau.as_ref(), alpha);
            for i in 0..rows {
                for j in 0..cols {
                    assert!(
                        (thin[(i, j)] - full[(i, j)]).abs() < 1e-5,
                        "{rows}×{cols} α={alpha} [{i},{j}]: {} vs {}",
                        thin[(i, j)],
                        full[(i, j)]
                    );
                }
            }
        }
        // Δ = 0: nothing to protect.
        let tau = random(5, 4, 3);
        let zero = Mat::<f32>::zeros(5, 4);
        assert_eq!(project(zero.as_ref(), tau.as_ref(), 0.5).unwrap(), tau);
    }
}
