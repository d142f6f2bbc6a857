//! `slice_cols.wgsl`: a column range of every row, taken out (splits a fused q/k/v projection) or
//! put back (joins the parts' gradients in the backward pass).

use super::dispatch::{grid_1d, params, Kernel};
use super::{Gpu, GpuTensor};
use std::ops::Range;

pub(super) const SLICE_COLS: Kernel =
    Kernel { name: "slice_cols", src: include_str!("../../../shaders/slice_cols.wgsl") };

params!(SliceColsParams {
    rows: u32,
    /// Columns of the wide tensor.
    cols: u32,
    /// First column of the range.
    c0: u32,
    /// Columns of the range.
    w: u32,
    row_stride: u32,
});

/// The shader's OP: take the range out of the wide tensor, or place it in.
pub(super) fn subs(place: bool) -> Vec<(&'static str, String)> {
    let op = if place {
        "out[(i / p.w) * p.cols + p.c0 + i % p.w] = x[i];"
    } else {
        "out[i] = x[(i / p.w) * p.cols + p.c0 + i % p.w];"
    };
    vec![("OP", op.to_string())]
}

impl Gpu {
    fn slice_cols_op(
        &self,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        rows: usize,
        cols: usize,
        range: Range<usize>,
        place: bool,
    ) {
        let (gx, gy, row_stride) = grid_1d(rows * range.len());
        let p = self.pipeline(&SLICE_COLS, &subs(place));
        let params = SliceColsParams {
            rows: rows as u32,
            cols: cols as u32,
            c0: range.start as u32,
            w: range.len() as u32,
            row_stride,
        };
        self.dispatch(&p, &[x, out], &params, (gx, gy, 1));
    }

    pub(super) fn slice_cols(&self, x: &GpuTensor, cols: Range<usize>) -> GpuTensor {
        assert!(cols.start <= cols.end && cols.end <= x.cols, "slice_cols: columns {cols:?} of {}", x.cols);
        let out = self.alloc(x.rows, cols.len());
        self.slice_cols_op(&x.buf, &out.buf, x.rows, x.cols, cols, false);
        out
    }

    /// The parts side by side, (rows, Σ cols).
    pub(super) fn join_columns(&self, parts: &[&GpuTensor]) -> GpuTensor {
        let rows = parts.first().map_or(0, |p| p.rows);
        assert!(parts.iter().all(|p| p.rows == rows), "concat_cols: parts of different rows");
        let cols = parts.iter().map(|p| p.cols).sum();
        let out = self.alloc(rows, cols);
        let mut at = 0;
        for p in parts {
            self.slice_cols_op(&p.buf, &out.buf, rows, cols, at..at + p.cols, true);
            at += p.cols;
        }
        out
    }
}
