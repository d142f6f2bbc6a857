//! `elementwise.wgsl`: one thread per element of a (rows, cols) tensor.

use super::dispatch::{grid_1d, params, Kernel};
use super::Gpu;
use crate::backend::Activation;

pub(super) const ELEMENTWISE: Kernel =
    Kernel { name: "elementwise", src: include_str!("../../../shaders/elementwise.wgsl") };

params!(ElementwiseParams { n: u32, oy: u32, ox: u32, cols: u32, s: f32, row_stride: u32 });

/// The op a dispatch runs (the shader's OP, and ACT for activations).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Elementwise {
    /// y[oy + i] += s · x[ox + i]
    Add,
    /// y[oy + i] = s · x[ox + i]
    Set,
    /// y[i] += x[i % cols]
    Bias,
    /// y[i] *= s
    Scale,
    /// y[i] *= x[i]
    Mul,
    /// y[i] = act(y[i])
    Activate(Activation),
}

impl Elementwise {
    pub fn subs(self) -> Vec<(&'static str, String)> {
        let op = match self {
            Elementwise::Add => "y[p.oy + i] = y[p.oy + i] + p.s * x[p.ox + i];",
            Elementwise::Set => "y[p.oy + i] = p.s * x[p.ox + i];",
            Elementwise::Bias => "y[i] = y[i] + x[i % p.cols];",
            Elementwise::Scale => "y[i] = p.s * y[i];",
            Elementwise::Mul => "y[i] = y[i] * x[i];",
            Elementwise::Activate(_) => "y[i] = act(y[i]);",
        };
        let act = match self {
            Elementwise::Activate(Activation::GeluErf) => "return 0.5 * v * (1.0 + erf(v * 0.70710678118654752));",
            Elementwise::Activate(Activation::GeluTanh) => {
                "let u = 0.7978845608028654 * (v + 0.044715 * v * v * v); return v / (1.0 + exp(-2.0 * u));"
            }
            Elementwise::Activate(Activation::Silu) => "return v / (1.0 + exp(-v));",
            Elementwise::Activate(Activation::Relu) => "return max(v, 0.0);",
            Elementwise::Activate(Activation::Tanh) => "return tanh(v);",
            _ => "return v;",
        };
        // Keep binding 1 statically used whatever the op, so every variant has the same layout.
        let op = format!("{op}\n    if (p.n == 0xffffffffu) {{ y[0] = x[0]; }}");
        vec![("OP", op), ("ACT", act.to_string())]
    }
}

impl Gpu {
    /// Run `op` over n elements: y from element oy, x (where the op reads one) from ox.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn elementwise(
        &self,
        op: Elementwise,
        y: &wgpu::Buffer,
        x: Option<&wgpu::Buffer>,
        n: usize,
        oy: usize,
        ox: usize,
        cols: usize,
        s: f32,
    ) {
        let p = self.pipeline(&ELEMENTWISE, &op.subs());
        let (gx, gy, row_stride) = grid_1d(n);
        let params = ElementwiseParams { n: n as u32, oy: oy as u32, ox: ox as u32, cols: cols as u32, s, row_stride };
        self.dispatch(&p, &[y, x.unwrap_or(&self.unused)], &params, (gx, gy, 1));
    }
}
