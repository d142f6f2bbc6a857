#![allow(dead_code)]
//! Shared test helpers: fixture paths, reading expected tensors, running merges.

pub mod hostile;
pub mod rng;

use iteris::backend::cpu::Cpu;
use iteris::formats::safetensors::TensorFile;
use iteris::fsio;
use iteris::inputs::{BaseInputs, TaskInput};
use iteris::mat::Mat;
use iteris::merge::{pipeline, Options};
use pollster::FutureExt;
use std::path::{Path, PathBuf};

pub const ARCHS: [&str; 10] =
    ["gpt2", "llama", "qwen2", "mistral", "qwen3", "smollm3", "gemma2", "gemma3", "phi3", "bert"];

pub fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(arch)
}

pub fn samples_path(arch: &str, i: usize) -> PathBuf {
    let d = fixture(arch);
    let txt = d.join(format!("samples{i}.txt"));
    if txt.exists() {
        txt
    } else {
        d.join(format!("samples{i}.jsonl"))
    }
}

pub fn tasks(arch: &str) -> Vec<TaskInput> {
    (0..3)
        .map(|i| fsio::read_task(&fixture(arch).join(format!("adapter{i}")), &samples_path(arch, i)).unwrap())
        .collect()
}

pub fn expected(arch: &str, file: &str) -> TensorFile {
    let p = fixture(arch).join(file);
    TensorFile::parse(p.display().to_string(), std::fs::read(&p).unwrap()).unwrap()
}

pub fn base(arch: &str) -> BaseInputs {
    fsio::read_base(&fixture(arch).join("base")).unwrap()
}

/// Merge `arch`'s three fixture adapters onto `base` with backend `be`.
pub fn merge_on<B: iteris::backend::Backward + 'static>(
    be: &B,
    base: &BaseInputs,
    arch: &str,
    opts: &Options,
) -> pipeline::MergeResult {
    pipeline::merge(be, base, &tasks(arch), opts, &mut |_| {}).block_on().unwrap()
}

/// Merge `arch`'s fixture on the CPU.
pub fn merge(arch: &str, opts: &Options) -> pipeline::MergeResult {
    merge_on(&Cpu, &base(arch), arch, opts)
}

pub fn rel(a: &Mat, b: &Mat) -> f64 {
    assert_eq!(a.shape(), b.shape());
    iteris::mat::rel_err(&a.data, &b.data)
}

/// Whether a test that needs `what` (a GPU adapter, Chromium) must fail without it: `.ci/run`
/// sets ITERIS_REQUIRE_ALL=1; elsewhere such a test says plainly that it skipped.
pub fn skip_without(test: &str, what: &str, why: impl std::fmt::Display) {
    if std::env::var_os("ITERIS_REQUIRE_ALL").is_some() {
        panic!("{test}: no {what} ({why}), and ITERIS_REQUIRE_ALL is set; tools/setup.sh installs it");
    }
    eprintln!("SKIPPED {test}: no {what} ({why}); tools/setup.sh installs it");
}

/// A GPU adapter for `test`, or None after saying that it skipped (see `skip_without`).
pub fn gpu_or_skip(test: &str) -> Option<iteris::backend::gpu::Gpu> {
    match iteris::backend::gpu::Gpu::new() {
        Ok(g) => Some(g),
        Err(e) => {
            skip_without(test, "GPU adapter (Mesa lavapipe will do)", e);
            None
        }
    }
}

/// A fresh empty folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("iteris-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The f64 host matrix of a backend's Gram.
pub fn gram_of<B: iteris::backend::Backend>(be: &B, x: &B::T, rows: std::ops::Range<usize>) -> nalgebra::DMatrix<f64> {
    iteris::merge::solve::host(&be.gram(x, rows.clone(), x, rows).block_on().unwrap())
}

/// A system of known statistics: per task its Gram (also its cross term, as where X̃ = X) and a
/// constant weight.
pub fn known_system<'a>(
    terms: &[(&'a nalgebra::DMatrix<f64>, f64)],
    alpha1: f64,
    alpha2: f64,
) -> iteris::backend::SystemSpec<f64, &'a nalgebra::DMatrix<f64>> {
    use iteris::backend::{Cross, SystemSpec, SystemTerm, Weight};
    SystemSpec {
        terms: terms
            .iter()
            .map(|&(g, c)| SystemTerm { gram: g, cross: Cross::Full(g), weight: Weight::constant(c) })
            .collect(),
        alpha1,
        alpha2,
        off_diagonal: 1.0,
    }
}

/// Greedy decoding's passes on `arch`'s fixture, with and without a KV cache: three prompts of
/// different lengths (one longer than Mistral's window of 6), then three new tokens one pass each,
/// under adapter 0's deltas. Returns the largest relative difference between a cached pass's
/// last-token logits and the logits of rerunning every sequence whole.
pub fn cached_decoding_error<B: iteris::backend::Backend>(be: &B, arch: &str) -> f64 {
    use iteris::merge::evaluate::DeltaHook;
    use iteris::models::{self, Batch, KvCache, Output, Stream};
    let base = base(arch);
    let model = models::load(be, &base.config, &base.weights).unwrap();
    let tasks = tasks(arch);
    let adapters: Vec<_> = tasks.iter().map(|t| &t.adapter).collect();
    let targets = iteris::merge::map_targets(&model.modules(), &adapters, model.model_type(), true).unwrap();
    let mut hook = DeltaHook::new(be, &targets, None);
    let mut seqs: Vec<Vec<u32>> = ["a b c", "hello there, general kenobi, you are a bold one", "x"]
        .iter()
        .map(|t| base.tokenizer.encode(t, 32).unwrap().ids)
        .collect();
    let mut cache = KvCache::new(seqs.len(), 64);
    let mut held = vec![0; seqs.len()];
    let mut worst = 0.0f64;
    for step in 0..4 {
        let slots: Vec<usize> = (0..seqs.len()).collect();
        for (s, seq) in seqs.iter().enumerate() {
            if model.cache_stale(held[s], seq.len()) {
                eprintln!(
                    "{arch} step {step}: sequence {s} reaches past longrope's original context and runs whole again"
                );
                cache.clear(s);
                held[s] = 0;
            }
        }
        let parts: Vec<Vec<u32>> = seqs.iter().zip(&held).map(|(s, &h)| s[h..].to_vec()).collect();
        let mut batch = Batch::default();
        batch.push_continuations(0, Stream::Adapter(0), &parts, &held);
        cache.begin(&batch, &slots);
        let cached = models::run_cached(&model, be, &batch, &mut hook, Output::LastLogits, Some(&mut cache))
            .block_on()
            .unwrap()
            .unwrap();
        let mut whole = Batch::default();
        whole.push_group(0, Stream::Adapter(0), &seqs);
        let full = models::run(&model, be, &whole, &mut hook, Output::LastLogits).block_on().unwrap().unwrap();
        let (c, f) = (be.download(&cached).block_on().unwrap(), be.download(&full).block_on().unwrap());
        let e = iteris::mat::rel_err(&c.data, &f.data);
        eprintln!("{arch} step {step}: cached vs recomputed logits {e:.2e}");
        worst = worst.max(e);
        for (k, s) in seqs.iter_mut().enumerate() {
            held[k] = s.len();
            // Tokens of the base's vocabulary, different per sequence and step.
            s.push(((7 + 13 * k + 5 * step) % 50) as u32);
        }
    }
    worst
}

/// Applies one adapter's deltas and records every stage input by module name.
pub struct Recorder<T> {
    pub loras: std::collections::BTreeMap<String, (T, T, f32)>,
    pub seen: std::collections::BTreeMap<String, Mat>,
}

impl<T> Recorder<T> {
    /// A recorder that applies `adapter` (mapped onto `model`'s modules).
    pub fn for_adapter<B: iteris::backend::Backend<T = T>>(
        be: &B,
        model: &iteris::models::Model<T>,
        adapter: &iteris::formats::peft::Adapter,
    ) -> Recorder<T> {
        let targets =
            iteris::merge::map_targets(&model.modules(), &[adapter], model.model_type(), model.fan_in_fan_out())
                .unwrap();
        let loras = targets.iter().map(|t| {
            let l = t.loras[0].as_ref().unwrap();
            (t.name.clone(), (be.upload(&l.a), be.upload(&l.b), l.scale))
        });
        Recorder { loras: loras.collect(), seen: Default::default() }
    }
}

impl<B: iteris::backend::Backend> iteris::models::Hook<B> for Recorder<B::T> {
    async fn stage(
        &mut self,
        be: &B,
        input: &iteris::models::StageInput<'_, B>,
        ys: &mut [B::T],
    ) -> iteris::Result<()> {
        let n = be.dims(input.x).0;
        for (m, y) in input.mods.iter().zip(ys.iter_mut()) {
            self.seen.insert(m.name.to_string(), be.download(input.x).await?);
            if let Some((a, b, s)) = self.loras.get(m.name) {
                let d = be.lowrank(input.x, 0..n, a, b, *s);
                be.add_rows(y, 0..n, &d, 1.0);
            }
        }
        Ok(())
    }
}

/// The bundled demo's tasks, in the order of its folders.
pub const DEMO_TASKS: [&str; 4] = ["add", "kind", "rev", "sort"];

/// The bundled demo (demo/, made by tools/make_demo.py).
pub fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("demo")
}

/// The demo's tasks: each adapter with its calibration prompts and labeled held-out set.
pub fn demo_tasks() -> Vec<TaskInput> {
    DEMO_TASKS
        .iter()
        .map(|t| {
            let d = demo();
            let mut task =
                fsio::read_task(&d.join("adapters").join(t), &d.join("samples").join(format!("{t}.txt"))).unwrap();
            task.eval = Some(fsio::read_eval(&d.join("eval").join(format!("{t}.jsonl"))).unwrap());
            task
        })
        .collect()
}
