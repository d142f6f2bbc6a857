//! MLX (mlx-lm) LoRA adapters: `adapter_config.json` + `adapters.safetensors`, in and out.
//!
//! mlx-lm's `LoRALinear` adds `scale · (x · lora_a) · lora_b` to a linear module's output, with
//! `lora_a` (in, r), `lora_b` (r, out) and `scale` a plain multiplier from the config's
//! `lora_parameters` (no α / r). So ΔW = scale · lora_bᵀ · lora_aᵀ: A = lora_aᵀ, B = lora_bᵀ.
//! Tensors are named by the module path with `.lora_a` / `.lora_b` appended
//! (`model.layers.3.self_attn.q_proj.lora_a`), the same paths transformers' Llama-family
//! checkpoints use. `num_layers` counts the adapted layers from the last one; `keys` names the
//! modules inside each layer (mlx-lm picks defaults per model type where it is missing).
//! DoRA (`fine_tune_type: "dora"`) and full fine-tuning are refused by name.

use super::peft::{field, number, rank, string, Adapter, LoraModule};
use crate::error::{bad_input, Result};
use crate::formats::safetensors::TensorFile;
use crate::mat::Mat;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The weights file of an MLX adapter folder (what tells it from a PEFT one).
pub const WEIGHTS_FILE: &str = "adapters.safetensors";

/// An MLX adapter; `config_name`/`weights.name` are used in messages.
pub fn parse(name: &str, config_name: &str, config_bytes: &[u8], weights: &TensorFile) -> Result<Adapter> {
    let config: Value =
        serde_json::from_slice(config_bytes).map_err(|e| bad_input(config_name, format!("not valid JSON ({e})")))?;
    let config = config.as_object().cloned().ok_or_else(|| bad_input(config_name, "must be a JSON object"))?;
    match field(config_name, &config, "fine_tune_type", string)?.unwrap_or("lora") {
        "lora" => {}
        "dora" => {
            return Err(bad_input(config_name, "is a DoRA adapter (fine_tune_type: \"dora\"); DoRA is not supported"))
        }
        "full" => {
            return Err(bad_input(
                config_name,
                "is a full fine-tune (fine_tune_type: \"full\"), not a LoRA adapter: nothing to merge as LoRA deltas",
            ))
        }
        other => {
            return Err(bad_input(config_name, format!("fine_tune_type is \"{other}\"; only \"lora\" can be merged")))
        }
    }
    let params = field(config_name, &config, "lora_parameters", |v| v.as_object().ok_or("an object"))?
        .ok_or_else(|| bad_input(config_name, "has no \"lora_parameters\" (an MLX adapter folder)"))?;
    let scale = field(config_name, params, "scale", number)?
        .ok_or_else(|| bad_input(config_name, "lora_parameters has no \"scale\""))?;
    field(config_name, params, "rank", rank)?;

    let mut modules = Vec::new();
    for key in weights.keys() {
        if let Some(path) = key.strip_suffix(".lora_a") {
            let bkey = format!("{path}.lora_b");
            if !weights.contains(&bkey) {
                return Err(bad_input(&weights.name, format!("has lora_a but no lora_b for module '{path}'")));
            }
            let (a, b) = (weights.mat(key)?, weights.mat(&bkey)?);
            // The tensors give each module's rank: mlx-lm loads them with strict=False, so a file
            // may hold other ranks than lora_parameters.rank (this tool's output pads instead).
            if a.cols != b.rows {
                return Err(bad_input(
                    &weights.name,
                    format!("module '{path}': lora_a is {:?} but lora_b is {:?} (ranks differ)", a.shape(), b.shape()),
                ));
            }
            modules.push(LoraModule {
                path: path.to_string(),
                a: a.transpose(),
                b: b.transpose(),
                scale: scale as f32,
            });
        } else if let Some(path) = key.strip_suffix(".lora_b") {
            if !weights.contains(&format!("{path}.lora_a")) {
                return Err(bad_input(&weights.name, format!("has lora_b but no lora_a for module '{path}'")));
            }
        } else if key.ends_with(".m") {
            return Err(bad_input(&weights.name, format!("is a DoRA adapter ('{key}'); DoRA is not supported")));
        } else {
            return Err(bad_input(
                &weights.name,
                format!("has tensor '{key}', which is not a lora_a/lora_b weight (a fine-tuned module); not supported"),
            ));
        }
    }
    if modules.is_empty() {
        return Err(bad_input(&weights.name, "holds no lora_a/lora_b weights"));
    }
    Ok(Adapter { name: name.to_string(), config, modules })
}

/// The merged adapter as MLX files, (adapter_config.json, adapters.safetensors): every module
/// padded with zeros to the largest rank (mlx-lm gives every adapted module the config's rank),
/// the config's scale 1; `num_layers` from the first adapted layer to the last of the model's
/// `layers`, `keys` the adapted modules within a layer. `modules`: (module path, A (r, in),
/// B (out, r)) with ΔW = B · A. Refused where a module is neither in a `layers.N.` block nor a
/// top-level module (mlx-lm could not place it), or where the model's weights are GPT-2's
/// `Conv1D` (`fan_in_fan_out`).
pub fn files(
    modules: &[(&str, &Mat, &Mat)],
    layers: usize,
    fan_in_fan_out: bool,
    f16: bool,
) -> Result<(Vec<u8>, Vec<u8>)> {
    if fan_in_fan_out {
        return Err(bad_input("--mlx", "GPT-2's Conv1D modules have no MLX adapter layout here; write PEFT"));
    }
    let rank = modules.iter().map(|m| m.1.rows).max().unwrap_or(1).max(1);
    // (r, c) → (rank, c), the rows past r zeros.
    let pad = |m: Mat| {
        let mut data = m.data;
        data.resize(rank * m.cols, 0.0);
        Mat::new(rank, m.cols, data)
    };
    let mut tensors = BTreeMap::new();
    let mut keys = std::collections::BTreeSet::new();
    let mut first_layer = layers;
    for &(path, a, b) in modules {
        // lora_a = Aᵀ (in, rank), lora_b = Bᵀ (rank, out).
        tensors.insert(format!("{path}.lora_a"), pad(a.clone()).transpose());
        tensors.insert(format!("{path}.lora_b"), pad(b.transpose()));
        match layer_and_key(path) {
            Some((layer, key)) => {
                first_layer = first_layer.min(layer);
                keys.insert(key.to_string());
            }
            None if !path.contains('.') => {
                keys.insert(path.to_string());
            }
            None => {
                return Err(bad_input(
                    "--mlx",
                    format!("module '{path}' is not in a `layers.N` block: mlx-lm could not place its LoRA"),
                ))
            }
        }
    }
    let weights = crate::formats::safetensors::write(&tensors, f16, None)?;
    let config = json!({
        "fine_tune_type": "lora",
        "num_layers": layers.saturating_sub(first_layer),
        "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": keys.into_iter().collect::<Vec<_>>()},
    });
    Ok((serde_json::to_vec_pretty(&config).expect("JSON of plain values"), weights))
}

/// (layer index, path within the layer) of `….layers.N.rest`.
fn layer_and_key(path: &str) -> Option<(usize, &str)> {
    let at = path.find("layers.")? + "layers.".len();
    let (n, rest) = path[at..].split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// Whether an adapter's config is an MLX one (`parse` keeps it as read).
pub fn is_mlx(config: &Map<String, Value>) -> bool {
    config.contains_key("lora_parameters")
}

/// The number of `layers.N` blocks among module names (mlx-lm counts `num_layers` from the last).
pub fn layer_count<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.filter_map(layer_and_key).map(|(l, _)| l + 1).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::layer_and_key;

    #[test]
    fn layer_paths() {
        assert_eq!(layer_and_key("model.layers.12.self_attn.q_proj"), Some((12, "self_attn.q_proj")));
        assert_eq!(layer_and_key("lm_head"), None);
    }
}
