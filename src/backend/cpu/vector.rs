//! Elementwise math over slices, written so the compiler vectorizes it: branch-free bodies
//! (`#[inline(always)]`), compiled once for the baseline target and, natively on x86-64, again with
//! AVX2+FMA and AVX-512, picked at run time. The scalar `f32::exp` (libm) the activations and the
//! softmax called per element took 7.5% of a GPT-2-shaped merge; this runs it about 20× faster.
//!
//! `exp` is accurate to a few ulp over f32's range (checked against f64 in the tests), so the
//! activations agree with the scalar forms to ~1e-7 relative.

use crate::backend::Activation;

/// e^x for x ≤ 88.7; 0 below −87.3 (where e^x is subnormal: softmax's masked −∞ scores give 0).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so n·ln2 is exact in the high part (Cody–Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer without a round instruction.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: its Taylor polynomial to degree 7 (truncation below 1e-8 relative).
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n from t's bits, which hold n in their lowest (t = 1.5·2^23 + n): integer arithmetic that
    // vectorizes, where a float-to-int cast (saturating in Rust) made the whole loop scalar.
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

#[inline(always)]
fn activation(act: Activation, x: f32) -> f32 {
    match act {
        // 0.5·(1 + tanh u) = 1 / (1 + e^(−2u)).
        Activation::GeluTanh => {
            let u = (2.0f32 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            x / (1.0 + exp(-2.0 * u))
        }
        Activation::Silu => x / (1.0 + exp(-x)),
        Activation::Relu => x.max(0.0),
        // tanh x = 1 − 2 / (e^(2x) + 1), exact at both ends (e^(2x) saturates or flushes to 0).
        Activation::Tanh => 1.0 - 2.0 / (exp(2.0 * x) + 1.0),
        // erf has no cheap branch-free form here: libm's, per element.
        Activation::GeluErf => act.apply(x),
    }
}

/// Define `$name(args)` that runs `$body` compiled for the best instruction set the CPU has.
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

dispatch! {
    /// xs ← act(xs).
    fn activate(xs: &mut [f32], act: Activation) -> () {
        match act {
            // One loop per activation, so each body is straight-line code the compiler vectorizes.
            Activation::GeluTanh => xs.iter_mut().for_each(|v| *v = activation(Activation::GeluTanh, *v)),
            Activation::Silu => xs.iter_mut().for_each(|v| *v = activation(Activation::Silu, *v)),
            Activation::Relu => xs.iter_mut().for_each(|v| *v = activation(Activation::Relu, *v)),
            Activation::Tanh => xs.iter_mut().for_each(|v| *v = activation(Activation::Tanh, *v)),
            Activation::GeluErf => xs.iter_mut().for_each(|v| *v = act.apply(*v)),
        }
    }
}

dispatch! {
    /// xs ← e^(xs − max) with max the slice's maximum, then xs ← xs / Σ xs: a softmax whose
    /// −∞ entries (masked scores) become 0. An all-masked slice is left all 0.
    fn softmax(xs: &mut [f32]) -> () {
        let max = max(xs);
        if max == f32::NEG_INFINITY {
            xs.fill(0.0);
            return;
        }
        xs.iter_mut().for_each(|v| *v = exp(*v - max));
        // Summed in f64 (eight partial sums: a vectorizable reduction in a fixed order), each
        // weight rounded once from the f64 quotient.
        let mut acc = [0.0f64; 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            acc.iter_mut().zip(c).for_each(|(a, v)| *a += *v as f64);
        }
        let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
        let inv = 1.0 / (acc.iter().sum::<f64>() + tail);
        xs.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
    }
}

/// The largest element (−∞ for none; NaNs are passed over, as `f32::max` does). Sixteen running
/// maxima by compare-and-select: `fold(f32::max)` stays scalar (its NaN rule blocks reordering)
/// and made the max a third of attention's softmax.
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        m.iter_mut().zip(c).for_each(|(m, &v)| *m = if v > *m { v } else { *m });
    }
    chunks.remainder().iter().chain(&m).fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// Σ f(x) in f64 over eight interleaved partial sums: vectorizable, in a fixed order.
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        acc.iter_mut().zip(c).for_each(|(a, &v)| *a += f(v as f64));
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}

dispatch! {
    /// out = (x − mean) / √(var + eps) · γ (+ β), statistics in f64.
    fn layer_norm(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, eps: f32, out: &mut [f32]) -> () {
        let n = x.len() as f64;
        let mean = sum_f64(x, |v| v) / n;
        let var = sum_f64(x, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(gamma) {
            *o = ((v as f64 - mean) * inv) as f32 * g;
        }
        if let Some(b) = beta {
            out.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
}

dispatch! {
    /// out = x / √(mean(x²) + eps) · γ, the mean in f64.
    fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) -> () {
        let ms = sum_f64(x, |v| v * v) / x.len() as f64;
        let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        out.iter_mut().zip(x).zip(gamma).for_each(|((o, &v), &g)| *o = v * inv * g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
            x += 0.0137;
        }
        // Measured: 8.7e-8 (0.73 ε).
        assert!(worst < 1.5 * f32::EPSILON as f64, "exp off by {worst:e} relative");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn vector_activations_match_scalar_forms() {
        let xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.01).chain([-90.0, 90.0, 1e30, -1e30]).collect();
        for act in [Activation::GeluTanh, Activation::Silu, Activation::Relu, Activation::Tanh, Activation::GeluErf] {
            let mut v = xs.clone();
            activate(&mut v, act);
            for (&x, &y) in xs.iter().zip(&v) {
                let want = act.apply(x);
                assert!((y - want).abs() <= 1e-6 * want.abs().max(1.0), "{act:?}({x}) = {y}, scalar {want}");
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_masks() {
        let mut v = vec![1.0, f32::NEG_INFINITY, 3.0, -2.0, 0.5, f32::NEG_INFINITY, 7.0, 2.0, 1.0, 0.0];
        let want: Vec<f64> = {
            let m = 7.0f64;
            let e: Vec<f64> =
                v.iter().map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { (x as f64 - m).exp() }).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        softmax(&mut v);
        for (a, b) in v.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-7, "{a} vs {b}");
        }
        let mut masked = vec![f32::NEG_INFINITY; 5];
        softmax(&mut masked);
        assert!(masked.iter().all(|&v| v == 0.0));
    }
}
