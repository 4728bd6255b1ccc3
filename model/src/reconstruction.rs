//! The reconstruction terms of each row, recorded as a single autodiff step: the relative
//! Euclidean distance ‖x − x'‖ / ‖x‖ and the cosine similarity cos(x, x') (the two features
//! the estimation network sees), and the squared error ‖x − x'‖² (the reconstruction loss).
//!
//! Composed from burn's operations these took fifteen `[n, d]` or `[n, 1]` tensor operations
//! and their backward steps per batch; here each pass is one loop over the rows. The forward
//! pass gives the plain scorer's features bit for bit and keeps its row sums; the backward pass
//! turns them into per-row coefficients in f64 and applies those in f32. Training on
//! mostly-zero inputs goes through [`crate::reconstruction_layer`] instead, which takes the
//! decoder's output layer along and never forms x'.

use std::mem::MaybeUninit;
use std::ops::Range;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{Tensor, TensorData};

use crate::helper_threads;
use crate::network::NORM_EPS;
use crate::scorer::{Isa, add_to_sums, features_from_sums};
use crate::step_support::to_f64;

#[backend_extension(Flex, Autodiff)]
pub trait ReconstructionBackend: Backend {
    /// `[n, 3]`: relative distance, cosine similarity and squared error of each row of x
    /// `[n, d]` and its reconstruction x' `[n, d]`.
    fn reconstruction_terms(x: FloatTensor<Self>, x_hat: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Columns of [`reconstruction_terms`].
pub const RELATIVE_DISTANCE: usize = 0;
pub const COSINE: usize = 1;
pub const SQUARED_ERROR: usize = 2;

/// `[n, 3]`: ‖x − x'‖ / ‖x‖, cos(x, x') and ‖x − x'‖² per row (norms carry
/// [`NORM_EPS`] under the square root, so zero rows keep finite gradients).
pub fn reconstruction_terms(x: Tensor<2>, x_hat: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as ReconstructionBackend>::reconstruction_terms(
        x.into_dispatch(),
        x_hat.into_dispatch(),
    ))
}

/// A row's sums ‖x‖², ‖x − x'‖², ‖x'‖² and x·x'.
type RowSums<T> = [T; 4];

/// The sums of f64 rows (reference checks), each in order.
fn row_sums_f64(x: &[f64], x_hat: &[f64], d: usize) -> Vec<RowSums<f64>> {
    x.chunks_exact(d)
        .zip(x_hat.chunks_exact(d))
        .map(|(x, x_hat)| {
            let mut sums = [0f64; 4];
            for (&a, &b) in x.iter().zip(x_hat) {
                sums[0] += a * a;
                sums[1] += (a - b) * (a - b);
                sums[2] += b * b;
                sums[3] += a * b;
            }
            sums
        })
        .collect()
}

/// The sums of f32 rows (training), each in f32 over its row in order as the scorer sums
/// them, so [`features_from_sums`] gives the scorer's features to the bit. Sixteen rows go
/// side by side so the in-order sums still vectorise; CPUs with AVX-512 (AVX2) turn each block
/// of sixteen (eight) rows by as many columns into columns in registers.
fn row_sums_f32(x: &[f32], x_hat: &[f32], d: usize) -> Vec<RowSums<f32>> {
    let n = x.len().checked_div(d).unwrap_or(0);
    // Rows are independent: a fit's spare cores take chunks of them.
    let sums_of = |rows: Range<usize>, sums: &mut [MaybeUninit<RowSums<f32>>]| {
        let values = rows.start * d..rows.end * d;
        sums.write_copy_of_slice(&row_sums_f32_serial(&x[values.clone()], &x_hat[values], d));
    };
    // SAFETY: each chunk writes one sum per row.
    unsafe { helper_threads::rows_written_in_chunks(n, 1, 2 * d, &sums_of) }
}

/// [`row_sums_f32`] on this thread.
fn row_sums_f32_serial(x: &[f32], x_hat: &[f32], d: usize) -> Vec<RowSums<f32>> {
    #[cfg(target_arch = "x86_64")]
    match Isa::best(16) {
        // SAFETY: Isa::best only names instruction sets this CPU has.
        Isa::Avx512 => return unsafe { row_sums_f32_avx512(x, x_hat, d) },
        Isa::Avx2 => return unsafe { row_sums_f32_avx2(x, x_hat, d) },
        Isa::Portable => {}
    }
    row_sums_f32_body(x, x_hat, d)
}

/// Columns `start..start + width` (width ≤ 8) of the eight rows of `d` values in `block`:
/// register j holds column start + j, lane r its value in row r; registers past `width` hold
/// zeros. Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves exchanged.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn columns_of_eight_rows(
    block: &[f32],
    d: usize,
    start: usize,
    width: usize,
) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    assert!(width <= 8 && start + width <= d && block.len() >= 8 * d);
    let mask = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // All bits set in the lanes below `width`: those are the ones loaded.
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width as i32), mask);
    // SAFETY: row r's loaded elements r·d + start .. r·d + start + width lie inside `block`
    // (asserted above); the mask keeps the load from touching the others.
    let rows: [__m256; 8] = std::array::from_fn(|r| unsafe {
        _mm256_maskload_ps(block.as_ptr().add(r * d + start), mask)
    });
    // t[2i]: columns 0, 1 (low half) and 4, 5 (high half) of rows 2i and 2i + 1 interleaved;
    // t[2i + 1]: columns 2, 3 and 6, 7.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // u[4g + c]: column c in the low half and c + 4 in the high half, of rows 4g .. 4g + 3.
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
        if c % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xEE>(a, b)
        }
    });
    let mut columns = [_mm256_setzero_ps(); 8];
    for c in 0..4 {
        columns[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
        columns[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
    }
    columns
}

/// The same sums with a block of rows in the lanes of vector registers: each block of rows by
/// as many columns is loaded row by row and transposed in registers (the portable loop's
/// element loads compile to scalar loads with bounds checks, and gathering each column costs
/// about four times the shuffles of a transpose). Each lane does the portable loop's
/// multiplies and adds in its order, so the sums are the same bits.
///
/// # Safety
/// The CPU must have the instruction set of `V`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sums_transposed<V: RowLanes>(
    x: &[f32],
    x_hat: &[f32],
    d: usize,
) -> Vec<RowSums<f32>> {
    let rows = V::ROWS;
    let n = x.len() / d;
    let blocks = n / rows;
    let mut sums = Vec::with_capacity(n);
    for block in 0..blocks {
        let x_block = &x[block * rows * d..(block + 1) * rows * d];
        let x_hat_block = &x_hat[block * rows * d..(block + 1) * rows * d];
        // SAFETY (this and the calls below): the caller vouches for V's instruction set.
        let mut block_sums = [unsafe { V::zero() }; 4];
        for start in (0..d).step_by(rows) {
            let width = rows.min(d - start);
            let x_columns = unsafe { V::columns(x_block, d, start, width) };
            let x_hat_columns = unsafe { V::columns(x_hat_block, d, start, width) };
            for (&xj, &hj) in x_columns.iter().zip(&x_hat_columns).take(width) {
                unsafe { xj.add_to_sums(hj, &mut block_sums) };
            }
        }
        let [xx, dd, hh, xh] = block_sums.map(|v| unsafe { v.lanes() });
        sums.extend((0..rows).map(|r| [xx[r], dd[r], hh[r], xh[r]]));
    }
    let done = blocks * rows * d;
    sums.extend(row_sums_f32_body(&x[done..], &x_hat[done..], d));
    sums
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn row_sums_f32_avx512(x: &[f32], x_hat: &[f32], d: usize) -> Vec<RowSums<f32>> {
    // SAFETY: this function runs only where the CPU has AVX-512F.
    unsafe { row_sums_transposed::<std::arch::x86_64::__m512>(x, x_hat, d) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn row_sums_f32_avx2(x: &[f32], x_hat: &[f32], d: usize) -> Vec<RowSums<f32>> {
    // SAFETY: this function runs only where the CPU has AVX2.
    unsafe { row_sums_transposed::<std::arch::x86_64::__m256>(x, x_hat, d) }
}

/// A vector register as [`row_sums_transposed`] uses it: lane r holds a value of row r of a
/// block of [`RowLanes::ROWS`] rows. Every method needs the register's instruction set.
#[cfg(target_arch = "x86_64")]
trait RowLanes: Copy {
    /// Rows in a block: the register's f32 lanes.
    const ROWS: usize;
    /// Columns `start..start + width` (width ≤ ROWS) of the block's rows of `d` values, in the
    /// first ROWS registers: register j holds column start + j, those past `width` zeros, and
    /// any past ROWS nothing in particular.
    unsafe fn columns(block: &[f32], d: usize, start: usize, width: usize) -> [Self; 16];
    unsafe fn zero() -> Self;
    /// [`add_to_sums`] lane by lane, with `self` as x and `x_hat` as x': a multiply, then an
    /// add (no fused multiply-add).
    unsafe fn add_to_sums(self, x_hat: Self, sums: &mut [Self; 4]);
    /// The lanes, in the first ROWS places.
    unsafe fn lanes(self) -> [f32; 16];
}

#[cfg(target_arch = "x86_64")]
impl RowLanes for std::arch::x86_64::__m512 {
    const ROWS: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn columns(block: &[f32], d: usize, start: usize, width: usize) -> [Self; 16] {
        columns_of_sixteen_rows(block, d, start, width)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm512_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn add_to_sums(self, x_hat: Self, [xx, dd, hh, xh]: &mut [Self; 4]) {
        use std::arch::x86_64::*;
        *xx = _mm512_add_ps(*xx, _mm512_mul_ps(self, self));
        let error = _mm512_sub_ps(self, x_hat);
        *dd = _mm512_add_ps(*dd, _mm512_mul_ps(error, error));
        *hh = _mm512_add_ps(*hh, _mm512_mul_ps(x_hat, x_hat));
        *xh = _mm512_add_ps(*xh, _mm512_mul_ps(self, x_hat));
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn lanes(self) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: `out` holds sixteen f32 values.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(out.as_mut_ptr(), self) };
        out
    }
}

#[cfg(target_arch = "x86_64")]
impl RowLanes for std::arch::x86_64::__m256 {
    const ROWS: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn columns(block: &[f32], d: usize, start: usize, width: usize) -> [Self; 16] {
        let eight = columns_of_eight_rows(block, d, start, width);
        std::array::from_fn(|j| eight.get(j).copied().unwrap_or(eight[0]))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm256_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn add_to_sums(self, x_hat: Self, [xx, dd, hh, xh]: &mut [Self; 4]) {
        use std::arch::x86_64::*;
        *xx = _mm256_add_ps(*xx, _mm256_mul_ps(self, self));
        let error = _mm256_sub_ps(self, x_hat);
        *dd = _mm256_add_ps(*dd, _mm256_mul_ps(error, error));
        *hh = _mm256_add_ps(*hh, _mm256_mul_ps(x_hat, x_hat));
        *xh = _mm256_add_ps(*xh, _mm256_mul_ps(self, x_hat));
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lanes(self) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: `out` holds sixteen f32 values, room for the eight stored.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), self) };
        out
    }
}

/// Columns `start..start + width` (width ≤ 16) of the sixteen rows of `d` values in `block`:
/// register j holds column start + j, lane r its value in row r; registers past `width` hold
/// zeros. A textbook 16 × 16 transpose: pairs of rows interleaved, then pairs of pairs, then
/// 128-bit quarters exchanged twice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn columns_of_sixteen_rows(
    block: &[f32],
    d: usize,
    start: usize,
    width: usize,
) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    assert!(width <= 16 && start + width <= d && block.len() >= 16 * d);
    let mask: __mmask16 = ((1u32 << width) - 1) as u16;
    // SAFETY: row r's loaded elements r·d + start .. r·d + start + width lie inside `block`
    // (asserted above); the mask keeps the load from touching the others.
    let rows: [__m512; 16] = std::array::from_fn(|r| unsafe {
        _mm512_maskz_loadu_ps(mask, block.as_ptr().add(r * d + start))
    });
    // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved, low and high pairs of each quarter.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + c]: quarter q holds column 4q + c of rows 4g .. 4g + 3.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    // For each c: quarters 0 and 2 (0x88) or 1 and 3 (0xDD) of u[c] and u[4 + c], and of
    // u[8 + c] and u[12 + c]; then the same selection again puts rows 0–15 in order.
    let mut columns = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let even_low = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let odd_low = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        let even_high = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let odd_high = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
        columns[c] = _mm512_shuffle_f32x4::<0x88>(even_low, even_high);
        columns[8 + c] = _mm512_shuffle_f32x4::<0xDD>(even_low, even_high);
        columns[4 + c] = _mm512_shuffle_f32x4::<0x88>(odd_low, odd_high);
        columns[12 + c] = _mm512_shuffle_f32x4::<0xDD>(odd_low, odd_high);
    }
    columns
}

#[inline(always)]
fn row_sums_f32_body(x: &[f32], x_hat: &[f32], d: usize) -> Vec<RowSums<f32>> {
    const L: usize = 16;
    let n = x.len() / d;
    let mut sums = Vec::with_capacity(n);
    for start in (0..n).step_by(L) {
        let used = L.min(n - start);
        // Padding lanes repeat the block's first row; their sums are dropped.
        let offsets: [usize; L] =
            std::array::from_fn(|r| (start + if r < used { r } else { 0 }) * d);
        let (mut xx, mut dd, mut hh, mut xh) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
        for j in 0..d {
            // Column j of sixteen rows.
            let xj: [f32; L] = std::array::from_fn(|r| x[offsets[r] + j]);
            let hj: [f32; L] = std::array::from_fn(|r| x_hat[offsets[r] + j]);
            for r in 0..L {
                add_to_sums(
                    xj[r],
                    hj[r],
                    [&mut xx[r], &mut dd[r], &mut hh[r], &mut xh[r]],
                );
            }
        }
        sums.extend((0..used).map(|r| [xx[r], dd[r], hh[r], xh[r]]));
    }
    sums
}

/// The terms `[n, 3]` and sums `[n, 4]` of f64 rows (reference checks).
fn terms_f64(x: &[f64], x_hat: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let eps = f64::from(NORM_EPS);
    let sums = row_sums_f64(x, x_hat, d);
    let terms = sums
        .iter()
        .flat_map(|&[xx, dd, hh, xh]| {
            let x_norm = (xx + eps).sqrt();
            [
                (dd + eps).sqrt() / x_norm,
                xh / (x_norm * (hh + eps).sqrt()),
                dd,
            ]
        })
        .collect();
    (terms, sums.concat())
}

/// The terms `[n, 3]` and sums `[n, 4]` of f32 rows (training): the scorer's features and the
/// squared error.
fn terms_f32(x: &[f32], x_hat: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let sums = row_sums_f32(x, x_hat, d);
    let terms = sums
        .iter()
        .flat_map(|&[xx, dd, hh, xh]| {
            let (distance, cosine) = features_from_sums(xx, dd, hh, xh);
            [distance, cosine, dd]
        })
        .collect();
    (terms, sums.concat())
}

/// One row's gradient coefficients: the gradient with respect to x' is
/// `along_error·(x − x') + cross·x + own·x'` with `along_error` negated, and with respect to x
/// `along_error·(x − x') + own_x·x + cross·x'`.
struct Coefficients {
    along_error: f64,
    cross: f64,
    own_x: f64,
    own_x_hat: f64,
}

/// With e = x − x', a = ‖x‖, r = ‖e‖, h = ‖x'‖ (each with NORM_EPS under the root), p = x·x':
///   ∂(r/a)/∂x = e/(a·r) − r·x/a³,           ∂(r/a)/∂x' = −e/(a·r)
///   ∂(p/(a·h))/∂x = x'/(a·h) − p·x/(a³·h),  ∂(p/(a·h))/∂x' = x/(a·h) − p·x'/(a·h³)
///   ∂‖e‖²/∂x = 2e,                          ∂‖e‖²/∂x' = −2e
fn coefficients([xx, dd, hh, xh]: RowSums<f64>, g: &[f64]) -> Coefficients {
    let eps = f64::from(NORM_EPS);
    let (a, r, h) = ((xx + eps).sqrt(), (dd + eps).sqrt(), (hh + eps).sqrt());
    let (g_distance, g_cosine, g_squared) = (g[RELATIVE_DISTANCE], g[COSINE], g[SQUARED_ERROR]);
    Coefficients {
        along_error: g_distance / (a * r) + 2.0 * g_squared,
        cross: g_cosine / (a * h),
        own_x: -g_distance * r / (a * a * a) - g_cosine * xh / (a * a * a * h),
        own_x_hat: -g_cosine * xh / (a * h * h * h),
    }
}

/// Per row, the coefficients (of x − x', x and x') of the gradient with respect to x'
/// (`of_x_hat`) or x.
pub(crate) fn row_coefficients(sums: &[f64], grad: &[f64], of_x_hat: bool) -> Vec<[f64; 3]> {
    sums.chunks_exact(4)
        .zip(grad.chunks_exact(3))
        .map(|(s, g)| {
            let c = coefficients([s[0], s[1], s[2], s[3]], g);
            if of_x_hat {
                [-c.along_error, c.cross, c.own_x_hat]
            } else {
                [c.along_error, c.own_x, c.cross]
            }
        })
        .collect()
}

/// The gradient of f64 rows (reference checks).
fn gradient_f64(x: &[f64], x_hat: &[f64], rows: &[[f64; 3]], d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for ((x, x_hat), &[along, own_x, own_x_hat]) in
        x.chunks_exact(d).zip(x_hat.chunks_exact(d)).zip(rows)
    {
        out.extend(
            (x.iter().zip(x_hat)).map(|(&xj, &hj)| along * (xj - hj) + own_x * xj + own_x_hat * hj),
        );
    }
    out
}

/// The gradient of f32 rows (training), in f32 from f64 coefficients; CPUs with AVX2 or
/// AVX-512 get their own copies of the loop. Rows are independent: a fit's spare cores take
/// chunks of them.
fn gradient_f32(x: &[f32], x_hat: &[f32], rows: &[[f64; 3]], d: usize) -> Vec<f32> {
    let gradient_of = |chunk: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        let values = chunk.start * d..chunk.end * d;
        let (x, x_hat) = (&x[values.clone()], &x_hat[values]);
        let rows = &rows[chunk];
        #[cfg(target_arch = "x86_64")]
        match Isa::best(16) {
            // SAFETY: Isa::best only names instruction sets this CPU has.
            Isa::Avx512 => return unsafe { gradient_f32_avx512(x, x_hat, rows, d, out) },
            Isa::Avx2 => return unsafe { gradient_f32_avx2(x, x_hat, rows, d, out) },
            Isa::Portable => {}
        }
        gradient_f32_body(x, x_hat, rows, d, out)
    };
    // SAFETY: each chunk writes every value of its rows (`gradient_f32_body`).
    unsafe { helper_threads::rows_written_in_chunks(rows.len(), d, 3 * d, &gradient_of) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gradient_f32_avx2(
    x: &[f32],
    x_hat: &[f32],
    rows: &[[f64; 3]],
    d: usize,
    out: &mut [MaybeUninit<f32>],
) {
    gradient_f32_body(x, x_hat, rows, d, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn gradient_f32_avx512(
    x: &[f32],
    x_hat: &[f32],
    rows: &[[f64; 3]],
    d: usize,
    out: &mut [MaybeUninit<f32>],
) {
    gradient_f32_body(x, x_hat, rows, d, out)
}

#[inline(always)]
fn gradient_f32_body(
    x: &[f32],
    x_hat: &[f32],
    rows: &[[f64; 3]],
    d: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let row_values = x.chunks_exact(d).zip(x_hat.chunks_exact(d));
    for (((x, x_hat), coefficients), out) in row_values.zip(rows).zip(out.chunks_exact_mut(d)) {
        let [along, own_x, own_x_hat] = coefficients.map(|c| c as f32);
        for ((&xj, &hj), out) in x.iter().zip(x_hat).zip(out) {
            out.write(along * (xj - hj) + own_x * xj + own_x_hat * hj);
        }
    }
}

/// Calls `work` with the values of x and x' (and their row length) as f32 or f64 slices.
fn with_values<R>(
    x: &FlexTensor,
    x_hat: &FlexTensor,
    f32_work: impl FnOnce(&[f32], &[f32], usize) -> R,
    f64_work: impl FnOnce(&[f64], &[f64], usize) -> R,
) -> R {
    let [_, d] = x.shape().dims();
    let contiguous = |t: &FlexTensor| {
        if t.is_contiguous() {
            t.clone()
        } else {
            t.to_contiguous()
        }
    };
    let (x, x_hat) = (contiguous(x), contiguous(x_hat));
    match (x.as_slice::<f32>(), x_hat.as_slice::<f32>()) {
        (Some(a), Some(b)) => f32_work(a, b, d),
        _ => {
            let as_f64 = |t: FlexTensor| {
                t.into_data()
                    .convert::<f64>()
                    .try_into_vec::<f64>()
                    .expect("a float tensor converts to f64")
            };
            f64_work(&as_f64(x), &as_f64(x_hat), d)
        }
    }
}

impl ReconstructionBackend for Flex {
    fn reconstruction_terms(x: FlexTensor, x_hat: FlexTensor) -> FlexTensor {
        terms_and_sums(&x, &x_hat).0
    }
}

/// The terms `[n, 3]` and the row sums `[n, 4]` they come from, which the backward pass reuses.
fn terms_and_sums(x: &FlexTensor, x_hat: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let n = x.shape().dims::<2>()[0];
    let (terms, sums) = with_values(
        x,
        x_hat,
        |a, b, d| {
            let (terms, sums) = terms_f32(a, b, d);
            (
                TensorData::new(terms, [n, 3]),
                TensorData::new(sums, [n, 4]),
            )
        },
        |a, b, d| {
            let (terms, sums) = terms_f64(a, b, d);
            (
                TensorData::new(terms, [n, 3]),
                TensorData::new(sums, [n, 4]),
            )
        },
    );
    (FlexTensor::from_data(terms), FlexTensor::from_data(sums))
}

/// Gradient of Σ grad ⊙ terms with respect to x' (`of_x_hat`) or x, given the forward pass's
/// row sums.
fn terms_backward(
    x: FlexTensor,
    x_hat: FlexTensor,
    sums: FlexTensor,
    grad: FlexTensor,
    of_x_hat: bool,
) -> FlexTensor {
    let shape = x.shape();
    let rows = row_coefficients(&to_f64(&sums), &to_f64(&grad), of_x_hat);
    let data = with_values(
        &x,
        &x_hat,
        |a, b, d| TensorData::new(gradient_f32(a, b, &rows, d), shape.clone()),
        |a, b, d| TensorData::new(gradient_f64(a, b, &rows, d), shape.clone()),
    );
    FlexTensor::from_data(data)
}

#[derive(Debug)]
struct ReconstructionStep;

impl Backward<Flex, 2> for ReconstructionStep {
    /// x and x', checkpointed, and the forward pass's row sums.
    type State = ([NodeId; 2], FlexTensor);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (inputs, sums) = ops.state;
        let [x, x_hat] = inputs.map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
        let [node_x, node_x_hat] = ops.parents;
        if let Some(node) = node_x {
            let value = terms_backward(x.clone(), x_hat.clone(), sums.clone(), grad.clone(), false);
            grads.register::<Flex>(node.id, value);
        }
        if let Some(node) = node_x_hat {
            let value = terms_backward(x, x_hat, sums, grad, true);
            grads.register::<Flex>(node.id, value);
        }
    }
}

impl<C: CheckpointStrategy> ReconstructionBackend for Autodiff<Flex, C> {
    fn reconstruction_terms(x: FloatTensor<Self>, x_hat: FloatTensor<Self>) -> FloatTensor<Self> {
        match ReconstructionStep
            .prepare::<C>([x.node(), x_hat.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let inputs = [&x, &x_hat].map(|t| prep.checkpoint(t));
                let (terms, sums) = terms_and_sums(x.primitive(), x_hat.primitive());
                prep.finish((inputs, sums), terms)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::reconstruction_terms(
                x.into_primitive(),
                x_hat.into_primitive(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close_to_reference;
    use burn::tensor::{DType, Device};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The terms as burn's general operations compute them: the reference for the fused step.
    fn composed(x: Tensor<2>, x_hat: Tensor<2>) -> Tensor<2> {
        let norm = |t: Tensor<2>| (t.clone() * t).sum_dim(1).add_scalar(NORM_EPS).sqrt();
        let x_norm = norm(x.clone());
        let error = x.clone() - x_hat.clone();
        let relative_distance = norm(error.clone()) / x_norm.clone();
        let cosine = (x * x_hat.clone()).sum_dim(1) / (x_norm * norm(x_hat));
        let squared_error = (error.clone() * error).sum_dim(1);
        Tensor::cat(vec![relative_distance, cosine, squared_error], 1)
    }

    /// Terms and the gradients of a weighted sum of them with respect to x and x'.
    fn terms_and_gradients(fused: bool, dtype: DType) -> [Vec<f64>; 3] {
        let (n, d) = (40, 7);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut draw = |count: usize| -> Vec<f64> {
            (0..count).map(|_| rng.random_range(-1.5..1.5)).collect()
        };
        let device = Device::flex().autodiff();
        let tensor = |v: Vec<f64>, dims: [usize; 2]| crate::testing::leaf(v, dims, dtype, &device);
        let x = tensor(draw(n * d), [n, d]);
        let x_hat = tensor(draw(n * d), [n, d]);
        let weights = tensor(draw(n * 3), [n, 3]).detach();
        let terms = if fused {
            reconstruction_terms(x.clone(), x_hat.clone())
        } else {
            composed(x.clone(), x_hat.clone())
        };
        let values = |t: Tensor<2>| {
            let [rows, cols] = t.dims();
            t.reshape([rows * cols])
                .into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .unwrap()
        };
        let grads = (terms.clone() * weights).sum().backward();
        [
            values(terms),
            values(x.grad(&grads).unwrap()),
            values(x_hat.grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn fused_terms_match_the_composed_operations_and_their_gradients() {
        // f64: the two differ by rounding only. f32: training's precision.
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let fused = terms_and_gradients(true, dtype);
            let composed = terms_and_gradients(false, dtype);
            assert_close_to_reference(&["terms", "dx", "dx'"], &fused, &composed, tolerance);
        }
    }

    #[test]
    fn row_sums_are_each_rows_in_order_sums() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        // Two blocks of sixteen rows and a remainder, at narrow widths, whole blocks of
        // sixteen columns and the KDDCUP99 width (seven blocks and six columns).
        for (n, d) in [(40, 7), (37, 118), (33, 16), (48, 32), (5, 3), (0, 4)] {
            let x: Vec<f32> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let x_hat: Vec<f32> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let want: Vec<RowSums<f32>> = x
                .chunks_exact(d)
                .zip(x_hat.chunks_exact(d))
                .map(|(x, x_hat)| {
                    let (mut xx, mut dd, mut hh, mut xh) = (0f32, 0f32, 0f32, 0f32);
                    for (&a, &b) in x.iter().zip(x_hat) {
                        add_to_sums(a, b, [&mut xx, &mut dd, &mut hh, &mut xh]);
                    }
                    [xx, dd, hh, xh]
                })
                .collect();
            assert_eq!(row_sums_f32(&x, &x_hat, d), want, "{n} rows of {d}");
            assert_eq!(row_sums_f32_body(&x, &x_hat, d), want, "{n} rows of {d}");
            #[cfg(target_arch = "x86_64")]
            if Isa::Avx2.supported() {
                // SAFETY: the CPU has AVX2, checked just above.
                let sums = unsafe { row_sums_f32_avx2(&x, &x_hat, d) };
                assert_eq!(sums, want, "{n} rows of {d}, AVX2");
            }
        }
    }

    #[test]
    fn a_zero_row_keeps_finite_terms_and_gradients() {
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::zeros([2, 4], &device).require_grad();
        let x_hat = Tensor::<2>::zeros([2, 4], &device).require_grad();
        let terms = reconstruction_terms(x.clone(), x_hat.clone());
        let grads = terms.clone().sum().backward();
        let all_finite = |t: Tensor<2>| {
            t.into_data()
                .try_into_vec::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())
        };
        assert!(all_finite(terms));
        assert!(all_finite(x.grad(&grads).unwrap()));
        assert!(all_finite(x_hat.grad(&grads).unwrap()));
    }

    #[test]
    fn rows_split_over_helpers_give_the_same_bits() {
        let (n, d) = (1024, 118);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut values =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (x, x_hat) = (values(n * d), values(n * d));
        let coefficients: Vec<[f64; 3]> = values(n * 3)
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2]].map(f64::from))
            .collect();
        let whole = (
            row_sums_f32(&x, &x_hat, d),
            gradient_f32(&x, &x_hat, &coefficients, d),
        );
        for helpers in [1, 3] {
            let _lent = helper_threads::lend_unpinned(helpers);
            assert!(helper_threads::chunks_worth(n * d) > 1, "split");
            // Compared whole: a mismatch would print two thousand-value buffers.
            assert!(row_sums_f32(&x, &x_hat, d) == whole.0, "{helpers}");
            assert!(
                gradient_f32(&x, &x_hat, &coefficients, d) == whole.1,
                "{helpers}"
            );
        }
    }
}
