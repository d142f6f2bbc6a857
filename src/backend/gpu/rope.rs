//! `rope.wgsl`: rotary position embedding, "rotate half", in place.

use super::dispatch::{grid_1d, params, Kernel};
use super::{Gpu, GpuTensor};

pub(super) const ROPE: Kernel = Kernel { name: "rope", src: include_str!("../../../shaders/rope.wgsl") };

params!(RopeParams { rows: u32, cols: u32, head_dim: u32, row_stride: u32 });

impl Gpu {
    pub(super) fn rotate(&self, x: &mut GpuTensor, positions: &[u32], head_dim: usize, inv_freq: &[f32]) {
        assert!(
            head_dim % 2 == 0 && head_dim > 0 && x.cols % head_dim == 0,
            "rope: head_dim {head_dim} must be even and divide {} columns",
            x.cols
        );
        assert_eq!(positions.len(), x.rows, "rope: one position per row");
        assert_eq!(inv_freq.len(), head_dim / 2, "rope: head_dim / 2 frequencies");
        let pb = self.table(positions);
        let fb = self.table(bytemuck::cast_slice(inv_freq));
        let (gx, gy, row_stride) = grid_1d(x.rows * x.cols / 2);
        let p = self.pipeline(&ROPE, &[]);
        let params = RopeParams { rows: x.rows as u32, cols: x.cols as u32, head_dim: head_dim as u32, row_stride };
        self.dispatch(&p, &[&x.buf, &pb, &fb], &params, (gx, gy, 1));
    }
}
