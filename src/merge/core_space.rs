//! Core Space merging (Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov, Calderara,
//! van de Weijer, "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025,
//! arXiv 2509.17786, §3): the reference bases are the left singular vectors U_B of the stacked
//! B's [B_1 … B_N] and the right singular vectors V_A of the stacked A's [A_1; …; A_N]; each task
//! is its core M_t = U_Bᵀ (w_t s_t B_t A_t) V_A, an (R, R) matrix with R ≤ Σr, in which it is
//! represented exactly; a merge acts on the cores and ΔW = U_B · merge(M_t) · V_Aᵀ. Summing the
//! cores is task arithmetic, exactly (the paper's losslessness); methods built on rotations
//! (Iso-C, TSV) give in the core what they give outside it, so the one this tool offers is TIES in
//! the core (`core-ties`): trim, elect signs and average the agreeing entries of the aligned
//! cores, per module, as `ties`. An exact LoRA of rank ≤ Σr.

use super::baselines::ties;
use super::iteris::Target;
use super::solve::{to_f64, Merged};
use super::spectral::{lora, svd};
use nalgebra::DMatrix;

/// TIES on the cores of one module's adapters, weighted.
pub fn core_ties(t: &Target, weights: &[f64], density: f64) -> Merged {
    let present: Vec<_> = t.loras.iter().zip(weights).filter_map(|(l, &w)| l.as_ref().map(|l| (l, w))).collect();
    let rank: usize = present.iter().map(|(l, _)| l.rank()).sum();
    let (mut b, mut a) = (DMatrix::zeros(t.out_dim, rank), DMatrix::zeros(rank, t.in_dim));
    let mut at = 0;
    for (l, _) in &present {
        let r = l.rank();
        b.columns_mut(at, r).copy_from(&to_f64(&l.b));
        a.rows_mut(at, r).copy_from(&to_f64(&l.a));
        at += r;
    }
    let u_b = svd(&b).nonzero().u;
    let v_a = svd(&a.transpose()).nonzero().u;
    let cores: Vec<DMatrix<f64>> = present
        .iter()
        .map(|(l, w)| u_b.transpose() * (to_f64(&l.b) * (w * l.scale as f64)) * (to_f64(&l.a) * &v_a))
        .collect();
    lora(&u_b * ties(&cores, density), v_a.transpose())
}
