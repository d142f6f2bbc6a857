//! The memory plan against what is measured.
//! - `Model::row_floats`, the activations per token row the plan counts, against the heap a
//!   forward pass of every family really holds (this test binary counts every allocation).
//! - The plan's figure for each phase of a merge against the CLI's measured resident-set peak
//!   (merge_report.json's `memory_peaks`), at two real model shapes with every phase running
//!   (self-calibration, balancing, passes, held-out evaluation): within 15%.

mod common;
use common::*;
use iteris::backend::cpu::Cpu;
use iteris::fsio;
use iteris::models::{self, Batch, NoHook, Output, Stream};
use pollster::FutureExt;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes live and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call forwards to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if n > l.size() {
            grew(n - l.size());
        } else {
            LIVE.fetch_sub(l.size() - n, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Held by each test of this binary: the counters are the process's, so a test allocating on
/// another thread (the plan test builds models and reads reports) would move the forward pass's
/// measured peak (qwen2 once measured 640 bytes per row against its 1280 that way).
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The heap a forward pass over `seqs` sequences of `len` tokens holds beyond what was live
/// before it (one thread, so that nothing else allocates meanwhile).
fn pass_heap(model: &models::Model<iteris::mat::Mat>, vocab: usize, seqs: usize, len: usize) -> usize {
    let ids: Vec<Vec<u32>> =
        (0..seqs).map(|s| (0..len).map(|t| ((s * 7919 + t * 104729) % vocab.min(256)) as u32).collect()).collect();
    let mut batch = Batch::default();
    batch.push_group(0, Stream::Base, &ids);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let y = models::run(model, &Cpu, &batch, &mut NoHook, Output::Hidden).block_on().unwrap();
    let peak = PEAK.load(Ordering::Relaxed);
    drop(y);
    peak - before
}

/// Each family's forward pass holds at most `row_floats` f32 values per token row, and not far
/// below it (a plan that over-counts refuses merges that fit): the slope of its heap peak
/// between two batch sizes, whose difference is token rows only.
#[test]
fn row_floats_bound_each_familys_forward_pass() {
    let _alone = alone();
    for arch in ARCHS {
        let base = fsio::read_base(&fixture(arch).join("base")).unwrap();
        let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
        let vocab = model.vocab();
        let len = 16.min(model.max_positions());
        // Threads would each hold an attention block's scratch at once; one does here.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        // A first pass makes what lives on (thread-local product workspaces).
        let (small, large) = pool.install(|| {
            pass_heap(&model, vocab, 80, len);
            (pass_heap(&model, vocab, 16, len), pass_heap(&model, vocab, 80, len))
        });
        let per_row = (large - small) as f64 / (64 * len) as f64;
        let planned = (model.row_floats() * 4) as f64;
        eprintln!("{arch}: {per_row:.0} bytes per token row measured, {planned:.0} planned");
        assert!(
            per_row <= planned * 1.02,
            "{arch}: a pass holds {per_row:.0} bytes per row, the plan counts {planned:.0}"
        );
        assert!(
            per_row >= planned * 0.6,
            "{arch}: a pass holds {per_row:.0} bytes per row, the plan counts {planned:.0}"
        );
    }
}

/// `iteris merge` (defaults, held-out evaluation) of a model made by tools/make_model.rs, and
/// each phase's planned host bytes against the measured peak so far. The resident set only grows
/// (`keep_freed_memory`), as the page's memory does, so each phase is compared with the largest
/// planned figure up to it.
fn check_plan(shape: &str) {
    let dir = temp_dir(&format!("memory-{shape}"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let made = Command::new(cargo)
        .current_dir(root)
        .args(["run", "--release", "--quiet", "--example", "make_model", "--"])
        .arg(&dir)
        .args(["--shape", shape])
        .status()
        .unwrap();
    assert!(made.success(), "tools/make_model.rs --shape {shape} failed");
    let mut merge = Command::new(env!("CARGO_BIN_EXE_iteris"));
    merge.args(["merge", "--backend", "cpu", "--force", "--base"]).arg(dir.join("base"));
    for i in 0..3 {
        merge.arg("--adapter").arg(dir.join(format!("adapter{i}")));
        merge.arg("--samples").arg(dir.join(format!("samples{i}.txt")));
        merge.arg("--eval").arg(dir.join(format!("eval{i}.jsonl")));
    }
    let out = dir.join("out");
    let run = merge.arg("--out").arg(&out).output().unwrap();
    assert!(run.status.success(), "iteris merge: {}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("merge_report.json")).unwrap()).unwrap();
    let planned: Vec<(String, f64)> = report["memory_plan"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["phase"].as_str().unwrap().to_string(), p["host_bytes"].as_f64().unwrap()))
        .collect();
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let (mut plan_so_far, mut compared) = (0.0f64, 0);
    for m in report["memory_peaks"].as_array().unwrap() {
        let (phase, measured) = (m["phase"].as_str().unwrap(), m["bytes"].as_f64().unwrap());
        let Some((_, p)) = planned.iter().find(|(n, _)| n == phase) else { continue };
        plan_so_far = plan_so_far.max(*p);
        let ratio = plan_so_far / measured;
        eprintln!(
            "{shape} {phase}: planned {:.0} MiB, measured {:.0} MiB ({ratio:.2})",
            mib(plan_so_far),
            mib(measured)
        );
        assert!(
            (0.85..=1.15).contains(&ratio),
            "{shape}, {phase}: the plan says {:.0} MiB, the resident set peaked at {:.0} MiB",
            mib(plan_so_far),
            mib(measured)
        );
        compared += 1;
    }
    assert!(compared >= 5, "{shape}: only {compared} phases measured: {}", report["memory_peaks"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// At the 106M GPT-2 shape (F16) and SmolLM2-135M's (F32), one after the other: the resident
/// set is one process's, and two merges at once would only slow each other.
#[test]
#[cfg(target_os = "linux")]
fn the_plan_bounds_the_cli_peak_at_two_model_shapes() {
    let _alone = alone();
    check_plan("gpt2");
    check_plan("smollm2");
}
