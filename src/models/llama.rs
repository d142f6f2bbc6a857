//! The Llama family in `decoder`'s shape: Llama, Mistral, Qwen2, Qwen3, SmolLM (2 and 3),
//! TinyLlama. RMSNorm, rotary positions (`rope::standard`), grouped-query attention, SwiGLU; q/k/v,
//! o and MLP biases wherever the checkpoint has them (Qwen2's q/k/v); Qwen3's per-head q/k RMSNorm;
//! SmolLM3's NoPE layers (`no_rope_layers`); sliding windows (Mistral; Qwen2/Qwen3/SmolLM3 where
//! `use_sliding_window` and `layer_types` say so); tied or untied LM head.

use super::decoder::{Decoder, DecoderConfig, Layer, Proj};
use super::{rope, WeightReader};
use crate::backend::{Activation, Backend};
use crate::error::{bad_input, Result};
use crate::formats::hf_config::{Count, Dim, HfConfig};
use crate::formats::safetensors::TensorStore;
use serde::Deserialize;
use serde_json::{json, Value};

pub const MODEL_TYPES: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "smollm3"];

/// transformers' defaults for the keys this family reads, by model type: what a config that leaves a
/// key out means (`tools/config_defaults.py` prints them from transformers; tests/configs.rs holds
/// these to its output).
pub fn defaults(model_type: &str) -> Value {
    match model_type {
        "llama" => json!({
            "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
            "max_position_embeddings": 2048, "num_attention_heads": 32,
            "num_hidden_layers": 32, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "vocab_size": 32000
        }),
        "mistral" => json!({
            "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
            "vocab_size": 32000
        }),
        "qwen2" => json!({
            "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 22016,
            "max_position_embeddings": 32768, "max_window_layers": 28,
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
            "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
            "tie_word_embeddings": false, "use_sliding_window": false, "vocab_size": 151936
        }),
        "qwen3" => json!({
            "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
            "intermediate_size": 22016, "max_position_embeddings": 32768,
            "max_window_layers": 28, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 32, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
            "sliding_window": 4096, "tie_word_embeddings": false, "use_sliding_window": false,
            "vocab_size": 151936
        }),
        "smollm3" => json!({
            "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11008,
            "max_position_embeddings": 32768, "no_rope_layer_interval": 4,
            "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06, "rope_theta": 2000000.0, "tie_word_embeddings": true,
            "use_sliding_window": false, "vocab_size": 128256
        }),
        _ => json!({}),
    }
}

/// The Llama family's own keys, beside `DecoderConfig`'s.
#[derive(Deserialize)]
struct LlamaConfig {
    hidden_act: Activation,
    sliding_window: Option<Count>,
    /// Qwen2/Qwen3/SmolLM3: the layers from this one on slide (where `layer_types` does not say).
    max_window_layers: Option<Count>,
    /// Qwen2/Qwen3/SmolLM3: whether `sliding_window` applies at all.
    use_sliding_window: Option<bool>,
    /// SmolLM3: 1 where a layer has rotary positions, 0 where it has none.
    no_rope_layers: Option<Vec<u64>>,
    /// SmolLM3, without `no_rope_layers`: every this many layers, one has no positions.
    no_rope_layer_interval: Option<Dim>,
}

impl LlamaConfig {
    /// Which layers keep rotary positions: SmolLM3's `no_rope_layers`, else one NoPE layer every
    /// `no_rope_layer_interval` layers; every layer elsewhere.
    fn rope_layers(&self, c: &HfConfig, model_type: &str, layers: usize) -> Result<Vec<bool>> {
        if model_type != "smollm3" {
            return Ok(vec![true; layers]);
        }
        match &self.no_rope_layers {
            Some(l) if l.len() == layers && l.iter().all(|x| *x <= 1) => Ok(l.iter().map(|x| *x == 1).collect()),
            Some(_) => {
                Err(bad_input(&c.file, format!("\"no_rope_layers\" must list 0 or 1 for each of the {layers} layers")))
            }
            None => {
                let every = self.no_rope_layer_interval.ok_or_else(|| {
                    bad_input(&c.file, "SmolLM3 needs \"no_rope_layers\" or \"no_rope_layer_interval\"")
                })?;
                Ok((0..layers).map(|i| (i + 1) % every.0 != 0).collect())
            }
        }
    }

    /// Which layers slide their attention window: Mistral's every layer; Qwen2/Qwen3/SmolLM3's
    /// layers that `layer_types` marks (else from max_window_layers), only under
    /// use_sliding_window.
    fn sliding(&self, c: &HfConfig, k: &DecoderConfig, model_type: &str, layers: usize) -> Result<Vec<bool>> {
        let window = self.sliding_window.is_some();
        Ok(match model_type {
            "mistral" => vec![window; layers],
            "qwen2" | "qwen3" | "smollm3" => {
                let on = self.use_sliding_window.unwrap_or(false);
                let from = self.max_window_layers.map_or(0, |m| m.0);
                k.sliding(c, layers, |i| on && window && i >= from)?.into_iter().map(|t| t && on).collect()
            }
            _ => vec![false; layers],
        })
    }
}

pub fn load<B: Backend>(be: &B, c: &HfConfig, store: &TensorStore) -> Result<Decoder<B::T>> {
    let model_type = c.model_type()?;
    let k = DecoderConfig::read(c)?;
    let own: LlamaConfig = c.typed()?;
    let s = k.shape(c)?;
    let (d, ff) = (s.d, s.ff);
    let with_rope = own.rope_layers(c, &model_type, s.layers)?;
    let sliding = own.sliding(c, &k, &model_type, s.layers)?;
    let window = own.sliding_window.map(|w| w.0);
    let w = WeightReader::new(be, store, "embed_tokens.weight", &["model.", ""], "Llama-family")?;
    let mut layers = Vec::new();
    for i in 0..s.layers {
        let l = w.at(&format!("layers.{i}"));
        let (attn, mlp) = (l.at("self_attn"), l.at("mlp"));
        let norm = |n: &str| -> Result<Option<B::T>> {
            if attn.has(n) {
                Ok(Some(attn.tensor(n, (1, s.head_dim))?))
            } else if model_type == "qwen3" {
                Err(bad_input(
                    store.files[0].name.as_str(),
                    format!("missing tensor '{}' (Qwen3 normalises q and k per head)", attn.key(n)),
                ))
            } else {
                Ok(None)
            }
        };
        layers.push(Layer {
            input_norm: l.tensor("input_layernorm.weight", (1, d))?,
            qkv: Proj::qkv(&attn, &s)?,
            q_norm: norm("q_norm.weight")?,
            k_norm: norm("k_norm.weight")?,
            rotary: with_rope[i].then_some(0),
            attn: s.attention(if sliding[i] { window } else { None }),
            o: attn.linear("o_proj", s.qd, d, false)?,
            attn_out_norm: None,
            mlp_norm: l.tensor("post_attention_layernorm.weight", (1, d))?,
            gate_up: Proj::gate_up(&mlp, &s)?,
            down: mlp.linear("down_proj", ff, d, false)?,
            mlp_out_norm: None,
        });
    }
    Ok(Decoder {
        rotaries: vec![rope::standard(c, s.head_dim)?],
        lm_head: super::decoder::lm_head(be, store, d, s.vocab, k.tie_word_embeddings)?,
        model_type,
        d,
        ff,
        vocab: s.vocab,
        max_pos: s.max_pos,
        eps: s.eps,
        act: own.hidden_act,
        embed_scale: None,
        embed: w.tensor("embed_tokens.weight", (s.vocab, d))?,
        layers,
        norm: w.tensor("norm.weight", (1, d))?,
        final_softcap: None,
    })
}
