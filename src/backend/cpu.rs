//! The CPU backend: the reference every GPU kernel is tested against, and the fallback where no GPU
//! is available. Matrix products go through `matrixmultiply` (packed, SIMD); row-wise ops and
//! attention run in parallel with rayon: natively, and in the page's threaded build on a pool of
//! Web Workers (feature `threads`, `wasm::init_thread_pool`); the page's single-thread build runs
//! them in order.

use super::{Activation, AttentionSpec, Backend, Reads, Values};
use crate::error::Result;
use crate::mat::{Mat, Mat64};
use std::ops::Range;

#[derive(Default)]
pub struct Cpu;

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

/// c (m, n, row-major) from `block(first_row, rows, c_rows)` over blocks of c's rows, one per
/// thread, where the product is large enough to pay for them. Natively matrixmultiply runs its
/// own threads (std::thread, which wasm lacks): there this is one block.
fn by_row_blocks<E: Send>(
    m: usize,
    n: usize,
    flops: usize,
    c: &mut [E],
    block: impl Fn(usize, usize, &mut [E]) + Sync,
) {
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    {
        use rayon::prelude::*;
        let threads = rayon::current_num_threads();
        if threads > 1 && m >= 2 * threads && flops >= 1 << 20 {
            let per = m.div_ceil(threads);
            c[..m * n].par_chunks_mut(per * n).enumerate().for_each(|(i, cb)| block(i * per, cb.len() / n, cb));
            return;
        }
    }
    let _ = flops;
    block(0, m, &mut c[..m * n]);
}

/// c (m, n) = a · b, with a (m, k) and b (k, n) given as (slice, row stride, column stride).
/// Safe for every argument: views that do not lie inside their slices are a panic, never a read
/// out of bounds.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: isize,
    csa: isize,
    b: &[f32],
    rsb: isize,
    csb: isize,
    c: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    // The last element each view reaches, for non-negative strides.
    let last = |rows: usize, cols: usize, rs: isize, cs: isize| -> Option<usize> {
        let (rs, cs) = (usize::try_from(rs).ok()?, usize::try_from(cs).ok()?);
        (rows - 1).checked_mul(rs)?.checked_add((cols - 1).checked_mul(cs)?)
    };
    assert!(last(m, k, rsa, csa).is_some_and(|l| l < a.len()), "sgemm: a's view leaves its slice");
    assert!(last(k, n, rsb, csb).is_some_and(|l| l < b.len()), "sgemm: b's view leaves its slice");
    assert!(m.checked_mul(n).is_some_and(|l| l <= c.len()), "sgemm: c is smaller than (m, n)");
    // rsa is non-negative (asserted): a block of rows r0.. starts r0 · rsa into a.
    let rsa_rows = rsa as usize;
    by_row_blocks(m, n, m * n * k, c, |r0, rows, c| {
        // SAFETY: the asserts above keep every element of the three views inside its slice, and a
        // block's rows are rows of the whole view.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                1.0,
                a.as_ptr().add(r0 * rsa_rows),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
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
        let mut out = Vec::with_capacity(idx.len() * x.cols);
        for &i in idx {
            out.extend_from_slice(x.row(i as usize));
        }
        Mat::new(idx.len(), x.cols, out)
    }

    fn slice_cols(&self, x: &Mat, cols: Range<usize>) -> Mat {
        let mut out = Vec::with_capacity(x.rows * cols.len());
        for r in 0..x.rows {
            out.extend_from_slice(&x.row(r)[cols.clone()]);
        }
        Mat::new(x.rows, cols.len(), out)
    }

    fn matmul_t(&self, x: &Mat, rows: Range<usize>, w: &Mat) -> Mat {
        assert_eq!(x.cols, w.cols, "matmul_t: x has {} columns, w has {}", x.cols, w.cols);
        let n = rows.len();
        let mut c = vec![0.0; n * w.rows];
        let a = &x.data[rows.start * x.cols..rows.end * x.cols];
        sgemm(n, x.cols, w.rows, a, x.cols as isize, 1, &w.data, 1, w.cols as isize, &mut c);
        Mat::new(n, w.rows, c)
    }

    fn add_rows(&self, y: &mut Mat, rows: Range<usize>, d: &Mat, s: f32) {
        assert_eq!((rows.len(), y.cols), (d.rows, d.cols));
        let cols = y.cols;
        for (o, v) in y.data[rows.start * cols..rows.end * cols].iter_mut().zip(&d.data) {
            *o += s * v;
        }
    }

    fn add_bias(&self, y: &mut Mat, b: &Mat) {
        assert_eq!(y.cols, b.data.len());
        for_rows(&mut y.data, b.data.len(), |_, r| r.iter_mut().zip(&b.data).for_each(|(o, v)| *o += v));
    }

    fn scale(&self, x: &mut Mat, s: f32) {
        x.data.iter_mut().for_each(|v| *v *= s);
    }

    fn mul(&self, y: &mut Mat, x: &Mat) {
        assert_eq!(y.shape(), x.shape());
        y.data.iter_mut().zip(&x.data).for_each(|(o, v)| *o *= v);
    }

    fn activate(&self, x: &mut Mat, act: Activation) {
        let cols = x.cols;
        for_rows(&mut x.data, cols, |_, r| r.iter_mut().for_each(|v| *v = act.apply(*v)));
    }

    fn layer_norm(&self, x: &Mat, gamma: &Mat, beta: Option<&Mat>, eps: f32) -> Mat {
        let mut out = x.clone();
        let n = x.cols as f64;
        for_rows(&mut out.data, x.cols, |_, r| {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (j, v) in r.iter_mut().enumerate() {
                let y = ((*v as f64 - mean) * inv) as f32 * gamma.data[j];
                *v = y + beta.map_or(0.0, |b| b.data[j]);
            }
        });
        out
    }

    fn rms_norm(&self, x: &Mat, gamma: &Mat, eps: f32) -> Mat {
        let g = gamma.data.len();
        assert!(g > 0 && x.cols.is_multiple_of(g), "rms_norm: gamma's width {g} must divide {} columns", x.cols);
        let mut out = x.clone();
        // Each group of g columns is a row of its own (the whole row, or one head).
        for_rows(&mut out.data, g, |_, r| {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / g as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            r.iter_mut().zip(&gamma.data).for_each(|(v, g)| *v = *v * inv * g);
        });
        out
    }

    fn rope(&self, x: &mut Mat, positions: &[u32], head_dim: usize, inv_freq: &[f32], scale: f32) {
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
                sgemm(t, hd, tk, qs, q.cols as isize, 1, kd, 1, k.cols as isize, &mut scores);
                for i in 0..t {
                    let row = &mut scores[i * tk..(i + 1) * tk];
                    let at = off + i;
                    let mut max = f32::NEG_INFINITY;
                    for (j, sc) in row.iter_mut().enumerate() {
                        let visible = (!spec.causal || j <= at) && spec.window.is_none_or(|w| at < j + w || j > at);
                        *sc = match (visible, spec.softcap) {
                            (false, _) => f32::NEG_INFINITY,
                            (true, None) => *sc * spec.scale,
                            (true, Some(cap)) => cap * (*sc * spec.scale / cap).tanh(),
                        };
                        max = max.max(*sc);
                    }
                    let mut sum = 0.0;
                    for sc in row.iter_mut() {
                        *sc = if *sc == f32::NEG_INFINITY { 0.0 } else { (*sc - max).exp() };
                        sum += *sc;
                    }
                    row.iter_mut().for_each(|sc| *sc /= sum);
                }
                sgemm(t, tk, hd, &scores, tk as isize, 1, vd, v.cols as isize, 1, &mut ctx);
                for i in 0..t {
                    o[i * q.cols + h * hd..i * q.cols + (h + 1) * hd].copy_from_slice(&ctx[i * hd..(i + 1) * hd]);
                }
            }
        };
        for_each(chunks, one);
        out
    }

    fn write_rows(&self, dst: &mut Mat, rows: &[u32], src: &Mat) {
        assert_eq!((rows.len(), src.cols), (src.rows, dst.cols), "write_rows: one index per row of a matching width");
        let c = dst.cols;
        for (r, &i) in rows.iter().enumerate() {
            let i = i as usize;
            assert!(i < dst.rows, "write_rows: row {i} of a tensor of {} rows", dst.rows);
            dst.data[i * c..(i + 1) * c].copy_from_slice(&src.data[r * c..(r + 1) * c]);
        }
    }

    fn mix_rows(&self, a: &Mat, ar: Range<usize>, wa: f32, b: &Mat, br: Range<usize>, wb: f32) -> Mat {
        assert_eq!((ar.len(), a.cols), (br.len(), b.cols));
        let c = a.cols;
        let (xa, xb) = (&a.data[ar.start * c..ar.end * c], &b.data[br.start * c..br.end * c]);
        Mat::new(ar.len(), c, xa.iter().zip(xb).map(|(x, y)| wa * x + wb * y).collect())
    }

    fn defer_gram(&self, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) -> Mat64 {
        let mut c = Mat64::new(x.cols, y.cols, vec![0.0; x.cols * y.cols]);
        gram_into(&mut c, x, xr, y, yr);
        c
    }

    fn add_gram(&self, acc: &mut Mat64, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) {
        gram_into(acc, x, xr, y, yr);
    }

    fn add_scalar(&self, acc: &mut f64, more: f64) {
        *acc += more;
    }

    fn defer_sq_norm(&self, x: &Mat, rows: Range<usize>) -> f64 {
        let v = &x.data[rows.start * x.cols..rows.end * x.cols];
        v.iter().map(|&v| (v as f64) * (v as f64)).sum()
    }

    fn defer_sq_dist(&self, a: &Mat, b: &Mat) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.data.iter().zip(&b.data).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum()
    }

    fn defer_dot(&self, a: &Mat, b: &Mat) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.data.iter().zip(&b.data).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Everything was computed when deferred.
    async fn fetch(&self, reads: Reads<Cpu>) -> Result<Values> {
        Ok(Values { scalars: reads.scalars, grams: reads.grams, factors: Vec::new() })
    }
}

/// c += x[xr]ᵀ · y[yr], accumulated in f64: the CPU path is the reference.
fn gram_into(c: &mut Mat64, x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) {
    assert_eq!(xr.len(), yr.len());
    assert_eq!((c.rows, c.cols), (x.cols, y.cols), "gram: accumulator of another shape");
    let n = xr.len();
    let a: Vec<f64> = x.data[xr.start * x.cols..xr.end * x.cols].iter().map(|&v| v as f64).collect();
    let b: Vec<f64> = y.data[yr.start * y.cols..yr.end * y.cols].iter().map(|&v| v as f64).collect();
    if n == 0 || x.cols == 0 || y.cols == 0 {
        return;
    }
    // c's rows are x's columns: a block of them reads a's columns from an offset.
    by_row_blocks(x.cols, y.cols, x.cols * y.cols * n, &mut c.data, |r0, rows, cb| {
        // SAFETY: a is (n, x.cols) and b is (n, y.cols), row-major; cb is rows [r0, r0 + rows)
        // of c (x.cols, y.cols), and a's view of them is columns [r0, r0 + rows) of a.
        unsafe {
            matrixmultiply::dgemm(
                rows,
                n,
                y.cols,
                1.0,
                a[r0..].as_ptr(),
                1,
                x.cols as isize,
                b.as_ptr(),
                y.cols as isize,
                1,
                1.0,
                cb.as_mut_ptr(),
                y.cols as isize,
                1,
            );
        }
    });
}
