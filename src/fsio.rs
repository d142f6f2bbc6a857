//! Reading input folders and writing the output folder on a native file system. The page gets the
//! same bytes from dropped files and calls the same parsers.

use crate::error::{bad_input, Error, Result};
use crate::formats::hf_config::HfConfig;
use crate::formats::peft::Adapter;
use crate::formats::safetensors::{shard_names, TensorFile, TensorStore};
use crate::formats::{samples, tokenizer::TextTokenizer};
use crate::merge::pipeline::BaseInputs;
use crate::merge::TaskInput;
use std::path::{Path, PathBuf};

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| bad_input(path.display(), format!("cannot read ({e})")))
}

/// `config.json`, `tokenizer.json`, and `model.safetensors` or the shards of
/// `model.safetensors.index.json`.
pub fn read_base(dir: &Path) -> Result<BaseInputs> {
    if !dir.is_dir() {
        return Err(bad_input(dir.display(), "is not a folder (expected a Hugging Face model folder)"));
    }
    let cfg_path = dir.join("config.json");
    let config = HfConfig::parse(cfg_path.display().to_string(), &read(&cfg_path)?)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(bad_input(dir.display(), "has no tokenizer.json"));
    }
    let tokenizer = TextTokenizer::parse(tok_path.display().to_string(), &read(&tok_path)?)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files = if single.exists() {
        vec![TensorFile::parse(single.display().to_string(), read(&single)?)?]
    } else if index.exists() {
        let names = shard_names(&index.display().to_string(), &read(&index)?)?;
        names
            .iter()
            .map(|n| {
                let p = dir.join(n);
                TensorFile::parse(p.display().to_string(), read(&p)?)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        return Err(bad_input(dir.display(), "has neither model.safetensors nor model.safetensors.index.json"));
    };
    Ok(BaseInputs { config, weights: TensorStore::new(files)?, tokenizer })
}

pub fn read_adapter(dir: &Path) -> Result<Adapter> {
    if !dir.is_dir() {
        return Err(bad_input(dir.display(), "is not a folder (expected a PEFT adapter folder)"));
    }
    let cfg = dir.join("adapter_config.json");
    let w = dir.join("adapter_model.safetensors");
    if !w.exists() {
        return Err(bad_input(dir.display(), "has no adapter_model.safetensors"));
    }
    let weights = TensorFile::parse(w.display().to_string(), read(&w)?)?;
    Adapter::parse(&dir.display().to_string(), &cfg.display().to_string(), &read(&cfg)?, &weights)
}

pub fn read_task(adapter: &Path, samples_file: &Path) -> Result<TaskInput> {
    let adapter = read_adapter(adapter)?;
    let name = samples_file.display().to_string();
    let samples = samples::parse(&name, &read(samples_file)?)?;
    Ok(TaskInput { adapter, samples_name: name, samples })
}

/// Refuse an output folder that exists and is not empty, unless `force`. Faces call this before
/// any work, and `write_folder` again before writing.
pub fn check_out(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(bad_input(out.display(), "already exists and is not empty (pass --force to replace it)"));
    }
    Ok(())
}

/// Write `files` into `out` atomically: into a temporary sibling folder first, renamed at the end, so
/// `out` is never left half-written. An existing `out` is replaced only with `force`.
pub fn write_folder(out: &Path, files: &[(&str, &[u8])], force: bool) -> Result<()> {
    check_out(out, force)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| bad_input(parent.display(), format!("cannot create ({e})")))?;
    let name = out.file_name().ok_or_else(|| bad_input(out.display(), "is not a folder name"))?;
    let tmp: PathBuf = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let io = |e: std::io::Error| Error::Io(format!("{}: {e}", tmp.display()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io)?;
    let written = (|| {
        for (n, bytes) in files {
            std::fs::write(tmp.join(n), bytes)?;
        }
        if out.exists() {
            std::fs::remove_dir_all(out)?;
        }
        std::fs::rename(&tmp, out)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::Io(format!("{}: cannot write ({e})", out.display())));
    }
    Ok(())
}
