//! Models of real shapes with random weights, for the tests and benches that need a large model:
//! made at test or bench time and never committed. Shapes (`--shape`):
//! - `gpt2` (default): GPT-2 small's width (d = 768, 12 heads, 3072-wide MLP), 15 layers, 106M
//!   parameters, F16; three rank-8 `c_attn` adapters; 16 samples each. The large model of the
//!   browser test and of the wasm bench.
//! - `smollm2`: SmolLM2-135M's shape (Llama, d = 576, 30 layers, 9 heads of 64 over 3 KV heads,
//!   1536-wide MLP, 49,152-token vocabulary, tied embeddings), F32 like the published file (538 MB);
//!   three rank-8 q/v adapters; 20 samples each.
//! - `llama1b`: Llama-3.2-1B's shape (d = 2048, 16 layers, 32 heads over 8 KV heads, 8192-wide
//!   MLP, 128,256-token vocabulary, tied embeddings, llama3 rope scaling), BF16 like the published
//!   file (2.5 GB); three rank-8 q/v adapters; 20 samples each.
//!
//!     cargo run --release --example make_model -- OUT_DIR [--shape gpt2|smollm2|llama1b] [--layers N]
//!
//! Writes OUT_DIR/base (config.json, tokenizer.json, model.safetensors), OUT_DIR/adapter{0,1,2},
//! OUT_DIR/samples{0,1,2}.txt and OUT_DIR/eval{0,1,2}.jsonl (20 held-out prompts with answers).
//! The same arguments always make the same files.
//!
//! Every shape uses the GPT-2 fixture's 300-token tokenizer. Where the model's vocabulary is
//! larger, the embedding rows past 300 are zero (the head is tied to them): their logits are 0,
//! below the best of 300 random ones, so greedy decoding stays within the tokenizer's words while
//! every (rows, vocab) table is the real model's size.

use half::{bf16, f16};
use iteris::merge::baselines::SplitMix64;
use safetensors::{tensor::TensorView, Dtype};
use serde_json::json;
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
    fn values(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(std)).collect()
    }
}

/// Tensors to write, in a file precision, each stored as its bytes as soon as it is made (a 1B
/// model is never held in f32).
struct Tensors {
    dtype: Dtype,
    map: BTreeMap<String, (Vec<usize>, Vec<u8>)>,
    params: usize,
}

impl Tensors {
    fn new(dtype: Dtype) -> Self {
        Tensors { dtype, map: BTreeMap::new(), params: 0 }
    }
    fn put(&mut self, name: String, shape: &[usize], data: Vec<f32>) {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        let bytes: Vec<u8> = match self.dtype {
            Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            Dtype::BF16 => data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
            d => panic!("make_model writes F32, F16 or BF16, not {d:?}"),
        };
        self.params += data.len();
        self.map.insert(name, (shape.to_vec(), bytes));
    }
    fn write(&self, path: &Path) {
        let views = self.map.iter().map(|(k, (s, b))| (k.clone(), TensorView::new(self.dtype, s.clone(), b).unwrap()));
        safetensors::serialize_to_file(views, None, path).unwrap();
    }
}

/// What the adapters and samples need of a model.
struct Shape {
    d: usize,
    layers: usize,
    samples: usize,
}

const TOKENIZER_VOCAB: usize = 300;
const RANK: usize = 8;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: make_model OUT_DIR [--shape gpt2|smollm2|llama1b] [--layers N]";
    let out = Path::new(args.first().expect(usage));
    let flag = |f: &str| args.iter().position(|a| a == f).map(|i| args[i + 1].clone());
    let shape = flag("--shape").unwrap_or_else(|| "gpt2".into());
    let layers: Option<usize> = flag("--layers").map(|l| l.parse().expect(usage));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2");
    let mut rng = Rng(SplitMix64(2026));
    let base = out.join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(fixture.join("base/tokenizer.json"), base.join("tokenizer.json")).unwrap();

    let (s, adapter) = match shape.as_str() {
        "gpt2" => gpt2(&base, layers.unwrap_or(15), &mut rng),
        "smollm2" => llama(&base, LlamaShape::SMOLLM2, layers, &mut rng),
        "llama1b" => llama(&base, LlamaShape::LLAMA_1B, layers, &mut rng),
        other => panic!("unknown shape '{other}'; {usage}"),
    };

    let text = std::fs::read_to_string(fixture.join("samples0.txt")).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    let sentence = |rng: &mut Rng, n: usize| {
        (0..n).map(|_| words[rng.next() as usize % words.len()]).collect::<Vec<_>>().join(" ")
    };
    for k in 0..3 {
        let dir = out.join(format!("adapter{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = Tensors::new(Dtype::F32);
        for i in 0..s.layers {
            for (module, out_dim) in &adapter.modules {
                let m =
                    format!("base_model.model.{}", adapter.path.replace("{i}", &i.to_string()).replace("{m}", module));
                a.put(format!("{m}.lora_A.weight"), &[RANK, s.d], rng.values(RANK * s.d, 0.05));
                a.put(format!("{m}.lora_B.weight"), &[*out_dim, RANK], rng.values(out_dim * RANK, 0.05));
            }
        }
        a.write(&dir.join("adapter_model.safetensors"));
        let names: Vec<&str> = adapter.modules.iter().map(|(m, _)| *m).collect();
        let cfg = json!({
            "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": names,
            "fan_in_fan_out": adapter.fan_in_fan_out, "bias": "none", "use_rslora": false, "use_dora": false,
            "base_model_name_or_path": "make_model", "task_type": "CAUSAL_LM",
        });
        std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let samples: Vec<String> = (0..s.samples).map(|_| sentence(&mut rng, 10)).collect();
        std::fs::write(out.join(format!("samples{k}.txt")), samples.join("\n") + "\n").unwrap();
    }
    // Held-out prompts and answers (drawn after everything else, so the models and samples of
    // earlier versions of this tool are unchanged).
    for k in 0..3 {
        let eval: Vec<String> = (0..20)
            .map(|_| {
                json!({"prompt": sentence(&mut rng, 8) + " >", "answer": " ".to_string() + &sentence(&mut rng, 1)})
                    .to_string()
            })
            .collect();
        std::fs::write(out.join(format!("eval{k}.jsonl")), eval.join("\n") + "\n").unwrap();
    }
    println!("{}: {shape}, {} layers, {:.1}M parameters", out.display(), s.layers, adapter.params as f64 / 1e6);
}

/// Where the adapters go: a module path with `{i}` (layer) and `{m}` (module), and each module's
/// output width.
struct Adapter {
    path: &'static str,
    modules: Vec<(&'static str, usize)>,
    fan_in_fan_out: bool,
    params: usize,
}

fn gpt2(base: &Path, layers: usize, rng: &mut Rng) -> (Shape, Adapter) {
    let (d, heads, vocab, positions) = (768, 12, TOKENIZER_VOCAB, 128);
    let config = json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
        "n_embd": d, "n_head": heads, "n_layer": layers, "n_positions": positions, "n_inner": null,
        "vocab_size": vocab, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": true,
        "bos_token_id": 0, "eos_token_id": 0,
    });
    std::fs::write(base.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut w = Tensors::new(Dtype::F16);
    let t = |name: &str| format!("transformer.{name}");
    w.put(t("wte.weight"), &[vocab, d], rng.values(vocab * d, 0.02));
    w.put(t("wpe.weight"), &[positions, d], rng.values(positions * d, 0.01));
    let out_std = 0.02 / (2.0 * layers as f32).sqrt();
    for i in 0..layers {
        let p = |s: &str| t(&format!("h.{i}.{s}"));
        w.put(p("ln_1.weight"), &[d], vec![1.0; d]);
        w.put(p("ln_1.bias"), &[d], vec![0.0; d]);
        // Conv1D weights are stored (in, out).
        w.put(p("attn.c_attn.weight"), &[d, 3 * d], rng.values(3 * d * d, 0.02));
        w.put(p("attn.c_attn.bias"), &[3 * d], vec![0.0; 3 * d]);
        w.put(p("attn.c_proj.weight"), &[d, d], rng.values(d * d, out_std));
        w.put(p("attn.c_proj.bias"), &[d], vec![0.0; d]);
        w.put(p("ln_2.weight"), &[d], vec![1.0; d]);
        w.put(p("ln_2.bias"), &[d], vec![0.0; d]);
        w.put(p("mlp.c_fc.weight"), &[d, 4 * d], rng.values(4 * d * d, 0.02));
        w.put(p("mlp.c_fc.bias"), &[4 * d], vec![0.0; 4 * d]);
        w.put(p("mlp.c_proj.weight"), &[4 * d, d], rng.values(4 * d * d, out_std));
        w.put(p("mlp.c_proj.bias"), &[d], vec![0.0; d]);
    }
    w.put(t("ln_f.weight"), &[d], vec![1.0; d]);
    w.put(t("ln_f.bias"), &[d], vec![0.0; d]);
    w.write(&base.join("model.safetensors"));
    let adapter = Adapter {
        path: "transformer.h.{i}.attn.{m}",
        modules: vec![("c_attn", 3 * d)],
        fan_in_fan_out: true,
        params: w.params,
    };
    (Shape { d, layers, samples: 16 }, adapter)
}

/// A Llama checkpoint's shape as published.
struct LlamaShape {
    d: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    rope_theta: f64,
    /// Llama 3's rope scaling (factor, original positions), where the model has it.
    llama3_rope: Option<(f64, usize)>,
    dtype: Dtype,
}

impl LlamaShape {
    const SMOLLM2: LlamaShape = LlamaShape {
        d: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ffn: 1536,
        vocab: 49152,
        rope_theta: 100000.0,
        llama3_rope: None,
        dtype: Dtype::F32,
    };
    const LLAMA_1B: LlamaShape = LlamaShape {
        d: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        ffn: 8192,
        vocab: 128256,
        rope_theta: 500000.0,
        llama3_rope: Some((32.0, 8192)),
        dtype: Dtype::BF16,
    };
}

fn llama(base: &Path, s: LlamaShape, layers: Option<usize>, rng: &mut Rng) -> (Shape, Adapter) {
    let layers = layers.unwrap_or(s.layers);
    let (d, hd) = (s.d, s.d / s.heads);
    let kv = s.kv_heads * hd;
    let mut config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "hidden_size": d, "intermediate_size": s.ffn, "num_hidden_layers": layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": hd,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": s.rope_theta,
        "vocab_size": s.vocab, "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 0,
        "attention_bias": false, "mlp_bias": false,
        "torch_dtype": match s.dtype { Dtype::BF16 => "bfloat16", _ => "float32" },
    });
    if let Some((factor, original)) = s.llama3_rope {
        config["rope_scaling"] = json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        });
    }
    std::fs::write(base.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut w = Tensors::new(s.dtype);
    // Rows past the tokenizer's words are zero (see the top of this file).
    let mut embed = rng.values(TOKENIZER_VOCAB * d, 0.02);
    embed.resize(s.vocab * d, 0.0);
    w.put("model.embed_tokens.weight".into(), &[s.vocab, d], embed);
    let out_std = 0.02 / (2.0 * layers as f32).sqrt();
    for i in 0..layers {
        let p = |m: &str| format!("model.layers.{i}.{m}.weight");
        w.put(p("input_layernorm"), &[d], vec![1.0; d]);
        w.put(p("self_attn.q_proj"), &[d, d], rng.values(d * d, 0.02));
        w.put(p("self_attn.k_proj"), &[kv, d], rng.values(kv * d, 0.02));
        w.put(p("self_attn.v_proj"), &[kv, d], rng.values(kv * d, 0.02));
        w.put(p("self_attn.o_proj"), &[d, d], rng.values(d * d, out_std));
        w.put(p("post_attention_layernorm"), &[d], vec![1.0; d]);
        w.put(p("mlp.gate_proj"), &[s.ffn, d], rng.values(s.ffn * d, 0.02));
        w.put(p("mlp.up_proj"), &[s.ffn, d], rng.values(s.ffn * d, 0.02));
        w.put(p("mlp.down_proj"), &[d, s.ffn], rng.values(s.ffn * d, out_std));
    }
    w.put("model.norm.weight".into(), &[d], vec![1.0; d]);
    w.write(&base.join("model.safetensors"));
    let adapter = Adapter {
        path: "model.layers.{i}.self_attn.{m}",
        modules: vec![("q_proj", d), ("v_proj", kv)],
        fan_in_fan_out: false,
        params: w.params,
    };
    (Shape { d, layers, samples: 20 }, adapter)
}
