// Rotary position embedding, "rotate half" convention, in place on x (rows, heads · head_dim):
// pairs (k, k + half) of every head of row t turn by the angle of its position and frequency k,
// whose cos and sin (already scaled by longrope's attention factor) the host computes: WGSL's own
// sin and cos are only bounded on [−π, π] (see rope.rs). half = head_dim / 2, or fewer pairs for a
// partial rotary (Phi-3), whose remaining dimensions pass unchanged. One thread per (row, head, k).

struct Params { rows: u32, cols: u32, head_dim: u32, half: u32, row_stride: u32 }

@group(0) @binding(0) var<storage, read_write> x: array<f32>;  // (rows, heads · head_dim)
@group(0) @binding(1) var<storage, read> position: array<u32>; // (rows): the row's index into cos_sin
@group(0) @binding(2) var<storage, read> cos_sin: array<f32>;  // (distinct positions, half, 2)
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_stride;
    let half = p.half;
    let per_row = (p.cols / p.head_dim) * half;
    if (i >= p.rows * per_row) { return; }
    let t = i / per_row;
    let h = (i % per_row) / half;
    let k = i % half;
    let at = 2u * (position[t] * half + k);
    let c = cos_sin[at];
    let s = cos_sin[at + 1u];
    let o = t * p.cols + h * p.head_dim + k;
    let a = x[o];
    let b = x[o + half];
    x[o] = a * c - b * s;
    x[o + half] = b * c + a * s;
}
