//! The pre-norm decoder every causal family here shares, written once: embeddings (optionally
//! scaled), then per layer RMSNorm → attention (q/k/v, optional per-head q/k RMSNorm, rotary
//! positions on some or all dimensions, grouped-query attention with optional sliding window and
//! soft-capping) → optional norm of the attention output → residual, RMSNorm → gated MLP → optional
//! norm of its output → residual; a final RMSNorm and a (tied or own) LM head with optional logit
//! soft-capping. Each family's file (`llama.rs`, `gemma.rs`, `phi3.rs`) reads its config and
//! weights into this shape.

use super::rope::Rotary;
use super::{Batch, Hook, Level, Linear, LinearRef, ModuleInfo, Output, Pass, WeightReader};
use crate::backend::Backend;
use crate::backend::{Activation, AttentionSpec};
use crate::error::{bad_input, Result};
use crate::formats::hf_config::{Dim, HfConfig, NonNegative};
use crate::formats::safetensors::TensorStore;
use serde::Deserialize;

/// The linear modules that read one input: separate (q, k, v; gate, up) or fused into one module
/// whose output columns are the parts side by side (Phi-3's `qkv_proj`, `gate_up_proj`).
pub struct Proj<T> {
    pub mods: Vec<Linear<T>>,
    /// Output width of each part.
    pub widths: Vec<usize>,
}

impl<T> Proj<T> {
    /// The parts' outputs, in order.
    async fn run<B: Backend<T = T>, H: Hook<B>>(&self, pass: &mut Pass<'_, B, H>, x: &T) -> Result<Vec<T>> {
        let refs: Vec<LinearRef<T>> = self.mods.iter().map(Linear::r).collect();
        let ys = pass.project(x, Level::Tokens, &refs).await?;
        if self.mods.len() == self.widths.len() {
            return Ok(ys);
        }
        let mut at = 0;
        Ok(self
            .widths
            .iter()
            .map(|w| {
                at += w;
                pass.be.slice_cols(&ys[0], at - w..at)
            })
            .collect())
    }

    /// q, k, v as three modules `{q,k,v}_proj` of the reader's `self_attn` (every family but
    /// Phi-3).
    pub fn qkv<B: Backend<T = T>>(attn: &WeightReader<B>, s: &Shape) -> Result<Proj<T>> {
        let lin = |m: &str, out: usize| attn.linear(m, s.d, out, false);
        Ok(Proj {
            mods: vec![lin("q_proj", s.qd)?, lin("k_proj", s.kvd)?, lin("v_proj", s.kvd)?],
            widths: vec![s.qd, s.kvd, s.kvd],
        })
    }

    /// gate and up as two modules `{gate,up}_proj` of the reader's `mlp` (every family but Phi-3).
    pub fn gate_up<B: Backend<T = T>>(mlp: &WeightReader<B>, s: &Shape) -> Result<Proj<T>> {
        let lin = |m: &str| mlp.linear(m, s.d, s.ff, false);
        Ok(Proj { mods: vec![lin("gate_proj")?, lin("up_proj")?], widths: vec![s.ff, s.ff] })
    }

    fn infos(&self, in_dim: usize, out: &mut Vec<ModuleInfo>) {
        if self.mods.len() == self.widths.len() {
            for (m, &w) in self.mods.iter().zip(&self.widths) {
                out.push(ModuleInfo { name: m.name.clone(), out_dim: w, in_dim });
            }
        } else {
            out.push(ModuleInfo { name: self.mods[0].name.clone(), out_dim: self.widths.iter().sum(), in_dim });
        }
    }
}

pub struct Layer<T> {
    pub input_norm: T,
    /// q, k, v.
    pub qkv: Proj<T>,
    /// Per-head RMSNorms of q and k, (1, head_dim) (Qwen3, Gemma 3).
    pub q_norm: Option<T>,
    pub k_norm: Option<T>,
    /// Index into `Decoder::rotaries`; None: this layer has no positions (SmolLM3's NoPE layers).
    pub rotary: Option<usize>,
    pub attn: AttentionSpec,
    pub o: Linear<T>,
    /// Norm of the attention output before the residual (Gemma 2/3).
    pub attn_out_norm: Option<T>,
    pub mlp_norm: T,
    /// gate, up.
    pub gate_up: Proj<T>,
    pub down: Linear<T>,
    /// Norm of the MLP output before the residual (Gemma 2/3).
    pub mlp_out_norm: Option<T>,
}

pub struct Decoder<T> {
    pub model_type: String,
    pub d: usize,
    pub ff: usize,
    pub vocab: usize,
    pub max_pos: usize,
    pub eps: f32,
    pub act: Activation,
    /// Multiplies the embeddings (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    pub rotaries: Vec<Rotary>,
    pub embed: T,
    pub layers: Vec<Layer<T>>,
    pub norm: T,
    /// None when tied to the embedding.
    pub lm_head: Option<Linear<T>>,
    /// Logits soft-capped to cap · tanh(logit / cap) (Gemma 2).
    pub final_softcap: Option<f32>,
}

impl<T> Decoder<T> {
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    pub fn modules(&self) -> Vec<ModuleInfo> {
        let mut out = Vec::new();
        for l in &self.layers {
            let qd = l.attn.heads * l.attn.head_dim;
            l.qkv.infos(self.d, &mut out);
            out.push(ModuleInfo { name: l.o.name.clone(), out_dim: self.d, in_dim: qd });
            l.gate_up.infos(self.d, &mut out);
            out.push(ModuleInfo { name: l.down.name.clone(), out_dim: self.d, in_dim: self.ff });
        }
        out.push(ModuleInfo { name: "lm_head".into(), out_dim: self.vocab, in_dim: self.d });
        out
    }

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The LM head as a linear module named `lm_head` (the embedding where tied).
    pub fn head(&self) -> LinearRef<'_, T> {
        match &self.lm_head {
            Some(l) => l.r(),
            None => LinearRef { name: "lm_head", w: &self.embed, b: None },
        }
    }

    /// The most f32 values per token row one forward pass holds at once (`Model::row_floats`),
    /// from `forward`'s scopes: the attention half holds the residual, the normed input and q,
    /// k, v (a fused projection's output too, while it is sliced), then q, k, v with the attention
    /// output; the MLP half the residual, the normed input, gate and up
    /// (and a fused output while it is sliced).
    pub fn row_floats(&self) -> usize {
        let fused = |p: &Proj<T>, total: usize| if p.mods.len() < p.widths.len() { total } else { 0 };
        let d = self.d;
        self.layers
            .iter()
            .map(|l| {
                let (qd, kvd) = (l.attn.heads * l.attn.head_dim, l.attn.kv_heads * l.attn.head_dim);
                let qkv = qd + 2 * kvd;
                let project = d + qkv + fused(&l.qkv, qkv);
                // q and k normed per head: each new one made while the old is alive, as the
                // attention output is later.
                let attend = qd + qkv;
                let gate_up = 2 * self.ff;
                let mlp = d + gate_up + fused(&l.gate_up, gate_up);
                d + project.max(attend).max(mlp)
            })
            .max()
            .unwrap_or(d)
    }

    /// Key/value width of each attention layer (what a KV cache holds per token).
    pub fn kv_widths(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.attn.kv_heads * l.attn.head_dim).collect()
    }

    pub async fn forward<B: Backend<T = T>, H: Hook<B>>(&self, pass: &mut Pass<'_, B, H>) -> Result<Option<T>> {
        let (be, batch) = (pass.be, pass.batch);
        let n = batch.tokens();
        let mut h = be.select_rows(&self.embed, &batch.ids);
        if let Some(s) = self.embed_scale {
            be.scale(&mut h, s);
        }
        // Each half of a layer in its own scope: its tensors are freed before the next half's
        // are made, so a pass holds one half's activations at a time (`Model::row_floats`).
        for (i, l) in self.layers.iter().enumerate() {
            {
                let x = be.rms_norm(&h, &l.input_norm, self.eps);
                let mut qkv = l.qkv.run(pass, &x).await?;
                drop(x);
                let v = qkv.pop().unwrap();
                let mut k = qkv.pop().unwrap();
                let mut q = qkv.pop().unwrap();
                if let Some(g) = &l.q_norm {
                    q = be.rms_norm(&q, g, self.eps);
                }
                if let Some(g) = &l.k_norm {
                    k = be.rms_norm(&k, g, self.eps);
                }
                if let Some(r) = l.rotary.map(|r| &self.rotaries[r]) {
                    rotate(be, &mut q, batch, l.attn.head_dim, r);
                    rotate(be, &mut k, batch, l.attn.head_dim, r);
                }
                let a = pass.attention(i, &q, &k, &v, &l.attn);
                drop((q, k, v));
                let mut o = pass.project1(&a, l.o.r()).await?;
                drop(a);
                if let Some(g) = &l.attn_out_norm {
                    o = be.rms_norm(&o, g, self.eps);
                }
                be.add_rows(&mut h, 0..n, &o, 1.0);
            }
            let x = be.rms_norm(&h, &l.mlp_norm, self.eps);
            let mut gu = l.gate_up.run(pass, &x).await?;
            drop(x);
            let up = gu.pop().unwrap();
            let mut gate = gu.pop().unwrap();
            be.activate(&mut gate, self.act);
            be.mul(&mut gate, &up);
            drop(up);
            let mut o = pass.project1(&gate, l.down.r()).await?;
            drop(gate);
            if let Some(g) = &l.mlp_out_norm {
                o = be.rms_norm(&o, g, self.eps);
            }
            be.add_rows(&mut h, 0..n, &o, 1.0);
        }
        let h = be.rms_norm(&h, &self.norm, self.eps);
        if pass.output == Output::Hidden {
            return Ok(Some(h));
        }
        let mut logits = pass.lm_head(h, self.head()).await?;
        if let (Some(cap), Some(y)) = (self.final_softcap, logits.as_mut()) {
            be.scale(y, 1.0 / cap);
            be.activate(y, Activation::Tanh);
            be.scale(y, cap);
        }
        Ok(logits)
    }
}

/// Rotary positions on every row of x; with longrope, the rows of sequences past the original
/// context turn by the long factors (computed for all rows and copied over those rows: the
/// rare mixed batch costs one more rotation).
pub(super) fn rotate<B: Backend>(be: &B, x: &mut B::T, batch: &Batch, head_dim: usize, r: &Rotary) {
    let pos = &batch.positions;
    let long: Vec<u32> = batch
        .seqs
        .iter()
        .filter(|s| pos[s.start..s.end].iter().max().is_some_and(|&last| r.is_long(last)))
        .flat_map(|s| s.start as u32..s.end as u32)
        .collect();
    let Some(l) = r.long.as_ref().filter(|_| !long.is_empty()) else {
        return be.rope(x, pos, head_dim, &r.inv_freq, r.scale);
    };
    if long.len() == pos.len() {
        return be.rope(x, pos, head_dim, &l.inv_freq, r.scale);
    }
    let n = pos.len();
    let mut x_long = be.mix_rows(x, 0..n, 1.0, x, 0..n, 0.0);
    be.rope(&mut x_long, pos, head_dim, &l.inv_freq, r.scale);
    be.rope(x, pos, head_dim, &r.inv_freq, r.scale);
    be.write_rows(x, &long, &be.select_rows(&x_long, &long));
}

/// The keys every decoder family reads, under Llama's names (which Mistral, Qwen, Gemma and Phi-3
/// share). Their defaults are each model type's (`models::defaults`), filled in before.
#[derive(Deserialize)]
pub struct DecoderConfig {
    hidden_size: Dim,
    num_attention_heads: Dim,
    /// Grouped-query attention; default: one per attention head.
    num_key_value_heads: Option<Dim>,
    /// Default: hidden_size / num_attention_heads.
    head_dim: Option<Dim>,
    num_hidden_layers: Dim,
    intermediate_size: Dim,
    vocab_size: Dim,
    max_position_embeddings: Dim,
    rms_norm_eps: NonNegative,
    /// Whether the LM head is the embedding.
    pub tie_word_embeddings: bool,
    /// Each layer's attention, where the config lists it (else a family rule decides).
    layer_types: Option<Vec<LayerType>>,
}

/// A layer's attention in `layer_types`.
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LayerType {
    Sliding,
    Full,
}

impl TryFrom<String> for LayerType {
    type Error = String;
    fn try_from(t: String) -> std::result::Result<Self, String> {
        match t.as_str() {
            "sliding_attention" => Ok(LayerType::Sliding),
            "full_attention" => Ok(LayerType::Full),
            _ => Err(format!("\"{t}\" is not supported (supported: sliding_attention, full_attention)")),
        }
    }
}

impl DecoderConfig {
    pub fn read(c: &HfConfig) -> Result<DecoderConfig> {
        c.typed()
    }

    pub fn shape(&self, c: &HfConfig) -> Result<Shape> {
        let (d, heads) = (self.hidden_size.0, self.num_attention_heads.0);
        let kv_heads = self.num_key_value_heads.map_or(heads, |h| h.0);
        if heads % kv_heads != 0 {
            return Err(bad_input(
                &c.file,
                format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(h) => h.0,
            None if d >= heads => d / heads,
            None => {
                return Err(bad_input(&c.file, format!("hidden_size {d} is smaller than num_attention_heads {heads}")))
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad_input(&c.file, format!("head_dim {head_dim} must be even")));
        }
        Ok(Shape {
            d,
            heads,
            kv_heads,
            head_dim,
            layers: self.num_hidden_layers.0,
            ff: self.intermediate_size.0,
            vocab: self.vocab_size.0,
            qd: c.product("num_attention_heads × head_dim", heads, head_dim)?,
            kvd: c.product("num_key_value_heads × head_dim", kv_heads, head_dim)?,
            max_pos: self.max_position_embeddings.0,
            eps: self.rms_norm_eps.0 as f32,
        })
    }

    /// Whether each layer slides its attention window: from `layer_types` where the config has
    /// them (one per layer), else from `rule`.
    pub fn sliding(&self, c: &HfConfig, layers: usize, rule: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
        match &self.layer_types {
            None => Ok((0..layers).map(rule).collect()),
            Some(t) if t.len() == layers => Ok(t.iter().map(|t| *t == LayerType::Sliding).collect()),
            Some(_) => Err(bad_input(&c.file, format!("\"layer_types\" must list one type per layer ({layers})"))),
        }
    }
}

/// The sizes every decoder config gives.
pub struct Shape {
    pub d: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub ff: usize,
    pub vocab: usize,
    /// heads × head_dim, kv_heads × head_dim.
    pub qd: usize,
    pub kvd: usize,
    pub max_pos: usize,
    pub eps: f32,
}

impl Shape {
    /// Causal attention with the usual 1/√head_dim scale.
    pub fn attention(&self, window: Option<usize>) -> AttentionSpec {
        AttentionSpec {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: true,
            window,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            softcap: None,
        }
    }
}

/// The LM head, which lives outside the `model.` prefix; None when tied to the embedding
/// (`tied`: `tie_word_embeddings`, whose default differs by family).
pub fn lm_head<B: Backend>(
    be: &B,
    store: &TensorStore,
    d: usize,
    vocab: usize,
    tied: bool,
) -> Result<Option<Linear<B::T>>> {
    if store.contains("lm_head.weight") && !tied {
        Ok(Some(WeightReader::unprefixed(be, store).linear("lm_head", d, vocab, false)?))
    } else {
        Ok(None)
    }
}
