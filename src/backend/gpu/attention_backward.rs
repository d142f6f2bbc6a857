//! `attention_backward.wgsl`: the gradient of causal self-attention in two passes,
//! FlashAttention-2's split without its tiling: the queries' pass recomputes each query's
//! probabilities for dq and leaves per (query, head) the log-sum-exp and D = Σ p·dp; the keys'
//! pass gathers dk and dv per key from every query that attends to it, so no two threads write
//! one output and nothing of size (rows × rows) is stored.

use super::dispatch::{grid_1d, params, Kernel};
use super::{Gpu, GpuTensor};
use crate::backend::AttentionSpec;
use std::ops::Range;

pub(super) const ATTENTION_BACKWARD: Kernel =
    Kernel { name: "attention_backward", src: include_str!("../../../shaders/attention_backward.wgsl") };

/// The largest head the kernels' per-thread arrays hold (as the forward kernel).
const MAX_HEAD_DIM: usize = 256;

params!(AttentionBackwardParams {
    rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    /// 0: no sliding window.
    window: u32,
    scale: f32,
    /// Soft-capping of the scaled scores (Gemma 2); 0: none.
    softcap: f32,
    row_stride: u32,
});

/// The shader's substitutions: the head width its per-thread arrays hold, and the pass (the
/// keys' pass where `kv`, else the queries').
pub(super) fn subs(head_dim: usize, kv: bool) -> Vec<(&'static str, String)> {
    vec![("HD", head_dim.to_string()), ("KV", kv.to_string())]
}

impl Gpu {
    pub(super) fn attention_gradient(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        dout: &GpuTensor,
        spec: &AttentionSpec,
        seqs: &[Range<usize>],
    ) -> (GpuTensor, GpuTensor, GpuTensor) {
        let (hd, rows) = (spec.head_dim, q.rows);
        assert!(spec.causal, "attention_backward: causal self-attention only");
        assert_eq!((q.cols, dout.rows, dout.cols), (spec.heads * hd, rows, q.cols), "attention_backward: q and dout");
        assert_eq!(
            (k.rows, k.cols, v.rows, v.cols),
            (rows, spec.kv_heads * hd, rows, spec.kv_heads * hd),
            "attention_backward: k and v must be (rows, kv_heads · head_dim)"
        );
        assert!(
            spec.kv_heads > 0 && spec.heads.is_multiple_of(spec.kv_heads),
            "attention_backward: kv_heads must divide heads"
        );
        assert!(seqs.iter().all(|s| s.end <= rows), "attention_backward: a sequence leaves the rows");
        if hd > MAX_HEAD_DIM {
            self.fail(format!(
                "attention_backward handles head_dim up to {MAX_HEAD_DIM}, not {hd}: use the CPU backend"
            ));
        }
        // As the forward kernel's: (first key, end key, own key) per row.
        let mut span = vec![0u32; rows * 3];
        for s in seqs {
            for t in s.clone() {
                span[3 * t..3 * t + 3].copy_from_slice(&[s.start as u32, s.end as u32, t as u32]);
            }
        }
        let sb = self.table(&span);
        let stats = self.alloc(rows * spec.heads, 2);
        let (dq, dk, dv) = (self.alloc(rows, q.cols), self.alloc(rows, k.cols), self.alloc(rows, v.cols));
        let params = |threads: usize| {
            let (gx, gy, row_stride) = grid_1d(threads);
            let p = AttentionBackwardParams {
                rows: rows as u32,
                heads: spec.heads as u32,
                kv_heads: spec.kv_heads as u32,
                head_dim: hd as u32,
                window: spec.window.unwrap_or(0) as u32,
                scale: spec.scale,
                softcap: spec.softcap.unwrap_or(0.0),
                row_stride,
            };
            (p, (gx, gy, 1))
        };
        let (pq, groups) = params(rows * spec.heads);
        let kernel = self.pipeline(&ATTENTION_BACKWARD, &subs(hd, false));
        let queries = [&q.buf, &k.buf, &v.buf, &dout.buf, &sb, &stats.buf, &dq.buf, &self.unused];
        self.dispatch(&kernel, &queries, &pq, groups);
        let (pkv, groups) = params(rows * spec.kv_heads);
        let kernel = self.pipeline(&ATTENTION_BACKWARD, &subs(hd, true));
        self.dispatch(&kernel, &[&q.buf, &k.buf, &v.buf, &dout.buf, &sb, &stats.buf, &dk.buf, &dv.buf], &pkv, groups);
        (dq, dk, dv)
    }
}
