// C (M, N) = alpha · A (M, K) · B (K, N)   [+ C when accumulate]; C is written at
// c_off + i·ldc + j, so a product can update a block of a larger matrix (the Cholesky update).
//
// Both operands are read through (offset, row stride, column stride), so the same kernel computes
// x·Wᵀ (B = Wᵀ read in place), Xᵀ·Y (the Gram matrices, A = Xᵀ read in place) and plain products,
// and a row range of a batched tensor costs only an offset.
//
// Tiling: a 16×16 workgroup computes a (16·TM)×(16·TN) tile of C, each thread TM×TN outputs held in
// registers, stepping through K in slices of 16 staged in workgroup memory. TM = TN = 8 (128×128
// tiles, 64 products per 16 workgroup-memory reads) for large products; 4 (64×64 tiles) for small
// ones, where bigger tiles would leave most of the GPU idle, and for the compensated Grams, whose
// second accumulator doubles the registers. A thread's rows and columns are interleaved (row
// lid.y + 16r, column lid.x + 16s): neighbouring threads read neighbouring workgroup-memory words
// (no bank conflicts) and write neighbouring words of C. A_K_FAST / B_K_FAST (substituted) choose
// the order in which threads load each tile so that consecutive threads read consecutive addresses.
//
// Accumulation: plain f32 (fma) for activations. With WITH_LO (the Gram matrices) the exact
// rounding error of every product and every addition is gathered in a second accumulator written
// to c_lo (Dot2): c + c_lo, added in f64 on the host, is the Gram matrix as if accumulated in twice
// f32 precision (1e-14 relative, not f32's 1e-8), as the solve needs: it amplifies Gram rounding by
// up to 1/α. (Kahan's compensation alone is not enough: it keeps the sum to f32 precision only.)

struct Params {
    m: u32, n: u32, k: u32,
    a_off: u32, a_rs: u32, a_cs: u32,
    b_off: u32, b_rs: u32, b_cs: u32,
    accumulate: u32,
    c_off: u32, ldc: u32, alpha: f32,
    // Always 1.0. Compilers that reassociate floating point would simplify the error terms (e.g.
    // (a − (s − (s − a))) to 0); a factor only known at run time keeps them.
    one: f32,
    // Always 0 (see `rounded`).
    zero: u32,
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

{{EXACT}}

const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const BM: u32 = 16u * TM;  // tile rows
const BN: u32 = 16u * TN;  // tile columns

var<workgroup> ta: array<f32, {{TA_LEN}}>;  // (16, BM): [kk * BM + i]
var<workgroup> tb: array<f32, {{TB_LEN}}>;  // (16, BN): [kk * BN + j]

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let tid = lid.y * 16u + lid.x;
    var acc: array<f32, {{ACC_LEN}}>;
    var comp: array<f32, {{COMP_LEN}}>;
    if (WITH_LO && p.accumulate != 0u) {
        // A Gram gathered over several calls (chunks of rows): the Dot2 sum goes on from the
        // (c, c_lo) pair the previous call left.
        for (var r = 0u; r < TM; r++) {
            let gi = row0 + lid.y + 16u * r;
            for (var s = 0u; s < TN; s++) {
                let gj = col0 + lid.x + 16u * s;
                if (gi < p.m && gj < p.n) {
                    let o = p.c_off + gi * p.ldc + gj;
                    acc[r * TN + s] = c[o];
                    comp[r * TN + s] = c_lo[o];
                }
            }
        }
    }
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        for (var e = 0u; e < TM; e++) {
            let idx = tid + e * 256u;
            var i: u32; var kk: u32;
            if (A_K_FAST) { i = idx / 16u; kk = idx % 16u; } else { kk = idx / BM; i = idx % BM; }
            var va = 0.0;
            if (row0 + i < p.m && k0 + kk < p.k) { va = a[p.a_off + (row0 + i) * p.a_rs + (k0 + kk) * p.a_cs]; }
            ta[kk * BM + i] = va;
        }
        for (var e = 0u; e < TN; e++) {
            let idx = tid + e * 256u;
            var j: u32; var kb: u32;
            if (B_K_FAST) { j = idx / 16u; kb = idx % 16u; } else { kb = idx / BN; j = idx % BN; }
            var vb = 0.0;
            if (col0 + j < p.n && k0 + kb < p.k) { vb = load_b(p.b_off + (k0 + kb) * p.b_rs + (col0 + j) * p.b_cs); }
            tb[kb * BN + j] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            var av: array<f32, {{TM}}>;
            var bv: array<f32, {{TN}}>;
            for (var r = 0u; r < TM; r++) { av[r] = ta[kk * BM + lid.y + 16u * r]; }
            for (var s = 0u; s < TN; s++) { bv[s] = tb[kk * BN + lid.x + 16u * s]; }
            for (var r = 0u; r < TM; r++) {
                for (var s = 0u; s < TN; s++) {
                    let q = r * TN + s;
                    if (WITH_LO) {
                        // Dot2 (Ogita, Rump, Oishi 2005): acc + comp is the sum as if computed in
                        // twice f32 precision. sum_error gives the exact rounding error of each
                        // addition, product_error that of each product (common/exact.wgsl); both gather
                        // in comp.
                        let prod = rounded(av[r] * bv[s]);
                        let sum = (acc[q] + prod) * p.one;
                        comp[q] = comp[q] + (sum_error(acc[q], prod, sum) + product_error(av[r], bv[s], prod));
                        acc[q] = sum;
                    } else {
                        acc[q] = fma(av[r], bv[s], acc[q]);
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < TM; r++) {
        let gi = row0 + lid.y + 16u * r;
        if (gi >= p.m) { continue; }
        for (var s = 0u; s < TN; s++) {
            let gj = col0 + lid.x + 16u * s;
            if (gj >= p.n) { continue; }
            let o = p.c_off + gi * p.ldc + gj;
            let q = r * TN + s;
            if (WITH_LO) {
                // With accumulate, (acc, comp) started from (c, c_lo), and alpha is 1.
                c[o] = p.alpha * acc[q];
                c_lo[o] = p.alpha * comp[q];
            } else if (p.accumulate != 0u) {
                c[o] = c[o] + p.alpha * acc[q];
            } else {
                c[o] = p.alpha * acc[q];
            }
        }
    }
}
