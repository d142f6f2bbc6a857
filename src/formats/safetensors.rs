//! safetensors reading (F32, F16, BF16; one file or shards listed by an index) and writing; the
//! tensors of a GGUF file read through the same `TensorFile` (dequantized as they are read).
//!
//! Files are kept as bytes plus their parsed header; a tensor is converted to f32 only when asked
//! for, and checked for NaN/Inf then, so a bad weight is reported with its file and name.

use crate::error::{bad_input, Result};
use crate::formats::gguf::{self, quants::GgmlType, Gguf};
use crate::mat::{Mat, Stored, StoredMat};
pub use safetensors::tensor::Dtype;

use std::collections::BTreeMap;

/// Where a safetensors file's bytes are. A file is read by ranges (its header, then one tensor at
/// a time as the model loads), so a source that is not held in memory (a file on disk, a `File`
/// dropped onto the page) never has to be held whole.
pub trait ByteSource {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Bytes `offset .. offset + len` (within `len()`); the error says why they could not be read.
    fn read(&self, offset: u64, len: usize) -> std::result::Result<Vec<u8>, String>;
    /// Bytes this source holds in memory (what the memory plan counts as input files).
    fn held(&self) -> u64 {
        0
    }
}

impl ByteSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read(&self, offset: u64, len: usize) -> std::result::Result<Vec<u8>, String> {
        let o = offset as usize;
        Ok(self[o..o + len].to_vec())
    }
    fn held(&self) -> u64 {
        self.as_slice().len() as u64
    }
}

/// The safetensors crate's limit on a header (a larger one is not a safetensors file).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor's header entry. Offsets are u64: in the page (wasm32, 32-bit `usize`) a file may
/// exceed 4 GiB (it is read by ranges, never held), which the crate's `Metadata` cannot express.
#[derive(Clone, Debug)]
struct TensorInfo {
    /// The precision it reads as (F32 for a quantized GGUF tensor, dequantized when read).
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the data section.
    start: u64,
    end: u64,
    /// A tensor of a GGUF file: its ggml type and what undoes llama.cpp's converter.
    ggml: Option<(GgmlType, gguf::base::Undo)>,
}

/// The tensors a header describes, checked as the safetensors crate checks them (known dtypes,
/// offsets in order without gaps or overlaps, each tensor's byte size its shape's), and the
/// length of the data section they cover.
fn parse_header(header: &[u8]) -> std::result::Result<(BTreeMap<String, TensorInfo>, u64), String> {
    let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let obj = v.as_object().ok_or("the header is not a JSON object")?;
    let mut tensors = BTreeMap::new();
    for (key, t) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = |what: &str| format!("tensor '{key}': {what}");
        let dtype: Dtype = serde_json::from_value(t.get("dtype").cloned().unwrap_or_default())
            .map_err(|_| bad(&format!("unknown dtype {}", t.get("dtype").unwrap_or(&serde_json::Value::Null))))?;
        let shape = t
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad("\"shape\" is not a list of sizes"))?;
        let offsets = t.get("data_offsets").and_then(|o| o.as_array()).filter(|o| o.len() == 2);
        let (start, end) = match offsets.map(|o| (o[0].as_u64(), o[1].as_u64())) {
            Some((Some(s), Some(e))) if s <= e => (s, e),
            _ => return Err(bad("\"data_offsets\" is not [start, end]")),
        };
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize() as u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| bad("its shape overflows"))?;
        if bits % 8 != 0 || end - start != bits / 8 {
            return Err(bad(&format!("{} bytes stored for shape {shape:?} of {dtype:?}", end - start)));
        }
        tensors.insert(key.clone(), TensorInfo { dtype, shape, start, end, ggml: None });
    }
    let mut ranges: Vec<(u64, u64, &String)> = tensors.iter().map(|(k, t)| (t.start, t.end, k)).collect();
    ranges.sort();
    let mut at = 0;
    for (s, e, k) in ranges {
        if s != at {
            return Err(format!("tensor '{k}' starts at byte {s} of the data, not {at} (a gap or an overlap)"));
        }
        at = e;
    }
    Ok((tensors, at))
}

/// One safetensors file: its parsed header, and where its bytes are (read when a tensor is asked for).
pub struct TensorFile {
    /// What to call the file in messages (usually its path).
    pub name: String,
    source: Box<dyn ByteSource>,
    data_start: u64,
    tensors: BTreeMap<String, TensorInfo>,
}

impl TensorFile {
    /// A file held in memory.
    pub fn parse(name: impl Into<String>, bytes: Vec<u8>) -> Result<TensorFile> {
        TensorFile::open(name, Box::new(bytes))
    }

    /// Read and check the header of `source` (only its first 8 + header bytes are read): every
    /// tensor's dtype, shape and offsets, and that the data the header describes is all there.
    pub fn open(name: impl Into<String>, source: Box<dyn ByteSource>) -> Result<TensorFile> {
        let name = name.into();
        // Check the framing ourselves: the crate's own errors do not say how the file is wrong in
        // words a user can act on.
        let len = source.len();
        if len < 8 {
            return Err(bad_input(&name, format!("not a safetensors file: only {len} bytes")));
        }
        let read =
            |offset: u64, n: usize| source.read(offset, n).map_err(|e| bad_input(&name, format!("cannot read ({e})")));
        let header_len = u64::from_le_bytes(read(0, 8)?.try_into().unwrap());
        if header_len > len - 8 {
            return Err(bad_input(
                &name,
                format!(
                    "truncated or not a safetensors file: header says {header_len} bytes but the file has only {} after it",
                    len - 8
                ),
            ));
        }
        if header_len > MAX_HEADER {
            return Err(bad_input(&name, format!("not a safetensors file: a header of {header_len} bytes")));
        }
        let header = read(8, header_len as usize)?;
        let (tensors, need) =
            parse_header(&header).map_err(|e| bad_input(&name, format!("corrupt safetensors file ({e})")))?;
        let data_start = 8 + header_len;
        let have = len - data_start;
        if need > have {
            return Err(bad_input(
                &name,
                format!("truncated: the header describes {need} bytes of tensor data but the file holds only {have}"),
            ));
        }
        if need < have {
            return Err(bad_input(
                &name,
                format!(
                    "corrupt safetensors file: {} bytes follow the {need} bytes of tensor data its header describes",
                    have - need
                ),
            ));
        }
        Ok(TensorFile { name, source, data_start, tensors })
    }

    /// A GGUF file's tensors under their checkpoint names (`gguf::base`), read by ranges from
    /// `source` and dequantized as they are read.
    pub fn gguf(name: impl Into<String>, source: Box<dyn ByteSource>, g: &Gguf) -> Result<TensorFile> {
        let name = name.into();
        let mut tensors = BTreeMap::new();
        for (key, t) in gguf::base::tensors(g)? {
            let desc = &g.tensors[&t.gguf];
            let dtype = match desc.ty {
                _ if t.undo.minus_one => Dtype::F32,
                GgmlType::F16 => Dtype::F16,
                GgmlType::BF16 => Dtype::BF16,
                _ => Dtype::F32,
            };
            if let Some(h) = t.undo.unpermute_heads {
                if t.shape.len() != 2 || h == 0 || t.shape[0] % (2 * h) != 0 {
                    return Err(bad_input(
                        &name,
                        format!("tensor '{}' of shape {:?} cannot hold {h} heads of rotary pairs", t.gguf, t.shape),
                    ));
                }
            }
            let info =
                TensorInfo { dtype, shape: t.shape, start: desc.start, end: desc.end, ggml: Some((desc.ty, t.undo)) };
            tensors.insert(key, info);
        }
        Ok(TensorFile { name, source, data_start: 0, tensors })
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Bytes of the file held in memory (0 when it is read by ranges from where it lies).
    pub fn held_bytes(&self) -> u64 {
        self.source.held()
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
        Ok(self.stored(key)?.to_mat())
    }

    /// The tensor as a 2-D matrix in its stored precision (1-D tensors become one row), checked
    /// for NaN/Inf on its bits.
    pub fn stored(&self, key: &str) -> Result<StoredMat> {
        let info = self.tensors.get(key).ok_or_else(|| bad_input(&self.name, format!("has no tensor '{key}'")))?;
        // A tensor this process cannot address (past 4 GiB in the page) is refused by the memory
        // plan before it is asked for; say so rather than truncate if it ever is.
        let n = usize::try_from(info.end - info.start)
            .map_err(|_| bad_input(&self.name, format!("tensor '{key}' is too large to read here")))?;
        let raw = self
            .source
            .read(self.data_start + info.start, n)
            .map_err(|err| bad_input(&self.name, format!("cannot read tensor '{key}' ({err})")))?;
        // A quantized GGUF tensor, dequantized to f32 here (its dtype says F32).
        let quantized =
            info.ggml.map(|(ty, _)| ty).filter(|ty| !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16));
        let halves = || raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<u16>>();
        // The first value that is not finite: f32 by value, half precision by its exponent bits.
        let (data, bad) = match info.dtype {
            Dtype::F32 => {
                let v: Vec<f32> = match quantized {
                    Some(ty) => gguf::quants::dequantize(ty, &raw),
                    None => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                };
                let bad = v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]));
                (Stored::F32(v), bad)
            }
            Dtype::F16 => {
                let b = halves();
                let bad =
                    b.iter().position(|&x| x & 0x7C00 == 0x7C00).map(|i| (i, half::f16::from_bits(b[i]).to_f32()));
                (Stored::F16(b), bad)
            }
            Dtype::BF16 => {
                let b = halves();
                let bad =
                    b.iter().position(|&x| x & 0x7F80 == 0x7F80).map(|i| (i, half::bf16::from_bits(b[i]).to_f32()));
                (Stored::Bf16(b), bad)
            }
            other => {
                return Err(bad_input(
                    &self.name,
                    format!("tensor '{key}' has dtype {other:?}; only F32, F16 and BF16 are supported"),
                ))
            }
        };
        if let Some((i, v)) = bad {
            return Err(bad_input(&self.name, format!("tensor '{key}' holds a non-finite value ({v}) at index {i}")));
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
        let data = match info.ggml {
            Some((_, undo)) => undo.apply(data, rows, cols),
            None => data,
        };
        Ok(StoredMat { rows, cols, data })
    }
}

impl gguf::base::Undo {
    /// The checkpoint's values of a tensor llama.cpp's converter changed.
    fn apply(self, data: Stored, rows: usize, cols: usize) -> Stored {
        let data = match self.unpermute_heads {
            Some(h) => unpermute(data, rows, cols, h),
            None => data,
        };
        match (self.minus_one, data) {
            (true, Stored::F32(v)) => Stored::F32(v.into_iter().map(|x| x - 1.0).collect()),
            (true, Stored::F16(v)) => {
                Stored::F32(v.into_iter().map(|x| half::f16::from_bits(x).to_f32() - 1.0).collect())
            }
            (true, Stored::Bf16(v)) => {
                Stored::F32(v.into_iter().map(|x| half::bf16::from_bits(x).to_f32() - 1.0).collect())
            }
            (false, data) => data,
        }
    }
}

/// The rows of q or k in the checkpoint's order (`gguf::base::llama_cpp_row` undone).
fn unpermute(data: Stored, rows: usize, cols: usize, heads: usize) -> Stored {
    let order: Vec<usize> = (0..rows).map(|r| gguf::base::llama_cpp_row(r, rows / heads)).collect();
    fn rows_of<T: Copy>(v: &[T], order: &[usize], cols: usize) -> Vec<T> {
        order.iter().flat_map(|&r| v[r * cols..(r + 1) * cols].iter().copied()).collect()
    }
    match data {
        Stored::F32(v) => Stored::F32(rows_of(&v, &order, cols)),
        Stored::F16(v) => Stored::F16(rows_of(&v, &order, cols)),
        Stored::Bf16(v) => Stored::Bf16(rows_of(&v, &order, cols)),
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

    /// The largest tensor's bytes in its file (what reading it holds beside its converted copy).
    pub fn largest_tensor_bytes(&self) -> u64 {
        self.files.iter().flat_map(|f| f.tensors.values()).map(|t| t.end - t.start).max().unwrap_or(0)
    }

    /// The largest F32 matrix's bytes (0 where none is F32), a quantized GGUF tensor's dequantized.
    pub fn largest_f32_matrix_bytes(&self) -> u64 {
        let files = self.files.iter().flat_map(|f| f.tensors.values());
        let bytes = |t: &TensorInfo| t.shape.iter().map(|&d| d as u64).product::<u64>() * 4;
        files.filter(|t| t.dtype == Dtype::F32 && t.shape.len() >= 2).map(bytes).max().unwrap_or(0)
    }

    pub fn file_of(&self, key: &str) -> &str {
        self.index.get(key).map(|&i| self.files[i].name.as_str()).unwrap_or("model")
    }

    pub fn mat(&self, key: &str) -> Result<Mat> {
        Ok(self.stored(key)?.to_mat())
    }

    pub fn stored(&self, key: &str) -> Result<StoredMat> {
        match self.index.get(key) {
            Some(&i) => self.files[i].stored(key),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data]);
        b
    }

    fn err(header: &str, data: usize) -> String {
        TensorFile::parse("f", file(header, data)).err().expect("refused").to_string()
    }

    #[test]
    fn headers_are_checked_like_the_crate_checks_them() {
        let two = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[3],"data_offsets":[8,14]}}"#;
        let f = TensorFile::parse("f", file(two, 14)).unwrap();
        assert_eq!((f.shape("b"), f.dtype("b")), (Some(&[3usize][..]), Some(Dtype::F16)));
        assert!(err(two, 13).contains("truncated"));
        assert!(err(two, 15).contains("1 bytes follow"));
        let gap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(err(gap, 12).contains("starts at byte 4"));
        let size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(err(size, 8).contains("8 bytes stored for shape [3]"));
        let dtype = r#"{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(err(dtype, 8).contains("unknown dtype"));
        assert!(err(r#"[1, 2]"#, 0).contains("not a JSON object"));
    }

    /// A header past 4 GiB of data (a file the page reads by ranges) parses: offsets are u64.
    #[test]
    fn offsets_past_four_gib_parse() {
        let n: u64 = 6 << 30;
        let h = format!(r#"{{"w":{{"dtype":"F32","shape":[{},1024],"data_offsets":[0,{n}]}}}}"#, n / 4096);
        let (t, end) = parse_header(h.as_bytes()).unwrap();
        assert_eq!((t["w"].end, end), (n, n));
    }
}
