//! Self-calibration: where a task's calibration samples are prompts only, IterIS would align the
//! adapters only where they read, never where they write their answers. Each sample is extended
//! by its own adapter's greedy continuation (base + ΔW_i, decoded with the KV cache) before any
//! feature is collected, so the merge also sees the positions where the adapter acts. A
//! continuation ends at the end-of-sequence token, at a newline where the task's samples are
//! single lines (one sample, one line), after `max_tokens` tokens, or at the sample length limit;
//! a sample that already holds its answer usually ends at once, so the step costs a decoding step
//! there and nothing changes.

use super::evaluate::{continue_greedy, ends_line, Decoding, DeltaHook};
use super::iteris::Target;
use super::now;
use crate::backend::Backend;
use crate::error::Result;
use crate::formats::tokenizer::TextTokenizer;
use crate::models::{Model, Stream};

/// What self-calibration added (`merge_report.json`'s `self_calibration`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SelfCalibration {
    /// The budget of generated tokens per sample.
    pub max_tokens: usize,
    /// Per task: tokens generated in all, and samples that got at least one.
    pub tokens_added: Vec<usize>,
    pub samples_extended: Vec<usize>,
    /// Wall time of the generation.
    pub seconds: f64,
}

/// Where self-calibration's continuations lie, for balancing's agreement (`Continuations::teacher`).
#[derive(Clone, Debug, Default)]
pub struct Continuations {
    /// Per task, per sample: its tokens before self-calibration.
    pub prompt_len: Vec<Vec<usize>>,
    /// Per task, per sample: the token that ended its continuation (end-of-sequence, or a
    /// newline in a single-line task), which is not in the sample; None where the token budget
    /// or the length limit ended it.
    pub stop: Vec<Vec<Option<u32>>>,
}

impl Continuations {
    /// The positions of task `i`'s sample `k` (`ids`) whose next token its adapter chose, with
    /// that token: each generated token, and the stop token after the last. A sample that gained
    /// nothing is judged by its stop alone.
    pub fn teacher(&self, i: usize, k: usize, ids: &[u32]) -> Vec<(usize, u32)> {
        let from = self.prompt_len[i][k].max(1);
        let mut t: Vec<(usize, u32)> = (from..ids.len()).map(|p| (p - 1, ids[p])).collect();
        if let Some(stop) = self.stop[i][k] {
            t.push((ids.len() - 1, stop));
        }
        t
    }
}

/// Extend every task's tokenized samples (`ids[i]`, task i's) in place. `single_line[i]`: task
/// i's samples hold no newline, so a generated newline ends a continuation. Every task's samples
/// decode together, each with its own adapter: one decoding step reads the weights once for all.
#[allow(clippy::too_many_arguments)]
pub async fn self_calibrate<B: Backend>(
    be: &B,
    model: &Model<B::T>,
    tok: &TextTokenizer,
    targets: &[Target],
    ids: &mut [Vec<Vec<u32>>],
    single_line: &[bool],
    max_tokens: usize,
    max_len: usize,
    eos: Option<u32>,
) -> Result<(SelfCalibration, Continuations)> {
    let t0 = now();
    let mut hook = DeltaHook::new(be, targets, None);
    // Every sample in task order, with its task.
    let task_of: Vec<usize> = ids.iter().enumerate().flat_map(|(i, s)| std::iter::repeat_n(i, s.len())).collect();
    let mut seqs: Vec<Vec<u32>> = ids.iter_mut().flat_map(std::mem::take).collect();
    let before: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let budget: Vec<usize> = before.iter().map(|&n| max_tokens.min(max_len.saturating_sub(n))).collect();
    let streams: Vec<Stream> = task_of.iter().map(|&i| Stream::Adapter(i)).collect();
    let stops = std::cell::RefCell::new(vec![None; seqs.len()]);
    let stop = |k: usize, t: u32| {
        let end = Some(t) == eos || (single_line[task_of[k]] && ends_line(tok, t));
        if end {
            stops.borrow_mut()[k] = Some(t);
        }
        end
    };
    continue_greedy(be, model, &mut hook, &mut seqs, &budget, &streams, &stop, Decoding::Cached).await?;
    let stops = stops.into_inner();
    let (mut tokens_added, mut samples_extended) = (vec![0; ids.len()], vec![0; ids.len()]);
    let mut cont = Continuations { prompt_len: vec![Vec::new(); ids.len()], stop: vec![Vec::new(); ids.len()] };
    for (k, seq) in seqs.into_iter().enumerate() {
        let i = task_of[k];
        let added = seq.len() - before[k];
        tokens_added[i] += added;
        samples_extended[i] += (added > 0) as usize;
        cont.prompt_len[i].push(before[k]);
        cont.stop[i].push(stops[k]);
        ids[i].push(seq);
    }
    Ok((SelfCalibration { max_tokens, tokens_added, samples_extended, seconds: now() - t0 }, cont))
}
