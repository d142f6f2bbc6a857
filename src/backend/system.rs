//! The linear system one module solves, defined once (ARCHITECTURE.md, "The algorithm"):
//!
//!   M  = Σ_i c_i (S(G_i) + α2 ‖S(G_i)‖_F I),        G_i = X̃_iᵀ X̃_i,
//!   Zᵀ = Σ_i c_i s_i (S(C_i) + α1 ‖S(C_i)‖_F I) A_iᵀ, C_i = X_iᵀ X̃_i (stacked by task),
//!   c_i = (num_i + Σ_k k · value_k) / den_i,
//!
//! where S scales a matrix's off-diagonal entries by `off_diagonal` (RegMean; 1 for IterIS) and
//! symmetrises the Grams. C_i enters Zᵀ only through A_i C_i and its norm, so where X̃ ≠ X it is
//! held projected (`Cross::Projected`): s_i A_i C_i = U_iᵀ X̃_i with U_i = s_i X_i A_iᵀ, an
//! (r, in) Gram, and C_i itself at f32 precision for the norm alone. With the output objective
//! (`Cross::Output`), Zᵀ = Σ_i c_i (X̃_iᵀ (Y_i − X̃_i W0ᵀ) + α1 ‖C_i‖_F s_i A_iᵀ B_iᵀ), (in, out):
//! M is the same. `SystemSpec` is generic over where its values are: ids into a batch of
//! pending reads while a stage is recorded, the backend's pending values when the GPU assembles M
//! for its f32 factor (`shaders/system/assemble.wgsl`), and fetched f64 values when the host assembles the
//! same M and Zᵀ (`merge::solve::assemble`). One description, evaluated in both places.

/// A module's system: one term per task.
#[derive(Clone, Debug)]
pub struct SystemSpec<S, G> {
    pub terms: Vec<SystemTerm<S, G>>,
    /// α1: ridge on each cross term C_i, relative to its Frobenius norm.
    pub alpha1: f64,
    /// α2: ridge on each Gram G_i, relative to its Frobenius norm.
    pub alpha2: f64,
    /// Factor on the off-diagonal entries of C_i and G_i (RegMean's; 1 otherwise).
    pub off_diagonal: f64,
}

/// One task's share of the system.
#[derive(Clone, Debug)]
pub struct SystemTerm<S, G> {
    /// G_i = X̃_iᵀ X̃_i (in, in).
    pub gram: G,
    /// C_i = X_iᵀ X̃_i, whole or projected onto the task's A_i at this module.
    pub cross: Cross<G>,
    /// The adaptive weight c_i.
    pub weight: Weight<S>,
}

/// A task's cross term C_i = X_iᵀ X̃_i.
#[derive(Clone, Debug)]
pub enum Cross<G> {
    /// C_i (in, in): RegMean's, and the same value (and id) as the Gram where X̃ = X.
    Full(G),
    /// What Zᵀ reads of it where X̃ ≠ X: s_i A_i C_i (r, in), None where the task's adapter does
    /// not target the module; and C_i at f32 precision (in, in) for ‖C_i‖_F alone (IterIS: S is
    /// the identity). The full f64 C_i would cost an (in, in) f64 product per task: 2 s of a
    /// 31 s GPT-2-shaped merge on 2 cores, against 0.9 s for the f32 one.
    Projected { sac: Option<G>, for_norm: G },
    /// The output objective (`merge::Objective::Output`): the merged module matches the adapter
    /// model's whole output Y_i = X_i (W0 + ΔW_i)ᵀ from the merged model's inputs, so Zᵀ reads
    /// X̃_iᵀ (Y_i − X̃_i W0ᵀ) (in, out) instead of s_i A_i C_i; and C_i at f32 precision for
    /// ‖C_i‖_F, the scale of the ridge that pulls ΔW* towards ΔW_i.
    Output { xty: G, for_norm: G },
}

impl<G> Cross<G> {
    pub fn map<G2>(&self, mut g: impl FnMut(&G) -> G2) -> Cross<G2> {
        match self {
            Cross::Full(c) => Cross::Full(g(c)),
            Cross::Projected { sac, for_norm } => {
                Cross::Projected { sac: sac.as_ref().map(&mut g), for_norm: g(for_norm) }
            }
            Cross::Output { xty, for_norm } => Cross::Output { xty: g(xty), for_norm: g(for_norm) },
        }
    }
}

/// c = (num + Σ k · value) / den, from constants and scalars that may still be pending.
#[derive(Clone, Debug)]
pub struct Weight<S> {
    pub num: f64,
    pub num_terms: Vec<(f64, S)>,
    /// None: 1.
    pub den: Option<S>,
}

impl<S, G> SystemSpec<S, G> {
    /// The same system with its scalars and matrices looked up by `s` and `g`.
    pub fn map<S2, G2>(&self, mut s: impl FnMut(&S) -> S2, mut g: impl FnMut(&G) -> G2) -> SystemSpec<S2, G2> {
        SystemSpec {
            terms: self
                .terms
                .iter()
                .map(|t| SystemTerm { gram: g(&t.gram), cross: t.cross.map(&mut g), weight: t.weight.map(&mut s) })
                .collect(),
            alpha1: self.alpha1,
            alpha2: self.alpha2,
            off_diagonal: self.off_diagonal,
        }
    }
}

impl<S> Weight<S> {
    pub fn constant(c: f64) -> Weight<S> {
        Weight { num: c, num_terms: Vec::new(), den: None }
    }

    /// λ · c: a task's weight in the objective (`Options::weights`) times its adaptive weight.
    pub fn scaled(&self, lambda: f64) -> Weight<S>
    where
        S: Clone,
    {
        Weight {
            num: lambda * self.num,
            num_terms: self.num_terms.iter().map(|(k, v)| (lambda * k, v.clone())).collect(),
            den: self.den.clone(),
        }
    }

    pub fn map<S2>(&self, mut s: impl FnMut(&S) -> S2) -> Weight<S2> {
        Weight {
            num: self.num,
            num_terms: self.num_terms.iter().map(|(k, v)| (*k, s(v))).collect(),
            den: self.den.as_ref().map(s),
        }
    }
}

impl Weight<f64> {
    /// num + Σ k · value, summed in order.
    pub fn numerator(&self) -> f64 {
        self.num_terms.iter().fold(self.num, |acc, (k, v)| acc + k * v)
    }

    /// c; a zero denominator counts as the smallest positive f64 (the GPU kernel clamps alike).
    pub fn value(&self) -> f64 {
        self.numerator() / self.den.map_or(1.0, |d| d.max(f64::MIN_POSITIVE))
    }
}
