//! `attention.wgsl`: scaled dot-product attention per (head, query row), online softmax.

use super::dispatch::{params, Kernel};
use super::{Gpu, GpuTensor};
use crate::backend::AttentionSpec;
use std::ops::Range;

pub(super) const ATTENTION: Kernel = Kernel { name: "attention", src: include_str!("../../../shaders/attention.wgsl") };

/// The largest head the kernel's per-thread accumulator holds.
const MAX_HEAD_DIM: usize = 256;

params!(AttentionParams {
    rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    causal: u32,
    /// 0: no sliding window.
    window: u32,
    scale: f32,
    /// Soft-capping of the scaled scores (Gemma 2); 0: none.
    softcap: f32,
});

impl Gpu {
    pub(super) fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        spec: &AttentionSpec,
        queries: &[Range<usize>],
        keys: &[Range<usize>],
    ) -> GpuTensor {
        let kv_cols = spec.kv_heads * spec.head_dim;
        assert_eq!(q.cols, spec.heads * spec.head_dim, "attention: q must be (rows, heads · head_dim)");
        assert_eq!(
            (k.cols, v.rows, v.cols),
            (kv_cols, k.rows, kv_cols),
            "attention: k and v must be (key rows, kv_heads · head_dim)"
        );
        assert!(spec.kv_heads > 0 && spec.heads % spec.kv_heads == 0, "attention: kv_heads must divide heads");
        assert_eq!(queries.len(), keys.len(), "attention: one key span per sequence");
        assert!(queries.iter().all(|s| s.end <= q.rows), "attention: a sequence leaves the rows");
        assert!(
            queries.iter().zip(keys).all(|(qs, ks)| ks.end <= k.rows && ks.len() >= qs.len()),
            "attention: a sequence's keys must lie in k and be at least its queries"
        );
        if spec.head_dim > MAX_HEAD_DIM {
            self.fail(format!(
                "attention.wgsl handles head_dim up to {MAX_HEAD_DIM}, not {}: use the CPU backend",
                spec.head_dim
            ));
        }
        // Rows no sequence covers attend to nothing (their output is not read).
        let mut span = vec![0u32; q.rows * 3];
        for (qs, ks) in queries.iter().zip(keys) {
            let first_own = ks.end - qs.len();
            for (j, t) in qs.clone().enumerate() {
                span[3 * t..3 * t + 3].copy_from_slice(&[ks.start as u32, ks.end as u32, (first_own + j) as u32]);
            }
        }
        let sb = self.table(&span);
        let out = self.alloc(q.rows, q.cols);
        let p = self.pipeline(&ATTENTION, &[]);
        let params = AttentionParams {
            rows: q.rows as u32,
            heads: spec.heads as u32,
            kv_heads: spec.kv_heads as u32,
            head_dim: spec.head_dim as u32,
            causal: spec.causal as u32,
            window: spec.window.unwrap_or(0) as u32,
            scale: spec.scale,
            softcap: spec.softcap.unwrap_or(0.0),
        };
        let (y, z) = (q.rows.min(65535), q.rows.div_ceil(65535));
        self.dispatch(&p, &[&q.buf, &k.buf, &v.buf, &sb, &out.buf], &params, (spec.heads as u32, y as u32, z as u32));
        out
    }
}
