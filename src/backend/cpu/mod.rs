//! The CPU backend: the reference every GPU kernel is tested against, and the fallback where no GPU
//! is available. Matrix products are `gemm.rs` (faer natively, matrixmultiply on wasm32);
//! elementwise math is `vector.rs` (vectorized, dispatched on the CPU's instruction set). Every
//! op runs in parallel with rayon: natively, and in the page's threaded build on a pool of Web
//! Workers (feature `threads`, `wasm::init_thread_pool`); the page's single-thread build runs them
//! in order.

mod gemm;
mod vector;

use super::{Activation, AttentionSpec, Backend, Reads, Values};
use crate::error::Result;
use crate::mat::{Mat, Mat64};
use crate::profile::span;
use gemm::View;
use std::ops::Range;

#[derive(Default)]
pub struct Cpu;

/// Keep freed memory in the process for the next tensor, instead of handing it back to the
/// system. Call once, at the start of a program that merges on the CPU (the CLI, the benches).
///
/// Why: glibc serves every allocation above 32 MiB (most activations of a merge) with a fresh
/// `mmap`, which the kernel page-faults and zeroes on first touch, and returns it on free: 8–12%
/// of a GPT-2-shaped merge went to page faults and page clearing (`perf record`, then
/// `perf report --sort symbol`). With mmap off and trimming off, freed activations are reused.
/// The cost: the process keeps its peak footprint until it exits (the memory plan counts that
/// peak anyway). Can go once the backend reuses its buffers itself (a pool keyed by size).
/// No-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any large allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Run `f(row_index, row)` over the rows of `data`, in parallel where threads exist.
fn for_rows(data: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if cols == 0 {
        return;
    }
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(cols).enumerate().for_each(|(i, r)| f(i, r));
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    data.chunks_mut(cols).enumerate().for_each(|(i, r)| f(i, r));
}

/// `f(item)` for every item, in parallel where threads exist.
fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync + Send) {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    {
        use rayon::prelude::*;
        items.into_par_iter().for_each(f);
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    items.into_iter().for_each(f);
}

/// Σ f(chunk) over fixed chunks of `n` items, in parallel where threads exist, summed in chunk
/// order: the same bits on every run and every thread count.
fn sum_chunks(n: usize, f: impl Fn(Range<usize>) -> f64 + Sync + Send) -> f64 {
    const CHUNK: usize = 1 << 16;
    let chunks: Vec<Range<usize>> = (0..n).step_by(CHUNK).map(|s| s..(s + CHUNK).min(n)).collect();
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    let parts: Vec<f64> = {
        use rayon::prelude::*;
        chunks.into_par_iter().map(f).collect()
    };
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    let parts: Vec<f64> = chunks.into_iter().map(f).collect();
    parts.iter().sum()
}

/// A (rows, cols) tensor whose row i is written by `f(i, row)` (from zeros), in parallel where
/// threads exist.
fn rows_from(rows: usize, cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Mat {
    let mut out = Mat::zeros(rows, cols);
    for_rows(&mut out.data, cols, f);
    out
}

impl Backend for Cpu {
    type T = Mat;
    // Computed when deferred: a pending value is its value.
    type Scalar = f64;
    type Gram = Mat64;
    /// The CPU solves in f64 directly and offers no factors.
    type Factor = std::convert::Infallible;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn upload(&self, m: &Mat) -> Mat {
        m.clone()
    }

    async fn download(&self, t: &Mat) -> Result<Mat> {
        Ok(t.clone())
    }

    fn dims(&self, t: &Mat) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn select_rows(&self, x: &Mat, idx: &[u32]) -> Mat {
        let _p = span("copy rows", 0.0);
        assert!(idx.iter().all(|&i| (i as usize) < x.rows), "select_rows: an index past {} rows", x.rows);
        rows_from(idx.len(), x.cols, |r, out| out.copy_from_slice(x.row(idx[r] as usize)))
    }

    fn slice_cols(&self, x: &Mat, cols: Range<usize>) -> Mat {
        let _p = span("copy rows", 0.0);
        assert!(cols.end <= x.cols, "slice_cols: columns {cols:?} of {}", x.cols);
        rows_from(x.rows, cols.len(), |r, out| out.copy_from_slice(&x.row(r)[cols.clone()]))
    }

    fn matmul_t(&self, x: &Mat, rows: Range<usize>, w: &Mat) -> Mat {
        assert_eq!(x.cols, w.cols, "matmul_t: x has {} columns, w has {}", x.cols, w.cols);
        let _p = span("matmul", 2.0 * (rows.len() * w.rows * w.cols) as f64);
        let n = rows.len();
        let a = View::rows(&x.data[rows.start * x.cols..rows.end * x.cols], n, x.cols);
        Mat::new(n, w.rows, gemm::product(a, View::rows(&w.data, w.rows, w.cols).t()))
    }

    fn add_rows(&self, y: &mut Mat, rows: Range<usize>, d: &Mat, s: f32) {
        let _p = span("elementwise", 0.0);
        assert_eq!((rows.len(), y.cols), (d.rows, d.cols));
        let cols = y.cols;
        for_rows(&mut y.data[rows.start * cols..rows.end * cols], cols, |r, o| {
            o.iter_mut().zip(d.row(r)).for_each(|(o, v)| *o += s * v)
        });
    }

    /// The delta's product accumulates into y's rows directly: no (n, out) temporary.
    #[allow(clippy::too_many_arguments)]
    fn add_lowrank(&self, y: &mut Mat, rows: Range<usize>, x: &Mat, xr: Range<usize>, a: &Mat, b: &Mat, s: f32) -> Mat {
        assert_eq!((rows.len(), y.cols, a.rows), (xr.len(), b.rows, b.cols), "add_lowrank: shapes");
        let mut t = self.matmul_t(x, xr, a);
        let _p = span("lowrank", 2.0 * (rows.len() * b.rows * b.cols) as f64);
        if s != 1.0 {
            t.data.iter_mut().for_each(|v| *v *= s);
        }
        let c = &mut y.data[rows.start * y.cols..rows.end * y.cols];
        gemm::matmul(c, View::rows(&t.data, t.rows, t.cols), View::rows(&b.data, b.rows, b.cols).t(), true);
        t
    }

    fn add_bias(&self, y: &mut Mat, b: &Mat) {
        let _p = span("elementwise", 0.0);
        assert_eq!(y.cols, b.data.len());
        for_rows(&mut y.data, b.data.len(), |_, r| r.iter_mut().zip(&b.data).for_each(|(o, v)| *o += v));
    }

    fn scale(&self, x: &mut Mat, s: f32) {
        let _p = span("elementwise", 0.0);
        let cols = x.cols;
        for_rows(&mut x.data, cols, |_, r| r.iter_mut().for_each(|v| *v *= s));
    }

    fn mul(&self, y: &mut Mat, x: &Mat) {
        let _p = span("elementwise", 0.0);
        assert_eq!(y.shape(), x.shape());
        let cols = y.cols;
        for_rows(&mut y.data, cols, |i, r| r.iter_mut().zip(x.row(i)).for_each(|(o, v)| *o *= v));
    }

    fn activate(&self, x: &mut Mat, act: Activation) {
        let _p = span("activation", 0.0);
        let cols = x.cols;
        for_rows(&mut x.data, cols, |_, r| vector::activate(r, act));
    }

    fn layer_norm(&self, x: &Mat, gamma: &Mat, beta: Option<&Mat>, eps: f32) -> Mat {
        let _p = span("norm", 0.0);
        let (g, b) = (&gamma.data[..], beta.map(|b| &b.data[..]));
        assert!(
            g.len() == x.cols && b.is_none_or(|b| b.len() == x.cols),
            "layer_norm: γ and β must be one row of x's width"
        );
        rows_from(x.rows, x.cols, |i, out| vector::layer_norm(x.row(i), g, b, eps, out))
    }

    fn rms_norm(&self, x: &Mat, gamma: &Mat, eps: f32) -> Mat {
        let _p = span("norm", 0.0);
        let g = gamma.data.len();
        assert!(g > 0 && x.cols.is_multiple_of(g), "rms_norm: gamma's width {g} must divide {} columns", x.cols);
        // Each group of g columns is a row of its own (the whole row, or one head).
        let mut out = Mat::zeros(x.rows, x.cols);
        for_rows(&mut out.data, g, |i, o| vector::rms_norm(&x.data[i * g..(i + 1) * g], &gamma.data, eps, o));
        out
    }

    fn rope(&self, x: &mut Mat, positions: &[u32], head_dim: usize, inv_freq: &[f32], scale: f32) {
        let _p = span("rope", 0.0);
        let half = inv_freq.len();
        assert!(2 * half <= head_dim && x.cols.is_multiple_of(head_dim), "rope: {half} pairs in heads of {head_dim}");
        let cols = x.cols;
        for_rows(&mut x.data, cols, |t, r| {
            let p = positions[t] as f32;
            for (k, f) in inv_freq.iter().enumerate() {
                let (sin, cos) = (p * f).sin_cos();
                let (sin, cos) = (sin * scale, cos * scale);
                for h in r.chunks_mut(head_dim) {
                    let (a, b) = (h[k], h[k + half]);
                    h[k] = a * cos - b * sin;
                    h[k + half] = b * cos + a * sin;
                }
            }
        });
    }

    fn attention(
        &self,
        q: &Mat,
        k: &Mat,
        v: &Mat,
        spec: &AttentionSpec,
        queries: &[Range<usize>],
        keys: &[Range<usize>],
    ) -> Mat {
        let (hd, heads, group) = (spec.head_dim, spec.heads, spec.heads / spec.kv_heads);
        let flops: usize = queries.iter().zip(keys).map(|(q, k)| 4 * q.len() * k.len() * hd * heads).sum();
        let _p = span("attention", flops as f64);
        assert_eq!(q.cols, heads * hd);
        assert_eq!(k.cols, spec.kv_heads * hd, "attention: k's shape");
        assert_eq!((v.rows, v.cols), (k.rows, k.cols), "attention: v's shape");
        assert_eq!(queries.len(), keys.len(), "attention: one key span per sequence");
        assert!(queries.last().is_none_or(|s| s.end == q.rows), "attention: sequences must cover the rows");
        assert!(
            queries.iter().zip(keys).all(|(qs, ks)| ks.end <= k.rows && ks.len() >= qs.len()),
            "attention: a sequence's keys must lie in k and be at least its queries"
        );
        let mut out = Mat::zeros(q.rows, q.cols);
        // Split the output by sequence so each sequence is computed independently (in parallel).
        let mut chunks: Vec<(Range<usize>, Range<usize>, &mut [f32])> = Vec::with_capacity(queries.len());
        let mut rest: &mut [f32] = &mut out.data;
        let mut at = 0;
        for (s, ks) in queries.iter().zip(keys) {
            assert_eq!(s.start, at, "attention: sequences must tile the rows in order");
            let (head, tail) = rest.split_at_mut(s.len() * q.cols);
            chunks.push((s.clone(), ks.clone(), head));
            rest = tail;
            at = s.end;
        }
        let one = |(s, ks, o): (Range<usize>, Range<usize>, &mut [f32])| {
            let (t, tk) = (s.len(), ks.len());
            // Query i sits at key position off + i.
            let off = tk - t;
            let mut scores = vec![0.0f32; t * tk];
            let mut ctx = vec![0.0f32; t * hd];
            for h in 0..heads {
                let kh = h / group;
                let qs = &q.data[s.start * q.cols + h * hd..];
                let kd = &k.data[ks.start * k.cols + kh * hd..];
                let vd = &v.data[ks.start * v.cols + kh * hd..];
                // scores = Q_h · K_hᵀ, strided views straight into the projections.
                let qv = View { data: qs, rows: t, cols: hd, rs: q.cols as isize, cs: 1 };
                let kv = View { data: kd, rows: hd, cols: tk, rs: 1, cs: k.cols as isize };
                gemm::matmul(&mut scores, qv, kv, false);
                for i in 0..t {
                    let row = &mut scores[i * tk..(i + 1) * tk];
                    let at = off + i;
                    // Visible keys lo..hi: none after the query where causal, none `window` or
                    // more before it.
                    let lo = spec.window.map_or(0, |w| (at + 1).saturating_sub(w));
                    let hi = if spec.causal { at + 1 } else { tk };
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    let seen = &mut row[lo..hi];
                    match spec.softcap {
                        None => seen.iter_mut().for_each(|sc| *sc *= spec.scale),
                        Some(cap) => {
                            seen.iter_mut().for_each(|sc| *sc = *sc * spec.scale / cap);
                            vector::activate(seen, Activation::Tanh);
                            seen.iter_mut().for_each(|sc| *sc *= cap);
                        }
                    }
                    vector::softmax(seen);
                }
                let vv = View { data: vd, rows: tk, cols: hd, rs: v.cols as isize, cs: 1 };
                gemm::matmul(&mut ctx, View::rows(&scores, t, tk), vv, false);
                for i in 0..t {
                    o[i * q.cols + h * hd..i * q.cols + (h + 1) * hd].copy_from_slice(&ctx[i * hd..(i + 1) * hd]);
                }
            }
        };
        for_each(chunks, one);
        out
    }

    fn write_rows(&self, dst: &mut Mat, rows: &[u32], src: &Mat) {
        let _p = span("copy rows", 0.0);
        assert_eq!((rows.len(), src.cols), (src.rows, dst.cols), "write_rows: one index per row of a matching width");
        let c = dst.cols;
        for (r, &i) in rows.iter().enumerate() {
            let i = i as usize;
            assert!(i < dst.rows, "write_rows: row {i} of a tensor of {} rows", dst.rows);
            dst.data[i * c..(i + 1) * c].copy_from_slice(&src.data[r * c..(r + 1) * c]);
        }
    }

    fn mix_rows(&self, a: &Mat, ar: Range<usize>, wa: f32, b: &Mat, br: Range<usize>, wb: f32) -> Mat {
        let _p = span("elementwise", 0.0);
        assert_eq!((ar.len(), a.cols), (br.len(), b.cols));
        rows_from(ar.len(), a.cols, |r, o| {
            let (xa, xb) = (a.row(ar.start + r), b.row(br.start + r));
            o.iter_mut().zip(xa.iter().zip(xb)).for_each(|(o, (x, y))| *o = wa * x + wb * y)
        })
    }

    fn defer_gram(&self, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) -> Mat64 {
        let mut c = Mat64::new(x.cols, y.cols, vec![0.0; x.cols * y.cols]);
        self.add_gram(&mut c, x, xr, y, yr);
        c
    }

    /// In f32 panels summed in f64 (`gemm::gram_into`); a symmetric product (the same rows of one
    /// tensor twice) computes half.
    fn add_gram(&self, acc: &mut Mat64, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) {
        assert_eq!(xr.len(), yr.len(), "gram: row ranges of different lengths");
        assert_eq!((acc.rows, acc.cols), (x.cols, y.cols), "gram: accumulator of another shape");
        let same = std::ptr::eq(x, y) && xr == yr;
        let flops = 2.0 * (xr.len() * x.cols * y.cols) as f64 / if same { 2.0 } else { 1.0 };
        // Named apart: the statistics' squares, and the alignment errors' r-column Grams.
        let phase = match (same, x.cols.min(y.cols) <= 64) {
            (_, true) => "gram (narrow)",
            (true, false) => "gram (sym)",
            (false, false) => "gram",
        };
        let _p = span(phase, flops);
        let (xs, ys) = (&x.data[xr.start * x.cols..xr.end * x.cols], &y.data[yr.start * y.cols..yr.end * y.cols]);
        gemm::gram_into(acc, xs, ys, xr.len(), same);
    }

    fn add_scalar(&self, acc: &mut f64, more: f64) {
        *acc += more;
    }

    fn defer_sq_norm(&self, x: &Mat, rows: Range<usize>) -> f64 {
        let _p = span("reductions", 0.0);
        let v = &x.data[rows.start * x.cols..rows.end * x.cols];
        sum_chunks(v.len(), |c| v[c].iter().map(|&v| (v as f64) * (v as f64)).sum())
    }

    fn defer_sq_dist(&self, a: &Mat, b: &Mat) -> f64 {
        let _p = span("reductions", 0.0);
        assert_eq!(a.shape(), b.shape());
        sum_chunks(a.data.len(), |c| {
            a.data[c.clone()].iter().zip(&b.data[c]).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum()
        })
    }

    fn defer_dot(&self, a: &Mat, b: &Mat) -> f64 {
        let _p = span("reductions", 0.0);
        assert_eq!(a.shape(), b.shape());
        sum_chunks(a.data.len(), |c| a.data[c.clone()].iter().zip(&b.data[c]).map(|(x, y)| *x as f64 * *y as f64).sum())
    }

    /// Everything was computed when deferred.
    async fn fetch(&self, reads: Reads<Cpu>) -> Result<Values> {
        Ok(Values { scalars: reads.scalars, grams: reads.grams, factors: Vec::new() })
    }
}
