//! Iso-C and Iso-CTS (Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task
//! Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025,
//! arXiv 2502.04959).
//!
//! Iso-C (§3.2, eq. 6): task arithmetic's sum M = Σ_t w_t ΔW_t = U Σ Vᵀ has a spectrum dominated
//! by a few directions, which tasks with weaker updates lose to; Iso-C keeps M's singular vectors
//! and flattens its spectrum, ΔW = σ̄ U Vᵀ with σ̄ the mean singular value.
//!
//! Iso-CTS (§3.3, Alg. 1): the top k of M's directions (k a fraction, `common_space`, of them; the
//! rest shared equally among the N tasks, rounded as the authors round) form the common subspace;
//! each task adds the top directions of its delta with the common subspace projected out,
//! ΔW_t − U_k U_kᵀ ΔW_t; the stacked U and V are replaced by their orthogonal polar factors, and
//! the spectrum of all the kept directions is flattened to its mean.
//!
//! The paper's scaling factor α multiplies the result; both are linear in the deltas, so α is the
//! weights (`--weights`).
//!
//! On LoRAs: the paper works over all min(out, in) singular values of a full fine-tune's update.
//! A sum of LoRAs has rank R ≤ Σr, and its other singular vectors are any orthonormal completion
//! (arbitrary directions, none of the update's), so here the spectrum is the R nonzero values, the
//! subspaces are fractions of R, and a task residual's zero spectrum is never kept. The result is
//! an exact LoRA of rank ≤ R.

use super::baselines::weighted_cat;
use super::iteris::Target;
use super::solve::{to_f64, to_mat, Merged};
use super::spectral::{lora, low_rank_svd, mean, polar, stack, weighted, ZERO};

/// Iso-C of one module's adapters, weighted.
pub fn iso_c(t: &Target, weights: &[f64]) -> Merged {
    let d = low_rank_svd(&weighted_cat(t, weights)).nonzero();
    lora(d.u * mean(&d.s), d.v.transpose())
}

/// The common subspace's size and each task's share of the rest, of a spectrum of `rank` values
/// over `tasks` tasks: the authors' `int(rank · fraction)`, then the remainder rounded (half to
/// even, as Python rounds) to a multiple of the task count, and never more than there is.
pub fn subspace_sizes(rank: usize, tasks: usize, fraction: f64) -> (usize, usize) {
    let tasks = tasks.max(1);
    let common = ((rank as f64 * fraction) as usize).min(rank);
    let per_task = (((rank - common) as f64 / tasks as f64).round_ties_even() as usize).min(rank / tasks);
    (rank - per_task * tasks, per_task)
}

/// Iso-CTS of one module's adapters, weighted, with `common` the common subspace's fraction.
pub fn iso_cts(t: &Target, weights: &[f64], common: f64) -> Merged {
    let sum = low_rank_svd(&weighted_cat(t, weights)).nonzero();
    let floor = ZERO * sum.s.first().copied().unwrap_or(0.0);
    let (k, per_task) = subspace_sizes(sum.s.len(), t.loras.len(), common);
    let common = sum.top(k);
    let mut parts = Vec::new();
    for (l, &w) in t.loras.iter().zip(weights) {
        let Some(l) = l else { continue };
        let d = weighted(l, w);
        let b = to_f64(&d.b);
        let residual = Merged { a: d.a, b: to_mat(&(&b - &common.u * (common.u.transpose() * &b))) };
        parts.push(low_rank_svd(&residual).above(floor).top(per_task));
    }
    parts.push(common);
    let all = stack(&parts, t.out_dim, t.in_dim);
    lora(polar(&all.u) * mean(&all.s), polar(&all.v).transpose())
}
