// out (R, cols) = x[idx[r]] for each r: embedding lookup, first-token pooling.

// A table split into row blocks is gathered one block per dispatch: rows outside [start, end) of
// the bound block are left to the other dispatches.
struct Params { rows: u32, cols: u32, row_stride: u32, start: u32, end: u32 }

@group(0) @binding(0) var<storage, read> x: array<{{X_ELEM}}>; // (table rows, cols); f32, or f16/bf16
                                                               // packed two per u32
@group(0) @binding(1) var<storage, read> idx: array<u32>;      // (R)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (R, cols)
@group(0) @binding(3) var<uniform> p: Params;

fn load_x(e: u32) -> f32 {
    {{X_LOAD}}
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_stride;
    if (i >= p.rows * p.cols) { return; }
    let row = idx[i / p.cols];
    if (row < p.start || row >= p.end) { return; }
    out[i] = load_x((row - p.start) * p.cols + i % p.cols);
}
