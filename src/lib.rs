//! iteris: merge LoRA adapters with IterIS (Chen et al., CVPR 2025).
//!
//! Layers, each knowing only the ones below it (see ARCHITECTURE.md):
//! `formats` (files) → `backend` (tensor ops: CPU, GPU) → `models` (forward passes over the backend
//! interface) → `merge` (IterIS schedules, solve, export, report) → faces (CLI, wasm bindings).

// The backend, hook and model traits are only used generically (never boxed), so their async
// methods need no Send bounds.
#![allow(async_fn_in_trait)]

pub mod backend;
pub mod engine;
pub mod error;
pub mod formats;
pub mod inputs;
pub mod mat;
pub mod merge;
pub mod models;
pub mod profile;

pub use error::{Error, Result};
#[cfg(not(target_arch = "wasm32"))]
pub mod fsio;
#[cfg(target_arch = "wasm32")]
pub mod wasm;
