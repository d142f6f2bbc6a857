//! Input folders and the output folder on a native file system (the page reads dropped files
//! through the same `inputs` functions).
//!
//! Inputs: only regular files are read (a FIFO or a device would be read forever), each within its
//! kind's size cap. Output: never an input, checked before any work; written into a temporary
//! sibling and put in place atomically, so a crash at any moment leaves the complete old output
//! or the complete new one; temporary folders a crashed run left are cleaned by the next.

use crate::error::{bad_input, Error, Result};
use crate::formats::peft::Adapter;
use crate::formats::safetensors::ByteSource;
use crate::formats::samples::EvalSet;
use crate::inputs::{self, BaseInputs, FileKind, Folder, TaskInput};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// The bytes of a regular file within `kind`'s cap; None when there is no such file.
fn read_file(path: &Path, kind: FileKind) -> Result<Option<Vec<u8>>> {
    let name = path.display().to_string();
    let Some(meta) = regular_file(path, kind)? else { return Ok(None) };
    // Files are held in memory: one that cannot fit is refused, not allocated (an abort).
    if let Some(avail) = inputs::host_available() {
        if meta.len() > avail {
            return Err(bad_input(
                &name,
                format!(
                    "is {} MiB, more than the {} MiB of memory available: free memory or use a larger machine",
                    meta.len() >> 20,
                    avail >> 20
                ),
            ));
        }
    }
    let file = std::fs::File::open(path).map_err(|e| bad_input(&name, format!("cannot read ({e})")))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Read at most one byte past the cap: a file that grows while it is read is still bounded.
    file.take(kind.cap() + 1).read_to_end(&mut bytes).map_err(|e| bad_input(&name, format!("cannot read ({e})")))?;
    kind.check_len(&name, bytes.len() as u64)?;
    Ok(Some(bytes))
}

fn need_file(path: &Path, kind: FileKind) -> Result<Vec<u8>> {
    read_file(path, kind)?.ok_or_else(|| bad_input(path.display(), "cannot read (no such file)"))
}

/// A file on disk read by ranges (safetensors weights: never read whole into memory).
struct FileSource {
    file: std::sync::Mutex<std::fs::File>,
    len: u64,
}

impl ByteSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read(&self, offset: u64, len: usize) -> std::result::Result<Vec<u8>, String> {
        use std::io::{Seek, SeekFrom};
        let mut file = self.file.lock().map_err(|_| "an earlier read failed".to_string())?;
        let mut out = vec![0; len];
        file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut out)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the file became shorter while it was read".to_string()
            } else {
                e.to_string()
            }
        })?;
        Ok(out)
    }
}

/// The metadata of `path` if it is a regular file within `kind`'s cap; None when there is no such file.
fn regular_file(path: &Path, kind: FileKind) -> Result<Option<std::fs::Metadata>> {
    let name = path.display().to_string();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad_input(&name, format!("cannot read ({e})"))),
    };
    if !meta.is_file() {
        return Err(bad_input(&name, "is not a regular file (a folder, FIFO or device): refusing to read it"));
    }
    kind.check_len(&name, meta.len())?;
    Ok(Some(meta))
}

/// `path` as a source read by ranges (see `regular_file`).
fn open_file(path: &Path, kind: FileKind) -> Result<Option<Box<dyn ByteSource>>> {
    let name = path.display().to_string();
    let Some(meta) = regular_file(path, kind)? else { return Ok(None) };
    let file = std::fs::File::open(path).map_err(|e| bad_input(&name, format!("cannot read ({e})")))?;
    Ok(Some(Box::new(FileSource { file: std::sync::Mutex::new(file), len: meta.len() })))
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
    fn list(&self) -> Vec<String> {
        let entries = std::fs::read_dir(self.0).into_iter().flatten().flatten();
        entries.filter_map(|e| e.file_name().into_string().ok()).collect()
    }
    fn take(&mut self, file: &str, kind: FileKind) -> Result<Option<Vec<u8>>> {
        read_file(&self.0.join(file), kind)
    }
    fn open(&mut self, file: &str, kind: FileKind) -> Result<Option<Box<dyn ByteSource>>> {
        open_file(&self.0.join(file), kind)
    }
}

fn dir<'a>(path: &'a Path, what: &str) -> Result<Dir<'a>> {
    if !path.is_dir() {
        return Err(bad_input(path.display(), format!("is not a folder (expected {what})")));
    }
    Ok(Dir(path))
}

/// A Hugging Face model folder, or a GGUF model file.
pub fn read_base(path: &Path) -> Result<BaseInputs> {
    if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let source =
            open_file(path, FileKind::Weights)?.ok_or_else(|| bad_input(path.display(), "cannot be opened"))?;
        return inputs::read_base_gguf(&path.display().to_string(), source);
    }
    inputs::read_base(&mut dir(path, "a Hugging Face model folder or a .gguf file")?)
}

pub fn read_adapter(path: &Path) -> Result<Adapter> {
    inputs::read_adapter(&mut dir(path, "an adapter folder (PEFT or MLX)")?)
}

pub fn read_task(adapter: &Path, samples_file: &Path) -> Result<TaskInput> {
    let name = samples_file.display().to_string();
    let mut adapter = dir(adapter, "an adapter folder (PEFT or MLX)")?;
    inputs::read_task(&mut adapter, &name, &need_file(samples_file, FileKind::Samples)?)
}

/// Held-out evaluation samples (`formats::samples::EvalSet`).
pub fn read_eval(path: &Path) -> Result<EvalSet> {
    inputs::read_eval(&path.display().to_string(), &need_file(path, FileKind::Samples)?)
}

/// `path` made absolute with every link resolved, also when it does not exist yet (its nearest
/// existing ancestor is resolved, the rest appended).
fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut p = abs.as_path();
    loop {
        if let Ok(c) = p.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                p = parent;
            }
            _ => return abs,
        }
    }
}

/// Every path an input stands for: itself and, for a folder, each of its entries, links resolved
/// (a Hugging Face cache folder links its files to blobs elsewhere).
fn input_paths(inputs: &[&Path]) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for &p in inputs {
        out.push((resolved(p), p.display().to_string()));
        if let Ok(entries) = std::fs::read_dir(p) {
            for e in entries.flatten() {
                out.push((resolved(&e.path()), e.path().display().to_string()));
            }
        }
    }
    out
}

/// Refuse an output that is, contains or lies inside any input (compared with links resolved),
/// and one that exists and is not empty unless `force`. Faces call this before any work (and
/// `write_folder` / `write_file` check again before writing).
pub fn check_out(out: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    let o = resolved(out);
    for (p, shown) in input_paths(inputs) {
        if o == p || o.starts_with(&p) || p.starts_with(&o) {
            let how = if o == p {
                "is"
            } else if o.starts_with(&p) {
                "lies inside"
            } else {
                "contains"
            };
            return Err(bad_input(
                out.display(),
                format!("{how} the input {shown}: the output must be a separate folder (nothing was written)"),
            ));
        }
    }
    if out.exists() && !force {
        let empty_dir = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty_dir {
            return Err(bad_input(out.display(), "already exists and is not empty (pass --force to replace it)"));
        }
    }
    Ok(())
}

/// The start of the scratch names this tool gives siblings of `out` (`what`: "tmp", the output
/// being written; "old", the output being replaced), followed by the writing process's id.
fn scratch_prefix(out_name: &str, what: &str) -> String {
    format!(".{out_name}.iteris-{what}-")
}

/// Remove `p`, a folder or a file; a failure leaves it for `clean_scratch`.
fn remove(p: &Path) {
    let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
}

/// Whether process `pid` may still be running (it may be writing its scratch folder).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        false
    }
}

/// Remove the scratch folders of `out` that crashed runs left (their process is gone); an old
/// output whose replacement never arrived is put back first.
pub fn clean_scratch(out: &Path) {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else { return };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let name = name.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        // `.{name}.tmp-PID` is what earlier versions of this tool left behind.
        for (what, prefix) in [
            ("tmp", scratch_prefix(&name, "tmp")),
            ("old", scratch_prefix(&name, "old")),
            ("tmp", format!(".{name}.tmp-")),
        ] {
            let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
            if alive(pid) {
                continue;
            }
            if what == "old" && !out.exists() {
                let _ = std::fs::rename(e.path(), out);
            } else {
                remove(&e.path());
            }
        }
    }
}

/// Where a test may abort the process on purpose (`ITERIS_TEST_ABORT_AT=before-swap` or
/// `after-swap`), to check that a crash at the swap loses nothing.
fn test_abort(at: &str) {
    if std::env::var("ITERIS_TEST_ABORT_AT").is_ok_and(|v| v == at) {
        std::process::abort();
    }
}

/// Put the finished `tmp` in the place of `out`, atomically where the system allows: Linux swaps
/// the two names in one step (renameat2 RENAME_EXCHANGE); elsewhere the old output is first moved
/// to an `old` scratch name, which `clean_scratch` puts back if the process dies before the new
/// one is in place.
fn swap_into_place(tmp: &Path, out: &Path, old: &Path) -> std::io::Result<()> {
    if !out.exists() {
        return std::fs::rename(tmp, out);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (a, b) = (c(tmp)?, c(out)?);
        // SAFETY: both are NUL-terminated paths that live across the call.
        let r =
            unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if r == 0 {
            test_abort("after-swap");
            // `tmp` now holds the old output.
            remove(tmp);
            return Ok(());
        }
        // Not supported by this file system: fall through to the two-step swap.
    }
    std::fs::rename(out, old)?;
    std::fs::rename(tmp, out)?;
    test_abort("after-swap");
    remove(old);
    Ok(())
}

/// Write `out` (a folder of `files`, or one file) atomically through a scratch sibling.
fn write_atomic(
    out: &Path,
    force: bool,
    inputs: &[&Path],
    fill: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    check_out(out, force, inputs)?;
    clean_scratch(out);
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| bad_input(parent.display(), format!("cannot create ({e})")))?;
    let name = out.file_name().filter(|_| !out.components().any(|c| c == Component::ParentDir));
    let name = name.ok_or_else(|| bad_input(out.display(), "is not a plain output name"))?.to_string_lossy();
    let pid = std::process::id();
    let tmp = parent.join(format!("{}{pid}", scratch_prefix(&name, "tmp")));
    let old = parent.join(format!("{}{pid}", scratch_prefix(&name, "old")));
    remove(&tmp);
    let written = (|| {
        fill(&tmp)?;
        test_abort("before-swap");
        swap_into_place(&tmp, out, &old)
    })();
    if let Err(e) = written {
        remove(&tmp);
        return Err(Error::Io(format!("{}: cannot write ({e})", out.display())));
    }
    Ok(())
}

pub use crate::merge::export::Streamed;

/// Write `files`, and the `streamed` ones, into the folder `out` atomically. An existing `out` is
/// replaced only with `force`; `inputs` are the merge's input paths, which `out` must stay clear of.
pub fn write_folder(
    out: &Path,
    files: &[(&str, &[u8])],
    streamed: Vec<Streamed>,
    force: bool,
    inputs: &[&Path],
) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(bad_input(out.display(), "is a file, not a folder: choose another --out"));
    }
    write_atomic(out, force, inputs, |tmp| {
        std::fs::create_dir(tmp)?;
        for (n, bytes) in files {
            // A name may hold one folder level (`mlx/adapters.safetensors`).
            if let Some(dir) = Path::new(n).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(tmp.join(dir))?;
            }
            std::fs::write(tmp.join(n), bytes)?;
        }
        for (n, write) in streamed {
            if let Some(dir) = Path::new(n).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(tmp.join(dir))?;
            }
            let mut w = std::io::BufWriter::new(std::fs::File::create(tmp.join(n))?);
            write(&mut w).map_err(|e| std::io::Error::other(e.to_string()))?;
            w.flush()?;
        }
        Ok(())
    })
}

/// Write the single file `out` atomically (e.g. `iteris compare --out table.json`).
pub fn write_file(out: &Path, bytes: &[u8], force: bool, inputs: &[&Path]) -> Result<()> {
    if out.is_dir() {
        return Err(bad_input(out.display(), "is a folder, not a file: choose another --out"));
    }
    write_atomic(out, force, inputs, |tmp| std::fs::write(tmp, bytes))
}
