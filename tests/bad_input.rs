//! Bad input through the CLI: each case exits non-zero with a one-line message that names the file
//! (or setting) and the problem, and leaves no output folder behind.

mod common;
use common::*;
use iteris::formats::safetensors::{write, TensorFile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A writable copy of the gpt2 fixture (base, three adapters, samples) in a fresh folder.
fn scratch(name: &str) -> PathBuf {
    let d = temp_dir(name);
    for sub in ["base", "adapter0", "adapter1", "adapter2"] {
        copy_dir(&fixture("gpt2").join(sub), &d.join(sub));
    }
    for i in 0..3 {
        let s = samples_path("gpt2", i);
        std::fs::copy(&s, d.join(s.file_name().unwrap())).unwrap();
    }
    d
}

fn merge_args(d: &Path) -> Vec<String> {
    let mut a: Vec<String> =
        vec!["merge".into(), "--backend".into(), "cpu".into(), "--base".into(), d.join("base").display().to_string()];
    for i in 0..3 {
        a.push("--adapter".into());
        a.push(d.join(format!("adapter{i}")).display().to_string());
        a.push("--samples".into());
        a.push(d.join(samples_path("gpt2", i).file_name().unwrap()).display().to_string());
    }
    a.push("--out".into());
    a.push(d.join("out").display().to_string());
    a
}

fn run(args: &[String]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_iteris")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// Run the merge in `d` and expect a one-line error mentioning every one of `words`.
fn expect_error(d: &Path, args: &[String], words: &[&str]) {
    let (ok, _, err) = run(args);
    assert!(!ok, "expected failure; stderr: {err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line in: {err}"));
    for w in words {
        assert!(line.contains(w), "error line '{line}' does not mention '{w}'");
    }
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!d.join("out").exists(), "output folder written despite the error");
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary folder left behind");
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn rewrite_tensors(path: &Path, f: impl FnOnce(&mut BTreeMap<String, iteris::mat::Mat>)) {
    let tf = TensorFile::parse("x", std::fs::read(path).unwrap()).unwrap();
    let mut m: BTreeMap<String, iteris::mat::Mat> = tf.keys().map(|k| (k.clone(), tf.mat(k).unwrap())).collect();
    f(&mut m);
    std::fs::write(path, write(&m, false, None).unwrap()).unwrap();
}

#[test]
fn a_good_merge_succeeds() {
    let d = scratch("good");
    let (ok, out, err) = run(&merge_args(&d));
    assert!(ok, "{err}");
    assert!(out.contains("wrote"), "{out}");
    for f in ["adapter_config.json", "adapter_model.safetensors", "merge_report.json"] {
        assert!(d.join("out").join(f).exists(), "{f} missing");
    }
}

#[test]
fn truncated_safetensors() {
    let d = scratch("trunc");
    let p = d.join("adapter1/adapter_model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    expect_error(&d, &merge_args(&d), &["adapter1/adapter_model.safetensors", "truncated"]);
}

#[test]
fn header_length_beyond_file() {
    let d = scratch("header");
    let p = d.join("base/model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    expect_error(&d, &merge_args(&d), &["base/model.safetensors", "header"]);
}

#[test]
fn corrupt_safetensors() {
    let d = scratch("corrupt");
    let p = d.join("adapter0/adapter_model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    for x in b[8..40].iter_mut() {
        *x = b'#';
    }
    std::fs::write(&p, &b).unwrap();
    expect_error(&d, &merge_args(&d), &["adapter0/adapter_model.safetensors", "corrupt"]);
}

#[test]
fn adapter_shapes_do_not_fit_base() {
    let d = scratch("shapes");
    rewrite_tensors(&d.join("adapter0/adapter_model.safetensors"), |m| {
        let k = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight";
        let a = m[k].clone();
        m.insert(k.into(), iteris::mat::Mat::zeros(a.rows, a.cols + 8));
    });
    expect_error(&d, &merge_args(&d), &["adapter0", "h.0.attn.c_attn", "wrong base model"]);
}

#[test]
fn adapter_for_another_architecture() {
    let d = scratch("arch");
    std::fs::remove_dir_all(d.join("adapter2")).unwrap();
    copy_dir(&fixture("bert").join("adapter0"), &d.join("adapter2"));
    expect_error(&d, &merge_args(&d), &["adapter2", "does not have"]);
}

#[test]
fn unknown_architecture() {
    let d = scratch("unknown");
    edit_json(&d.join("base/config.json"), |c| {
        c.insert("model_type".into(), "mamba".into());
    });
    expect_error(&d, &merge_args(&d), &["config.json", "mamba", "not supported"]);
}

#[test]
fn refused_adapter_features() {
    let cases: [(&str, &str, serde_json::Value, &str); 3] = [
        ("dora", "use_dora", true.into(), "DoRA"),
        ("bias", "bias", "all".into(), "bias"),
        ("mts", "modules_to_save", serde_json::json!(["lm_head"]), "modules_to_save"),
    ];
    for (name, key, value, word) in cases {
        let d = scratch(name);
        edit_json(&d.join("adapter1/adapter_config.json"), |c| {
            c.insert(key.into(), value);
        });
        expect_error(&d, &merge_args(&d), &["adapter1/adapter_config.json", word]);
    }
    let d = scratch("embedding");
    rewrite_tensors(&d.join("adapter2/adapter_model.safetensors"), |m| {
        m.insert("base_model.model.transformer.wte.lora_embedding_A".into(), iteris::mat::Mat::zeros(3, 300));
    });
    expect_error(&d, &merge_args(&d), &["adapter2/adapter_model.safetensors", "embedding LoRA"]);
}

#[test]
fn empty_or_missing_samples() {
    let d = scratch("empty");
    let args = merge_args(&d);
    let s = PathBuf::from(&args[args.iter().position(|a| a.ends_with("samples0.txt")).unwrap()]);
    std::fs::write(&s, "\n  \n").unwrap();
    expect_error(&d, &args, &["samples0.txt", "no samples"]);
    std::fs::remove_file(&s).unwrap();
    expect_error(&d, &args, &["samples0.txt", "cannot read"]);
}

#[test]
fn non_finite_weights() {
    let d = scratch("nan");
    rewrite_tensors(&d.join("base/model.safetensors"), |m| {
        let k = m.keys().find(|k| k.contains("h.1.mlp.c_fc.weight")).unwrap().clone();
        m.get_mut(&k).unwrap().data[5] = f32::NAN;
    });
    expect_error(&d, &merge_args(&d), &["base/model.safetensors", "h.1.mlp.c_fc.weight", "non-finite"]);
    let d = scratch("inf");
    rewrite_tensors(&d.join("adapter1/adapter_model.safetensors"), |m| {
        let k = m.keys().next().unwrap().clone();
        m.get_mut(&k).unwrap().data[0] = f32::INFINITY;
    });
    expect_error(&d, &merge_args(&d), &["adapter1/adapter_model.safetensors", "non-finite"]);
}

#[test]
fn sample_longer_than_positions_is_truncated_and_reported() {
    let d = scratch("long");
    let long = vec!["the cat sat on the mat"; 60].join(" ");
    std::fs::write(d.join("samples0.txt"), format!("{long}\nthe dog ran\n")).unwrap();
    let (ok, _, err) = run(&merge_args(&d));
    assert!(ok, "{err}");
    assert!(err.contains("samples0.txt: 1 of 2 samples were longer than 64 tokens and were truncated"), "{err}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/merge_report.json")).unwrap()).unwrap();
    assert_eq!(report["tasks"][0]["truncated_samples"], 1);
}

#[test]
fn mismatched_argument_counts_and_existing_output() {
    let d = scratch("args");
    let mut args = merge_args(&d);
    let i = args.iter().position(|a| a == "--samples").unwrap();
    args.drain(i..i + 2);
    expect_error(&d, &args, &["--adapter", "--samples"]);
    std::fs::create_dir(d.join("out")).unwrap();
    std::fs::write(d.join("out/keep.txt"), "x").unwrap();
    let (ok, _, err) = run(&merge_args(&d));
    assert!(!ok && err.contains("already exists"), "{err}");
    assert!(d.join("out/keep.txt").exists());
}
