//! Hugging Face `config.json`: typed getters with defaults, and errors that name the file and key.
//! Each model file reads the keys it needs; this module knows no architecture.

use crate::error::{bad_input, Result};
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
        self.str_opt("model_type")?
            .ok_or_else(|| bad_input(&self.file, "has no \"model_type\": cannot tell the architecture"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.raw.get(key).is_some_and(|v| !v.is_null())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    /// A count or size. Every one is bounded by `MAX_COUNT`, so that sizes built from them (with
    /// checked products where they multiply) can never ask for an absurd allocation.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) if x <= MAX_COUNT as u64 => Ok(Some(x as usize)),
                Some(x) => Err(bad_input(
                    &self.file,
                    format!("\"{key}\" is {x}, larger than any model this tool can load (at most {MAX_COUNT})"),
                )),
                None => Err(bad_input(&self.file, format!("\"{key}\" must be a non-negative integer, not {v}"))),
            },
        }
    }

    /// A size that must be at least 1 (hidden size, layers, heads, vocabulary).
    pub fn dim(&self, key: &str) -> Result<usize> {
        self.dim_or(key, None)
    }

    /// `dim` with a default for a missing key.
    pub fn dim_or(&self, key: &str, default: impl Into<Option<usize>>) -> Result<usize> {
        let v = match (self.usize_opt(key)?, default.into()) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => return Err(bad_input(&self.file, format!("missing \"{key}\""))),
        };
        if v == 0 {
            return Err(bad_input(&self.file, format!("\"{key}\" is 0; it must be at least 1")));
        }
        Ok(v)
    }

    /// `a × b` for sizes from this file, refused past `MAX_COUNT` (`what` names the product).
    pub fn product(&self, what: &str, a: usize, b: usize) -> Result<usize> {
        a.checked_mul(b).filter(|&v| v <= MAX_COUNT).ok_or_else(|| {
            bad_input(&self.file, format!("{what} ({a} × {b}) is larger than any model this tool can load"))
        })
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad_input(&self.file, format!("\"{key}\" must be a finite number, not {v}"))),
        }
    }

    /// A number that must be > 0 (a RoPE base, a scaling factor).
    pub fn positive_or(&self, key: &str, default: f64) -> Result<f64> {
        let v = self.f64_or(key, default)?;
        if v <= 0.0 {
            return Err(bad_input(&self.file, format!("\"{key}\" is {v}; it must be greater than 0")));
        }
        Ok(v)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| bad_input(&self.file, format!("\"{key}\" must be true or false"))),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad_input(&self.file, format!("\"{key}\" must be a string, not {v}"))),
        }
    }

    pub fn str_or(&self, key: &str, default: &str) -> Result<String> {
        Ok(self.str_opt(key)?.unwrap_or_else(|| default.to_string()))
    }
}
