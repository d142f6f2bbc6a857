//! Label-free task balancing: the task weights λ_i of the IterIS objective
//!
//!   Σ_i λ_i c_i ‖X_i ΔW_iᵀ − X̃_i ΔWᵀ‖²_F (+ ridges)
//!
//! chosen so that the task the merge serves worst is served as well as it can be. Each task's
//! calibration samples are split: every fifth sample (the last one where there are fewer than
//! five) is held out. A few merges on the rest, each measured by every task's mean
//! KL(adapter ‖ merged) per token on its held-out samples, move the weights multiplicatively
//! towards the tasks that lose most (λ_i ← λ_i · KL_i / mean KL, a multiplicative-weights step of
//! the minimax problem min_λ max_i KL_i); the weights of the merge whose worst KL was smallest are
//! kept, and the final merge runs on all samples with them. Only the ratios of the λ_i matter
//! (every ridge is relative to its own task's Gram), so they are reported with mean 1.

use super::evaluate::{mean_kl, DeltaHook};
use super::iteris::Target;
use super::{iteris, now, Balance, Options, Progress};
use crate::backend::Backend;
use crate::error::Result;
use crate::models::Model;

/// Samples every task needs for balancing to run (two held out each): with five per task, the
/// merges on four were worse than the merge on five that balancing would replace (the real-model
/// study: worst task 82% balanced, 100% not).
pub const MIN_SAMPLES: usize = 10;

/// What balancing tried and chose (`merge_report.json`'s `balancing`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Balancing {
    /// The chosen λ_i (mean 1), which the final merge ran with.
    pub weights: Vec<f64>,
    /// Held-out calibration samples per task (0: too few samples to split; that task's KL was
    /// measured on the samples it was merged with).
    pub held_out: Vec<usize>,
    /// Each merge on the split, in order: its weights and each task's held-out KL.
    pub rounds: Vec<BalanceRound>,
    /// Each task's held-out KL with λ = 1 (the first round) and with the chosen weights.
    pub kl_before: Vec<f64>,
    pub kl_after: Vec<f64>,
    pub seconds: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BalanceRound {
    pub weights: Vec<f64>,
    pub kl: Vec<f64>,
}

/// Each task's samples split into those merged with and those held out: every fifth sample is
/// held out, or the last where there are two to four; a single sample is both.
pub fn split(ids: &[Vec<Vec<u32>>]) -> (Vec<Vec<Vec<u32>>>, Vec<Vec<Vec<u32>>>, Vec<usize>) {
    let (mut fit, mut held, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for s in ids {
        let n = s.len();
        let is_held = |k: usize| if n >= 5 { k % 5 == 4 } else { n >= 2 && k == n - 1 };
        let (h, f): (Vec<_>, Vec<_>) = s.iter().cloned().enumerate().partition(|(k, _)| is_held(*k));
        let (h, f): (Vec<_>, Vec<_>) = (h.into_iter().map(|p| p.1).collect(), f.into_iter().map(|p| p.1).collect());
        counts.push(h.len());
        held.push(if h.is_empty() { f.clone() } else { h });
        fit.push(f);
    }
    (fit, held, counts)
}

/// One multiplicative step: λ_i ← λ_i · KL_i / mean KL, then scaled to mean 1. Tasks with a
/// non-finite or zero KL keep their weight.
pub fn step(weights: &[f64], kl: &[f64]) -> Vec<f64> {
    let finite: Vec<f64> = kl.iter().copied().filter(|v| v.is_finite() && *v > 0.0).collect();
    let mean = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    let next: Vec<f64> = weights
        .iter()
        .zip(kl)
        .map(|(&w, &k)| if k.is_finite() && k > 0.0 && mean > 0.0 { w * k / mean } else { w })
        .collect();
    normalized(&next)
}

fn normalized(w: &[f64]) -> Vec<f64> {
    let mean = w.iter().sum::<f64>() / w.len().max(1) as f64;
    w.iter().map(|v| v / mean).collect()
}

/// The largest of a round's KLs (a NaN counts as the largest: a task that could not be measured
/// is never the best served).
pub fn worst(kl: &[f64]) -> f64 {
    kl.iter().copied().fold(f64::NEG_INFINITY, |m, v| if v.is_nan() { f64::INFINITY } else { m.max(v) })
}

/// Choose the task weights by `opts.balance_sweeps` merges on the calibration split (see the
/// module's doc). `opts` is the final merge's: its method and schedule run each round.
pub async fn balance<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    targets: &[Target],
    ids: &[Vec<Vec<u32>>],
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<Balancing> {
    let t0 = now();
    let (fit, held, held_out) = split(ids);
    let sweeps = opts.balance_sweeps;
    let mut weights = vec![1.0; ids.len()];
    let mut rounds: Vec<BalanceRound> = Vec::new();
    for round in 0..sweeps {
        let o = Options { weights: Some(weights.clone()), balance: Balance::Off, eval_limit: Some(0), ..opts.clone() };
        let mut relabel = |p: Progress| match p {
            Progress::Pass(k, n, label) => {
                progress(Progress::Pass(k, n, &format!("balancing {}/{sweeps}: {label}", round + 1)))
            }
            p => progress(p),
        };
        let outcome = iteris(be, model, targets.to_vec(), &fit, &o, &mut relabel).await?;
        let mut hook = DeltaHook::new(be, targets, Some(&outcome.merged));
        let mut kl = Vec::new();
        for (i, h) in held.iter().enumerate() {
            kl.push(mean_kl(be, model, &mut hook, h, i).await?);
        }
        let next = step(&weights, &kl);
        rounds.push(BalanceRound { weights: weights.clone(), kl });
        weights = next;
    }
    let best = (0..rounds.len())
        .min_by(|&a, &b| worst(&rounds[a].kl).total_cmp(&worst(&rounds[b].kl)))
        .expect("at least one round");
    Ok(Balancing {
        weights: rounds[best].weights.clone(),
        held_out,
        kl_before: rounds[0].kl.clone(),
        kl_after: rounds[best].kl.clone(),
        rounds,
        seconds: now() - t0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_every_fifth_or_the_last() {
        let task = |n: usize| (0..n).map(|k| vec![k as u32]).collect::<Vec<_>>();
        let (fit, held, counts) = split(&[task(10), task(3), task(1)]);
        assert_eq!(held[0], vec![vec![4], vec![9]]);
        assert_eq!(fit[0].len(), 8);
        assert_eq!((fit[1].len(), held[1].clone()), (2, vec![vec![2]]));
        // One sample: merged with and measured on.
        assert_eq!((fit[2].clone(), held[2].clone()), (vec![vec![0]], vec![vec![0]]));
        assert_eq!(counts, vec![2, 1, 0]);
    }

    #[test]
    fn step_moves_weight_to_the_worst_task() {
        let w = step(&[1.0, 1.0, 1.0], &[0.2, 0.4, 0.6]);
        assert!((w.iter().sum::<f64>() - 3.0).abs() < 1e-12);
        assert!(w[2] > w[1] && w[1] > w[0]);
        assert!((w[2] / w[0] - 3.0).abs() < 1e-12);
        // A task whose KL could not be measured keeps its weight (before normalisation).
        let w = step(&[1.0, 1.0], &[f64::NAN, 0.5]);
        assert_eq!(w, vec![1.0, 1.0]);
    }
}
