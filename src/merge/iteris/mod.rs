//! The IterIS hook: what a forward pass does at each stage while merging.
//!
//! The batch holds, for every task i, its samples run by the adapter-i model (rows X_i) and, once a
//! merged delta exists, the same samples run by the merged model (rows X̃_i). At each stage the hook
//! 1. adds each adapter's delta to its own rows and measures ‖X_i (W0+ΔW_i)ᵀ‖ for the adaptive weight,
//! 2. accumulates X_iᵀX̃_i and X̃_iᵀX̃_i once for all modules of the stage (they share the input),
//! 3. has the backend assemble and factor (f32) every targeted module's system (one `SystemSpec`,
//!    `backend::system`) from those pending statistics, so statistics and factors come back in
//!    one readback,
//! 4. solves each system in f64 (`solve.rs`), refined around the factor where there is one,
//! 5. adds the merged delta to the merged rows and measures the alignment error.
//!
//! A pass too wide for one GPU binding runs in chunks of rows (`models::chunked`): steps 1–2 run
//! for each chunk's rows into the same pending statistics, 3–4 once every chunk has contributed,
//! 5 for each chunk again.
//!
//! The two schedules differ only in which delta step 5 uses. `Sweep` uses the one just solved:
//! merged rows downstream then see final upstream deltas, so one pass reaches the fixed point of
//! the iteration exactly. `Jacobi` keeps the previous pass's deltas and stores the new ones for the
//! next pass (the published schedule). `Evaluate` solves nothing and only measures.

use super::solve::{assemble, finish, host, host_transposed, to_f64, Merged, SolvePath};
use super::{Method, Objective, Options};
use crate::backend::Backend;
use crate::backend::{Cross, FactorId, GramId, Reads, ScalarId, SystemSpec, SystemTerm, Values, Weight};
use crate::error::{Error, Result};
use crate::formats::peft::LoraModule;
use crate::models::chunked::StageHook;
use crate::models::{StageInput, Stream};
use nalgebra::DMatrix;
use std::collections::HashMap;
use std::ops::Range;

mod stage;
use stage::{AlignRead, Held, Stage, TaskGrams};

/// A module at least one adapter targets.
#[derive(Clone)]
pub struct Target {
    /// Module name in the model (no class prefix).
    pub name: String,
    /// Module path written in the merged adapter (as the input adapters name it).
    pub path: String,
    pub out_dim: usize,
    pub in_dim: usize,
    /// Per adapter: its LoRA here, if it targets this module.
    pub loras: Vec<Option<LoraModule>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sweep,
    Jacobi,
    Evaluate,
}

/// What one pass learned about one module.
#[derive(Clone, Debug, Default)]
pub struct ModuleRecord {
    /// Adaptive weight c_i per task.
    pub c: Vec<f64>,
    /// ‖X_i ΔW_iᵀ − X̃_i ΔW*ᵀ‖ / ‖X_i ΔW_iᵀ‖ per task (None where adapter i does not target the module).
    pub align: Vec<Option<f64>>,
    pub solve_path: Option<SolvePath>,
    /// Fraction of ‖ΔW*‖²_F the exported LoRA keeps (1 but for a truncated dense solution).
    pub energy: f64,
    /// Token rows per task.
    pub rows: Vec<usize>,
}

/// An adapter's LoRA at one module, on the backend.
struct DeviceLora<T> {
    /// (r, in)
    a: T,
    /// (out, r)
    b: T,
    /// Bᵀ (r, out), for ⟨W0, BA⟩.
    bt: T,
    scale: f32,
}

/// What a merge asks of the hook, all known before its first pass (`HookSettings::of`).
#[derive(Clone, Debug)]
pub struct HookSettings {
    pub alpha1: f64,
    pub alpha2: f64,
    /// Feature mixing of the released code: X̃ ← (1 − ρ) X̃ + ρ X.
    pub rho: f32,
    /// RegMean instead of IterIS: no adaptive weights, no ridge, and each Gram's off-diagonal
    /// entries scaled by this factor (the merged stream is not run: X̃ = X).
    pub regmean: Option<f64>,
    /// RegMean++ (Nguyen et al. 2025): each task's Gram and cross term both from the merged
    /// model's inputs on its samples, X̃_iᵀX̃_i (the merged stream alone runs; its rows stand for
    /// the task's), so ΔW = (Σ λ_i S(X̃_iᵀX̃_i))⁻¹ Σ λ_i S(X̃_iᵀX̃_i) ΔW_iᵀ, module by module.
    pub merged_inputs: bool,
    /// λ_i: each task's weight in the objective Σ λ_i c_i ‖X_i ΔW_iᵀ − X̃_i ΔWᵀ‖² (1 each unless
    /// set by `--weights` or chosen by `merge::balance`).
    pub task_weights: Vec<f64>,
    /// What each module's merged delta fits: each adapter's delta on its inputs (IterIS), or each
    /// adapter model's whole output from the merged model's inputs (`Objective::Output`).
    pub objective: Objective,
    /// The output objective's dense deltas leave as LoRAs of this rank.
    pub dense_rank: usize,
}

impl HookSettings {
    /// The hook's settings for a merge with `opts` of `targets`: the task weights are IterIS's
    /// and RegMean's (1 each unless given), the objective and the dense rank IterIS's alone.
    pub fn of(opts: &Options, targets: &[Target]) -> HookSettings {
        let tasks = targets.first().map_or(0, |t| t.loras.len());
        let iteris = opts.method == Method::Iteris;
        let regmean = matches!(opts.method, Method::Regmean | Method::RegmeanPlus);
        HookSettings {
            alpha1: opts.alpha1,
            alpha2: opts.alpha2,
            rho: opts.rho,
            regmean: regmean.then_some(opts.regmean_scale),
            merged_inputs: opts.method == Method::RegmeanPlus,
            task_weights: opts.weights.clone().filter(|_| iteris || regmean).unwrap_or_else(|| vec![1.0; tasks]),
            objective: if iteris { opts.objective } else { Objective::Delta },
            dense_rank: opts.rank.filter(|_| iteris).unwrap_or_else(|| default_dense_rank(targets)),
        }
    }
}

pub struct IterisHook<'a, B: Backend> {
    targets: &'a [Target],
    index: HashMap<&'a str, usize>,
    /// Per target, per adapter: its LoRA on the backend.
    loras: Vec<Vec<Option<DeviceLora<B::T>>>>,
    /// Per target, per adapter: ‖W0 + ΔW_i‖²_F = ‖W0‖² + 2s⟨W0, BA⟩ + s²‖BA‖², at the first visit.
    w_norm2: Vec<Option<Vec<f64>>>,
    /// Reads recorded but not yet fetched: the stage being gathered (`stage`) and the alignment
    /// errors the previous stage left, which ride along with its fetch (`align` says what they are).
    reads: Reads<B>,
    align: Vec<AlignRead>,
    /// The stage whose chunks are contributing.
    stage: Option<Stage>,
    /// The deltas the merged rows run with (host copy and backend copy).
    pub merged: Vec<Option<Merged>>,
    merged_dev: Vec<Option<(B::T, B::T)>>,
    /// What this pass solved.
    pub solved: Vec<Option<Merged>>,
    pub records: Vec<ModuleRecord>,
    pub mode: Mode,
    /// The ridges, feature mixing, RegMean's factor, task weights, objective and dense rank,
    /// fixed for the hook's life.
    settings: HookSettings,
    seen: usize,
    on_stage: Box<dyn FnMut(usize, usize) + 'a>,
    /// Jacobi that keeps the adapter streams' inputs (`keep_adapter_inputs`): X_i per stage (its
    /// first target), task and chunk (the chunk's first sample of the task), recorded by the first
    /// pass, read by the later ones, which run the merged rows only. None: every pass runs both.
    kept: Option<HashMap<(usize, usize, usize), B::T>>,
}

impl<'a, B: Backend> IterisHook<'a, B> {
    pub fn new(
        be: &B,
        targets: &'a [Target],
        settings: HookSettings,
        on_stage: Box<dyn FnMut(usize, usize) + 'a>,
    ) -> Self {
        let loras = targets
            .iter()
            .map(|t| {
                t.loras
                    .iter()
                    .map(|l| {
                        l.as_ref().map(|l| DeviceLora {
                            a: be.upload(&l.a),
                            b: be.upload(&l.b),
                            bt: be.upload(&l.b.transpose()),
                            scale: l.scale,
                        })
                    })
                    .collect()
            })
            .collect();
        IterisHook {
            targets,
            index: targets.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect(),
            loras,
            w_norm2: vec![None; targets.len()],
            reads: Reads::new(),
            align: Vec::new(),
            stage: None,
            merged: vec![None; targets.len()],
            merged_dev: targets.iter().map(|_| None).collect(),
            solved: vec![None; targets.len()],
            records: vec![ModuleRecord::default(); targets.len()],
            mode: Mode::Sweep,
            settings,
            seen: 0,
            on_stage,
            kept: None,
        }
    }

    /// Keep each task's module inputs from the first (adapter-only) pass, so that later passes
    /// run the merged stream alone (`Streams::Merged`): the adapter streams do not change between
    /// Jacobi passes, and their adaptive weights are known after the first.
    pub fn keep_adapter_inputs(&mut self) {
        self.kept = Some(HashMap::new());
    }

    /// Prepare for the next pass. `promote` makes what the last pass solved the deltas merged rows
    /// run with (the Jacobi step).
    pub fn begin_pass(&mut self, be: &B, mode: Mode, promote: bool) {
        if promote {
            self.merged = std::mem::replace(&mut self.solved, vec![None; self.targets.len()]);
            for (dev, m) in self.merged_dev.iter_mut().zip(&self.merged) {
                set_device_delta(be, dev, m.as_ref());
            }
        }
        self.mode = mode;
        self.seen = 0;
        self.stage = None;
    }

    /// Run the merged rows with `merged` (deltas computed elsewhere: a data-free baseline).
    pub fn set_merged(&mut self, be: &B, merged: &[Merged]) {
        self.merged = merged.iter().cloned().map(Some).collect();
        self.merged_dev = merged.iter().map(|m| Some((be.upload(&m.a), be.upload(&m.b)))).collect();
    }
}

/// A task's adapter-stream rows and, once the merged model runs, its merged-stream rows.
type TaskRows = (Range<usize>, Option<Range<usize>>);

/// The index, among its task's samples, of each task's first sample in the chunk (None for a
/// task the chunk does not hold).
fn first_samples(input: &StageInput<impl Backend>, tasks: usize) -> Vec<Option<usize>> {
    let mut out = vec![None; tasks];
    for g in &input.batch.groups {
        out[g.task] = Some(g.first_sample);
    }
    out
}

/// Rows of the adapter-stream and merged-stream groups of each task.
fn task_rows(input: &StageInput<impl Backend>, tasks: usize) -> Vec<TaskRows> {
    let mut out = vec![(0..0, None); tasks];
    for (g, group) in input.batch.groups.iter().enumerate() {
        match group.stream {
            Stream::Adapter(_) => out[group.task].0 = input.batch.rows(g, input.level),
            Stream::Merged => out[group.task].1 = Some(input.batch.rows(g, input.level)),
            Stream::Base => {}
        }
    }
    out
}

impl<B: Backend> StageHook<B> for IterisHook<'_, B> {
    type Held = Held<B::T>;

    fn finished(&self) -> bool {
        self.seen == self.targets.len()
    }

    /// 1–2 for the chunk's rows: the adapter rows, the adaptive weights' terms, the Grams.
    fn contribute(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T]) -> Option<Held<B::T>> {
        let targeted: Vec<(usize, usize)> =
            input.mods.iter().enumerate().filter_map(|(j, m)| self.index.get(m.name).map(|&t| (j, t))).collect();
        if targeted.is_empty() {
            return None;
        }
        let tasks = self.targets[0].loras.len();
        let rows = task_rows(input, tasks);
        let firsts = first_samples(input, tasks);
        let stage_key = targeted[0].1;
        // The first pass of a Jacobi that keeps the adapter streams records their inputs.
        let mut kept = self.kept.take();
        if let Some(kept) = kept.as_mut() {
            for (i, ((ra, rm), first)) in rows.iter().zip(&firsts).enumerate() {
                if let (false, None, Some(first)) = (ra.is_empty(), rm, first) {
                    let idx: Vec<u32> = (ra.start as u32..ra.end as u32).collect();
                    kept.insert((stage_key, i, *first), be.select_rows(input.x, &idx));
                }
            }
        }
        // Each task's adapter input: this chunk's adapter rows, or what the first pass kept; for
        // RegMean++, the task's merged rows, which then also stand in for X̃ (`gram_rows`).
        let merged_inputs = self.settings.merged_inputs;
        let adapter_x: Vec<Option<(&B::T, Range<usize>)>> = rows
            .iter()
            .enumerate()
            .map(|(i, (ra, rm))| match (kept.as_ref(), firsts[i]) {
                _ if merged_inputs => rm.clone().map(|rm| (input.x, rm)),
                (Some(k), Some(first)) if ra.is_empty() => k.get(&(stage_key, i, first)).map(|x| (x, 0..be.dims(x).0)),
                _ => (!ra.is_empty()).then(|| (input.x, ra.clone())),
            })
            .collect();
        let gram_rows: Vec<TaskRows> = match merged_inputs {
            true => rows.iter().map(|(ra, _)| (ra.clone(), None)).collect(),
            false => rows.clone(),
        };
        let replaying = !merged_inputs && rows.iter().zip(&adapter_x).any(|((ra, _), x)| ra.is_empty() && x.is_some());
        // Everything the host reads in this stage is deferred and fetched at once (one readback on
        // the GPU), together with the alignment errors the previous stage left pending.
        let mut reads = std::mem::take(&mut self.reads);
        let mut stage = self.stage.take().unwrap_or_else(|| Stage {
            // Replaying kept inputs, the adaptive weights are those the first pass measured.
            weights: if replaying {
                targeted
                    .iter()
                    .map(|&(_, t)| self.records[t].c.iter().map(|&c| Weight::constant(c)).collect())
                    .collect()
            } else {
                self.defer_weight_norms(be, input, &targeted, &mut reads)
            },
            targeted: targeted.clone(),
            grams: vec![None; tasks],
            rows: vec![0; tasks],
            systems: Vec::new(),
        });
        let mut own = self.run_adapter_rows(be, input, &rows, ys, &mut stage, &mut reads);
        // Kept inputs: U_i = s_i X_i A_iᵀ for the alignment errors, from them.
        for (&(_, t), own) in targeted.iter().zip(&mut own).filter(|_| !merged_inputs) {
            for (i, ((ra, _), x)) in rows.iter().zip(&adapter_x).enumerate() {
                if let (true, Some((x, xr)), Some(l)) = (ra.is_empty(), x, self.loras[t][i].as_ref()) {
                    let mut u = be.matmul_t(x, xr.clone(), &l.a);
                    be.scale(&mut u, l.scale);
                    own[i] = Some(u);
                }
            }
        }
        if self.mode != Mode::Evaluate {
            self.add_grams(be, input.x, ys, &adapter_x, &gram_rows, &mut stage, &mut reads);
        }
        for (n, x) in stage.rows.iter_mut().zip(&adapter_x) {
            *n += x.as_ref().map_or(0, |(_, r)| r.len());
        }
        drop(adapter_x);
        self.kept = kept;
        self.reads = reads;
        self.stage = Some(stage);
        Some(Held { targeted, rows, own })
    }

    /// Step 3: Every chunk has contributed: the systems and their factors join the stage's reads.
    fn take_reads(&mut self, be: &B) -> Reads<B> {
        let mut reads = std::mem::take(&mut self.reads);
        if let Some(mut stage) = self.stage.take() {
            if self.mode != Mode::Evaluate {
                // Every task has rows in some chunk (a task without samples is refused before).
                let grams: Vec<TaskGrams> =
                    stage.grams.iter().map(|g| g.clone().expect("every task has rows")).collect();
                stage.systems = (stage.weights.iter().enumerate())
                    .map(|(k, w)| self.defer_system(be, k, w, &grams, &mut reads))
                    .collect();
            }
            self.stage = Some(stage);
        }
        reads
    }

    /// Step 4: The stage's values: adaptive weights, the previous stage's alignment errors, the solves.
    fn settle(&mut self, be: &B, mut values: Values) -> Result<()> {
        // The host's part of a stage: statistics to f64 matrices, the solves.
        let _p = crate::profile::span("solve", 0.0);
        self.settle_align(&values);
        let stage = self.stage.take().expect("a stage was contributed");
        self.settle_weights(&stage, &values);
        // Non-finite features (an overflow or a division by zero upstream) would end as a
        // "singular" solve or a NaN adapter: stop here, at the first module they reach.
        let finite = |id: GramId| values.gram(id).data.iter().all(|v| v.is_finite());
        let bad_task = (0..stage.rows.len()).find(|&i| {
            stage.grams[i].as_ref().is_some_and(|g| !g.ids().into_iter().all(finite))
                || stage.weights.iter().any(|w| w[i].den.is_some_and(|d| !values[d].is_finite()))
        });
        if let Some(i) = bad_task {
            return Err(Error::NonFinite { module: self.targets[stage.targeted[0].1].name.clone(), task: i });
        }
        // Each Gram moves out of `values` into the host's matrix type once (a task's cross term
        // and Gram may be one id), so the stage never holds two copies of its statistics.
        let mut host_grams: HashMap<GramId, DMatrix<f64>> = HashMap::new();
        for id in stage.grams.iter().flatten().flat_map(TaskGrams::orientation_free) {
            host_grams.entry(id).or_insert_with(|| host_transposed(values.take_gram(id)));
        }
        for id in stage.grams.iter().flatten().flat_map(TaskGrams::ids) {
            host_grams.entry(id).or_insert_with(|| host(&values.take_gram(id)));
        }
        for (&(_, t), (spec, factor)) in stage.targeted.iter().zip(&stage.systems) {
            let spec = spec.map(|&s| values[s], |g| &host_grams[g]);
            let factor = factor.and_then(|f| values.take_factor(f));
            self.solve(be, t, &spec, factor)?;
        }
        self.seen += stage.targeted.len();
        (self.on_stage)(self.seen, self.targets.len());
        Ok(())
    }

    /// 5.
    fn finish(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T], held: Held<B::T>) {
        self.run_merged_rows(be, input, held, ys);
    }

    fn end_pass(&mut self, values: Values) {
        self.settle_align(&values);
    }
}

/// Put a merged delta on the backend, into the buffers of the previous one where there is one.
fn set_device_delta<B: Backend>(be: &B, dev: &mut Option<(B::T, B::T)>, m: Option<&Merged>) {
    match (dev.as_mut(), m) {
        (Some((a, b)), Some(m)) => {
            be.overwrite(a, &m.a);
            be.overwrite(b, &m.b);
        }
        (_, m) => *dev = m.map(|m| (be.upload(&m.a), be.upload(&m.b))),
    }
}

/// The rank the output objective's dense deltas are exported at unless `--rank` says: the largest
/// lossless IterIS rank (Σ r_i) of any module, so the merged adapter is no larger per module than
/// the lossless merge's largest.
pub fn default_dense_rank(targets: &[Target]) -> usize {
    let sum = |t: &Target| t.loras.iter().flatten().map(|l| l.a.rows).sum::<usize>();
    targets.iter().map(sum).max().unwrap_or(1).max(1)
}

/// s²‖B A‖²_F = s² tr((BᵀB)(AAᵀ)), from the small factors.
fn lora_norm2(l: &LoraModule) -> f64 {
    let (a, b, s) = (to_f64(&l.a), to_f64(&l.b), l.scale as f64);
    s * s * (b.transpose() * &b).component_mul(&(&a * a.transpose())).sum()
}
