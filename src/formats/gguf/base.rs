//! A GGUF model as a Hugging Face folder gives it, as transformers' GGUF loading reads it
//! (`integrations/ggml.py`, `gguf_tokenizer_mapping.py`): `config.json` from the `{arch}.*`
//! metadata, tensor names mapped back to the checkpoint's, q/k rows un-permuted where llama.cpp's
//! converter permuted them, and `tokenizer.json` rebuilt from `tokenizer.ggml.*`.
//!
//! Architectures: llama (Llama, SmolLM, Mistral, TinyLlama), qwen2, qwen3. Tokenizers: byte-level
//! BPE (`tokenizer.ggml.model` "gpt2").

use super::{Gguf, Value};
use crate::error::{bad_input, Result};
use serde_json::{json, Map};

/// The architectures read here and the model_type each is in config.json.
const ARCHITECTURES: [(&str, &str); 3] = [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")];

/// One tensor of the model under its checkpoint name.
pub struct Tensor {
    /// The name in the GGUF file.
    pub gguf: String,
    /// (out, in) for a matrix, (n) for a vector.
    pub shape: Vec<usize>,
    /// Un-permute q or k rows for this many heads (llama.cpp permuted them for its rope).
    pub unpermute_heads: Option<usize>,
}

/// The model's architecture (`general.architecture`) and its model_type.
fn architecture(g: &Gguf) -> Result<(&str, &'static str)> {
    let arch = g.str("general.architecture")?;
    let model_type = ARCHITECTURES.iter().find(|(a, _)| *a == arch).map(|(_, t)| *t).ok_or_else(|| {
        let known: Vec<&str> = ARCHITECTURES.iter().map(|(a, _)| *a).collect();
        bad_input(
            &g.name,
            format!("GGUF architecture \"{arch}\" is not supported here (supported: {})", known.join(", ")),
        )
    })?;
    Ok((arch, model_type))
}

/// `config.json` as transformers writes it for this file.
pub fn config(g: &Gguf) -> Result<serde_json::Value> {
    let (arch, model_type) = architecture(g)?;
    if g.tensors.contains_key("rope_freqs.weight") {
        return Err(bad_input(
            &g.name,
            "holds rope_freqs.weight (Llama 3's rope scaling as llama.cpp stores it), which is not supported yet: use the Hugging Face folder",
        ));
    }
    let mut c = Map::new();
    c.insert("model_type".into(), model_type.into());
    // transformers' GGUF_CONFIG_MAPPING for these architectures.
    let keys = [
        ("context_length", "max_position_embeddings"),
        ("block_count", "num_hidden_layers"),
        ("feed_forward_length", "intermediate_size"),
        ("embedding_length", "hidden_size"),
        ("rope.freq_base", "rope_theta"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
        ("attention.key_length", "head_dim"),
        ("vocab_size", "vocab_size"),
    ];
    for (key, hf) in keys {
        if let Some(v) = g.get(&format!("{arch}.{key}")) {
            let v = match v {
                Value::Float(f) if hf == "rms_norm_eps" => json!(*f as f32 as f64),
                Value::Float(f) => json!(f),
                Value::Int(i) => json!(i),
                Value::Uint(u) => json!(u),
                other => return Err(bad_input(&g.name, format!("{arch}.{key} is {other:?}; expected a number"))),
            };
            c.insert(hf.into(), v);
        }
    }
    if !c.contains_key("vocab_size") {
        let n = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(<[Value]>::len);
        c.insert("vocab_size".into(), n.into());
    }
    if let Some(kind) = g.get(&format!("{arch}.rope.scaling.type")).and_then(Value::as_str) {
        if kind != "none" {
            let factor = g.get(&format!("{arch}.rope.scaling.factor")).and_then(Value::as_f64);
            let mut s = json!({"rope_type": kind, "factor": factor});
            if let Some(o) = g.get(&format!("{arch}.rope.scaling.original_context_length")).and_then(Value::as_u64) {
                s["original_max_position_embeddings"] = o.into();
            }
            c.insert("rope_scaling".into(), s);
        }
    }
    c.insert("tie_word_embeddings".into(), (!g.tensors.contains_key("output.weight")).into());
    for (key, hf) in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")] {
        if let Some(v) = g.get(&format!("tokenizer.ggml.{key}")).and_then(Value::as_u64) {
            c.insert(hf.into(), v.into());
        }
    }
    Ok(c.into())
}

/// llama.cpp's name of each module of a layer, and the checkpoint's (`blk.N.<gguf>` is
/// `model.layers.N.<hf>`).
const LAYER_MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The same for the tensors outside the layers.
const TOP: [(&str, &str); 3] =
    [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// The checkpoint name of a llama.cpp tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`); None for a name with no counterpart.
fn hf_name(gguf: &str) -> Option<String> {
    let (module, suffix) = gguf.rsplit_once('.')?;
    if let Some((_, hf)) = TOP.iter().find(|(g, _)| *g == module) {
        return Some(format!("{hf}.{suffix}"));
    }
    let (layer, module) = module.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_MODULES.iter().find(|(g, _)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The model types whose modules have llama.cpp names here, and their GGUF architecture.
pub const HF_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// The GGUF architecture of a model_type (llama.cpp's converter writes Mistral as llama).
pub fn gguf_architecture(model_type: &str) -> Option<&'static str> {
    match model_type {
        "llama" | "mistral" => Some("llama"),
        "qwen2" => Some("qwen2"),
        "qwen3" => Some("qwen3"),
        _ => None,
    }
}

/// llama.cpp's tensor name of a model's linear module (`layers.3.self_attn.q_proj` →
/// `blk.3.attn_q.weight`; `lm_head` → `output.weight`).
pub fn gguf_name(module: &str) -> Option<String> {
    let module = module.strip_prefix("model.").unwrap_or(module);
    if let Some((g, _)) = TOP.iter().find(|(_, hf)| hf.strip_prefix("model.").unwrap_or(hf) == module) {
        return Some(format!("{g}.weight"));
    }
    let (layer, rest) = module.strip_prefix("layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = LAYER_MODULES.iter().find(|(_, hf)| *hf == rest)?;
    Some(format!("blk.{layer}.{g}.weight"))
}

/// Every tensor of the file under its checkpoint name.
pub fn tensors(g: &Gguf) -> Result<Vec<(String, Tensor)>> {
    let (arch, _) = architecture(g)?;
    let heads = |key: &str| g.get(&format!("{arch}.attention.{key}")).and_then(Value::as_u64).map(|h| h as usize);
    let (n_head, n_head_kv) = (heads("head_count"), heads("head_count_kv").or(heads("head_count")));
    let mut out = Vec::new();
    for (name, t) in &g.tensors {
        let hf = hf_name(name).ok_or_else(|| {
            bad_input(&g.name, format!("tensor '{name}' has no Hugging Face counterpart for architecture \"{arch}\""))
        })?;
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        // llama.cpp's LlamaModel converter interleaves each head's two rotary halves of q and k
        // (`LlamaModel.permute`); transformers undoes it on load (`reverse_permute_weights`).
        let unpermute_heads = match (arch, name.rsplit_once('.').map(|(m, _)| m.rsplit('.').next().unwrap_or(""))) {
            ("llama", Some("attn_q")) => n_head,
            ("llama", Some("attn_k")) => n_head_kv,
            _ => None,
        };
        out.push((hf, Tensor { gguf: name.clone(), shape, unpermute_heads }));
    }
    Ok(out)
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): the alphabet byte-level BPE spells
/// tokens in.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// The split regexes of `tokenizer.ggml.pre` values (transformers' GGUF_PRE_TOKENIZER_SPLITS); a
/// value not listed keeps GPT-2's own.
fn pre_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

/// `tokenizer.json` for the file's tokenizer, as transformers builds it.
pub fn tokenizer(g: &Gguf) -> Result<serde_json::Value> {
    let model = g.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(bad_input(
            &g.name,
            format!("tokenizer.ggml.model \"{model}\" is not supported yet (supported: gpt2, byte-level BPE): use the Hugging Face folder"),
        ));
    }
    let list = |key: &str| -> Result<Vec<&str>> {
        let a =
            g.get(key).and_then(Value::as_array).ok_or_else(|| bad_input(&g.name, format!("has no list \"{key}\"")))?;
        a.iter()
            .map(|v| v.as_str().ok_or_else(|| bad_input(&g.name, format!("\"{key}\" holds a non-string"))))
            .collect()
    };
    let tokens = list("tokenizer.ggml.tokens")?;
    let merges = list("tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(t) => t.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let alphabet = byte_alphabet();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let key = if spelled(t) { t.to_string() } else { t.bytes().map(|b| alphabet[b as usize]).collect() };
        vocab.insert(key, i.into());
    }
    // Control tokens (3) are special, user-defined ones (4) plain added tokens; a control token
    // spelled outside the byte alphabet is a llama.cpp mislabel and is left as it is.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (t, &ty))| (ty == 3 && spelled(t)) || ty == 4)
        .map(|(i, (t, &ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": ty == 3})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = match g.get("tokenizer.ggml.pre").and_then(Value::as_str).and_then(pre_split) {
        Some(split) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        None => byte_level.clone(),
    };
    let bos = g.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64).and_then(|b| tokens.get(b as usize));
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
    let bos_id = g.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64);
    let post = match (add_bos, bos) {
        (true, Some(&b)) => {
            let mut special = Map::new();
            special.insert(b.to_string(), json!({"id": b, "ids": [bos_id], "tokens": [b]}));
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": special})
        }
        _ => serde_json::Value::Null,
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}
