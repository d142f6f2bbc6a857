//! The engine's face in the browser: wasm-bindgen exports the page's worker (`www/worker.js`)
//! calls. Files arrive as the dropped `File`s (the page never uploads them anywhere), read here by
//! ranges with `FileReaderSync` (workers only): safetensors weights a header and then a tensor at a
//! time, so a model is never held whole in WebAssembly memory; small files (configs, tokenizer,
//! samples) whole. A file may also come as bytes (`{ name, bytes }`: tests, the Node bench).
//! Results go back as bytes and JSON. Errors become JS `Error`s whose `kind` tells the page what
//! to say and offer.

use crate::backend::cpu::Cpu;
use crate::engine::{BackendChoice, Engine};
use crate::error::Error;
use crate::formats::safetensors::ByteSource;
use crate::inputs::{self, BaseInputs, FileKind, Folder, TaskInput};
use crate::merge::export::zip_folder;
use crate::merge::pipeline::Formats;
use crate::merge::{Options, Progress};
use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

#[wasm_bindgen(start)]
fn start() {
    // A panic aborts (a WebAssembly trap, like a failed allocation): remember its message so the
    // worker can tell a bug from the browser's memory running out.
    std::panic::set_hook(Box::new(|info| {
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
        PANIC_FILE.with(|p| *p.borrow_mut() = crate::formats::contain::current_file());
        console_error_panic_hook::hook(info);
    }));
}

thread_local! {
    static PANIC_FILE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The input file a third-party parser was reading when the engine panicked, if it was (the page
/// then names that file as malformed instead of reporting a bug; see `formats::contain`).
#[wasm_bindgen]
pub fn panic_file() -> Option<String> {
    PANIC_FILE.with(|p| p.borrow().clone())
}

/// The message of the panic that stopped the engine, if one did.
#[wasm_bindgen]
pub fn last_panic() -> Option<String> {
    LAST_PANIC.with(|p| p.borrow().clone())
}

/// The crate version, shown by the page.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Whether this build runs the CPU path with WebAssembly SIMD (`.cargo/config.toml`).
#[wasm_bindgen]
pub fn simd() -> bool {
    cfg!(target_feature = "simd128")
}

/// The threaded build's pool of Web Workers for the CPU path (`initThreadPool(n)` in JS; the
/// engine's own worker must call it before a merge). Only in the threaded build (feature
/// `threads`), which only a cross-origin-isolated page can instantiate.
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

/// The engine's WebAssembly memory in bytes: it only grows, so after a merge it is the merge's
/// peak (an f64: 4 GiB does not fit wasm32's usize).
#[wasm_bindgen]
pub fn memory_bytes() -> f64 {
    (core::arch::wasm32::memory_size(0) as u64 * 65536) as f64
}

thread_local! {
    static PROFILE_FROM: std::cell::Cell<Option<(f64, f64)>> = const { std::cell::Cell::new(None) };
}

/// Start recording where the CPU path's time goes (`crate::profile`; the page's `?profile=1`).
#[wasm_bindgen]
pub fn profile_start() {
    crate::profile::enable();
    PROFILE_FROM.with(|t| t.set(crate::profile::clocks()));
}

/// The time recorded since `profile_start`, per op, as a table; None if it was not started.
#[wasm_bindgen]
pub fn profile_table() -> Option<String> {
    let (w0, c0) = PROFILE_FROM.with(|t| t.get())?;
    let (w1, c1) = crate::profile::clocks()?;
    Some(crate::profile::table(&crate::profile::phases(), w1 - w0, c1 - c0))
}

/// Threads the CPU path runs on: the pool's size in the threaded build, else 1.
#[wasm_bindgen]
pub fn threads() -> usize {
    #[cfg(feature = "threads")]
    return rayon::current_num_threads();
    #[cfg(not(feature = "threads"))]
    1
}

fn get(o: &JsValue, key: &str) -> Result<JsValue, JsValue> {
    Reflect::get(o, &JsValue::from_str(key))
}

fn string(o: &JsValue, key: &str) -> Result<String, JsValue> {
    get(o, key)?.as_string().ok_or_else(|| js_error("bug", &format!("missing string field '{key}'")))
}

/// A dropped file: a `File` read where it lies, or bytes already in memory.
enum PageFile {
    Blob(web_sys::Blob),
    Bytes(Vec<u8>),
}

impl PageFile {
    /// `{ name, file: File }` or `{ name, bytes: Uint8Array }`.
    fn from_js(o: &JsValue) -> Result<PageFile, JsValue> {
        let file = get(o, "file")?;
        if !file.is_undefined() {
            return Ok(PageFile::Blob(file.dyn_into::<web_sys::Blob>()?));
        }
        Ok(PageFile::Bytes(get(o, "bytes")?.dyn_into::<Uint8Array>()?.to_vec()))
    }

    fn len(&self) -> u64 {
        match self {
            PageFile::Blob(b) => b.size() as u64,
            PageFile::Bytes(b) => b.len() as u64,
        }
    }

    /// The whole file, after `kind`'s size check (so a huge file is refused before it is read).
    fn contents(self, name: &str, kind: FileKind) -> crate::error::Result<Vec<u8>> {
        kind.check_len(name, self.len())?;
        match self {
            PageFile::Bytes(b) => Ok(b),
            PageFile::Blob(b) => {
                let len = b.size() as usize;
                BlobSource(b).read(0, len).map_err(|e| crate::error::bad_input(name, format!("cannot read ({e})")))
            }
        }
    }
}

/// A `File` read by ranges: each read is a slice of the file, read synchronously (the engine runs
/// in a worker, where `FileReaderSync` exists), so only what is asked for enters WebAssembly memory.
struct BlobSource(web_sys::Blob);

impl ByteSource for BlobSource {
    fn len(&self) -> u64 {
        self.0.size() as u64
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let describe = |e: JsValue| {
            e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).unwrap_or_else(|| format!("{e:?}"))
        };
        let slice = self.0.slice_with_f64_and_f64(offset as f64, (offset + len as u64) as f64).map_err(describe)?;
        let buf = web_sys::FileReaderSync::new().and_then(|r| r.read_as_array_buffer(&slice)).map_err(describe)?;
        let bytes = Uint8Array::new(&buf);
        if bytes.length() as usize != len {
            return Err(format!("read {} of {len} bytes: the file changed while it was read", bytes.length()));
        }
        Ok(bytes.to_vec())
    }
}

/// `{ name, files: [{ name, file | bytes }] }`: a dropped folder (any leading folders of a dropped
/// directory's file names are ignored).
struct PageFolder {
    name: String,
    files: std::collections::BTreeMap<String, PageFile>,
}

impl PageFolder {
    fn from_js(o: &JsValue) -> Result<PageFolder, JsValue> {
        let mut files = std::collections::BTreeMap::new();
        for f in Array::from(&get(o, "files")?).iter() {
            let name = string(&f, "name")?;
            files.insert(name.rsplit('/').next().unwrap_or(&name).to_string(), PageFile::from_js(&f)?);
        }
        Ok(PageFolder { name: string(o, "name")?, files })
    }
}

impl Folder for PageFolder {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn path(&self, file: &str) -> String {
        format!("{}/{file}", self.name)
    }
    fn list(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }
    fn take(&mut self, file: &str, kind: FileKind) -> crate::error::Result<Option<Vec<u8>>> {
        let path = self.path(file);
        self.files.remove(file).map(|f| f.contents(&path, kind)).transpose()
    }
    fn open(&mut self, file: &str, kind: FileKind) -> crate::error::Result<Option<Box<dyn ByteSource>>> {
        let Some(f) = self.files.remove(file) else { return Ok(None) };
        kind.check_len(&self.path(file), f.len())?;
        Ok(Some(match f {
            PageFile::Blob(b) => Box::new(BlobSource(b)),
            PageFile::Bytes(b) => Box::new(b),
        }))
    }
}

/// `{ name, file | bytes }`: a samples file, whole.
fn single(o: &JsValue, kind: FileKind) -> Result<(String, Vec<u8>), JsValue> {
    let name = string(o, "name")?;
    let bytes = PageFile::from_js(o)?.contents(&name, kind).map_err(to_js)?;
    Ok((name, bytes))
}

fn set(o: &Object, key: &str, v: impl Into<JsValue>) {
    Reflect::set(o, &JsValue::from_str(key), &v.into()).expect("setting a field of a fresh object");
}

fn js_error(kind: &str, message: &str) -> JsValue {
    let e = js_sys::Error::new(message);
    set(&e, "kind", kind);
    e.into()
}

fn to_js(e: Error) -> JsValue {
    let kind = match &e {
        Error::Input { .. } | Error::NonFinite { .. } => "input",
        Error::Unsupported(_) => "unsupported",
        Error::Numeric(_) => "numeric",
        Error::Gpu(_) => "gpu",
        Error::Io(_) | Error::Stop => "io",
    };
    js_error(kind, &e.to_string())
}

/// Check every input file before any work: `input` is
/// `{ base: folder, tasks: [{ adapter: folder, samples: file, eval?: file }] }` with
/// `file = { name, file: File }` (or `{ name, bytes }`) and `folder = { name, files: [file] }`.
fn read_inputs(input: &JsValue) -> Result<(BaseInputs, Vec<TaskInput>), JsValue> {
    let base = inputs::read_base(&mut PageFolder::from_js(&get(input, "base")?)?).map_err(to_js)?;
    let mut tasks = Vec::new();
    for t in Array::from(&get(input, "tasks")?).iter() {
        let (samples_name, samples) = single(&get(&t, "samples")?, FileKind::Samples)?;
        let mut adapter = PageFolder::from_js(&get(&t, "adapter")?)?;
        let mut task = inputs::read_task(&mut adapter, &samples_name, &samples).map_err(to_js)?;
        let eval = get(&t, "eval")?;
        if !eval.is_undefined() && !eval.is_null() {
            let (name, bytes) = single(&eval, FileKind::Samples)?;
            task.eval = Some(inputs::read_eval(&name, &bytes).map_err(to_js)?);
        }
        tasks.push(task);
    }
    Ok((base, tasks))
}

/// Merge the adapters of `input` (see `read_inputs`) with `options` (JSON: the fields of
/// `Options`, plus `backend`: "auto" | "gpu" | "cpu", and `mlx`, `gguf`: the extra output formats).
/// `progress(pass, passes, label, done, all)`
/// is called as the merge goes. Resolves to
/// `{ zip, report (JSON text), backend, notes: [..] }`.
struct Settings {
    opts: Options,
    backend: BackendChoice,
    /// `mlx`, `gguf`: the output formats asked for beside PEFT's.
    formats: Formats,
}

fn settings(options: &str) -> Result<Settings, JsValue> {
    let bad = |e: serde_json::Error| js_error("input", &format!("settings: {e}"));
    let v: serde_json::Value = serde_json::from_str(options).map_err(bad)?;
    let opts: Options = serde_json::from_value(v.clone()).map_err(bad)?;
    let backend = match v.get("backend") {
        Some(b) => serde_json::from_value(b.clone()).map_err(bad)?,
        None => BackendChoice::default(),
    };
    let formats = serde_json::from_value(v).map_err(bad)?;
    Ok(Settings { opts, backend, formats })
}

/// The library's engine on the backend the settings ask for; its warning (a CPU emulation of
/// WebGPU chosen explicitly) goes to `warn` at once.
async fn engine<'a>(s: &Settings, base: &'a BaseInputs, warn: &js_sys::Function) -> Result<Engine<'a>, JsValue> {
    // Only the GPU's creation can fail here (the backend asked for is the GPU); wgpu's message
    // lists the native backends the page was built without: not useful there.
    let e = Engine::new(s.backend, base, s.opts.max_memory_mib)
        .await
        .map_err(|_| js_error("no-webgpu", "WebGPU is not available in this browser"))?;
    if let Some(w) = &e.warning {
        let _ = warn.call1(&JsValue::NULL, &JsValue::from_str(w));
    }
    Ok(e)
}

/// `progress(pass, passes, label, done, all)` as a `Progress` sink (pass 0 of 0: the quality
/// phase); the `prefix` of each call goes before its labels.
fn progress_sink(progress: &js_sys::Function) -> impl FnMut(&str, Progress) + '_ {
    let (mut pass, mut passes, mut label) = (0, 0, String::new());
    move |prefix: &str, p: Progress| {
        let (done, all) = match p {
            Progress::Pass(k, n, l) => {
                (pass, passes, label) = (k, n, format!("{prefix}{l}"));
                (0, 0)
            }
            Progress::Modules(d, a) => (d, a),
            // Pass 0 of 0: the page shows the quality phase without an estimate.
            Progress::Quality => {
                (pass, passes, label) = (0, 0, format!("{prefix}quality"));
                (0, 0)
            }
        };
        let args = Array::of5(
            &(pass as u32).into(),
            &(passes as u32).into(),
            &label.as_str().into(),
            &(done as u32).into(),
            &(all as u32).into(),
        );
        let _ = progress.apply(&JsValue::NULL, &args);
    }
}

/// The settings and every input of a job, checked (the settings first, before any file is parsed).
fn begin(input: &JsValue, options: &str) -> Result<(Settings, BaseInputs, Vec<TaskInput>), JsValue> {
    let s = settings(options)?;
    s.opts.validate(Array::from(&get(input, "tasks")?).length() as usize).map_err(to_js)?;
    let (base, tasks) = read_inputs(input)?;
    // The dense model lands in the zip, in this page's memory, while the engine still holds the
    // loaded base (about as large): refuse it now, before any work, if both cannot fit.
    let dense = base.weights.stored_bytes(false);
    if s.formats.dense && crate::inputs::host_available().is_some_and(|a| dense.saturating_mul(2) > a) {
        return Err(to_js(crate::error::bad_input(
            "dense model",
            format!(
                "the merged model ({} MiB), beside the loaded base, would not fit in this page's memory: leave 'Also the merged model' off and make it with the command-line tool (--dense)",
                dense >> 20
            ),
        )));
    }
    Ok((s, base, tasks))
}

/// Merge the adapters of `input` (see `read_inputs`) with `options` (JSON: the fields of
/// `Options`, plus `backend`: "auto" | "gpu" | "cpu", and `f16`). `progress(pass, passes, label,
/// done, all)` is called as the merge goes, `warn(text)` before it where the person should know
/// something first (a CPU-emulated WebGPU chosen explicitly). Resolves to
/// `{ zip, report (JSON text), backend, notes: [..] }`.
#[wasm_bindgen]
pub async fn merge(
    input: JsValue,
    options: String,
    progress: js_sys::Function,
    warn: js_sys::Function,
) -> Result<JsValue, JsValue> {
    let (s, base, tasks) = begin(&input, &options)?;
    let mut engine = engine(&s, &base, &warn).await?;
    let mut sink = progress_sink(&progress);
    let result = engine.merge(&tasks, &s.opts, &mut |p| sink("", p)).await.map_err(to_js)?;
    let files = result.output_files(&base, &tasks, s.formats).map_err(to_js)?;
    let report = files.iter().find(|(name, _)| *name == "merge_report.json").map(|(_, r)| r.clone());
    let files: Vec<(&str, &[u8])> = files.iter().map(|(name, bytes)| (*name, bytes.as_slice())).collect();
    let zip = zip_folder("merged_adapter", &files, result.streamed_files(&base, s.formats)).map_err(to_js)?;

    let out = Object::new();
    set(&out, "zip", Uint8Array::from(&zip[..]));
    set(&out, "report", String::from_utf8_lossy(&report.unwrap_or_default()).into_owned());
    set(&out, "backend", result.report.backend.clone());
    set(&out, "notes", engine.notes.iter().map(|n| JsValue::from_str(n)).collect::<Array>());
    Ok(out.into())
}

/// Every method on the same inputs (as `iteris compare`): resolves to JSON text
/// `{ tasks, alone: [[accuracy per task] for base, adapter 1, …], methods: [{ method,
/// alignment_error, quality, seconds }], backend, notes }` (`engine::Comparison`).
#[wasm_bindgen]
pub async fn compare(
    input: JsValue,
    options: String,
    progress: js_sys::Function,
    warn: js_sys::Function,
) -> Result<String, JsValue> {
    let (s, base, tasks) = begin(&input, &options)?;
    let mut engine = engine(&s, &base, &warn).await?;
    let mut sink = progress_sink(&progress);
    let mut report = |k: usize, n: usize, name: &str, p: Progress| sink(&format!("method {k}/{n} {name}: "), p);
    let table = engine.compare(&tasks, &s.opts, None, &mut report).await.map_err(to_js)?;
    serde_json::to_string(&table).map_err(|e| js_error("bug", &e.to_string()))
}

/// The forward-pass benchmark (`benches/peer_forward.mjs`): the base model of `base` (a folder, as
/// in `merge`) over `sequences` sequences of equal length whose tokens are `ids`, each attending
/// within itself, `repeat` times, to the final hidden states and no further (what a merge's
/// calibration pass computes); `backend` and `warn` as in `merge`. Resolves to JSON text
/// `{ seconds: [per run], tokens, backend, hidden: [the first 8 values of the first token's
/// final hidden state], mean_abs }`.
#[wasm_bindgen]
pub async fn forward_bench(
    base: JsValue,
    ids: Vec<u32>,
    sequences: usize,
    repeat: usize,
    backend: String,
    warn: js_sys::Function,
) -> Result<String, JsValue> {
    let base = inputs::read_base(&mut PageFolder::from_js(&base)?).map_err(to_js)?;
    let n = sequences.max(1);
    if ids.is_empty() || ids.len() % n != 0 {
        return Err(js_error("input", &format!("{} token ids do not split into {n} equal sequences", ids.len())));
    }
    let mut batch = crate::models::Batch::default();
    let seqs: Vec<Vec<u32>> = ids.chunks(ids.len() / n).map(<[u32]>::to_vec).collect();
    batch.push_group(0, crate::models::Stream::Base, &seqs);
    let backend = serde_json::from_value(serde_json::json!(backend)).map_err(|e| js_error("input", &e.to_string()))?;
    let settings = Settings { opts: Options::default(), backend, formats: Formats::default() };
    let mut engine = engine(&settings, &base, &warn).await?;
    let (seconds, hidden) = engine.time_forward(&batch, repeat).await.map_err(to_js)?;
    let mean_abs = hidden.data.iter().map(|v| v.abs() as f64).sum::<f64>() / hidden.data.len().max(1) as f64;
    let out = serde_json::json!({
        "seconds": seconds,
        "tokens": ids.len(),
        "backend": if engine.backend() == "cpu" { "cpu" } else { "gpu" },
        "hidden": hidden.row(0)[..8.min(hidden.cols)].to_vec(),
        "mean_abs": mean_abs,
    });
    Ok(out.to_string())
}

/// The matrix-product benchmark beside `forward_bench`: `kind` "project" times y = x · wᵀ for x
/// (m, k) and a weight w (n, k), as a module's projection runs; "gram" times the Gram matrix
/// xᵀ · y of two (m, k) inputs, as a stage's statistics accumulate; "sync" (threaded build) one
/// parallel op with no work, the cost every threaded op pays before its work. CPU path. Resolves
/// to the seconds one product (or op) took, for each of `repeat` timed runs.
#[wasm_bindgen]
pub async fn matmul_bench(kind: String, m: usize, k: usize, n: usize, repeat: usize) -> Result<Vec<f64>, JsValue> {
    use crate::backend::prelude::*;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut random = |rows: usize, cols: usize| {
        let data = (0..rows * cols)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        crate::mat::Mat::new(rows, cols, data)
    };
    let be = Cpu;
    let x = be.upload(&random(m, k));
    let other = be.upload(&if kind == "gram" { random(m, k) } else { random(n, k) });
    let once = async || -> Result<(), JsValue> {
        match kind.as_str() {
            "project" => drop(std::hint::black_box(be.matmul_t(&x, 0..m, &other))),
            // One parallel op with no work, one element per thread: what every threaded op pays
            // to hand its blocks to the pool's Web Workers and to wait for them.
            #[cfg(feature = "threads")]
            "sync" => {
                use rayon::prelude::*;
                (0..rayon::current_num_threads()).into_par_iter().for_each(|i| {
                    std::hint::black_box(i);
                });
            }
            "gram" => drop(std::hint::black_box(be.gram(&x, 0..m, &other, 0..m).await.map_err(to_js)?)),
            kind => {
                return Err(js_error(
                    "input",
                    &format!("matmul_bench: kind {kind:?} is not project, gram or (threaded build) sync"),
                ))
            }
        }
        Ok(())
    };
    // The page's clock counts milliseconds: each timed run repeats the product for at least 50 ms.
    let t0 = crate::merge::now();
    once().await?;
    let inner = (0.05 / (crate::merge::now() - t0).max(1e-4)).ceil() as usize;
    let mut seconds = Vec::new();
    for _ in 0..repeat.max(1) {
        let t0 = crate::merge::now();
        for _ in 0..inner {
            once().await?;
        }
        seconds.push((crate::merge::now() - t0) / inner as f64);
    }
    Ok(seconds)
}
