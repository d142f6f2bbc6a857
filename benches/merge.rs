//! Whole-merge benchmark on the GPT-2-small shape that the PyTorch reference
//! (tools/bench_reference.py) also runs: random weights, d=768, 12 layers, LoRA r=8 on c_attn,
//! 3 tasks × 32 samples × 128 tokens.
//!
//!     cargo bench --bench merge [-- sweep|jacobi5|sweep-output ...] [-- gpu] [-- f16]
//!
//! sweep and jacobi5 are the published (delta) objective, sweep-output the output objective on
//! the same modules.
//!
//! Prints wall time, GFLOP/s and the cores kept busy per schedule, and (CPU backend) the same per
//! phase (`iteris::profile`), on the CPU backend (default) or the GPU backend (`gpu`; on a
//! software Vulkan driver this shape takes hours). Compare with `python3 tools/bench_reference.py` (PyTorch, same work).

use iteris::backend::{cpu::Cpu, gpu::Gpu, Backward};
use iteris::formats::hf_config::HfConfig;
use iteris::formats::peft::LoraModule;
use iteris::formats::safetensors::{write, TensorFile, TensorStore};
use iteris::mat::Mat;
use iteris::merge::iteris::Target;
use iteris::merge::{iteris as run_iteris, Options, Schedule};
use iteris::models;
use std::collections::BTreeMap;
use std::time::Instant;

#[path = "../tests/common/rng.rs"]
#[allow(dead_code)]
mod rng;
use rng::Rng;

const D: usize = 768;
const LAYERS: usize = 12;
const VOCAB: usize = 50257;
const POS: usize = 1024;
const R: usize = 8;
const TASKS: usize = 3;
const SAMPLES: usize = 32;
const TOKENS: usize = 128;

fn main() {
    iteris::backend::cpu::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let which: Vec<String> = args.iter().filter(|a| *a != "gpu" && *a != "f16").cloned().collect();
    // `f16`: the checkpoint stores its weights in half precision (kept packed by both backends).
    let f16 = args.iter().any(|a| a == "f16");
    if args.iter().any(|a| a == "gpu") {
        let g = Gpu::new().expect("a GPU adapter");
        let label = format!("gpu ({})", g.info.name);
        run(&g, &label, &which, f16);
    } else {
        run(&Cpu, if f16 { "cpu f16" } else { "cpu" }, &which, f16);
    }
}

fn run<B: Backward + 'static>(be: &B, backend: &str, which: &[String], f16: bool) {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut w = BTreeMap::new();
    w.insert("wte.weight".to_string(), rng.scaled(VOCAB, D, 0.05));
    w.insert("wpe.weight".to_string(), rng.scaled(POS, D, 0.02));
    for l in 0..LAYERS {
        let p = format!("h.{l}");
        for (n, r, c) in
            [("attn.c_attn", D, 3 * D), ("attn.c_proj", D, D), ("mlp.c_fc", D, 4 * D), ("mlp.c_proj", 4 * D, D)]
        {
            w.insert(format!("{p}.{n}.weight"), rng.scaled(r, c, 0.04));
            w.insert(format!("{p}.{n}.bias"), rng.scaled(1, c, 0.02));
        }
        for n in ["ln_1", "ln_2"] {
            w.insert(format!("{p}.{n}.weight"), Mat::new(1, D, vec![1.0; D]));
            w.insert(format!("{p}.{n}.bias"), Mat::zeros(1, D));
        }
    }
    w.insert("ln_f.weight".into(), Mat::new(1, D, vec![1.0; D]));
    w.insert("ln_f.bias".into(), Mat::zeros(1, D));
    let store = TensorStore::new(vec![TensorFile::parse("bench", write(&w, f16, None).unwrap()).unwrap()]).unwrap();
    drop(w);
    let cfg = HfConfig::parse("config.json", format!(r#"{{"model_type":"gpt2","n_embd":{D},"n_head":12,"n_layer":{LAYERS},"vocab_size":{VOCAB},"n_positions":{POS}}}"#).as_bytes()).unwrap();
    let model = models::load(be, &cfg, &store).unwrap();

    let targets = || -> Vec<Target> {
        let mut rng = Rng(7);
        (0..LAYERS)
            .map(|l| Target {
                name: format!("h.{l}.attn.c_attn"),
                path: format!("transformer.h.{l}.attn.c_attn"),
                out_dim: 3 * D,
                in_dim: D,
                loras: (0..TASKS)
                    .map(|_| {
                        Some(LoraModule {
                            path: String::new(),
                            a: rng.scaled(R, D, 0.05),
                            b: rng.scaled(3 * D, R, 0.05),
                            scale: 2.0,
                        })
                    })
                    .collect(),
            })
            .collect()
    };
    let mut rng = Rng(11);
    let ids: Vec<Vec<Vec<u32>>> = (0..TASKS)
        .map(|_| (0..SAMPLES).map(|_| (0..TOKENS).map(|_| rng.below(VOCAB) as u32).collect()).collect())
        .collect();

    for (label, opts) in [
        // The published objective (what the PyTorch reference computes), then the default one.
        ("sweep", Options { schedule: Schedule::Sweep, ..Options::default().delta_objective() }),
        ("jacobi5", Options { schedule: Schedule::Jacobi, iters: 5, ..Options::default().delta_objective() }),
        (
            "sweep-output",
            Options { schedule: Schedule::Sweep, objective: iteris::merge::Objective::Output, ..Options::default() },
        ),
    ] {
        if !which.is_empty() && !which.iter().any(|w| w == label) {
            continue;
        }
        iteris::profile::enable();
        let (t, cpu0) = (Instant::now(), iteris::profile::clocks().map(|c| c.1));
        let out = pollster::block_on(run_iteris(be, &model, targets(), &ids, &opts, &mut |_| {})).unwrap();
        let wall = t.elapsed().as_secs_f64();
        let cpu = iteris::profile::clocks().zip(cpu0).map(|(c1, c0)| c1.1 - c0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let phases = iteris::profile::phases();
        let flops: f64 = phases.iter().map(|p| p.flops).sum();
        let busy = cpu.map_or(String::new(), |c| {
            format!(", {:.2} of {cores} cores busy ({:.0}%)", c / wall, 100.0 * c / wall / cores as f64)
        });
        println!(
            "{backend} {label:8} GPT-2-small shape (d={D}, {LAYERS} layers, r={R} on c_attn, {TASKS}x{SAMPLES}x{TOKENS} tokens): {wall:.2} s, {} modules, {:.1} GFLOP/s{busy}",
            out.merged.len(),
            flops / wall / 1e9
        );
        if let Some(cpu) = cpu.filter(|_| !phases.is_empty()) {
            print!("{}", iteris::profile::table(&phases, wall, cpu));
        }
    }
}
