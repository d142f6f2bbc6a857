//! A GGUF model as a Hugging Face folder gives it, as transformers' GGUF loading reads it
//! (`integrations/ggml.py`, `gguf_tokenizer_mapping.py`): `config.json` from the `{arch}.*`
//! metadata, tensor names mapped back to the checkpoint's, q/k rows un-permuted where llama.cpp's
//! converter permuted them, and `tokenizer.json` rebuilt from `tokenizer.ggml.*`.
//!
//! Architectures: llama (Llama, SmolLM, Mistral, TinyLlama), qwen2, qwen3, gemma2, gemma3, phi3.
//! Tokenizers: byte-level BPE (`tokenizer.ggml.model` "gpt2"), and SentencePiece BPE ("llama")
//! in transformers' three flavours (Llama, Phi-3, Gemma).
//!
//! Two rope scalings llama.cpp stores as tensors, which transformers' GGUF loading drops, are
//! read here as longrope factors (each a divisor of one frequency, as llama.cpp applies them), so
//! the model computes what the checkpoint did: Llama 3's `rope_freqs` (both factor lists the
//! same, attention factor 1) and Phi-3's `rope_factors_long` / `rope_factors_short`.

use super::{quants, Gguf, Value};
use crate::error::{bad_input, Result};
use crate::formats::safetensors::ByteSource;
use serde_json::{json, Map};

/// The architectures read here and the model_type each is in config.json.
const ARCHITECTURES: [(&str, &str); 6] = [
    ("llama", "llama"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3_text"),
    ("phi3", "phi3"),
];

/// Tensors that hold rope scaling, read into config.json rather than the model's weights.
const ROPE_TENSORS: [&str; 3] = ["rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"];

fn is_gemma(arch: &str) -> bool {
    arch.starts_with("gemma")
}

/// One tensor of the model under its checkpoint name.
pub struct Tensor {
    /// The name in the GGUF file.
    pub gguf: String,
    /// (out, in) for a matrix, (n) for a vector.
    pub shape: Vec<usize>,
    pub undo: Undo,
}

/// What undoes a change llama.cpp's converter made to a tensor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Undo {
    /// Un-permute q or k rows for this many heads (permuted for llama.cpp's rope).
    pub unpermute_heads: Option<usize>,
    /// Subtract 1 (Gemma's norm weights, stored as the 1 + w its RMSNorm multiplies by).
    pub minus_one: bool,
}

/// Where llama.cpp's converter puts row `r` of a checkpoint's q or k (`LlamaModel.permute`): each
/// head's two rotary halves interleaved, row j·(hd/2) + i of a head going to row 2i + j.
pub fn llama_cpp_row(r: usize, head_dim: usize) -> usize {
    let (h, within) = (r / head_dim, r % head_dim);
    let (j, i) = (within / (head_dim / 2), within % (head_dim / 2));
    h * head_dim + 2 * i + j
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

/// A rope-scaling tensor's values, one per rotated pair; None where the file has none.
fn rope_factors(g: &Gguf, source: &dyn ByteSource, name: &str, pairs: usize) -> Result<Option<Vec<f64>>> {
    let Some(t) = g.tensors.get(name) else { return Ok(None) };
    let raw = source.read(t.start, (t.end - t.start) as usize).map_err(|e| bad_input(&g.name, e))?;
    let v: Vec<f64> = quants::dequantize(t.ty, &raw).into_iter().map(f64::from).collect();
    if v.len() != pairs || !v.iter().all(|x| x.is_finite() && *x > 0.0) {
        return Err(bad_input(
            &g.name,
            format!("tensor '{name}' must hold {pairs} positive numbers (one per rotated pair), not {}", v.len()),
        ));
    }
    Ok(Some(v))
}

/// `config.json` as transformers writes it for this file, with the rope scaling llama.cpp keeps
/// in tensors (read from `source`) as longrope factors.
pub fn config(g: &Gguf, source: &dyn ByteSource) -> Result<serde_json::Value> {
    let (arch, model_type) = architecture(g)?;
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
        ("vocab_size", "vocab_size"),
        // llama.cpp's head size; transformers reads it for Gemma only (for llama it reads
        // rope.dimension_count, below; for Qwen3 it keeps Qwen3Config's 128, which a Qwen3 GGUF
        // of another head size would contradict).
        ("attention.key_length", "head_dim"),
        ("attention.sliding_window", "sliding_window"),
    ];
    for (key, hf) in keys {
        // Phi3MiniModel's converter writes a window of 0 for none.
        let none = hf == "sliding_window" && g.get(&format!("{arch}.{key}")).and_then(Value::as_u64) == Some(0);
        if let Some(v) = g.get(&format!("{arch}.{key}")).filter(|_| !none) {
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
    if arch == "llama" && !c.contains_key("head_dim") {
        if let Some(d) = g.get("llama.rope.dimension_count").and_then(Value::as_u64) {
            c.insert("head_dim".into(), d.into());
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
    rope_tensors(g, source, arch, &mut c)?;
    c.insert("tie_word_embeddings".into(), (!g.tensors.contains_key("output.weight")).into());
    for (key, hf) in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")] {
        if let Some(v) = g.get(&format!("tokenizer.ggml.{key}")).and_then(Value::as_u64) {
            c.insert(hf.into(), v.into());
        }
    }
    Ok(c.into())
}

/// Phi-3's partial rotary (`rope.dimension_count` below head_dim) and the rope scaling llama.cpp
/// keeps in tensors, as longrope factors: a divisor per frequency in both forms, which is how
/// llama.cpp applies them (`freq_factors`) and how transformers' longrope applies its lists.
fn rope_tensors(g: &Gguf, source: &dyn ByteSource, arch: &str, c: &mut Map<String, serde_json::Value>) -> Result<()> {
    let num = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize);
    let context = num("max_position_embeddings");
    let head_dim = match (num("head_dim"), num("hidden_size"), num("num_attention_heads")) {
        (Some(d), _, _) => d,
        (None, Some(h), Some(n)) if n > 0 => h / n,
        _ => return Ok(()), // the config check names what is missing
    };
    let rotary =
        g.get(&format!("{arch}.rope.dimension_count")).and_then(Value::as_u64).map_or(head_dim, |d| d as usize);
    if arch == "phi3" && rotary != head_dim {
        let f = rotary as f64 / head_dim as f64;
        if rotary == 0 || rotary > head_dim || (head_dim as f64 * f) as usize != rotary {
            return Err(bad_input(
                &g.name,
                format!("{arch}.rope.dimension_count {rotary} is no partial rotary of head size {head_dim}"),
            ));
        }
        c.insert("partial_rotary_factor".into(), f.into());
    }
    let pairs = rotary / 2;
    if let Some(f) = rope_factors(g, source, "rope_freqs.weight", pairs)? {
        // Llama 3's scaling as the converter computes it: a longrope of the same factors at every
        // length, cos and sin unscaled.
        c.insert(
            "rope_scaling".into(),
            json!({"rope_type": "longrope", "short_factor": f, "long_factor": f, "attention_factor": 1.0,
                   "original_max_position_embeddings": context}),
        );
    }
    let long = rope_factors(g, source, "rope_factors_long.weight", pairs)?;
    let short = rope_factors(g, source, "rope_factors_short.weight", pairs)?;
    match (long, short) {
        (Some(long), Some(short)) => {
            let original = g.get(&format!("{arch}.rope.scaling.original_context_length")).and_then(Value::as_u64);
            let Some(original) = original else {
                return Err(bad_input(
                    &g.name,
                    format!("holds longrope factors without {arch}.rope.scaling.original_context_length"),
                ));
            };
            let mut s = json!({"rope_type": "longrope", "short_factor": short, "long_factor": long});
            if let Some(a) = g.get(&format!("{arch}.rope.scaling.attn_factor")).and_then(Value::as_f64) {
                s["attention_factor"] = (a as f32 as f64).into();
            }
            c.insert("rope_scaling".into(), s);
            // Phi-3 writes the trained context beside the rope dict.
            c.insert("original_max_position_embeddings".into(), original.into());
        }
        (None, None) => {}
        _ => {
            return Err(bad_input(&g.name, "holds only one of rope_factors_long.weight and rope_factors_short.weight"))
        }
    }
    Ok(())
}

/// llama.cpp's name of each module of a layer, and the checkpoint's (`blk.N.<gguf>` is
/// `model.layers.N.<hf>`); Gemma's norms in `GEMMA_NORMS`.
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

/// Gemma's four norms a layer: `ffn_norm` is the norm before the MLP, as in llama, but Gemma calls
/// it `pre_feedforward_layernorm` and has one after attention and one after the MLP besides.
const GEMMA_NORMS: [(&str, &str); 4] = [
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// Phi-3's fused projections: q, k and v in one, gate and up in one (`ffn_up`).
const PHI3_FUSED: [(&str, &str); 2] = [("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")];

/// A layer module's names, llama.cpp's and the checkpoint's, for an architecture.
fn layer_modules(arch: &str) -> Vec<(&'static str, &'static str)> {
    let own: &[(&str, &str)] = match arch {
        _ if is_gemma(arch) => &GEMMA_NORMS,
        "phi3" => &PHI3_FUSED,
        _ => &[],
    };
    let shared = |g: &&(&str, &str)| !own.iter().any(|n| n.0 == g.0);
    own.iter().copied().chain(LAYER_MODULES.iter().filter(shared).copied()).collect()
}

/// The same for the tensors outside the layers.
const TOP: [(&str, &str); 3] =
    [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// The checkpoint name of a llama.cpp tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`); None for a name with no counterpart.
fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    let (module, suffix) = gguf.rsplit_once('.')?;
    if let Some((_, hf)) = TOP.iter().find(|(g, _)| *g == module) {
        return Some(format!("{hf}.{suffix}"));
    }
    let (layer, module) = module.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = layer_modules(arch).into_iter().find(|(g, _)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The model types whose modules have llama.cpp names here.
pub const HF_TYPES: [&str; 8] = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "phi3"];

/// The GGUF architecture of a model_type (llama.cpp's converter writes Mistral as llama).
pub fn gguf_architecture(model_type: &str) -> Option<&'static str> {
    match model_type {
        "llama" | "mistral" => Some("llama"),
        "qwen2" => Some("qwen2"),
        "qwen3" => Some("qwen3"),
        "gemma2" => Some("gemma2"),
        "gemma3" | "gemma3_text" => Some("gemma3"),
        "phi3" => Some("phi3"),
        _ => None,
    }
}

/// llama.cpp's tensor name of a model's linear module in an architecture
/// (`layers.3.self_attn.q_proj` → `blk.3.attn_q.weight`; `lm_head` → `output.weight`).
pub fn gguf_name(arch: &str, module: &str) -> Option<String> {
    let module = module.strip_prefix("model.").unwrap_or(module);
    if let Some((g, _)) = TOP.iter().find(|(_, hf)| hf.strip_prefix("model.").unwrap_or(hf) == module) {
        return Some(format!("{g}.weight"));
    }
    let (layer, rest) = module.strip_prefix("layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = layer_modules(arch).into_iter().find(|(_, hf)| *hf == rest)?;
    Some(format!("blk.{layer}.{g}.weight"))
}

/// Every tensor of the file under its checkpoint name.
pub fn tensors(g: &Gguf) -> Result<Vec<(String, Tensor)>> {
    let (arch, _) = architecture(g)?;
    let heads = |key: &str| g.get(&format!("{arch}.attention.{key}")).and_then(Value::as_u64).map(|h| h as usize);
    let (n_head, n_head_kv) = (heads("head_count"), heads("head_count_kv").or(heads("head_count")));
    let mut out = Vec::new();
    for (name, t) in g.tensors.iter().filter(|(n, _)| !ROPE_TENSORS.contains(&n.as_str())) {
        let hf = hf_name(arch, name).ok_or_else(|| {
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
        // Gemma's converters store each norm as 1 + w; transformers subtracts the 1 on load.
        let minus_one = is_gemma(arch) && name.contains("norm.weight");
        out.push((hf, Tensor { gguf: name.clone(), shape, undo: Undo { unpermute_heads, minus_one } }));
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

/// A list of strings the file must have.
fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    let a = g.get(key).and_then(Value::as_array).ok_or_else(|| bad_input(&g.name, format!("has no list \"{key}\"")))?;
    a.iter().map(|v| v.as_str().ok_or_else(|| bad_input(&g.name, format!("\"{key}\" holds a non-string")))).collect()
}

/// Each token's type (1 normal, 3 control, 4 user-defined, …).
fn token_types(g: &Gguf, n: usize) -> Vec<u64> {
    match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(t) => t.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; n],
    }
}

/// `tokenizer.json` for the file's tokenizer, as transformers builds it.
pub fn tokenizer(g: &Gguf) -> Result<serde_json::Value> {
    let model = g.str("tokenizer.ggml.model")?;
    let arch = g.str("general.architecture")?;
    match model {
        "gpt2" => byte_level(g),
        "llama" if is_gemma(arch) => sentencepiece(g, Spm::Gemma),
        "llama" if arch == "phi3" => sentencepiece(g, Spm::Phi3),
        "llama" => sentencepiece(g, Spm::Llama),
        _ => Err(bad_input(
            &g.name,
            format!("tokenizer.ggml.model \"{model}\" is not supported yet (supported: gpt2, byte-level BPE; llama, SentencePiece BPE): use the Hugging Face folder"),
        )),
    }
}

/// The post-processor that adds BOS where the file asks for it (`tokenizer.ggml.add_bos_token`,
/// by default `default_add_bos`).
fn bos_template(g: &Gguf, tokens: &[&str], default_add_bos: bool) -> serde_json::Value {
    let add = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(default_add_bos);
    let id = g.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64);
    let single_a = json!({"Sequence": {"id": "A", "type_id": 0}});
    let pair_b = json!({"Sequence": {"id": "B", "type_id": 1}});
    match (add, id.and_then(|i| tokens.get(i as usize))) {
        (true, Some(&b)) => {
            let mut special = Map::new();
            special.insert(b.to_string(), json!({"id": b, "ids": [id], "tokens": [b]}));
            let bos = json!({"SpecialToken": {"id": b, "type_id": 0}});
            json!({"type": "TemplateProcessing", "single": [bos, single_a], "pair": [bos, single_a, pair_b],
                   "special_tokens": special})
        }
        _ => {
            json!({"type": "TemplateProcessing", "single": [single_a], "pair": [single_a, pair_b], "special_tokens": {}})
        }
    }
}

/// An added token as tokenizer.json lists it.
fn added(id: usize, content: &str, special: bool) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// The SentencePiece BPE flavours transformers rebuilds from a GGUF (`tokenizer.ggml.model`
/// "llama"), picked by architecture as `select_tokenizer_builder` picks them.
#[derive(Clone, Copy, PartialEq)]
enum Spm {
    /// `LlamaTokenizer`: Metaspace adds "▁" before the first word and for every space.
    Llama,
    /// `phi3_tokenizer`: the same vocabulary, but a normalizer prepends "▁" and respells spaces,
    /// so a text that starts with a space keeps one more "▁" than Metaspace gives it.
    Phi3,
    /// `gemma_tokenizer`: no prefix space, tokens of two or more spaces respelled with "▁", and
    /// merges ordered by the tokens' places in the file, not by their scores.
    Gemma,
}

/// A SentencePiece BPE vocabulary as transformers rebuilds it (`sentencepiece_tokenizer`): the
/// file's merges, or else merges derived from the vocabulary (every split of a token into two
/// tokens), best first by the token's score (`generate_merges`); byte fallback; BOS added unless
/// the file says otherwise; the file's BOS, EOS, UNK and PAD and its control tokens special,
/// user-defined ones plain added tokens.
fn sentencepiece(g: &Gguf, flavour: Spm) -> Result<serde_json::Value> {
    let raw = strings(g, "tokenizer.ggml.tokens")?;
    let tokens: Vec<String> = raw
        .iter()
        .map(|t| {
            if flavour == Spm::Gemma && t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    // Gemma's scores do not follow its merge order; its place in the file does.
    let scores: Vec<f64> = match flavour {
        Spm::Gemma => (0..tokens.len()).map(|i| -(i as f64)).collect(),
        _ => {
            let s = g.get("tokenizer.ggml.scores").and_then(Value::as_array).ok_or_else(|| {
                bad_input(&g.name, "has a SentencePiece vocabulary without \"tokenizer.ggml.scores\"")
            })?;
            // Finite, and −0 read as 0 (Python's order, which the merges' sort follows).
            let s: Option<Vec<f64>> = s.iter().map(|v| v.as_f64().filter(|x| x.is_finite()).map(|x| x + 0.0)).collect();
            match s {
                Some(s) if s.len() == tokens.len() => s,
                _ => {
                    return Err(bad_input(
                        &g.name,
                        format!("\"tokenizer.ggml.scores\" must hold one finite number per token ({})", tokens.len()),
                    ))
                }
            }
        }
    };
    let mut vocab = Map::new();
    let mut index = std::collections::HashMap::new();
    let mut score = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i.into());
        index.insert(t.as_str(), i);
        score.insert(t.as_str(), scores[i]);
    }
    let merges: Vec<serde_json::Value> = match g.get("tokenizer.ggml.merges") {
        Some(_) => strings(g, "tokenizer.ggml.merges")?.into_iter().map(Into::into).collect(),
        None => {
            // generate_merges(vocab, {token: score}): for each token in file order (a repeated one
            // where it first appears, with its last score), its splits into two known tokens
            // ordered by their ids; then all sorted by (score, lengths), best first, stably.
            let mut seen = std::collections::HashSet::new();
            let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
            for t in &tokens {
                if !seen.insert(t.as_str()) {
                    continue;
                }
                let s = score[t.as_str()];
                let mut local: Vec<(&str, &str)> = t
                    .char_indices()
                    .skip(1)
                    .map(|(at, _)| (&t[..at], &t[at..]))
                    .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
                    .collect();
                local.sort_by_key(|(l, r)| (index[l], index[r]));
                merges.extend(local.into_iter().map(|(l, r)| (s, l.chars().count(), r.chars().count(), l, r)));
            }
            merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((b.1, b.2).cmp(&(a.1, a.2))));
            merges.into_iter().map(|m| json!([m.3, m.4])).collect()
        }
    };
    let types = token_types(g, raw.len());
    let mut added_tokens: Vec<serde_json::Value> = Vec::new();
    let mut listed = std::collections::HashSet::new();
    // The tokenizer class's own specials (GemmaTokenizer's names; the file's BOS, EOS, UNK and
    // PAD), then the file's control (special) and user-defined tokens.
    let named: &[&str] = if flavour == Spm::Gemma { &["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] } else { &[] };
    let by_id = ["bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"]
        .iter()
        .filter_map(|k| g.get(&format!("tokenizer.ggml.{k}")).and_then(Value::as_u64))
        .filter(|&i| (i as usize) < tokens.len());
    let specials = named.iter().filter_map(|n| index.get(n).copied()).chain(by_id.map(|i| i as usize));
    for i in specials {
        if listed.insert(i) {
            added_tokens.push(added(i, &tokens[i], true));
        }
    }
    for (i, (t, &ty)) in raw.iter().zip(&types).enumerate() {
        let special = ty == 3;
        if (special || (ty == 4 && index.contains_key(t))) && listed.insert(i) {
            added_tokens.push(added(i, &tokens[i], special));
        }
    }
    added_tokens.sort_by_key(|a| a["id"].as_u64());
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let (normalizer, pre_tokenizer) = match flavour {
        Spm::Llama => (
            json!(null),
            json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
        ),
        Spm::Phi3 => (
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, space]}),
            json!(null),
        ),
        Spm::Gemma => (
            space,
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
        ),
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if flavour != Spm::Gemma {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let unk = if flavour == Spm::Gemma { json!("<unk>") } else { json!(null) };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added_tokens,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": bos_template(g, &refs, true),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}

/// Byte-level BPE (`GPT2Tokenizer`): tokens spelled in GPT-2's byte alphabet, the file's merges,
/// the split regex its `tokenizer.ggml.pre` names.
fn byte_level(g: &Gguf) -> Result<serde_json::Value> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types = token_types(g, tokens.len());
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
        .map(|(i, (t, &ty))| added(i, t, ty == 3))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = match g.get("tokenizer.ggml.pre").and_then(Value::as_str).and_then(pre_split) {
        Some(split) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        None => byte_level.clone(),
    };
    let post = bos_template(g, &tokens, false);
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}
