// Cholesky of one diagonal block (kb ≤ 32) of a row-major (n, n) matrix, in place (lower triangle),
// by one 64-thread workgroup working in workgroup memory. A pivot that is not positive (or not
// finite) sets status = 1 and is replaced by 1, so the rest stays finite; the host then falls back
// to the f64 solve.

struct Params { n: u32, k0: u32, kb: u32 }

@group(0) @binding(0) var<storage, read_write> a: array<f32>;       // (n, n)
@group(0) @binding(1) var<storage, read_write> status: array<u32>;  // (1)
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> l: array<f32, 1024>;  // (32, 32)

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let kb = p.kb;
    for (var e = lid; e < kb * kb; e += 64u) {
        l[e] = a[(p.k0 + e / kb) * p.n + p.k0 + e % kb];
    }
    workgroupBarrier();
    for (var j = 0u; j < kb; j++) {
        if (lid == 0u) {
            let d = l[j * kb + j];
            if (!(d > 0.0) || d > 3.0e38) {
                status[0] = 1u;
                l[j * kb + j] = 1.0;
            } else {
                l[j * kb + j] = sqrt(d);
            }
        }
        workgroupBarrier();
        let djj = l[j * kb + j];
        for (var i = j + 1u + lid; i < kb; i += 64u) { l[i * kb + j] = l[i * kb + j] / djj; }
        workgroupBarrier();
        let m = kb - j - 1u;
        for (var e = lid; e < m * m; e += 64u) {
            let i = j + 1u + e / m;
            let c = j + 1u + e % m;
            if (c <= i) { l[i * kb + c] -= l[i * kb + j] * l[c * kb + j]; }
        }
        workgroupBarrier();
    }
    for (var e = lid; e < kb * kb; e += 64u) {
        if (e % kb <= e / kb) { a[(p.k0 + e / kb) * p.n + p.k0 + e % kb] = l[e]; }
    }
}
