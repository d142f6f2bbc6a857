//! MLX (mlx-lm) adapters in and out (`formats::mlx`): the fixture's PEFT adapters rewritten as
//! MLX folders (lora_a = Aᵀ (in, r), lora_b = (s·B)ᵀ split into lora_bᵀ and `scale`) merge to
//! the same weights as the PEFT folders; the merge written as MLX reads back as the same deltas;
//! and what mlx-lm writes that is not a LoRA is refused by name.

mod common;
use common::*;
use iteris::formats::mlx;
use iteris::formats::safetensors::{write, TensorFile};
use iteris::fsio;
use iteris::mat::Mat;
use iteris::merge::export::dense;
use iteris::merge::solve::Merged;
use iteris::merge::Options;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// PEFT adapter `i` of the llama fixture as an MLX folder at `dir`, with `scale` its multiplier
/// (the PEFT scale s is split as s = scale · (s / scale) into lora_b).
fn as_mlx(i: usize, dir: &Path, scale: f32) {
    let peft = fsio::read_adapter(&fixture("llama").join(format!("adapter{i}"))).unwrap();
    let mut tensors = BTreeMap::new();
    for m in &peft.modules {
        let mut b = m.b.transpose();
        b.data.iter_mut().for_each(|v| *v *= m.scale / scale);
        tensors.insert(format!("{}.lora_a", m.path), m.a.transpose());
        tensors.insert(format!("{}.lora_b", m.path), b);
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapters.safetensors"), write(&tensors, false, None).unwrap()).unwrap();
    let config = json!({
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": peft.modules[0].rank(), "scale": scale, "dropout": 0.0},
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
}

fn mlx_tasks(dir: &Path) -> Vec<iteris::inputs::TaskInput> {
    (0..3)
        .map(|i| {
            let a = dir.join(format!("mlx{i}"));
            as_mlx(i, &a, [20.0, 2.0, 0.5][i]);
            fsio::read_task(&a, &samples_path("llama", i)).unwrap()
        })
        .collect()
}

#[test]
fn mlx_adapters_merge_as_their_peft_twins() {
    let dir = temp_dir("mlx-in");
    let from = mlx_tasks(&dir);
    let peft = tasks("llama");
    for (m, p) in from.iter().zip(&peft) {
        assert_eq!(m.adapter.modules.len(), p.adapter.modules.len());
    }
    let opts = Options::published();
    let base = base("llama");
    let from_mlx = pollster::block_on(iteris::merge::pipeline::merge(
        &iteris::backend::cpu::Cpu,
        &base,
        &from,
        &opts,
        &mut |_| {},
    ))
    .unwrap();
    let from_peft = merge("llama", &opts);
    // The factors differ (the scales split differently between B and A); the deltas may not.
    let (got, want) = (deltas(&written(&from_mlx, "mlx-in-out")), deltas(&written(&from_peft, "peft-out")));
    assert_eq!(got.len(), want.len());
    for (k, g) in &got {
        // The MLX twins' lora_b is s/scale · B rounded to f32: measured up to 1.2e-6.
        let e = rel(g, &want[k]);
        assert!(e < 1e-5, "{k}: {e:.2e}");
    }
}

/// A merge's PEFT output, read back.
fn written(r: &iteris::merge::pipeline::MergeResult, name: &str) -> Vec<iteris::formats::peft::LoraModule> {
    let dir = temp_dir(name);
    std::fs::write(dir.join("adapter_config.json"), &r.adapter_config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &r.adapter_weights).unwrap();
    fsio::read_adapter(&dir).unwrap().modules
}

/// ΔW of every module of an adapter, by path.
fn deltas(modules: &[iteris::formats::peft::LoraModule]) -> BTreeMap<String, Mat> {
    modules
        .iter()
        .map(|m| {
            let mut b = m.b.clone();
            b.data.iter_mut().for_each(|v| *v *= m.scale);
            (m.path.clone(), dense(&Merged { a: m.a.clone(), b }))
        })
        .collect()
}

#[test]
fn the_merge_written_as_mlx_reads_back_as_the_same_deltas() {
    let r = merge("llama", &Options::published());
    let (config, weights) = r.mlx.as_ref().expect("a llama merge has an MLX form");
    let c: serde_json::Value = serde_json::from_slice(config).unwrap();
    assert_eq!(c["fine_tune_type"], "lora");
    assert_eq!(c["lora_parameters"]["scale"], 1.0);
    let keys: Vec<&str> =
        c["lora_parameters"]["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert!(keys.iter().all(|k| !k.starts_with("model.") && !k.contains("layers")), "{keys:?}");
    let mlx = mlx::parse(
        "out",
        "adapter_config.json",
        config,
        &TensorFile::parse("adapters.safetensors".to_string(), weights.clone()).unwrap(),
    )
    .unwrap();
    let (got, want) = (deltas(&mlx.modules), deltas(&written(&r, "mlx-out")));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    let rank = c["lora_parameters"]["rank"].as_u64().unwrap() as usize;
    assert!(mlx.modules.iter().all(|m| m.rank() == rank), "every module padded to rank {rank}");
    for (k, g) in &got {
        let e = rel(g, &want[k]);
        assert!(e < 1e-6, "{k}: {e:.2e}");
    }
    // GPT-2's Conv1D modules have no MLX layout: said, not written wrong.
    let g = merge("gpt2", &Options::published());
    assert!(g.mlx.unwrap_err().to_string().contains("--mlx"));
}

#[test]
fn what_is_not_a_mlx_lora_is_refused_by_name() {
    let dir = temp_dir("mlx-bad");
    let a = dir.join("a");
    as_mlx(0, &a, 2.0);
    let cfg =
        |v: serde_json::Value| std::fs::write(a.join("adapter_config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    let err = |what: &str| {
        let e = fsio::read_adapter(&a).err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
        eprintln!("{what}: {e}");
        e
    };
    cfg(json!({"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 2.0}}));
    assert!(err("dora").contains("DoRA"));
    cfg(json!({"fine_tune_type": "full", "num_layers": 2}));
    assert!(err("full").contains("full fine-tune"));
    cfg(json!({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8}}));
    assert!(err("no scale").contains("scale"));
    cfg(json!({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 0, "scale": 2.0}}));
    assert!(err("rank").contains("\"rank\" must be"));
    cfg(json!({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": "2"}}));
    assert!(err("scale type").contains("\"scale\" must be"));
    std::fs::remove_file(a.join("adapters.safetensors")).unwrap();
    assert!(err("no weights").contains("neither adapter_model.safetensors"));
}
