//! The merged adapter as a llama.cpp LoRA (`adapter.gguf`), laid out as llama.cpp's
//! `convert_lora_to_gguf.py` writes one and `llama_adapter_lora_init` reads it: `general.type`
//! "adapter", `general.architecture` the base's, `adapter.type` "lora", `adapter.lora.alpha`; per
//! module `<base tensor>.lora_a` (ggml [in, r]) and `.lora_b` ([r, out]), B's rows permuted for
//! q and k as the converter permutes the base's. llama.cpp scales each module by alpha / r, r its
//! own rank: alpha is the largest rank, and each B carries r / alpha, so every module's delta is
//! exactly B · A.

use super::base;
use super::write::{self, Meta};
use crate::error::{bad_input, Result};
use crate::mat::Mat;

/// What the file needs to know of the base model.
pub struct BaseModel<'a> {
    pub model_type: &'a str,
    /// (attention heads, key/value heads), for q and k's permutation.
    pub heads: Option<(usize, usize)>,
}

/// `adapter.gguf` of `modules` (module name in the model, A (r, in), B (out, r)).
pub fn adapter_file(base: &BaseModel, modules: &[(&str, &Mat, &Mat)], f16: bool) -> Result<Vec<u8>> {
    let arch = base::gguf_architecture(base.model_type).ok_or_else(|| {
        bad_input(
            "--gguf",
            format!(
                "model_type \"{}\" has no llama.cpp LoRA layout here (supported: {})",
                base.model_type,
                base::HF_TYPES.join(", ")
            ),
        )
    })?;
    let alpha = modules.iter().map(|m| m.1.rows).max().unwrap_or(1).max(1);
    let mut tensors = Vec::new();
    for &(name, a, b) in modules {
        let gguf = base::gguf_name(arch, name).ok_or_else(|| {
            bad_input(
                "--gguf",
                format!("module '{name}' has no llama.cpp tensor name: llama.cpp could not place its LoRA"),
            )
        })?;
        let r = a.rows;
        let fold = (r as f64 / alpha as f64) as f32;
        let mut b = Mat::new(b.rows, b.cols, b.data.iter().map(|x| x * fold).collect());
        let heads = match (arch, gguf.rsplit('.').nth(1)) {
            ("llama", Some("attn_q")) => base.heads.map(|h| h.0),
            ("llama", Some("attn_k")) => base.heads.map(|h| h.1),
            _ => None,
        };
        if let Some(h) = heads {
            b = permute_rows(&b, h);
        }
        // ggml's dims are PyTorch's reversed: A (r, in) is [in, r], B (out, r) is [r, out].
        tensors.push((format!("{gguf}.lora_a"), a.clone()));
        tensors.push((format!("{gguf}.lora_b"), b));
    }
    let meta = [
        ("general.type", Meta::Str("adapter".into())),
        ("general.architecture", Meta::Str(arch.into())),
        ("adapter.type", Meta::Str("lora".into())),
        ("adapter.lora.alpha", Meta::F32(alpha as f32)),
    ];
    Ok(write::file(&meta, &tensors, f16))
}

/// q or k rows in llama.cpp's order (`base::llama_cpp_row`).
fn permute_rows(m: &Mat, heads: usize) -> Mat {
    let mut out = vec![0.0; m.data.len()];
    for r in 0..m.rows {
        let to = base::llama_cpp_row(r, m.rows / heads);
        out[to * m.cols..(to + 1) * m.cols].copy_from_slice(m.row(r));
    }
    Mat::new(m.rows, m.cols, out)
}
