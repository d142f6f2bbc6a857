//! PEFT's own merges, reproduced exactly (`LoraModel.add_weighted_adapter`, combination types
//! "linear" and "ties"), for a user who wants what they had: PEFT combines the A's and the B's
//! separately, each adapter weighted by √|w_i s_i| (the sign on A's side), not the deltas B_i A_i,
//! so its result is not Σ w_i ΔW_i (cross terms B_i A_j remain); it needs every adapter of one
//! rank, and the merged adapter has scale 1 (lora_alpha = r).
//!
//! - `peft-linear`: A = Σ √|w_i s_i| sgn(w_i s_i) A_i, B = Σ √|w_i s_i| B_i (`task_arithmetic`).
//! - `peft-ties`: the same weights through PEFT's `ties` on the A's and on the B's: each tensor
//!   keeps its int(density · size) largest magnitudes (`magnitude_based_pruning`), signs are
//!   elected by the pruned tensors' sum (≥ 0 counts as +, the "total" method), and the weighted
//!   entries that agree are averaged (`disjoint_merge`); density ≥ 1 prunes nothing.
//!
//! DARE's PEFT variants draw their drops from torch's generator, which cannot be reproduced
//! outside torch; `dare` here is the seeded DARE of the deltas.

use super::iteris::Target;
use super::solve::{to_f64, to_mat, Merged};
use crate::error::{Error, Result};
use nalgebra::DMatrix;

/// How PEFT combines the A's and the B's.
#[derive(Clone, Copy)]
pub enum Combination {
    Linear,
    Ties { density: f64 },
}

/// PEFT's merge of one module's adapters (those that target it), weighted.
pub fn combine(t: &Target, weights: &[f64], how: Combination) -> Result<Merged> {
    let present: Vec<_> = t.loras.iter().zip(weights).filter_map(|(l, &w)| l.as_ref().map(|l| (l, w))).collect();
    let ranks: Vec<usize> = present.iter().map(|(l, _)| l.rank()).collect();
    if ranks.windows(2).any(|p| p[0] != p[1]) {
        return Err(Error::Unsupported(format!(
            "PEFT's linear and TIES merges need adapters of one rank; module {} has ranks {ranks:?} (use linear, ties or cat)",
            t.name
        )));
    }
    let scaled: Vec<f64> = present.iter().map(|(l, w)| w * l.scale as f64).collect();
    let on_a: Vec<f64> = scaled.iter().map(|x| x.abs().sqrt() * if *x >= 0.0 { 1.0 } else { -1.0 }).collect();
    let on_b: Vec<f64> = scaled.iter().map(|x| x.abs().sqrt()).collect();
    let a: Vec<DMatrix<f64>> = present.iter().map(|(l, _)| to_f64(&l.a)).collect();
    let b: Vec<DMatrix<f64>> = present.iter().map(|(l, _)| to_f64(&l.b)).collect();
    let mix = |tensors: &[DMatrix<f64>], w: &[f64]| match how {
        Combination::Linear => tensors.iter().zip(w).map(|(t, w)| t * *w).sum(),
        Combination::Ties { density } => ties(tensors, w, density),
    };
    Ok(Merged { a: to_mat(&mix(&a, &on_a)), b: to_mat(&mix(&b, &on_b)) })
}

/// PEFT's `ties` (see the module's comment).
fn ties(tensors: &[DMatrix<f64>], weights: &[f64], density: f64) -> DMatrix<f64> {
    let pruned: Vec<DMatrix<f64>> = tensors.iter().map(|t| prune(t, density)).collect();
    let (rows, cols) = tensors[0].shape();
    let mut out = DMatrix::zeros(rows, cols);
    for e in 0..rows * cols {
        let sign = if pruned.iter().map(|p| p[e]).sum::<f64>() >= 0.0 { 1.0 } else { -1.0 };
        let (mut sum, mut count) = (0.0, 0usize);
        for (p, w) in pruned.iter().zip(weights) {
            if p[e] != 0.0 && p[e].signum() == sign {
                sum += p[e] * w;
                count += 1;
            }
        }
        out[e] = sum / count.max(1) as f64;
    }
    out
}

/// `magnitude_based_pruning`: the int(density · size) entries largest in magnitude.
fn prune(t: &DMatrix<f64>, density: f64) -> DMatrix<f64> {
    if density >= 1.0 {
        return t.clone();
    }
    let keep = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = DMatrix::zeros(t.nrows(), t.ncols());
    for &i in &order[..keep] {
        out[i] = t[i];
    }
    out
}
