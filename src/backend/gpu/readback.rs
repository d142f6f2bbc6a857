//! Values pending on the device, and the readback that brings them (and whole tensors) to the host:
//! one staging buffer, one submission, one map per batch.

use super::{Gpu, GpuTensor};
use crate::backend::{Reads, Values, WeightDtype};
use crate::error::{Error, Result};
use crate::mat::{Mat, Mat64};

/// A scalar as per-workgroup partial sums, (hi, lo) pairs in each (1, 2·groups) tensor: the
/// value is their sum, taken in f64 on the host.
pub struct GpuScalar(pub(super) Vec<GpuTensor>);

/// A matrix as (hi, lo) f32 pairs accumulated in twice f32 precision (the value is hi + lo), or
/// an f32 matrix alone (`lo` None).
pub struct GpuGram {
    pub(super) hi: GpuTensor,
    pub(super) lo: Option<GpuTensor>,
}

/// A Cholesky factor (n, n) in the lower triangle of `l`; `status` (1 word) is 0 when every pivot
/// was positive.
pub struct GpuFactor {
    pub(super) l: GpuTensor,
    pub(super) status: GpuTensor,
}

impl Gpu {
    /// How many times the host has waited for GPU results so far.
    pub fn readbacks(&self) -> usize {
        self.readbacks.get()
    }

    /// Every value of a batch, in one readback.
    pub(super) async fn read_batch(&self, reads: Reads<Gpu>) -> Result<Values> {
        let Reads { scalars, grams, factors } = reads;
        let mut regions: Vec<(&wgpu::Buffer, usize)> = Vec::new();
        for s in &scalars {
            regions.extend(s.0.iter().map(|t| (&t.buf, t.cols)));
        }
        // A Gram wider than one binding comes in row blocks: each is a region.
        for g in &grams {
            for t in std::iter::once(&g.hi).chain(&g.lo) {
                regions.extend(t.row_blocks().into_iter().map(|(r0, r1, b)| (b, (r1 - r0) * t.cols)));
            }
        }
        for f in &factors {
            regions.push((&f.status.buf, 1));
            regions.push((&f.l.buf, f.l.rows * f.l.cols));
        }
        let mut at = self.read_many(&regions).await?.into_iter();
        let mut next = || at.next().expect("one region per buffer");
        let scalars =
            scalars.iter().map(|s| s.0.iter().map(|_| next().iter().map(|&v| v as f64).sum::<f64>()).sum()).collect();
        let grams = grams
            .iter()
            .map(|g| {
                let mut whole = |t: &GpuTensor| t.row_blocks().iter().flat_map(|_| next()).collect::<Vec<f32>>();
                let hi = whole(&g.hi);
                let data = match &g.lo {
                    Some(lo) => hi.iter().zip(&whole(lo)).map(|(a, b)| *a as f64 + *b as f64).collect(),
                    None => hi.iter().map(|&a| a as f64).collect(),
                };
                Mat64::new(g.hi.rows, g.hi.cols, data)
            })
            .collect();
        let factors = factors
            .iter()
            .map(|f| {
                let (status, values) = (next(), next());
                (status[0].to_bits() == 0).then(|| lower(f.l.rows, &values))
            })
            .collect();
        Ok(Values { scalars, grams, factors })
    }

    /// A tensor, unpacking f16/bf16 weights.
    pub(super) async fn download_tensor(&self, t: &GpuTensor) -> Result<Mat> {
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

    /// Copy `n` f32 of `buf` back to the host (submits everything recorded so far).
    async fn read(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        Ok(self.read_many(&[(buf, n)]).await?.pop().unwrap_or_default())
    }

    /// Copy the first n f32 of each buffer back to the host, in one submission: the regions go to
    /// staging buffers of at most one binding each (a buffer cannot exceed the device's largest),
    /// mapped together.
    async fn read_many(&self, regions: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<f32>>> {
        let total: usize = regions.iter().map(|r| r.1).sum();
        if total == 0 {
            return Ok(regions.iter().map(|_| Vec::new()).collect());
        }
        // Consecutive regions per staging buffer (a region alone is within one binding).
        let cap = (self.max_binding / 4).max(1) as usize;
        let mut groups: Vec<(usize, usize)> = Vec::new(); // (first region, words)
        for (i, (_, n)) in regions.iter().enumerate() {
            match groups.last_mut() {
                Some((_, words)) if *words + n <= cap => *words += n,
                _ => groups.push((i, *n)),
            }
        }
        let stagings: Vec<wgpu::Buffer> = groups
            .iter()
            .map(|&(_, words)| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: (words.max(1) * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let ends: Vec<usize> = groups.iter().skip(1).map(|g| g.0).chain([regions.len()]).collect();
        self.record(|enc| {
            for ((&(first, _), &end), staging) in groups.iter().zip(&ends).zip(&stagings) {
                let mut at = 0;
                for (buf, n) in &regions[first..end] {
                    if *n > 0 {
                        enc.copy_buffer_to_buffer(buf, 0, staging, (at * 4) as u64, (*n * 4) as u64);
                    }
                    at += n;
                }
            }
        });
        self.flush();
        self.readbacks.set(self.readbacks.get() + 1);
        let receivers: Vec<_> = stagings
            .iter()
            .map(|staging| {
                let (tx, rx) = futures_channel::oneshot::channel();
                staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
                rx
            })
            .collect();
        // Natively the host drives the device; in a browser the page's event loop does, and the
        // callbacks fire while this future is suspended.
        #[cfg(not(target_arch = "wasm32"))]
        if let Err(e) = self.device.poll(wgpu::PollType::wait_indefinitely()) {
            return Err(self.failure().unwrap_or_else(|| Error::Gpu(format!("the GPU stopped responding ({e})"))));
        }
        let mut all: Vec<f32> = Vec::with_capacity(total);
        for ((rx, staging), &(_, n)) in receivers.into_iter().zip(&stagings).zip(&groups) {
            let mapped = rx.await.map_err(|_| ()).and_then(|r| r.map_err(|_| ()));
            if let Some(e) = self.failure() {
                return Err(e);
            }
            mapped.map_err(|_| Error::Gpu("the GPU refused to return results (device lost?)".into()))?;
            let slice = staging.slice(..);
            let range = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("GPU readback failed ({e})")))?;
            let words: &[f32] = bytemuck::cast_slice(&range);
            all.extend_from_slice(&words[..n]);
            drop(range);
            staging.unmap();
        }
        let mut at = 0;
        Ok(regions
            .iter()
            .map(|(_, n)| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect())
    }
}

/// The lower triangle of a row-major (n, n) f32 matrix.
fn lower(n: usize, values: &[f32]) -> Mat64 {
    let mut data = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            data[i * n + j] = values[i * n + j] as f64;
        }
    }
    Mat64::new(n, n, data)
}
