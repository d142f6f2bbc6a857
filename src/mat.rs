//! `Mat`: a row-major f32 matrix on the host. The currency between formats, models and backends.

#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
        assert_eq!(rows * cols, data.len(), "Mat::new: {rows}x{cols} needs {} values", rows * cols);
        Mat { rows, cols, data }
    }

    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat { rows, cols, data: vec![0.0; rows * cols] }
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

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
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
}
