// C (M, N) = alpha · A (M, K) · B (K, N)   [+ C when accumulate]; C is written at
// c_off + i·ldc + j, so a product can update a block of a larger matrix (the Cholesky update).
//
// Both operands are read through (offset, row stride, column stride), so the same kernel computes
// x·Wᵀ (B = Wᵀ read in place), Xᵀ·Y (the Gram matrices, A = Xᵀ read in place) and plain products,
// and a row range of a batched tensor costs only an offset.
//
// Tiling: a 16×16 workgroup computes a 64×64 tile of C, each thread a 4×4 block, stepping through K in
// slices of 16 staged in workgroup memory. A_K_FAST / B_K_FAST (substituted) choose the order in
// which threads load each tile so that consecutive threads read consecutive addresses.
//
// Accumulation: plain f32 for activations. With WITH_LO (the Gram matrices) every product is added
// with Kahan compensation and the compensation is written to c_lo: c + c_lo, added in f64 on the
// host, is the Gram matrix to well beyond f32 precision, as the solve needs (it amplifies Gram
// rounding by up to 1/α).

struct Params {
    m: u32, n: u32, k: u32,
    a_off: u32, a_rs: u32, a_cs: u32,
    b_off: u32, b_rs: u32, b_cs: u32,
    accumulate: u32,
    c_off: u32, ldc: u32, alpha: f32,
    // Always 1.0. Compilers that reassociate floating point (LLVM in lavapipe does) would simplify
    // the Kahan step ((acc + y) − acc) − y to 0; a factor only known at run time in t keeps it.
    one: f32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;        // (M, K) through strides
@group(0) @binding(1) var<storage, read> b: array<{{B_ELEM}}>;  // (K, N) through strides; f32, or
                                                               // f16/bf16 weights packed two per u32
@group(0) @binding(2) var<storage, read_write> c: array<f32>;  // (M, N) at c_off, row stride ldc
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<storage, read_write> c_lo: array<f32>;  // (M, N) when WITH_LO, else unused

const A_K_FAST: bool = {{A_K_FAST}};
const B_K_FAST: bool = {{B_K_FAST}};
const WITH_LO: bool = {{WITH_LO}};

// Element e of B as f32 (B_LOAD substituted by the storage precision).
fn load_b(e: u32) -> f32 {
    {{B_LOAD}}
}

var<workgroup> ta: array<f32, 1024>;  // [kk * 64 + i]
var<workgroup> tb: array<f32, 1024>;  // [kk * 64 + j]

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let tid = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    var comp: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            var i: u32; var kk: u32;
            if (A_K_FAST) { i = idx / 16u; kk = idx % 16u; } else { kk = idx / 64u; i = idx % 64u; }
            var va = 0.0;
            if (row0 + i < p.m && k0 + kk < p.k) { va = a[p.a_off + (row0 + i) * p.a_rs + (k0 + kk) * p.a_cs]; }
            ta[kk * 64u + i] = va;
            var j: u32; var kb: u32;
            if (B_K_FAST) { j = idx / 16u; kb = idx % 16u; } else { kb = idx / 64u; j = idx % 64u; }
            var vb = 0.0;
            if (col0 + j < p.n && k0 + kb < p.k) { vb = load_b(p.b_off + (k0 + kb) * p.b_rs + (col0 + j) * p.b_cs); }
            tb[kb * 64u + j] = vb;
        }
        workgroupBarrier();
        if (WITH_LO) {
            // Compensate every addition, and recover each product's rounding error with an fma:
            // f32 rounding anywhere here is of the order of a weak ridge, which then amplifies it.
            for (var kk = 0u; kk < 16u; kk++) {
                for (var r = 0u; r < 4u; r++) {
                    let av = ta[kk * 64u + lid.y * 4u + r];
                    for (var s = 0u; s < 4u; s++) {
                        let q = r * 4u + s;
                        let bv = tb[kk * 64u + lid.x * 4u + s];
                        let prod = av * bv * p.one;
                        let y = prod - (comp[q] - fma(av, bv, -prod));
                        let t = (acc[q] + y) * p.one;
                        comp[q] = (t - acc[q]) - y;
                        acc[q] = t;
                    }
                }
            }
        } else {
            for (var kk = 0u; kk < 16u; kk++) {
                let av = vec4<f32>(ta[kk * 64u + lid.y * 4u], ta[kk * 64u + lid.y * 4u + 1u], ta[kk * 64u + lid.y * 4u + 2u], ta[kk * 64u + lid.y * 4u + 3u]);
                let bv = vec4<f32>(tb[kk * 64u + lid.x * 4u], tb[kk * 64u + lid.x * 4u + 1u], tb[kk * 64u + lid.x * 4u + 2u], tb[kk * 64u + lid.x * 4u + 3u]);
                for (var r = 0u; r < 4u; r++) {
                    acc[r * 4u + 0u] += av[r] * bv.x;
                    acc[r * 4u + 1u] += av[r] * bv.y;
                    acc[r * 4u + 2u] += av[r] * bv.z;
                    acc[r * 4u + 3u] += av[r] * bv.w;
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let gi = row0 + lid.y * 4u + r;
        if (gi >= p.m) { continue; }
        for (var s = 0u; s < 4u; s++) {
            let gj = col0 + lid.x * 4u + s;
            if (gj >= p.n) { continue; }
            let o = p.c_off + gi * p.ldc + gj;
            if (p.accumulate != 0u) { c[o] = c[o] + p.alpha * acc[r * 4u + s]; } else { c[o] = p.alpha * acc[r * 4u + s]; }
            if (WITH_LO) { c_lo[o] = -comp[r * 4u + s]; }
        }
    }
}
