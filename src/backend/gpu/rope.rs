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
    row_stride: u32,
});

impl Gpu {
    pub(super) fn rope(&self, x: &mut GpuTensor, positions: &[u32], head_dim: usize, inv_freq: &[f32], scale: f32) {
        let half = inv_freq.len();
        assert!(
            half > 0 && 2 * half <= head_dim && x.cols.is_multiple_of(head_dim),
            "rope: {half} pairs in heads of {head_dim} that divide {} columns",
            x.cols
        );
        assert_eq!(positions.len(), x.rows, "rope: one position per row");
        // The angles' cos and sin come from the host, computed as the CPU backend computes them:
        // WGSL bounds sin and cos only on [−π, π] (to 2^−11), and rotary angles reach far
        // outside (position × frequency); SwiftShader's were off enough there that a Gemma 3 merge
        // in Chromium differed from the CLI by 1.1e-3. One (cos, sin) pair per distinct position
        // and frequency: a merge pass's positions are 0..max_len, a decoding step's one per sequence.
        let mut distinct = positions.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let index: Vec<u32> = positions.iter().map(|p| distinct.binary_search(p).unwrap() as u32).collect();
        let mut cos_sin = Vec::with_capacity(distinct.len() * half * 2);
        for &p in &distinct {
            for f in inv_freq {
                let (sin, cos) = (p as f32 * f).sin_cos();
                cos_sin.extend([(cos * scale).to_bits(), (sin * scale).to_bits()]);
            }
        }
        let ib = self.table(&index);
        let cb = self.table(&cos_sin);
        let (gx, gy, row_stride) = grid_1d(x.rows * (x.cols / head_dim) * half);
        let p = self.pipeline(&ROPE, &[]);
        let params = RopeParams {
            rows: x.rows as u32,
            cols: x.cols as u32,
            head_dim: head_dim as u32,
            half: half as u32,
            row_stride,
        };
        self.dispatch(&p, &[&x.buf, &ib, &cb], &params, (gx, gy, 1));
    }
}
