// Partial sums: each 256-thread workgroup reduces one chunk of elements and writes one partial, as
// a pair (hi, lo) whose sum is the chunk's sum as if accumulated in twice f32 precision (every
// product's and addition's rounding error is kept: exact.wgsl); the host adds all partials in f64.
// The adaptive weights divide such sums, and at a weak ridge the solve amplifies their rounding.
// MODE (substituted) returns an element's term and its rounding error:
//   norm   Σ x[ox + i]²          (x may be a packed f16/bf16 weight: X_ELEM, X_LOAD)
//   dist   Σ (x[ox + i] − y[i])²
//   dot    Σ x[ox + i] · y[i]

struct Params { n: u32, ox: u32, chunk: u32, one: f32, zero: u32 }

@group(0) @binding(0) var<storage, read> x: array<{{X_ELEM}}>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;  // (2 · workgroups): hi, lo
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> red_hi: array<f32, 256>;
var<workgroup> red_lo: array<f32, 256>;

{{EXACT}}

fn load_x(e: u32) -> f32 {
    {{X_LOAD}}
}

// (term, its rounding error)
fn product(a: f32, b: f32) -> vec2<f32> {
    let q = rounded(a * b);
    return vec2<f32>(q, product_error(a, b, q));
}

fn term(i: u32) -> vec2<f32> {
    {{MODE}}
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let g = wid.x + wid.y * 65535u;
    let start = g * p.chunk;
    var hi = 0.0;
    var lo = 0.0;
    for (var i = start + l.x; i < min(start + p.chunk, p.n); i += 256u) {
        let t = term(i);
        let s = (hi + t.x) * p.one;
        lo += sum_error(hi, t.x, s) + t.y;
        hi = s;
    }
    red_hi[l.x] = hi;
    red_lo[l.x] = lo;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (l.x < st) {
            let a = red_hi[l.x];
            let b = red_hi[l.x + st];
            let s = (a + b) * p.one;
            red_lo[l.x] += red_lo[l.x + st] + sum_error(a, b, s);
            red_hi[l.x] = s;
        }
        workgroupBarrier();
    }
    if (l.x == 0u) {
        partial[2u * g] = red_hi[0];
        partial[2u * g + 1u] = red_lo[0];
    }
    // Keep `y` statically used in every MODE, so all variants share one binding layout.
    if (p.n == 0xffffffffu) { partial[0] = y[0]; }
}
