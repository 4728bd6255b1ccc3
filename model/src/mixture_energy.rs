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
use burn::tensor::Tensor;

use crate::config::{MAX_GMM_K, MAX_Z_DIM};
use crate::fastmath::exp_non_positive;
#[cfg(target_arch = "x86_64")]
use crate::fastmath::exp_non_positive_avx512;
use crate::gmm::LaneMixture;
use crate::helper_threads;
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
    /// The scorer's energies ([`LaneMixture::energies`]), sixteen samples at a time; a fit's
    /// spare cores take runs of the blocks (each sample's energy is its own lane's).
    fn energies(&self) -> Vec<f64> {
        let (n, d, k) = (self.n, self.d, self.k);
        let mixture = LaneMixture::<f64>::from_parts(d, &self.mu, &self.chol, &self.log_norm);
        let isa = Isa::best(LANES);
        let block_energies = |blocks: Range<usize>, out: &mut [MaybeUninit<f64>]| {
            let mut code = [[0f64; LANES]; MAX_Z_DIM];
            for (block, out) in blocks.zip(out.chunks_exact_mut(LANES)) {
                let start = block * LANES;
                let used = LANES.min(n - start);
                for (j, lane) in code[..d].iter_mut().enumerate() {
                    for (r, value) in lane.iter_mut().enumerate() {
                        // Padding lanes repeat the block's first sample.
                        let row = start + if r < used { r } else { 0 };
                        *value = self.z[row * d + j];
                    }
                }
                let energies = mixture_energies::<f64, LANES>(isa, &mixture, &code[..d]);
                for (out, energy) in out.iter_mut().zip(energies) {
                    out.write(energy);
                }
            }
        };
        let blocks = n.div_ceil(LANES);
        // SAFETY: `block_energies` writes all LANES values of each block.
        let mut energies = unsafe {
            helper_threads::rows_written_in_chunks(
                blocks,
                LANES,
                LANES * k * d * d,
                &block_energies,
            )
        };
        energies.truncate(n);
        energies
    }

    /// (z̄, μ̄, L̄, log_norm̄) for the output gradient `grad`. Blocks of eight samples are
    /// independent but for their shares of μ̄, L̄ and log_norm̄, so a fit's spare cores take
    /// runs of blocks: each block writes its samples' z̄ and its shares to a row of its own,
    /// and the shares are then added up here block after block, the order of one thread.
    fn gradients(&self, grad: &[f64]) -> [Vec<f64>; 4] {
        const L: usize = GRADIENT_LANES;
        let (n, d, k) = (self.n, self.d, self.k);
        let width = self.block_width();
        let blocks = n.div_ceil(L);
        let inverse_pivots: Vec<f64> = (0..k * d)
            .map(|at| self.chol[(at / d) * d * d + (at % d) * (d + 1)].recip())
            .collect();
        let block_rows = |blocks: Range<usize>, out: &mut [MaybeUninit<f64>]| {
            for value in out.iter_mut() {
                value.write(0.0);
            }
            // SAFETY: every value was just written.
            let out = unsafe { out.assume_init_mut() };
            #[cfg(target_arch = "x86_64")]
            match Isa::best(LANES) {
                // SAFETY (both): Isa::best only names instruction sets this CPU has.
                Isa::Avx512 => {
                    return unsafe { self.blocks_avx512(grad, &inverse_pivots, blocks, out) };
                }
                Isa::Avx2 => return unsafe { self.blocks_fma(grad, &inverse_pivots, blocks, out) },
                Isa::Portable => {}
            }
            self.blocks_body::<false>(grad, &inverse_pivots, blocks, out)
        };
        // Per sample and component, a forward and a back substitution and L̄'s triangle: a
        // few multiply-adds per entry of the factor.
        let work_per_block = L * k * d * d * 4;
        // SAFETY: `block_rows` writes every value of its rows (zeros first).
        let rows = unsafe {
            helper_threads::rows_written_in_chunks(blocks, width, work_per_block, &block_rows)
        };
        let mut z_bar = Vec::with_capacity(n * d);
        let mut mu_bar = vec![0.0; k * d];
        let mut chol_bar = vec![0.0; k * d * d];
        let mut log_norm_bar = vec![0.0; k];
        for (block, row) in rows.chunks_exact(width.max(1)).enumerate() {
            let used = L.min(n - block * L);
            let (z_part, shares) = row.split_at(L * d);
            z_bar.extend_from_slice(&z_part[..used * d]);
            let (log_norm_shares, rest) = shares.split_at(k);
            let (chol_shares, mu_shares) = rest.split_at(k * d * d);
            for (total, share) in log_norm_bar.iter_mut().zip(log_norm_shares) {
                *total -= share;
            }
            for c in 0..k {
                for j in 0..d {
                    for p in 0..=j {
                        chol_bar[c * d * d + j * d + p] -= chol_shares[c * d * d + j * d + p];
                    }
                }
            }
            for (total, share) in mu_bar.iter_mut().zip(mu_shares) {
                *total -= share;
            }
        }
        [z_bar, mu_bar, chol_bar, log_norm_bar]
    }

    /// Values in a block's row: its samples' z̄ (`GRADIENT_LANES` × d), then its shares of
    /// log_norm̄ (k), L̄ (k × d × d, lower triangle) and μ̄ (k × d), each to be subtracted.
    fn block_width(&self) -> usize {
        let (d, k) = (self.d, self.k);
        GRADIENT_LANES * d + k + k * d * d + k * d
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma,avx2")]
    fn blocks_avx512(
        &self,
        grad: &[f64],
        inverse_pivots: &[f64],
        blocks: Range<usize>,
        out: &mut [f64],
    ) {
        self.blocks_body::<true>(grad, inverse_pivots, blocks, out)
    }

    /// The blocks' rows compiled for AVX2 with fused multiply-adds (the exp below uses them).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma,avx2")]
    fn blocks_fma(
        &self,
        grad: &[f64],
        inverse_pivots: &[f64],
        blocks: Range<usize>,
        out: &mut [f64],
    ) {
        self.blocks_body::<false>(grad, inverse_pivots, blocks, out)
    }

    /// The rows ([`Mixture::block_width`]) of `blocks`, in `out`, which starts zeroed;
    /// `AVX512` where the caller runs with AVX-512F, whose exp takes the eight lanes at once.
    #[inline(always)]
    fn blocks_body<const AVX512: bool>(
        &self,
        grad: &[f64],
        inverse_pivots: &[f64],
        blocks: Range<usize>,
        out: &mut [f64],
    ) {
        const L: usize = GRADIENT_LANES;
        let (n, d, k) = (self.n, self.d, self.k);
        let width = self.block_width();
        // L samples side by side, so every step below runs across lanes and vectorises.
        let mut y = [[[0f64; L]; MAX_Z_DIM]; MAX_GMM_K];
        let mut log_terms = [[0f64; L]; MAX_GMM_K];
        let mut r_bar = [[0f64; L]; MAX_Z_DIM];
        for (block, row) in blocks.zip(out.chunks_exact_mut(width)) {
            // z̄ of the block's samples, lane by lane: the components' r̄ added in order, then
            // written out once (the row starts at zero, as this does).
            let mut z_bar_lanes = [[0f64; L]; MAX_Z_DIM];
            let start = block * L;
            let used = L.min(n - start);
            let (z_bar, shares) = row.split_at_mut(L * d);
            let (log_norm_shares, rest) = shares.split_at_mut(k);
            let (chol_shares, mu_shares) = rest.split_at_mut(k * d * d);
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
                let shifted = std::array::from_fn(|r| log_terms[c][r] - best[r]);
                log_terms[c] = exp_lanes::<AVX512>(shifted);
                for r in 0..L {
                    total[r] += log_terms[c][r];
                }
            }
            for c in 0..k {
                let l = &self.chol[c * d * d..(c + 1) * d * d];
                // ∂E/∂log_term_c = −w_c, so log_term_c's gradient is −g·w_c and ‖y_c‖²'s g·w_c/2.
                let gw: [f64; L] = std::array::from_fn(|r| g[r] * log_terms[c][r] / total[r]);
                log_norm_shares[c] = gw.iter().sum::<f64>();
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
                        chol_shares[c * d * d + j * d + p] = sum;
                    }
                    for r in 0..L {
                        z_bar_lanes[j][r] += r_bar[j][r];
                    }
                    mu_shares[c * d + j] = r_bar[j].iter().sum::<f64>();
                }
            }
            for (r, z_bar) in z_bar.chunks_exact_mut(d).take(used).enumerate() {
                for (j, z_bar) in z_bar.iter_mut().enumerate() {
                    *z_bar = z_bar_lanes[j][r];
                }
            }
        }
    }
}

/// [`exp_non_positive`] of a block's lanes, in one AVX-512 register where `AVX512` (the
/// caller runs with AVX-512F): the same bits either way.
#[inline(always)]
fn exp_lanes<const AVX512: bool>(t: [f64; GRADIENT_LANES]) -> [f64; GRADIENT_LANES] {
    #[cfg(target_arch = "x86_64")]
    if AVX512 {
        // SAFETY: AVX512 is set only where the caller runs with AVX-512F.
        return unsafe { exp_non_positive_avx512(t) };
    }
    exp_non_positive(t)
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
pub(crate) fn energy_gradients(
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn energies_and_their_gradients_split_over_helpers_give_the_same_bits() {
        // A KDDCUP99-sized batch (not a whole number of blocks), four components in three
        // dimensions.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, d, k) = (1021, 3, 4);
        let mut random = |count: usize| -> Vec<f64> {
            (0..count).map(|_| rng.random_range(-1.0..1.0)).collect()
        };
        let mut chol = random(k * d * d);
        for c in 0..k {
            for j in 0..d {
                chol[c * d * d + j * d + j] = 0.5 + chol[c * d * d + j * d + j].abs();
                for p in j + 1..d {
                    chol[c * d * d + j * d + p] = 0.0;
                }
            }
        }
        let mixture = Mixture {
            n,
            d,
            k,
            z: random(n * d),
            mu: random(k * d),
            chol,
            log_norm: random(k),
        };
        let grad = random(n);
        let energies = mixture.energies();
        assert!(energies.len() == n && energies.iter().all(|e| e.is_finite()));
        let whole = mixture.gradients(&grad);
        assert_eq!(whole.each_ref().map(Vec::len), [n * d, k * d, k * d * d, k]);
        assert!(whole.iter().flatten().all(|v| v.is_finite()));
        let blocks = n.div_ceil(GRADIENT_LANES);
        for helpers in [1, 3] {
            let _lent = helper_threads::lend_unpinned(helpers);
            let work = blocks * GRADIENT_LANES * k * d * d * 4;
            assert!(helper_threads::chunks_worth(work) > 1, "split");
            // Compared whole: a mismatch would print thousand-value buffers.
            assert!(mixture.gradients(&grad) == whole, "{helpers} helpers");
            assert!(mixture.energies() == energies, "{helpers} helpers");
        }
        // Each instruction set's copy of the blocks (AVX-512's with its own exp) alike.
        for isa in Isa::available() {
            let (gradients, isa_energies) =
                isa.capped(|| (mixture.gradients(&grad), mixture.energies()));
            assert!(gradients == whole, "{isa:?}");
            assert!(isa_energies == energies, "{isa:?}");
        }
    }
}
