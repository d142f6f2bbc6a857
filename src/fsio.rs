//! Input folders and the output folder on a native file system (the page reads dropped files
//! through the same `inputs` functions).

use crate::error::{bad_input, Error, Result};
use crate::formats::peft::Adapter;
use crate::inputs::{self, Folder};
use crate::merge::pipeline::BaseInputs;
use crate::merge::TaskInput;
use std::path::{Path, PathBuf};

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| bad_input(path.display(), format!("cannot read ({e})")))
}

/// A directory on disk as an input folder.
struct Dir<'a>(&'a Path);

impl Folder for Dir<'_> {
    fn name(&self) -> String {
        self.0.display().to_string()
    }
    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
    fn take(&mut self, file: &str) -> Result<Option<Vec<u8>>> {
        let p = self.0.join(file);
        if p.exists() {
            read(&p).map(Some)
        } else {
            Ok(None)
        }
    }
}

fn dir<'a>(path: &'a Path, what: &str) -> Result<Dir<'a>> {
    if !path.is_dir() {
        return Err(bad_input(path.display(), format!("is not a folder (expected {what})")));
    }
    Ok(Dir(path))
}

pub fn read_base(path: &Path) -> Result<BaseInputs> {
    inputs::read_base(&mut dir(path, "a Hugging Face model folder")?)
}

pub fn read_adapter(path: &Path) -> Result<Adapter> {
    inputs::read_adapter(&mut dir(path, "a PEFT adapter folder")?)
}

pub fn read_task(adapter: &Path, samples_file: &Path) -> Result<TaskInput> {
    let name = samples_file.display().to_string();
    inputs::read_task(&mut dir(adapter, "a PEFT adapter folder")?, &name, &read(samples_file)?)
}

/// Held-out evaluation samples (`merge::evaluate::EvalSet::parse`).
pub fn read_eval(path: &Path) -> Result<crate::merge::evaluate::EvalSet> {
    crate::merge::evaluate::EvalSet::parse(&path.display().to_string(), &read(path)?)
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
