//! Label-free distillation refinement (issue 26, point 3c). A closed-form merge fits each module
//! on its own, from the features the modules before it produce; nothing in it sees the whole
//! network's output. Refinement starts from that merge and takes a few steps of Adam on the
//! merged LoRA's factors (a, b of every merged module; the base weights frozen), descending
//!
//!   L = Σ_i λ_i · mean over task i's token rows of KL(p_i ‖ p*) / Σ_i λ_i
//!
//! where p_i is adapter i's next-token distribution (base + ΔW_i) on task i's own samples — the
//! self-calibrated ones, so they hold the adapter's answers — computed once, and p* the merged
//! model's. No labels: the adapters are the teachers. Each step is one forward and one backward
//! pass over every sample (`models::decoder_grad`), in runs of at most `RUN_TOKENS` tokens whose
//! gradients add up to the full batch's; the iterate with the lowest L is kept, so refinement
//! never returns a merge worse on its own objective than the one it started from.
//!
//! Step sizes are relative: each factor moves by about `lr` times its own RMS per step (Adam
//! normalises the gradient's scale away), so one `lr` suits models and ranks of any scale.

use super::iteris::Target;
use super::solve::Merged;
use super::{now, Progress};
use crate::error::{Error, Result};
use crate::mat::Mat;
use crate::models::decoder::Decoder;
use crate::models::decoder_grad::{self, Lora, LoraIndex};
use crate::models::{Batch, Stream};
use std::ops::Range;

/// Token rows one forward/backward run holds (bounds the kept activations).
pub const RUN_TOKENS: usize = 512;

/// What refinement did, for `merge_report.json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Refinement {
    pub steps: usize,
    pub lr: f64,
    /// L (nats per token) at each iterate: the closed-form merge, then after each step.
    pub kl: Vec<f64>,
    /// Which iterate the merge keeps (the lowest L).
    pub kept: usize,
    pub seconds: f64,
}

/// Adapter `task`'s LoRAs at the modules it targets, scales folded into b.
pub fn adapter_loras(targets: &[Target], task: usize) -> (LoraIndex, Vec<Lora>) {
    let mut index = LoraIndex::new();
    let mut loras = Vec::new();
    for t in targets {
        if let Some(l) = &t.loras[task] {
            let mut b = l.b.clone();
            b.data.iter_mut().for_each(|v| *v *= l.scale);
            index.insert(t.name.clone(), loras.len());
            loras.push(Lora { a: l.a.clone(), b });
        }
    }
    (index, loras)
}

/// The merged deltas as LoRAs, one per target, in the targets' order.
pub fn merged_loras(targets: &[Target], merged: &[Merged]) -> (LoraIndex, Vec<Lora>) {
    let index = targets.iter().enumerate().map(|(k, t)| (t.name.clone(), k)).collect();
    (index, merged.iter().map(|m| Lora { a: m.a.clone(), b: m.b.clone() }).collect())
}

/// Consecutive runs of samples of at most `RUN_TOKENS` tokens (a longer sample runs alone).
fn runs(samples: &[Vec<u32>]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, s) in samples.iter().enumerate() {
        if i > start && sum + s.len() > RUN_TOKENS {
            out.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += s.len();
    }
    if start < samples.len() {
        out.push(start..samples.len());
    }
    out
}

/// One run of one task's samples, with the teacher's log-probabilities of its rows.
struct Run {
    batch: Batch,
    /// (rows, vocab)
    teacher: Mat,
    /// The weight of each of its rows in L: λ_i / (rows of task i · Σλ).
    weight: f64,
}

fn log_softmax_into(row: &[f32], out: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    out.iter_mut().zip(row).for_each(|(o, &v)| *o = (v as f64 - lse) as f32);
}

/// The weighted KL of one run's logits against its teacher, and its gradient w·(q − p).
fn kl_and_grad(run: &Run, rows: Range<usize>, logits: &Mat) -> (f64, Mat) {
    let v = logits.cols;
    let mut grad = Mat::zeros(logits.rows, v);
    let mut lq = vec![0.0f32; v];
    let mut total = 0.0;
    for (r, row) in rows.clone().enumerate() {
        log_softmax_into(logits.row(r), &mut lq);
        let lp = run.teacher.row(row);
        let mut kl = 0.0f64;
        for ((g, &p_log), &q_log) in grad.data[r * v..(r + 1) * v].iter_mut().zip(lp).zip(&lq) {
            let p = (p_log as f64).exp();
            kl += p * (p_log as f64 - q_log as f64);
            *g = (run.weight * ((q_log as f64).exp() - p)) as f32;
        }
        total += run.weight * kl;
    }
    (total, grad)
}

/// Adam's state for one tensor.
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    /// This tensor's step size: lr · its initial RMS.
    step: f32,
}

impl Moments {
    fn new(p: &Mat, lr: f64) -> Moments {
        let rms = (p.data.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / p.data.len().max(1) as f64).sqrt();
        Moments { m: vec![0.0; p.data.len()], v: vec![0.0; p.data.len()], step: (lr * rms.max(1e-8)) as f32 }
    }

    /// One Adam update of p by its gradient g (β = 0.9, 0.999), at step t (from 1).
    fn update(&mut self, p: &mut Mat, g: &Mat, t: i32) {
        let (b1, b2) = (0.9f32, 0.999f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (((p, &g), m), v) in p.data.iter_mut().zip(&g.data).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = (*v / c2).sqrt() + 1e-12;
            *p -= self.step * (*m / c1) / denom;
        }
    }
}

/// The distillation objective L over fixed samples, the teachers' distributions held.
pub struct Distillation {
    runs: Vec<Run>,
}

impl Distillation {
    /// The teachers' log-probabilities on `ids[i]` (task i's samples) under adapter i, and the
    /// rows' weights for the task weights `weights` (λ_i).
    pub fn new(model: &Decoder<Mat>, targets: &[Target], ids: &[Vec<Vec<u32>>], weights: &[f64]) -> Distillation {
        let total_weight: f64 = weights.iter().sum();
        let mut runs_all = Vec::new();
        for (task, samples) in ids.iter().enumerate() {
            let (index, loras) = adapter_loras(targets, task);
            let rows: usize = samples.iter().map(Vec::len).sum();
            for run in runs(samples) {
                let mut batch = Batch::default();
                batch.push_group(task, Stream::Merged, &samples[run]);
                let v = model.vocab;
                let mut teacher = Mat::zeros(batch.tokens(), v);
                decoder_grad::forward(model, &batch, &index, &loras, &mut |rows, logits| {
                    for (r, row) in rows.enumerate() {
                        log_softmax_into(logits.row(r), &mut teacher.data[row * v..(row + 1) * v]);
                    }
                });
                let weight = weights[task] / (rows.max(1) as f64 * total_weight);
                runs_all.push(Run { batch, teacher, weight });
            }
        }
        Distillation { runs: runs_all }
    }

    /// L for the student LoRAs `loras` (at the modules `index` names) and its gradient.
    pub fn loss_and_grads(&self, model: &Decoder<Mat>, index: &LoraIndex, loras: &[Lora]) -> (f64, Vec<Lora>) {
        let mut loss = 0.0;
        let mut grads: Vec<Lora> = loras.iter().map(Lora::zeros_like).collect();
        for run in &self.runs {
            let (l, g) = decoder_grad::loss_and_grads(model, &run.batch, index, loras, &mut |rows, logits| {
                kl_and_grad(run, rows, logits)
            });
            loss += l;
            for (acc, g) in grads.iter_mut().zip(g) {
                acc.a.data.iter_mut().zip(&g.a.data).for_each(|(a, g)| *a += g);
                acc.b.data.iter_mut().zip(&g.b.data).for_each(|(a, g)| *a += g);
            }
        }
        (loss, grads)
    }
}

/// Refine `merged` in place by `steps` steps of distillation at relative step size `lr` (see the
/// module's comment). `ids[i]` are task i's samples, `weights` the λ_i.
#[allow(clippy::too_many_arguments)]
pub fn refine(
    model: &Decoder<Mat>,
    targets: &[Target],
    merged: &mut [Merged],
    ids: &[Vec<Vec<u32>>],
    weights: &[f64],
    steps: usize,
    lr: f64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Refinement> {
    let t0 = now();
    let objective = Distillation::new(model, targets, ids, weights);
    let (index, mut loras) = merged_loras(targets, merged);
    let mut moments: Vec<(Moments, Moments)> =
        loras.iter().map(|l| (Moments::new(&l.a, lr), Moments::new(&l.b, lr))).collect();
    let mut kl = Vec::with_capacity(steps + 1);
    let mut best = (f64::INFINITY, 0, loras.clone());
    for step in 0..=steps {
        progress(Progress::Pass(step + 1, steps + 1, "distillation refinement"));
        let (loss, grads) = objective.loss_and_grads(model, &index, &loras);
        if !loss.is_finite() {
            return Err(Error::Numeric(format!(
                "distillation refinement diverged at step {step} (the KL is not finite): lower --refine-lr"
            )));
        }
        kl.push(loss);
        if loss < best.0 {
            best = (loss, step, loras.clone());
        }
        if step == steps {
            break;
        }
        for ((l, g), (ma, mb)) in loras.iter_mut().zip(&grads).zip(&mut moments) {
            ma.update(&mut l.a, &g.a, step as i32 + 1);
            mb.update(&mut l.b, &g.b, step as i32 + 1);
        }
    }
    let (_, kept, loras) = best;
    for (m, l) in merged.iter_mut().zip(loras) {
        m.a = l.a;
        m.b = l.b;
    }
    Ok(Refinement { steps, lr, kl, kept, seconds: now() - t0 })
}
