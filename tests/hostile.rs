//! Hostile and careless input through `iteris merge`, as a table: every case must exit with
//! status 1 and exactly one `error:` line that names the file (or setting) and the problem, with
//! no panic, nothing written at --out, every input byte-identical afterwards, and the process's
//! peak memory bounded. Also: a crash at the --force swap loses nothing, a 50 MB one-line samples
//! file costs what a normal sample costs, and a successful run prints no `error:` line.

mod common;
use common::hostile::*;
use common::skip_without;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Peak resident memory of the process, MiB.
    rss_mib: f64,
}

/// Run the CLI and measure its peak memory (wait4's rusage, for this child alone).
// wait4 reaps the child (std's `wait` would not return its rusage).
#[allow(clippy::zombie_processes)]
fn run_env(args: &[String], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iteris"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let pipe = |r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let mut r = r;
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let (mut status, mut usage) = (0i32, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: the child is ours and not yet waited for; status and usage are valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Run { code, stdout: out.join().unwrap(), stderr: err.join().unwrap(), rss_mib: usage.ru_maxrss as f64 / 1024.0 }
}

fn run(args: &[String]) -> Run {
    run_env(args, &[])
}

/// Every entry under `d` with a digest of its bytes (regular files, read in pieces so that a
/// huge one costs this process nothing: a child's peak memory, as the kernel counts it, starts
/// from its parent's) or its kind: what must not change when a merge is refused.
fn snapshot(d: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    use std::hash::Hasher;
    let mut out = BTreeMap::new();
    let mut stack = vec![d.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let t = e.file_type().unwrap();
            let entry = if t.is_dir() {
                stack.push(e.path());
                (u64::MAX, 0)
            } else if t.is_file() && e.metadata().unwrap().len() > 1 << 30 {
                // A huge sparse file: its size and modification time stand for its bytes.
                let m = e.metadata().unwrap();
                (m.len(), m.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
            } else if t.is_file() {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                let (mut f, mut buf, mut n) = (std::fs::File::open(e.path()).unwrap(), vec![0u8; 1 << 16], 0u64);
                loop {
                    let k = f.read(&mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    h.write(&buf[..k]);
                    n += k as u64;
                }
                (n, h.finish())
            } else {
                (u64::MAX - 1, 0)
            };
            out.insert(e.path(), entry);
        }
    }
    out
}

#[test]
fn hostile_inputs_are_refused_cleanly() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    println!("{:<12} {:<50} {:>4} {:>8}  message", "class", "case", "exit", "peak MiB");
    for (k, case) in cases.iter().enumerate() {
        let d = scratch(case.arch, &format!("{k}"));
        let mut args = merge_args(&d);
        (case.setup)(&d, &mut args);
        let before = snapshot(&d);
        let r = run(&args);
        let errors: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("error:")).collect();
        let line = errors.first().copied().unwrap_or("");
        println!(
            "{:<12} {:<50} {:>4} {:>8.0}  {line}",
            case.class,
            case.name,
            r.code.map_or("sig".into(), |c| c.to_string()),
            r.rss_mib
        );
        let mut problems = Vec::new();
        if r.code != Some(1) {
            problems.push(format!("exit {:?}", r.code));
        }
        if errors.len() != 1 {
            problems.push(format!("{} error lines", errors.len()));
        }
        if r.stderr.contains("panicked") || r.stderr.lines().count() != 1 {
            problems.push("stderr is not exactly the error line".into());
        }
        for w in case.words {
            if !line.contains(w) {
                problems.push(format!("the error does not mention '{w}'"));
            }
        }
        if snapshot(&d) != before {
            problems.push("files changed (an input, --out, or a temporary folder)".into());
        }
        if r.rss_mib > 200.0 {
            problems.push(format!("peak memory {:.0} MiB", r.rss_mib));
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {} (stderr: {})", case.name, problems.join("; "), r.stderr.trim()));
        }
        let _ = std::fs::remove_dir_all(&d);
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_good_merge_succeeds_and_prints_no_error() {
    let d = scratch("gpt2", "good");
    let r = run(&merge_args(&d));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("wrote"), "{}", r.stdout);
    assert!(!r.stderr.contains("error"), "{}", r.stderr);
    for f in ["adapter_config.json", "adapter_model.safetensors", "merge_report.json"] {
        assert!(d.join("out").join(f).exists(), "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/merge_report.json")).unwrap()).unwrap();
    assert!(report["memory_plan"]["host_bytes"].as_u64().unwrap() > 0, "{}", report["memory_plan"]);
}

/// The Vulkan loader's `error: XDG_RUNTIME_DIR is invalid` must not appear on a successful run
/// (the GPU backend on Mesa's software driver; skipped, saying so, where there is no GPU adapter).
#[test]
fn a_gpu_merge_without_runtime_dir_prints_no_error() {
    let d = scratch("gpt2", "xdg");
    let mut args = merge_args(&d);
    set(&mut args, "--backend", "gpu");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iteris"));
    let o = cmd.args(&args).env_remove("XDG_RUNTIME_DIR").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() && err.contains("no GPU adapter") {
        skip_without("a_gpu_merge_without_runtime_dir_prints_no_error", "GPU adapter", err.trim());
        return;
    }
    assert!(o.status.success(), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("error")), "{err}");
}

#[test]
fn a_sample_longer_than_positions_is_truncated_and_reported() {
    let d = scratch("gpt2", "long");
    let long = vec!["the cat sat on the mat"; 60].join(" ");
    std::fs::write(d.join("samples0.txt"), format!("{long}\nthe dog ran\n")).unwrap();
    let r = run(&merge_args(&d));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("samples0.txt: 1 of 2 samples were longer than 64 tokens and were truncated"),
        "{}",
        r.stderr
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/merge_report.json")).unwrap()).unwrap();
    assert_eq!(report["tasks"][0]["truncated_samples"], 1);
}

/// A 50 MB one-line sample is cut to a character budget before tokenization: the merge costs
/// about what a normal one does (the file's own bytes aside) and gives the same adapter as the
/// line's first part alone.
#[test]
fn a_50_mb_line_costs_what_a_normal_sample_costs() {
    let normal = scratch("gpt2", "normal");
    let r0 = run(&merge_args(&normal));
    assert_eq!(r0.code, Some(0), "{}", r0.stderr);
    let big = scratch("gpt2", "big");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(big.join("samples0.txt")).unwrap();
        let piece = "the cat sat on the mat ".repeat(1 << 12);
        for _ in 0..(50 << 20) / piece.len() {
            f.write_all(piece.as_bytes()).unwrap();
        }
        f.write_all(b"\n").unwrap();
    }
    let r1 = run(&merge_args(&big));
    assert_eq!(r1.code, Some(0), "{}", r1.stderr);
    println!("peak memory: normal merge {:.0} MiB, with a 50 MB line {:.0} MiB", r0.rss_mib, r1.rss_mib);
    // The file is read whole (50 MiB); the sample keeps its first 4 Mi characters.
    assert!(r1.rss_mib < r0.rss_mib + 75.0, "{:.0} MiB vs {:.0} MiB", r1.rss_mib, r0.rss_mib);
}

/// A crash at the --force swap leaves the complete old output or the complete new one, and the
/// next run cleans what the crashed one left.
#[test]
fn a_crash_at_the_force_swap_loses_nothing() {
    let d = scratch("gpt2", "swap");
    let mut args = merge_args(&d);
    push(&mut args, &["--force"]);
    std::fs::create_dir(d.join("out")).unwrap();
    std::fs::write(d.join("out/old.txt"), "the old output").unwrap();
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        v.sort();
        v
    };
    let scratch_left = |d: &Path| names(d).into_iter().filter(|n| n.contains(".iteris-")).count();

    let r = run_env(&args, &[("ITERIS_TEST_ABORT_AT", "before-swap")]);
    assert_eq!(r.code, None, "the process should have aborted: {}", r.stderr);
    assert_eq!(names(&d.join("out")), ["old.txt"], "the old output must be whole");
    assert_eq!(scratch_left(&d), 1, "the crashed run's temporary folder");

    let r = run_env(&args, &[("ITERIS_TEST_ABORT_AT", "after-swap")]);
    assert_eq!(r.code, None, "the process should have aborted: {}", r.stderr);
    assert_eq!(names(&d.join("out")), ["adapter_config.json", "adapter_model.safetensors", "merge_report.json"]);
    assert!(scratch_left(&d) >= 1, "the swapped-out old output waits for cleaning");

    let r = run(&args);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(scratch_left(&d), 0, "stale temporary folders are cleaned: {:?}", names(&d));
    assert_eq!(names(&d.join("out")), ["adapter_config.json", "adapter_model.safetensors", "merge_report.json"]);
}

/// `compare --out` will not overwrite a file without --force, checked before any work.
#[test]
fn compare_out_needs_force() {
    let d = scratch("gpt2", "compare");
    let mut args = merge_args(&d);
    args[0] = "compare".into();
    push(&mut args, &["--methods", "linear"]);
    std::fs::write(d.join("out"), "keep").unwrap();
    let r = run(&args);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    assert_eq!(std::fs::read(d.join("out")).unwrap(), b"keep");
    push(&mut args, &["--force"]);
    let r = run(&args);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(std::fs::read(d.join("out")).unwrap().starts_with(b"{"));
}
