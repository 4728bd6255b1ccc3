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

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::scorer::Isa;

/// Output columns one pass over the inner dimension handles: four vectors of sixteen.
const GROUP_COLUMNS: usize = 64;

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

/// Whether this CPU runs the chained products: they are written for AVX-512, and the products
/// on other CPUs stay gemm's.
pub(crate) fn available() -> bool {
    Isa::Avx512.supported()
}

/// A left-hand operand in place: element (i, p) at `values[offset + i·row_stride +
/// p·column_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Lhs<'a> {
    pub values: &'a [f32],
    pub offset: usize,
    pub row_stride: isize,
    pub column_stride: isize,
}

/// Rows `rows` of lhs·rhs, plus `bias` on each row where given, into `out` (those rows, n
/// values each, row-major): each value the sum gemm forms for the whole m × k by k × n product
/// whose inner block is `block` ([`inner_block`]). `rhs` is row-major, k rows of n.
///
/// Panics where the CPU lacks AVX-512 ([`available`]) or an operand is too short.
pub(crate) fn product_rows(
    lhs: Lhs,
    rhs: &[f32],
    (k, n): (usize, usize),
    block: usize,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(available(), "chained products need AVX-512");
    assert!(block > 0 && k > 0, "an inner dimension to sum over");
    assert_eq!(rhs.len(), k * n, "rhs holds k rows of n");
    assert_eq!(out.len(), rows.len() * n, "out holds the rows asked for");
    assert!(bias.is_none_or(|bias| bias.len() == n), "bias length");
    if rows.is_empty() || n == 0 {
        return;
    }
    // Every element read lies inside lhs.values: the extremes of i and p bound the offsets.
    let corner = |i: usize, p: usize| {
        lhs.offset as isize + i as isize * lhs.row_stride + p as isize * lhs.column_stride
    };
    for (i, p) in [
        (rows.start, 0),
        (rows.end - 1, 0),
        (rows.start, k - 1),
        (rows.end - 1, k - 1),
    ] {
        let at = corner(i, p);
        assert!(
            at >= 0 && (at as usize) < lhs.values.len(),
            "lhs element ({i}, {p}) out of bounds"
        );
    }
    // SAFETY: AVX-512 is present (asserted); the corners of the lhs rows read lie in its buffer
    // (asserted, and the offsets are linear in i and p), rhs and out hold what is asserted above.
    unsafe { product_rows_avx512(lhs, rhs, (k, n), block, bias, rows, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn product_rows_avx512(
    lhs: Lhs,
    rhs: &[f32],
    (k, n): (usize, usize),
    block: usize,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    let out = out.as_mut_ptr().cast::<f32>();
    for first_column in (0..n).step_by(GROUP_COLUMNS) {
        let group = Group {
            lhs,
            rhs: rhs.as_ptr(),
            k,
            n,
            block,
            bias: bias.map(<[f32]>::as_ptr),
            first_column,
            width: (n - first_column).min(GROUP_COLUMNS),
        };
        // SAFETY: the caller's (product_rows' checks).
        unsafe {
            match group.width.div_ceil(16) {
                1 => group.rows::<8, 1>(rows.clone(), out),
                2 => group.rows::<6, 2>(rows.clone(), out),
                3 => group.rows::<6, 3>(rows.clone(), out),
                _ => group.rows::<6, 4>(rows.clone(), out),
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn product_rows_avx512(
    _: Lhs,
    _: &[f32],
    _: (usize, usize),
    _: usize,
    _: Option<&[f32]>,
    _: Range<usize>,
    _: &mut [MaybeUninit<f32>],
) {
    unreachable!("available() is false off x86-64")
}

/// One group of up to 64 output columns of a product.
#[cfg(target_arch = "x86_64")]
struct Group<'a> {
    lhs: Lhs<'a>,
    rhs: *const f32,
    k: usize,
    n: usize,
    block: usize,
    bias: Option<*const f32>,
    first_column: usize,
    width: usize,
}

#[cfg(target_arch = "x86_64")]
impl Group<'_> {
    /// The group's columns of `rows`, R rows at a time (the last few one at a time), each row's
    /// V vectors of sums held in registers down a block of the inner dimension.
    ///
    /// # Safety
    /// AVX-512 must be present, and the operands as [`product_rows`] checks them; `out` is the
    /// first of the rows' outputs.
    #[inline(always)]
    unsafe fn rows<const R: usize, const V: usize>(&self, rows: Range<usize>, out: *mut f32) {
        let mut row = rows.start;
        // SAFETY: the caller's; each tile's rows lie in `rows`.
        unsafe {
            while row + R <= rows.end {
                self.tile::<R, V>(row, out.add((row - rows.start) * self.n));
                row += R;
            }
            while row < rows.end {
                self.tile::<1, V>(row, out.add((row - rows.start) * self.n));
                row += 1;
            }
        }
    }

    /// R rows from `first_row` of the group's columns, into `out` (the first row's output).
    #[inline(always)]
    unsafe fn tile<const R: usize, const V: usize>(&self, first_row: usize, out: *mut f32) {
        use std::arch::x86_64::*;
        let masks: [__mmask16; V] = std::array::from_fn(|v| {
            let lanes = self.width.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let Lhs {
            values,
            offset,
            row_stride,
            column_stride,
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
                let mut sums = [[_mm512_setzero_ps(); V]; R];
                for p in start..end {
                    let rhs_row = self.rhs.add(p * self.n + self.first_column);
                    let rhs: [__m512; V] = std::array::from_fn(|v| {
                        _mm512_maskz_loadu_ps(masks[v], rhs_row.add(16 * v))
                    });
                    let step = p as isize * column_stride;
                    for r in 0..R {
                        let value = _mm512_set1_ps(*lhs_rows[r].offset(step));
                        for v in 0..V {
                            sums[r][v] = _mm512_fmadd_ps(rhs[v], value, sums[r][v]);
                        }
                    }
                }
                for r in 0..R {
                    let out_row = out.add(r * self.n + self.first_column);
                    for v in 0..V {
                        let to = out_row.add(16 * v);
                        let addend = match (start, self.bias) {
                            (0, None) => None,
                            (0, Some(bias)) => Some(_mm512_maskz_loadu_ps(
                                masks[v],
                                bias.add(self.first_column + 16 * v),
                            )),
                            _ => Some(_mm512_maskz_loadu_ps(masks[v], to)),
                        };
                        let value = match addend {
                            Some(addend) => _mm512_add_ps(addend, sums[r][v]),
                            None => sums[r][v],
                        };
                        _mm512_mask_storeu_ps(to, masks[v], value);
                    }
                }
                start = end;
            }
        }
    }
}
