//! One forward pass over a batch too large for one GPU binding, run as several chunks that meet at
//! every stage.
//!
//! A chunk is a `Batch` of its own (a run of samples, both streams of each), so no tensor of the
//! pass is wider than its rows. The chunks' passes run as futures joined on one thread; each
//! stage's hook is a `StageHook` in three steps:
//! 1. every chunk *contributes* its rows (the hook records their statistics, still pending),
//! 2. once all have, the last to arrive fetches the stage's reads and the hook *settles* once
//!    (IterIS: the solves, over the statistics of every chunk),
//! 3. then every chunk *finishes* its rows (IterIS: the merged rows run with the new deltas).
//!
//! A chunk's pass is suspended at each stage's barrier with its activations alive, so memory is
//! that of the whole batch; what chunking bounds is the largest single tensor. One chunk is the
//! plain pass: every barrier opens at once.

use super::{forward_pass, Batch, Hook, Model, Output, StageInput, Stream};
use crate::backend::Backend;
use crate::backend::{Reads, Values};
use crate::error::Result;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A hook whose stages need every chunk's rows before any chunk goes on.
pub trait StageHook<B: Backend> {
    /// What a chunk keeps from contributing to finishing a stage.
    type Held;
    /// True once nothing further down the network is needed: every chunk stops before its next stage.
    fn finished(&self) -> bool;
    /// Record this chunk's share of the stage, reading pending values into the hook's `Reads`;
    /// None where the stage is not one the hook works on.
    fn contribute(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T]) -> Option<Self::Held>;
    /// Everything read so far, to be fetched once every chunk has contributed (the hook may
    /// record more first: IterIS's systems, from the statistics of every chunk).
    fn take_reads(&mut self, be: &B) -> Reads<B>;
    /// The stage's fetched values, once for all chunks.
    fn settle(&mut self, be: &B, values: Values) -> Result<()>;
    /// This chunk's rows after the stage has settled.
    fn finish(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T], held: Self::Held);
    /// The values left pending when the pass is over.
    fn end_pass(&mut self, values: Values);
}

/// Run `model` over `chunks` (one pass, split by rows) with `hook`. No output: the pass exists for
/// what its hook sees.
pub async fn run_chunks<B: Backend, H: StageHook<B>>(
    model: &Model<B::T>,
    be: &B,
    chunks: &[Batch],
    hook: &mut H,
) -> Result<()> {
    let shared = RefCell::new(hook);
    let barrier = Barrier::new(chunks.len());
    let passes = chunks.iter().map(|batch| {
        let (shared, barrier) = (&shared, &barrier);
        async move {
            let mut chunk = Chunk { shared, barrier };
            forward_pass(model, be, batch, &mut chunk, Output::Nothing, None).await
        }
    });
    // An error in one chunk (a failed fetch, a non-finite statistic) drops the others, wherever
    // they wait.
    futures_util::future::try_join_all(passes).await?;
    let hook = shared.into_inner();
    let values = be.fetch(hook.take_reads(be)).await?;
    hook.end_pass(values);
    Ok(())
}

/// One chunk's view of the shared hook.
struct Chunk<'h, 'a, H> {
    shared: &'h RefCell<&'a mut H>,
    barrier: &'h Barrier,
}

impl<B: Backend, H: StageHook<B>> Hook<B> for Chunk<'_, '_, H> {
    fn finished(&self) -> bool {
        self.shared.borrow().finished()
    }

    async fn stage(&mut self, be: &B, input: &StageInput<'_, B>, ys: &mut [B::T]) -> Result<()> {
        let Some(held) = self.shared.borrow_mut().contribute(be, input, ys) else { return Ok(()) };
        // No borrow of the hook is held across an await: the chunks waiting at the barrier (and the
        // fetch's own suspension in a browser) must find it free.
        if self.barrier.wait().await {
            let reads = self.shared.borrow_mut().take_reads(be);
            let values = be.fetch(reads).await?;
            self.shared.borrow_mut().settle(be, values)?;
        }
        // The leader arrives here only once it has settled.
        self.barrier.wait().await;
        self.shared.borrow_mut().finish(be, input, ys, held);
        Ok(())
    }
}

/// A reusable barrier for `n` futures on one thread: `wait` returns once all n have called it,
/// true for the last to arrive.
struct Barrier {
    n: usize,
    arrived: Cell<usize>,
    generation: Cell<u64>,
    waiting: RefCell<Vec<Waker>>,
}

impl Barrier {
    fn new(n: usize) -> Barrier {
        Barrier { n, arrived: Cell::new(0), generation: Cell::new(0), waiting: RefCell::new(Vec::new()) }
    }

    async fn wait(&self) -> bool {
        let generation = self.generation.get();
        if self.arrived.get() + 1 == self.n {
            self.arrived.set(0);
            self.generation.set(generation + 1);
            self.waiting.take().into_iter().for_each(Waker::wake);
            return true;
        }
        self.arrived.set(self.arrived.get() + 1);
        poll_fn(|cx| {
            if self.generation.get() != generation {
                Poll::Ready(())
            } else {
                self.waiting.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        false
    }
}

/// Split the samples of every task into chunks of at most `max_rows` token rows, counting each
/// sample twice where both streams run. Samples stay in order and a chunk holds, for each task it
/// reaches, an `Adapter(i)` group, a `Merged` group of the same samples, or both (`streams`).
/// A sample longer than `max_rows` runs alone.
pub fn chunk_batches(ids: &[Vec<Vec<u32>>], streams: Streams, max_rows: usize) -> Vec<Batch> {
    let per_sample = if streams == Streams::Both { 2 } else { 1 };
    // (task, sample range) runs of each chunk.
    let mut chunks: Vec<Vec<(usize, std::ops::Range<usize>)>> = vec![Vec::new()];
    let mut rows = 0;
    for (task, samples) in ids.iter().enumerate() {
        for (s, sample) in samples.iter().enumerate() {
            let r = per_sample * sample.len();
            if rows > 0 && rows + r > max_rows {
                chunks.push(Vec::new());
                rows = 0;
            }
            rows += r;
            let chunk = chunks.last_mut().unwrap();
            match chunk.last_mut() {
                Some((t, run)) if *t == task => run.end = s + 1,
                _ => chunk.push((task, s..s + 1)),
            }
        }
    }
    chunks
        .into_iter()
        .map(|runs| {
            let mut b = Batch::default();
            for (task, run) in runs {
                if streams != Streams::Merged {
                    b.push_samples(task, Stream::Adapter(task), &ids[task][run.clone()], run.start);
                }
                if streams != Streams::Adapters {
                    b.push_samples(task, Stream::Merged, &ids[task][run.clone()], run.start);
                }
            }
            b
        })
        .collect()
}

/// Which streams a merge pass runs for each sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streams {
    /// Each task's adapter stream and the merged stream.
    Both,
    /// Adapter streams only (the first Jacobi solve: no merged delta yet).
    Adapters,
    /// The merged stream only (later Jacobi passes that kept the adapter streams' inputs). A task's
    /// chunks hold the same samples as with `Adapters` (one row per token either way).
    Merged,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_every_sample_once_in_order_within_the_row_budget() {
        let ids: Vec<Vec<Vec<u32>>> =
            vec![(0..5).map(|k| vec![k; 3]).collect(), (0..4).map(|k| vec![10 + k; 4]).collect(), vec![vec![99; 20]]];
        for (max_rows, merged) in [(1000, true), (14, true), (8, false), (6, true), (1, false)] {
            let chunks = chunk_batches(&ids, if merged { Streams::Both } else { Streams::Adapters }, max_rows);
            if max_rows == 1000 {
                assert_eq!(chunks.len(), 1);
            }
            let mut seen: Vec<Vec<Vec<u32>>> = vec![Vec::new(); ids.len()];
            for b in &chunks {
                // Only a lone over-long sample may exceed the budget.
                assert!(b.tokens() <= max_rows || b.seqs.len() == 1 + merged as usize, "{max_rows}: {}", b.tokens());
                for g in &b.groups {
                    assert_eq!(
                        seen[g.task].len() - if g.stream == Stream::Merged { b.seqs[g.seqs.clone()].len() } else { 0 },
                        g.first_sample
                    );
                    let seqs = b.seqs[g.seqs.clone()].iter().map(|r| b.ids[r.clone()].to_vec());
                    match g.stream {
                        Stream::Adapter(i) => {
                            assert_eq!(i, g.task);
                            seen[g.task].extend(seqs);
                        }
                        Stream::Merged => {
                            assert!(merged);
                            let adapter = b.groups.iter().find(|a| a.task == g.task && a.stream != Stream::Merged);
                            let a = &adapter.unwrap().seqs;
                            let same = b.seqs[a.clone()].iter().map(|r| b.ids[r.clone()].to_vec());
                            assert!(seqs.eq(same));
                        }
                        Stream::Base => unreachable!(),
                    }
                }
            }
            assert_eq!(seen, ids, "max_rows {max_rows}");
            // Merged-only chunks hold the samples the adapter-only chunks hold, group by group.
            let key = |bs: Vec<Batch>| -> Vec<Vec<(usize, usize, usize)>> {
                bs.iter().map(|b| b.groups.iter().map(|g| (g.task, g.first_sample, g.seqs.len())).collect()).collect()
            };
            assert_eq!(
                key(chunk_batches(&ids, Streams::Adapters, max_rows)),
                key(chunk_batches(&ids, Streams::Merged, max_rows))
            );
        }
    }

    #[test]
    fn the_barrier_releases_all_once_all_arrive_and_names_one_leader() {
        use futures_util::future::join_all;
        let barrier = Barrier::new(3);
        let order = RefCell::new(Vec::new());
        let run = |k: usize| {
            let (barrier, order) = (&barrier, &order);
            async move {
                let mut led = 0;
                for round in 0..4 {
                    order.borrow_mut().push((round, k));
                    led += barrier.wait().await as usize;
                }
                led
            }
        };
        let led = pollster::block_on(join_all((0..3).map(run)));
        assert_eq!(led.iter().sum::<usize>(), 4, "one leader per round");
        let rounds: Vec<usize> = order.borrow().iter().map(|r| r.0).collect();
        assert!(
            rounds.windows(2).all(|w| w[0] <= w[1]),
            "no future entered a round before all left the last: {rounds:?}"
        );
    }
}
