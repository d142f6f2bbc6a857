//! KnOTS (Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model Merging with SVD to Tie the KnOTS",
//! ICLR 2025, arXiv 2410.19735, §4): LoRA updates of different tasks are poorly aligned, so
//! element-wise merges (TIES, DARE) pair unrelated entries. KnOTS puts them in one basis first: the
//! SVD of the tasks' deltas side by side, [ΔW_1 … ΔW_N] = U Σ [V_1ᵀ … V_Nᵀ], gives each task as
//! U (Σ V_tᵀ) over a shared U; the merge acts on the task coordinates Σ V_tᵀ (k, in), and
//! ΔW = U · merge(w_t Σ V_tᵀ). With a sum, KnOTS is task arithmetic; with TIES (trim, elect
//! signs, disjoint mean, per module, as `ties`) it is KnOTS-TIES. An exact LoRA of rank ≤ Σr.
//!
//! On LoRAs the concatenation is formed from its factors, [s_1 B_1 … s_N B_N] times the block
//! diagonal of the A's, so its SVD costs (out + N·in) · (Σr)², never an (out, N·in) matrix.

use super::iteris::Target;
use super::solve::{to_f64, Merged};
use super::spectral::{diag, lora, low_rank_svd};
use nalgebra::DMatrix;

/// KnOTS of one module's adapters: `merge` combines the tasks' weighted coordinates.
pub fn knots(t: &Target, weights: &[f64], merge: impl Fn(&[DMatrix<f64>]) -> DMatrix<f64>) -> Merged {
    let n = t.loras.len();
    let rank: usize = t.loras.iter().flatten().map(|l| l.rank()).sum();
    let (mut b, mut a) = (DMatrix::zeros(t.out_dim, rank), DMatrix::zeros(rank, n * t.in_dim));
    let mut at = 0;
    for (i, l) in t.loras.iter().enumerate() {
        let Some(l) = l else { continue };
        let r = l.rank();
        b.columns_mut(at, r).copy_from(&(to_f64(&l.b) * l.scale as f64));
        a.view_mut((at, i * t.in_dim), (r, t.in_dim)).copy_from(&to_f64(&l.a));
        at += r;
    }
    let d = low_rank_svd(&Merged { a: super::solve::to_mat(&a), b: super::solve::to_mat(&b) }).nonzero();
    let sigma = diag(&d.s);
    let coordinates: Vec<DMatrix<f64>> =
        (0..n).map(|i| &sigma * d.v.rows(i * t.in_dim, t.in_dim).transpose() * weights[i]).collect();
    lora(d.u, merge(&coordinates))
}
