//! The BERT family (BERT, MiniLM): absolute positions, token type 0, post-LayerNorm blocks, GELU,
//! bidirectional attention, and the pooler (`pooler.dense` + tanh on each sequence's first token).

use super::{Hook, Level, Linear, ModuleInfo, Output, Pass, WeightReader};
use crate::backend::Backend;
use crate::backend::{Activation, AttentionSpec};
use crate::error::{bad_input, Result};
use crate::formats::hf_config::{Dim, HfConfig, NonNegative};
use crate::formats::safetensors::TensorStore;
use serde::Deserialize;
use serde_json::{json, Value};

struct Layer<T> {
    query: Linear<T>,
    key: Linear<T>,
    value: Linear<T>,
    attn_out: Linear<T>,
    attn_norm: (T, Option<T>),
    intermediate: Linear<T>,
    output: Linear<T>,
    out_norm: (T, Option<T>),
}

pub struct Bert<T> {
    d: usize,
    vocab: usize,
    ff: usize,
    max_pos: usize,
    eps: f32,
    act: Activation,
    attn: AttentionSpec,
    word: T,
    position: T,
    /// Token type 0's embedding, (1, d): every sample is one segment.
    token_type0: T,
    emb_norm: (T, Option<T>),
    layers: Vec<Layer<T>>,
    pooler: Option<Linear<T>>,
}

impl<T> Bert<T> {
    pub fn model_type(&self) -> &str {
        "bert"
    }

    pub fn modules(&self) -> Vec<ModuleInfo> {
        let (d, ff) = (self.d, self.ff);
        let mut out = Vec::new();
        for l in &self.layers {
            for (m, o, i) in [
                (&l.query, d, d),
                (&l.key, d, d),
                (&l.value, d, d),
                (&l.attn_out, d, d),
                (&l.intermediate, ff, d),
                (&l.output, d, ff),
            ] {
                out.push(ModuleInfo { name: m.name.clone(), out_dim: o, in_dim: i });
            }
        }
        if let Some(p) = &self.pooler {
            out.push(ModuleInfo { name: p.name.clone(), out_dim: d, in_dim: d });
        }
        out
    }

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Key/value width of each attention layer (what a KV cache holds per token).
    /// The most f32 values per token row one forward pass holds at once (`Model::row_floats`):
    /// the attention half holds h, q, k, v and the attention output; the MLP half h, the
    /// intermediate and the output.
    pub fn row_floats(&self) -> usize {
        (5 * self.d).max(2 * self.d + self.ff)
    }

    pub fn kv_widths(&self) -> Vec<usize> {
        vec![self.attn.kv_heads * self.attn.head_dim; self.layers.len()]
    }

    pub async fn forward<B: Backend<T = T>, H: Hook<B>>(&self, pass: &mut Pass<'_, B, H>) -> Result<Option<T>> {
        let (be, batch) = (pass.be, pass.batch);
        let n = batch.tokens();
        let mut e = be.select_rows(&self.word, &batch.ids);
        let pos = be.select_rows(&self.position, &batch.positions);
        be.add_rows(&mut e, 0..n, &pos, 1.0);
        be.add_bias(&mut e, &self.token_type0);
        let mut h = be.layer_norm(&e, &self.emb_norm.0, self.emb_norm.1.as_ref(), self.eps);
        drop((e, pos));
        // Each half of a layer in its own scope, so a pass holds one half's tensors at a time
        // (`Model::row_floats`).
        for (i, l) in self.layers.iter().enumerate() {
            h = {
                let mut qkv = pass.project(&h, Level::Tokens, &[l.query.r(), l.key.r(), l.value.r()]).await?;
                let (v, k, q) = (qkv.pop().unwrap(), qkv.pop().unwrap(), qkv.pop().unwrap());
                let a = pass.attention(i, &q, &k, &v, &self.attn);
                drop((q, k, v));
                let mut o = pass.project1(&a, l.attn_out.r()).await?;
                drop(a);
                be.add_rows(&mut o, 0..n, &h, 1.0);
                be.layer_norm(&o, &l.attn_norm.0, l.attn_norm.1.as_ref(), self.eps)
            };
            h = {
                let mut f = pass.project1(&h, l.intermediate.r()).await?;
                be.activate(&mut f, self.act);
                let mut o = pass.project1(&f, l.output.r()).await?;
                drop(f);
                be.add_rows(&mut o, 0..n, &h, 1.0);
                be.layer_norm(&o, &l.out_norm.0, l.out_norm.1.as_ref(), self.eps)
            };
        }
        if let Some(p) = &self.pooler {
            let first = be.select_rows(&h, &batch.first_tokens());
            let mut pooled = pass.project(&first, Level::Sequences, &[p.r()]).await?.pop().unwrap();
            be.activate(&mut pooled, Activation::Tanh);
        }
        Ok((pass.output != Output::Nothing).then_some(h))
    }
}

/// transformers' defaults for the keys BERT reads: see `llama::defaults`.
pub fn defaults(model_type: &str) -> Value {
    match model_type {
        "bert" => json!({
            "hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 3072,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "num_attention_heads": 12,
            "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 30522
        }),
        _ => json!({}),
    }
}

/// BERT's keys.
#[derive(Deserialize)]
struct BertConfig {
    hidden_size: Dim,
    num_attention_heads: Dim,
    num_hidden_layers: Dim,
    intermediate_size: Dim,
    vocab_size: Dim,
    max_position_embeddings: Dim,
    type_vocab_size: Dim,
    /// Read only to refuse the relative forms.
    #[serde(default)]
    #[allow(dead_code)]
    position_embedding_type: PositionEmbedding,
    hidden_act: Activation,
    layer_norm_eps: NonNegative,
}

/// `position_embedding_type`: only learned absolute positions are supported.
#[derive(Default, Deserialize)]
#[serde(try_from = "String")]
struct PositionEmbedding;

impl TryFrom<String> for PositionEmbedding {
    type Error = String;
    fn try_from(t: String) -> std::result::Result<Self, String> {
        match t.as_str() {
            "absolute" => Ok(PositionEmbedding),
            _ => Err(format!("\"{t}\" is not supported (only absolute)")),
        }
    }
}

impl<T> Bert<T> {
    pub fn load<B: Backend<T = T>>(be: &B, c: &HfConfig, store: &TensorStore) -> Result<Bert<T>> {
        let k: BertConfig = c.typed()?;
        let (d, heads, layers_n, ff) =
            (k.hidden_size.0, k.num_attention_heads.0, k.num_hidden_layers.0, k.intermediate_size.0);
        let (vocab, max_pos, types) = (k.vocab_size.0, k.max_position_embeddings.0, k.type_vocab_size.0);
        if d % heads != 0 {
            return Err(bad_input(
                &c.file,
                format!("hidden_size {d} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        let (act, eps) = (k.hidden_act, k.layer_norm_eps.0 as f32);
        let w = WeightReader::new(be, store, "embeddings.word_embeddings.weight", &["", "bert."], "BERT")?;
        let mut layers = Vec::new();
        for i in 0..layers_n {
            let l = w.at(&format!("encoder.layer.{i}"));
            let (attn, out) = (l.at("attention"), l.at("output"));
            layers.push(Layer {
                query: attn.linear("self.query", d, d, false)?,
                key: attn.linear("self.key", d, d, false)?,
                value: attn.linear("self.value", d, d, false)?,
                attn_out: attn.linear("output.dense", d, d, false)?,
                attn_norm: attn.norm("output.LayerNorm", d, true)?,
                intermediate: l.linear("intermediate.dense", d, ff, false)?,
                output: out.linear("dense", ff, d, false)?,
                out_norm: out.norm("LayerNorm", d, true)?,
            });
        }
        let tt = w.mat("embeddings.token_type_embeddings.weight", (types, d))?;
        let pooler = if w.has("pooler.dense.weight") { Some(w.linear("pooler.dense", d, d, false)?) } else { None };
        Ok(Bert {
            d,
            vocab,
            ff,
            max_pos,
            eps,
            act,
            attn: AttentionSpec {
                heads,
                kv_heads: heads,
                head_dim: d / heads,
                causal: false,
                window: None,
                scale: 1.0 / ((d / heads) as f32).sqrt(),
                softcap: None,
            },
            word: w.tensor("embeddings.word_embeddings.weight", (vocab, d))?,
            position: w.tensor("embeddings.position_embeddings.weight", (max_pos, d))?,
            token_type0: be.upload(&crate::mat::Mat::new(1, d, tt.row(0).to_vec())),
            emb_norm: w.norm("embeddings.LayerNorm", d, true)?,
            layers,
            pooler,
        })
    }
}
