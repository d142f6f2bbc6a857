//! ggml's tensor types and their dequantization to f32, block by block, as ggml-quants.c defines
//! them (`dequantize_row_*`): every value computed in f32 in the same order, so a tensor reads
//! exactly as llama.cpp and the `gguf` package read it (tests/gguf.rs holds it to the package).

/// A ggml tensor type this tool reads. The numbers are ggml's `ggml_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// The type ggml numbers `id`; Err names it where it is one this tool does not read.
    pub fn from_id(id: u32) -> Result<GgmlType, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => {
                let name = match id {
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    15 => "Q8_K",
                    16..=23 => "an IQ type",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 | 35 => "a TQ type",
                    39 => "MXFP4",
                    _ => "an unknown type",
                };
                return Err(format!(
                    "type {id} ({name}) is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
                ));
            }
        })
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes that `n` values take; None where `n` is not a whole number of blocks.
    pub fn bytes(self, n: u64) -> Option<u64> {
        let (per, bytes) = self.block();
        n.is_multiple_of(per as u64).then(|| n / per as u64 * bytes as u64)
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The values of `raw` (whole blocks of `ty`) as f32.
pub fn dequantize(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let (per, bytes) = ty.block();
    let mut out = Vec::with_capacity(raw.len() / bytes * per);
    for b in raw.chunks_exact(bytes) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes(b.try_into().unwrap())),
            GgmlType::F16 => out.push(f16(b)),
            GgmlType::BF16 => out.push(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            GgmlType::Q4_0 => q4_0(b, &mut out),
            GgmlType::Q4_1 => q4_1(b, &mut out),
            GgmlType::Q5_0 => q5(b, false, &mut out),
            GgmlType::Q5_1 => q5(b, true, &mut out),
            GgmlType::Q8_0 => {
                let d = f16(b);
                out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q4K => q4_k(b, &mut out),
            GgmlType::Q5K => q5_k(b, &mut out),
            GgmlType::Q6K => q6_k(b, &mut out),
        }
    }
    out
}

/// 32 values: d · (nibble − 8); low nibbles are the first 16, high nibbles the last 16.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let (d, qs) = (f16(b), &b[2..18]);
    out.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// 32 values: d · nibble + m.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m, qs) = (f16(b), f16(&b[2..]), &b[4..20]);
    out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// 32 values of 5 bits: a nibble and one bit of `qh`; Q5_0: d · (q − 16), Q5_1: d · q + m.
fn q5(b: &[u8], with_min: bool, out: &mut Vec<f32>) {
    let d = f16(b);
    let (m, at) = if with_min { (f16(&b[2..]), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let qs = &b[at + 4..at + 20];
    let value = |q: u32| if with_min { q as f32 * d + m } else { (q as i32 - 16) as f32 * d };
    out.extend((0..16).map(|j| value((qs[j] & 0xF) as u32 | ((qh >> j) << 4) & 0x10)));
    out.extend((0..16).map(|j| value((qs[j] >> 4) as u32 | (qh >> (j + 12)) & 0x10)));
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K / Q5_K block (`get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    };
    (sc as f32, m as f32)
}

/// 256 values in 8 sub-blocks of 32, each with its own 6-bit scale and min.
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, scales, qs) = (f16(b), f16(&b[2..]), &b[4..16], &b[16..144]);
    for (k, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min(2 * k, scales);
        let (sc2, m2) = scale_min(2 * k + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        out.extend(q.iter().map(|&q| d1 * (q & 0xF) as f32 - m1));
        out.extend(q.iter().map(|&q| d2 * (q >> 4) as f32 - m2));
    }
}

/// Q4_K with a fifth bit per value from `qh`.
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, scales, qh, qs) = (f16(b), f16(&b[2..]), &b[4..16], &b[16..48], &b[48..176]);
    for (k, ql) in qs.chunks_exact(32).enumerate() {
        let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
        let (sc1, m1) = scale_min(2 * k, scales);
        let (sc2, m2) = scale_min(2 * k + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let hi = |l: usize, u: u8| if qh[l] & u != 0 { 16.0 } else { 0.0 };
        out.extend((0..32).map(|l| d1 * ((ql[l] & 0xF) as f32 + hi(l, u1)) - m1));
        out.extend((0..32).map(|l| d2 * ((ql[l] >> 4) as f32 + hi(l, u2)) - m2));
    }
}

/// 256 values of 6 bits (4 from `ql`, 2 from `qh`), 16 sub-blocks with 8-bit scales.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, sc, d) = (&b[..128], &b[128..192], &b[192..208], f16(&b[208..]));
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
        let mut y = [0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| d * sc[is + i] as i8 as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
        out.extend_from_slice(&y);
    }
}
