//! GGUF base models (`formats::gguf`), against what llama.cpp's `gguf` package and transformers
//! read from the same files (tools/make_gguf_fixtures.py): every ggml type dequantized as the
//! package does, and llama (q/k permuted by the converter) and qwen2 (q/k/v biases, a tied head)
//! models in seven types with a byte-level BPE tokenizer giving transformers' token ids and
//! hidden states.

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

fn check_decoder_gguf(arch: &str) {
    let base = fsio::read_base(&file(&format!("{arch}.gguf"))).unwrap();
    let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
    let want = reference(&format!("{arch}.safetensors"));
    let samples = ["The capital of France is Paris.", "def add(a, b):\n    return a + b  # 42"];
    for (k, s) in samples.iter().enumerate() {
        let (ids, _) = tokenize(&base.tokenizer, &[s.to_string()], 128, None, "samples").unwrap();
        let want_ids: Vec<u32> = want.mat(&format!("ids.{k}")).unwrap().data.iter().map(|&x| x as u32).collect();
        assert_eq!(ids[0], want_ids, "{arch} sample {k}: token ids");
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Base, &ids);
        let h = models::run(&model, &Cpu, &batch, &mut NoHook, Output::Hidden).block_on().unwrap().unwrap();
        let e = rel(&Cpu.download(&h).block_on().unwrap(), &want.mat(&format!("hidden.{k}")).unwrap());
        assert!(e < 1e-5, "{arch} sample {k}: hidden states differ by {e:.2e}");
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
/// and `lora_b` [r, out] under the base's tensor name, and alpha / r · B · A, with q and k's rows
/// put back in the checkpoint's order, equal to the merged delta. (tools/check_llama_cpp_lora.py
/// runs it in llama.cpp itself.)
#[test]
fn the_llama_cpp_lora_holds_the_merged_deltas() {
    use iteris::formats::gguf::Value;
    use iteris::merge::{export::dense, pipeline::Formats, Options};
    let arch = "llama";
    let r = merge(arch, &Options::published());
    let files = r.output_files(&base(arch), &tasks(arch), Formats { gguf: true, ..Formats::default() }).unwrap();
    let bytes = files.iter().find(|(n, _)| *n == "adapter.gguf").unwrap().1.clone();
    let g = Gguf::open("adapter.gguf", &bytes).unwrap();
    let s = |k: &str| g.get(k).and_then(Value::as_str).unwrap().to_string();
    assert_eq!(
        (s("general.type"), s("general.architecture"), s("adapter.type")),
        ("adapter".into(), "llama".into(), "lora".into())
    );
    let alpha = g.get("adapter.lora.alpha").and_then(Value::as_f64).unwrap();
    let heads = (4, 2);
    assert_eq!(g.tensors.len(), 2 * r.outcome.targets.len());
    for (t, m) in r.outcome.targets.iter().zip(&r.outcome.merged) {
        let name = iteris::formats::gguf::base::gguf_name(&t.name).unwrap();
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
        let h = if name.contains("attn_q") {
            Some(heads.0)
        } else if name.contains("attn_k") {
            Some(heads.1)
        } else {
            None
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
        assert!(worst <= 1e-5 * norm.max(1e-6), "{name}: differs by {worst:e} (largest entry {norm:e})");
    }
}
