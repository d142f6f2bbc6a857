//! The Llama family in `decoder`'s shape: Llama, Mistral, Qwen2, Qwen3, SmolLM (2 and 3),
//! TinyLlama. RMSNorm, rotary positions (`rope::standard`), grouped-query attention, SwiGLU; q/k/v,
//! o and MLP biases wherever the checkpoint has them (Qwen2's q/k/v); Qwen3's per-head q/k RMSNorm;
//! SmolLM3's NoPE layers (`no_rope_layers`); sliding windows (Mistral; Qwen2/Qwen3/SmolLM3 where
//! `use_sliding_window` and `layer_types` say so); tied or untied LM head.

use super::decoder::{activation, layer_types, Decoder, Layer, Proj, Shape};
use super::{rope, WeightReader};
use crate::backend::Backend;
use crate::error::{bad_input, Result};
use crate::formats::hf_config::HfConfig;
use crate::formats::safetensors::TensorStore;

pub const MODEL_TYPES: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "smollm3"];

/// Which layers keep rotary positions: SmolLM3's `no_rope_layers` (1: rope, 0: none), or one NoPE
/// layer every `no_rope_layer_interval` (4) layers; every layer elsewhere.
fn rope_layers(c: &HfConfig, model_type: &str, layers: usize) -> Result<Vec<bool>> {
    if model_type != "smollm3" {
        return Ok(vec![true; layers]);
    }
    match c.get("no_rope_layers") {
        Some(v) => {
            let l: Option<Vec<bool>> = v
                .as_array()
                .filter(|l| l.len() == layers)
                .and_then(|l| l.iter().map(|x| x.as_u64().filter(|x| *x <= 1).map(|x| x == 1)).collect());
            l.ok_or_else(|| {
                bad_input(&c.file, format!("\"no_rope_layers\" must list 0 or 1 for each of the {layers} layers"))
            })
        }
        None => {
            let every = c.dim_or("no_rope_layer_interval", 4)?;
            Ok((0..layers).map(|i| (i + 1) % every != 0).collect())
        }
    }
}

pub fn load<B: Backend>(be: &B, c: &HfConfig, store: &TensorStore) -> Result<Decoder<B::T>> {
    let model_type = c.model_type()?;
    let s = Shape::read(c)?;
    let (d, ff) = (s.d, s.ff);
    let act = activation(c, "hidden_act", "silu")?;
    let with_rope = rope_layers(c, &model_type, s.layers)?;
    // Sliding windows: Mistral on every layer; the others on the layers `layer_types` marks
    // sliding (else from max_window_layers), only where use_sliding_window is set.
    let window = c.usize_opt("sliding_window")?;
    let sliding = match model_type.as_str() {
        "mistral" => vec![window.is_some(); s.layers],
        "qwen2" | "qwen3" | "smollm3" => {
            let from = c.usize_or("max_window_layers", 0)?;
            let on = c.bool_or("use_sliding_window", false)?;
            layer_types(c, s.layers, |i| on && window.is_some() && i >= from)?.into_iter().map(|t| t && on).collect()
        }
        _ => vec![false; s.layers],
    };
    let w = WeightReader::new(be, store, "embed_tokens.weight", &["model.", ""], "Llama-family")?;
    let mut layers = Vec::new();
    for i in 0..s.layers {
        let p = format!("layers.{i}");
        let norm = |n: &str| -> Result<Option<B::T>> {
            let name = format!("{p}.self_attn.{n}.weight");
            if w.has(&name) {
                Ok(Some(w.tensor(&name, (1, s.head_dim))?))
            } else if model_type == "qwen3" {
                Err(bad_input(
                    store.files[0].name.as_str(),
                    format!("missing tensor '{}{name}' (Qwen3 normalises q and k per head)", w.prefix),
                ))
            } else {
                Ok(None)
            }
        };
        layers.push(Layer {
            input_norm: w.tensor(&format!("{p}.input_layernorm.weight"), (1, d))?,
            qkv: Proj::qkv(&w, &p, &s)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            rotary: with_rope[i].then_some(0),
            attn: s.attention(if sliding[i] { window } else { None }),
            o: w.linear(&format!("{p}.self_attn.o_proj"), s.qd, d, false)?,
            attn_out_norm: None,
            mlp_norm: w.tensor(&format!("{p}.post_attention_layernorm.weight"), (1, d))?,
            gate_up: Proj::gate_up(&w, &p, &s)?,
            down: w.linear(&format!("{p}.mlp.down_proj"), ff, d, false)?,
            mlp_out_norm: None,
        });
    }
    Ok(Decoder {
        rotaries: vec![rope::standard(c, s.head_dim)?],
        lm_head: super::decoder::lm_head(be, c, store, d, s.vocab, false)?,
        model_type,
        d,
        ff,
        vocab: s.vocab,
        max_pos: s.max_pos,
        eps: s.eps,
        act,
        embed_scale: None,
        embed: w.tensor("embed_tokens.weight", (s.vocab, d))?,
        layers,
        norm: w.tensor("norm.weight", (1, d))?,
        final_softcap: None,
    })
}
