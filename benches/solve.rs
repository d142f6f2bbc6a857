//! The f64 solve of one module on the CPU backend (assemble M and Zᵀ from three tasks' statistics,
//! Cholesky, back-substitution), at the input widths of GPT-2-small (768), its MLP down-projection
//! (3072) and a 7B model's attention (4096).
//!
//!     cargo bench --bench solve [-- --sizes 768,3072]

use iteris::backend::cpu::Cpu;
use iteris::backend::{Cross, SystemSpec, SystemTerm, Weight};
use iteris::formats::peft::LoraModule;
use iteris::merge::solve::solve;
use nalgebra::DMatrix;
use std::time::Instant;

mod common;

#[path = "../tests/common/rng.rs"]
#[allow(dead_code)]
mod rng;
use rng::Rng;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes = common::sizes(&args, &[768, 3072, 4096]);
    let mut r = Rng(3);
    for n in sizes {
        // A well-spread positive semi-definite Gram: XᵀX of 2n random rows (built in f64 directly).
        let x = r.mat(2 * n, n);
        let x = DMatrix::from_row_slice(x.rows, x.cols, &x.data.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let gram = x.transpose() * &x;
        let loras: Vec<LoraModule> =
            (0..3).map(|_| LoraModule { path: "m".into(), a: r.mat(8, n), b: r.mat(n, 8), scale: 2.0 }).collect();
        let term = || SystemTerm { gram: &gram, cross: Cross::Full(&gram), weight: Weight::constant(1.0) };
        let spec =
            SystemSpec { terms: (0..3).map(|_| term()).collect(), alpha1: 1e-4, alpha2: 1e-4, off_diagonal: 1.0 };
        let t = Instant::now();
        let path =
            pollster::block_on(solve(&Cpu, "m", &spec, &loras.iter().map(Some).collect::<Vec<_>>())).unwrap().path;
        println!("cpu solve n={n:5} (3 tasks, rank 24): {:.3} s, {path:?}", t.elapsed().as_secs_f64());
    }
}
