// Element-wise ops on a (rows, cols) tensor, one thread per element. OP is substituted:
//   add    y[oy + i] += s · x[ox + i]        (residual adds, LoRA deltas into a row range)
//   set    y[oy + i]  = s · x[ox + i]        (scaled copies of a row range)
//   bias   y[i]      += x[i % cols]          (bias rows)
//   scale  y[i]      *= s
//   mul    y[i]      *= x[i]                 (SwiGLU gate · up)
//   act    y[i]       = act(y[i])            (ACT substituted: gelu_erf, gelu_tanh, silu, relu, tanh)

struct Params { n: u32, oy: u32, ox: u32, cols: u32, s: f32, row_stride: u32 }

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

{{ERF}}

fn act(v: f32) -> f32 {
    {{ACT}}
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_stride;
    if (i >= p.n) { return; }
    {{OP}}
}
