//! Adam with each parameter's update in one pass over its values.
//!
//! burn's Adam updates a parameter tensor with thirteen tensor operations (the two moments, the
//! bias-corrected step, the subtraction), each a pass of its own with a fresh buffer; with the
//! twenty small parameter tensors of a DAGMM that took about 4 % of a KDDCUP99 training step.
//! This optimizer does the same arithmetic, in the same order and precision, element by element
//! in one loop. A test holds the parameters to burn's Adam bit for bit over 25 steps, which
//! the moments feed.

use std::collections::HashMap;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::LearningRate;
use burn::tensor::{DType, Gradients, Tensor};

use crate::scorer::Isa;

/// burn's Adam defaults, which training has always used.
const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

/// The scalars of one update, computed as burn's Adam computes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    /// Whether the moments start here (no state yet): they are then the gradient's terms alone.
    pub first: bool,
    pub beta_1: f32,
    pub beta_2: f32,
    /// √(1 − β2ᵗ) / (1 − β1ᵗ): both bias corrections in one factor on the first moment.
    pub combined_factor: f32,
    /// ε·√(1 − β2ᵗ), added to √v.
    pub scaled_epsilon: f32,
    pub learning_rate: f32,
}

impl AdamStep {
    /// The scalars of a parameter's `time`-th step (from 1).
    fn new(time: usize, learning_rate: LearningRate) -> Self {
        let first = time == 1;
        let time = time as i32;
        let bias_correction_2 = (1.0 - BETA_2.powi(time)).sqrt();
        Self {
            first,
            beta_1: BETA_1,
            beta_2: BETA_2,
            combined_factor: bias_correction_2 / (1.0 - BETA_1.powi(time)),
            scaled_epsilon: EPSILON * bias_correction_2,
            learning_rate: learning_rate as f32,
        }
    }
}

#[backend_extension(Flex)]
pub trait AdamBackend: Backend {
    /// One Adam update of `param` with `grad`: (new parameter, first moment, second moment).
    /// With `step.first` the moments passed in are ignored.
    fn adam_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `tensor` as a contiguous f32 buffer of its own, to update in place: itself where nobody else
/// holds its buffer, else a copy.
fn writable(tensor: FlexTensor) -> FlexTensor {
    let elements = tensor.shape().num_elements();
    let own = tensor.is_unique()
        && tensor.layout().contiguous_offsets() == Some((0, elements))
        && tensor.bytes().len() == elements * size_of::<f32>();
    if own {
        tensor
    } else {
        FlexTensor::from_data(tensor.into_data())
    }
}

impl AdamBackend for Flex {
    fn adam_update(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        step: AdamStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let grad = grad.to_contiguous();
        let grad = grad.as_slice::<f32>().expect("a contiguous f32 gradient");
        let mut param = writable(param);
        let (mut m1, mut m2) = if step.first {
            let zeros = || FlexTensor::zeros(param.shape(), DType::F32);
            (zeros(), zeros())
        } else {
            (writable(moment_1), writable(moment_2))
        };
        update(
            param.storage_mut::<f32>(),
            grad,
            m1.storage_mut::<f32>(),
            m2.storage_mut::<f32>(),
            &step,
        );
        (param, m1, m2)
    }
}

fn update(param: &mut [f32], grad: &[f32], m1: &mut [f32], m2: &mut [f32], step: &AdamStep) {
    #[cfg(target_arch = "x86_64")]
    match Isa::best(16) {
        // SAFETY (both): Isa::best only names instruction sets this CPU has.
        Isa::Avx512 => return unsafe { update_avx512(param, grad, m1, m2, step) },
        Isa::Avx2 => return unsafe { update_avx2(param, grad, m1, m2, step) },
        Isa::Portable => {}
    }
    update_lanes(param, grad, m1, m2, step)
}

/// [`update_lanes`] sixteen values at a time: square roots and divisions are correctly
/// rounded at every width and nothing is fused, so the bits are the scalar loop's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn update_avx512(param: &mut [f32], grad: &[f32], m1: &mut [f32], m2: &mut [f32], step: &AdamStep) {
    update_lanes(param, grad, m1, m2, step)
}

/// [`update_lanes`] eight values at a time, as [`update_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn update_avx2(param: &mut [f32], grad: &[f32], m1: &mut [f32], m2: &mut [f32], step: &AdamStep) {
    update_lanes(param, grad, m1, m2, step)
}

/// burn's Adam, element by element: each line is one of its tensor operations, in its order.
#[inline(always)]
fn update_lanes(param: &mut [f32], grad: &[f32], m1: &mut [f32], m2: &mut [f32], step: &AdamStep) {
    // One parameter's tensors, so one shape; a mismatch would silently skip values.
    assert!(grad.len() == param.len() && m1.len() == param.len() && m2.len() == param.len());
    let factor_1 = 1.0 - step.beta_1;
    let factor_2 = 1.0 - step.beta_2;
    for (((p, &g), m1), m2) in param.iter_mut().zip(grad).zip(m1).zip(m2) {
        if step.first {
            *m1 = g * factor_1;
            *m2 = (g * g) * factor_2;
        } else {
            *m1 = *m1 * step.beta_1 + g * factor_1;
            *m2 = *m2 * step.beta_2 + (g * g) * factor_2;
        }
        let change = (*m1 * step.combined_factor) / (m2.sqrt() + step.scaled_epsilon);
        *p -= change * step.learning_rate;
    }
}

/// Adam as training uses it: burn's defaults (β1 0.9, β2 0.999, ε 1e-5) on f32 parameters.
///
/// Its own loop over the module's parameters, not burn's `ModuleOptimizer`: that one collects
/// the gradients into a map of their own first, and for each parameter joins its path, boxes
/// and unboxes its state and looks up its group and rate, about 3 µs a parameter, which on
/// KDDCUP99's twenty came to twice the arithmetic (about 60 µs of a 1.7 ms step).
#[derive(Default)]
pub struct FusedAdam {
    /// Each parameter's steps so far (a parameter outside the loss, such as the estimation
    /// network's during warm-up, takes none), first and second moments.
    moments: HashMap<ParamId, (usize, FloatTensor<Dispatch>, FloatTensor<Dispatch>)>,
}

impl FusedAdam {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves each f32 parameter of `module` one step down its gradient in `grads` (taken out of
    /// it); parameters without a gradient stay as they are.
    pub fn step<M: Module>(
        &mut self,
        learning_rate: LearningRate,
        module: M,
        grads: &mut Gradients,
    ) -> M {
        module.map(&mut AdamMapper {
            adam: self,
            learning_rate,
            grads,
        })
    }
}

struct AdamMapper<'a> {
    adam: &'a mut FusedAdam,
    learning_rate: LearningRate,
    grads: &'a mut Gradients,
}

impl ModuleMapper for AdamMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = tensor
            .is_require_grad()
            .then(|| tensor.grad_remove(self.grads))
            .flatten();
        let Some(grad) = grad else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        assert!(
            tensor.dtype() == DType::F32 && grad.dtype() == DType::F32,
            "training's parameters and gradients are f32"
        );
        let grad = grad.into_dispatch();
        // The first step has no moments; the gradient stands in for them, unread.
        let (time, moment_1, moment_2) = match self.adam.moments.remove(&id) {
            Some((time, moment_1, moment_2)) => (time + 1, moment_1, moment_2),
            None => (1, grad.clone(), grad.clone()),
        };
        let step = AdamStep::new(time, self.learning_rate);
        let (value, moment_1, moment_2) = <Dispatch as AdamBackend>::adam_update(
            tensor.inner().into_dispatch(),
            grad,
            moment_1,
            moment_2,
            step,
        );
        self.adam.moments.insert(id, (time, moment_1, moment_2));
        let value = Tensor::from_inner(Tensor::from_dispatch(value)).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::tensor::{Device, TensorData};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::config::NetworkConfig;
    use crate::network::{DagmmNet, Layer, NetworkWeights};

    fn bits(layers: &[Layer]) -> Vec<u32> {
        layers
            .iter()
            .flat_map(|l| l.params.val().into_data().try_into_vec::<f32>().unwrap())
            .map(f32::to_bits)
            .collect()
    }

    /// A loss whose gradients differ from step to step, some of them exactly zero (a unit
    /// whose tanh is saturated gets none), which is where a sign of zero could differ.
    /// Gradients of a loss on random data; without `joint`, of the reconstruction alone, as in
    /// training's warm-up, so that the estimation network gets none.
    fn grads(net: &DagmmNet, rng: &mut ChaCha8Rng, device: &Device, joint: bool) -> Gradients {
        let [d, _] = net.encoder[0].dims();
        let x: Vec<f32> = (0..32 * d).map(|_| rng.random_range(-3.0..3.0)).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [32, d]), device);
        let out = net.forward(x, None);
        let loss = if joint {
            out.squared_error().mean() + out.gamma.powi_scalar(2).mean()
        } else {
            out.squared_error().mean()
        };
        loss.backward()
    }

    #[test]
    fn fused_adam_gives_burns_adam_bits_step_by_step() {
        let device = Device::flex().autodiff();
        let cfg = NetworkConfig {
            input_dim: 7,
            hidden: vec![5],
            latent_dim: 2,
            ..NetworkConfig::metrics4()
        };
        let weights = NetworkWeights::init(&cfg, &mut ChaCha8Rng::seed_from_u64(3));
        let mut ours = DagmmNet::from_weights(&weights, &device);
        let mut theirs = DagmmNet::from_weights(&weights, &device);
        let mut fused = FusedAdam::new();
        let mut reference = AdamConfig::new().init();
        let (mut rng_ours, mut rng_theirs) =
            (ChaCha8Rng::seed_from_u64(9), ChaCha8Rng::seed_from_u64(9));
        for step in 0..25 {
            // A large rate so that every step moves the weights visibly.
            let lr = if step < 10 { 1e-2 } else { 3e-3 };
            // Warm-up first: each parameter's steps are its own count.
            let joint = step >= 5;
            let mut g = grads(&ours, &mut rng_ours, &device, joint);
            ours = fused.step(lr, ours, &mut g);
            let g = grads(&theirs, &mut rng_theirs, &device, joint);
            let g = GradientsParams::from_grads(g, &theirs);
            theirs = reference.step(lr, theirs, g);
            for (a, b) in [
                (&ours.encoder, &theirs.encoder),
                (&ours.decoder, &theirs.decoder),
                (&ours.estimation, &theirs.estimation),
            ] {
                assert_eq!(bits(a), bits(b), "step {step}");
            }
        }
        assert_ne!(
            ours.weights(),
            DagmmNet::from_weights(&weights, &device).weights()
        );
    }
}
