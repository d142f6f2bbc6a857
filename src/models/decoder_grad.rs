//! The decoder's forward pass with its activations kept, and the backward pass from a loss on
//! the logits to the factors of LoRAs at its linear modules: what label-free distillation
//! (`merge::refine`) descends on. The base weights are frozen: gradients flow through them to
//! the activations but are never formed for them.
//!
//! CPU only, in f32, over `Decoder<Mat>` (every family `decoder.rs` holds: Llama, Mistral,
//! Qwen2/3, SmolLM3, Gemma 2/3, Phi-3), mirroring `Decoder::forward` op for op: a test checks
//! its logits against the engine's forward and its gradients against finite differences and
//! against PyTorch's autograd (`tools/make_refine_fixture.py`). The GPU gets the same pass through
//! the backend interface later (issue 26, point 3c); until then a GPU merge refines on the CPU.
//!
//! Shapes: n token rows (every sequence of the batch, concatenated), d hidden, r a LoRA's rank.

use super::decoder::{rotate, Decoder, Proj};
use super::rope::Rotary;
use super::{Batch, Linear, LinearRef};
use crate::backend::cpu::gemm::{self, View};
use crate::backend::cpu::Cpu;
use crate::backend::{Activation, AttentionSpec, Backend};
use crate::mat::Mat;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

/// A LoRA at one module, its scale folded into b: Δy = (x · aᵀ) · bᵀ.
#[derive(Clone, Debug)]
pub struct Lora {
    /// (r, in)
    pub a: Mat,
    /// (out, r)
    pub b: Mat,
}

impl Lora {
    /// Zeros of the same shapes (a gradient accumulator).
    pub fn zeros_like(&self) -> Lora {
        Lora { a: Mat::zeros(self.a.rows, self.a.cols), b: Mat::zeros(self.b.rows, self.b.cols) }
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

/// One linear module's input and its LoRA's low-rank factor x · aᵀ, kept for the backward pass.
struct LinearActs {
    t: Option<Mat>,
}

struct LayerActs {
    /// The residual stream entering the layer, (n, d).
    h: Mat,
    /// input_norm(h), the input of q/k/v.
    x1: Mat,
    qkv: Vec<LinearActs>,
    /// q and k before their per-head norms (kept only where the layer has them).
    q_raw: Option<Mat>,
    k_raw: Option<Mat>,
    /// q, k after norms and rotation; v. (n, heads·hd), (n, kv_heads·hd) ×2.
    q: Mat,
    k: Mat,
    v: Mat,
    /// Attention output, the input of o, (n, heads·hd).
    att: Mat,
    o: LinearActs,
    /// o's output before the attention-output norm (where the layer has one).
    o_raw: Option<Mat>,
    /// The residual after attention, (n, d).
    h_mid: Mat,
    /// mlp_norm(h_mid), the input of gate/up.
    x2: Mat,
    gate_up: Vec<LinearActs>,
    /// gate before and after its activation, up; (n, ff).
    gate: Mat,
    act_gate: Mat,
    up: Mat,
    /// act(gate) ⊙ up, the input of down.
    z: Mat,
    down: LinearActs,
    down_raw: Option<Mat>,
}

/// A forward pass's kept activations.
pub struct Activations {
    layers: Vec<LayerActs>,
    /// The residual entering the final norm, and the final hidden states (n, d).
    h_last: Mat,
    hf: Mat,
    head: LinearActs,
}

/// The decoder's forward pass over `batch` (every sequence attending within itself), each module
/// named in `index` running with its LoRA. Returns the activations the backward pass reads and
/// hands the logits to `each`, `HEAD_ROWS` rows at a time.
pub fn forward(
    model: &Decoder<Mat>,
    batch: &Batch,
    index: &LoraIndex,
    loras: &[Lora],
    each: &mut dyn FnMut(Range<usize>, &Mat),
) -> Activations {
    let be = &Cpu;
    let n = batch.tokens();
    let lora = |name: &str| -> Option<&Lora> { index.get(name).map(|&i| &loras[i]) };
    let mut h = be.select_rows(&model.embed, &batch.ids);
    if let Some(s) = model.embed_scale {
        be.scale(&mut h, s);
    }
    let mut layers = Vec::with_capacity(model.layers.len());
    for l in &model.layers {
        let x1 = be.rms_norm(&h, &l.input_norm, model.eps);
        let (mut parts, qkv) = proj_forward(&l.qkv, &x1, index, loras);
        let v = parts.pop().unwrap();
        let mut k = parts.pop().unwrap();
        let mut q = parts.pop().unwrap();
        let q_raw = norm_in_place(&mut q, l.q_norm.as_ref(), model.eps);
        let k_raw = norm_in_place(&mut k, l.k_norm.as_ref(), model.eps);
        if let Some(r) = l.rotary.map(|r| &model.rotaries[r]) {
            rotate(be, &mut q, batch, l.attn.head_dim, r);
            rotate(be, &mut k, batch, l.attn.head_dim, r);
        }
        let att = be.attention(&q, &k, &v, &l.attn, &batch.seqs, &batch.seqs);
        let (mut o_out, o) = linear_forward(&l.o.r(), &att, lora(&l.o.name));
        let o_raw = norm_in_place(&mut o_out, l.attn_out_norm.as_ref(), model.eps);
        let mut h_mid = h.clone();
        be.add_rows(&mut h_mid, 0..n, &o_out, 1.0);
        let x2 = be.rms_norm(&h_mid, &l.mlp_norm, model.eps);
        let (mut gu, gate_up) = proj_forward(&l.gate_up, &x2, index, loras);
        let up = gu.pop().unwrap();
        let gate = gu.pop().unwrap();
        let mut act_gate = gate.clone();
        be.activate(&mut act_gate, model.act);
        let mut z = act_gate.clone();
        be.mul(&mut z, &up);
        let (mut m_out, down) = linear_forward(&l.down.r(), &z, lora(&l.down.name));
        let down_raw = norm_in_place(&mut m_out, l.mlp_out_norm.as_ref(), model.eps);
        let mut h_next = h_mid.clone();
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
    let head = model.head();
    // The head's LoRA factor for every row at once ((n, r) is small); its logits by runs of rows.
    let head_lora = lora(head.name);
    let head_t = head_lora.map(|lo| be.matmul_t(&hf, 0..n, &lo.a));
    for rows in row_runs(n) {
        let mut logits = be.matmul_t(&hf, rows.clone(), head.w);
        if let Some(b) = head.b {
            be.add_bias(&mut logits, b);
        }
        if let (Some(lo), Some(t)) = (head_lora, &head_t) {
            let c = View::rows(t.rows_data(rows.clone()), rows.len(), t.cols);
            gemm::matmul(&mut logits.data, c, view(&lo.b).t(), true);
        }
        if let Some(cap) = model.final_softcap {
            logits.data.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        each(rows, &logits);
    }
    Activations { layers, h_last: h, hf, head: LinearActs { t: head_t } }
}

/// The loss `loss` puts on the logits of `batch` and its gradient with respect to every LoRA in
/// `loras` (the same shapes, in the same order).
pub fn loss_and_grads(
    model: &Decoder<Mat>,
    batch: &Batch,
    index: &LoraIndex,
    loras: &[Lora],
    loss: &mut LogitLoss,
) -> (f64, Vec<Lora>) {
    let be = &Cpu;
    let n = batch.tokens();
    let mut total = 0.0;
    let mut dlogits: Vec<(Range<usize>, Mat)> = Vec::new();
    let acts = forward(model, batch, index, loras, &mut |rows, logits| {
        let (l, mut g) = loss(rows.clone(), logits);
        total += l;
        if let Some(cap) = model.final_softcap {
            // y = cap·tanh(x/cap): dy/dx = 1 − (y/cap)².
            g.data.iter_mut().zip(&logits.data).for_each(|(g, y)| *g *= 1.0 - (y / cap) * (y / cap));
        }
        dlogits.push((rows, g));
    });
    let mut grads: Vec<Lora> = loras.iter().map(Lora::zeros_like).collect();
    let lora = |l: &Linear<Mat>| index.get(&l.name).copied();

    // LM head: dhf = dlogits · W (+ the LoRA's share).
    let head = model.head();
    let head_w = dense(head.w);
    let head = LinearRef { w: &*head_w, ..head };
    let mut dhf = Mat::zeros(n, model.d);
    for (rows, g) in &dlogits {
        let x = acts.hf.rows_of(rows.clone());
        let t = acts.head.t.as_ref().map(|t| t.rows_of(rows.clone()));
        let dx = linear_backward(&head, g, &x, t.as_ref(), index.get(head.name).copied(), loras, &mut grads);
        dhf.data[rows.start * model.d..rows.end * model.d].copy_from_slice(&dx.data);
    }
    let mut dh = rms_norm_backward(&acts.h_last, &model.norm, model.eps, &dhf);

    for (l, a) in model.layers.iter().zip(&acts.layers).rev() {
        // MLP: h_next = h_mid + [norm](down(act(gate) ⊙ up)).
        let dm = match (&l.mlp_out_norm, &a.down_raw) {
            (Some(g), Some(raw)) => rms_norm_backward(raw, g, model.eps, &dh),
            _ => dh.clone(),
        };
        let dz = linear_backward(&l.down.r(), &dm, &a.z, a.down.t.as_ref(), lora(&l.down), loras, &mut grads);
        let (mut dgate, mut dup) = (dz.clone(), dz);
        let pre = a.gate.data.iter().zip(&a.act_gate.data);
        for ((dg, du), ((&g, &f), &u)) in dgate.data.iter_mut().zip(dup.data.iter_mut()).zip(pre.zip(&a.up.data)) {
            *dg *= u * slope(model.act, g, f);
            *du *= f;
        }
        let dx2 = proj_backward(&l.gate_up, vec![dgate, dup], &a.x2, &a.gate_up, index, loras, &mut grads);
        let mut dh_mid = rms_norm_backward(&a.h_mid, &l.mlp_norm, model.eps, &dx2);
        be.add_rows(&mut dh_mid, 0..n, &dh, 1.0);

        // Attention: h_mid = h + [norm](o(attention(q, k, v))).
        let do_ = match (&l.attn_out_norm, &a.o_raw) {
            (Some(g), Some(raw)) => rms_norm_backward(raw, g, model.eps, &dh_mid),
            _ => dh_mid.clone(),
        };
        let datt = linear_backward(&l.o.r(), &do_, &a.att, a.o.t.as_ref(), lora(&l.o), loras, &mut grads);
        let (mut dq, mut dk, dv) = attention_backward(&a.q, &a.k, &a.v, &datt, &l.attn, &batch.seqs);
        if let Some(r) = l.rotary.map(|r| &model.rotaries[r]) {
            // The rotation is orthogonal up to its scale: its transpose turns by the opposite angle.
            let back = reversed(r);
            rotate(be, &mut dq, batch, l.attn.head_dim, &back);
            rotate(be, &mut dk, batch, l.attn.head_dim, &back);
        }
        if let (Some(g), Some(raw)) = (&l.q_norm, &a.q_raw) {
            dq = rms_norm_backward(raw, g, model.eps, &dq);
        }
        if let (Some(g), Some(raw)) = (&l.k_norm, &a.k_raw) {
            dk = rms_norm_backward(raw, g, model.eps, &dk);
        }
        let dx1 = proj_backward(&l.qkv, vec![dq, dk, dv], &a.x1, &a.qkv, index, loras, &mut grads);
        dh = rms_norm_backward(&a.h, &l.input_norm, model.eps, &dx1);
        be.add_rows(&mut dh, 0..n, &dh_mid, 1.0);
    }
    (total, grads)
}

/// RMSNorm y in place where the layer has the norm (γ); the pre-norm y, which the backward
/// pass reads.
fn norm_in_place(y: &mut Mat, gamma: Option<&Mat>, eps: f32) -> Option<Mat> {
    let normed = Cpu.rms_norm(y, gamma?, eps);
    Some(std::mem::replace(y, normed))
}

/// Consecutive runs of at most `HEAD_ROWS` rows.
fn row_runs(n: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(HEAD_ROWS).map(move |s| s..(s + HEAD_ROWS).min(n))
}

/// y = x · Wᵀ (+ b) (+ (x · aᵀ) · bᵀ).
fn linear_forward(l: &LinearRef<Mat>, x: &Mat, lora: Option<&Lora>) -> (Mat, LinearActs) {
    let be = &Cpu;
    let mut y = be.matmul_t(x, 0..x.rows, l.w);
    if let Some(b) = l.b {
        be.add_bias(&mut y, b);
    }
    let t = lora.map(|lo| be.add_lowrank(&mut y, 0..x.rows, x, 0..x.rows, &lo.a, &lo.b, 1.0));
    (y, LinearActs { t })
}

/// The parts' outputs of a stage (q, k, v; gate, up), split where the modules are fused.
fn proj_forward(p: &Proj<Mat>, x: &Mat, index: &LoraIndex, loras: &[Lora]) -> (Vec<Mat>, Vec<LinearActs>) {
    let (ys, acts): (Vec<Mat>, Vec<LinearActs>) =
        p.mods.iter().map(|m| linear_forward(&m.r(), x, index.get(&m.name).map(|&i| &loras[i]))).unzip();
    if p.mods.len() == p.widths.len() {
        return (ys, acts);
    }
    let mut at = 0;
    let parts = p
        .widths
        .iter()
        .map(|w| {
            at += w;
            Cpu.slice_cols(&ys[0], at - w..at)
        })
        .collect();
    (parts, acts)
}

/// dx of a stage from its parts' output gradients (joined where the modules are fused).
fn proj_backward(
    p: &Proj<Mat>,
    dparts: Vec<Mat>,
    x: &Mat,
    acts: &[LinearActs],
    index: &LoraIndex,
    loras: &[Lora],
    grads: &mut [Lora],
) -> Mat {
    let dys = if p.mods.len() == p.widths.len() { dparts } else { vec![Mat::hcat(&dparts)] };
    let mut dx = Mat::zeros(x.rows, x.cols);
    for ((m, dy), a) in p.mods.iter().zip(&dys).zip(acts) {
        let d = linear_backward(&m.r(), dy, x, a.t.as_ref(), index.get(&m.name).copied(), loras, grads);
        Cpu.add_rows(&mut dx, 0..x.rows, &d, 1.0);
    }
    dx
}

/// The weights as plain f32 (a CPU weight may be kept in f16/bf16).
fn dense(w: &Mat) -> Cow<'_, Mat> {
    if w.half.is_some() {
        Cow::Owned(w.to_f32())
    } else {
        Cow::Borrowed(w)
    }
}

fn view(m: &Mat) -> View<'_, f32> {
    View::rows(&m.data, m.rows, m.cols)
}

/// dx = dy · W + (dy · b) · a, and into the LoRA's gradient: ∂b += dyᵀ · t, ∂a += (dy · b)ᵀ · x,
/// with t = x · aᵀ kept by the forward pass.
fn linear_backward(
    l: &LinearRef<Mat>,
    dy: &Mat,
    x: &Mat,
    t: Option<&Mat>,
    lora: Option<usize>,
    loras: &[Lora],
    grads: &mut [Lora],
) -> Mat {
    let w = dense(l.w);
    let mut dx = Mat::new(dy.rows, w.cols, gemm::product(view(dy), view(&w)));
    if let (Some(i), Some(t)) = (lora, t) {
        let lo = &loras[i];
        let u = gemm::product(view(dy), view(&lo.b));
        let u = Mat::new(dy.rows, lo.b.cols, u);
        gemm::matmul(&mut grads[i].b.data, view(dy).t(), view(t), true);
        gemm::matmul(&mut grads[i].a.data, view(&u).t(), view(x), true);
        gemm::matmul(&mut dx.data, view(&u), view(&lo.a), true);
    }
    dx
}

/// dx of y = RMSNorm(x)·γ for every group of γ's width in each row (the whole row, or one head):
/// with ρ = 1/√(mean x² + ε) and g = γ ⊙ dy, dx = ρ·g − ρ³·x·(g·x)/width.
fn rms_norm_backward(x: &Mat, gamma: &Mat, eps: f32, dy: &Mat) -> Mat {
    let w = gamma.data.len();
    let mut dx = Mat::zeros(x.rows, x.cols);
    for ((x, dy), dx) in x.data.chunks(w).zip(dy.data.chunks(w)).zip(dx.data.chunks_mut(w)) {
        let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / w as f64;
        let rho = 1.0 / (ms + eps as f64).sqrt();
        let dot: f64 = x.iter().zip(dy).zip(&gamma.data).map(|((&x, &d), &g)| (x * g * d) as f64).sum();
        let c = rho * rho * rho * dot / w as f64;
        for (((o, &x), &d), &g) in dx.iter_mut().zip(x).zip(dy).zip(&gamma.data) {
            *o = (rho * (g * d) as f64 - c * x as f64) as f32;
        }
    }
    dx
}

/// f′(x) of an activation, given f(x) from the forward pass (SiLU's slope from it alone:
/// σ(x) = f/x, f′ = σ + f·(1 − σ); no exponential).
fn slope(act: Activation, x: f32, f: f32) -> f32 {
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

/// dq, dk, dv of causal self-attention within each sequence (`AttentionSpec`'s masking, window,
/// soft-capping and grouped-query heads). Recomputes each query's probabilities: with s_j the
/// (capped) scaled scores and p = softmax(s), dv_j += p_j·do, dp_j = do·v_j,
/// ds_j = p_j·(dp_j − Σ p·dp), and through the cap and the scale into dq and dk.
fn attention_backward(
    q: &Mat,
    k: &Mat,
    v: &Mat,
    dout: &Mat,
    spec: &AttentionSpec,
    seqs: &[Range<usize>],
) -> (Mat, Mat, Mat) {
    assert!(spec.causal, "attention_backward: causal self-attention only");
    let (hd, group) = (spec.head_dim, spec.heads / spec.kv_heads);
    let (mut dq, mut dk, mut dv) = (Mat::zeros(q.rows, q.cols), Mat::zeros(k.rows, k.cols), Mat::zeros(v.rows, v.cols));
    let mut p = Vec::new();
    let mut ds = Vec::new();
    for s in seqs {
        for h in 0..spec.heads {
            let (qc, kc) = (h * hd, (h / group) * hd);
            for i in s.clone() {
                let lo = spec.window.map_or(s.start, |w| (i + 1).saturating_sub(w).max(s.start));
                let qi = &q.row(i)[qc..qc + hd];
                p.clear();
                let mut raw = Vec::with_capacity(i + 1 - lo);
                for j in lo..=i {
                    let dot: f32 = qi.iter().zip(&k.row(j)[kc..kc + hd]).map(|(a, b)| a * b).sum();
                    let x = dot * spec.scale;
                    raw.push(x);
                    p.push(spec.softcap.map_or(x, |c| c * (x / c).tanh()));
                }
                let max = p.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                p.iter_mut().for_each(|v| *v = (*v - max).exp());
                let sum: f32 = p.iter().sum();
                p.iter_mut().for_each(|v| *v /= sum);
                let doi = &dout.row(i)[qc..qc + hd];
                ds.clear();
                for (jj, j) in (lo..=i).enumerate() {
                    ds.push(doi.iter().zip(&v.row(j)[kc..kc + hd]).map(|(a, b)| a * b).sum::<f32>());
                    let dvj = &mut dv.data[j * v.cols + kc..j * v.cols + kc + hd];
                    dvj.iter_mut().zip(doi).for_each(|(o, d)| *o += p[jj] * d);
                }
                let mean: f32 = p.iter().zip(&ds).map(|(a, b)| a * b).sum();
                for (jj, j) in (lo..=i).enumerate() {
                    let mut g = p[jj] * (ds[jj] - mean);
                    if let Some(c) = spec.softcap {
                        let t = (raw[jj] / c).tanh();
                        g *= 1.0 - t * t;
                    }
                    let g = g * spec.scale;
                    let (kj, dqi) = (&k.row(j)[kc..kc + hd], &mut dq.data[i * q.cols + qc..i * q.cols + qc + hd]);
                    dqi.iter_mut().zip(kj).for_each(|(o, kv)| *o += g * kv);
                    let dkj = &mut dk.data[j * k.cols + kc..j * k.cols + kc + hd];
                    dkj.iter_mut().zip(qi).for_each(|(o, qv)| *o += g * qv);
                }
            }
        }
    }
    (dq, dk, dv)
}
