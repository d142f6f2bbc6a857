//! Label-free distillation refinement (issue 26, point 3c). A closed-form merge fits each module
//! on its own, from the features the modules before it produce; nothing in it sees the whole
//! network's output. Refinement starts from that merge and takes steps of Adam on the merged
//! LoRA's factors (a, b of every merged module; the base weights frozen), descending
//!
//!   L = Σ_i λ_i · mean over task i's token rows of KL(p_i ‖ p*) / Σ_i λ_i
//!
//! where p_i is adapter i's next-token distribution (base + ΔW_i) on task i's samples and p* the
//! merged model's. No labels: the adapters are the teachers. Gradients come from one forward and
//! one backward pass (`models::decoder_grad`, on the merge's backend: CPU, GPU or the page), in runs of at most `RUN_TOKENS` tokens whose
//! gradients add up to the whole batch's.
//!
//! **Transfer data.** Distilled on its calibration samples alone, the merge memorises them: on the
//! demo (50 prompts per task) the KL on them falls to 0.003 nats while held-out prompts keep 0.36,
//! and the worst task's accuracy stays at 30%. The teachers answer any input, so refinement
//! distils on more inputs than it was given: `augment` recombines each task's prompts token by
//! token (a uniform crossover of two prompts of the task, aligned at both ends, so a shared frame
//! and the cue before the answer stay where they were), and each new prompt is extended by its
//! adapter's greedy answer, as self-calibration extends the given ones. Every step draws a fresh
//! minibatch of as many samples per task as were given from that pool (the steps cost what a
//! full-batch step on the given samples costs). Measured on the demo, 100 steps: worst task 28%
//! on the calibration samples alone, 50% with a pool of 5× (the default), 57% with 17×; 600
//! steps with 33× give 80%.
//!
//! Step sizes are relative: each factor moves by about `lr` times its own RMS per step (Adam
//! normalises the gradient's scale away), decayed along a cosine to 0 at the last step, so one
//! `lr` suits models and ranks of any scale. L over the whole pool is measured before and after;
//! where it rose, the closed-form merge is kept.

use super::baselines::SplitMix64;
use super::evaluate;
use super::iteris::Target;
use super::solve::Merged;
use super::{now, Progress};
use crate::backend::Backward;
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
    /// Samples per task distilled on: the given ones and the augmented (`augment`).
    pub pool_samples: Vec<usize>,
    /// L (nats per token) over the whole pool, of the closed-form merge and of the refined one.
    pub kl_before: f64,
    pub kl_after: f64,
    /// Whether the refined merge is kept (L fell), else the closed-form one.
    pub kept: bool,
    /// L on each step's minibatch, before its update.
    pub kl: Vec<f64>,
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

/// One run of samples of one task, with the teacher's log-probabilities of its rows.
struct Run {
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

/// The weighted KL of one run's logits against its teacher; with `grad`, also its gradient
/// w·(q − p) with respect to the logits, written there ((rows, vocab)).
fn kl(run: &Run, rows: Range<usize>, logits: &Mat, mut grad: Option<&mut Mat>) -> f64 {
    let v = logits.cols;
    let mut lq = vec![0.0f32; v];
    let mut total = 0.0;
    for (r, row) in rows.enumerate() {
        log_softmax_into(logits.row(r), &mut lq);
        let lp = run.teacher.row(row);
        let mut kl = 0.0f64;
        for (c, (&p_log, &q_log)) in lp.iter().zip(&lq).enumerate() {
            let p = (p_log as f64).exp();
            kl += p * (p_log as f64 - q_log as f64);
            if let Some(g) = grad.as_deref_mut() {
                g.data[r * v + c] = (run.weight * ((q_log as f64).exp() - p)) as f32;
            }
        }
        total += run.weight * kl;
    }
    total
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

    /// One Adam update of p by its gradient g (β = 0.9, 0.999), at step t (from 1);
    /// `decay` multiplies the step (the cosine schedule).
    fn update(&mut self, p: &mut Mat, g: &Mat, t: i32, decay: f32) {
        let (b1, b2) = (0.9f32, 0.999f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (((p, &g), m), v) in p.data.iter_mut().zip(&g.data).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = (*v / c2).sqrt() + 1e-12;
            *p -= decay * self.step * (*m / c1) / denom;
        }
    }
}

/// The distillation objective L: the teachers (each task's adapter) and the task weights; the
/// samples come with each evaluation (a step's minibatch, or the whole pool). The teachers'
/// distributions are computed run by run as each evaluation needs them, never held for every
/// sample: a (rows, vocab) table is 200 KB per token row at a 49k vocabulary, and a forward pass
/// costs a third of a step. Runs on any backend with the backward ops (`Backward`): the forward
/// and backward passes there, the logits' loss and gradient on the host.
pub struct Distillation<'a, B: Backward> {
    be: &'a B,
    model: &'a Decoder<B::T>,
    /// Per task: its adapter.
    teachers: Vec<Teacher<B::T>>,
}

/// One task's adapter: its LoRAs on the backend, and the task's share λ_i / Σλ of L.
struct Teacher<T> {
    index: LoraIndex,
    loras: Vec<Lora<T>>,
    share: f64,
}

impl<'a, B: Backward> Distillation<'a, B> {
    /// Adapter i teaches task i, at task weights `weights`.
    pub fn new(be: &'a B, model: &'a Decoder<B::T>, targets: &[Target], weights: &[f64]) -> Self {
        let total_weight: f64 = weights.iter().sum();
        let teachers = (0..weights.len())
            .map(|task| {
                let (index, loras) = adapter_loras(targets, task);
                let loras = loras.iter().map(|l| l.upload(be)).collect();
                Teacher { index, loras, share: weights[task] / total_weight }
            })
            .collect();
        Distillation { be, model, teachers }
    }

    /// Every run of `samples[i]` (task i's) as (task, batch, the weight of each of its rows).
    fn batches(&self, samples: &[Vec<Vec<u32>>]) -> Vec<(usize, Batch, f64)> {
        let mut out = Vec::new();
        for (task, samples) in samples.iter().enumerate() {
            let lens: Vec<usize> = samples.iter().map(Vec::len).collect();
            let weight = self.teachers[task].share / lens.iter().sum::<usize>().max(1) as f64;
            for run in evaluate::runs(&lens, RUN_TOKENS) {
                let mut batch = Batch::default();
                batch.push_group(task, Stream::Merged, &samples[run]);
                out.push((task, batch, weight));
            }
        }
        out
    }

    /// Task `task`'s teacher on one batch.
    async fn teacher(&self, task: usize, batch: &Batch, weight: f64) -> Result<Run> {
        let v = self.model.vocab;
        let Teacher { index, loras, .. } = &self.teachers[task];
        let mut teacher = Mat::zeros(batch.tokens(), v);
        decoder_grad::each_logits(self.be, self.model, batch, index, loras, &mut |rows, logits| {
            for (r, row) in rows.enumerate() {
                log_softmax_into(logits.row(r), &mut teacher.data[row * v..(row + 1) * v]);
            }
        })
        .await?;
        Ok(Run { teacher, weight })
    }

    /// L over `samples` for the student LoRAs `loras` (at the modules `index` names, on the
    /// backend) and its gradient, on the host.
    pub async fn loss_and_grads(
        &self,
        samples: &[Vec<Vec<u32>>],
        index: &LoraIndex,
        loras: &[Lora<B::T>],
    ) -> Result<(f64, Vec<Lora>)> {
        let mut loss = 0.0;
        let mut grads: Vec<Lora<B::T>> = loras.iter().map(|l| l.zeros_on(self.be)).collect();
        for (task, batch, weight) in self.batches(samples) {
            let run = self.teacher(task, &batch, weight).await?;
            let mut kl_of = |rows: Range<usize>, logits: &Mat| {
                let mut grad = Mat::zeros(logits.rows, logits.cols);
                (kl(&run, rows, logits, Some(&mut grad)), grad)
            };
            loss += decoder_grad::add_loss_and_grads(self.be, self.model, &batch, index, loras, &mut kl_of, &mut grads)
                .await?;
        }
        let mut host = Vec::with_capacity(grads.len());
        for g in &grads {
            host.push(g.download(self.be).await?);
        }
        Ok((loss, host))
    }

    /// L over `samples` alone (forward passes).
    pub async fn loss(&self, samples: &[Vec<Vec<u32>>], index: &LoraIndex, loras: &[Lora<B::T>]) -> Result<f64> {
        let mut loss = 0.0;
        for (task, batch, weight) in self.batches(samples) {
            let run = self.teacher(task, &batch, weight).await?;
            decoder_grad::each_logits(self.be, self.model, &batch, index, loras, &mut |rows, logits| {
                loss += kl(&run, rows, logits, None);
            })
            .await?;
        }
        Ok(loss)
    }
}

/// `per_prompt` new prompts per given prompt for each task (fewer where recombination runs out
/// of new ones): uniform crossovers of two of the task's prompts, token by token, the first half
/// of each new prompt aligned with the partner's start and the rest with its end (equal lengths
/// align everywhere). A prompt takes partners of its own length where the task has them. New
/// prompts are distinct from each other and from the given ones. Seeded: the same pool every run.
pub fn augment(prompts: &[Vec<Vec<u32>>], per_prompt: usize, seed: u64) -> Vec<Vec<Vec<u32>>> {
    let mut rng = SplitMix64(seed ^ 0x5E_ED0F_A116_u64);
    prompts
        .iter()
        .map(|given| {
            let seen: std::collections::HashSet<&[u32]> = given.iter().map(Vec::as_slice).collect();
            let mut out: Vec<Vec<u32>> = Vec::new();
            let want = given.len() * per_prompt;
            if given.len() < 2 {
                return out;
            }
            let mut fresh = Vec::new();
            for _ in 0..want * 20 {
                if out.len() + fresh.len() >= want {
                    break;
                }
                let s = &given[(rng.next_u64() % given.len() as u64) as usize];
                let same: Vec<&Vec<u32>> = given.iter().filter(|o| o.len() == s.len() && *o != s).collect();
                let o = if same.is_empty() {
                    &given[(rng.next_u64() % given.len() as u64) as usize]
                } else {
                    same[(rng.next_u64() % same.len() as u64) as usize]
                };
                if o == s || o.is_empty() {
                    continue;
                }
                let n = s.len();
                let child: Vec<u32> = (0..n)
                    .map(|p| {
                        let q = if p < n / 2 { p } else { (o.len() + p).checked_sub(n).unwrap_or(usize::MAX) };
                        match o.get(q) {
                            Some(&t) if rng.next_u64() & 1 == 1 => t,
                            _ => s[p],
                        }
                    })
                    .collect();
                if !seen.contains(child.as_slice()) && !fresh.contains(&child) {
                    fresh.push(child);
                }
            }
            out.extend(fresh);
            out
        })
        .collect()
}

/// Refine `merged` in place by `steps` steps of distillation at relative step size `lr` (see the
/// module's comment). `pool[i]` are task i's samples (given and augmented), of which each step
/// draws `batch[i]`; `weights` are the λ_i.
#[allow(clippy::too_many_arguments)]
pub async fn refine<B: Backward>(
    be: &B,
    model: &Decoder<B::T>,
    targets: &[Target],
    merged: &mut [Merged],
    pool: &[Vec<Vec<u32>>],
    batch: &[usize],
    weights: &[f64],
    steps: usize,
    lr: f64,
    seed: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Refinement> {
    let t0 = now();
    let (index, mut loras) = merged_loras(targets, merged);
    let start = loras.clone();
    let objective = Distillation::new(be, model, targets, weights);
    // The student on the backend, overwritten after each step's update (on the GPU its buffers
    // stay the same, so the passes' bind groups are reused).
    let mut student: Vec<Lora<B::T>> = loras.iter().map(|l| l.upload(be)).collect();
    let before = objective.loss(pool, &index, &student).await?;
    let mut moments: Vec<(Moments, Moments)> =
        loras.iter().map(|l| (Moments::new(&l.a, lr), Moments::new(&l.b, lr))).collect();
    let mut rng = SplitMix64(seed);
    let mut order: Vec<Vec<usize>> = pool.iter().map(|p| (0..p.len()).collect()).collect();
    let mut at = vec![usize::MAX; pool.len()];
    let mut kl = Vec::with_capacity(steps);
    for step in 0..steps {
        progress(Progress::Pass(step + 1, steps, "distillation refinement"));
        // Each task's next minibatch: the pool in a shuffled order, reshuffled once used up.
        let drawn: Vec<Vec<Vec<u32>>> = (0..pool.len())
            .map(|i| {
                let take = batch[i].min(pool[i].len());
                (0..take)
                    .map(|_| {
                        if at[i] >= order[i].len() {
                            shuffle(&mut order[i], &mut rng);
                            at[i] = 0;
                        }
                        at[i] += 1;
                        pool[i][order[i][at[i] - 1]].clone()
                    })
                    .collect()
            })
            .collect();
        let (loss, grads) = objective.loss_and_grads(&drawn, &index, &student).await?;
        if !loss.is_finite() {
            return Err(Error::Numeric(format!(
                "distillation refinement diverged at step {step} (the KL is not finite): lower --refine-lr"
            )));
        }
        kl.push(loss);
        let scale = (0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos())) as f32;
        for ((l, g), (ma, mb)) in loras.iter_mut().zip(&grads).zip(&mut moments) {
            ma.update(&mut l.a, &g.a, step as i32 + 1, scale);
            mb.update(&mut l.b, &g.b, step as i32 + 1, scale);
        }
        for (dev, l) in student.iter_mut().zip(&loras) {
            be.overwrite(&mut dev.a, &l.a);
            be.overwrite(&mut dev.b, &l.b);
        }
    }
    let after = objective.loss(pool, &index, &student).await?;
    let kept = after.is_finite() && after < before;
    for (m, l) in merged.iter_mut().zip(if kept { loras } else { start }) {
        m.a = l.a;
        m.b = l.b;
    }
    let pool_samples = pool.iter().map(Vec::len).collect();
    Ok(Refinement { steps, lr, pool_samples, kl_before: before, kl_after: after, kept, kl, seconds: now() - t0 })
}

/// Fisher–Yates, seeded.
fn shuffle(v: &mut [usize], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::augment;

    #[test]
    fn augmented_prompts_are_new_recombinations_that_keep_the_shared_frame() {
        // Prompts "7 x x x 9" and "7 x x x x 9": a shared first token (the frame) and last one
        // (the cue before the answer).
        let mut given = Vec::new();
        for i in 0..12u32 {
            let len = 3 + (i % 2) as usize;
            let mut p = vec![7];
            p.extend((0..len).map(|j| 10 + (i * 7 + j as u32 * 3) % 13));
            p.push(9);
            given.push(p);
        }
        let tasks = vec![given.clone(), given[..1].to_vec()];
        let out = augment(&tasks, 3, 42);
        assert_eq!(out, augment(&tasks, 3, 42), "seeded");
        assert!(out[1].is_empty(), "one prompt has no partner");
        assert!(out[0].len() >= 30 && out[0].len() <= 36, "{} new prompts", out[0].len());
        for (k, c) in out[0].iter().enumerate() {
            assert!(!given.contains(c) && !out[0][..k].contains(c), "{c:?} is not new");
            assert!(given.iter().any(|g| g.len() == c.len()), "{c:?} has a length no prompt has");
            assert_eq!((c[0], c[c.len() - 1]), (7, 9), "{c:?} lost the frame");
            // Every token is one a prompt of the same length has at that position.
            for (p, t) in c.iter().enumerate() {
                assert!(given.iter().any(|g| g.len() == c.len() && g[p] == *t), "{c:?}: token {p}");
            }
        }
        assert!(augment(&tasks, 0, 42).iter().all(Vec::is_empty));
    }
}
