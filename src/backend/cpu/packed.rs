//! The page's f32 matrix product: packed panels and a 4 × 8 microkernel on 128-bit lanes
//! (WebAssembly SIMD128: four f32 per vector), for the engine compiled to wasm32, where faer has
//! no SIMD kernel and `matrixmultiply`'s portable kernel ran at 0.7× onnxruntime-web's rate
//! (`benches/peer_forward.mjs`).
//!
//! c (m, n) (+)= a (m, k) · b (k, n), in blocks of `KC` along k and `NC` along n: each block packs
//! b into panels of `NR` columns (k-major, zero-padded), then, `MC` rows at a time, a into panels of `MR` rows, and
//! the microkernel keeps one `MR` × `NR` tile of c in 8 vector registers while it runs down a
//! panel pair (one splat of a and two loads of b per row of the panels; V8 maps wasm's v128 to
//! the 16 XMM registers of x86-64, so 8 accumulators, 2 b vectors and 1 splat fit). Natively the
//! same code runs on a four-lane array type, so the packing and the edges are tested here
//! (`tests` below) against a plain triple loop; on wasm32 only the lane type changes.

use super::gemm::View;

/// Rows and columns of the microkernel's tile of c.
const MR: usize = 4;
const NR: usize = 8;
/// The depth of one packed block (its b panels, KC × NR f32 = 8 KiB each, stay in L1/L2), and
/// the rows of a packed at once.
const KC: usize = 256;
const MC: usize = 64;
/// The columns of b packed at once: each thread's packed block is KC × NC f32 (2 MiB), however
/// wide b is (an LM head's 49,152 or 128,256 columns packed whole took 50–130 MiB per thread).
/// Each c element still sums its KC blocks in the same order, so the result is unchanged.
const NC: usize = 2048;

#[cfg(target_arch = "wasm32")]
mod lanes {
    use core::arch::wasm32::*;
    #[derive(Clone, Copy)]
    pub struct V(v128);
    impl V {
        #[inline(always)]
        pub fn zero() -> V {
            V(f32x4_splat(0.0))
        }
        #[inline(always)]
        pub fn splat(x: f32) -> V {
            V(f32x4_splat(x))
        }
        /// SAFETY: `p` points at 4 readable f32.
        #[inline(always)]
        pub unsafe fn load(p: *const f32) -> V {
            V(unsafe { v128_load(p as *const v128) })
        }
        #[inline(always)]
        pub fn mul_add(self, a: V, b: V) -> V {
            V(f32x4_add(self.0, f32x4_mul(a.0, b.0)))
        }
        #[inline(always)]
        pub fn lanes(self) -> [f32; 4] {
            [
                f32x4_extract_lane::<0>(self.0),
                f32x4_extract_lane::<1>(self.0),
                f32x4_extract_lane::<2>(self.0),
                f32x4_extract_lane::<3>(self.0),
            ]
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod lanes {
    #[derive(Clone, Copy)]
    pub struct V([f32; 4]);
    impl V {
        pub fn zero() -> V {
            V([0.0; 4])
        }
        pub fn splat(x: f32) -> V {
            V([x; 4])
        }
        /// SAFETY: `p` points at 4 readable f32.
        pub unsafe fn load(p: *const f32) -> V {
            V(unsafe { std::ptr::read_unaligned(p as *const [f32; 4]) })
        }
        pub fn mul_add(self, a: V, b: V) -> V {
            V(std::array::from_fn(|i| self.0[i] + a.0[i] * b.0[i]))
        }
        pub fn lanes(self) -> [f32; 4] {
            self.0
        }
    }
}

use lanes::V;

/// b's rows p0..p1 and columns j0..j1 as panels of NR columns, each (p1 − p0) × NR, k-major.
fn pack_b(b: &View<f32>, p0: usize, p1: usize, j0: usize, j1: usize, out: &mut Vec<f32>) {
    let kc = p1 - p0;
    let panels = (j1 - j0).div_ceil(NR);
    out.clear();
    out.resize(panels * kc * NR, 0.0);
    for q in 0..panels {
        let dst = &mut out[q * kc * NR..(q + 1) * kc * NR];
        let cols = NR.min(j1 - j0 - q * NR);
        for (kk, row) in dst.chunks_exact_mut(NR).enumerate() {
            let base = (p0 + kk) as isize * b.rs + (j0 + q * NR) as isize * b.cs;
            for (c, v) in row[..cols].iter_mut().enumerate() {
                *v = b.data[(base + c as isize * b.cs) as usize];
            }
        }
    }
}

/// a's rows i0..i1 and columns p0..p1 as panels of MR rows, each (p1 − p0) × MR, k-major.
/// `pack_b` of aᵀ would write the same panels, but it reads a column by column: measured with
/// the peer benchmark, the products then ran at 32–34 GFLOP/s against 41–61 reading a by rows.
fn pack_a(a: &View<f32>, i0: usize, i1: usize, p0: usize, p1: usize, out: &mut Vec<f32>) {
    let kc = p1 - p0;
    let panels = (i1 - i0).div_ceil(MR);
    out.clear();
    out.resize(panels * kc * MR, 0.0);
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

/// The MR × NR tile a_panel · b_panel over kc.
#[inline(always)]
fn tile(kc: usize, ap: &[f32], bp: &[f32]) -> [[V; 2]; MR] {
    assert!(ap.len() >= kc * MR && bp.len() >= kc * NR);
    let mut acc = [[V::zero(); 2]; MR];
    for kk in 0..kc {
        // SAFETY: kk < kc, and both panels hold kc rows (checked above).
        let (b0, b1) = unsafe { (V::load(bp.as_ptr().add(kk * NR)), V::load(bp.as_ptr().add(kk * NR + 4))) };
        let a = &ap[kk * MR..kk * MR + MR];
        for r in 0..MR {
            let s = V::splat(a[r]);
            acc[r][0] = acc[r][0].mul_add(s, b0);
            acc[r][1] = acc[r][1].mul_add(s, b1);
        }
    }
    acc
}

/// Whether packing pays for a product of these sizes. Below them `matrixmultiply` runs it:
/// attention's per-head products, and the demo's 128-wide model, whose merge took 8.1 s in Node
/// with this kernel on every product against 6.8 s without it (`benches/wasm_merge.mjs`), and
/// the same as without it (7.2–7.3 s against 6.6–7.5 s) at this bound.
pub fn pays(m: usize, k: usize, n: usize) -> bool {
    m >= 4 * MR && n >= 4 * NR && k >= 256 && m * n * k >= 1 << 21
}

/// c (m, n, row stride n) = a · b, or += where `accumulate`.
pub fn sgemm(a: View<f32>, b: View<f32>, c: &mut [f32], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && c.len() >= m * n, "packed sgemm: shapes do not match");
    if !accumulate {
        c[..m * n].fill(0.0);
    }
    let (mut bp, mut ap) = (Vec::new(), Vec::new());
    for p0 in (0..k).step_by(KC) {
        let p1 = (p0 + KC).min(k);
        let kc = p1 - p0;
        for j0 in (0..n).step_by(NC) {
            let j1 = (j0 + NC).min(n);
            pack_b(&b, p0, p1, j0, j1, &mut bp);
            for i0 in (0..m).step_by(MC) {
                let i1 = (i0 + MC).min(m);
                pack_a(&a, i0, i1, p0, p1, &mut ap);
                // One b panel (8 KiB) stays in L1 while every a panel of the block (64 KiB) runs
                // past it.
                for (qj, bpanel) in bp.chunks_exact(kc * NR).enumerate() {
                    let c0 = j0 + qj * NR;
                    let cols = NR.min(n - c0);
                    for (qi, apanel) in ap.chunks_exact(kc * MR).enumerate() {
                        let r0 = i0 + qi * MR;
                        let rows = MR.min(i1 - r0);
                        let t = tile(kc, apanel, bpanel);
                        for (r, tr) in t.iter().enumerate().take(rows) {
                            let (lo, hi) = (tr[0].lanes(), tr[1].lanes());
                            let out = &mut c[(r0 + r) * n + c0..(r0 + r) * n + c0 + cols];
                            for (j, o) in out.iter_mut().enumerate() {
                                *o += if j < 4 { lo[j] } else { hi[j - 4] };
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &View<f32>, b: &View<f32>) -> Vec<f64> {
        let at = |v: &View<f32>, i: usize, j: usize| v.data[(i as isize * v.rs + j as isize * v.cs) as usize] as f64;
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols).map(|p| at(a, i, p) * at(b, p, j)).sum();
            }
        }
        c
    }

    /// Every edge (rows and columns not multiples of the tile, depths across KC blocks) and
    /// transposed views, against a plain triple loop in f64; accumulation adds to c.
    #[test]
    fn packed_product_matches_the_triple_loop() {
        let mut x = 1u64;
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        // The last is wider than two column blocks (NC).
        for (m, k, n) in [(1, 1, 1), (5, 3, 9), (4, 8, 8), (67, 300, 45), (13, 513, 17), (64, 256, 128), (9, 300, 2 * NC + 13)] {
            let (ad, bd) = (rand(m * k), rand(k * n));
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta { View::rows(&ad, k, m).t() } else { View::rows(&ad, m, k) };
                let b = if tb { View::rows(&bd, n, k).t() } else { View::rows(&bd, k, n) };
                let want = naive(&a, &b);
                let mut c = vec![f32::NAN; m * n];
                sgemm(a, b, &mut c, false);
                let err = |c: &[f32], scale: f64| {
                    c.iter().zip(&want).map(|(&c, &w)| (c as f64 - scale * w).abs()).fold(0.0, f64::max)
                };
                assert!(err(&c, 1.0) < 1e-4 * (k as f64).sqrt(), "({m}, {k}, {n}) t=({ta}, {tb}): {}", err(&c, 1.0));
                sgemm(a, b, &mut c, true);
                assert!(err(&c, 2.0) < 2e-4 * (k as f64).sqrt(), "({m}, {k}, {n}) accumulated");
            }
        }
    }
}
