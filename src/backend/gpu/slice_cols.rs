//! `slice_cols.wgsl`: a column range of every row (splits a fused q/k/v projection).

use super::dispatch::{grid_1d, params, Kernel};
use super::{Gpu, GpuTensor};
use std::ops::Range;

pub(super) const SLICE_COLS: Kernel =
    Kernel { name: "slice_cols", src: include_str!("../../../shaders/slice_cols.wgsl") };

params!(SliceColsParams {
    rows: u32,
    cols: u32,
    /// First column taken.
    c0: u32,
    /// Columns taken.
    w: u32,
    row_stride: u32,
});

impl Gpu {
    pub(super) fn columns(&self, x: &GpuTensor, cols: Range<usize>) -> GpuTensor {
        assert!(cols.start <= cols.end && cols.end <= x.cols, "slice_cols: columns {cols:?} of {}", x.cols);
        let out = self.alloc(x.rows, cols.len());
        let (gx, gy, row_stride) = grid_1d(x.rows * cols.len());
        let p = self.pipeline(&SLICE_COLS, &[]);
        let params = SliceColsParams {
            rows: x.rows as u32,
            cols: x.cols as u32,
            c0: cols.start as u32,
            w: cols.len() as u32,
            row_stride,
        };
        self.dispatch(&p, &[&x.buf, &out.buf], &params, (gx, gy, 1));
        out
    }
}
