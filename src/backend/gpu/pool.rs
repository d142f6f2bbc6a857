//! Tensors and the buffers behind them: a pool of dropped results for reuse, and the uploads.

use super::Gpu;
use crate::backend::WeightDtype;
use crate::error::{Error, Result};
use crate::mat::{Mat, Stored, StoredMat};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use wgpu::util::DeviceExt;

/// A (rows, cols) matrix in a GPU storage buffer, row-major: f32, or (weights only) f16/bf16
/// packed two per u32 word, low half first, and unpacked by the kernels that read weights.
pub struct GpuTensor {
    pub(super) buf: wgpu::Buffer,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) dtype: WeightDtype,
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
            for (_, b) in &self.blocks {
                pool.give(b.clone());
            }
        } else {
            pool.released = true;
        }
    }
}

impl GpuTensor {
    /// (first row, end row, buffer) of each row block.
    pub(super) fn row_blocks(&self) -> Vec<(usize, usize, &wgpu::Buffer)> {
        let starts: Vec<usize> = std::iter::once(0).chain(self.blocks.iter().map(|b| b.0)).collect();
        let bufs = std::iter::once(&self.buf).chain(self.blocks.iter().map(|b| &b.1));
        bufs.enumerate().map(|(i, b)| (starts[i], starts.get(i + 1).copied().unwrap_or(self.rows), b)).collect()
    }
}

/// Buffers of dropped results, by size, for reuse: a merge allocates the same few activation sizes
/// layer after layer. Commands run in recording order, so a reused buffer is written only after
/// every earlier recorded read of its old contents.
#[derive(Default)]
pub(super) struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
    /// A buffer was let go since the last look: the dispatch cache may be all that keeps it alive.
    pub(super) released: bool,
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

impl Gpu {
    /// A (rows, cols) f32 result buffer, or why there cannot be one.
    pub(super) fn try_alloc(&self, rows: usize, cols: usize) -> Result<GpuTensor> {
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
    pub(super) fn alloc(&self, rows: usize, cols: usize) -> GpuTensor {
        self.try_alloc(rows, cols).unwrap_or_else(|e| {
            self.fail(e.to_string());
            self.alloc_bytes(rows, cols, 4)
        })
    }

    /// A (rows, cols) f32 result split by rows into blocks of at most one binding each (a Gram
    /// matrix wider than one binding: 8192 inputs are 256 MiB). Only the kernels that run per
    /// row block (`gram`, `gram_add`) and the readback take such a tensor.
    pub(super) fn alloc_blocks(&self, rows: usize, cols: usize) -> GpuTensor {
        let block_rows = self.rows_per_binding(cols, 4);
        if block_rows >= rows {
            return self.alloc(rows, cols);
        }
        let mut bufs = (0..rows)
            .step_by(block_rows)
            .map(|r0| (r0, self.pooled_buffer((block_rows.min(rows - r0) * cols * 4) as u64)));
        let (_, buf) = bufs.next().expect("rows > block_rows > 0");
        let blocks = bufs.collect();
        GpuTensor { buf, rows, cols, dtype: WeightDtype::F32, blocks, pool: self.pool.clone(), pooled: true }
    }

    fn alloc_bytes(&self, rows: usize, cols: usize, bytes: u64) -> GpuTensor {
        let buf = self.pooled_buffer(bytes);
        GpuTensor { buf, rows, cols, dtype: WeightDtype::F32, blocks: vec![], pool: self.pool.clone(), pooled: true }
    }

    /// Rows of `cols` elements of `elem` bytes that one binding holds (at least one).
    fn rows_per_binding(&self, cols: usize, elem: usize) -> usize {
        ((self.max_binding as usize) / (cols.max(1) * elem)).max(1)
    }

    /// A result buffer of `bytes`: a dropped one of that size, or a new one.
    fn pooled_buffer(&self, bytes: u64) -> wgpu::Buffer {
        let reused = self.pool.borrow_mut().take(bytes);
        reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    /// A storage buffer holding `data` (one word where it is empty: a binding cannot be empty).
    pub(super) fn storage<T: bytemuck::Pod>(&self, data: &[T]) -> wgpu::Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let contents = if bytes.is_empty() { &[0u8; 4][..] } else { bytes };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    pub(super) fn upload_f32(&self, m: &Mat) -> GpuTensor {
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
    pub(super) fn overwrite_f32(&self, t: &mut GpuTensor, m: &Mat) {
        if (t.rows, t.cols, t.dtype) != (m.rows, m.cols, WeightDtype::F32) || m.data.is_empty() || !t.blocks.is_empty()
        {
            *t = self.upload_f32(m);
            return;
        }
        let staging = self.storage(&m.data);
        self.record(|enc| enc.copy_buffer_to_buffer(&staging, 0, &t.buf, 0, staging.size()));
    }

    /// A weight in `dtype`, split into row blocks of at most one binding each.
    /// A weight in its stored precision: f32 as it is, f16/bf16 bits packed two per u32 word
    /// (the kernels unpack them), split by rows into blocks that each fit one binding.
    pub(super) fn upload_packed(&self, m: &StoredMat) -> GpuTensor {
        let (dtype, elem) = match &m.data {
            Stored::F32(_) => (WeightDtype::F32, 4),
            Stored::F16(_) => (WeightDtype::F16, 2),
            Stored::Bf16(_) => (WeightDtype::Bf16, 2),
        };
        let block_rows = self.rows_per_binding(m.cols, elem);
        let n = m.rows * m.cols;
        let mut bufs = (0..m.rows.max(1)).step_by(block_rows).map(|r0| {
            let part = (r0 * m.cols).min(n)..((r0 + block_rows).min(m.rows) * m.cols);
            let buf = match &m.data {
                Stored::F32(v) => self.storage(&v[part]),
                Stored::F16(bits) | Stored::Bf16(bits) => {
                    let words: Vec<u32> =
                        bits[part].chunks(2).map(|p| p[0] as u32 | (*p.get(1).unwrap_or(&0) as u32) << 16).collect();
                    self.storage(&words)
                }
            };
            (r0, buf)
        });
        let (_, buf) = bufs.next().expect("at least one block");
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
}
