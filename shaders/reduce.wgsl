// Partial sums: each 256-thread workgroup reduces one chunk of elements and writes one partial; the
// host adds the partials in f64. MODE (substituted):
//   norm   Σ x[ox + i]²          (x may be a packed f16/bf16 weight: X_ELEM, X_LOAD)
//   dist   Σ (x[ox + i] − y[i])²
//   dot    Σ x[ox + i] · y[i]

struct Params { n: u32, ox: u32, chunk: u32 }

@group(0) @binding(0) var<storage, read> x: array<{{X_ELEM}}>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;  // (workgroups)
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> red: array<f32, 256>;

fn load_x(e: u32) -> f32 {
    {{X_LOAD}}
}

fn term(i: u32) -> f32 {
    {{MODE}}
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let g = wid.x + wid.y * 65535u;
    let start = g * p.chunk;
    var s = 0.0;
    for (var i = start + l.x; i < min(start + p.chunk, p.n); i += 256u) { s += term(i); }
    red[l.x] = s;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (l.x < st) { red[l.x] += red[l.x + st]; }
        workgroupBarrier();
    }
    if (l.x == 0u) { partial[g] = red[0]; }
    // Keep `y` statically used in every MODE, so all variants share one binding layout.
    if (p.n == 0xffffffffu) { partial[0] = y[0]; }
}
