//! Geometry of vectors that are linear combinations of a few tensors: with the tensors' Gram
//! matrix (one streaming pass), dot products and norms of any combination need no tensor data.
//! The spherical merges (karcher, multislerp) run their whole iteration this way.

use super::dot_f64;

/// Adds the block's contribution to the n × n Gram matrix of `vectors` (f64, row-major).
pub fn accumulate(vectors: &[&[f32]], gram: &mut [f64]) {
    let n = vectors.len();
    for i in 0..n {
        for j in i..n {
            let dot = dot_f64(vectors[i], vectors[j]);
            gram[i * n + j] += dot;
            if i != j {
                gram[j * n + i] += dot;
            }
        }
    }
}

/// Coefficient vectors over n tensors, measured through their Gram matrix.
pub struct Span<'a> {
    pub n: usize,
    pub gram: &'a [f64],
}

impl Span<'_> {
    pub fn dot(&self, a: &[f64], b: &[f64]) -> f64 {
        (0..self.n)
            .map(|i| {
                a[i] * (0..self.n)
                    .map(|j| b[j] * self.gram[i * self.n + j])
                    .sum::<f64>()
            })
            .sum()
    }

    pub fn norm(&self, a: &[f64]) -> f64 {
        self.dot(a, a).max(0.0).sqrt()
    }

    /// ‖tensor i‖.
    pub fn norm_of(&self, i: usize) -> f64 {
        self.gram[i * self.n + i].max(0.0).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_measure_like_dense_vectors() {
        let a = [1.0f32, 2.0, 3.0, -1.0];
        let b = [0.5f32, -1.0, 2.0, 4.0];
        let mut gram = vec![0.0; 4];
        accumulate(&[&a[..2], &b[..2]], &mut gram);
        accumulate(&[&a[2..], &b[2..]], &mut gram);
        let span = Span { n: 2, gram: &gram };
        let c = [2.0, -0.5];
        let dense: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| 2.0 * *x as f64 - 0.5 * *y as f64)
            .collect();
        assert!((span.norm(&c) - dense.iter().map(|v| v * v).sum::<f64>().sqrt()).abs() < 1e-12);
        assert!((span.norm_of(1) - 21.25f64.sqrt()).abs() < 1e-12);
    }
}
