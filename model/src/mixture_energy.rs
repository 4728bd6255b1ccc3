//! Sample energies under a Gaussian mixture, recorded as a single autodiff step:
//! E_i = −log Σ_c exp(log_norm_c − ½‖L_c⁻¹(z_i − μ_c)‖²), with L_c the Cholesky factor of
//! component c's covariance and log_norm_c = log φ_c − log|L_c| − d/2·log 2π.
//!
//! Composed from burn's operations, the forward substitution and log-sum-exp took some forty
//! `[n, k]` tensor operations per batch, each with its own backward step. Here the forward pass
//! is the scorer's own mixture code (so training optimises the energies serving reports) and the
//! backward pass a loop over the samples, eight side by side, both in f64 whatever the element
//! type. The Cholesky factors and log normalisers come from their own step
//! ([`crate::mixture_factors`]), which passes their gradients on to φ and Σ.

// Index loops read closest to the substitution formulas.
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

use crate::config::{MAX_GMM_K, MAX_Z_DIM};
use crate::fastmath::exp_non_positive;
use crate::gmm::LaneMixture;
use crate::scorer::{Isa, mixture_energies};
use crate::step_support::{from_f64, register_gradients, to_f64};

#[backend_extension(Flex, Autodiff)]
pub trait MixtureEnergyBackend: Backend {
    /// Energies `[n]` of z `[n, d]` under means `[k, d]`, lower Cholesky factors `[k, d, d]`
    /// and per-component log normalisers `[k]`.
    fn mixture_energy(
        z: FloatTensor<Self>,
        mu: FloatTensor<Self>,
        chol: FloatTensor<Self>,
        log_norm: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Energies `[n]` of `z` under the mixture given by `mu`, `chol` and `log_norm`.
pub fn mixture_energy(
    z: Tensor<2>,
    mu: Tensor<2>,
    chol: Tensor<3>,
    log_norm: Tensor<1>,
) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as MixtureEnergyBackend>::mixture_energy(
        z.into_dispatch(),
        mu.into_dispatch(),
        chol.into_dispatch(),
        log_norm.into_dispatch(),
    ))
}

/// The inputs as plain f64 values.
struct Mixture {
    n: usize,
    d: usize,
    k: usize,
    z: Vec<f64>,
    mu: Vec<f64>,
    chol: Vec<f64>,
    log_norm: Vec<f64>,
}

/// Samples per call of the scorer's mixture code.
const LANES: usize = 16;
/// Samples side by side in the backward pass (eight f64 fill an AVX-512 register).
const GRADIENT_LANES: usize = 8;

impl Mixture {
    /// The scorer's energies ([`LaneMixture::energies`]), sixteen samples at a time.
    fn energies(&self) -> Vec<f64> {
        let (n, d) = (self.n, self.d);
        let mixture = LaneMixture::<f64>::from_parts(d, &self.mu, &self.chol, &self.log_norm);
        let isa = Isa::best(LANES);
        let mut energies = Vec::with_capacity(n.next_multiple_of(LANES));
        let mut code = [[0f64; LANES]; MAX_Z_DIM];
        for start in (0..n).step_by(LANES) {
            let used = LANES.min(n - start);
            for (j, lane) in code[..d].iter_mut().enumerate() {
                for (r, value) in lane.iter_mut().enumerate() {
                    // Padding lanes repeat the block's first sample.
                    let row = start + if r < used { r } else { 0 };
                    *value = self.z[row * d + j];
                }
            }
            let block = mixture_energies::<f64, LANES>(isa, &mixture, &code[..d]);
            energies.extend_from_slice(&block[..used]);
        }
        energies
    }

    /// (z̄, μ̄, L̄, log_norm̄) for the output gradient `grad`, compiled for the best
    /// instruction set (the exp below uses fused multiply-adds).
    fn gradients(&self, grad: &[f64]) -> [Vec<f64>; 4] {
        #[cfg(target_arch = "x86_64")]
        match Isa::best(LANES) {
            // SAFETY: Isa::best only names instruction sets this CPU has.
            Isa::Avx512 => return unsafe { self.gradients_avx512(grad) },
            Isa::Avx2 => return unsafe { self.gradients_fma(grad) },
            Isa::Portable => {}
        }
        self.gradients_body(grad)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma,avx2")]
    fn gradients_avx512(&self, grad: &[f64]) -> [Vec<f64>; 4] {
        self.gradients_body(grad)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma,avx2")]
    fn gradients_fma(&self, grad: &[f64]) -> [Vec<f64>; 4] {
        self.gradients_body(grad)
    }

    #[inline(always)]
    fn gradients_body(&self, grad: &[f64]) -> [Vec<f64>; 4] {
        const L: usize = GRADIENT_LANES;
        let (n, d, k) = (self.n, self.d, self.k);
        let mut z_bar = vec![0.0; n * d];
        let mut mu_bar = vec![0.0; k * d];
        let mut chol_bar = vec![0.0; k * d * d];
        let mut log_norm_bar = vec![0.0; k];
        let inverse_pivots: Vec<f64> = (0..k * d)
            .map(|at| self.chol[(at / d) * d * d + (at % d) * (d + 1)].recip())
            .collect();
        // L samples side by side, so every step below runs across lanes and vectorises.
        let mut y = [[[0f64; L]; MAX_Z_DIM]; MAX_GMM_K];
        let mut log_terms = [[0f64; L]; MAX_GMM_K];
        let mut r_bar = [[0f64; L]; MAX_Z_DIM];
        for start in (0..n).step_by(L) {
            let used = L.min(n - start);
            // Padding lanes repeat the first sample with a zero gradient, so they add nothing.
            let row = |r: usize| start + if r < used { r } else { 0 };
            let g: [f64; L] = std::array::from_fn(|r| if r < used { grad[start + r] } else { 0.0 });
            // y_c = L_c⁻¹(z − μ_c) and log_term_c = log_norm_c − ½‖y_c‖², as the forward pass.
            let mut best = [f64::NEG_INFINITY; L];
            for c in 0..k {
                let l = &self.chol[c * d * d..(c + 1) * d * d];
                let mut squared = [0f64; L];
                for j in 0..d {
                    let mut rhs: [f64; L] =
                        std::array::from_fn(|r| self.z[row(r) * d + j] - self.mu[c * d + j]);
                    for p in 0..j {
                        for r in 0..L {
                            rhs[r] -= l[j * d + p] * y[c][p][r];
                        }
                    }
                    for r in 0..L {
                        y[c][j][r] = rhs[r] * inverse_pivots[c * d + j];
                        squared[r] += y[c][j][r] * y[c][j][r];
                    }
                }
                for r in 0..L {
                    log_terms[c][r] = self.log_norm[c] - 0.5 * squared[r];
                    best[r] = best[r].max(log_terms[c][r]);
                }
            }
            // Responsibilities w_c = softmax(log_terms)_c, by log-sum-exp.
            let mut total = [0f64; L];
            for c in 0..k {
                log_terms[c] = exp_non_positive(std::array::from_fn(|r| log_terms[c][r] - best[r]));
                for r in 0..L {
                    total[r] += log_terms[c][r];
                }
            }
            for c in 0..k {
                let l = &self.chol[c * d * d..(c + 1) * d * d];
                // ∂E/∂log_term_c = −w_c, so log_term_c's gradient is −g·w_c and ‖y_c‖²'s g·w_c/2.
                let gw: [f64; L] = std::array::from_fn(|r| g[r] * log_terms[c][r] / total[r]);
                log_norm_bar[c] -= gw.iter().sum::<f64>();
                // ȳ = g·w·y; r̄ = L⁻ᵀȳ (back substitution); L̄ = −r̄ yᵀ on the lower triangle.
                for j in (0..d).rev() {
                    let mut rhs: [f64; L] = std::array::from_fn(|r| gw[r] * y[c][j][r]);
                    for p in j + 1..d {
                        for r in 0..L {
                            rhs[r] -= l[p * d + j] * r_bar[p][r];
                        }
                    }
                    for r in 0..L {
                        r_bar[j][r] = rhs[r] * inverse_pivots[c * d + j];
                    }
                }
                for j in 0..d {
                    for p in 0..=j {
                        let mut sum = 0.0;
                        for r in 0..L {
                            sum += r_bar[j][r] * y[c][p][r];
                        }
                        chol_bar[c * d * d + j * d + p] -= sum;
                    }
                    for r in 0..used {
                        z_bar[(start + r) * d + j] += r_bar[j][r];
                    }
                    mu_bar[c * d + j] -= r_bar[j].iter().sum::<f64>();
                }
            }
        }
        [z_bar, mu_bar, chol_bar, log_norm_bar]
    }
}

fn mixture(z: &FlexTensor, mu: &FlexTensor, chol: &FlexTensor, log_norm: &FlexTensor) -> Mixture {
    let [n, d] = z.shape().dims();
    let k = mu.shape().dims::<2>()[0];
    Mixture {
        n,
        d,
        k,
        z: to_f64(z),
        mu: to_f64(mu),
        chol: to_f64(chol),
        log_norm: to_f64(log_norm),
    }
}

impl MixtureEnergyBackend for Flex {
    fn mixture_energy(
        z: FlexTensor,
        mu: FlexTensor,
        chol: FlexTensor,
        log_norm: FlexTensor,
    ) -> FlexTensor {
        let m = mixture(&z, &mu, &chol, &log_norm);
        from_f64(m.energies(), [m.n], z.dtype())
    }
}

/// Gradients of Σ_i grad_i·E_i with respect to z, μ, the factors (lower triangle) and
/// log_norm.
fn energy_gradients(
    z: FlexTensor,
    mu: FlexTensor,
    chol: FlexTensor,
    log_norm: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
    let m = mixture(&z, &mu, &chol, &log_norm);
    let [z_bar, mu_bar, chol_bar, log_norm_bar] = m.gradients(&to_f64(&grad));
    (
        from_f64(z_bar, [m.n, m.d], z.dtype()),
        from_f64(mu_bar, [m.k, m.d], mu.dtype()),
        from_f64(chol_bar, [m.k, m.d, m.d], chol.dtype()),
        from_f64(log_norm_bar, [m.k], log_norm.dtype()),
    )
}

#[derive(Debug)]
struct EnergyStep;

impl Backward<Flex, 4> for EnergyStep {
    /// The four inputs, checkpointed.
    type State = [NodeId; 4];

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [z, mu, chol, log_norm] = ops
            .state
            .map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
        let (z_bar, mu_bar, chol_bar, log_norm_bar) = energy_gradients(z, mu, chol, log_norm, grad);
        register_gradients(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [z_bar, mu_bar, chol_bar, log_norm_bar],
        );
    }
}

impl<C: CheckpointStrategy> MixtureEnergyBackend for Autodiff<Flex, C> {
    fn mixture_energy(
        z: FloatTensor<Self>,
        mu: FloatTensor<Self>,
        chol: FloatTensor<Self>,
        log_norm: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match EnergyStep
            .prepare::<C>([z.node(), mu.node(), chol.node(), log_norm.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = [&z, &mu, &chol, &log_norm].map(|t| prep.checkpoint(t));
                let output = Flex::mixture_energy(
                    z.into_primitive(),
                    mu.into_primitive(),
                    chol.into_primitive(),
                    log_norm.into_primitive(),
                );
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::mixture_energy(
                z.into_primitive(),
                mu.into_primitive(),
                chol.into_primitive(),
                log_norm.into_primitive(),
            )),
        }
    }
}
