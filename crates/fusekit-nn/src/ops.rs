//! Differentiable building blocks. Each is written with candle's elementary operations, all of
//! which have a backward pass (candle's fused `softmax_last_dim`, `rms_norm` and `layer_norm`
//! kernels do not).

use crate::Result;
use candle_core::{Tensor, D};

/// `x · wᵀ + b` over the last dimension of `x` (any leading dimensions), `w` as stored by
/// PyTorch: `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Layer normalisation over the last dimension: `(x − mean) / √(var + eps) · γ + β`, with the
/// biased variance, as PyTorch.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// RMS normalisation over the last dimension: `x / √(mean(x²) + eps) · γ` (Llama).
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?
        .broadcast_mul(gamma)?)
}

/// Softmax over the last dimension, shifted by the (constant, detached) row maximum so large
/// logits do not overflow.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `log softmax` over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// `1 / (1 + e^(−x))`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Mean cross-entropy of `logits [n, classes]` against `labels [n]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &[f32], tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn building_blocks_match_their_formulas_and_pass_gradients() {
        let dev = Device::Cpu;
        let x = Var::new(&[[1.0f32, 2.0, 4.0], [-1.0, 0.0, 3.0]], &dev).unwrap();
        let s = softmax_last_dim(x.as_tensor()).unwrap();
        let row = [1.0f32, 2.0, 4.0].map(|v| (v - 4.0f32).exp());
        let sum: f32 = row.iter().sum();
        close(&s.get(0).unwrap(), &row.map(|v| v / sum), 1e-6);
        let ls = log_softmax_last_dim(x.as_tensor()).unwrap();
        close(&ls.get(0).unwrap(), &row.map(|v| (v / sum).ln()), 1e-6);

        let gamma = Var::new(&[1.0f32, 2.0, 0.5], &dev).unwrap();
        let beta = Var::new(&[0.0f32, 1.0, -1.0], &dev).unwrap();
        let ln = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5).unwrap();
        let m = 7.0f32 / 3.0;
        let var = [1.0f32, 2.0, 4.0]
            .iter()
            .map(|v| (v - m).powi(2))
            .sum::<f32>()
            / 3.0;
        let expect: Vec<f32> = [1.0f32, 2.0, 4.0]
            .iter()
            .zip([(1.0f32, 0.0f32), (2.0, 1.0), (0.5, -1.0)])
            .map(|(v, (g, b))| (v - m) / (var + 1e-5).sqrt() * g + b)
            .collect();
        close(&ln.get(0).unwrap(), &expect, 1e-5);
        let rms = rms_norm(x.as_tensor(), gamma.as_tensor(), 1e-6).unwrap();
        let r = ((1.0f32 + 4.0 + 16.0) / 3.0 + 1e-6).sqrt();
        close(&rms.get(0).unwrap(), &[1.0 / r, 4.0 / r, 2.0 / r], 1e-6);

        let labels = Tensor::new(&[2u32, 0], &dev).unwrap();
        let ce = cross_entropy(x.as_tensor(), &labels).unwrap();
        let l0 = -(row[2] / sum).ln();
        let row1 = [-1.0f32, 0.0, 3.0].map(|v| (v - 3.0f32).exp());
        let l1 = -(row1[0] / row1.iter().sum::<f32>()).ln();
        close(&ce, &[(l0 + l1) / 2.0], 1e-6);

        let loss = (ln.sqr().unwrap().sum_all().unwrap() + rms.sum_all().unwrap() + ce)
            .unwrap()
            .add(&s.sqr().unwrap().sum_all().unwrap())
            .unwrap();
        let grads = loss.backward().unwrap();
        for v in [&x, &gamma, &beta] {
            let g = grads.get(v.as_tensor()).expect("a gradient");
            let g = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(g > 0.0);
        }
    }
}
