//! A tensor read through a vocabulary permutation: row t of the view is a row of the stored
//! tensor, a substitute shared by all models (a donor's row or the mean of several), zeros, or the
//! padding row. Built by `vocab` at plan time; read block by block like any input.

use super::TensorSource;
use crate::kernels::convert::round_slice;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// Row of this model's own tensor.
    Own(u32),
    /// Entry of `RowMap::substitutes`.
    Substitute(u32),
    Zero,
    /// The mean of this model's rows, for rows added by `pad_to_multiple_of`.
    Pad,
}

/// Rows averaged for a substitute: `(donor, row)` pairs; one pair copies that row.
pub type Substitute = Vec<(usize, u32)>;

#[derive(Debug)]
pub struct RowMap {
    pub cols: usize,
    pub rows: Vec<Row>,
    /// The stored tensor of every model of this merge; `own` is this model's.
    pub donors: Vec<TensorSource>,
    pub own: usize,
    pub substitutes: Arc<Vec<Substitute>>,
    /// The padding row (empty when there is none).
    pub pad: Vec<f32>,
}

impl RowMap {
    /// Elements `first .. first + out.len()` of the view, in f32.
    pub fn read(&self, first: usize, out: &mut [f32]) {
        let cols = self.cols.max(1);
        let mut at = 0;
        while at < out.len() {
            let e = first + at;
            let (r, c) = (e / cols, e % cols);
            let n = (cols - c).min(out.len() - at);
            let dst = &mut out[at..at + n];
            match self.rows[r] {
                Row::Own(src) => self.donors[self.own].read_f32(src as usize * cols + c, dst),
                Row::Substitute(k) => self.substitute(k as usize, c, dst),
                Row::Zero => dst.fill(0.0),
                Row::Pad => dst.copy_from_slice(&self.pad[c..c + n]),
            }
            at += n;
        }
    }

    fn substitute(&self, k: usize, c: usize, dst: &mut [f32]) {
        let from = &self.substitutes[k];
        let cols = self.cols;
        if let [(donor, row)] = from[..] {
            return self.donors[donor].read_f32(row as usize * cols + c, dst);
        }
        dst.fill(0.0);
        let mut row_values = vec![0f32; dst.len()];
        for &(donor, row) in from {
            self.donors[donor].read_f32(row as usize * cols + c, &mut row_values);
            dst.iter_mut().zip(&row_values).for_each(|(d, v)| *d += v);
        }
        let count = from.len() as f32;
        dst.iter_mut().for_each(|d| *d /= count);
        // As if averaged in the stored dtype, as mergekit does.
        let dtype = self.donors[self.own].dtype;
        if dtype != crate::dtype::Dtype::F32 {
            round_slice(dtype, dst);
        }
    }

    /// The mean of every row of the view, for padding (rounded to the stored dtype).
    pub fn mean_row(&self) -> Vec<f32> {
        let cols = self.cols;
        let mut sum = vec![0f64; cols];
        let mut row = vec![0f32; cols];
        let real = self.rows.iter().filter(|r| **r != Row::Pad).count();
        for r in 0..real {
            self.read(r * cols, &mut row);
            sum.iter_mut().zip(&row).for_each(|(s, v)| *s += *v as f64);
        }
        let mut mean: Vec<f32> = sum
            .iter()
            .map(|s| (s / real.max(1) as f64) as f32)
            .collect();
        let dtype = self.donors[self.own].dtype;
        if dtype != crate::dtype::Dtype::F32 {
            round_slice(dtype, &mut mean);
        }
        mean
    }
}
