//! `write_rows.wgsl`: scatter rows into a tensor (a pass's keys and values into a KV cache).

use super::dispatch::{grid_1d, params, Kernel};
use super::{Gpu, GpuTensor};

pub(super) const WRITE_ROWS: Kernel =
    Kernel { name: "write_rows", src: include_str!("../../../shaders/write_rows.wgsl") };

params!(WriteRowsParams { rows: u32, cols: u32, row_stride: u32 });

impl Gpu {
    pub(super) fn write_rows(&self, dst: &GpuTensor, idx: &[u32], src: &GpuTensor) {
        assert_eq!((idx.len(), src.cols), (src.rows, dst.cols), "write_rows: one index per row of a matching width");
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= dst.rows) {
            self.fail(format!("write_rows: row {bad} of a tensor of {} rows", dst.rows));
            return;
        }
        if idx.is_empty() || src.cols == 0 {
            return;
        }
        let ib = self.table(idx);
        let (gx, gy, row_stride) = grid_1d(idx.len() * src.cols);
        let params = WriteRowsParams { rows: idx.len() as u32, cols: src.cols as u32, row_stride };
        let p = self.pipeline(&WRITE_ROWS, &[]);
        self.dispatch(&p, &[&dst.buf, &src.buf, &ib], &params, (gx, gy, 1));
    }
}
