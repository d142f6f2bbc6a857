//! The page, end to end, in headless Chromium: builds dist/ (tools/build_web.sh), drives the page
//! with tests/browser/e2e.mjs (demo, WebGPU and CPU merges through the file inputs, a corrupt file,
//! every request to the page's own origin), then checks that each adapter the page downloaded
//! equals the CLI's for the same inputs. Screenshots and downloads are kept in target/browser/.
//! Needs what tools/setup.sh installs (Chromium, Node packages, the wasm-bindgen CLI).

mod common;

use common::{fixture, samples_path};
use iteris::fsio;
use iteris::merge::solve::to_f64;
use nalgebra::DMatrix;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The page's merge of the 106M-parameter model equals the CLI's, and its peak WebAssembly memory
/// is the merge's memory plan within 15%: the weights are read a tensor at a time, never held twice.
fn check_big_model(out: &Path, big: &Path) {
    let cli = out.join("cli-big");
    let tasks: Vec<(PathBuf, PathBuf)> =
        (0..3).map(|i| (big.join(format!("adapter{i}")), big.join(format!("samples{i}.txt")))).collect();
    cli_merge_of(&cli, &big.join("base"), &tasks, &PUBLISHED);
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    // The threaded engine (every core) and the single-thread one give the same merge.
    let single = unzip(&out.join("big-1thread.zip"), &out.join("big-page-1thread"));
    let e1 = max_rel_diff(&single, &cli);
    let (threaded, one) = (&summary["runs"]["big"], &summary["runs"]["big-1thread"]);
    println!(
        "106M model in the page (CPU path): {:.1} s on {} threads, {:.1} s on {} (single-thread engine, {e1:.2e} from the CLI)",
        threaded["seconds"].as_f64().unwrap(),
        threaded["threads"],
        one["seconds"].as_f64().unwrap(),
        one["threads"]
    );
    assert!(e1 <= 1e-4, "106M model, one thread: the page's adapter differs from the CLI's by {e1:.2e}");
    assert_eq!(one["threads"].as_u64(), Some(1), "?threads=1 runs the single-thread engine");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        assert!(threaded["threads"].as_u64() > Some(1), "an isolated page on several cores runs the threaded engine");
        // Where the browser has relaxed SIMD the page runs that build; ?relaxed=0 runs the other,
        // and both give the CLI's merge.
        let strict = &summary["runs"]["big-no-relaxed"];
        let want = if threaded["relaxedSimd"].as_bool() == Some(true) { "pkg-threads-relaxed" } else { "pkg-threads" };
        assert_eq!(threaded["engine"].as_str(), Some(want), "the threaded engine for this browser");
        assert_eq!(
            strict["engine"].as_str(),
            Some("pkg-threads"),
            "?relaxed=0 runs the threaded engine without relaxed SIMD"
        );
        let e = max_rel_diff(&unzip(&out.join("big-no-relaxed.zip"), &out.join("big-page-no-relaxed")), &cli);
        println!(
            "106M model, threaded engine without relaxed SIMD: {:.1} s, {e:.2e} from the CLI",
            strict["seconds"].as_f64().unwrap()
        );
        assert!(e <= 1e-4, "106M model, ?relaxed=0: the page's adapter differs from the CLI's by {e:.2e}");
    }
    let dir = unzip(&out.join("big.zip"), &out.join("big-page"));
    let e = max_rel_diff(&dir, &cli);
    let run = threaded;
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("merge_report.json")).unwrap()).unwrap();
    let plan = &report["memory_plan"];
    let (peak, planned, weights) = (
        run["wasmMemoryBytes"].as_f64().unwrap(),
        plan["host_bytes"].as_f64().unwrap(),
        plan["weights_bytes"].as_f64().unwrap(),
    );
    let mib = |b: f64| b / (1u64 << 20) as f64;
    println!(
        "106M model in the page (CPU path): {:.1} s, worst module difference from the CLI {e:.2e}; peak wasm memory {:.0} MiB, plan {:.0} MiB (weights {:.0} MiB as f32)",
        run["seconds"].as_f64().unwrap(),
        mib(peak),
        mib(planned),
        mib(weights)
    );
    assert!(e <= 1e-4, "106M model: the page's adapter differs from the CLI's by {e:.2e}");
    // The plan bounds the peak within 15% either way: an under-count lets a tab die instead of
    // a clear refusal, an over-count refuses merges that fit (tests/memory.rs does the same for
    // the CLI, phase by phase).
    assert!(
        (0.85..=1.15).contains(&(planned / peak)),
        "106M model: peak wasm memory {:.0} MiB, the plan said {:.0} MiB",
        mib(peak),
        mib(planned)
    );
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.current_dir(root()).status().unwrap_or_else(|e| panic!("{what}: cannot start ({e})"));
    assert!(status.success(), "{what} failed ({status}); tools/setup.sh installs what the browser tests need");
}

/// The CLI's merge of the GPT-2 fixture (or, with `demo`, of the bundled demo) into `out`.
fn cli_merge(out: &Path, demo: bool, extra: &[&str]) {
    let (base, tasks): (PathBuf, Vec<(PathBuf, PathBuf)>) = if demo {
        let d = root().join("demo");
        let tasks = ["add", "kind", "rev", "sort"]
            .iter()
            .map(|t| (d.join("adapters").join(t), d.join("samples").join(format!("{t}.txt"))))
            .collect();
        (d.join("base"), tasks)
    } else {
        let tasks = (0..3).map(|i| (fixture("gpt2").join(format!("adapter{i}")), samples_path("gpt2", i))).collect();
        (fixture("gpt2").join("base"), tasks)
    };
    cli_merge_of(out, &base, &tasks, extra);
}

/// IterIS as published: the page's fixture merges turn self-calibration and balancing off and
/// take the delta objective (as e2e.mjs's `published` does), since a greedy token or a balancing
/// round chosen on a near tie could differ between the page's backends and the CLI's (and the
/// delta objective whatever the defaults become); the demo's merge keeps the defaults.
const PUBLISHED: [&str; 6] = ["--balance", "off", "--self-calibrate", "0", "--objective", "delta"];

/// `iteris merge --backend cpu` of `base` with (adapter, samples) `tasks` into `out`.
fn cli_merge_of(out: &Path, base: &Path, tasks: &[(PathBuf, PathBuf)], extra: &[&str]) {
    let mut args: Vec<String> = vec!["merge".into(), "--backend".into(), "cpu".into(), "--force".into()];
    args.extend(["--base".into(), base.display().to_string()]);
    for (adapter, samples) in tasks {
        args.extend(["--adapter".into(), adapter.display().to_string()]);
        args.extend(["--samples".into(), samples.display().to_string()]);
    }
    args.extend(["--out".into(), out.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    run(Command::new(env!("CARGO_BIN_EXE_iteris")).args(&args), "iteris merge");
}

/// The page's extra outputs (llama.cpp LoRA, dense model, mlx-lm files) against the CLI's.
fn check_formats(out: &Path) {
    let cli = out.join("cli-qwen2-formats");
    cli_merge_of(
        &cli,
        &fixture("qwen2").join("base"),
        &(0..3).map(|i| (fixture("qwen2").join(format!("adapter{i}")), samples_path("qwen2", i))).collect::<Vec<_>>(),
        &[&PUBLISHED[..], &["--gguf", "--dense", "--mlx"]].concat(),
    );
    let page = unzip(&out.join("qwen2-formats.zip"), &out.join("qwen2-formats"));
    for f in ["adapter.gguf", "dense/config.json", "dense/tokenizer.json", "mlx/adapters.safetensors"] {
        let (p, c) = (std::fs::read(page.join(f)).unwrap(), std::fs::read(cli.join(f)).unwrap());
        assert_eq!(p.len(), c.len(), "{f}: the page's and the CLI's differ in size");
    }
    let read = |d: &Path| {
        let bytes = std::fs::read(d.join("dense/model.safetensors")).unwrap();
        iteris::formats::safetensors::TensorFile::parse("model.safetensors", bytes).unwrap()
    };
    let (p, c) = (read(&page), read(&cli));
    let mut worst = 0f64;
    for k in c.keys() {
        let (a, b) = (p.mat(k).unwrap(), c.mat(k).unwrap());
        let diff: f64 = a.data.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = b.data.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(diff / norm.max(1e-30));
    }
    println!("qwen2-formats: adapter.gguf, dense/ and mlx/ present; dense model within {worst:.1e} of the CLI's");
    // The page computes in wasm's f32, the CLI natively: the same last-bit differences as the
    // adapters' (measured 2.0e-6).
    assert!(worst <= 1e-5, "the page's dense model differs from the CLI's by {worst:.2e}");
}

/// Unpack the page's zip (a `merged_adapter/` folder) into `dir`.
fn unzip(zip: &Path, dir: &Path) -> PathBuf {
    let mut z = zip::ZipArchive::new(std::fs::File::open(zip).unwrap()).unwrap();
    z.extract(dir).unwrap();
    dir.join("merged_adapter")
}

/// Each module's dense ΔW = s·B·A.
fn deltas(dir: &Path) -> BTreeMap<String, DMatrix<f64>> {
    let a = fsio::read_adapter(dir).unwrap();
    a.modules.iter().map(|m| (m.path.clone(), to_f64(&m.b) * to_f64(&m.a) * m.scale as f64)).collect()
}

fn max_rel_diff(page: &Path, cli: &Path) -> f64 {
    let (p, c) = (deltas(page), deltas(cli));
    assert_eq!(p.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>(), "same modules");
    p.iter().map(|(k, d)| (d - &c[k]).norm() / c[k].norm()).fold(0.0, f64::max)
}

/// The hostile-input cases that apply to the page, materialised for e2e.mjs; returns how many.
fn write_hostile_manifest(out: &Path) -> usize {
    use common::hostile::*;
    let mut manifest = Vec::new();
    for (k, case) in cases().iter().enumerate().filter(|(_, c)| c.page) {
        let d = scratch(case.arch, &format!("page-{k}"));
        let mut args = merge_args(&d);
        (case.setup)(&d, &mut args);
        manifest.push(page_case(case, &d, &args));
    }
    std::fs::write(out.join("hostile-manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    manifest.len()
}

/// Each page case was refused as an input problem (never a trap or a result), with a message that
/// names what the CLI's does.
fn check_hostile_results(out: &Path, cases: usize) {
    let results: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("hostile-results.json")).unwrap()).unwrap();
    assert_eq!(results.len(), cases, "every page case ran");
    let mut failures = Vec::new();
    for r in &results {
        let (name, message) = (r["name"].as_str().unwrap(), r["message"].as_str().unwrap_or(""));
        let kind = r["kind"].as_str().unwrap_or("");
        let mut problems = Vec::new();
        if r["type"] != "error" || !["input", "unsupported", "numeric"].contains(&kind) {
            problems.push(format!("{} of kind '{kind}'", r["type"]));
        }
        for w in r["words"].as_array().unwrap() {
            if !message.contains(w.as_str().unwrap()) {
                problems.push(format!("the message does not mention {w}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {} ({message})", problems.join("; ")));
        }
    }
    println!("hostile inputs through the page: {} cases, {} failed", results.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn page_merges_like_the_cli() {
    // build_web.sh installs the page's build tools itself; the browser comes from tools/setup.sh.
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        common::skip_without("page_merges_like_the_cli", "Chromium", format!("{chromium} is missing"));
        return;
    }
    run(Command::new("bash").arg("tools/build_web.sh"), "tools/build_web.sh");
    let out = root().join("target/browser");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let page_cases = write_hostile_manifest(&out);
    // The 106M-parameter model the page merges on its CPU path (made here, never committed).
    let big = out.join("big");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    run(
        Command::new(cargo).args(["run", "--release", "--quiet", "--example", "make_model", "--"]).arg(&big),
        "tools/make_model.rs",
    );
    run(Command::new("node").arg("tests/browser/e2e.mjs").arg(&out), "the browser tests (tests/browser/e2e.mjs)");
    check_hostile_results(&out, page_cases);
    check_big_model(&out, &big);

    let (sweep, jacobi, demo) = (out.join("cli-sweep"), out.join("cli-jacobi"), out.join("cli-demo"));
    cli_merge(&sweep, false, &PUBLISHED);
    cli_merge(&jacobi, false, &[&PUBLISHED[..], &["--schedule", "jacobi", "--iters", "4"]].concat());
    cli_merge(&demo, true, &[]);
    // Measured 2.5e-6 (demo), 3.4e-6 (WebGPU on SwiftShader), 3.35e-6 (CPU, both schedules):
    // wasm's f32 arithmetic and SwiftShader differ from the native build in the last bits.
    let family = |arch: &str| {
        let d = out.join(format!("cli-{arch}"));
        let tasks: Vec<_> =
            (0..3).map(|i| (fixture(arch).join(format!("adapter{i}")), samples_path(arch, i))).collect();
        cli_merge_of(&d, &fixture(arch).join("base"), &tasks, &PUBLISHED);
        d
    };
    let (gemma3, phi3) = (family("gemma3"), family("phi3"));
    check_formats(&out);
    // The page's merge on a dropped GGUF base against the CLI's on the same file.
    let gguf = out.join("cli-gguf-base");
    let llama_tasks: Vec<_> =
        (0..3).map(|i| (fixture("llama").join(format!("adapter{i}")), samples_path("llama", i))).collect();
    cli_merge_of(&gguf, &root().join("tests/fixtures/gguf/llama.gguf"), &llama_tasks, &PUBLISHED);
    for (zip, cli, tol) in [
        ("demo", &demo, 1e-5),
        ("offline", &demo, 1e-5),
        ("gpu", &sweep, 1e-5),
        ("cpu", &sweep, 1e-5),
        ("cpu-jacobi", &jacobi, 1e-5),
        ("gemma3-gpu", &gemma3, 1e-5),
        ("gemma3-cpu", &gemma3, 1e-5),
        ("phi3-cpu", &phi3, 1e-5),
        ("gguf-base", &gguf, 1e-5),
    ] {
        let dir = unzip(&out.join(format!("{zip}.zip")), &out.join(zip));
        let e = max_rel_diff(&dir, cli);
        println!("{zip}: worst module relative difference from the CLI: {e:.2e}");
        assert!(e <= tol, "{zip}: the page's adapter differs from the CLI's by {e:.2e}");
        let same_config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
        let cli_config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cli.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(same_config, cli_config, "{zip}: adapter_config.json");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("merge_report.json")).unwrap()).unwrap();
        let tasks = if zip == "demo" || zip == "offline" { 4 } else { 3 };
        assert_eq!(report["tasks"].as_array().unwrap().len(), tasks, "{zip}: merge_report.json is complete");
    }
    assert!(out.join("results.png").exists(), "a screenshot of the results view is kept");
}
