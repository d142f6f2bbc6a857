//! The hostile-input cases, shared by the CLI's suite (tests/hostile.rs) and the page's
//! (tests/browser.rs, through the wasm entry point): each edits a scratch copy of a fixture and
//! the `iteris merge` arguments, and names the words its one error line must hold.

use super::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A writable copy of a fixture (base, three adapters, samples) in a fresh folder.
pub fn scratch(arch: &str, name: &str) -> PathBuf {
    let d = temp_dir(&format!("hostile-{name}"));
    for sub in ["base", "adapter0", "adapter1", "adapter2"] {
        copy_dir(&fixture(arch).join(sub), &d.join(sub));
    }
    for i in 0..3 {
        let s = samples_path(arch, i);
        std::fs::copy(&s, d.join(s.file_name().unwrap())).unwrap();
    }
    d
}

pub fn sample_file(d: &Path, i: usize) -> PathBuf {
    ["txt", "jsonl"].iter().map(|e| d.join(format!("samples{i}.{e}"))).find(|p| p.exists()).unwrap()
}

pub fn merge_args(d: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec!["merge", "--backend", "cpu", "--base"].into_iter().map(String::from).collect();
    a.push(d.join("base").display().to_string());
    for i in 0..3 {
        a.extend(["--adapter".into(), d.join(format!("adapter{i}")).display().to_string()]);
        a.extend(["--samples".into(), sample_file(d, i).display().to_string()]);
    }
    a.extend(["--out".into(), d.join("out").display().to_string()]);
    a
}

/// Replace the value after `flag` (its first occurrence).
pub fn set(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.to_string();
}

pub fn push(args: &mut Vec<String>, more: &[&str]) {
    args.extend(more.iter().map(|s| s.to_string()));
}

pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Rewrite a safetensors file's tensors with `f` (as f32; any values, NaN included).
pub fn rewrite_tensors(path: &Path, f: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>)) {
    let file = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap().tensors();
    let mut m: BTreeMap<String, (Vec<usize>, Vec<f32>)> = st
        .into_iter()
        .map(|(k, v)| {
            let vals = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (k, (v.shape().to_vec(), vals))
        })
        .collect();
    f(&mut m);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        m.into_iter().map(|(k, (s, v))| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

pub fn edit_bytes(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// One hostile input: `setup` edits the scratch folder and the arguments; the error line must
/// name every one of `words`.
pub struct Case {
    pub name: &'static str,
    pub class: &'static str,
    pub arch: &'static str,
    pub setup: fn(&Path, &mut Vec<String>),
    pub words: &'static [&'static str],
    /// Whether the case applies to the page too (files and settings, not paths or the CLI's
    /// arguments).
    pub page: bool,
}

pub const GPT2_LORA_A: &str = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight";

pub fn cases() -> Vec<Case> {
    fn c(
        class: &'static str,
        name: &'static str,
        setup: fn(&Path, &mut Vec<String>),
        words: &'static [&'static str],
    ) -> Case {
        Case { name, class, arch: "gpt2", setup, words, page: true }
    }
    fn llama(mut k: Case) -> Case {
        k.arch = "llama";
        k
    }
    fn on(arch: &'static str, mut k: Case) -> Case {
        k.arch = arch;
        k
    }
    fn cli(mut k: Case) -> Case {
        k.page = false;
        k
    }
    vec![
        // Corrupt and wrong files.
        c(
            "corrupt",
            "truncated safetensors",
            |d, _| edit_bytes(&d.join("adapter1/adapter_model.safetensors"), |b| b.truncate(b.len() / 2)),
            &["adapter1/adapter_model.safetensors", "truncated"],
        ),
        c(
            "corrupt",
            "header length 2^40",
            |d, _| {
                edit_bytes(&d.join("base/model.safetensors"), |b| b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes()))
            },
            &["base/model.safetensors", "header"],
        ),
        c(
            "corrupt",
            "header length u64::MAX",
            |d, _| {
                edit_bytes(&d.join("adapter0/adapter_model.safetensors"), |b| {
                    b[..8].copy_from_slice(&u64::MAX.to_le_bytes())
                })
            },
            &["adapter0/adapter_model.safetensors", "header"],
        ),
        c(
            "corrupt",
            "corrupt safetensors header",
            |d, _| edit_bytes(&d.join("adapter0/adapter_model.safetensors"), |b| b[8..40].fill(b'#')),
            &["adapter0/adapter_model.safetensors", "corrupt"],
        ),
        c(
            "corrupt",
            "safetensors of 3 bytes",
            |d, _| std::fs::write(d.join("adapter2/adapter_model.safetensors"), b"abc").unwrap(),
            &["adapter2/adapter_model.safetensors", "only 3 bytes"],
        ),
        c(
            "corrupt",
            "adapter_config.json not JSON",
            |d, _| std::fs::write(d.join("adapter0/adapter_config.json"), b"{\"r\": 4,").unwrap(),
            &["adapter0/adapter_config.json", "not valid JSON"],
        ),
        c(
            "corrupt",
            "adapter_config.json an array",
            |d, _| std::fs::write(d.join("adapter0/adapter_config.json"), b"[1, 2]").unwrap(),
            &["adapter0/adapter_config.json", "JSON object"],
        ),
        c(
            "corrupt",
            "config.json not JSON",
            |d, _| std::fs::write(d.join("base/config.json"), b"\xff\xfe").unwrap(),
            &["base/config.json", "not valid JSON"],
        ),
        c(
            "corrupt",
            "tokenizer.json not JSON",
            |d, _| std::fs::write(d.join("base/tokenizer.json"), b"{").unwrap(),
            &["base/tokenizer.json", "not valid JSON"],
        ),
        c(
            "corrupt",
            "missing tokenizer.json",
            |d, _| std::fs::remove_file(d.join("base/tokenizer.json")).unwrap(),
            &["base", "tokenizer.json"],
        ),
        cli(c(
            "corrupt",
            "base is a file",
            |d, a| set(a, "--base", &d.join("samples0.txt").display().to_string()),
            &["samples0.txt", "not a folder"],
        )),
        c(
            "corrupt",
            "samples not UTF-8",
            |d, _| std::fs::write(d.join("samples0.txt"), b"ok\n\xff\xfe\n").unwrap(),
            &["samples0.txt", "UTF-8"],
        ),
        c(
            "corrupt",
            "samples empty",
            |d, _| std::fs::write(d.join("samples0.txt"), "\n  \n").unwrap(),
            &["samples0.txt", "no samples"],
        ),
        cli(c(
            "corrupt",
            "samples missing",
            |d, _| std::fs::remove_file(d.join("samples0.txt")).unwrap(),
            &["samples0.txt", "cannot read"],
        )),
        c(
            "corrupt",
            "jsonl without text",
            |d, _| std::fs::write(d.join("samples1.jsonl"), "{\"txt\": \"a\"}\n").unwrap(),
            &["samples1.jsonl", "line 1", "text"],
        ),
        c(
            "corrupt",
            "eval prompt not a string",
            |d, a| {
                std::fs::write(d.join("e.jsonl"), "{\"prompt\": 5, \"answer\": \"x\"}\n").unwrap();
                for _ in 0..3 {
                    push(a, &["--eval", &d.join("e.jsonl").display().to_string()]);
                }
            },
            &["e.jsonl", "prompt", "string"],
        ),
        // Wrong model, unsupported features.
        c(
            "mismatch",
            "adapter shapes do not fit",
            |d, _| {
                rewrite_tensors(&d.join("adapter0/adapter_model.safetensors"), |m| {
                    let (s, _) = m[GPT2_LORA_A].clone();
                    m.insert(GPT2_LORA_A.into(), (vec![s[0], s[1] + 8], vec![0.0; s[0] * (s[1] + 8)]));
                })
            },
            &["adapter0", "h.0.attn.c_attn", "wrong base model"],
        ),
        c(
            "mismatch",
            "adapter of another architecture",
            |d, _| {
                std::fs::remove_dir_all(d.join("adapter2")).unwrap();
                copy_dir(&fixture("bert").join("adapter0"), &d.join("adapter2"));
            },
            &["adapter2", "does not have"],
        ),
        c(
            "mismatch",
            "unknown model_type",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c.insert("model_type".into(), "mamba".into());
                })
            },
            &["config.json", "mamba", "not supported"],
        ),
        cli(on(
            "phi3",
            c(
                "unsupported",
                "longrope factors of the wrong length",
                |d, _| {
                    edit_json(&d.join("base/config.json"), |c| {
                        c["rope_parameters"]["short_factor"] = serde_json::json!([1.0])
                    })
                },
                &["base/config.json", "short_factor", "6 positive numbers"],
            ),
        )),
        cli(on(
            "gemma3",
            c(
                "unsupported",
                "unknown layer type",
                |d, _| edit_json(&d.join("base/config.json"), |c| c["layer_types"][0] = "chunked_attention".into()),
                &["base/config.json", "chunked_attention", "not supported"],
            ),
        )),
        on(
            "gemma3",
            c(
                "unsupported",
                "adapter on a vision tower",
                |d, _| {
                    rewrite_tensors(&d.join("adapter1/adapter_model.safetensors"), |m| {
                        let keys: Vec<String> = m.keys().filter(|k| k.contains("layers.0.")).cloned().collect();
                        for k in keys {
                            let v = m.remove(&k).unwrap();
                            m.insert(
                                k.replace("model.layers.0.", "model.vision_tower.vision_model.encoder.layers.0."),
                                v,
                            );
                        }
                    })
                },
                &["adapter1", "vision_tower", "only the language model"],
            ),
        ),
        c(
            "unsupported",
            "DoRA",
            |d, _| {
                edit_json(&d.join("adapter1/adapter_config.json"), |c| {
                    c.insert("use_dora".into(), true.into());
                })
            },
            &["adapter1/adapter_config.json", "DoRA"],
        ),
        c(
            "unsupported",
            "trained biases",
            |d, _| {
                edit_json(&d.join("adapter1/adapter_config.json"), |c| {
                    c.insert("bias".into(), "all".into());
                })
            },
            &["adapter1/adapter_config.json", "bias"],
        ),
        c(
            "unsupported",
            "modules_to_save",
            |d, _| {
                edit_json(&d.join("adapter1/adapter_config.json"), |c| {
                    c.insert("modules_to_save".into(), serde_json::json!(["lm_head"]));
                })
            },
            &["adapter1/adapter_config.json", "modules_to_save"],
        ),
        c(
            "unsupported",
            "embedding LoRA",
            |d, _| {
                rewrite_tensors(&d.join("adapter2/adapter_model.safetensors"), |m| {
                    m.insert(
                        "base_model.model.transformer.wte.lora_embedding_A".into(),
                        (vec![3, 300], vec![0.0; 900]),
                    );
                })
            },
            &["adapter2/adapter_model.safetensors", "embedding LoRA"],
        ),
        // Silent misreads before: wrong JSON types, unpaired tensors.
        c(
            "strict",
            "lora_alpha a string",
            |d, _| {
                edit_json(&d.join("adapter0/adapter_config.json"), |c| {
                    c.insert("lora_alpha".into(), "32".into());
                })
            },
            &["adapter0/adapter_config.json", "lora_alpha", "number"],
        ),
        c(
            "strict",
            "use_rslora a string",
            |d, _| {
                edit_json(&d.join("adapter0/adapter_config.json"), |c| {
                    c.insert("use_rslora".into(), "yes".into());
                })
            },
            &["adapter0/adapter_config.json", "use_rslora", "true or false"],
        ),
        c(
            "strict",
            "r a string",
            |d, _| {
                edit_json(&d.join("adapter0/adapter_config.json"), |c| {
                    c.insert("r".into(), "8".into());
                })
            },
            &["adapter0/adapter_config.json", "\"r\"", "integer"],
        ),
        c(
            "strict",
            "r a float",
            |d, _| {
                edit_json(&d.join("adapter0/adapter_config.json"), |c| {
                    c.insert("r".into(), 2.0.into());
                })
            },
            &["adapter0/adapter_config.json", "\"r\"", "integer"],
        ),
        c(
            "strict",
            "fan_in_fan_out a number",
            |d, _| {
                edit_json(&d.join("adapter0/adapter_config.json"), |c| {
                    c.insert("fan_in_fan_out".into(), 1.into());
                })
            },
            &["adapter0/adapter_config.json", "fan_in_fan_out"],
        ),
        c(
            "strict",
            "rank_pattern bad regex",
            |d, _| {
                edit_json(&d.join("adapter0/adapter_config.json"), |c| {
                    c.insert("rank_pattern".into(), serde_json::json!({"c_attn(": 4}));
                })
            },
            &["adapter0/adapter_config.json", "rank_pattern", "not a valid pattern"],
        ),
        c(
            "strict",
            "alpha_pattern value a string",
            |d, _| {
                edit_json(&d.join("adapter0/adapter_config.json"), |c| {
                    c.insert("alpha_pattern".into(), serde_json::json!({"c_attn": "8"}));
                })
            },
            &["adapter0/adapter_config.json", "alpha_pattern", "number"],
        ),
        c(
            "strict",
            "lora_B without lora_A",
            |d, _| {
                rewrite_tensors(&d.join("adapter0/adapter_model.safetensors"), |m| {
                    m.remove(GPT2_LORA_A);
                })
            },
            &["adapter0/adapter_model.safetensors", "lora_B but no lora_A", "h.0.attn.c_attn"],
        ),
        c(
            "strict",
            "lora_A without lora_B",
            |d, _| {
                rewrite_tensors(&d.join("adapter0/adapter_model.safetensors"), |m| {
                    m.remove(&GPT2_LORA_A.replace("lora_A", "lora_B"));
                })
            },
            &["adapter0/adapter_model.safetensors", "lora_A but no lora_B"],
        ),
        c(
            "strict",
            "n_head a string",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c.insert("n_head".into(), "4".into());
                })
            },
            &["base/config.json", "n_head", "integer"],
        ),
        c(
            "strict",
            "activation_function a number",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c.insert("activation_function".into(), 5.into());
                })
            },
            &["base/config.json", "activation_function", "string"],
        ),
        // Absurd sizes (used to abort allocating terabytes).
        c(
            "sizes",
            "hidden size 2^40",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c.insert("n_embd".into(), (1u64 << 40).into());
                })
            },
            &["base/config.json", "n_embd", "larger than any model"],
        ),
        c(
            "sizes",
            "0 layers",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c.insert("n_layer".into(), 0.into());
                })
            },
            &["base/config.json", "n_layer", "at least 1"],
        ),
        llama(c(
            "sizes",
            "head_dim 2^23 with no layers",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c.insert("head_dim".into(), (1u64 << 23).into());
                    c.insert("num_hidden_layers".into(), 0.into());
                })
            },
            &["base/config.json", "num_hidden_layers"],
        )),
        llama(c(
            "sizes",
            "heads × head_dim overflows",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c.insert("head_dim".into(), (1u64 << 24).into());
                    c.insert("num_attention_heads".into(), (1u64 << 24).into());
                })
            },
            &["base/config.json", "head_dim", "larger than any model"],
        )),
        // Third-party parser panics, contained.
        c(
            "panic",
            "tokenizer template names a missing special token",
            |d, _| {
                edit_json(&d.join("base/tokenizer.json"), |t| {
                    t.insert(
                        "post_processor".into(),
                        serde_json::json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {}}),
                    );
                })
            },
            &["base/tokenizer.json", "[CLS]"],
        ),
        c(
            "panic",
            "tokenizer BPE prefix the merges lack",
            |d, _| {
                edit_json(&d.join("base/tokenizer.json"), |t| {
                    t["model"]["continuing_subword_prefix"] = "(unclosed".into();
                })
            },
            &["base/tokenizer.json", "continuing_subword_prefix"],
        ),
        // Non-finite numbers.
        c(
            "non-finite",
            "NaN in a base weight",
            |d, _| {
                rewrite_tensors(&d.join("base/model.safetensors"), |m| {
                    let k = m.keys().find(|k| k.contains("h.1.mlp.c_fc.weight")).unwrap().clone();
                    m.get_mut(&k).unwrap().1[5] = f32::NAN;
                })
            },
            &["base/model.safetensors", "h.1.mlp.c_fc.weight", "non-finite"],
        ),
        c(
            "non-finite",
            "Inf in an adapter weight",
            |d, _| {
                rewrite_tensors(&d.join("adapter1/adapter_model.safetensors"), |m| {
                    let k = m.keys().next().unwrap().clone();
                    m.get_mut(&k).unwrap().1[0] = f32::INFINITY;
                })
            },
            &["adapter1/adapter_model.safetensors", "non-finite"],
        ),
        llama(c(
            "non-finite",
            "rope_theta 0",
            |d, _| {
                edit_json(&d.join("base/config.json"), |c| {
                    c["rope_parameters"]["rope_theta"] = 0.0.into();
                })
            },
            &["base/config.json", "rope_theta", "greater than 0"],
        )),
        c(
            "non-finite",
            "activations overflow",
            |d, _| {
                rewrite_tensors(&d.join("base/model.safetensors"), |m| {
                    let k = m.keys().find(|k| k.ends_with("h.0.ln_1.bias")).unwrap().clone();
                    m.get_mut(&k).unwrap().1.iter_mut().for_each(|v| *v = 3e38);
                })
            },
            &["base/config.json", "non-finite", "h.0.attn.c_attn"],
        ),
        c(
            "non-finite",
            "linear merge overflows",
            |d, a| {
                rewrite_tensors(&d.join("adapter0/adapter_model.safetensors"), |m| {
                    m.values_mut().for_each(|(_, v)| v.iter_mut().for_each(|x| *x *= 1e18));
                });
                push(a, &["--method", "linear", "--weights", "1e6,1e6,1e6"]);
            },
            &["non-finite", "h.0.attn.c_proj", "adapter0"],
        ),
        c(
            "non-finite",
            "--f16 beyond its range",
            |d, a| {
                rewrite_tensors(&d.join("adapter0/adapter_model.safetensors"), |m| {
                    m.values_mut().for_each(|(_, v)| v.iter_mut().for_each(|x| *x *= 1e6));
                });
                push(a, &["--method", "cat", "--f16"]);
            },
            &["F16", "non-finite"],
        ),
        // Memory: sizes are the attack.
        cli(c(
            "memory",
            "samples from /dev/zero",
            |_, a| set(a, "--samples", "/dev/zero"),
            &["/dev/zero", "not a regular file"],
        )),
        cli(c(
            "memory",
            "samples from a FIFO",
            |d, a| {
                mkfifo(&d.join("fifo.txt"));
                set(a, "--samples", &d.join("fifo.txt").display().to_string());
            },
            &["fifo.txt", "not a regular file"],
        )),
        cli(c(
            "memory",
            "samples a folder",
            |d, a| set(a, "--samples", &d.join("adapter1").display().to_string()),
            &["adapter1", "not a regular file"],
        )),
        cli(c(
            "memory",
            "samples over the size cap",
            |d, _| {
                let f = std::fs::File::create(d.join("samples0.txt")).unwrap();
                f.set_len(300 << 20).unwrap(); // sparse: no disk used
            },
            &["samples0.txt", "MiB"],
        )),
        c(
            "memory",
            "100k samples exceed the memory plan",
            |d, a| {
                std::fs::write(d.join("samples0.txt"), "the cat sat on the mat\n".repeat(100_000)).unwrap();
                // Planned for a machine with 64 MiB to spare (this one would run it, in about 6 GB).
                push(a, &["--max-memory", "64"]);
            },
            &["memory plan", "64 MiB", "fewer samples"],
        ),
        cli(c(
            "memory",
            "weights larger than the memory available",
            |d, _| {
                // A valid header describing 200 GiB of f32 weights, the data sparse (no disk used):
                // only the header is read, and the memory plan refuses before any tensor is.
                let n: u64 = 200 << 30;
                let mut header = format!(
                    r#"{{"transformer.wte.weight":{{"dtype":"F32","shape":[{},1024],"data_offsets":[0,{n}]}}}}"#,
                    n / 4096
                );
                header.push_str(&" ".repeat((8 - header.len() % 8) % 8));
                let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
                bytes.extend(header.as_bytes());
                let path = d.join("base/model.safetensors");
                std::fs::write(&path, &bytes).unwrap();
                std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(bytes.len() as u64 + n).unwrap();
            },
            &["memory plan", "weights need 200.0 GiB"],
        )),
        // Paths and data loss.
        llama(c(
            "paths",
            "shard index names ../x",
            |d, _| {
                edit_json(&d.join("base/model.safetensors.index.json"), |c| {
                    let k = c["weight_map"].as_object().unwrap().keys().next().unwrap().clone();
                    c["weight_map"][&k] = "../adapter0/adapter_model.safetensors".into();
                })
            },
            &["model.safetensors.index.json", "../adapter0/adapter_model.safetensors", "inside the model folder"],
        )),
        llama(c(
            "paths",
            "shard index names an absolute path",
            |d, _| {
                edit_json(&d.join("base/model.safetensors.index.json"), |c| {
                    let k = c["weight_map"].as_object().unwrap().keys().next().unwrap().clone();
                    c["weight_map"][&k] = "/etc/passwd".into();
                })
            },
            &["model.safetensors.index.json", "/etc/passwd"],
        )),
        cli(c(
            "data loss",
            "--out is an input adapter, --force",
            |d, a| {
                set(a, "--out", &d.join("adapter1").display().to_string());
                push(a, &["--force"]);
            },
            &["adapter1", "is the input"],
        )),
        cli(c(
            "data loss",
            "--out is the base folder, --force",
            |d, a| {
                set(a, "--out", &d.join("base").display().to_string());
                push(a, &["--force"]);
            },
            &["base", "is the input"],
        )),
        cli(c(
            "data loss",
            "--out inside an adapter",
            |d, a| set(a, "--out", &d.join("adapter0/merged").display().to_string()),
            &["adapter0/merged", "lies inside"],
        )),
        cli(c(
            "data loss",
            "--out contains the inputs, --force",
            |d, a| {
                set(a, "--out", &d.display().to_string());
                push(a, &["--force"]);
            },
            &["contains the input"],
        )),
        cli(c(
            "data loss",
            "--out a link to an adapter, --force",
            |d, a| {
                std::os::unix::fs::symlink(d.join("adapter2"), d.join("link")).unwrap();
                set(a, "--out", &d.join("link").display().to_string());
                push(a, &["--force"]);
            },
            &["link", "adapter2"],
        )),
        cli(c(
            "data loss",
            "--out is a samples file, --force",
            |d, a| {
                set(a, "--out", &sample_file(d, 2).display().to_string());
                push(a, &["--force"]);
            },
            &["samples2.txt", "is the input"],
        )),
        cli(c(
            "data loss",
            "--out exists, no --force",
            |d, _| {
                std::fs::create_dir(d.join("out")).unwrap();
                std::fs::write(d.join("out/keep.txt"), "x").unwrap();
            },
            &["out", "already exists"],
        )),
        cli(c(
            "data loss",
            "--out is a file, --force",
            |d, a| {
                std::fs::write(d.join("out"), "x").unwrap();
                push(a, &["--force"]);
            },
            &["out", "is a file"],
        )),
        // Settings: one validation for the CLI and the page.
        c("settings", "--rho 2", |_, a| push(a, &["--rho", "2"]), &["--rho", "[0, 1]"]),
        c("settings", "--rank 0", |_, a| push(a, &["--rank", "0"]), &["--rank"]),
        c("settings", "--max-len 0", |_, a| push(a, &["--max-len", "0"]), &["--max-len"]),
        c("settings", "--alpha1 -1", |_, a| push(a, &["--alpha1=-1"]), &["--alpha1"]),
        c("settings", "--density 0", |_, a| push(a, &["--density", "0"]), &["--density"]),
        c(
            "settings",
            "--weights of the wrong count",
            |_, a| push(a, &["--method", "linear", "--weights", "1,2"]),
            &["--weights", "3 adapters, 2 weights"],
        ),
        c(
            "settings",
            "--weights not positive for iteris",
            |_, a| push(a, &["--weights", "1,0,2"]),
            &["--weights", "positive"],
        ),
        c("settings", "--balance-sweeps 0", |_, a| push(a, &["--balance-sweeps", "0"]), &["--balance-sweeps"]),
        c("settings", "--iters 0", |_, a| push(a, &["--schedule", "jacobi", "--iters", "0"]), &["--iters"]),
        c(
            "settings",
            "--regmean-scale 2",
            |_, a| push(a, &["--method", "regmean", "--regmean-scale", "2"]),
            &["--regmean-scale"],
        ),
        cli(c(
            "settings",
            "--samples fewer than --adapter",
            |_, a| {
                let i = a.iter().position(|x| x == "--samples").unwrap();
                a.drain(i..i + 2);
            },
            &["--adapter", "--samples"],
        )),
    ]
}

/// A page case as the browser test hands it to tests/browser/e2e.mjs: the folders and files of
/// the merge (with the names the page would see), and the settings the CLI arguments stand for.
pub fn page_case(case: &Case, d: &Path, args: &[String]) -> serde_json::Value {
    use serde_json::json;
    let (mut opts, mut tasks, mut evals) = (serde_json::Map::new(), Vec::new(), Vec::new());
    opts.insert("backend".into(), json!("cpu"));
    let (mut base, mut adapter) = (String::new(), None);
    let mut i = 1;
    while i < args.len() {
        let (flag, value) = match args[i].split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (args[i].clone(), args.get(i + 1).cloned()),
        };
        let step = if args[i].contains('=') || flag == "--f16" || flag == "--force" { 1 } else { 2 };
        let v = value.clone().unwrap_or_default();
        let num = |v: &str| serde_json::Value::from(v.parse::<f64>().unwrap());
        match flag.as_str() {
            "--base" => base = v,
            "--adapter" => adapter = Some(v),
            "--samples" => tasks.push(json!({ "adapter": adapter.take().unwrap(), "samples": v })),
            "--eval" => evals.push(v),
            "--out" | "--backend" | "--force" => {}
            "--f16" => {
                opts.insert("f16".into(), json!(true));
            }
            "--weights" => {
                opts.insert("weights".into(), v.split(',').map(num).collect());
            }
            "--method" | "--schedule" => {
                opts.insert(flag[2..].into(), json!(v));
            }
            "--max-memory" => {
                opts.insert("max_memory_mib".into(), num(&v));
            }
            f => {
                opts.insert(f[2..].replace('-', "_"), num(&v));
            }
        }
        i += step;
    }
    for (t, e) in tasks.iter_mut().zip(&evals) {
        t["eval"] = json!(e);
    }
    json!({ "name": case.name, "dir": d, "words": case.words, "base": base, "tasks": tasks, "options": opts })
}
