//! The exported adapter: lossless rank-Σr round trip through the PEFT reader, rank reduction
//! against a dense SVD, and the config PEFT needs to rebuild every module's scale.

mod common;
use common::*;
use iteris::formats::peft::Adapter;
use iteris::formats::safetensors::TensorFile;
use iteris::merge::export::{dense, reduce_rank};
use iteris::merge::solve::to_f64;
use iteris::merge::Options;

#[test]
fn lossless_export_round_trips_through_the_peft_reader() {
    for arch in ["gpt2", "llama"] {
        let r = merge(arch, &Options::published());
        let w = TensorFile::parse("merged", r.adapter_weights.clone()).unwrap();
        let back = Adapter::parse("merged", "adapter_config.json", &r.adapter_config, &w).unwrap();
        assert_eq!(back.modules.len(), r.outcome.targets.len());
        for (t, m) in r.outcome.targets.iter().zip(&r.outcome.merged) {
            let l = back.modules.iter().find(|l| l.path == t.path).unwrap();
            assert_eq!(l.scale, 1.0, "{}: scale must be 1", t.path);
            let got = iteris::merge::solve::to_mat(&(to_f64(&l.b) * to_f64(&l.a)));
            assert!(rel(&got, &dense(m)) < 1e-6, "{}", t.path);
            let inputs: usize = t.loras.iter().flatten().map(|l| l.rank()).sum();
            assert_eq!(l.rank(), inputs, "{}: lossless rank is Σr", t.path);
        }
        let cfg: serde_json::Value = serde_json::from_slice(&r.adapter_config).unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["fan_in_fan_out"], arch == "gpt2");
        assert!(
            !cfg["rank_pattern"].as_object().unwrap().is_empty(),
            "{arch}: ranks differ, so rank_pattern is needed"
        );
    }
}

#[test]
fn rank_reduction_is_the_truncated_svd() {
    let r = merge("llama", &Options::published());
    for (t, m) in r.outcome.targets.iter().zip(&r.outcome.merged) {
        let full = to_f64(&dense(m));
        let k = 2.min(m.rank());
        let (red, energy) = reduce_rank(m, k);
        assert_eq!(red.rank(), k);
        let svd = full.clone().svd(false, false);
        let mut s: Vec<f64> = svd.singular_values.iter().copied().collect();
        s.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let total: f64 = s.iter().map(|v| v * v).sum();
        let best: f64 = s[..k].iter().map(|v| v * v).sum::<f64>() / total;
        assert!((energy - best).abs() < 1e-6, "{}: energy {energy} vs dense SVD {best}", t.name);
        let err = (to_f64(&dense(&red)) - &full).norm_squared() / total;
        assert!((err - (1.0 - best)).abs() < 1e-5, "{}: residual {err} vs {}", t.name, 1.0 - best);
    }
    let (same, e) = reduce_rank(&r.outcome.merged[0], 1000);
    assert_eq!((same.rank(), e), (r.outcome.merged[0].rank(), 1.0));
}

#[test]
fn report_carries_metrics_and_solve_path() {
    let r = merge("bert", &Options::published());
    let v = serde_json::to_value(&r.report).unwrap();
    assert_eq!(v["method"], "iteris-sweep");
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["tasks"].as_array().unwrap().len(), 3);
    for m in v["modules"].as_array().unwrap() {
        assert_eq!(m["solve_path"], "cholesky_f64");
        assert_eq!(m["adaptive_weights"].as_array().unwrap().len(), 3);
        let errs = m["alignment_error"].as_array().unwrap();
        assert!(errs.iter().any(|e| e.as_f64().is_some_and(|e| e.is_finite() && e >= 0.0)));
    }
    assert!(v["modules"].as_array().unwrap().iter().any(|m| m["module"] == "pooler.dense"), "the pooler is merged");
    // The inputs were read from absolute paths: the report names them by file or folder name.
    assert!(r.report.tasks[0].adapter.starts_with('/'), "the fixture's adapter is read by its absolute path");
    for t in v["tasks"].as_array().unwrap() {
        for key in ["adapter", "samples_file"] {
            let name = t[key].as_str().unwrap();
            assert!(!name.is_empty() && !name.contains(['/', '\\']), "{key}: {name}");
        }
    }
    assert_eq!(v["tasks"][0]["adapter"], "adapter0");
}

/// BERT's pooler sees one row per sample (5–7 here) against 32 input features: at a weak ridge
/// every task gets one warning, naming the first such module.
#[test]
fn weak_ridge_with_few_rows_warns_once_per_task() {
    let r = merge("bert", &Options { alpha1: 1e-7, alpha2: 1e-7, ..Options::published() });
    assert_eq!(r.outcome.warnings.len(), 3, "{:?}", r.outcome.warnings);
    for (i, w) in r.outcome.warnings.iter().enumerate() {
        assert!(w.starts_with(&format!("task {} has", i + 1)) && w.contains("pooler.dense"), "{w}");
    }
    assert!(merge("bert", &Options::published()).outcome.warnings.is_empty(), "no warning at the default ridge");
}
