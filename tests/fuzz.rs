//! A mutation fuzzer over every parser of a file a user can drop: safetensors, adapter_config.json
//! (with its weights), config.json (through model loading), tokenizer.json (load, encode, decode),
//! samples and held-out files, and the shard index. Each input must give a value or an error;
//! a panic (outside the containment of third-party parsers, which turns theirs into errors) fails
//! the test and the input is saved under `target/fuzz-findings/`.
//!
//! CI runs it for a short fixed time; run it longer with
//! `ITERIS_FUZZ_SECONDS=600 cargo test --release --test fuzz -- --nocapture`
//! (`ITERIS_FUZZ_SEED` picks another sequence of inputs, `ITERIS_FUZZ_TARGET=tokenizer` only the
//! targets whose name holds that word).

mod common;
use common::rng::Rng;
use common::*;
use iteris::backend::cpu::Cpu;
use iteris::formats::hf_config::HfConfig;
use iteris::formats::peft::Adapter;
use iteris::formats::safetensors::{shard_names, TensorFile, TensorStore};
use iteris::formats::samples;
use iteris::formats::samples::EvalSet;
use iteris::formats::tokenizer::TextTokenizer;
use serde_json::Value;
use std::time::{Duration, Instant};

/// What a target does with one input.
type Parse = Box<dyn Fn(&[u8])>;

/// One parser under test: seeds to mutate, and what to run on an input.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    /// JSON inputs are also mutated structurally (a value replaced, removed or duplicated).
    json: bool,
    run: Parse,
}

thread_local! {
    /// Panics of the tokenizers crate that containment turned into errors.
    static CONTAINED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static SAVED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Keep an input under target/fuzz-findings/; returns its path.
fn save(what: &str, input: &[u8]) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-findings");
    std::fs::create_dir_all(&dir).unwrap();
    let n = SAVED.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let f = dir.join(format!("{what}-{n}"));
    std::fs::write(&f, input).unwrap();
    f
}

fn read(p: impl AsRef<std::path::Path>) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Values that break parsers written for well-formed ones.
fn interesting(rng: &mut Rng) -> Value {
    let pick = [
        Value::Null,
        Value::Bool(true),
        Value::from(0),
        Value::from(-1),
        Value::from(1u64 << 40),
        Value::from(u64::MAX),
        Value::from(1e308),
        Value::from(-1e-320),
        Value::from(2.5),
        Value::from("8"),
        Value::from(""),
        Value::from("(unclosed"),
        Value::from("../../etc/passwd"),
        Value::Array(vec![]),
        serde_json::json!({}),
        serde_json::json!([[0, 1], [-5, 99999999]]),
    ];
    pick[rng.below(pick.len())].clone()
}

/// Replace, remove or duplicate one value somewhere in `v`.
fn mutate_json(v: &mut Value, rng: &mut Rng) {
    let depth = rng.below(6);
    mutate_at(v, depth, rng);
}

fn mutate_at(node: &mut Value, depth: usize, rng: &mut Rng) {
    let len = match node {
        Value::Object(o) => o.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if depth > 0 && len > 0 {
        let i = rng.below(len);
        let descend = rng.below(2) == 0;
        let child = match node {
            Value::Object(o) => o.values_mut().nth(i),
            Value::Array(a) => a.get_mut(i),
            _ => None,
        };
        if let Some(c) = child {
            if c.is_object() || c.is_array() || descend {
                return mutate_at(c, depth - 1, rng);
            }
        }
    }
    let what = rng.below(3);
    match node {
        Value::Object(o) if len > 0 && what == 0 => {
            let k = o.keys().nth(rng.below(len)).unwrap().clone();
            o.remove(&k);
        }
        Value::Array(a) if len > 0 && what == 0 => {
            let i = rng.below(len);
            let x = a[i].clone();
            a.insert(i, x);
        }
        Value::Object(o) if len > 0 => {
            let k = o.keys().nth(rng.below(len)).unwrap().clone();
            o.insert(k, interesting(rng));
        }
        n => *n = interesting(rng),
    }
}

/// Byte-level mutations: flips, overwrites with boundary bytes, truncation, splices, repeats.
fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.below(256) as u8);
            continue;
        }
        let i = rng.below(b.len());
        match rng.below(7) {
            0 => b[i] ^= 1 << rng.below(8),
            1 => b[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'\n', b'9'][rng.below(8)],
            2 => b.truncate(i),
            3 => {
                let j = rng.below(b.len());
                let (s, e) = (i.min(j), i.max(j).min(i.min(j) + 64));
                let chunk = b[s..e].to_vec();
                b.splice(i..i, chunk);
            }
            4 => {
                // A little-endian integer overwritten with an extreme (safetensors' header length).
                let v: u64 = [0, 1, u64::MAX, 1 << 40, (b.len() as u64).wrapping_sub(8)][rng.below(5)];
                for (k, x) in v.to_le_bytes().iter().enumerate() {
                    if let Some(y) = b.get_mut(i + k) {
                        *y = *x;
                    }
                }
            }
            5 => {
                b.remove(i);
            }
            _ => b.insert(i, rng.below(256) as u8),
        }
    }
}

fn targets() -> Vec<Target> {
    let g = fixture("gpt2");
    let l = fixture("llama");
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let adapter_weights = |arch: &str| {
        let p = fixture(arch).join("adapter0/adapter_model.safetensors");
        TensorFile::parse(p.display().to_string(), read(&p)).unwrap()
    };
    let (gw, lw) = (adapter_weights("gpt2"), adapter_weights("llama"));
    // Every safetensors file of a fixture's base folder (the Llama fixture is sharded).
    let store = |arch: &str| {
        let mut files: Vec<_> =
            std::fs::read_dir(fixture(arch).join("base")).unwrap().flatten().map(|e| e.path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
        files.sort();
        TensorStore::new(files.iter().map(|p| TensorFile::parse(p.display().to_string(), read(p)).unwrap()).collect())
            .unwrap()
    };
    let stores = [
        store("gpt2"),
        store("bert"),
        store("llama"),
        store("gemma3"),
        store("phi3"),
        TensorStore::new(vec![]).unwrap(),
    ];
    vec![
        Target {
            name: "safetensors",
            seeds: vec![
                read(g.join("adapter0/adapter_model.safetensors")),
                read(l.join("adapter1/adapter_model.safetensors")),
            ],
            json: false,
            run: Box::new(|b| {
                if let Ok(f) = TensorFile::parse("x.safetensors", b.to_vec()) {
                    for k in f.keys().cloned().collect::<Vec<_>>() {
                        let _ = f.mat(&k);
                    }
                }
            }),
        },
        Target {
            name: "adapter_config.json",
            seeds: vec![read(g.join("adapter0/adapter_config.json")), read(l.join("adapter0/adapter_config.json"))],
            json: true,
            run: Box::new(move |b| {
                let _ = Adapter::parse("a", "adapter_config.json", b, &gw);
                let _ = Adapter::parse("a", "adapter_config.json", b, &lw);
            }),
        },
        Target {
            name: "config.json",
            seeds: ["gpt2", "bert", "llama", "qwen2", "gemma3", "phi3", "smollm3"]
                .iter()
                .map(|a| read(fixture(a).join("base/config.json")))
                .collect(),
            json: true,
            run: Box::new(move |b| {
                // With real weights of five architectures (so a mutated config gets through to
                // the rotary setup), and with none (sizes are checked before any tensor is read).
                if let Ok(c) = HfConfig::parse("config.json", b) {
                    for store in &stores {
                        let _ = iteris::models::load(&Cpu, &c, store);
                    }
                }
            }),
        },
        Target {
            name: "tokenizer.json",
            seeds: vec![read(g.join("base/tokenizer.json")), read(fixture("bert").join("base/tokenizer.json"))],
            json: true,
            run: Box::new(|b| {
                let contained = |e: &iteris::Error| {
                    if e.to_string().contains("which is malformed") {
                        CONTAINED.with(|c| c.set(c.get() + 1));
                        if CONTAINED.with(|c| c.get()) <= 40 {
                            save("tokenizer_json-contained", b);
                        }
                    }
                };
                match TextTokenizer::parse("tokenizer.json", b) {
                    Err(e) => contained(&e),
                    Ok(t) => {
                        for text in ["the cat sat", "", "  \u{0}\u{ffff} ünï 漢字 ##", "[CLS] [SEP] <|endoftext|>"]
                        {
                            match t.encode(text, 16) {
                                Ok(e) => {
                                    let _ = t.decode(&e.ids).map_err(|e| contained(&e));
                                }
                                Err(e) => contained(&e),
                            }
                        }
                        let _ = t.decode(&[0, 1, u32::MAX]).map_err(|e| contained(&e));
                    }
                }
            }),
        },
        Target {
            name: "samples",
            seeds: vec![
                read(samples_path("gpt2", 0)),
                read(samples_path("gpt2", 1)),
                read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/eval/add.jsonl")),
            ],
            json: false,
            run: Box::new(|b| {
                let _ = samples::parse("s.txt", b);
                let _ = samples::parse("s.jsonl", b);
                let _ = EvalSet::parse("e.jsonl", b);
                let _ = EvalSet::parse("e.txt", b);
            }),
        },
        Target {
            name: "gguf",
            seeds: ["llama.gguf", "quants.gguf", "phi3.gguf", "llama3.gguf", "spm-llama.gguf"]
                .map(|f| read(gguf.join(f)))
                .to_vec(),
            json: false,
            run: Box::new(|b| {
                // Header, config, tokenizer and tensor table; then every tensor (dequantized,
                // un-permuted) through the model's loader, and the tokenizer on text.
                if let Ok(base) = iteris::inputs::read_base_gguf("x.gguf", Box::new(b.to_vec())) {
                    let _ = iteris::models::load(&Cpu, &base.config, &base.weights);
                    if let Ok(e) = base.tokenizer.encode("the cat sat <|endoftext|> 漢字", 16) {
                        let _ = base.tokenizer.decode(&e.ids);
                    }
                }
            }),
        },
        Target {
            name: "model.safetensors.index.json",
            seeds: vec![read(l.join("base/model.safetensors.index.json"))],
            json: true,
            run: Box::new(|b| {
                let _ = shard_names("model.safetensors.index.json", b);
            }),
        },
    ]
}

#[test]
fn parsers_never_panic() {
    iteris::formats::contain::install_quiet_panic_hook();
    let seconds: f64 = std::env::var("ITERIS_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20.0);
    let seed: u64 = std::env::var("ITERIS_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let only = std::env::var("ITERIS_FUZZ_TARGET").unwrap_or_default();
    let targets: Vec<Target> = targets().into_iter().filter(|t| t.name.contains(only.as_str())).collect();
    let per_target = Duration::from_secs_f64(seconds / targets.len() as f64);
    let mut findings = Vec::new();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for t in &targets {
        let (start, mut tried, mut panics) = (Instant::now(), 0usize, 0usize);
        let contained_before = CONTAINED.with(|c| c.get());
        while start.elapsed() < per_target {
            let mut input = t.seeds[rng.below(t.seeds.len())].clone();
            if t.json && rng.below(3) > 0 {
                if let Ok(mut v) = serde_json::from_slice::<Value>(&input) {
                    for _ in 0..1 + rng.below(3) {
                        mutate_json(&mut v, &mut rng);
                    }
                    input = serde_json::to_vec(&v).unwrap();
                }
                if rng.below(4) == 0 {
                    mutate_bytes(&mut input, &mut rng);
                }
            } else {
                mutate_bytes(&mut input, &mut rng);
            }
            tried += 1;
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(&input))) {
                Ok(()) => {}
                Err(_) => {
                    panics += 1;
                    let f = save(&t.name.replace(['.', ' ', '(', ')'], "_"), &input);
                    findings.push(format!("{}: panicked (input saved as {})", t.name, f.display()));
                }
            }
        }
        let contained = CONTAINED.with(|c| c.get()) - contained_before;
        println!("fuzz {:<30} {tried:>8} inputs, {panics} panics, {contained} third-party panics contained", t.name);
    }
    assert!(findings.is_empty(), "panics:\n{}", findings.join("\n"));
}
