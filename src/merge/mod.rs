//! The merge: map adapters onto the model, tokenize samples, run IterIS (sweep or Jacobi), export.
//! Knows models and backends only through their traits.

pub mod balance;
pub mod baselines;
pub mod calibrate;
pub mod evaluate;
pub mod export;
pub mod iteris;
pub mod pipeline;
pub mod plan;
pub mod refine;
pub mod report;
pub mod solve;
pub mod study;

use crate::backend::Backend;
use crate::error::{bad_input, Result};
use crate::formats::peft::Adapter;
use crate::formats::tokenizer::TextTokenizer;
use crate::models::chunked::{chunk_batches, run_chunks, Streams};
use crate::models::{self, Model};
pub use baselines::Method;
use iteris::{IterisHook, Mode, ModuleRecord, Target};
use solve::Merged;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Exact fixed point in one pass over the stages (default).
    Sweep,
    /// The published schedule: full passes, every module solved from the previous pass's features.
    Jacobi,
}

/// The settings of a merge. Deserialized from the page's settings (missing fields: defaults).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Options {
    pub method: Method,
    pub schedule: Schedule,
    /// Solves in all (Jacobi only).
    pub iters: usize,
    pub alpha1: f64,
    pub alpha2: f64,
    /// Feature mixing ρ of the released code (0 = off).
    pub rho: f32,
    pub max_len: usize,
    /// Reduce the exported adapter to this rank (None: lossless rank Σr).
    pub rank: Option<usize>,
    /// Weight per adapter (None: the method's default). IterIS and RegMean: λ_i, the task's
    /// weight in the objective (default 1 each, or chosen by `balance`); linear, cat, TIES,
    /// DARE: the factor on its delta.
    pub weights: Option<Vec<f64>>,
    /// IterIS: choose the task weights λ_i from held-out calibration samples (`balance`), unless
    /// `weights` gives them.
    pub balance: Balance,
    /// Balancing's rounds, each one set of weights (besides the final merge).
    pub balance_sweeps: usize,
    /// What judges balancing's rounds (`balance`).
    pub balance_objective: BalanceObjective,
    /// Balancing's cross-fitting: K ≥ 2 folds, every sample held out once (K merges a round); 1:
    /// one merge a round, every fifth sample held out.
    pub balance_folds: usize,
    /// Self-calibration: extend every calibration sample with its own adapter's greedy
    /// continuation, up to this many tokens (0: off), before any feature is collected.
    pub self_calibrate: usize,
    /// TIES: fraction of entries kept; DARE: keep probability.
    pub density: f64,
    /// DARE's seed.
    pub seed: u64,
    /// RegMean: factor on the Grams' off-diagonal entries (1: plain RegMean).
    pub regmean_scale: f64,
    /// Quality: use at most this many held-out samples per task (None: all).
    pub eval_limit: Option<usize>,
    /// Plan the merge for at most this much host memory, MiB (None: what the system has).
    pub max_memory_mib: Option<u64>,
    /// IterIS: what each module's merged delta fits (`Objective`).
    pub objective: Objective,
    /// IterIS with the output objective: merge only the modules the adapters target, or also
    /// every other linear module of the layers (extra capacity; the LM head excepted).
    pub modules: ModuleSet,
    /// Distillation refinement (`refine`): steps of Adam on the merged LoRA's factors after the
    /// closed-form merge (0: off), at a step size of `refine_lr` times each factor's RMS.
    pub refine_steps: usize,
    pub refine_lr: f64,
    /// Refinement's transfer data: this many recombined prompts per given prompt
    /// (`refine::augment`), answered by their adapters (0: the given samples alone).
    pub refine_augment: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            method: Method::Iteris,
            schedule: Schedule::Sweep,
            iters: 6,
            alpha1: 1e-4,
            alpha2: 1e-4,
            rho: 0.0,
            max_len: 128,
            rank: None,
            weights: None,
            balance: Balance::Auto,
            balance_sweeps: 3,
            balance_objective: BalanceObjective::Agreement,
            balance_folds: 2,
            self_calibrate: SELF_CALIBRATE_TOKENS,
            density: 0.5,
            seed: 0,
            regmean_scale: 0.9,
            eval_limit: None,
            max_memory_mib: None,
            objective: Objective::Delta,
            modules: ModuleSet::Adapters,
            refine_steps: 0,
            refine_lr: 0.01,
            refine_augment: 4,
        }
    }
}

impl Options {
    /// IterIS as published (and the baselines as they are): the defaults without self-calibration,
    /// task balancing or the output objective, which change the samples and the objective. What the float64
    /// reference and the backends' agreement are tested with.
    pub fn published() -> Options {
        Options {
            balance: Balance::Off,
            self_calibrate: 0,
            objective: Objective::Delta,
            modules: ModuleSet::Adapters,
            refine_steps: 0,
            ..Options::default()
        }
    }

    /// These settings with IterIS's published objective (each adapter's delta, on the modules the
    /// adapters target): what the methods other than IterIS run with, and the Jacobi schedule.
    pub fn delta_objective(&self) -> Options {
        Options { objective: Objective::Delta, modules: ModuleSet::Adapters, ..self.clone() }
    }

    /// Check every setting, for `tasks` adapters: the one check the CLI, the page and the library
    /// share, made before any work. Errors name the CLI option (the page shows the same names).
    pub fn validate(&self, tasks: usize) -> Result<()> {
        if tasks < 2 {
            return Err(bad_input("arguments", format!("merging needs at least two adapters, not {tasks}")));
        }
        if self.schedule == Schedule::Jacobi && !(1..=1000).contains(&self.iters) {
            return Err(bad_input("--iters", format!("{} is not in 1..=1000", self.iters)));
        }
        for (k, v) in [("--alpha1", self.alpha1), ("--alpha2", self.alpha2)] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(bad_input(k, format!("{v} is not a number in [0, 1]")));
            }
        }
        if !(self.rho.is_finite() && (0.0..=1.0).contains(&self.rho)) {
            return Err(bad_input("--rho", format!("{} is not in [0, 1]", self.rho)));
        }
        if !(1..=MAX_LEN).contains(&self.max_len) {
            return Err(bad_input("--max-len", format!("{} is not in 1..={MAX_LEN}", self.max_len)));
        }
        if let Some(r) = self.rank {
            if !(1..=65536).contains(&r) {
                return Err(bad_input("--rank", format!("{r} is not in 1..=65536")));
            }
        }
        if let Some(w) = &self.weights {
            if w.len() != tasks || w.iter().any(|v| !v.is_finite() || v.abs() > 1e6) {
                return Err(bad_input(
                    "--weights",
                    format!(
                        "needs one finite weight (at most 1e6 in size) per adapter ({tasks} adapters, {} weights)",
                        w.len()
                    ),
                ));
            }
        }
        if let (Method::Iteris | Method::Regmean, Some(w)) = (self.method, &self.weights) {
            if w.iter().any(|&v| v <= 0.0) {
                return Err(bad_input(
                    "--weights",
                    format!(
                        "{} weighs each task's share of its objective: every weight must be positive",
                        self.method.name()
                    ),
                ));
            }
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(bad_input("--density", format!("{} is not in (0, 1]", self.density)));
        }
        if !(0.0..=1.0).contains(&self.regmean_scale) {
            return Err(bad_input("--regmean-scale", format!("{} is not in [0, 1]", self.regmean_scale)));
        }
        if !(1..=10).contains(&self.balance_sweeps) {
            return Err(bad_input("--balance-sweeps", format!("{} is not in 1..=10", self.balance_sweeps)));
        }
        if !(1..=10).contains(&self.balance_folds) {
            return Err(bad_input("--balance-folds", format!("{} is not in 1..=10", self.balance_folds)));
        }
        if self.refine_steps > MAX_REFINE_STEPS {
            return Err(bad_input("--refine-steps", format!("{} is not in 0..={MAX_REFINE_STEPS}", self.refine_steps)));
        }
        if !(self.refine_lr.is_finite() && self.refine_lr > 0.0 && self.refine_lr <= 1.0) {
            return Err(bad_input("--refine-lr", format!("{} is not in (0, 1]", self.refine_lr)));
        }
        if self.refine_augment > 64 {
            return Err(bad_input("--refine-augment", format!("{} is not in 0..=64", self.refine_augment)));
        }
        if self.self_calibrate > MAX_LEN {
            return Err(bad_input("--self-calibrate", format!("{} is not in 0..={MAX_LEN}", self.self_calibrate)));
        }
        // The objective and the module set are IterIS's (other methods ignore them, as they do
        // balancing).
        let iteris = self.method == Method::Iteris;
        if iteris && self.objective == Objective::Output && self.schedule != Schedule::Sweep {
            // Solved all at once (Jacobi), every module corrects the same upstream drift at the
            // same time and the merge diverges: the correction needs upstream merged first.
            return Err(bad_input(
                "--objective",
                "output needs the sweep schedule (--schedule jacobi is the published IterIS: --objective delta)",
            ));
        }
        if iteris && self.objective == Objective::Output && self.rho != 0.0 {
            // ρ mixes X into X̃ for the statistics, but the merged rows' outputs (the drift the
            // output objective corrects) come from X̃ alone.
            return Err(bad_input("--rho", "feature mixing is the delta objective's (--objective delta)"));
        }
        if iteris && self.modules == ModuleSet::All && self.objective != Objective::Output {
            return Err(bad_input(
                "--modules",
                "all needs --objective output: a module no adapter targets has no delta of its own to fit",
            ));
        }
        if self.max_memory_mib == Some(0) {
            return Err(bad_input("--max-memory", "must be at least 1 (MiB)"));
        }
        Ok(())
    }
}

/// Whether IterIS chooses its task weights λ_i itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// λ_i = 1 (or `--weights`).
    Off,
    /// λ_i chosen to make the worst task's KL(adapter ‖ merged) on held-out calibration samples
    /// small (`balance::balance`), unless `--weights` gives them.
    Auto,
}

/// What judges balancing's rounds on held-out calibration samples (`balance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceObjective {
    /// Each task's share of samples whose self-calibrated continuation the merge reproduces
    /// (greedy, token for token); KL where self-calibration is off.
    Agreement,
    /// Each task's mean KL(adapter ‖ merged) per token.
    Kl,
}

impl ModuleSet {
    /// The modules an objective merges unless told: every module for the output objective (its
    /// best measured), the adapters' for the delta objective (the only ones it can).
    pub fn default_for(objective: Objective) -> ModuleSet {
        match objective {
            Objective::Output => ModuleSet::All,
            Objective::Delta => ModuleSet::Adapters,
        }
    }
}

/// What IterIS's merged delta at each module fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Each adapter's delta on its own inputs, X_i ΔW_iᵀ ≈ X̃_i ΔW*ᵀ (IterIS as published).
    Delta,
    /// Each adapter model's whole output, X_i (W0 + ΔW_i)ᵀ ≈ X̃_i (W0 + ΔW*)ᵀ: also undoes the
    /// drift of the merged model's inputs X̃_i from X_i upstream. ΔW* is then dense, exported at
    /// `--rank` (default: the largest Σ r_i of any module) with the energy kept reported.
    Output,
}

/// Which modules the merged adapter holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleSet {
    /// Those some input adapter targets.
    Adapters,
    /// Every linear module of the layers (not the LM head): the ones no adapter targets fit the
    /// drift their inputs carry (`Objective::Output`).
    All,
}

/// IterIS's variants that a comparison lists beside the methods by default (`variant`).
pub const ITERIS_VARIANTS: [&str; 3] = ["iteris-output", "iteris-output-all", "iteris-refined"];

/// Refinement steps of the `iteris-refined` row where the settings give none.
pub const REFINE_STEPS: usize = 100;

/// The settings of one row of a comparison (`iteris compare`, the page's Compare): a method's
/// name (`Method::name`) or a variant of IterIS, from the comparison's settings. `iteris` is
/// IterIS with the settings as given; `iteris-delta` has the published objective (each adapter's
/// delta, the adapters' modules), `iteris-output` the output objective on the adapters' modules,
/// `iteris-output-all` on every module, `iteris-refined` the settings as given followed by
/// distillation refinement (`--refine-steps`, else `REFINE_STEPS`); the other methods run without
/// those IterIS-only settings, and only `iteris-refined` refines.
pub fn variant(name: &str, opts: &Options) -> Option<Options> {
    let plain = Options { refine_steps: 0, ..opts.delta_objective() };
    let iteris = |objective, modules| Options { method: Method::Iteris, objective, modules, ..plain.clone() };
    let steps = if opts.refine_steps > 0 { opts.refine_steps } else { REFINE_STEPS };
    Some(match name {
        "iteris" => Options { method: Method::Iteris, refine_steps: 0, ..opts.clone() },
        "iteris-refined" => Options { method: Method::Iteris, refine_steps: steps, ..opts.clone() },
        "iteris-delta" => iteris(Objective::Delta, ModuleSet::Adapters),
        "iteris-output" => iteris(Objective::Output, ModuleSet::Adapters),
        "iteris-output-all" => iteris(Objective::Output, ModuleSet::All),
        _ => Options { method: Method::parse(name)?, ..plain },
    })
}

/// The rows a comparison lists by default, in order (every name `variant` takes but
/// `iteris-delta`, which the defaults are).
pub fn variant_names() -> Vec<&'static str> {
    let mut names = vec![Method::Iteris.name()];
    names.extend(ITERIS_VARIANTS);
    names.extend(Method::ALL[1..].iter().map(|m| m.name()));
    names
}

/// `variant_names` for a model of `model_type`: without `iteris-refined` where the family has
/// no backward pass yet (`models::has_backward`).
pub fn variant_names_for(model_type: &str) -> Vec<&'static str> {
    variant_names().into_iter().filter(|n| *n != "iteris-refined" || models::has_backward(model_type)).collect()
}

/// Default token budget of self-calibration (`Options::self_calibrate`).
pub const SELF_CALIBRATE_TOKENS: usize = 32;

/// The longest `--max-len` accepted (tokens per sample).
pub const MAX_LEN: usize = 1 << 16;
/// The most distillation-refinement steps a merge may take.
pub const MAX_REFINE_STEPS: usize = 10_000;

/// Progress events for faces (CLI bars, the page).
pub enum Progress<'a> {
    /// A pass over the network begins: (pass index from 1, passes in all, label).
    Pass(usize, usize, &'a str),
    /// Modules done in the current pass, of all targeted modules.
    Modules(usize, usize),
    /// The passes are over; the merge's quality on held-out samples is being measured (its
    /// length is not known in passes).
    Quality,
}

pub struct Outcome {
    pub targets: Vec<Target>,
    pub merged: Vec<Merged>,
    /// Fraction of each module's merged delta the method's own rank reduction kept (svd, ties,
    /// dare; 1 for the exact methods).
    pub energy: Vec<f64>,
    pub records: Vec<ModuleRecord>,
    /// Jacobi: relative change of the merged deltas between consecutive solves.
    pub changes: Vec<f64>,
    pub warnings: Vec<String>,
    pub tokens: Vec<usize>,
    pub samples: Vec<usize>,
    pub seconds_passes: f64,
    /// Jacobi: whether the adapter streams' inputs were kept between passes.
    pub adapter_inputs: Option<plan::AdapterInputs>,
}

/// Match every adapter module to a model module. An adapter path matches a model module name when it
/// equals it or ends with `.` + name (the class prefix differs between checkpoints); anything else is
/// refused with the adapter's name.
/// Parts of multimodal checkpoints (Gemma 3, …) that are not the language model.
const OTHER_TOWERS: [&str; 4] = ["vision_tower", "vision_model", "multi_modal_projector", "audio_tower"];

pub fn map_targets(
    modules: &[models::ModuleInfo],
    adapters: &[&Adapter],
    model_type: &str,
    fan_in_fan_out: bool,
) -> Result<Vec<Target>> {
    let mut targets: Vec<Target> = Vec::new();
    for (ai, ad) in adapters.iter().enumerate() {
        if ad.fan_in_fan_out() && !fan_in_fan_out {
            return Err(bad_input(&ad.name, format!("adapter_config.json says fan_in_fan_out: true, but {model_type} stores weights as (out, in): is this adapter for another architecture?")));
        }
        for l in &ad.modules {
            // A multimodal checkpoint's other towers reuse the language model's module names
            // (`vision_tower….layers.0.self_attn.q_proj`): only the language model is merged.
            if let Some(tower) = OTHER_TOWERS.iter().find(|t| l.path.split('.').any(|p| p == **t)) {
                return Err(bad_input(
                    &ad.name,
                    format!(
                        "targets '{}' in the model's {tower}: only the language model's modules can be merged",
                        l.path
                    ),
                ));
            }
            let hits: Vec<&models::ModuleInfo> =
                modules.iter().filter(|m| l.path == m.name || l.path.ends_with(&format!(".{}", m.name))).collect();
            let m = match hits.as_slice() {
                [m] => *m,
                [] => {
                    return Err(bad_input(
                        &ad.name,
                        format!("targets module '{}', which the base model ({model_type}) does not have: is this adapter for another model?", l.path),
                    ))
                }
                _ => return Err(bad_input(&ad.name, format!("module '{}' matches several modules of the base model: ambiguous", l.path))),
            };
            if l.a.cols != m.in_dim || l.b.rows != m.out_dim {
                return Err(bad_input(
                    &ad.name,
                    format!(
                        "module '{}': LoRA maps {} → {} features but the base model's {} maps {} → {}: wrong base model?",
                        l.path, l.a.cols, l.b.rows, m.name, m.in_dim, m.out_dim
                    ),
                ));
            }
            let t = match targets.iter().position(|t| t.name == m.name) {
                Some(t) => t,
                None => {
                    targets.push(Target {
                        name: m.name.clone(),
                        path: l.path.clone(),
                        out_dim: m.out_dim,
                        in_dim: m.in_dim,
                        loras: vec![None; adapters.len()],
                    });
                    targets.len() - 1
                }
            };
            if targets[t].loras[ai].is_some() {
                return Err(bad_input(&ad.name, format!("targets module '{}' twice", m.name)));
            }
            targets[t].loras[ai] = Some(l.clone());
        }
    }
    // Forward order, so progress and reports read top to bottom.
    let order = |n: &str| modules.iter().position(|m| m.name == n).unwrap();
    targets.sort_by_key(|t| order(&t.name));
    Ok(targets)
}

/// `targets` and every other linear module of the layers (the LM head excepted), in forward
/// order: the modules a merge with extra capacity (`ModuleSet::All`) solves. The added modules'
/// paths carry the class prefix the adapters' paths do.
pub fn with_every_module(modules: &[models::ModuleInfo], mut targets: Vec<Target>) -> Vec<Target> {
    let Some(first) = targets.first() else { return targets };
    let prefix = first.path.strip_suffix(&first.name).unwrap_or("").to_string();
    let tasks = first.loras.len();
    for m in modules {
        if m.name != "lm_head" && !targets.iter().any(|t| t.name == m.name) {
            targets.push(Target {
                name: m.name.clone(),
                path: format!("{prefix}{}", m.name),
                out_dim: m.out_dim,
                in_dim: m.in_dim,
                loras: vec![None; tasks],
            });
        }
    }
    let order = |n: &str| modules.iter().position(|m| m.name == n).unwrap_or(usize::MAX);
    targets.sort_by_key(|t| order(&t.name));
    targets
}

/// Tokenize each sample, truncated to `max_len` (and to the model's positions); says how many were cut.
pub fn tokenize(
    tok: &TextTokenizer,
    samples: &[String],
    max_len: usize,
    vocab: Option<usize>,
    file: &str,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut out = Vec::with_capacity(samples.len());
    let mut cut = 0;
    for s in samples {
        let e = tok.encode(s, max_len)?;
        if e.ids.is_empty() {
            continue;
        }
        if let Some(v) = vocab {
            if let Some(bad) = e.ids.iter().find(|&&i| i as usize >= v) {
                return Err(bad_input(file, format!("a sample tokenizes to id {bad}, beyond the model's vocabulary of {v}: tokenizer.json does not belong to this model")));
            }
        }
        cut += e.truncated as usize;
        out.push(e.ids);
    }
    if out.is_empty() {
        return Err(bad_input(file, "no sample produced any token"));
    }
    Ok((out, cut))
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
    let mut adapter_inputs = None;
    let passes = match (opts.method, opts.schedule) {
        (Method::Iteris, Schedule::Sweep) => 1,
        (Method::Iteris, Schedule::Jacobi) => opts.iters + 1,
        (Method::Regmean, _) => 2,
        _ => 1,
    };
    let mut changes = Vec::new();
    let records;
    let merged: Vec<Merged>;
    let mut energy = vec![1.0; targets.len()];
    {
        let pass_progress = std::cell::RefCell::new(&mut *progress);
        let on_stage = Box::new(|done: usize, all: usize| (pass_progress.borrow_mut())(Progress::Modules(done, all)));
        let mut hook = IterisHook::new(be, &targets, opts.alpha1, opts.alpha2, opts.rho, on_stage);
        if let (Method::Iteris | Method::Regmean, Some(w)) = (opts.method, &opts.weights) {
            hook.task_weights = w.clone();
        }
        if opts.method == Method::Iteris {
            hook.objective = opts.objective;
            if let Some(r) = opts.rank {
                hook.dense_rank = r;
            }
        }
        let announce = |k: usize, label: &str| (pass_progress.borrow_mut())(Progress::Pass(k, passes, label));
        match (opts.method, opts.schedule) {
            (Method::Iteris, Schedule::Sweep) => {
                announce(1, "sweep");
                hook.begin_pass(be, Mode::Sweep, false);
                run_chunks(model, be, &both, &mut hook).await?;
            }
            (Method::Iteris, Schedule::Jacobi) => {
                // The adapter streams are the same in every pass: where their inputs fit, the first
                // pass keeps them and the later ones run the merged stream alone.
                let tokens = ids.iter().flatten().map(Vec::len).sum();
                let keep =
                    plan::AdapterInputs::plan(be, model.row_floats(), &targets, tokens, ids.len(), opts.max_memory_mib);
                adapter_inputs = Some(keep);
                let merged_only;
                let later = if keep.kept {
                    hook.keep_adapter_inputs();
                    merged_only = chunk_batches(ids, Streams::Merged, max_rows);
                    &merged_only
                } else {
                    &both
                };
                // Solve 1: X̃ = X (RegMean with ridge and adaptive weights); the merged stream is not run.
                announce(1, "jacobi solve 1");
                hook.begin_pass(be, Mode::Jacobi, false);
                run_chunks(model, be, &adapters_only, &mut hook).await?;
                for k in 2..=opts.iters {
                    announce(k, &format!("jacobi solve {k}"));
                    hook.begin_pass(be, Mode::Jacobi, true);
                    run_chunks(model, be, later, &mut hook).await?;
                    let pairs =
                        hook.merged.iter().zip(&hook.solved).filter_map(|(o, n)| Some((o.as_ref()?, n.as_ref()?)));
                    changes.push(relative_change(pairs));
                }
                // One more pass measures the final deltas on their own features.
                announce(passes, "evaluate");
                hook.begin_pass(be, Mode::Evaluate, true);
                run_chunks(model, be, later, &mut hook).await?;
            }
            (Method::Regmean, _) => {
                announce(1, "regmean solve");
                hook.regmean = Some(opts.regmean_scale);
                hook.begin_pass(be, Mode::Jacobi, false);
                run_chunks(model, be, &adapters_only, &mut hook).await?;
                announce(2, "evaluate");
                hook.begin_pass(be, Mode::Evaluate, true);
                run_chunks(model, be, &both, &mut hook).await?;
            }
            (method, _) => {
                let settings = baselines::BaselineSettings {
                    weights: opts.weights.clone(),
                    density: opts.density,
                    seed: opts.seed,
                    rank: opts.rank,
                };
                let (m, e): (Vec<Merged>, Vec<f64>) =
                    baselines::merge_data_free(method, &targets, &settings)?.into_iter().unzip();
                energy = e;
                announce(1, "evaluate");
                hook.set_merged(be, &m);
                hook.begin_pass(be, Mode::Evaluate, false);
                run_chunks(model, be, &both, &mut hook).await?;
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

/// Seconds since an arbitrary origin (wall clock where there is one).
pub fn now() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
    }
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now() / 1000.0
    }
}
