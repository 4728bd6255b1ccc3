//! The network's matrix products summed exactly as gemm's blocked kernels sum them, without
//! gemm's packing and dispatch around them.
//!
//! gemm's blocked kernels give each output one chain of fused multiply-adds along the inner
//! dimension, from zero and in order, over blocks of the inner dimension (one block up to 512
//! long; blocks of 512 past that where both sides of the output are at most 64 long), and add
//! each block's chain to the output in one rounding. Any kernel keeping that order gives the
//! same bits, whatever its tiles. On the network's products (1024 × 60 × 30 and the like) gemm
//! spends about a third of its time copying operands into its panels and choosing its path.
//! Here the right-hand side's rows are read in place, each left-hand value is broadcast from
//! where it lies, and the bias is added from a register instead of filling the output first.
//! One kernel, written over a vector type, has an AVX-512 copy and an AVX2 copy; CPUs with
//! neither keep gemm's products.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::dense::Matrix;
use crate::scorer::Isa;

/// The inner block gemm's blocked kernels sum in for an m × k by k × n product with a
/// row-major output; `None` where gemm takes another path or sizes its blocks from the caches.
/// Its other paths: single rows or columns, k ≤ 2, and outputs of at most 16 × 16 whose
/// left-hand rows and right-hand columns are each contiguous (`contiguous_dots`).
pub(crate) fn inner_block(m: usize, k: usize, n: usize, contiguous_dots: bool) -> Option<usize> {
    let blocked = m > 1 && n > 1 && k > 2 && (m * n > 16 * 16 || !contiguous_dots);
    if !blocked {
        None
    } else if k <= 512 {
        Some(k)
    } else if m <= 64 && n <= 64 {
        Some(512)
    } else {
        None
    }
}

/// The inner block gemm sums in for lhs·rhs with a row-major output where its sums are this
/// kernel's, `None` elsewhere: its blocked kernels ([`inner_block`]), and its path for a single
/// output column from left-hand rows and a contiguous right-hand column whose inner dimension
/// is shorter than its vectors. That path's vector part is then empty, and each row is one
/// chain of fused multiply-adds from zero, in order: a block of k. (The network's 10 → 1
/// layer and the input gradient of its 1 → 10 layer: 12 µs a product through gemm, which
/// spends most of it summing empty vectors across their lanes row by row.)
pub(crate) fn gemm_block(lhs: &Matrix, rhs: &Matrix) -> Option<usize> {
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    let contiguous_dots = lhs.column_stride == 1 && rhs.row_stride == 1;
    inner_block(m, k, n, contiguous_dots).or_else(|| {
        // gemm's tests in its order: tiny outputs, k ≤ 2, a left operand stored by columns,
        // then this path.
        let single_column_by_rows = n == 1
            && m > 16 * 16
            && k > 2
            && lhs.row_stride != 1
            && contiguous_dots
            && k < gemm_f32_lanes();
        single_column_by_rows.then_some(k)
    })
}

/// f32 lanes of the vectors gemm's kernels take on this CPU: AVX-512's where it has them
/// (our build asks gemm for its AVX-512 kernels), else AVX2's.
pub(crate) fn gemm_f32_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return 16;
    }
    8
}

/// The instruction set the chained products run on here: AVX-512 or AVX2 (both with fused
/// multiply-adds, as gemm's kernels for them); `None` elsewhere, where the products stay gemm's.
pub(crate) fn isa() -> Option<Isa> {
    match Isa::best(16) {
        Isa::Portable => None,
        isa => Some(isa),
    }
}

/// Rows `rows` of lhs·rhs, plus `bias` on each row where given, into `out` (those rows, n
/// values each, row-major): each value the sum gemm forms for the whole product whose inner
/// block is `block` ([`inner_block`]). lhs is read in place, whatever its strides; `rhs` is
/// row-major, lhs's columns rows of n.
///
/// Panics where the CPU has neither instruction set ([`isa`]) or an operand is too short.
pub(crate) fn product_rows(
    lhs: &Matrix,
    rhs: &[f32],
    n: usize,
    block: usize,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    let isa = isa().expect("chained products need AVX2 or AVX-512");
    let k = lhs.columns;
    assert!(block > 0 && k > 0, "an inner dimension to sum over");
    assert!(
        lhs.in_bounds() && rows.end <= lhs.rows,
        "lhs rows inside its buffer"
    );
    assert_eq!(rhs.len(), k * n, "rhs holds k rows of n");
    assert_eq!(out.len(), rows.len() * n, "out holds the rows asked for");
    assert!(bias.is_none_or(|bias| bias.len() == n), "bias length");
    if rows.is_empty() || n == 0 {
        return;
    }
    let product = Group {
        lhs: *lhs,
        rhs: rhs.as_ptr(),
        k,
        n,
        block,
        bias: bias.map(<[f32]>::as_ptr),
        first_column: 0,
    };
    let out = out.as_mut_ptr().cast::<f32>();
    // SAFETY (both): the CPU has the instruction set (`isa`); every lhs element lies in its
    // buffer and the rows asked for are lhs rows (asserted); rhs and out hold what is asserted
    // above.
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => unsafe { x86::groups_avx512(&product, rows, out) },
        _ => unsafe { x86::groups_avx2(&product, rows, out) },
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no chained products off x86-64 ({isa:?}, {out:p})")
}

/// The output columns `first_column..` (up to a group's width) of a product.
#[derive(Clone, Copy)]
struct Group<'a> {
    lhs: Matrix<'a>,
    rhs: *const f32,
    k: usize,
    n: usize,
    block: usize,
    bias: Option<*const f32>,
    first_column: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Group, Matrix};

    /// One instruction set's vectors of f32 lanes, with loads and stores of their first
    /// `lanes` lanes only. Every function but `mask` needs the CPU to have the instruction set
    /// (its safety condition, with valid memory under the mask for loads and stores).
    pub(super) trait Lanes {
        const WIDTH: usize;
        type Vector: Copy;
        type Mask: Copy;
        fn mask(lanes: usize) -> Self::Mask;
        unsafe fn zero() -> Self::Vector;
        unsafe fn splat(value: f32) -> Self::Vector;
        /// Lanes off the mask read as zero and are not touched in memory.
        unsafe fn load(mask: Self::Mask, from: *const f32) -> Self::Vector;
        unsafe fn store(mask: Self::Mask, to: *mut f32, value: Self::Vector);
        /// a·b + c in one rounding.
        unsafe fn fma(a: Self::Vector, b: Self::Vector, c: Self::Vector) -> Self::Vector;
        unsafe fn add(a: Self::Vector, b: Self::Vector) -> Self::Vector;
    }

    pub(super) struct Avx512;

    impl Lanes for Avx512 {
        const WIDTH: usize = 16;
        type Vector = __m512;
        type Mask = __mmask16;
        #[inline(always)]
        fn mask(lanes: usize) -> __mmask16 {
            ((1u32 << lanes.min(16)) - 1) as __mmask16
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(value: f32) -> __m512 {
            unsafe { _mm512_set1_ps(value) }
        }
        #[inline(always)]
        unsafe fn load(mask: __mmask16, from: *const f32) -> __m512 {
            unsafe { _mm512_maskz_loadu_ps(mask, from) }
        }
        #[inline(always)]
        unsafe fn store(mask: __mmask16, to: *mut f32, value: __m512) {
            unsafe { _mm512_mask_storeu_ps(to, mask, value) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
    }

    pub(super) struct Avx2;

    impl Lanes for Avx2 {
        const WIDTH: usize = 8;
        type Vector = __m256;
        type Mask = __m256i;
        #[inline(always)]
        fn mask(lanes: usize) -> __m256i {
            let lanes = lanes.min(8) as i32;
            // SAFETY: AVX is part of every CPU these copies run on (AVX2 is asserted before).
            unsafe {
                _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(lanes),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                )
            }
        }
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(value: f32) -> __m256 {
            unsafe { _mm256_set1_ps(value) }
        }
        #[inline(always)]
        unsafe fn load(mask: __m256i, from: *const f32) -> __m256 {
            unsafe { _mm256_maskload_ps(from, mask) }
        }
        #[inline(always)]
        unsafe fn store(mask: __m256i, to: *mut f32, value: __m256) {
            unsafe { _mm256_maskstore_ps(to, mask, value) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
    }

    /// `rows` of the product, a group of 64 columns (four vectors) at a time. Groups of two
    /// vectors take twelve rows a tile: each inner step's two right-hand loads then feed 24
    /// multiply-adds, not 12 (a 60 × 1024 by 1024 × 30 weight gradient: 37 → 31 µs). One
    /// vector keeps eight: its broadcasts, one load per multiply-add whatever the rows, bound it.
    ///
    /// # Safety
    /// The CPU must have AVX-512 and the operands be as `product_rows` checks them.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn groups_avx512(product: &Group, rows: Range<usize>, out: *mut f32) {
        let n = product.n;
        for first_column in (0..n).step_by(64) {
            let group = Group {
                first_column,
                ..*product
            };
            // SAFETY: the caller's.
            unsafe {
                match (n - first_column).min(64).div_ceil(16) {
                    1 => group.rows::<Avx512, 8, 1>(rows.clone(), out),
                    2 => group.rows::<Avx512, 12, 2>(rows.clone(), out),
                    3 => group.rows::<Avx512, 6, 3>(rows.clone(), out),
                    _ => group.rows::<Avx512, 6, 4>(rows.clone(), out),
                }
            }
        }
    }

    /// `rows` of the product, a group of 24 columns (three vectors: sixteen registers hold
    /// twelve sums, the right-hand vectors and a broadcast) at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2 with FMA and the operands be as `product_rows` checks them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn groups_avx2(product: &Group, rows: Range<usize>, out: *mut f32) {
        let n = product.n;
        for first_column in (0..n).step_by(24) {
            let group = Group {
                first_column,
                ..*product
            };
            // SAFETY: the caller's.
            unsafe {
                match (n - first_column).min(24).div_ceil(8) {
                    1 => group.rows::<Avx2, 8, 1>(rows.clone(), out),
                    2 => group.rows::<Avx2, 6, 2>(rows.clone(), out),
                    _ => group.rows::<Avx2, 4, 3>(rows.clone(), out),
                }
            }
        }
    }

    impl Group<'_> {
        /// The group's V vectors of columns of `rows`, R rows at a time (the last few in one
        /// smaller tile), each row's sums held in registers down a block of the inner
        /// dimension.
        ///
        /// # Safety
        /// The CPU must have L's instruction set, and the operands be as `product_rows` checks
        /// them; `out` is the first of the rows' outputs.
        #[inline(always)]
        unsafe fn rows<L: Lanes, const R: usize, const V: usize>(
            &self,
            rows: Range<usize>,
            out: *mut f32,
        ) {
            let mut row = rows.start;
            // SAFETY: the caller's; each tile's rows lie in `rows`.
            unsafe {
                while row + R <= rows.end {
                    self.tile::<L, R, V>(row, out.add((row - rows.start) * self.n));
                    row += R;
                }
                // Past the leftover tiles below, eight rows at a time.
                if R > 8 {
                    while row + 8 <= rows.end {
                        self.tile::<L, 8, V>(row, out.add((row - rows.start) * self.n));
                        row += 8;
                    }
                }
                // One at a time, each of these rows would be a single chain of dependent
                // multiply-adds per vector: weight gradients have few rows and long chains.
                let out = out.add((row - rows.start) * self.n);
                match rows.end - row {
                    0 => {}
                    1 => self.tile::<L, 1, V>(row, out),
                    2 => self.tile::<L, 2, V>(row, out),
                    3 => self.tile::<L, 3, V>(row, out),
                    4 => self.tile::<L, 4, V>(row, out),
                    5 => self.tile::<L, 5, V>(row, out),
                    6 => self.tile::<L, 6, V>(row, out),
                    7 => self.tile::<L, 7, V>(row, out),
                    rest => unreachable!("{rest} rows left after tiles of {R}"),
                }
            }
        }

        /// R rows from `first_row` of the group's columns, into `out` (the first row's
        /// output).
        #[inline(always)]
        unsafe fn tile<L: Lanes, const R: usize, const V: usize>(
            &self,
            first_row: usize,
            out: *mut f32,
        ) {
            let width = (self.n - self.first_column).min(V * L::WIDTH);
            let masks: [L::Mask; V] =
                std::array::from_fn(|v| L::mask(width.saturating_sub(v * L::WIDTH)));
            let Matrix {
                values,
                offset,
                row_stride,
                column_stride,
                ..
            } = self.lhs;
            // SAFETY (whole body): the caller's. The lhs offsets are those product_rows bounds;
            // rhs and out are read and written under masks that keep to the group's columns.
            unsafe {
                let lhs_rows: [*const f32; R] = std::array::from_fn(|r| {
                    values
                        .as_ptr()
                        .offset(offset as isize + (first_row + r) as isize * row_stride)
                });
                let mut start = 0;
                while start < self.k {
                    let end = (start + self.block).min(self.k);
                    let mut sums = [[L::zero(); V]; R];
                    for p in start..end {
                        let rhs_row = self.rhs.add(p * self.n + self.first_column);
                        let rhs: [L::Vector; V] =
                            std::array::from_fn(|v| L::load(masks[v], rhs_row.add(v * L::WIDTH)));
                        let step = p as isize * column_stride;
                        for (row_sums, lhs_row) in sums.iter_mut().zip(&lhs_rows) {
                            let value = L::splat(*lhs_row.offset(step));
                            for (sum, &rhs) in row_sums.iter_mut().zip(&rhs) {
                                *sum = L::fma(rhs, value, *sum);
                            }
                        }
                    }
                    for (r, row_sums) in sums.iter().enumerate() {
                        let out_row = out.add(r * self.n + self.first_column);
                        for (v, (&sum, &mask)) in row_sums.iter().zip(&masks).enumerate() {
                            let to = out_row.add(v * L::WIDTH);
                            let addend = match (start, self.bias) {
                                (0, None) => None,
                                (0, Some(bias)) => {
                                    Some(L::load(mask, bias.add(self.first_column + v * L::WIDTH)))
                                }
                                _ => Some(L::load(mask, to)),
                            };
                            let value = match addend {
                                Some(addend) => L::add(addend, sum),
                                None => sum,
                            };
                            L::store(mask, to, value);
                        }
                    }
                    start = end;
                }
            }
        }
    }
}
