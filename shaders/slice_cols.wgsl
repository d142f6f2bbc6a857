// A column range of every row, taken out or put back (OP substituted):
//   slice  out (rows, w) = x[:, c0 .. c0 + w]       (splits a fused q/k/v projection)
//   place  out[:, c0 .. c0 + w] = x (rows, w)       (joins parts' gradients, the backward pass)

struct Params { rows: u32, cols: u32, c0: u32, w: u32, row_stride: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;        // slice: (rows, cols); place: (rows, w)
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // slice: (rows, w); place: (rows, cols)
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_stride;
    if (i >= p.rows * p.w) { return; }
    {{OP}}
}
