//! The passes of each method over the model (`iteris`): a schedule is a list of passes, each a
//! mode of the IterIS hook over a set of row streams, which one loop runs.

use super::iteris::{HookSettings, IterisHook, Mode, Target};
use super::solve::{self, Merged};
use super::{baselines, now, plan, Method, Options, Outcome, Progress, Schedule};
use crate::backend::Backend;
use crate::error::Result;
use crate::models::chunked::{chunk_batches, run_chunks, Streams};
use crate::models::Model;

/// Which rows a pass runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rows {
    /// The adapters' streams and the merged one.
    Both,
    /// The adapters' streams alone (X̃ = X: a first Jacobi solve, RegMean).
    Adapters,
    /// Jacobi after its first pass: the merged stream alone where the adapters' inputs were kept
    /// (`IterisHook::keep_adapter_inputs`), else both.
    Later,
    /// The merged stream alone (RegMean++, whose statistics are all the merged model's).
    Merged,
}

/// One pass of a schedule.
#[derive(Debug)]
struct Pass {
    label: String,
    mode: Mode,
    /// The deltas the last pass solved become the merged rows' (`IterisHook::begin_pass`).
    promote: bool,
    rows: Rows,
    /// Jacobi: measure how far the merged deltas moved (`Outcome::changes`).
    measure_change: bool,
}

/// The passes of a method and schedule, in order.
fn passes(opts: &Options) -> Vec<Pass> {
    let pass = |label: &str, mode, promote, rows, measure_change| Pass {
        label: label.to_string(),
        mode,
        promote,
        rows,
        measure_change,
    };
    match (opts.method, opts.schedule) {
        (Method::Iteris, Schedule::Sweep) => vec![pass("sweep", Mode::Sweep, false, Rows::Both, false)],
        // Solve 1 is X̃ = X (RegMean with a ridge and adaptive weights): the merged stream is not
        // run. One more pass after the last solve measures the final deltas on their own features.
        (Method::Iteris, Schedule::Jacobi) => {
            std::iter::once(pass("jacobi solve 1", Mode::Jacobi, false, Rows::Adapters, false))
                .chain(
                    (2..=opts.iters).map(|k| pass(&format!("jacobi solve {k}"), Mode::Jacobi, true, Rows::Later, true)),
                )
                .chain(std::iter::once(pass("evaluate", Mode::Evaluate, true, Rows::Later, false)))
                .collect()
        }
        (Method::Regmean, _) => vec![
            pass("regmean solve", Mode::Jacobi, false, Rows::Adapters, false),
            pass("evaluate", Mode::Evaluate, true, Rows::Both, false),
        ],
        // RegMean++: one sweep, each module solved from the merged model's own inputs (the
        // modules before it merged), then a pass that measures the result.
        (Method::RegmeanPlus, _) => vec![
            pass("regmean++ sweep", Mode::Sweep, false, Rows::Merged, false),
            pass("evaluate", Mode::Evaluate, false, Rows::Both, false),
        ],
        // The data-free methods: one pass measures the deltas set before it.
        _ => vec![pass("evaluate", Mode::Evaluate, false, Rows::Both, false)],
    }
}

/// Run IterIS. `ids[i]` are task i's tokenized samples.
pub async fn iteris<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    targets: Vec<Target>,
    ids: &[Vec<Vec<u32>>],
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome> {
    opts.validate(ids.len())?;
    let t0 = now();
    // The pass runs in chunks of rows where one tensor of the whole batch would exceed a binding.
    let max_rows = plan::chunk_rows(be, &model.modules(), &targets);
    let (both, adapters_only) =
        (chunk_batches(ids, Streams::Both, max_rows), chunk_batches(ids, Streams::Adapters, max_rows));
    let schedule = passes(opts);
    let mut adapter_inputs = None;
    let mut changes = Vec::new();
    let records;
    let merged: Vec<Merged>;
    let mut energy = vec![1.0; targets.len()];
    {
        let pass_progress = std::cell::RefCell::new(&mut *progress);
        let on_stage = Box::new(|done: usize, all: usize| (pass_progress.borrow_mut())(Progress::Modules(done, all)));
        let mut hook = IterisHook::new(be, &targets, HookSettings::of(opts, &targets), on_stage);
        // Jacobi's adapter streams are the same in every pass: where their inputs fit, the first
        // pass keeps them and the later ones run the merged stream alone.
        let merged_only;
        let mut merged_rows = None;
        let mut later = &both;
        if (opts.method, opts.schedule) == (Method::Iteris, Schedule::Jacobi) {
            let tokens = ids.iter().flatten().map(Vec::len).sum();
            let keep =
                plan::AdapterInputs::plan(be, model.row_floats(), &targets, tokens, ids.len(), opts.max_memory_mib);
            adapter_inputs = Some(keep);
            if keep.kept {
                hook.keep_adapter_inputs();
                merged_only = chunk_batches(ids, Streams::Merged, max_rows);
                later = &merged_only;
            }
        }
        // The data-free methods' deltas come from the adapters alone; their pass measures them.
        if opts.method.data_free() {
            let settings = baselines::BaselineSettings {
                weights: opts.weights.clone(),
                density: opts.density,
                seed: opts.seed,
                rank: opts.rank,
                common_space: opts.common_space,
            };
            let (m, e): (Vec<Merged>, Vec<f64>) =
                baselines::merge_data_free(opts.method, &targets, &settings)?.into_iter().unzip();
            energy = e;
            hook.set_merged(be, &m);
        }
        for (k, pass) in schedule.iter().enumerate() {
            (pass_progress.borrow_mut())(Progress::Pass(k + 1, schedule.len(), &pass.label));
            hook.begin_pass(be, pass.mode, pass.promote);
            let rows = match pass.rows {
                Rows::Both => &both,
                Rows::Adapters => &adapters_only,
                Rows::Later => later,
                Rows::Merged => merged_rows.get_or_insert_with(|| chunk_batches(ids, Streams::Merged, max_rows)),
            };
            run_chunks(model, be, rows, &mut hook).await?;
            if pass.measure_change {
                let pairs = hook.merged.iter().zip(&hook.solved).filter_map(|(o, n)| Some((o.as_ref()?, n.as_ref()?)));
                changes.push(relative_change(pairs));
            }
        }
        records = hook.records.clone();
        if opts.method == Method::Iteris {
            energy = records.iter().map(|r| if r.solve_path.is_some() { r.energy } else { 1.0 }).collect();
        }
        merged = hook.merged.iter().cloned().map(|m| m.expect("every target was solved")).collect();
    }
    // One warning per task, at the first module where it has fewer token rows than input features.
    let mut warnings = Vec::new();
    if opts.alpha2 < 1e-5 {
        for i in 0..ids.len() {
            let thin = targets.iter().zip(&records).find(|(t, r)| r.rows.get(i).is_some_and(|&n| n < t.in_dim));
            if let Some((t, r)) = thin {
                warnings.push(format!(
                    "task {} has {} token rows at {} (input width {}), and the ridge alpha2={:e} is weak: the solve is ill-conditioned; use more samples or alpha ≈ 1e-4",
                    i + 1, r.rows[i], t.name, t.in_dim, opts.alpha2
                ));
            }
        }
    }
    Ok(Outcome {
        merged,
        energy,
        records,
        changes,
        warnings,
        tokens: ids.iter().map(|s| s.iter().map(Vec::len).sum()).collect(),
        samples: ids.iter().map(Vec::len).collect(),
        seconds_passes: now() - t0,
        adapter_inputs,
        targets,
    })
}

/// ‖ΔW_new − ΔW_old‖ / ‖ΔW_new‖ over all modules, from (old, new) pairs of IterIS deltas. Both
/// share B* = [B_1 … B_N], so the difference is B*(A_new − A_old), measured through the small Gram
/// B*ᵀB*.
pub fn relative_change<'a>(pairs: impl IntoIterator<Item = (&'a Merged, &'a Merged)>) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (o, n) in pairs {
        let bb = solve::to_f64(&n.b);
        let btb = bb.transpose() * &bb;
        let an = solve::to_f64(&n.a);
        let d = &an - solve::to_f64(&o.a);
        num += (&btb * &d).component_mul(&d).sum();
        den += (&btb * &an).component_mul(&an).sum();
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
