// The backward pass of causal self-attention, first half: dq, and per (query row, head) the two
// statistics the second half (attention_backward_kv.wgsl) reads. One thread per (query row t,
// head h), recomputing the row's probabilities from q and k (nothing of the forward pass is kept
// but q, k, v): with s_j the scaled (and soft-capped) scores and p = softmax(s),
//   lse = log Σ exp(s_j),   D = Σ_j p_j · (do · v_j),
//   dq  = Σ_j p_j · (do · v_j − D) · cap′_j · scale · k_j,
// cap′_j = 1 − tanh²(raw_j / cap) where the scores are soft-capped (Gemma 2), else 1.
// Keys: span[3t..3t+3] as in attention.wgsl (first key row, end key row, own key row); causal
// masking and the sliding window bound them from the own row.

struct Params {
    rows: u32, heads: u32, kv_heads: u32, head_dim: u32,
    window: u32, scale: f32, softcap: f32, row_stride: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;             // (rows, heads · HD)
@group(0) @binding(1) var<storage, read> k: array<f32>;             // (rows, kv_heads · HD)
@group(0) @binding(2) var<storage, read> v: array<f32>;             // (rows, kv_heads · HD)
@group(0) @binding(3) var<storage, read> dout: array<f32>;          // (rows, heads · HD)
@group(0) @binding(4) var<storage, read> span: array<u32>;          // (rows, 3)
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;   // (rows, heads, 2): lse, D
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;      // (rows, heads · HD)
@group(0) @binding(7) var<uniform> p: Params;

const HD: u32 = {{HD}}u;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x + gid.y * p.row_stride;
    if (idx >= p.rows * p.heads) { return; }
    let t = idx / p.heads;
    let h = idx % p.heads;
    let kh = h / (p.heads / p.kv_heads);
    let qc = p.heads * HD;
    let kc = p.kv_heads * HD;
    if (span[3u * t + 1u] == 0u) {
        // A row no sequence covers (its forward output is not read): no gradient.
        for (var d = 0u; d < HD; d++) { dq[t * qc + h * HD + d] = 0.0; }
        return;
    }
    var lo = span[3u * t];
    let at = span[3u * t + 2u];
    let hi = at + 1u;
    if (p.window != 0u && at + 1u > p.window && at + 1u - p.window > lo) { lo = at + 1u - p.window; }

    var qv: array<f32, HD>;
    var dov: array<f32, HD>;
    var acc: array<f32, HD>;
    for (var d = 0u; d < HD; d++) {
        qv[d] = q[t * qc + h * HD + d];
        dov[d] = dout[t * qc + h * HD + d];
        acc[d] = 0.0;
    }
    // The log-sum-exp of the (capped) scores, online.
    var m = -3.4e38;
    var sum = 0.0;
    for (var j = lo; j < hi; j++) {
        var s = 0.0;
        for (var d = 0u; d < HD; d++) { s += qv[d] * k[j * kc + kh * HD + d]; }
        s *= p.scale;
        if (p.softcap > 0.0) { s = p.softcap * tanh(s / p.softcap); }
        let nm = max(m, s);
        sum = sum * exp(m - nm) + exp(s - nm);
        m = nm;
    }
    let lse = m + log(sum);
    // D = Σ p_j · dp_j, then dq.
    var dd = 0.0;
    for (var j = lo; j < hi; j++) {
        var s = 0.0;
        var dp = 0.0;
        for (var d = 0u; d < HD; d++) {
            s += qv[d] * k[j * kc + kh * HD + d];
            dp += dov[d] * v[j * kc + kh * HD + d];
        }
        s *= p.scale;
        if (p.softcap > 0.0) { s = p.softcap * tanh(s / p.softcap); }
        dd += exp(s - lse) * dp;
    }
    for (var j = lo; j < hi; j++) {
        var s = 0.0;
        var dp = 0.0;
        for (var d = 0u; d < HD; d++) {
            s += qv[d] * k[j * kc + kh * HD + d];
            dp += dov[d] * v[j * kc + kh * HD + d];
        }
        s *= p.scale;
        var cap = 1.0;
        if (p.softcap > 0.0) {
            let th = tanh(s / p.softcap);
            s = p.softcap * th;
            cap = 1.0 - th * th;
        }
        let g = exp(s - lse) * (dp - dd) * cap * p.scale;
        for (var d = 0u; d < HD; d++) { acc[d] += g * k[j * kc + kh * HD + d]; }
    }
    for (var d = 0u; d < HD; d++) { dq[t * qc + h * HD + d] = acc[d]; }
    stats[2u * idx] = lse;
    stats[2u * idx + 1u] = dd;
}
