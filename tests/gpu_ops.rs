//! Every GPU kernel against the CPU backend (the reference) on randomized small shapes, including
//! shapes that are not multiples of the tiles and row ranges inside batched tensors. Runs on any
//! adapter wgpu finds; CI installs Mesa's lavapipe (software Vulkan), so keep shapes small.

use iteris::backend::prelude::*;

use iteris::backend::{cpu::Cpu, gpu::Gpu, Activation, AttentionSpec, Backward};
use iteris::mat::{rel_err, Mat};
use iteris::merge::solve::host;
use pollster::FutureExt;
use std::sync::OnceLock;

mod common;
use common::rng::Rng;
use common::{gpu_or_skip, skip_without};

/// The shared GPU, or None (the test then says it skipped).
fn gpu(test: &str) -> Option<&'static Gpu> {
    static G: OnceLock<Option<GpuCell>> = OnceLock::new();
    let g = G.get_or_init(|| Gpu::new().ok().map(GpuCell)).as_ref().map(|c| &c.0);
    if g.is_none() {
        skip_without(test, "GPU adapter (Mesa lavapipe will do)", "Gpu::new failed");
    }
    g
}
struct GpuCell(Gpu);
// SAFETY: the tests of this file use the device from one thread at a time (the mutex below).
unsafe impl Sync for GpuCell {}
unsafe impl Send for GpuCell {}
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn close(what: &str, g: &Mat, c: &Mat, tol: f64) {
    assert_eq!(g.shape(), c.shape(), "{what}: shape");
    let e = rel_err(&g.data, &c.data);
    assert!(e < tol, "{what}: GPU differs from CPU by {e:.2e}");
}

/// `close` for the f64 matrices the host reads back (Gram matrices).
fn close64(what: &str, g: &nalgebra::DMatrix<f64>, c: &nalgebra::DMatrix<f64>, tol: f64) {
    let e = (g - c).norm() / c.norm();
    eprintln!("{what}: {e:.2e} (bound {tol:.0e})");
    assert!(e < tol, "{what}: GPU differs from CPU (f64) by {e:.2e}");
}

#[test]
fn matmul_and_gram() {
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("matmul_and_gram") else { return };
    let mut r = Rng(1);
    // The last two use the 128×128 tiles (from 512 rows and columns), one not a multiple of them.
    for (n, k, m) in [(1, 1, 1), (37, 19, 23), (64, 64, 64), (130, 70, 65), (5, 200, 3), (512, 16, 512), (600, 37, 530)]
    {
        let x = r.mat(n + 7, k);
        let w = r.mat(m, k);
        let rows = 3..3 + n;
        let c = Cpu.matmul_t(&x, rows.clone(), &w);
        let gg = g.download(&g.matmul_t(&g.upload(&x), rows, &g.upload(&w))).block_on().unwrap();
        close(&format!("matmul_t {n}x{k}x{m}"), &gg, &c, 1e-5);
        let y = r.mat(n + 4, m);
        let c = host(&Cpu.gram(&x, 2..2 + n, &y, 4..4 + n).block_on().unwrap());
        let gg = host(&g.gram(&g.upload(&x), 2..2 + n, &g.upload(&y), 4..4 + n).block_on().unwrap());
        close64(&format!("gram {n}x{k}x{m}"), &gg, &c, 5e-13);
    }
}

/// The Gram matrices come back as if accumulated in twice f32 precision (Dot2 in matmul.wgsl), not
/// to f32's 1e-8: the exact product of the f32 features, as the CPU computes it in f64. A single
/// row checks the products' rounding errors, integer-valued rows the additions', many rows of
/// same-signed values both over long sums.
#[test]
fn gram_accumulates_in_twice_f32_precision() {
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("gram_accumulates_in_twice_f32_precision") else { return };
    let mut r = Rng(2);
    for (what, rows, cols, tol) in [
        ("one row", 1, 64, 1e-15),
        ("integers", 300, 64, 1e-15),
        ("random", 300, 64, 2e-13),
        ("4000 rows", 4000, 8, 1e-12),
    ] {
        let mut x = r.mat(rows, cols);
        match what {
            // Exact products, sums beyond 24 bits: only the additions round.
            "integers" => x.data.iter_mut().for_each(|v| *v = (*v * 3000.0).round()),
            "4000 rows" => x.data.iter_mut().for_each(|v| *v = 1.0 + 0.5 * *v),
            _ => {}
        }
        let c = common::gram_of(&Cpu, &x, 0..rows);
        let gg = common::gram_of(g, &g.upload(&x), 0..rows);
        close64(&format!("gram of {what} ({rows}×{cols})"), &gg, &c, tol);
    }
}

/// A Gram gathered over chunks of rows (`add_gram`: the Dot2 sum goes on from the pair the last
/// chunk left) is as exact as one over all rows at once; the same for a scalar's partial sums.
#[test]
fn gram_gathered_over_chunks_equals_one_gram() {
    use iteris::backend::Reads;
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("gram_gathered_over_chunks_equals_one_gram") else { return };
    let mut r = Rng(9);
    let (x, y) = (r.mat(700, 48), r.mat(700, 40));
    let c = host(&Cpu.gram(&x, 0..700, &y, 0..700).block_on().unwrap());
    let (gx, gy) = (g.upload(&x), g.upload(&y));
    for cuts in [vec![0, 700], vec![0, 300, 700], vec![0, 1, 129, 130, 512, 700]] {
        let mut reads = Reads::new();
        let id = reads.gram(g.defer_gram(&gx, cuts[0]..cuts[1], &gy, cuts[0]..cuts[1]));
        let s = reads.scalar(g.defer_sq_norm(&gx, cuts[0]..cuts[1]));
        for w in cuts.windows(2).skip(1) {
            g.add_gram(reads.gram_mut(id), &gx, w[0]..w[1], &gy, w[0]..w[1]);
            let more = g.defer_sq_norm(&gx, w[0]..w[1]);
            g.add_scalar(reads.scalar_mut(s), more);
        }
        let mut v = g.fetch(reads).block_on().unwrap();
        close64(&format!("gram over chunks {cuts:?}"), &host(&v.take_gram(id)), &c, 2e-13);
        let want = Cpu.sq_norm(&x, 0..700).block_on().unwrap();
        assert!(((v[s] - want) / want).abs() < 1e-13, "sq_norm over chunks {cuts:?}: {} vs {want}", v[s]);
    }
    // A Gram wider than one binding is kept (and gathered, and read back) in row blocks: 48 × 40
    // f32 is 7.5 KiB, a 2 KiB binding holds 12 of its rows.
    let mut small = iteris::backend::gpu::Gpu::new().unwrap();
    small.limit_bindings(2 << 10);
    let (sx, sy) = (small.upload(&x), small.upload(&y));
    let mut reads = Reads::new();
    let id = reads.gram(small.defer_gram(&sx, 0..300, &sy, 0..300));
    small.add_gram(reads.gram_mut(id), &sx, 300..700, &sy, 300..700);
    let one = reads.gram(small.defer_gram(&sx, 0..700, &sx, 0..700));
    let mut v = small.fetch(reads).block_on().unwrap();
    close64("gram in row blocks, over chunks", &host(&v.take_gram(id)), &c, 2e-13);
    close64(
        "gram in row blocks",
        &host(&v.take_gram(one)),
        &host(&Cpu.gram(&x, 0..700, &x, 0..700).block_on().unwrap()),
        2e-13,
    );
}

#[test]
fn elementwise_ops() {
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("elementwise_ops") else { return };
    let mut r = Rng(3);
    let (a, b) = (r.mat(33, 17), r.mat(33, 17));
    let bias = r.mat(1, 17);
    let d = r.mat(5, 17);
    let both = |f: &dyn Fn(&Cpu, &mut Mat), h: &dyn Fn(&Gpu, &mut iteris::backend::gpu::GpuTensor), what: &str| {
        let mut c = a.clone();
        f(&Cpu, &mut c);
        let mut t = g.upload(&a);
        h(g, &mut t);
        close(what, &g.download(&t).block_on().unwrap(), &c, 1e-6);
    };
    both(&|be, y| be.add_rows(y, 4..9, &d, 0.7), &|be, y| be.add_rows(y, 4..9, &be.upload(&d), 0.7), "add_rows");
    both(&|be, y| be.add_bias(y, &bias), &|be, y| be.add_bias(y, &be.upload(&bias)), "add_bias");
    both(&|be, y| be.scale(y, -1.5), &|be, y| be.scale(y, -1.5), "scale");
    both(&|be, y| be.mul(y, &b), &|be, y| be.mul(y, &be.upload(&b)), "mul");
    for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu, Activation::Relu, Activation::Tanh] {
        let mut big = a.clone();
        big.data.iter_mut().for_each(|v| *v *= 4.0);
        let mut c = big.clone();
        Cpu.activate(&mut c, act);
        let mut t = g.upload(&big);
        g.activate(&mut t, act);
        close(&format!("{act:?}"), &g.download(&t).block_on().unwrap(), &c, 1e-6);
    }
    let c = Cpu.mix_rows(&a, 2..12, 0.3, &b, 20..30, 0.7);
    let gg = g.download(&g.mix_rows(&g.upload(&a), 2..12, 0.3, &g.upload(&b), 20..30, 0.7)).block_on().unwrap();
    close("mix_rows", &gg, &c, 1e-6);
    let (ca, cb) = (Cpu.sq_norm(&a, 3..30).block_on().unwrap(), g.sq_norm(&g.upload(&a), 3..30).block_on().unwrap());
    assert!(((ca - cb) / ca).abs() < 1e-6, "sq_norm {ca} vs {cb}");
    let (ca, cb) =
        (Cpu.sq_dist(&a, &b).block_on().unwrap(), g.sq_dist(&g.upload(&a), &g.upload(&b)).block_on().unwrap());
    assert!(((ca - cb) / ca).abs() < 1e-6, "sq_dist {ca} vs {cb}");
}

#[test]
fn rows_columns_norms_rope() {
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("rows_columns_norms_rope") else { return };
    let mut r = Rng(4);
    let x = r.mat(29, 48);
    let idx: Vec<u32> = (0..13).map(|_| r.below(29) as u32).collect();
    close(
        "select_rows",
        &g.download(&g.select_rows(&g.upload(&x), &idx)).block_on().unwrap(),
        &Cpu.select_rows(&x, &idx),
        0.0 + 1e-12,
    );
    close(
        "slice_cols",
        &g.download(&g.slice_cols(&g.upload(&x), 16..40)).block_on().unwrap(),
        &Cpu.slice_cols(&x, 16..40),
        1e-12,
    );
    let (gamma, beta) = (r.mat(1, 48), r.mat(1, 48));
    let mut shifted = x.clone();
    shifted.data.iter_mut().for_each(|v| *v += 30.0);
    let c = Cpu.layer_norm(&shifted, &gamma, Some(&beta), 1e-5);
    let gg = g
        .download(&g.layer_norm(&g.upload(&shifted), &g.upload(&gamma), Some(&g.upload(&beta)), 1e-5))
        .block_on()
        .unwrap();
    close("layer_norm", &gg, &c, 1e-5);
    let c = Cpu.layer_norm(&x, &gamma, None, 1e-12);
    close(
        "layer_norm (no beta)",
        &g.download(&g.layer_norm(&g.upload(&x), &g.upload(&gamma), None, 1e-12)).block_on().unwrap(),
        &c,
        1e-5,
    );
    let c = Cpu.rms_norm(&x, &gamma, 1e-6);
    close("rms_norm", &g.download(&g.rms_norm(&g.upload(&x), &g.upload(&gamma), 1e-6)).block_on().unwrap(), &c, 1e-5);
    // Per head (Qwen3's and Gemma 3's q/k norms): gamma one head wide.
    let head_gamma = r.mat(1, 16);
    let c = Cpu.rms_norm(&x, &head_gamma, 1e-6);
    for h in 0..x.cols / 16 {
        let head = Mat::new(x.rows, 16, (0..x.rows).flat_map(|t| x.row(t)[16 * h..16 * (h + 1)].to_vec()).collect());
        let want = Cpu.rms_norm(&head, &head_gamma, 1e-6);
        for t in 0..x.rows {
            assert_eq!(&c.row(t)[16 * h..16 * (h + 1)], want.row(t), "rms_norm per head: head {h}, row {t}");
        }
    }
    let gg = g.download(&g.rms_norm(&g.upload(&x), &g.upload(&head_gamma), 1e-6)).block_on().unwrap();
    close("rms_norm per head", &gg, &c, 1e-5);
    // Odd rows far along (4000+): angles far outside [−π, π], where WGSL bounds no sin or cos.
    let pos: Vec<u32> = (0..29).map(|i| (i * 7 % 61 + (i % 2) * 4000) as u32).collect();
    // Full rotary; partial (Phi-3: 6 of 8 pairs, the last 4 dimensions of each head untouched),
    // with longrope's attention factor.
    for (pairs, scale) in [(8, 1.0), (6, 1.19)] {
        let inv: Vec<f32> = (0..pairs).map(|k| 1.0 / 10000f32.powf(2.0 * k as f32 / (2 * pairs) as f32)).collect();
        let mut c = x.clone();
        Cpu.rope(&mut c, &pos, 16, &inv, scale);
        for t in 0..x.rows {
            for h in 0..x.cols / 16 {
                let (a, b) = (16 * h..16 * h + 2 * pairs, 16 * h + 2 * pairs..16 * (h + 1));
                assert_eq!(&c.row(t)[b.clone()], &x.row(t)[b], "rope passes the dimensions past its pairs");
                let norm = |v: &[f32]| v.iter().map(|z| z * z).sum::<f32>().sqrt();
                let ratio = norm(&c.row(t)[a.clone()]) / norm(&x.row(t)[a]);
                assert!((ratio - scale).abs() < 1e-4, "rope scales the rotated pairs by {scale}, not {ratio}");
            }
        }
        let mut t = g.upload(&x);
        g.rope(&mut t, &pos, 16, &inv, scale);
        close(&format!("rope ({pairs} pairs, scale {scale})"), &g.download(&t).block_on().unwrap(), &c, 1e-5);
    }
}

#[test]
fn attention_variants() {
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("attention_variants") else { return };
    let mut r = Rng(5);
    // One sequence longer than an attention chunk (512 keys) checks the online softmax.
    let seqs = vec![0..1, 1..40, 40..45, 45..115, 115..700];
    let rows = 700;
    for (heads, kv, hd, causal, window, softcap) in [
        (4, 4, 8, true, None, None),
        (4, 2, 16, true, None, None),
        (6, 1, 8, false, None, None),
        (4, 2, 8, true, Some(5), None),
        (4, 2, 8, true, Some(9), Some(0.8)), // Gemma 2: a cap below the scores' spread
    ] {
        let (q, k, v) = (r.mat(rows, heads * hd), r.mat(rows, kv * hd), r.mat(rows, kv * hd));
        let scale = 1.0 / (hd as f32).sqrt();
        let spec = AttentionSpec { heads, kv_heads: kv, head_dim: hd, causal, window, scale, softcap };
        let c = Cpu.attention(&q, &k, &v, &spec, &seqs, &seqs);
        if softcap.is_some() {
            let plain = Cpu.attention(&q, &k, &v, &AttentionSpec { softcap: None, ..spec.clone() }, &seqs, &seqs);
            assert!(rel_err(&c.data, &plain.data) > 1e-3, "soft-capping changes the attention");
        }
        let gg = g
            .download(&g.attention(&g.upload(&q), &g.upload(&k), &g.upload(&v), &spec, &seqs, &seqs))
            .block_on()
            .unwrap();
        close(
            &format!("attention h{heads} kv{kv} d{hd} causal {causal} window {window:?} softcap {softcap:?}"),
            &gg,
            &c,
            1e-5,
        );
    }
}

/// Queries against more keys than queries, in slots of a larger key tensor (a KV cache), with new
/// rows scattered in by `write_rows`.
#[test]
fn attention_over_cached_keys() {
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("attention_over_cached_keys") else { return };
    let mut r = Rng(6);
    // Slots of 600 rows; sequence s has queries[s] and its keys at the start of its slot.
    let queries = vec![0..1, 1..4, 4..5, 5..12];
    let keys = vec![0..1, 600..630, 1200..1201, 1800..2350];
    for (heads, kv, hd, window) in [(4, 2, 16, None), (4, 1, 8, Some(7))] {
        let spec = AttentionSpec { heads, kv_heads: kv, head_dim: hd, causal: true, window, scale: 0.3, softcap: None };
        let q = r.mat(12, heads * hd);
        let (mut k, mut v) = (Mat::zeros(2400, kv * hd), Mat::zeros(2400, kv * hd));
        let (new_k, new_v) = (r.mat(300, kv * hd), r.mat(300, kv * hd));
        let idx: Vec<u32> = (0..300).map(|i| (i * 8) as u32).collect();
        let (mut gk, mut gv) = (g.upload(&k), g.upload(&v));
        Cpu.write_rows(&mut k, &idx, &new_k);
        Cpu.write_rows(&mut v, &idx, &new_v);
        g.write_rows(&mut gk, &idx, &g.upload(&new_k));
        g.write_rows(&mut gv, &idx, &g.upload(&new_v));
        close("write_rows", &g.download(&gk).block_on().unwrap(), &k, 1e-30);
        let c = Cpu.attention(&q, &k, &v, &spec, &queries, &keys);
        let gg = g.download(&g.attention(&g.upload(&q), &gk, &gv, &spec, &queries, &keys)).block_on().unwrap();
        close(&format!("cached attention h{heads} kv{kv} d{hd} window {window:?}"), &gg, &c, 1e-5);
    }
}

#[test]
fn cholesky_and_refined_solve() {
    use iteris::formats::peft::LoraModule;
    use iteris::merge::solve::{device, solve, SolvePath};
    use nalgebra::DMatrix;
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("cholesky_and_refined_solve") else { return };
    let mut r = Rng(6);
    let n = 70;
    let x = r.mat(200, n);
    let gram = common::gram_of(&Cpu, &x, 0..200);
    let m = &gram + DMatrix::identity(n, n) * (1e-4 * gram.norm());
    let l = g.cholesky_f32_many(&[&device(&m)]).block_on().unwrap().pop().flatten().expect("positive definite");
    let l = host(&l);
    let e = (&l * l.transpose() - &m).norm() / m.norm();
    assert!(e < 1e-6, "L·Lᵀ differs from M by {e:.2e}");
    let neg = -&m;
    let both = g.cholesky_f32_many(&[&device(&neg), &device(&m)]).block_on().unwrap();
    assert!(both[0].is_none(), "a negative definite matrix must be refused");
    assert!(both[1].is_some(), "and does not spoil the next one");

    let lora = LoraModule { path: "m".into(), a: r.mat(3, n), b: r.mat(5, 3), scale: 2.0 };
    for alpha in [1e-4, 1e-7] {
        let spec = common::known_system(&[(&gram, 1.0), (&gram, 0.5)], alpha, alpha);
        let loras = [Some(&lora), None];
        let (cpu, gpu_solved) =
            (solve(&Cpu, "m", &spec, &loras).block_on().unwrap(), solve(g, "m", &spec, &loras).block_on().unwrap());
        let ((cpu, p_cpu), (gpu_m, p_gpu)) = ((cpu.merged, cpu.path), (gpu_solved.merged, gpu_solved.path));
        assert_eq!(p_cpu, SolvePath::CholeskyF64);
        assert!(matches!(p_gpu, SolvePath::GpuCholeskyF32Refined | SolvePath::CholeskyF64AfterGpu));
        if alpha == 1e-4 {
            assert_eq!(p_gpu, SolvePath::GpuCholeskyF32Refined, "refinement converges at a 1e-4 ridge");
        }
        let e = rel_err(&gpu_m.a.data, &cpu.a.data);
        assert!(e < 1e-6, "alpha {alpha}: refined GPU solve differs from the f64 solve by {e:.2e} ({p_gpu:?})");
    }
}

/// `m` as a checkpoint would store it in `dtype` (m's values must be exact in it).
fn as_stored(m: &Mat, dtype: iteris::backend::WeightDtype) -> iteris::mat::StoredMat {
    use iteris::backend::WeightDtype;
    use iteris::mat::Stored;
    let data = match dtype {
        WeightDtype::F32 => Stored::F32(m.data.clone()),
        WeightDtype::F16 => Stored::F16(m.data.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect()),
        WeightDtype::Bf16 => Stored::Bf16(m.data.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect()),
    };
    iteris::mat::StoredMat { rows: m.rows, cols: m.cols, data }
}

#[test]
fn packed_half_precision_weights() {
    use iteris::backend::WeightDtype;
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("packed_half_precision_weights") else { return };
    let mut r = Rng(7);
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        // Weights as the file holds them: values exactly representable in the half format.
        let round = |m: Mat| -> Mat {
            let data = m.data.iter().map(|&v| match dtype {
                WeightDtype::F16 => half::f16::from_f32(v).to_f32(),
                _ => half::bf16::from_f32(v).to_f32(),
            });
            Mat::new(m.rows, m.cols, data.collect())
        };
        let w = round(r.mat(37, 23)); // odd element count: the last word is half used
        let x = r.mat(50, 23);
        let gw = g.upload_weight(as_stored(&w, dtype));
        assert_eq!(g.download(&gw).block_on().unwrap(), w, "{dtype:?}: download unpacks exactly");
        let c = Cpu.matmul_t(&x, 5..45, &w);
        close(
            &format!("{dtype:?} matmul_t"),
            &g.download(&g.matmul_t(&g.upload(&x), 5..45, &gw)).block_on().unwrap(),
            &c,
            1e-6,
        );
        let idx = [36u32, 0, 17, 17, 5];
        close(
            &format!("{dtype:?} select_rows"),
            &g.download(&g.select_rows(&gw, &idx)).block_on().unwrap(),
            &Cpu.select_rows(&w, &idx),
            1e-12,
        );
    }
}

#[test]
fn weights_beyond_one_binding_are_split_by_rows() {
    use iteris::backend::WeightDtype;
    let _l = LOCK.lock().unwrap();
    let Some(mut g) = gpu_or_skip("weights_beyond_one_binding_are_split_by_rows") else { return };
    g.limit_bindings(1500); // a (37, 23) weight: 3 blocks of 16 rows in f32, 2 of 32 rows in f16
    let mut r = Rng(8);
    for dtype in [WeightDtype::F32, WeightDtype::F16] {
        let w = r.mat(37, 23);
        let w = if dtype == WeightDtype::F16 {
            Mat::new(37, 23, w.data.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect())
        } else {
            w
        };
        let x = r.mat(9, 23);
        let gw = g.upload_weight(as_stored(&w, dtype));
        assert_eq!(g.download(&gw).block_on().unwrap(), w, "{dtype:?}: blocks reassemble");
        close(
            &format!("{dtype:?} split matmul_t"),
            &g.download(&g.matmul_t(&g.upload(&x), 0..9, &gw)).block_on().unwrap(),
            &Cpu.matmul_t(&x, 0..9, &w),
            1e-6,
        );
        // The backward pass's dy · W: the blocks split the sum's index.
        let dy = r.mat(9, 37);
        close(
            &format!("{dtype:?} split matmul"),
            &g.download(&Backward::matmul(&g, &g.upload(&dy), &gw)).block_on().unwrap(),
            &Backward::matmul(&Cpu, &dy, &w),
            1e-6,
        );
        let idx = [36u32, 0, 9, 10, 29, 30, 5];
        close(
            &format!("{dtype:?} split select_rows"),
            &g.download(&g.select_rows(&gw, &idx)).block_on().unwrap(),
            &Cpu.select_rows(&w, &idx),
            1e-12,
        );
    }
}

/// A module's system assembled on the GPU from statistics that were never read back (Gram
/// matrices, adaptive weights from pending norms, ridge from ‖G‖_F, RegMean's off-diagonal
/// scaling) equals the same `SystemSpec` assembled on the host from the fetched values, to f32
/// rounding; and its f32 factor L satisfies L·Lᵀ = M to the same level.
#[test]
fn system_assembled_from_pending_statistics_equals_the_host_system() {
    use iteris::backend::{Cross, Reads, SystemSpec, SystemTerm, Weight};
    use iteris::merge::solve::assemble;
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("system_assembled_from_pending_statistics_equals_the_host_system") else { return };
    let mut r = Rng(9);
    let n = 45;
    let (x1, x2) = (r.mat(120, n), r.mat(90, n));
    let (w, a, b) = (r.mat(30, 17), r.mat(30, 17), r.mat(70, 33));
    let (gx1, gx2, gw, ga, gb) = (g.upload(&x1), g.upload(&x2), g.upload(&w), g.upload(&a), g.upload(&b));
    // IterIS at the default and a weak ridge (adaptive weights from pending norms), RegMean
    // (off-diagonal factor 0.9, constant weights, no ridge).
    for (method, alpha, off_diagonal) in [("iteris", 1e-4, 1.0), ("iteris", 1e-7, 1.0), ("regmean", 0.0, 0.9)] {
        let mut reads = Reads::new();
        let g1 = reads.gram(g.defer_gram(&gx1, 0..120, &gx1, 0..120));
        let g2 = reads.gram(g.defer_gram(&gx2, 10..90, &gx2, 10..90));
        let (wn, wa, bn) = (
            reads.scalar(g.defer_sq_norm(&gw, 0..30)),
            reads.scalar(g.defer_dot(&gw, &ga)),
            reads.scalar(g.defer_sq_norm(&gb, 0..70)),
        );
        // Term 1's weight is (3 + ‖W‖² − 0.5⟨W, A⟩) / ‖B‖², term 2's 0.25 (RegMean: 1 and 1).
        let weight1 = Weight { num: 3.0, num_terms: vec![(1.0, wn), (-0.5, wa)], den: Some(bn) };
        let (w1, w2) = if method == "regmean" {
            (Weight::constant(1.0), Weight::constant(1.0))
        } else {
            (weight1, Weight::constant(0.25))
        };
        let spec = SystemSpec {
            terms: vec![
                SystemTerm { gram: g1, cross: Cross::Full(g1), weight: w1 },
                SystemTerm { gram: g2, cross: Cross::Full(g2), weight: w2 },
            ],
            alpha1: alpha,
            alpha2: alpha,
            off_diagonal,
        };
        let on_device = spec.map(|&s| reads.pending_scalar(s), |&id| reads.pending_gram(id));
        let m_id = reads.gram(g.defer_system_matrix(&on_device).expect("fits"));
        let on_device = spec.map(|&s| reads.pending_scalar(s), |&id| reads.pending_gram(id));
        let f_id = reads.factor(g.defer_factor(&on_device).expect("the GPU offers factors"));
        let mut values = g.fetch(reads).block_on().unwrap();

        // Host: the same spec from the CPU backend's values.
        let (h1, h2) = (common::gram_of(&Cpu, &x1, 0..120), common::gram_of(&Cpu, &x2, 10..90));
        let sq = |m: &Mat| m.data.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
        let dot: f64 = w.data.iter().zip(&a.data).map(|(p, q)| *p as f64 * *q as f64).sum();
        let cpu_scalars = [(wn, sq(&w)), (wa, dot), (bn, sq(&b))];
        let host_spec =
            spec.map(|s| cpu_scalars.iter().find(|(id, _)| id == s).unwrap().1, |&id| if id == g1 { &h1 } else { &h2 });
        let want = assemble("m", &host_spec, &[None, None]).m;

        let got = host(&values.take_gram(m_id));
        let e = (&got - &want).norm() / want.norm();
        eprintln!("{method} α {alpha}: GPU-assembled M vs host M {e:.2e}");
        // Measured 1.2e-7 to 1.3e-7 (f32 rounding of M's entries).
        assert!(e < 4e-7, "{method} α {alpha}: the GPU's M differs from the host's by {e:.2e}");
        let l = host(&values.take_factor(f_id).expect("positive definite"));
        let e = (&l * l.transpose() - &want).norm() / want.norm();
        eprintln!("{method} α {alpha}: L·Lᵀ vs host M {e:.2e}");
        // Measured 1.4e-7 to 1.6e-7.
        assert!(e < 5e-7, "{method} α {alpha}: L·Lᵀ differs from the host's M by {e:.2e}");
    }
}

/// The backward ops (`Backward`, refinement's gradients) against the CPU's: products, joined
/// columns, RMSNorm's gradient per row and per head, the gated activations' gradients, and
/// attention's gradient with grouped heads, sliding windows, soft-capping and several sequences.
#[test]
fn backward_ops() {
    let _l = LOCK.lock().unwrap();
    let Some(g) = gpu("backward_ops") else { return };
    let mut r = Rng(11);
    let down = |t: &<Gpu as Transfer>::T| g.download(t).block_on().unwrap();
    for (n, out, inp) in [(1, 1, 1), (37, 19, 23), (130, 70, 65)] {
        let (dy, w) = (r.mat(n, out), r.mat(out, inp));
        close(
            "matmul",
            &down(&Backward::matmul(g, &g.upload(&dy), &g.upload(&w))),
            &Backward::matmul(&Cpu, &dy, &w),
            1e-5,
        );
        let (x, acc) = (r.mat(n, inp), r.mat(out, inp));
        let (mut ca, mut ga) = (acc.clone(), g.upload(&acc));
        Cpu.add_matmul_tn(&mut ca, &dy, &x);
        g.add_matmul_tn(&mut ga, &g.upload(&dy), &g.upload(&x));
        close("add_matmul_tn", &down(&ga), &ca, 1e-5);
    }
    let zeros = down(&g.zeros(5, 7));
    assert!(zeros.data.iter().all(|&v| v == 0.0) && zeros.shape() == (5, 7), "zeros");
    let parts = [r.mat(9, 3), r.mat(9, 8), r.mat(9, 1)];
    let gp: Vec<_> = parts.iter().map(|p| g.upload(p)).collect();
    let joined = Cpu.concat_cols(&parts.iter().collect::<Vec<_>>());
    assert_eq!(joined.shape(), (9, 12));
    close("concat_cols", &down(&g.concat_cols(&gp.iter().collect::<Vec<_>>())), &joined, 1e-12);
    for width in [48, 8] {
        let (x, dy, gamma) = (r.mat(21, 48), r.mat(21, 48), r.mat(1, width));
        let c = Cpu.rms_norm_backward(&x, &gamma, 1e-6, &dy);
        let gg = down(&g.rms_norm_backward(&g.upload(&x), &g.upload(&gamma), 1e-6, &g.upload(&dy)));
        close(&format!("rms_norm_backward (groups of {width})"), &gg, &c, 1e-5);
    }
    for act in [Activation::Silu, Activation::GeluErf, Activation::GeluTanh, Activation::Relu, Activation::Tanh] {
        let mut gate = r.mat(13, 40);
        gate.data[0] = 0.0;
        let mut act_gate = gate.clone();
        Cpu.activate(&mut act_gate, act);
        let (up, dz) = (r.mat(13, 40), r.mat(13, 40));
        let (cg, cu) = Cpu.gate_backward(&gate, &act_gate, &up, &dz, act);
        let (gg, gu) = g.gate_backward(&g.upload(&gate), &g.upload(&act_gate), &g.upload(&up), &g.upload(&dz), act);
        close(&format!("gate_backward {act:?}: dgate"), &down(&gg), &cg, 1e-5);
        close(&format!("gate_backward {act:?}: dup"), &down(&gu), &cu, 1e-6);
    }
    let seqs = vec![0..1, 1..40, 40..45, 45..115];
    let rows = 115;
    for (heads, kv, hd, window, softcap) in
        [(4, 4, 8, None, None), (4, 2, 16, None, None), (4, 1, 8, Some(5), None), (4, 2, 8, Some(9), Some(0.8))]
    {
        let (q, k, v, dout) =
            (r.mat(rows, heads * hd), r.mat(rows, kv * hd), r.mat(rows, kv * hd), r.mat(rows, heads * hd));
        let spec = AttentionSpec { heads, kv_heads: kv, head_dim: hd, causal: true, window, scale: 0.4, softcap };
        let (cq, ck, cv) = Cpu.attention_backward(&q, &k, &v, &dout, &spec, &seqs);
        let up = |m: &Mat| g.upload(m);
        let (gq, gk, gv) = g.attention_backward(&up(&q), &up(&k), &up(&v), &up(&dout), &spec, &seqs);
        let what = format!("attention_backward h{heads} kv{kv} d{hd} window {window:?} softcap {softcap:?}");
        close(&format!("{what}: dq"), &down(&gq), &cq, 1e-5);
        close(&format!("{what}: dk"), &down(&gk), &ck, 1e-5);
        close(&format!("{what}: dv"), &down(&gv), &cv, 1e-5);
    }
}
