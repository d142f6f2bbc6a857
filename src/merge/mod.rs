//! The merge: map adapters onto the model, tokenize samples, run IterIS (sweep or Jacobi), export.
//! Knows models and backends only through their traits.

pub mod balance;
pub mod baselines;
pub mod calibrate;
pub mod core_space;
pub mod dense;
pub mod evaluate;
pub mod export;
pub mod iso;
pub mod iteris;
pub mod knots;
pub mod options;
pub mod peft_parity;
pub mod pipeline;
pub mod plan;
pub mod refine;
pub mod report;
pub mod schedule;
pub mod solve;
pub mod spectral;
pub mod study;
pub mod targets;
pub mod tsv;

pub use baselines::Method;
use iteris::{ModuleRecord, Target};
pub use options::*;
pub use schedule::{iteris, relative_change};
use solve::Merged;
pub use targets::{map_targets, tokenize, with_every_module};

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
