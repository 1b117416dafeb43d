//! Numeric kernels, apart from any I/O: conversions between stored dtypes and f32, exact
//! magnitude selection, and reductions whose result does not depend on how work is split.

pub mod convert;
pub mod finite;
pub mod gram;
pub mod low_rank;
pub mod magprune;
pub mod math;
pub mod quantile;
pub mod rows;
pub mod select;
pub mod svd;
pub mod task_vectors;

/// The unit of work every method sees. Executors always hand methods whole blocks (the last one
/// of a tensor may be shorter), so any reduction a method accumulates block by block gives the
/// same bits whatever the chunking, memory budget or thread count.
pub const BLOCK: usize = 4096;

/// Σ x·y over a block in f64, accumulated in 8 fixed lanes (element i into lane i mod 8, lanes
/// summed at the end), so it vectorises and gives the same bits for the same block.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn dot_f64(x: &[f32], y: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    for (a, b) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += a[l] as f64 * b[l] as f64;
        }
    }
    let tail = x.len() / 8 * 8;
    for i in tail..x.len().min(y.len()) {
        lanes[i - tail] += x[i] as f64 * y[i] as f64;
    }
    lanes.iter().sum()
}

/// [x·x, y·y, x·y] in one read of the block: the same lanes and order as three `dot_f64` calls
/// (so the same bits), with three independent chains of additions instead of one at a time.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub fn dot3_f64(x: &[f32], y: &[f32]) -> [f64; 3] {
    let mut lanes = [[0f64; 8]; 3];
    for (a, b) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
        for l in 0..8 {
            let (a, b) = (a[l] as f64, b[l] as f64);
            lanes[0][l] += a * a;
            lanes[1][l] += b * b;
            lanes[2][l] += a * b;
        }
    }
    let tail = x.len() / 8 * 8;
    for i in tail..x.len().min(y.len()) {
        let (a, b) = (x[i] as f64, y[i] as f64);
        lanes[0][i - tail] += a * a;
        lanes[1][i - tail] += b * b;
        lanes[2][i - tail] += a * b;
    }
    lanes.map(|l| l.iter().sum())
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a per-thread f32 buffer of `len` values, reused across calls (a stack of them, so
/// calls nest). The contents are stale: `f` must write before it reads. Per-block buffers were
/// a measurable share of the merge time when allocated and zeroed afresh.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    let result = f(&mut buffer[..len]);
    SCRATCH.with(|s| s.borrow_mut().push(buffer));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_plain_sum() {
        let x: Vec<f32> = (0..1001).map(|i| (i as f32).sin()).collect();
        let y: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.3).cos()).collect();
        let plain: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((dot_f64(&x, &y) - plain).abs() < 1e-9);
        assert_eq!(dot_f64(&[], &[]), 0.0);
    }

    #[test]
    fn dot3_has_the_bits_of_three_dots() {
        for len in [0, 5, 8, 1001, 4096] {
            let x: Vec<f32> = (0..len).map(|i| (i as f32).sin() * 1e3).collect();
            let y: Vec<f32> = (0..len).map(|i| (i as f32 * 0.3).cos() * 1e-3).collect();
            let want = [dot_f64(&x, &x), dot_f64(&y, &y), dot_f64(&x, &y)];
            assert_eq!(
                dot3_f64(&x, &y).map(f64::to_bits),
                want.map(f64::to_bits),
                "{len}"
            );
        }
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
