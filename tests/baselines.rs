//! The baseline merges against direct computations: small random matrices for the data-free
//! methods, and RegMean's closed form at the first module of the GPT-2 fixture (whose input no
//! adapter changes, so the features can be recorded once).

mod common;

use common::rng::Rng;
use common::{base, merge, tasks};
use iteris::backend::cpu::Cpu;
use iteris::formats::peft::LoraModule;
use iteris::mat::Mat;
use iteris::merge::baselines::{dare, merge_data_free, ties, BaselineSettings, Method};
use iteris::merge::export::dense_to_lora;
use iteris::merge::iteris::Target;
use iteris::merge::solve::{to_f64, Merged};
use iteris::merge::{map_targets, tokenize, Options};
use iteris::models::{self, Batch, Hook, Output, StageInput, Stream};
use nalgebra::DMatrix;
use pollster::FutureExt;

const OUT: usize = 12;
const IN: usize = 10;

/// A module targeted by three adapters of ranks 2, 3, 4 (the second one absent when `gap`).
fn target(rng: &mut Rng, gap: bool) -> Target {
    let loras = [2, 3, 4]
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            (!(gap && i == 1)).then(|| LoraModule {
                path: "m".into(),
                a: rng.mat(r, IN),
                b: rng.mat(OUT, r),
                scale: 0.5 + i as f32,
            })
        })
        .collect();
    Target { name: "m".into(), path: "m".into(), out_dim: OUT, in_dim: IN, loras }
}

fn dense_of(m: &Merged) -> DMatrix<f64> {
    to_f64(&m.b) * to_f64(&m.a)
}

fn deltas(t: &Target) -> Vec<DMatrix<f64>> {
    t.loras.iter().map(|l| iteris::merge::baselines::dense(t, l.as_ref())).collect()
}

fn rel(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    (a - b).norm() / b.norm()
}

fn settings(weights: Option<Vec<f64>>, rank: Option<usize>) -> BaselineSettings {
    BaselineSettings { weights, density: 0.5, seed: 7, rank, common_space: 0.8 }
}

#[test]
fn linear_and_cat_are_weighted_sums() {
    let mut rng = Rng(1);
    for gap in [false, true] {
        let t = target(&mut rng, gap);
        let d = deltas(&t);
        let mean = d.iter().fold(DMatrix::zeros(OUT, IN), |s, x| s + x) / 3.0;
        let (m, e) = &merge_data_free(Method::Linear, std::slice::from_ref(&t), &settings(None, None)).unwrap()[0];
        assert!(rel(&dense_of(m), &mean) < 1e-6 && *e == 1.0, "linear = mean of the deltas");
        let w = vec![0.3, -1.0, 2.0];
        let sum = &d[0] * 0.3 - &d[1] + &d[2] * 2.0;
        let (m, _) = &merge_data_free(Method::Cat, std::slice::from_ref(&t), &settings(Some(w), None)).unwrap()[0];
        assert!(rel(&dense_of(m), &sum) < 1e-6, "cat = weighted sum");
        let lossless = if gap { 6 } else { 9 };
        assert_eq!(m.rank(), lossless, "cat keeps every rank");
    }
}

#[test]
fn svd_is_the_best_low_rank_approximation_of_the_sum() {
    let mut rng = Rng(2);
    let t = target(&mut rng, false);
    let sum = deltas(&t).iter().fold(DMatrix::zeros(OUT, IN), |s, x| s + x);
    let sv = sum.clone().svd(false, false).singular_values;
    let mut s2: Vec<f64> = sv.iter().map(|v| v * v).collect();
    s2.sort_by(|a, b| b.total_cmp(a));
    for rank in [None, Some(2), Some(6)] {
        let (m, energy) = &merge_data_free(Method::Svd, std::slice::from_ref(&t), &settings(None, rank)).unwrap()[0];
        let k = rank.unwrap_or(4); // default: the largest adapter rank
        assert_eq!(m.rank(), k);
        // Eckart–Young: the error is exactly the dropped singular values.
        let dropped: f64 = s2[k..].iter().sum();
        let err = (dense_of(m) - &sum).norm_squared();
        assert!((err - dropped).abs() <= 1e-5 * s2.iter().sum::<f64>(), "rank {k}: {err} vs {dropped}");
        assert!((energy - (1.0 - dropped / s2.iter().sum::<f64>())).abs() < 1e-6, "energy kept");
    }
}

#[test]
fn ties_trims_elects_and_averages() {
    // Worked by hand. Density 0.5 keeps the two largest magnitudes of each 2×2 delta.
    let a = DMatrix::from_row_slice(2, 2, &[3.0, -1.0, 0.5, -4.0]); // keeps 3, -4
    let b = DMatrix::from_row_slice(2, 2, &[-2.0, 5.0, 0.1, -1.0]); // keeps -2, 5
    let c = DMatrix::from_row_slice(2, 2, &[1.0, -6.0, 2.0, 0.2]); // keeps -6, 2
                                                                   // Trimmed sums: [3-2, 5-6; 2, -4] = [1, -1; 2, -4] → signs [+, -; +, -].
                                                                   // Disjoint means: [3 (only +), -6 (only -); 2, -4].
    let got = ties(&[a, b, c], 0.5);
    assert_eq!(got, DMatrix::from_row_slice(2, 2, &[3.0, -6.0, 2.0, -4.0]));
    // Through the method: weights scale each delta before trimming, and the export is the SVD at
    // the lossless rank (exact here: ties of rank-≤9 deltas of a 12×10 module keeps rank ≤ 10).
    let mut rng = Rng(3);
    let t = target(&mut rng, false);
    let direct = ties(&deltas(&t), 0.5);
    let (m, energy) = &merge_data_free(Method::Ties, std::slice::from_ref(&t), &settings(None, None)).unwrap()[0];
    let kept = 1.0 - (dense_of(m) - &direct).norm_squared() / direct.norm_squared();
    assert!((kept - energy).abs() < 1e-5, "reported energy is what the rank-9 export keeps");
}

#[test]
fn dare_drops_and_rescales_reproducibly() {
    let mut rng = Rng(4);
    let d = to_f64(&rng.mat(100, 100));
    let one = dare(std::slice::from_ref(&d), 0.3, 11);
    assert_eq!(one, dare(std::slice::from_ref(&d), 0.3, 11), "same seed, same drops");
    assert_ne!(one, dare(std::slice::from_ref(&d), 0.3, 12), "another seed, other drops");
    let mut kept = 0;
    for e in 0..d.len() {
        if one[e] != 0.0 {
            kept += 1;
            assert!((one[e] - d[e] / 0.3).abs() < 1e-12, "survivors are rescaled by 1/density");
        }
    }
    assert!((kept as f64 / d.len() as f64 - 0.3).abs() < 0.02, "about density of the entries survive ({kept})");
    assert!(rel(&dare(&[d.clone(), d.clone()], 1.0, 0), &(&d * 2.0)) < 1e-15, "density 1 is the plain sum");
}

#[test]
fn dense_to_lora_is_exact_at_full_rank() {
    let mut rng = Rng(5);
    let d = to_f64(&rng.mat(OUT, IN));
    let (m, e) = dense_to_lora(&d, IN);
    assert!(rel(&dense_of(&m), &d) < 1e-6 && (e - 1.0).abs() < 1e-12);
}

/// Records the input of one module.
struct Record(String, Option<Mat>);
impl Hook<Cpu> for Record {
    async fn stage(&mut self, _: &Cpu, input: &StageInput<'_, Cpu>, _: &mut [Mat]) -> iteris::Result<()> {
        if input.mods.iter().any(|m| m.name == self.0) {
            self.1 = Some(input.x.clone());
        }
        Ok(())
    }
}

#[test]
fn regmean_matches_its_closed_form() {
    let (base, tasks) = (base("gpt2"), tasks("gpt2"));
    let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
    let adapters: Vec<_> = tasks.iter().map(|t| &t.adapter).collect();
    let targets = map_targets(&model.modules(), &adapters, model.model_type(), true).unwrap();
    let first = &targets[0];
    assert_eq!(first.name, "h.0.attn.c_attn", "the first module reads the embeddings, whatever the adapters");
    let scale = 0.7;
    // G̃_i = scale·X_iᵀX_i + (1 − scale)·diag; ΔW* = Σ ΔW_i G̃_i (Σ G̃_i)⁻¹.
    let mut m = DMatrix::<f64>::zeros(first.in_dim, first.in_dim);
    let mut rhs = DMatrix::<f64>::zeros(first.out_dim, first.in_dim);
    for (i, task) in tasks.iter().enumerate() {
        let (ids, _) = tokenize(&base.tokenizer, &task.samples, 64, None, "s").unwrap();
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Base, &ids);
        let mut rec = Record(first.name.clone(), None);
        models::run(&model, &Cpu, &batch, &mut rec, Output::Nothing).block_on().unwrap();
        let x = rec.1.unwrap();
        let g = common::gram_of(&Cpu, &x, 0..x.rows);
        let mut gs = &g * scale;
        gs.set_diagonal(&g.diagonal());
        m += &gs;
        if let Some(l) = &first.loras[i] {
            rhs += to_f64(&l.b) * to_f64(&l.a) * l.scale as f64 * &gs;
        }
    }
    let want = rhs * m.try_inverse().unwrap();
    let r = merge("gpt2", &Options { method: Method::Regmean, regmean_scale: scale, ..Options::published() });
    let got = dense_of(&r.outcome.merged[0]);
    let e = rel(&got, &want);
    println!("regmean at {}: {e:.2e} from the closed form", first.name);
    assert!(e < 1e-4, "regmean differs from its closed form by {e:.2e}");
    assert_eq!(r.report.method, "regmean");
    assert!(r.report.modules.iter().all(|m| m.adaptive_weights.iter().all(|&c| c == 1.0)), "no adaptive weights");
}

#[test]
fn bad_baseline_settings_are_refused() {
    for (opts, words) in [
        (Options { method: Method::Linear, weights: Some(vec![1.0]), ..Options::published() }, "--weights"),
        (Options { method: Method::Ties, density: 0.0, ..Options::published() }, "--density"),
        (Options { method: Method::Regmean, regmean_scale: 1.5, ..Options::published() }, "--regmean-scale"),
    ] {
        let err = iteris::merge::pipeline::merge(&Cpu, &base("gpt2"), &tasks("gpt2"), &opts, &mut |_| {})
            .block_on()
            .err()
            .expect("refused");
        assert!(err.to_string().contains(words), "{err}");
    }
}
