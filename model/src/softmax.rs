//! The estimation network's softmax over each row, recorded as a single autodiff step.
//!
//! burn's softmax is a chain of five tensor operations (the row maxima, the shift, exp, the row
//! sums, the division), and its gradient another eight; each is recorded and differentiated on
//! its own. On KDDCUP99's `[1024, 4]` memberships that bookkeeping, not the arithmetic, took
//! about 60 µs of a 1.7 ms training step, with the fit's helper idle. Here both directions call
//! the same flex operations on the same values in the same order, so the bits are burn's.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::Tensor;

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

impl SoftmaxBackend for Flex {
    fn softmax_rows(logits: FlexTensor) -> FlexTensor {
        forward(logits).0
    }
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

impl Backward<Flex, 1> for SoftmaxStep {
    /// exp of the shifted logits and their row sums.
    type State = (FlexTensor, FlexTensor);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (exp, sum) = ops.state;
        let logits_bar = backward(grad, exp, sum);
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
                let (softmax, exp, sum) = forward(logits.into_primitive());
                prep.finish((exp, sum), softmax)
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
                assert_eq!(
                    softmax_and_gradient(true, dtype, rows, columns),
                    softmax_and_gradient(false, dtype, rows, columns),
                    "{dtype:?} [{rows}, {columns}]"
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
