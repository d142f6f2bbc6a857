//! The statistics and solves of one stage of the IterIS hook (`super`): the Grams each task's
//! rows add (`add_grams`), the pending norms of the adaptive weights, the system each module is
//! solved from (`defer_system`), the solve itself, and the merged rows' deltas with their
//! alignment errors.

use super::*;

/// ‖X_i ΔW_iᵀ‖² and ‖X_i ΔW_iᵀ − X̃_i ΔW*ᵀ‖² of target t, task i, pending: with X_i ΔW_iᵀ =
/// U B_iᵀ and X̃_i ΔW*ᵀ = V B*ᵀ, they are ⟨UᵀU, B_iᵀB_i⟩ and that − 2⟨UᵀV, B_iᵀB*⟩ + ⟨VᵀV, B*ᵀB*⟩
/// (⟨·,·⟩: the sum of the elementwise product), from Grams of r and R columns.
pub(super) struct AlignRead {
    pub(super) target: usize,
    pub(super) task: usize,
    pub(super) uu: Option<GramId>,
    pub(super) uv: Option<GramId>,
    pub(super) vv: Option<GramId>,
    /// B_iᵀB_i.
    pub(super) bi: DMatrix<f64>,
    /// (B_iᵀB*, B*ᵀB*) where the merged rows ran with a delta.
    pub(super) bb: Option<(DMatrix<f64>, DMatrix<f64>)>,
}

/// The stage's targeted modules: (index in the stage's modules, index in `targets`).
pub(super) type Targeted = [(usize, usize)];

/// The ridge-free statistics of a task at a stage.
#[derive(Clone)]
pub(super) struct TaskGrams {
    /// X̃_iᵀ X̃_i.
    pub(super) gram: GramId,
    pub(super) cross: StageCross,
}

/// X_iᵀ X̃_i as a stage gathers it (`Cross`): whole (the Gram's id where X̃ = X), or projected
/// onto each targeted module's A_i (indexed like `Stage::targeted`) with the f32 C_i for its norm.
#[derive(Clone)]
pub(super) enum StageCross {
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
    pub(super) fn cross(&self, k: usize) -> Cross<GramId> {
        match &self.cross {
            StageCross::Full(id) => Cross::Full(*id),
            StageCross::Projected { sac, for_norm } => Cross::Projected { sac: sac[k], for_norm: *for_norm },
            StageCross::Output { xty, for_norm } => Cross::Output { xty: xty[k], for_norm: *for_norm },
        }
    }

    /// The ids whose readers do not care for orientation: the symmetric Gram (`assemble`
    /// symmetrises it) and the cross term held for its norm. The host takes them without the
    /// transposing copy a column-major matrix needs (6 of 8 ms per (in, in) Gram).
    pub(super) fn orientation_free(&self) -> Vec<GramId> {
        let mut ids = vec![self.gram];
        if let StageCross::Projected { for_norm, .. } | StageCross::Output { for_norm, .. } = &self.cross {
            ids.push(*for_norm);
        }
        ids
    }

    /// Every id it holds (a Gram may appear twice).
    pub(super) fn ids(&self) -> Vec<GramId> {
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
pub(super) struct Stage {
    pub(super) targeted: Vec<(usize, usize)>,
    /// Per targeted module, per task: c_i, its denominator summed over the chunks.
    pub(super) weights: Vec<Vec<Weight<ScalarId>>>,
    /// Per task (None until a chunk with its rows contributes; solving passes only).
    pub(super) grams: Vec<Option<TaskGrams>>,
    /// Token rows per task.
    pub(super) rows: Vec<usize>,
    /// Per targeted module: its system and the backend's factor of it (recorded once every chunk
    /// has contributed).
    pub(super) systems: Vec<(SystemSpec<ScalarId, GramId>, Option<FactorId>)>,
}

/// What a chunk keeps from contributing to finishing a stage.
pub struct Held<T> {
    pub(super) targeted: Vec<(usize, usize)>,
    pub(super) rows: Vec<TaskRows>,
    /// Per targeted module, per task: U_i = s_i X_i A_iᵀ on the chunk's rows (X_i ΔW_iᵀ = U_i B_iᵀ).
    pub(super) own: Vec<Vec<Option<T>>>,
}

/// A pending Gram that may not exist yet (None: `new()` makes it), `add` applied where it does;
/// its id.
pub(super) fn accumulate<B: Backend>(
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

/// What a pending Gram is read for: its entries, or only its norm (`Backend::add_gram_for_norm`,
/// which need not keep the entries).
#[derive(Clone, Copy)]
pub(super) enum GramUse {
    Entries,
    Norm,
}

/// `acc += x[xr]ᵀ · y[yr]` for a pending Gram that may not exist yet; its id.
pub(super) fn add_gram<B: Backend>(
    be: &B,
    reads: &mut Reads<B>,
    acc: Option<GramId>,
    used: GramUse,
    (x, xr): (&B::T, Range<usize>),
    (y, yr): (&B::T, Range<usize>),
) -> GramId {
    let (x2, y2) = (xr.clone(), yr.clone());
    match used {
        GramUse::Entries => accumulate(reads, acc, || be.defer_gram(x, x2, y, y2), |g| be.add_gram(g, x, xr, y, yr)),
        GramUse::Norm => {
            accumulate(reads, acc, || be.defer_gram_for_norm(x, x2, y, y2), |g| be.add_gram_for_norm(g, x, xr, y, yr))
        }
    }
}

/// `*acc += more` for a pending scalar that may not exist yet.
pub(super) fn add_scalar<B: Backend>(be: &B, reads: &mut Reads<B>, acc: &mut Option<ScalarId>, more: B::Scalar) {
    match acc {
        Some(id) => be.add_scalar(reads.scalar_mut(*id), more),
        None => *acc = Some(reads.scalar(more)),
    }
}

impl<B: Backend> IterisHook<'_, B> {
    /// Step 1a: The numerator of each task's adaptive weight, ‖W0 + ΔW_i‖²_F, per targeted module: known
    /// after a module's first visit, else ‖W0‖² + ⟨W0, B_i A_i⟩ (= Σ (A_i W0ᵀ) ⊙ B_iᵀ) read now.
    pub(super) fn defer_weight_norms(
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
    pub(super) fn run_adapter_rows(
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
    pub(super) fn add_grams(
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
                Some(rm) if self.settings.rho != 0.0 => {
                    mixed = be.mix_rows(x, rm.clone(), 1.0 - self.settings.rho, xa, ra.clone(), self.settings.rho);
                    (&mixed, 0..ra.len())
                }
                Some(rm) => (x, rm.clone()),
            };
            let prev = acc.take();
            let prev_gram = prev.as_ref().map(|g| g.gram);
            let cross = match (rm, prev.map(|g| g.cross)) {
                // X̃ = X: the cross term is the Gram.
                (None, prev) => {
                    let id = add_gram(be, reads, prev_gram, GramUse::Entries, (xa, ra.clone()), (xt, rt));
                    debug_assert!(prev.is_none_or(|c| matches!(c, StageCross::Full(p) if p == id)));
                    *acc = Some(TaskGrams { gram: id, cross: StageCross::Full(id) });
                    continue;
                }
                // RegMean scales C's off-diagonal entries: it reads C whole.
                (Some(_), prev) if self.settings.regmean.is_some() => {
                    let prev = match prev {
                        Some(StageCross::Full(id)) => Some(id),
                        _ => None,
                    };
                    StageCross::Full(add_gram(be, reads, prev, GramUse::Entries, (xa, ra.clone()), (xt, rt.clone())))
                }
                (Some(rm), prev) if self.settings.objective == Objective::Output => {
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
                            add_gram(be, reads, acc, GramUse::Entries, (xt, rt.clone()), (&target, 0..ra.len()))
                        })
                        .collect();
                    let for_norm = add_gram(be, reads, for_norm, GramUse::Norm, (xa, ra.clone()), (xt, rt.clone()));
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
                    let for_norm = add_gram(be, reads, for_norm, GramUse::Norm, (xa, ra.clone()), (xt, rt.clone()));
                    StageCross::Projected { sac, for_norm }
                }
            };
            let gram = add_gram(be, reads, prev_gram, GramUse::Entries, (xt, rt.clone()), (xt, rt));
            *acc = Some(TaskGrams { gram, cross });
        }
    }

    /// Step 3: A module's system from the stage's pending statistics, and the backend's f32 factor of
    /// it, assembled there from the same pending values (so both come back in one readback).
    pub(super) fn defer_system(
        &self,
        be: &B,
        k: usize,
        weights: &[Weight<ScalarId>],
        grams: &[TaskGrams],
        reads: &mut Reads<B>,
    ) -> (SystemSpec<ScalarId, GramId>, Option<FactorId>) {
        let (alpha1, alpha2) =
            if self.settings.regmean.is_some() { (0.0, 0.0) } else { (self.settings.alpha1, self.settings.alpha2) };
        let spec = SystemSpec {
            terms: grams
                .iter()
                .zip(weights)
                .zip(&self.settings.task_weights)
                .map(|((g, w), &lambda)| SystemTerm {
                    gram: g.gram,
                    cross: g.cross(k),
                    // RegMean: no adaptive weights.
                    weight: if self.settings.regmean.is_some() { Weight::constant(lambda) } else { w.scaled(lambda) },
                })
                .collect(),
            alpha1,
            alpha2,
            off_diagonal: self.settings.regmean.unwrap_or(1.0),
        };
        let factor = be.defer_factor(&spec.map(|&s| reads.pending_scalar(s), |&g| reads.pending_gram(g)));
        (spec, factor.map(|f| reads.factor(f)))
    }

    /// Record the alignment errors that came back: the error relative to ‖X_i ΔW_iᵀ‖.
    pub(super) fn settle_align(&mut self, values: &Values) {
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
    pub(super) fn settle_weights(&mut self, stage: &Stage, values: &Values) {
        for (&(_, t), w) in stage.targeted.iter().zip(&stage.weights) {
            let w: Vec<Weight<f64>> = w.iter().map(|w| w.map(|&s| values[s])).collect();
            self.w_norm2[t] = Some(w.iter().map(Weight::numerator).collect());
            let rec = &mut self.records[t];
            rec.rows = stage.rows.clone();
            rec.c = w.iter().map(|w| if self.settings.regmean.is_some() { 1.0 } else { w.value() }).collect();
            rec.align = vec![None; stage.rows.len()];
        }
    }

    /// Step 4: Solve a module's system in f64 on the host, refined around the backend's factor, and make
    /// the result the delta the merged rows run with (`Sweep`) or the next pass's (`Jacobi`).
    pub(super) fn solve(
        &mut self,
        be: &B,
        t: usize,
        spec: &SystemSpec<f64, &DMatrix<f64>>,
        factor: Option<crate::mat::Mat64>,
    ) -> Result<()> {
        let loras: Vec<Option<&LoraModule>> = self.targets[t].loras.iter().map(Option::as_ref).collect();
        let sys = assemble(&self.targets[t].name, spec, &loras);
        let solved = finish(sys, factor, be.offers_cholesky_f32(), self.settings.dense_rank)?;
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
    pub(super) fn run_merged_rows(&mut self, be: &B, input: &StageInput<'_, B>, held: Held<B::T>, ys: &mut [B::T]) {
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
                a.uu = Some(add_gram(be, reads, a.uu, GramUse::Entries, (&u, 0..n), (&u, 0..n)));
                if let Some(v) = &v {
                    a.uv = Some(add_gram(be, reads, a.uv, GramUse::Entries, (&u, 0..n), (v, 0..n)));
                    a.vv = Some(add_gram(be, reads, a.vv, GramUse::Entries, (v, 0..n), (v, 0..n)));
                }
            }
        }
    }
}
