//! `shaders/cholesky/` (`block.wgsl`, `panel.wgsl`), with `matmul.wgsl` for the trailing update:
//! a blocked right-looking Cholesky factorisation in f32, in place.

use super::dispatch::{params, Kernel};
use super::matmul::Geometry;
use super::{Gpu, GpuTensor};

pub(super) const CHOLESKY_BLOCK: Kernel =
    Kernel { name: "cholesky_block", src: include_str!("../../../shaders/cholesky/block.wgsl") };
pub(super) const CHOLESKY_PANEL: Kernel =
    Kernel { name: "cholesky_panel", src: include_str!("../../../shaders/cholesky/panel.wgsl") };

/// Columns per step (the diagonal block one workgroup factors in workgroup memory).
const NB: usize = 32;

params!(CholeskyParams {
    n: u32,
    /// The step's first column.
    k0: u32,
    /// The step's columns (≤ NB).
    kb: u32,
});

impl Gpu {
    /// Factor a row-major (n, n) buffer in place: per 32-column step, factor the diagonal block
    /// (one workgroup), solve the panel below it (a thread per row), and update the trailing matrix
    /// with the tiled product (alpha = −1). Returns the status word (0: every pivot positive).
    pub(super) fn factor_in_place(&self, a: &wgpu::Buffer, n: usize) -> GpuTensor {
        let block = self.pipeline(&CHOLESKY_BLOCK, &[]);
        let panel_p = self.pipeline(&CHOLESKY_PANEL, &[]);
        let status = self.alloc(1, 1);
        self.record(|enc| enc.clear_buffer(&status.buf, 0, None));
        for k0 in (0..n).step_by(NB) {
            let kb = NB.min(n - k0);
            let params = CholeskyParams { n: n as u32, k0: k0 as u32, kb: kb as u32 };
            self.dispatch(&block, &[a, &status.buf], &params, (1, 1, 1));
            let m2 = n - k0 - kb;
            if m2 == 0 {
                break;
            }
            let panel = self.alloc(m2, kb);
            self.dispatch(&panel_p, &[a, &panel.buf], &params, (m2.div_ceil(64) as u32, 1, 1));
            let g = Geometry {
                c_off: (k0 + kb) * n + k0 + kb,
                ldc: n,
                alpha: -1.0,
                accumulate: true,
                ..Geometry::new(m2, kb, m2, (0, kb, 1), (0, 1, kb))
            };
            self.matmul(&panel.buf, &panel.buf, a, None, &g);
        }
        status
    }
}
