//! `gate_backward.wgsl`: the gradient of act(gate) ⊙ up, one thread per element.

use super::dispatch::{grid_1d, params, Kernel};
use super::{Gpu, GpuTensor};
use crate::backend::Activation;

pub(super) const GATE_BACKWARD: Kernel =
    Kernel { name: "gate_backward", src: include_str!("../../../shaders/gate_backward.wgsl") };

params!(GateBackwardParams { n: u32, row_stride: u32 });

/// The shader's SLOPE: act′(x) from x and f = act(x), as `backward::slope` computes it.
pub(super) fn subs(act: Activation) -> Vec<(&'static str, String)> {
    let slope = match act {
        // σ = f / x (x = 0: σ = 1/2), f′ = σ + f·(1 − σ).
        Activation::Silu => "let s = select(f / x, 0.5, x == 0.0); return s + f * (1.0 - s);",
        Activation::GeluErf => {
            "return 0.5 * (1.0 + erf(x * 0.70710678118654752)) + x * exp(-0.5 * x * x) * 0.3989422804014327;"
        }
        // x·σ(2u), u = c·(x + 0.044715x³).
        Activation::GeluTanh => {
            "let c = 0.7978845608028654; let u = c * (x + 0.044715 * x * x * x); let s = 1.0 / (1.0 + exp(-2.0 * u)); \
             return s + x * s * (1.0 - s) * 2.0 * c * (1.0 + 3.0 * 0.044715 * x * x);"
        }
        Activation::Relu => "return select(0.0, 1.0, x > 0.0);",
        Activation::Tanh => "return 1.0 - f * f;",
    };
    vec![("SLOPE", slope.to_string())]
}

impl Gpu {
    pub(super) fn gate_gradient(
        &self,
        gate: &GpuTensor,
        act_gate: &GpuTensor,
        up: &GpuTensor,
        dz: &GpuTensor,
        act: Activation,
    ) -> (GpuTensor, GpuTensor) {
        let shape = (dz.rows, dz.cols);
        assert!(
            [(gate.rows, gate.cols), (act_gate.rows, act_gate.cols), (up.rows, up.cols)].iter().all(|&s| s == shape),
            "gate_backward: shapes differ"
        );
        let (dgate, dup) = (self.alloc(dz.rows, dz.cols), self.alloc(dz.rows, dz.cols));
        let n = dz.rows * dz.cols;
        let (gx, gy, row_stride) = grid_1d(n);
        let p = self.pipeline(&GATE_BACKWARD, &subs(act));
        let params = GateBackwardParams { n: n as u32, row_stride };
        self.dispatch(&p, &[&gate.buf, &act_gate.buf, &up.buf, &dz.buf, &dgate.buf, &dup.buf], &params, (gx, gy, 1));
        (dgate, dup)
    }
}
