//! One dense layer, x·W + b with an optional tanh, recorded as a single autodiff step.
//!
//! Built from burn's general operations, a tanh layer records a matrix product, a broadcast bias
//! add and the three operations of the tanh gradient trick, each with its own temporaries and
//! backward step; those took more of a training step than the matrix products. Here the forward
//! pass adds the product to the bias and applies `tanh_f32` in one pass over it, and the
//! backward pass forms g·(1 − y²) and the bias gradient in one pass before the two products of
//! the weight and input gradients. The products sum as gemm, the kernels flex's own product
//! calls, sums them: through gemm with the arguments flex gives it, or where the CPU has AVX2 or
//! AVX-512 through our kernel that keeps gemm's order (`chained_product`). The values and
//! gradients are the bits the composed operations gave (a test compares them). A first layer
//! fed mostly zeros (one-hot columns) multiplies only the nonzeros instead (`sparse_rows`), for
//! its output and its weight gradient: on CPUs with FMA its output has the dense one's bits,
//! and its weight gradient the dense one's up to where gemm splits the sums into blocks.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, Flex, TensorMetadata, backend_extension,
};
use burn::tensor::{DType, Tensor, TensorData};

use crate::chained_product;
use crate::helper_threads::{self, Background, CHUNKS_PER_THREAD, WriteRows, chunk_rows};
use crate::network::{Layer, tanh_f32};
use crate::scorer::{Isa, on_isa};
use crate::sparse_rows::{ByColumn, SparseRows, by_column_in_pieces};

#[backend_extension(Flex, Autodiff)]
pub trait DenseBackend: Backend {
    /// x·W + b for x `[n, d_in]` and the layer's parameters `[d_in + 1, d_out]`: W's rows,
    /// then b ([`Layer`]); then tanh when `squash`.
    fn dense(x: FloatTensor<Self>, params: FloatTensor<Self>, squash: bool) -> FloatTensor<Self>;
}

/// `layer` applied to `x`, then tanh when `squash`.
pub fn dense(layer: &Layer, x: Tensor<2>, squash: bool) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as DenseBackend>::dense(
        x.into_dispatch(),
        layer.params.val().into_dispatch(),
        squash,
    ))
}

/// The weight `[d_in, d_out]` and bias `[d_out]` in a layer's parameters `[d_in + 1, d_out]`,
/// as views of its buffer.
pub(crate) fn weight_and_bias(params: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let [rows, columns] = params.shape().dims();
    let inputs = rows.saturating_sub(1);
    let part = |at: Range<usize>| {
        Flex::float_slice(
            params.clone(),
            &[
                burn::tensor::Slice::from(at),
                burn::tensor::Slice::from(0..columns),
            ],
        )
    };
    let bias = Flex::float_reshape(part(inputs..rows), [columns].into());
    (part(0..inputs), bias)
}

/// The weight `[d_in, d_out]` as a matrix and the bias `[d_out]` in the buffer of a layer's
/// f32 parameters `[d_in + 1, d_out]`, read in place; `None` for other tensors.
fn weight_and_bias_f32(params: &FlexTensor) -> Option<(Matrix<'_>, &[f32])> {
    let shape = params.shape();
    if shape.num_dims() != 2 || shape[0] == 0 {
        return None;
    }
    let (inputs, columns) = (shape[0] - 1, shape[1]);
    let (weight, bias) = params.as_slice::<f32>()?.split_at(inputs * columns);
    Some((Matrix::row_major(weight, inputs, columns), bias))
}

/// A layer's parameter gradient `[d_in + 1, d_out]` from its weight's and bias's.
pub(crate) fn params_gradient(weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
    let [inputs, columns] = weight.shape().dims();
    match (weight.as_slice::<f32>(), bias.as_slice::<f32>()) {
        (Some(weight), Some(bias)) if weight.len() == inputs * columns => {
            let mut values = Vec::with_capacity((inputs + 1) * columns);
            values.extend_from_slice(weight);
            values.extend_from_slice(bias);
            FlexTensor::from_data(TensorData::new(values, [inputs + 1, columns]))
        }
        _ => Flex::float_cat(
            vec![weight, Flex::float_reshape(bias, [1, columns].into())],
            0,
        ),
    }
}

/// The contiguous f32 values of a flex tensor, borrowed when they already are.
pub(crate) fn f32_values(tensor: &FlexTensor) -> Cow<'_, [f32]> {
    match tensor.as_slice::<f32>() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(
            tensor
                .to_contiguous()
                .as_slice::<f32>()
                .expect("a contiguous f32 tensor")
                .to_vec(),
        ),
    }
}

impl DenseBackend for Flex {
    fn dense(x: FlexTensor, params: FlexTensor, squash: bool) -> FlexTensor {
        if let (Some(x_view), Some((weight, bias))) = (Matrix::of(&x), weight_and_bias_f32(&params))
            && x_view.columns == weight.rows
        {
            let values = product(&x_view, &weight, Some(bias), squash);
            return FlexTensor::from_data(TensorData::new(values, [x_view.rows, weight.columns]));
        }
        let (weight, bias) = weight_and_bias(&params);
        layer(x, weight, bias, squash)
    }
}

/// x·W + b, then tanh when `squash`, for parameters not read in place (another element type,
/// or a view with strides).
fn layer(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, squash: bool) -> FlexTensor {
    let (Some(x_view), Some(weight_view)) = (Matrix::of(&x), Matrix::of(&weight)) else {
        // Not our f32 training: burn's own operations.
        let output = Flex::linear(x, weight, Some(bias));
        return if squash {
            Flex::float_tanh(output)
        } else {
            output
        };
    };
    // The bias shares the weight's buffer, so it is f32 too.
    let bias = f32_values(&bias);
    let values = product(&x_view, &weight_view, Some(&bias), squash);
    FlexTensor::from_data(TensorData::new(values, [x_view.rows, weight_view.columns]))
}

/// Whether gemm, asked for dst + lhs·rhs, adds each finished dot product to dst in one
/// rounding, as b + x·w is computed after the product: true for its blocked kernels when the
/// inner dimension fits one block (gemm takes at least 512 at a time). Its paths for short
/// inner dimensions, single rows or columns and tiny outputs accumulate differently, so those
/// products get the bias afterwards.
fn adds_to_finished_sums(m: usize, k: usize, n: usize) -> bool {
    m > 1 && n > 1 && k > 2 && k <= 512 && m * n > 16 * 16
}

/// An f32 matrix as gemm reads it: its buffer, and where element (i, j) sits in it.
#[derive(Clone, Copy)]
pub(crate) struct Matrix<'a> {
    pub(crate) values: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) columns: usize,
    pub(crate) offset: usize,
    pub(crate) row_stride: isize,
    pub(crate) column_stride: isize,
}

impl<'a> Matrix<'a> {
    /// A 2-d f32 flex tensor in place, whatever its strides; `None` for anything else (other
    /// element types, other ranks, reversed axes), which burn's own operations handle.
    fn of(tensor: &'a FlexTensor) -> Option<Self> {
        let layout = tensor.layout();
        let (shape, strides) = (layout.shape(), layout.strides());
        if tensor.dtype() != DType::F32 || strides.len() != 2 || strides.iter().any(|&s| s < 0) {
            return None;
        }
        let matrix = Matrix {
            values: tensor.storage::<f32>(),
            rows: shape[0],
            columns: shape[1],
            offset: layout.start_offset(),
            row_stride: strides[0],
            column_stride: strides[1],
        };
        matrix.in_bounds().then_some(matrix)
    }

    /// Whether every element (i, j) lies inside the buffer, the strides being non-negative:
    /// what makes the gemm call sound.
    pub(crate) fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.columns == 0 {
            return true;
        }
        let last = self.offset as isize
            + (self.rows as isize - 1) * self.row_stride
            + (self.columns as isize - 1) * self.column_stride;
        (last as usize) < self.values.len()
    }

    pub(crate) fn transposed(&self) -> Self {
        Matrix {
            rows: self.columns,
            columns: self.rows,
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..*self
        }
    }

    /// The elements, row by row, where they lie so in the buffer already.
    fn row_major_values(&self) -> Option<&'a [f32]> {
        let len = self.rows * self.columns;
        (self.column_stride == 1 && self.row_stride == self.columns as isize)
            .then(|| &self.values[self.offset..self.offset + len])
    }

    /// A row-major copy of the elements.
    fn row_major_copy(&self) -> Vec<f32> {
        let mut copy = vec![0.0; self.rows * self.columns];
        if self.columns == 0 {
            return copy;
        }
        for (i, row) in copy.chunks_exact_mut(self.columns).enumerate() {
            for (j, value) in row.iter_mut().enumerate() {
                *value = self.at(i, j);
            }
        }
        copy
    }

    /// Element (i, j).
    fn at(&self, i: usize, j: usize) -> f32 {
        let index =
            self.offset as isize + i as isize * self.row_stride + j as isize * self.column_stride;
        self.values[index as usize]
    }

    pub(crate) fn row_major(values: &'a [f32], rows: usize, columns: usize) -> Self {
        Matrix {
            values,
            rows,
            columns,
            offset: 0,
            row_stride: columns as isize,
            column_stride: 1,
        }
    }
}

/// lhs·rhs as a row-major buffer, plus `bias` on every row when given, then through tanh when
/// `squash`, with the bits of the gemm kernels flex's own matrix product calls: our chained
/// kernel where it keeps their order and the CPU runs it, else gemm with the same arguments.
/// Either saves what flex's product adds around them: it zeroes a fresh output and copies it
/// into an aligned buffer, and the bias then takes another pass. Where this thread has helpers,
/// large products are split by rows over them ([`split_rows`]); each chunk adds the bias to its
/// rows' sums (gemm: to rows filled with it), and squashes them.
pub(crate) fn product(lhs: &Matrix, rhs: &Matrix, bias: Option<&[f32]>, squash: bool) -> Vec<f32> {
    assert_eq!(lhs.columns, rhs.rows, "inner dimensions of a product");
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    let bias = bias.inspect(|bias| assert_eq!(bias.len(), n, "bias length"));
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let chained = chained_product::isa();
    let short = chained.filter(|_| gemm_takes_short_inner_products(lhs, rhs));
    let block = chained_product::gemm_block(lhs, rhs).filter(|_| chained.is_some());
    // Summed in one block, or as gemm's short products, a product takes the bias onto its
    // finished sums, as the loop below would.
    let bias_on_finished_sums =
        short.is_some() || block == Some(k) || adds_to_finished_sums(m, k, n);
    if k == 0 || bias.is_some_and(|_| !bias_on_finished_sums) {
        let mut output = match (k, bias) {
            (0, Some(bias)) => bias.repeat(m),
            (0, None) => vec![0.0; m * n],
            (_, bias) => {
                let mut output = product(lhs, rhs, None, false);
                for row in output.chunks_exact_mut(n) {
                    for (value, b) in row.iter_mut().zip(bias.unwrap_or_default()) {
                        *value += b;
                    }
                }
                output
            }
        };
        if squash {
            tanh_in_place(&mut output);
        }
        return output;
    }
    if let Some(isa) = short {
        let product_rows = |rows: Range<usize>, out: &mut [MaybeUninit<f32>]| {
            let len = out.len();
            let start = out.as_mut_ptr().cast::<f32>();
            on_isa!(isa, || short_inner_products(lhs, rhs, bias, rows, out));
            if squash {
                // SAFETY: every value of these rows was written.
                tanh_in_place(unsafe { std::slice::from_raw_parts_mut(start, len) });
            }
        };
        return in_row_chunks(m, k, n, &product_rows);
    }
    if let Some(block) = block {
        let packed;
        let rhs_rows = match rhs.row_major_values() {
            Some(values) => values,
            None => {
                packed = rhs.row_major_copy();
                &packed[..]
            }
        };
        let product_rows = |rows: Range<usize>, out: &mut [MaybeUninit<f32>]| {
            let len = out.len();
            let start = out.as_mut_ptr().cast::<f32>();
            chained_product::product_rows(lhs, rhs_rows, n, block, bias, rows, out);
            if squash {
                // SAFETY: the chained product wrote every value of these rows.
                tanh_in_place(unsafe { std::slice::from_raw_parts_mut(start, len) });
            }
        };
        return in_row_chunks(m, k, n, &product_rows);
    }
    let product_rows = |rows: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        if rows.is_empty() {
            return;
        }
        let start = out.as_mut_ptr().cast::<f32>();
        // SAFETY: both operands' elements lie inside their buffers (`Matrix::in_bounds`,
        // checked when each view was made), so do the rows taken here; `out` holds these rows'
        // n values each, row-major. Without a bias gemm is told not to read the output, and
        // writes every element of it, so the rows are not zeroed first.
        unsafe {
            if let Some(bias) = bias {
                fill_rows(start, rows.len(), bias);
            }
            gemm::gemm(
                rows.len(),
                n,
                k,
                start,
                1,
                n as isize,
                // Read only when it holds the bias.
                bias.is_some(),
                lhs.values
                    .as_ptr()
                    .add(lhs.offset)
                    .offset(rows.start as isize * lhs.row_stride),
                lhs.column_stride,
                lhs.row_stride,
                rhs.values.as_ptr().add(rhs.offset),
                rhs.column_stride,
                rhs.row_stride,
                1.0,
                1.0,
                false,
                false,
                false,
                // Spare cores, where a fit has them, take whole chunks of rows instead.
                gemm::Parallelism::None,
            );
            if squash {
                tanh_in_place(std::slice::from_raw_parts_mut(start, rows.len() * n));
            }
        }
    };
    in_row_chunks(m, k, n, &product_rows)
}

/// Whether gemm takes lhs·rhs (without a bias) by its path for inner dimensions of one or two,
/// which [`short_inner_products`] sums as it does: gemm's path for tiny outputs of contiguous
/// dot products comes before it.
fn gemm_takes_short_inner_products(lhs: &Matrix, rhs: &Matrix) -> bool {
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    let tiny_dots = lhs.column_stride == 1 && rhs.row_stride == 1 && m * n <= 16 * 16;
    (1..=2).contains(&k) && !tiny_dots
}

/// Rows `rows` of lhs·rhs for an inner dimension of one or two, as gemm sums them there: each
/// product rounded, then their sum. (The network's 1 → 10 layer and the input
/// gradient of its 10 → 1 layer: 7 µs a product through gemm, whose loop for them is scalar.)
#[inline(always)]
fn short_inner_products(
    lhs: &Matrix,
    rhs: &Matrix,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    let (k, n) = (lhs.columns, rhs.columns);
    assert!(
        (1..=2).contains(&k) && out.len() == rows.len() * n,
        "rows of short products"
    );
    let rhs_row = |p: usize| -> Vec<f32> { (0..n).map(|j| rhs.at(p, j)).collect() };
    let first = rhs_row(0);
    let second = if k == 2 { rhs_row(1) } else { vec![0.0; n] };
    let zeros = vec![0.0; n];
    // The bias apart, so that no zero is added where there is none (it would turn −0 into +0).
    let (bias, with_bias) = match bias {
        Some(bias) => (bias, true),
        None => (&zeros[..], false),
    };
    for (i, out) in rows.zip(out.chunks_exact_mut(n)) {
        let l0 = lhs.at(i, 0);
        let lanes = out.iter_mut().zip(&first).zip(&second).zip(bias);
        match (k, with_bias) {
            (1, false) => lanes.for_each(|(((out, &r0), _), _)| {
                out.write(l0 * r0);
            }),
            (1, true) => lanes.for_each(|(((out, &r0), _), &b)| {
                out.write(l0 * r0 + b);
            }),
            (_, with_bias) => {
                let l1 = lhs.at(i, 1);
                lanes.for_each(|(((out, &r0), &r1), &b)| {
                    let sum = l1 * r1 + l0 * r0;
                    out.write(if with_bias { sum + b } else { sum });
                });
            }
        }
    }
}

/// The m rows of n values that `product_rows` writes for an m × k by k × n product, in chunks
/// of rows over this thread's helpers where it has them ([`split_rows`]).
fn in_row_chunks(m: usize, k: usize, n: usize, product_rows: &WriteRows<'_, f32>) -> Vec<f32> {
    let threads = helper_threads::threads_now();
    let chunks = match threads {
        1 => 1,
        _ => split_rows(m, k, n, CHUNKS_PER_THREAD * threads),
    };
    let ranges: Vec<Range<usize>> = (0..chunks).map(|c| chunk_rows(m, c, chunks)).collect();
    // SAFETY: every product_rows given here writes every value of its chunk's rows.
    unsafe { helper_threads::rows_written_in_ranges(m, n, &ranges, product_rows) }
}

/// `bias` in each of `rows` rows from `start`: copied once, then the rows so far doubled, a
/// few large copies instead of one small one per row.
///
/// # Safety
/// `start` must have room for `rows · bias.len()` values.
unsafe fn fill_rows(start: *mut f32, rows: usize, bias: &[f32]) {
    let total = rows * bias.len();
    // SAFETY: the caller's; each copy goes from the filled front to the unfilled rest.
    unsafe {
        std::ptr::copy_nonoverlapping(bias.as_ptr(), start, bias.len());
        let mut filled = bias.len();
        while filled < total {
            let count = filled.min(total - filled);
            std::ptr::copy_nonoverlapping(start, start.add(filled), count);
            filled += count;
        }
    }
}

/// Products with fewer multiply-adds per chunk stay whole: a chunk costs about a microsecond
/// to hand over. At 2¹⁷ (a few microseconds of work) KDDCUP99's 1024 × 30 × 10 products and
/// their gradients are split in two as well; a two-core step then took 0.79–0.82 of a one-core
/// step, against 0.83–0.89 with 2¹⁸ (medians over the chooser's cycles, four runs each).
const MIN_SPLIT_MULTIPLY_ADDS: usize = 1 << 17;

/// Into how many chunks of rows (at most `most`) an m × k by k × n product is split: 1 for
/// small products, and only as many as keep every chunk on the path gemm takes for the whole,
/// with the same blocks of the inner dimension, so each element gets the same bits whatever
/// the number of threads.
fn split_rows(m: usize, k: usize, n: usize, most: usize) -> usize {
    // gemm's blocked kernels; its paths for tiny outputs, single rows or columns and inner
    // dimensions of one or two sum differently.
    let blocked = |rows: usize| rows > 1 && n > 1 && k > 2 && rows * n > 16 * 16;
    // Past one block of the inner dimension (512), gemm's block length depends on whether
    // both sides are at most 64 long.
    let small_sides = |rows: usize| rows <= 64 && n <= 64;
    let same_blocks = |rows: usize| k <= 512 || small_sides(rows) == small_sides(m);
    let fits = |chunks: usize| {
        m * k * n >= MIN_SPLIT_MULTIPLY_ADDS * chunks
            && (0..chunks).all(|chunk| {
                let rows = chunk_rows(m, chunk, chunks).len();
                blocked(rows) && same_blocks(rows)
            })
    };
    (2..=most).rev().find(|&chunks| fits(chunks)).unwrap_or(1)
}

/// `tanh_f32` of every value, in place. The build's baseline is SSE2 (four lanes), so CPUs
/// with AVX2 or AVX-512 get their own copies of the loop; all give the same bits.
fn tanh_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match Isa::best(16) {
        // SAFETY: Isa::best only names instruction sets this CPU has.
        Isa::Avx512 => return unsafe { tanh_in_place_avx512(values) },
        Isa::Avx2 => return unsafe { tanh_in_place_avx2(values) },
        Isa::Portable => {}
    }
    tanh_in_place_portable(values)
}

#[inline(always)]
fn tanh_in_place_portable(values: &mut [f32]) {
    for value in values.iter_mut() {
        *value = tanh_f32(*value);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn tanh_in_place_avx512(values: &mut [f32]) {
    tanh_in_place_portable(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn tanh_in_place_avx2(values: &mut [f32]) {
    tanh_in_place_portable(values)
}

/// grad · (1 − y²), the gradient through tanh given its output y, from burn's operations: for
/// element types other than f32.
fn tanh_backward(output: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let slope = Flex::float_add_scalar(
        Flex::float_neg(Flex::float_mul(output.clone(), output)),
        1.0.into(),
    );
    Flex::float_mul(grad, slope)
}

/// The gradient reaching x·W + b: `grad` itself, or through tanh given its output.
fn pre_activation_values<'a>(
    grad: &'a [f32],
    output: Option<&[f32]>,
    columns: usize,
) -> Cow<'a, [f32]> {
    match output {
        Some(output) => Cow::Owned(through_tanh(grad, output, columns)),
        None => Cow::Borrowed(grad),
    }
}

/// The bias gradient: the column sums of the gradient at x·W + b, down each column in row
/// order, as flex's sum over rows does. The build's baseline is SSE2, so CPUs with AVX2 or
/// AVX-512 get their own copies of the loops (two or four times the lanes, the same bits).
fn bias_gradient(values: &[f32], columns: usize) -> Vec<f32> {
    match Isa::best(16) {
        // SAFETY (both): Isa::best only names instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { column_sums_avx512(values, columns) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { column_sums_avx2(values, columns) },
        _ => column_sums(values, columns),
    }
}

/// grad · (1 − y²), y being the tanh output. Rows are independent: a fit's spare cores take
/// chunks of them. Each value reads two that are rarely in this core's cache (y was written in
/// the forward pass, half of it by the helper), so a row counts as four values of simple work:
/// the narrow layers' 10 and 30 columns are split too, which took about 25 µs of a two-thread
/// KDDCUP99 step off the fit's thread alone.
fn through_tanh(grad: &[f32], output: &[f32], columns: usize) -> Vec<f32> {
    assert_eq!(grad.len(), output.len(), "gradient and output shapes");
    let rows = grad.len().checked_div(columns).unwrap_or(0);
    let gradient_of = |rows: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        let values = rows.start * columns..rows.end * columns;
        let (grad, output) = (&grad[values.clone()], &output[values]);
        #[cfg(target_arch = "x86_64")]
        match Isa::best(16) {
            // SAFETY (both): Isa::best only names instruction sets this CPU has.
            Isa::Avx512 => return unsafe { through_tanh_avx512(grad, output, out) },
            Isa::Avx2 => return unsafe { through_tanh_avx2(grad, output, out) },
            Isa::Portable => {}
        }
        through_tanh_rows(grad, output, out)
    };
    // SAFETY: each chunk writes every value of its rows (`through_tanh_rows`).
    unsafe { helper_threads::rows_written_in_chunks(rows, columns, 4 * columns, &gradient_of) }
}

#[inline(always)]
fn through_tanh_rows(grad: &[f32], output: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((&g, &y), out) in grad.iter().zip(output).zip(out) {
        // As the composed version computed it: g · ((−(y·y)) + 1).
        out.write(g * (-(y * y) + 1.0));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn through_tanh_avx512(grad: &[f32], output: &[f32], out: &mut [MaybeUninit<f32>]) {
    through_tanh_rows(grad, output, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn through_tanh_avx2(grad: &[f32], output: &[f32], out: &mut [MaybeUninit<f32>]) {
    through_tanh_rows(grad, output, out)
}

/// [`column_sums`] with AVX2's sixteen registers of eight lanes: its sixty-four-column blocks
/// fit in eight of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn column_sums_avx2(values: &[f32], columns: usize) -> Vec<f32> {
    column_sums(values, columns)
}

/// [`column_sums`] with AVX-512 masked loads: every block of sixteen columns of up to eight
/// (128 columns) gets its own register, the last block's missing columns read as zeros, and
/// one pass down the rows adds to all of them, so their chains of adds overlap instead of
/// running one block after another. Each column's adds are still in row order: the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn column_sums_avx512(values: &[f32], columns: usize) -> Vec<f32> {
    let mut sums = vec![0f32; columns];
    // A layer without outputs has nothing to sum (and rows of zero values cannot be chunked).
    if columns == 0 {
        return sums;
    }
    for start in (0..columns).step_by(128) {
        let group = &mut sums[start..(start + 128).min(columns)];
        match group.len().div_ceil(16) {
            1 => sum_column_group::<1>(values, columns, start, group),
            2 => sum_column_group::<2>(values, columns, start, group),
            3 => sum_column_group::<3>(values, columns, start, group),
            4 => sum_column_group::<4>(values, columns, start, group),
            5 => sum_column_group::<5>(values, columns, start, group),
            6 => sum_column_group::<6>(values, columns, start, group),
            7 => sum_column_group::<7>(values, columns, start, group),
            _ => sum_column_group::<8>(values, columns, start, group),
        }
    }
    sums
}

/// Sums the columns `start..start + group.len()` (B blocks of sixteen, the last one possibly
/// short) of rows of `columns` values into `group`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn sum_column_group<const B: usize>(
    values: &[f32],
    columns: usize,
    start: usize,
    group: &mut [f32],
) {
    use std::arch::x86_64::*;
    let width = group.len();
    assert!(width > (B - 1) * 16 && width <= B * 16 && start + width <= columns);
    let masks: [__mmask16; B] = std::array::from_fn(|b| {
        let in_block = (width - b * 16).min(16);
        ((1u32 << in_block) - 1) as u16
    });
    let mut blocks = [_mm512_setzero_ps(); B];
    for row in values.chunks_exact(columns) {
        for (b, block) in blocks.iter_mut().enumerate() {
            // SAFETY: the mask covers only columns start + 16b .. start + width of this row,
            // which lie inside it (asserted above); masked-off lanes are not read.
            let part = unsafe { _mm512_maskz_loadu_ps(masks[b], row.as_ptr().add(start + 16 * b)) };
            *block = _mm512_add_ps(*block, part);
        }
    }
    for (b, block) in blocks.iter().enumerate() {
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds sixteen f32 values.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *block) };
        let in_block = (width - b * 16).min(16);
        group[b * 16..b * 16 + in_block].copy_from_slice(&lanes[..in_block]);
    }
}

/// The sum of each column of a row-major buffer, down the rows in order. Summing a row at a
/// time into the output made every add wait for the previous row's store of the same sum;
/// here a block of columns stays in registers over all rows (sixty-four columns at a time
/// where the layer is that wide, so four chains overlap, then 16, 8, 4, 2 and 1), with each
/// column's adds still in row order.
#[inline(always)]
fn column_sums(values: &[f32], columns: usize) -> Vec<f32> {
    let mut sums = vec![0f32; columns];
    // A layer without outputs has nothing to sum (and rows of zero values cannot be chunked).
    if columns == 0 {
        return sums;
    }
    let mut start = 0;
    while start + 64 <= columns {
        start = sum_column_block::<64>(values, columns, start, &mut sums);
    }
    while start + 16 <= columns {
        start = sum_column_block::<16>(values, columns, start, &mut sums);
    }
    // Fewer than sixteen left: at most one block of each narrower width.
    if start + 8 <= columns {
        start = sum_column_block::<8>(values, columns, start, &mut sums);
    }
    if start + 4 <= columns {
        start = sum_column_block::<4>(values, columns, start, &mut sums);
    }
    if start + 2 <= columns {
        start = sum_column_block::<2>(values, columns, start, &mut sums);
    }
    if start < columns {
        sum_column_block::<1>(values, columns, start, &mut sums);
    }
    sums
}

/// Sums columns `start..start + W` into `sums`; returns where the next block starts.
#[inline(always)]
fn sum_column_block<const W: usize>(
    values: &[f32],
    columns: usize,
    start: usize,
    sums: &mut [f32],
) -> usize {
    let mut block = [0f32; W];
    for row in values.chunks_exact(columns) {
        let part: &[f32; W] = row[start..start + W].try_into().expect("W columns");
        for (sum, &value) in block.iter_mut().zip(part) {
            *sum += value;
        }
    }
    sums[start..start + W].copy_from_slice(&block);
    start + W
}

/// The autodiff step: remembers x and W (for the weight and input gradients) and, with tanh,
/// the output.
#[derive(Debug)]
struct DenseStep;

/// The input x as the weight gradient needs it: `D` is its checkpointed node while the step
/// is recorded, and the tensor once the backward pass retrieves it.
#[derive(Debug, Clone)]
enum LayerInput<D> {
    Dense(D),
    /// Data that needs no gradient of its own and is mostly zeros: its nonzeros.
    Sparse(SparseInput),
}

/// A first layer's mostly-zero input: its nonzeros, and, where the fit has a helper, the same
/// arranged by column for the weight gradient by the helper in the background while the step
/// goes on. Shared with the reconstruction step of the same batch
/// ([`prepared_input::shared`]), which needs both too.
#[derive(Clone)]
pub(crate) struct SparseInput {
    rows: Arc<SparseRows>,
    by_column: Arc<Mutex<ByColumnState>>,
}

/// The arrangement by column: the background work making it (none without a helper), until
/// someone asks; then what it made, kept for whoever asks next.
struct ByColumnState {
    started: Option<Background<'static, ByColumn>>,
    made: Option<Arc<ByColumn>>,
}

impl SparseInput {
    pub(crate) fn new(rows: SparseRows) -> Self {
        let rows = Arc::new(rows);
        // Without a helper the weight gradients go row by row and never ask for it.
        let started = helper_threads::has_helpers()
            .then(|| helper_threads::background(by_column_in_pieces(Arc::clone(&rows))));
        SparseInput {
            rows,
            by_column: Arc::new(Mutex::new(ByColumnState {
                started,
                made: None,
            })),
        }
    }

    pub(crate) fn rows(&self) -> &SparseRows {
        &self.rows
    }

    /// The entries by column: the background work's, finished here where it is not done yet.
    pub(crate) fn by_column(&self) -> Arc<ByColumn> {
        let mut state = self
            .by_column
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(made) = &state.made {
            return Arc::clone(made);
        }
        let made = Arc::new(match state.started.take() {
            Some(background) => background.finish(),
            // None was started, or its background work panicked on an earlier call.
            None => self.rows.by_column(),
        });
        state.made = Some(Arc::clone(&made));
        made
    }

    /// xᵀ·grad, `[columns, outputs]` row-major, for `grad` `[rows, outputs]`: from the
    /// arrangement by column where a helper made it in the background, else row by row on
    /// this thread; the same bits either way.
    pub(crate) fn transposed_product(&self, grad: &[f32], outputs: usize) -> Vec<f32> {
        if helper_threads::has_helpers() {
            self.rows
                .transposed_product_by(&self.by_column(), grad, outputs)
        } else {
            self.rows.transposed_product_by_rows(grad, outputs)
        }
    }
}

impl std::fmt::Debug for SparseInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseInput")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl LayerInput<FlexTensor> {
    fn into_tensor(self) -> FlexTensor {
        match self {
            LayerInput::Dense(x) => x,
            LayerInput::Sparse(x) => FlexTensor::from_data(TensorData::new(
                x.rows.to_dense(),
                [x.rows.rows(), x.rows.columns()],
            )),
        }
    }
}

impl Backward<Flex, 2> for DenseStep {
    /// (x, the parameters, tanh output): x and the parameters present only where a gradient
    /// needs them.
    type State = (
        Option<LayerInput<NodeId>>,
        Option<NodeId>,
        Option<FlexTensor>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_params] = ops.parents;
        let (x, params, squashed) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let params: Option<FlexTensor> = node_x
            .as_ref()
            .map(|_| checkpointer.retrieve_node_output(params.expect("weight kept for dx")));
        let x = node_params
            .as_ref()
            .map(|_| match x.expect("input kept for dW") {
                LayerInput::Dense(id) => LayerInput::Dense(checkpointer.retrieve_node_output(id)),
                LayerInput::Sparse(rows) => LayerInput::Sparse(rows),
            });
        let [dx, dparams] =
            match layer_gradients_f32(&grad, squashed.as_ref(), x.as_ref(), params.as_ref()) {
                Some(gradients) => gradients,
                None => {
                    let grad = match squashed {
                        Some(output) => tanh_backward(output, grad),
                        None => grad,
                    };
                    let x = x.map(LayerInput::into_tensor);
                    [
                        params.map(|params| {
                            Flex::linear_x_backward(weight_and_bias(&params).0, grad.clone())
                        }),
                        x.map(|x| {
                            params_gradient(
                                Flex::linear_weight_backward(x, grad.clone()),
                                Flex::linear_bias_backward(grad),
                            )
                        }),
                    ]
                }
            };
        for (node, gradient) in [(node_x, dx), (node_params, dparams)] {
            if let (Some(node), Some(gradient)) = (node, gradient) {
                grads.register::<Flex>(node.id, gradient);
            }
        }
    }
}

/// dx = g′·Wᵀ, and dW = xᵀ·g′ with db = Σ g′ as the parameters' gradient, for f32 tensors, g′
/// being the gradient at x·W + b: the products through [`product`], as `linear_x_backward`
/// and `linear_weight_backward` form them in flex. `None` where a tensor is not a 2-d f32
/// one, for burn's own operations.
fn layer_gradients_f32(
    grad: &FlexTensor,
    output: Option<&FlexTensor>,
    x: Option<&LayerInput<FlexTensor>>,
    params: Option<&FlexTensor>,
) -> Option<[Option<FlexTensor>; 2]> {
    let grad_view = Matrix::of(grad)?;
    let (rows, columns) = (grad_view.rows, grad_view.columns);
    if output.is_some_and(|y| y.dtype() != DType::F32 || y.shape() != grad.shape()) {
        return None;
    }
    let weight = params
        .map(|params| weight_and_bias_f32(params).map(|(weight, _)| weight))
        .map_or(Some(None), |view| view.map(Some))?;
    let x_view = match x {
        Some(LayerInput::Dense(x)) => Some(Matrix::of(x)?),
        Some(LayerInput::Sparse(x)) if x.rows.rows() != rows => return None,
        _ => None,
    };
    let output = output.map(f32_values);
    let grad = f32_values(grad);
    let values = pre_activation_values(&grad, output.as_deref(), columns);
    let pre = Matrix::row_major(&values, rows, columns);
    let input_gradient = || {
        weight
            .as_ref()
            .map(|w| product(&pre, &w.transposed(), None, false))
    };
    // With the number of its rows, x's columns.
    let weight_gradient = || match (&x_view, x) {
        (Some(x), _) => Some((product(&x.transposed(), &pre, None, false), x.columns)),
        (None, Some(LayerInput::Sparse(x))) => {
            Some((x.transposed_product(&values, columns), x.rows.columns()))
        }
        (None, _) => None,
    };
    // With both products to form, the fit's helper takes the weight gradient whole while this
    // thread forms the input gradient and the bias sums: the two products share no output, and
    // whole they need none of the packing that chunks of each repeat. A lone weight gradient
    // (the first layer's) is split by its rows instead.
    let ((dx, bias), dw) = match (&weight, &x_view) {
        (Some(_), Some(_)) => helper_threads::join(
            || (input_gradient(), bias_gradient(&values, columns)),
            weight_gradient,
        ),
        _ => (
            (input_gradient(), bias_gradient(&values, columns)),
            weight_gradient(),
        ),
    };
    let tensor =
        |values: Vec<f32>, shape: [usize; 2]| FlexTensor::from_data(TensorData::new(values, shape));
    Some([
        dx.zip(weight.as_ref())
            .map(|(dx, w)| tensor(dx, [rows, w.rows])),
        dw.map(|(mut dw, inputs)| {
            dw.extend_from_slice(&bias);
            tensor(dw, [inputs + 1, columns])
        }),
    ])
}

/// A first layer's input compressed beforehand: training's next batch, whose nonzeros the
/// fit's helper finds in the background during the step before (`SparseRowsBuilder`), so
/// that the layer does not search them itself between its products. The layer then shares
/// them, for the rest of the forward pass, with the reconstruction step, which meets the same
/// batch again.
pub(crate) mod prepared_input {
    use std::cell::{Cell, RefCell};

    use super::SparseInput;
    use crate::sparse_rows::SparseRows;

    /// Which values were prepared: where they start, how many, and their width.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Key(usize, usize, usize);

    impl Key {
        /// `values`, `columns` wide, wherever the buffer goes afterwards (a tensor taking it
        /// over keeps it in place).
        pub(crate) fn of(values: &[f32], columns: usize) -> Self {
            Key(values.as_ptr() as usize, values.len(), columns)
        }
    }

    thread_local! {
        /// The prepared values and their nonzeros, or `None` where too dense to keep sparse.
        static PREPARED: RefCell<Option<(Key, Option<SparseRows>)>> = const { RefCell::new(None) };
        /// Whether a forward pass runs inside [`with`], and the nonzeros its first layer shared.
        static SHARED: RefCell<Option<Option<(Key, SparseInput)>>> = const { RefCell::new(None) };
        /// The values that stand in for the prepared nonzeros' dense rows, if they do.
        static STAND_IN: Cell<Option<Key>> = const { Cell::new(None) };
    }

    /// Runs `f` (a forward pass) with `rows`, the compressed form of the values `key` names,
    /// ready for the first layer on this thread that takes exactly those values. Where
    /// `stand_in`, those values only stand in for the rows (training's batches gathered as
    /// their nonzeros alone): a layer or step that reads them asks [`stood_for`] first.
    pub(crate) fn with<R>(
        key: Key,
        rows: Option<SparseRows>,
        stand_in: bool,
        f: impl FnOnce() -> R,
    ) -> R {
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                PREPARED.with(|prepared| prepared.borrow_mut().take());
                SHARED.with(|shared| shared.borrow_mut().take());
                STAND_IN.set(None);
            }
        }
        assert!(rows.is_some() || !stand_in, "a stand-in for no nonzeros");
        PREPARED.with(|prepared| *prepared.borrow_mut() = Some((key, rows)));
        SHARED.with(|shared| *shared.borrow_mut() = Some(None));
        STAND_IN.set(stand_in.then_some(key));
        // Cleared afterwards, taken or not: the buffer may be freed and its address reused.
        let _clear = Clear;
        f()
    }

    /// The prepared nonzeros of `values` (`None` inside where they are too dense), if these
    /// very values were prepared; once.
    pub(crate) fn take(values: &[f32], columns: usize) -> Option<Option<SparseRows>> {
        let key = Key::of(values, columns);
        PREPARED.with(|prepared| {
            let mut prepared = prepared.borrow_mut();
            match prepared.take() {
                Some((prepared_key, rows)) if prepared_key == key => Some(rows),
                other => {
                    *prepared = other;
                    None
                }
            }
        })
    }

    /// Keeps a first layer's nonzeros of `values` for the rest of the forward pass, inside
    /// [`with`] only: outside it nothing would clear them before the buffer is freed.
    pub(crate) fn share(values: &[f32], columns: usize, input: &SparseInput) {
        SHARED.with(|shared| {
            if let Some(slot) = shared.borrow_mut().as_mut() {
                *slot = Some((Key::of(values, columns), input.clone()));
            }
        });
    }

    /// The rows, dense, that `values` stand in for ([`with`]), from their nonzeros: prepared,
    /// or shared by the first layer that took them. `None` where `values` are what they seem.
    pub(crate) fn stood_for(values: &[f32], columns: usize) -> Option<Vec<f32>> {
        let key = Key::of(values, columns);
        if STAND_IN.get() != Some(key) {
            return None;
        }
        let prepared = PREPARED.with(|prepared| match prepared.borrow().as_ref() {
            Some((prepared_key, Some(rows))) if *prepared_key == key => Some(rows.to_dense()),
            _ => None,
        });
        let rows =
            prepared.or_else(|| shared(values, columns).map(|input| input.rows().to_dense()));
        // The first layer that takes the prepared nonzeros shares them (a stand-in is one
        // contiguous buffer), so one of the two holds them.
        Some(rows.expect("the nonzeros a stand-in stands for are kept"))
    }

    /// The nonzeros a first layer shared of these very `values`, if it did.
    pub(crate) fn shared(values: &[f32], columns: usize) -> Option<SparseInput> {
        let key = Key::of(values, columns);
        SHARED.with(|shared| match shared.borrow().as_ref() {
            Some(Some((shared_key, input))) if *shared_key == key => Some(input.clone()),
            _ => None,
        })
    }
}

/// The layer through x's nonzeros, and those nonzeros, when x is a mostly-zero f32 matrix and
/// the parameters f32 of a matching shape; `None` sends it through the dense product.
fn sparse_layer(
    x: &FlexTensor,
    params: &FlexTensor,
    squash: bool,
) -> Option<(SparseRows, FlexTensor)> {
    let x_shape = x.shape();
    let (weight, bias) = weight_and_bias_f32(params)?;
    if x.dtype() != DType::F32 || x_shape.num_dims() != 2 || weight.rows != x_shape[1] {
        return None;
    }
    let x_values = f32_values(x);
    let rows = match prepared_input::take(&x_values, x_shape[1]) {
        Some(prepared) => prepared?,
        None => SparseRows::compress(&x_values, x_shape[1])?,
    };
    let weight = weight.row_major_values().expect("parameters are row-major");
    let values = rows.product(weight, bias, &|rows| {
        if squash {
            tanh_in_place(rows);
        }
    });
    let output = FlexTensor::from_data(TensorData::new(values, [rows.rows(), bias.len()]));
    Some((rows, output))
}

impl<C: CheckpointStrategy> DenseBackend for Autodiff<Flex, C> {
    fn dense(x: FloatTensor<Self>, params: FloatTensor<Self>, squash: bool) -> FloatTensor<Self> {
        let x_tracked = x.is_tracked();
        let params_tracked = params.is_tracked();
        match DenseStep
            .prepare::<C>([x.node(), params.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let params_state = x_tracked.then(|| prep.checkpoint(&params));
                // Data entering a first layer needs no gradient; when it is mostly zeros its
                // nonzeros serve both the product and the weight gradient.
                let sparse = (params_tracked && !x_tracked)
                    .then(|| sparse_layer(x.primitive(), params.primitive(), squash))
                    .flatten();
                let (x_state, output) = match sparse {
                    Some((rows, output)) => {
                        let input = SparseInput::new(rows);
                        if let Some(values) = x.primitive().as_slice::<f32>() {
                            prepared_input::share(values, x.primitive().shape()[1], &input);
                        }
                        (Some(LayerInput::Sparse(input)), output)
                    }
                    None => {
                        let x = stood_for::<C>(x);
                        let x_state =
                            params_tracked.then(|| LayerInput::Dense(prep.checkpoint(&x)));
                        (
                            x_state,
                            Flex::dense(x.into_primitive(), params.into_primitive(), squash),
                        )
                    }
                };
                let kept = squash.then(|| output.clone());
                prep.finish((x_state, params_state, kept), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::dense(
                stood_for::<C>(x).into_primitive(),
                params.into_primitive(),
                squash,
            )),
        }
    }
}

/// `x`, or where it stands in for a batch gathered as its nonzeros alone
/// ([`prepared_input::with`]), that batch made dense: for an operation that reads x's values
/// itself instead of taking the nonzeros.
pub(crate) fn stood_for<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    let shape = x.primitive().shape();
    let dense = match (x.primitive().as_slice::<f32>(), shape.num_dims()) {
        (Some(values), 2) => prepared_input::stood_for(values, shape[1]),
        _ => None,
    };
    match dense {
        Some(values) => {
            Autodiff::<Flex, C>::from_inner(FlexTensor::from_data(TensorData::new(values, shape)))
        }
        None => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::network::{DagmmNet, NetworkWeights};
    use crate::testing::same_bits;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    /// The layer as burn's general operations build it: `Linear::forward`, then tanh as the
    /// constant values y plus (h − h̄)·(1 − y²), whose gradient is tanh's.
    fn composed(layer: &Layer, x: Tensor<2>, squash: bool) -> Tensor<2> {
        let (weight, bias) = Layer::split(layer.params.val());
        let h = burn::tensor::module::linear(x, weight, Some(bias));
        if !squash {
            return h;
        }
        let detached = h.clone().detach();
        let inputs = values(detached.clone());
        let y: Vec<f32> = inputs.iter().map(|&v| tanh_f32(v)).collect();
        let slopes: Vec<f32> = y.iter().map(|&y| -(y * y) + 1.0).collect();
        let (dims, device) = (h.dims(), h.device());
        let tensor = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, dims), &device);
        tensor(y) + (h - detached) * tensor(slopes)
    }

    /// Row counts that take each of gemm's paths here: one row, a tiny output, and the blocked
    /// kernels that add the product to the bias already in the output.
    const ROW_COUNTS: [usize; 3] = [1, 9, 300];

    fn layer_and_input(device: &Device, transposed: bool, rows: usize) -> (Layer, Tensor<2>) {
        let cfg = crate::NetworkConfig {
            input_dim: 7,
            hidden: vec![5],
            latent_dim: 2,
            estimation_hidden: vec![3],
            gmm_k: 2,
            dropout: 0.0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let net = DagmmNet::from_weights(&NetworkWeights::init(&cfg, &mut rng), device);
        // Wide enough to reach tanh's clamp and both signs.
        let xs: Vec<f32> = (0..rows * 7).map(|_| rng.random_range(-6.0..6.0)).collect();
        let x = if transposed {
            Tensor::<2>::from_data(TensorData::new(xs, [7, rows]), device).transpose()
        } else {
            Tensor::<2>::from_data(TensorData::new(xs, [rows, 7]), device)
        };
        (net.encoder[0].clone(), x)
    }

    fn fused_or_composed(layer: &Layer, x: Tensor<2>, squash: bool, fused: bool) -> Tensor<2> {
        if fused {
            dense(layer, x, squash)
        } else {
            composed(layer, x, squash)
        }
    }

    /// Σ y·w with a weight per output, so every gradient entry differs.
    fn weighted_total(y: Tensor<2>) -> Tensor<1> {
        let [n, d] = y.dims();
        let w: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::<2>::from_data(TensorData::new(w, [n, d]), &y.device());
        (y * w).sum()
    }

    /// (input transposed, tanh, rows) for every combination.
    fn cases() -> impl Iterator<Item = (bool, bool, usize)> {
        [false, true].into_iter().flat_map(|transposed| {
            [false, true].into_iter().flat_map(move |squash| {
                ROW_COUNTS
                    .into_iter()
                    .map(move |rows| (transposed, squash, rows))
            })
        })
    }

    #[test]
    fn values_are_the_composed_operations_bit_for_bit() {
        assert!(
            ROW_COUNTS
                .iter()
                .any(|&rows| adds_to_finished_sums(rows, 7, 5))
        );
        assert!(
            ROW_COUNTS
                .iter()
                .any(|&rows| !adds_to_finished_sums(rows, 7, 5))
        );
        let device = Device::flex();
        for (transposed, squash, rows) in cases() {
            let (layer, x) = layer_and_input(&device, transposed, rows);
            let fused = values(dense(&layer, x.clone(), squash));
            let want = values(composed(&layer, x.clone(), squash));
            assert_eq!(
                fused, want,
                "squash {squash}, transposed {transposed}, {rows} rows"
            );
            if squash {
                let pre = values(composed(&layer, x, false));
                assert!(fused.iter().zip(&pre).all(|(&y, &h)| y == tanh_f32(h)));
            }
        }
    }

    #[test]
    fn layer_gradients_with_helpers_give_the_same_bits() {
        // KDDCUP99's last decoder layer (60 → 118, tanh, a batch of 1024): with helpers the
        // tanh gradient is split by rows, and the weight gradient runs on a helper while this
        // thread forms the input gradient and the bias sums.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (rows, inputs, columns) = (1024, 60, 118);
        let mut matrix = |shape: [usize; 2], squash: bool| {
            let values: Vec<f32> = (0..shape[0] * shape[1])
                .map(|_| rng.random_range(-1.0f32..1.0))
                .map(|v| if squash { v.tanh() } else { v })
                .collect();
            FlexTensor::from_data(TensorData::new(values, shape))
        };
        let grad = matrix([rows, columns], false);
        let output = matrix([rows, columns], true);
        let x = LayerInput::Dense(matrix([rows, inputs], false));
        let params = matrix([inputs + 1, columns], false);
        let gradients = || {
            layer_gradients_f32(&grad, Some(&output), Some(&x), Some(&params))
                .expect("f32 matrices")
                .map(|gradient| f32_values(&gradient.expect("each gradient")).into_owned())
        };
        let whole = gradients();
        assert_eq!(
            whole.each_ref().map(|g| g.len()),
            [rows * inputs, (inputs + 1) * columns]
        );
        for helpers in [1, 3] {
            let _lent = helper_threads::lend_unpinned(helpers);
            assert!(helper_threads::chunks_worth(rows * columns) > 1, "split");
            // Compared whole: a mismatch would print thousand-value buffers.
            assert!(gradients() == whole, "{helpers} helpers");
        }
    }

    /// An m × k left operand, a k × n right one and a bias of n, drawn in that order.
    fn random_operands(
        rng: &mut ChaCha8Rng,
        m: usize,
        k: usize,
        n: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let a = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let b = (0..k * n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let bias = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        (a, b, bias)
    }

    /// `a` as an m × k matrix, read in place: row-major, or the transpose of a k × m one.
    fn left_operand(a: &[f32], m: usize, k: usize, transposed: bool) -> Matrix<'_> {
        match transposed {
            true => Matrix::row_major(a, k, m).transposed(),
            false => Matrix::row_major(a, m, k),
        }
    }

    #[test]
    fn chained_products_are_gemms_bit_for_bit() {
        // (m, k, n, lhs stored transposed, rhs stored transposed): the network's forward
        // products, input and weight gradients and Gram products, widths around the kernel's
        // vectors and groups, inner dimensions of one and two of gemm's blocks, single output
        // columns (gemm's path by rows, which is the kernel's sum for inner dimensions shorter
        // than gemm's vectors), inner dimensions of one and two (summed apart as gemm sums
        // them), and shapes gemm takes other paths for (which stay gemm's).
        let shapes = [
            (1024, 60, 30, false, false),
            (1024, 30, 10, false, false),
            (1024, 10, 30, false, false),
            (1024, 30, 60, false, false),
            (1024, 60, 60, false, false),
            (1023, 30, 60, false, true),
            (1024, 4, 10, false, true),
            (60, 1024, 30, true, false),
            (30, 1024, 60, true, false),
            (10, 1024, 30, true, false),
            (60, 1023, 60, true, false),
            (60, 120, 60, false, true),
            (60, 60, 120, false, false),
            (50, 40, 130, false, false),
            (17, 3, 17, false, false),
            (33, 7, 33, true, true),
            (7, 600, 64, true, false),
            (64, 1030, 64, false, false),
            (300, 512, 2, false, false),
            (65, 513, 5, false, false),
            (2, 700, 129, false, false),
            (16, 5, 16, false, false),
            (16, 5, 16, false, true),
            (3, 1024, 10, true, false),
            (10, 1024, 4, true, false),
            (10, 1024, 1, true, false),
            (100, 2, 40, false, false),
            (1024, 10, 1, false, false),
            (1024, 10, 1, false, true),
            (1024, 5, 1, false, false),
            (300, 7, 1, false, true),
            (256, 10, 1, false, false),
            (1024, 20, 1, false, false),
            (1024, 10, 1, true, false),
            (1024, 1, 10, false, false),
            (1024, 1, 10, false, true),
            (1024, 1, 10, true, false),
            (1024, 2, 10, true, true),
            (10, 1, 10, false, false),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut chained = 0;
        for (m, k, n, lhs_transposed, rhs_transposed) in shapes {
            let (a, b, bias) = random_operands(&mut rng, m, k, n);
            let lhs = left_operand(&a, m, k, lhs_transposed);
            let rhs = match rhs_transposed {
                true => Matrix::row_major(&b, n, k).transposed(),
                false => Matrix::row_major(&b, k, n),
            };
            chained += usize::from(chained_product::gemm_block(&lhs, &rhs).is_some());
            for (with_bias, squash) in [(false, false), (true, false), (true, true)] {
                let bias = with_bias.then_some(bias.as_slice());
                // Without AVX2 the products are gemm's own (whose kernels are chosen apart).
                let by_gemm = Isa::Portable.capped(|| product(&lhs, &rhs, bias, squash));
                for isa in Isa::available()
                    .into_iter()
                    .filter(|&isa| isa > Isa::Portable)
                {
                    let ours = isa.capped(|| product(&lhs, &rhs, bias, squash));
                    assert!(
                        same_bits(&ours, &by_gemm),
                        "{m}×{k}×{n} on {isa:?} (lhs transposed {lhs_transposed}, rhs \
                         transposed {rhs_transposed}, bias {with_bias}, tanh {squash})"
                    );
                }
            }
        }
        // gemm's single-column path is a plain chain for k = 10 only with AVX-512's vectors.
        let single_columns = if chained_product::gemm_f32_lanes() > 10 {
            4
        } else {
            2
        };
        assert_eq!(
            chained,
            shapes.len() - 5 - 7 - 5 + single_columns,
            "shapes the chained kernel takes"
        );
    }

    #[test]
    fn products_split_over_helpers_give_the_same_bits() {
        // (m, k, n, lhs stored transposed): the network's forward products and gradients, a
        // weight gradient whose inner dimension spans two of gemm's blocks, products near
        // gemm's path boundaries, and ones too small to split.
        let shapes = [
            (1024, 60, 118, false),
            (1023, 30, 60, false),
            (1024, 10, 30, false),
            (60, 1023, 118, true),
            (30, 1024, 60, true),
            (100, 1024, 30, true),
            (130, 700, 64, false),
            (17, 300, 64, false),
            (300, 2, 300, false),
            (1000, 16, 4, false),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut split_shapes = [0usize; 2];
        for (m, k, n, transposed) in shapes {
            let (a, b, bias) = random_operands(&mut rng, m, k, n);
            let lhs = left_operand(&a, m, k, transposed);
            let rhs = Matrix::row_major(&b, k, n);
            for (with_bias, squash) in [(false, false), (true, false), (true, true)] {
                let bias = with_bias.then_some(bias.as_slice());
                let alone = product(&lhs, &rhs, bias, squash);
                for (slot, helpers) in [1, 3].into_iter().enumerate() {
                    let _lent = helper_threads::lend_unpinned(helpers);
                    split_shapes[slot] +=
                        usize::from(split_rows(m, k, n, CHUNKS_PER_THREAD * (helpers + 1)) > 1);
                    let split = product(&lhs, &rhs, bias, squash);
                    assert!(
                        same_bits(&alone, &split),
                        "{m}×{k}×{n} (transposed {transposed}, bias {with_bias}, tanh {squash}) \
                         over {} threads",
                        helpers + 1
                    );
                }
            }
        }
        // Five shapes are split (the network's products and gradients); the others stay whole,
        // two of them because their chunks would take gemm's other block length.
        assert_eq!(split_shapes, [5 * 3; 2]);
        assert_eq!(split_rows(100, 1024, 30, 2), 1);
        assert_eq!(split_rows(130, 700, 64, 2), 1);
        assert_eq!(split_rows(1000, 16, 4, 4), 1, "too small to hand over");
    }

    #[test]
    fn gradients_are_the_composed_operations_bit_for_bit() {
        let device = Device::flex().autodiff();
        for (transposed, squash, rows) in cases() {
            let gradients = |fused: bool| {
                let (layer, x) = layer_and_input(&device, transposed, rows);
                let x = x.require_grad();
                let y = fused_or_composed(&layer, x.clone(), squash, fused);
                let grads = weighted_total(y).backward();
                // The composed layer's weight and bias are slices of the parameters, whose
                // gradients burn puts back in their places.
                let (weight, bias) = Layer::split(layer.params.val().grad(&grads).unwrap());
                [
                    values(x.grad(&grads).unwrap()),
                    values(weight),
                    values(bias.unsqueeze::<2>()),
                ]
            };
            let [fused, want] = [gradients(true), gradients(false)];
            for (name, (f, w)) in ["x", "weight", "bias"].iter().zip(fused.iter().zip(&want)) {
                assert_eq!(
                    f, w,
                    "gradient of {name}, squash {squash}, transposed {transposed}, {rows} rows"
                );
                assert!(
                    f.iter().any(|&g| g != 0.0),
                    "gradient of {name} is all zeros"
                );
            }
        }
    }

    #[test]
    fn a_mostly_zero_input_goes_through_its_nonzeros_to_the_same_values_and_gradients() {
        let device = Device::flex().autodiff();
        for squash in [false, true] {
            let (layer, _) = layer_and_input(&device, false, 40);
            // One nonzero per row (a seventh of the entries), the first row all zeros.
            let xs: Vec<f32> = (0..40 * 7)
                .map(|i| {
                    let (row, column) = (i / 7, i % 7);
                    if row > 0 && column == row % 7 {
                        (row as f32 * 0.71).sin() * 4.0
                    } else {
                        0.0
                    }
                })
                .collect();
            assert!(
                sparse_layer(
                    &FlexTensor::from_data(TensorData::new(xs.clone(), [40, 7])),
                    &FlexTensor::from_data(layer.params.val().to_data()),
                    squash
                )
                .is_some(),
                "the input is sparse enough"
            );
            let x = Tensor::<2>::from_data(TensorData::new(xs, [40, 7]), &device);
            let run = |fused: bool| {
                let y = fused_or_composed(&layer, x.clone(), squash, fused);
                let grads = weighted_total(y.clone()).backward();
                [values(y), values(layer.params.val().grad(&grads).unwrap())]
            };
            let [sparse, want] = [run(true), run(false)];
            for (name, (s, w)) in ["values", "parameters"]
                .iter()
                .zip(sparse.iter().zip(&want))
            {
                assert_eq!(s.len(), w.len());
                assert!(w.iter().any(|&v| v != 0.0), "{name} all zeros");
                for (a, b) in s.iter().zip(w) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{name}, squash {squash}: {a} against {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_prepared_input_is_taken_once_and_only_for_its_own_values() {
        let device = Device::flex().autodiff();
        let (layer, _) = layer_and_input(&device, false, 40);
        let mostly_zeros = |scale: f32| -> Vec<f32> {
            (0..40 * 7)
                .map(|i| match i % 9 {
                    0 => (i as f32 * 0.37).sin() * scale,
                    _ => 0.0,
                })
                .collect()
        };
        let xs = mostly_zeros(1.0);
        let key = prepared_input::Key::of(&xs, 7);
        let x = Tensor::<2>::from_data(TensorData::new(xs, [40, 7]), &device);
        let forward = || values(dense(&layer, x.clone(), true));
        let own = forward();
        // Nonzeros of other values, prepared for these: the layer takes them (which shows a
        // tensor keeps the buffer it was given, as training's batches rely on) and only once.
        let doubled = SparseRows::compress(&mostly_zeros(2.0), 7).expect("sparse enough");
        let [first, second] =
            prepared_input::with(key, Some(doubled.clone()), false, || [forward(), forward()]);
        assert_ne!(first, own, "the prepared rows were not taken");
        assert_eq!(second, own, "taken twice");
        assert_eq!(forward(), own, "left behind");
        let elsewhere = prepared_input::Key::of(&[0.0; 280], 7);
        let taken = prepared_input::with(elsewhere, Some(doubled), false, forward);
        assert_eq!(taken, own, "taken for other values");
        // Prepared as too dense to keep sparse: the dense product, the same values up to the
        // order of the sums.
        let dense_path = prepared_input::with(key, None, false, forward);
        assert!(
            dense_path
                .iter()
                .zip(&own)
                .all(|(a, b)| (a - b).abs() <= 1e-5)
        );
    }

    #[test]
    fn a_stand_in_gives_what_the_rows_it_stands_for_give() {
        let device = Device::flex().autodiff();
        let (layer, _) = layer_and_input(&device, false, 40);
        let xs: Vec<f32> = (0..40 * 7)
            .map(|i| match i % 9 {
                0 => (i as f32 * 0.37).sin(),
                _ => 0.0,
            })
            .collect();
        let rows = SparseRows::compress(&xs, 7).expect("sparse enough");
        let key = prepared_input::Key::of(&xs, 7);
        let x = Tensor::<2>::from_data(TensorData::new(xs, [40, 7]), &device);
        let zeros = vec![0f32; 40 * 7];
        let stand_in_key = prepared_input::Key::of(&zeros, 7);
        let stand_in = Tensor::<2>::from_data(TensorData::new(zeros, [40, 7]), &device);
        // Through the nonzeros: the same bits as with the rows themselves.
        let run = |layer: &Layer, x: &Tensor<2>| values(dense(layer, x.clone(), true));
        let expected = prepared_input::with(key, Some(rows.clone()), false, || run(&layer, &x));
        let through_nonzeros = prepared_input::with(stand_in_key, Some(rows.clone()), true, || {
            run(&layer, &stand_in)
        });
        assert_eq!(through_nonzeros, expected);
        // A layer that needs no gradient reads x itself: the rows made dense again.
        let frozen = burn::module::Module::no_grad(layer.clone());
        let own = run(&frozen, &x);
        let read = prepared_input::with(stand_in_key, Some(rows), true, || run(&frozen, &stand_in));
        assert_eq!(read, own);
        // Outside `with` it is only zeros again.
        assert_ne!(run(&frozen, &stand_in), own);
    }

    #[test]
    fn column_sums_add_each_column_down_the_rows_in_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // Narrow layers, one register's width and one more, four registers (the widest
        // chains), and KDDCUP99's 118; magnitudes spread so another order rounds differently.
        for columns in [1, 5, 16, 17, 64, 118, 128, 130, 300] {
            let rows = 37;
            let values: Vec<f32> = (0..rows * columns)
                .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..4)))
                .collect();
            let want: Vec<f32> = (0..columns)
                .map(|c| (0..rows).fold(0f32, |sum, r| sum + values[r * columns + c]))
                .collect();
            let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&column_sums(&values, columns)),
                bits(&want),
                "{columns} columns"
            );
            #[cfg(target_arch = "x86_64")]
            if Isa::Avx512.supported() {
                // SAFETY: the CPU has AVX-512F, checked just above.
                let sums = unsafe { column_sums_avx512(&values, columns) };
                assert_eq!(bits(&sums), bits(&want), "{columns} columns, AVX-512");
            }
            #[cfg(target_arch = "x86_64")]
            if Isa::Avx2.supported() {
                // SAFETY: the CPU has AVX2, checked just above.
                let sums = unsafe { column_sums_avx2(&values, columns) };
                assert_eq!(bits(&sums), bits(&want), "{columns} columns, AVX2");
            }
            let reversed: Vec<f32> = (0..columns)
                .map(|c| {
                    (0..rows)
                        .rev()
                        .fold(0f32, |sum, r| sum + values[r * columns + c])
                })
                .collect();
            assert_ne!(want, reversed, "{columns} columns: the order must matter");
        }
        assert!(column_sums(&[], 0).is_empty());
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx512.supported() {
            // SAFETY: the CPU has AVX-512F, checked just above.
            assert!(unsafe { column_sums_avx512(&[], 0) }.is_empty());
        }
    }

    #[test]
    fn zero_rows_give_empty_values_and_zero_gradients() {
        let device = Device::flex().autodiff();
        let (layer, _) = layer_and_input(&device, false, 1);
        let x = Tensor::<2>::from_data(TensorData::new(Vec::<f32>::new(), [0, 7]), &device)
            .require_grad();
        let y = dense(&layer, x.clone(), true);
        assert_eq!(y.dims(), [0, 5]);
        let grads = y.sum().backward();
        assert_eq!(x.grad(&grads).unwrap().dims(), [0, 7]);
        let params_grad = values(layer.params.val().grad(&grads).unwrap());
        assert_eq!(params_grad.len(), (7 + 1) * 5);
        assert!(params_grad.iter().all(|&g| g == 0.0));
    }
}
