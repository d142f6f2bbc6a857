//! GGUF base models (`formats::gguf`), against what llama.cpp's `gguf` package and transformers
//! read from the same files (tools/make_gguf_fixtures.py): every ggml type dequantized as the
//! package does; llama (q/k permuted by the converter) and qwen2 (q/k/v biases, a tied head)
//! models in seven types with a byte-level BPE tokenizer giving transformers' token ids and
//! hidden states; Llama 3's rope_freqs and Phi-3 (fused projections, partial rotary, longrope
//! factors as tensors, a window), which transformers' GGUF loading reads without their rope
//! scaling, against transformers' model of the checkpoint they were written from; SentencePiece
//! vocabularies giving transformers' ids in its Llama and Phi-3 flavours.

mod common;
use common::*;
use iteris::backend::cpu::Cpu;
use iteris::backend::prelude::*;
use iteris::formats::gguf::{quants, Gguf};
use iteris::formats::safetensors::{ByteSource, TensorFile};
use iteris::fsio;
use iteris::merge::tokenize;
use iteris::models::{self, Batch, NoHook, Output, Stream};
use pollster::FutureExt;
use std::path::PathBuf;

fn file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name)
}

fn reference(name: &str) -> TensorFile {
    TensorFile::parse(name, std::fs::read(file(name)).unwrap()).unwrap()
}

#[test]
fn every_type_dequantizes_as_the_gguf_package_does() {
    let bytes = std::fs::read(file("quants.gguf")).unwrap();
    let g = Gguf::open("quants.gguf", &bytes).unwrap();
    let want = reference("quants.safetensors");
    assert_eq!(g.tensors.len(), 11);
    for (name, t) in &g.tensors {
        let raw = bytes.read(t.start, (t.end - t.start) as usize).unwrap();
        let got = quants::dequantize(t.ty, &raw);
        let want = want.mat(name).unwrap();
        assert_eq!(got.len(), want.data.len(), "{name}");
        let worst = got.iter().zip(&want.data).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: differs by {worst:e}");
    }
}

#[test]
fn llama_and_qwen2_ggufs_read_as_transformers_reads_them() {
    for arch in ["llama", "qwen2"] {
        check_decoder_gguf(arch);
    }
}

/// The rope scalings llama.cpp stores as tensors, and Phi-3's fused projections: hidden states of
/// three samples (the third past Phi-3's trained context of 32 tokens, so its long factors and its
/// window of 24 apply) as transformers' model of the original checkpoint computes them.
#[test]
fn llama3_rope_freqs_and_phi3_ggufs_compute_what_their_checkpoints_did() {
    for arch in ["llama3", "phi3"] {
        check_decoder_gguf(arch);
    }
    let config = fsio::read_base(&file("phi3.gguf")).unwrap().config.raw;
    assert_eq!(config["rope_scaling"]["rope_type"], "longrope");
    assert_eq!((config["partial_rotary_factor"].as_f64(), config["sliding_window"].as_u64()), (Some(0.75), Some(24)));
}

const SAMPLES: [&str; 3] = [
    "The capital of France is Paris.",
    "def add(a, b):\n    return a + b  # 42",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.",
];

fn check_decoder_gguf(arch: &str) {
    let base = fsio::read_base(&file(&format!("{arch}.gguf"))).unwrap();
    let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
    let want = reference(&format!("{arch}.safetensors"));
    for (k, s) in SAMPLES.iter().enumerate().take_while(|(k, _)| want.mat(&format!("ids.{k}")).is_ok()) {
        let (ids, _) = tokenize(&base.tokenizer, &[s.to_string()], 128, None, "samples").unwrap();
        let want_ids: Vec<u32> = want.mat(&format!("ids.{k}")).unwrap().data.iter().map(|&x| x as u32).collect();
        assert_eq!(ids[0], want_ids, "{arch} sample {k}: token ids");
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Base, &ids);
        let h = models::run(&model, &Cpu, &batch, &mut NoHook, Output::Hidden).block_on().unwrap().unwrap();
        let e = rel(&Cpu.download(&h).block_on().unwrap(), &want.mat(&format!("hidden.{k}")).unwrap());
        eprintln!("{arch} sample {k}: {} tokens, hidden states within {e:.2e}", ids[0].len());
        assert!(e < 1e-5, "{arch} sample {k}: hidden states differ by {e:.2e}");
    }
}

/// SentencePiece vocabularies (`tokenizer.ggml.model` "llama": byte fallback, scores, control and
/// user-defined pieces; no merges in the file) rebuilt as transformers rebuilds them for a llama and
/// a phi3 file: the same ids on texts with leading and repeated spaces, tabs and newlines, accents,
/// CJK and emoji, digits, special pieces, and none.
#[test]
fn sentencepiece_vocabularies_give_transformers_ids() {
    use iteris::formats::tokenizer::TextTokenizer;
    let texts: Vec<String> = serde_json::from_slice(&std::fs::read(file("spm_texts.json")).unwrap()).unwrap();
    let want = reference("spm.safetensors");
    for arch in ["llama", "phi3"] {
        let name = format!("spm-{arch}.gguf");
        let bytes = std::fs::read(file(&name)).unwrap();
        let g = Gguf::open(&name, &bytes).unwrap();
        let json = serde_json::to_vec(&iteris::formats::gguf::base::tokenizer(&g).unwrap()).unwrap();
        let t = TextTokenizer::parse(&name, &json).unwrap();
        for (k, text) in texts.iter().enumerate() {
            let got = t.encode(text, 512).unwrap().ids;
            let want: Vec<u32> = want.mat(&format!("{arch}.{k}")).unwrap().data.iter().map(|&x| x as u32).collect();
            assert_eq!(got, want, "{arch}: {text:?}");
        }
    }
}

#[test]
fn broken_gguf_files_are_refused_with_the_file_named() {
    let good = std::fs::read(file("llama.gguf")).unwrap();
    let dir = std::env::temp_dir().join(format!("iteris-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic", b"GGUX".iter().chain(&good[4..]).copied().collect(), "not a GGUF file"),
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        ("header cut", good[..200].to_vec(), "truncated GGUF header"),
        ("empty", Vec::new(), "not a GGUF file"),
    ];
    for (what, bytes, message) in cases {
        let path = dir.join(format!("{}.gguf", what.replace(' ', "_")));
        std::fs::write(&path, &bytes).unwrap();
        let e = fsio::read_base(&path).err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
        assert!(e.contains(&path.display().to_string()) && e.contains(message), "{what}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `adapter.gguf` (`--gguf`) read back: llama.cpp's header keys, each module's `lora_a` [in, r]
/// and `lora_b` [r, out] under the base's tensor name (Phi-3's fused `attn_qkv` and `ffn_up`), and
/// alpha / r · B · A, with llama's q and k rows put back in the checkpoint's order, equal to the
/// merged delta. (tools/check_llama_cpp_lora.py runs it in llama.cpp itself.)
#[test]
fn the_llama_cpp_lora_holds_the_merged_deltas() {
    for (arch, gguf_arch, heads) in
        [("llama", "llama", Some((4, 2))), ("phi3", "phi3", None), ("gemma3", "gemma3", None)]
    {
        check_llama_cpp_lora(arch, gguf_arch, heads);
    }
}

fn check_llama_cpp_lora(arch: &str, gguf_arch: &str, heads: Option<(usize, usize)>) {
    use iteris::formats::gguf::Value;
    use iteris::merge::{export::dense, pipeline::Formats, Options};
    let r = merge(arch, &Options::published());
    let files = r.output_files(&base(arch), &tasks(arch), Formats { gguf: true, ..Formats::default() }).unwrap();
    let bytes = files.iter().find(|(n, _)| *n == "adapter.gguf").unwrap().1.clone();
    let g = Gguf::open("adapter.gguf", &bytes).unwrap();
    let s = |k: &str| g.get(k).and_then(Value::as_str).unwrap().to_string();
    assert_eq!(
        (s("general.type"), s("general.architecture"), s("adapter.type")),
        ("adapter".into(), gguf_arch.into(), "lora".into())
    );
    let alpha = g.get("adapter.lora.alpha").and_then(Value::as_f64).unwrap();
    assert_eq!(g.tensors.len(), 2 * r.outcome.targets.len());
    for (t, m) in r.outcome.targets.iter().zip(&r.outcome.merged) {
        let name = iteris::formats::gguf::base::gguf_name(gguf_arch, &t.name).unwrap();
        if arch == "phi3" {
            assert!(!name.contains("attn_q.") && !name.contains("ffn_gate"), "{}: {name}", t.name);
        }
        let read = |suffix: &str| {
            let d = &g.tensors[&format!("{name}.{suffix}")];
            let v = quants::dequantize(d.ty, &bytes[d.start as usize..d.end as usize]);
            (d.dims.clone(), v)
        };
        let ((a_dims, a), (b_dims, b)) = (read("lora_a"), read("lora_b"));
        let rank = m.rank() as u64;
        assert_eq!((a_dims, b_dims.clone()), (vec![t.in_dim as u64, rank], vec![rank, t.out_dim as u64]), "{name}");
        let scale = alpha / rank as f64;
        let (out, inn, r_) = (t.out_dim, t.in_dim, rank as usize);
        let h = match heads {
            Some(h) if name.contains("attn_q") => Some(h.0),
            Some(h) if name.contains("attn_k") => Some(h.1),
            _ => None,
        };
        // Row `o` of the checkpoint's delta is row `p(o)` of the file's.
        let file_row = |o: usize| match h {
            Some(h) => {
                let hd = out / h;
                let (hh, w) = (o / hd, o % hd);
                hh * hd + 2 * (w % (hd / 2)) + w / (hd / 2)
            }
            None => o,
        };
        let want = dense(m);
        let mut worst = 0f64;
        for o in 0..out {
            for i in 0..inn {
                let v: f64 =
                    (0..r_).map(|k| b[file_row(o) * r_ + k] as f64 * a[k * inn + i] as f64).sum::<f64>() * scale;
                worst = worst.max((v - want.data[o * inn + i] as f64).abs());
            }
        }
        let norm = want.data.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
        assert!(worst <= 1e-5 * norm.max(1e-6), "{arch} {name}: differs by {worst:e} (largest entry {norm:e})");
    }
}
