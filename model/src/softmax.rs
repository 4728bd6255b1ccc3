//! The estimation network's softmax over each row, recorded as a single autodiff step.
//!
//! burn's softmax is a chain of five tensor operations (the row maxima, the shift, exp, the row
//! sums, the division), and its gradient another eight; each is recorded and differentiated on
//! its own, on the fit's thread alone. On KDDCUP99's `[1024, 4]` memberships that took about
//! 60 µs of a 1.7 ms training step, most of it the exponentials, with the fit's helper idle.
//! Here both directions perform burn's operations on each value in burn's order, so the bits
//! are burn's: for f32 rows narrower than a vector of lanes (flex then sums a row in order, as
//! here) in loops over rows that the fit's helpers share; otherwise through the same flex
//! operations in one step.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};

use crate::dense::f32_values;
use crate::helper_threads;
use crate::scorer::Isa;
use crate::step_support::register_gradients;

#[backend_extension(Flex, Autodiff)]
pub trait SoftmaxBackend: Backend {
    /// exp(x − max) / Σ exp(x − max) along the last dimension of `[rows, columns]` logits.
    fn softmax_rows(logits: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Each row of `logits` through softmax: burn's `softmax(logits, 1)` in one step.
pub fn softmax_rows(logits: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as SoftmaxBackend>::softmax_rows(
        logits.into_dispatch(),
    ))
}

/// The forward pass with what the backward pass needs: (softmax, exp of the shifted logits,
/// their row sums).
fn forward(logits: FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
    // burn's ActivationOps::softmax, operation for operation (the maxima are detached).
    let max = Flex::float_max_dim(logits.clone(), 1);
    let shifted = Flex::float_sub(logits, max);
    let exp = Flex::float_exp(shifted);
    let sum = Flex::float_sum_dim(exp.clone(), 1);
    let softmax = Flex::float_div(exp.clone(), sum.clone());
    (softmax, exp, sum)
}

/// The softmax, with what the backward pass needs from it.
fn forward_kept(logits: FlexTensor) -> (FlexTensor, Kept) {
    match narrow_f32_rows(&logits) {
        Some((rows, columns)) => {
            let exp_and_sums = exp_and_sums_f32(&f32_values(&logits), rows, columns);
            let softmax = softmax_f32(&exp_and_sums, rows, columns);
            (softmax, Kept::Narrow(Arc::new(exp_and_sums), rows, columns))
        }
        None => {
            let (softmax, exp, sum) = forward(logits);
            (softmax, Kept::Tensors(Box::new((exp, sum))))
        }
    }
}

impl SoftmaxBackend for Flex {
    fn softmax_rows(logits: FlexTensor) -> FlexTensor {
        forward_kept(logits).0
    }
}

/// Rows below this width are summed in order by flex (its vector loop takes whole vectors of
/// eight lanes, sixteen with AVX-512, and adds the rest one by one), so the loops here can
/// sum them the same way.
const NARROW_ROW: usize = 8;

/// `[rows, columns]` of an f32 matrix whose rows the f32 loops handle with burn's bits.
fn narrow_f32_rows(tensor: &FlexTensor) -> Option<(usize, usize)> {
    let shape = tensor.shape();
    let narrow = tensor.dtype() == DType::F32
        && shape.num_dims() == 2
        && (1..NARROW_ROW).contains(&shape[1])
        && Isa::Avx2.supported();
    narrow.then(|| (shape[0], shape[1]))
}

/// flex's sum of a short row: its vector loop adds nothing to a zero vector, whose lanes it
/// adds up (+0), then the row's values one by one.
#[inline(always)]
fn row_sum(values: impl Iterator<Item = f32>) -> f32 {
    0.0 + values.sum::<f32>()
}

/// Each row's exp(x − max) followed by their sum: `[rows, columns + 1]`.
fn exp_and_sums_f32(logits: &[f32], rows: usize, columns: usize) -> Vec<f32> {
    let rows_of = |range: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        let logits = &logits[range.start * columns..range.end * columns];
        for (row, out) in logits
            .chunks_exact(columns)
            .zip(out.chunks_exact_mut(columns + 1))
        {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for (out, &x) in out.iter_mut().zip(row) {
                out.write((x - max).exp());
            }
            // SAFETY: the row's first `columns` values were just written.
            let exp = unsafe { out[..columns].assume_init_ref() };
            let sum = row_sum(exp.iter().copied());
            out[columns].write(sum);
        }
    };
    // SAFETY: each row's columns + 1 values are written.
    unsafe { helper_threads::rows_written_in_chunks(rows, columns + 1, 16 * columns, &rows_of) }
}

/// exp / sum, row by row, from [`exp_and_sums_f32`].
fn softmax_f32(exp_and_sums: &[f32], rows: usize, columns: usize) -> FlexTensor {
    let rows_of = |range: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        let packed = &exp_and_sums[range.start * (columns + 1)..range.end * (columns + 1)];
        for (row, out) in packed
            .chunks_exact(columns + 1)
            .zip(out.chunks_exact_mut(columns))
        {
            let sum = row[columns];
            for (out, &e) in out.iter_mut().zip(row) {
                out.write(e / sum);
            }
        }
    };
    // SAFETY: each row's columns values are written.
    let values =
        unsafe { helper_threads::rows_written_in_chunks(rows, columns, columns, &rows_of) };
    FlexTensor::from_data(TensorData::new(values, [rows, columns]))
}

/// [`backward`] row by row from [`exp_and_sums_f32`], each value through the same operations.
fn backward_f32(grad: &[f32], exp_and_sums: &[f32], rows: usize, columns: usize) -> FlexTensor {
    let rows_of = |range: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        let packed = &exp_and_sums[range.start * (columns + 1)..range.end * (columns + 1)];
        let grad = &grad[range.start * columns..range.end * columns];
        for ((row, grad), out) in packed
            .chunks_exact(columns + 1)
            .zip(grad.chunks_exact(columns))
            .zip(out.chunks_exact_mut(columns))
        {
            let (exp, sum) = (&row[..columns], row[columns]);
            let recip = 1.0 / sum;
            let squared = sum * sum;
            let through_divisor = row_sum(grad.iter().zip(exp).map(|(&g, &e)| g * (-e / squared)));
            let through_sum = 1.0 * row_sum(std::iter::once(through_divisor));
            for ((out, &g), &e) in out.iter_mut().zip(grad).zip(exp) {
                out.write((through_sum + g * recip) * e);
            }
        }
    };
    // SAFETY: each row's columns values are written.
    let values =
        unsafe { helper_threads::rows_written_in_chunks(rows, columns, 8 * columns, &rows_of) };
    FlexTensor::from_data(TensorData::new(values, [rows, columns]))
}

/// The logits' gradient, as burn's autodiff forms it through the chain: the division's two
/// gradients (the divisor's summed back over the row), the row sum's spread back over the row,
/// their sum through exp, and the shift passing it on unchanged.
fn backward(grad: FlexTensor, exp: FlexTensor, sum: FlexTensor) -> FlexTensor {
    let shape = exp.shape();
    let through_numerator = Flex::float_mul(grad.clone(), Flex::float_recip(sum.clone()));
    let squared = Flex::float_mul(sum.clone(), sum);
    let quotient = Flex::float_div(Flex::float_neg(exp.clone()), squared);
    let through_divisor = Flex::float_sum_dim(Flex::float_mul(grad, quotient), 1);
    let ones = Flex::float_ones(shape, &exp.device(), exp.dtype().into());
    let through_sum = Flex::float_mul(ones, Flex::float_sum_dim(through_divisor, 1));
    // Added as burn's gradient registry adds the later one to the earlier.
    let through_exp = Flex::float_add(through_sum, through_numerator);
    Flex::float_mul(through_exp, exp)
}

#[derive(Debug)]
struct SoftmaxStep;

/// What the backward pass needs from the forward one.
#[derive(Debug, Clone)]
enum Kept {
    /// [`exp_and_sums_f32`] of narrow f32 rows, with their `[rows, columns]`.
    Narrow(Arc<Vec<f32>>, usize, usize),
    /// exp of the shifted logits and their row sums.
    Tensors(Box<(FlexTensor, FlexTensor)>),
}

impl Backward<Flex, 1> for SoftmaxStep {
    type State = Kept;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let logits_bar = match ops.state {
            // The gradient has the softmax's type, f32 here.
            Kept::Narrow(exp_and_sums, rows, columns) => {
                backward_f32(&f32_values(&grad), &exp_and_sums, rows, columns)
            }
            Kept::Tensors(kept) => {
                let (exp, sum) = *kept;
                backward(grad, exp, sum)
            }
        };
        register_gradients(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [logits_bar],
        );
    }
}

impl<C: CheckpointStrategy> SoftmaxBackend for Autodiff<Flex, C> {
    fn softmax_rows(logits: FloatTensor<Self>) -> FloatTensor<Self> {
        match SoftmaxStep
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (softmax, kept) = forward_kept(logits.into_primitive());
                prep.finish(kept, softmax)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::softmax_rows(logits.into_primitive())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::leaf;
    use burn::tensor::activation::softmax;
    use burn::tensor::{DType, Device, TensorData};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The softmax of random logits and the gradient of a weighted sum of it, as bits.
    fn softmax_and_gradient(
        fused: bool,
        dtype: DType,
        rows: usize,
        columns: usize,
    ) -> [Vec<u64>; 2] {
        let mut rng = ChaCha8Rng::seed_from_u64(rows as u64 * 31 + columns as u64);
        let mut draw = |count: usize, spread: f64| -> Vec<f64> {
            (0..count)
                .map(|_| rng.random_range(-spread..spread))
                .collect()
        };
        let device = Device::flex().autodiff();
        // Wide logits, so that some rows' exponents underflow to zero but for their maximum.
        let logits = leaf(draw(rows * columns, 60.0), [rows, columns], dtype, &device);
        let weights = Tensor::<2>::from_data(
            TensorData::new(draw(rows * columns, 2.0), [rows, columns]),
            &device,
        )
        .cast(dtype);
        let gamma = if fused {
            softmax_rows(logits.clone())
        } else {
            softmax(logits.clone(), 1)
        };
        let grads = (gamma.clone() * weights).sum().backward();
        let bits = |t: Tensor<2>| -> Vec<u64> {
            let values = t
                .into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .unwrap();
            values.iter().map(|v| v.to_bits()).collect()
        };
        [bits(gamma), bits(logits.grad(&grads).unwrap())]
    }

    #[test]
    fn gives_burns_softmax_and_gradient_bit_for_bit() {
        for dtype in [DType::F32, DType::F64] {
            // KDDCUP99's memberships, the two-component presets', and rows wider than a
            // vector of lanes.
            for (rows, columns) in [(1024, 4), (37, 2), (20, 19), (5, 1)] {
                let composed = softmax_and_gradient(false, dtype, rows, columns);
                assert_eq!(
                    softmax_and_gradient(true, dtype, rows, columns),
                    composed,
                    "{dtype:?} [{rows}, {columns}]"
                );
                // Rows split over a helper give the same.
                let _lent = helper_threads::lend_unpinned(1);
                assert_eq!(
                    softmax_and_gradient(true, dtype, rows, columns),
                    composed,
                    "{dtype:?} [{rows}, {columns}], split"
                );
            }
        }
    }

    #[test]
    fn rows_sum_to_one_and_untracked_logits_give_the_same_values() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, -3.0, 100.0, 100.0], [2, 3]),
            &device,
        );
        let gamma = softmax_rows(logits.clone());
        let values = gamma.clone().into_data().try_into_vec::<f32>().unwrap();
        for row in values.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
        }
        assert!(values[3] < 1e-40 && (values[4] - 0.5).abs() < 1e-7);
        assert_eq!(
            values,
            softmax(logits, 1)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap()
        );
    }
}
