//! `matmul.wgsl`: C = alpha · A · B (+ C) through strides, for x·Wᵀ, the Gram matrices (with Dot2
//! error terms) and the Cholesky update.

use super::dispatch::{params, Kernel};
use super::{Gpu, GpuGram, GpuTensor};
use crate::backend::WeightDtype;
use std::ops::Range;

pub(super) const MATMUL: Kernel = Kernel { name: "matmul", src: include_str!("../../../shaders/matmul.wgsl") };

/// Products with at least this many rows and columns use 128×128 tiles (8×8 outputs per thread);
/// smaller ones 64×64, so that a product still spreads over many workgroups.
const BIG_TILE_FROM: usize = 512;

params!(MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    a_rs: u32,
    a_cs: u32,
    b_off: u32,
    b_rs: u32,
    b_cs: u32,
    accumulate: u32,
    c_off: u32,
    ldc: u32,
    alpha: f32,
    /// Always 1 (keeps compilers from simplifying the error terms away; see the shader).
    one: f32,
    /// Always 0.
    zero: u32,
});

/// Shape and strides of one product C (m, n) = alpha · A (m, k) · B (k, n): operands as
/// (offset, row stride, column stride) in elements; C at c_off with row stride ldc.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a: (usize, usize, usize),
    pub b: (usize, usize, usize),
    pub c_off: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub accumulate: bool,
    /// Storage precision of B (weights may be packed f16/bf16).
    pub b_dtype: WeightDtype,
}

impl Geometry {
    pub fn new(m: usize, k: usize, n: usize, a: (usize, usize, usize), b: (usize, usize, usize)) -> Geometry {
        Geometry { m, k, n, a, b, c_off: 0, ldc: n, alpha: 1.0, accumulate: false, b_dtype: WeightDtype::F32 }
    }

    fn params(&self) -> MatmulParams {
        MatmulParams {
            m: self.m as u32,
            n: self.n as u32,
            k: self.k as u32,
            a_off: self.a.0 as u32,
            a_rs: self.a.1 as u32,
            a_cs: self.a.2 as u32,
            b_off: self.b.0 as u32,
            b_rs: self.b.1 as u32,
            b_cs: self.b.2 as u32,
            accumulate: self.accumulate as u32,
            c_off: self.c_off as u32,
            ldc: self.ldc as u32,
            alpha: self.alpha,
            one: 1.0,
            zero: 0,
        }
    }

    /// Outputs per thread along each side: 8 (128×128 tiles) once there are enough tiles to fill
    /// a GPU, else 4; the compensated products keep 4 (their second accumulator doubles registers).
    fn tile(&self, with_lo: bool) -> usize {
        if !with_lo && self.m >= BIG_TILE_FROM && self.n >= BIG_TILE_FROM {
            8
        } else {
            4
        }
    }

    /// The substitutions of this product's kernel variant.
    pub fn subs(&self, with_lo: bool) -> Vec<(&'static str, String)> {
        let (b_elem, b_load) = super::dispatch::unpacked("b", self.b_dtype);
        let t = self.tile(with_lo);
        vec![
            ("A_K_FAST", (self.a.2 == 1).to_string()),
            ("B_K_FAST", (self.b.1 == 1).to_string()),
            ("WITH_LO", with_lo.to_string()),
            ("B_ELEM", b_elem),
            ("B_LOAD", b_load),
            ("TM", t.to_string()),
            ("TN", t.to_string()),
            ("TA_LEN", (256 * t).to_string()),
            ("TB_LEN", (256 * t).to_string()),
            ("ACC_LEN", (t * t).to_string()),
            ("COMP_LEN", if with_lo { t * t } else { 1 }.to_string()),
        ]
    }
}

impl Gpu {
    /// C = alpha·A·B (+ C) through strides (see matmul.wgsl); with `lo`, the Dot2 error terms.
    pub(super) fn matmul(
        &self,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        c: &wgpu::Buffer,
        lo: Option<&wgpu::Buffer>,
        g: &Geometry,
    ) {
        let p = self.pipeline(&MATMUL, &g.subs(lo.is_some()));
        let tile = 16 * g.tile(lo.is_some());
        let groups = (g.n.div_ceil(tile) as u32, g.m.div_ceil(tile) as u32, 1);
        self.dispatch_with(&p, &[a, b, c], &g.params(), &[lo.unwrap_or(&self.unused)], groups);
    }

    /// x[rows] · wᵀ; each row block of w gives a block of output columns.
    pub(super) fn matmul_t(&self, x: &GpuTensor, rows: Range<usize>, w: &GpuTensor) -> GpuTensor {
        assert_eq!(x.cols, w.cols, "matmul_t: x has {} columns, w {}", x.cols, w.cols);
        assert_eq!(x.dtype, WeightDtype::F32, "matmul_t: activations are f32");
        assert!(rows.end <= x.rows, "matmul_t: rows {rows:?} leave x's {} rows", x.rows);
        let k = x.cols;
        let c = self.alloc(rows.len(), w.rows);
        for (r0, r1, buf) in w.row_blocks() {
            let g = Geometry {
                b_dtype: w.dtype,
                c_off: r0,
                ldc: w.rows,
                ..Geometry::new(rows.len(), k, r1 - r0, (rows.start * k, k, 1), (0, 1, k))
            };
            self.matmul(&x.buf, buf, &c.buf, None, &g);
        }
        c
    }

    /// dy · w: (n, k) · (k, m), w's rows the sum's index (the backward pass's dx = dy · W); a weight
    /// split into row blocks adds one product per block.
    pub(super) fn times(&self, dy: &GpuTensor, w: &GpuTensor) -> GpuTensor {
        assert_eq!(dy.cols, w.rows, "matmul: dy has {} columns, w {} rows", dy.cols, w.rows);
        assert_eq!(dy.dtype, WeightDtype::F32, "matmul: activations are f32");
        let c = self.alloc(dy.rows, w.cols);
        for (r0, r1, buf) in w.row_blocks() {
            let g = Geometry {
                b_dtype: w.dtype,
                accumulate: r0 > 0,
                ..Geometry::new(dy.rows, r1 - r0, w.cols, (r0, dy.cols, 1), (0, w.cols, 1))
            };
            self.matmul(&dy.buf, buf, &c.buf, None, &g);
        }
        c
    }

    /// acc += xᵀ · y in f32: (cols_x, cols_y) over x's and y's rows.
    pub(super) fn add_transposed_times(&self, acc: &GpuTensor, x: &GpuTensor, y: &GpuTensor) {
        assert_eq!(
            (x.rows, acc.rows, acc.cols),
            (y.rows, x.cols, y.cols),
            "add_matmul_tn: x (n, a), y (n, b) and acc (a, b) disagree"
        );
        assert_eq!((x.dtype, y.dtype), (WeightDtype::F32, WeightDtype::F32), "add_matmul_tn: activations are f32");
        let g = Geometry { accumulate: true, ..Geometry::new(x.cols, x.rows, y.cols, (0, 1, x.cols), (0, y.cols, 1)) };
        self.matmul(&x.buf, &y.buf, &acc.buf, None, &g);
    }

    /// x[xr]ᵀ · y[yr] in twice-f32 precision.
    pub(super) fn gram(&self, x: &GpuTensor, xr: Range<usize>, y: &GpuTensor, yr: Range<usize>) -> GpuGram {
        let (hi, lo) = (self.alloc_blocks(x.cols, y.cols), self.alloc_blocks(x.cols, y.cols));
        let g = GpuGram { hi, lo: Some(lo) };
        self.gram_into(&g, x, xr, y, yr, false);
        g
    }

    /// acc += x[xr]ᵀ · y[yr], the Dot2 sum continued from acc's (hi, lo) pair.
    pub(super) fn gram_add(&self, acc: &GpuGram, x: &GpuTensor, xr: Range<usize>, y: &GpuTensor, yr: Range<usize>) {
        self.gram_into(acc, x, xr, y, yr, true);
    }

    /// x[xr]ᵀ · y[yr] into (or, accumulating, onto) g, one product per row block of g (a Gram wider
    /// than one binding is split by rows: block rows r0..r1 read x's columns r0..r1).
    fn gram_into(
        &self,
        g: &GpuGram,
        x: &GpuTensor,
        xr: Range<usize>,
        y: &GpuTensor,
        yr: Range<usize>,
        accumulate: bool,
    ) {
        assert_eq!(xr.len(), yr.len(), "gram: row ranges of different lengths");
        assert!(xr.end <= x.rows && yr.end <= y.rows, "gram: a row range leaves its tensor");
        assert_eq!((x.dtype, y.dtype), (WeightDtype::F32, WeightDtype::F32), "gram: activations are f32");
        assert_eq!((g.hi.rows, g.hi.cols), (x.cols, y.cols), "gram: accumulator of another shape");
        let lo = g.lo.as_ref().expect("gram: only a Dot2 pair accumulates");
        for ((r0, r1, hi), (_, _, lo)) in g.hi.row_blocks().into_iter().zip(lo.row_blocks()) {
            let geometry = Geometry {
                accumulate,
                ..Geometry::new(
                    r1 - r0,
                    xr.len(),
                    y.cols,
                    (xr.start * x.cols + r0, 1, x.cols),
                    (yr.start * y.cols, y.cols, 1),
                )
            };
            self.matmul(&x.buf, &y.buf, hi, Some(lo), &geometry);
        }
    }
}
