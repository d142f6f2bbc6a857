//! A GPT-2-shaped model of 106M parameters (GPT-2 small's width: d = 768, 12 heads, 3072-wide MLP;
//! 15 layers; the GPT-2 fixture's 300-token tokenizer), random F16 weights, three random rank-8
//! `c_attn` adapters and 16 calibration samples each made from the fixture's words: the large model
//! of the browser test and of the wasm bench, made at test time and never committed.
//!
//!     cargo run --release --example make_model -- OUT_DIR [--layers N]
//!
//! Writes OUT_DIR/base (config.json, tokenizer.json, model.safetensors), OUT_DIR/adapter{0,1,2}
//! and OUT_DIR/samples{0,1,2}.txt. The same arguments always make the same files.

use iteris::formats::safetensors::write;
use iteris::mat::Mat;
use iteris::merge::baselines::SplitMix64;
use std::collections::BTreeMap;
use std::path::Path;

/// Box–Muller normals over the library's SplitMix64: deterministic.
struct Rng(SplitMix64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in (0, 1): never 0, for the logarithm.
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self, std: f32) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * std
    }
    fn mat(&mut self, rows: usize, cols: usize, std: f32) -> Mat {
        Mat::new(rows, cols, (0..rows * cols).map(|_| self.normal(std)).collect())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = Path::new(args.first().expect("usage: make_model OUT_DIR [--layers N]"));
    let layers: usize = args.iter().position(|a| a == "--layers").map_or(15, |i| args[i + 1].parse().unwrap());
    let (d, heads, vocab, positions, rank) = (768, 12, 300, 128, 8);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2");
    let mut rng = Rng(SplitMix64(2026));

    let base = out.join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(fixture.join("base/tokenizer.json"), base.join("tokenizer.json")).unwrap();
    let config = serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
        "n_embd": d, "n_head": heads, "n_layer": layers, "n_positions": positions, "n_inner": null,
        "vocab_size": vocab, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": true,
        "bos_token_id": 0, "eos_token_id": 0,
    });
    std::fs::write(base.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let mut w = BTreeMap::new();
    let t = |name: &str| format!("transformer.{name}");
    w.insert(t("wte.weight"), rng.mat(vocab, d, 0.02));
    w.insert(t("wpe.weight"), rng.mat(positions, d, 0.01));
    let ones = || Mat::new(1, d, vec![1.0; d]);
    let zeros = |n: usize| Mat::zeros(1, n);
    for i in 0..layers {
        let p = |s: &str| t(&format!("h.{i}.{s}"));
        w.insert(p("ln_1.weight"), ones());
        w.insert(p("ln_1.bias"), zeros(d));
        // Conv1D weights are stored (in, out).
        w.insert(p("attn.c_attn.weight"), rng.mat(d, 3 * d, 0.02));
        w.insert(p("attn.c_attn.bias"), zeros(3 * d));
        w.insert(p("attn.c_proj.weight"), rng.mat(d, d, 0.02 / (2.0 * layers as f32).sqrt()));
        w.insert(p("attn.c_proj.bias"), zeros(d));
        w.insert(p("ln_2.weight"), ones());
        w.insert(p("ln_2.bias"), zeros(d));
        w.insert(p("mlp.c_fc.weight"), rng.mat(d, 4 * d, 0.02));
        w.insert(p("mlp.c_fc.bias"), zeros(4 * d));
        w.insert(p("mlp.c_proj.weight"), rng.mat(4 * d, d, 0.02 / (2.0 * layers as f32).sqrt()));
        w.insert(p("mlp.c_proj.bias"), zeros(d));
    }
    w.insert(t("ln_f.weight"), ones());
    w.insert(t("ln_f.bias"), zeros(d));
    let params: usize = w.values().map(|m| m.data.len()).sum();
    std::fs::write(base.join("model.safetensors"), write(&w, true, None).unwrap()).unwrap();
    drop(w);

    let text = std::fs::read_to_string(fixture.join("samples0.txt")).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    for k in 0..3 {
        let dir = out.join(format!("adapter{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = BTreeMap::new();
        for i in 0..layers {
            let m = format!("base_model.model.transformer.h.{i}.attn.c_attn");
            a.insert(format!("{m}.lora_A.weight"), rng.mat(rank, d, 0.05));
            a.insert(format!("{m}.lora_B.weight"), rng.mat(3 * d, rank, 0.05));
        }
        std::fs::write(dir.join("adapter_model.safetensors"), write(&a, false, None).unwrap()).unwrap();
        let cfg = serde_json::json!({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["c_attn"],
            "fan_in_fan_out": true, "bias": "none", "use_rslora": false, "use_dora": false,
            "base_model_name_or_path": "make_model", "task_type": "CAUSAL_LM",
        });
        std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let samples: Vec<String> = (0..16)
            .map(|_| (0..10).map(|_| words[rng.next() as usize % words.len()]).collect::<Vec<_>>().join(" "))
            .collect();
        std::fs::write(out.join(format!("samples{k}.txt")), samples.join("\n") + "\n").unwrap();
    }
    println!("{}: {layers} layers, {:.1}M parameters", out.display(), params as f64 / 1e6);
}
