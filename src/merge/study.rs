//! The study of IterIS on a set of inputs (`iteris study`; the page plots the demo's): how fast the
//! published Jacobi schedule reaches the sweep's fixed point, and how quality grows with the number
//! of calibration samples per task, against RegMean and linear averaging.

use super::baselines::Method;
use super::pipeline::{merge_loaded as merge, LoadedBase};
use super::{relative_change, Balance, Options, Progress, Schedule};
use crate::backend::Backward;
use crate::error::{bad_input, Result};
use crate::inputs::TaskInput;
use serde::Serialize;
use std::collections::BTreeMap;

/// Jacobi solves tried, 1..=this.
pub const MAX_SOLVES: usize = 8;
/// Calibration samples per task tried (those every task has).
pub const SAMPLE_COUNTS: [usize; 5] = [2, 5, 10, 20, 50];
/// The settings whose sample efficiency is measured, by the name the page plots them under: IterIS
/// with the given settings (by default self-calibrated and balanced), without balancing, with the
/// output objective on every module (self-calibrated and balanced alike), as published (the
/// delta objective, neither), and the two baselines.
pub fn variants(opts: &Options) -> Vec<(&'static str, Options)> {
    let with = |method| Options { method, ..opts.clone() };
    let plain = |method| Options { method, ..opts.delta_objective() };
    vec![
        ("iteris", with(Method::Iteris)),
        ("unbalanced", Options { balance: Balance::Off, ..with(Method::Iteris) }),
        (
            "output",
            Options { objective: super::Objective::Output, modules: super::ModuleSet::All, ..with(Method::Iteris) },
        ),
        ("published", Options { balance: Balance::Off, self_calibrate: 0, ..plain(Method::Iteris) }),
        ("regmean", plain(Method::Regmean)),
        ("regmean++", plain(Method::RegmeanPlus)),
        ("linear", plain(Method::Linear)),
    ]
}

/// What the study found, in the JSON form the page reads.
#[derive(Clone, Debug, Serialize)]
pub struct Study {
    pub convergence: Convergence,
    pub sample_efficiency: SampleEfficiency,
}

#[derive(Clone, Debug, Serialize)]
pub struct Convergence {
    /// 1..=MAX_SOLVES.
    pub solves: Vec<usize>,
    /// ‖ΔW_jacobi(k) − ΔW_sweep‖ / ‖ΔW_jacobi(k)‖ over all modules, per number of solves k.
    pub distance_to_sweep: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SampleEfficiency {
    /// Calibration samples per task.
    pub samples: Vec<usize>,
    /// Per variant (by name, `variants`): accuracy and KL over the tasks, per sample count.
    pub methods: BTreeMap<&'static str, Curve>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    /// Mean over the tasks; None where no task's held-out set has answers.
    pub accuracy: Vec<Option<f64>>,
    /// The task with the lowest accuracy's.
    pub worst_accuracy: Vec<Option<f64>>,
    pub kl: Vec<Option<f64>>,
}

fn mean(v: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Run the study: every task needs held-out samples (`TaskInput::eval`). `progress` sees every
/// merge's passes. The tasks' samples are cut to each count in turn and given back whole.
pub async fn study<B: Backward>(
    be: &B,
    base: &LoadedBase<'_, B>,
    tasks: &mut [TaskInput],
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<Study> {
    if tasks.iter().any(|t| t.eval.is_none()) {
        return Err(bad_input("--eval", "the study needs held-out samples (--eval) for every adapter"));
    }
    // The published objective: the Jacobi schedule's convergence to the sweep is about it.
    let iteris = |schedule, iters| Options {
        method: Method::Iteris,
        schedule,
        iters,
        eval_limit: Some(0),
        ..opts.delta_objective()
    };
    let sweep = merge(be, base, tasks, &iteris(Schedule::Sweep, opts.iters), progress).await?;
    let mut distance_to_sweep = Vec::new();
    for k in 1..=MAX_SOLVES {
        let r = merge(be, base, tasks, &iteris(Schedule::Jacobi, k), progress).await?;
        distance_to_sweep.push(relative_change(r.outcome.merged.iter().zip(&sweep.outcome.merged)));
    }

    let samples: Vec<usize> =
        SAMPLE_COUNTS.into_iter().filter(|&n| tasks.iter().all(|t| t.samples.len() >= n)).collect();
    let all: Vec<Vec<String>> = tasks.iter().map(|t| t.samples.clone()).collect();
    let mut methods = BTreeMap::new();
    let mut curves = async || -> Result<()> {
        for (name, o) in variants(opts) {
            let (mut accuracy, mut worst_accuracy, mut kl) = (Vec::new(), Vec::new(), Vec::new());
            for &n in &samples {
                for (t, s) in tasks.iter_mut().zip(&all) {
                    t.samples = s[..n].to_vec();
                }
                let r = merge(be, base, tasks, &o, progress).await?;
                let q = r.quality.unwrap_or_default();
                accuracy.push(mean(q.iter().map(|t| t.accuracy)));
                worst_accuracy.push(q.iter().filter_map(|t| t.accuracy).min_by(f64::total_cmp));
                kl.push(mean(q.iter().map(|t| Some(t.kl))));
            }
            methods.insert(name, Curve { accuracy, worst_accuracy, kl });
        }
        Ok(())
    };
    let done = curves().await;
    for (t, s) in tasks.iter_mut().zip(all) {
        t.samples = s;
    }
    done?;
    Ok(Study {
        convergence: Convergence { solves: (1..=MAX_SOLVES).collect(), distance_to_sweep },
        sample_efficiency: SampleEfficiency { samples, methods },
    })
}
