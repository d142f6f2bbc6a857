//! How well a merged adapter keeps each adapter's skill, measured on held-out samples:
//! - label-free: per task, the mean over token positions of KL(p_i ‖ p*) between the next-token
//!   distributions of the adapter's own model (base + ΔW_i) and the merged model (base + ΔW*);
//! - with labels (`{"prompt", "answer"}` lines): task accuracy by greedy generation, for the merged
//!   model, each adapter alone and the base model, an answer counting when the generated text up to
//!   the first newline (or end-of-sequence token) equals the answer exactly (surrounding spaces
//!   ignored).
//! Decoder models only (the KL is over next-token distributions).

use super::iteris::Target;
use super::plan::EVAL_LOGITS_BYTES;
use super::solve::Merged;
use crate::backend::cpu::par_map;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::formats::tokenizer::TextTokenizer;
use crate::models::generate::check_decoder;
pub use crate::models::generate::{continue_greedy, rows_within, runs, Decoding};
use crate::models::{self, Batch, Hook, Model, Output, StageInput, Stream};
use std::collections::HashMap;

/// The quality of a merge on one task.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskQuality {
    #[serde(serialize_with = "super::report::serialize_file_name")]
    pub eval_file: String,
    pub samples: usize,
    /// Mean KL(adapter ‖ merged) per token position, in nats.
    pub kl: f64,
    /// Greedy-generation accuracy of the merged model (labeled sets only).
    pub accuracy: Option<f64>,
    /// The same for the task's own adapter alone (base + ΔW_i): what the merge is judged against.
    pub accuracy_alone: Option<f64>,
}

/// Adds each row group's deltas at every targeted module: LoRA i on `Adapter(i)` rows, the merged
/// delta on `Merged` rows, nothing on `Base` rows.
pub struct DeltaHook<T> {
    index: HashMap<String, usize>,
    /// Per target: per adapter (A, B, scale), and the merged (A, B).
    loras: Vec<Vec<Option<(T, T, f32)>>>,
    merged: Vec<Option<(T, T)>>,
}

impl<T> DeltaHook<T> {
    pub fn new<B: Backend<T = T>>(be: &B, targets: &[Target], merged: Option<&[Merged]>) -> DeltaHook<T> {
        DeltaHook {
            index: targets.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            loras: targets
                .iter()
                .map(|t| {
                    t.loras.iter().map(|l| l.as_ref().map(|l| (be.upload(&l.a), be.upload(&l.b), l.scale))).collect()
                })
                .collect(),
            merged: (0..targets.len()).map(|k| merged.map(|m| (be.upload(&m[k].a), be.upload(&m[k].b)))).collect(),
        }
    }
}

impl<B: Backend> Hook<B> for DeltaHook<B::T> {
    async fn stage(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T]) -> Result<()> {
        for (j, m) in input.mods.iter().enumerate() {
            let Some(&t) = self.index.get(m.name) else { continue };
            for (g, group) in input.batch.groups.iter().enumerate() {
                let rows = input.batch.rows(g, input.level);
                let delta = match group.stream {
                    Stream::Base => None,
                    Stream::Adapter(i) => self.loras[t][i].as_ref().map(|(a, b, s)| (a, b, *s)),
                    Stream::Merged => self.merged[t].as_ref().map(|(a, b)| (a, b, 1.0)),
                };
                if let (Some((a, b, s)), false) = (delta, rows.is_empty()) {
                    be.add_lowrank(&mut ys[j], rows.clone(), input.x, rows, a, b, s);
                }
            }
        }
        Ok(())
    }
}

/// log softmax(row)[token], in f64.
fn log_prob(row: &[f32], token: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    row[token] as f64 - (row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max)
}

/// KL(softmax(a) ‖ softmax(b)) in f64, as Σ e·(a − b) / S − lse(a) + lse(b) with e = exp(a − max a)
/// and S = Σ e (p = e / S, and Σ p = 1): two exponentials per entry and no temporary, where
/// Σ p·(log p − log q) over two log-softmax rows took three exponentials per entry and two
/// vectors. Over a 49,152-token vocabulary that sum was a third of a SmolLM2 merge's held-out
/// evaluation (libm's exp).
fn kl_of_logits(a: &[f32], b: &[f32]) -> f64 {
    let max = |r: &[f32]| r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let (ma, mb) = (max(a), max(b));
    let (mut sa, mut sb, mut cross) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let e = (x as f64 - ma).exp();
        sa += e;
        sb += (y as f64 - mb).exp();
        cross += e * (x as f64 - y as f64);
    }
    cross / sa - (sa.ln() + ma) + (sb.ln() + mb)
}

/// Mean KL(adapter i ‖ merged) per token over `texts` (task `i`).
pub async fn mean_kl<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    hook: &mut DeltaHook<B::T>,
    ids: &[Vec<u32>],
    task: usize,
) -> Result<f64> {
    let (total, rows) = kl_sum(be, model, hook, ids, task).await?;
    Ok(total / rows.max(1) as f64)
}

/// Σ KL(adapter i ‖ merged) over every token of `ids`, and the tokens.
pub async fn kl_sum<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    hook: &mut DeltaHook<B::T>,
    ids: &[Vec<u32>],
    task: usize,
) -> Result<(f64, usize)> {
    check_decoder(model)?;
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let (mut total, mut rows) = (0.0, 0);
    // Both streams' logits of a run of samples at once, within the evaluation budget.
    for run in runs(&lens, rows_within(be, model, EVAL_LOGITS_BYTES) / 2) {
        let mut batch = Batch::default();
        batch.push_group(task, Stream::Adapter(task), &ids[run.clone()]);
        batch.push_group(task, Stream::Merged, &ids[run]);
        let logits = models::run(model, be, &batch, hook, Output::Logits).await?.ok_or(Error::Stop)?;
        let logits = be.into_host(logits).await?;
        let n = batch.rows(0, models::Level::Tokens).len();
        // Row by row in parallel, summed in row order: the same sum for any thread count.
        let _p = crate::profile::span("logit sums", 0.0);
        total += par_map(n, |r| kl_of_logits(logits.row(r), logits.row(n + r))).iter().sum::<f64>();
        rows += n;
    }
    Ok((total, rows))
}

/// How the merged model agrees with one task's adapter on samples whose continuations the
/// adapter wrote (self-calibration): `teacher[k]` lists, for sample k, each position whose next
/// token the adapter chose and that token. Label-free accuracy: a sample agrees when the merged
/// model's greedy token is the adapter's at every one of its positions, so its greedy
/// continuation is the adapter's own.
#[derive(Clone, Copy, Debug, Default)]
pub struct Agreement {
    /// Samples that agree, and samples measured.
    pub agreed: usize,
    pub samples: usize,
    /// Σ −log p_merged(the adapter's token) over every listed position, and the positions.
    pub nll: f64,
    pub tokens: usize,
}

impl Agreement {
    pub fn add(&mut self, o: Agreement) {
        self.agreed += o.agreed;
        self.samples += o.samples;
        self.nll += o.nll;
        self.tokens += o.tokens;
    }
    pub fn rate(&self) -> f64 {
        self.agreed as f64 / self.samples.max(1) as f64
    }
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }
}

/// `Agreement` of the merged stream with task `task`'s adapter on `ids` (see there): one pass
/// of the merged stream, since the adapter's tokens are given.
pub async fn agreement<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    hook: &mut DeltaHook<B::T>,
    ids: &[Vec<u32>],
    teacher: &[Vec<(usize, u32)>],
    task: usize,
) -> Result<Agreement> {
    check_decoder(model)?;
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let mut out = Agreement::default();
    for run in runs(&lens, rows_within(be, model, EVAL_LOGITS_BYTES)) {
        let mut batch = Batch::default();
        batch.push_group(task, Stream::Merged, &ids[run.clone()]);
        // The LM head only where a continuation is judged: each sample's last `tail` tokens.
        let first = |k: usize| teacher[k].iter().map(|t| t.0).min().unwrap_or(lens[k]);
        let tail = run.clone().map(|k| lens[k] - first(k)).max().unwrap_or(0).max(1);
        let logits = models::run(model, be, &batch, hook, Output::TailLogits(tail)).await?.ok_or(Error::Stop)?;
        let logits = be.into_host(logits).await?;
        // Each sample's judgement (whether it agrees, Σ −log p) in parallel, added in order.
        let first_sample = run.start;
        let _p = crate::profile::span("logit sums", 0.0);
        let judged = par_map(run.len(), |s| {
            let k = first_sample + s;
            let (mut agrees, mut nll) = (true, 0.0);
            for &(pos, token) in &teacher[k] {
                let row = logits.row(s * tail + tail - (lens[k] - pos));
                let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0);
                agrees &= best == token as usize;
                nll -= log_prob(row, token as usize);
            }
            (agrees, nll)
        });
        for (s, (agrees, nll)) in judged.into_iter().enumerate() {
            out.agreed += agrees as usize;
            out.nll += nll;
            out.tokens += teacher[first_sample + s].len();
            out.samples += 1;
        }
    }
    Ok(out)
}

/// Greedy-generation accuracy of each job: its labeled items run by its stream (see `generate`).
/// Every job's items decode together, so a step reads the weights once for all of them.
pub async fn accuracies<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    tok: &TextTokenizer,
    hook: &mut DeltaHook<B::T>,
    jobs: &[(&[(&str, &str)], Stream)],
    eos: Option<u32>,
) -> Result<Vec<f64>> {
    let items: Vec<(&str, &str)> = jobs.iter().flat_map(|(items, _)| items.iter().copied()).collect();
    let streams: Vec<Stream> = jobs.iter().flat_map(|(items, s)| std::iter::repeat_n(*s, items.len())).collect();
    let texts = generate(be, model, tok, hook, &items, &streams, eos, Decoding::Cached).await?;
    let mut at = 0;
    Ok(jobs
        .iter()
        .map(|(items, _)| {
            let right = items.iter().zip(&texts[at..]).filter(|((_, a), t)| t.trim() == a.trim()).count();
            at += items.len();
            right as f64 / items.len().max(1) as f64
        })
        .collect())
}

/// Greedy continuations of the prompts of `items` (item k by `streams[k]`), until each has
/// produced a newline or the end-of-sequence token (not part of the text), or as many tokens as
/// its answer has plus two.
#[allow(clippy::too_many_arguments)]
pub async fn generate<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    tok: &TextTokenizer,
    hook: &mut DeltaHook<B::T>,
    items: &[(&str, &str)],
    streams: &[Stream],
    eos: Option<u32>,
    decoding: Decoding,
) -> Result<Vec<String>> {
    let max_pos = model.max_positions();
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    let mut budget = Vec::new();
    for (p, a) in items {
        seqs.push(tok.encode(p, max_pos)?.ids);
        budget.push(tok.encode(a, max_pos)?.ids.len() + 2);
    }
    let starts: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let stop = |_: usize, t: u32| Some(t) == eos || ends_line(tok, t);
    continue_greedy(be, model, hook, &mut seqs, &budget, streams, &stop, decoding).await?;
    (0..items.len()).map(|k| tok.decode(&seqs[k][starts[k]..])).collect()
}

/// Whether token `id` ends a line: its text holds a newline (a token that cannot be decoded does
/// not).
pub fn ends_line(tok: &TextTokenizer, id: u32) -> bool {
    tok.decode(&[id]).is_ok_and(|t| t.contains('\n'))
}
