//! Export the merged deltas as a PEFT LoRA adapter that Hugging Face PEFT loads unmodified.
//!
//! Lossless: ΔW* = B*·A* with B* = [B_1 … B_N], rank Σr, scale 1 (lora_alpha = r everywhere).
//! Reduced (`rank`): thin QR of B* and of A*ᵀ, SVD of the small (Σr × Σr) core R_B R_Aᵀ, keep the
//! top singular triplets, and report the Frobenius energy kept. No (out × in) matrix is ever formed.

use super::iteris::Target;
use super::solve::{to_f64, to_mat, Merged};
use crate::error::Result;
use crate::formats::peft::{Adapter, KEY_PREFIX};
use crate::mat::Mat;
use nalgebra::DMatrix;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Reduce one merged delta to at most `rank`; returns it and the fraction of ‖ΔW*‖²_F kept.
pub fn reduce_rank(m: &Merged, rank: usize) -> (Merged, f64) {
    if rank >= m.rank() {
        return (m.clone(), 1.0);
    }
    let qr_b = to_f64(&m.b).qr();
    let qr_a = to_f64(&m.a).transpose().qr();
    let (qb, rb) = (qr_b.q(), qr_b.r());
    let (qa, ra) = (qr_a.q(), qr_a.r());
    let (us, sv, kept) = truncated_svd(rb * ra.transpose(), rank);
    (Merged { a: to_mat(&(sv * qa.transpose())), b: to_mat(&(qb * us)) }, kept)
}

/// A dense (out, in) delta as a LoRA of rank ≤ `rank` (at least 1), with the energy kept.
pub fn dense_to_lora(d: &DMatrix<f64>, rank: usize) -> (Merged, f64) {
    let (b, a, kept) = truncated_svd(d.clone(), rank.max(1));
    (Merged { a: to_mat(&a), b: to_mat(&b) }, kept)
}

/// The top `rank` singular triplets of m as factors (U_k √Σ_k, √Σ_k V_kᵀ), and the fraction of
/// ‖m‖²_F they keep. faer's thin SVD (sorted, and 10× nalgebra's at the (576, 1536) of a small
/// model's MLP, which the output objective truncates at every module).
fn truncated_svd(m: DMatrix<f64>, rank: usize) -> (DMatrix<f64>, DMatrix<f64>, f64) {
    let f = faer::Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)]);
    let total: f64 = m.iter().map(|v| v * v).sum();
    let Ok(svd) = f.thin_svd() else {
        // Only a non-finite input fails; the solve refuses those before.
        return (DMatrix::zeros(m.nrows(), 0), DMatrix::zeros(0, m.ncols()), 0.0);
    };
    let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
    let k = rank.min(s.nrows());
    let root: Vec<f64> = (0..k).map(|i| s[i].max(0.0).sqrt()).collect();
    let kept: f64 = (0..k).map(|i| s[i] * s[i]).sum();
    let us = DMatrix::from_fn(u.nrows(), k, |r, c| u[(r, c)] * root[c]);
    let sv = DMatrix::from_fn(k, v.nrows(), |r, c| v[(c, r)] * root[r]);
    (us, sv, if total > 0.0 { (kept / total).min(1.0) } else { 1.0 })
}

/// The files of the merged adapter folder: name → bytes.
pub struct AdapterFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
}

/// Build `adapter_config.json` and `adapter_model.safetensors` for `deltas` (one per target).
pub fn adapter_files(
    targets: &[Target],
    deltas: &[Merged],
    first: &Adapter,
    fan_in_fan_out: bool,
    f16: bool,
) -> Result<AdapterFiles> {
    let mut tensors = BTreeMap::new();
    for (t, d) in targets.iter().zip(deltas) {
        tensors.insert(format!("{KEY_PREFIX}{}.lora_A.weight", t.path), d.a.clone());
        tensors.insert(format!("{KEY_PREFIX}{}.lora_B.weight", t.path), d.b.clone());
    }
    let weights = crate::formats::safetensors::write(&tensors, f16, None)?;

    // The most common rank is `r`; the others go to rank_pattern, with alpha_pattern keeping every
    // module's scale at exactly 1. Patterns are full module paths, anchored, dots escaped.
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for d in deltas {
        *counts.entry(d.rank()).or_default() += 1;
    }
    let r = counts.iter().max_by_key(|(r, n)| (**n, **r)).map(|(r, _)| *r).unwrap_or(1);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for (t, d) in targets.iter().zip(deltas) {
        if d.rank() != r {
            let key = regex::escape(&t.path);
            rank_pattern.insert(key.clone(), json!(d.rank()));
            alpha_pattern.insert(key, json!(d.rank()));
        }
    }
    let cfg = |k: &str| first.config.get(k).cloned().unwrap_or(Value::Null);
    let config = json!({
        "peft_type": "LORA",
        "task_type": cfg("task_type"),
        "base_model_name_or_path": cfg("base_model_name_or_path"),
        "r": r,
        "lora_alpha": r,
        "target_modules": targets.iter().map(|t| t.path.clone()).collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    Ok(AdapterFiles { config: serde_json::to_vec_pretty(&config).unwrap(), weights })
}

/// Dense ΔW* (out, in) of a merged delta: for tests and small checks only.
pub fn dense(m: &Merged) -> Mat {
    to_mat(&(to_f64(&m.b) * to_f64(&m.a)))
}

/// A `.zip` of `files` (name, bytes) under the folder `folder`, deflated: what the page downloads.
/// The `streamed` files are written into the zip as they are made, stored uncompressed (a dense
/// model's weights hardly deflate), so the zip holds them once and nothing else does.
pub fn zip_folder(folder: &str, files: &[(&str, &[u8])], streamed: Vec<Streamed>) -> Result<Vec<u8>> {
    use std::io::Write;
    let fail = |e: &dyn std::fmt::Display| crate::error::Error::Io(format!("cannot write the .zip ({e})"));
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        z.start_file(format!("{folder}/{name}"), opts).map_err(|e| fail(&e))?;
        z.write_all(bytes).map_err(|e| fail(&e))?;
    }
    let stored = opts.compression_method(zip::CompressionMethod::Stored).large_file(true);
    for (name, write) in streamed {
        z.start_file(format!("{folder}/{name}"), stored).map_err(|e| fail(&e))?;
        write(&mut z)?;
    }
    Ok(z.finish().map_err(|e| fail(&e))?.into_inner())
}

/// A file written as it is made (a dense model, too large to hold whole): its name in the
/// folder and what writes it.
pub type Streamed<'a> = (&'a str, Box<dyn FnOnce(&mut dyn std::io::Write) -> Result<()> + 'a>);
