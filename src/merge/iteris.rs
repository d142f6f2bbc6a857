//! The IterIS hook: what a forward pass does at each stage while merging.
//!
//! The batch holds, for every task i, its samples run by the adapter-i model (rows X_i) and, once a
//! merged delta exists, the same samples run by the merged model (rows X̃_i). At each stage the hook
//! 1. adds each adapter's delta to its own rows and measures ‖X_i (W0+ΔW_i)ᵀ‖ for the adaptive weight,
//! 2. accumulates X_iᵀX̃_i and X̃_iᵀX̃_i once for all modules of the stage (they share the input),
//! 3. solves every targeted module of the stage (f64, `solve.rs`),
//! 4. adds the merged delta to the merged rows and measures the alignment error.
//!
//! The two schedules differ only in which delta step 4 uses. `Sweep` uses the one just solved:
//! merged rows downstream then see final upstream deltas, so one pass reaches the fixed point of
//! the iteration exactly. `Jacobi` keeps the previous pass's deltas and stores the new ones for the
//! next pass (the published schedule). `Evaluate` solves nothing and only measures.

use super::solve::{solve, Merged, SolvePath, TaskStats};
use crate::backend::Backend;
use crate::error::Result;
use crate::formats::peft::LoraModule;
use crate::mat::Mat;
use crate::models::{Hook, StageInput, Stream};
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

pub struct IterisHook<'a, B: Backend> {
    targets: &'a [Target],
    index: HashMap<&'a str, usize>,
    /// Per target, per adapter: (A, B, scale) on the backend.
    loras: Vec<Vec<Option<(B::T, B::T, f32)>>>,
    /// Per target, per adapter: ‖W0 + ΔW_i‖²_F, computed at the first visit.
    w_norm2: Vec<Option<Vec<f64>>>,
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
                        l.as_ref()
                            .map(|l| (be.upload(&l.a), be.upload(&l.b), l.scale))
                    })
                    .collect()
            })
            .collect();
        IterisHook {
            targets,
            index: targets
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_str(), i))
                .collect(),
            loras,
            w_norm2: vec![None; targets.len()],
            merged: vec![None; targets.len()],
            merged_dev: targets.iter().map(|_| None).collect(),
            solved: vec![None; targets.len()],
            records: vec![ModuleRecord::default(); targets.len()],
            mode: Mode::Sweep,
            alpha1,
            alpha2,
            rho,
            seen: 0,
            on_stage,
        }
    }

    /// Prepare for the next pass. `promote` makes what the last pass solved the deltas merged rows
    /// run with (the Jacobi step).
    pub fn begin_pass(&mut self, be: &B, mode: Mode, promote: bool) {
        if promote {
            self.merged = std::mem::replace(&mut self.solved, vec![None; self.targets.len()]);
            self.merged_dev = self
                .merged
                .iter()
                .map(|m| m.as_ref().map(|m| (be.upload(&m.a), be.upload(&m.b))))
                .collect();
        }
        self.mode = mode;
        self.seen = 0;
    }

    /// ‖W0 + s·B·A‖²_F from the low-rank form: ‖W0‖² + 2s⟨W0, BA⟩ + s²·tr((BᵀB)(AAᵀ)).
    fn weight_norms(&self, w0: &Mat, t: usize) -> Vec<f64> {
        let base: f64 = w0.data.iter().map(|&v| (v as f64).powi(2)).sum();
        self.targets[t]
            .loras
            .iter()
            .map(|l| {
                let Some(l) = l else { return base };
                let (a, b, s) = (
                    crate::merge::solve::to_f64(&l.a),
                    crate::merge::solve::to_f64(&l.b),
                    l.scale as f64,
                );
                let w = crate::merge::solve::to_f64(w0);
                let cross = (b.transpose() * w).component_mul(&a).sum();
                let ba = (b.transpose() * &b)
                    .component_mul(&(&a * a.transpose()))
                    .sum();
                base + 2.0 * s * cross + s * s * ba
            })
            .collect()
    }
}

/// Rows of the adapter-stream and merged-stream groups of each task.
fn task_rows(
    input: &StageInput<impl Backend>,
    tasks: usize,
) -> Vec<(Range<usize>, Option<Range<usize>>)> {
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

    fn stage(&mut self, be: &B, input: &StageInput<B>, ys: &mut [B::T]) -> Result<()> {
        let targeted: Vec<(usize, usize)> = input
            .mods
            .iter()
            .enumerate()
            .filter_map(|(j, m)| self.index.get(m.name).map(|&t| (j, t)))
            .collect();
        if targeted.is_empty() {
            return Ok(());
        }
        let tasks = self.targets[0].loras.len();
        let rows = task_rows(input, tasks);
        let x = input.x;
        for &(j, t) in &targeted {
            if self.w_norm2[t].is_none() {
                self.w_norm2[t] = Some(self.weight_norms(&be.download(input.mods[j].w), t));
            }
        }

        // 1. Adapter rows: W0 + ΔW_i, and the adaptive weights.
        // own[k][i]: X_i ΔW_iᵀ for targeted module k and task i.
        let mut own: Vec<Vec<Option<B::T>>> = Vec::new();
        for &(j, t) in &targeted {
            let mut per_task = Vec::new();
            let rec = &mut self.records[t];
            rec.c = vec![0.0; tasks];
            rec.rows = rows.iter().map(|r| r.0.len()).collect();
            for (i, (ra, _)) in rows.iter().enumerate() {
                let d = self.loras[t][i]
                    .as_ref()
                    .map(|(a, b, s)| be.lowrank(x, ra.clone(), a, b, *s));
                if let Some(d) = &d {
                    be.add_rows(&mut ys[j], ra.clone(), d, 1.0);
                }
                let den = be.sq_norm(&ys[j], ra.clone());
                rec.c[i] = self.w_norm2[t].as_ref().unwrap()[i] / den.max(f64::MIN_POSITIVE);
                per_task.push(d);
            }
            own.push(per_task);
        }

        // 2-3. Statistics shared by the stage's modules, then one solve per module.
        if self.mode != Mode::Evaluate {
            let mut stats: Vec<(nalgebra::DMatrix<f64>, nalgebra::DMatrix<f64>)> =
                Vec::with_capacity(tasks);
            for (ra, rm) in &rows {
                stats.push(match rm {
                    None => {
                        let g = be.gram(x, ra.clone(), x, ra.clone());
                        (g.clone(), g)
                    }
                    Some(rm) if self.rho != 0.0 => {
                        let xt =
                            be.mix_rows(x, rm.clone(), 1.0 - self.rho, x, ra.clone(), self.rho);
                        let n = be.dims(&xt).0;
                        (
                            be.gram(x, ra.clone(), &xt, 0..n),
                            be.gram(&xt, 0..n, &xt, 0..n),
                        )
                    }
                    Some(rm) => (
                        be.gram(x, ra.clone(), x, rm.clone()),
                        be.gram(x, rm.clone(), x, rm.clone()),
                    ),
                });
            }
            for &(_, t) in &targeted {
                let ts: Vec<TaskStats> = (0..tasks)
                    .map(|i| TaskStats {
                        cross: &stats[i].0,
                        gram: &stats[i].1,
                        c: self.records[t].c[i],
                        lora: self.targets[t].loras[i].as_ref(),
                    })
                    .collect();
                let (m, path) = solve(be, &self.targets[t].name, &ts, self.alpha1, self.alpha2)?;
                self.records[t].solve_path = Some(path);
                if self.mode == Mode::Sweep {
                    self.merged_dev[t] = Some((be.upload(&m.a), be.upload(&m.b)));
                    self.merged[t] = Some(m.clone());
                }
                self.solved[t] = Some(m);
            }
        }

        // 4. Merged rows: W0 + ΔW*, and the alignment error against each adapter's own output.
        for (k, &(j, t)) in targeted.iter().enumerate() {
            let rec = &mut self.records[t];
            rec.align = vec![None; tasks];
            for (i, (ra, rm)) in rows.iter().enumerate() {
                let Some(rm) = rm else { continue };
                let d = self.merged_dev[t]
                    .as_ref()
                    .map(|(a, b)| be.lowrank(x, rm.clone(), a, b, 1.0));
                if let Some(d) = &d {
                    be.add_rows(&mut ys[j], rm.clone(), d, 1.0);
                }
                if let Some(o) = &own[k][i] {
                    let norm = be.sq_norm(o, 0..ra.len());
                    let err = match &d {
                        Some(d) => be.sq_dist(o, d),
                        None => norm,
                    };
                    rec.align[i] = Some((err / norm.max(f64::MIN_POSITIVE)).sqrt());
                }
            }
        }
        self.seen += targeted.len();
        (self.on_stage)(self.seen, self.targets.len());
        Ok(())
    }
}
