//! `select_rows.wgsl`: gather rows of a table (embedding lookup, first-token pooling), one
//! dispatch per row block of a split weight.

use super::dispatch::{grid_1d, params, unpacked, Kernel};
use super::{Gpu, GpuTensor};
use crate::backend::WeightDtype;

pub(super) const SELECT_ROWS: Kernel =
    Kernel { name: "select_rows", src: include_str!("../../../shaders/select_rows.wgsl") };

params!(SelectRowsParams {
    rows: u32,
    cols: u32,
    row_stride: u32,
    /// The bound block's first table row.
    start: u32,
    /// The bound block's end row.
    end: u32,
});

pub(super) fn subs(dtype: WeightDtype) -> Vec<(&'static str, String)> {
    let (x_elem, x_load) = unpacked("x", dtype);
    vec![("X_ELEM", x_elem), ("X_LOAD", x_load)]
}

impl Gpu {
    pub(super) fn select_rows(&self, x: &GpuTensor, idx: &[u32]) -> GpuTensor {
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= x.rows) {
            self.fail(format!("select_rows: row {bad} of a table of {} rows", x.rows));
        }
        let out = self.alloc(idx.len(), x.cols);
        let ib = self.table(idx);
        let (gx, gy, row_stride) = grid_1d(idx.len() * x.cols);
        let p = self.pipeline(&SELECT_ROWS, &subs(x.dtype));
        for (r0, r1, buf) in x.row_blocks() {
            let params = SelectRowsParams {
                rows: idx.len() as u32,
                cols: x.cols as u32,
                row_stride,
                start: r0 as u32,
                end: r1 as u32,
            };
            self.dispatch(&p, &[buf, &ib, &out.buf], &params, (gx, gy, 1));
        }
        out
    }
}
