//! Matrix-product throughput of each backend at square sizes (for scale: a simple 16×16-tiled
//! WGSL kernel reached 2.7 TFLOP/s at 4096³ on an NVIDIA H200).
//!
//!     cargo bench --bench matmul [-- cpu|gpu] [-- --sizes 1024,2048,4096]

use iteris::backend::{cpu::Cpu, gpu::Gpu, Backend};
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let want = |b: &str| !args.iter().any(|a| a == "cpu" || a == "gpu") || args.iter().any(|a| a == b);
    let sizes = common::sizes(&args, &[1024, 2048, 4096]);
    if want("cpu") {
        for &n in &sizes {
            bench(&Cpu, "cpu (matrixmultiply)", n);
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
