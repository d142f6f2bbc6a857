//! Hugging Face `config.json`. Each model family declares the keys it reads as a serde struct with
//! their defaults (`llama::LlamaConfig`, `gemma::GemmaConfig`, …) and reads it with
//! [`HfConfig::typed`]; this module knows no architecture. Its field types carry the bounds every
//! size and number must meet, and every error names the file and the key.

use crate::error::{bad_input, Result};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The largest count or size any config.json field may hold (2^24: above every published model's
/// vocabulary, width or context length).
pub const MAX_COUNT: usize = 1 << 24;

pub struct HfConfig {
    pub file: String,
    pub raw: Value,
}

impl HfConfig {
    pub fn parse(file: impl Into<String>, bytes: &[u8]) -> Result<HfConfig> {
        let file = file.into();
        let raw: Value =
            serde_json::from_slice(bytes).map_err(|e| bad_input(&file, format!("not valid JSON ({e})")))?;
        if !raw.is_object() {
            return Err(bad_input(&file, "must be a JSON object"));
        }
        Ok(HfConfig { file, raw })
    }

    pub fn model_type(&self) -> Result<String> {
        let t: Common = self.typed()?;
        t.model_type.ok_or_else(|| bad_input(&self.file, "has no \"model_type\": cannot tell the architecture"))
    }

    /// The end-of-sequence token, where the file names one (the first, where it lists several);
    /// an unreadable one counts as none (generation then runs to its length).
    pub fn eos_token(&self) -> Option<u32> {
        match self.typed::<Common>().ok()?.eos_token_id? {
            Eos::One(t) => Some(t),
            Eos::Many(l) => l.first().copied(),
        }
    }

    /// Whether the file sets `key` (not null).
    pub fn has(&self, key: &str) -> bool {
        self.raw.get(key).is_some_and(|v| !v.is_null())
    }

    /// This config with `defaults` (an object: a model type's declared defaults) for the keys it
    /// leaves out. A key the file sets to `null` stays null, as in transformers, where an
    /// explicit `None` (no sliding window) differs from a class default (4096).
    pub fn with_defaults(&self, defaults: &Value) -> HfConfig {
        let mut raw = self.raw.clone();
        if let (Some(m), Some(d)) = (raw.as_object_mut(), defaults.as_object()) {
            for (k, v) in d {
                m.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        HfConfig { file: self.file.clone(), raw }
    }

    /// The keys `T` declares (`Option` fields read `null` and missing keys as `None`).
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T> {
        self.typed_at("", &self.raw)
    }

    /// `value`, found at `path` in this file (a nested dict such as `rope_parameters`), as `T`.
    pub fn typed_at<T: DeserializeOwned>(&self, path: &str, value: &Value) -> Result<T> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let key = match (path, e.path().to_string().as_str()) {
                (p, ".") => p.to_string(),
                ("", k) => k.to_string(),
                (p, k) => format!("{p}.{k}"),
            };
            let inner = e.into_inner();
            match key.as_str() {
                "" => bad_input(&self.file, inner.to_string()),
                k => bad_input(&self.file, format!("\"{k}\": {inner}")),
            }
        })
    }

    /// `a × b` for sizes from this file, refused past `MAX_COUNT` (`what` names the product).
    pub fn product(&self, what: &str, a: usize, b: usize) -> Result<usize> {
        a.checked_mul(b).filter(|&v| v <= MAX_COUNT).ok_or_else(|| {
            bad_input(&self.file, format!("{what} ({a} × {b}) is larger than any model this tool can load"))
        })
    }
}

/// The keys every model's config may hold.
#[derive(Deserialize)]
struct Common {
    model_type: Option<String>,
    eos_token_id: Option<Eos>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Eos {
    One(u32),
    Many(Vec<u32>),
}

/// A count that may be 0, at most `MAX_COUNT`: bounded so that sizes built from config values
/// (with checked products where they multiply) can never ask for an absurd allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count(pub usize);

/// A size that must be at least 1 (hidden size, layers, heads, vocabulary), at most `MAX_COUNT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim(pub usize);

/// A finite number greater than 0 (a RoPE base, a scaling factor, a soft-cap).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Positive(pub f64);

/// A finite number that is not negative (a norm's epsilon).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonNegative(pub f64);

fn count(v: &Value) -> std::result::Result<usize, String> {
    match v.as_u64() {
        Some(x) if x <= MAX_COUNT as u64 => Ok(x as usize),
        Some(x) => Err(format!("{x} is larger than any model this tool can load (at most {MAX_COUNT})")),
        None => Err(format!("expected a non-negative integer, not {v}")),
    }
}

fn finite(v: &Value) -> std::result::Result<f64, String> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| format!("expected a finite number, not {v}"))
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        count(&Value::deserialize(d)?).map(Count).map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Dim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match count(&Value::deserialize(d)?).map_err(D::Error::custom)? {
            0 => Err(D::Error::custom("0, but it must be at least 1")),
            n => Ok(Dim(n)),
        }
    }
}

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match finite(&Value::deserialize(d)?).map_err(D::Error::custom)? {
            x if x > 0.0 => Ok(Positive(x)),
            x => Err(D::Error::custom(format!("{x}, but it must be greater than 0"))),
        }
    }
}

impl<'de> Deserialize<'de> for NonNegative {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match finite(&Value::deserialize(d)?).map_err(D::Error::custom)? {
            x if x >= 0.0 => Ok(NonNegative(x)),
            x => Err(D::Error::custom(format!("{x}, but it must not be negative"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    struct Sizes {
        hidden_size: Dim,
        layers: Dim,
        window: Option<Count>,
        theta: Option<Positive>,
    }

    fn read(v: Value) -> Result<Sizes> {
        let c = HfConfig::parse("config.json", v.to_string().as_bytes()).unwrap();
        c.with_defaults(&serde_json::json!({"layers": 7, "window": 3})).typed()
    }

    #[test]
    fn defaults_and_errors_that_name_the_key() {
        // A missing key takes its default; an explicit null stays none, as in transformers.
        let s = read(serde_json::json!({"hidden_size": 8, "window": null})).unwrap();
        assert_eq!((s.hidden_size, s.layers, s.window, s.theta), (Dim(8), Dim(7), None, None));
        assert_eq!(read(serde_json::json!({"hidden_size": 8})).unwrap().window, Some(Count(3)));
        let err = |v: Value| read(v).unwrap_err().to_string();
        assert!(err(serde_json::json!({})).contains("missing field `hidden_size`"));
        let e = err(serde_json::json!({"hidden_size": "8"}));
        assert!(e.contains("config.json") && e.contains("\"hidden_size\": expected a non-negative integer"), "{e}");
        assert!(err(serde_json::json!({"hidden_size": 0})).contains("\"hidden_size\": 0, but it must be at least 1"));
        assert!(err(serde_json::json!({"hidden_size": 1u64 << 40})).contains("larger than any model"));
        assert!(
            err(serde_json::json!({"hidden_size": 2, "window": -1})).contains("\"window\": expected a non-negative")
        );
        assert!(
            err(serde_json::json!({"hidden_size": 2, "theta": 0.0})).contains("\"theta\": 0, but it must be greater")
        );
    }
}
