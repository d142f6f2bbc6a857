// The gradient of RMSNorm, y = x · ρ · γ with ρ = 1/√(mean x² + ε), for each row of (rows, cols)
// (a row is one group of γ's width: a whole token row, or one head of it): with g = γ ⊙ dy,
//   dx = ρ·g − ρ³·x·(g·x)/cols.
// One 256-thread workgroup per row; the two row sums in f32 (a gradient, unlike the forward
// statistics the Grams are built from, needs no more).

struct Params { rows: u32, cols: u32, eps: f32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;          // (rows, cols): the norm's input
@group(0) @binding(1) var<storage, read> gamma: array<f32>;      // (cols)
@group(0) @binding(2) var<storage, read> dy: array<f32>;         // (rows, cols): the output's gradient
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;   // (rows, cols)
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> red: array<vec2<f32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= p.rows) { return; }
    let lid = l.x;
    let base = row * p.cols;
    // (Σ x², Σ x·γ·dy)
    var s = vec2<f32>(0.0, 0.0);
    for (var c = lid; c < p.cols; c += 256u) {
        let v = x[base + c];
        s += vec2<f32>(v * v, v * gamma[c] * dy[base + c]);
    }
    red[lid] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) { red[lid] += red[lid + k]; }
        workgroupBarrier();
    }
    let n = f32(p.cols);
    let rho = 1.0 / sqrt(red[0].x / n + p.eps);
    let c3 = rho * rho * rho * red[0].y / n;
    for (var c = lid; c < p.cols; c += 256u) {
        dx[base + c] = rho * gamma[c] * dy[base + c] - c3 * x[base + c];
    }
}
