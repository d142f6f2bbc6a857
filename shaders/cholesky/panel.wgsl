// Cholesky panel: below a factored diagonal block L11 (rows/cols k0 .. k0+kb), solve
// L21 · L11ᵀ = A21 for rows k0+kb .. n by forward substitution, one thread per row. L21 is written
// back into a and also, contiguous, into `panel` (rows − k0 − kb, kb), which the trailing update
// then reads (a buffer cannot be bound for reading and writing in one dispatch).

struct Params { n: u32, k0: u32, kb: u32 }

@group(0) @binding(0) var<storage, read_write> a: array<f32>;      // (n, n)
@group(0) @binding(1) var<storage, read_write> panel: array<f32>;  // (n − k0 − kb, kb)
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> l: array<f32, 1024>;  // L11 (32, 32)

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(global_invocation_id) gid: vec3<u32>) {
    let kb = p.kb;
    for (var e = lid3.x; e < kb * kb; e += 64u) {
        l[e] = a[(p.k0 + e / kb) * p.n + p.k0 + e % kb];
    }
    workgroupBarrier();
    let r = gid.x;
    let row = p.k0 + kb + r;
    if (row >= p.n) { return; }
    var x: array<f32, 32>;
    for (var j = 0u; j < kb; j++) {
        var s = a[row * p.n + p.k0 + j];
        for (var c = 0u; c < j; c++) { s -= x[c] * l[j * kb + c]; }
        x[j] = s / l[j * kb + j];
        a[row * p.n + p.k0 + j] = x[j];
        panel[r * kb + j] = x[j];
    }
}
