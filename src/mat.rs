//! `Mat`: a row-major f32 matrix on the host. The currency between formats, models and backends.

use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    /// The values; empty for a weight kept in half precision (`half`).
    pub data: Vec<f32>,
    /// A weight the CPU backend keeps in its stored f16/bf16 bits (`Mat::packed`): only the ops
    /// that take weights read it (`Backend::upload_weight`), converting panels as they go.
    pub half: Option<Arc<StoredMat>>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
        assert_eq!(rows * cols, data.len(), "Mat::new: {rows}x{cols} needs {} values", rows * cols);
        Mat { rows, cols, data, half: None }
    }

    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat::new(rows, cols, vec![0.0; rows * cols])
    }

    /// A weight as stored, without a copy: f32 values become the matrix, half-precision bits are
    /// kept packed.
    pub fn packed(w: StoredMat) -> Mat {
        match w.data {
            Stored::F32(v) => Mat::new(w.rows, w.cols, v),
            _ => Mat { rows: w.rows, cols: w.cols, data: Vec::new(), half: Some(Arc::new(w)) },
        }
    }

    /// The f32 values, converted from the stored bits for a packed weight.
    pub fn to_f32(&self) -> Mat {
        match &self.half {
            Some(w) => w.to_mat(),
            None => self.clone(),
        }
    }

    pub fn transpose(&self) -> Mat {
        let mut out = vec![0.0; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                out[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        Mat::new(self.cols, self.rows, out)
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Rows `rows`, row-major.
    pub fn rows_data(&self, rows: std::ops::Range<usize>) -> &[f32] {
        &self.data[rows.start * self.cols..rows.end * self.cols]
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Rows `rows` as a matrix of their own.
    pub fn rows_of(&self, rows: std::ops::Range<usize>) -> Mat {
        Mat::new(rows.len(), self.cols, self.rows_data(rows).to_vec())
    }

    /// The parts side by side: (rows, Σ cols), every part of the same rows.
    pub fn hcat<M: std::borrow::Borrow<Mat>>(parts: &[M]) -> Mat {
        let rows = parts.first().map_or(0, |p| p.borrow().rows);
        let cols: usize = parts.iter().map(|p| p.borrow().cols).sum();
        let mut out = Mat::zeros(rows, cols);
        let mut at = 0;
        for p in parts {
            let p = p.borrow();
            assert_eq!(p.rows, rows, "Mat::hcat: parts of {} and {rows} rows", p.rows);
            for r in 0..rows {
                out.data[r * cols + at..r * cols + at + p.cols].copy_from_slice(p.row(r));
            }
            at += p.cols;
        }
        out
    }
}

/// Relative Frobenius distance ||a - b|| / ||b||, computed in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// A row-major f64 matrix: statistics and factors as a backend returns them to the host (the merge
/// does its dense f64 algebra in its own types; see `merge::solve`).
#[derive(Clone, Debug, PartialEq)]
pub struct Mat64 {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat64 {
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Mat64 {
        assert_eq!(rows * cols, data.len(), "Mat64::new: {rows}x{cols} needs {} values", rows * cols);
        Mat64 { rows, cols, data }
    }

    pub fn zeros(rows: usize, cols: usize) -> Mat64 {
        Mat64::new(rows, cols, vec![0.0; rows * cols])
    }
}

/// The values of a weight matrix as a checkpoint stores them: f32, or the bit patterns of IEEE
/// half precision or bfloat16.
#[derive(Clone, Debug, PartialEq)]
pub enum Stored {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

/// A (rows, cols) weight matrix in its stored precision: a backend that computes on packed
/// weights (the GPU) takes the bits as they are, without an f32 copy; others convert.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMat {
    pub rows: usize,
    pub cols: usize,
    pub data: Stored,
}

fn transposed<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect()
}

impl StoredMat {
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn to_mat(&self) -> Mat {
        Mat::new(self.rows, self.cols, self.rows_f32(0..self.rows))
    }

    /// Rows `rows` as f32, row-major.
    pub fn rows_f32(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let r = rows.start * self.cols..rows.end * self.cols;
        match &self.data {
            Stored::F32(v) => v[r].to_vec(),
            Stored::F16(b) => b[r].iter().map(|&x| half::f16::from_bits(x).to_f32()).collect(),
            Stored::Bf16(b) => b[r].iter().map(|&x| half::bf16::from_bits(x).to_f32()).collect(),
        }
    }

    /// Row r as f32, into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let v = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            Stored::F32(x) => out.copy_from_slice(&x[v]),
            Stored::F16(b) => out.iter_mut().zip(&b[v]).for_each(|(o, &x)| *o = half::f16::from_bits(x).to_f32()),
            Stored::Bf16(b) => out.iter_mut().zip(&b[v]).for_each(|(o, &x)| *o = half::bf16::from_bits(x).to_f32()),
        }
    }

    /// (cols, rows), in the same precision.
    pub fn transpose(&self) -> StoredMat {
        let (r, c) = (self.rows, self.cols);
        let data = match &self.data {
            Stored::F32(v) => Stored::F32(transposed(v, r, c)),
            Stored::F16(b) => Stored::F16(transposed(b, r, c)),
            Stored::Bf16(b) => Stored::Bf16(transposed(b, r, c)),
        };
        StoredMat { rows: c, cols: r, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transposing in the stored precision and converting equals converting and transposing.
    #[test]
    fn stored_transpose_matches_f32_transpose() {
        let m = Mat::new(3, 5, (0..15).map(|v| v as f32 * 0.25 - 1.0).collect());
        for data in [
            Stored::F32(m.data.clone()),
            Stored::F16(m.data.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect()),
            Stored::Bf16(m.data.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect()),
        ] {
            let s = StoredMat { rows: 3, cols: 5, data };
            assert_eq!(s.to_mat(), m);
            assert_eq!(s.transpose().to_mat(), m.transpose());
            assert_eq!(s.transpose().shape(), (5, 3));
        }
    }
}
