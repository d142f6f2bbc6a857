//! A GGUF file (version 3) of metadata and F32 or F16 matrices: what `lora` writes.

use crate::mat::Mat;

/// A metadata value written.
pub enum Meta {
    Str(String),
    F32(f32),
}

const ALIGN: usize = 32;

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(ALIGN), 0);
}

/// The file's bytes: `meta`, then each (name, matrix) as ggml dims [cols, rows] (PyTorch's
/// shape reversed), in F16 where `f16`, else F32.
pub fn file(meta: &[(&str, Meta)], tensors: &[(String, Mat)], f16: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, v) in meta {
        string(&mut out, key);
        match v {
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
        }
    }
    let (ty, size) = if f16 { (1u32, 2) } else { (0u32, 4) };
    let mut offset = 0usize;
    for (name, m) in tensors {
        string(&mut out, name);
        out.extend(2u32.to_le_bytes());
        out.extend((m.cols as u64).to_le_bytes());
        out.extend((m.rows as u64).to_le_bytes());
        out.extend(ty.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + m.data.len() * size).next_multiple_of(ALIGN);
    }
    pad(&mut out);
    for (_, m) in tensors {
        if f16 {
            out.extend(m.data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()));
        } else {
            out.extend(m.data.iter().flat_map(|&x| x.to_le_bytes()));
        }
        pad(&mut out);
    }
    out
}
