//! Adding a low-rank product to blocks of a row-major matrix: W[i, j] += s·⟨Pᵢ, Qⱼ⟩ with P and Q
//! stored row-major with `rank` columns. A LoRA update ΔW = s·B·A is P = B, Q = Aᵀ; a transposed
//! one (fan-in-fan-out layers, embeddings) is P = Aᵀ, Q = B.

/// The factors of a low-rank update of a `rows × cols` matrix.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub rank: usize,
    pub rows: usize,
    pub cols: usize,
    /// `rows × rank`.
    pub p: Vec<f32>,
    /// `cols × rank`.
    pub q: Vec<f32>,
    pub scale: f32,
}

impl LowRank {
    /// Adds the update to elements `first .. first + out.len()` of the flattened matrix.
    pub fn add_to(&self, first: usize, out: &mut [f32]) {
        let r = self.rank;
        let cols = self.cols.max(1);
        for (e, o) in (first..).zip(out.iter_mut()) {
            let (i, j) = (e / cols, e % cols);
            let (pi, qj) = (&self.p[i * r..(i + 1) * r], &self.q[j * r..(j + 1) * r]);
            let dot: f32 = pi.iter().zip(qj).map(|(a, b)| a * b).sum();
            *o += dot * self.scale;
        }
    }

    /// The dense update, row-major (tests and small matrices).
    pub fn dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.add_to(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_add_the_product() {
        // P 3×2, Q 4×2: W = 0.5·P·Qᵀ.
        let lr = LowRank {
            rank: 2,
            rows: 3,
            cols: 4,
            p: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            q: vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, -1.0],
            scale: 0.5,
        };
        let want: Vec<f32> = (0..12)
            .map(|e| {
                let (i, j) = (e / 4, e % 4);
                0.5 * (lr.p[2 * i] * lr.q[2 * j] + lr.p[2 * i + 1] * lr.q[2 * j + 1])
            })
            .collect();
        assert_eq!(lr.dense(), want);
        let mut part = vec![1.0f32; 5];
        lr.add_to(5, &mut part);
        for (k, v) in part.iter().enumerate() {
            assert_eq!(*v, 1.0 + want[5 + k]);
        }
    }
}
