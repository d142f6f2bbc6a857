//! A merge's settings (`Options`), their defaults (`Options::default`, the one source the CLI's
//! help and the page read) and the bounds every front end's settings are checked against
//! (`Options::validate`, `BOUNDS`); the settings of a comparison's rows (`variant`).

use super::Method;
use crate::error::{bad_input, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::ValueEnum))]
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
    /// Iso-CTS: the fraction of the summed delta's directions kept as the common subspace (the
    /// rest go to each task's own directions).
    pub common_space: f64,
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
    /// Write the merged adapter's weights as F16 instead of F32 (half the file; the merge itself
    /// is unchanged).
    pub f16: bool,
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
            common_space: 0.8,
            regmean_scale: 0.9,
            eval_limit: None,
            max_memory_mib: None,
            objective: Objective::Delta,
            modules: ModuleSet::Adapters,
            refine_steps: 0,
            refine_lr: 0.01,
            refine_augment: 4,
            f16: false,
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
        for b in &BOUNDS {
            // The solves' count is the Jacobi schedule's alone.
            if b.field == "iters" && self.schedule != Schedule::Jacobi {
                continue;
            }
            if let Some(v) = (b.value)(self) {
                if !b.admits(v) {
                    return Err(bad_input(b.flag, format!("{v} is not in {}", b.range())));
                }
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
        if let (Method::Iteris | Method::Regmean | Method::RegmeanPlus, Some(w)) = (self.method, &self.weights) {
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
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::ValueEnum))]
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
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::ValueEnum))]
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
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::ValueEnum))]
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
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::ValueEnum))]
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
    variant_names().into_iter().filter(|n| *n != "iteris-refined" || crate::models::has_backward(model_type)).collect()
}

/// Default token budget of self-calibration (`Options::self_calibrate`).
pub const SELF_CALIBRATE_TOKENS: usize = 32;

/// The longest `--max-len` accepted (tokens per sample).
pub const MAX_LEN: usize = 1 << 16;
/// The most distillation-refinement steps a merge may take.
pub const MAX_REFINE_STEPS: usize = 10_000;

/// The bounds of a numeric setting, as `Options::validate` checks them; the CLI's help and the
/// page show the same (the page reads them through the engine, `wasm::settings_schema`).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Bounds {
    /// The `Options` field: the page's settings key.
    pub field: &'static str,
    /// The CLI's option, which errors name.
    pub flag: &'static str,
    pub min: f64,
    pub max: f64,
    /// Whether `min` itself is refused: (min, max].
    pub open_min: bool,
    /// Whole numbers only.
    pub integer: bool,
    /// The setting's value in a set of options (None: unset).
    #[serde(skip)]
    pub value: fn(&Options) -> Option<f64>,
}

impl Bounds {
    fn admits(&self, v: f64) -> bool {
        v.is_finite() && (if self.open_min { v > self.min } else { v >= self.min }) && v <= self.max
    }

    /// The range as errors write it: `1..=10` for whole numbers, `[0, 1]` or `(0, 1]` else.
    fn range(&self) -> String {
        match (self.integer, self.open_min) {
            (true, _) => format!("{}..={}", self.min, self.max),
            (false, false) => format!("[{}, {}]", self.min, self.max),
            (false, true) => format!("({}, {}]", self.min, self.max),
        }
    }
}

/// Whole numbers `field` of `Options` in min..=max, checked under `flag`.
macro_rules! whole {
    ($field:ident, $flag:literal, $min:expr, $max:expr) => {
        Bounds {
            field: stringify!($field),
            flag: $flag,
            min: $min as f64,
            max: $max as f64,
            open_min: false,
            integer: true,
            value: |o| Some(o.$field as f64),
        }
    };
}

/// Real numbers `field` of `Options` in [min, max] (or (min, max] where `open`).
macro_rules! real {
    ($field:ident, $flag:literal, $min:expr, $max:expr, $open:expr) => {
        Bounds {
            field: stringify!($field),
            flag: $flag,
            min: $min,
            max: $max,
            open_min: $open,
            integer: false,
            value: |o| Some(o.$field as f64),
        }
    };
}

/// Every numeric setting's bounds (`weights` and `max_memory_mib` are checked apart).
pub const BOUNDS: [Bounds; 16] = [
    whole!(iters, "--iters", 1, 1000),
    real!(alpha1, "--alpha1", 0.0, 1.0, false),
    real!(alpha2, "--alpha2", 0.0, 1.0, false),
    real!(rho, "--rho", 0.0, 1.0, false),
    whole!(max_len, "--max-len", 1, MAX_LEN),
    Bounds {
        field: "rank",
        flag: "--rank",
        min: 1.0,
        max: 65536.0,
        open_min: false,
        integer: true,
        value: |o| o.rank.map(|r| r as f64),
    },
    real!(density, "--density", 0.0, 1.0, true),
    real!(common_space, "--common-space", 0.0, 1.0, false),
    real!(regmean_scale, "--regmean-scale", 0.0, 1.0, false),
    whole!(balance_sweeps, "--balance-sweeps", 1, 10),
    whole!(balance_folds, "--balance-folds", 1, 10),
    whole!(refine_steps, "--refine-steps", 0, MAX_REFINE_STEPS),
    real!(refine_lr, "--refine-lr", 0.0, 1.0, true),
    whole!(refine_augment, "--refine-augment", 0, 64),
    whole!(self_calibrate, "--self-calibrate", 0, MAX_LEN),
    whole!(seed, "--seed", 0, u64::MAX),
];
