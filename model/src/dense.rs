//! One dense layer, x·W + b with an optional tanh, recorded as a single autodiff step.
//!
//! Built from burn's general operations, a tanh layer records a matrix product, a broadcast bias
//! add and the three operations of the tanh gradient trick, each with its own temporaries and
//! backward step; those took more of a training step than the matrix products. Here the forward
//! pass adds the bias and applies `tanh_f32` in one pass over the product, and the backward
//! pass forms g·(1 − y²) in one pass before burn's own linear-layer gradients. The values and
//! gradients are the bits the composed operations gave (a test compares them).

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::nn::Linear;
use burn::tensor::{DType, Tensor, TensorData};

use crate::network::tanh_f32;
use crate::scorer::Isa;

#[backend_extension(Flex, Autodiff)]
pub trait DenseBackend: Backend {
    /// x·W + b for x `[n, d_in]`, W `[d_in, d_out]`, b `[d_out]`; then tanh when `squash`.
    fn dense(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        squash: bool,
    ) -> FloatTensor<Self>;
}

/// `layer` applied to `x`, then tanh when `squash`.
pub fn dense(layer: &Linear, x: Tensor<2>, squash: bool) -> Tensor<2> {
    let [_, d_output] = layer.weight.dims();
    let bias = match &layer.bias {
        Some(bias) => bias.val(),
        None => Tensor::zeros([d_output], &x.device()),
    };
    Tensor::from_dispatch(<Dispatch as DenseBackend>::dense(
        x.into_dispatch(),
        layer.weight.val().into_dispatch(),
        bias.into_dispatch(),
        squash,
    ))
}

/// The contiguous f32 values of a flex tensor, borrowed when they already are.
fn f32_values(tensor: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match tensor.as_slice::<f32>() {
        Some(values) => std::borrow::Cow::Borrowed(values),
        None => std::borrow::Cow::Owned(
            tensor
                .to_contiguous()
                .as_slice::<f32>()
                .expect("a contiguous f32 tensor")
                .to_vec(),
        ),
    }
}

impl DenseBackend for Flex {
    fn dense(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, squash: bool) -> FlexTensor {
        if [&x, &weight, &bias].iter().any(|t| t.dtype() != DType::F32) {
            // Not our f32 training: burn's own operations.
            let output = Flex::linear(x, weight, Some(bias));
            return if squash {
                Flex::float_tanh(output)
            } else {
                output
            };
        }
        let mut product = Flex::float_matmul(x, weight);
        let bias = f32_values(&bias).into_owned();
        // Bias row by row, then tanh over the whole buffer: one long loop vectorises where
        // rows of 10 or 30 values leave mostly remainders.
        let finish = |values: &mut [f32]| {
            for row in values.chunks_exact_mut(bias.len()) {
                for (value, b) in row.iter_mut().zip(&bias) {
                    *value += b;
                }
            }
            if squash {
                tanh_in_place(values);
            }
        };
        let elements = product.shape().num_elements();
        if product.is_contiguous()
            && let Some(values) = product.try_storage_mut::<f32>()
            && values.len() == elements
        {
            finish(values);
            return product;
        }
        let mut values = f32_values(&product).into_owned();
        finish(&mut values);
        FlexTensor::from_data(TensorData::new(values, product.shape()))
    }
}

/// `tanh_f32` of every value, in place. The build's baseline is SSE2 (four lanes), so CPUs
/// with AVX-512 get their own copy of the loop; both give the same bits.
fn tanh_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512.supported() {
        // SAFETY: the CPU has AVX-512F, checked just above.
        unsafe { tanh_in_place_avx512(values) };
        return;
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

/// The autodiff step: remembers x and W (for the weight and input gradients) and, with tanh,
/// the output.
/// grad · (1 − y²): the gradient through tanh, given its output y.
fn tanh_backward(output: FlexTensor, grad: FlexTensor) -> FlexTensor {
    if output.dtype() != DType::F32 || grad.dtype() != DType::F32 {
        let slope = Flex::float_add_scalar(
            Flex::float_neg(Flex::float_mul(output.clone(), output)),
            1.0.into(),
        );
        return Flex::float_mul(grad, slope);
    }
    let shape = grad.shape();
    let values: Vec<f32> = f32_values(&output)
        .iter()
        .zip(f32_values(&grad).iter())
        // As the composed version computed it: g · ((−(y·y)) + 1).
        .map(|(&y, &g)| g * (-(y * y) + 1.0))
        .collect();
    FlexTensor::from_data(TensorData::new(values, shape))
}

#[derive(Debug)]
struct DenseStep;

impl Backward<Flex, 3> for DenseStep {
    /// (x, W, tanh output): x and W as checkpointed nodes, present only where a gradient needs
    /// them.
    type State = (Option<NodeId>, Option<NodeId>, Option<FlexTensor>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let (x, weight, squashed) = ops.state;
        let mut grad = grads.consume::<Flex>(&ops.node);
        if let Some(output) = squashed {
            grad = tanh_backward(output, grad);
        }
        if let Some(node) = node_x {
            let weight = checkpointer.retrieve_node_output(weight.expect("weight kept for dx"));
            grads.register::<Flex>(node.id, Flex::linear_x_backward(weight, grad.clone()));
        }
        if let Some(node) = node_weight {
            let x = checkpointer.retrieve_node_output(x.expect("input kept for dW"));
            grads.register::<Flex>(node.id, Flex::linear_weight_backward(x, grad.clone()));
        }
        if let Some(node) = node_bias {
            grads.register::<Flex>(node.id, Flex::linear_bias_backward(grad));
        }
    }
}

impl<C: CheckpointStrategy> DenseBackend for Autodiff<Flex, C> {
    fn dense(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        squash: bool,
    ) -> FloatTensor<Self> {
        let x_tracked = x.is_tracked();
        let weight_tracked = weight.is_tracked();
        match DenseStep
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = weight_tracked.then(|| prep.checkpoint(&x));
                let weight_state = x_tracked.then(|| prep.checkpoint(&weight));
                let output = Flex::dense(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                    squash,
                );
                let kept = squash.then(|| output.clone());
                prep.finish((x_state, weight_state, kept), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::dense(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                squash,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::network::{DagmmNet, NetworkWeights};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    /// The layer as burn's general operations build it: `Linear::forward`, then tanh as the
    /// constant values y plus (h − h̄)·(1 − y²), whose gradient is tanh's.
    fn composed(layer: &Linear, x: Tensor<2>, squash: bool) -> Tensor<2> {
        let h = layer.forward(x);
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

    fn layer_and_input(device: &Device, transposed: bool) -> (Linear, Tensor<2>) {
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
        let xs: Vec<f32> = (0..9 * 7).map(|_| rng.random_range(-6.0..6.0)).collect();
        let x = if transposed {
            Tensor::<2>::from_data(TensorData::new(xs, [7, 9]), device).transpose()
        } else {
            Tensor::<2>::from_data(TensorData::new(xs, [9, 7]), device)
        };
        (net.encoder[0].clone(), x)
    }

    #[test]
    fn values_are_the_composed_operations_bit_for_bit() {
        let device = Device::flex();
        for transposed in [false, true] {
            for squash in [false, true] {
                let (layer, x) = layer_and_input(&device, transposed);
                let fused = values(dense(&layer, x.clone(), squash));
                let want = values(composed(&layer, x.clone(), squash));
                assert_eq!(fused, want, "squash {squash}, transposed {transposed}");
                if squash {
                    let pre = values(layer.forward(x));
                    assert!(fused.iter().zip(&pre).all(|(&y, &h)| y == tanh_f32(h)));
                }
            }
        }
    }

    #[test]
    fn gradients_are_the_composed_operations_bit_for_bit() {
        let device = Device::flex().autodiff();
        for squash in [false, true] {
            let gradients = |fused: bool| {
                let (layer, x) = layer_and_input(&device, false);
                let x = x.require_grad();
                let y = if fused {
                    dense(&layer, x.clone(), squash)
                } else {
                    composed(&layer, x.clone(), squash)
                };
                // Weights per output so every gradient entry differs.
                let [n, d] = y.dims();
                let w: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
                let w = Tensor::<2>::from_data(TensorData::new(w, [n, d]), &device);
                let grads = (y * w).sum().backward();
                let bias = layer.bias.as_ref().unwrap().val();
                [
                    values(x.grad(&grads).unwrap()),
                    values(layer.weight.val().grad(&grads).unwrap()),
                    values(bias.grad(&grads).unwrap().reshape([1, d])),
                ]
            };
            let [fused, want] = [gradients(true), gradients(false)];
            for (name, (f, w)) in ["x", "weight", "bias"].iter().zip(fused.iter().zip(&want)) {
                assert_eq!(f, w, "gradient of {name}, squash {squash}");
                assert!(
                    f.iter().any(|&g| g != 0.0),
                    "gradient of {name} is all zeros"
                );
            }
        }
    }

    #[test]
    fn a_layer_without_bias_adds_nothing() {
        let device = Device::flex();
        let (mut layer, x) = layer_and_input(&device, false);
        let with_zero_bias = {
            let [_, d] = layer.weight.dims();
            let mut zeroed = layer.clone();
            zeroed.bias = Some(burn::module::Param::from_tensor(Tensor::zeros(
                [d],
                &device,
            )));
            values(dense(&zeroed, x.clone(), true))
        };
        layer.bias = None;
        assert_eq!(values(dense(&layer, x, true)), with_zero_bias);
    }
}
