//! The GPU backend: the `Backend` contract in WGSL compute shaders through `wgpu` (Vulkan, Metal,
//! DX12 natively; WebGPU in the browser). Kernels are plain files under `shaders/`, specialised by
//! small textual substitutions (`{{NAME}}`); pipelines are cached by (kernel, substitutions), bind
//! groups by (pipeline, buffers, parameters).
//!
//! Commands are recorded into one open encoder and submitted only when the host needs a result
//! (a Gram matrix, a norm, a download) or after many dispatches, so a stage costs one submission.

use super::{Activation, AttentionSpec, Backend, FactorTerm, Fetched, WeightDtype};
use crate::error::{Error, Result};
use crate::mat::Mat;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

const MATMUL: &str = include_str!("../../shaders/matmul.wgsl");
const ELEMENTWISE: &str = include_str!("../../shaders/elementwise.wgsl");
const SELECT_ROWS: &str = include_str!("../../shaders/select_rows.wgsl");
const SLICE_COLS: &str = include_str!("../../shaders/slice_cols.wgsl");
const NORM: &str = include_str!("../../shaders/norm.wgsl");
const ROPE: &str = include_str!("../../shaders/rope.wgsl");
const ATTENTION: &str = include_str!("../../shaders/attention.wgsl");
const REDUCE: &str = include_str!("../../shaders/reduce.wgsl");
const CHOLESKY_BLOCK: &str = include_str!("../../shaders/cholesky_block.wgsl");
const CHOLESKY_PANEL: &str = include_str!("../../shaders/cholesky_panel.wgsl");
const EXACT: &str = include_str!("../../shaders/exact.wgsl");
const PAIR_SUM: &str = include_str!("../../shaders/pair_sum.wgsl");
const SYSTEM_SCALARS: &str = include_str!("../../shaders/system_scalars.wgsl");
const SYSTEM_ASSEMBLE: &str = include_str!("../../shaders/system_assemble.wgsl");

/// Products with at least this many rows and columns use 128×128 tiles (8×8 outputs per thread);
/// smaller ones 64×64, so that a product still spreads over many workgroups.
const BIG_TILE_FROM: usize = 512;

/// Submit after this many recorded dispatches even without a readback, to bound the memory held
/// by buffers that are dropped on the host but still referenced by recorded commands.
const MAX_PENDING: usize = 256;

/// A (rows, cols) matrix in a GPU storage buffer, row-major: f32, or (weights only) f16/bf16
/// packed two per u32 word, low half first, and unpacked by the kernels that read weights.
pub struct GpuTensor {
    buf: wgpu::Buffer,
    rows: usize,
    cols: usize,
    dtype: WeightDtype,
    /// A weight larger than one storage binding (a 50k-token embedding is 150 MB in f32; many
    /// adapters bind at most 128 MiB) is split by rows: `buf` holds rows [0, first), and each
    /// (start row, buffer) here holds the next block. The kernels that read weights run per block.
    blocks: Vec<(usize, wgpu::Buffer)>,
    /// The pool `buf` goes back to when the tensor is dropped (results of ops), or that is told it
    /// was let go (uploads: a model's weights must not outlive it in the bind-group cache).
    pool: Rc<RefCell<Pool>>,
    pooled: bool,
}

impl Drop for GpuTensor {
    fn drop(&mut self) {
        let mut pool = self.pool.borrow_mut();
        if self.pooled {
            pool.give(self.buf.clone());
        } else {
            pool.released = true;
        }
    }
}

/// Buffers of dropped results, by size, for reuse: a merge allocates the same few activation sizes
/// layer after layer. Commands run in recording order, so a reused buffer is written only after
/// every earlier recorded read of its old contents.
#[derive(Default)]
struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
    /// A buffer was let go since the last look: the dispatch cache may be all that keeps it alive.
    released: bool,
}

impl Pool {
    /// Keep at most this much idle memory.
    const MAX_BYTES: u64 = 1 << 30;

    fn give(&mut self, buf: wgpu::Buffer) {
        if self.bytes + buf.size() <= Self::MAX_BYTES {
            self.bytes += buf.size();
            self.free.entry(buf.size()).or_default().push(buf);
        } else {
            self.released = true;
        }
    }

    fn take(&mut self, size: u64) -> Option<wgpu::Buffer> {
        let buf = self.free.get_mut(&size)?.pop()?;
        self.bytes -= size;
        Some(buf)
    }
}

impl GpuTensor {
    /// (first row, end row, buffer) of each row block.
    fn row_blocks(&self) -> Vec<(usize, usize, &wgpu::Buffer)> {
        let starts: Vec<usize> = std::iter::once(0).chain(self.blocks.iter().map(|b| b.0)).collect();
        let bufs = std::iter::once(&self.buf).chain(self.blocks.iter().map(|b| &b.1));
        bufs.enumerate().map(|(i, b)| (starts[i], starts.get(i + 1).copied().unwrap_or(self.rows), b)).collect()
    }
}

/// One dispatch's bindings: a pipeline, its buffers in binding order, and its parameters.
#[derive(PartialEq, Eq, Hash)]
struct DispatchKey {
    pipeline: wgpu::ComputePipeline,
    buffers: Vec<wgpu::Buffer>,
    params: Vec<u32>,
}

/// Bind groups (with their parameter buffers) by what they bind. Buffers come back from the pool in
/// the same order pass after pass, so a Jacobi pass, an evaluation pass or a generated token
/// re-records mostly the dispatches of the one before: those reuse their bind group instead of
/// creating a uniform buffer and a bind group (costly in a browser, where each is a call into
/// JavaScript). The small index tables the forward pass uploads (token ids, positions, sequence
/// spans) are kept by content for the same reason, so the dispatches that read them match too.
#[derive(Default)]
struct BindCache {
    groups: HashMap<DispatchKey, wgpu::BindGroup>,
    tables: HashMap<Vec<u32>, wgpu::Buffer>,
    created: usize,
    reused: usize,
}

impl BindCache {
    /// Entries kept before the cache starts over (each holds its buffers alive).
    const MAX_ENTRIES: usize = 4096;
    /// Index tables up to this many words are kept by content.
    const MAX_TABLE_WORDS: usize = 1 << 16;
}

/// A result recorded on the GPU, read back by `fetch`.
pub enum GpuPending {
    /// Partial sums to add up in f64.
    Sum(Vec<GpuTensor>),
    /// A Gram matrix as (hi, lo) f32 pairs accumulated in twice f32 precision: the value is hi + lo.
    Gram { hi: GpuTensor, lo: GpuTensor },
    /// A Cholesky factor (n, n) in the lower triangle of `l`; status 0 when every pivot was positive.
    Factor { l: GpuTensor, status: GpuTensor },
}

/// (element type, load expression) substituted into a kernel reading `name` in `dtype`:
/// the shader `unpack2x16float`s f16 and shifts bf16 into the high half of an f32.
fn unpacked(name: &str, dtype: WeightDtype) -> (String, String) {
    match dtype {
        WeightDtype::F32 => ("f32".into(), format!("return {name}[e];")),
        WeightDtype::F16 => ("u32".into(), format!("return unpack2x16float({name}[e >> 1u])[e & 1u];")),
        WeightDtype::Bf16 => (
            "u32".into(),
            format!("let w = {name}[e >> 1u]; return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (e & 1u) == 1u));"),
        ),
    }
}

pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    max_binding: u64,
    pipelines: RefCell<HashMap<String, wgpu::ComputePipeline>>,
    encoder: RefCell<Option<wgpu::CommandEncoder>>,
    pending: Cell<usize>,
    readbacks: Cell<usize>,
    /// The first error the device reported outside a readback; every readback checks it.
    failure: Arc<Mutex<Option<String>>>,
    pool: Rc<RefCell<Pool>>,
    cache: RefCell<BindCache>,
    /// Bound where a kernel variant declares a binding it does not use (every variant of a kernel
    /// keeps one layout), so no dispatch allocates a placeholder.
    unused: wgpu::Buffer,
}

/// Shape and strides of one product C (m, n) = alpha · A (m, k) · B (k, n): operands as
/// (offset, row stride, column stride) in elements; C at c_off with row stride ldc.
#[derive(Clone, Copy)]
struct Geometry {
    m: usize,
    k: usize,
    n: usize,
    a: (usize, usize, usize),
    b: (usize, usize, usize),
    c_off: usize,
    ldc: usize,
    alpha: f32,
    accumulate: bool,
    /// Storage precision of B (weights may be packed f16/bf16).
    b_dtype: WeightDtype,
}

impl Geometry {
    fn new(m: usize, k: usize, n: usize, a: (usize, usize, usize), b: (usize, usize, usize)) -> Geometry {
        Geometry { m, k, n, a, b, c_off: 0, ldc: n, alpha: 1.0, accumulate: false, b_dtype: WeightDtype::F32 }
    }
}

/// Uniform parameters: u32 words (f32 through `to_bits`), padded to 16 bytes.
fn words(w: &[u32]) -> Vec<u8> {
    let mut v: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    while v.len() % 16 != 0 || v.is_empty() {
        v.push(0);
    }
    v
}

/// Workgroup grid for `n` threads in groups of 256: (x, y, threads per grid row).
fn grid_1d(n: usize) -> (u32, u32, u32) {
    let groups = n.div_ceil(256).max(1);
    let x = groups.min(65535);
    let y = groups.div_ceil(x);
    (x as u32, y as u32, (x * 256) as u32)
}

impl Gpu {
    /// The highest-performance adapter there is, with its largest storage bindings.
    pub async fn new_async() -> Result<Gpu> {
        let instance = wgpu::Instance::default();
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Unsupported(format!("no GPU adapter is available ({e})")))?;
        let info = adapter.get_info();
        let al = adapter.limits();
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: al.max_storage_buffer_binding_size,
            max_buffer_size: al.max_buffer_size,
            max_storage_buffers_per_shader_stage: al.max_storage_buffers_per_shader_stage.min(8),
            max_compute_workgroup_storage_size: al.max_compute_workgroup_storage_size,
            ..wgpu::Limits::downlevel_defaults()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("iteris"),
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Unsupported(format!("GPU adapter {} refused a device ({e})", info.name)))?;
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let first = failure.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let msg = match &e {
                wgpu::Error::OutOfMemory { .. } => {
                    "the GPU ran out of memory: use fewer or shorter samples, or the CPU backend".to_string()
                }
                other => format!("the GPU reported an error: {other}"),
            };
            first.lock().unwrap().get_or_insert(msg);
        }));
        let first = failure.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                first.lock().unwrap().get_or_insert(format!(
                    "the GPU device was lost ({msg}); the driver may have reset it after a long dispatch: try again or use the CPU backend"
                ));
            }
        });
        let unused = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused binding"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Gpu {
            unused,
            device,
            queue,
            info,
            max_binding: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            pipelines: RefCell::new(HashMap::new()),
            encoder: RefCell::new(None),
            pending: Cell::new(0),
            readbacks: Cell::new(0),
            failure,
            pool: Rc::default(),
            cache: RefCell::default(),
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Gpu> {
        pollster::block_on(Self::new_async())
    }

    /// A CPU emulation (lavapipe, SwiftShader, WARP): correct but slower than the CPU backend.
    pub fn is_software(&self) -> bool {
        let n = self.info.name.to_lowercase();
        self.info.device_type == wgpu::DeviceType::Cpu
            || ["llvmpipe", "lavapipe", "swiftshader", "warp"].iter().any(|s| n.contains(s))
    }

    /// Bind groups created and reused so far (see `BindCache`).
    pub fn bind_groups(&self) -> (usize, usize) {
        let c = self.cache.borrow();
        (c.created, c.reused)
    }

    /// How many times the host has waited for GPU results so far.
    pub fn readbacks(&self) -> usize {
        self.readbacks.get()
    }

    /// Pretend storage bindings hold at most `bytes` (tests of the weight splitting use this to
    /// split small tensors).
    pub fn limit_bindings(&mut self, bytes: u64) {
        self.max_binding = self.max_binding.min(bytes);
    }

    fn pipeline(&self, kernel: &str, src: &str, subs: &[(&str, String)]) -> wgpu::ComputePipeline {
        let key = format!("{kernel}{subs:?}");
        if let Some(p) = self.pipelines.borrow().get(&key) {
            return p.clone();
        }
        // exact.wgsl and pair_sum.wgsl go wherever a kernel asks for them (WGSL has no includes).
        let mut code = src.replace("{{EXACT}}", EXACT).replace("{{PAIR_SUM}}", PAIR_SUM);
        for (k, v) in subs {
            code = code.replace(&format!("{{{{{k}}}}}"), v);
        }
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(kernel),
            source: wgpu::ShaderSource::Wgsl(code.into()),
        });
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        self.pipelines.borrow_mut().insert(key, p.clone());
        p
    }

    /// Record one dispatch: `buffers` bind to 0..n-1 in order, the parameters to n.
    fn dispatch(&self, p: &wgpu::ComputePipeline, buffers: &[&wgpu::Buffer], params: &[u32], groups: (u32, u32, u32)) {
        self.dispatch_with(p, buffers, params, &[], groups)
    }

    /// `dispatch`, with `after` bound to n+1, n+2, … (after the parameters).
    fn dispatch_with(
        &self,
        p: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        after: &[&wgpu::Buffer],
        groups: (u32, u32, u32),
    ) {
        let key = DispatchKey {
            pipeline: p.clone(),
            buffers: buffers.iter().chain(after).map(|b| (*b).clone()).collect(),
            params: params.to_vec(),
        };
        let bg = {
            let mut cache = self.cache.borrow_mut();
            if std::mem::take(&mut self.pool.borrow_mut().released) || cache.groups.len() >= BindCache::MAX_ENTRIES {
                cache.groups.clear();
            }
            match cache.groups.get(&key).cloned() {
                Some(bg) => {
                    cache.reused += 1;
                    bg
                }
                None => {
                    cache.created += 1;
                    let bg = self.bind_group(p, buffers, params, after);
                    cache.groups.insert(key, bg.clone());
                    bg
                }
            }
        };
        self.record(|enc| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(p);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        });
        self.pending.set(self.pending.get() + 1);
        if self.pending.get() >= MAX_PENDING {
            self.flush();
        }
    }

    /// A bind group for `dispatch_with`, with a fresh uniform buffer holding `params`.
    fn bind_group(
        &self,
        p: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        after: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &words(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        entries.push(wgpu::BindGroupEntry { binding: buffers.len() as u32, resource: uniform.as_entire_binding() });
        for (i, b) in after.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: (buffers.len() + 1 + i) as u32,
                resource: b.as_entire_binding(),
            });
        }
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// A read-only index table (token ids, positions, spans), uploaded once per content.
    fn table(&self, data: &[u32]) -> wgpu::Buffer {
        if data.len() > BindCache::MAX_TABLE_WORDS {
            return self.storage(data);
        }
        let mut cache = self.cache.borrow_mut();
        if let Some(b) = cache.tables.get(data) {
            return b.clone();
        }
        if cache.tables.len() >= BindCache::MAX_ENTRIES {
            cache.tables.clear();
        }
        let b = self.storage(data);
        cache.tables.insert(data.to_vec(), b.clone());
        b
    }

    /// Record into the open command encoder (opened on first use), so the work runs in order with
    /// every dispatch recorded before it.
    fn record<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut enc = self.encoder.borrow_mut();
        f(enc.get_or_insert_with(|| self.device.create_command_encoder(&Default::default())))
    }

    /// Whether an (n, n) f32 matrix fits one storage binding (a system matrix to factor).
    fn fits_square(&self, n: usize) -> bool {
        (n * n * 4) as u64 <= self.max_binding
    }

    fn flush(&self) {
        if let Some(enc) = self.encoder.borrow_mut().take() {
            self.queue.submit([enc.finish()]);
        }
        self.pending.set(0);
    }

    /// Remember the first failure; `fetch` and `download` report it (as wgpu's own errors are).
    fn fail(&self, msg: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(msg);
        }
    }

    /// A (rows, cols) f32 result buffer, or why there cannot be one.
    fn try_alloc(&self, rows: usize, cols: usize) -> Result<GpuTensor> {
        let bytes = rows.checked_mul(cols).and_then(|n| n.checked_mul(4)).map_or(u64::MAX, |b| (b as u64).max(4));
        if bytes > self.max_binding {
            return Err(Error::Gpu(format!(
                "a ({rows} × {cols}) tensor of {:.0} MiB exceeds the {:.0} MiB the GPU can bind at once (the memory plan should have refused this merge)",
                bytes as f64 / (1u64 << 20) as f64,
                self.max_binding as f64 / (1u64 << 20) as f64
            )));
        }
        Ok(self.alloc_bytes(rows, cols, bytes))
    }

    /// `try_alloc` for the tensor ops, which cannot fail: a refused allocation is remembered
    /// (`fail`) and reported by the next readback, and a one-word stand-in keeps the shapes
    /// consistent until then (robust buffer access keeps its dispatches in bounds).
    fn alloc(&self, rows: usize, cols: usize) -> GpuTensor {
        self.try_alloc(rows, cols).unwrap_or_else(|e| {
            self.fail(e.to_string());
            self.alloc_bytes(rows, cols, 4)
        })
    }

    fn alloc_bytes(&self, rows: usize, cols: usize, bytes: u64) -> GpuTensor {
        let reused = self.pool.borrow_mut().take(bytes);
        let buf = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        GpuTensor { buf, rows, cols, dtype: WeightDtype::F32, blocks: vec![], pool: self.pool.clone(), pooled: true }
    }

    fn storage<T: bytemuck::Pod>(&self, data: &[T]) -> wgpu::Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let contents = if bytes.is_empty() { &[0u8; 4][..] } else { bytes };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// Copy the first n f32 of each buffer back to the host, in one submission and one map.
    async fn read_many(&self, regions: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<f32>>> {
        let total: usize = regions.iter().map(|r| r.1).sum();
        if total == 0 {
            return Ok(regions.iter().map(|_| Vec::new()).collect());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (total * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.record(|enc| {
            let mut at = 0;
            for (buf, n) in regions {
                if *n > 0 {
                    enc.copy_buffer_to_buffer(buf, 0, &staging, (at * 4) as u64, (*n * 4) as u64);
                }
                at += n;
            }
        });
        self.flush();
        self.readbacks.set(self.readbacks.get() + 1);
        let slice = staging.slice(..);
        let (tx, rx) = futures_channel::oneshot::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        // Natively the host drives the device; in a browser the page's event loop does, and the
        // callback fires while this future is suspended.
        #[cfg(not(target_arch = "wasm32"))]
        if let Err(e) = self.device.poll(wgpu::PollType::wait_indefinitely()) {
            return Err(self.failure().unwrap_or_else(|| Error::Gpu(format!("the GPU stopped responding ({e})"))));
        }
        let mapped = rx.await.map_err(|_| ()).and_then(|r| r.map_err(|_| ()));
        if let Some(e) = self.failure() {
            return Err(e);
        }
        mapped.map_err(|_| Error::Gpu("the GPU refused to return results (device lost?)".into()))?;
        let range = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("GPU readback failed ({e})")))?;
        let all: Vec<f32> = bytemuck::cast_slice(&range).to_vec();
        drop(range);
        staging.unmap();
        let mut at = 0;
        Ok(regions
            .iter()
            .map(|(_, n)| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect())
    }

    /// Copy `n` f32 of `buf` back to the host (submits everything recorded so far).
    async fn read(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        Ok(self.read_many(&[(buf, n)]).await?.pop().unwrap())
    }

    /// The first error the device reported on its own (out of memory, lost, invalid work).
    fn failure(&self) -> Option<Error> {
        self.failure.lock().ok()?.clone().map(Error::Gpu)
    }

    fn elementwise(
        &self,
        op: &str,
        act: Option<Activation>,
        y: &wgpu::Buffer,
        x: Option<&wgpu::Buffer>,
        n: usize,
        oy: usize,
        ox: usize,
        cols: usize,
        s: f32,
    ) {
        let (expr, act_expr) = match op {
            "add" => ("y[p.oy + i] = y[p.oy + i] + p.s * x[p.ox + i];", "return v;"),
            "set" => ("y[p.oy + i] = p.s * x[p.ox + i];", "return v;"),
            "bias" => ("y[i] = y[i] + x[i % p.cols];", "return v;"),
            "scale" => ("y[i] = p.s * y[i];", "return v;"),
            "mul" => ("y[i] = y[i] * x[i];", "return v;"),
            _ => (
                "y[i] = act(y[i]);",
                match act.unwrap() {
                    Activation::GeluErf => "return 0.5 * v * (1.0 + erf(v * 0.70710678118654752));",
                    Activation::GeluTanh => {
                        "let u = 0.7978845608028654 * (v + 0.044715 * v * v * v); return v / (1.0 + exp(-2.0 * u));"
                    }
                    Activation::Silu => "return v / (1.0 + exp(-v));",
                    Activation::Relu => "return max(v, 0.0);",
                    Activation::Tanh => "return tanh(v);",
                },
            ),
        };
        // Keep binding 1 statically used whatever the op, so every variant has the same layout.
        let expr = format!("{expr}\n    if (p.n == 0xffffffffu) {{ y[0] = x[0]; }}");
        let p = self.pipeline("elementwise", ELEMENTWISE, &[("OP", expr), ("ACT", act_expr.to_string())]);
        let x = x.unwrap_or(&self.unused);
        let (gx, gy, stride) = grid_1d(n);
        self.dispatch(&p, &[y, x], &[n as u32, oy as u32, ox as u32, cols as u32, s.to_bits(), stride], (gx, gy, 1));
    }

    /// C = alpha·A·B (+ C) through strides (see matmul.wgsl); with `lo`, the Dot2 error terms.
    fn matmul(&self, a: &wgpu::Buffer, b: &wgpu::Buffer, c: &wgpu::Buffer, lo: Option<&wgpu::Buffer>, g: &Geometry) {
        let (b_elem, b_load) = unpacked("b", g.b_dtype);
        // 8×8 outputs per thread (128×128 tiles) once there are enough tiles to fill a GPU.
        let t = if lo.is_none() && g.m >= BIG_TILE_FROM && g.n >= BIG_TILE_FROM { 8 } else { 4 };
        let subs = [
            ("A_K_FAST", (g.a.2 == 1).to_string()),
            ("B_K_FAST", (g.b.1 == 1).to_string()),
            ("WITH_LO", lo.is_some().to_string()),
            ("B_ELEM", b_elem),
            ("B_LOAD", b_load),
            ("TM", t.to_string()),
            ("TN", t.to_string()),
            ("TA_LEN", (256 * t).to_string()),
            ("TB_LEN", (256 * t).to_string()),
            ("ACC_LEN", (t * t).to_string()),
            ("COMP_LEN", if lo.is_some() { t * t } else { 1 }.to_string()),
        ];
        let p = self.pipeline("matmul", MATMUL, &subs);
        let params = [
            g.m as u32,
            g.n as u32,
            g.k as u32,
            g.a.0 as u32,
            g.a.1 as u32,
            g.a.2 as u32,
            g.b.0 as u32,
            g.b.1 as u32,
            g.b.2 as u32,
            g.accumulate as u32,
            g.c_off as u32,
            g.ldc as u32,
            g.alpha.to_bits(),
            1f32.to_bits(),
            0,
        ];
        let lo = lo.unwrap_or(&self.unused);
        let tile = 16 * t;
        let groups = (g.n.div_ceil(tile) as u32, g.m.div_ceil(tile) as u32, 1);
        self.dispatch_with(&p, &[a, b, c], &params, &[lo], groups);
    }

    /// A fresh (m, n) = A·B.
    fn product(&self, a: &wgpu::Buffer, b: &wgpu::Buffer, g: Geometry, lo: bool) -> (GpuTensor, Option<GpuTensor>) {
        let c = self.alloc(g.m, g.n);
        let c_lo = lo.then(|| self.alloc(g.m, g.n));
        self.matmul(a, b, &c.buf, c_lo.as_ref().map(|t| &t.buf), &Geometry { ldc: g.n, ..g });
        (c, c_lo)
    }

    /// Record a reduction of n elements of x (from element ox) against y; returns the
    /// per-workgroup partial sums as (hi, lo) pairs, (1, 2·workgroups): their f64 sum is the total.
    fn reduce(
        &self,
        mode: &str,
        x: &wgpu::Buffer,
        x_dtype: WeightDtype,
        ox: usize,
        y: Option<&wgpu::Buffer>,
        n: usize,
    ) -> GpuTensor {
        let chunk = 256 * 16;
        let groups = n.div_ceil(chunk).max(1);
        let partial = self.alloc(1, 2 * groups);
        let term = match mode {
            "norm" => "let v = load_x(p.ox + i); return product(v, v);",
            // The difference rounds too; its error is second order in an alignment error.
            "dist" => "let d = load_x(p.ox + i) - y[i]; return product(d, d);",
            _ => "return product(load_x(p.ox + i), y[i]);",
        };
        let (x_elem, x_load) = unpacked("x", x_dtype);
        let p = self.pipeline("reduce", REDUCE, &[("MODE", term.to_string()), ("X_ELEM", x_elem), ("X_LOAD", x_load)]);
        let y = y.unwrap_or(&self.unused);
        let gx = groups.min(65535);
        self.dispatch(
            &p,
            &[x, y, &partial.buf],
            &[n as u32, ox as u32, chunk as u32, 1f32.to_bits(), 0],
            (gx as u32, groups.div_ceil(gx) as u32, 1),
        );
        partial
    }
}

impl Backend for Gpu {
    type T = GpuTensor;
    type Pending = GpuPending;

    fn defer_gram(&self, x: &GpuTensor, xr: Range<usize>, y: &GpuTensor, yr: Range<usize>) -> GpuPending {
        assert_eq!(xr.len(), yr.len());
        let g = Geometry::new(x.cols, xr.len(), y.cols, (xr.start * x.cols, 1, x.cols), (yr.start * y.cols, y.cols, 1));
        let (hi, lo) = self.product(&x.buf, &y.buf, g, true);
        GpuPending::Gram { hi, lo: lo.unwrap() }
    }

    fn defer_sq_norm(&self, x: &GpuTensor, rows: Range<usize>) -> GpuPending {
        let parts = x
            .row_blocks()
            .into_iter()
            .filter_map(|(r0, r1, buf)| {
                let (a, b) = (rows.start.max(r0), rows.end.min(r1));
                (a < b).then(|| self.reduce("norm", buf, x.dtype, (a - r0) * x.cols, None, (b - a) * x.cols))
            })
            .collect();
        GpuPending::Sum(parts)
    }

    fn defer_sq_dist(&self, a: &GpuTensor, b: &GpuTensor) -> GpuPending {
        assert_eq!((a.rows, a.cols, a.dtype, b.dtype), (b.rows, b.cols, WeightDtype::F32, WeightDtype::F32));
        GpuPending::Sum(vec![self.reduce("dist", &a.buf, a.dtype, 0, Some(&b.buf), a.rows * a.cols)])
    }

    fn defer_dot(&self, a: &GpuTensor, b: &GpuTensor) -> GpuPending {
        assert_eq!((a.rows, a.cols, a.dtype, b.dtype), (b.rows, b.cols, WeightDtype::F32, WeightDtype::F32));
        GpuPending::Sum(vec![self.reduce("dot", &a.buf, a.dtype, 0, Some(&b.buf), a.rows * a.cols)])
    }

    /// One staging buffer, one submission, one map for everything pending.
    async fn fetch(&self, pending: Vec<GpuPending>) -> Result<Vec<Fetched>> {
        let mut regions: Vec<(&wgpu::Buffer, usize)> = Vec::new();
        for p in &pending {
            match p {
                GpuPending::Sum(parts) => regions.extend(parts.iter().map(|t| (&t.buf, t.cols))),
                GpuPending::Gram { hi, lo } => {
                    regions.push((&hi.buf, hi.rows * hi.cols));
                    regions.push((&lo.buf, lo.rows * lo.cols));
                }
                GpuPending::Factor { l, status } => {
                    regions.push((&status.buf, 1));
                    regions.push((&l.buf, l.rows * l.cols));
                }
            }
        }
        let values = self.read_many(&regions).await?;
        let mut at = values.into_iter();
        Ok(pending
            .iter()
            .map(|p| match p {
                GpuPending::Sum(parts) => Fetched::Scalar(
                    parts.iter().map(|_| at.next().unwrap().iter().map(|&v| v as f64).sum::<f64>()).sum(),
                ),
                GpuPending::Gram { hi, .. } => {
                    let (h, l) = (at.next().unwrap(), at.next().unwrap());
                    Fetched::Matrix(nalgebra::DMatrix::from_row_iterator(
                        hi.rows,
                        hi.cols,
                        h.iter().zip(&l).map(|(a, b)| *a as f64 + *b as f64),
                    ))
                }
                GpuPending::Factor { l, .. } => {
                    let (status, values) = (at.next().unwrap(), at.next().unwrap());
                    Fetched::Factor((status[0].to_bits() == 0).then(|| lower(l.rows, &values)))
                }
            })
            .collect())
    }

    fn name(&self) -> String {
        let name = if self.info.name.is_empty() { "unnamed adapter" } else { &self.info.name };
        let emulated = if self.is_software() { ", CPU emulation" } else { "" };
        format!("gpu ({name}, {:?}{emulated})", self.info.backend)
    }

    fn upload(&self, m: &Mat) -> GpuTensor {
        GpuTensor {
            buf: self.storage(&m.data),
            rows: m.rows,
            cols: m.cols,
            dtype: WeightDtype::F32,
            blocks: vec![],
            pool: self.pool.clone(),
            pooled: false,
        }
    }

    /// Copy through a staging buffer, recorded in the open encoder: commands recorded earlier
    /// still read the old contents (a queue write would land before them).
    fn overwrite(&self, t: &mut GpuTensor, m: &Mat) {
        if (t.rows, t.cols, t.dtype) != (m.rows, m.cols, WeightDtype::F32) || m.data.is_empty() {
            *t = self.upload(m);
            return;
        }
        let staging = self.storage(&m.data);
        self.record(|enc| enc.copy_buffer_to_buffer(&staging, 0, &t.buf, 0, staging.size()));
    }

    fn upload_weight(&self, m: &Mat, dtype: WeightDtype) -> GpuTensor {
        let elem = if dtype == WeightDtype::F32 { 4 } else { 2 };
        let block_rows = ((self.max_binding as usize) / (m.cols.max(1) * elem)).max(1);
        let mut bufs = (0..m.rows.max(1)).step_by(block_rows).map(|r0| {
            let part = &m.data[r0 * m.cols..(r0 + block_rows).min(m.rows) * m.cols];
            let buf = match dtype {
                WeightDtype::F32 => self.storage(part),
                WeightDtype::F16 | WeightDtype::Bf16 => {
                    let bits: Vec<u16> = match dtype {
                        WeightDtype::F16 => part.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect(),
                        _ => part.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(),
                    };
                    let words: Vec<u32> =
                        bits.chunks(2).map(|p| p[0] as u32 | (*p.get(1).unwrap_or(&0) as u32) << 16).collect();
                    self.storage(&words)
                }
            };
            (r0, buf)
        });
        let (_, buf) = bufs.next().unwrap();
        GpuTensor {
            buf,
            rows: m.rows,
            cols: m.cols,
            dtype,
            blocks: bufs.collect(),
            pool: self.pool.clone(),
            pooled: false,
        }
    }

    async fn download(&self, t: &GpuTensor) -> Result<Mat> {
        let mut data = Vec::with_capacity(t.rows * t.cols);
        for (r0, r1, buf) in t.row_blocks() {
            let n = (r1 - r0) * t.cols;
            match t.dtype {
                WeightDtype::F32 => data.extend(self.read(buf, n).await?),
                packed => {
                    let words: Vec<u32> = self.read(buf, n.div_ceil(2)).await?.iter().map(|w| w.to_bits()).collect();
                    data.extend((0..n).map(|e| {
                        let h = (words[e / 2] >> (16 * (e % 2))) as u16;
                        if packed == WeightDtype::F16 {
                            half::f16::from_bits(h).to_f32()
                        } else {
                            half::bf16::from_bits(h).to_f32()
                        }
                    }));
                }
            }
        }
        Ok(Mat::new(t.rows, t.cols, data))
    }

    fn dims(&self, t: &GpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn select_rows(&self, x: &GpuTensor, idx: &[u32]) -> GpuTensor {
        let out = self.alloc(idx.len(), x.cols);
        let ib = self.table(idx);
        let (gx, gy, stride) = grid_1d(idx.len() * x.cols);
        let (x_elem, x_load) = unpacked("x", x.dtype);
        let p = self.pipeline("select_rows", SELECT_ROWS, &[("X_ELEM", x_elem), ("X_LOAD", x_load)]);
        for (r0, r1, buf) in x.row_blocks() {
            let params = [idx.len() as u32, x.cols as u32, stride, r0 as u32, r1 as u32];
            self.dispatch(&p, &[buf, &ib, &out.buf], &params, (gx, gy, 1));
        }
        out
    }

    fn slice_cols(&self, x: &GpuTensor, cols: Range<usize>) -> GpuTensor {
        let out = self.alloc(x.rows, cols.len());
        let (gx, gy, stride) = grid_1d(x.rows * cols.len());
        let p = self.pipeline("slice_cols", SLICE_COLS, &[]);
        self.dispatch(
            &p,
            &[&x.buf, &out.buf],
            &[x.rows as u32, x.cols as u32, cols.start as u32, cols.len() as u32, stride],
            (gx, gy, 1),
        );
        out
    }

    fn matmul_t(&self, x: &GpuTensor, rows: Range<usize>, w: &GpuTensor) -> GpuTensor {
        assert_eq!(x.cols, w.cols);
        assert_eq!(x.dtype, WeightDtype::F32, "activations are f32");
        let k = x.cols;
        let c = self.alloc(rows.len(), w.rows);
        // Each row block of w gives a block of output columns.
        for (r0, r1, buf) in w.row_blocks() {
            let g = Geometry {
                b_dtype: w.dtype,
                c_off: r0,
                ldc: w.rows,
                ..Geometry::new(rows.len(), k, r1 - r0, (rows.start * k, k, 1), (0, 1, k))
            };
            self.matmul(&x.buf, buf, &c.buf, None, &g);
        }
        c
    }

    fn add_rows(&self, y: &mut GpuTensor, rows: Range<usize>, d: &GpuTensor, s: f32) {
        assert_eq!((rows.len(), y.cols), (d.rows, d.cols));
        self.elementwise("add", None, &y.buf, Some(&d.buf), rows.len() * y.cols, rows.start * y.cols, 0, y.cols, s);
    }

    fn add_bias(&self, y: &mut GpuTensor, b: &GpuTensor) {
        self.elementwise("bias", None, &y.buf, Some(&b.buf), y.rows * y.cols, 0, 0, y.cols, 1.0);
    }

    fn scale(&self, x: &mut GpuTensor, s: f32) {
        self.elementwise("scale", None, &x.buf, None, x.rows * x.cols, 0, 0, x.cols, s);
    }

    fn mul(&self, y: &mut GpuTensor, x: &GpuTensor) {
        self.elementwise("mul", None, &y.buf, Some(&x.buf), y.rows * y.cols, 0, 0, y.cols, 1.0);
    }

    fn activate(&self, x: &mut GpuTensor, act: Activation) {
        self.elementwise("act", Some(act), &x.buf, None, x.rows * x.cols, 0, 0, x.cols, 1.0);
    }

    fn layer_norm(&self, x: &GpuTensor, gamma: &GpuTensor, beta: Option<&GpuTensor>, eps: f32) -> GpuTensor {
        self.norm(x, gamma, beta, eps, false)
    }

    fn rms_norm(&self, x: &GpuTensor, gamma: &GpuTensor, eps: f32) -> GpuTensor {
        self.norm(x, gamma, None, eps, true)
    }

    fn rope(&self, x: &mut GpuTensor, positions: &[u32], head_dim: usize, inv_freq: &[f32]) {
        let pb = self.table(positions);
        let fb = self.table(bytemuck::cast_slice(inv_freq));
        let (gx, gy, stride) = grid_1d(x.rows * x.cols / 2);
        let p = self.pipeline("rope", ROPE, &[]);
        self.dispatch(&p, &[&x.buf, &pb, &fb], &[x.rows as u32, x.cols as u32, head_dim as u32, stride], (gx, gy, 1));
    }

    fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        spec: &AttentionSpec,
        seqs: &[Range<usize>],
    ) -> GpuTensor {
        if spec.head_dim > 256 {
            self.fail(format!("attention.wgsl handles head_dim up to 256, not {}: use the CPU backend", spec.head_dim));
        }
        let mut span = Vec::with_capacity(q.rows * 2);
        for s in seqs {
            for _ in s.clone() {
                span.push(s.start as u32);
                span.push(s.end as u32);
            }
        }
        let sb = self.table(&span);
        let out = self.alloc(q.rows, q.cols);
        let p = self.pipeline("attention", ATTENTION, &[]);
        let params = [
            q.rows as u32,
            spec.heads as u32,
            spec.kv_heads as u32,
            spec.head_dim as u32,
            spec.causal as u32,
            spec.window.unwrap_or(0) as u32,
            spec.scale.to_bits(),
        ];
        let (y, z) = (q.rows.min(65535), q.rows.div_ceil(65535));
        self.dispatch(&p, &[&q.buf, &k.buf, &v.buf, &sb, &out.buf], &params, (spec.heads as u32, y as u32, z as u32));
        out
    }

    fn mix_rows(
        &self,
        a: &GpuTensor,
        ar: Range<usize>,
        wa: f32,
        b: &GpuTensor,
        br: Range<usize>,
        wb: f32,
    ) -> GpuTensor {
        let out = self.alloc(ar.len(), a.cols);
        let n = ar.len() * a.cols;
        self.elementwise("set", None, &out.buf, Some(&b.buf), n, 0, br.start * b.cols, a.cols, wb);
        self.elementwise("add", None, &out.buf, Some(&a.buf), n, 0, ar.start * a.cols, a.cols, wa);
        out
    }

    /// Assemble M from the pending statistics (`system_scalars.wgsl` reduces the partial sums c
    /// and the ridge need, `system_assemble.wgsl` adds each term) and factor it in place.
    fn defer_cholesky(&self, terms: &[FactorTerm<'_, GpuPending>]) -> Option<GpuPending> {
        let grams: Vec<&GpuTensor> = terms
            .iter()
            .map(|t| match t.gram {
                GpuPending::Gram { hi, .. } => hi,
                _ => panic!("a system term's Gram must be a pending Gram matrix"),
            })
            .collect();
        let n = grams.first()?.rows;
        if !self.fits_square(n) {
            return None;
        }
        // Scalars 3t, 3t+1, 3t+2 of term t: c's numerator, its denominator, ‖G‖²_F.
        let norms: Vec<GpuTensor> =
            grams.iter().map(|g| self.reduce("norm", &g.buf, WeightDtype::F32, 0, None, n * n)).collect();
        let mut base = Vec::new();
        let mut sources: Vec<(usize, f32, &GpuTensor)> = Vec::new();
        fn sums(p: &GpuPending) -> &[GpuTensor] {
            match p {
                GpuPending::Sum(parts) => parts,
                _ => panic!("a system term's scalars must be pending sums"),
            }
        }
        for (t, (term, norm)) in terms.iter().zip(&norms).enumerate() {
            base.extend([term.num as f32, if term.den.is_some() { 0.0 } else { 1.0 }, 0.0]);
            for (k, p) in &term.num_terms {
                sources.extend(sums(p).iter().map(|part| (3 * t, *k as f32, part)));
            }
            if let Some(p) = term.den {
                sources.extend(sums(p).iter().map(|part| (3 * t + 1, 1.0, part)));
            }
            sources.push((3 * t + 2, 1.0, norm));
        }
        // Pack every partial into one buffer (a kernel binds a fixed number of buffers).
        let total: usize = sources.iter().map(|s| s.2.cols).sum();
        let packed = self.alloc(1, total);
        let mut segments: Vec<u32> = Vec::new();
        self.record(|enc| {
            let mut at = 0;
            for (slot, k, part) in &sources {
                enc.copy_buffer_to_buffer(&part.buf, 0, &packed.buf, (at * 4) as u64, (part.cols * 4) as u64);
                segments.extend([*slot as u32, at as u32, part.cols as u32, k.to_bits()]);
                at += part.cols;
            }
        });
        let scalars = self.alloc(1, base.len());
        let p = self.pipeline("system_scalars", SYSTEM_SCALARS, &[]);
        let (seg_buf, base_buf) = (self.table(&segments), self.table(bytemuck::cast_slice(&base)));
        self.dispatch(
            &p,
            &[&packed.buf, &seg_buf, &base_buf, &scalars.buf],
            &[sources.len() as u32],
            (base.len() as u32, 1, 1),
        );

        let m = self.alloc(n, n);
        let p = self.pipeline("system_assemble", SYSTEM_ASSEMBLE, &[]);
        let (gx, gy, stride) = grid_1d(n * n);
        for (t, (term, g)) in terms.iter().zip(&grams).enumerate() {
            let params = [
                n as u32,
                t as u32,
                (t == 0) as u32,
                (term.ridge as f32).to_bits(),
                (term.off_diagonal as f32).to_bits(),
                stride,
            ];
            self.dispatch(&p, &[&m.buf, &g.buf, &scalars.buf], &params, (gx, gy, 1));
        }
        let status = self.factor_in_place(&m.buf, n);
        Some(GpuPending::Factor { l: m, status })
    }

    /// `defer_cholesky` of matrices the host already has: upload, factor, read back together.
    async fn cholesky_f32_many(&self, ms: &[&nalgebra::DMatrix<f64>]) -> Result<Vec<Option<nalgebra::DMatrix<f64>>>> {
        let factored: Vec<Option<GpuPending>> = ms
            .iter()
            .map(|m| {
                let n = m.nrows();
                self.fits_square(n).then(|| {
                    let rows: Vec<f32> = (0..n * n).map(|e| m[(e / n, e % n)] as f32).collect();
                    let l = self.upload(&Mat::new(n, n, rows));
                    let status = self.factor_in_place(&l.buf, n);
                    GpuPending::Factor { l, status }
                })
            })
            .collect();
        let fits: Vec<bool> = factored.iter().map(Option::is_some).collect();
        let mut fetched = self.fetch(factored.into_iter().flatten().collect()).await?.into_iter();
        Ok(fits.into_iter().map(|f| f.then(|| fetched.next().unwrap().factor()).flatten()).collect())
    }

    fn offers_cholesky_f32(&self) -> bool {
        true
    }

    fn on_device(&self) -> bool {
        true
    }
    fn keeps_file_precision(&self) -> bool {
        true
    }
    fn max_tensor_bytes(&self) -> u64 {
        self.max_binding
    }
}

/// The lower triangle of a row-major (n, n) f32 matrix.
fn lower(n: usize, values: &[f32]) -> nalgebra::DMatrix<f64> {
    nalgebra::DMatrix::from_fn(n, n, |i, j| if j <= i { values[i * n + j] as f64 } else { 0.0 })
}

impl Gpu {
    /// Blocked right-looking Cholesky in f32, in place on a row-major (n, n) buffer: per 32-column
    /// step, factor the diagonal block (one workgroup), solve the panel below it (a thread per row),
    /// and update the trailing matrix with the tiled product (alpha = −1). Returns the status word
    /// (0: every pivot positive).
    fn factor_in_place(&self, a: &wgpu::Buffer, n: usize) -> GpuTensor {
        const NB: usize = 32;
        let block = self.pipeline("cholesky_block", CHOLESKY_BLOCK, &[]);
        let panel_p = self.pipeline("cholesky_panel", CHOLESKY_PANEL, &[]);
        let status = self.alloc(1, 1);
        self.record(|enc| enc.clear_buffer(&status.buf, 0, None));
        for k0 in (0..n).step_by(NB) {
            let kb = NB.min(n - k0);
            let params = [n as u32, k0 as u32, kb as u32];
            self.dispatch(&block, &[a, &status.buf], &params, (1, 1, 1));
            let m2 = n - k0 - kb;
            if m2 == 0 {
                break;
            }
            let panel = self.alloc(m2, kb);
            self.dispatch(&panel_p, &[a, &panel.buf], &params, (m2.div_ceil(64) as u32, 1, 1));
            let g = Geometry {
                c_off: (k0 + kb) * n + k0 + kb,
                ldc: n,
                alpha: -1.0,
                accumulate: true,
                ..Geometry::new(m2, kb, m2, (0, kb, 1), (0, 1, kb))
            };
            self.matmul(&panel.buf, &panel.buf, a, None, &g);
        }
        status
    }

    fn norm(&self, x: &GpuTensor, gamma: &GpuTensor, beta: Option<&GpuTensor>, eps: f32, rms: bool) -> GpuTensor {
        let out = self.alloc(x.rows, x.cols);
        let p = self.pipeline("norm", NORM, &[("RMS", rms.to_string())]);
        let beta_buf = beta.map(|b| &b.buf).unwrap_or(&gamma.buf);
        let (gx, gy) = (x.rows.min(65535), x.rows.div_ceil(65535));
        self.dispatch(
            &p,
            &[&x.buf, &gamma.buf, beta_buf, &out.buf],
            &[x.rows as u32, x.cols as u32, eps.to_bits(), beta.is_some() as u32, 1f32.to_bits(), 0],
            (gx as u32, gy as u32, 1),
        );
        out
    }
}
