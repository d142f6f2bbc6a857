//! The merged model as a dense checkpoint (`--dense`, `merge::dense`): loaded back, it computes
//! what the base computes with the merged adapter applied, on a Llama-family fixture and on GPT-2
//! (whose Conv1D weights take each delta transposed); every tensor keeps the base's precision.

mod common;
use common::*;
use iteris::backend::cpu::Cpu;
use iteris::backend::prelude::*;
use iteris::formats::peft::Adapter;
use iteris::formats::safetensors::{TensorFile, TensorStore};
use iteris::merge::{tokenize, Options};
use iteris::models::{self, Batch, NoHook, Output, Stream};
use pollster::FutureExt;

#[test]
fn the_dense_model_computes_the_base_with_the_merged_adapter() {
    for arch in ["llama", "gpt2", "gemma3"] {
        let b = base(arch);
        let r = merge(arch, &Options::published());
        let mut bytes = Vec::new();
        r.write_dense_model(&b, &mut bytes).unwrap();
        let dense = TensorStore::new(vec![TensorFile::parse("model.safetensors", bytes).unwrap()]).unwrap();
        for k in b.weights.keys() {
            assert_eq!(dense.dtype(k), b.weights.dtype(k), "{arch}: {k} keeps its precision");
            assert_eq!(dense.shape(k), b.weights.shape(k), "{arch}: {k} keeps its shape");
        }
        let merged = TensorFile::parse("adapter_model.safetensors", r.adapter_weights.clone()).unwrap();
        let adapter = Adapter::parse("merged", "adapter_config.json", &r.adapter_config, &merged).unwrap();
        let (ids, _) = tokenize(&b.tokenizer, &tasks(arch)[0].samples[..2], 64, None, "samples").unwrap();
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Adapter(0), &ids);
        let base_model = models::load(&Cpu, &b.config, &b.weights).unwrap();
        let mut hook = Recorder::for_adapter(&Cpu, &base_model, &adapter);
        let want = models::run(&base_model, &Cpu, &batch, &mut hook, Output::Hidden).block_on().unwrap().unwrap();
        let dense_model = models::load(&Cpu, &b.config, &dense).unwrap();
        let got = models::run(&dense_model, &Cpu, &batch, &mut NoHook, Output::Hidden).block_on().unwrap().unwrap();
        let (got, want) = (Cpu.download(&got).block_on().unwrap(), Cpu.download(&want).block_on().unwrap());
        let e = rel(&got, &want);
        // bf16/f16 bases round each merged weight to their precision.
        let tol = if b.weights.keys().any(|k| b.weights.dtype(k) != Some(iteris::formats::safetensors::Dtype::F32)) {
            1e-2
        } else {
            1e-5
        };
        assert!(e < tol, "{arch}: the dense model's hidden states differ by {e:.2e}");
        eprintln!("{arch}: dense model vs base + merged adapter: {e:.1e}");
    }
}
