//! `reduce.wgsl`: sums of squares, squared distances and dot products as per-workgroup partial sums
//! in twice-f32 precision, added in f64 on the host (or by `system/scalars.wgsl` on the device).

use super::dispatch::{params, unpacked, Kernel};
use super::{Gpu, GpuTensor};
use crate::backend::WeightDtype;

pub(super) const REDUCE: Kernel = Kernel { name: "reduce", src: include_str!("../../../shaders/reduce.wgsl") };

params!(ReduceParams {
    n: u32,
    ox: u32,
    /// Elements per workgroup.
    chunk: u32,
    /// Always 1 (see matmul.wgsl).
    one: f32,
    /// Always 0.
    zero: u32,
});

/// What is summed (the shader's MODE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reduction {
    /// Σ x²
    SqNorm,
    /// Σ (x − y)²
    SqDist,
    /// Σ x · y
    Dot,
}

impl Reduction {
    pub fn subs(self, x_dtype: WeightDtype) -> Vec<(&'static str, String)> {
        let term = match self {
            Reduction::SqNorm => "let v = load_x(p.ox + i); return product(v, v);",
            // The difference rounds too; its error is second order in an alignment error.
            Reduction::SqDist => "let d = load_x(p.ox + i) - y[i]; return product(d, d);",
            Reduction::Dot => "return product(load_x(p.ox + i), y[i]);",
        };
        let (x_elem, x_load) = unpacked("x", x_dtype);
        vec![("MODE", term.to_string()), ("X_ELEM", x_elem), ("X_LOAD", x_load)]
    }
}

impl Gpu {
    /// Record a reduction of n elements of x (from element ox) against y; returns the
    /// per-workgroup partial sums as (hi, lo) pairs, (1, 2·workgroups): their f64 sum is the total.
    pub(super) fn reduce(
        &self,
        mode: Reduction,
        x: &wgpu::Buffer,
        x_dtype: WeightDtype,
        ox: usize,
        y: Option<&wgpu::Buffer>,
        n: usize,
    ) -> GpuTensor {
        let chunk = 256 * 16;
        let groups = n.div_ceil(chunk).max(1);
        let partial = self.alloc(1, 2 * groups);
        let p = self.pipeline(&REDUCE, &mode.subs(x_dtype));
        let gx = groups.min(65535);
        let params = ReduceParams { n: n as u32, ox: ox as u32, chunk: chunk as u32, one: 1.0, zero: 0 };
        self.dispatch(
            &p,
            &[x, y.unwrap_or(&self.unused), &partial.buf],
            &params,
            (gx as u32, groups.div_ceil(gx) as u32, 1),
        );
        partial
    }

    /// A reduction over two f32 tensors of one shape.
    pub(super) fn reduce_pair(&self, mode: Reduction, a: &GpuTensor, b: &GpuTensor) -> GpuTensor {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols), "{mode:?}: shapes differ");
        assert_eq!((a.dtype, b.dtype), (WeightDtype::F32, WeightDtype::F32), "{mode:?}: f32 tensors only");
        self.reduce(mode, &a.buf, a.dtype, 0, Some(&b.buf), a.rows * a.cols)
    }
}
