//! Numeric kernels, apart from any I/O: conversions between stored dtypes and f32, exact
//! magnitude selection, and reductions whose result does not depend on how work is split.

pub mod convert;
pub mod select;
pub mod task_vectors;

/// The unit of work every method sees. Executors always hand methods whole blocks (the last one
/// of a tensor may be shorter), so any reduction a method accumulates block by block gives the
/// same bits whatever the chunking, memory budget or thread count.
pub const BLOCK: usize = 4096;

/// Sum of `f(i)` over a block in f64, with a fixed 8-lane pattern so it vectorises and is
/// reproducible.
#[inline]
pub fn block_sum(len: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let full = len / 8 * 8;
    for i in (0..full).step_by(8) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(i + l);
        }
    }
    for i in full..len {
        lanes[i - full] += f(i);
    }
    lanes.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sum_matches_plain_sum() {
        let x: Vec<f64> = (0..1001).map(|i| (i as f64).sin()).collect();
        let plain: f64 = x.iter().sum();
        assert!((block_sum(x.len(), |i| x[i]) - plain).abs() < 1e-9);
        assert_eq!(block_sum(0, |_| 1.0), 0.0);
    }
}

/// out[i] = fma(x[i], w, out[i]). Fused like torch's `addcmul_`, which mergekit's linear uses, so
/// results agree to the bit; compiled with FMA where the CPU has it (the fallback is exact too).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma", "x86_64+avx2+fma"))]
pub fn fused_axpy(out: &mut [f32], x: &[f32], w: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v.mul_add(w, *o);
    }
}
