//! Gemma 2 and Gemma 3 (`gemma2`, `gemma3_text`, and the text part of a multimodal `gemma3`) in
//! `decoder`'s shape: embeddings scaled by √hidden, RMSNorm with (1 + w), norms before *and after*
//! attention and the MLP, GeGLU (tanh GELU), attention scaled by `query_pre_attn_scalar`^−½, a tied
//! head. Gemma 2: alternating sliding/full layers, attention and final-logit soft-capping. Gemma 3:
//! per-head q/k RMSNorm, `layer_types` (else one full layer in `sliding_window_pattern`), local and
//! global rotary bases (`rope::gemma3`).

use super::decoder::{Decoder, DecoderConfig, Layer, Proj};
use super::{rope, WeightReader};
use crate::backend::{Activation, Backend};
use crate::error::{bad_input, Result};
use crate::formats::hf_config::{Dim, HfConfig, Positive};
use crate::formats::safetensors::{Dtype, TensorStore};
use crate::mat::Mat;
use serde::Deserialize;
use serde_json::{json, Value};

pub const MODEL_TYPES: [&str; 3] = ["gemma2", "gemma3_text", "gemma3"];

/// A multimodal `gemma3` config holds the text model's in `text_config`; its weights sit under
/// `language_model.` (see `load`).
pub fn text_config(c: &HfConfig) -> Result<HfConfig> {
    if c.model_type()? != "gemma3" {
        return Ok(HfConfig { file: c.file.clone(), raw: c.raw.clone() });
    }
    #[derive(Deserialize)]
    struct Multimodal {
        text_config: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let mut t = c.typed::<Multimodal>()?.text_config.ok_or_else(|| {
        bad_input(&c.file, "model_type \"gemma3\" without a \"text_config\": cannot find the language model")
    })?;
    t.insert("model_type".into(), "gemma3_text".into());
    let text = HfConfig { file: format!("{} (text_config)", c.file), raw: t.into() };
    Ok(text.with_defaults(&defaults("gemma3_text")))
}

/// √hidden, rounded to the embedding's stored precision as transformers does (it casts the scale to
/// the weights' dtype; Gemma was trained in bf16, where √640 = 25.30 is 25.25): a bf16 checkpoint
/// scales by bf16(√d), an f32 one by f32(√d), each as transformers runs it in its own precision.
fn embed_scale(store: &TensorStore, prefix: &str, d: usize) -> f32 {
    let s = (d as f64).sqrt() as f32;
    match store.dtype(&format!("{prefix}embed_tokens.weight")) {
        Some(Dtype::BF16) => half::bf16::from_f32(s).to_f32(),
        Some(Dtype::F16) => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// transformers' defaults for the keys Gemma reads (a multimodal `gemma3` gets `gemma3_text`'s in its
/// text_config, which published checkpoints leave mostly to them): see `llama::defaults`.
pub fn defaults(model_type: &str) -> Value {
    match model_type {
        "gemma2" => json!({
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
            "intermediate_size": 9216, "max_position_embeddings": 8192,
            "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
            "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
            "sliding_window": 4096, "tie_word_embeddings": true, "vocab_size": 256000
        }),
        "gemma3_text" => json!({
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
            "intermediate_size": 9216, "max_position_embeddings": 131072,
            "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
            "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0, "sliding_window": 4096,
            "tie_word_embeddings": true, "use_bidirectional_attention": false,
            "vocab_size": 262208
        }),
        _ => json!({}),
    }
}

/// Gemma's own keys, beside `DecoderConfig`'s.
#[derive(Deserialize)]
struct GemmaConfig {
    hidden_activation: Activation,
    sliding_window: Dim,
    /// One full-attention layer in this many (where `layer_types` does not say); default 6 for
    /// Gemma 3, 2 for Gemma 2.
    sliding_window_pattern: Option<Dim>,
    /// Attention scores are scaled by its inverse square root.
    query_pre_attn_scalar: Positive,
    attn_logit_softcapping: Option<Positive>,
    final_logit_softcapping: Option<Positive>,
    /// EmbeddingGemma's bidirectional attention.
    use_bidirectional_attention: Option<bool>,
}

pub fn load<B: Backend>(be: &B, config: &HfConfig, store: &TensorStore) -> Result<Decoder<B::T>> {
    let outer = config.model_type()?;
    let c = &text_config(config)?;
    let gemma3 = outer != "gemma2";
    let k = DecoderConfig::read(c)?;
    let own: GemmaConfig = c.typed()?;
    if own.use_bidirectional_attention == Some(true) {
        return Err(bad_input(
            &c.file,
            "use_bidirectional_attention (an embedding model) is not supported: only causal Gemma models are",
        ));
    }
    let s = k.shape(c)?;
    let (d, ff) = (s.d, s.ff);
    let pattern = own.sliding_window_pattern.map_or(if gemma3 { 6 } else { 2 }, |p| p.0);
    let sliding = k.sliding(c, s.layers, |i| (i + 1) % pattern != 0)?;
    let rotaries = if gemma3 {
        vec![rope::gemma3(c, "full_attention", s.head_dim)?, rope::gemma3(c, "sliding_attention", s.head_dim)?]
    } else {
        vec![rope::standard(c, s.head_dim)?]
    };
    let prefixes = ["model.", "", "language_model.model.", "model.language_model."];
    let w = WeightReader::new(be, store, "embed_tokens.weight", &prefixes, "Gemma")?;
    let mut layers = Vec::new();
    for (i, &sliding) in sliding.iter().enumerate() {
        let l = w.at(&format!("layers.{i}"));
        let (attn_w, mlp) = (l.at("self_attn"), l.at("mlp"));
        let mut attn = s.attention(if sliding { Some(own.sliding_window.0) } else { None });
        attn.scale = (1.0 / own.query_pre_attn_scalar.0.sqrt()) as f32;
        attn.softcap = own.attn_logit_softcapping.map(|x| x.0 as f32);
        let qk_norm = |n: &str| -> Result<Option<B::T>> {
            Ok(if gemma3 { Some(norm(be, &attn_w, n, s.head_dim)?) } else { None })
        };
        layers.push(Layer {
            input_norm: norm(be, &l, "input_layernorm.weight", d)?,
            qkv: Proj::qkv(&attn_w, &s)?,
            q_norm: qk_norm("q_norm.weight")?,
            k_norm: qk_norm("k_norm.weight")?,
            rotary: Some(if gemma3 && sliding { 1 } else { 0 }),
            attn,
            o: attn_w.linear("o_proj", s.qd, d, false)?,
            attn_out_norm: Some(norm(be, &l, "post_attention_layernorm.weight", d)?),
            mlp_norm: norm(be, &l, "pre_feedforward_layernorm.weight", d)?,
            gate_up: Proj::gate_up(&mlp, &s)?,
            down: mlp.linear("down_proj", ff, d, false)?,
            mlp_out_norm: Some(norm(be, &l, "post_feedforward_layernorm.weight", d)?),
        });
    }
    Ok(Decoder {
        model_type: c.model_type()?,
        d,
        ff,
        vocab: s.vocab,
        max_pos: s.max_pos,
        eps: s.eps,
        act: own.hidden_activation,
        embed_scale: Some(embed_scale(store, &w.prefix, d)),
        rotaries,
        embed: w.tensor("embed_tokens.weight", (s.vocab, d))?,
        layers,
        norm: norm(be, &w, "norm.weight", d)?,
        lm_head: super::decoder::lm_head(be, store, d, s.vocab, k.tie_word_embeddings)?,
        final_softcap: own.final_logit_softcapping.map(|x| x.0 as f32),
    })
}

/// Gemma's RMSNorm multiplies by (1 + w), in f32 as transformers does: added here, once.
fn norm<B: Backend>(be: &B, w: &WeightReader<B>, name: &str, width: usize) -> Result<B::T> {
    let g = w.mat(name, (1, width))?;
    Ok(be.upload(&Mat::new(1, width, g.data.iter().map(|x| 1.0 + x).collect())))
}
