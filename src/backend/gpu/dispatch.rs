//! Recording work: kernels and their pipelines, the uniform parameters every kernel takes, bind
//! groups cached by what they bind, and the one open command encoder.

use super::Gpu;
use std::collections::HashMap;
use wgpu::util::DeviceExt;

/// Submit after this many recorded dispatches even without a readback, to bound the memory held
/// by buffers that are dropped on the host but still referenced by recorded commands.
const MAX_PENDING: usize = 256;

/// A shader of `shaders/`, specialised by textual substitutions (`{{NAME}}`).
pub(super) struct Kernel {
    pub name: &'static str,
    pub src: &'static str,
}

/// Shaders other kernels paste in where they ask for them (WGSL has no includes).
const EXACT: &str = include_str!("../../../shaders/common/exact.wgsl");
const PAIR_SUM: &str = include_str!("../../../shaders/common/pair_sum.wgsl");
const ERF: &str = include_str!("../../../shaders/common/erf.wgsl");

impl Kernel {
    /// The WGSL of this kernel with `subs` substituted.
    pub fn source(&self, subs: &[(&str, String)]) -> String {
        let mut code = self.src.replace("{{EXACT}}", EXACT).replace("{{PAIR_SUM}}", PAIR_SUM).replace("{{ERF}}", ERF);
        for (k, v) in subs {
            code = code.replace(&format!("{{{{{k}}}}}"), v);
        }
        code
    }
}

/// A kernel's uniform `struct Params`: plain 4-byte fields in the WGSL struct's order, so the
/// Rust struct's bytes are the uniform's. `FIELDS` (name, byte offset) is checked against the WGSL
/// struct by naga's reflection (`tests::params_match_the_shaders`).
pub(super) trait Params: bytemuck::Pod {
    #[allow(dead_code)] // read by the layout test only
    const FIELDS: &'static [(&'static str, usize)];
}

/// A `#[repr(C)]` Pod parameter struct with its `Params::FIELDS`.
macro_rules! params {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub(super) struct $name { $($(#[$fm])* pub $field: $ty),* }
        impl $crate::backend::gpu::dispatch::Params for $name {
            const FIELDS: &'static [(&'static str, usize)] =
                &[$((stringify!($field), std::mem::offset_of!($name, $field))),*];
        }
    };
}
pub(super) use params;

/// One dispatch's bindings: a pipeline, its buffers in binding order, and its parameters' bytes.
#[derive(PartialEq, Eq, Hash)]
struct DispatchKey {
    pipeline: wgpu::ComputePipeline,
    buffers: Vec<wgpu::Buffer>,
    params: Vec<u8>,
}

/// Bind groups (with their parameter buffers) by what they bind. Buffers come back from the pool in
/// the same order pass after pass, so a Jacobi pass, an evaluation pass or a generated token
/// re-records mostly the dispatches of the one before: those reuse their bind group instead of
/// creating a uniform buffer and a bind group (costly in a browser, where each is a call into
/// JavaScript). The small index tables the forward pass uploads (token ids, positions, sequence
/// spans) are kept by content for the same reason, so the dispatches that read them match too.
#[derive(Default)]
pub(super) struct BindCache {
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

/// Uniform bytes, padded to 16.
fn uniform_bytes<P: Params>(p: &P) -> Vec<u8> {
    let mut v = bytemuck::bytes_of(p).to_vec();
    while v.len() % 16 != 0 || v.is_empty() {
        v.push(0);
    }
    v
}

/// Workgroup grid for `n` threads in groups of 256: (x, y, threads per grid row).
pub(super) fn grid_1d(n: usize) -> (u32, u32, u32) {
    let groups = n.div_ceil(256).max(1);
    let x = groups.min(65535);
    let y = groups.div_ceil(x);
    (x as u32, y as u32, (x * 256) as u32)
}

impl Gpu {
    /// Bind groups created and reused so far (see `BindCache`).
    pub fn bind_groups(&self) -> (usize, usize) {
        let c = self.cache.borrow();
        (c.created, c.reused)
    }

    pub(super) fn pipeline(&self, kernel: &Kernel, subs: &[(&str, String)]) -> wgpu::ComputePipeline {
        let key = format!("{}{subs:?}", kernel.name);
        if let Some(p) = self.pipelines.borrow().get(&key) {
            return p.clone();
        }
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(kernel.name),
            source: wgpu::ShaderSource::Wgsl(kernel.source(subs).into()),
        });
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.name),
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
    pub(super) fn dispatch<P: Params>(
        &self,
        p: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        params: &P,
        groups: (u32, u32, u32),
    ) {
        self.dispatch_with(p, buffers, params, &[], groups)
    }

    /// `dispatch`, with `after` bound to n+1, n+2, … (after the parameters).
    pub(super) fn dispatch_with<P: Params>(
        &self,
        p: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        params: &P,
        after: &[&wgpu::Buffer],
        groups: (u32, u32, u32),
    ) {
        let key = DispatchKey {
            pipeline: p.clone(),
            buffers: buffers.iter().chain(after).map(|b| (*b).clone()).collect(),
            params: uniform_bytes(params),
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
                    let bg = self.bind_group(p, buffers, &key.params, after);
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
        params: &[u8],
        after: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: params,
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
    pub(super) fn table(&self, data: &[u32]) -> wgpu::Buffer {
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
    pub(super) fn record<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut enc = self.encoder.borrow_mut();
        f(enc.get_or_insert_with(|| self.device.create_command_encoder(&Default::default())))
    }

    pub(super) fn flush(&self) {
        if let Some(enc) = self.encoder.borrow_mut().take() {
            self.queue.submit([enc.finish()]);
        }
        self.pending.set(0);
    }
}

/// (element type, load expression) substituted into a kernel reading `name` in `dtype`:
/// the shader `unpack2x16float`s f16 and shifts bf16 into the high half of an f32.
pub(super) fn unpacked(name: &str, dtype: crate::backend::WeightDtype) -> (String, String) {
    use crate::backend::WeightDtype;
    match dtype {
        WeightDtype::F32 => ("f32".into(), format!("return {name}[e];")),
        WeightDtype::F16 => ("u32".into(), format!("return unpack2x16float({name}[e >> 1u])[e & 1u];")),
        WeightDtype::Bf16 => (
            "u32".into(),
            format!("let w = {name}[e >> 1u]; return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (e & 1u) == 1u));"),
        ),
    }
}
