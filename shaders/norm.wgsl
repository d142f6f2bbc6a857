// LayerNorm (RMS = false) or RMSNorm (RMS = true) of each row; one 256-thread workgroup per row.
//
// The row statistics are computed in twice f32 precision (common/exact.wgsl), and each output rounds once
// from (x − mean)·inv taken to that precision, as the CPU backend's f64 statistics give. Plain f32
// statistics are off by an ulp of the mean and of 1/σ *for the whole row*: an error that a Gram
// matrix does not average out as it does independent roundings, and that a weak ridge then
// amplifies (GPT-2 and BERT merges at α = 1e-7 were 5× further from the float64 reference).

struct Params { rows: u32, cols: u32, eps: f32, has_beta: u32, one: f32, zero: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;          // (rows, cols)
@group(0) @binding(1) var<storage, read> gamma: array<f32>;      // (cols)
@group(0) @binding(2) var<storage, read> beta: array<f32>;       // (cols), unused without has_beta
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // (rows, cols)
@group(0) @binding(4) var<uniform> p: Params;

const RMS: bool = {{RMS}};
{{EXACT}}

{{PAIR_SUM}}

// (s.hi + s.lo) / n as a pair: q = s.hi / n, then the exact remainder s.hi − q·n (Sterbenz) + s.lo.
fn div2(s: vec2<f32>, n: f32) -> vec2<f32> {
    let q = rounded(s.x / n);
    let qn = rounded(q * n);
    let rem = ((s.x - qn) * p.one - product_error(q, n, qn)) + s.y;
    return vec2<f32>(q, rem / n);
}

// v − mean as a pair: the rounded difference and what it left out.
fn centred(v: f32, mean: vec2<f32>) -> vec2<f32> {
    let d = (v - mean.x) * p.one;
    return vec2<f32>(d, sum_error(v, -mean.x, d) - mean.y);
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= p.rows) { return; }
    let lid = l.x;
    let base = row * p.cols;
    let n = f32(p.cols);
    var mean = vec2<f32>(0.0, 0.0);
    if (!RMS) {
        var s = vec2<f32>(0.0, 0.0);
        for (var c = lid; c < p.cols; c += 256u) { s = add2(s, x[base + c], 0.0); }
        mean = div2(reduce2(lid, s), n);
    }
    // Σ (x − mean)², from each centred pair d: d.hi² exactly, plus 2·d.hi·d.lo.
    var q = vec2<f32>(0.0, 0.0);
    for (var c = lid; c < p.cols; c += 256u) {
        let d = centred(x[base + c], mean);
        let sq = rounded(d.x * d.x);
        q = add2(q, sq, product_error(d.x, d.x, sq) + 2.0 * d.x * d.y);
    }
    let var2 = div2(reduce2(lid, q), n);
    let v_hi = (var2.x + p.eps) * p.one;
    let v_lo = var2.y + sum_error(var2.x, p.eps, v_hi);
    // 1/√v as a pair: the f32 estimate and one Newton step, inv_lo = inv·(1 − v·inv²)/2, with the
    // residual 1 − v·inv² computed exactly enough (it is ~1e-7).
    let inv = rounded(1.0 / sqrt(v_hi));
    let i2 = rounded(inv * inv);
    let i2_err = product_error(inv, inv, i2);
    let vi2 = rounded(v_hi * i2);
    let r = (((1.0 - vi2) * p.one - product_error(v_hi, i2, vi2)) - v_hi * i2_err) - v_lo * i2;
    let inv_lo = 0.5 * inv * r;
    for (var c = lid; c < p.cols; c += 256u) {
        let d = centred(x[base + c], mean);
        var v = (d.x * inv + (d.x * inv_lo + d.y * inv)) * gamma[c];
        if (p.has_beta != 0u) { v += beta[c]; }
        out[base + c] = v;
    }
}
