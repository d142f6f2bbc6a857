// Partial sums: each 256-thread workgroup reduces one chunk of elements and writes one partial, as
// a pair (hi, lo) whose sum is the chunk's sum as if accumulated in twice f32 precision (every
// product's and addition's rounding error is kept: common/exact.wgsl); the host adds all partials in f64.
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

{{EXACT}}

{{PAIR_SUM}}

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
    var acc = vec2<f32>(0.0, 0.0);
    for (var i = start + l.x; i < min(start + p.chunk, p.n); i += 256u) {
        let t = term(i);
        acc = add2(acc, t.x, t.y);
    }
    let sum = reduce2(l.x, acc);
    if (l.x == 0u) {
        partial[2u * g] = sum.x;
        partial[2u * g + 1u] = sum.y;
    }
    // Keep `y` statically used in every MODE, so all variants share one binding layout.
    if (p.n == 0xffffffffu) { partial[0] = y[0]; }
}
