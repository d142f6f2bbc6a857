// Scaled dot-product attention, one 64-thread workgroup per (query row, head).
// Each query row t knows its keys through span[3t..3t + 3]: the first and end key rows of its
// sequence, and the key row at its own position. So one dispatch covers a batch of sequences of any
// lengths, and queries may attend to more keys than there are queries (a KV cache: keys held in
// per-sequence slots of a larger k). Causal masking and sliding windows bound the key range from
// the query's own key row; grouped-query attention maps head h to key/value head h / (heads / kv_heads).
// Keys are visited in chunks of CHUNK with an online softmax (running max and sum, rescaled as the
// max grows), so sequence length is not limited by workgroup memory. Thread `lid` owns output
// dimensions lid, lid + 64, lid + 128, lid + 192 (head_dim ≤ 256). Scores are soft-capped
// (cap · tanh(s / cap), Gemma 2) where p.softcap > 0.

struct Params {
    rows: u32, heads: u32, kv_heads: u32, head_dim: u32,
    causal: u32, window: u32, scale: f32, softcap: f32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;          // (rows, heads · head_dim)
@group(0) @binding(1) var<storage, read> k: array<f32>;          // (key rows, kv_heads · head_dim)
@group(0) @binding(2) var<storage, read> v: array<f32>;          // (key rows, kv_heads · head_dim)
@group(0) @binding(3) var<storage, read> span: array<u32>;       // (rows, 3): first key, end key, own key
@group(0) @binding(4) var<storage, read_write> out: array<f32>;  // (rows, heads · head_dim)
@group(0) @binding(5) var<uniform> p: Params;

const CHUNK: u32 = 512u;
var<workgroup> scores: array<f32, 512>;
var<workgroup> red: array<f32, 64>;

fn reduce(lid: u32, x: f32, is_max: bool) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            if (is_max) { red[lid] = max(red[lid], red[lid + s]); } else { red[lid] += red[lid + s]; }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = l.x;
    let h = wid.x;
    let t = wid.y + wid.z * 65535u;
    if (t >= p.rows) { return; }
    let hd = p.head_dim;
    let kh = h / (p.heads / p.kv_heads);
    let qc = p.heads * hd;
    let kc = p.kv_heads * hd;
    var lo = span[3u * t];
    var hi = span[3u * t + 1u];              // exclusive
    let at = span[3u * t + 2u];              // the key row at this query's position
    if (p.causal != 0u) { hi = at + 1u; }
    if (p.window != 0u && at + 1u > p.window && at + 1u - p.window > lo) { lo = at + 1u - p.window; }

    var m = -3.4e38;
    var sum = 0.0;
    var acc = vec4<f32>(0.0);
    for (var c0 = lo; c0 < hi; c0 += CHUNK) {
        let n = min(CHUNK, hi - c0);
        var cmax = -3.4e38;
        for (var j = lid; j < n; j += 64u) {
            var s = 0.0;
            for (var d = 0u; d < hd; d++) { s += q[t * qc + h * hd + d] * k[(c0 + j) * kc + kh * hd + d]; }
            s *= p.scale;
            if (p.softcap > 0.0) { s = p.softcap * tanh(s / p.softcap); }  // Gemma 2
            scores[j] = s;
            cmax = max(cmax, s);
        }
        let new_m = max(m, reduce(lid, cmax, true));
        let rescale = exp(m - new_m);
        m = new_m;
        var csum = 0.0;
        for (var j = lid; j < n; j += 64u) {
            let e = exp(scores[j] - m);
            scores[j] = e;
            csum += e;
        }
        sum = sum * rescale + reduce(lid, csum, false);
        acc *= rescale;
        for (var u = 0u; u < 4u; u++) {
            let d = lid + 64u * u;
            if (d < hd) {
                var a = 0.0;
                for (var j = 0u; j < n; j++) { a += scores[j] * v[(c0 + j) * kc + kh * hd + d]; }
                acc[u] += a;
            }
        }
        workgroupBarrier();
    }
    for (var u = 0u; u < 4u; u++) {
        let d = lid + 64u * u;
        if (d < hd) { out[t * qc + h * hd + d] = acc[u] / sum; }
    }
}
