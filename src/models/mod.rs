//! Transformer forward passes, one file per architecture, each written once over the `Backend`
//! trait. The same forward serves feature collection, the IterIS sweep, the Jacobi schedule and
//! evaluation: everything that differs between those lives in the `Hook` a pass is run with.
//!
//! A forward pass sends every linear layer through `Pass::project`, one call per *stage*: the modules
//! of a stage read the same input (q/k/v; gate/up; …). The hook sees each stage's input and the base
//! outputs `x · W0ᵀ`, adds whatever per-row-group deltas it wants, and may stop the pass once it has
//! seen every module it needs.

pub mod bert;
pub mod chunked;
pub mod decoder;
pub mod decoder_grad;
pub mod gemma;
pub mod generate;
pub mod gpt2;
pub mod kv_cache;
pub mod llama;
pub mod phi3;
pub mod rope;

use crate::backend::Backend;

use crate::backend::AttentionSpec;
use crate::error::{bad_input, Error, Result};
use crate::formats::hf_config::HfConfig;
use crate::formats::safetensors::TensorStore;
use crate::mat::{Mat, StoredMat};
use std::ops::Range;

pub use kv_cache::KvCache;

/// A linear layer y = x Wᵀ + b, W in linear orientation (out, in).
pub struct Linear<T> {
    /// Module path without the model class prefix, e.g. `h.0.attn.c_attn`.
    pub name: String,
    /// (out, in)
    pub w: T,
    /// (1, out)
    pub b: Option<T>,
}

impl<T> Linear<T> {
    pub fn r(&self) -> LinearRef<'_, T> {
        LinearRef { name: &self.name, w: &self.w, b: self.b.as_ref() }
    }
}

/// A borrowed linear layer (lets a tied LM head reuse the embedding table).
#[derive(Clone, Copy)]
pub struct LinearRef<'a, T> {
    pub name: &'a str,
    pub w: &'a T,
    pub b: Option<&'a T>,
}

/// Shape of one linear module, for mapping adapter keys onto the model.
#[derive(Clone, Debug)]
pub struct ModuleInfo {
    pub name: String,
    pub out_dim: usize,
    pub in_dim: usize,
}

/// Which weights a group of rows runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The base model alone.
    Base,
    /// The base model with adapter i applied at every module it targets.
    Adapter(usize),
    /// The base model with the merged deltas.
    Merged,
}

/// A contiguous run of sequences of one task, run with one set of weights.
#[derive(Clone, Debug)]
pub struct Group {
    pub task: usize,
    pub stream: Stream,
    /// Indices into `Batch::seqs`.
    pub seqs: Range<usize>,
    /// The index of its first sequence among its task's samples (a merge pass in chunks: which
    /// samples the group holds).
    pub first_sample: usize,
}

/// Rows are tokens for most stages; a pooler reads one row per sequence; `Output::TailLogits(k)`'s
/// LM head reads k rows per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Tokens,
    Sequences,
    Tails(usize),
}

/// Every token of every sequence of every group, concatenated: one batched forward pass.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Token rows of each sequence.
    pub seqs: Vec<Range<usize>>,
    pub groups: Vec<Group>,
}

impl Batch {
    /// Append the sequences `samples` as one group.
    pub fn push_group(&mut self, task: usize, stream: Stream, samples: &[Vec<u32>]) {
        self.push_continuations(task, stream, samples, &vec![0; samples.len()]);
    }

    /// `push_group` of the task's samples `first..first + samples.len()`.
    pub fn push_samples(&mut self, task: usize, stream: Stream, samples: &[Vec<u32>], first: usize) {
        self.push_group(task, stream, samples);
        self.groups.last_mut().unwrap().first_sample = first;
    }

    /// Append the sequences `parts` as one group, part s starting at position `starts[s]` (the
    /// tokens after what a KV cache holds).
    pub fn push_continuations(&mut self, task: usize, stream: Stream, parts: &[Vec<u32>], starts: &[usize]) {
        assert_eq!(parts.len(), starts.len());
        let first = self.seqs.len();
        for (s, &at) in parts.iter().zip(starts) {
            let start = self.ids.len();
            self.ids.extend_from_slice(s);
            self.positions.extend(at as u32..(at + s.len()) as u32);
            self.seqs.push(start..self.ids.len());
        }
        self.groups.push(Group { task, stream, seqs: first..self.seqs.len(), first_sample: 0 });
    }

    /// Rows of group `g` at the given level.
    pub fn rows(&self, g: usize, level: Level) -> Range<usize> {
        let s = &self.groups[g].seqs;
        match level {
            Level::Sequences => s.clone(),
            Level::Tails(k) => s.start * k..s.end * k,
            Level::Tokens if s.is_empty() => 0..0,
            Level::Tokens => self.seqs[s.start].start..self.seqs[s.end - 1].end,
        }
    }

    /// Row index of each sequence's last token.
    pub fn last_tokens(&self) -> Vec<u32> {
        self.seqs.iter().map(|s| s.end as u32 - 1).collect()
    }

    /// Row indices of each sequence's last `k` tokens, in order; a sequence shorter than that
    /// repeats its first token's row in front, so every sequence has k rows.
    pub fn tail_tokens(&self, k: usize) -> Vec<u32> {
        let tail = |s: &Range<usize>| {
            let (start, end) = (s.start, s.end);
            (0..k).map(move |j| (end + j).saturating_sub(k).max(start) as u32)
        };
        self.seqs.iter().flat_map(tail).collect()
    }

    /// Row index of each sequence's first token.
    pub fn first_tokens(&self) -> Vec<u32> {
        self.seqs.iter().map(|s| s.start as u32).collect()
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

/// What a pass hands to its hook at each stage.
pub struct StageInput<'a, B: Backend> {
    pub batch: &'a Batch,
    pub level: Level,
    /// The stage's input, (rows, in).
    pub x: &'a B::T,
    pub mods: &'a [LinearRef<'a, B::T>],
}

pub trait Hook<B: Backend> {
    /// `ys[j] = x · W0ᵀ` (bias not yet added) for `mods[j]`; add deltas in place. Asynchronous
    /// because a hook may read results back from the device.
    async fn stage(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T]) -> Result<()>;
    /// True once nothing further down the network is needed: the pass stops before the next stage.
    fn finished(&self) -> bool {
        false
    }
    /// Called once the pass is over (run to the end or stopped), to settle anything left pending.
    async fn end_pass(&mut self, _be: &B) -> Result<()> {
        Ok(())
    }
}

/// A hook that changes nothing: the base model.
pub struct NoHook;
impl<B: Backend> Hook<B> for NoHook {
    async fn stage(&mut self, _: &B, _: &StageInput<'_, B>, _: &mut [B::T]) -> Result<()> {
        Ok(())
    }
}

/// What a forward pass returns once every layer has run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Nothing: the pass exists for what its hook sees.
    Nothing,
    /// The final hidden states (after the final norm for decoders).
    Hidden,
    /// Next-token logits at every token (decoders only), (tokens, vocab).
    Logits,
    /// Next-token logits at each sequence's last token only, (sequences, vocab): what greedy
    /// decoding needs, without the LM head's product and readback for every prompt token.
    LastLogits,
    /// Next-token logits at each sequence's last k tokens, (sequences · k, vocab), as
    /// `Batch::tail_tokens` orders them: what judging a continuation needs.
    TailLogits(usize),
}

impl Output {
    pub fn logits(self) -> bool {
        matches!(self, Output::Logits | Output::LastLogits | Output::TailLogits(_))
    }
}

/// One forward pass in progress.
pub struct Pass<'a, B: Backend, H: Hook<B>> {
    pub be: &'a B,
    pub batch: &'a Batch,
    pub hook: &'a mut H,
    pub output: Output,
    /// Keys and values of the tokens before the batch's (greedy decoding), which the batch's own
    /// join; None: each sequence attends within the batch.
    pub cache: Option<&'a mut KvCache<B::T>>,
}

impl<B: Backend, H: Hook<B>> Pass<'_, B, H> {
    /// Attention of the `layer`-th attention layer over the batch's sequences, with the cached
    /// keys and values of earlier tokens where the pass has a cache.
    pub fn attention(&mut self, layer: usize, q: &B::T, k: &B::T, v: &B::T, spec: &AttentionSpec) -> B::T {
        let seqs = &self.batch.seqs;
        match self.cache.as_deref_mut() {
            Some(cache) => cache.attention(self.be, layer, q, k, v, spec, seqs),
            None => self.be.attention(q, k, v, spec, seqs, seqs),
        }
    }

    /// Run the linear modules of one stage on `x` (all of them read it).
    pub async fn project(&mut self, x: &B::T, level: Level, mods: &[LinearRef<'_, B::T>]) -> Result<Vec<B::T>> {
        if self.hook.finished() {
            return Err(Error::Stop);
        }
        let n = self.be.dims(x).0;
        let mut ys: Vec<B::T> = mods.iter().map(|m| self.be.matmul_t(x, 0..n, m.w)).collect();
        self.hook.stage(self.be, &StageInput { batch: self.batch, level, x, mods }, &mut ys).await?;
        for (y, m) in ys.iter_mut().zip(mods) {
            if let Some(b) = m.b {
                self.be.add_bias(y, b);
            }
        }
        Ok(ys)
    }

    /// The LM head on the final hidden states `h`, as the pass's output asks: logits at every
    /// token, or at each sequence's last token only (`LastLogits`); None when no logits are wanted.
    pub async fn lm_head(&mut self, h: B::T, head: LinearRef<'_, B::T>) -> Result<Option<B::T>> {
        let (h, level) = match self.output {
            Output::LastLogits => (self.be.select_rows(&h, &self.batch.last_tokens()), Level::Sequences),
            Output::TailLogits(k) => (self.be.select_rows(&h, &self.batch.tail_tokens(k)), Level::Tails(k)),
            _ => (h, Level::Tokens),
        };
        let logits = self.project(&h, level, &[head]).await?.pop().unwrap();
        Ok(self.output.logits().then_some(logits))
    }

    /// `project` for a stage of one module.
    pub async fn project1(&mut self, x: &B::T, m: LinearRef<'_, B::T>) -> Result<B::T> {
        Ok(self.project(x, Level::Tokens, &[m]).await?.pop().unwrap())
    }
}

/// Whether a family has the backward pass distillation refinement needs (`decoder_grad`: every
/// family `decoder.rs` holds; not GPT-2 or BERT yet).
pub fn has_backward(model_type: &str) -> bool {
    !matches!(model_type, "gpt2" | "bert")
}

/// A loaded model of any supported architecture. An enum rather than a trait object: the forward
/// pass is generic over its hook and asynchronous, which a trait object cannot express.
pub enum Model<T> {
    Gpt2(gpt2::Gpt2<T>),
    /// Llama, Mistral, Qwen2/3, SmolLM3, Gemma 2/3, Phi-3: one decoder (`decoder.rs`).
    Decoder(decoder::Decoder<T>),
    Bert(bert::Bert<T>),
}

impl<T> Model<T> {
    /// The Hugging Face `model_type`.
    pub fn model_type(&self) -> &str {
        match self {
            Model::Gpt2(m) => m.model_type(),
            Model::Decoder(m) => m.model_type(),
            Model::Bert(m) => m.model_type(),
        }
    }

    /// Every linear module the forward pass runs, in forward order.
    pub fn modules(&self) -> Vec<ModuleInfo> {
        match self {
            Model::Gpt2(m) => m.modules(),
            Model::Decoder(m) => m.modules(),
            Model::Bert(m) => m.modules(),
        }
    }

    /// (attention heads, key/value heads) of a decoder's layers; None for GPT-2 and BERT.
    pub fn heads(&self) -> Option<(usize, usize)> {
        match self {
            Model::Decoder(m) => m.layers.first().map(|l| (l.attn.heads, l.attn.kv_heads)),
            _ => None,
        }
    }

    /// The number of token ids the model embeds.
    pub fn vocab(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.vocab(),
            Model::Decoder(m) => m.vocab(),
            Model::Bert(m) => m.vocab(),
        }
    }

    /// Longest sequence the model accepts.
    pub fn max_positions(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.max_positions(),
            Model::Decoder(m) => m.max_positions(),
            Model::Bert(m) => m.max_positions(),
        }
    }

    /// The most f32 values per token row that one forward pass holds at once, over every layer
    /// (the LM head's logits and what a hook keeps are not counted): each family's `forward`
    /// frees a layer half's tensors before the next half's, and says what is left alive. The
    /// memory plan's activations are this times the pass's token rows; `tests/memory.rs` measures
    /// it on every family.
    pub fn row_floats(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.row_floats(),
            Model::Decoder(m) => m.row_floats(),
            Model::Bert(m) => m.row_floats(),
        }
    }

    /// Key/value width of each attention layer (what a KV cache holds per token).
    pub fn kv_widths(&self) -> Vec<usize> {
        match self {
            Model::Gpt2(m) => m.kv_widths(),
            Model::Decoder(m) => m.kv_widths(),
            Model::Bert(m) => m.kv_widths(),
        }
    }

    /// Whether a sequence with `held` tokens in a KV cache, now `len` tokens long, must run whole
    /// again: longrope switches to its long frequencies past the original context, and keys
    /// cached before turned by the short ones (transformers recomputes its cache there too).
    pub fn cache_stale(&self, held: usize, len: usize) -> bool {
        let Model::Decoder(m) = self else { return false };
        m.rotaries
            .iter()
            .filter_map(|r| r.long.as_ref())
            .any(|l| held > 0 && held <= l.original_max_positions && len > l.original_max_positions)
    }

    /// Whether the model stores linear weights as (in, out) (GPT-2 `Conv1D`); adapters for it
    /// carry `fan_in_fan_out: true`.
    /// Whether each token sees only the tokens before it: next-token distributions exist
    /// (greedy generation, KL, self-calibration, balancing), which an encoder has none of.
    pub fn is_causal(&self) -> bool {
        !matches!(self, Model::Bert(_))
    }

    pub fn fan_in_fan_out(&self) -> bool {
        matches!(self, Model::Gpt2(_))
    }

    pub async fn forward<B: Backend<T = T>, H: Hook<B>>(&self, pass: &mut Pass<'_, B, H>) -> Result<Option<T>> {
        match self {
            Model::Gpt2(m) => m.forward(pass).await,
            Model::Decoder(m) => m.forward(pass).await,
            Model::Bert(m) => m.forward(pass).await,
        }
    }
}

/// Run `model` on `batch` with `hook`. A pass its hook stopped early returns `None`.
pub async fn run<B: Backend, H: Hook<B>>(
    model: &Model<B::T>,
    be: &B,
    batch: &Batch,
    hook: &mut H,
    output: Output,
) -> Result<Option<B::T>> {
    run_cached(model, be, batch, hook, output, None).await
}

/// `run` continuing the sequences a KV cache holds (`KvCache::begin` has mapped the batch's
/// sequences onto its slots).
pub async fn run_cached<B: Backend, H: Hook<B>>(
    model: &Model<B::T>,
    be: &B,
    batch: &Batch,
    hook: &mut H,
    output: Output,
    cache: Option<&mut KvCache<B::T>>,
) -> Result<Option<B::T>> {
    let out = forward_pass(model, be, batch, hook, output, cache).await?;
    hook.end_pass(be).await?;
    Ok(out)
}

/// The forward pass alone, without its hook's `end_pass` (a chunk of `chunked::run_chunks`).
async fn forward_pass<B: Backend, H: Hook<B>>(
    model: &Model<B::T>,
    be: &B,
    batch: &Batch,
    hook: &mut H,
    output: Output,
    cache: Option<&mut KvCache<B::T>>,
) -> Result<Option<B::T>> {
    match model.forward(&mut Pass { be, batch, hook, output, cache }).await {
        Err(Error::Stop) => Ok(None),
        r => r,
    }
}

/// Every `model_type` this tool loads, as the page and README list them.
pub const MODEL_TYPES: [&str; 11] =
    ["gpt2", "llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text", "gemma3", "phi3", "bert"];

/// transformers' defaults for the keys a model type's family reads (each family file declares its
/// own): what a config.json that leaves a key out means.
pub fn defaults(model_type: &str) -> serde_json::Value {
    match model_type {
        "gpt2" => gpt2::defaults(model_type),
        t if llama::MODEL_TYPES.contains(&t) => llama::defaults(t),
        t if gemma::MODEL_TYPES.contains(&t) => gemma::defaults(t),
        "phi3" => phi3::defaults(model_type),
        "bert" => bert::defaults(model_type),
        _ => serde_json::json!({}),
    }
}

/// Load the model a `config.json` describes from its weights, with its model type's defaults for
/// the keys it leaves out.
pub fn load<B: Backend>(be: &B, config: &HfConfig, weights: &TensorStore) -> Result<Model<B::T>> {
    let mt = config.model_type()?;
    let config = &config.with_defaults(&defaults(&mt));
    Ok(match mt.as_str() {
        "gpt2" => Model::Gpt2(gpt2::Gpt2::load(be, config, weights)?),
        t if llama::MODEL_TYPES.contains(&t) => Model::Decoder(llama::load(be, config, weights)?),
        t if gemma::MODEL_TYPES.contains(&t) => Model::Decoder(gemma::load(be, config, weights)?),
        "phi3" => Model::Decoder(phi3::load(be, config, weights)?),
        "bert" => Model::Bert(bert::Bert::load(be, config, weights)?),
        other => {
            return Err(bad_input(
                &config.file,
                format!("model_type \"{other}\" is not supported (supported: {})", MODEL_TYPES.join(", ")),
            ))
        }
    })
}

/// Reads weights by their module path under the model class prefix (`transformer.`, `model.`,
/// `bert.`, …), uploads them, and checks their shapes. `at` scopes a reader to a module
/// (`layers.3`, then `self_attn`), so a family names each weight by its own last part.
pub struct WeightReader<'a, B: Backend> {
    pub be: &'a B,
    pub store: &'a TensorStore,
    /// The model class prefix in the file; not part of module names (nor of LoRA targets).
    pub prefix: String,
    /// The module this reader is scoped to (`layers.3.self_attn`), empty at the model's root.
    path: String,
}

impl<'a, B: Backend> WeightReader<'a, B> {
    /// Find which of `prefixes` the checkpoint uses, by looking for `probe`.
    pub fn new(be: &'a B, store: &'a TensorStore, probe: &str, prefixes: &[&str], arch: &str) -> Result<Self> {
        let found: Vec<&&str> = prefixes.iter().filter(|p| store.contains(&format!("{p}{probe}"))).collect();
        match found.as_slice() {
            [p] => Ok(WeightReader { be, store, prefix: p.to_string(), path: String::new() }),
            [] => Err(bad_input(
                store.files.first().map_or("model weights", |f| f.name.as_str()),
                format!("has no '{probe}' (under any of the prefixes {prefixes:?}): not {arch} weights"),
            )),
            _ => Err(bad_input(
                store.files.first().map_or("model weights", |f| f.name.as_str()),
                format!("holds '{probe}' under several prefixes {found:?}: ambiguous"),
            )),
        }
    }

    /// A reader of the file's top-level names (the LM head, outside the class prefix).
    pub fn unprefixed(be: &'a B, store: &'a TensorStore) -> Self {
        WeightReader { be, store, prefix: String::new(), path: String::new() }
    }

    /// This reader scoped to its submodule `sub`.
    pub fn at(&self, sub: &str) -> WeightReader<'a, B> {
        WeightReader { be: self.be, store: self.store, prefix: self.prefix.clone(), path: self.name(sub) }
    }

    /// The module path of `name` (what LoRA targets match).
    fn name(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The name of `name` in the file.
    pub fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, self.name(name))
    }

    pub fn has(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    /// A tensor in its stored precision; `shape` is checked ((1, n) for vectors).
    pub fn stored(&self, name: &str, shape: (usize, usize)) -> Result<StoredMat> {
        let key = self.key(name);
        if !self.store.contains(&key) {
            return Err(bad_input(self.store.files[0].name.as_str(), format!("missing tensor '{key}'")));
        }
        let m = self.store.stored(&key)?;
        if m.shape() != shape {
            return Err(bad_input(
                self.store.file_of(&key),
                format!("tensor '{key}' has shape {:?}, but config.json implies {:?}", m.shape(), shape),
            ));
        }
        Ok(m)
    }

    /// A tensor as an f32 host matrix; `shape` is checked.
    pub fn mat(&self, name: &str, shape: (usize, usize)) -> Result<Mat> {
        Ok(self.stored(name, shape)?.to_mat())
    }

    /// A tensor on the backend. Matrices go as stored, so a backend that keeps file precision
    /// (weights are most of the memory) never sees an f32 copy; vectors (norms, biases) are f32.
    pub fn tensor(&self, name: &str, shape: (usize, usize)) -> Result<B::T> {
        let m = self.stored(name, shape)?;
        Ok(if shape.0 > 1 { self.be.upload_weight(m) } else { self.be.upload(&m.to_mat()) })
    }

    /// `name.weight` (and `name.bias` when present) as a linear layer of shape (out, in). With
    /// `conv1d` the stored weight is (in, out), as in GPT-2, and is transposed here.
    pub fn linear(&self, name: &str, in_dim: usize, out_dim: usize, conv1d: bool) -> Result<Linear<B::T>> {
        let w = if conv1d {
            self.stored(&format!("{name}.weight"), (in_dim, out_dim))?.transpose()
        } else {
            self.stored(&format!("{name}.weight"), (out_dim, in_dim))?
        };
        let bname = format!("{name}.bias");
        let b = if self.has(&bname) { Some(self.tensor(&bname, (1, out_dim))?) } else { None };
        Ok(Linear { name: self.name(name), w: self.be.upload_weight(w), b })
    }

    /// A LayerNorm's (weight, bias), accepting the old `gamma`/`beta` names.
    pub fn norm(&self, name: &str, dim: usize, bias: bool) -> Result<(B::T, Option<B::T>)> {
        let (w, b) = if self.has(&format!("{name}.gamma")) { ("gamma", "beta") } else { ("weight", "bias") };
        let g = self.tensor(&format!("{name}.{w}"), (1, dim))?;
        let bb = if bias { Some(self.tensor(&format!("{name}.{b}"), (1, dim))?) } else { None };
        Ok((g, bb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_rows_line_up_with_their_groups() {
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Merged, &[vec![1, 2, 3, 4], vec![5]]);
        batch.push_group(1, Stream::Adapter(1), &[vec![6, 7, 8]]);
        // Each sequence's last 2 rows; the one-token sequence repeats its only row.
        assert_eq!(batch.tail_tokens(2), vec![2, 3, 4, 4, 6, 7]);
        assert_eq!((batch.rows(0, Level::Tails(2)), batch.rows(1, Level::Tails(2))), (0..4, 4..6));
    }
}
