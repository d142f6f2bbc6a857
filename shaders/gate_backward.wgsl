// The gradient of a gated MLP's product z = act(gate) ⊙ up, one thread per element:
//   dgate = dz · up · act′(gate),   dup = dz · act(gate),
// act′ (SLOPE, substituted per activation) from gate and act(gate), both kept by the forward pass.

struct Params { n: u32, row_stride: u32 }

@group(0) @binding(0) var<storage, read> gate: array<f32>;        // (rows, ff)
@group(0) @binding(1) var<storage, read> act_gate: array<f32>;    // (rows, ff): act(gate)
@group(0) @binding(2) var<storage, read> up: array<f32>;          // (rows, ff)
@group(0) @binding(3) var<storage, read> dz: array<f32>;          // (rows, ff)
@group(0) @binding(4) var<storage, read_write> dgate: array<f32>; // (rows, ff)
@group(0) @binding(5) var<storage, read_write> dup: array<f32>;   // (rows, ff)
@group(0) @binding(6) var<uniform> p: Params;

{{ERF}}

// act′(x), given f = act(x).
fn slope(x: f32, f: f32) -> f32 {
    {{SLOPE}}
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_stride;
    if (i >= p.n) { return; }
    let d = dz[i];
    dgate[i] = d * up[i] * slope(gate[i], act_gate[i]);
    dup[i] = d * act_gate[i];
}
