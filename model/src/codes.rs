//! The code the mixture sees, z = [z_c, relative distance, cosine], recorded as one autodiff
//! step.
//!
//! Built from burn's operations it was a slice of the reconstruction terms and a join with the
//! latent code, and in the backward pass the join's two slices and the slice's zeros and
//! assignment, each recorded and run on its own, and flex copying value by value through
//! strided indices: about 70 µs of a 1.6 ms KDDCUP99 step while the fit's helper waited. Here
//! one step copies rows of f32 as slices (other types through the same flex operations); the
//! values are copies either way, so the bits are the same.

use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{Slice, Tensor, TensorData};

use crate::reconstruction::{COSINE, RELATIVE_DISTANCE};
use crate::step_support::register_gradients;

#[backend_extension(Flex, Autodiff)]
pub trait CodesBackend: Backend {
    /// `[n, latent + 2]`: each row of the latent code `[n, latent]` followed by its relative
    /// distance and cosine from the reconstruction terms `[n, 3]`.
    fn codes(latent: FloatTensor<Self>, terms: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// z = [z_c, relative distance, cosine], `[n, latent + 2]`.
pub fn codes(latent: Tensor<2>, terms: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as CodesBackend>::codes(
        latent.into_dispatch(),
        terms.into_dispatch(),
    ))
}

/// The columns of the terms that join the latent code.
const FEATURES: Range<usize> = RELATIVE_DISTANCE..COSINE + 1;

/// The slices of rows `0..rows` and columns `columns`.
fn columns_of(rows: usize, columns: Range<usize>) -> [Slice; 2] {
    [Slice::from(0..rows), Slice::from(columns)]
}

impl CodesBackend for Flex {
    fn codes(latent: FlexTensor, terms: FlexTensor) -> FlexTensor {
        let [rows, width] = latent.shape().dims();
        if let (Some(latent), Some(terms)) = (f32_rows(&latent), f32_rows(&terms)) {
            // flex's join copies value by value through strided indices; rows of a few values
            // copy far faster as slices.
            let mut z = Vec::with_capacity(rows * (width + 2));
            for (latent, terms) in latent.chunks_exact(width).zip(terms.chunks_exact(3)) {
                z.extend_from_slice(latent);
                z.extend_from_slice(&terms[FEATURES]);
            }
            return FlexTensor::from_data(TensorData::new(z, [rows, width + 2]));
        }
        let features = Flex::float_slice(terms, &columns_of(rows, FEATURES));
        Flex::float_cat(vec![latent, features], 1)
    }
}

/// The values of a contiguous f32 matrix with at least one column.
fn f32_rows(tensor: &FlexTensor) -> Option<&[f32]> {
    let shape = tensor.shape();
    (shape.num_dims() == 2 && shape[1] > 0)
        .then(|| tensor.as_slice::<f32>())
        .flatten()
}

/// The latent code's and the terms' gradients from z's, `grad` being f32 `[rows, latent + 2]`.
fn gradients_f32(grad: &[f32], latent: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = grad.len() / (latent + 2);
    let mut latent_bar = Vec::with_capacity(rows * latent);
    let mut terms_bar = Vec::with_capacity(rows * 3);
    for row in grad.chunks_exact(latent + 2) {
        latent_bar.extend_from_slice(&row[..latent]);
        let mut terms = [0.0; 3];
        terms[FEATURES].copy_from_slice(&row[latent..]);
        terms_bar.extend_from_slice(&terms);
    }
    (latent_bar, terms_bar)
}

#[derive(Debug)]
struct CodesStep;

impl Backward<Flex, 2> for CodesStep {
    /// The latent code's width and the terms' shape `[n, 3]`.
    type State = (usize, [usize; 2]);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (latent, [rows, terms]) = ops.state;
        if let Some(values) = f32_rows(&grad).filter(|_| terms == 3) {
            let (latent_bar, terms_bar) = gradients_f32(values, latent);
            let tensor =
                |values, shape: [usize; 2]| FlexTensor::from_data(TensorData::new(values, shape));
            register_gradients(
                grads,
                ops.parents.map(|p| p.map(|node| node.id)),
                [
                    tensor(latent_bar, [rows, latent]),
                    tensor(terms_bar, [rows, 3]),
                ],
            );
            return;
        }
        // As burn's autodiff forms them: the join's gradient split into its inputs' columns,
        // and the slice's put back among zeros.
        let latent_bar = Flex::float_slice(grad.clone(), &columns_of(rows, 0..latent));
        let features_bar = Flex::float_slice(grad, &columns_of(rows, latent..latent + 2));
        let zeros = Flex::float_zeros(
            [rows, terms].into(),
            &features_bar.device(),
            features_bar.dtype().into(),
        );
        let terms_bar = Flex::float_slice_assign(zeros, &columns_of(rows, FEATURES), features_bar);
        register_gradients(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [latent_bar, terms_bar],
        );
    }
}

impl<C: CheckpointStrategy> CodesBackend for Autodiff<Flex, C> {
    fn codes(latent: FloatTensor<Self>, terms: FloatTensor<Self>) -> FloatTensor<Self> {
        match CodesStep
            .prepare::<C>([latent.node(), terms.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (latent, terms) = (latent.into_primitive(), terms.into_primitive());
                let state = (latent.shape()[1], terms.shape().dims());
                prep.finish(state, Flex::codes(latent, terms))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::codes(latent.into_primitive(), terms.into_primitive()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::leaf;
    use burn::tensor::{DType, Device};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// z and the gradients of a weighted sum of it (and of the squared error, as the loss
    /// reads it) with respect to the latent code and the terms, as bits.
    fn codes_and_gradients(fused: bool, dtype: DType, latent: usize) -> [Vec<u64>; 3] {
        let rows = 37;
        let mut rng = ChaCha8Rng::seed_from_u64(latent as u64);
        let mut draw = |count: usize| -> Vec<f64> {
            (0..count).map(|_| rng.random_range(-2.0..2.0)).collect()
        };
        let device = Device::flex().autodiff();
        let z_c = leaf(draw(rows * latent), [rows, latent], dtype, &device);
        let terms = leaf(draw(rows * 3), [rows, 3], dtype, &device);
        let weights = Tensor::<2>::from_data(
            TensorData::new(draw(rows * (latent + 2)), [rows, latent + 2]),
            &device,
        )
        .cast(dtype);
        let z = if fused {
            codes(z_c.clone(), terms.clone())
        } else {
            let features = terms.clone().slice([0..rows, FEATURES]);
            Tensor::cat(vec![z_c.clone(), features], 1)
        };
        let squared_error = terms.clone().slice([0..rows, 2..3]);
        let loss = (z.clone() * weights).sum() + squared_error.mean();
        let grads = loss.backward();
        let bits = |t: Tensor<2>| -> Vec<u64> {
            let values = t
                .into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .unwrap();
            values.iter().map(|v| v.to_bits()).collect()
        };
        [
            bits(z),
            bits(z_c.grad(&grads).unwrap()),
            bits(terms.grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn gives_the_slice_and_join_of_burns_operations_bit_for_bit() {
        for dtype in [DType::F32, DType::F64] {
            for latent in [1, 3] {
                let fused = codes_and_gradients(true, dtype, latent);
                assert_eq!(
                    fused,
                    codes_and_gradients(false, dtype, latent),
                    "{dtype:?}"
                );
                assert!(
                    fused[2].iter().all(|&b| b != 0),
                    "every term has a gradient"
                );
            }
        }
    }
}
