// Sums of (hi, lo) pairs in twice f32 precision (exact.wgsl's sum_error keeps each addition's
// rounding error), substituted for {{PAIR_SUM}}, after {{EXACT}}, into kernels of 256-thread
// workgroups: norm.wgsl, reduce.wgsl.

var<workgroup> red_hi: array<f32, 256>;
var<workgroup> red_lo: array<f32, 256>;

// acc + v + v_err, as an unnormalised (hi, lo) pair.
fn add2(acc: vec2<f32>, v: f32, v_err: f32) -> vec2<f32> {
    let s = (acc.x + v) * p.one;
    return vec2<f32>(s, acc.y + (sum_error(acc.x, v, s) + v_err));
}

// The workgroup's sum of its threads' pairs, returned to every thread (call in uniform control flow).
fn reduce2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red_hi[lid] = v.x;
    red_lo[lid] = v.y;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (lid < st) {
            let a = red_hi[lid];
            let b = red_hi[lid + st];
            let s = (a + b) * p.one;
            red_lo[lid] += red_lo[lid + st] + sum_error(a, b, s);
            red_hi[lid] = s;
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(red_hi[0], red_lo[0]);
    workgroupBarrier();
    return r;
}
