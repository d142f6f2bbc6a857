//! Gemma 2 and Gemma 3 (`gemma2`, `gemma3_text`, and the text part of a multimodal `gemma3`) in
//! `decoder`'s shape: embeddings scaled by √hidden, RMSNorm with (1 + w), norms before *and after*
//! attention and the MLP, GeGLU (tanh GELU), attention scaled by `query_pre_attn_scalar`^−½, a tied
//! head. Gemma 2: alternating sliding/full layers, attention and final-logit soft-capping. Gemma 3:
//! per-head q/k RMSNorm, `layer_types` (else one full layer in `sliding_window_pattern`), local and
//! global rotary bases (`rope::gemma3`).

use super::decoder::{activation, layer_types, positive_opt, Decoder, Layer, Proj, Shape};
use super::{rope, WeightReader};
use crate::backend::Backend;
use crate::error::{bad_input, Result};
use crate::formats::hf_config::HfConfig;
use crate::formats::safetensors::{Dtype, TensorStore};
use crate::mat::Mat;

pub const MODEL_TYPES: [&str; 3] = ["gemma2", "gemma3_text", "gemma3"];

/// A multimodal `gemma3` config holds the text model's in `text_config`; its weights sit under
/// `language_model.` (see `load`).
pub fn text_config(c: &HfConfig) -> Result<HfConfig> {
    if c.model_type()? != "gemma3" {
        return Ok(HfConfig { file: c.file.clone(), raw: c.raw.clone() });
    }
    let mut t = c.get("text_config").filter(|t| t.is_object()).cloned().ok_or_else(|| {
        bad_input(&c.file, "model_type \"gemma3\" without a \"text_config\": cannot find the language model")
    })?;
    t["model_type"] = "gemma3_text".into();
    Ok(HfConfig { file: format!("{} (text_config)", c.file), raw: t })
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

pub fn load<B: Backend>(be: &B, config: &HfConfig, store: &TensorStore) -> Result<Decoder<B::T>> {
    let outer = config.model_type()?;
    let c = &text_config(config)?;
    let gemma3 = outer != "gemma2";
    if c.bool_or("use_bidirectional_attention", false)? {
        return Err(bad_input(
            &c.file,
            "use_bidirectional_attention (an embedding model) is not supported: only causal Gemma models are",
        ));
    }
    // Gemma 3's defaults for a multimodal text_config that leaves them out (Gemma3TextConfig's).
    let s = Shape::read(c)?;
    let (d, ff) = (s.d, s.ff);
    let act = activation(c, "hidden_activation", "gelu_pytorch_tanh")?;
    let window = Some(c.dim_or("sliding_window", 4096)?);
    let pattern = c.dim_or("sliding_window_pattern", if gemma3 { 6 } else { 2 })?;
    let sliding = layer_types(c, s.layers, |i| (i + 1) % pattern != 0)?;
    let scalar = c.positive_or("query_pre_attn_scalar", 256.0)?;
    let attn_softcap = positive_opt(c, "attn_logit_softcapping")?.map(|x| x as f32);
    let final_softcap = positive_opt(c, "final_logit_softcapping")?.map(|x| x as f32);
    let rotaries = if gemma3 {
        vec![rope::gemma3(c, "full_attention", s.head_dim)?, rope::gemma3(c, "sliding_attention", s.head_dim)?]
    } else {
        vec![rope::standard(c, s.head_dim)?]
    };
    let prefixes = ["model.", "", "language_model.model.", "model.language_model."];
    let w = WeightReader::new(be, store, "embed_tokens.weight", &prefixes, "Gemma")?;
    // Gemma's RMSNorm multiplies by (1 + w), in f32 as transformers does: added here, once.
    let norm = |name: &str, width: usize| -> Result<B::T> {
        let g = w.mat(name, (1, width))?;
        Ok(be.upload(&Mat::new(1, width, g.data.iter().map(|x| 1.0 + x).collect())))
    };
    let mut layers = Vec::new();
    for (i, &sliding) in sliding.iter().enumerate() {
        let p = format!("layers.{i}");
        let mut attn = s.attention(if sliding { window } else { None });
        attn.scale = (1.0 / scalar.sqrt()) as f32;
        attn.softcap = attn_softcap;
        let qk_norm = |n: &str| -> Result<Option<B::T>> {
            Ok(if gemma3 { Some(norm(&format!("{p}.self_attn.{n}.weight"), s.head_dim)?) } else { None })
        };
        layers.push(Layer {
            input_norm: norm(&format!("{p}.input_layernorm.weight"), d)?,
            qkv: Proj::qkv(&w, &p, &s)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            rotary: Some(if gemma3 && sliding { 1 } else { 0 }),
            attn,
            o: w.linear(&format!("{p}.self_attn.o_proj"), s.qd, d, false)?,
            attn_out_norm: Some(norm(&format!("{p}.post_attention_layernorm.weight"), d)?),
            mlp_norm: norm(&format!("{p}.pre_feedforward_layernorm.weight"), d)?,
            gate_up: Proj::gate_up(&w, &p, &s)?,
            down: w.linear(&format!("{p}.mlp.down_proj"), ff, d, false)?,
            mlp_out_norm: Some(norm(&format!("{p}.post_feedforward_layernorm.weight"), d)?),
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
        embed_scale: Some(embed_scale(store, &w.prefix, d)),
        rotaries,
        embed: w.tensor("embed_tokens.weight", (s.vocab, d))?,
        layers,
        norm: norm("norm.weight", d)?,
        lm_head: super::decoder::lm_head(be, c, store, d, s.vocab, true)?,
        final_softcap,
    })
}
