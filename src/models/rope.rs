//! Rotary position embeddings as `config.json` describes them, in every form published checkpoints
//! use: `rope_theta` + `rope_scaling` (+ `partial_rotary_factor`, Gemma 3's `rope_local_base_freq`)
//! as older transformers wrote them, and transformers 5's `rope_parameters`, flat or per layer type.
//! Scalings: `linear`, `llama3`, `dynamic` (which changes nothing within the trained context) and
//! `longrope` / `su` (Phi-3 / Phi-4-mini).

use crate::error::{bad_input, Result};
use crate::formats::hf_config::{Count, Dim, HfConfig, Positive};
use serde::Deserialize;
use serde_json::Value;

/// The frequencies of one rotary embedding.
#[derive(Clone, Debug)]
pub struct Rotary {
    /// One per rotated pair: rotary_dim / 2 (head_dim / 2 unless partial).
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (longrope's attention factor; else 1).
    pub scale: f32,
    /// Longrope: the frequencies a pass uses once a sequence is longer than the trained context.
    pub long: Option<LongRope>,
}

#[derive(Clone, Debug)]
pub struct LongRope {
    pub original_max_positions: usize,
    pub inv_freq: Vec<f32>,
}

impl Rotary {
    /// Whether a sequence whose last token sits at `last` uses the long factors: as in
    /// transformers, once it reaches past the original context. Decided per sequence (as
    /// transformers does for one unpadded sequence), so a sample's positions never depend on
    /// which other samples share its batch or chunk.
    pub fn is_long(&self, last: u32) -> bool {
        self.long.as_ref().is_some_and(|l| last as usize >= l.original_max_positions)
    }
}

/// The keys rotary positions read, in both forms: `rope_theta` + `rope_scaling` (older
/// transformers), or transformers 5's `rope_parameters`, flat or one dict per layer type.
/// Their defaults are each model type's (`models::defaults`), filled in before.
#[derive(Deserialize)]
struct RopeConfig {
    rope_theta: Positive,
    /// Gemma 3's base on sliding layers.
    rope_local_base_freq: Option<Positive>,
    partial_rotary_factor: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Dim,
    /// Phi-3 writes longrope's trained context here, outside the rope dict.
    original_max_position_embeddings: Option<Count>,
}

/// One rope dict (`rope_scaling`, or `rope_parameters` and its per-layer-type dicts). Every
/// number in it divides or scales frequencies, so each must be finite and positive.
#[derive(Deserialize, Default)]
struct Scaling {
    rope_type: Option<String>,
    /// The older name of `rope_type`.
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<Positive>,
    partial_rotary_factor: Option<f64>,
    factor: Option<Positive>,
    low_freq_factor: Option<Positive>,
    high_freq_factor: Option<Positive>,
    original_max_position_embeddings: Option<Positive>,
    attention_factor: Option<Positive>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
}

impl RopeConfig {
    /// The rope dict at `path` (`rope_scaling`, `rope_parameters`, `rope_parameters.full_attention`).
    fn dict(c: &HfConfig, path: &str, d: Option<&Value>) -> Result<Option<Scaling>> {
        d.map(|d| c.typed_at(path, d)).transpose()
    }
}

/// The model's one rotary embedding (every family but Gemma 3), over `rotary_dim` dimensions of
/// each head: at `rope_parameters`' base (else `rope_theta`), scaled as `rope_scaling` (else
/// `rope_parameters`) says.
pub fn standard(c: &HfConfig, head_dim: usize) -> Result<Rotary> {
    let k: RopeConfig = c.typed()?;
    let flat = RopeConfig::dict(c, "rope_parameters", k.rope_parameters.as_ref())?;
    let theta = flat.as_ref().and_then(|p| p.rope_theta).unwrap_or(k.rope_theta).0;
    let scaling = RopeConfig::dict(c, "rope_scaling", k.rope_scaling.as_ref())?.or(flat);
    build(c, &k, theta, scaling.as_ref(), head_dim)
}

/// Gemma 3's rotary embedding of a layer type: sliding layers turn at `rope_local_base_freq`
/// without scaling, full layers at `rope_theta` with `rope_scaling`; or each as its own dict in
/// `rope_parameters`.
pub fn gemma3(c: &HfConfig, layer_type: &str, head_dim: usize) -> Result<Rotary> {
    let k: RopeConfig = c.typed()?;
    let sliding = layer_type == "sliding_attention";
    let theta = match (sliding, k.rope_local_base_freq) {
        (false, _) => k.rope_theta.0,
        (true, Some(local)) => local.0,
        (true, None) => {
            return Err(bad_input(&c.file, "Gemma 3 needs \"rope_local_base_freq\" for its sliding layers"))
        }
    };
    let by_type = k.rope_parameters.as_ref().and_then(|p| p.get(layer_type));
    if let Some(p) = RopeConfig::dict(c, &format!("rope_parameters.{layer_type}"), by_type)? {
        return build(c, &k, p.rope_theta.map_or(theta, |t| t.0), Some(&p), head_dim);
    }
    let scaling = if sliding { None } else { RopeConfig::dict(c, "rope_scaling", k.rope_scaling.as_ref())? };
    build(c, &k, theta, scaling.as_ref(), head_dim)
}

/// How many dimensions of each head rotate: `partial_rotary_factor` (in the rope dict, else top
/// level) × head_dim, as transformers rounds it (down), and even.
fn rotary_dim(c: &HfConfig, k: &RopeConfig, s: Option<&Scaling>, head_dim: usize) -> Result<usize> {
    let f = match s.and_then(|s| s.partial_rotary_factor).or(k.partial_rotary_factor) {
        None => return Ok(head_dim),
        Some(f) if f > 0.0 && f <= 1.0 => f,
        Some(f) => {
            return Err(bad_input(&c.file, format!("partial_rotary_factor must be a number in (0, 1], not {f}")))
        }
    };
    let dim = (head_dim as f64 * f) as usize;
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(bad_input(&c.file, format!("partial_rotary_factor {f} × head_dim {head_dim} gives {dim} rotary dimensions; they must be even and at least 2")));
    }
    Ok(dim)
}

/// Frequencies base^(−2k/dim) with the scaling `s` asks for.
fn build(c: &HfConfig, k: &RopeConfig, theta: f64, s: Option<&Scaling>, head_dim: usize) -> Result<Rotary> {
    let dim = rotary_dim(c, k, s, head_dim)?;
    let base: Vec<f64> = (0..dim / 2).map(|k| theta.powf((2 * k) as f64 / dim as f64)).collect();
    let plain = |f: &[f64]| f.iter().map(|b| (1.0 / b) as f32).collect::<Vec<f32>>();
    let mut rot = Rotary { inv_freq: plain(&base), scale: 1.0, long: None };
    let Some(s) = s else { return Ok(rot) };
    let kind = s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("default");
    let or = |x: Option<Positive>, d: f64| x.map_or(d, |x| x.0);
    let max_pos = k.max_position_embeddings.0 as f64;
    match kind {
        // "dynamic" only changes frequencies past max_position_embeddings, which we never reach.
        "default" | "dynamic" => {}
        "linear" => {
            let factor = or(s.factor, 1.0);
            rot.inv_freq = base.iter().map(|b| (1.0 / b / factor) as f32).collect();
        }
        "llama3" => {
            let factor = or(s.factor, 8.0);
            let (lo, hi) = (or(s.low_freq_factor, 1.0), or(s.high_freq_factor, 4.0));
            if hi <= lo {
                return Err(bad_input(
                    &c.file,
                    format!("rope scaling high_freq_factor {hi} must exceed low_freq_factor {lo}"),
                ));
            }
            let old = or(s.original_max_position_embeddings, 8192.0);
            let (lo_wave, hi_wave) = (old / lo, old / hi);
            let f = base.iter().map(|b| {
                let x = 1.0 / b;
                let wave = 2.0 * std::f64::consts::PI / x;
                if wave > lo_wave {
                    x / factor
                } else if wave >= hi_wave {
                    let smooth = (old / wave - lo) / (hi - lo);
                    (1.0 - smooth) * x / factor + smooth * x
                } else {
                    x
                }
            });
            rot.inv_freq = f.map(|x| x as f32).collect();
        }
        "longrope" | "su" => {
            // The trained context: top-level `original_max_position_embeddings` first (Phi-3
            // writes it there), then the rope dict's, else max_position_embeddings.
            let original = match k.original_max_position_embeddings {
                Some(o) => o.0 as f64,
                None => or(s.original_max_position_embeddings, max_pos),
            };
            let factor = s.factor.map_or(max_pos / original, |f| f.0);
            let attention = match s.attention_factor {
                Some(a) => a.0,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            let factors = |key: &str, f: &Option<Vec<f64>>| -> Result<Vec<f64>> {
                match f {
                    Some(f) if f.len() == dim / 2 && f.iter().all(|x| x.is_finite() && *x > 0.0) => Ok(f.clone()),
                    Some(_) => Err(bad_input(
                        &c.file,
                        format!("longrope \"{key}\" must hold {} positive numbers (rotary dimensions / 2)", dim / 2),
                    )),
                    None => Err(bad_input(
                        &c.file,
                        format!("longrope scaling needs \"{key}\", a list of {} numbers", dim / 2),
                    )),
                }
            };
            // transformers computes these in f32: 1 / (factor · base^(2k/dim)).
            let scaled = |f: &[f64]| base.iter().zip(f).map(|(b, e)| (1.0 / (e * b)) as f32).collect::<Vec<f32>>();
            rot.inv_freq = scaled(&factors("short_factor", &s.short_factor)?);
            rot.long = Some(LongRope {
                original_max_positions: original as usize,
                inv_freq: scaled(&factors("long_factor", &s.long_factor)?),
            });
            rot.scale = attention as f32;
        }
        other => {
            return Err(bad_input(
                &c.file,
                format!("rope scaling \"{other}\" is not supported (supported: linear, llama3, dynamic, longrope)"),
            ))
        }
    }
    Ok(rot)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config of `model_type` with that type's defaults, as `models::load` reads it.
    fn typed_cfg(model_type: &str, v: serde_json::Value) -> HfConfig {
        let c = HfConfig::parse("config.json", v.to_string().as_bytes()).unwrap();
        c.with_defaults(&crate::models::defaults(model_type))
    }

    fn cfg(v: serde_json::Value) -> HfConfig {
        typed_cfg("llama", v)
    }

    #[test]
    fn every_form_gives_the_same_frequencies() {
        let old = cfg(serde_json::json!({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}));
        let new =
            cfg(serde_json::json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}));
        let (a, b) = (standard(&old, 16).unwrap(), standard(&new, 16).unwrap());
        assert_eq!(a.inv_freq, b.inv_freq);
        assert_eq!(a.inv_freq[0], 0.5);
        // Gemma 3: local and global bases, the scaling on global layers only.
        let old = typed_cfg(
            "gemma3_text",
            serde_json::json!({"rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        );
        let new = typed_cfg(
            "gemma3_text",
            serde_json::json!({"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        );
        for lt in ["full_attention", "sliding_attention"] {
            assert_eq!(gemma3(&old, lt, 8).unwrap().inv_freq, gemma3(&new, lt, 8).unwrap().inv_freq, "{lt}");
        }
        assert_eq!(gemma3(&old, "full_attention", 8).unwrap().inv_freq[0], 0.125);
        assert_eq!(gemma3(&old, "sliding_attention", 8).unwrap().inv_freq[1], 0.1);
        // Left out: each model type's own bases (Gemma 3's 1e6 and 1e4, SmolLM3's 2e6).
        let bare = typed_cfg("gemma3_text", serde_json::json!({}));
        assert_eq!(gemma3(&bare, "full_attention", 8).unwrap().inv_freq[1], 1e6f64.powf(-0.25) as f32);
        assert_eq!(gemma3(&bare, "sliding_attention", 8).unwrap().inv_freq[1], 0.1);
        let smollm3 = typed_cfg("smollm3", serde_json::json!({}));
        assert_eq!(standard(&smollm3, 12).unwrap().inv_freq[3], 2e6f64.powf(-0.5) as f32);
    }

    #[test]
    fn longrope_short_and_long_factors_and_partial_rotary() {
        let c = cfg(serde_json::json!({"partial_rotary_factor": 0.5, "max_position_embeddings": 128,
            "original_max_position_embeddings": 32, "rope_theta": 100.0,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [4.0, 8.0]}}));
        let r = standard(&c, 8).unwrap();
        assert_eq!(r.inv_freq, vec![1.0, 0.05]);
        assert!((r.scale as f64 - (1.0 + 4f64.ln() / 32f64.ln()).sqrt()).abs() < 1e-7);
        assert!(!r.is_long(31) && r.is_long(32));
        assert_eq!(r.long.as_ref().unwrap().inv_freq, vec![0.25, 0.0125]);
        let bad =
            cfg(serde_json::json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}));
        assert!(standard(&bad, 8).unwrap_err().to_string().contains("short_factor"));
        let bad = cfg(serde_json::json!({"rope_parameters": {"full_attention": {"rope_theta": -1.0}}}));
        let e = gemma3(&bad, "full_attention", 8).unwrap_err().to_string();
        assert!(e.contains("\"rope_parameters.full_attention.rope_theta\": -1, but it must be greater than 0"), "{e}");
        let bad = cfg(serde_json::json!({"rope_scaling": {"type": "yarn2"}}));
        assert!(standard(&bad, 8).unwrap_err().to_string().contains("\"yarn2\" is not supported"));
    }
}
