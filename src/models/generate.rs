//! Greedy generation: each sequence extended by its stream's most likely tokens, one forward pass
//! per token for a run of sequences decoded together (its keys and values kept in a `KvCache`),
//! under a hook that gives each stream its own deltas. What self-calibration writes its
//! continuations with and held-out accuracy decodes answers with (`merge::evaluate`).

use super::{Batch, Hook, KvCache, Model, Output, Stream};
use crate::backend::Backend;
use crate::error::{Error, Result};

/// What one run of greedy decoding may hold: its KV cache, and its first pass's widest
/// activations (`rows_within`). Fewer sequences per run would read the weights more often (one
/// read per token of each run). The memory plan counts it (`merge::plan`).
pub const DECODING_BYTES: u64 = 256 << 20;

pub fn check_decoder<T>(model: &Model<T>) -> Result<()> {
    if !model.is_causal() {
        return Err(Error::Unsupported(format!(
            "quality evaluation needs a decoder model (next-token distributions); {} has none",
            model.model_type()
        )));
    }
    Ok(())
}

/// Token rows one evaluation pass may hold: its logits and its widest activations stay within
/// `budget` and the backend's largest tensor (at least one row).
pub fn rows_within<B: Backend>(be: &B, model: &Model<B::T>, budget: u64) -> usize {
    let modules = model.modules();
    let width = modules.iter().map(|m| m.out_dim.max(m.in_dim)).max().unwrap_or(1).max(1) as u64;
    let budget = budget.min(be.max_tensor_bytes());
    ((budget / (width * 4)) as usize).max(1)
}

/// Consecutive runs of items whose `lens` add up to at most `max_rows` (an item longer than that
/// runs alone).
pub fn runs(lens: &[usize], max_rows: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, &n) in lens.iter().enumerate() {
        if i > start && sum + n > max_rows {
            out.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += n;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// How greedy decoding runs each new token through the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoding {
    /// The keys and values of earlier tokens are kept (`KvCache`): each new token is one row
    /// through the network.
    Cached,
    /// Every sequence runs again from its first token for each new one (the reference the cached
    /// decoding is tested against).
    Recomputed,
}

/// Extend each sequence `seqs[k]` by the greedy tokens of `streams[k]`, at most `budget[k]` of
/// them and never past the model's positions, until `stop(k, token)` (that token is not
/// appended): runs of sequences decoded together, one token per forward pass. Sequences of
/// different streams share a run (each stream's delta goes to its own rows), so a decoding step
/// reads the weights once for all of them: small batches are bound by that read.
#[allow(clippy::too_many_arguments)]
pub async fn continue_greedy<B: Backend, H: Hook<B>>(
    be: &B,
    model: &Model<B::T>,
    hook: &mut H,
    seqs: &mut [Vec<u32>],
    budget: &[usize],
    streams: &[Stream],
    stop: &dyn Fn(usize, u32) -> bool,
    decoding: Decoding,
) -> Result<()> {
    check_decoder(model)?;
    assert_eq!(streams.len(), seqs.len(), "one stream per sequence");
    let max_pos = model.max_positions();
    let starts: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let mut done: Vec<bool> = seqs.iter().zip(budget).map(|(s, &b)| s.len() >= max_pos || b == 0).collect();
    // Runs of sequences decoded together, sized by their longest possible sequences; with a cache,
    // every slot of a run is as long as the longest, and the cache stays within the budget too.
    let longest: Vec<usize> = starts.iter().zip(budget).map(|(s, b)| (s + b).min(max_pos)).collect();
    let capacity = longest.iter().copied().max().unwrap_or(1);
    let run_list = match decoding {
        Decoding::Recomputed => runs(&longest, rows_within(be, model, DECODING_BYTES)),
        Decoding::Cached => {
            let per_token = KvCache::<B::T>::token_bytes(&model.kv_widths()).max(1);
            let cache_rows = (DECODING_BYTES / per_token) as usize;
            runs(&vec![capacity; seqs.len()], rows_within(be, model, DECODING_BYTES).min(cache_rows))
        }
    };
    for run in run_list {
        let mut cache = (decoding == Decoding::Cached).then(|| KvCache::new(run.len(), capacity));
        // Tokens of each sequence already in the cache.
        let mut held = vec![0usize; run.len()];
        while run.clone().any(|i| !done[i]) {
            let live: Vec<usize> = run.clone().filter(|&i| !done[i]).collect();
            let mut batch = Batch::default();
            let logits = match cache.as_mut() {
                None => {
                    let parts: Vec<Vec<u32>> = live.iter().map(|&i| seqs[i].clone()).collect();
                    push_by_stream(&mut batch, &live, streams, &parts, &vec![0; live.len()]);
                    super::run(model, be, &batch, hook, Output::LastLogits).await?
                }
                Some(cache) => {
                    let slots: Vec<usize> = live.iter().map(|&i| i - run.start).collect();
                    for (&s, &i) in slots.iter().zip(&live) {
                        if model.cache_stale(held[s], seqs[i].len()) {
                            cache.clear(s);
                            held[s] = 0;
                        }
                    }
                    let parts: Vec<Vec<u32>> =
                        slots.iter().zip(&live).map(|(&s, &i)| seqs[i][held[s]..].to_vec()).collect();
                    let at: Vec<usize> = slots.iter().map(|&s| held[s]).collect();
                    push_by_stream(&mut batch, &live, streams, &parts, &at);
                    cache.begin(&batch, &slots);
                    for &s in &slots {
                        held[s] = seqs[s + run.start].len();
                    }
                    super::run_cached(model, be, &batch, hook, Output::LastLogits, Some(cache)).await?
                }
            };
            let logits = be.into_host(logits.ok_or(Error::Stop)?).await?;
            for (k, &i) in live.iter().enumerate() {
                let row = logits.row(k);
                let next = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0) as u32;
                if stop(i, next) {
                    done[i] = true;
                    continue;
                }
                seqs[i].push(next);
                done[i] = seqs[i].len() - starts[i] >= budget[i] || seqs[i].len() >= max_pos;
            }
        }
    }
    Ok(())
}

/// Append `parts` (of sequences `live`, starting at positions `at`) to `batch`, one group per run
/// of consecutive sequences that share a stream, so the batch's rows stay in `live`'s order.
fn push_by_stream(batch: &mut Batch, live: &[usize], streams: &[Stream], parts: &[Vec<u32>], at: &[usize]) {
    let mut start = 0;
    for end in 1..=live.len() {
        if end == live.len() || streams[live[end]] != streams[live[start]] {
            batch.push_continuations(0, streams[live[start]], &parts[start..end], &at[start..end]);
            start = end;
        }
    }
}
