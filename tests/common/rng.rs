//! Deterministic, dependency-free noise for tests and benchmarks (xorshift64).

use iteris::mat::Mat;

pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.f() + 1.0) * 0.5 * n as f32) as usize % n.max(1)
    }

    /// A (r, c) matrix uniform in [-1, 1).
    pub fn mat(&mut self, r: usize, c: usize) -> Mat {
        self.scaled(r, c, 1.0)
    }

    /// A (r, c) matrix uniform in [-scale, scale).
    pub fn scaled(&mut self, r: usize, c: usize, scale: f32) -> Mat {
        Mat::new(r, c, (0..r * c).map(|_| self.f() * scale).collect())
    }
}
