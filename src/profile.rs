//! Where a run's time goes: wall time, CPU time (every thread, user + system) and floating-point
//! operations per phase, for the benchmarks (`cargo bench --bench merge`). Off unless `enable`d:
//! a disabled span is one atomic load. Spans do not nest: inside one (an op that calls others),
//! the inner ones count nothing, so the phases add up to at most the wall time.
//!
//! In the page (`?profile=1`, `benches/page_merge.mjs --profile`) the clock is the worker's
//! `performance.now()` (5 µs steps in a cross-origin-isolated page); there is no process CPU clock,
//! so its "cores" column reads 1.
//!
//! Memory is measured everywhere, by the figure a user sees: the resident set's high-water mark
//! natively, the WebAssembly memory in the page. Each merge phase records it (`merge_report.json`'s
//! `memory_phases`), beside what the memory plan said the phase would take.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

static ON: AtomicBool = AtomicBool::new(false);
/// Spans open now (any thread): only the outermost records.
static OPEN: AtomicUsize = AtomicUsize::new(0);
static PHASES: Mutex<Vec<Phase>> = Mutex::new(Vec::new());

/// What one phase cost over the run so far.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub name: &'static str,
    pub calls: usize,
    pub wall_s: f64,
    /// CPU seconds of the process (all threads) while the phase ran.
    pub cpu_s: f64,
    pub flops: f64,
}

/// Start recording (and forget what was recorded before).
pub fn enable() {
    PHASES.lock().unwrap().clear();
    ON.store(true, Ordering::Relaxed);
}

/// The phases recorded since `enable`, costliest first.
pub fn phases() -> Vec<Phase> {
    let mut p = PHASES.lock().unwrap().clone();
    p.sort_by(|a, b| b.wall_s.total_cmp(&a.wall_s));
    p
}

/// The phases as a table: wall time, share of `wall`, calls, cores kept busy and GFLOP/s per
/// phase, then "other" (the rest of `wall` and `cpu`: code between ops, waits).
pub fn table(phases: &[Phase], wall: f64, cpu: f64) -> String {
    let mut out =
        format!("  {:12} {:>8} {:>6} {:>7} {:>6} {:>9}\n", "phase", "wall s", "share", "calls", "cores", "GFLOP/s");
    let mut row = |name: &str, calls: String, w: f64, c: f64, flops: f64| {
        let gf = if flops > 0.0 { format!("{:9.1}", flops / w / 1e9) } else { String::new() };
        let cores = if w > 0.0 { c / w } else { 0.0 };
        out += &format!("  {name:12} {w:8.2} {:5.1}% {calls:>7} {cores:6.2} {gf}\n", 100.0 * w / wall);
    };
    for p in phases {
        row(p.name, p.calls.to_string(), p.wall_s, p.cpu_s, p.flops);
    }
    let (w, c): (f64, f64) = phases.iter().fold((0.0, 0.0), |(w, c), p| (w + p.wall_s, c + p.cpu_s));
    row("other", String::new(), wall - w, cpu - c, 0.0);
    out
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen]
extern "C" {
    /// The global `performance.now()` of the page and of each Web Worker, in milliseconds.
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn performance_now() -> f64;
}

/// Wall and process CPU seconds since an arbitrary origin (in the page, the wall clock twice);
/// None where there is no clock.
pub fn clocks() -> Option<(f64, f64)> {
    #[cfg(target_arch = "wasm32")]
    {
        let wall = performance_now() / 1000.0;
        Some((wall, wall))
    }
    #[cfg(all(unix, not(target_arch = "wasm32")))]
    {
        // SAFETY: getrusage only writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
            return None;
        }
        let secs = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
        Some((wall, secs(u.ru_utime) + secs(u.ru_stime)))
    }
    #[cfg(not(any(unix, target_arch = "wasm32")))]
    None
}

/// Records its phase when dropped.
pub struct Span {
    start: Option<(&'static str, f64, f64, f64)>,
}

/// The floating-point operations of a product of these dimensions' multiply-adds (2 · Π dims),
/// counted in f64: in usize, a SmolLM2 merge's 7,430-row products (6.6e9 multiply-adds) wrapped
/// past 2³² on wasm32 and the page's profile showed them at a third of their rate.
pub fn mul_adds(dims: &[usize]) -> f64 {
    2.0 * dims.iter().map(|&d| d as f64).product::<f64>()
}

/// Time the rest of the scope as phase `name`, which performs `flops` floating-point operations.
pub fn span(name: &'static str, flops: f64) -> Span {
    if !ON.load(Ordering::Relaxed) {
        return Span { start: None };
    }
    if OPEN.fetch_add(1, Ordering::Relaxed) > 0 {
        return Span { start: Some(("", 0.0, 0.0, 0.0)) };
    }
    match clocks() {
        Some((w, c)) => Span { start: Some((name, w, c, flops)) },
        None => Span { start: Some(("", 0.0, 0.0, 0.0)) },
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some((name, w0, c0, flops)) = self.start else { return };
        OPEN.fetch_sub(1, Ordering::Relaxed);
        let Some((w1, c1)) = clocks().filter(|_| !name.is_empty()) else { return };
        let mut phases = PHASES.lock().unwrap();
        let i = match phases.iter().position(|p| p.name == name) {
            Some(i) => i,
            None => {
                phases.push(Phase { name, ..Phase::default() });
                phases.len() - 1
            }
        };
        let p = &mut phases[i];
        p.calls += 1;
        p.wall_s += w1 - w0;
        p.cpu_s += c1 - c0;
        p.flops += flops;
    }
}

/// The host memory held at its peak since the last `reset_host_peak`: the process's resident set
/// high-water mark (Linux `VmHWM`), or the WebAssembly memory, which only grows. None where
/// neither exists.
pub fn host_peak_bytes() -> Option<u64> {
    #[cfg(target_arch = "wasm32")]
    {
        Some(core::arch::wasm32::memory_size(0) as u64 * 65536)
    }
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }
    #[cfg(not(any(target_arch = "wasm32", target_os = "linux")))]
    None
}

/// Start a new high-water mark at the present resident set (Linux: `clear_refs` 5), so that the
/// next `host_peak_bytes` is one phase's peak. A no-op in the page, whose memory cannot shrink:
/// there each phase's figure is the peak of the merge so far.
pub fn reset_host_peak() {
    #[cfg(target_os = "linux")]
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
