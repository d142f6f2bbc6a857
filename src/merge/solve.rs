//! The IterIS solve for one module, in f64 on the CPU (ARCHITECTURE.md, "The algorithm"):
//!
//!   C_i = X_iᵀ X̃_i + α1 ‖X_iᵀ X̃_i‖_F I,   G_i = X̃_iᵀ X̃_i + α2 ‖X̃_iᵀ X̃_i‖_F I,
//!   ΔW* = (Σ_i c_i ΔW_i C_i)(Σ_i c_i G_i)⁻¹ = Σ_i B_i [c_i s_i A_i C_i M⁻¹],  M = Σ_i c_i G_i.
//!
//! So ΔW* is exactly a LoRA with B* = [B_1 … B_N] and A* stacked from the brackets: we solve
//! M A*ᵀ = Zᵀ for the (Σr × in) right-hand side Z and never form an (out × in) matrix.
//!
//! The output objective (`merge::Objective::Output`) fits each adapter model's whole module output
//! from the merged model's inputs, min Σ_i c_i ‖X̃_i (W0 + ΔW)ᵀ − X_i (W0 + ΔW_i)ᵀ‖² (plus the
//! ridges): its normal equations are the same M with Zᵀ = Σ_i c_i X̃_iᵀ (Y_i − X̃_i W0ᵀ), so the
//! solution also corrects the drift of X̃_i from X_i through W0, which no LoRA's span holds:
//! ΔW* is dense (in, out) and leaves as a truncated SVD at a chosen rank.

use crate::backend::Backend;

use crate::backend::{Cross, SystemSpec};
use crate::error::{Error, Result};
use crate::formats::peft::LoraModule;
use crate::mat::{Mat, Mat64};
use nalgebra::DMatrix;

/// How the linear system was solved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SolvePath {
    /// f64 Cholesky on the CPU.
    CholeskyF64,
    /// f32 Cholesky on the GPU, then iterative refinement with f64 residuals on the CPU until the
    /// backward error is at f64 level.
    GpuCholeskyF32Refined,
    /// The GPU's f32 factorisation failed or its refinement stalled; f64 Cholesky on the CPU.
    CholeskyF64AfterGpu,
    /// f64 LU with partial pivoting, after Cholesky found M not positive definite.
    LuF64,
}

/// Solve M X = Zᵀ by iterative refinement around an approximate (f32) Cholesky factor L:
/// X ← X + L⁻ᵀL⁻¹(Zᵀ − M X), residuals in f64. Converged when the residual is at the level an f64
/// Cholesky solve leaves (‖r‖ ≤ n·ε·‖M‖‖X‖), or when it stops shrinking once below
/// 1e-12·‖M‖‖X‖ (the f64 residual's own rounding floor for large n); None when it stops improving
/// before that. The forward error is about cond(M) times this backward error, so refinement is
/// taken as far as an f64 solve would go.
fn refine(m: &DMatrix<f64>, l: &DMatrix<f64>, zt: &DMatrix<f64>) -> Option<DMatrix<f64>> {
    let apply = |r: &DMatrix<f64>| l.solve_lower_triangular(r).and_then(|y| l.tr_solve_lower_triangular(&y));
    let mnorm = m.norm();
    let floor = m.nrows() as f64 * f64::EPSILON;
    let mut x = apply(zt)?;
    let mut prev = f64::INFINITY;
    for _ in 0..60 {
        let r = zt - m * &x;
        let err = r.norm();
        let scale = mnorm * x.norm();
        if err <= floor * scale || err == 0.0 {
            return Some(x);
        }
        if !(err < 0.5 * prev) {
            return (err <= 1e-12 * scale).then_some(x);
        }
        prev = err;
        x += apply(&r)?;
    }
    None
}

fn to_faer(m: &DMatrix<f64>) -> faer::Mat<f64> {
    faer::Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)])
}

fn from_faer(m: faer::Mat<f64>) -> DMatrix<f64> {
    DMatrix::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)])
}

/// M X = B by an f64 Cholesky factorisation; None when M is not positive definite.
fn cholesky_solve(m: &DMatrix<f64>, b: &DMatrix<f64>) -> Option<DMatrix<f64>> {
    use faer::linalg::solvers::Solve;
    let llt = to_faer(m).llt(faer::Side::Lower).ok()?;
    Some(from_faer(llt.solve(to_faer(b))))
}

/// M X = B by LU with partial pivoting; None when M is singular (the solution is not finite).
fn lu_solve(m: &DMatrix<f64>, b: &DMatrix<f64>) -> Option<DMatrix<f64>> {
    use faer::linalg::solvers::Solve;
    let x = from_faer(to_faer(m).partial_piv_lu().solve(to_faer(b)));
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// The merged LoRA of one module: ΔW* = b · a, scale 1.
#[derive(Clone, Debug)]
pub struct Merged {
    /// (R, in)
    pub a: Mat,
    /// (out, R)
    pub b: Mat,
}

impl Merged {
    pub fn rank(&self) -> usize {
        self.a.rows
    }
}

pub fn to_f64(m: &Mat) -> DMatrix<f64> {
    DMatrix::from_row_iterator(m.rows, m.cols, m.data.iter().map(|&v| v as f64))
}

pub fn to_mat(m: &DMatrix<f64>) -> Mat {
    let mut data = Vec::with_capacity(m.len());
    for r in 0..m.nrows() {
        for c in 0..m.ncols() {
            data.push(m[(r, c)] as f32);
        }
    }
    Mat::new(m.nrows(), m.ncols(), data)
}

/// The linear system of one module: M X = Zᵀ, and what its solution X is.
pub struct System<'a> {
    pub module: &'a str,
    /// M = Σ_i c_i G_i, (in, in)
    pub m: DMatrix<f64>,
    /// Zᵀ: (in, Σr), or (in, out) for the output objective.
    pub zt: DMatrix<f64>,
    solution: Solution<'a>,
}

/// What the solution X of a module's system is.
enum Solution<'a> {
    /// A*ᵀ (in, Σr): the merged LoRA is B* A* with B* = [B_1 … B_N] (these blocks).
    LowRank(Vec<&'a Mat>),
    /// ΔW*ᵀ (in, out) itself (the output objective): dense, exported as a LoRA by truncated SVD.
    Dense,
}

/// A module's system (`SystemSpec`, with every value fetched) in f64: M and Zᵀ, with `loras[i]`
/// the task's LoRA at this module where its adapter targets it.
pub fn assemble<'a>(
    module: &'a str,
    spec: &SystemSpec<f64, &DMatrix<f64>>,
    loras: &[Option<&'a LoraModule>],
) -> System<'a> {
    let n = spec.terms.first().map_or(0, |t| t.gram.nrows());
    // S: RegMean's G ← f·G + (1 − f)·diag(G), left alone for IterIS (f = 1).
    let scaled = |g: &DMatrix<f64>| {
        let mut g = g.clone();
        if spec.off_diagonal != 1.0 {
            let d = g.diagonal();
            g *= spec.off_diagonal;
            g.set_diagonal(&d);
        }
        g
    };
    let mut m = DMatrix::<f64>::zeros(n, n);
    let mut z_blocks: Vec<DMatrix<f64>> = Vec::new();
    let mut b_blocks: Vec<&Mat> = Vec::new();
    let mut z_dense: Option<DMatrix<f64>> = None;
    for (t, lora) in spec.terms.iter().zip(loras) {
        let c = t.weight.value();
        // M += c·S(G) in one pass, S(G)'s norm on the way: the Gram is symmetric in exact
        // arithmetic, and rounding can leave it a hair off, so S symmetrises it.
        let (g, f) = (t.gram, spec.off_diagonal);
        let mut norm2 = 0.0;
        for j in 0..n {
            for i in 0..n {
                let v = if i == j { g[(i, i)] } else { f * 0.5 * (g[(i, j)] + g[(j, i)]) };
                norm2 += v * v;
                m[(i, j)] += c * v;
            }
        }
        let ridge = spec.alpha2 * norm2.sqrt();
        for i in 0..n {
            m[(i, i)] += c * ridge;
        }
        match (&t.cross, lora) {
            // The output objective: Zᵀ += c (X̃ᵀ(Y − X̃W0ᵀ) + α1 ‖C‖ s Aᵀ Bᵀ), whether or not the
            // task's adapter targets the module (its target is then the base output on its inputs).
            (Cross::Output { xty, for_norm }, lora) => {
                let z = z_dense.get_or_insert_with(|| DMatrix::zeros(n, xty.ncols()));
                *z += *xty * c;
                if let Some(l) = lora {
                    let (a, b, s) = (to_f64(&l.a), to_f64(&l.b), l.scale as f64);
                    *z += a.transpose() * b.transpose() * (c * s * spec.alpha1 * for_norm.norm());
                }
            }
            (_, None) => {}
            (Cross::Full(cm), Some(l)) => {
                let mut cm = scaled(cm);
                let ridge = spec.alpha1 * cm.norm();
                for i in 0..n {
                    cm[(i, i)] += ridge;
                }
                z_blocks.push(to_f64(&l.a) * cm * (c * l.scale as f64));
                b_blocks.push(&l.b);
            }
            // s A (C + α1 ‖C‖ I) = s A C + s α1 ‖C‖ A.
            (Cross::Projected { sac, for_norm }, Some(l)) => {
                assert_eq!(spec.off_diagonal, 1.0, "a projected cross term is IterIS's (S = identity)");
                let sac = sac.expect("a projected cross term at every module its adapter targets");
                let s = l.scale as f64;
                z_blocks.push((sac + to_f64(&l.a) * (s * spec.alpha1 * for_norm.norm())) * c);
                b_blocks.push(&l.b);
            }
        }
    }
    if let Some(zt) = z_dense {
        return System { module, m, zt, solution: Solution::Dense };
    }
    let rank: usize = z_blocks.iter().map(|z| z.nrows()).sum();
    let mut zt = DMatrix::<f64>::zeros(n, rank);
    let mut at = 0;
    for z in &z_blocks {
        zt.view_mut((0, at), (n, z.nrows())).copy_from(&z.transpose());
        at += z.nrows();
    }
    System { module, m, zt, solution: Solution::LowRank(b_blocks) }
}

/// A backend's f64 matrix as the host's.
pub fn host(m: &Mat64) -> DMatrix<f64> {
    DMatrix::from_row_slice(m.rows, m.cols, &m.data)
}

/// A backend's f64 matrix as the host's transpose, without copying: for readers that do not care
/// (a Gram `assemble` symmetrises, a norm).
pub fn host_transposed(m: Mat64) -> DMatrix<f64> {
    DMatrix::from_vec(m.cols, m.rows, m.data)
}

/// The host's f64 matrix as a backend takes it.
pub fn device(m: &DMatrix<f64>) -> Mat64 {
    Mat64::new(m.nrows(), m.ncols(), m.transpose().as_slice().to_vec())
}

/// A solved module: its merged LoRA, how the system was solved, and the fraction of ‖ΔW*‖²_F
/// the LoRA keeps (1 but where a dense solution was truncated).
pub struct Solved {
    pub merged: Merged,
    pub path: SolvePath,
    pub kept: f64,
}

/// Solve a system, refining around `factor` (an f32 Cholesky factor of M from the backend) when
/// given, else (or when refinement stalls) in f64 on the CPU. `gpu_offered`: whether the backend
/// offers f32 factors, so an f64 solve is reported as a fallback. A dense solution (the output
/// objective) is exported at `rank`.
pub fn finish(sys: System, factor: Option<Mat64>, gpu_offered: bool, rank: usize) -> Result<Solved> {
    let System { module, m, zt, solution } = sys;
    let refined = factor.and_then(|l| refine(&m, &host(&l), &zt));
    let f64_path = if gpu_offered { SolvePath::CholeskyF64AfterGpu } else { SolvePath::CholeskyF64 };
    let (x, path) = match refined {
        Some(x) => (x, SolvePath::GpuCholeskyF32Refined),
        None => match cholesky_solve(&m, &zt) {
            Some(x) => (x, f64_path),
            None => match lu_solve(&m, &zt) {
                Some(x) => (x, SolvePath::LuF64),
                None => {
                    return Err(Error::Numeric(format!(
                        "module {module}: the weighted Gram matrix is singular; raise --alpha2 (a ridge of 1e-4 is a safe start)"
                    )))
                }
            },
        },
    };
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::Numeric(format!(
            "module {module}: the solve produced non-finite values; raise --alpha1/--alpha2"
        )));
    }
    let b_blocks = match solution {
        Solution::Dense => {
            let (merged, kept) = super::export::dense_to_lora(&x.transpose(), rank);
            return Ok(Solved { merged, path, kept });
        }
        Solution::LowRank(b_blocks) => b_blocks,
    };
    let b = Mat::hcat(&b_blocks);
    debug_assert_eq!(b.cols, zt.ncols());
    Ok(Solved { merged: Merged { a: to_mat(&x.transpose()), b }, path, kept: 1.0 })
}

/// Solve one module's system on `be` (factor on the backend where it offers one).
pub async fn solve<B: Backend>(
    be: &B,
    module: &str,
    spec: &SystemSpec<f64, &DMatrix<f64>>,
    loras: &[Option<&LoraModule>],
) -> Result<Solved> {
    let sys = assemble(module, spec, loras);
    let factor = be.cholesky_f32_many(&[&device(&sys.m)]).await?.pop().flatten();
    // A dense solution is kept whole.
    finish(sys, factor, be.offers_cholesky_f32(), usize::MAX)
}
