// LayerNorm (RMS = false) or RMSNorm (RMS = true) of each row; one 256-thread workgroup per row.
// Statistics are reduced in workgroup memory: mean first, then the centred second moment (two
// passes, as PyTorch does, so large means do not cancel).

struct Params { rows: u32, cols: u32, eps: f32, has_beta: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;          // (rows, cols)
@group(0) @binding(1) var<storage, read> gamma: array<f32>;      // (cols)
@group(0) @binding(2) var<storage, read> beta: array<f32>;       // (cols), unused without has_beta
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // (rows, cols)
@group(0) @binding(4) var<uniform> p: Params;

const RMS: bool = {{RMS}};
var<workgroup> red: array<f32, 256>;

fn reduce(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= p.rows) { return; }
    let lid = l.x;
    let base = row * p.cols;
    let n = f32(p.cols);
    var mean = 0.0;
    if (!RMS) {
        var s = 0.0;
        for (var c = lid; c < p.cols; c += 256u) { s += x[base + c]; }
        mean = reduce(lid, s) / n;
    }
    var q = 0.0;
    for (var c = lid; c < p.cols; c += 256u) { let d = x[base + c] - mean; q += d * d; }
    let inv = 1.0 / sqrt(reduce(lid, q) / n + p.eps);
    for (var c = lid; c < p.cols; c += 256u) {
        var v = (x[base + c] - mean) * inv * gamma[c];
        if (p.has_beta != 0u) { v += beta[c]; }
        out[base + c] = v;
    }
}
