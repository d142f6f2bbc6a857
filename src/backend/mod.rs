//! The backend interface: the few tensor operations a transformer forward pass and the IterIS
//! statistics need. Models and the merge are written once over this trait; the CPU backend is the
//! reference implementation and the fallback, the GPU backend implements the same contract in WGSL.
//!
//! Every tensor is a row-major (rows, cols) matrix of f32 values: rows are tokens (or sequences),
//! columns are features. Activations and statistics' inputs are f32; a weight may stay in its
//! file's half precision where the backend says so (`keeps_file_precision`: the CPU converts
//! panels as its products reach them), and the statistics accumulate in more than f32. Ranges select
//! rows, so one batched tensor can hold several row groups (tasks × streams).

pub mod backward;
pub mod cpu;
pub mod gpu;
pub mod reads;
pub mod system;

use crate::error::Result;
use crate::mat::{Mat, Mat64, StoredMat};
use std::ops::Range;

pub use backward::Backward;

/// Every op-family trait, for calling ops on a concrete backend (`Cpu`, `Gpu`).
pub mod prelude {
    pub use super::{Backend, Backward, Factors, Forward, Statistics, Transfer};
}
pub use reads::{FactorId, GramId, Reads, ScalarId, Values};
pub use system::{Cross, SystemSpec, SystemTerm, Weight};

/// Read from config.json by its Hugging Face name (`from_hf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Activation {
    /// GELU with erf (`gelu` in Hugging Face configs).
    GeluErf,
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Silu,
    Relu,
    Tanh,
}

impl TryFrom<String> for Activation {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        Activation::from_hf(&name).ok_or_else(|| {
            format!("\"{name}\" is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, silu, relu, tanh)")
        })
    }
}

impl Activation {
    /// The Hugging Face `hidden_act` / `activation_function` names.
    pub fn from_hf(name: &str) -> Option<Activation> {
        Some(match name {
            "gelu" | "gelu_python" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "tanh" => Activation::Tanh,
            _ => return None,
        })
    }

    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::GeluErf => 0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2)),
            // 0.5·(1 + tanh u) = 1 / (1 + e^(−2u)): one exp instead of a (much slower) tanh.
            Activation::GeluTanh => {
                let u = (2.0f32 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                x / (1.0 + (-2.0 * u).exp())
            }
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// The precision a weight matrix is kept in on the backend: its file precision (both backends
/// keep F16 and BF16 weights packed, `mat::Stored` on the CPU, and widen them as they multiply).
/// Activations and statistics are f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

/// Scaled dot-product attention over each sequence of a batch.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    pub heads: usize,
    /// Grouped-query attention: query head h reads key/value head h / (heads / kv_heads).
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Sliding window: query i sees key j only when i - j < window.
    pub window: Option<usize>,
    pub scale: f32,
    /// Gemma 2's soft-capping of the scaled scores: cap · tanh(score / cap), before the mask.
    pub softcap: Option<f32>,
}

/// U = s · x[rows] · aᵀ in f32: the factor the default projected Grams multiply out.
fn scaled_factor<B: Forward>(be: &B, x: &B::T, rows: Range<usize>, a: &B::T, s: f32) -> B::T {
    let mut u = be.matmul_t(x, rows, a);
    be.scale(&mut u, s);
    u
}

/// Tensors into and out of a backend, and what it can hold: the family every other op family
/// builds on (`T` is the tensor type they all take).
pub trait Transfer: Sized {
    /// A (rows, cols) f32 matrix held by the backend (owned: 'static, so a pass can tell the CPU's
    /// `Mat` apart, `merge::pipeline::refine_merge`).
    type T: 'static;

    /// What ran, for reports ("cpu", or the GPU adapter's name).
    fn name(&self) -> String;

    fn upload(&self, m: &Mat) -> Self::T;

    /// `*t = upload(m)`, reusing t's storage where the shape allows (on the GPU the buffer stays
    /// the same, so dispatches that bind it keep their bind groups).
    fn overwrite(&self, t: &mut Self::T, m: &Mat) {
        *t = self.upload(m);
    }

    /// Bring a tensor back to the host (on the GPU: waits for everything recorded so far).
    async fn download(&self, t: &Self::T) -> Result<Mat>;

    /// `download` of a tensor the caller is done with: the CPU hands its matrix over instead of
    /// copying it (an evaluation pass's logits are its largest tensor).
    async fn into_host(&self, t: Self::T) -> Result<Mat> {
        self.download(&t).await
    }

    /// A weight matrix, kept in its stored precision where the backend computes on it (the GPU
    /// packs f16/bf16 bits as they are; the CPU keeps them and converts panels in its products),
    /// else as f32. Only `select_rows` (as the table),
    /// `matmul_t` (as w) and `download` ever read weights.
    fn upload_weight(&self, w: StoredMat) -> Self::T {
        self.upload(&w.to_mat())
    }

    fn dims(&self, t: &Self::T) -> (usize, usize);

    /// The largest tensor, in bytes, one op can read or write (a GPU storage binding limit).
    fn max_tensor_bytes(&self) -> u64 {
        u64::MAX
    }

    /// Whether tensors live in device memory, apart from the host's (the memory plan).
    fn on_device(&self) -> bool {
        false
    }

    /// Whether weights are kept in their file precision (else as f32; the memory plan).
    fn keeps_file_precision(&self) -> bool {
        false
    }
}

/// The forward pass's ops, on (rows, cols) tensors selected by row ranges.
pub trait Forward: Transfer {
    /// Rows `idx` of `x`: (idx.len(), cols). Embedding lookup and first-token pooling.
    fn select_rows(&self, x: &Self::T, idx: &[u32]) -> Self::T;

    /// Columns `cols` of every row: (rows, cols.len()). Splits a fused q/k/v projection.
    fn slice_cols(&self, x: &Self::T, cols: Range<usize>) -> Self::T;

    /// x[rows] · wᵀ: (n, in) · (out, in)ᵀ → (n, out).
    fn matmul_t(&self, x: &Self::T, rows: Range<usize>, w: &Self::T) -> Self::T;

    /// y[rows] += s · d, with d of rows.len() rows.
    fn add_rows(&self, y: &mut Self::T, rows: Range<usize>, d: &Self::T, s: f32);

    /// y += b for every row; b is (1, cols).
    fn add_bias(&self, y: &mut Self::T, b: &Self::T);

    /// x *= s
    fn scale(&self, x: &mut Self::T, s: f32);

    /// y ⊙= x
    fn mul(&self, y: &mut Self::T, x: &Self::T);

    fn activate(&self, x: &mut Self::T, act: Activation);

    fn layer_norm(&self, x: &Self::T, gamma: &Self::T, beta: Option<&Self::T>, eps: f32) -> Self::T;

    /// RMSNorm of every group of `gamma`'s width in each row: the whole row when gamma is as wide
    /// as x, each head when it is one head wide (Qwen3's and Gemma 3's q/k norms).
    fn rms_norm(&self, x: &Self::T, gamma: &Self::T, eps: f32) -> Self::T;

    /// Rotary embedding, "rotate half" convention, on every head of x (rows, heads·head_dim), in
    /// place. With r = inv_freq.len() pairs (r ≤ head_dim/2), row t turns its pairs (k, k + r) of
    /// each head by angle positions[t]·inv_freq[k] and multiplies them by `scale` (longrope's
    /// attention factor); dimensions from 2r on pass unchanged (partial rotary, Phi-3).
    fn rope(&self, x: &mut Self::T, positions: &[u32], head_dim: usize, inv_freq: &[f32], scale: f32);

    /// q (rows, heads·d) against k/v (key rows, kv_heads·d) → (rows, heads·d). Sequence s has the
    /// query rows `queries[s]` (the sequences tile q's rows in order) and the key rows `keys[s]`,
    /// at least as many: its queries are its last positions, query j at key position
    /// `keys[s].len() − queries[s].len() + j` (what causal masking and the window measure from).
    /// Self-attention passes the same spans twice; a KV cache passes each sequence's cached rows.
    fn attention(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        spec: &AttentionSpec,
        queries: &[Range<usize>],
        keys: &[Range<usize>],
    ) -> Self::T;

    /// dst[rows[r]] = src[r] for every row r of src: new rows into a KV cache.
    fn write_rows(&self, dst: &mut Self::T, rows: &[u32], src: &Self::T);

    /// wa · a[ar] + wb · b[br].
    fn mix_rows(&self, a: &Self::T, ar: Range<usize>, wa: f32, b: &Self::T, br: Range<usize>, wb: f32) -> Self::T;

    /// y[rows] += s · x[xr] · Aᵀ · Bᵀ (a LoRA delta's contribution, in place, never forming B·A);
    /// returns the low-rank factor s · x[xr] · Aᵀ, (n, r), from which the merge measures the delta
    /// (`merge::iteris`: alignment errors from r × r Grams, without the (n, out) product).
    #[allow(clippy::too_many_arguments)]
    fn add_lowrank(
        &self,
        y: &mut Self::T,
        rows: Range<usize>,
        x: &Self::T,
        xr: Range<usize>,
        a: &Self::T,
        b: &Self::T,
        s: f32,
    ) -> Self::T {
        let mut t = self.matmul_t(x, xr, a);
        if s != 1.0 {
            self.scale(&mut t, s);
        }
        let n = self.dims(&t).0;
        let d = self.matmul_t(&t, 0..n, b);
        self.add_rows(y, rows, &d, 1.0);
        t
    }

    /// s · x[rows] · Aᵀ · Bᵀ: a LoRA delta's contribution, (n, out), never forming B·A.
    fn lowrank(&self, x: &Self::T, rows: Range<usize>, a: &Self::T, b: &Self::T, s: f32) -> Self::T {
        let t = self.matmul_t(x, rows, a);
        let n = self.dims(&t).0;
        let mut y = self.matmul_t(&t, 0..n, b);
        if s != 1.0 {
            self.scale(&mut y, s);
        }
        y
    }
}

/// The merge's statistics: Gram matrices and scalars recorded now and read later, accumulated
/// with more than f32 precision.
pub trait Statistics: Forward {
    // Results the host reads. Each `defer_*` records the work and returns a pending value of its
    // own kind; a stage pushes them into one `Reads` batch, and `fetch` brings the whole batch back
    // at once (on the GPU: one readback), so a stage of the merge costs one round trip.

    /// A pending f64 scalar.
    type Scalar;

    /// A pending f64 matrix (a Gram matrix, to the host as `Mat64`).
    type Gram;

    /// x[xr]ᵀ · y[yr]: (cols_x, cols_y), to the host in f64. The solve amplifies Gram rounding by up
    /// to 1/α, so backends accumulate with more than f32 precision (CPU: f64; GPU: Dot2, twice-f32
    /// pairs).
    fn defer_gram(&self, x: &Self::T, xr: Range<usize>, y: &Self::T, yr: Range<usize>) -> Self::Gram;

    /// `*acc += x[xr]ᵀ · y[yr]` on a pending Gram, at the same precision (a stage's statistics
    /// gathered chunk by chunk, `models::chunked`).
    fn add_gram(&self, acc: &mut Self::Gram, x: &Self::T, xr: Range<usize>, y: &Self::T, yr: Range<usize>);

    /// s · a · x[xr]ᵀ · y[yr], (rows_a, cols_y) with a (rows_a, cols_x): a Gram projected onto a
    /// LoRA's A, the cross term's share of Zᵀ (`Cross::Projected`), at `add_gram`'s precision.
    /// Default: U = s · x · aᵀ in f32, then Uᵀ · y.
    fn defer_projected_gram(
        &self,
        a: &Self::T,
        s: f32,
        x: &Self::T,
        xr: Range<usize>,
        y: &Self::T,
        yr: Range<usize>,
    ) -> Self::Gram {
        let u = scaled_factor(self, x, xr, a, s);
        self.defer_gram(&u, 0..self.dims(&u).0, y, yr)
    }

    /// `*acc += s · a · x[xr]ᵀ · y[yr]` on a Gram of `defer_projected_gram`.
    #[allow(clippy::too_many_arguments)]
    fn add_projected_gram(
        &self,
        acc: &mut Self::Gram,
        a: &Self::T,
        s: f32,
        x: &Self::T,
        xr: Range<usize>,
        y: &Self::T,
        yr: Range<usize>,
    ) {
        let u = scaled_factor(self, x, xr, a, s);
        self.add_gram(acc, &u, 0..self.dims(&u).0, y, yr)
    }

    /// x[xr]ᵀ · y[yr] where the Gram's only use is its Frobenius norm (the ridge scale of a cross
    /// term held projected, `SystemTerm::cross`): a backend may compute it at f32 precision. The
    /// norm of a sum of f32 products moves by about 1e-7 relative, the merge by α1/α2 times that.
    fn defer_gram_for_norm(&self, x: &Self::T, xr: Range<usize>, y: &Self::T, yr: Range<usize>) -> Self::Gram {
        self.defer_gram(x, xr, y, yr)
    }

    /// `*acc += x[xr]ᵀ · y[yr]` on a Gram of `defer_gram_for_norm`.
    fn add_gram_for_norm(&self, acc: &mut Self::Gram, x: &Self::T, xr: Range<usize>, y: &Self::T, yr: Range<usize>) {
        self.add_gram(acc, x, xr, y, yr)
    }

    /// `*acc += more` on pending scalars.
    fn add_scalar(&self, acc: &mut Self::Scalar, more: Self::Scalar);

    /// Σ x[rows]² (x may be a weight, in any stored precision), accumulated beyond f32.
    fn defer_sq_norm(&self, x: &Self::T, rows: Range<usize>) -> Self::Scalar;

    /// Σ (a − b)² over two f32 tensors of one shape.
    fn defer_sq_dist(&self, a: &Self::T, b: &Self::T) -> Self::Scalar;

    /// Σ a ⊙ b over two f32 tensors of one shape.
    fn defer_dot(&self, a: &Self::T, b: &Self::T) -> Self::Scalar;
}

/// Pending Cholesky factors of a module's system, and the one `fetch` that brings a batch of
/// pending statistics and factors back to the host.
pub trait Factors: Statistics {
    /// A pending lower Cholesky factor (None once fetched where a pivot was not positive).
    type Factor;

    /// The f32 Cholesky factor of a module's system matrix M (`SystemSpec`), assembled from
    /// pending statistics without reading them first, so a stage's statistics and the factors that
    /// precondition its f64 solves come back in one `fetch`. None where the backend does not offer
    /// factors (the CPU solves in f64 directly) or M would not fit.
    fn defer_factor(&self, _system: &SystemSpec<&Self::Scalar, &Self::Gram>) -> Option<Self::Factor> {
        None
    }

    /// The values of a batch. The only place (with `download` and `cholesky_f32_many`) where the
    /// host waits for the device: asynchronous, because a browser delivers GPU results through its
    /// event loop.
    async fn fetch(&self, reads: Reads<Self>) -> Result<Values>;

    async fn gram(&self, x: &Self::T, xr: Range<usize>, y: &Self::T, yr: Range<usize>) -> Result<Mat64> {
        let mut reads = Reads::new();
        let g = reads.gram(self.defer_gram(x, xr, y, yr));
        Ok(self.fetch(reads).await?.take_gram(g))
    }

    async fn sq_norm(&self, x: &Self::T, rows: Range<usize>) -> Result<f64> {
        let mut reads = Reads::new();
        let s = reads.scalar(self.defer_sq_norm(x, rows));
        Ok(self.fetch(reads).await?[s])
    }

    async fn sq_dist(&self, a: &Self::T, b: &Self::T) -> Result<f64> {
        let mut reads = Reads::new();
        let s = reads.scalar(self.defer_sq_dist(a, b));
        Ok(self.fetch(reads).await?[s])
    }

    /// Lower Cholesky factors of symmetric matrices computed in f32, for the f64 iterative
    /// refinement in `merge::solve`, all read back together. None where the backend does not offer
    /// them (the CPU solves in f64 directly) or a pivot was not positive.
    async fn cholesky_f32_many(&self, ms: &[&Mat64]) -> Result<Vec<Option<Mat64>>> {
        Ok(ms.iter().map(|_| None).collect())
    }

    /// Whether `cholesky_f32_many` is implemented (so an f64 solve is a fallback, reported as such).
    fn offers_cholesky_f32(&self) -> bool {
        false
    }
}

/// Every op family: what models and the merge are written over (`B: Backend`). Implemented by
/// every type that implements the four.
pub trait Backend: Forward + Statistics + Factors {}

impl<B: Forward + Statistics + Factors> Backend for B {}
