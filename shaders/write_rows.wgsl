// dst[idx[r]] = src[r] for each row r of src: a pass's new keys and values into the rows of a KV
// cache (each sequence owns a slot of rows there). One thread per element of src.

struct Params { rows: u32, cols: u32, row_stride: u32 }

@group(0) @binding(0) var<storage, read_write> dst: array<f32>; // (dst rows, cols)
@group(0) @binding(1) var<storage, read> src: array<f32>;       // (rows, cols)
@group(0) @binding(2) var<storage, read> idx: array<u32>;       // (rows): dst row of each src row
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_stride;
    if (i >= p.rows * p.cols) { return; }
    dst[idx[i / p.cols] * p.cols + i % p.cols] = src[i];
}
