//! Hugging Face `config.json`: typed getters with defaults, and errors that name the file and key.
//! Each model file reads the keys it needs; this module knows no architecture.

use crate::error::{bad_input, Result};
use serde_json::Value;

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
        self.str_opt("model_type")
            .ok_or_else(|| bad_input(&self.file, "has no \"model_type\": cannot tell the architecture"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.raw.get(key).is_some_and(|v| !v.is_null())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| bad_input(&self.file, format!("missing \"{key}\"")))
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| bad_input(&self.file, format!("\"{key}\" must be a non-negative integer"))),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| bad_input(&self.file, format!("\"{key}\" must be a number"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| bad_input(&self.file, format!("\"{key}\" must be true or false"))),
        }
    }

    pub fn str_opt(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.as_str()).map(str::to_string)
    }

    pub fn str_or(&self, key: &str, default: &str) -> String {
        self.str_opt(key).unwrap_or_else(|| default.to_string())
    }
}
