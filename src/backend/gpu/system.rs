//! `shaders/system/` (`scalars.wgsl`, `assemble.wgsl`): a module's system matrix M (`SystemSpec`)
//! assembled on the device from statistics that were never read back, for its f32 factor.

use super::dispatch::{grid_1d, params, Kernel};
use super::reduce::Reduction;
use super::{Gpu, GpuGram, GpuScalar, GpuTensor};
use crate::backend::{SystemSpec, WeightDtype};

pub(super) const SYSTEM_SCALARS: Kernel =
    Kernel { name: "system_scalars", src: include_str!("../../../shaders/system/scalars.wgsl") };
pub(super) const SYSTEM_ASSEMBLE: Kernel =
    Kernel { name: "system_assemble", src: include_str!("../../../shaders/system/assemble.wgsl") };

params!(SystemScalarsParams { segments: u32 });

params!(
    /// One run of partial sums that adds into a scalar: out[slot] += k · Σ partials[offset .. offset + len].
    Segment { slot: u32, offset: u32, len: u32, k: f32 }
);

params!(SystemAssembleParams {
    n: u32,
    /// Which term (task) this dispatch adds.
    term: u32,
    /// 1: write M instead of adding to it.
    first: u32,
    ridge: f32,
    off_diagonal: f32,
    row_stride: u32,
});

impl Gpu {
    /// M of a system, (n, n) f32: c_i and ‖G_i‖²_F per term are reduced from pending partial sums
    /// by `system/scalars.wgsl` (scalars 3i, 3i+1, 3i+2: c_i's numerator, its denominator, ‖G_i‖²),
    /// then `system/assemble.wgsl` adds each term. None where M would not fit one binding.
    pub(super) fn assemble_system(&self, spec: &SystemSpec<&GpuScalar, &GpuGram>) -> Option<GpuTensor> {
        let n = spec.terms.first()?.gram.hi.rows;
        if !self.fits_square(n) || spec.terms.iter().any(|t| (t.gram.hi.rows, t.gram.hi.cols) != (n, n)) {
            return None;
        }
        let norms: Vec<GpuTensor> = spec
            .terms
            .iter()
            .map(|t| self.reduce(Reduction::SqNorm, &t.gram.hi.buf, WeightDtype::F32, 0, None, n * n))
            .collect();
        let mut base = Vec::new();
        let mut sources: Vec<(usize, f32, &GpuTensor)> = Vec::new();
        for (i, (term, norm)) in spec.terms.iter().zip(&norms).enumerate() {
            let w = &term.weight;
            base.extend([w.num as f32, if w.den.is_some() { 0.0 } else { 1.0 }, 0.0]);
            for (k, s) in &w.num_terms {
                sources.extend(s.0.iter().map(|part| (3 * i, *k as f32, part)));
            }
            if let Some(s) = w.den {
                sources.extend(s.0.iter().map(|part| (3 * i + 1, 1.0, part)));
            }
            sources.push((3 * i + 2, 1.0, norm));
        }
        // Pack every partial into one buffer (a kernel binds a fixed number of buffers).
        let total: usize = sources.iter().map(|s| s.2.cols).sum();
        let packed = self.alloc(1, total);
        let mut segments: Vec<Segment> = Vec::new();
        self.record(|enc| {
            let mut at = 0;
            for (slot, k, part) in &sources {
                enc.copy_buffer_to_buffer(&part.buf, 0, &packed.buf, (at * 4) as u64, (part.cols * 4) as u64);
                segments.push(Segment { slot: *slot as u32, offset: at as u32, len: part.cols as u32, k: *k });
                at += part.cols;
            }
        });
        let scalars = self.alloc(1, base.len());
        let p = self.pipeline(&SYSTEM_SCALARS, &[]);
        let (seg_buf, base_buf) =
            (self.table(bytemuck::cast_slice(&segments)), self.table(bytemuck::cast_slice(&base)));
        let params = SystemScalarsParams { segments: segments.len() as u32 };
        self.dispatch(&p, &[&packed.buf, &seg_buf, &base_buf, &scalars.buf], &params, (base.len() as u32, 1, 1));

        let m = self.alloc(n, n);
        let p = self.pipeline(&SYSTEM_ASSEMBLE, &[]);
        let (gx, gy, row_stride) = grid_1d(n * n);
        for (i, term) in spec.terms.iter().enumerate() {
            let params = SystemAssembleParams {
                n: n as u32,
                term: i as u32,
                first: (i == 0) as u32,
                ridge: spec.alpha2 as f32,
                off_diagonal: spec.off_diagonal as f32,
                row_stride,
            };
            self.dispatch(&p, &[&m.buf, &term.gram.hi.buf, &scalars.buf], &params, (gx, gy, 1));
        }
        Some(m)
    }

    /// M of a system as the device assembles it, read back as a matrix (tests compare it with the
    /// host's `merge::solve::assemble`).
    pub fn defer_system_matrix(&self, spec: &SystemSpec<&GpuScalar, &GpuGram>) -> Option<GpuGram> {
        self.assemble_system(spec).map(|hi| GpuGram { hi, lo: None })
    }
}
