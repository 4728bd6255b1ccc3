//! The training objective from the network's outputs, recorded as one autodiff step: the mean
//! squared reconstruction error, the mixture's statistics, factors and sample energies
//! ([`crate::gmm::gmm_stats`], [`crate::gmm::energy`]), the mean energy, the covariance
//! penalty, and loss = reconstruction + λ₁·mean energy + λ₂·penalty.
//!
//! Recorded piece by piece that was some twenty steps a batch: the three mixture steps, and
//! the slices, reshapes, means, sums, scalings and adds between them, each registered with
//! burn's graph and run on its own in the backward pass; on KDDCUP99 their bookkeeping was
//! about a twentieth of a one-thread training step. This step runs the same pieces, the
//! mixture steps' own passes and flex's own operations, in the same order, and its backward
//! pass forms each gradient as burn's steps formed it, so the bits are those of the steps
//! composed.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Scalar, Shape, Slice, Tensor};

use crate::gmm::code_spread;
use crate::mixture_energy::{MixtureEnergyBackend, energy_gradients};
use crate::mixture_factors::{MixtureFactorsBackend, factors_backward};
use crate::mixture_stats::{MixtureStatsBackend, stats_backward};
use crate::reconstruction::SQUARED_ERROR;
use crate::step_support::{from_f64, to_f64};

/// Where each part sits in the objective's output.
pub const LOSS: usize = 0;
pub const RECONSTRUCTION: usize = 1;
pub const MEAN_ENERGY: usize = 2;
pub const PENALTY: usize = 3;

#[backend_extension(Flex, Autodiff)]
pub trait ObjectiveBackend: Backend {
    /// `[4]`: the loss, the mean squared reconstruction error, the mean energy and the
    /// covariance penalty, from the reconstruction terms `[n, 3]`, the codes z `[n, d]`, the
    /// memberships γ `[n, k]` and the codes' spread `[d]` (held constant). `lambdas` weigh the
    /// mean energy and the penalty into the loss; without them the loss is the reconstruction
    /// error alone.
    fn objective(
        terms: FloatTensor<Self>,
        z: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        spread: FloatTensor<Self>,
        cov_reg: f64,
        lambdas: Option<[f64; 2]>,
    ) -> FloatTensor<Self>;
}

/// `[4]`: loss, reconstruction error, mean energy and penalty (indexed by [`LOSS`],
/// [`RECONSTRUCTION`], [`MEAN_ENERGY`] and [`PENALTY`]). Without `lambdas` (the warm-up's
/// reconstruction-only loss) the mixture's parts are reported but pass no gradient back to z
/// or γ, so the estimation network gets none.
pub fn objective(
    terms: Tensor<2>,
    z: Tensor<2>,
    gamma: Tensor<2>,
    cov_reg: f64,
    lambdas: Option<[f64; 2]>,
) -> Tensor<1> {
    let spread = code_spread(&z, cov_reg);
    let (z, gamma) = match lambdas {
        Some(_) => (z, gamma),
        None => (z.detach(), gamma.detach()),
    };
    Tensor::from_dispatch(<Dispatch as ObjectiveBackend>::objective(
        terms.into_dispatch(),
        z.into_dispatch(),
        gamma.into_dispatch(),
        spread.into_dispatch(),
        cov_reg,
        lambdas,
    ))
}

fn columns(rows: usize, columns: std::ops::Range<usize>) -> [Slice; 2] {
    [Slice::from(0..rows), Slice::from(columns)]
}

/// φ `[k]`, μ `[k, d]` and Σ `[k, d, d]` as [`crate::gmm::gmm_stats`] slices them from the
/// statistics `[k, 1 + d + d·d]`.
fn stats_parts(stats: &FlexTensor, d: usize) -> [FlexTensor; 3] {
    let k = stats.shape()[0];
    let slice = |at| Flex::float_slice(stats.clone(), &columns(k, at));
    [
        Flex::float_reshape(slice(0..1), Shape::from([k])),
        slice(1..1 + d),
        Flex::float_reshape(slice(1 + d..1 + d + d * d), Shape::from([k, d, d])),
    ]
}

/// The Cholesky factors `[k, d, d]` and log normalisers `[k]` as [`crate::gmm::energy`]
/// slices them from the factors `[k, d·d + 2]`.
fn factor_parts(factors: &FlexTensor, d: usize) -> [FlexTensor; 2] {
    let k = factors.shape()[0];
    let slice = |at| Flex::float_slice(factors.clone(), &columns(k, at));
    [
        Flex::float_reshape(slice(0..d * d), Shape::from([k, d, d])),
        Flex::float_reshape(slice(d * d..d * d + 1), Shape::from([k])),
    ]
}

/// What the backward pass needs of the forward one.
#[derive(Debug, Clone)]
struct Kept {
    terms_shape: Shape,
    z: FlexTensor,
    gamma: FlexTensor,
    spread: FlexTensor,
    stats: FlexTensor,
    factors: FlexTensor,
    cov_reg: f64,
    lambdas: Option<[f64; 2]>,
}

fn scalar(value: f64, like: &FlexTensor) -> Scalar {
    Scalar::new(value, &like.dtype())
}

/// The output and what its backward pass keeps.
fn forward(
    terms: FlexTensor,
    z: FlexTensor,
    gamma: FlexTensor,
    spread: FlexTensor,
    cov_reg: f64,
    lambdas: Option<[f64; 2]>,
) -> (FlexTensor, Kept) {
    let d = z.shape()[1];
    let stats = Flex::mixture_stats(z.clone(), gamma.clone());
    let k = stats.shape()[0];
    let [phi, mu, cov] = stats_parts(&stats, d);
    let factors = Flex::mixture_factors(phi, cov, spread.clone(), cov_reg);
    let [chol, log_norm] = factor_parts(&factors, d);
    let penalty = Flex::float_sum(Flex::float_slice(
        factors.clone(),
        &columns(k, d * d + 1..d * d + 2),
    ));
    let energies = Flex::mixture_energy(z.clone(), mu, chol, log_norm);
    let mean_energy = Flex::float_mean(energies);
    let rows = terms.shape()[0];
    let terms_shape = terms.shape();
    let reconstruction = Flex::float_mean(Flex::float_slice(
        terms,
        &columns(rows, SQUARED_ERROR..SQUARED_ERROR + 1),
    ));
    let loss = match lambdas {
        Some([energy_weight, penalty_weight]) => Flex::float_add(
            Flex::float_add(
                reconstruction.clone(),
                Flex::float_mul_scalar(mean_energy.clone(), scalar(energy_weight, &stats)),
            ),
            Flex::float_mul_scalar(penalty.clone(), scalar(penalty_weight, &stats)),
        ),
        None => reconstruction.clone(),
    };
    let output = Flex::float_cat(vec![loss, reconstruction, mean_energy, penalty], 0);
    let kept = Kept {
        terms_shape,
        z,
        gamma,
        spread,
        stats,
        factors,
        cov_reg,
        lambdas,
    };
    (output, kept)
}

impl ObjectiveBackend for Flex {
    fn objective(
        terms: FlexTensor,
        z: FlexTensor,
        gamma: FlexTensor,
        spread: FlexTensor,
        cov_reg: f64,
        lambdas: Option<[f64; 2]>,
    ) -> FlexTensor {
        forward(terms, z, gamma, spread, cov_reg, lambdas).0
    }
}

/// A tensor of `shape` and `dtype` holding the gradients of the parts of it that slices took
/// (`columns` of each of its rows), zeros elsewhere. Where several slices' gradients met, burn
/// added them up, each put back among zeros: every value then went through one add of zero,
/// which turns −0 into +0.
fn slices_backward(
    dtype: DType,
    shape: Shape,
    parts: &[(std::ops::Range<usize>, &[f64])],
) -> FlexTensor {
    let [rows, width] = shape.dims();
    let mut values = vec![0f64; rows * width];
    let added_up = parts.len() > 1;
    for (at, grad) in parts {
        for (row, grad) in values
            .chunks_exact_mut(width)
            .zip(grad.chunks_exact(at.len()))
        {
            for (value, &grad) in row[at.clone()].iter_mut().zip(grad) {
                *value = if added_up { grad + 0.0 } else { grad };
            }
        }
    }
    from_f64(values, shape, dtype)
}

/// The gradients with respect to the terms, z and γ of Σ grad ⊙ output; z's and γ's only
/// where `mixture_wanted`. Each is formed as burn's own steps formed it from the composed
/// operations: a mean's gradient is its output's times the element type's 1/count, a sum's
/// is copied, a scaling's is scaled.
fn backward(kept: Kept, grad: FlexTensor, mixture_wanted: bool) -> [Option<FlexTensor>; 3] {
    let Kept {
        terms_shape,
        z,
        gamma,
        spread,
        stats,
        factors,
        cov_reg,
        lambdas,
    } = kept;
    let dtype = grad.dtype();
    // An f32 sum or product of f32 values, computed in f64 and rounded once, is the f32
    // operation's own result: the gradients burn's small steps formed on `[1]` tensors are
    // formed here on plain values, in either precision.
    let to_f32 = dtype != DType::F64;
    let round = |value: f64| {
        if to_f32 {
            f64::from(value as f32)
        } else {
            value
        }
    };
    let tensor = |values: Vec<f64>, shape: Shape| from_f64(values, shape, dtype);
    let mean_backward = |grad: f64, count: usize| round(round(1.0 / count as f64) * grad);
    let g = to_f64(&grad);
    // The loss's gradient reaches each part through its add and its scaling, then meets the
    // part's own.
    let reconstruction_bar = round(g[LOSS] + g[RECONSTRUCTION]);
    let (energy_bar, penalty_bar) = match lambdas {
        Some([energy_weight, penalty_weight]) => (
            round(round(g[LOSS] * round(energy_weight)) + g[MEAN_ENERGY]),
            round(round(g[LOSS] * round(penalty_weight)) + g[PENALTY]),
        ),
        None => (g[MEAN_ENERGY], g[PENALTY]),
    };

    let rows = terms_shape[0];
    let squared_error_bar = vec![mean_backward(reconstruction_bar, rows); rows];
    let terms_bar = slices_backward(
        dtype,
        terms_shape,
        &[(SQUARED_ERROR..SQUARED_ERROR + 1, &squared_error_bar)],
    );

    if !mixture_wanted {
        return [Some(terms_bar), None, None];
    }
    let [n, d] = z.shape().dims();
    let k = stats.shape()[0];
    let [phi, mu, cov] = stats_parts(&stats, d);
    let [chol, log_norm] = factor_parts(&factors, d);
    let energies_bar = tensor(vec![mean_backward(energy_bar, n); n], Shape::from([n]));
    let (z_bar_energy, mu_bar, chol_bar, log_norm_bar) =
        energy_gradients(z.clone(), mu, chol, log_norm, energies_bar);
    let penalty_shares_bar = vec![penalty_bar; k];
    let factors_bar = slices_backward(
        dtype,
        factors.shape(),
        &[
            (d * d + 1..d * d + 2, &penalty_shares_bar),
            (d * d..d * d + 1, &to_f64(&log_norm_bar)),
            (0..d * d, &to_f64(&chol_bar)),
        ],
    );
    let (phi_bar, cov_bar) = factors_backward(phi, cov, spread, factors, factors_bar, cov_reg);
    let stats_bar = slices_backward(
        dtype,
        stats.shape(),
        &[
            (1..1 + d, &to_f64(&mu_bar)),
            (0..1, &to_f64(&phi_bar)),
            (1 + d..1 + d + d * d, &to_f64(&cov_bar)),
        ],
    );
    let (z_bar_stats, gamma_bar) = stats_backward(z, gamma, stats, stats_bar);
    // z's two gradients meet in the order the energy's and the statistics' steps ran.
    let z_bar = Flex::float_add(z_bar_energy, z_bar_stats);
    [Some(terms_bar), Some(z_bar), Some(gamma_bar)]
}

#[derive(Debug)]
struct ObjectiveStep;

impl Backward<Flex, 3> for ObjectiveStep {
    type State = Kept;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [terms, z, gamma] = ops.parents.map(|p| p.map(|node| node.id));
        let gradients = backward(ops.state, grad, z.is_some() || gamma.is_some());
        for (parent, gradient) in [terms, z, gamma].into_iter().zip(gradients) {
            if let (Some(parent), Some(gradient)) = (parent, gradient) {
                grads.register::<Flex>(parent, gradient);
            }
        }
    }
}

impl<C: CheckpointStrategy> ObjectiveBackend for Autodiff<Flex, C> {
    fn objective(
        terms: FloatTensor<Self>,
        z: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        spread: FloatTensor<Self>,
        cov_reg: f64,
        lambdas: Option<[f64; 2]>,
    ) -> FloatTensor<Self> {
        match ObjectiveStep
            .prepare::<C>([terms.node(), z.node(), gamma.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, kept) = forward(
                    terms.into_primitive(),
                    z.into_primitive(),
                    gamma.into_primitive(),
                    spread.into_primitive(),
                    cov_reg,
                    lambdas,
                );
                prep.finish(kept, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::objective(
                terms.into_primitive(),
                z.into_primitive(),
                gamma.into_primitive(),
                spread.into_primitive(),
                cov_reg,
                lambdas,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmm::{energy, gmm_stats};
    use crate::testing::leaf;
    use burn::tensor::activation::softmax;
    use burn::tensor::{DType, Device, TensorData};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const COV_REG: f64 = 1e-3;

    /// The loss's parts as the composed steps form them, and the loss training differentiated
    /// before this step.
    fn composed(
        terms: Tensor<2>,
        z: Tensor<2>,
        gamma: Tensor<2>,
        lambdas: Option<[f64; 2]>,
    ) -> (Tensor<1>, Tensor<1>) {
        let n = terms.dims()[0];
        let reconstruction = terms.slice([0..n, SQUARED_ERROR..SQUARED_ERROR + 1]).mean();
        let gmm = gmm_stats(z.clone(), gamma);
        let (energies, penalty) = energy(z, &gmm, COV_REG);
        let mean_energy = energies.mean();
        let loss = match lambdas {
            Some([energy_weight, penalty_weight]) => {
                reconstruction.clone()
                    + mean_energy.clone().mul_scalar(energy_weight)
                    + penalty.clone().mul_scalar(penalty_weight)
            }
            None => reconstruction.clone(),
        };
        let parts = Tensor::cat(vec![loss.clone(), reconstruction, mean_energy, penalty], 0);
        (parts, loss)
    }

    /// The parts, then the gradients of the loss (or, with `part_weights`, of a weighted sum
    /// of all four parts) with respect to the terms, z and the membership logits, each as bits;
    /// a gradient that does not reach its tensor is empty.
    fn parts_and_gradients(
        fused: bool,
        dtype: DType,
        lambdas: Option<[f64; 2]>,
        part_weights: Option<[f64; 4]>,
    ) -> [Vec<u64>; 4] {
        let (n, d, k) = (45, 3, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut draw = |count: usize, low: f64| -> Vec<f64> {
            (0..count).map(|_| rng.random_range(low..2.0)).collect()
        };
        let device = Device::flex().autodiff();
        let terms = leaf(draw(n * 3, 0.0), [n, 3], dtype, &device);
        let z = leaf(draw(n * d, -2.0), [n, d], dtype, &device);
        let logits = leaf(draw(n * k, -2.0), [n, k], dtype, &device);
        let gamma = softmax(logits.clone(), 1);
        let (parts, loss) = if fused {
            let parts = objective(terms.clone(), z.clone(), gamma, COV_REG, lambdas);
            (parts.clone(), parts.slice(LOSS..LOSS + 1))
        } else {
            composed(terms.clone(), z.clone(), gamma, lambdas)
        };
        let loss = match part_weights {
            Some(weights) => {
                let weights =
                    Tensor::<1>::from_data(TensorData::new(weights.to_vec(), [4]), &device)
                        .cast(dtype);
                (parts.clone() * weights).sum()
            }
            None => loss,
        };
        let grads = loss.backward();
        let bits = |t: Option<Tensor<2>>| -> Vec<u64> {
            t.map(|t| {
                let values = t.into_data().convert::<f64>().try_into_vec::<f64>();
                values.unwrap().iter().map(|v| v.to_bits()).collect()
            })
            .unwrap_or_default()
        };
        [
            bits(Some(parts.reshape([1, 4]))),
            bits(terms.grad(&grads)),
            bits(z.grad(&grads)),
            bits(logits.grad(&grads)),
        ]
    }

    #[test]
    fn the_objective_gives_the_composed_steps_bits_and_gradients() {
        let names = ["parts", "terms gradient", "z gradient", "logits gradient"];
        for dtype in [DType::F32, DType::F64] {
            for (lambdas, reaches_mixture) in [(Some([0.1, 0.005]), true), (None, false)] {
                let fused = parts_and_gradients(true, dtype, lambdas, None);
                let reference = parts_and_gradients(false, dtype, lambdas, None);
                for ((name, got), want) in names.iter().zip(&fused).zip(&reference) {
                    assert_eq!(got, want, "{name}, {dtype:?}, lambdas {lambdas:?}");
                }
                // Without the mixture in the loss, z and γ get no gradient at all: the
                // estimation network must not see zeros it would then step on.
                assert_eq!(!fused[2].is_empty(), reaches_mixture);
                assert_eq!(!fused[3].is_empty(), reaches_mixture);
                assert!(!fused[1].is_empty());
            }
        }
    }

    #[test]
    fn each_part_passes_its_own_gradient_back() {
        // Weighting every part differs from differentiating the loss alone: the parts' own
        // gradients must add to the loss's, as a composed sum of the four would.
        let weights = Some([0.5, 2.0, -3.0, 7.0]);
        let lambdas = Some([0.1, 0.005]);
        let fused = parts_and_gradients(true, DType::F64, lambdas, weights);
        let reference = parts_and_gradients(false, DType::F64, lambdas, weights);
        let as_f64 =
            |bits: &[u64]| -> Vec<f64> { bits.iter().map(|&b| f64::from_bits(b)).collect() };
        for (got, want) in fused.iter().zip(&reference).skip(1) {
            let (got, want) = (as_f64(got), as_f64(want));
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(scale > 0.0);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-12 * scale, "fused {a}, composed {b}");
            }
        }
    }
}
