//! Iso-C (Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
//! Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959,
//! §3.2): task arithmetic's sum M = Σ_t w_t ΔW_t = U Σ Vᵀ has a spectrum dominated by a few
//! directions, which tasks with weaker updates lose to; Iso-C keeps M's singular vectors and
//! flattens its spectrum, ΔW_Iso = σ̄ U Vᵀ with σ̄ the mean singular value (eq. 6). The paper's
//! scaling factor α multiplies ΔW_Iso; Iso-C is linear in M, so α is the weights (`--weights`).
//!
//! On LoRAs: the paper averages over all min(out, in) singular values of a full fine-tune's
//! update. A sum of LoRAs has rank R ≤ Σr, and its other singular vectors are any orthonormal
//! completion (arbitrary directions, not the update's), so the spectrum flattened here is the R
//! nonzero values and the result is an exact LoRA of rank R: B = σ̄ U, A = Vᵀ.

use super::baselines::weighted_cat;
use super::export::low_rank_svd;
use super::iteris::Target;
use super::solve::{to_mat, Merged};

/// Iso-C of one module's adapters, weighted.
pub fn iso_c(t: &Target, weights: &[f64]) -> Merged {
    let (u, s, v) = low_rank_svd(&weighted_cat(t, weights));
    let mean = if s.is_empty() { 0.0 } else { s.iter().sum::<f64>() / s.len() as f64 };
    Merged { a: to_mat(&v.transpose()), b: to_mat(&(u * mean)) }
}
