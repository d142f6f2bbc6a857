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
use super::Objective;
use crate::backend::{Backend, Cross, FactorId, GramId, Reads, ScalarId, SystemSpec, SystemTerm, Values, Weight};
use crate::error::{Error, Result};
use crate::formats::peft::LoraModule;
use crate::models::chunked::StageHook;
use crate::models::{StageInput, Stream};
use nalgebra::DMatrix;
use std::collections::HashMap;
use std::ops::Range;

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
    pub alpha1: f64,
    pub alpha2: f64,
    /// Feature mixing of the released code: X̃ ← (1 − ρ) X̃ + ρ X.
    pub rho: f32,
    /// RegMean instead of IterIS: no adaptive weights, no ridge, and each Gram's off-diagonal
    /// entries scaled by this factor (the merged stream is not run: X̃ = X).
    pub regmean: Option<f64>,
    /// λ_i: each task's weight in the objective Σ λ_i c_i ‖X_i ΔW_iᵀ − X̃_i ΔWᵀ‖² (1 each unless
    /// set by `--weights` or chosen by `merge::balance`).
    pub task_weights: Vec<f64>,
    /// What each module's merged delta fits: each adapter's delta on its inputs (IterIS), or each
    /// adapter model's whole output from the merged model's inputs (`Objective::Output`).
    pub objective: Objective,
    /// The output objective's dense deltas leave as LoRAs of this rank.
    pub dense_rank: usize,
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
        alpha1: f64,
        alpha2: f64,
        rho: f32,
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
            alpha1,
            alpha2,
            rho,
            regmean: None,
            task_weights: vec![1.0; targets.first().map_or(0, |t| t.loras.len())],
            objective: Objective::Delta,
            dense_rank: default_dense_rank(targets),
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

/// ‖X_i ΔW_iᵀ‖² and ‖X_i ΔW_iᵀ − X̃_i ΔW*ᵀ‖² of target t, task i, pending: with X_i ΔW_iᵀ =
/// U B_iᵀ and X̃_i ΔW*ᵀ = V B*ᵀ, they are ⟨UᵀU, B_iᵀB_i⟩ and that − 2⟨UᵀV, B_iᵀB*⟩ + ⟨VᵀV, B*ᵀB*⟩
/// (⟨·,·⟩: the sum of the elementwise product), from Grams of r and R columns.
struct AlignRead {
    target: usize,
    task: usize,
    uu: Option<GramId>,
    uv: Option<GramId>,
    vv: Option<GramId>,
    /// B_iᵀB_i.
    bi: DMatrix<f64>,
    /// (B_iᵀB*, B*ᵀB*) where the merged rows ran with a delta.
    bb: Option<(DMatrix<f64>, DMatrix<f64>)>,
}

/// The stage's targeted modules: (index in the stage's modules, index in `targets`).
type Targeted = [(usize, usize)];

/// The ridge-free statistics of a task at a stage.
#[derive(Clone)]
struct TaskGrams {
    /// X̃_iᵀ X̃_i.
    gram: GramId,
    cross: StageCross,
}

/// X_iᵀ X̃_i as a stage gathers it (`Cross`): whole (the Gram's id where X̃ = X), or projected
/// onto each targeted module's A_i (indexed like `Stage::targeted`) with the f32 C_i for its norm.
#[derive(Clone)]
enum StageCross {
    Full(GramId),
    Projected {
        sac: Vec<Option<GramId>>,
        for_norm: GramId,
    },
    /// The output objective: X̃_iᵀ (Y_i − X̃_i W0ᵀ) per targeted module (`Cross::Output`).
    Output {
        xty: Vec<GramId>,
        for_norm: GramId,
    },
}

impl TaskGrams {
    /// The cross term as module k of the stage reads it.
    fn cross(&self, k: usize) -> Cross<GramId> {
        match &self.cross {
            StageCross::Full(id) => Cross::Full(*id),
            StageCross::Projected { sac, for_norm } => Cross::Projected { sac: sac[k], for_norm: *for_norm },
            StageCross::Output { xty, for_norm } => Cross::Output { xty: xty[k], for_norm: *for_norm },
        }
    }

    /// The ids whose readers do not care for orientation: the symmetric Gram (`assemble`
    /// symmetrises it) and the cross term held for its norm. The host takes them without the
    /// transposing copy a column-major matrix needs (6 of 8 ms per (in, in) Gram).
    fn orientation_free(&self) -> Vec<GramId> {
        let mut ids = vec![self.gram];
        if let StageCross::Projected { for_norm, .. } | StageCross::Output { for_norm, .. } = &self.cross {
            ids.push(*for_norm);
        }
        ids
    }

    /// Every id it holds (a Gram may appear twice).
    fn ids(&self) -> Vec<GramId> {
        let mut ids = vec![self.gram];
        match &self.cross {
            StageCross::Full(id) => ids.push(*id),
            StageCross::Projected { sac, for_norm } => ids.extend(sac.iter().flatten().chain([for_norm])),
            StageCross::Output { xty, for_norm } => ids.extend(xty.iter().chain([for_norm])),
        }
        ids
    }
}

/// A stage's statistics as its chunks contribute them: ids into the hook's `reads`, each summed
/// over the chunks (`Backend::add_gram`, `add_scalar`).
struct Stage {
    targeted: Vec<(usize, usize)>,
    /// Per targeted module, per task: c_i, its denominator summed over the chunks.
    weights: Vec<Vec<Weight<ScalarId>>>,
    /// Per task (None until a chunk with its rows contributes; solving passes only).
    grams: Vec<Option<TaskGrams>>,
    /// Token rows per task.
    rows: Vec<usize>,
    /// Per targeted module: its system and the backend's factor of it (recorded once every chunk
    /// has contributed).
    systems: Vec<(SystemSpec<ScalarId, GramId>, Option<FactorId>)>,
}

/// What a chunk keeps from contributing to finishing a stage.
pub struct Held<T> {
    targeted: Vec<(usize, usize)>,
    rows: Vec<TaskRows>,
    /// Per targeted module, per task: U_i = s_i X_i A_iᵀ on the chunk's rows (X_i ΔW_iᵀ = U_i B_iᵀ).
    own: Vec<Vec<Option<T>>>,
}

/// A pending Gram that may not exist yet (None: `new()` makes it), `add` applied where it does;
/// its id.
fn accumulate<B: Backend>(
    reads: &mut Reads<B>,
    acc: Option<GramId>,
    new: impl FnOnce() -> B::Gram,
    add: impl FnOnce(&mut B::Gram),
) -> GramId {
    match acc {
        Some(id) => {
            add(reads.gram_mut(id));
            id
        }
        None => reads.gram(new()),
    }
}

/// `acc += x[xr]ᵀ · y[yr]` for a pending Gram that may not exist yet; its id.
fn add_gram<B: Backend>(
    be: &B,
    reads: &mut Reads<B>,
    acc: Option<GramId>,
    x: &B::T,
    xr: Range<usize>,
    y: &B::T,
    yr: Range<usize>,
) -> GramId {
    let (x2, y2) = (xr.clone(), yr.clone());
    accumulate(reads, acc, || be.defer_gram(x, x2, y, y2), |g| be.add_gram(g, x, xr, y, yr))
}

/// `add_gram` for a Gram read only for its norm (`Backend::add_gram_for_norm`).
fn add_gram_for_norm<B: Backend>(
    be: &B,
    reads: &mut Reads<B>,
    acc: Option<GramId>,
    x: &B::T,
    xr: Range<usize>,
    y: &B::T,
    yr: Range<usize>,
) -> GramId {
    let (x2, y2) = (xr.clone(), yr.clone());
    accumulate(reads, acc, || be.defer_gram_for_norm(x, x2, y, y2), |g| be.add_gram_for_norm(g, x, xr, y, yr))
}

/// `*acc += more` for a pending scalar that may not exist yet.
fn add_scalar<B: Backend>(be: &B, reads: &mut Reads<B>, acc: &mut Option<ScalarId>, more: B::Scalar) {
    match acc {
        Some(id) => be.add_scalar(reads.scalar_mut(*id), more),
        None => *acc = Some(reads.scalar(more)),
    }
}

impl<B: Backend> IterisHook<'_, B> {
    /// Step 1a: The numerator of each task's adaptive weight, ‖W0 + ΔW_i‖²_F, per targeted module: known
    /// after a module's first visit, else ‖W0‖² + ⟨W0, B_i A_i⟩ (= Σ (A_i W0ᵀ) ⊙ B_iᵀ) read now.
    fn defer_weight_norms(
        &self,
        be: &B,
        input: &StageInput<'_, B>,
        targeted: &Targeted,
        reads: &mut Reads<B>,
    ) -> Vec<Vec<Weight<ScalarId>>> {
        targeted
            .iter()
            .map(|&(j, t)| {
                if let Some(w) = &self.w_norm2[t] {
                    return w.iter().map(|&w| Weight::constant(w)).collect();
                }
                let w = input.mods[j].w;
                let base = reads.scalar(be.defer_sq_norm(w, 0..be.dims(w).0));
                self.loras[t]
                    .iter()
                    .zip(&self.targets[t].loras)
                    .map(|(dev, l)| {
                        let mut num_terms = vec![(1.0, base)];
                        if let (Some(d), Some(l)) = (dev, l) {
                            let aw = be.matmul_t(&d.a, 0..be.dims(&d.a).0, w);
                            num_terms.push((2.0 * l.scale as f64, reads.scalar(be.defer_dot(&aw, &d.bt))));
                        }
                        Weight { num: l.as_ref().map_or(0.0, lora_norm2), num_terms, den: None }
                    })
                    .collect()
            })
            .collect()
    }

    /// Step 1b: The chunk's adapter rows run with W0 + ΔW_i.
    ///
    /// Adds ‖X_i (W0 + ΔW_i)ᵀ‖² to the adaptive weights' denominators and returns
    /// U_i = s_i X_i A_iᵀ (X_i ΔW_iᵀ = U_i B_iᵀ) per targeted module and task.
    fn run_adapter_rows(
        &self,
        be: &B,
        input: &StageInput<'_, B>,
        rows: &[TaskRows],
        ys: &mut [B::T],
        stage: &mut Stage,
        reads: &mut Reads<B>,
    ) -> Vec<Vec<Option<B::T>>> {
        stage
            .targeted
            .iter()
            .zip(&mut stage.weights)
            .map(|(&(j, t), weights)| {
                rows.iter()
                    .zip(weights)
                    .enumerate()
                    .map(|(i, ((ra, _), w))| {
                        if ra.is_empty() {
                            return None;
                        }
                        let l = self.loras[t][i].as_ref();
                        let u =
                            l.map(|l| be.add_lowrank(&mut ys[j], ra.clone(), input.x, ra.clone(), &l.a, &l.b, l.scale));
                        add_scalar(be, reads, &mut w.den, be.defer_sq_norm(&ys[j], ra.clone()));
                        u
                    })
                    .collect()
            })
            .collect()
    }

    /// Step 2: Adds the chunk's rows to X̃_iᵀX̃_i, shared by the stage's modules, and to the cross
    /// terms: X_iᵀX̃_i itself where X̃ = X (the first pass: the Gram's id), else projected
    /// (`Cross::Projected`), s_i A_i X_iᵀX̃_i per targeted module and X_iᵀX̃_i at f32 precision
    /// for its norm. The output objective reads, instead of the projection, X̃_iᵀ (Y_i − X̃_i W0ᵀ)
    /// per targeted module, from the module outputs `ys` (the adapter rows already run with
    /// W0 + ΔW_i, the merged rows still with W0 alone; no bias yet, and it would cancel).
    fn add_grams(
        &self,
        be: &B,
        x: &B::T,
        ys: &[B::T],
        adapter_x: &[Option<(&B::T, Range<usize>)>],
        rows: &[TaskRows],
        stage: &mut Stage,
        reads: &mut Reads<B>,
    ) {
        for (i, ((xa, (_, rm)), acc)) in adapter_x.iter().zip(rows).zip(&mut stage.grams).enumerate() {
            let Some((xa, ra)) = xa.clone() else { continue };
            let mixed;
            let (xt, rt) = match rm {
                None => (xa, ra.clone()),
                Some(rm) if self.rho != 0.0 => {
                    mixed = be.mix_rows(x, rm.clone(), 1.0 - self.rho, xa, ra.clone(), self.rho);
                    (&mixed, 0..ra.len())
                }
                Some(rm) => (x, rm.clone()),
            };
            let prev = acc.take();
            let prev_gram = prev.as_ref().map(|g| g.gram);
            let cross = match (rm, prev.map(|g| g.cross)) {
                // X̃ = X: the cross term is the Gram.
                (None, prev) => {
                    let id = add_gram(be, reads, prev_gram, xa, ra.clone(), xt, rt);
                    debug_assert!(prev.is_none_or(|c| matches!(c, StageCross::Full(p) if p == id)));
                    *acc = Some(TaskGrams { gram: id, cross: StageCross::Full(id) });
                    continue;
                }
                // RegMean scales C's off-diagonal entries: it reads C whole.
                (Some(_), prev) if self.regmean.is_some() => {
                    let prev = match prev {
                        Some(StageCross::Full(id)) => Some(id),
                        _ => None,
                    };
                    StageCross::Full(add_gram(be, reads, prev, xa, ra.clone(), xt, rt.clone()))
                }
                (Some(rm), prev) if self.objective == Objective::Output => {
                    let (prev_xty, for_norm) = match prev {
                        Some(StageCross::Output { xty, for_norm }) => {
                            (xty.into_iter().map(Some).collect(), Some(for_norm))
                        }
                        _ => (vec![None; stage.targeted.len()], None),
                    };
                    let xty = stage
                        .targeted
                        .iter()
                        .zip(prev_xty)
                        .map(|(&(j, _), acc)| {
                            // Y_i − X̃_i W0ᵀ, (rows, out).
                            let target = be.mix_rows(&ys[j], ra.clone(), 1.0, &ys[j], rm.clone(), -1.0);
                            add_gram(be, reads, acc, xt, rt.clone(), &target, 0..ra.len())
                        })
                        .collect();
                    let for_norm = add_gram_for_norm(be, reads, for_norm, xa, ra.clone(), xt, rt.clone());
                    StageCross::Output { xty, for_norm }
                }
                (Some(_), prev) => {
                    let (mut sac, for_norm) = match prev {
                        Some(StageCross::Projected { sac, for_norm }) => (sac, Some(for_norm)),
                        _ => (vec![None; stage.targeted.len()], None),
                    };
                    for (sac, &(_, t)) in sac.iter_mut().zip(&stage.targeted) {
                        if let Some(l) = self.loras[t][i].as_ref() {
                            let (a, s) = (&l.a, l.scale);
                            *sac = Some(accumulate(
                                reads,
                                *sac,
                                || be.defer_projected_gram(a, s, xa, ra.clone(), xt, rt.clone()),
                                |g| be.add_projected_gram(g, a, s, xa, ra.clone(), xt, rt.clone()),
                            ));
                        }
                    }
                    let for_norm = add_gram_for_norm(be, reads, for_norm, xa, ra.clone(), xt, rt.clone());
                    StageCross::Projected { sac, for_norm }
                }
            };
            let gram = add_gram(be, reads, prev_gram, xt, rt.clone(), xt, rt);
            *acc = Some(TaskGrams { gram, cross });
        }
    }

    /// Step 3: A module's system from the stage's pending statistics, and the backend's f32 factor of
    /// it, assembled there from the same pending values (so both come back in one readback).
    fn defer_system(
        &self,
        be: &B,
        k: usize,
        weights: &[Weight<ScalarId>],
        grams: &[TaskGrams],
        reads: &mut Reads<B>,
    ) -> (SystemSpec<ScalarId, GramId>, Option<FactorId>) {
        let (alpha1, alpha2) = if self.regmean.is_some() { (0.0, 0.0) } else { (self.alpha1, self.alpha2) };
        let spec = SystemSpec {
            terms: grams
                .iter()
                .zip(weights)
                .zip(&self.task_weights)
                .map(|((g, w), &lambda)| SystemTerm {
                    gram: g.gram,
                    cross: g.cross(k),
                    // RegMean: no adaptive weights.
                    weight: if self.regmean.is_some() { Weight::constant(lambda) } else { w.scaled(lambda) },
                })
                .collect(),
            alpha1,
            alpha2,
            off_diagonal: self.regmean.unwrap_or(1.0),
        };
        let factor = be.defer_factor(&spec.map(|&s| reads.pending_scalar(s), |&g| reads.pending_gram(g)));
        (spec, factor.map(|f| reads.factor(f)))
    }

    /// Record the alignment errors that came back: the error relative to ‖X_i ΔW_iᵀ‖.
    fn settle_align(&mut self, values: &Values) {
        // ⟨G, H⟩ for a fetched Gram G.
        let inner = |g: Option<GramId>, h: &DMatrix<f64>| -> f64 {
            let g = values.gram(g.expect("every alignment read has its Grams"));
            (0..g.rows)
                .flat_map(|r| (0..g.cols).map(move |c| (r, c)))
                .map(|(r, c)| g.data[r * g.cols + c] * h[(r, c)])
                .sum()
        };
        for a in std::mem::take(&mut self.align) {
            let norm = inner(a.uu, &a.bi);
            let err = match (&a.bb, a.uv) {
                (Some((cross, bm)), Some(_)) => norm - 2.0 * inner(a.uv, cross) + inner(a.vv, bm),
                _ => norm,
            };
            self.records[a.target].align[a.task] = Some((err.max(0.0) / norm.max(f64::MIN_POSITIVE)).sqrt());
        }
    }

    /// Settle the adaptive weights: ‖W0 + ΔW_i‖² for later visits, and c_i.
    fn settle_weights(&mut self, stage: &Stage, values: &Values) {
        for (&(_, t), w) in stage.targeted.iter().zip(&stage.weights) {
            let w: Vec<Weight<f64>> = w.iter().map(|w| w.map(|&s| values[s])).collect();
            self.w_norm2[t] = Some(w.iter().map(Weight::numerator).collect());
            let rec = &mut self.records[t];
            rec.rows = stage.rows.clone();
            rec.c = w.iter().map(|w| if self.regmean.is_some() { 1.0 } else { w.value() }).collect();
            rec.align = vec![None; stage.rows.len()];
        }
    }

    /// Step 4: Solve a module's system in f64 on the host, refined around the backend's factor, and make
    /// the result the delta the merged rows run with (`Sweep`) or the next pass's (`Jacobi`).
    fn solve(
        &mut self,
        be: &B,
        t: usize,
        spec: &SystemSpec<f64, &DMatrix<f64>>,
        factor: Option<crate::mat::Mat64>,
    ) -> Result<()> {
        let loras: Vec<Option<&LoraModule>> = self.targets[t].loras.iter().map(Option::as_ref).collect();
        let sys = assemble(&self.targets[t].name, spec, &loras);
        let solved = finish(sys, factor, be.offers_cholesky_f32(), self.dense_rank)?;
        let m = solved.merged;
        self.records[t].solve_path = Some(solved.path);
        self.records[t].energy = solved.kept;
        if self.mode == Mode::Sweep {
            set_device_delta(be, &mut self.merged_dev[t], Some(&m));
            self.merged[t] = Some(m.clone());
        }
        self.solved[t] = Some(m);
        Ok(())
    }

    /// Step 5: The chunk's merged rows run with W0 + ΔW* = W0 + B* A*.
    ///
    /// Their alignment error against each adapter's own output, ‖U_i B_iᵀ − V B*ᵀ‖² with
    /// V = X̃_i A*ᵀ, is added to what the next fetch reads as the r × r Grams UᵀU, UᵀV, VᵀV it
    /// expands into (`AlignRead`): never the (rows, out) products themselves.
    fn run_merged_rows(&mut self, be: &B, input: &StageInput<'_, B>, held: Held<B::T>, ys: &mut [B::T]) {
        for (&(j, t), own) in held.targeted.iter().zip(held.own) {
            for (i, ((_, rm), u)) in held.rows.iter().zip(own).enumerate() {
                let Some(rm) = rm.clone().filter(|rm| !rm.is_empty()) else { continue };
                let v = self.merged_dev[t]
                    .as_ref()
                    .map(|(a, b)| be.add_lowrank(&mut ys[j], rm.clone(), input.x, rm, a, b, 1.0));
                let (Some(u), Some(l)) = (u, self.targets[t].loras[i].as_ref()) else { continue };
                let n = be.dims(&u).0;
                let at = match self.align.iter().position(|a| (a.target, a.task) == (t, i)) {
                    Some(at) => at,
                    None => {
                        let bi = to_f64(&l.b);
                        let merged = self.merged[t].as_ref().filter(|_| v.is_some()).map(|m| to_f64(&m.b));
                        self.align.push(AlignRead {
                            target: t,
                            task: i,
                            uu: None,
                            uv: None,
                            vv: None,
                            bb: merged.as_ref().map(|bm| (bi.transpose() * bm, bm.transpose() * bm)),
                            bi: bi.transpose() * &bi,
                        });
                        self.align.len() - 1
                    }
                };
                let reads = &mut self.reads;
                let a = &mut self.align[at];
                a.uu = Some(add_gram(be, reads, a.uu, &u, 0..n, &u, 0..n));
                if let Some(v) = &v {
                    a.uv = Some(add_gram(be, reads, a.uv, &u, 0..n, v, 0..n));
                    a.vv = Some(add_gram(be, reads, a.vv, v, 0..n, v, 0..n));
                }
            }
        }
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
        // Each task's adapter input: this chunk's adapter rows, or what the first pass kept.
        let adapter_x: Vec<Option<(&B::T, Range<usize>)>> = rows
            .iter()
            .enumerate()
            .map(|(i, (ra, _))| match (kept.as_ref(), firsts[i]) {
                (Some(k), Some(first)) if ra.is_empty() => k.get(&(stage_key, i, first)).map(|x| (x, 0..be.dims(x).0)),
                _ => (!ra.is_empty()).then(|| (input.x, ra.clone())),
            })
            .collect();
        let replaying = rows.iter().zip(&adapter_x).any(|((ra, _), x)| ra.is_empty() && x.is_some());
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
        for (&(_, t), own) in targeted.iter().zip(&mut own) {
            for (i, ((ra, _), x)) in rows.iter().zip(&adapter_x).enumerate() {
                if let (true, Some((x, xr)), Some(l)) = (ra.is_empty(), x, self.loras[t][i].as_ref()) {
                    let mut u = be.matmul_t(x, xr.clone(), &l.a);
                    be.scale(&mut u, l.scale);
                    own[i] = Some(u);
                }
            }
        }
        if self.mode != Mode::Evaluate {
            self.add_grams(be, input.x, ys, &adapter_x, &rows, &mut stage, &mut reads);
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
