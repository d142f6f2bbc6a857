//! The input folders of a merge — a base model folder, adapter folders, sample files — read the
//! same way from a directory (the CLI, `fsio`) and from files dropped onto the page (`wasm`).
//! Everything here checks what it reads and names the file when something is wrong.

use crate::error::{bad_input, Result};
use crate::formats::gguf::{self, Gguf};
use crate::formats::hf_config::HfConfig;
use crate::formats::peft::Adapter;
use crate::formats::safetensors::{shard_names, ByteSource, TensorFile, TensorStore};
use crate::formats::samples::EvalSet;
use crate::formats::{mlx, samples, tokenizer::TextTokenizer};

/// A base model folder, parsed.
pub struct BaseInputs {
    pub config: HfConfig,
    pub weights: TensorStore,
    pub tokenizer: TextTokenizer,
}

/// One adapter and its calibration samples.
pub struct TaskInput {
    pub adapter: Adapter,
    pub samples_name: String,
    pub samples: Vec<String>,
    /// Held-out samples to measure the merge's quality on (optional).
    pub eval: Option<EvalSet>,
}

impl TaskInput {
    /// The task's name in quality tables: its held-out file, else its samples file.
    pub fn quality_name(&self) -> String {
        self.eval.as_ref().map_or(self.samples_name.clone(), |e| e.name.clone())
    }
}

/// What an input file is, and so the most bytes it may have: a size is checked before a file
/// is read, so a huge or endless input (a device, a runaway file) costs nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// config.json, adapter_config.json, model.safetensors.index.json.
    Json,
    Tokenizer,
    /// A safetensors file.
    Weights,
    /// Calibration or held-out samples.
    Samples,
}

impl FileKind {
    pub fn cap(self) -> u64 {
        match self {
            FileKind::Json => 64 << 20,
            FileKind::Tokenizer => 256 << 20,
            FileKind::Samples => 256 << 20,
            // Read by ranges, never held whole: what the weights need is the memory plan's to judge.
            FileKind::Weights => 256 << 30,
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            FileKind::Json => "a JSON settings file",
            FileKind::Tokenizer => "a tokenizer.json",
            FileKind::Weights => "a safetensors file",
            FileKind::Samples => "a samples file",
        }
    }

    /// Refuse `len` bytes when over the cap.
    pub fn check_len(self, name: &str, len: u64) -> Result<()> {
        if len > self.cap() {
            return Err(bad_input(
                name,
                format!(
                    "is {} MiB, more than the {} MiB {} may have here",
                    len.div_ceil(1 << 20),
                    self.cap() >> 20,
                    self.what()
                ),
            ));
        }
        Ok(())
    }
}

/// Host memory this process can still use (input files larger than this are not read;
/// `merge::plan` uses the smaller of this and `Options::max_memory_mib`): the system's available memory natively (Linux), what
/// is left of WebAssembly's 4 GiB in the page; None where neither can be known.
pub fn host_available() -> Option<u64> {
    #[cfg(target_arch = "wasm32")]
    {
        let used = core::arch::wasm32::memory_size(0) as u64 * 65536;
        Some((4u64 << 30).saturating_sub(used))
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// A folder of input files.
pub trait Folder {
    /// What to call the folder in messages.
    fn name(&self) -> String;
    /// What to call `file` of the folder in messages.
    fn path(&self, file: &str) -> String;
    /// The names of the files in the folder (not yet taken).
    fn list(&self) -> Vec<String>;
    /// The bytes of `file` (a file name inside the folder), or None when the folder has no such
    /// file; refused when it is larger than `kind` allows or not a regular file. Each file is read
    /// once (an in-memory folder hands its bytes over rather than copying them).
    fn take(&mut self, file: &str, kind: FileKind) -> Result<Option<Vec<u8>>>;
    /// `file` as a source read by ranges (safetensors: a header, then a tensor at a time), or None
    /// when the folder has no such file. Folders whose files lie elsewhere (on disk, a dropped
    /// `File`) hand out a reader, so a model is never held whole; the default hands over the bytes.
    fn open(&mut self, file: &str, kind: FileKind) -> Result<Option<Box<dyn ByteSource>>> {
        Ok(self.take(file, kind)?.map(|b| Box::new(b) as Box<dyn ByteSource>))
    }
}

fn need(f: &mut dyn Folder, file: &str, kind: FileKind, what: &str) -> Result<Vec<u8>> {
    f.take(file, kind)?.ok_or_else(|| bad_input(f.name(), format!("has no {file} ({what})")))
}

/// `config.json`, `tokenizer.json`, and `model.safetensors` or the shards that
/// `model.safetensors.index.json` lists; or, in a folder without config.json, its one `.gguf` file.
pub fn read_base(f: &mut dyn Folder) -> Result<BaseInputs> {
    let names = f.list();
    let ggufs: Vec<&String> = names.iter().filter(|n| n.to_ascii_lowercase().ends_with(".gguf")).collect();
    if !names.iter().any(|n| n == "config.json") {
        match ggufs.as_slice() {
            [g] => {
                let source = f.open(g, FileKind::Weights)?.expect("a listed file opens");
                return read_base_gguf(&f.path(g), source);
            }
            [_, _, ..] => {
                return Err(bad_input(
                    f.name(),
                    "holds several .gguf files: drop one model (a split GGUF is not supported)",
                ))
            }
            [] => {}
        }
    }
    let config = HfConfig::parse(
        f.path("config.json"),
        &need(f, "config.json", FileKind::Json, "a Hugging Face model folder")?,
    )?;
    let tokenizer = TextTokenizer::parse(
        f.path("tokenizer.json"),
        &need(f, "tokenizer.json", FileKind::Tokenizer, "the model's tokenizer")?,
    )?;
    let files = if let Some(source) = f.open("model.safetensors", FileKind::Weights)? {
        vec![TensorFile::open(f.path("model.safetensors"), source)?]
    } else if let Some(index) = f.take("model.safetensors.index.json", FileKind::Json)? {
        let names = shard_names(&f.path("model.safetensors.index.json"), &index)?;
        names
            .iter()
            .map(|n| {
                let source = f.open(n, FileKind::Weights)?.ok_or_else(|| {
                    bad_input(f.path("model.safetensors.index.json"), format!("lists the shard {n}, which is missing"))
                })?;
                TensorFile::open(f.path(n), source)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        return Err(bad_input(f.name(), "has neither model.safetensors nor model.safetensors.index.json"));
    };
    Ok(BaseInputs { config, weights: TensorStore::new(files)?, tokenizer })
}

/// A GGUF model file (`formats::gguf`): its config, tokenizer and tensors as a Hugging Face
/// folder would give them.
pub fn read_base_gguf(name: &str, source: Box<dyn ByteSource>) -> Result<BaseInputs> {
    let g = Gguf::open(name, source.as_ref())?;
    let config = HfConfig { file: format!("{name} (metadata)"), raw: gguf::base::config(&g, source.as_ref())? };
    let tokenizer_json = serde_json::to_vec(&gguf::base::tokenizer(&g)?).expect("JSON values serialize");
    let tokenizer = TextTokenizer::parse(format!("{name} (tokenizer.ggml)"), &tokenizer_json)?;
    let weights = TensorStore::new(vec![TensorFile::gguf(name, source, &g)?])?;
    Ok(BaseInputs { config, weights, tokenizer })
}

/// `adapter_config.json` + `adapter_model.safetensors` (PEFT), or `adapter_config.json` +
/// `adapters.safetensors` (MLX, `formats::mlx`): told apart by the weights file.
pub fn read_adapter(f: &mut dyn Folder) -> Result<Adapter> {
    if let Some(weights) = f.open("adapter_model.safetensors", FileKind::Weights)? {
        let weights = TensorFile::open(f.path("adapter_model.safetensors"), weights)?;
        let config = need(f, "adapter_config.json", FileKind::Json, "a PEFT adapter folder")?;
        return Adapter::parse(&f.name(), &f.path("adapter_config.json"), &config, &weights);
    }
    if let Some(weights) = f.open(mlx::WEIGHTS_FILE, FileKind::Weights)? {
        let weights = TensorFile::open(f.path(mlx::WEIGHTS_FILE), weights)?;
        let config = need(f, "adapter_config.json", FileKind::Json, "an MLX adapter folder")?;
        return mlx::parse(&f.name(), &f.path("adapter_config.json"), &config, &weights);
    }
    Err(bad_input(
        f.name(),
        "has neither adapter_model.safetensors (a PEFT adapter folder) nor adapters.safetensors (an MLX adapter folder)",
    ))
}

/// An adapter folder and its calibration samples (`.txt` or `.jsonl`).
pub fn read_task(adapter: &mut dyn Folder, samples_name: &str, samples_bytes: &[u8]) -> Result<TaskInput> {
    FileKind::Samples.check_len(samples_name, samples_bytes.len() as u64)?;
    let adapter = read_adapter(adapter)?;
    let samples = samples::parse(samples_name, samples_bytes)?;
    Ok(TaskInput { adapter, samples_name: samples_name.to_string(), samples, eval: None })
}

/// Held-out evaluation samples (`formats::samples::EvalSet`), within the samples cap.
pub fn read_eval(name: &str, bytes: &[u8]) -> Result<EvalSet> {
    FileKind::Samples.check_len(name, bytes.len() as u64)?;
    EvalSet::parse(name, bytes)
}
