//! `norm_backward.wgsl`: the gradient of RMSNorm, one workgroup per row (or per head).

use super::dispatch::{params, Kernel};
use super::{Gpu, GpuTensor};

pub(super) const NORM_BACKWARD: Kernel =
    Kernel { name: "norm_backward", src: include_str!("../../../shaders/norm_backward.wgsl") };

params!(NormBackwardParams { rows: u32, cols: u32, eps: f32 });

impl Gpu {
    pub(super) fn rms_norm_gradient(&self, x: &GpuTensor, gamma: &GpuTensor, eps: f32, dy: &GpuTensor) -> GpuTensor {
        // As in `norm`: each group of gamma's width is a row of its own.
        let g = gamma.rows * gamma.cols;
        assert!(g > 0 && x.cols.is_multiple_of(g), "rms_norm_backward: gamma's width {g} must divide {}", x.cols);
        assert_eq!((x.rows, x.cols), (dy.rows, dy.cols), "rms_norm_backward: dy must have x's shape");
        let rows = x.rows * (x.cols / g);
        let dx = self.alloc(x.rows, x.cols);
        let p = self.pipeline(&NORM_BACKWARD, &[]);
        let (gx, gy) = (rows.min(65535), rows.div_ceil(65535));
        let params = NormBackwardParams { rows: rows as u32, cols: g as u32, eps };
        self.dispatch(&p, &[&x.buf, &gamma.buf, &dy.buf, &dx.buf], &params, (gx as u32, gy as u32, 1));
        dx
    }
}
