// erf in f32, pasted where a kernel asks for {{ERF}} (elementwise's GELU, gate_backward's slope).
// Abramowitz–Stegun 7.1.26 is too coarse (1e-7 absolute is needed): this is the erfc series of
// Numerical Recipes (fractional error < 1.2e-7).
fn erf(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, v >= 0.0);
}
