//! One suite for every op of every backend family (`Forward`, `Statistics`), written once over
//! `Backend` (`outputs`): the CPU backend is held to float64 definitions written here from each
//! op's contract (`reference`), and the GPU backend to the CPU backend. Inputs are random, with
//! shapes that are not multiples of any tile and row ranges inside batched tensors.
//! (Shapes stay small: CI runs the GPU half on Mesa's lavapipe.)

use iteris::backend::prelude::*;
use iteris::backend::{cpu::Cpu, Activation, AttentionSpec, Reads};
use iteris::mat::Mat;
use pollster::FutureExt;
use std::ops::Range;

mod common;
use common::gpu_or_skip;
use common::rng::Rng;

/// Every op's output on `be`, by name, from the inputs `Inputs::new` draws (f64 for comparison).
fn outputs<B: Backend>(be: &B, i: &Inputs) -> Vec<(String, Vec<f64>)> {
    let up = |m: &Mat| be.upload(m);
    let down = |t: &B::T| be.download(t).block_on().unwrap().data.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let mut out = Vec::new();
    let (x, w, d) = (up(&i.x), up(&i.w), up(&i.d));
    out.push(("matmul_t".into(), down(&be.matmul_t(&x, i.rows.clone(), &w))));
    let mut y = up(&i.y);
    be.add_rows(&mut y, i.rows.clone(), &d, -0.75);
    out.push(("add_rows".into(), down(&y)));
    let mut y = up(&i.y);
    be.add_bias(&mut y, &up(&i.bias));
    out.push(("add_bias".into(), down(&y)));
    let mut y = up(&i.y);
    be.scale(&mut y, 1.5);
    out.push(("scale".into(), down(&y)));
    let mut y = up(&i.y);
    be.mul(&mut y, &up(&i.y2));
    out.push(("mul".into(), down(&y)));
    for act in ACTIVATIONS {
        let mut y = up(&i.y);
        be.activate(&mut y, act);
        out.push((format!("activate {act:?}"), down(&y)));
    }
    let (gamma, beta) = (up(&i.bias), up(&i.beta));
    out.push(("layer_norm".into(), down(&be.layer_norm(&up(&i.y), &gamma, Some(&beta), 1e-5))));
    out.push(("rms_norm".into(), down(&be.rms_norm(&up(&i.y), &gamma, 1e-6))));
    out.push(("rms_norm per head".into(), down(&be.rms_norm(&up(&i.q), &up(&i.head_gamma), 1e-6))));
    let mut q = up(&i.q);
    be.rope(&mut q, &i.positions, HEAD_DIM, &i.inv_freq, 1.25);
    out.push(("rope".into(), down(&q)));
    let (q, k, v) = (up(&i.q), up(&i.k), up(&i.v));
    for (name, spec) in specs() {
        out.push((format!("attention {name}"), down(&be.attention(&q, &k, &v, &spec, &i.queries, &i.keys))));
    }
    out.push(("select_rows".into(), down(&be.select_rows(&up(&i.y), &i.pick))));
    out.push(("slice_cols".into(), down(&be.slice_cols(&up(&i.y), 3..11))));
    let mut y = up(&i.y);
    be.write_rows(&mut y, &WRITE, &up(&i.src));
    out.push(("write_rows".into(), down(&y)));
    out.push(("mix_rows".into(), down(&be.mix_rows(&up(&i.y), 1..5, 0.25, &up(&i.y2), 3..7, -2.0))));
    let (a, b) = (up(&i.lora_a), up(&i.lora_b));
    out.push(("lowrank".into(), down(&be.lowrank(&x, i.rows.clone(), &a, &b, 0.5))));
    let mut y = up(&i.y_wide);
    let t = be.add_lowrank(&mut y, 0..i.rows.len(), &x, i.rows.clone(), &a, &b, 0.5);
    out.push(("add_lowrank".into(), down(&y)));
    out.push(("add_lowrank factor".into(), down(&t)));
    // Statistics: deferred, accumulated over two row ranges, fetched in one batch.
    let (x2, y2) = (up(&i.y), up(&i.y2));
    let mut reads = Reads::<B>::new();
    let g = be.defer_gram(&x2, 0..5, &y2, 2..7);
    let g = reads.gram(g);
    be.add_gram(reads.gram_mut(g), &x2, 5..9, &y2, 7..11);
    let p = reads.gram(be.defer_projected_gram(&a, 0.5, &x, i.rows.clone(), &y, 0..i.rows.len()));
    let n = reads.scalar(be.defer_sq_norm(&x2, 2..9));
    let more = be.defer_sq_norm(&y2, 0..3);
    be.add_scalar(reads.scalar_mut(n), more);
    let dist = reads.scalar(be.defer_sq_dist(&x2, &y2));
    let dot = reads.scalar(be.defer_dot(&x2, &y2));
    let values = be.fetch(reads).block_on().unwrap();
    out.push(("gram".into(), values.gram(g).data.clone()));
    out.push(("projected gram".into(), values.gram(p).data.clone()));
    // Scalars come back in the order they were recorded.
    let _ = (n, dist, dot);
    out.push(("sq_norm".into(), vec![values.scalars[0]]));
    out.push(("sq_dist".into(), vec![values.scalars[1]]));
    out.push(("dot".into(), vec![values.scalars[2]]));
    out
}

const HEAD_DIM: usize = 8;
/// The rows `write_rows` writes (distinct: the order of two writes to one row is not defined).
const WRITE: [u32; 4] = [4, 0, 11, 7];
const ACTIVATIONS: [Activation; 5] =
    [Activation::GeluErf, Activation::GeluTanh, Activation::Silu, Activation::Relu, Activation::Tanh];

/// The attention variants: 4 query heads over 2 key/value heads.
fn specs() -> Vec<(&'static str, AttentionSpec)> {
    let base = AttentionSpec {
        heads: 4,
        kv_heads: 2,
        head_dim: HEAD_DIM,
        causal: true,
        window: None,
        scale: 0.35,
        softcap: None,
    };
    vec![
        ("causal", base.clone()),
        ("bidirectional", AttentionSpec { causal: false, ..base.clone() }),
        ("sliding window", AttentionSpec { window: Some(3), ..base.clone() }),
        ("soft-capped", AttentionSpec { softcap: Some(2.0), ..base }),
    ]
}

/// The inputs every backend gets.
struct Inputs {
    x: Mat,
    rows: Range<usize>,
    w: Mat,
    y: Mat,
    y2: Mat,
    d: Mat,
    bias: Mat,
    beta: Mat,
    q: Mat,
    head_gamma: Mat,
    k: Mat,
    v: Mat,
    positions: Vec<u32>,
    inv_freq: Vec<f32>,
    /// Two sequences: 5 queries over 7 keys (a cache's 2 earlier tokens), 4 over 4.
    queries: Vec<Range<usize>>,
    keys: Vec<Range<usize>>,
    pick: Vec<u32>,
    /// `WRITE.len()` rows that `write_rows` writes.
    src: Mat,
    lora_a: Mat,
    lora_b: Mat,
    y_wide: Mat,
}

impl Inputs {
    fn new(seed: u64) -> Inputs {
        let mut r = Rng(seed);
        let (m, k, n) = (13, 37, 21);
        Inputs {
            x: r.mat(m, k),
            rows: 2..11,
            w: r.mat(n, k),
            y: r.scaled(12, 16, 2.0),
            y2: r.mat(12, 16),
            d: r.mat(9, 16),
            bias: r.mat(1, 16),
            beta: r.mat(1, 16),
            q: r.mat(9, 4 * HEAD_DIM),
            head_gamma: r.mat(1, HEAD_DIM),
            k: r.mat(11, 2 * HEAD_DIM),
            v: r.mat(11, 2 * HEAD_DIM),
            positions: vec![2, 3, 4, 5, 6, 0, 1, 2, 3],
            inv_freq: vec![1.0, 0.3, 0.05],
            queries: vec![0..5, 5..9],
            keys: vec![0..7, 7..11],
            pick: vec![4, 0, 11, 7, 7],
            src: r.mat(WRITE.len(), 16),
            lora_a: r.mat(3, k),
            lora_b: r.mat(n, 3),
            y_wide: r.mat(9, n),
        }
    }
}

// ---------- the float64 definitions ----------

fn f64s(m: &Mat) -> Vec<f64> {
    m.data.iter().map(|&v| v as f64).collect()
}

fn at(m: &Mat, r: usize, c: usize) -> f64 {
    m.data[r * m.cols + c] as f64
}

fn matmul_t(x: &Mat, rows: Range<usize>, w: &Mat) -> Vec<f64> {
    rows.flat_map(|r| (0..w.rows).map(move |o| (0..x.cols).map(|c| at(x, r, c) * at(w, o, c)).sum::<f64>())).collect()
}

fn activate(v: f64, act: Activation) -> f64 {
    match act {
        Activation::GeluErf => 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
        }
        Activation::Silu => v / (1.0 + (-v).exp()),
        Activation::Relu => v.max(0.0),
        Activation::Tanh => v.tanh(),
    }
}

/// Each group of `g` values normalised by its root mean square, times gamma.
fn rms_norm(x: &[f64], gamma: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(gamma.len())
        .flat_map(|row| {
            let rms = (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt();
            row.iter().zip(gamma).map(move |(v, g)| v / rms * g)
        })
        .collect()
}

fn attention(i: &Inputs, spec: &AttentionSpec) -> Vec<f64> {
    let (hd, group) = (spec.head_dim, spec.heads / spec.kv_heads);
    let mut out = vec![0.0; i.q.rows * i.q.cols];
    for (qs, ks) in i.queries.iter().zip(&i.keys) {
        let off = ks.len() - qs.len();
        for (t, row) in qs.clone().enumerate() {
            let pos = off + t;
            for h in 0..spec.heads {
                let kh = h / group;
                let seen: Vec<usize> = (0..ks.len())
                    .filter(|&j| !spec.causal || j <= pos)
                    .filter(|&j| spec.window.is_none_or(|w| pos < j + w))
                    .collect();
                let scores: Vec<f64> = seen
                    .iter()
                    .map(|&j| {
                        let s = (0..hd)
                            .map(|c| at(&i.q, row, h * hd + c) * at(&i.k, ks.start + j, kh * hd + c))
                            .sum::<f64>()
                            * spec.scale as f64;
                        spec.softcap.map_or(s, |cap| cap as f64 * (s / cap as f64).tanh())
                    })
                    .collect();
                let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    out[row * i.q.cols + h * hd + c] =
                        seen.iter().zip(&e).map(|(&j, p)| p / z * at(&i.v, ks.start + j, kh * hd + c)).sum::<f64>();
                }
            }
        }
    }
    out
}

fn gram(x: &Mat, xr: Range<usize>, y: &Mat, yr: Range<usize>) -> Vec<f64> {
    (0..x.cols)
        .flat_map(|a| {
            let (xr, yr) = (xr.clone(), yr.clone());
            (0..y.cols).map(move |b| xr.clone().zip(yr.clone()).map(|(p, q)| at(x, p, a) * at(y, q, b)).sum::<f64>())
        })
        .collect()
}

/// Every op's output by its definition, in `outputs`' order.
fn reference(i: &Inputs) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    let cols = i.y.cols;
    out.push(("matmul_t".into(), matmul_t(&i.x, i.rows.clone(), &i.w)));
    let mut y = f64s(&i.y);
    for (r, row) in i.rows.clone().enumerate() {
        for c in 0..cols {
            y[row * cols + c] += -0.75 * at(&i.d, r, c);
        }
    }
    out.push(("add_rows".into(), y));
    out.push(("add_bias".into(), f64s(&i.y).iter().enumerate().map(|(k, v)| v + at(&i.bias, 0, k % cols)).collect()));
    out.push(("scale".into(), f64s(&i.y).iter().map(|v| 1.5 * v).collect()));
    out.push(("mul".into(), f64s(&i.y).iter().zip(f64s(&i.y2)).map(|(a, b)| a * b).collect()));
    for act in ACTIVATIONS {
        out.push((format!("activate {act:?}"), f64s(&i.y).iter().map(|&v| activate(v, act)).collect()));
    }
    let (gamma, beta) = (f64s(&i.bias), f64s(&i.beta));
    let ln = f64s(&i.y)
        .chunks(cols)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
            let sd = (var + 1e-5).sqrt();
            row.iter().zip(&gamma).zip(&beta).map(move |((v, g), b)| (v - mean) / sd * g + b).collect::<Vec<_>>()
        })
        .collect();
    out.push(("layer_norm".into(), ln));
    out.push(("rms_norm".into(), rms_norm(&f64s(&i.y), &gamma, 1e-6)));
    out.push(("rms_norm per head".into(), rms_norm(&f64s(&i.q), &f64s(&i.head_gamma), 1e-6)));
    let mut q = f64s(&i.q);
    let half = i.inv_freq.len();
    for (t, row) in q.chunks_mut(i.q.cols).enumerate() {
        for head in row.chunks_mut(HEAD_DIM) {
            for (k, &f) in i.inv_freq.iter().enumerate() {
                let angle = i.positions[t] as f64 * f as f64;
                let (sin, cos) = (1.25 * angle.sin(), 1.25 * angle.cos());
                let (a, b) = (head[k], head[k + half]);
                head[k] = a * cos - b * sin;
                head[k + half] = b * cos + a * sin;
            }
        }
    }
    out.push(("rope".into(), q));
    for (name, spec) in specs() {
        out.push((format!("attention {name}"), attention(i, &spec)));
    }
    out.push((
        "select_rows".into(),
        i.pick.iter().flat_map(|&r| (0..cols).map(move |c| at(&i.y, r as usize, c))).collect(),
    ));
    out.push(("slice_cols".into(), (0..i.y.rows).flat_map(|r| (3..11).map(move |c| at(&i.y, r, c))).collect()));
    let mut y = f64s(&i.y);
    for (s, &r) in WRITE.iter().enumerate() {
        for c in 0..cols {
            y[r as usize * cols + c] = at(&i.src, s, c);
        }
    }
    out.push(("write_rows".into(), y));
    out.push((
        "mix_rows".into(),
        (0..4).flat_map(|r| (0..cols).map(move |c| 0.25 * at(&i.y, 1 + r, c) - 2.0 * at(&i.y2, 3 + r, c))).collect(),
    ));
    // s · x Aᵀ Bᵀ, and its factor s · x Aᵀ.
    let t: Vec<f64> = matmul_t(&i.x, i.rows.clone(), &i.lora_a).iter().map(|v| 0.5 * v).collect();
    let r = i.lora_a.rows;
    let delta: Vec<f64> = t
        .chunks(r)
        .flat_map(|tr| (0..i.lora_b.rows).map(move |o| (0..r).map(|k| tr[k] * at(&i.lora_b, o, k)).sum::<f64>()))
        .collect();
    out.push(("lowrank".into(), delta.clone()));
    out.push(("add_lowrank".into(), f64s(&i.y_wide).iter().zip(&delta).map(|(a, b)| a + b).collect()));
    out.push(("add_lowrank factor".into(), t.clone()));
    let g: Vec<f64> =
        gram(&i.y, 0..5, &i.y2, 2..7).iter().zip(gram(&i.y, 5..9, &i.y2, 7..11)).map(|(a, b)| a + b).collect();
    out.push(("gram".into(), g));
    // (s · A xᵀ) · y_wide: the Gram of the factor t with y_wide's rows.
    let n = i.rows.len();
    let y_wide = &out.iter().find(|(k, _)| k == "add_lowrank").unwrap().1.clone();
    let mut proj = Vec::new();
    for a in 0..r {
        for b in 0..i.y_wide.cols {
            proj.push((0..n).map(|p| t[p * r + a] * y_wide[p * i.y_wide.cols + b]).sum::<f64>());
        }
    }
    out.push(("projected gram".into(), proj));
    let sq =
        |m: &Mat, rows: Range<usize>| rows.flat_map(|r| (0..m.cols).map(move |c| at(m, r, c).powi(2))).sum::<f64>();
    out.push(("sq_norm".into(), vec![sq(&i.y, 2..9) + sq(&i.y2, 0..3)]));
    out.push(("sq_dist".into(), vec![f64s(&i.y).iter().zip(f64s(&i.y2)).map(|(a, b)| (a - b).powi(2)).sum()]));
    out.push(("dot".into(), vec![f64s(&i.y).iter().zip(f64s(&i.y2)).map(|(a, b)| a * b).sum()]));
    out
}

/// ‖got − want‖ / ‖want‖ per op, each under `tol`.
fn compare(what: &str, got: &[(String, Vec<f64>)], want: &[(String, Vec<f64>)], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: ops");
    let mut bad = Vec::new();
    for ((name, g), (wname, w)) in got.iter().zip(want) {
        assert_eq!(name, wname, "{what}: op order");
        assert_eq!(g.len(), w.len(), "{what}: {name}'s size");
        let num: f64 = g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let den: f64 = w.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-30);
        // A NaN fails too.
        if (num / den).is_nan() || num / den >= tol {
            bad.push(format!("{name}: {:.2e}", num / den));
        }
    }
    assert!(bad.is_empty(), "{what}: ops beyond {tol:.0e}: {}", bad.join(", "));
}

#[test]
fn cpu_ops_match_their_float64_definitions() {
    for seed in [1, 2, 3] {
        let i = Inputs::new(seed);
        compare(&format!("cpu, seed {seed}"), &outputs(&Cpu, &i), &reference(&i), 2e-6);
    }
}

#[test]
fn gpu_ops_match_the_cpu() {
    let Some(g) = gpu_or_skip("gpu_ops_match_the_cpu") else { return };
    for seed in [1, 2, 3] {
        let i = Inputs::new(seed);
        compare(&format!("gpu ({}), seed {seed}", g.name()), &outputs(&g, &i), &outputs(&Cpu, &i), 2e-6);
    }
}
