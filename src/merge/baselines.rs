//! The standard merges IterIS is compared with, from the same adapters. All but RegMean need no
//! data; RegMean runs through the IterIS hook (`Method::Regmean`, see `iteris.rs`).
//!
//! With ΔW_i = s_i B_i A_i (zero where adapter i does not target the module) and weights w_i:
//! - `linear`: Σ w_i ΔW_i with w_i = 1/N unless given (task arithmetic, averaged); exact, rank Σr.
//! - `cat`: PEFT's `cat` combination, Σ w_i ΔW_i with w_i = 1 unless given; exact, rank Σr.
//! - `svd`: Σ w_i ΔW_i (w_i = 1) truncated to a rank (default: the largest adapter rank).
//! - `ties` (Yadav et al. 2023): keep each w_i ΔW_i's largest-magnitude `density` fraction of
//!   entries, elect each entry's sign by the sign of the trimmed sum, and average the entries that
//!   agree with it (disjoint mean).
//! - `dare` (Yu et al. 2024): drop each entry of each ΔW_i with probability 1 − `density`, rescale
//!   the survivors by 1/`density` (seeded), and add them with weights w_i (w_i = 1).
//!
//! The data-free methods of 2024–25, each in its own file with the paper and its equations
//! (weights w_i = 1 unless given, the papers' scaling factor α; each an exact LoRA of rank ≤ Σr):
//! - `iso-c`, `iso-cts` (Marczak et al., ICML 2025, `iso.rs`): the sum's spectrum flattened to its
//!   mean; Iso-CTS first adds each task's own directions beside the sum's top `common_space`.
//! - `tsv` (Gargiulo et al., CVPR 2025, `tsv.rs`): each task's singular vectors, decorrelated by
//!   their orthogonal polar factors, with the tasks' own singular values.
//! - `knots-ties`, `knots-linear` (Stoica et al., ICLR 2025, `knots.rs`): TIES, or the average (w_i
//!   = 1/N unless given), on the tasks' coordinates in the SVD basis of their side-by-side deltas.
//! - `core-ties` (Panariello et al., NeurIPS 2025, `core_space.rs`): TIES on the tasks' cores in
//!   the reference bases of the stacked B's and A's.
//!
//! `peft-linear` and `peft-ties` (`peft_parity.rs`) are PEFT's `add_weighted_adapter`, exactly:
//! the A's and B's combined apart (w_i = 1 unless given; adapters of one rank).
//!
//! TIES and DARE produce dense deltas; they are exported through a truncated SVD at the rank of the
//! lossless merge (Σr) unless `--rank` asks for less, and the energy kept is reported.

use super::export::{dense_to_lora, reduce_rank};
use super::iteris::Target;
use super::peft_parity::{self, Combination};
use super::solve::{to_f64, to_mat, Merged};
use crate::error::{Error, Result};
use nalgebra::DMatrix;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Iteris,
    Regmean,
    #[serde(rename = "regmean++")]
    RegmeanPlus,
    Linear,
    Cat,
    Ties,
    Dare,
    Svd,
    #[serde(rename = "iso-c")]
    IsoC,
    #[serde(rename = "iso-cts")]
    IsoCts,
    Tsv,
    #[serde(rename = "knots-ties")]
    KnotsTies,
    #[serde(rename = "knots-linear")]
    KnotsLinear,
    #[serde(rename = "core-ties")]
    CoreTies,
    #[serde(rename = "peft-linear")]
    PeftLinear,
    #[serde(rename = "peft-ties")]
    PeftTies,
}

impl Method {
    pub const ALL: [Method; 16] = [
        Method::Iteris,
        Method::Regmean,
        Method::RegmeanPlus,
        Method::Linear,
        Method::Cat,
        Method::Ties,
        Method::Dare,
        Method::Svd,
        Method::IsoC,
        Method::IsoCts,
        Method::Tsv,
        Method::KnotsTies,
        Method::KnotsLinear,
        Method::CoreTies,
        Method::PeftLinear,
        Method::PeftTies,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Iteris => "iteris",
            Method::Regmean => "regmean",
            Method::RegmeanPlus => "regmean++",
            Method::Linear => "linear",
            Method::Cat => "cat",
            Method::Ties => "ties",
            Method::Dare => "dare",
            Method::Svd => "svd",
            Method::IsoC => "iso-c",
            Method::IsoCts => "iso-cts",
            Method::Tsv => "tsv",
            Method::KnotsTies => "knots-ties",
            Method::KnotsLinear => "knots-linear",
            Method::CoreTies => "core-ties",
            Method::PeftLinear => "peft-linear",
            Method::PeftTies => "peft-ties",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether the method reads no samples (everything but IterIS and RegMean's two).
    pub fn data_free(self) -> bool {
        !matches!(self, Method::Iteris | Method::Regmean | Method::RegmeanPlus)
    }
}

/// Settings of the data-free baselines.
#[derive(Clone, Debug)]
pub struct BaselineSettings {
    /// Per adapter; None: the method's default (1/N for linear, 1 otherwise).
    pub weights: Option<Vec<f64>>,
    /// Fraction of entries TIES keeps, and DARE's keep probability.
    pub density: f64,
    /// DARE's random seed.
    pub seed: u64,
    /// Rank of the exported delta for svd (default: the largest adapter rank).
    pub rank: Option<usize>,
    /// Iso-CTS: the fraction of the sum's directions kept as the common subspace.
    pub common_space: f64,
}

/// Merge every target with a data-free `method`. Returns per target the merged LoRA and the
/// fraction of the merged delta's energy the export keeps (1 where exact). IterIS and RegMean
/// need samples and the model: they are refused here.
pub fn merge_data_free(method: Method, targets: &[Target], s: &BaselineSettings) -> Result<Vec<(Merged, f64)>> {
    let n = targets.first().map_or(0, |t| t.loras.len());
    // The methods of 2024–25 give exact LoRAs; `--rank` truncates them, reporting the energy kept.
    let at_rank = |m: Merged| match s.rank {
        Some(r) => reduce_rank(&m, r),
        None => (m, 1.0),
    };
    let average = matches!(method, Method::Linear | Method::KnotsLinear);
    let weights: Vec<f64> = s.weights.clone().unwrap_or_else(|| vec![if average { 1.0 / n as f64 } else { 1.0 }; n]);
    targets
        .iter()
        .enumerate()
        .map(|(k, t)| {
            Ok(match method {
                Method::Linear | Method::Cat => (weighted_cat(t, &weights), 1.0),
                Method::IsoC => at_rank(super::iso::iso_c(t, &weights)),
                Method::IsoCts => at_rank(super::iso::iso_cts(t, &weights, s.common_space)),
                Method::Tsv => at_rank(super::tsv::tsv(t, &weights)),
                Method::KnotsTies => at_rank(super::knots::knots(t, &weights, |c| ties(c, s.density))),
                Method::KnotsLinear => at_rank(super::knots::knots(t, &weights, |c| c.iter().sum())),
                Method::CoreTies => at_rank(super::core_space::core_ties(t, &weights, s.density)),
                Method::PeftLinear => (peft_parity::combine(t, &weights, Combination::Linear)?, 1.0),
                Method::PeftTies => (peft_parity::combine(t, &weights, Combination::Ties { density: s.density })?, 1.0),
                Method::Svd => {
                    let r = s.rank.unwrap_or_else(|| t.loras.iter().flatten().map(|l| l.rank()).max().unwrap_or(1));
                    reduce_rank(&weighted_cat(t, &weights), r)
                }
                Method::Ties | Method::Dare => {
                    let deltas: Vec<DMatrix<f64>> =
                        t.loras.iter().zip(&weights).map(|(l, &w)| dense(t, l.as_ref()) * w).collect();
                    let merged = if method == Method::Ties {
                        ties(&deltas, s.density)
                    } else {
                        dare(&deltas, s.density, s.seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    };
                    let lossless: usize = t.loras.iter().flatten().map(|l| l.rank()).sum();
                    dense_to_lora(&merged, s.rank.unwrap_or(lossless).min(lossless))
                }
                Method::Iteris | Method::Regmean | Method::RegmeanPlus => {
                    return Err(Error::Unsupported(format!(
                        "{method:?} needs samples and the model: it is not a data-free merge"
                    )))
                }
            })
        })
        .collect()
}

/// B* = [w_i s_i B_i], A* = [A_i]: exactly Σ w_i ΔW_i.
pub(crate) fn weighted_cat(t: &Target, weights: &[f64]) -> Merged {
    let loras: Vec<_> = t.loras.iter().zip(weights).filter_map(|(l, &w)| l.as_ref().map(|l| (l, w))).collect();
    let mut a = DMatrix::<f64>::zeros(loras.iter().map(|(l, _)| l.rank()).sum(), t.in_dim);
    let mut b = DMatrix::<f64>::zeros(t.out_dim, a.nrows());
    let mut at = 0;
    for (l, w) in loras {
        let r = l.rank();
        a.view_mut((at, 0), (r, t.in_dim)).copy_from(&to_f64(&l.a));
        b.view_mut((0, at), (t.out_dim, r)).copy_from(&(to_f64(&l.b) * (w * l.scale as f64)));
        at += r;
    }
    Merged { a: to_mat(&a), b: to_mat(&b) }
}

/// s B A, or zeros where the adapter does not target the module.
pub fn dense(t: &Target, lora: Option<&crate::formats::peft::LoraModule>) -> DMatrix<f64> {
    match lora {
        Some(l) => to_f64(&l.b) * to_f64(&l.a) * l.scale as f64,
        None => DMatrix::zeros(t.out_dim, t.in_dim),
    }
}

/// TIES: trim each task delta to its top `density` fraction by magnitude, elect signs, disjoint mean.
pub fn ties(deltas: &[DMatrix<f64>], density: f64) -> DMatrix<f64> {
    let trimmed: Vec<DMatrix<f64>> = deltas.iter().map(|d| trim(d, density)).collect();
    let (rows, cols) = deltas[0].shape();
    let mut out = DMatrix::zeros(rows, cols);
    for e in 0..rows * cols {
        let sign = trimmed.iter().map(|t| t[e]).sum::<f64>().signum();
        let agree: Vec<f64> = trimmed.iter().map(|t| t[e]).filter(|&v| v != 0.0 && v.signum() == sign).collect();
        if !agree.is_empty() {
            out[e] = agree.iter().sum::<f64>() / agree.len() as f64;
        }
    }
    out
}

/// Keep the `density` fraction of entries largest in magnitude (ties at the threshold kept).
fn trim(d: &DMatrix<f64>, density: f64) -> DMatrix<f64> {
    let keep = ((d.len() as f64 * density).round() as usize).min(d.len());
    if keep == 0 {
        return DMatrix::zeros(d.nrows(), d.ncols());
    }
    let mut mags: Vec<f64> = d.iter().map(|v| v.abs()).collect();
    let idx = d.len() - keep;
    mags.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    let threshold = mags[idx];
    d.map(|v| if v.abs() >= threshold { v } else { 0.0 })
}

/// DARE: drop with probability 1 − density, rescale by 1/density, sum.
pub fn dare(deltas: &[DMatrix<f64>], density: f64, seed: u64) -> DMatrix<f64> {
    let mut rng = SplitMix64(seed);
    let mut out = DMatrix::zeros(deltas[0].nrows(), deltas[0].ncols());
    for d in deltas {
        for e in 0..d.len() {
            if rng.unit() < density {
                out[e] += d[e] / density;
            }
        }
    }
    out
}

/// Seeded numbers for DARE (SplitMix64: the same drops for the same seed everywhere); also the
/// generator of `tools/make_model.rs`.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
