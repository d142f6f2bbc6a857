//! The CPU backend's matrix products. Natively they run on faer's kernels (runtime-dispatched
//! AVX-512 / AVX2, threaded on rayon): 1.1–1.4× the throughput of `matrixmultiply` on this
//! project's shapes (`cargo bench --bench matmul -- cpu`). On wasm32 the f32 ones run on
//! `packed.rs` (packed panels, a SIMD128 microkernel), split by rows over the page's Web Workers
//! where the threaded build has them (faer's wasm path has no SIMD kernel).
//!
//! Gram matrices are f64 products of the f32 features (`gram_into`), the symmetric ones computed
//! by halves.

use crate::mat::Mat64;
use std::ops::Range;

/// A strided view of a (rows, cols) matrix inside a slice: element (i, j) at i·rs + j·cs.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a, T> View<'a, T> {
    /// A row-major (rows, cols) matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        View { data, rows, cols, rs: cols as isize, cs: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Panics unless every element lies inside the slice (strides are non-negative).
    fn check(&self, what: &str) {
        let last = || -> Option<usize> {
            let (rs, cs) = (usize::try_from(self.rs).ok()?, usize::try_from(self.cs).ok()?);
            (self.rows - 1).checked_mul(rs)?.checked_add((self.cols - 1).checked_mul(cs)?)
        };
        assert!(
            self.rows == 0 || self.cols == 0 || last().is_some_and(|l| l < self.data.len()),
            "gemm: {what}'s view leaves its slice"
        );
    }
}

/// a · b as a new row-major (m, n) vector, written once by the product (never zeroed first: a
/// memset of the output took 5% of a merge).
pub fn product(a: View<f32>, b: View<f32>) -> Vec<f32> {
    let (m, n) = (a.rows, b.cols);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    huge_pages(&mut c);
    #[cfg(not(target_arch = "wasm32"))]
    if m > 0 && n > 0 && a.cols > 0 {
        assert_eq!(b.rows, a.cols, "gemm: inner dimensions {} and {}", a.cols, b.rows);
        a.check("a");
        b.check("b");
        // SAFETY: the views are checked; c has capacity m·n and the product writes every element
        // of its (m, n) destination without reading it (Accum::Replace) before the length is set.
        unsafe {
            use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
            let am = MatRef::from_raw_parts(a.data.as_ptr(), m, a.cols, a.rs, a.cs);
            let bm = MatRef::from_raw_parts(b.data.as_ptr(), a.cols, n, b.rs, b.cs);
            let cm = MatMut::from_raw_parts_mut(c.as_mut_ptr(), m, n, n as isize, 1);
            matmul(cm, Accum::Replace, am, bm, 1.0f32, Par::rayon(0));
            clear_upper();
            c.set_len(m * n);
        }
        return c;
    }
    c.resize(m * n, 0.0);
    matmul(&mut c, a, b, false);
    c
}

/// a · bᵀ as a new row-major (m, n) vector, for a b (n, k) read by panels of its rows: a
/// half-precision weight, whose panels `b_rows(range)` converts to f32 as the product reaches them
/// (no f32 copy of the whole weight). Each panel's product writes its columns of the output.
pub fn product_by_panels(a: View<f32>, n: usize, b_rows: impl Fn(Range<usize>) -> Vec<f32>) -> Vec<f32> {
    let (m, k) = (a.rows, a.cols);
    // 4 MiB of f32 at a time, at least 256 rows: narrower panels cost the product 10%.
    let panel_rows = (1usize << 20).div_ceil(k.max(1)).max(256);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    huge_pages(&mut c);
    if m == 0 || n == 0 {
        return c;
    }
    if k == 0 {
        c.resize(m * n, 0.0);
        return c;
    }
    a.check("a");
    for o0 in (0..n).step_by(panel_rows) {
        let o1 = (o0 + panel_rows).min(n);
        let panel = b_rows(o0..o1);
        assert_eq!(panel.len(), (o1 - o0) * k, "gemm: a panel of b of another shape");
        let bt = View::rows(&panel, o1 - o0, k).t();
        #[cfg(not(target_arch = "wasm32"))]
        // SAFETY: c has capacity m·n; the panel's product writes its (m, o1 − o0) block at column
        // o0 with row stride n, without reading it (Accum::Replace); the panels tile the columns,
        // so every element is written before the length is set below.
        unsafe {
            use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
            let am = MatRef::from_raw_parts(a.data.as_ptr(), m, k, a.rs, a.cs);
            let bm = MatRef::from_raw_parts(bt.data.as_ptr(), k, o1 - o0, bt.rs, bt.cs);
            let cm = MatMut::from_raw_parts_mut(c.as_mut_ptr().add(o0), m, o1 - o0, n as isize, 1);
            matmul(cm, Accum::Replace, am, bm, 1.0f32, Par::rayon(0));
            clear_upper();
        }
        #[cfg(target_arch = "wasm32")]
        {
            if o0 == 0 {
                c.resize(m * n, 0.0);
            }
            let block = product(a, bt);
            for (r, row) in block.chunks(o1 - o0).enumerate() {
                c[r * n + o0..r * n + o1].copy_from_slice(row);
            }
        }
    }
    // SAFETY: every element was written above (natively; on wasm32 the length is already m·n).
    unsafe { c.set_len(m * n) };
    c
}

/// Clear the upper halves of this thread's vector registers (x86-64's `vzeroupper`, where the CPU
/// has AVX). faer's f32 and f64 kernels (hand-written AVX-512 micro-kernels) return with them
/// dirty, and while they are, every legacy-SSE instruction this thread runs pays a transition
/// penalty: Rust code built for baseline x86-64 and libm's `exp`/`sincosf` are such code. On rayon
/// workers after a product, the held-out evaluation's sums over the vocabulary ran 14× slower
/// (680 ms against 48 ms on one thread, 30 ms with this), and rope's angles 4× slower than in the
/// page. Called after every faer product on the calling thread, and at the start of every
/// parallel task of the CPU backend (`cpu::clean`). Can go when faer's kernels end with
/// `vzeroupper` (or the native build targets AVX, whose VEX encoding has no such penalty).
#[inline(always)]
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub fn clear_upper() {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx")]
        unsafe fn vzeroupper() {
            std::arch::x86_64::_mm256_zeroupper()
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (checked).
            unsafe { vzeroupper() }
        }
    }
}

/// Ask Linux for 2 MiB pages under a large vector's capacity (transparent huge pages in `madvise`
/// mode, the common default): its first touch then faults 512× fewer times. The kernel's page
/// faults and page clearing were 8% of a GPT-2-shaped merge's samples even with freed memory
/// kept (`keep_freed_memory`): the heap's first growth to its peak.
pub(super) fn huge_pages<T>(v: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = v.capacity() * std::mem::size_of::<T>();
        if bytes < 2 * HUGE {
            return;
        }
        let start = (v.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: an advice on whole pages inside the vector's own allocation; it changes no
            // contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// c (m, n, row-major, stride n) = a · b, or += where `accumulate`.
pub fn matmul(c: &mut [f32], a: View<f32>, b: View<f32>, accumulate: bool) {
    matmul_par(c, a, b, accumulate, true)
}

/// `matmul` on the calling thread alone where `!parallel` (small products inside a loop that is
/// itself parallel: attention's per-sequence heads).
pub fn matmul_par(c: &mut [f32], a: View<f32>, b: View<f32>, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions {k} and {}", b.rows);
    assert!(m.checked_mul(n).is_some_and(|l| l <= c.len()), "gemm: c is smaller than (m, n)");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    a.check("a");
    b.check("b");
    // SAFETY: the checks keep every element of a, b and c's (m, n) block inside its slice.
    unsafe { gemm_f32(m, k, n, a, b, &mut c[..m * n], accumulate, parallel) }
}

#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    k: usize,
    n: usize,
    a: View<f32>,
    b: View<f32>,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
    let a = MatRef::from_raw_parts(a.data.as_ptr(), m, k, a.rs, a.cs);
    let b = MatRef::from_raw_parts(b.data.as_ptr(), k, n, b.rs, b.cs);
    let c = MatMut::from_raw_parts_mut(c.as_mut_ptr(), m, n, n as isize, 1);
    let beta = if accumulate { Accum::Add } else { Accum::Replace };
    matmul(c, beta, a, b, 1.0f32, if parallel { Par::rayon(0) } else { Par::Seq });
    clear_upper();
}

#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    k: usize,
    n: usize,
    a: View<f32>,
    b: View<f32>,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    // Saturating: on wasm32 a 7,430-row product (6.6e9 multiply-adds) wrapped past usize.
    let flops = if parallel { m.saturating_mul(n).saturating_mul(k) } else { 0 };
    // Few rows against a weight read by rows (b = wᵀ): dot products, split over w's rows.
    if m < ROWDOT_BELOW && a.cs == 1 && b.rs == 1 && k >= 64 {
        let w = b.t();
        by_col_blocks(m, n, flops, c, accumulate, |j0, j1, cb, accumulate| {
            let part = View { data: &w.data[j0 * w.rs as usize..], rows: j1 - j0, cols: k, rs: w.rs, cs: 1 };
            // SAFETY: cb is column j0 of c's m rows of n: this block's columns j0..j1 ≤ n, written
            // by this call alone.
            unsafe { super::rowdot::gemm_nt(a, part, cb, n, accumulate) }
        });
        return;
    }
    // A block of c's rows r0.. reads a's rows from r0 · rs (non-negative, checked).
    let rs = a.rs as usize;
    by_row_blocks(m, n, flops, c, |r0, rows, cb| {
        // The caller's checks hold for the block: its rows are rows of the whole view.
        if super::packed::pays(rows, k, n) {
            let block = View { data: &a.data[r0 * rs..], rows, cols: k, rs: a.rs, cs: a.cs };
            super::packed::sgemm(block, b, cb, accumulate);
            return;
        }
        // SAFETY: the caller's checks; a block's rows are rows of the whole view.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                1.0,
                a.data.as_ptr().add(r0 * rs),
                a.rs,
                a.cs,
                b.data.as_ptr(),
                b.rs,
                b.cs,
                if accumulate { 1.0 } else { 0.0 },
                cb.as_mut_ptr(),
                n as isize,
                1,
            )
        }
    });
}

/// Products of fewer rows than this against a weight read by rows run on `rowdot.rs`. In the page
/// (`benches/page_matmul.mjs`, relaxed SIMD, 2 threads, the packed kernel forced against it in
/// one build) it took a SmolLM2 projection (576 → 1536) from 8–12 to 30–47 GFLOP/s at 20 rows and
/// from 37–47 to 62–64 at 300; at 1024 rows and more the packed kernel was 5–20% faster.
#[cfg(target_arch = "wasm32")]
const ROWDOT_BELOW: usize = 1024;

/// c (m, n) = (or += where `accumulate`) the products `block(j0, j1, c, accumulate)` of c's
/// columns j0..j1, written at `c` (row stride n), one block per Web Worker where the product is
/// large enough to pay for them (the single-thread page: one block).
#[cfg(target_arch = "wasm32")]
fn by_col_blocks(
    m: usize,
    n: usize,
    flops: usize,
    c: &mut [f32],
    accumulate: bool,
    block: impl Fn(usize, usize, *mut f32, bool) + Sync,
) {
    assert!(c.len() >= m * n);
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        let threads = rayon::current_num_threads();
        if threads > 1 && n >= 64 * threads && flops >= 1 << 20 {
            // Even widths: the kernel's tiles are two columns wide.
            let per = n.div_ceil(threads).next_multiple_of(2);
            /// c's first element, shared by the threads, each of which writes its own columns.
            #[derive(Clone, Copy)]
            struct Shared(*mut f32);
            // SAFETY: the blocks write disjoint columns of c, which outlives the parallel loop.
            unsafe impl Send for Shared {}
            unsafe impl Sync for Shared {}
            let at = Shared(c.as_mut_ptr());
            (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
                let at = at;
                let (j0, j1) = (t * per, ((t + 1) * per).min(n));
                // SAFETY: column j0 of row 0 lies in c (j0 < n ≤ c.len()).
                block(j0, j1, unsafe { at.0.add(j0) }, accumulate)
            });
            return;
        }
    }
    let _ = flops;
    block(0, n, c.as_mut_ptr(), accumulate);
}

/// c (m, n) from `block(first_row, rows, c_rows)` over blocks of c's rows, one per Web Worker,
/// where the product is large enough to pay for them (the single-thread page: one block).
#[cfg(target_arch = "wasm32")]
fn by_row_blocks<E: Send>(
    m: usize,
    n: usize,
    flops: usize,
    c: &mut [E],
    block: impl Fn(usize, usize, &mut [E]) + Sync,
) {
    #[cfg(feature = "threads")]
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

/// c += xᵀ · y with x (n, p) and y (n, q) row-major, in f64: the solve amplifies the statistics
/// rounding by up to 1/α, and f32 products are not enough (summed in f64 over panels of 256 rows
/// they put the fixtures' merges 1.75e-4 from the float64 reference at α = 1e-4, 7× the bound).
/// `same`: y is x, the product is symmetric and only its lower half is computed, then mirrored.
pub fn gram_into(c: &mut Mat64, x: &[f32], y: &[f32], n: usize, same: bool) {
    let (p, q) = (c.rows, c.cols);
    assert!(x.len() == n * p && y.len() == n * q, "gram: inputs of {n} rows do not match ({p}, {q})");
    assert!(!same || p == q, "gram: a symmetric product is square");
    if n == 0 || p == 0 || q == 0 {
        return;
    }
    // Feature-major f64 copies: faer's f64 kernels run 1.3× faster on them than on strided views.
    let x64 = transposed_f64(x, n, p);
    let xv = View::rows(&x64, p, n);
    if same {
        let mut lower = vec![0.0f64; p * p];
        lower_product_f64(&mut lower, xv, xv.t());
        for i in 0..p {
            for j in 0..i {
                let v = lower[i * p + j];
                c.data[i * p + j] += v;
                c.data[j * p + i] += v;
            }
            c.data[i * p + i] += lower[i * p + i];
        }
    } else {
        let y64 = transposed_f64(y, n, q);
        matmul_f64(&mut c.data, xv, View::rows(&y64, q, n).t());
    }
}

/// c += s · a · xᵀ · y in f64 with a (r, p), x (n, p) and y (n, q) row-major: a Gram projected
/// onto a LoRA's A (`Cross::Projected`), (s · a · xᵀ) · y at f64 precision for r·(p + q)·n
/// multiply-adds instead of the p·q·n of xᵀ · y.
pub fn projected_gram_into(c: &mut Mat64, a: &[f32], s: f64, x: &[f32], y: &[f32], n: usize) {
    let (r, q) = (c.rows, c.cols);
    let p = a.len().checked_div(r).unwrap_or(0);
    assert!(a.len() == r * p && x.len() == n * p && y.len() == n * q, "projected gram: shapes do not match");
    if n == 0 || r == 0 || q == 0 {
        return;
    }
    // Panels of rows, each on one thread with row-major f64 copies of its rows (a transposing
    // copy costs more than these products, and one product's reduction over all n rows kept
    // 1.3 cores busy), summed in panel order: the same bits for any thread count.
    const PANEL: usize = 512;
    let sa: Vec<f64> = a.iter().map(|&v| s * v as f64).collect();
    let panel = |r0: usize| -> Vec<f64> {
        let rows = PANEL.min(n - r0);
        let f64s = |m: &[f32], w: usize| -> Vec<f64> { m[r0 * w..(r0 + rows) * w].iter().map(|&v| v as f64).collect() };
        let mut u = vec![0.0f64; rows * r];
        matmul_f64_par(&mut u, View::rows(&f64s(x, p), rows, p), View::rows(&sa, r, p).t(), false);
        let mut part = vec![0.0f64; r * q];
        matmul_f64_par(&mut part, View::rows(&u, rows, r).t(), View::rows(&f64s(y, q), rows, q), false);
        part
    };
    let starts: Vec<usize> = (0..n).step_by(PANEL).collect();
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    let parts: Vec<Vec<f64>> = {
        use rayon::prelude::*;
        starts.into_par_iter().map(panel).collect()
    };
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    let parts: Vec<Vec<f64>> = starts.into_iter().map(panel).collect();
    for part in parts {
        c.data.iter_mut().zip(part).for_each(|(c, v)| *c += v);
    }
}

/// The (cols, rows) f64 transpose of a row-major (rows, cols) f32 matrix, built in parallel.
fn transposed_f64(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * cols];
    let fill = |j: usize, o: &mut [f64]| o.iter_mut().enumerate().for_each(|(r, o)| *o = x[r * cols + j] as f64);
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(rows).enumerate().for_each(|(j, o)| fill(j, o));
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    out.chunks_mut(rows).enumerate().for_each(|(j, o)| fill(j, o));
    out
}

/// c (m, n, row-major) += a · b in f64.
fn matmul_f64(c: &mut [f64], a: View<f64>, b: View<f64>) {
    matmul_f64_par(c, a, b, true)
}

/// `matmul_f64`, on the calling thread alone where `!parallel`.
fn matmul_f64_par(c: &mut [f64], a: View<f64>, b: View<f64>, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && c.len() >= m * n);
    a.check("a");
    b.check("b");
    #[cfg(not(target_arch = "wasm32"))]
    // SAFETY: checked above.
    unsafe {
        use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
        let a = MatRef::from_raw_parts(a.data.as_ptr(), m, k, a.rs, a.cs);
        let b = MatRef::from_raw_parts(b.data.as_ptr(), k, n, b.rs, b.cs);
        let c = MatMut::from_raw_parts_mut(c.as_mut_ptr(), m, n, n as isize, 1);
        matmul(c, Accum::Add, a, b, 1.0f64, if parallel { Par::rayon(0) } else { Par::Seq });
        clear_upper();
    }
    #[cfg(target_arch = "wasm32")]
    {
        let rs = a.rs as usize;
        // Saturating: on wasm32 a 7,430-row product (6.6e9 multiply-adds) wrapped past usize.
        let flops = if parallel { m.saturating_mul(n).saturating_mul(k) } else { 0 };
        by_row_blocks(m, n, flops, c, |r0, rows, cb| {
            if super::packed::pays(rows, k, n) {
                let block = View { data: &a.data[r0 * rs..], rows, cols: k, rs: a.rs, cs: a.cs };
                super::packed::gemm(block, b, cb, true);
                return;
            }
            // SAFETY: checked above; a block's rows are rows of the whole view.
            unsafe {
                matrixmultiply::dgemm(
                    rows,
                    k,
                    n,
                    1.0,
                    a.data.as_ptr().add(r0 * rs),
                    a.rs,
                    a.cs,
                    b.data.as_ptr(),
                    b.rs,
                    b.cs,
                    1.0,
                    cb.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        });
    }
}

/// The lower half (diagonal included) of c = a · b (square, f64); the upper half is left as it was.
fn lower_product_f64(c: &mut [f64], a: View<f64>, b: View<f64>) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use faer::linalg::matmul::triangular::{matmul, BlockStructure};
        use faer::{Accum, MatMut, MatRef, Par};
        let (m, k) = (a.rows, a.cols);
        assert!(b.rows == k && b.cols == m && c.len() >= m * m);
        a.check("a");
        b.check("b");
        // SAFETY: checked above.
        unsafe {
            let a = MatRef::from_raw_parts(a.data.as_ptr(), m, k, a.rs, a.cs);
            let b = MatRef::from_raw_parts(b.data.as_ptr(), k, m, b.rs, b.cs);
            let c = MatMut::from_raw_parts_mut(c.as_mut_ptr(), m, m, m as isize, 1);
            matmul(
                c,
                BlockStructure::TriangularLower,
                Accum::Replace,
                a,
                BlockStructure::Rectangular,
                b,
                BlockStructure::Rectangular,
                1.0f64,
                Par::rayon(0),
            );
            clear_upper();
        }
    }
    // By blocks of rows, each against the columns up to its last row: half the square's work
    // (and a block's diagonal triangle) instead of all of it.
    #[cfg(target_arch = "wasm32")]
    {
        const ROWS: usize = 128;
        let (m, k) = (a.rows, a.cols);
        assert!(b.rows == k && b.cols == m && c.len() >= m * m && a.rs >= 0);
        let mut block = Vec::new();
        for i0 in (0..m).step_by(ROWS) {
            let i1 = (i0 + ROWS).min(m);
            let rows = View { data: &a.data[i0 * a.rs as usize..], rows: i1 - i0, cols: k, rs: a.rs, cs: a.cs };
            let cols = View { data: b.data, rows: k, cols: i1, rs: b.rs, cs: b.cs };
            block.clear();
            block.resize((i1 - i0) * i1, 0.0);
            matmul_f64(&mut block, rows, cols);
            for (r, row) in block.chunks_exact(i1).enumerate() {
                c[(i0 + r) * m..(i0 + r) * m + i1].copy_from_slice(row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    /// Every layout of a and b against a plain f64 triple loop.
    #[test]
    fn matmul_matches_naive_for_strided_views() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (64, 33, 17), (130, 70, 129)] {
            let a = seq(m * k, 1);
            let b = seq(k * n, 2);
            let want: Vec<f64> = (0..m * n)
                .map(|ij| (0..k).map(|l| a[(ij / n) * k + l] as f64 * b[l * n + ij % n] as f64).sum())
                .collect();
            let at: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..k * n).map(|i| b[(i % k) * n + i / k]).collect();
            for (av, bv) in
                [(View::rows(&a, m, k), View::rows(&b, k, n)), (View::rows(&at, k, m).t(), View::rows(&bt, n, k).t())]
            {
                let mut c = vec![1.0; m * n];
                matmul(&mut c, av, bv, false);
                let err = c.iter().zip(&want).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max);
                assert!(err < 1e-4 * k as f64, "({m},{k},{n}): {err}");
                matmul(&mut c, av, bv, true);
                let err = c.iter().zip(&want).map(|(x, y)| (*x as f64 - 2.0 * y).abs()).fold(0.0, f64::max);
                assert!(err < 2e-4 * k as f64, "({m},{k},{n}) accumulated: {err}");
            }
        }
    }

    /// Grams (symmetric or not, accumulated) equal the f64 sums of products.
    #[test]
    fn gram_matches_f64_sums() {
        for &(n, p, q) in &[(1, 3, 3), (255, 9, 4), (1000, 17, 17), (3000, 40, 40)] {
            let x = seq(n * p, 3);
            let y = seq(n * q, 4);
            for same in [false, true] {
                let y = if same { &x } else { &y };
                let q = if same { p } else { q };
                let mut c = Mat64::new(p, q, vec![0.5; p * q]);
                gram_into(&mut c, &x, y, n, same);
                for i in 0..p {
                    for j in 0..q {
                        let want: f64 = 0.5 + (0..n).map(|r| x[r * p + i] as f64 * y[r * q + j] as f64).sum::<f64>();
                        let err = (c.data[i * q + j] - want).abs();
                        assert!(err < 1e-12 * n as f64, "({n},{p},{q}) same={same} at ({i},{j}): {err}");
                    }
                }
            }
        }
    }
}
