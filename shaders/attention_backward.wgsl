// The gradient of causal self-attention in two passes (KV substituted), FlashAttention-2's split
// without its tiling. Nothing of the forward pass is kept but q, k, v: each pass recomputes the
// probabilities. With s_ij the scaled (and soft-capped) scores of query row i and p_i = softmax(s_i),
//   queries (KV = false), one thread per (query row i, head h):
//     lse_i = log Σ_j exp(s_ij),   D_i = Σ_j p_ij · (do_i · v_j),
//     dq_i  = Σ_j p_ij · (do_i · v_j − D_i) · cap′_ij · scale · k_j,
//     and (lse_i, D_i) into stats;
//   keys (KV = true), one thread per (key row j, key/value head g), after the queries' pass: every
//   query i that attends to j (its own row up to the end of its sequence, within the sliding
//   window), for every query head h of g's group:
//     dv_j += p_ij · do_i,   dk_j += p_ij · (do_i · v_j − D_i) · cap′_ij · scale · q_i,
//     with p_ij = exp(s_ij − lse_i) from stats.
// So no two threads write one output, and nothing of size rows × rows is stored.
// cap′ = 1 − tanh²(raw / cap) where the scores are soft-capped (Gemma 2), else 1.
// Keys of query row t: span[3t..3t+3] as in attention.wgsl (first key row, end key row, own key
// row); causal masking and the sliding window bound them from the own row.

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
@group(0) @binding(6) var<storage, read_write> grad: array<f32>;    // queries: dq; keys: dk
@group(0) @binding(7) var<storage, read_write> grad_v: array<f32>;  // keys: dv (unused by queries)
@group(0) @binding(8) var<uniform> p: Params;

const HD: u32 = {{HD}}u;
const KV: bool = {{KV}};

// (s_ij, cap′_ij · scale): the score of query row i, head h against key row j, key head kh.
fn score(i: u32, h: u32, j: u32, kh: u32) -> vec2<f32> {
    let qo = (i * p.heads + h) * HD;
    let ko = (j * p.kv_heads + kh) * HD;
    var s = 0.0;
    for (var d = 0u; d < HD; d++) { s += q[qo + d] * k[ko + d]; }
    s *= p.scale;
    if (p.softcap > 0.0) {
        let th = tanh(s / p.softcap);
        return vec2<f32>(p.softcap * th, (1.0 - th * th) * p.scale);
    }
    return vec2<f32>(s, p.scale);
}

// do_i · v_j for query row i, head h and key row j, key head kh.
fn dp(i: u32, h: u32, j: u32, kh: u32) -> f32 {
    let qo = (i * p.heads + h) * HD;
    let ko = (j * p.kv_heads + kh) * HD;
    var x = 0.0;
    for (var d = 0u; d < HD; d++) { x += dout[qo + d] * v[ko + d]; }
    return x;
}

fn queries(idx: u32) {
    let t = idx / p.heads;
    let h = idx % p.heads;
    let kh = h / (p.heads / p.kv_heads);
    let o = idx * HD;
    if (span[3u * t + 1u] == 0u) {
        // A row no sequence covers (its forward output is not read): no gradient.
        for (var d = 0u; d < HD; d++) { grad[o + d] = 0.0; }
        return;
    }
    var lo = span[3u * t];
    let at = span[3u * t + 2u];
    let hi = at + 1u;
    if (p.window != 0u && at + 1u > p.window && at + 1u - p.window > lo) { lo = at + 1u - p.window; }
    // The log-sum-exp of the scores, online.
    var m = -3.4e38;
    var sum = 0.0;
    for (var j = lo; j < hi; j++) {
        let s = score(t, h, j, kh).x;
        let nm = max(m, s);
        sum = sum * exp(m - nm) + exp(s - nm);
        m = nm;
    }
    let lse = m + log(sum);
    var dd = 0.0;
    for (var j = lo; j < hi; j++) { dd += exp(score(t, h, j, kh).x - lse) * dp(t, h, j, kh); }
    var acc: array<f32, HD>;
    for (var j = lo; j < hi; j++) {
        let sc = score(t, h, j, kh);
        let g = exp(sc.x - lse) * (dp(t, h, j, kh) - dd) * sc.y;
        for (var d = 0u; d < HD; d++) { acc[d] += g * k[(j * p.kv_heads + kh) * HD + d]; }
    }
    for (var d = 0u; d < HD; d++) { grad[o + d] = acc[d]; }
    stats[2u * idx] = lse;
    stats[2u * idx + 1u] = dd;
}

fn keys(idx: u32) {
    let j = idx / p.kv_heads;
    let g = idx % p.kv_heads;
    let group = p.heads / p.kv_heads;
    var end = span[3u * j + 1u];
    if (p.window != 0u) { end = min(end, j + p.window); }
    var dk: array<f32, HD>;
    var dv: array<f32, HD>;
    for (var hh = 0u; hh < group; hh++) {
        let h = g * group + hh;
        for (var i = j; i < end; i++) {
            let sc = score(i, h, j, g);
            let st = 2u * (i * p.heads + h);
            let pij = exp(sc.x - stats[st]);
            let gs = pij * (dp(i, h, j, g) - stats[st + 1u]) * sc.y;
            let qo = (i * p.heads + h) * HD;
            for (var d = 0u; d < HD; d++) {
                dv[d] += pij * dout[qo + d];
                dk[d] += gs * q[qo + d];
            }
        }
    }
    let o = idx * HD;
    for (var d = 0u; d < HD; d++) {
        grad[o + d] = dk[d];
        grad_v[o + d] = dv[d];
    }
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x + gid.y * p.row_stride;
    if (KV) {
        if (idx < p.rows * p.kv_heads) { keys(idx); }
    } else {
        if (idx < p.rows * p.heads) { queries(idx); }
    }
}
