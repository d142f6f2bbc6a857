//! The merged model as a dense checkpoint (`--dense`): every tensor of the base in its stored
//! precision (a GGUF base's quantized tensors in f32, as they were dequantized), the weight of each
//! merged module plus its delta B·A, as one safetensors file beside the base's config.json and
//! tokenizer.json: a Hugging Face folder transformers loads. The file is written tensor by tensor
//! to a stream, so neither the base nor the output is held whole.

use super::iteris::Target;
use super::solve::Merged;
use crate::error::{bad_input, Error, Result};
use crate::formats::safetensors::{Dtype, TensorStore};
use crate::inputs::BaseInputs;
use crate::mat::{Stored, StoredMat};
use std::collections::BTreeMap;
use std::io::Write;

/// The files of the dense folder that are small: config.json and tokenizer.json.
pub fn small_files(base: &BaseInputs) -> Result<[Vec<u8>; 2]> {
    let config = serde_json::to_vec_pretty(&base.config.raw).expect("JSON values serialize");
    Ok([config, base.tokenizer.to_json()?.into_bytes()])
}

/// The base tensor each merged module's delta adds to: its `name.weight`, under any class prefix.
fn weight_keys(store: &TensorStore, targets: &[Target]) -> Result<BTreeMap<String, usize>> {
    let keys: Vec<&String> = store.keys().collect();
    let mut out = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        let own = format!("{}.weight", t.name);
        let under = format!(".{own}");
        let found: Vec<&&String> = keys.iter().filter(|k| **k == &own || k.ends_with(&under)).collect();
        match found.as_slice() {
            [k] => {
                out.insert((**k).clone(), i);
            }
            [] => {
                return Err(bad_input(
                    "--dense",
                    format!("module {} has no weight of its own in the base (a head tied to the embedding?): write the adapter instead", t.name),
                ))
            }
            _ => return Err(bad_input("--dense", format!("module {} matches several base weights", t.name))),
        }
    }
    Ok(out)
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        _ => "F32",
    }
}

/// Write model.safetensors of the merged model to `out`. `fan_in_fan_out`: the base stores its
/// linear weights as (in, out) (GPT-2's Conv1D), so each delta is added transposed.
pub fn write_model(
    store: &TensorStore,
    targets: &[Target],
    deltas: &[Merged],
    fan_in_fan_out: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let merged = weight_keys(store, targets)?;
    let io = |e: std::io::Error| Error::Io(format!("cannot write the dense model ({e})"));
    // The header first: every size is known from the base's shapes and dtypes.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut at = 0u64;
    let keys: Vec<String> = store.keys().cloned().collect();
    for k in &keys {
        let dtype = store.dtype(k).unwrap_or(Dtype::F32);
        let shape = store.shape(k).unwrap_or(&[]);
        let n: u64 = shape.iter().map(|&d| d as u64).product::<u64>() * (dtype.bitsize() as u64 / 8);
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": dtype_name(dtype), "shape": shape, "data_offsets": [at, at + n]}),
        );
        at += n;
    }
    let mut h = serde_json::to_vec(&header).expect("JSON values serialize");
    h.resize(h.len().next_multiple_of(8), b' ');
    out.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&h).map_err(io)?;
    for k in &keys {
        let mut w = store.stored(k)?;
        if let Some(&i) = merged.get(k) {
            add_delta(&mut w, &deltas[i], fan_in_fan_out, k)?;
        }
        out.write_all(&bytes(&w.data)).map_err(io)?;
    }
    Ok(())
}

/// `w += B·A` (or its transpose), in f32, stored back in w's precision; refused where a value
/// leaves that precision's range.
fn add_delta(w: &mut StoredMat, m: &Merged, transposed: bool, key: &str) -> Result<()> {
    let d = super::export::dense(m);
    let d = if transposed { d.transpose() } else { d };
    if (d.rows, d.cols) != (w.rows, w.cols) {
        return Err(bad_input(
            "--dense",
            format!("the delta of {key} is {}×{}, the base weight {}×{}", d.rows, d.cols, w.rows, w.cols),
        ));
    }
    let bad = |i: usize| {
        Error::Numeric(format!(
            "the merged weight '{key}' would hold a non-finite value at index {i}; nothing was written"
        ))
    };
    match &mut w.data {
        Stored::F32(v) => {
            for (i, (x, dx)) in v.iter_mut().zip(&d.data).enumerate() {
                *x += dx;
                if !x.is_finite() {
                    return Err(bad(i));
                }
            }
        }
        Stored::F16(v) => {
            for (i, (x, dx)) in v.iter_mut().zip(&d.data).enumerate() {
                let y = half::f16::from_f32(half::f16::from_bits(*x).to_f32() + dx);
                if !y.is_finite() {
                    return Err(bad(i));
                }
                *x = y.to_bits();
            }
        }
        Stored::Bf16(v) => {
            for (i, (x, dx)) in v.iter_mut().zip(&d.data).enumerate() {
                let y = half::bf16::from_f32(half::bf16::from_bits(*x).to_f32() + dx);
                if !y.is_finite() {
                    return Err(bad(i));
                }
                *x = y.to_bits();
            }
        }
    }
    Ok(())
}

fn bytes(s: &Stored) -> Vec<u8> {
    match s {
        Stored::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Stored::F16(v) | Stored::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}
