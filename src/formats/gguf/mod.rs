//! GGUF, llama.cpp's model file: a header of typed metadata (`general.architecture`,
//! `llama.block_count`, `tokenizer.ggml.tokens`, …) and tensor descriptions, then the tensors,
//! each in a ggml type (`quants`). Read by ranges like safetensors: the header here, each tensor
//! when the model loads it (`safetensors::TensorFile` dequantizes it then).
//!
//! `base` turns a GGUF model into what a Hugging Face folder gives (config, tokenizer, tensor
//! names); `lora` writes a merged adapter as a llama.cpp LoRA (`write`); this module knows no
//! architecture.

pub mod base;
pub mod lora;
pub mod quants;
pub mod write;

use crate::error::{bad_input, Result};
use crate::formats::safetensors::ByteSource;
use quants::GgmlType;
use std::collections::BTreeMap;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    /// u64 values above i64's range.
    Uint(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Int(i) => u64::try_from(i).ok(),
            Value::Uint(u) => Some(u),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Uint(u) => Some(u as f64),
            Value::Float(f) => Some(f),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description.
#[derive(Clone, Debug)]
pub struct TensorDesc {
    pub ty: GgmlType,
    /// ggml's dimensions, fastest first: a weight of (out, in) in PyTorch is [in, out] here.
    pub dims: Vec<u64>,
    /// Byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// A parsed GGUF header.
pub struct Gguf {
    pub name: String,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorDesc>,
}

/// The most bytes a header may take (the metadata of a model with a 256k vocabulary and its
/// merges is about 20 MiB).
const MAX_HEADER: u64 = 1 << 30;
/// The longest string or array in a header.
const MAX_LEN: u64 = 1 << 26;

/// Reads the header in pieces from a source, counting where it is.
struct Cursor<'a> {
    source: &'a dyn ByteSource,
    name: &'a str,
    at: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at + n as u64;
        if end > self.source.len() {
            return Err(bad_input(self.name, format!("truncated GGUF header: it ends at byte {}", self.source.len())));
        }
        if end > MAX_HEADER {
            return Err(bad_input(
                self.name,
                format!("not a GGUF file this tool reads: a header of over {MAX_HEADER} bytes"),
            ));
        }
        if self.at < self.buf_at || end > self.buf_at + self.buf.len() as u64 {
            // Read ahead 1 MiB at a time (a header is many small fields).
            let len = (self.source.len() - self.at).min((1 << 20).max(n as u64)) as usize;
            self.buf =
                self.source.read(self.at, len).map_err(|e| bad_input(self.name, format!("cannot read ({e})")))?;
            self.buf_at = self.at;
        }
        let o = (self.at - self.buf_at) as usize;
        self.at = end;
        Ok(&self.buf[o..o + n])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > MAX_LEN {
            return Err(bad_input(self.name, format!("corrupt GGUF header: {what} of length {n}")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len("a string")?;
        let name = self.name;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| bad_input(name, "corrupt GGUF header: a string that is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let b = |c: &mut Self, n: usize| -> Result<Vec<u8>> { Ok(c.take(n)?.to_vec()) };
        Ok(match ty {
            0 => Value::Int(b(self, 1)?[0] as i64),
            1 => Value::Int(b(self, 1)?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            3 => Value::Int(i16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(i32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as i64),
            6 => Value::Float(f32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as f64),
            7 => Value::Bool(b(self, 1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 if depth < 2 => {
                let inner = self.u32()?;
                let n = self.len("an array")?;
                Value::Array((0..n).map(|_| self.value(inner, depth + 1)).collect::<Result<_>>()?)
            }
            10 => {
                let u = self.u64()?;
                i64::try_from(u).map_or(Value::Uint(u), Value::Int)
            }
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            _ => return Err(bad_input(self.name, format!("corrupt GGUF header: a value of unknown type {ty}"))),
        })
    }
}

impl Gguf {
    /// Read and check the header of `source`: the metadata, each tensor's type, size and place,
    /// and that every tensor lies within the file.
    pub fn open(name: &str, source: &dyn ByteSource) -> Result<Gguf> {
        let mut c = Cursor { source, name, at: 0, buf: Vec::new(), buf_at: 0 };
        if source.len() < 24 || c.take(4)? != b"GGUF" {
            return Err(bad_input(name, "not a GGUF file (it does not start with \"GGUF\")"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(bad_input(name, format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let (n_tensors, n_kv) = (c.u64()?, c.u64()?);
        if n_tensors > MAX_LEN || n_kv > MAX_LEN {
            return Err(bad_input(name, format!("corrupt GGUF header: {n_tensors} tensors, {n_kv} metadata keys")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut descs = Vec::new();
        for _ in 0..n_tensors {
            let tname = c.string()?;
            let n_dims = c.u32()?;
            if n_dims > 4 {
                return Err(bad_input(name, format!("corrupt GGUF header: tensor '{tname}' has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ty = c.u32()?;
            let offset = c.u64()?;
            descs.push((tname, dims, ty, offset));
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| bad_input(name, format!("general.alignment is {v:?}; it must be a power of two")))?,
        };
        let data_start = c.at.div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for (tname, dims, ty, offset) in descs {
            let bad = |what: String| bad_input(name, format!("tensor '{tname}': {what}"));
            let ty = GgmlType::from_id(ty).map_err(bad)?;
            let n = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad("its shape overflows".into()))?;
            let bytes = ty.bytes(n).ok_or_else(|| bad(format!("{n} values are not whole {ty:?} blocks")))?;
            let start = data_start.checked_add(offset).ok_or_else(|| bad("its offset overflows".into()))?;
            let end = start.saturating_add(bytes);
            if end > source.len() {
                return Err(bad(format!(
                    "its data ends at byte {end}, past the end of the file ({} bytes): truncated",
                    source.len()
                )));
            }
            if offset % align != 0 {
                return Err(bad(format!("its offset {offset} is not a multiple of the alignment {align}")));
            }
            if tensors.insert(tname.clone(), TensorDesc { ty, dims, start, end }).is_some() {
                return Err(bad("appears twice".into()));
            }
        }
        Ok(Gguf { name: name.to_string(), metadata, tensors })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string the file must have.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.get(key).and_then(Value::as_str).ok_or_else(|| bad_input(&self.name, format!("has no string \"{key}\"")))
    }
}
