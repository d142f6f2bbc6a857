// The backward pass of causal self-attention, second half: dk and dv. One thread per (key row j,
// key/value head g), visiting every query that attends to j (its own row up to the end of its
// sequence, within the sliding window) for every query head h of g's group, with the statistics
// attention_backward_q.wgsl left per (query row, head):
//   p_ij = exp(s_ij − lse_i),   dv_j += p_ij · do_i,
//   dk_j += p_ij · (do_i · v_j − D_i) · cap′_ij · scale · q_i.

struct Params {
    rows: u32, heads: u32, kv_heads: u32, head_dim: u32,
    window: u32, scale: f32, softcap: f32, row_stride: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;             // (rows, heads · HD)
@group(0) @binding(1) var<storage, read> k: array<f32>;             // (rows, kv_heads · HD)
@group(0) @binding(2) var<storage, read> v: array<f32>;             // (rows, kv_heads · HD)
@group(0) @binding(3) var<storage, read> dout: array<f32>;          // (rows, heads · HD)
@group(0) @binding(4) var<storage, read> span: array<u32>;          // (rows, 3)
@group(0) @binding(5) var<storage, read> stats: array<f32>;         // (rows, heads, 2): lse, D
@group(0) @binding(6) var<storage, read_write> dk: array<f32>;      // (rows, kv_heads · HD)
@group(0) @binding(7) var<storage, read_write> dv: array<f32>;      // (rows, kv_heads · HD)
@group(0) @binding(8) var<uniform> p: Params;

const HD: u32 = {{HD}}u;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x + gid.y * p.row_stride;
    if (idx >= p.rows * p.kv_heads) { return; }
    let j = idx / p.kv_heads;
    let g = idx % p.kv_heads;
    let group = p.heads / p.kv_heads;
    let qc = p.heads * HD;
    let kc = p.kv_heads * HD;
    var end = span[3u * j + 1u];
    if (p.window != 0u) { end = min(end, j + p.window); }

    var kv: array<f32, HD>;
    var vv: array<f32, HD>;
    var dka: array<f32, HD>;
    var dva: array<f32, HD>;
    for (var d = 0u; d < HD; d++) {
        kv[d] = k[j * kc + g * HD + d];
        vv[d] = v[j * kc + g * HD + d];
        dka[d] = 0.0;
        dva[d] = 0.0;
    }
    for (var hh = 0u; hh < group; hh++) {
        let h = g * group + hh;
        for (var i = j; i < end; i++) {
            var s = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < HD; d++) {
                s += q[i * qc + h * HD + d] * kv[d];
                dp += dout[i * qc + h * HD + d] * vv[d];
            }
            s *= p.scale;
            var cap = 1.0;
            if (p.softcap > 0.0) {
                let th = tanh(s / p.softcap);
                s = p.softcap * th;
                cap = 1.0 - th * th;
            }
            let st = 2u * (i * p.heads + h);
            let pij = exp(s - stats[st]);
            let gs = pij * (dp - stats[st + 1u]) * cap * p.scale;
            for (var d = 0u; d < HD; d++) {
                dva[d] += pij * dout[i * qc + h * HD + d];
                dka[d] += gs * q[i * qc + h * HD + d];
            }
        }
    }
    for (var d = 0u; d < HD; d++) {
        dk[j * kc + g * HD + d] = dka[d];
        dv[j * kc + g * HD + d] = dva[d];
    }
}
