//! The page's matrix products, f32 and f64: packed panels and a microkernel on 128-bit lanes
//! (WebAssembly SIMD128: four f32 or two f64 per vector), for the engine compiled to wasm32,
//! where faer has no SIMD kernel and `matrixmultiply`'s portable kernels ran at 0.7×
//! onnxruntime-web's rate in f32 and at a quarter of it in f64 (`benches/peer_forward.mjs`).
//!
//! c (m, n) (+)= a (m, k) · b (k, n), in blocks of `KC` along k and `NC` along n: each block packs
//! b into panels of nr = 2 vectors of columns (8 f32 or 4 f64; k-major, zero-padded), then, `MC`
//! rows at a time, a into panels of `MR` rows, and the microkernel keeps one `MR` × nr tile of c in
//! 8 vector registers while it runs down a panel pair (one splat of a and two loads of b per row
//! of the panels; V8 maps wasm's v128 to the 16 XMM registers of x86-64, so 8 accumulators, 2 b
//! vectors and 1 splat fit). In the relaxed-SIMD build each step is one fused multiply-add.
//! Natively the same code runs on array lane types, so the packing and the edges are tested here
//! (`tests` below) against a plain triple loop; on wasm32 only the lane type changes.

use super::gemm::View;

/// Rows of the microkernel's tile of c; its columns are two vectors (8 f32 or 4 f64).
const MR: usize = 4;
/// The depth of one packed block (its b panels, KC × nr elements = 8 KiB each, stay in L1/L2), and
/// the rows of a packed at once.
const KC: usize = 256;
const MC: usize = 64;
/// The columns of b packed at once: each thread's packed block is KC × NC f32 (2 MiB), however
/// wide b is (an LM head's 49,152 or 128,256 columns packed whole took 50–130 MiB per thread).
/// Each c element still sums its KC blocks in the same order, so the result is unchanged.
const NC: usize = 2048;

/// An element type the kernel runs on: its 128-bit vector of `W` lanes and the few operations
/// the microkernel needs.
pub trait Element: Copy + Default + std::ops::AddAssign + std::ops::Mul<Output = Self> + Send + Sync {
    /// Lanes per vector: 4 f32 or 2 f64.
    const W: usize;
    type V: Copy;
    fn zero() -> Self::V;
    /// SAFETY: `p` points at `W` readable elements.
    unsafe fn load(p: *const Self) -> Self::V;
    /// `*p` in every lane. SAFETY: `p` points at a readable element.
    unsafe fn load_splat(p: *const Self) -> Self::V;
    /// acc + a · b: one fused multiply-add where the engine is built with relaxed SIMD
    /// (`dist/pkg-threads-relaxed/`, for browsers that have it), else a product and a sum.
    fn mul_add(acc: Self::V, a: Self::V, b: Self::V) -> Self::V;
    /// SAFETY: `p` points at `W` writable elements.
    unsafe fn store(v: Self::V, p: *mut Self);
    /// The sum of the lanes (`rowdot.rs`'s dot products), in lane order.
    fn sum(v: Self::V) -> Self;
}

#[cfg(target_arch = "wasm32")]
mod lanes {
    use super::Element;
    use core::arch::wasm32::*;
    impl Element for f32 {
        const W: usize = 4;
        type V = v128;
        #[inline(always)]
        fn zero() -> v128 {
            f32x4_splat(0.0)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> v128 {
            unsafe { v128_load(p as *const v128) }
        }
        #[inline(always)]
        unsafe fn load_splat(p: *const f32) -> v128 {
            unsafe { v128_load32_splat(p as *const u32) }
        }
        #[inline(always)]
        fn mul_add(acc: v128, a: v128, b: v128) -> v128 {
            #[cfg(target_feature = "relaxed-simd")]
            return f32x4_relaxed_madd(a, b, acc);
            #[cfg(not(target_feature = "relaxed-simd"))]
            f32x4_add(acc, f32x4_mul(a, b))
        }
        #[inline(always)]
        unsafe fn store(v: v128, p: *mut f32) {
            unsafe { v128_store(p as *mut v128, v) }
        }
        #[inline(always)]
        fn sum(v: v128) -> f32 {
            f32x4_extract_lane::<0>(v)
                + f32x4_extract_lane::<1>(v)
                + f32x4_extract_lane::<2>(v)
                + f32x4_extract_lane::<3>(v)
        }
    }
    impl Element for f64 {
        const W: usize = 2;
        type V = v128;
        #[inline(always)]
        fn zero() -> v128 {
            f64x2_splat(0.0)
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> v128 {
            unsafe { v128_load(p as *const v128) }
        }
        #[inline(always)]
        unsafe fn load_splat(p: *const f64) -> v128 {
            unsafe { v128_load64_splat(p as *const u64) }
        }
        #[inline(always)]
        fn mul_add(acc: v128, a: v128, b: v128) -> v128 {
            #[cfg(target_feature = "relaxed-simd")]
            return f64x2_relaxed_madd(a, b, acc);
            #[cfg(not(target_feature = "relaxed-simd"))]
            f64x2_add(acc, f64x2_mul(a, b))
        }
        #[inline(always)]
        unsafe fn store(v: v128, p: *mut f64) {
            unsafe { v128_store(p as *mut v128, v) }
        }
        #[inline(always)]
        fn sum(v: v128) -> f64 {
            f64x2_extract_lane::<0>(v) + f64x2_extract_lane::<1>(v)
        }
    }
}

/// Natively the lanes are arrays, so the packing, the edges and the tile run here in tests.
#[cfg(not(target_arch = "wasm32"))]
mod lanes {
    use super::Element;
    macro_rules! array_lanes {
        ($t:ty, $w:expr) => {
            impl Element for $t {
                const W: usize = $w;
                type V = [$t; $w];
                fn zero() -> Self::V {
                    [0.0; $w]
                }
                unsafe fn load(p: *const $t) -> Self::V {
                    unsafe { std::ptr::read_unaligned(p as *const [$t; $w]) }
                }
                unsafe fn load_splat(p: *const $t) -> Self::V {
                    [unsafe { *p }; $w]
                }
                fn mul_add(acc: Self::V, a: Self::V, b: Self::V) -> Self::V {
                    std::array::from_fn(|i| acc[i] + a[i] * b[i])
                }
                unsafe fn store(v: Self::V, p: *mut $t) {
                    unsafe { std::ptr::write_unaligned(p as *mut [$t; $w], v) }
                }
                fn sum(v: Self::V) -> $t {
                    v.iter().sum()
                }
            }
        };
    }
    array_lanes!(f32, 4);
    array_lanes!(f64, 2);
}

/// b's rows p0..p1 and columns j0..j1 as panels of nr = 2·W columns, each (p1 − p0) × nr, k-major.
fn pack_b<E: Element>(b: &View<E>, p0: usize, p1: usize, j0: usize, j1: usize, out: &mut Vec<E>) {
    let (kc, nr) = (p1 - p0, 2 * E::W);
    let panels = (j1 - j0).div_ceil(nr);
    out.clear();
    out.resize(panels * kc * nr, E::default());
    for q in 0..panels {
        let dst = &mut out[q * kc * nr..(q + 1) * kc * nr];
        let cols = nr.min(j1 - j0 - q * nr);
        for (kk, row) in dst.chunks_exact_mut(nr).enumerate() {
            let base = (p0 + kk) as isize * b.rs + (j0 + q * nr) as isize * b.cs;
            for (c, v) in row[..cols].iter_mut().enumerate() {
                *v = b.data[(base + c as isize * b.cs) as usize];
            }
        }
    }
}

/// a's rows i0..i1 and columns p0..p1 as panels of MR rows, each (p1 − p0) × MR, k-major.
/// `pack_b` of aᵀ would write the same panels, but it reads a column by column: measured with
/// the peer benchmark, the products then ran at 32–34 GFLOP/s against 41–61 reading a by rows.
fn pack_a<E: Element>(a: &View<E>, i0: usize, i1: usize, p0: usize, p1: usize, out: &mut Vec<E>) {
    let kc = p1 - p0;
    let panels = (i1 - i0).div_ceil(MR);
    out.clear();
    out.resize(panels * kc * MR, E::default());
    for q in 0..panels {
        let dst = &mut out[q * kc * MR..(q + 1) * kc * MR];
        let rows = MR.min(i1 - i0 - q * MR);
        for r in 0..rows {
            let base = (i0 + q * MR + r) as isize * a.rs + p0 as isize * a.cs;
            for kk in 0..kc {
                dst[kk * MR + r] = a.data[(base + kk as isize * a.cs) as usize];
            }
        }
    }
}

/// The MR × 2W tile a_panel · b_panel over kc, as two vectors per row.
#[inline(always)]
fn tile<E: Element>(kc: usize, ap: &[E], bp: &[E]) -> [[E::V; 2]; MR] {
    let nr = 2 * E::W;
    assert!(ap.len() >= kc * MR && bp.len() >= kc * nr);
    let mut acc = [[E::zero(); 2]; MR];
    for kk in 0..kc {
        // SAFETY: kk < kc, and both panels hold kc rows (checked above).
        let (b0, b1) = unsafe { (E::load(bp.as_ptr().add(kk * nr)), E::load(bp.as_ptr().add(kk * nr + E::W))) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: kk · MR + r < kc · MR ≤ ap.len() (checked above).
            let s = unsafe { E::load_splat(ap.as_ptr().add(kk * MR + r)) };
            acc[0] = E::mul_add(acc[0], s, b0);
            acc[1] = E::mul_add(acc[1], s, b1);
        }
    }
    acc
}

/// The size of the blocks that split `len` into as few as `max` allows, all but the last equal and
/// a multiple of `unit`: 576 in blocks of at most 256 is 192 + 192 + 192, not 256 + 256 + 64, whose
/// shallow last block costs as many writes of c as a full one for a quarter of the work.
pub fn even_blocks(len: usize, max: usize, unit: usize) -> usize {
    let blocks = len.div_ceil(max).max(1);
    len.div_ceil(blocks).next_multiple_of(unit).max(unit)
}

/// Whether packing pays for a product of these sizes. Below them `matrixmultiply` runs it:
/// attention's per-head products, and the demo's 128-wide model, whose merge took 8.1 s in Node
/// with this kernel on every product against 6.8 s without it (`benches/wasm_merge.mjs`), and
/// the same as without it (7.2–7.3 s against 6.6–7.5 s) at this bound.
pub fn pays(m: usize, k: usize, n: usize) -> bool {
    m >= 4 * MR && n >= 32 && k >= 256 && m * n * k >= 1 << 21
}

/// c (m, n, row stride n) = a · b, or += where `accumulate`: f32 (the forward pass's products)
/// or f64 (the Gram matrices of the statistics).
pub fn gemm<E: Element>(a: View<E>, b: View<E>, c: &mut [E], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let nr = 2 * E::W;
    assert!(b.rows == k && c.len() >= m * n, "packed gemm: shapes do not match");
    if !accumulate {
        c[..m * n].fill(E::default());
    }
    let (mut bp, mut ap) = (Vec::new(), Vec::new());
    let mut lanes = [E::default(); 8];
    let depth = even_blocks(k, KC, 1);
    for p0 in (0..k).step_by(depth) {
        let p1 = (p0 + depth).min(k);
        let kc = p1 - p0;
        for j0 in (0..n).step_by(NC) {
            let j1 = (j0 + NC).min(n);
            pack_b(&b, p0, p1, j0, j1, &mut bp);
            for i0 in (0..m).step_by(MC) {
                let i1 = (i0 + MC).min(m);
                pack_a(&a, i0, i1, p0, p1, &mut ap);
                // One b panel (8 KiB) stays in L1 while every a panel of the block (64 KiB) runs
                // past it.
                for (qj, bpanel) in bp.chunks_exact(kc * nr).enumerate() {
                    let c0 = j0 + qj * nr;
                    let cols = nr.min(n - c0);
                    for (qi, apanel) in ap.chunks_exact(kc * MR).enumerate() {
                        let r0 = i0 + qi * MR;
                        let rows = MR.min(i1 - r0);
                        let t = tile(kc, apanel, bpanel);
                        for (r, tr) in t.iter().enumerate().take(rows) {
                            // SAFETY: `lanes` holds 8 ≥ 2·W elements.
                            unsafe {
                                E::store(tr[0], lanes.as_mut_ptr());
                                E::store(tr[1], lanes.as_mut_ptr().add(E::W));
                            }
                            let out = &mut c[(r0 + r) * n + c0..(r0 + r) * n + c0 + cols];
                            out.iter_mut().zip(&lanes).for_each(|(o, &v)| *o += v);
                        }
                    }
                }
            }
        }
    }
}

/// The f32 product (`gemm`).
pub fn sgemm(a: View<f32>, b: View<f32>, c: &mut [f32], accumulate: bool) {
    gemm(a, b, c, accumulate)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn naive<E: Element + Into<f64>>(a: &View<E>, b: &View<E>) -> Vec<f64> {
        let at = |v: &View<E>, i: usize, j: usize| v.data[(i as isize * v.rs + j as isize * v.cs) as usize].into();
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols).map(|p| at(a, i, p) * at(b, p, j)).sum();
            }
        }
        c
    }

    /// Vectors of `len` values uniform in [−0.5, 0.5) from a linear congruential generator started at
    /// `seed`, converted by `from`: the kernels' tests' data (`rowdot.rs` too).
    pub(in super::super) fn uniform<E>(seed: u64, from: fn(f64) -> E) -> impl FnMut(usize) -> Vec<E> {
        let mut x = seed;
        move |len| {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    from((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
                })
                .collect()
        }
    }

    /// Every edge (rows and columns not multiples of the tile, depths across KC blocks) and
    /// transposed views, in f32 and f64, against a plain triple loop in f64; accumulation adds to c.
    fn matches_the_triple_loop<E: Element + Into<f64>>(from: fn(f64) -> E, tol: f64) {
        let mut rand = uniform(1, from);
        // The last is wider than two column blocks (NC).
        for (m, k, n) in
            [(1, 1, 1), (5, 3, 9), (4, 8, 8), (67, 300, 45), (13, 513, 17), (64, 256, 128), (9, 300, 2 * NC + 13)]
        {
            let (ad, bd) = (rand(m * k), rand(k * n));
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta { View::rows(&ad, k, m).t() } else { View::rows(&ad, m, k) };
                let b = if tb { View::rows(&bd, n, k).t() } else { View::rows(&bd, k, n) };
                let want = naive(&a, &b);
                let mut c = vec![from(f64::NAN); m * n];
                gemm(a, b, &mut c, false);
                let err = |c: &[E], scale: f64| {
                    c.iter().zip(&want).map(|(&c, &w)| (c.into() - scale * w).abs()).fold(0.0, f64::max)
                };
                assert!(err(&c, 1.0) < tol * (k as f64).sqrt(), "({m}, {k}, {n}) t=({ta}, {tb}): {}", err(&c, 1.0));
                gemm(a, b, &mut c, true);
                assert!(err(&c, 2.0) < 2.0 * tol * (k as f64).sqrt(), "({m}, {k}, {n}) accumulated");
            }
        }
    }

    #[test]
    fn packed_f32_product_matches_the_triple_loop() {
        matches_the_triple_loop::<f32>(|v| v as f32, 1e-4);
    }

    #[test]
    fn packed_f64_product_matches_the_triple_loop() {
        matches_the_triple_loop::<f64>(|v| v, 1e-13);
    }
}
