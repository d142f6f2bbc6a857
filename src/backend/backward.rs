//! The backward ops: what a backward pass through the decoder needs beside the forward ops
//! (`models::decoder_grad`, for distillation refinement). One op family of its own, so a backend
//! offers gradients by implementing this trait; the CPU's implementations are the reference the
//! GPU's kernels are tested against (`tests/gpu_ops.rs`), and the CPU's are checked against
//! finite differences and PyTorch's autograd through the whole pass (`tests/refine.rs`).
//!
//! Shapes as in `Backend`: (rows, cols) f32 tensors, rows are tokens.

use super::{Activation, AttentionSpec, Backend};
use std::ops::Range;

pub trait Backward: Backend {
    /// dy · w: (n, out) · (out, in) → (n, in), the input's gradient of y = x · wᵀ (w may be a
    /// weight in its stored precision).
    fn matmul(&self, dy: &Self::T, w: &Self::T) -> Self::T;
    /// `*acc += xᵀ · y` in f32: (cols_x, cols_y), x and y of the same rows (a LoRA factor's
    /// gradient summed over the tokens).
    fn add_matmul_tn(&self, acc: &mut Self::T, x: &Self::T, y: &Self::T);
    /// A (rows, cols) tensor of zeros (a gradient accumulator).
    fn zeros(&self, rows: usize, cols: usize) -> Self::T;
    /// Columns side by side: (rows, Σ cols), the inverse of `slice_cols` (a fused projection's
    /// output gradient from its parts').
    fn concat_cols(&self, parts: &[&Self::T]) -> Self::T;
    /// dx of y = RMSNorm(x) · γ over every group of γ's width in each row (as `rms_norm`): with
    /// ρ = 1/√(mean x² + ε) and g = γ ⊙ dy, dx = ρ·g − ρ³·x·(g·x)/width.
    fn rms_norm_backward(&self, x: &Self::T, gamma: &Self::T, eps: f32, dy: &Self::T) -> Self::T;
    /// (dgate, dup) of z = act(gate) ⊙ up, given gate, act(gate) and up from the forward pass.
    fn gate_backward(
        &self,
        gate: &Self::T,
        act_gate: &Self::T,
        up: &Self::T,
        dz: &Self::T,
        act: Activation,
    ) -> (Self::T, Self::T);
    /// (dq, dk, dv) of causal self-attention within each sequence `seqs` (the rows of q, k and v
    /// alike; `AttentionSpec`'s window, soft-capping and grouped-query heads). With s the (capped)
    /// scaled scores of a query and p = softmax(s): dv_j += p_j·do, dp_j = do·v_j,
    /// ds_j = p_j·(dp_j − Σ p·dp), and through the cap and the scale into dq and dk.
    fn attention_backward(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        dout: &Self::T,
        spec: &AttentionSpec,
        seqs: &[Range<usize>],
    ) -> (Self::T, Self::T, Self::T);
}

/// f′(x) of an activation, given f(x) from the forward pass (SiLU's slope from it alone:
/// σ(x) = f/x, f′ = σ + f·(1 − σ); no exponential). The CPU's, and the reference of the GPU's.
pub fn slope(act: Activation, x: f32, f: f32) -> f32 {
    match act {
        Activation::Silu => {
            let s = if x == 0.0 { 0.5 } else { f / x };
            s + f * (1.0 - s)
        }
        Activation::GeluErf => {
            let cdf = 0.5 * (1.0 + libm::erff(x / std::f32::consts::SQRT_2));
            cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt()
        }
        Activation::GeluTanh => {
            // x·σ(2u), u = c·(x + 0.044715x³).
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            let u = c * (x + 0.044715 * x * x * x);
            let s = 1.0 / (1.0 + (-2.0 * u).exp());
            s + x * s * (1.0 - s) * 2.0 * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Relu => (x > 0.0) as u8 as f32,
        Activation::Tanh => 1.0 - f * f,
    }
}
