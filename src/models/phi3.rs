//! Phi-3 and Phi-4-mini (`phi3`) in `decoder`'s shape: Llama-like, but q/k/v fused into one
//! `qkv_proj` and gate/up into one `gate_up_proj` (each one LoRA target, split after the product),
//! rotary positions on `partial_rotary_factor` of each head (Phi-4-mini: 0.75) with `longrope`
//! scaling (`rope::standard`), and a sliding window on every layer where the config sets one.

use super::decoder::{activation, Decoder, Layer, Proj, Shape};
use super::{rope, WeightReader};
use crate::backend::Backend;
use crate::error::Result;
use crate::formats::hf_config::HfConfig;
use crate::formats::safetensors::TensorStore;

pub fn load<B: Backend>(be: &B, c: &HfConfig, store: &TensorStore) -> Result<Decoder<B::T>> {
    let s = Shape::read(c)?;
    let (d, ff) = (s.d, s.ff);
    let act = activation(c, "hidden_act", "silu")?;
    let window = c.usize_opt("sliding_window")?;
    let w = WeightReader::new(be, store, "embed_tokens.weight", &["model.", ""], "Phi-3")?;
    let qkv = c.product("q/k/v widths", 1, s.qd + 2 * s.kvd)?;
    let mut layers = Vec::new();
    for i in 0..s.layers {
        let p = format!("layers.{i}");
        layers.push(Layer {
            input_norm: w.tensor(&format!("{p}.input_layernorm.weight"), (1, d))?,
            qkv: Proj {
                mods: vec![w.linear(&format!("{p}.self_attn.qkv_proj"), d, qkv, false)?],
                widths: vec![s.qd, s.kvd, s.kvd],
            },
            q_norm: None,
            k_norm: None,
            rotary: Some(0),
            attn: s.attention(window),
            o: w.linear(&format!("{p}.self_attn.o_proj"), s.qd, d, false)?,
            attn_out_norm: None,
            mlp_norm: w.tensor(&format!("{p}.post_attention_layernorm.weight"), (1, d))?,
            gate_up: Proj {
                mods: vec![w.linear(&format!("{p}.mlp.gate_up_proj"), d, 2 * ff, false)?],
                widths: vec![ff, ff],
            },
            down: w.linear(&format!("{p}.mlp.down_proj"), ff, d, false)?,
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
        act,
        embed_scale: None,
        rotaries: vec![rope::standard(c, s.head_dim)?],
        embed: w.tensor("embed_tokens.weight", (s.vocab, d))?,
        layers,
        norm: w.tensor("norm.weight", (1, d))?,
        lm_head: super::decoder::lm_head(be, c, store, d, s.vocab, false)?,
        final_softcap: None,
    })
}
