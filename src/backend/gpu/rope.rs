//! `rope.wgsl`: rotary position embedding, "rotate half", in place.

use super::dispatch::{grid_1d, params, Kernel};
use super::{Gpu, GpuTensor};

pub(super) const ROPE: Kernel = Kernel { name: "rope", src: include_str!("../../../shaders/rope.wgsl") };

params!(RopeParams {
    rows: u32,
    cols: u32,
    head_dim: u32,
    /// Rotated pairs per head (head_dim / 2, or fewer for a partial rotary).
    half: u32,
    /// Multiplies cos and sin (longrope's attention factor; else 1).
    scale: f32,
    row_stride: u32,
});

impl Gpu {
    pub(super) fn rotate(&self, x: &mut GpuTensor, positions: &[u32], head_dim: usize, inv_freq: &[f32], scale: f32) {
        let half = inv_freq.len();
        assert!(
            half > 0 && 2 * half <= head_dim && x.cols.is_multiple_of(head_dim),
            "rope: {half} pairs in heads of {head_dim} that divide {} columns",
            x.cols
        );
        assert_eq!(positions.len(), x.rows, "rope: one position per row");
        let pb = self.table(positions);
        let fb = self.table(bytemuck::cast_slice(inv_freq));
        let (gx, gy, row_stride) = grid_1d(x.rows * (x.cols / head_dim) * half);
        let p = self.pipeline(&ROPE, &[]);
        let params = RopeParams {
            rows: x.rows as u32,
            cols: x.cols as u32,
            head_dim: head_dim as u32,
            half: half as u32,
            scale,
            row_stride,
        };
        self.dispatch(&p, &[&x.buf, &pb, &fb], &params, (gx, gy, 1));
    }
}
