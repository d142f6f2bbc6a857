//! The GPU backend: the `Backend` contract in WGSL compute shaders through `wgpu` (Vulkan, Metal,
//! DX12 natively; WebGPU in the browser).
//!
//! - `mod.rs` (this file): the device, its limits and the errors it reports; the `Backend` impl,
//!   which only routes each op to its kernel.
//! - `pool.rs`: tensors (`GpuTensor`) and the pool of buffers they come from and go back to.
//! - `dispatch.rs`: pipelines cached by (kernel, substitutions), bind groups by what they bind, the
//!   one open command encoder, and the `Params` layout every kernel's uniform follows.
//! - `readback.rs`: the pending values (`GpuScalar`, `GpuGram`, `GpuFactor`) and the one readback
//!   that brings a batch of them to the host.
//! - one file per kernel family, named after its shader in `shaders/` (`matmul.rs` runs
//!   `matmul.wgsl`; `cholesky.rs` the folder `cholesky/`), holding the kernels' parameter structs
//!   and their dispatches; `shaders/common/` holds what `dispatch.rs` pastes into kernels.
//!
//! Commands are recorded into one open encoder and submitted only when the host needs a result
//! (a Gram matrix, a norm, a download) or after many dispatches, so a stage costs one submission.

mod attention;
mod attention_backward;
mod cholesky;
mod dispatch;
mod elementwise;
mod gate_backward;
mod matmul;
mod norm;
mod norm_backward;
mod pool;
mod readback;
mod reduce;
mod rope;
mod select_rows;
mod slice_cols;
mod system;
mod write_rows;

pub use pool::GpuTensor;
pub use readback::{GpuFactor, GpuGram, GpuScalar};

use super::{Activation, AttentionSpec, Backward, Factors, Forward, Reads, Statistics, SystemSpec, Transfer, Values};
use crate::error::{Error, Result};
use crate::mat::{Mat, Mat64, StoredMat};
use dispatch::BindCache;
use elementwise::Elementwise;
use pool::Pool;
use reduce::Reduction;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// The largest storage binding (and buffer) the device allows.
    max_binding: u64,
    pipelines: RefCell<HashMap<String, wgpu::ComputePipeline>>,
    encoder: RefCell<Option<wgpu::CommandEncoder>>,
    /// Dispatches recorded since the last submission.
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

    /// Pretend storage bindings hold at most `bytes` (tests of the weight splitting use this to
    /// split small tensors).
    pub fn limit_bindings(&mut self, bytes: u64) {
        self.max_binding = self.max_binding.min(bytes);
    }

    /// Whether an (n, n) f32 matrix fits one storage binding (a system matrix to factor).
    fn fits_square(&self, n: usize) -> bool {
        n.checked_mul(n).and_then(|e| e.checked_mul(4)).is_some_and(|b| b as u64 <= self.max_binding)
    }

    /// Remember the first failure; `fetch` and `download` report it (as wgpu's own errors are).
    fn fail(&self, msg: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(msg);
        }
    }

    /// The first error the device reported on its own (out of memory, lost, invalid work).
    fn failure(&self) -> Option<Error> {
        self.failure.lock().ok()?.clone().map(Error::Gpu)
    }
}

impl Transfer for Gpu {
    type T = GpuTensor;

    fn name(&self) -> String {
        let name = if self.info.name.is_empty() { "unnamed adapter" } else { &self.info.name };
        let emulated = if self.is_software() { ", CPU emulation" } else { "" };
        format!("gpu ({name}, {:?}{emulated})", self.info.backend)
    }

    fn upload(&self, m: &Mat) -> GpuTensor {
        self.upload_f32(m)
    }

    fn overwrite(&self, t: &mut GpuTensor, m: &Mat) {
        self.overwrite_f32(t, m)
    }

    async fn download(&self, t: &GpuTensor) -> Result<Mat> {
        self.download_tensor(t).await
    }

    fn upload_weight(&self, w: StoredMat) -> GpuTensor {
        self.upload_packed(&w)
    }

    fn dims(&self, t: &GpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
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

// Each op calls its kernel family's dispatch of the same name (`select_rows.rs`, `matmul.rs`, …):
// `Gpu::op(self, …)` is that inherent method, which Rust resolves before the trait's.
impl Forward for Gpu {
    fn select_rows(&self, x: &GpuTensor, idx: &[u32]) -> GpuTensor {
        Gpu::select_rows(self, x, idx)
    }

    fn slice_cols(&self, x: &GpuTensor, cols: Range<usize>) -> GpuTensor {
        Gpu::slice_cols(self, x, cols)
    }

    fn matmul_t(&self, x: &GpuTensor, rows: Range<usize>, w: &GpuTensor) -> GpuTensor {
        Gpu::matmul_t(self, x, rows, w)
    }

    fn add_rows(&self, y: &mut GpuTensor, rows: Range<usize>, d: &GpuTensor, s: f32) {
        assert_eq!((rows.len(), y.cols), (d.rows, d.cols), "add_rows: d must be (rows.len(), y.cols)");
        assert!(rows.end <= y.rows, "add_rows: rows {rows:?} leave y's {} rows", y.rows);
        self.elementwise(
            Elementwise::Add,
            &y.buf,
            Some(&d.buf),
            rows.len() * y.cols,
            rows.start * y.cols,
            0,
            y.cols,
            s,
        );
    }

    fn add_bias(&self, y: &mut GpuTensor, b: &GpuTensor) {
        assert_eq!((b.rows, b.cols), (1, y.cols), "add_bias: b must be (1, y.cols)");
        self.elementwise(Elementwise::Bias, &y.buf, Some(&b.buf), y.rows * y.cols, 0, 0, y.cols, 1.0);
    }

    fn scale(&self, x: &mut GpuTensor, s: f32) {
        self.elementwise(Elementwise::Scale, &x.buf, None, x.rows * x.cols, 0, 0, x.cols, s);
    }

    fn mul(&self, y: &mut GpuTensor, x: &GpuTensor) {
        assert_eq!((y.rows, y.cols), (x.rows, x.cols), "mul: shapes differ");
        self.elementwise(Elementwise::Mul, &y.buf, Some(&x.buf), y.rows * y.cols, 0, 0, y.cols, 1.0);
    }

    fn activate(&self, x: &mut GpuTensor, act: Activation) {
        self.elementwise(Elementwise::Activate(act), &x.buf, None, x.rows * x.cols, 0, 0, x.cols, 1.0);
    }

    fn layer_norm(&self, x: &GpuTensor, gamma: &GpuTensor, beta: Option<&GpuTensor>, eps: f32) -> GpuTensor {
        self.norm(x, gamma, beta, eps, false)
    }

    fn rms_norm(&self, x: &GpuTensor, gamma: &GpuTensor, eps: f32) -> GpuTensor {
        self.norm(x, gamma, None, eps, true)
    }

    fn rope(&self, x: &mut GpuTensor, positions: &[u32], head_dim: usize, inv_freq: &[f32], scale: f32) {
        Gpu::rope(self, x, positions, head_dim, inv_freq, scale)
    }

    fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        spec: &AttentionSpec,
        queries: &[Range<usize>],
        keys: &[Range<usize>],
    ) -> GpuTensor {
        Gpu::attention(self, q, k, v, spec, queries, keys)
    }

    fn write_rows(&self, dst: &mut GpuTensor, rows: &[u32], src: &GpuTensor) {
        Gpu::write_rows(self, dst, rows, src)
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
        assert_eq!((ar.len(), a.cols), (br.len(), b.cols), "mix_rows: the two row ranges differ in shape");
        assert!(ar.end <= a.rows && br.end <= b.rows, "mix_rows: a row range leaves its tensor");
        let out = self.alloc(ar.len(), a.cols);
        let n = ar.len() * a.cols;
        self.elementwise(Elementwise::Set, &out.buf, Some(&b.buf), n, 0, br.start * b.cols, a.cols, wb);
        self.elementwise(Elementwise::Add, &out.buf, Some(&a.buf), n, 0, ar.start * a.cols, a.cols, wa);
        out
    }
}

impl Statistics for Gpu {
    type Scalar = GpuScalar;

    type Gram = GpuGram;

    fn defer_gram(&self, x: &GpuTensor, xr: Range<usize>, y: &GpuTensor, yr: Range<usize>) -> GpuGram {
        self.gram(x, xr, y, yr)
    }

    fn add_gram(&self, acc: &mut GpuGram, x: &GpuTensor, xr: Range<usize>, y: &GpuTensor, yr: Range<usize>) {
        self.gram_add(acc, x, xr, y, yr)
    }

    /// A scalar is its partial sums: more partials.
    fn add_scalar(&self, acc: &mut GpuScalar, more: GpuScalar) {
        acc.0.extend(more.0);
    }

    fn defer_sq_norm(&self, x: &GpuTensor, rows: Range<usize>) -> GpuScalar {
        let parts = x
            .row_blocks()
            .into_iter()
            .filter_map(|(r0, r1, buf)| {
                let (a, b) = (rows.start.max(r0), rows.end.min(r1));
                (a < b).then(|| self.reduce(Reduction::SqNorm, buf, x.dtype, (a - r0) * x.cols, None, (b - a) * x.cols))
            })
            .collect();
        GpuScalar(parts)
    }

    fn defer_sq_dist(&self, a: &GpuTensor, b: &GpuTensor) -> GpuScalar {
        GpuScalar(vec![self.reduce_pair(Reduction::SqDist, a, b)])
    }

    fn defer_dot(&self, a: &GpuTensor, b: &GpuTensor) -> GpuScalar {
        GpuScalar(vec![self.reduce_pair(Reduction::Dot, a, b)])
    }
}

impl Factors for Gpu {
    type Factor = GpuFactor;

    fn defer_factor(&self, system: &SystemSpec<&GpuScalar, &GpuGram>) -> Option<GpuFactor> {
        let m = self.assemble_system(system)?;
        let status = self.factor_in_place(&m.buf, m.rows);
        Some(GpuFactor { l: m, status })
    }

    async fn fetch(&self, reads: Reads<Gpu>) -> Result<Values> {
        self.read_batch(reads).await
    }

    /// Factors of matrices the host already has: upload, factor, read back together.
    async fn cholesky_f32_many(&self, ms: &[&Mat64]) -> Result<Vec<Option<Mat64>>> {
        let mut reads = Reads::new();
        let ids: Vec<_> = ms
            .iter()
            .map(|m| {
                let n = m.rows;
                (m.cols == n && self.fits_square(n)).then(|| {
                    let l = self.upload(&Mat::new(n, n, m.data.iter().map(|&v| v as f32).collect()));
                    let status = self.factor_in_place(&l.buf, n);
                    reads.factor(GpuFactor { l, status })
                })
            })
            .collect();
        let mut values = self.fetch(reads).await?;
        Ok(ids.into_iter().map(|id| id.and_then(|id| values.take_factor(id))).collect())
    }

    fn offers_cholesky_f32(&self) -> bool {
        true
    }
}

/// The backward ops (refinement's gradients), each routed to its kernel.
impl Backward for Gpu {
    fn matmul(&self, dy: &GpuTensor, w: &GpuTensor) -> GpuTensor {
        self.times(dy, w)
    }

    fn add_matmul_tn(&self, acc: &mut GpuTensor, x: &GpuTensor, y: &GpuTensor) {
        self.add_transposed_times(acc, x, y)
    }

    fn zeros(&self, rows: usize, cols: usize) -> GpuTensor {
        let t = self.alloc(rows, cols);
        self.record(|enc| enc.clear_buffer(&t.buf, 0, None));
        t
    }

    fn concat_cols(&self, parts: &[&GpuTensor]) -> GpuTensor {
        self.join_columns(parts)
    }

    fn rms_norm_backward(&self, x: &GpuTensor, gamma: &GpuTensor, eps: f32, dy: &GpuTensor) -> GpuTensor {
        self.rms_norm_gradient(x, gamma, eps, dy)
    }

    fn gate_backward(
        &self,
        gate: &GpuTensor,
        act_gate: &GpuTensor,
        up: &GpuTensor,
        dz: &GpuTensor,
        act: Activation,
    ) -> (GpuTensor, GpuTensor) {
        self.gate_gradient(gate, act_gate, up, dz, act)
    }

    fn attention_backward(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        dout: &GpuTensor,
        spec: &AttentionSpec,
        seqs: &[Range<usize>],
    ) -> (GpuTensor, GpuTensor, GpuTensor) {
        self.attention_gradient(q, k, v, dout, spec, seqs)
    }
}

#[cfg(test)]
mod tests {
    use super::dispatch::{Kernel, Params};
    use super::*;

    /// (struct name, members as (name, byte offset), size in bytes) of a WGSL struct.
    fn wgsl_struct(src: &str, name: &str) -> (Vec<(String, usize)>, usize) {
        let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no struct {name}"));
        match &ty.inner {
            naga::TypeInner::Struct { members, span } => (
                members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize)).collect(),
                *span as usize,
            ),
            other => panic!("{name} is {other:?}"),
        }
    }

    fn check<P: Params>(kernel: &Kernel, subs: &[(&str, String)], name: &str) {
        let (members, span) = wgsl_struct(&kernel.source(subs), name);
        let fields: Vec<(String, usize)> = P::FIELDS.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(fields, members, "{}: {name} differs between Rust and WGSL", kernel.name);
        assert_eq!(std::mem::size_of::<P>(), span, "{}: {name} sizes differ", kernel.name);
    }

    /// Every kernel's parameter struct has the layout of its shader's `struct Params`, field by
    /// field (a reordered or missing field would pass values to the wrong members silently).
    #[test]
    fn params_match_the_shaders() {
        use crate::backend::WeightDtype::*;
        for dtype in [F32, F16, Bf16] {
            for with_lo in [false, true] {
                let g = matmul::Geometry { b_dtype: dtype, ..matmul::Geometry::new(600, 8, 600, (0, 8, 1), (0, 1, 8)) };
                check::<matmul::MatmulParams>(&matmul::MATMUL, &g.subs(with_lo), "Params");
            }
            for r in [reduce::Reduction::SqNorm, reduce::Reduction::SqDist, reduce::Reduction::Dot] {
                check::<reduce::ReduceParams>(&reduce::REDUCE, &r.subs(dtype), "Params");
            }
            check::<select_rows::SelectRowsParams>(&select_rows::SELECT_ROWS, &select_rows::subs(dtype), "Params");
        }
        let ops = [elementwise::Elementwise::Add, elementwise::Elementwise::Set, elementwise::Elementwise::Bias]
            .into_iter()
            .chain([elementwise::Elementwise::Scale, elementwise::Elementwise::Mul])
            .chain(
                [Activation::GeluErf, Activation::GeluTanh, Activation::Silu, Activation::Relu, Activation::Tanh]
                    .map(elementwise::Elementwise::Activate),
            );
        for op in ops {
            check::<elementwise::ElementwiseParams>(&elementwise::ELEMENTWISE, &op.subs(), "Params");
        }
        for rms in [false, true] {
            check::<norm::NormParams>(&norm::NORM, &norm::subs(rms), "Params");
        }
        check::<rope::RopeParams>(&rope::ROPE, &[], "Params");
        check::<attention::AttentionParams>(&attention::ATTENTION, &[], "Params");
        for place in [false, true] {
            check::<slice_cols::SliceColsParams>(&slice_cols::SLICE_COLS, &slice_cols::subs(place), "Params");
        }
        check::<norm_backward::NormBackwardParams>(&norm_backward::NORM_BACKWARD, &[], "Params");
        for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu, Activation::Relu, Activation::Tanh] {
            check::<gate_backward::GateBackwardParams>(
                &gate_backward::GATE_BACKWARD,
                &gate_backward::subs(act),
                "Params",
            );
        }
        for kv in [false, true] {
            let subs = attention_backward::subs(64, kv);
            check::<attention_backward::AttentionBackwardParams>(
                &attention_backward::ATTENTION_BACKWARD,
                &subs,
                "Params",
            );
        }
        check::<write_rows::WriteRowsParams>(&write_rows::WRITE_ROWS, &[], "Params");
        check::<cholesky::CholeskyParams>(&cholesky::CHOLESKY_BLOCK, &[], "Params");
        check::<cholesky::CholeskyParams>(&cholesky::CHOLESKY_PANEL, &[], "Params");
        check::<system::SystemScalarsParams>(&system::SYSTEM_SCALARS, &[], "Params");
        check::<system::Segment>(&system::SYSTEM_SCALARS, &[], "Segment");
        check::<system::SystemAssembleParams>(&system::SYSTEM_ASSEMBLE, &[], "Params");
    }
}
