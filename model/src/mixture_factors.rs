//! What the energy needs from the mixture's weights and covariances, recorded as a single
//! autodiff step: for each component the Cholesky factor L of Σ + cov_reg·I, the log
//! normaliser log φ − log|L| − d/2·log 2π, and its share of the covariance penalty
//! φ Σ_j v_j / (Σ + cov_reg·I)_jj (φ and the spread v held constant, see
//! [`crate::gmm::energy`]).
//!
//! Composed from burn's operations the factorisation took some sixty operations on `[1, k]`
//! tensors per batch, each recorded and differentiated on its own; for the small server-metric
//! networks that was a tenth of a training step. Here the forward pass is the fitted model's
//! own Cholesky (`gmm::regularised_cholesky`) and the backward pass its loop in reverse, in f64
//! whatever the element type.

// Index loops read closest to the Cholesky formulas.
#![allow(clippy::needless_range_loop)]

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::Tensor;

use crate::gmm::{MIN_WEIGHT, log_norm, regularised_cholesky};
use crate::step_support::{from_f64, register_gradients, to_f64};

#[backend_extension(Flex, Autodiff)]
pub trait MixtureFactorsBackend: Backend {
    /// `[k, d·d + 2]`: each component's row-major Cholesky factor (zero above the diagonal),
    /// log normaliser and penalty share, from weights `[k]`, covariances `[k, d, d]` and the
    /// spread of the codes `[d]`.
    fn mixture_factors(
        phi: FloatTensor<Self>,
        cov: FloatTensor<Self>,
        spread: FloatTensor<Self>,
        cov_reg: f64,
    ) -> FloatTensor<Self>;
}

/// `[k, d·d + 2]`: Cholesky factor, log normaliser and penalty share of each component.
pub fn mixture_factors(
    phi: Tensor<1>,
    cov: Tensor<3>,
    spread: Tensor<1>,
    cov_reg: f64,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as MixtureFactorsBackend>::mixture_factors(
        phi.into_dispatch(),
        cov.into_dispatch(),
        spread.into_dispatch(),
        cov_reg,
    ))
}

/// The factors of one component: `d·d + 2` values.
fn component_factors(phi: f64, cov: &[f64], spread: &[f64], d: usize, cov_reg: f64) -> Vec<f64> {
    let (mut out, _) = regularised_cholesky(cov, d, cov_reg);
    let penalty: f64 = (0..d).map(|j| spread[j] / (cov[j * d + j] + cov_reg)).sum();
    out.push(log_norm(phi, &out, d));
    out.push(phi * penalty);
    out
}

/// (φ̄, Σ̄) of one component: the Cholesky loop of [`component_factors`] run backwards.
fn component_gradients(
    phi: f64,
    cov: &[f64],
    spread: &[f64],
    factors: &[f64],
    grad: &[f64],
    d: usize,
    cov_reg: f64,
) -> (f64, Vec<f64>) {
    let a = |i: usize, j: usize| cov[i * d + j] + if i == j { cov_reg } else { 0.0 };
    let l = &factors[..d * d];
    let mut l_bar = grad[..d * d].to_vec();
    let (log_norm_bar, penalty_bar) = (grad[d * d], grad[d * d + 1]);
    let mut cov_bar = vec![0.0; d * d];
    let phi_bar = if phi > MIN_WEIGHT {
        log_norm_bar / phi
    } else {
        0.0
    };
    for j in 0..d {
        // log normaliser −Σ ln L_jj; penalty share φ·v_j / A_jj (φ held constant).
        l_bar[j * d + j] -= log_norm_bar / l[j * d + j];
        cov_bar[j * d + j] -= penalty_bar * phi * spread[j] / (a(j, j) * a(j, j));
    }
    for j in (0..d).rev() {
        let l_jj = l[j * d + j];
        // L_ij = off_ij / L_jj, off_ij = A_ij − Σ_p L_ip L_jp.
        for i in (j + 1..d).rev() {
            let off_bar = l_bar[i * d + j] / l_jj;
            l_bar[j * d + j] -= l_bar[i * d + j] * l[i * d + j] / l_jj;
            cov_bar[i * d + j] += off_bar;
            for p in 0..j {
                l_bar[i * d + p] -= off_bar * l[j * d + p];
                l_bar[j * d + p] -= off_bar * l[i * d + p];
            }
        }
        // L_jj = √max(pivot, cov_reg), pivot = A_jj − Σ_p L_jp²; no gradient where clamped.
        let pivot = l_jj * l_jj;
        let pivot_bar = if pivot > cov_reg {
            l_bar[j * d + j] / (2.0 * l_jj)
        } else {
            0.0
        };
        cov_bar[j * d + j] += pivot_bar;
        for p in 0..j {
            l_bar[j * d + p] -= 2.0 * pivot_bar * l[j * d + p];
        }
    }
    (phi_bar, cov_bar)
}

impl MixtureFactorsBackend for Flex {
    fn mixture_factors(
        phi: FlexTensor,
        cov: FlexTensor,
        spread: FlexTensor,
        cov_reg: f64,
    ) -> FlexTensor {
        let [k, d, _] = cov.shape().dims();
        let (phi_values, cov_values, spread) = (to_f64(&phi), to_f64(&cov), to_f64(&spread));
        let values: Vec<f64> = (0..k)
            .flat_map(|c| {
                let cov_c = &cov_values[c * d * d..(c + 1) * d * d];
                component_factors(phi_values[c], cov_c, &spread, d, cov_reg)
            })
            .collect();
        from_f64(values, [k, d * d + 2], cov.dtype())
    }
}

/// Gradients of Σ grad ⊙ factors with respect to φ and Σ (lower triangle), given the forward pass's `factors`.
pub(crate) fn factors_backward(
    phi: FlexTensor,
    cov: FlexTensor,
    spread: FlexTensor,
    factors: FlexTensor,
    grad: FlexTensor,
    cov_reg: f64,
) -> (FlexTensor, FlexTensor) {
    let [k, d, _] = cov.shape().dims();
    let width = d * d + 2;
    let (phi_values, cov_values, spread) = (to_f64(&phi), to_f64(&cov), to_f64(&spread));
    let (factors, grad) = (to_f64(&factors), to_f64(&grad));
    let mut phi_bar = Vec::with_capacity(k);
    let mut cov_bar = Vec::with_capacity(k * d * d);
    for c in 0..k {
        let (p, s) = component_gradients(
            phi_values[c],
            &cov_values[c * d * d..(c + 1) * d * d],
            &spread,
            &factors[c * width..(c + 1) * width],
            &grad[c * width..(c + 1) * width],
            d,
            cov_reg,
        );
        phi_bar.push(p);
        cov_bar.extend(s);
    }
    (
        from_f64(phi_bar, [k], phi.dtype()),
        from_f64(cov_bar, [k, d, d], cov.dtype()),
    )
}

#[derive(Debug)]
struct FactorsStep;

impl Backward<Flex, 2> for FactorsStep {
    /// φ and Σ, checkpointed; the spread (held constant, so not a parent: nothing upstream of
    /// it waits for a gradient); the factors; cov_reg.
    type State = ([NodeId; 2], FlexTensor, FlexTensor, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (inputs, spread, factors, cov_reg) = ops.state;
        let [phi, cov] = inputs.map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
        let (phi_bar, cov_bar) = factors_backward(phi, cov, spread, factors, grad, cov_reg);
        register_gradients(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [phi_bar, cov_bar],
        );
    }
}

impl<C: CheckpointStrategy> MixtureFactorsBackend for Autodiff<Flex, C> {
    fn mixture_factors(
        phi: FloatTensor<Self>,
        cov: FloatTensor<Self>,
        spread: FloatTensor<Self>,
        cov_reg: f64,
    ) -> FloatTensor<Self> {
        match FactorsStep
            .prepare::<C>([phi.node(), cov.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let inputs = [&phi, &cov].map(|t| prep.checkpoint(t));
                let spread = spread.into_primitive();
                let output = Flex::mixture_factors(
                    phi.into_primitive(),
                    cov.into_primitive(),
                    spread.clone(),
                    cov_reg,
                );
                prep.finish((inputs, spread, output.clone(), cov_reg), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::mixture_factors(
                phi.into_primitive(),
                cov.into_primitive(),
                spread.into_primitive(),
                cov_reg,
            )),
        }
    }
}
