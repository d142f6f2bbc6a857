//! Label-free task balancing: the task weights λ_i of the IterIS objective
//!
//!   Σ_i λ_i c_i ‖X_i ΔW_iᵀ − X̃_i ΔWᵀ‖²_F (+ ridges)
//!
//! chosen so that the task the merge serves worst is served as well as it can be. A few rounds of
//! merges, each with one set of weights, are judged on calibration samples they did not see, and
//! move the weights multiplicatively towards the tasks that lose most (λ_i ← λ_i · L_i / mean L, a
//! multiplicative-weights step of the minimax problem min_λ max_i L_i); the weights of the round
//! whose worst task was best are kept, and the final merge runs on all samples with them. Only
//! the ratios of the λ_i matter (every ridge is relative to its own task's Gram), so they are
//! reported with mean 1.
//!
//! What a round is judged by (`BalanceObjective`):
//! - `Agreement` (where self-calibration wrote the continuations): each task's share of samples
//!   whose greedy continuation the merged model reproduces token for token, the label-free twin of
//!   exact-answer accuracy; the step moves weight by each task's share of samples that disagree,
//!   ties between rounds go by the mean −log p_merged of the adapter's tokens on those
//!   continuations. Prompt positions, which no answer depends on, count for nothing.
//! - `Kl`: each task's mean KL(adapter ‖ merged) per token over whole samples.
//!
//! Which samples judge (`balance_folds` K): with K ≥ 2 the samples are cross-fitted, sample k of a
//! task in fold k mod K, each round one merge per fold on the other folds, so every sample is held
//! out once (a round costs K − 1 merges on all the samples); with K = 1 one merge per round holds
//! out every fifth sample (the last one where there are two to four).

use super::calibrate::Continuations;
use super::evaluate::{agreement, kl_sum, Agreement, DeltaHook};
use super::iteris::Target;
use super::{iteris, now, Balance, BalanceObjective, Options, Progress};
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
    /// What judged the rounds (`Agreement` only where self-calibration wrote continuations).
    pub objective: BalanceObjective,
    pub folds: usize,
    /// The chosen λ_i (mean 1), which the final merge ran with.
    pub weights: Vec<f64>,
    /// Samples per task that judged the rounds (0: too few samples to split; that task was
    /// judged on the samples it was merged with).
    pub held_out: Vec<usize>,
    /// Each round, in order: its weights and each task's held-out loss.
    pub rounds: Vec<BalanceRound>,
    /// Each task's held-out loss (mean KL, or mean −log p of the adapter's tokens) with λ = 1
    /// (the first round) and with the chosen weights.
    pub kl_before: Vec<f64>,
    pub kl_after: Vec<f64>,
    pub seconds: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BalanceRound {
    pub weights: Vec<f64>,
    /// Each task's held-out loss (see `Balancing::kl_before`).
    pub kl: Vec<f64>,
    /// `Agreement` only: each task's share of held-out samples whose continuation the merge
    /// reproduced.
    pub agreement: Option<Vec<f64>>,
}

/// The folds of `ids` (see the module's doc): per fold, per task, the indices of its held-out
/// samples. K = 1: one fold, every fifth sample held out (the last where there are two to four;
/// a single sample is both merged with and held out).
pub fn folds(ids: &[Vec<Vec<u32>>], k: usize) -> Vec<Vec<Vec<usize>>> {
    if k >= 2 {
        return (0..k).map(|f| ids.iter().map(|s| (f..s.len()).step_by(k).collect()).collect()).collect();
    }
    let held = ids
        .iter()
        .map(|s| {
            let n = s.len();
            (0..n).filter(|&j| if n >= 5 { j % 5 == 4 } else { n == 1 || j == n - 1 }).collect()
        })
        .collect();
    vec![held]
}

/// Each task's samples that a fold merges with: all but the held-out ones (all of them where
/// that would leave none).
fn fit_of(ids: &[Vec<Vec<u32>>], held: &[Vec<usize>]) -> Vec<Vec<Vec<u32>>> {
    ids.iter()
        .zip(held)
        .map(|(s, h)| {
            let fit: Vec<Vec<u32>> = (0..s.len()).filter(|j| !h.contains(j)).map(|j| s[j].clone()).collect();
            if fit.is_empty() {
                s.clone()
            } else {
                fit
            }
        })
        .collect()
}

/// One multiplicative step: λ_i ← λ_i · L_i / mean L, then scaled to mean 1. Tasks with a
/// non-finite or zero loss keep their weight.
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

/// The largest of a round's losses (a NaN counts as the largest: a task that could not be
/// measured is never the best served).
pub fn worst(kl: &[f64]) -> f64 {
    kl.iter().copied().fold(f64::NEG_INFINITY, |m, v| if v.is_nan() { f64::INFINITY } else { m.max(v) })
}

/// How a round ranks: the worst task's disagreement (`Agreement`), then its worst loss.
fn rank(r: &BalanceRound) -> (f64, f64) {
    let disagreement = r.agreement.as_ref().map_or(0.0, |a| a.iter().map(|v| 1.0 - v).fold(0.0, f64::max));
    (disagreement, worst(&r.kl))
}

/// Choose the task weights by at most `opts.balance_sweeps` rounds (see the module's doc); the
/// rounds stop early once every held-out continuation is reproduced. `opts` is the
/// final merge's: its method and schedule run each round. `cont`: where self-calibration's
/// continuations lie (None: it did not run, and the rounds are judged by KL).
pub async fn balance<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    targets: &[Target],
    ids: &[Vec<Vec<u32>>],
    cont: Option<&Continuations>,
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<Balancing> {
    let t0 = now();
    let objective = if cont.is_some() { opts.balance_objective } else { BalanceObjective::Kl };
    let folds = folds(ids, opts.balance_folds);
    let held_out: Vec<usize> = (0..ids.len())
        .map(|i| {
            let n: usize = folds.iter().map(|f| f[i].len()).sum();
            if ids[i].len() == 1 {
                0
            } else {
                n
            }
        })
        .collect();
    let teacher: Vec<Vec<Vec<(usize, u32)>>> = match cont {
        Some(c) => {
            ids.iter().enumerate().map(|(i, s)| (0..s.len()).map(|k| c.teacher(i, k, &s[k])).collect()).collect()
        }
        None => Vec::new(),
    };
    let sweeps = opts.balance_sweeps;
    let merges = sweeps * folds.len();
    let mut weights = vec![1.0; ids.len()];
    let mut rounds: Vec<BalanceRound> = Vec::new();
    for round in 0..sweeps {
        let o = Options { weights: Some(weights.clone()), balance: Balance::Off, eval_limit: Some(0), ..opts.clone() };
        let mut kl = vec![(0.0, 0usize); ids.len()];
        let mut agreed = vec![Agreement::default(); ids.len()];
        for (f, held) in folds.iter().enumerate() {
            let merge = round * folds.len() + f + 1;
            let mut relabel = |p: Progress| match p {
                Progress::Pass(k, n, label) => {
                    progress(Progress::Pass(k, n, &format!("balancing {merge}/{merges}: {label}")))
                }
                p => progress(p),
            };
            let outcome = iteris(be, model, targets.to_vec(), &fit_of(ids, held), &o, &mut relabel).await?;
            let mut hook = DeltaHook::new(be, targets, Some(&outcome.merged));
            for (i, h) in held.iter().enumerate() {
                let samples: Vec<Vec<u32>> = h.iter().map(|&k| ids[i][k].clone()).collect();
                match objective {
                    BalanceObjective::Kl => {
                        let (total, n) = kl_sum(be, model, &mut hook, &samples, i).await?;
                        kl[i] = (kl[i].0 + total, kl[i].1 + n);
                    }
                    BalanceObjective::Agreement => {
                        let t: Vec<Vec<(usize, u32)>> = h.iter().map(|&k| teacher[i][k].clone()).collect();
                        agreed[i].add(agreement(be, model, &mut hook, &samples, &t, i).await?);
                    }
                }
            }
        }
        let (loss, agreement) = match objective {
            BalanceObjective::Kl => (kl.iter().map(|(t, n)| t / (*n).max(1) as f64).collect::<Vec<_>>(), None),
            BalanceObjective::Agreement => {
                (agreed.iter().map(Agreement::mean_nll).collect(), Some(agreed.iter().map(Agreement::rate).collect()))
            }
        };
        // Agreement steps on each task's share of disagreeing samples, smoothed as if one more
        // had disagreed (a task that agrees everywhere still has a weight to lose). Measured on
        // the demo, stepping on the −log p instead kept equal weights (worst task 8.5%, here 14.5%).
        let signal: Vec<f64> = match objective {
            BalanceObjective::Agreement => {
                agreed.iter().map(|a| (a.samples - a.agreed + 1) as f64 / (a.samples + 1) as f64).collect()
            }
            BalanceObjective::Kl => loss.clone(),
        };
        let next = step(&weights, &signal);
        // Every held-out continuation reproduced: no round can serve the worst task better.
        let all_agree = agreement.as_ref().is_some_and(|a: &Vec<f64>| a.iter().all(|&v| v == 1.0));
        rounds.push(BalanceRound { weights: weights.clone(), kl: loss, agreement });
        weights = next;
        if all_agree {
            break;
        }
    }
    let best = (0..rounds.len())
        .min_by(|&a, &b| {
            let (ra, rb) = (rank(&rounds[a]), rank(&rounds[b]));
            ra.0.total_cmp(&rb.0).then(ra.1.total_cmp(&rb.1))
        })
        .expect("at least one round");
    Ok(Balancing {
        objective,
        folds: opts.balance_folds,
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
    fn folds_hold_out_every_sample_once_or_every_fifth() {
        let task = |n: usize| (0..n).map(|k| vec![k as u32]).collect::<Vec<_>>();
        let ids = [task(10), task(3), task(1)];
        let one = folds(&ids, 1);
        assert_eq!(one, vec![vec![vec![4, 9], vec![2], vec![0]]]);
        let fit = fit_of(&ids, &one[0]);
        assert_eq!(fit[0].len(), 8);
        assert_eq!(fit[1], vec![vec![0], vec![1]]);
        // One sample: merged with and measured on.
        assert_eq!(fit[2], vec![vec![0]]);
        let two = folds(&ids, 2);
        assert_eq!(two[0][0], vec![0, 2, 4, 6, 8]);
        assert_eq!(two[1][0], vec![1, 3, 5, 7, 9]);
        assert_eq!((two[0][1].clone(), two[1][1].clone()), (vec![0, 2], vec![1]));
        for i in 0..ids.len() {
            let mut all: Vec<usize> = two.iter().flat_map(|f| f[i].clone()).collect();
            all.sort();
            assert_eq!(all, (0..ids[i].len()).collect::<Vec<_>>(), "every sample held out once");
        }
        assert_eq!(fit_of(&ids, &two[1])[2], vec![vec![0]], "a fold that would hold everything merges with all");
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
