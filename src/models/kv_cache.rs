//! Keys and values of earlier tokens, kept between the passes of greedy decoding, so each new token
//! costs one row through the network instead of its whole sequence again.
//!
//! Each sequence being decoded owns a *slot* of `capacity` rows in every attention layer's key and
//! value tensors (slots · capacity, kv width). Before a pass, `begin` says which slot each of the
//! batch's sequences continues; the pass then writes its new keys and values into the next free
//! rows of those slots (`Backend::write_rows`) and attends each query to its slot's rows so far.
//! Positions come from the batch (`Batch::push_continuations`), so rotary and learned position
//! embeddings see the true position of every new token.

use super::Batch;
use crate::backend::Backend;
use crate::mat::Mat;
use std::ops::Range;

pub struct KvCache<T> {
    capacity: usize,
    /// Rows held by each slot.
    lens: Vec<usize>,
    /// Per attention layer: (keys, values), allocated at the layer's first pass.
    layers: Vec<Option<(T, T)>>,
    /// This pass: the cache row each batch token goes to, and each batch sequence's key rows.
    rows: Vec<u32>,
    keys: Vec<Range<usize>>,
}

impl<T> KvCache<T> {
    /// A cache of `slots` sequences of at most `capacity` tokens each.
    pub fn new(slots: usize, capacity: usize) -> KvCache<T> {
        KvCache { capacity, lens: vec![0; slots], layers: Vec::new(), rows: Vec::new(), keys: Vec::new() }
    }

    /// Bytes one cached token takes in a model whose attention layers have the key/value widths
    /// `kv_widths` (f32 keys and values).
    pub fn token_bytes(kv_widths: &[usize]) -> u64 {
        kv_widths.iter().map(|&w| 2 * 4 * w as u64).sum()
    }

    /// Forget what slot `slot` holds (its sequence runs whole again, `Model::cache_stale`).
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Before a pass over `batch`: its sequence s appends its tokens to slot `slots[s]`. The
    /// caller sizes the cache (a slot overflowing is a bug, not an input error).
    pub fn begin(&mut self, batch: &Batch, slots: &[usize]) {
        assert_eq!(slots.len(), batch.seqs.len(), "KV cache: one slot per sequence");
        self.rows.clear();
        self.keys.clear();
        for (s, &slot) in batch.seqs.iter().zip(slots) {
            let held = self.lens[slot];
            assert!(held + s.len() <= self.capacity, "KV cache: slot {slot} is full");
            let base = slot * self.capacity;
            self.rows.extend((base + held..base + held + s.len()).map(|r| r as u32));
            self.keys.push(base..base + held + s.len());
            self.lens[slot] = held + s.len();
        }
    }

    /// Attention of layer `layer`: `k` and `v` (this pass's rows) go into the cache, and `q`
    /// attends to every row its sequence has there.
    pub fn attention<B: Backend<T = T>>(
        &mut self,
        be: &B,
        layer: usize,
        q: &T,
        k: &T,
        v: &T,
        spec: &crate::backend::AttentionSpec,
        queries: &[Range<usize>],
    ) -> T {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let rows = self.lens.len() * self.capacity;
        let (kc, vc) = self.layers[layer].get_or_insert_with(|| {
            let zeros = |t: &T| be.upload(&Mat::zeros(rows, be.dims(t).1));
            (zeros(k), zeros(v))
        });
        be.write_rows(kc, &self.rows, k);
        be.write_rows(vc, &self.rows, v);
        be.attention(q, kc, vc, spec, queries, &self.keys)
    }
}
