// Add one term of a module's system to M, one thread per element (see `SystemTerm` in
// src/backend/system.rs):
//   M (+)= c · sym(G) (off-diagonal entries × off_diagonal) + c · ridge · ‖G‖_F · I,
// with c = num / den and (num, den, ‖G‖²_F) = scalars[3·term .. 3·term + 3] (scalars.wgsl).
// The first term writes M instead of adding to it.

struct Params { n: u32, term: u32, first: u32, ridge: f32, off_diagonal: f32, row_stride: u32 }

@group(0) @binding(0) var<storage, read_write> m: array<f32>;  // (n, n)
@group(0) @binding(1) var<storage, read> g: array<f32>;        // (n, n), the Gram's f32 part
@group(0) @binding(2) var<storage, read> scalars: array<f32>;  // (3 · terms)
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * p.row_stride;
    if (e >= p.n * p.n) { return; }
    let r = e / p.n;
    let c = e % p.n;
    let at = 3u * p.term;
    let w = scalars[at] / max(scalars[at + 1u], 1e-37);
    var v = 0.5 * (g[r * p.n + c] + g[c * p.n + r]);
    if (r == c) {
        v += p.ridge * sqrt(scalars[at + 2u]);
    } else {
        v *= p.off_diagonal;
    }
    v *= w;
    if (p.first == 1u) { m[e] = v; } else { m[e] += v; }
}
