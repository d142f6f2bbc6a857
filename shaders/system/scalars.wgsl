// The scalars a module's system is assembled from (c's numerator and denominator, ‖G‖²_F per term;
// see `SystemTerm` in src/backend/system.rs), summed on the GPU from reduction partials so the system
// never waits for a readback. One workgroup per scalar:
//   out[s] = base[s] + Σ over the segments of scalar s: k · Σ partials[offset .. offset + len].

struct Segment { slot: u32, offset: u32, len: u32, k: f32 }
struct Params { segments: u32 }

@group(0) @binding(0) var<storage, read> partials: array<f32>;      // every reduction's partials, packed
@group(0) @binding(1) var<storage, read> segments: array<Segment>;  // (segments)
@group(0) @binding(2) var<storage, read> base: array<f32>;          // (scalars)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;     // (scalars)
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let slot = wid.x;
    var s = 0.0;
    for (var g = 0u; g < p.segments; g++) {
        let seg = segments[g];
        if (seg.slot != slot) { continue; }
        var part = 0.0;
        for (var i = l.x; i < seg.len; i += 256u) { part += partials[seg.offset + i]; }
        s += seg.k * part;
    }
    red[l.x] = s;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (l.x < st) { red[l.x] += red[l.x + st]; }
        workgroupBarrier();
    }
    if (l.x == 0u) { out[slot] = base[slot] + red[0]; }
}
