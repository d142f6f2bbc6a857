//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Every scaling rule PEFT applies is reproduced here: s = lora_alpha / r, or lora_alpha / sqrt(r)
//! with `use_rslora`, where `rank_pattern` / `alpha_pattern` override r / alpha for the modules whose
//! name ends with a pattern key (PEFT matches `^(.*\.)?(<key>)$` and takes the first key that fits).
//! Features whose delta is not `s·B·A` on a Linear are refused by name, before any work starts.

use crate::error::{bad_input, Result};
use crate::formats::safetensors::TensorFile;
use crate::mat::Mat;
use serde_json::{Map, Value};

/// Prefix PEFT puts in front of every saved key.
pub const KEY_PREFIX: &str = "base_model.model.";

/// One targeted module of one adapter: ΔW = scale · B · A.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// Module path as the adapter names it (without `base_model.model.`).
    pub path: String,
    /// (r, in)
    pub a: Mat,
    /// (out, r)
    pub b: Mat,
    pub scale: f32,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.rows
    }
}

pub struct Adapter {
    /// What to call the adapter in messages (its folder).
    pub name: String,
    pub config: Map<String, Value>,
    pub modules: Vec<LoraModule>,
}

impl Adapter {
    /// `config_name`/`weights.name` are used in messages.
    pub fn parse(name: &str, config_name: &str, config_bytes: &[u8], weights: &TensorFile) -> Result<Adapter> {
        let config: Value = serde_json::from_slice(config_bytes)
            .map_err(|e| bad_input(config_name, format!("not valid JSON ({e})")))?;
        let config = config.as_object().cloned().ok_or_else(|| bad_input(config_name, "must be a JSON object"))?;
        check_features(config_name, &config)?;

        let r = field(config_name, &config, "r", rank)?.unwrap_or(8);
        let alpha = field(config_name, &config, "lora_alpha", number)?.unwrap_or(8.0);
        let rslora = field(config_name, &config, "use_rslora", boolean)?.unwrap_or(false);
        field(config_name, &config, "fan_in_fan_out", boolean)?;
        let rank_pattern = patterns(config_name, &config, "rank_pattern")?;
        let alpha_pattern = patterns(config_name, &config, "alpha_pattern")?;

        // Pair up lora_A / lora_B by module path; refuse anything else.
        let mut paths: Vec<String> = Vec::new();
        for key in weights.keys() {
            let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
                return Err(bad_input(
                    &weights.name,
                    format!("tensor '{key}' does not start with '{KEY_PREFIX}': not a PEFT adapter file"),
                ));
            };
            if rest.contains("lora_embedding_") {
                return Err(bad_input(
                    &weights.name,
                    format!("has an embedding LoRA ('{key}'); LoRA on embeddings is not supported"),
                ));
            }
            if rest.contains("lora_magnitude_vector") {
                return Err(bad_input(&weights.name, format!("is a DoRA adapter ('{key}'); DoRA is not supported")));
            }
            if let Some(p) = rest.strip_suffix(".lora_A.weight") {
                paths.push(p.to_string());
            } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
                if !weights.contains(&format!("{KEY_PREFIX}{p}.lora_A.weight")) {
                    return Err(bad_input(&weights.name, format!("has lora_B but no lora_A for module '{p}'")));
                }
            } else if rest.contains(".lora_B.") && rest.ends_with(".bias") {
                return Err(bad_input(&weights.name, format!("has a LoRA bias ('{key}'); lora_bias is not supported")));
            } else {
                return Err(bad_input(&weights.name, format!("has tensor '{key}', which is not a lora_A/lora_B weight (modules_to_save or another feature); not supported")));
            }
        }
        if paths.is_empty() {
            return Err(bad_input(&weights.name, "holds no lora_A/lora_B weights"));
        }
        let mut modules = Vec::new();
        for path in paths {
            let a = weights.mat(&format!("{KEY_PREFIX}{path}.lora_A.weight"))?;
            let bkey = format!("{KEY_PREFIX}{path}.lora_B.weight");
            if !weights.contains(&bkey) {
                return Err(bad_input(&weights.name, format!("has lora_A but no lora_B for module '{path}'")));
            }
            let b = weights.mat(&bkey)?;
            let r_m = match_pattern(&rank_pattern, &path).map(|v| v as usize).unwrap_or(r);
            let alpha_m = match_pattern(&alpha_pattern, &path).unwrap_or(alpha);
            if a.rows != r_m || b.cols != r_m {
                return Err(bad_input(
                    &weights.name,
                    format!(
                        "module '{path}': lora_A is {:?} and lora_B is {:?}, but {config_name} gives rank {r_m}",
                        a.shape(),
                        b.shape()
                    ),
                ));
            }
            // r_m ≥ 1: `rank` refuses 0 in `r` and in rank_pattern, so the scale below is finite.
            let scale = if rslora { alpha_m / (r_m as f64).sqrt() } else { alpha_m / r_m as f64 };
            modules.push(LoraModule { path, a, b, scale: scale as f32 });
        }
        Ok(Adapter { name: name.to_string(), config, modules })
    }

    /// Checked to be a boolean by `parse`.
    pub fn fan_in_fan_out(&self) -> bool {
        self.config.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false)
    }
}

/// Refuse, by name, the PEFT features whose delta is not s·B·A on a Linear/Conv1D weight.
fn check_features(file: &str, c: &Map<String, Value>) -> Result<()> {
    let peft_type = field(file, c, "peft_type", string)?.unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad_input(file, format!("peft_type is {peft_type}; only LORA adapters can be merged")));
    }
    let truthy = |k: &str| -> Result<bool> { Ok(field(file, c, k, boolean)?.unwrap_or(false)) };
    let nonempty = |k: &str| match c.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if truthy("use_dora")? {
        return Err(bad_input(file, "uses DoRA (use_dora: true); DoRA adapters are not supported"));
    }
    if let Some(b) = field(file, c, "bias", string)? {
        if b != "none" {
            return Err(bad_input(file, format!("trains biases (bias: \"{b}\"); only bias \"none\" is supported")));
        }
    }
    if truthy("lora_bias")? {
        return Err(bad_input(file, "uses lora_bias: true; LoRA biases are not supported"));
    }
    if nonempty("modules_to_save") {
        return Err(bad_input(
            file,
            format!(
                "has modules_to_save {}; fully trained modules cannot be merged as LoRA deltas",
                c["modules_to_save"]
            ),
        ));
    }
    for k in ["layer_replication", "target_parameters", "trainable_token_indices"] {
        if nonempty(k) {
            return Err(bad_input(file, format!("uses {k}; not supported")));
        }
    }
    for k in ["use_qalora", "use_bdlora"] {
        if truthy(k)? {
            return Err(bad_input(file, format!("uses {k}; not supported")));
        }
    }
    Ok(())
}

/// `c[key]` read by `read` (None when missing or null), or an error naming the field, the file and
/// the type it must have: a wrong type is never silently replaced by a default.
pub(crate) fn field<'a, T>(
    file: &str,
    c: &'a Map<String, Value>,
    key: &str,
    read: fn(&'a Value) -> std::result::Result<T, &'static str>,
) -> Result<Option<T>> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => read(v).map(Some).map_err(|want| bad_input(file, format!("\"{key}\" must be {want}, not {v}"))),
    }
}

pub(crate) fn rank(v: &Value) -> std::result::Result<usize, &'static str> {
    const WANT: &str = "a positive integer (up to 65536)";
    v.as_u64().filter(|&r| (1..=65536).contains(&r)).map(|r| r as usize).ok_or(WANT)
}

pub(crate) fn number(v: &Value) -> std::result::Result<f64, &'static str> {
    v.as_f64().filter(|x| x.is_finite()).ok_or("a finite number")
}

pub(crate) fn boolean(v: &Value) -> std::result::Result<bool, &'static str> {
    v.as_bool().ok_or("true or false")
}

pub(crate) fn string(v: &Value) -> std::result::Result<&str, &'static str> {
    v.as_str().ok_or("a string")
}

fn patterns(file: &str, c: &Map<String, Value>, key: &str) -> Result<Vec<(regex::Regex, f64)>> {
    let Some(obj) = field(file, c, key, |v| v.as_object().ok_or("an object of pattern → value"))? else {
        return Ok(vec![]);
    };
    let read: fn(&Value) -> std::result::Result<f64, &'static str> =
        if key == "rank_pattern" { |v| rank(v).map(|r| r as f64) } else { number };
    obj.iter()
        .map(|(k, v)| {
            let re = regex::Regex::new(&format!(r"^(.*\.)?({k})$")).map_err(|e| {
                // The regex crate's message spans lines (the pattern, a caret, the cause): keep the cause.
                let cause = e.to_string().lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                bad_input(file, format!("{key} key '{k}' is not a valid pattern ({cause})"))
            })?;
            let v = read(v).map_err(|want| bad_input(file, format!("{key}['{k}'] must be {want}, not {v}")))?;
            Ok((re, v))
        })
        .collect()
}

fn match_pattern(p: &[(regex::Regex, f64)], path: &str) -> Option<f64> {
    p.iter().find(|(re, _)| re.is_match(path)).map(|(_, v)| *v)
}
