//! The CPU's backward ops (`Backward`): the reference of the GPU's kernels.

use super::gemm::{self, View};
use super::{rows_from, Cpu};
use crate::backend::backward::{slope, Backward};
use crate::backend::{Activation, AttentionSpec};
use crate::mat::Mat;
use crate::profile::{mul_adds, span};
use std::borrow::Cow;
use std::ops::Range;

fn view(m: &Mat) -> View<'_, f32> {
    View::rows(&m.data, m.rows, m.cols)
}

/// The weights as plain f32 (a CPU weight may be kept in f16/bf16).
fn dense(w: &Mat) -> Cow<'_, Mat> {
    if w.half.is_some() {
        Cow::Owned(w.to_f32())
    } else {
        Cow::Borrowed(w)
    }
}

impl Backward for Cpu {
    fn matmul(&self, dy: &Mat, w: &Mat) -> Mat {
        assert_eq!(dy.cols, w.rows, "matmul: dy has {} columns, w {} rows", dy.cols, w.rows);
        let _p = span("matmul", mul_adds(&[dy.rows, w.rows, w.cols]));
        let w = dense(w);
        Mat::new(dy.rows, w.cols, gemm::product(view(dy), view(&w)))
    }

    fn add_matmul_tn(&self, acc: &mut Mat, x: &Mat, y: &Mat) {
        assert_eq!((x.rows, acc.rows, acc.cols), (y.rows, x.cols, y.cols), "add_matmul_tn: shapes");
        let _p = span("matmul", mul_adds(&[x.rows, x.cols, y.cols]));
        gemm::matmul(&mut acc.data, view(x).t(), view(y), true);
    }

    fn zeros(&self, rows: usize, cols: usize) -> Mat {
        Mat::zeros(rows, cols)
    }

    fn concat_cols(&self, parts: &[&Mat]) -> Mat {
        let _p = span("copy rows", 0.0);
        let rows = parts.first().map_or(0, |p| p.rows);
        assert!(parts.iter().all(|p| p.rows == rows), "concat_cols: parts of different rows");
        let cols = parts.iter().map(|p| p.cols).sum();
        rows_from(rows, cols, |r, out| {
            let mut at = 0;
            for p in parts {
                out[at..at + p.cols].copy_from_slice(p.row(r));
                at += p.cols;
            }
        })
    }

    fn rms_norm_backward(&self, x: &Mat, gamma: &Mat, eps: f32, dy: &Mat) -> Mat {
        let _p = span("norm", 0.0);
        let w = gamma.data.len();
        assert!(w > 0 && x.cols.is_multiple_of(w), "rms_norm_backward: gamma's width {w} must divide {}", x.cols);
        assert_eq!(x.shape(), dy.shape(), "rms_norm_backward: dy must have x's shape");
        // Each group of w columns is a row of its own (the whole row, or one head).
        let groups = rows_from(x.rows * x.cols / w, w, |i, dx| {
            let (x, dy) = (&x.data[i * w..(i + 1) * w], &dy.data[i * w..(i + 1) * w]);
            let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / w as f64;
            let rho = 1.0 / (ms + eps as f64).sqrt();
            let dot: f64 = x.iter().zip(dy).zip(&gamma.data).map(|((&x, &d), &g)| (x * g * d) as f64).sum();
            let c = rho * rho * rho * dot / w as f64;
            for (((o, &x), &d), &g) in dx.iter_mut().zip(x).zip(dy).zip(&gamma.data) {
                *o = (rho * (g * d) as f64 - c * x as f64) as f32;
            }
        });
        Mat::new(x.rows, x.cols, groups.data)
    }

    fn gate_backward(&self, gate: &Mat, act_gate: &Mat, up: &Mat, dz: &Mat, act: Activation) -> (Mat, Mat) {
        let _p = span("activation", 0.0);
        assert!(
            [gate.shape(), act_gate.shape(), up.shape()].iter().all(|&s| s == dz.shape()),
            "gate_backward: shapes differ"
        );
        let (mut dgate, mut dup) = (dz.clone(), dz.clone());
        let pre = gate.data.iter().zip(&act_gate.data);
        for ((dg, du), ((&g, &f), &u)) in dgate.data.iter_mut().zip(dup.data.iter_mut()).zip(pre.zip(&up.data)) {
            *dg *= u * slope(act, g, f);
            *du *= f;
        }
        (dgate, dup)
    }

    /// Recomputes each query's probabilities, one (sequence, head, query) at a time.
    fn attention_backward(
        &self,
        q: &Mat,
        k: &Mat,
        v: &Mat,
        dout: &Mat,
        spec: &AttentionSpec,
        seqs: &[Range<usize>],
    ) -> (Mat, Mat, Mat) {
        let _p = span("attention", 0.0);
        assert!(spec.causal, "attention_backward: causal self-attention only");
        let (hd, group) = (spec.head_dim, spec.heads / spec.kv_heads);
        let (mut dq, mut dk, mut dv) =
            (Mat::zeros(q.rows, q.cols), Mat::zeros(k.rows, k.cols), Mat::zeros(v.rows, v.cols));
        let mut p = Vec::new();
        let mut ds = Vec::new();
        for s in seqs {
            for h in 0..spec.heads {
                let (qc, kc) = (h * hd, (h / group) * hd);
                for i in s.clone() {
                    let lo = spec.window.map_or(s.start, |w| (i + 1).saturating_sub(w).max(s.start));
                    let qi = &q.row(i)[qc..qc + hd];
                    p.clear();
                    let mut raw = Vec::with_capacity(i + 1 - lo);
                    for j in lo..=i {
                        let dot: f32 = qi.iter().zip(&k.row(j)[kc..kc + hd]).map(|(a, b)| a * b).sum();
                        let x = dot * spec.scale;
                        raw.push(x);
                        p.push(spec.softcap.map_or(x, |c| c * (x / c).tanh()));
                    }
                    let max = p.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    p.iter_mut().for_each(|v| *v = (*v - max).exp());
                    let sum: f32 = p.iter().sum();
                    p.iter_mut().for_each(|v| *v /= sum);
                    let doi = &dout.row(i)[qc..qc + hd];
                    ds.clear();
                    for (jj, j) in (lo..=i).enumerate() {
                        ds.push(doi.iter().zip(&v.row(j)[kc..kc + hd]).map(|(a, b)| a * b).sum::<f32>());
                        let dvj = &mut dv.data[j * v.cols + kc..j * v.cols + kc + hd];
                        dvj.iter_mut().zip(doi).for_each(|(o, d)| *o += p[jj] * d);
                    }
                    let mean: f32 = p.iter().zip(&ds).map(|(a, b)| a * b).sum();
                    for (jj, j) in (lo..=i).enumerate() {
                        let mut g = p[jj] * (ds[jj] - mean);
                        if let Some(c) = spec.softcap {
                            let t = (raw[jj] / c).tanh();
                            g *= 1.0 - t * t;
                        }
                        let g = g * spec.scale;
                        let (kj, dqi) = (&k.row(j)[kc..kc + hd], &mut dq.data[i * q.cols + qc..i * q.cols + qc + hd]);
                        dqi.iter_mut().zip(kj).for_each(|(o, kv)| *o += g * kv);
                        let dkj = &mut dk.data[j * k.cols + kc..j * k.cols + kc + hd];
                        dkj.iter_mut().zip(qi).for_each(|(o, qv)| *o += g * qv);
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}
