//! Matrix-product throughput of each backend at square sizes (for scale: a simple 16×16-tiled
//! WGSL kernel reached 2.7 TFLOP/s at 4096³ on an NVIDIA H200).
//!
//!     cargo bench --bench matmul [-- cpu|gpu|shapes|peak|sync] [-- --sizes 1024,2048,4096]
//!
//! `shapes`: the CPU backend's products (faer) against `matrixmultiply` on the GPT-2-small merge's
//! shapes (24576 token rows: 3 tasks × 2 streams × 32 × 128).
//!
//! `peak` (x86-64): the machine's ceiling for f32 fused multiply-adds on 128-bit lanes (what the
//! page's relaxed-SIMD `f32x4.relaxed_madd` becomes under V8) and on 512-bit lanes (faer's AVX-512
//! kernels in the CLI), on one thread and on every thread: what the page's and the CLI's products
//! are measured against.
//!
//! `sync`: what one parallel op with no work costs (rayon's hand-off to its threads and the wait).

use iteris::backend::prelude::*;

use iteris::backend::{cpu::Cpu, gpu::Gpu};
use iteris::mat::Mat;
use pollster::FutureExt;
use std::time::Instant;

mod common;

fn bench<B: Backend>(be: &B, label: &str, n: usize) {
    let a = Mat::new(n, n, (0..n * n).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect());
    let (x, w) = (be.upload(&a), be.upload(&a));
    // Warm up (pipeline compilation), then time whole products including a sync readback of a norm.
    let _ = be.sq_norm(&be.matmul_t(&x, 0..n, &w), 0..1).block_on().unwrap();
    let reps = if n <= 1024 { 5 } else { 2 };
    let t = Instant::now();
    for _ in 0..reps {
        let y = be.matmul_t(&x, 0..n, &w);
        let _ = be.sq_norm(&y, 0..1).block_on().unwrap();
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!("{label:40} {n:5}³  {:9.1} GFLOP/s  ({:.3} s)", 2.0 * (n as f64).powi(3) / s / 1e9, s);
}

/// x (m, k) · w (n, k)ᵀ by the CPU backend and by matrixmultiply's threaded sgemm.
fn shapes() {
    for (what, m, k, n) in [
        ("c_attn", 24576, 768, 2304),
        ("attn c_proj", 24576, 768, 768),
        ("c_fc", 24576, 768, 3072),
        ("mlp c_proj", 24576, 3072, 768),
    ] {
        let x = Mat::new(m, k, (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect());
        let w = Mat::new(n, k, (0..n * k).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect());
        let flops = 2.0 * (m * n * k) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            for _ in 0..3 {
                f();
            }
            t.elapsed().as_secs_f64() / 3.0
        };
        let backend = time(&mut || drop(Cpu.matmul_t(&x, 0..m, &w)));
        let mut c = vec![0.0f32; m * n];
        // SAFETY: x is (m, k) and w (n, k) row-major; c is (m, n).
        let mm = time(&mut || unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                x.data.as_ptr(),
                k as isize,
                1,
                w.data.as_ptr(),
                1,
                k as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        });
        println!(
            "{what:12} ({m}, {k}) · ({k}, {n}): backend (faer) {:6.1} GFLOP/s, matrixmultiply {:6.1} GFLOP/s",
            flops / backend / 1e9,
            flops / mm / 1e9
        );
    }
}

fn main() {
    iteris::backend::cpu::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "peak") {
        peak();
        return;
    }
    if args.iter().any(|a| a == "sync") {
        sync();
        return;
    }
    if args.iter().any(|a| a == "shapes") {
        shapes();
        return;
    }
    let want = |b: &str| !args.iter().any(|a| a == "cpu" || a == "gpu") || args.iter().any(|a| a == b);
    let sizes = common::sizes(&args, &[1024, 2048, 4096]);
    if want("cpu") {
        for &n in &sizes {
            bench(&Cpu, "cpu (faer)", n);
        }
    }
    if want("gpu") {
        match Gpu::new() {
            Ok(g) => {
                let label = format!("gpu ({})", g.info.name);
                for &n in &sizes {
                    bench(&g, &label, n);
                }
            }
            Err(e) => println!("gpu: {e}"),
        }
    }
}

/// The microseconds one parallel op with no work takes from a thread outside the pool, one element
/// per thread (the page's twin: `node benches/page_matmul.mjs --sync`): what every threaded op of
/// the CPU backend pays before its work.
fn sync() {
    use rayon::prelude::*;
    // The same op as the page's `matmul_bench("sync")`.
    let op = || {
        (0..rayon::current_num_threads()).into_par_iter().for_each(|i| {
            std::hint::black_box(i);
        })
    };
    op();
    let mut micros: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..10_000 {
                op();
            }
            t.elapsed().as_secs_f64() * 1e6 / 10_000.0
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    println!(
        "one parallel op with no work: {:.1} µs (median of 7, {} threads)",
        micros[3],
        rayon::current_num_threads()
    );
}

/// GFLOP/s of 12 independent chains of fused multiply-adds (enough to cover the latency of two
/// FMA units), on 1 thread and on every thread at once.
fn peak() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        const STEPS: usize = 20_000_000;
        /// `$name()`: seconds for STEPS rounds of 12 independent FMAs on `$splat`'s vectors.
        macro_rules! chains {
            ($name:ident, $feature:literal, $splat:ident, $fmadd:ident) => {
                #[target_feature(enable = $feature)]
                fn $name() -> f64 {
                    let t = Instant::now();
                    let (b, c) = ($splat(1.000_000_1), $splat(1e-9));
                    let mut acc = [$splat(1.0); 12];
                    for _ in 0..STEPS {
                        for v in &mut acc {
                            *v = $fmadd(*v, b, c);
                        }
                    }
                    std::hint::black_box(acc);
                    t.elapsed().as_secs_f64()
                }
            };
        }
        chains!(chains128, "fma", _mm_set1_ps, _mm_fmadd_ps);
        chains!(chains512, "avx512f", _mm512_set1_ps, _mm512_fmadd_ps);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let run = |lanes: usize, f: fn() -> f64| {
            let gflops = |s: f64| (STEPS * 12 * lanes * 2) as f64 / s / 1e9;
            let one = gflops(f());
            let all: f64 = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..threads).map(|_| sc.spawn(f)).collect();
                hs.into_iter().map(|h| gflops(h.join().unwrap())).sum()
            });
            println!("f32 FMA, {:3}-bit lanes: {one:7.1} GFLOP/s on 1 thread, {all:7.1} on {threads}", lanes * 32);
        };
        if is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked above).
            run(4, || unsafe { chains128() });
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            run(16, || unsafe { chains512() });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("peak: x86-64 only");
}
