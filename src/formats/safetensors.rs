//! safetensors reading (F32, F16, BF16; one file or shards listed by an index) and writing.
//!
//! Files are kept as bytes plus their parsed header; a tensor is converted to f32 only when asked
//! for, and checked for NaN/Inf then, so a bad weight is reported with its file and name.

use crate::error::{bad_input, Result};
use crate::mat::Mat;
pub use safetensors::tensor::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use std::collections::BTreeMap;

/// The end of the last tensor's data according to a header, if the header is readable JSON.
fn data_needed(header: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    v.as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .map(|e| e as usize)
}

/// One safetensors file, parsed but not converted.
pub struct TensorFile {
    /// What to call the file in messages (usually its path).
    pub name: String,
    bytes: Vec<u8>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
}

impl TensorFile {
    pub fn parse(name: impl Into<String>, bytes: Vec<u8>) -> Result<TensorFile> {
        let name = name.into();
        // Check the framing ourselves first: the crate's own errors do not say how the file is wrong
        // in words a user can act on.
        if bytes.len() < 8 {
            return Err(bad_input(&name, format!("not a safetensors file: only {} bytes", bytes.len())));
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if header_len > (bytes.len() - 8) as u64 {
            return Err(bad_input(
                &name,
                format!(
                    "truncated or not a safetensors file: header says {header_len} bytes but the file has only {} after it",
                    bytes.len() - 8
                ),
            ));
        }
        let (n, meta): (usize, Metadata) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            match data_needed(&bytes[8..8 + header_len as usize]) {
                Some(need) if need > bytes.len() - 8 - header_len as usize => bad_input(
                    &name,
                    format!(
                        "truncated: the header describes {need} bytes of tensor data but the file holds only {}",
                        bytes.len() - 8 - header_len as usize
                    ),
                ),
                _ => bad_input(&name, format!("corrupt safetensors file ({e})")),
            }
        })?;
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        for (key, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            if data_start + e > bytes.len() {
                return Err(bad_input(&name, format!("truncated: tensor '{key}' runs past the end of the file")));
            }
            let _ = s;
            tensors.insert(key, info.clone());
        }
        Ok(TensorFile { name, bytes, data_start, tensors })
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Size of the file in bytes (all of it is held in memory).
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The precision the tensor is stored in (None: no such tensor).
    pub fn dtype(&self, key: &str) -> Option<Dtype> {
        self.tensors.get(key).map(|t| t.dtype)
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    /// The tensor as a 2-D f32 matrix (1-D tensors become one row), checked for NaN/Inf.
    pub fn mat(&self, key: &str) -> Result<Mat> {
        let info = self.tensors.get(key).ok_or_else(|| bad_input(&self.name, format!("has no tensor '{key}'")))?;
        let (s, e) = info.data_offsets;
        let raw = &self.bytes[self.data_start + s..self.data_start + e];
        let numel: usize = info.shape.iter().product();
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(bad_input(
                    &self.name,
                    format!("tensor '{key}' has dtype {other:?}; only F32, F16 and BF16 are supported"),
                ))
            }
        };
        if data.len() != numel {
            return Err(bad_input(
                &self.name,
                format!("tensor '{key}': {} values stored for shape {:?}", data.len(), info.shape),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(bad_input(
                &self.name,
                format!("tensor '{key}' holds a non-finite value ({}) at index {i}", data[i]),
            ));
        }
        let (rows, cols) = match info.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => {
                return Err(bad_input(
                    &self.name,
                    format!("tensor '{key}' has shape {s:?}; expected a matrix or vector"),
                ))
            }
        };
        Ok(Mat::new(rows, cols, data))
    }
}

/// A set of safetensors files seen as one name space (a sharded checkpoint, or a single file).
pub struct TensorStore {
    pub files: Vec<TensorFile>,
    /// Which file holds each tensor.
    index: BTreeMap<String, usize>,
}

impl TensorStore {
    pub fn new(files: Vec<TensorFile>) -> Result<TensorStore> {
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for k in f.keys() {
                if let Some(j) = index.insert(k.clone(), i) {
                    return Err(bad_input(&f.name, format!("tensor '{k}' is also in {}", files[j].name)));
                }
            }
        }
        Ok(TensorStore { files, index })
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.index.get(key).and_then(|&i| self.files[i].shape(key))
    }

    pub fn dtype(&self, key: &str) -> Option<Dtype> {
        self.index.get(key).and_then(|&i| self.files[i].dtype(key))
    }

    /// Bytes the tensors take as f32 (`as_f32`) or in their stored precision.
    pub fn stored_bytes(&self, as_f32: bool) -> u64 {
        let files = self.files.iter().flat_map(|f| f.tensors.values());
        files
            .map(|t| {
                t.shape.iter().map(|&d| d as u64).product::<u64>()
                    * if as_f32 { 4 } else { (t.dtype.bitsize() as u64).div_ceil(8) }
            })
            .sum()
    }

    pub fn file_of(&self, key: &str) -> &str {
        self.index.get(key).map(|&i| self.files[i].name.as_str()).unwrap_or("model")
    }

    pub fn mat(&self, key: &str) -> Result<Mat> {
        match self.index.get(key) {
            Some(&i) => self.files[i].mat(key),
            None => Err(bad_input("model weights", format!("no tensor '{key}'"))),
        }
    }
}

/// The shard file names listed by a `model.safetensors.index.json`, in first-seen order.
pub fn shard_names(index_name: &str, index_json: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_slice(index_json).map_err(|e| bad_input(index_name, format!("not valid JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad_input(index_name, "has no \"weight_map\" object"))?;
    let mut names: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f.as_str().ok_or_else(|| bad_input(index_name, "weight_map values must be file names"))?;
        // A shard is a file of the model folder: never a path that leaves it.
        let plain = !f.is_empty()
            && f != "."
            && f != ".."
            && !f.contains(['/', '\\', '\0'])
            && !(f.len() >= 2 && f.as_bytes()[1] == b':');
        if !plain {
            return Err(bad_input(
                index_name,
                format!("names the shard '{f}', which is not a file name inside the model folder"),
            ));
        }
        if !names.iter().any(|n| n == f) {
            names.push(f.to_string());
        }
    }
    Ok(names)
}

/// Serialise F32 or F16 tensors (name → (shape, values)) into safetensors bytes.
pub fn write(
    tensors: &BTreeMap<String, Mat>,
    f16: bool,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    // Only finite numbers leave the tool: each value is checked as it will be stored (an f32 past
    // ±65504 becomes ±∞ in F16).
    let non_finite = |k: &str, i: usize, v: f32| {
        crate::error::Error::Numeric(format!(
            "the merged tensor '{k}' would hold a non-finite value at index {i} ({v}{}); nothing was written",
            if f16 && v.is_finite() { ", beyond F16's range of ±65504: write F32 (without --f16)" } else { "" }
        ))
    };
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, m) in tensors {
        let mut bytes = Vec::with_capacity(m.data.len() * if f16 { 2 } else { 4 });
        for (i, &v) in m.data.iter().enumerate() {
            if f16 {
                let h = half::f16::from_f32(v);
                if !h.is_finite() {
                    return Err(non_finite(k, i, v));
                }
                bytes.extend(h.to_le_bytes());
            } else {
                if !v.is_finite() {
                    return Err(non_finite(k, i, v));
                }
                bytes.extend(v.to_le_bytes());
            }
        }
        bufs.push((k.clone(), vec![m.rows, m.cols], bytes));
    }
    let dtype = if f16 { Dtype::F16 } else { Dtype::F32 };
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(k, s, b)| {
            safetensors::tensor::TensorView::new(dtype, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| crate::error::Error::Io(format!("writing safetensors: tensor '{k}': {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, metadata)
        .map_err(|e| crate::error::Error::Io(format!("writing safetensors: {e}")))
}
