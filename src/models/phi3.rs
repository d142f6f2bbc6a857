//! Phi-3 and Phi-4-mini (`phi3`) in `decoder`'s shape: Llama-like, but q/k/v fused into one
//! `qkv_proj` and gate/up into one `gate_up_proj` (each one LoRA target, split after the product),
//! rotary positions on `partial_rotary_factor` of each head (Phi-4-mini: 0.75) with `longrope`
//! scaling (`rope::standard`), and a sliding window on every layer where the config sets one.

use super::decoder::{Decoder, DecoderConfig, Layer, Proj};
use super::{rope, WeightReader};
use crate::backend::{Activation, Backend};
use crate::error::Result;
use crate::formats::hf_config::{Count, HfConfig};
use crate::formats::safetensors::TensorStore;
use serde::Deserialize;
use serde_json::{json, Value};

/// transformers' defaults for the keys Phi-3 reads: see `llama::defaults`.
pub fn defaults(model_type: &str) -> Value {
    match model_type {
        "phi3" => json!({
            "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
            "max_position_embeddings": 4096, "num_attention_heads": 32,
            "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "vocab_size": 32064
        }),
        _ => json!({}),
    }
}

/// Phi-3's own keys, beside `DecoderConfig`'s.
#[derive(Deserialize)]
struct Phi3Config {
    hidden_act: Activation,
    /// A window on every layer, where set.
    sliding_window: Option<Count>,
}

pub fn load<B: Backend>(be: &B, c: &HfConfig, store: &TensorStore) -> Result<Decoder<B::T>> {
    let k = DecoderConfig::read(c)?;
    let own: Phi3Config = c.typed()?;
    let s = k.shape(c)?;
    let (d, ff) = (s.d, s.ff);
    let w = WeightReader::new(be, store, "embed_tokens.weight", &["model.", ""], "Phi-3")?;
    let qkv = c.product("q/k/v widths", 1, s.qd + 2 * s.kvd)?;
    let mut layers = Vec::new();
    for i in 0..s.layers {
        let l = w.at(&format!("layers.{i}"));
        let (attn, mlp) = (l.at("self_attn"), l.at("mlp"));
        layers.push(Layer {
            input_norm: l.tensor("input_layernorm.weight", (1, d))?,
            qkv: Proj { mods: vec![attn.linear("qkv_proj", d, qkv, false)?], widths: vec![s.qd, s.kvd, s.kvd] },
            q_norm: None,
            k_norm: None,
            rotary: Some(0),
            attn: s.attention(own.sliding_window.map(|w| w.0)),
            o: attn.linear("o_proj", s.qd, d, false)?,
            attn_out_norm: None,
            mlp_norm: l.tensor("post_attention_layernorm.weight", (1, d))?,
            gate_up: Proj { mods: vec![mlp.linear("gate_up_proj", d, 2 * ff, false)?], widths: vec![ff, ff] },
            down: mlp.linear("down_proj", ff, d, false)?,
            mlp_out_norm: None,
        });
    }
    Ok(Decoder {
        model_type: c.model_type()?,
        d,
        ff,
        vocab: s.vocab,
        max_pos: s.max_pos,
        eps: s.eps,
        act: own.hidden_act,
        embed_scale: None,
        rotaries: vec![rope::standard(c, s.head_dim)?],
        embed: w.tensor("embed_tokens.weight", (s.vocab, d))?,
        layers,
        norm: w.tensor("norm.weight", (1, d))?,
        lm_head: super::decoder::lm_head(be, store, d, s.vocab, k.tie_word_embeddings)?,
        final_softcap: None,
    })
}
