//! The page's products of few rows against a weight: c (m, n) = a · wᵀ with a (m, k) and the
//! weight w (n, k) both stored by rows, as dot products along k that read both in place.
//!
//! Why beside `packed.rs`: a merge's greedy decoding multiplies one token per sequence (16–64
//! rows) by every weight. Packing w's panels then costs as much as the product, and split by rows
//! over the page's two threads each half fell under `packed::pays` onto `matrixmultiply`: 7–9
//! GFLOP/s, 9–11% of a SmolLM2-shaped merge in the page. Here every element of w is read once
//! from memory, a's few rows stay in cache, and the threads split w's rows (c's columns).
//!
//! The microkernel keeps an `R` × `C` tile of c as R·C vector accumulators (4 × 2: 8 of V8's 16
//! XMM registers, with 4 + 2 loads per step) and sums each one's lanes at the end of a depth block.

use super::gemm::View;
use super::packed::Element;

/// The most depth of one block: a tile's 6 rows of it (18 KiB in f32) stay in L1.
const KC: usize = 768;
/// The weight rows of one block (96 KiB of f32 at KC): they stay in L2 while every tile of a's
/// rows runs past them.
const NB: usize = 32;
/// The most rows of a in one block (1.5 MiB of f32 at KC): they stay in L2 while the weight's
/// blocks run past them. Every block reads the whole weight again, so a product of fewer rows
/// than this reads it once.
const MB: usize = 512;

/// The R × C tile Σ_p a_r[p] · w_c[p] over `k`.
///
/// SAFETY: every pointer in `a` and `w` points at `k` readable elements.
#[inline(always)]
unsafe fn tile<E: Element, const R: usize, const C: usize>(
    k: usize,
    a: [*const E; R],
    w: [*const E; C],
) -> [[E; C]; R] {
    let mut acc = [[E::zero(); C]; R];
    let full = k / E::W * E::W;
    let mut p = 0;
    while p < full {
        // SAFETY: p + W ≤ k.
        let wv: [E::V; C] = std::array::from_fn(|c| unsafe { E::load(w[c].add(p)) });
        for (acc, &ar) in acc.iter_mut().zip(&a) {
            // SAFETY: p + W ≤ k.
            let av = unsafe { E::load(ar.add(p)) };
            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                *acc = E::mul_add(*acc, av, wv);
            }
        }
        p += E::W;
    }
    let mut out: [[E; C]; R] = std::array::from_fn(|r| std::array::from_fn(|c| E::sum(acc[r][c])));
    for p in full..k {
        for (out, &ar) in out.iter_mut().zip(&a) {
            for (o, &wc) in out.iter_mut().zip(&w) {
                // SAFETY: p < k.
                *o += unsafe { *ar.add(p) * *wc.add(p) };
            }
        }
    }
    out
}

/// c (m, n) = a · wᵀ, or += where `accumulate`, for a (m, k) and w (n, k), both with unit column
/// stride; c's element (i, j) is `c.add(i · ldc + j)`.
///
/// SAFETY: c points at m rows of n writable elements `ldc` apart, which no other thread touches
/// during the call (the threads of `gemm::by_col_blocks` write disjoint columns of one c).
pub unsafe fn gemm_nt<E: Element>(a: View<E>, w: View<E>, c: *mut E, ldc: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, w.rows);
    assert!(a.cs == 1 && w.cs == 1 && w.cols == k, "row-dot gemm: a and w are read by rows of k");
    assert!(n <= ldc || m <= 1, "row-dot gemm: c's rows overlap");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of c (the caller's contract).
                unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) }.fill(E::default());
            }
        }
        return;
    }
    let last = |v: &View<E>| v.rows == 0 || k == 0 || (v.rows - 1) * v.rs as usize + k <= v.data.len();
    assert!(a.rs >= 0 && w.rs >= 0 && last(&a) && last(&w), "row-dot gemm: a view leaves its slice");
    let row = |v: &View<E>, i: usize, p0: usize| v.data[i * v.rs as usize + p0..].as_ptr();
    let depth = super::packed::even_blocks(k, KC, E::W);
    let rows = super::packed::even_blocks(m, MB, 4);
    for (p0, b0) in (0..k).step_by(depth).flat_map(|p0| (0..m).step_by(rows).map(move |b0| (p0, b0))) {
        let kc = depth.min(k - p0);
        // The first depth block writes c where the product replaces it: no zeroing pass.
        let store = p0 == 0 && !accumulate;
        for j0 in (0..n).step_by(NB) {
            let j1 = (j0 + NB).min(n);
            for i0 in (b0..(b0 + rows).min(m)).step_by(4) {
                let rows = 4.min(m - i0);
                let mut j = j0;
                while j < j1 {
                    let cols = 2.min(j1 - j);
                    // SAFETY: rows i0.. < m and j.. < n of views checked above, each with kc ≤ k − p0
                    // elements from p0.
                    macro_rules! run {
                        ($r:literal, $c:literal) => {{
                            let t = unsafe {
                                tile::<E, $r, $c>(
                                    kc,
                                    std::array::from_fn(|r| row(&a, i0 + r, p0)),
                                    std::array::from_fn(|q| row(&w, j + q, p0)),
                                )
                            };
                            for (r, t) in t.iter().enumerate() {
                                // SAFETY: row i0 + r < m, columns j..j + $c ≤ n of c (the caller's
                                // contract).
                                let out = unsafe { std::slice::from_raw_parts_mut(c.add((i0 + r) * ldc + j), $c) };
                                if store {
                                    out.copy_from_slice(t);
                                } else {
                                    out.iter_mut().zip(t).for_each(|(o, &v)| *o += v);
                                }
                            }
                        }};
                    }
                    match (rows, cols) {
                        (4, 2) => run!(4, 2),
                        (4, _) => run!(4, 1),
                        (3, 2) => run!(3, 2),
                        (3, _) => run!(3, 1),
                        (2, 2) => run!(2, 2),
                        (2, _) => run!(2, 1),
                        (_, 2) => run!(1, 2),
                        _ => run!(1, 1),
                    }
                    j += cols;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every edge (rows not a multiple of 4, odd weight rows, depths not a multiple of the lanes
    /// and across KC blocks, row strides wider than k) against a triple loop in f64, in f32 and f64.
    fn matches_the_triple_loop<E: Element + Into<f64>>(from: fn(f64) -> E, tol: f64) {
        let mut rand = super::super::packed::tests::uniform(7, from);
        for (m, k, n, pad) in
            [(1, 1, 1, 0), (3, 5, 7, 2), (4, 8, 2, 0), (21, 576, 67, 3), (17, 1100, 33, 0), (5, 3, 40, 1), (2, 0, 3, 0)]
        {
            let (ad, wd) = (rand(m * (k + pad)), rand(n * (k + pad)));
            let a = View { data: &ad, rows: m, cols: k, rs: (k + pad) as isize, cs: 1 };
            let w = View { data: &wd, rows: n, cols: k, rs: (k + pad) as isize, cs: 1 };
            // c's rows `ldc` = n + 3 apart, the columns past n left alone; replaced, then added to.
            let ldc = n + 3;
            let c0 = rand(m * ldc);
            for accumulate in [false, true] {
                let mut c = c0.clone();
                // SAFETY: c holds m rows of ldc ≥ n elements.
                unsafe { gemm_nt(a, w, c.as_mut_ptr(), ldc, accumulate) };
                for i in 0..m {
                    for j in 0..ldc {
                        let before: f64 = c0[i * ldc + j].into();
                        let got: f64 = c[i * ldc + j].into();
                        if j >= n {
                            assert_eq!(got, before, "({m}, {k}, {n}): column {j} past n was written");
                            continue;
                        }
                        let dot =
                            (0..k).map(|p| ad[i * (k + pad) + p].into() * wd[j * (k + pad) + p].into()).sum::<f64>();
                        let want = if accumulate { before + dot } else { dot };
                        assert!(
                            (got - want).abs() <= tol * (k as f64).sqrt(),
                            "({m}, {k}, {n}) at ({i}, {j}): {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn row_dot_f32_product_matches_the_triple_loop() {
        matches_the_triple_loop::<f32>(|v| v as f32, 1e-5);
    }

    #[test]
    fn row_dot_f64_product_matches_the_triple_loop() {
        matches_the_triple_loop::<f64>(|v| v, 1e-13);
    }
}
