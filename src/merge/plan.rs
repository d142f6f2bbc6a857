//! The memory plan of a merge, made before any pass runs: what the weights, the activations of
//! one batched forward pass and one stage's statistics will take on the host and on the device,
//! the largest single tensor (a GPU storage binding), and the limits they must fit. A merge that
//! cannot fit is refused with what to change, instead of failing (or being killed) midway.
//!
//! The host figure is made phase by phase (`PhasePlan`), each the most the phase holds at once:
//! the memory in use when the merge began, the weights, and what the phase adds — a tensor being
//! read (load), KV caches, one pass's activations (`Model::row_floats` per token row, as each
//! family's forward frees them), logits tables, statistics. The report puts each phase's figure
//! beside the measured peak (`profile::host_peak_bytes`). A batch whose widest activation would
//! exceed a binding runs in chunks of rows (`models::chunked`), so the largest row tensor is a
//! chunk's; a Gram matrix wider than a binding is kept in row blocks.

use super::iteris::Target;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::formats::safetensors::TensorStore;
use crate::models::ModuleInfo;

/// Logits one evaluation pass (held-out KL, balancing's agreement) may produce at most:
/// `merge::evaluate` splits its batches to stay under this and the backend's largest tensor. A
/// table this small fits in memory that earlier phases freed; at 256 MiB each new table grew the
/// page's memory by its whole size.
pub const EVAL_LOGITS_BYTES: u64 = 64 << 20;

pub use crate::models::generate::DECODING_BYTES;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemoryPlan {
    /// The input files held in memory (safetensors bytes; 0 where they are read by ranges).
    pub files_bytes: u64,
    /// The model's weights as the backend holds them (file precision on both backends).
    pub weights_bytes: u64,
    /// One batched forward pass over every task's samples (both streams).
    pub activations_bytes: u64,
    /// What each phase holds on the host at its peak, the memory in use at the start included
    /// (`host_bytes` is the largest).
    pub phases: Vec<PhasePlan>,
    /// What every phase after the load holds: the memory in use at the start, the files and
    /// weights held, and the native product's packing workspace.
    pub resident_bytes: u64,
    /// One stage's statistics: Gram matrices per task, the system matrices and their factors.
    pub statistics_bytes: u64,
    /// Distillation refinement (`merge::refine`): one run's kept activations, its teacher's and
    /// its logits' (rows, vocab) tables, the factors' gradients and Adam moments (0 without
    /// refinement).
    pub refinement_bytes: u64,
    /// The chunks the batched pass runs in (1 where no tensor of the whole batch exceeds a
    /// binding), and the token rows of the largest.
    pub chunks: usize,
    pub chunk_rows: usize,
    /// The largest single tensor, and what it is.
    pub largest_tensor_bytes: u64,
    pub largest_tensor: String,
    /// All of it on the host (wasm memory in the page).
    pub host_bytes: u64,
    /// On the GPU (0 for the CPU backend).
    pub device_bytes: u64,
    /// The backend's largest tensor (a GPU storage binding; none for the CPU).
    pub tensor_limit_bytes: Option<u64>,
    /// Host memory available when the plan was made (None: unknown).
    pub host_available_bytes: Option<u64>,
    /// The part of `host_bytes` not yet allocated when the plan was made (what must fit in
    /// `host_available_bytes`).
    pub host_to_allocate_bytes: u64,
    /// Whether the weights were already loaded when the plan was made (a merge's plan, made
    /// after the load): then they are in use, not still to be allocated.
    #[serde(skip)]
    pub weights_loaded: bool,
}

/// A phase's allocations beyond what stays resident take up to 1/`ALLOCATOR_SLACK` more of the
/// heap than they hold (`set_phases`).
const ALLOCATOR_SLACK: u64 = 4;

/// One phase of a merge and the host memory it is planned to hold at its peak.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PhasePlan {
    pub phase: &'static str,
    pub host_bytes: u64,
}

/// The sizes the phases' memory is made from (see `merge_plan`).
#[derive(Clone, Debug, Default)]
pub struct PhaseShapes {
    /// Host memory in use when the merge began (`profile::host_peak_bytes`; 0 where unknown).
    pub base_bytes: u64,
    /// `Model::row_floats`, the LM head's width (0: no head) and the KV cache's bytes per token.
    pub row_floats: usize,
    pub vocab: usize,
    pub kv_token_bytes: u64,
    /// Token rows of one evaluation pass, and of one decoding run's first pass
    /// (`models::generate::rows_within` `EVAL_LOGITS_BYTES`, `DECODING_BYTES`).
    pub eval_rows: usize,
    pub decode_rows: usize,
    /// Self-calibration's greedy decoding: (sequences, longest sequence, prompt tokens).
    pub self_calibration: Option<(usize, usize, usize)>,
    /// Balancing, where it runs: its agreement pass's token rows and the rows it takes logits of
    /// (each held-out sample's continuation).
    pub balancing: Option<(usize, usize)>,
    /// Held-out evaluation: the KL pass's token rows (both streams), and the greedy decoding
    /// of labeled samples (sequences, longest sequence, prompt tokens).
    pub quality: Option<(usize, Option<(usize, usize, usize)>)>,
    /// Bytes of the merged adapter's files (export).
    pub export_bytes: u64,
}

impl PhaseShapes {
    fn pass(&self, rows: usize) -> u64 {
        pass_bytes(rows, self.row_floats)
    }
    fn logits(&self, rows: usize) -> u64 {
        (rows * self.vocab) as u64 * 4
    }
    /// Greedy decoding (`models::generate::continue_greedy`): a run's KV cache (sequences × longest, at
    /// most `DECODING_BYTES` and `decode_rows` tokens), its first pass over the prompts and its
    /// last-token logits.
    fn decoding(&self, (seqs, longest, prompts): (usize, usize, usize)) -> u64 {
        let cache_rows = (DECODING_BYTES / self.kv_token_bytes.max(1)) as usize;
        let run_seqs = (self.decode_rows.min(cache_rows) / longest.max(1)).clamp(1, seqs.max(1));
        let prompt_rows = prompts.div_ceil(seqs.max(1)) * run_seqs;
        (run_seqs * longest) as u64 * self.kv_token_bytes + self.pass(prompt_rows) + self.logits(run_seqs)
    }
    /// One evaluation pass over `rows` token rows with every row's logits.
    fn eval_pass(&self, rows: usize) -> u64 {
        let rows = rows.min(self.eval_rows);
        self.pass(rows) + self.logits(rows)
    }
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b < 1 << 20 {
        // Only under artificial binding limits (tests), but then say it exactly.
        format!("{:.0} KiB", (b as f64 / 1024.0).ceil())
    } else {
        format!("{:.0} MiB", (b as f64 / (1u64 << 20) as f64).ceil())
    }
}

/// The weights alone, before the model is loaded: a model whose weights cannot fit is refused
/// before its tensors are copied.
pub fn weights_plan<B: Backend>(be: &B, store: &TensorStore, max_memory_mib: Option<u64>) -> MemoryPlan {
    let files_bytes: u64 = store.files.iter().map(|f| f.held_bytes()).sum();
    let weights_bytes = store.stored_bytes(!be.keeps_file_precision());
    let device = be.on_device();
    MemoryPlan {
        files_bytes,
        weights_bytes,
        host_bytes: files_bytes + if device { 0 } else { weights_bytes },
        host_to_allocate_bytes: if device { 0 } else { weights_bytes },
        device_bytes: if device { weights_bytes } else { 0 },
        tensor_limit_bytes: (be.max_tensor_bytes() < u64::MAX).then(|| be.max_tensor_bytes()),
        host_available_bytes: match (crate::inputs::host_available(), max_memory_mib.map(|m| m << 20)) {
            (Some(a), Some(m)) => Some(a.min(m)),
            (a, m) => a.or(m),
        },
        ..Default::default()
    }
}

/// The widest token row a merge pass makes, and the module it is at: the widest module the pass
/// runs (the LM head only where an adapter targets it: the pass stops after its last target).
pub fn widest_row<'m>(modules: &'m [ModuleInfo], targets: &[Target]) -> (usize, &'m str) {
    modules
        .iter()
        .filter(|m| m.name != "lm_head" || targets.iter().any(|t| t.name == m.name))
        .map(|m| (m.out_dim.max(m.in_dim), m.name.as_str()))
        .max()
        .unwrap_or((0, ""))
}

/// Token rows one chunk of a merge pass may hold (`models::chunked`): its widest tensor within the
/// backend's largest.
pub fn chunk_rows<B: Backend>(be: &B, modules: &[ModuleInfo], targets: &[Target]) -> usize {
    let row = widest_row(modules, targets).0.max(1) as u64 * 4;
    (be.max_tensor_bytes() / row).clamp(1, usize::MAX as u64) as usize
}

/// One forward pass's activations over `rows` token rows (`Model::row_floats` each).
fn pass_bytes(rows: usize, row_floats: usize) -> u64 {
    (rows * row_floats) as u64 * 4
}

/// One stage's statistics on the host: per task XᵀX̃ and X̃ᵀX̃; per module of a stage (at most
/// three: q/k/v) a system and a factor; f64, of the widest targeted input.
fn host_stats_bytes(tasks: usize, width: usize) -> u64 {
    (2 * tasks as u64 + 2 * 3) * (width * width) as u64 * 8
}

/// The output objective's extra statistics at its largest stage: per task and module of a stage
/// (at most three), X̃ᵀ(Y − X̃W0ᵀ) (in, out) in f64; the dense solution, its SVD's factors and
/// workspace (about five (in, out) f64 matrices) for one module.
fn output_stats_bytes(tasks: usize, targets: &[Target]) -> u64 {
    let widest = targets.iter().map(|t| (t.in_dim * t.out_dim) as u64).max().unwrap_or(0);
    (3 * tasks as u64 + 5) * widest * 8
}

/// The whole merge: the batched pass (both streams) in chunks of `chunk_rows` token rows each
/// (`models::chunked`; one chunk where the backend has no binding limit); `tasks` adapters;
/// `output`: the output objective's statistics too.
#[allow(clippy::too_many_arguments)]
pub fn merge_plan<B: Backend>(
    be: &B,
    store: &TensorStore,
    modules: &[ModuleInfo],
    targets: &[Target],
    chunk_rows: &[usize],
    tasks: usize,
    output: bool,
    shapes: &PhaseShapes,
    max_memory_mib: Option<u64>,
) -> MemoryPlan {
    let mut p = weights_plan(be, store, max_memory_mib);
    let (widest, wide_name) = widest_row(modules, targets);
    // Every chunk's activations are alive at once (they meet at each stage); one tensor holds at
    // most a chunk's rows.
    let all_rows: usize = chunk_rows.iter().sum();
    p.activations_bytes = shapes.pass(all_rows);
    p.chunks = chunk_rows.len();
    p.chunk_rows = chunk_rows.iter().copied().max().unwrap_or(0);
    let rows = p.chunk_rows as u64;
    let row_tensor = rows * widest as u64 * 4;
    let (width, gram_name) = targets.iter().map(|t| (t.in_dim, t.name.as_str())).max().unwrap_or((0, ""));
    let square = (width * width) as u64;
    let extra = if output { output_stats_bytes(tasks, targets) } else { 0 };
    let host_stats = host_stats_bytes(tasks, width) + extra;
    // The output objective's Grams are twice-f32 pairs on a device, as large as the host's f64.
    let device_stats = (2 * tasks as u64 * 2 + 3) * square * 4 + extra;
    p.statistics_bytes = host_stats + if be.on_device() { device_stats } else { 0 };
    // A Gram matrix wider than one binding is kept in row blocks (and solved on the host without
    // a GPU factor), so only a chunk's rows can exceed a binding.
    let gram_binding = p.tensor_limit_bytes.map_or(square * 4, |l| (square * 4).min(l));
    (p.largest_tensor_bytes, p.largest_tensor) = if row_tensor >= gram_binding {
        let of = if p.chunks > 1 { " (one chunk)" } else { "" };
        (row_tensor, format!("{rows} token rows{of} × {widest} features at {wide_name}"))
    } else {
        let blocks = if gram_binding < square * 4 { ", in row blocks" } else { "" };
        (gram_binding, format!("a {width} × {width} Gram matrix at {gram_name}{blocks}"))
    };
    if be.on_device() {
        p.device_bytes += p.activations_bytes + device_stats;
    }
    set_phases(&mut p, be, store, shapes, all_rows, host_stats);
    p.weights_loaded = true;
    p
}

/// Each phase's host figure (see the module's doc), and `host_bytes` the largest. On a device
/// the weights and activations are the device's; the host holds the files, the statistics and
/// what is read back (logits).
fn set_phases<B: Backend>(
    p: &mut MemoryPlan,
    be: &B,
    store: &TensorStore,
    s: &PhaseShapes,
    rows: usize,
    host_stats: u64,
) {
    let device = be.on_device();
    let host = |b: u64| if device { 0 } else { b };
    let held = p.files_bytes + host(p.weights_bytes);
    // The native CPU product (faer) packs the right-hand side whole: an f32 weight is packed as
    // it is multiplied, and the largest (the LM head) stays in its workspace. Half-precision
    // weights are multiplied by panels of 4 MiB (`gemm::product_by_panels`).
    let packing = if device || cfg!(target_arch = "wasm32") { 0 } else { store.largest_f32_matrix_bytes() };
    p.resident_bytes = s.base_bytes + held + packing;
    let pass = host(s.pass(rows));
    let mut phases = vec![("load", held + store.largest_tensor_bytes() * if device { 2 } else { 1 })];
    if let Some(g) = s.self_calibration {
        phases.push(("self_calibration", held + packing + host(s.decoding(g))));
    }
    if let Some((rows, tails)) = s.balancing {
        let agreement = s.pass(rows.min(s.eval_rows)) + s.logits(tails.min(s.eval_rows));
        phases.push(("balancing", held + packing + (pass + host_stats).max(host(agreement))));
    }
    phases.push(("passes", held + packing + pass + host_stats));
    phases.push(("export", held + s.export_bytes));
    if let Some((kl_rows, generation)) = s.quality {
        let kl = host(s.eval_pass(kl_rows));
        phases.push(("quality", held + packing + kl.max(generation.map_or(0, |g| host(s.decoding(g))))));
    }
    // What a phase frees is not all reusable by the next phase's sizes (the allocator's holes sit
    // between blocks that stay): measured on the 106M GPT-2 and SmolLM2-135M shapes, natively and
    // in the page, the heap's high-water ran up to a quarter above the phases' live peaks.
    let resident = held + packing;
    let slack = |b: u64| b + b.saturating_sub(resident) / ALLOCATOR_SLACK;
    p.phases = phases
        .into_iter()
        .map(|(phase, b)| PhasePlan { phase, host_bytes: s.base_bytes + if phase == "load" { b } else { slack(b) } })
        .collect();
    p.host_bytes = p.phases.iter().map(|f| f.host_bytes).max().unwrap_or(0);
    // What the merge still has to allocate: beyond what was in use when it began and the weights
    // (loaded before the plan is checked).
    p.host_to_allocate_bytes = p.host_bytes.saturating_sub(s.base_bytes + held);
}

/// Add refinement's memory to a plan (`MemoryPlan::refinement_bytes`): per token row of a run,
/// every layer module's input and output and four residual-width tensors per layer kept for the
/// backward pass (on the device where the merge runs on one), the teacher's and the logits'
/// (rows, vocab) tables on the host; `merged_params` the merged factors' entries (three copies
/// more: the gradient, Adam's two moments, and the best so far).
pub fn add_refinement(p: &mut MemoryPlan, modules: &[ModuleInfo], merged_params: u64, on_device: bool) {
    let layer_modules = modules.iter().filter(|m| m.name != "lm_head");
    let per_row: u64 = layer_modules.map(|m| (m.in_dim + m.out_dim) as u64).sum::<u64>();
    let head = modules.iter().find(|m| m.name == "lm_head");
    let (d, vocab) = head.map_or((0, 0), |m| (m.in_dim as u64, m.out_dim as u64));
    let layers = modules.iter().filter(|m| m.name.ends_with("o_proj") || m.name.ends_with("dense")).count().max(1);
    let rows = super::refine::RUN_TOKENS as u64;
    let kept = rows * (per_row + 4 * d * layers as u64) * 4;
    let tables = (rows + 2 * 256) * vocab * 4;
    let host = tables + 4 * merged_params * 4 + if on_device { 0 } else { kept };
    p.refinement_bytes = kept + tables + 4 * merged_params * 4;
    let at = p.phases.iter().position(|f| f.phase == "export").unwrap_or(p.phases.len());
    p.phases
        .insert(at, PhasePlan { phase: "refinement", host_bytes: p.resident_bytes + host + host / ALLOCATOR_SLACK });
    let max = p.phases.iter().map(|f| f.host_bytes).max().unwrap_or(0);
    p.host_to_allocate_bytes += max.saturating_sub(p.host_bytes);
    p.host_bytes = max;
    if on_device {
        // The kept activations, the logits' gradients of a run and the factors' gradients.
        p.device_bytes += kept + 256 * vocab * 4 + merged_params * 4;
    }
}

/// Device memory a Jacobi merge may spend on the adapter streams' kept inputs (the GPU backends
/// cannot tell how much is free; a WebGPU device commonly has a few GiB).
pub const KEEP_DEVICE_BYTES: u64 = 1 << 30;

/// Whether the adapter streams' inputs are kept between Jacobi passes, and what they take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AdapterInputs {
    /// Kept (later passes run the merged stream only), else recomputed by every pass.
    pub kept: bool,
    /// What keeping them takes (an upper bound: modules that share an input count once each).
    pub bytes: u64,
}

impl AdapterInputs {
    /// Keep them where they fit: in half the host memory left once the rest of the merge has what
    /// `merge_plan` counts for it (one batched pass over both streams, a stage's statistics), or
    /// within `KEEP_DEVICE_BYTES` (a GPU backend). `tokens`: every task's token rows.
    pub fn plan<B: Backend>(
        be: &B,
        row_floats: usize,
        targets: &[Target],
        tokens: usize,
        tasks: usize,
        max_memory_mib: Option<u64>,
    ) -> Self {
        let bytes: u64 = targets.iter().map(|t| (t.in_dim * tokens * 4) as u64).sum();
        let budget = if be.on_device() {
            KEEP_DEVICE_BYTES
        } else {
            let avail = match (crate::inputs::host_available(), max_memory_mib.map(|m| m << 20)) {
                (Some(a), Some(m)) => a.min(m),
                (a, m) => a.or(m).unwrap_or(KEEP_DEVICE_BYTES * 2),
            };
            let width = targets.iter().map(|t| t.in_dim).max().unwrap_or(0);
            let rest = pass_bytes(2 * tokens, row_floats) + host_stats_bytes(tasks, width);
            avail.saturating_sub(rest) / 2
        };
        AdapterInputs { kept: bytes <= budget, bytes }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        if self.kept {
            format!(
                "adapter streams' inputs kept between passes ({}): later passes run the merged stream only",
                mib(self.bytes)
            )
        } else {
            format!(
                "adapter streams rerun every pass (keeping their inputs would take {}, more than fits)",
                mib(self.bytes)
            )
        }
    }
}

impl MemoryPlan {
    /// Refuse the plan if it cannot fit, naming what to change.
    pub fn check(&self, backend: &str) -> Result<()> {
        let advice = "use fewer samples per task, a shorter --max-len (the page: Max length), target fewer modules";
        if let Some(limit) = self.tensor_limit_bytes {
            if self.largest_tensor_bytes > limit {
                return Err(Error::Unsupported(format!(
                    "memory plan: the largest tensor ({}, {}) exceeds the {} one {backend} op can address: one sample's token rows (both streams) must fit; use a shorter --max-len (the page: Max length), or the CPU backend",
                    self.largest_tensor,
                    mib(self.largest_tensor_bytes),
                    mib(limit)
                )));
            }
        }
        if let Some(avail) = self.host_available_bytes {
            let host_weights = if self.device_bytes > 0 { 0 } else { self.weights_bytes };
            if host_weights > avail && !self.weights_loaded {
                return Err(Error::Unsupported(format!(
                    "memory plan: the model's weights need {} as the {backend} backend holds them (their file precision), but only {} is available: use a smaller model, or run the command-line tool on a larger machine",
                    mib(self.weights_bytes),
                    mib(avail)
                )));
            }
            if self.host_to_allocate_bytes > avail {
                let most = self
                    .phases
                    .iter()
                    .max_by_key(|f| f.host_bytes)
                    .map_or(String::new(), |f| format!(" at its largest phase ({})", f.phase.replace('_', "-")));
                return Err(Error::Unsupported(format!(
                    "memory plan: the merge needs about {}{most} of memory (input files {}, weights {}, activations {}, statistics {}), {} more than is in use, but only {} is available: {advice}, or run the command-line tool on a larger machine",
                    mib(self.host_bytes),
                    mib(self.files_bytes),
                    mib(self.weights_bytes),
                    mib(self.activations_bytes),
                    mib(self.statistics_bytes),
                    mib(self.host_to_allocate_bytes),
                    mib(avail)
                )));
            }
        }
        Ok(())
    }
}
