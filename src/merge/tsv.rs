//! TSV-Merge (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular
//! Vectors: Reducing Task Interference in Model Merging", CVPR 2025, arXiv 2412.00081, §4 and
//! Alg. 1): each task's delta w_t ΔW_t = U_t Σ_t V_tᵀ keeps its top singular triplets, a 1/N
//! share of the dimensions (`int(min(out, in) / N)`, where a LoRA's rank is usually less: then
//! all of it); the tasks' singular vectors are stacked, [U_1 … U_N] and [V_1 … V_N], and each
//! stack is replaced by its orthogonal polar factor, which decorrelates the tasks' directions
//! (their interference); ΔW = polar(U) diag(σ) polar(V)ᵀ with the tasks' own singular values. The
//! paper's α (1 by default) is the weights. An exact LoRA of rank ≤ Σr.

use super::iteris::Target;
use super::solve::Merged;
use super::spectral::{diag, lora, low_rank_svd, polar, stack, weighted};

/// TSV-Merge of one module's adapters, weighted.
pub fn tsv(t: &Target, weights: &[f64]) -> Merged {
    let share = t.out_dim.min(t.in_dim) / t.loras.len().max(1);
    let parts: Vec<_> = t
        .loras
        .iter()
        .zip(weights)
        .filter_map(|(l, &w)| l.as_ref().map(|l| low_rank_svd(&weighted(l, w)).nonzero().top(share)))
        .collect();
    let all = stack(&parts, t.out_dim, t.in_dim);
    lora(polar(&all.u) * diag(&all.s), polar(&all.v).transpose())
}
