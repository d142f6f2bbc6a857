//! What a merge runs on: the model modules its adapters target (`map_targets`; every linear
//! module with `with_every_module`) and the token ids of its samples (`tokenize`).

use super::iteris::Target;
use crate::error::{bad_input, Result};
use crate::formats::peft::Adapter;
use crate::formats::tokenizer::TextTokenizer;
use crate::models;

/// Match every adapter module to a model module. An adapter path matches a model module name when it
/// equals it or ends with `.` + name (the class prefix differs between checkpoints); anything else is
/// refused with the adapter's name.
/// Parts of multimodal checkpoints (Gemma 3, …) that are not the language model.
const OTHER_TOWERS: [&str; 4] = ["vision_tower", "vision_model", "multi_modal_projector", "audio_tower"];

pub fn map_targets(
    modules: &[models::ModuleInfo],
    adapters: &[&Adapter],
    model_type: &str,
    fan_in_fan_out: bool,
) -> Result<Vec<Target>> {
    let mut targets: Vec<Target> = Vec::new();
    for (ai, ad) in adapters.iter().enumerate() {
        if ad.fan_in_fan_out() && !fan_in_fan_out {
            return Err(bad_input(&ad.name, format!("adapter_config.json says fan_in_fan_out: true, but {model_type} stores weights as (out, in): is this adapter for another architecture?")));
        }
        for l in &ad.modules {
            // A multimodal checkpoint's other towers reuse the language model's module names
            // (`vision_tower….layers.0.self_attn.q_proj`): only the language model is merged.
            if let Some(tower) = OTHER_TOWERS.iter().find(|t| l.path.split('.').any(|p| p == **t)) {
                return Err(bad_input(
                    &ad.name,
                    format!(
                        "targets '{}' in the model's {tower}: only the language model's modules can be merged",
                        l.path
                    ),
                ));
            }
            let hits: Vec<&models::ModuleInfo> =
                modules.iter().filter(|m| l.path == m.name || l.path.ends_with(&format!(".{}", m.name))).collect();
            let m = match hits.as_slice() {
                [m] => *m,
                [] => {
                    return Err(bad_input(
                        &ad.name,
                        format!("targets module '{}', which the base model ({model_type}) does not have: is this adapter for another model?", l.path),
                    ))
                }
                _ => return Err(bad_input(&ad.name, format!("module '{}' matches several modules of the base model: ambiguous", l.path))),
            };
            if l.a.cols != m.in_dim || l.b.rows != m.out_dim {
                return Err(bad_input(
                    &ad.name,
                    format!(
                        "module '{}': LoRA maps {} → {} features but the base model's {} maps {} → {}: wrong base model?",
                        l.path, l.a.cols, l.b.rows, m.name, m.in_dim, m.out_dim
                    ),
                ));
            }
            let t = match targets.iter().position(|t| t.name == m.name) {
                Some(t) => t,
                None => {
                    targets.push(Target {
                        name: m.name.clone(),
                        path: l.path.clone(),
                        out_dim: m.out_dim,
                        in_dim: m.in_dim,
                        loras: vec![None; adapters.len()],
                    });
                    targets.len() - 1
                }
            };
            if targets[t].loras[ai].is_some() {
                return Err(bad_input(&ad.name, format!("targets module '{}' twice", m.name)));
            }
            targets[t].loras[ai] = Some(l.clone());
        }
    }
    // Forward order, so progress and reports read top to bottom.
    let order = |n: &str| modules.iter().position(|m| m.name == n).unwrap();
    targets.sort_by_key(|t| order(&t.name));
    Ok(targets)
}

/// `targets` and every other linear module of the layers (the LM head excepted), in forward
/// order: the modules a merge with extra capacity (`ModuleSet::All`) solves. The added modules'
/// paths carry the class prefix the adapters' paths do.
pub fn with_every_module(modules: &[models::ModuleInfo], mut targets: Vec<Target>) -> Vec<Target> {
    let Some(first) = targets.first() else { return targets };
    let prefix = first.path.strip_suffix(&first.name).unwrap_or("").to_string();
    let tasks = first.loras.len();
    for m in modules {
        if m.name != "lm_head" && !targets.iter().any(|t| t.name == m.name) {
            targets.push(Target {
                name: m.name.clone(),
                path: format!("{prefix}{}", m.name),
                out_dim: m.out_dim,
                in_dim: m.in_dim,
                loras: vec![None; tasks],
            });
        }
    }
    let order = |n: &str| modules.iter().position(|m| m.name == n).unwrap_or(usize::MAX);
    targets.sort_by_key(|t| order(&t.name));
    targets
}

/// Tokenize each sample, truncated to `max_len` (and to the model's positions); says how many were cut.
pub fn tokenize(
    tok: &TextTokenizer,
    samples: &[String],
    max_len: usize,
    vocab: Option<usize>,
    file: &str,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut out = Vec::with_capacity(samples.len());
    let mut cut = 0;
    for s in samples {
        let e = tok.encode(s, max_len)?;
        if e.ids.is_empty() {
            continue;
        }
        if let Some(v) = vocab {
            if let Some(bad) = e.ids.iter().find(|&&i| i as usize >= v) {
                return Err(bad_input(file, format!("a sample tokenizes to id {bad}, beyond the model's vocabulary of {v}: tokenizer.json does not belong to this model")));
            }
        }
        cut += e.truncated as usize;
        out.push(e.ids);
    }
    if out.is_empty() {
        return Err(bad_input(file, "no sample produced any token"));
    }
    Ok((out, cut))
}
