//! The CPU backend: the reference every GPU kernel is tested against, and the fallback where no GPU
//! is available. Matrix products are `gemm.rs` (faer natively; on wasm32 `packed.rs`, packed panels and a
//! SIMD128 microkernel);
//! elementwise math is `vector.rs` (vectorized, dispatched on the CPU's instruction set). Every
//! op runs in parallel with rayon: natively, and in the page's threaded build on a pool of Web
//! Workers (feature `threads`, `wasm::init_thread_pool`); the page's single-thread build runs them
//! in order.

mod backward;
pub(crate) mod gemm;
// Natively only its tests run it (faer multiplies there).
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod packed;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod rowdot;
mod vector;

use super::{Activation, AttentionSpec, Factors, Forward, Reads, Statistics, Transfer, Values};
use crate::error::Result;
use crate::mat::{Mat, Mat64, StoredMat};
use crate::profile::{mul_adds, span};
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
        data.par_chunks_mut(cols).enumerate().for_each(|(i, r)| clean(|| f(i, r)));
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    data.chunks_mut(cols).enumerate().for_each(|(i, r)| f(i, r));
}

/// Query rows per block of attention scores.
const ATTENTION_BLOCK: usize = 32;

/// What `attention` multiplies and adds: each block of queries against the keys it sees.
fn attention_flops(spec: &AttentionSpec, queries: &[Range<usize>], keys: &[Range<usize>]) -> f64 {
    let blocks = queries.iter().zip(keys).flat_map(|(s, ks)| {
        let (t, off) = (s.len(), ks.len().saturating_sub(s.len()));
        (0..t).step_by(ATTENTION_BLOCK).map(move |i0| {
            let i1 = (i0 + ATTENTION_BLOCK).min(t);
            let lo = spec.window.map_or(0, |w| (off + i0 + 1).saturating_sub(w));
            let hi = if spec.causal { off + i1 } else { ks.len() };
            ((i1 - i0) * (hi - lo)) as f64
        })
    });
    2.0 * mul_adds(&[spec.heads, spec.head_dim]) * blocks.sum::<f64>()
}

/// `f(item)` for every item, in parallel where threads exist.
fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync + Send) {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    {
        use rayon::prelude::*;
        items.into_par_iter().for_each(|t| clean(|| f(t)));
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    items.into_iter().for_each(f);
}

/// `f()` on a thread whose vector registers' upper halves are clear (`gemm::clear_upper`): every
/// task of the helpers below runs on a rayon worker that may have just run one of faer's kernels.
#[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
#[inline(always)]
fn clean<R>(f: impl FnOnce() -> R) -> R {
    gemm::clear_upper();
    f()
}

/// [f(0), …, f(n − 1)], computed in parallel where threads exist (the host's work on what the
/// backends return: evaluation's per-row sums over a vocabulary).
pub fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    {
        use rayon::prelude::*;
        (0..n).into_par_iter().map(|i| clean(|| f(i))).collect()
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    (0..n).map(f).collect()
}

/// Σ f(chunk) over fixed chunks of `n` items, in parallel where threads exist, summed in chunk
/// order: the same bits on every run and every thread count.
fn sum_chunks(n: usize, f: impl Fn(Range<usize>) -> f64 + Sync + Send) -> f64 {
    sum_chunks_of(n, 1 << 16, f)
}

/// `sum_chunks` over chunks of `chunk` items.
fn sum_chunks_of(n: usize, chunk: usize, f: impl Fn(Range<usize>) -> f64 + Sync + Send) -> f64 {
    let chunks: Vec<Range<usize>> = (0..n).step_by(chunk.max(1)).map(|s| s..(s + chunk).min(n)).collect();
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    let parts: Vec<f64> = {
        use rayon::prelude::*;
        chunks.into_par_iter().map(|c| clean(|| f(c))).collect()
    };
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    let parts: Vec<f64> = chunks.into_iter().map(f).collect();
    parts.iter().sum()
}

/// A (rows, cols) tensor whose row i is written by `f(i, row)` (from zeros), in parallel where
/// threads exist.
fn rows_from(rows: usize, cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Mat {
    let mut data = uninit(rows * cols);
    if cols > 0 {
        let rows = &mut data.spare_capacity_mut()[..rows * cols];
        #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
        {
            use rayon::prelude::*;
            rows.par_chunks_mut(cols).enumerate().for_each(|(i, r)| clean(|| f(i, zeroed(r))));
        }
        #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
        rows.chunks_mut(cols).enumerate().for_each(|(i, r)| f(i, zeroed(r)));
    }
    // SAFETY: every element was written by `zeroed`.
    unsafe { data.set_len(rows * cols) };
    Mat::new(rows, cols, data)
}

/// An empty vector with capacity n, on huge pages where large: filled through its spare capacity
/// by `zeroed` blocks. A whole tensor zeroed by one thread before parallel rows write it cost a
/// memory pass on one core (norms and row copies kept 1.4 of 2 cores busy); each block is zeroed
/// by the thread that writes it next, while it is in cache.
fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    gemm::huge_pages(&mut v);
    v
}

/// A block of spare capacity, zeroed, as the initialised slice it now is.
fn zeroed(block: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    block.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every element was just initialised; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(block as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

impl Transfer for Cpu {
    type T = Mat;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn upload(&self, m: &Mat) -> Mat {
        m.clone()
    }

    async fn download(&self, t: &Mat) -> Result<Mat> {
        Ok(t.to_f32())
    }

    async fn into_host(&self, t: Mat) -> Result<Mat> {
        Ok(if t.half.is_some() { t.to_f32() } else { t })
    }

    /// Half-precision weights stay in their bits (`Mat::packed`); the products convert panels.
    fn upload_weight(&self, w: StoredMat) -> Mat {
        Mat::packed(w)
    }

    fn keeps_file_precision(&self) -> bool {
        true
    }

    fn dims(&self, t: &Mat) -> (usize, usize) {
        (t.rows, t.cols)
    }
}

impl Forward for Cpu {
    fn select_rows(&self, x: &Mat, idx: &[u32]) -> Mat {
        let _p = span("copy rows", 0.0);
        assert!(idx.iter().all(|&i| (i as usize) < x.rows), "select_rows: an index past {} rows", x.rows);
        match &x.half {
            Some(h) => rows_from(idx.len(), x.cols, |r, out| h.row_into(idx[r] as usize, out)),
            None => rows_from(idx.len(), x.cols, |r, out| out.copy_from_slice(x.row(idx[r] as usize))),
        }
    }

    fn slice_cols(&self, x: &Mat, cols: Range<usize>) -> Mat {
        let _p = span("copy rows", 0.0);
        assert!(cols.end <= x.cols, "slice_cols: columns {cols:?} of {}", x.cols);
        rows_from(x.rows, cols.len(), |r, out| out.copy_from_slice(&x.row(r)[cols.clone()]))
    }

    fn matmul_t(&self, x: &Mat, rows: Range<usize>, w: &Mat) -> Mat {
        assert_eq!(x.cols, w.cols, "matmul_t: x has {} columns, w has {}", x.cols, w.cols);
        // Products of a few rows (decoding, one token per sequence) apart: they run other kernels.
        let phase = if rows.len() < 16 { "matmul (<16 rows)" } else { "matmul" };
        let _p = span(phase, mul_adds(&[rows.len(), w.rows, w.cols]));
        let n = rows.len();
        let a = View::rows(x.rows_data(rows.clone()), n, x.cols);
        match &w.half {
            Some(h) => Mat::new(n, w.rows, gemm::product_by_panels(a, w.rows, |r| h.rows_f32(r))),
            None => Mat::new(n, w.rows, gemm::product(a, View::rows(&w.data, w.rows, w.cols).t())),
        }
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
        let _p = span("lowrank", mul_adds(&[rows.len(), b.rows, b.cols]));
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
        let groups = rows_from(x.rows * x.cols / g, g, |i, o| {
            vector::rms_norm(&x.data[i * g..(i + 1) * g], &gamma.data, eps, o)
        });
        Mat::new(x.rows, x.cols, groups.data)
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
        let _p = span("attention", attention_flops(spec, queries, keys));
        assert_eq!(q.cols, heads * hd);
        assert_eq!(k.cols, spec.kv_heads * hd, "attention: k's shape");
        assert_eq!((v.rows, v.cols), (k.rows, k.cols), "attention: v's shape");
        assert_eq!(queries.len(), keys.len(), "attention: one key span per sequence");
        assert!(queries.last().map_or(q.rows == 0, |s| s.end == q.rows), "attention: sequences must cover the rows");
        assert!(
            queries.iter().zip(keys).all(|(qs, ks)| ks.end <= k.rows && ks.len() >= qs.len()),
            "attention: a sequence's keys must lie in k and be at least its queries"
        );
        let mut out = uninit(q.rows * q.cols);
        // Split the output by sequence so each sequence is computed independently (in parallel).
        type Block<'a> = (Range<usize>, Range<usize>, &'a mut [std::mem::MaybeUninit<f32>]);
        let mut chunks: Vec<Block> = Vec::with_capacity(queries.len());
        let mut rest = &mut out.spare_capacity_mut()[..q.rows * q.cols];
        let mut at = 0;
        for (s, ks) in queries.iter().zip(keys) {
            assert_eq!(s.start, at, "attention: sequences must tile the rows in order");
            let (head, tail) = rest.split_at_mut(s.len() * q.cols);
            chunks.push((s.clone(), ks.clone(), head));
            rest = tail;
            at = s.end;
        }
        // Many sequences: each runs its products on one thread, the sequences in parallel.
        #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
        let parallel = chunks.len() < rayon::current_num_threads();
        #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
        let parallel = false;
        let one = |(s, ks, o): Block| {
            let o = zeroed(o);
            let (t, tk) = (s.len(), ks.len());
            // Query i sits at key position off + i; it sees keys lo(i)..hi(i): none after it
            // where causal, none `window` or more before it.
            let off = tk - t;
            let lo = |i: usize| spec.window.map_or(0, |w| (off + i + 1).saturating_sub(w));
            let hi = |i: usize| if spec.causal { off + i + 1 } else { tk };
            let mut scores = vec![0.0f32; ATTENTION_BLOCK.min(t) * tk];
            let mut ctx = vec![0.0f32; ATTENTION_BLOCK.min(t) * hd];
            for h in 0..heads {
                let kh = h / group;
                // Blocks of queries, each against the keys its rows see (a causal sequence's
                // blocks skip the keys after them: 5/8 of the square for 4 blocks).
                for i0 in (0..t).step_by(ATTENTION_BLOCK) {
                    let i1 = (i0 + ATTENTION_BLOCK).min(t);
                    let (bt, klo, khi) = (i1 - i0, lo(i0), hi(i1 - 1));
                    let bk = khi - klo;
                    let qs = &q.data[(s.start + i0) * q.cols + h * hd..];
                    let kd = &k.data[(ks.start + klo) * k.cols + kh * hd..];
                    let vd = &v.data[(ks.start + klo) * v.cols + kh * hd..];
                    // scores = Q_h · K_hᵀ, strided views straight into the projections.
                    let qv = View { data: qs, rows: bt, cols: hd, rs: q.cols as isize, cs: 1 };
                    let kv = View { data: kd, rows: hd, cols: bk, rs: 1, cs: k.cols as isize };
                    let sc = &mut scores[..bt * bk];
                    gemm::matmul_par(sc, qv, kv, false, parallel);
                    for i in i0..i1 {
                        let row = &mut sc[(i - i0) * bk..(i - i0 + 1) * bk];
                        let (l, h) = (lo(i) - klo, hi(i) - klo);
                        row[..l].fill(0.0);
                        row[h..].fill(0.0);
                        let seen = &mut row[l..h];
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
                    let vv = View { data: vd, rows: bk, cols: hd, rs: v.cols as isize, cs: 1 };
                    gemm::matmul_par(&mut ctx[..bt * hd], View::rows(sc, bt, bk), vv, false, parallel);
                    for i in 0..bt {
                        let at = (i0 + i) * q.cols + h * hd;
                        o[at..at + hd].copy_from_slice(&ctx[i * hd..(i + 1) * hd]);
                    }
                }
            }
        };
        for_each(chunks, one);
        // SAFETY: the sequences tile the rows (asserted), and `one` initialised each one's block.
        unsafe { out.set_len(q.rows * q.cols) };
        Mat::new(q.rows, q.cols, out)
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
}

impl Statistics for Cpu {
    // Computed when deferred: a pending value is its value.
    type Scalar = f64;

    type Gram = Mat64;

    fn defer_gram(&self, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) -> Mat64 {
        let mut c = Mat64::zeros(x.cols, y.cols);
        self.add_gram(&mut c, x, xr, y, yr);
        c
    }

    /// In f64 (`gemm::gram_into`); a symmetric product (the same rows of one tensor twice)
    /// computes half.
    fn add_gram(&self, acc: &mut Mat64, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) {
        assert_eq!(xr.len(), yr.len(), "gram: row ranges of different lengths");
        assert_eq!((acc.rows, acc.cols), (x.cols, y.cols), "gram: accumulator of another shape");
        let same = std::ptr::eq(x, y) && xr == yr;
        let flops = mul_adds(&[xr.len(), x.cols, y.cols]) / if same { 2.0 } else { 1.0 };
        // Named apart: the statistics' squares, and the alignment errors' r-column Grams.
        let phase = match (same, x.cols.min(y.cols) <= 64) {
            (_, true) => "gram (narrow)",
            (true, false) => "gram (sym)",
            (false, false) => "gram",
        };
        let _p = span(phase, flops);
        let (xs, ys) = (x.rows_data(xr.clone()), y.rows_data(yr.clone()));
        gemm::gram_into(acc, xs, ys, xr.len(), same);
    }

    fn defer_projected_gram(&self, a: &Mat, s: f32, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) -> Mat64 {
        let mut c = Mat64::zeros(a.rows, y.cols);
        self.add_projected_gram(&mut c, a, s, x, xr, y, yr);
        c
    }

    /// In f64, the factor s · a · xᵀ too (`gemm::projected_gram_into`).
    #[allow(clippy::too_many_arguments)]
    fn add_projected_gram(
        &self,
        acc: &mut Mat64,
        a: &Mat,
        s: f32,
        x: &Mat,
        xr: Range<usize>,
        y: &Mat,
        yr: Range<usize>,
    ) {
        assert_eq!(xr.len(), yr.len(), "gram: row ranges of different lengths");
        assert_eq!(a.cols, x.cols, "projected gram: a factor of another width");
        assert_eq!((acc.rows, acc.cols), (a.rows, y.cols), "gram: accumulator of another shape");
        let _p = span("gram (narrow)", mul_adds(&[xr.len(), a.rows, x.cols + y.cols]));
        let (xs, ys) = (x.rows_data(xr.clone()), y.rows_data(yr.clone()));
        gemm::projected_gram_into(acc, &a.data, s as f64, xs, ys, xr.len());
    }

    fn defer_gram_for_norm(&self, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) -> Mat64 {
        let mut c = Mat64::zeros(x.cols, y.cols);
        self.add_gram_for_norm(&mut c, x, xr, y, yr);
        c
    }

    /// An f32 product (3× the f64 one's speed), summed into the f64 accumulator.
    fn add_gram_for_norm(&self, acc: &mut Mat64, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) {
        assert_eq!(xr.len(), yr.len(), "gram: row ranges of different lengths");
        assert_eq!((acc.rows, acc.cols), (x.cols, y.cols), "gram: accumulator of another shape");
        let _p = span("gram (norm)", mul_adds(&[xr.len(), x.cols, y.cols]));
        let (xs, ys) = (x.rows_data(xr.clone()), y.rows_data(yr.clone()));
        let c = gemm::product(View::rows(xs, xr.len(), x.cols).t(), View::rows(ys, yr.len(), y.cols));
        acc.data.iter_mut().zip(c).for_each(|(a, c)| *a += c as f64);
    }

    fn add_scalar(&self, acc: &mut f64, more: f64) {
        *acc += more;
    }

    fn defer_sq_norm(&self, x: &Mat, rows: Range<usize>) -> f64 {
        let _p = span("reductions", 0.0);
        let sq = |v: &[f32]| v.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        if let Some(h) = &x.half {
            // A packed weight: chunks of its rows converted as the sum reaches them.
            let per = (1usize << 16).div_ceil(x.cols.max(1));
            return sum_chunks_of(rows.len(), per, |c| sq(&h.rows_f32(rows.start + c.start..rows.start + c.end)));
        }
        let v = x.rows_data(rows);
        sum_chunks(v.len(), |c| sq(&v[c]))
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
}

impl Factors for Cpu {
    /// The CPU solves in f64 directly and offers no factors.
    type Factor = std::convert::Infallible;

    /// Everything was computed when deferred.
    async fn fetch(&self, reads: Reads<Cpu>) -> Result<Values> {
        Ok(Values { scalars: reads.scalars, grams: reads.grams, factors: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention in f64, one score at a time.
    fn naive(
        q: &Mat,
        k: &Mat,
        v: &Mat,
        spec: &AttentionSpec,
        queries: &[Range<usize>],
        keys: &[Range<usize>],
    ) -> Vec<f64> {
        let (hd, group) = (spec.head_dim, spec.heads / spec.kv_heads);
        let mut out = vec![0.0f64; q.rows * q.cols];
        for (s, ks) in queries.iter().zip(keys) {
            let off = ks.len() - s.len();
            for i in 0..s.len() {
                for h in 0..spec.heads {
                    let kh = h / group;
                    let at = off + i;
                    let seen: Vec<usize> = (0..ks.len())
                        .filter(|&j| (!spec.causal || j <= at) && spec.window.is_none_or(|w| at < j + w))
                        .collect();
                    let scores: Vec<f64> = seen
                        .iter()
                        .map(|&j| {
                            let dot: f64 = (0..hd)
                                .map(|d| {
                                    q.data[(s.start + i) * q.cols + h * hd + d] as f64
                                        * k.data[(ks.start + j) * k.cols + kh * hd + d] as f64
                                })
                                .sum();
                            let sc = dot * spec.scale as f64;
                            spec.softcap.map_or(sc, |c| c as f64 * (sc / c as f64).tanh())
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for d in 0..hd {
                        out[(s.start + i) * q.cols + h * hd + d] = seen
                            .iter()
                            .zip(&w)
                            .map(|(&j, w)| w / sum * v.data[(ks.start + j) * v.cols + kh * hd + d] as f64)
                            .sum();
                    }
                }
            }
        }
        out
    }

    /// A half-precision weight kept packed reads as its f32 conversion in every op that takes
    /// weights: products by panels (more rows than one panel, and not a multiple of it), row
    /// lookup, the squared norm, download.
    #[test]
    fn packed_half_weights_read_as_their_f32_conversion() {
        use crate::mat::{Stored, StoredMat};
        // 4096 columns: panels of 256 rows, so 300 rows are two panels.
        let (out, inp, n) = (300, 4096, 7);
        let vals: Vec<f32> = (0..out * inp).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let x = Mat::new(n, inp, (0..n * inp).map(|i| ((i * 13 % 29) as f32 - 14.0) / 16.0).collect());
        for data in [
            Stored::F16(vals.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect()),
            Stored::Bf16(vals.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect()),
        ] {
            let stored = StoredMat { rows: out, cols: inp, data };
            let (packed, full) = (Cpu.upload_weight(stored.clone()), stored.to_mat());
            assert!(packed.half.is_some() && packed.data.is_empty(), "no f32 copy of a half weight");
            let (a, b) = (Cpu.matmul_t(&x, 1..n, &packed), Cpu.matmul_t(&x, 1..n, &full));
            assert_eq!(a.shape(), b.shape());
            assert!(crate::mat::rel_err(&a.data, &b.data) < 1e-6, "panel products");
            let idx = [299, 0, 256, 17];
            assert_eq!(Cpu.select_rows(&packed, &idx), Cpu.select_rows(&full, &idx));
            let (sa, sb) = (Cpu.defer_sq_norm(&packed, 3..290), Cpu.defer_sq_norm(&full, 3..290));
            assert!((sa - sb).abs() <= 1e-12 * sb, "squared norm {sa} vs {sb}");
            assert_eq!(pollster::block_on(Cpu.download(&packed)).unwrap(), full);
        }
    }

    /// The blocked attention (causal blocks skip the keys after them) against the definition:
    /// sequences longer and shorter than a block, cached keys before the queries, grouped heads,
    /// windows, soft-capping.
    #[test]
    fn blocked_attention_matches_the_definition() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        };
        let (heads, kv_heads, hd) = (4, 2, 16);
        // Query lengths 77, 5 and 130 (not multiples of the block); the second and third sequence
        // with 3 and 40 cached keys before their queries.
        let lens = [(77, 0), (5, 3), (130, 40)];
        let (mut queries, mut keys, mut qa, mut ka) = (Vec::new(), Vec::new(), 0, 0);
        for (t, cached) in lens {
            queries.push(qa..qa + t);
            keys.push(ka..ka + cached + t);
            qa += t;
            ka += cached + t;
        }
        let q = Mat::new(qa, heads * hd, rand(qa * heads * hd));
        let k = Mat::new(ka, kv_heads * hd, rand(ka * kv_heads * hd));
        let v = Mat::new(ka, kv_heads * hd, rand(ka * kv_heads * hd));
        for (causal, window, softcap) in [
            (true, None, None),
            (false, None, None),
            (true, Some(45), None),
            (true, Some(7), Some(0.5)),
            (false, None, Some(2.0)),
        ] {
            let spec = AttentionSpec { heads, kv_heads, head_dim: hd, causal, window, scale: 1.3, softcap };
            let got = Cpu.attention(&q, &k, &v, &spec, &queries, &keys);
            let want = naive(&q, &k, &v, &spec, &queries, &keys);
            let err = got.data.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(err < 1e-5, "causal {causal} window {window:?} softcap {softcap:?}: off by {err:.2e}");
        }
    }
}
