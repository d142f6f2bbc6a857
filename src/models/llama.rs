//! The Llama family (Llama, Mistral, Qwen2, SmolLM, TinyLlama): RMSNorm, rotary positions (with
//! `linear` / `llama3` rope scaling), grouped-query attention, SwiGLU, optional q/k/v/o and MLP
//! biases (Qwen2 has q/k/v bias; a bias is used wherever the checkpoint has one), sliding windows
//! (Mistral; Qwen2 when `use_sliding_window`), tied or untied LM head.

use super::{Hook, Level, Linear, LinearRef, ModuleInfo, Output, Pass, WeightReader};
use crate::backend::{Activation, AttentionSpec, Backend};
use crate::error::{bad_input, Result};
use crate::formats::hf_config::HfConfig;
use crate::formats::safetensors::TensorStore;
use serde_json::Value;

struct Layer<T> {
    input_norm: T,
    q: Linear<T>,
    k: Linear<T>,
    v: Linear<T>,
    o: Linear<T>,
    post_norm: T,
    gate: Linear<T>,
    up: Linear<T>,
    down: Linear<T>,
    attn: AttentionSpec,
}

pub struct Llama<T> {
    model_type: String,
    d: usize,
    ff: usize,
    vocab: usize,
    max_pos: usize,
    eps: f32,
    act: Activation,
    inv_freq: Vec<f32>,
    embed: T,
    layers: Vec<Layer<T>>,
    norm: T,
    /// None when tied to the embedding.
    lm_head: Option<Linear<T>>,
}

impl<T> Llama<T> {
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    pub fn modules(&self) -> Vec<ModuleInfo> {
        let mut out = Vec::new();
        for l in &self.layers {
            let (qd, kvd) = (l.attn.heads * l.attn.head_dim, l.attn.kv_heads * l.attn.head_dim);
            for (m, o, i) in [(&l.q, qd, self.d), (&l.k, kvd, self.d), (&l.v, kvd, self.d), (&l.o, self.d, qd)] {
                out.push(ModuleInfo { name: m.name.clone(), out_dim: o, in_dim: i });
            }
            for (m, o, i) in [(&l.gate, self.ff, self.d), (&l.up, self.ff, self.d), (&l.down, self.d, self.ff)] {
                out.push(ModuleInfo { name: m.name.clone(), out_dim: o, in_dim: i });
            }
        }
        out.push(ModuleInfo { name: "lm_head".into(), out_dim: self.vocab, in_dim: self.d });
        out
    }

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// Key/value width of each attention layer (what a KV cache holds per token).
    pub fn kv_widths(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.attn.kv_heads * l.attn.head_dim).collect()
    }

    pub async fn forward<B: Backend<T = T>, H: Hook<B>>(&self, pass: &mut Pass<'_, B, H>) -> Result<Option<T>> {
        let (be, batch) = (pass.be, pass.batch);
        let n = batch.tokens();
        let mut h = be.select_rows(&self.embed, &batch.ids);
        for (i, l) in self.layers.iter().enumerate() {
            let x = be.rms_norm(&h, &l.input_norm, self.eps);
            let mut qkv = pass.project(&x, Level::Tokens, &[l.q.r(), l.k.r(), l.v.r()]).await?;
            let v = qkv.pop().unwrap();
            let mut k = qkv.pop().unwrap();
            let mut q = qkv.pop().unwrap();
            be.rope(&mut q, &batch.positions, l.attn.head_dim, &self.inv_freq);
            be.rope(&mut k, &batch.positions, l.attn.head_dim, &self.inv_freq);
            let a = pass.attention(i, &q, &k, &v, &l.attn);
            let o = pass.project1(&a, l.o.r()).await?;
            be.add_rows(&mut h, 0..n, &o, 1.0);
            let x = be.rms_norm(&h, &l.post_norm, self.eps);
            let mut gu = pass.project(&x, Level::Tokens, &[l.gate.r(), l.up.r()]).await?;
            let up = gu.pop().unwrap();
            let mut gate = gu.pop().unwrap();
            be.activate(&mut gate, self.act);
            be.mul(&mut gate, &up);
            let o = pass.project1(&gate, l.down.r()).await?;
            be.add_rows(&mut h, 0..n, &o, 1.0);
        }
        let h = be.rms_norm(&h, &self.norm, self.eps);
        match pass.output {
            Output::Hidden => Ok(Some(h)),
            _ => {
                let head = match &self.lm_head {
                    Some(l) => l.r(),
                    None => LinearRef { name: "lm_head", w: &self.embed, b: None },
                };
                pass.lm_head(h, head).await
            }
        }
    }
}

/// `rope_theta` and the scaling dict, from the old keys or the newer `rope_parameters`.
fn rope_params(c: &HfConfig) -> Result<(f64, Option<serde_json::Map<String, Value>>)> {
    let params = c.get("rope_parameters").and_then(Value::as_object);
    let theta = match params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
        Some(t) if t.is_finite() && t > 0.0 => t,
        Some(t) => {
            return Err(bad_input(&c.file, format!("rope_parameters.rope_theta is {t}; it must be greater than 0")))
        }
        None => c.positive_or("rope_theta", 10000.0)?,
    };
    let scaling = c.get("rope_scaling").and_then(Value::as_object).or(params).cloned();
    Ok((theta, scaling))
}

/// Inverse frequencies of the rotary embedding, with the rope scaling the config asks for.
fn inv_freq(c: &HfConfig, head_dim: usize) -> Result<Vec<f32>> {
    let (theta, scaling) = rope_params(c)?;
    let mut f: Vec<f64> = (0..head_dim / 2).map(|k| 1.0 / theta.powf((2 * k) as f64 / head_dim as f64)).collect();
    let Some(s) = scaling else {
        return Ok(f.into_iter().map(|x| x as f32).collect());
    };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    // Every number here divides or scales frequencies: it must be finite and positive.
    let num = |k: &str, d: f64| -> Result<f64> {
        match s.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| {
                bad_input(&c.file, format!("rope scaling \"{k}\" must be a number greater than 0, not {v}"))
            }),
        }
    };
    match kind {
        // "dynamic" only changes frequencies past max_position_embeddings, which we never reach.
        "default" | "dynamic" => {}
        "linear" => {
            let factor = num("factor", 1.0)?;
            f.iter_mut().for_each(|x| *x /= factor)
        }
        "llama3" => {
            let factor = num("factor", 8.0)?;
            let (lo, hi) = (num("low_freq_factor", 1.0)?, num("high_freq_factor", 4.0)?);
            if hi <= lo {
                return Err(bad_input(
                    &c.file,
                    format!("rope scaling high_freq_factor {hi} must exceed low_freq_factor {lo}"),
                ));
            }
            let old = num("original_max_position_embeddings", 8192.0)?;
            let (lo_wave, hi_wave) = (old / lo, old / hi);
            for x in f.iter_mut() {
                let wave = 2.0 * std::f64::consts::PI / *x;
                if wave > lo_wave {
                    *x /= factor;
                } else if wave >= hi_wave {
                    let smooth = (old / wave - lo) / (hi - lo);
                    *x = (1.0 - smooth) * *x / factor + smooth * *x;
                }
            }
        }
        other => {
            return Err(bad_input(
                &c.file,
                format!("rope scaling \"{other}\" is not supported (supported: linear, llama3, dynamic)"),
            ))
        }
    }
    Ok(f.into_iter().map(|x| x as f32).collect())
}

impl<T> Llama<T> {
    pub fn load<B: Backend<T = T>>(be: &B, c: &HfConfig, store: &TensorStore) -> Result<Llama<T>> {
        let model_type = c.model_type()?;
        let d = c.dim("hidden_size")?;
        let heads = c.dim("num_attention_heads")?;
        let kv_heads = c.dim_or("num_key_value_heads", heads)?;
        let layers_n = c.dim("num_hidden_layers")?;
        let ff = c.dim("intermediate_size")?;
        let vocab = c.dim("vocab_size")?;
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad_input(
                &c.file,
                format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"),
            ));
        }
        let hd = c.dim_or("head_dim", d / heads)?;
        let (qd, kvd) = (
            c.product("num_attention_heads × head_dim", heads, hd)?,
            c.product("num_key_value_heads × head_dim", kv_heads, hd)?,
        );
        if hd % 2 != 0 {
            return Err(bad_input(&c.file, format!("head_dim {hd} must be even")));
        }
        let act_name = c.str_or("hidden_act", "silu")?;
        let act = Activation::from_hf(&act_name)
            .ok_or_else(|| bad_input(&c.file, format!("hidden_act \"{act_name}\" is not supported")))?;
        let eps = c.f64_or("rms_norm_eps", 1e-6)? as f32;
        if eps < 0.0 {
            return Err(bad_input(&c.file, format!("rms_norm_eps is {eps}; it must not be negative")));
        }
        let max_pos = c.dim_or("max_position_embeddings", 2048)?;
        let window_for = |i: usize| -> Result<Option<usize>> {
            let w = c.usize_opt("sliding_window")?;
            Ok(match model_type.as_str() {
                "mistral" => w,
                "qwen2" => {
                    let sliding = match c.get("layer_types").and_then(Value::as_array) {
                        Some(t) => t.get(i).and_then(Value::as_str) == Some("sliding_attention"),
                        None => c.bool_or("use_sliding_window", false)? && i >= c.usize_or("max_window_layers", 0)?,
                    };
                    if sliding {
                        w
                    } else {
                        None
                    }
                }
                _ => None,
            })
        };
        let w = WeightReader::new(be, store, "embed_tokens.weight", &["model.", ""], "Llama-family")?;
        let mut layers = Vec::new();
        for i in 0..layers_n {
            let p = format!("layers.{i}");
            layers.push(Layer {
                input_norm: w.tensor(&format!("{p}.input_layernorm.weight"), (1, d))?,
                q: w.linear(&format!("{p}.self_attn.q_proj"), d, qd, false)?,
                k: w.linear(&format!("{p}.self_attn.k_proj"), d, kvd, false)?,
                v: w.linear(&format!("{p}.self_attn.v_proj"), d, kvd, false)?,
                o: w.linear(&format!("{p}.self_attn.o_proj"), qd, d, false)?,
                post_norm: w.tensor(&format!("{p}.post_attention_layernorm.weight"), (1, d))?,
                gate: w.linear(&format!("{p}.mlp.gate_proj"), d, ff, false)?,
                up: w.linear(&format!("{p}.mlp.up_proj"), d, ff, false)?,
                down: w.linear(&format!("{p}.mlp.down_proj"), ff, d, false)?,
                attn: AttentionSpec {
                    heads,
                    kv_heads,
                    head_dim: hd,
                    causal: true,
                    window: window_for(i)?,
                    scale: 1.0 / (hd as f32).sqrt(),
                },
            });
        }
        // The LM head lives outside the `model.` prefix.
        let lm_head = if store.contains("lm_head.weight") && !c.bool_or("tie_word_embeddings", false)? {
            let head = WeightReader { be, store, prefix: String::new() };
            Some(head.linear("lm_head", d, vocab, false)?)
        } else {
            None
        };
        Ok(Llama {
            inv_freq: inv_freq(c, hd)?,
            model_type,
            d,
            ff,
            vocab,
            max_pos,
            eps,
            act,
            embed: w.tensor("embed_tokens.weight", (vocab, d))?,
            layers,
            norm: w.tensor("norm.weight", (1, d))?,
            lm_head,
        })
    }
}
