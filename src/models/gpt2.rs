//! GPT-2: learned positions, pre-LayerNorm blocks, fused q/k/v (`c_attn`), `Conv1D` weights stored
//! (in, out), GELU (tanh), LM head tied to the token embedding.

use super::{Hook, Linear, LinearRef, ModuleInfo, Output, Pass, WeightReader};
use crate::backend::Backend;
use crate::backend::{Activation, AttentionSpec};
use crate::error::{bad_input, Result};
use crate::formats::hf_config::{Dim, HfConfig, NonNegative};
use crate::formats::safetensors::TensorStore;
use serde::Deserialize;
use serde_json::{json, Value};

struct Block<T> {
    ln_1: (T, Option<T>),
    c_attn: Linear<T>,
    c_proj: Linear<T>,
    ln_2: (T, Option<T>),
    c_fc: Linear<T>,
    mlp_proj: Linear<T>,
    attn: AttentionSpec,
}

pub struct Gpt2<T> {
    d: usize,
    ff: usize,
    vocab: usize,
    n_positions: usize,
    eps: f32,
    act: Activation,
    wte: T,
    wpe: T,
    blocks: Vec<Block<T>>,
    ln_f: (T, Option<T>),
}

impl<T> Gpt2<T> {
    pub fn model_type(&self) -> &str {
        "gpt2"
    }

    pub fn modules(&self) -> Vec<ModuleInfo> {
        let (d, ff) = (self.d, self.ff);
        let mut out = Vec::new();
        for i in 0..self.blocks.len() {
            out.push(ModuleInfo { name: format!("h.{i}.attn.c_attn"), out_dim: 3 * d, in_dim: d });
            out.push(ModuleInfo { name: format!("h.{i}.attn.c_proj"), out_dim: d, in_dim: d });
            out.push(ModuleInfo { name: format!("h.{i}.mlp.c_fc"), out_dim: ff, in_dim: d });
            out.push(ModuleInfo { name: format!("h.{i}.mlp.c_proj"), out_dim: d, in_dim: ff });
        }
        out.push(ModuleInfo { name: "lm_head".into(), out_dim: self.vocab, in_dim: d });
        out
    }

    pub fn max_positions(&self) -> usize {
        self.n_positions
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The most f32 values per token row one forward pass holds at once (`Model::row_floats`):
    /// the residual with the fused q/k/v output and its three slices (7d), or the residual, the
    /// MLP's input or output and its intermediate.
    pub fn row_floats(&self) -> usize {
        (7 * self.d).max(2 * self.d + self.ff)
    }

    /// Key/value width of each attention layer (what a KV cache holds per token).
    pub fn kv_widths(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.attn.kv_heads * b.attn.head_dim).collect()
    }

    pub fn fan_in_fan_out(&self) -> bool {
        true
    }

    pub async fn forward<B: Backend<T = T>, H: Hook<B>>(&self, pass: &mut Pass<'_, B, H>) -> Result<Option<T>> {
        let be = pass.be;
        let batch = pass.batch;
        let mut h = be.select_rows(&self.wte, &batch.ids);
        let pos = be.select_rows(&self.wpe, &batch.positions);
        be.add_rows(&mut h, 0..batch.tokens(), &pos, 1.0);
        drop(pos);
        // Each tensor is freed as soon as the next is made: a pass holds the residual stream and
        // at most a few of a layer's tensors at a time (`Model::row_floats`).
        for (i, b) in self.blocks.iter().enumerate() {
            let n = batch.tokens();
            let d = self.d;
            let x = be.layer_norm(&h, &b.ln_1.0, b.ln_1.1.as_ref(), self.eps);
            let qkv = pass.project1(&x, b.c_attn.r()).await?;
            drop(x);
            let (q, k, v) =
                (be.slice_cols(&qkv, 0..d), be.slice_cols(&qkv, d..2 * d), be.slice_cols(&qkv, 2 * d..3 * d));
            drop(qkv);
            let a = pass.attention(i, &q, &k, &v, &b.attn);
            drop((q, k, v));
            let o = pass.project1(&a, b.c_proj.r()).await?;
            drop(a);
            be.add_rows(&mut h, 0..n, &o, 1.0);
            drop(o);
            let x = be.layer_norm(&h, &b.ln_2.0, b.ln_2.1.as_ref(), self.eps);
            let mut f = pass.project1(&x, b.c_fc.r()).await?;
            drop(x);
            be.activate(&mut f, self.act);
            let o = pass.project1(&f, b.mlp_proj.r()).await?;
            drop(f);
            be.add_rows(&mut h, 0..n, &o, 1.0);
        }
        let h = be.layer_norm(&h, &self.ln_f.0, self.ln_f.1.as_ref(), self.eps);
        match pass.output {
            Output::Hidden => Ok(Some(h)),
            _ => {
                let head = LinearRef { name: "lm_head", w: &self.wte, b: None };
                pass.lm_head(h, head).await
            }
        }
    }
}

/// transformers' defaults for the keys GPT-2 reads: see `llama::defaults`.
pub fn defaults(model_type: &str) -> Value {
    match model_type {
        "gpt2" => json!({
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05, "n_embd": 768,
            "n_head": 12, "n_layer": 12, "n_positions": 1024,
            "scale_attn_by_inverse_layer_idx": false, "scale_attn_weights": true,
            "vocab_size": 50257
        }),
        _ => json!({}),
    }
}

/// GPT-2's keys.
#[derive(Deserialize)]
struct Gpt2Config {
    n_embd: Dim,
    n_head: Dim,
    n_layer: Dim,
    vocab_size: Dim,
    n_positions: Dim,
    /// The MLP's width; default 4 × n_embd.
    n_inner: Option<Dim>,
    activation_function: Activation,
    scale_attn_weights: bool,
    scale_attn_by_inverse_layer_idx: bool,
    layer_norm_epsilon: NonNegative,
}

impl<T> Gpt2<T> {
    pub fn load<B: Backend<T = T>>(be: &B, c: &HfConfig, store: &TensorStore) -> Result<Gpt2<T>> {
        let k: Gpt2Config = c.typed()?;
        let (d, heads, layers, vocab) = (k.n_embd.0, k.n_head.0, k.n_layer.0, k.vocab_size.0);
        let n_positions = k.n_positions.0;
        let ff = match k.n_inner {
            Some(f) => f.0,
            None => c.product("4 × n_embd", 4, d)?,
        };
        let qkv = c.product("3 × n_embd", 3, d)?;
        if d % heads != 0 {
            return Err(bad_input(&c.file, format!("n_embd {d} is not a multiple of n_head {heads}")));
        }
        let hd = d / heads;
        let (scale_attn, by_layer) = (k.scale_attn_weights, k.scale_attn_by_inverse_layer_idx);
        let (eps, act) = (k.layer_norm_epsilon.0 as f32, k.activation_function);
        let w = WeightReader::new(be, store, "wte.weight", &["", "transformer."], "GPT-2")?;
        let mut blocks = Vec::new();
        for i in 0..layers {
            let h = w.at(&format!("h.{i}"));
            let (attn, mlp) = (h.at("attn"), h.at("mlp"));
            let mut scale = if scale_attn { 1.0 / (hd as f32).sqrt() } else { 1.0 };
            if by_layer {
                scale /= (i + 1) as f32;
            }
            blocks.push(Block {
                ln_1: h.norm("ln_1", d, true)?,
                c_attn: attn.linear("c_attn", d, qkv, true)?,
                c_proj: attn.linear("c_proj", d, d, true)?,
                ln_2: h.norm("ln_2", d, true)?,
                c_fc: mlp.linear("c_fc", d, ff, true)?,
                mlp_proj: mlp.linear("c_proj", ff, d, true)?,
                attn: AttentionSpec {
                    heads,
                    kv_heads: heads,
                    head_dim: hd,
                    causal: true,
                    window: None,
                    scale,
                    softcap: None,
                },
            });
        }
        Ok(Gpt2 {
            d,
            ff,
            vocab,
            n_positions,
            eps,
            act,
            wte: w.tensor("wte.weight", (vocab, d))?,
            wpe: w.tensor("wpe.weight", (n_positions, d))?,
            blocks,
            ln_f: w.norm("ln_f", d, true)?,
        })
    }
}
