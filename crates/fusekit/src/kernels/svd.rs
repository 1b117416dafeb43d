//! Thin singular value decomposition in f32 (faer), single-threaded so the result does not depend
//! on the thread count; callers parallelise over matrices instead.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors, SvdParams};
use faer::{Mat, MatRef, Par, Spec};

/// A = U·diag(S)·Vᵀ with U `rows × k`, V `cols × k`, k = min(rows, cols), S non-increasing
/// (U and V square for the full SVD).
#[derive(Debug)]
pub struct ThinSvd {
    pub u: Mat<f32>,
    pub s: Vec<f32>,
    pub v: Mat<f32>,
}

/// The thin SVD of a row-major `rows × cols` matrix; `None` if the iteration did not converge.
pub fn thin_svd(rows: usize, cols: usize, data: &[f32]) -> Option<ThinSvd> {
    svd_of(MatRef::from_row_major_slice(data, rows, cols))
}

/// The thin SVD of a matrix.
pub fn svd_of(a: MatRef<'_, f32>) -> Option<ThinSvd> {
    decompose(a, ComputeSvdVectors::Thin)
}

/// The full SVD (U m×m, V n×n): for checking thin formulations against the full one.
pub fn full_svd_of(a: MatRef<'_, f32>) -> Option<ThinSvd> {
    decompose(a, ComputeSvdVectors::Full)
}

fn decompose(a: MatRef<'_, f32>, vectors: ComputeSvdVectors) -> Option<ThinSvd> {
    let (rows, cols) = a.shape();
    let k = rows.min(cols);
    let (u_cols, v_cols) = match vectors {
        ComputeSvdVectors::Full => (rows, cols),
        _ => (k, k),
    };
    let mut u = Mat::<f32>::zeros(rows, u_cols);
    let mut v = Mat::<f32>::zeros(cols, v_cols);
    let mut s = Diag::<f32>::zeros(k);
    let params: Spec<SvdParams, f32> = Default::default();
    let par = Par::Seq;
    let mut buffer = MemBuffer::new(svd_scratch::<f32>(
        rows, cols, vectors, vectors, par, params,
    ));
    let stack = MemStack::new(&mut buffer);
    svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        stack,
        params,
    )
    .ok()?;
    let s = (0..k).map(|i| s[i]).collect();
    Some(ThinSvd { u, s, v })
}

/// a·b, single-threaded (the same bits whatever the thread count).
pub fn product(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    scaled_product(a, b, 1.0)
}

/// alpha·a·b, single-threaded.
pub fn scaled_product(a: MatRef<'_, f32>, b: MatRef<'_, f32>, alpha: f32) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), faer::Accum::Replace, a, b, alpha, Par::Seq);
    out
}

/// The nearest matrix with orthonormal columns (rows, if wide): U·Vᵀ of the thin SVD.
pub fn polar(a: MatRef<'_, f32>) -> Option<Mat<f32>> {
    let d = svd_of(a)?;
    Some(product(d.u.as_ref(), d.v.as_ref().transpose()))
}

/// Bytes an SVD-based merge of an `rows × cols` matrix holds: `matrices` whole f32 matrices of
/// that shape (inputs, products, the result), the thin factors U, V and faer's SVD workspace
/// (about four times the matrix for a rectangular one, seven for a square one).
pub fn held_bytes(rows: usize, cols: usize, matrices: usize) -> usize {
    let k = rows.min(cols);
    let params: Spec<SvdParams, f32> = Default::default();
    let scratch = svd_scratch::<f32>(
        rows,
        cols,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        Par::Seq,
        params,
    )
    .size_bytes();
    4 * (matrices * rows * cols + (rows + cols) * k) + scratch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstructs_the_matrix() {
        let (rows, cols) = (7, 5);
        let key = crate::rng::stream_key(1, "svd", 0);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| crate::rng::uniform(key, i as u64) as f32 - 0.5)
            .collect();
        let d = thin_svd(rows, cols, &data).unwrap();
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]) && d.s[4] >= 0.0);
        for i in 0..rows {
            for j in 0..cols {
                let x: f32 = (0..5).map(|k| d.u[(i, k)] * d.s[k] * d.v[(j, k)]).sum();
                assert!((x - data[i * cols + j]).abs() < 1e-5);
            }
        }
    }
}
