//! The IterIS hook: what a forward pass does at each stage while merging.
//!
//! The batch holds, for every task i, its samples run by the adapter-i model (rows X_i) and, once a
//! merged delta exists, the same samples run by the merged model (rows X̃_i). At each stage the hook
//! 1. adds each adapter's delta to its own rows and measures ‖X_i (W0+ΔW_i)ᵀ‖ for the adaptive weight,
//! 2. accumulates X_iᵀX̃_i and X̃_iᵀX̃_i once for all modules of the stage (they share the input),
//! 3. has the backend assemble and factor (f32) every targeted module's system from those pending
//!    statistics, so statistics and factors come back in one readback,
//! 4. solves each system in f64 (`solve.rs`), refined around the factor where there is one,
//! 5. adds the merged delta to the merged rows and measures the alignment error.
//!
//! The two schedules differ only in which delta step 5 uses. `Sweep` uses the one just solved:
//! merged rows downstream then see final upstream deltas, so one pass reaches the fixed point of
//! the iteration exactly. `Jacobi` keeps the previous pass's deltas and stores the new ones for the
//! next pass (the published schedule). `Evaluate` solves nothing and only measures.

use super::solve::{assemble, finish, Merged, SolvePath, TaskStats};
use crate::backend::{Backend, FactorTerm, Fetched};
use crate::error::{Error, Result};
use crate::formats::peft::LoraModule;
use crate::merge::solve::to_f64;
use crate::models::{Hook, StageInput, Stream};
use nalgebra::DMatrix;
use std::collections::HashMap;
use std::ops::Range;

/// A module at least one adapter targets.
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
    /// Alignment errors recorded but not yet read (they ride along with the next stage's fetch).
    align_pending: Vec<(Slot, B::Pending)>,
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
    seen: usize,
    on_stage: Box<dyn FnMut(usize, usize) + 'a>,
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
            align_pending: Vec::new(),
            merged: vec![None; targets.len()],
            merged_dev: targets.iter().map(|_| None).collect(),
            solved: vec![None; targets.len()],
            records: vec![ModuleRecord::default(); targets.len()],
            mode: Mode::Sweep,
            alpha1,
            alpha2,
            rho,
            regmean: None,
            seen: 0,
            on_stage,
        }
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
    }

    /// Run the merged rows with `merged` (deltas computed elsewhere: a data-free baseline).
    pub fn set_merged(&mut self, be: &B, merged: &[Merged]) {
        self.merged = merged.iter().cloned().map(Some).collect();
        self.merged_dev = merged.iter().map(|m| Some((be.upload(&m.a), be.upload(&m.b)))).collect();
    }
}

impl<B: Backend> IterisHook<'_, B> {
    /// Record a fetched alignment statistic: ‖X_i ΔW_iᵀ‖² first, then the error relative to it.
    fn settle_align(&mut self, slot: Slot, value: Fetched) {
        match slot {
            Slot::AlignNorm(t, i) => self.records[t].align[i] = Some(value.scalar()),
            Slot::AlignErr(t, i) => {
                let norm = self.records[t].align[i].unwrap();
                self.records[t].align[i] = Some((value.scalar() / norm.max(f64::MIN_POSITIVE)).sqrt());
            }
            other => unreachable!("{other:?} is not an alignment statistic"),
        }
    }
}

/// Rows of the adapter-stream and merged-stream groups of each task.
fn task_rows(input: &StageInput<impl Backend>, tasks: usize) -> Vec<(Range<usize>, Option<Range<usize>>)> {
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

impl<B: Backend> Hook<B> for IterisHook<'_, B> {
    fn finished(&self) -> bool {
        self.seen == self.targets.len()
    }

    async fn stage(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T]) -> Result<()> {
        let targeted: Vec<(usize, usize)> =
            input.mods.iter().enumerate().filter_map(|(j, m)| self.index.get(m.name).map(|&t| (j, t))).collect();
        if targeted.is_empty() {
            return Ok(());
        }
        let tasks = self.targets[0].loras.len();
        let rows = task_rows(input, tasks);
        let x = input.x;
        // Everything the host reads in this stage is deferred and fetched at once (one readback on
        // the GPU), together with the alignment errors the previous stage left pending.
        let (mut slots, mut pending): (Vec<Slot>, Vec<B::Pending>) =
            std::mem::take(&mut self.align_pending).into_iter().unzip();

        // 1. Weight norms ‖W0‖² and ⟨W0, B_i A_i⟩ = Σ (A_i W0ᵀ) ⊙ B_iᵀ, at a module's first visit.
        // at[slot] = index of the slot's value in `pending`, for the systems assembled below.
        let mut at: HashMap<Slot, usize> = HashMap::new();
        let mut defer = |slot: Slot, p: B::Pending, slots: &mut Vec<Slot>, pending: &mut Vec<B::Pending>| {
            at.insert(slot, pending.len());
            slots.push(slot);
            pending.push(p);
        };
        for &(j, t) in &targeted {
            if self.w_norm2[t].is_none() {
                let w = input.mods[j].w;
                defer(Slot::WeightNorm(t), be.defer_sq_norm(w, 0..be.dims(w).0), &mut slots, &mut pending);
                for (i, l) in self.loras[t].iter().enumerate() {
                    if let Some(l) = l {
                        let aw = be.matmul_t(&l.a, 0..be.dims(&l.a).0, w);
                        defer(Slot::WeightCross(t, i), be.defer_dot(&aw, &l.bt), &mut slots, &mut pending);
                    }
                }
            }
        }
        // 2. Adapter rows: W0 + ΔW_i, and ‖X_i (W0 + ΔW_i)ᵀ‖² for the adaptive weights.
        // own[k][i]: X_i ΔW_iᵀ for targeted module k and task i.
        let mut own: Vec<Vec<Option<B::T>>> = Vec::new();
        for &(j, t) in &targeted {
            let mut per_task = Vec::new();
            for (i, (ra, _)) in rows.iter().enumerate() {
                let d = self.loras[t][i].as_ref().map(|l| be.lowrank(x, ra.clone(), &l.a, &l.b, l.scale));
                if let Some(d) = &d {
                    be.add_rows(&mut ys[j], ra.clone(), d, 1.0);
                }
                defer(Slot::Denominator(t, i), be.defer_sq_norm(&ys[j], ra.clone()), &mut slots, &mut pending);
                per_task.push(d);
            }
            own.push(per_task);
        }
        // 3. X_iᵀX̃_i and X̃_iᵀX̃_i, shared by the stage's modules (X̃ = X before any merged delta).
        let solving = self.mode != Mode::Evaluate;
        if solving {
            for (i, (ra, rm)) in rows.iter().enumerate() {
                let mixed;
                let (xt, rt) = match rm {
                    None => (x, ra.clone()),
                    Some(rm) if self.rho != 0.0 => {
                        mixed = be.mix_rows(x, rm.clone(), 1.0 - self.rho, x, ra.clone(), self.rho);
                        (&mixed, 0..ra.len())
                    }
                    Some(rm) => (x, rm.clone()),
                };
                defer(Slot::Cross(i), be.defer_gram(x, ra.clone(), xt, rt.clone()), &mut slots, &mut pending);
                if rm.is_some() {
                    defer(Slot::Gram(i), be.defer_gram(xt, rt.clone(), xt, rt), &mut slots, &mut pending);
                }
            }
        }
        let (alpha1, alpha2) = if self.regmean.is_some() { (0.0, 0.0) } else { (self.alpha1, self.alpha2) };
        // 4. Each module's system matrix, assembled and factored in f32 on the backend from the
        // statistics still pending there, so statistics and factors come back in one readback.
        if solving {
            let mut factors = Vec::new();
            for &(_, t) in &targeted {
                let terms: Vec<_> = (0..tasks)
                    .map(|i| {
                        let gram = at.get(&Slot::Gram(i)).unwrap_or(&at[&Slot::Cross(i)]);
                        let (num, num_terms, den) = match (self.regmean, &self.w_norm2[t]) {
                            (Some(_), _) => (1.0, vec![], None),
                            (None, Some(w)) => (w[i], vec![], Some(&pending[at[&Slot::Denominator(t, i)]])),
                            (None, None) => {
                                let l = self.targets[t].loras[i].as_ref();
                                let mut terms = vec![(1.0, &pending[at[&Slot::WeightNorm(t)]])];
                                if let Some(l) = l {
                                    terms.push((2.0 * l.scale as f64, &pending[at[&Slot::WeightCross(t, i)]]));
                                }
                                (l.map_or(0.0, lora_norm2), terms, Some(&pending[at[&Slot::Denominator(t, i)]]))
                            }
                        };
                        FactorTerm {
                            gram: &pending[*gram],
                            num,
                            num_terms,
                            den,
                            ridge: alpha2,
                            off_diagonal: self.regmean.unwrap_or(1.0),
                        }
                    })
                    .collect();
                if let Some(f) = be.defer_cholesky(&terms) {
                    factors.push((Slot::Factor(t), f));
                }
            }
            for (slot, f) in factors {
                slots.push(slot);
                pending.push(f);
            }
        }

        let mut stats: Vec<(Option<DMatrix<f64>>, Option<DMatrix<f64>>)> = vec![(None, None); tasks];
        let mut denominators = vec![vec![0.0; tasks]; self.targets.len()];
        let mut factors: HashMap<usize, DMatrix<f64>> = HashMap::new();
        for (slot, value) in slots.into_iter().zip(be.fetch(pending).await?) {
            match slot {
                Slot::WeightNorm(t) => {
                    let base = value.scalar();
                    self.w_norm2[t] =
                        Some(self.targets[t].loras.iter().map(|l| base + l.as_ref().map_or(0.0, lora_norm2)).collect());
                }
                Slot::WeightCross(t, i) => {
                    let s = self.targets[t].loras[i].as_ref().unwrap().scale as f64;
                    self.w_norm2[t].as_mut().unwrap()[i] += 2.0 * s * value.scalar();
                }
                Slot::Denominator(t, i) => denominators[t][i] = value.scalar(),
                Slot::Cross(i) => stats[i].0 = Some(value.matrix()),
                Slot::Gram(i) => stats[i].1 = Some(value.matrix()),
                Slot::Factor(t) => {
                    if let Some(l) = value.factor() {
                        factors.insert(t, l);
                    }
                }
                align => self.settle_align(align, value),
            }
        }
        // Non-finite features (an overflow or a division by zero upstream) would end as a
        // "singular" solve or a NaN adapter: stop here, at the first module they reach.
        let finite = |m: &Option<DMatrix<f64>>| m.as_ref().is_none_or(|m| m.iter().all(|v| v.is_finite()));
        let bad_task = (0..tasks).find(|&i| {
            !finite(&stats[i].0)
                || !finite(&stats[i].1)
                || targeted.iter().any(|&(_, t)| !denominators[t][i].is_finite())
        });
        if let Some(i) = bad_task {
            return Err(Error::NonFinite { module: self.targets[targeted[0].1].name.clone(), task: i });
        }
        for &(_, t) in &targeted {
            let rec = &mut self.records[t];
            rec.rows = rows.iter().map(|r| r.0.len()).collect();
            rec.c = (0..tasks)
                .map(|i| match self.regmean {
                    Some(_) => 1.0,
                    None => self.w_norm2[t].as_ref().unwrap()[i] / denominators[t][i].max(f64::MIN_POSITIVE),
                })
                .collect();
        }

        // 5. One solve per module, in f64 on the host, refined around the backend's factor.
        if solving {
            for s in stats.iter_mut() {
                if let (Some(scale), Some(g)) = (self.regmean, s.0.as_mut()) {
                    // RegMean: G ← scale·G + (1 − scale)·diag(G).
                    let d = g.diagonal();
                    *g *= scale;
                    g.set_diagonal(&d);
                }
                if s.1.is_none() {
                    s.1 = s.0.clone(); // X̃ = X: the Gram is the cross term
                }
            }
            for &(_, t) in &targeted {
                let ts: Vec<TaskStats> = (0..tasks)
                    .map(|i| TaskStats {
                        cross: stats[i].0.as_ref().unwrap(),
                        gram: stats[i].1.as_ref().unwrap(),
                        c: self.records[t].c[i],
                        lora: self.targets[t].loras[i].as_ref(),
                    })
                    .collect();
                let sys = assemble(&self.targets[t].name, &ts, alpha1, alpha2);
                let (m, path) = finish(sys, factors.remove(&t), be.offers_cholesky_f32())?;
                self.records[t].solve_path = Some(path);
                if self.mode == Mode::Sweep {
                    set_device_delta(be, &mut self.merged_dev[t], Some(&m));
                    self.merged[t] = Some(m.clone());
                }
                self.solved[t] = Some(m);
            }
        }

        // 6. Merged rows: W0 + ΔW*, and the alignment error against each adapter's own output
        // (read with the next fetch).
        for (k, &(j, t)) in targeted.iter().enumerate() {
            self.records[t].align = vec![None; tasks];
            for (i, (ra, rm)) in rows.iter().enumerate() {
                let Some(rm) = rm else { continue };
                let d = self.merged_dev[t].as_ref().map(|(a, b)| be.lowrank(x, rm.clone(), a, b, 1.0));
                if let Some(d) = &d {
                    be.add_rows(&mut ys[j], rm.clone(), d, 1.0);
                }
                if let Some(o) = &own[k][i] {
                    self.align_pending.push((Slot::AlignNorm(t, i), be.defer_sq_norm(o, 0..ra.len())));
                    let err = match &d {
                        Some(d) => be.defer_sq_dist(o, d),
                        None => be.defer_sq_norm(o, 0..ra.len()),
                    };
                    self.align_pending.push((Slot::AlignErr(t, i), err));
                }
            }
        }
        self.seen += targeted.len();
        (self.on_stage)(self.seen, self.targets.len());
        Ok(())
    }

    async fn end_pass(&mut self, be: &B) -> Result<()> {
        let (slots, pending): (Vec<Slot>, Vec<B::Pending>) =
            std::mem::take(&mut self.align_pending).into_iter().unzip();
        for (slot, value) in slots.into_iter().zip(be.fetch(pending).await?) {
            self.settle_align(slot, value);
        }
        Ok(())
    }
}

/// What a fetched value is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slot {
    /// ‖W0‖² of target t.
    WeightNorm(usize),
    /// ⟨W0, B_i A_i⟩ of target t, adapter i.
    WeightCross(usize, usize),
    /// ‖X_i (W0 + ΔW_i)ᵀ‖² of target t, task i.
    Denominator(usize, usize),
    /// X_iᵀ X̃_i of task i.
    Cross(usize),
    /// X̃_iᵀ X̃_i of task i.
    Gram(usize),
    /// ‖X_i ΔW_iᵀ‖² of target t, task i.
    AlignNorm(usize, usize),
    /// ‖X_i ΔW_iᵀ − X̃_i ΔW*ᵀ‖² of target t, task i.
    AlignErr(usize, usize),
    /// The f32 Cholesky factor of target t's system matrix.
    Factor(usize),
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

/// s²‖B A‖²_F = s² tr((BᵀB)(AAᵀ)), from the small factors.
fn lora_norm2(l: &LoraModule) -> f64 {
    let (a, b, s) = (to_f64(&l.a), to_f64(&l.b), l.scale as f64);
    s * s * (b.transpose() * &b).component_mul(&(&a * a.transpose())).sum()
}
