//! `norm.wgsl`: LayerNorm or RMSNorm of each row, one workgroup per row.

use super::dispatch::{params, Kernel};
use super::{Gpu, GpuTensor};

pub(super) const NORM: Kernel = Kernel { name: "norm", src: include_str!("../../../shaders/norm.wgsl") };

params!(NormParams {
    rows: u32,
    cols: u32,
    eps: f32,
    has_beta: u32,
    /// Always 1 (see matmul.wgsl).
    one: f32,
    /// Always 0.
    zero: u32,
});

pub(super) fn subs(rms: bool) -> Vec<(&'static str, String)> {
    vec![("RMS", rms.to_string())]
}

impl Gpu {
    pub(super) fn norm(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: Option<&GpuTensor>,
        eps: f32,
        rms: bool,
    ) -> GpuTensor {
        // Each group of gamma's width is normalised as a row of its own (RMSNorm per head); the
        // groups of a row-major tensor are contiguous, so the kernel sees (rows · groups, width).
        let g = gamma.rows * gamma.cols;
        assert!(g > 0 && x.cols.is_multiple_of(g), "norm: gamma's width {g} must divide {} columns", x.cols);
        assert!(rms || g == x.cols, "norm: LayerNorm normalises whole rows");
        assert!(beta.is_none_or(|b| b.rows * b.cols == g), "norm: beta must have one value per column");
        let rows = x.rows * (x.cols / g);
        let out = self.alloc(x.rows, x.cols);
        let p = self.pipeline(&NORM, &subs(rms));
        let beta_buf = beta.map(|b| &b.buf).unwrap_or(&gamma.buf);
        let (gx, gy) = (rows.min(65535), rows.div_ceil(65535));
        let params =
            NormParams { rows: rows as u32, cols: g as u32, eps, has_beta: beta.is_some() as u32, one: 1.0, zero: 0 };
        self.dispatch(&p, &[&x.buf, &gamma.buf, beta_buf, &out.buf], &params, (gx as u32, gy as u32, 1));
        out
    }
}
