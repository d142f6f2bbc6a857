//! The data-free merges of 2024–25 against independent float64 numpy implementations written from
//! the papers' equations, and PEFT's own linear and TIES merges against PEFT's
//! `add_weighted_adapter` (tools/data_free_reference.py → tests/fixtures/data_free.safetensors): on
//! modules with adapters of different ranks and scales, one adapter absent, Σr above min(out, in),
//! and unequal weights, each merged delta within 1e-6; PEFT's merges refuse adapters of different
//! ranks, as PEFT does.

use iteris::formats::peft::LoraModule;
use iteris::formats::safetensors::TensorFile;
use iteris::merge::baselines::{merge_data_free, BaselineSettings, Method};
use iteris::merge::iteris::Target;
use iteris::merge::solve::to_f64;
use std::path::PathBuf;

fn fixture() -> TensorFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data_free.safetensors");
    TensorFile::parse("data_free.safetensors", std::fs::read(path).unwrap()).unwrap()
}

/// Case k's module and weights.
fn case(f: &TensorFile, k: usize) -> Option<(Target, Vec<f64>)> {
    let scale = f.mat(&format!("case{k}.scale")).ok()?.data;
    let weights: Vec<f64> = f.mat(&format!("case{k}.weights")).unwrap().data.iter().map(|&w| w as f64).collect();
    let loras: Vec<Option<LoraModule>> = (0..scale.len())
        .map(|t| {
            let a = f.mat(&format!("case{k}.a{t}")).ok()?;
            let b = f.mat(&format!("case{k}.b{t}")).unwrap();
            Some(LoraModule { path: "m".into(), a, b, scale: scale[t] })
        })
        .collect();
    let first = loras.iter().flatten().next().unwrap();
    let (out_dim, in_dim) = (first.b.rows, first.a.cols);
    Some((Target { name: "m".into(), path: "m".into(), out_dim, in_dim, loras }, weights))
}

#[test]
fn each_method_matches_its_float64_reference() {
    let f = fixture();
    let mut cases = 0;
    // Every data-free method but the five `tests/baselines.rs` checks directly.
    let older = [Method::Linear, Method::Cat, Method::Ties, Method::Dare, Method::Svd];
    let methods: Vec<Method> = Method::ALL.into_iter().filter(|m| m.data_free() && !older.contains(m)).collect();
    assert_eq!(methods.len(), 8);
    for k in 0.. {
        let Some((t, weights)) = case(&f, k) else { break };
        cases += 1;
        for &method in &methods {
            let s = BaselineSettings {
                weights: Some(weights.clone()),
                density: 0.5,
                seed: 0,
                rank: None,
                common_space: 0.8,
            };
            let merged = merge_data_free(method, std::slice::from_ref(&t), &s);
            let Ok(want) = f.mat(&format!("case{k}.{}", method.name())) else {
                // PEFT's merges where the ranks differ: refused, as PEFT refuses them.
                let e = merged.err().unwrap_or_else(|| panic!("case {k} {}: ranks differ, yet merged", method.name()));
                assert!(e.to_string().contains("one rank"), "{e}");
                continue;
            };
            let (m, energy) = &merged.unwrap()[0];
            let (got, want) = (to_f64(&m.b) * to_f64(&m.a), to_f64(&want));
            let e = (&got - &want).norm() / want.norm();
            eprintln!("case {k} {}: rank {}, within {e:.1e} of the reference", method.name(), m.rank());
            assert!(e < 1e-6, "case {k} {}: differs by {e:.1e}", method.name());
            assert_eq!(*energy, 1.0, "{} is exported exactly", method.name());
        }
    }
    assert_eq!(cases, 5);
}

/// KnOTS with a sum is task arithmetic: knots-linear's default (the average) is linear's, and
/// the SVD basis it merges in changes nothing.
#[test]
fn knots_linear_is_the_average() {
    let f = fixture();
    let (t, _) = case(&f, 1).unwrap();
    let s = BaselineSettings { weights: None, density: 0.5, seed: 0, rank: None, common_space: 0.8 };
    let merged = |m: Method| {
        let (m, _) = &merge_data_free(m, std::slice::from_ref(&t), &s).unwrap()[0];
        to_f64(&m.b) * to_f64(&m.a)
    };
    let (knots, linear) = (merged(Method::KnotsLinear), merged(Method::Linear));
    let e = (&knots - &linear).norm() / linear.norm();
    assert!(e < 1e-6, "knots-linear differs from linear by {e:e} (the factors are stored in f32)");
}
