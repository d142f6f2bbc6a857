// Error-free transformations of f32 arithmetic, substituted for {{EXACT}} into kernels that need
// sums beyond f32 precision (matmul.wgsl's Gram matrices, reduce.wgsl's norms, norm.wgsl's row
// statistics). The kernel's uniform `p` must have `one: f32` (always 1.0) and `zero: u32` (always
// 0): values the compiler cannot know, which keep it from simplifying the error terms away.

// x as a rounded f32. Drivers may contract a product into the addition that uses it (one fma, one
// rounding: WGSL allows it, and Mesa's compiler does it), which breaks error-free transformations
// that need the product rounded first. An integer operation on the bits, unknown until run time,
// forces the rounded value to exist.
fn rounded(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ p.zero);
}

// a·b − prod exactly, for prod = rounded(a·b), by Dekker's splitting into 12-bit halves: plain f32
// operations, so it does not depend on fma being fused (WGSL does not promise it). Every product and
// difference here is exact; the factors `p.one` keep a reassociating compiler from folding the
// splits away.
fn product_error(a: f32, b: f32, prod: f32) -> f32 {
    let ca = rounded(a * 4097.0);
    let a_hi = ca - (ca - a) * p.one;
    let a_lo = a - a_hi;
    let cb = rounded(b * 4097.0);
    let b_hi = cb - (cb - b) * p.one;
    let b_lo = b - b_hi;
    return ((a_hi * b_hi - prod) * p.one + a_hi * b_lo + a_lo * b_hi) * p.one + a_lo * b_lo;
}

// a + b − sum exactly, for sum = (a + b)·p.one (Knuth's TwoSum: no ordering of |a|, |b| needed).
fn sum_error(a: f32, b: f32, sum: f32) -> f32 {
    let z = (sum - a) * p.one;
    return (a - (sum - z)) + (b - z);
}
