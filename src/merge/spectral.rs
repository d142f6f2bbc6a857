//! Singular value decompositions the data-free methods of 2024–25 share, on low-rank deltas
//! without forming an (out, in) matrix: the exact thin SVD of B·A through the thin QRs of B and
//! Aᵀ (as `export::reduce_rank`), and the orthogonal polar factor TSV-Merge and Iso-CTS use to
//! decorrelate stacked singular vectors.

use super::solve::{to_f64, to_mat, Merged};
use nalgebra::DMatrix;

/// Singular values below this fraction of the largest are a zero spectrum: their vectors are any
/// orthonormal completion, not directions of the delta, and no method may weigh them.
pub const ZERO: f64 = 1e-10;

/// A thin SVD: U (rows, k), σ descending (k), V (cols, k).
pub struct Svd {
    pub u: DMatrix<f64>,
    pub s: Vec<f64>,
    pub v: DMatrix<f64>,
}

impl Svd {
    fn empty(rows: usize, cols: usize) -> Svd {
        Svd { u: DMatrix::zeros(rows, 0), s: Vec::new(), v: DMatrix::zeros(cols, 0) }
    }

    /// The top `k` triplets (all where fewer).
    pub fn top(self, k: usize) -> Svd {
        let k = k.min(self.s.len());
        Svd { u: self.u.columns(0, k).into_owned(), s: self.s[..k].to_vec(), v: self.v.columns(0, k).into_owned() }
    }

    /// The triplets whose singular value exceeds `floor`.
    pub fn above(self, floor: f64) -> Svd {
        let k = self.s.iter().take_while(|&&s| s > floor).count();
        self.top(k)
    }

    /// Without the zero spectrum (`ZERO` × the largest singular value).
    pub fn nonzero(self) -> Svd {
        let top = self.s.first().copied().unwrap_or(0.0);
        self.above(ZERO * top)
    }
}

/// The thin SVD of a dense matrix (faer's; empty for a non-finite input, which the merge refuses
/// before).
pub fn svd(m: &DMatrix<f64>) -> Svd {
    let f = faer::Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)]);
    let Ok(d) = f.thin_svd() else { return Svd::empty(m.nrows(), m.ncols()) };
    let (u, v, s) = (d.U(), d.V(), d.S().column_vector());
    Svd {
        u: DMatrix::from_fn(u.nrows(), u.ncols(), |r, c| u[(r, c)]),
        s: (0..s.nrows()).map(|i| s[i]).collect(),
        v: DMatrix::from_fn(v.nrows(), v.ncols(), |r, c| v[(r, c)]),
    }
}

/// The exact thin SVD of B·A: U (out, k), σ, V (in, k) with B·A = U diag(σ) Vᵀ over all
/// min(out, in, r) singular values (`nonzero` or `above` drop the zero spectrum).
pub fn low_rank_svd(m: &Merged) -> Svd {
    let qr_b = to_f64(&m.b).qr();
    let qr_a = to_f64(&m.a).transpose().qr();
    let core = svd(&(qr_b.r() * qr_a.r().transpose()));
    Svd { u: qr_b.q() * core.u, s: core.s, v: qr_a.q() * core.v }
}

/// The orthogonal polar factor of X (n, k): P Qᵀ from X = P Σ Qᵀ, the matrix with orthonormal
/// columns (or rows, where k > n) nearest X.
pub fn polar(x: &DMatrix<f64>) -> DMatrix<f64> {
    let d = svd(x);
    d.u * d.v.transpose()
}

/// One adapter's weighted delta w s B A as factors (A, w s B).
pub fn weighted(l: &crate::formats::peft::LoraModule, w: f64) -> Merged {
    Merged { a: l.a.clone(), b: to_mat(&(to_f64(&l.b) * (w * l.scale as f64))) }
}

/// Triplets side by side: [U_1 … U_N], (σ_1 … σ_N), [V_1 … V_N].
pub fn stack(parts: &[Svd], rows: usize, cols: usize) -> Svd {
    let k: usize = parts.iter().map(|p| p.s.len()).sum();
    let (mut u, mut v, mut s) = (DMatrix::zeros(rows, k), DMatrix::zeros(cols, k), Vec::with_capacity(k));
    let mut at = 0;
    for p in parts {
        let n = p.s.len();
        u.columns_mut(at, n).copy_from(&p.u);
        v.columns_mut(at, n).copy_from(&p.v);
        s.extend_from_slice(&p.s);
        at += n;
    }
    Svd { u, s, v }
}

/// B (out, k) and A (k, in) as a merged LoRA; a rank-1 zero where k is 0 (nothing survived).
pub fn lora(b: DMatrix<f64>, a: DMatrix<f64>) -> Merged {
    if b.ncols() == 0 {
        return Merged { a: to_mat(&DMatrix::zeros(1, a.ncols())), b: to_mat(&DMatrix::zeros(b.nrows(), 1)) };
    }
    Merged { a: to_mat(&a), b: to_mat(&b) }
}

/// The mean of singular values (0 for none).
pub fn mean(s: &[f64]) -> f64 {
    if s.is_empty() {
        0.0
    } else {
        s.iter().sum::<f64>() / s.len() as f64
    }
}

/// diag(s) as a matrix.
pub fn diag(s: &[f64]) -> DMatrix<f64> {
    DMatrix::from_diagonal(&nalgebra::DVector::from_column_slice(s))
}
