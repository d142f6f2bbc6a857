//! The decoder's forward pass with its activations kept, and the backward pass from a loss on
//! the logits to the factors of LoRAs at its linear modules: what label-free distillation
//! (`merge::refine`) descends on. The base weights are frozen: gradients flow through them to
//! the activations but are never formed for them.
//!
//! Written once over the backend interface (the forward ops of `Backend` and the backward ops of
//! `Backward`), so it runs on the CPU and on the GPU alike, over `Decoder<B::T>` (every family
//! `decoder.rs` holds: Llama, Mistral, Qwen2/3, SmolLM3, Gemma 2/3, Phi-3), mirroring
//! `Decoder::forward` op for op: tests check its logits against the engine's forward, its
//! gradients against finite differences and PyTorch's autograd (`tools/make_refine_fixture.py`),
//! and the GPU's gradients against the CPU's (`tests/refine.rs`).
//!
//! Data flow of one run: `forward` (no host reads) → for each run of `HEAD_ROWS` rows, `logits`
//! (the host reads them and returns the loss's gradient) → `backward`, which adds every LoRA's
//! gradient into accumulators on the backend. `loss_and_grads` does all three.
//!
//! Shapes: n token rows (every sequence of the batch, concatenated), d hidden, r a LoRA's rank.

use super::decoder::{rotate, Decoder, Proj};
use super::rope::Rotary;
use super::{Batch, Linear, LinearRef};
use crate::backend::Backend;
use crate::backend::Backward;
use crate::error::Result;
use crate::mat::Mat;
use std::collections::HashMap;
use std::ops::Range;

/// A LoRA at one module, its scale folded into b: Δy = (x · aᵀ) · bᵀ. On the host (`Mat`, the
/// default) or on a backend (`B::T`).
#[derive(Clone, Debug)]
pub struct Lora<T = Mat> {
    /// (r, in)
    pub a: T,
    /// (out, r)
    pub b: T,
}

impl Lora {
    /// The factors on a backend.
    pub fn upload<B: Backend>(&self, be: &B) -> Lora<B::T> {
        Lora { a: be.upload(&self.a), b: be.upload(&self.b) }
    }
}

impl<T> Lora<T> {
    /// Zeros of the same shapes on the backend.
    pub fn zeros_on<B: Backward<T = T>>(&self, be: &B) -> Lora<T> {
        let (ar, ac) = be.dims(&self.a);
        let (br, bc) = be.dims(&self.b);
        Lora { a: be.zeros(ar, ac), b: be.zeros(br, bc) }
    }

    /// The factors back on the host.
    pub async fn download<B: Backend<T = T>>(&self, be: &B) -> Result<Lora> {
        Ok(Lora { a: be.download(&self.a).await?, b: be.download(&self.b).await? })
    }
}

/// Which LoRA (an index into a slice of `Lora`) each module runs with, by module name
/// (`layers.0.self_attn.q_proj`, …, `lm_head`); modules not named run with their base weights.
pub type LoraIndex = HashMap<String, usize>;

/// The loss on a run of rows' logits: given the rows (of the batch) and their logits (rows, vocab),
/// the loss's share and its gradient with respect to those logits.
pub type LogitLoss<'a> = dyn FnMut(Range<usize>, &Mat) -> (f64, Mat) + 'a;

/// Rows of logits formed at once by the LM head (bounds the (rows, vocab) temporaries).
const HEAD_ROWS: usize = 256;

/// One linear module's LoRA factor x · aᵀ, kept for the backward pass.
struct LinearActs<T> {
    t: Option<T>,
}

struct LayerActs<T> {
    /// The residual stream entering the layer, (n, d).
    h: T,
    /// input_norm(h), the input of q/k/v.
    x1: T,
    qkv: Vec<LinearActs<T>>,
    /// q and k before their per-head norms (kept only where the layer has them).
    q_raw: Option<T>,
    k_raw: Option<T>,
    /// q, k after norms and rotation; v. (n, heads·hd), (n, kv_heads·hd) ×2.
    q: T,
    k: T,
    v: T,
    /// Attention output, the input of o, (n, heads·hd).
    att: T,
    o: LinearActs<T>,
    /// o's output before the attention-output norm (where the layer has one).
    o_raw: Option<T>,
    /// The residual after attention, (n, d).
    h_mid: T,
    /// mlp_norm(h_mid), the input of gate/up.
    x2: T,
    gate_up: Vec<LinearActs<T>>,
    /// gate before and after its activation, up; (n, ff).
    gate: T,
    act_gate: T,
    up: T,
    /// act(gate) ⊙ up, the input of down.
    z: T,
    down: LinearActs<T>,
    down_raw: Option<T>,
}

/// A forward pass's kept activations, up to the final hidden states (the LM head runs by runs
/// of rows: `logits`).
pub struct Activations<T> {
    layers: Vec<LayerActs<T>>,
    /// The residual entering the final norm, and the final hidden states (n, d).
    h_last: T,
    hf: T,
    rows: usize,
}

impl<T> Activations<T> {
    /// The runs of rows `logits` forms at once.
    pub fn head_runs(&self) -> impl Iterator<Item = Range<usize>> {
        let n = self.rows;
        (0..n).step_by(HEAD_ROWS).map(move |s| s..(s + HEAD_ROWS).min(n))
    }
}

/// A copy of x.
fn copy<B: Backend>(be: &B, x: &B::T) -> B::T {
    let n = be.dims(x).0;
    be.mix_rows(x, 0..n, 1.0, x, 0..n, 0.0)
}

/// The decoder's forward pass over `batch` (every sequence attending within itself), each module
/// named in `index` running with its LoRA, up to the final hidden states. Nothing is read back.
pub fn forward<B: Backward>(
    be: &B,
    model: &Decoder<B::T>,
    batch: &Batch,
    index: &LoraIndex,
    loras: &[Lora<B::T>],
) -> Activations<B::T> {
    let n = batch.tokens();
    let lora = |name: &str| -> Option<&Lora<B::T>> { index.get(name).map(|&i| &loras[i]) };
    let mut h = be.select_rows(&model.embed, &batch.ids);
    if let Some(s) = model.embed_scale {
        be.scale(&mut h, s);
    }
    let mut layers = Vec::with_capacity(model.layers.len());
    for l in &model.layers {
        let x1 = be.rms_norm(&h, &l.input_norm, model.eps);
        let (mut parts, qkv) = proj_forward(be, &l.qkv, &x1, index, loras);
        let (v, mut k, mut q) = (parts.pop().unwrap(), parts.pop().unwrap(), parts.pop().unwrap());
        let q_raw = norm_in_place(be, &mut q, l.q_norm.as_ref(), model.eps);
        let k_raw = norm_in_place(be, &mut k, l.k_norm.as_ref(), model.eps);
        if let Some(r) = l.rotary.map(|r| &model.rotaries[r]) {
            rotate(be, &mut q, batch, l.attn.head_dim, r);
            rotate(be, &mut k, batch, l.attn.head_dim, r);
        }
        let att = be.attention(&q, &k, &v, &l.attn, &batch.seqs, &batch.seqs);
        let (mut o_out, o) = linear_forward(be, &l.o.r(), &att, lora(&l.o.name));
        let o_raw = norm_in_place(be, &mut o_out, l.attn_out_norm.as_ref(), model.eps);
        let mut h_mid = copy(be, &h);
        be.add_rows(&mut h_mid, 0..n, &o_out, 1.0);
        let x2 = be.rms_norm(&h_mid, &l.mlp_norm, model.eps);
        let (mut gu, gate_up) = proj_forward(be, &l.gate_up, &x2, index, loras);
        let (up, gate) = (gu.pop().unwrap(), gu.pop().unwrap());
        let mut act_gate = copy(be, &gate);
        be.activate(&mut act_gate, model.act);
        let mut z = copy(be, &act_gate);
        be.mul(&mut z, &up);
        let (mut m_out, down) = linear_forward(be, &l.down.r(), &z, lora(&l.down.name));
        let down_raw = norm_in_place(be, &mut m_out, l.mlp_out_norm.as_ref(), model.eps);
        let mut h_next = copy(be, &h_mid);
        be.add_rows(&mut h_next, 0..n, &m_out, 1.0);
        layers.push(LayerActs {
            h: std::mem::replace(&mut h, h_next),
            x1,
            qkv,
            q_raw,
            k_raw,
            q,
            k,
            v,
            att,
            o,
            o_raw,
            h_mid,
            x2,
            gate_up,
            gate,
            act_gate,
            up,
            z,
            down,
            down_raw,
        });
    }
    let hf = be.rms_norm(&h, &model.norm, model.eps);
    Activations { layers, h_last: h, hf, rows: n }
}

/// The logits of `rows` (one of `acts.head_runs()`), soft-capped where the model caps them.
pub fn logits<B: Backward>(
    be: &B,
    model: &Decoder<B::T>,
    acts: &Activations<B::T>,
    rows: Range<usize>,
    index: &LoraIndex,
    loras: &[Lora<B::T>],
) -> B::T {
    let head = model.head();
    let mut logits = be.matmul_t(&acts.hf, rows.clone(), head.w);
    if let Some(b) = head.b {
        be.add_bias(&mut logits, b);
    }
    if let Some(lo) = index.get(head.name).map(|&i| &loras[i]) {
        be.add_lowrank(&mut logits, 0..rows.len(), &acts.hf, rows, &lo.a, &lo.b, 1.0);
    }
    if let Some(cap) = model.final_softcap {
        be.scale(&mut logits, 1.0 / cap);
        be.activate(&mut logits, crate::backend::Activation::Tanh);
        be.scale(&mut logits, cap);
    }
    logits
}

/// The forward pass over `batch`, handing each run of rows' logits, read back, to `each`.
pub async fn each_logits<B: Backward>(
    be: &B,
    model: &Decoder<B::T>,
    batch: &Batch,
    index: &LoraIndex,
    loras: &[Lora<B::T>],
    each: &mut dyn FnMut(Range<usize>, &Mat),
) -> Result<()> {
    let acts = forward(be, model, batch, index, loras);
    for rows in acts.head_runs() {
        let l = be.download(&logits(be, model, &acts, rows.clone(), index, loras)).await?;
        each(rows, &l);
    }
    Ok(())
}

/// The loss `loss` puts on the logits of `batch`, its gradient with respect to every LoRA in
/// `loras` added into `grads` (the same shapes, in the same order).
pub async fn add_loss_and_grads<B: Backward>(
    be: &B,
    model: &Decoder<B::T>,
    batch: &Batch,
    index: &LoraIndex,
    loras: &[Lora<B::T>],
    loss: &mut LogitLoss<'_>,
    grads: &mut [Lora<B::T>],
) -> Result<f64> {
    let acts = forward(be, model, batch, index, loras);
    let mut total = 0.0;
    let mut dlogits = Vec::new();
    for rows in acts.head_runs() {
        let y = be.download(&logits(be, model, &acts, rows.clone(), index, loras)).await?;
        let (l, mut g) = loss(rows.clone(), &y);
        total += l;
        if let Some(cap) = model.final_softcap {
            // y = cap·tanh(x/cap): dy/dx = 1 − (y/cap)².
            g.data.iter_mut().zip(&y.data).for_each(|(g, y)| *g *= 1.0 - (y / cap) * (y / cap));
        }
        dlogits.push((rows, be.upload(&g)));
    }
    backward(be, model, batch, &acts, &dlogits, index, loras, grads);
    Ok(total)
}

/// `add_loss_and_grads` into new accumulators: the loss and every LoRA's gradient.
pub async fn loss_and_grads<B: Backward>(
    be: &B,
    model: &Decoder<B::T>,
    batch: &Batch,
    index: &LoraIndex,
    loras: &[Lora<B::T>],
    loss: &mut LogitLoss<'_>,
) -> Result<(f64, Vec<Lora<B::T>>)> {
    let mut grads: Vec<Lora<B::T>> = loras.iter().map(|l| l.zeros_on(be)).collect();
    let total = add_loss_and_grads(be, model, batch, index, loras, loss, &mut grads).await?;
    Ok((total, grads))
}

/// The backward pass from the logits' gradients (one per run of rows, as `head_runs` gives them)
/// to every LoRA's factors, added into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backward>(
    be: &B,
    model: &Decoder<B::T>,
    batch: &Batch,
    acts: &Activations<B::T>,
    dlogits: &[(Range<usize>, B::T)],
    index: &LoraIndex,
    loras: &[Lora<B::T>],
    grads: &mut [Lora<B::T>],
) {
    let n = batch.tokens();
    let lora = |l: &Linear<B::T>| index.get(&l.name).copied();

    // LM head: dhf = dlogits · W (+ the LoRA's share), run by run.
    let head = model.head();
    let head_lora = index.get(head.name).copied();
    let mut dhf = be.zeros(n, model.d);
    for (rows, g) in dlogits {
        let idx: Vec<u32> = (rows.start as u32..rows.end as u32).collect();
        let x = be.select_rows(&acts.hf, &idx);
        let t = head_lora.map(|i| be.matmul_t(&x, 0..rows.len(), &loras[i].a));
        let dx = linear_backward(be, &head, g, &x, t.as_ref(), head_lora, loras, grads);
        be.add_rows(&mut dhf, rows.clone(), &dx, 1.0);
    }
    let mut dh = be.rms_norm_backward(&acts.h_last, &model.norm, model.eps, &dhf);

    for (l, a) in model.layers.iter().zip(&acts.layers).rev() {
        // MLP: h_next = h_mid + [norm](down(act(gate) ⊙ up)).
        let normed = norm_backward(be, l.mlp_out_norm.as_ref(), a.down_raw.as_ref(), model.eps, &dh);
        let dm = normed.as_ref().unwrap_or(&dh);
        let dz = linear_backward(be, &l.down.r(), dm, &a.z, a.down.t.as_ref(), lora(&l.down), loras, grads);
        let (dgate, dup) = be.gate_backward(&a.gate, &a.act_gate, &a.up, &dz, model.act);
        let dx2 = proj_backward(be, &l.gate_up, vec![dgate, dup], &a.x2, &a.gate_up, index, loras, grads);
        let mut dh_mid = be.rms_norm_backward(&a.h_mid, &l.mlp_norm, model.eps, &dx2);
        be.add_rows(&mut dh_mid, 0..n, &dh, 1.0);

        // Attention: h_mid = h + [norm](o(attention(q, k, v))).
        let normed = norm_backward(be, l.attn_out_norm.as_ref(), a.o_raw.as_ref(), model.eps, &dh_mid);
        let do_ = normed.as_ref().unwrap_or(&dh_mid);
        let datt = linear_backward(be, &l.o.r(), do_, &a.att, a.o.t.as_ref(), lora(&l.o), loras, grads);
        let (mut dq, mut dk, dv) = be.attention_backward(&a.q, &a.k, &a.v, &datt, &l.attn, &batch.seqs);
        if let Some(r) = l.rotary.map(|r| &model.rotaries[r]) {
            // The rotation is orthogonal up to its scale: its transpose turns by the opposite angle.
            let back = reversed(r);
            rotate(be, &mut dq, batch, l.attn.head_dim, &back);
            rotate(be, &mut dk, batch, l.attn.head_dim, &back);
        }
        if let Some(d) = norm_backward(be, l.q_norm.as_ref(), a.q_raw.as_ref(), model.eps, &dq) {
            dq = d;
        }
        if let Some(d) = norm_backward(be, l.k_norm.as_ref(), a.k_raw.as_ref(), model.eps, &dk) {
            dk = d;
        }
        let dx1 = proj_backward(be, &l.qkv, vec![dq, dk, dv], &a.x1, &a.qkv, index, loras, grads);
        dh = be.rms_norm_backward(&a.h, &l.input_norm, model.eps, &dx1);
        be.add_rows(&mut dh, 0..n, &dh_mid, 1.0);
    }
}

/// RMSNorm y in place where the layer has the norm (γ); the pre-norm y, which the backward
/// pass reads.
fn norm_in_place<B: Backend>(be: &B, y: &mut B::T, gamma: Option<&B::T>, eps: f32) -> Option<B::T> {
    let normed = be.rms_norm(y, gamma?, eps);
    Some(std::mem::replace(y, normed))
}

/// The gradient through `norm_in_place`'s optional norm: None where the layer has none (dy
/// passes unchanged), else the gradient at its input `raw`.
fn norm_backward<B: Backward>(be: &B, gamma: Option<&B::T>, raw: Option<&B::T>, eps: f32, dy: &B::T) -> Option<B::T> {
    Some(be.rms_norm_backward(raw?, gamma?, eps, dy))
}

/// y = x · Wᵀ (+ b) (+ (x · aᵀ) · bᵀ).
fn linear_forward<B: Backend>(
    be: &B,
    l: &LinearRef<B::T>,
    x: &B::T,
    lora: Option<&Lora<B::T>>,
) -> (B::T, LinearActs<B::T>) {
    let n = be.dims(x).0;
    let mut y = be.matmul_t(x, 0..n, l.w);
    if let Some(b) = l.b {
        be.add_bias(&mut y, b);
    }
    let t = lora.map(|lo| be.add_lowrank(&mut y, 0..n, x, 0..n, &lo.a, &lo.b, 1.0));
    (y, LinearActs { t })
}

/// The parts' outputs of a stage (q, k, v; gate, up), split where the modules are fused.
fn proj_forward<B: Backend>(
    be: &B,
    p: &Proj<B::T>,
    x: &B::T,
    index: &LoraIndex,
    loras: &[Lora<B::T>],
) -> (Vec<B::T>, Vec<LinearActs<B::T>>) {
    let (ys, acts): (Vec<B::T>, Vec<LinearActs<B::T>>) =
        p.mods.iter().map(|m| linear_forward(be, &m.r(), x, index.get(&m.name).map(|&i| &loras[i]))).unzip();
    if p.mods.len() == p.widths.len() {
        return (ys, acts);
    }
    let mut at = 0;
    let parts = p
        .widths
        .iter()
        .map(|w| {
            at += w;
            be.slice_cols(&ys[0], at - w..at)
        })
        .collect();
    (parts, acts)
}

/// dx of a stage from its parts' output gradients (joined where the modules are fused).
#[allow(clippy::too_many_arguments)]
fn proj_backward<B: Backward>(
    be: &B,
    p: &Proj<B::T>,
    dparts: Vec<B::T>,
    x: &B::T,
    acts: &[LinearActs<B::T>],
    index: &LoraIndex,
    loras: &[Lora<B::T>],
    grads: &mut [Lora<B::T>],
) -> B::T {
    let dys =
        if p.mods.len() == p.widths.len() { dparts } else { vec![be.concat_cols(&dparts.iter().collect::<Vec<_>>())] };
    let mut dx: Option<B::T> = None;
    for ((m, dy), a) in p.mods.iter().zip(&dys).zip(acts) {
        let d = linear_backward(be, &m.r(), dy, x, a.t.as_ref(), index.get(&m.name).copied(), loras, grads);
        match dx.as_mut() {
            None => dx = Some(d),
            Some(acc) => {
                let n = be.dims(&d).0;
                be.add_rows(acc, 0..n, &d, 1.0)
            }
        }
    }
    dx.expect("a stage has at least one module")
}

/// dx = dy · W + (dy · b) · a, and into the LoRA's gradient: ∂b += dyᵀ · t, ∂a += (dy · b)ᵀ · x,
/// with t = x · aᵀ kept by the forward pass.
#[allow(clippy::too_many_arguments)]
fn linear_backward<B: Backward>(
    be: &B,
    l: &LinearRef<B::T>,
    dy: &B::T,
    x: &B::T,
    t: Option<&B::T>,
    lora: Option<usize>,
    loras: &[Lora<B::T>],
    grads: &mut [Lora<B::T>],
) -> B::T {
    let mut dx = be.matmul(dy, l.w);
    if let (Some(i), Some(t)) = (lora, t) {
        let lo = &loras[i];
        let u = be.matmul(dy, &lo.b);
        be.add_matmul_tn(&mut grads[i].b, dy, t);
        be.add_matmul_tn(&mut grads[i].a, &u, x);
        let du = be.matmul(&u, &lo.a);
        let n = be.dims(&du).0;
        be.add_rows(&mut dx, 0..n, &du, 1.0);
    }
    dx
}

/// The rotation by the opposite angles (the transpose of `r`'s, scale kept).
fn reversed(r: &Rotary) -> Rotary {
    let neg = |f: &[f32]| f.iter().map(|v| -v).collect::<Vec<f32>>();
    let mut back = r.clone();
    back.inv_freq = neg(&r.inv_freq);
    if let Some(l) = back.long.as_mut() {
        l.inv_freq = neg(&l.inv_freq);
    }
    back
}
