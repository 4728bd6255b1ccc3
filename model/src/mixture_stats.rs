//! The mixture's weights, means and covariances from memberships (paper eq. 5), recorded as a
//! single autodiff step:
//! s_c = Σ_i γ_ic + ε, φ_c = s_c / n, μ_c = Σ_i γ_ic z_i / s_c,
//! Σ_c = Σ_i γ_ic (z_i − μ_c)(z_i − μ_c)ᵀ / s_c.
//!
//! Composed from burn's operations this built and differentiated `[n, k, d]` tensors; here each
//! pass is two loops over the samples, in f64 whatever the element type. The output packs the
//! three per component, `[k, 1 + d + d·d]`; [`crate::gmm::gmm_stats`] slices them apart.

// Index loops read closest to the formulas.
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

use crate::gmm::MIN_WEIGHT;
use crate::helper_threads;
use crate::scorer::{Isa, on_isa};
use crate::step_support::{from_f64, register_gradients, to_f64};

#[backend_extension(Flex, Autodiff)]
pub trait MixtureStatsBackend: Backend {
    /// `[k, 1 + d + d·d]`: φ_c, μ_c and row-major Σ_c of each component, from z `[n, d]` and
    /// memberships γ `[n, k]`.
    fn mixture_stats(z: FloatTensor<Self>, gamma: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `[k, 1 + d + d·d]`: each component's weight, mean and row-major covariance.
pub fn mixture_stats(z: Tensor<2>, gamma: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as MixtureStatsBackend>::mixture_stats(
        z.into_dispatch(),
        gamma.into_dispatch(),
    ))
}

/// The inputs as plain f64 values, and the statistics.
struct Stats {
    n: usize,
    d: usize,
    k: usize,
    z: Vec<f64>,
    gamma: Vec<f64>,
    /// s_c, `[k]`.
    sums: Vec<f64>,
    /// μ, `[k, d]`.
    mu: Vec<f64>,
    /// Σ, `[k, d, d]`.
    cov: Vec<f64>,
}

/// Components summed side by side: four f64 lanes, one AVX2 register.
const LANES: usize = 4;
type Lanes = [f64; LANES];

/// Each component's s, μ and Σ (row-major), one after another.
type Moments = (Vec<f64>, Vec<f64>, Vec<f64>);

/// s, μ and Σ (row-major) for codes of width D.
fn moments<const D: usize>(z: &[f64], gamma: &[f64], k: usize) -> Moments {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.supported() {
        // SAFETY: this CPU has AVX2.
        return unsafe { moments_avx2::<D>(z, gamma, k) };
    }
    moments_in_lanes::<D>(z, gamma, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn moments_avx2<const D: usize>(z: &[f64], gamma: &[f64], k: usize) -> Moments {
    moments_in_lanes::<D>(z, gamma, k)
}

/// [`moments`] for up to four components at a time, each in a lane of its own. Each sum still
/// runs down the samples in order, one rounding per step as in a loop over one component, so
/// the lanes change the speed (11.7 → 7.8 µs for a KDDCUP99 batch, alone on the fit's thread)
/// and not a bit.
#[inline(always)]
fn moments_in_lanes<const D: usize>(z: &[f64], gamma: &[f64], k: usize) -> Moments {
    let codes = z.as_chunks::<D>().0;
    let (mut sums, mut mu, mut cov) = (vec![0f64; k], vec![0f64; k * D], vec![0f64; k * D * D]);
    for first in (0..k).step_by(LANES) {
        let width = (k - first).min(LANES);
        // Lanes past the last component weigh nothing and are dropped below.
        let weights = |gi: &[f64]| -> Lanes {
            std::array::from_fn(|l| if l < width { gi[first + l] } else { 0.0 })
        };
        let mut s: Lanes = [MIN_WEIGHT; LANES];
        let mut m = [[0f64; LANES]; D];
        for (zi, gi) in codes.iter().zip(gamma.chunks_exact(k)) {
            let g = weights(gi);
            for l in 0..LANES {
                s[l] += g[l];
            }
            for j in 0..D {
                for l in 0..LANES {
                    m[j][l] += g[l] * zi[j];
                }
            }
        }
        for m_j in &mut m {
            for l in 0..LANES {
                m_j[l] /= s[l];
            }
        }
        let mut c = [[[0f64; LANES]; D]; D];
        for (zi, gi) in codes.iter().zip(gamma.chunks_exact(k)) {
            let g = weights(gi);
            let r: [Lanes; D] = std::array::from_fn(|j| std::array::from_fn(|l| zi[j] - m[j][l]));
            for a in 0..D {
                let weighted: Lanes = std::array::from_fn(|l| g[l] * r[a][l]);
                for b in 0..D {
                    for l in 0..LANES {
                        c[a][b][l] += weighted[l] * r[b][l];
                    }
                }
            }
        }
        for l in 0..width {
            let component = first + l;
            sums[component] = s[l];
            for j in 0..D {
                mu[component * D + j] = m[j][l];
                for b in 0..D {
                    cov[(component * D + j) * D + b] = c[j][b][l] / s[l];
                }
            }
        }
    }
    (sums, mu, cov)
}

/// [`Stats::gradients`] for codes of width D.
fn stats_gradients<const D: usize>(stats: &Stats, grad: &[f64]) -> [Vec<f64>; 2] {
    stats_gradients_in_lanes::<D, ROW_LANES>(stats, grad)
}

/// [`Stats::gradients`] with L rows side by side in [`gradient_rows`] (one: row by row).
fn stats_gradients_in_lanes<const D: usize, const L: usize>(
    stats: &Stats,
    grad: &[f64],
) -> [Vec<f64>; 2] {
    let (n, k) = (stats.n, stats.k);
    let width = 1 + D + D * D;
    let codes = stats.z.as_chunks::<D>().0;
    let mu = stats.mu.as_chunks::<D>().0;
    // Per component: S̄ (the covariance gradient), Ŝ = S̄ + S̄ᵀ, M̄ and ⟨S̄, Σ⟩.
    let mut cov_bar = vec![[[0f64; D]; D]; k];
    let mut symmetric = vec![[[0f64; D]; D]; k];
    let mut mu_bar = vec![[0f64; D]; k];
    let mut cov_dot = vec![0f64; k];
    for c in 0..k {
        let g = &grad[c * width..(c + 1) * width];
        let cov = &stats.cov[c * D * D..(c + 1) * D * D];
        for a in 0..D {
            mu_bar[c][a] = g[1 + a];
            for b in 0..D {
                cov_bar[c][a][b] = g[1 + D + a * D + b];
                symmetric[c][a][b] = g[1 + D + a * D + b] + g[1 + D + b * D + a];
                cov_dot[c] += g[1 + D + a * D + b] * cov[a * D + b];
            }
        }
    }
    // Σ's dependence on μ: M̄' = M̄ − Ŝ (Σ_i γ_ic r_ic) / s (the sum is zero up to the ε in s).
    let mut weighted_residuals = vec![[0f64; D]; k];
    for (zi, gi) in codes.iter().zip(stats.gamma.chunks_exact(k)) {
        for ((&g, mu_c), w) in gi.iter().zip(mu).zip(&mut weighted_residuals) {
            for j in 0..D {
                w[j] += g * (zi[j] - mu_c[j]);
            }
        }
    }
    for c in 0..k {
        for a in 0..D {
            let mut through_cov = 0.0;
            for b in 0..D {
                through_cov += symmetric[c][a][b] * weighted_residuals[c][b];
            }
            mu_bar[c][a] -= through_cov / stats.sums[c];
        }
    }
    let inverse_sums: Vec<f64> = stats.sums.iter().map(|s| s.recip()).collect();
    let phi_bar: Vec<f64> = (0..k).map(|c| grad[c * width] / n as f64).collect();
    // Rows are independent, so a fit's spare cores take chunks of them: each writes its rows
    // of z̄ and, through `gamma_bar_at`, of γ̄.
    let mut gamma_bar: Vec<f64> = Vec::with_capacity(n * k);
    let gamma_bar_at = helper_threads::SharedBuffer::spare_of(&mut gamma_bar);
    let per_component = PerComponent {
        mu,
        symmetric: &symmetric,
        cov_bar: &cov_bar,
        mu_bar: &mu_bar,
        cov_dot: &cov_dot,
        inverse_sums: &inverse_sums,
        phi_bar: &phi_bar,
    };
    let write_gamma_bar = |row: usize, c: usize, value: f64| {
        // SAFETY: the row's γ̄ lies inside the n·k values reserved, and each row is one
        // chunk's alone.
        unsafe { (*gamma_bar_at.add(row * k + c)).write(value) };
    };
    // Eight f64 lanes take an AVX-512 register (sixteen f32 lanes).
    let isa = Isa::best(2 * L);
    let rows_of = |rows: Range<usize>, z_bar_rows: &mut [MaybeUninit<f64>]| {
        on_isa!(isa, || {
            let mut start = rows.start;
            for z_bar_block in z_bar_rows.chunks_mut(L * D) {
                let block = start..start + z_bar_block.len() / D;
                if block.len() == L {
                    let z_bar = gradient_rows::<D, L>(
                        &per_component,
                        &codes[block.clone()],
                        &stats.gamma[block.start * k..block.end * k],
                        |r, c, value| write_gamma_bar(block.start + r, c, value),
                    );
                    write_lanes(&z_bar, z_bar_block);
                } else {
                    // The rows after the last whole block, one at a time.
                    for (r, z_bar_row) in z_bar_block.chunks_exact_mut(D).enumerate() {
                        let row = block.start + r;
                        let gamma_bar_of = |_, c, value| write_gamma_bar(row, c, value);
                        let z_bar = gradient_rows::<D, 1>(
                            &per_component,
                            &codes[row..row + 1],
                            &stats.gamma[row * k..(row + 1) * k],
                            gamma_bar_of,
                        );
                        write_lanes(&z_bar, z_bar_row);
                    }
                }
                start = block.end;
            }
        })
    };
    // SAFETY: `rows_of` writes each row's D values of z̄.
    let z_bar = unsafe { helper_threads::rows_written_in_chunks(n, D, 4 * k * D * D, &rows_of) };
    // SAFETY: the chunks covered every row, each writing the row's k values of γ̄.
    unsafe { gamma_bar.set_len(n * k) };
    [z_bar, gamma_bar]
}

/// Rows side by side in [`gradient_rows`]: eight f64 fill an AVX-512 register.
const ROW_LANES: usize = 8;

/// What every row's z̄ and γ̄ take of each component: μ, Ŝ, S̄, M̄', ⟨S̄, Σ⟩, 1/s and φ̄.
struct PerComponent<'a, const D: usize> {
    mu: &'a [[f64; D]],
    symmetric: &'a [[[f64; D]; D]],
    cov_bar: &'a [[[f64; D]; D]],
    mu_bar: &'a [[f64; D]],
    cov_dot: &'a [f64],
    inverse_sums: &'a [f64],
    phi_bar: &'a [f64],
}

/// z̄ of L rows (`codes`, with memberships `gamma`) side by side, lane r holding row r, with
/// each γ̄ handed to `gamma_bar_of(r, c, value)`. Each lane does one row's multiplies and adds
/// in the order of a loop over that row alone, so the lanes change the speed, not a bit.
#[inline(always)]
fn gradient_rows<const D: usize, const L: usize>(
    per: &PerComponent<'_, D>,
    codes: &[[f64; D]],
    gamma: &[f64],
    gamma_bar_of: impl Fn(usize, usize, f64),
) -> [[f64; L]; D] {
    let k = per.inverse_sums.len();
    let mut z_bar = [[0f64; L]; D];
    for c in 0..k {
        let inverse_sum = per.inverse_sums[c];
        let (symmetric, cov_bar, mu_bar) = (&per.symmetric[c], &per.cov_bar[c], &per.mu_bar[c]);
        let g: [f64; L] = std::array::from_fn(|r| gamma[r * k + c]);
        let residual: [[f64; L]; D] =
            std::array::from_fn(|j| std::array::from_fn(|r| codes[r][j] - per.mu[c][j]));
        let mut value = [per.phi_bar[c] - per.cov_dot[c] * inverse_sum; L];
        for a in 0..D {
            let mut through_cov = [0f64; L];
            let mut quadratic = [0f64; L];
            for b in 0..D {
                for r in 0..L {
                    through_cov[r] += symmetric[a][b] * residual[b][r];
                    quadratic[r] += cov_bar[a][b] * residual[b][r];
                }
            }
            for r in 0..L {
                z_bar[a][r] += g[r] * (mu_bar[a] + through_cov[r]) * inverse_sum;
                value[r] += (mu_bar[a] + quadratic[r]) * residual[a][r] * inverse_sum;
            }
        }
        for (r, &value) in value.iter().enumerate() {
            gamma_bar_of(r, c, value);
        }
    }
    z_bar
}

/// Lane r of each of the D rows of `lanes` into row r of `out` (L rows of D values).
#[inline(always)]
fn write_lanes<const D: usize, const L: usize>(
    lanes: &[[f64; L]; D],
    out: &mut [MaybeUninit<f64>],
) {
    for (r, row) in out.chunks_exact_mut(D).enumerate() {
        for (out, lane) in row.iter_mut().zip(lanes) {
            out.write(lane[r]);
        }
    }
}

/// Calls `$function::<D>(args)` with the const D equal to the code width `$d`, so that the
/// loops over a code's dimensions unroll. The width is at most
/// [`MAX_Z_DIM`](crate::config::MAX_Z_DIM), which the network configuration enforces.
macro_rules! with_code_width {
    ($d:expr, $function:ident, ($($arg:expr),*)) => {
        match $d {
            1 => $function::<1>($($arg),*),
            2 => $function::<2>($($arg),*),
            3 => $function::<3>($($arg),*),
            4 => $function::<4>($($arg),*),
            5 => $function::<5>($($arg),*),
            6 => $function::<6>($($arg),*),
            7 => $function::<7>($($arg),*),
            8 => $function::<8>($($arg),*),
            9 => $function::<9>($($arg),*),
            10 => $function::<10>($($arg),*),
            11 => $function::<11>($($arg),*),
            12 => $function::<12>($($arg),*),
            d => unreachable!("code width {d} above MAX_Z_DIM"),
        }
    };
}

impl Stats {
    fn new(z: Vec<f64>, gamma: Vec<f64>, n: usize, d: usize, k: usize) -> Self {
        let (sums, mu, cov) = with_code_width!(d, moments, (&z, &gamma, k));
        Self {
            n,
            d,
            k,
            z,
            gamma,
            sums,
            mu,
            cov,
        }
    }

    /// The statistics a forward pass packed, instead of computing them again.
    fn unpack(z: Vec<f64>, gamma: Vec<f64>, packed: &[f64], n: usize, d: usize, k: usize) -> Self {
        let width = 1 + d + d * d;
        let component = |c: usize| &packed[c * width..(c + 1) * width];
        Self {
            n,
            d,
            k,
            z,
            gamma,
            sums: (0..k).map(|c| component(c)[0] * n as f64).collect(),
            mu: (0..k)
                .flat_map(|c| component(c)[1..1 + d].to_vec())
                .collect(),
            cov: (0..k)
                .flat_map(|c| component(c)[1 + d..].to_vec())
                .collect(),
        }
    }

    fn packed(&self) -> Vec<f64> {
        let (n, d) = (self.n, self.d);
        (0..self.k)
            .flat_map(|c| {
                std::iter::once(self.sums[c] / n as f64)
                    .chain(self.mu[c * d..(c + 1) * d].iter().copied())
                    .chain(self.cov[c * d * d..(c + 1) * d * d].iter().copied())
            })
            .collect()
    }

    /// The gradients with respect to z and γ for the packed output gradient `grad`.
    ///
    /// With r_ic = z_i − μ_c and S̄_c + S̄_cᵀ = Ŝ_c (S̄ the covariance gradient):
    /// - μ's gradient, including Σ's dependence on μ: M̄'_c = M̄_c − Ŝ_c (Σ_i γ_ic r_ic) / s_c;
    /// - ∂/∂γ_ic = Φ̄_c / n + M̄'_c · r_ic / s_c + ⟨S̄_c, r_ic r_icᵀ − Σ_c⟩ / s_c;
    /// - ∂/∂z_i = Σ_c γ_ic (M̄'_c + Ŝ_c r_ic) / s_c.
    fn gradients(&self, grad: &[f64]) -> [Vec<f64>; 2] {
        with_code_width!(self.d, stats_gradients, (self, grad))
    }
}

fn stats(z: &FlexTensor, gamma: &FlexTensor) -> Stats {
    let [n, d] = z.shape().dims();
    let k = gamma.shape().dims::<2>()[1];
    Stats::new(to_f64(z), to_f64(gamma), n, d, k)
}

impl MixtureStatsBackend for Flex {
    fn mixture_stats(z: FlexTensor, gamma: FlexTensor) -> FlexTensor {
        let s = stats(&z, &gamma);
        from_f64(s.packed(), [s.k, 1 + s.d + s.d * s.d], z.dtype())
    }
}

/// Gradients of Σ grad ⊙ stats with respect to z and γ, given the forward pass's `stats`.
pub(crate) fn stats_backward(
    z: FlexTensor,
    gamma: FlexTensor,
    stats: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [n, d] = z.shape().dims();
    let k = gamma.shape().dims::<2>()[1];
    let s = Stats::unpack(to_f64(&z), to_f64(&gamma), &to_f64(&stats), n, d, k);
    let [z_bar, gamma_bar] = s.gradients(&to_f64(&grad));
    (
        from_f64(z_bar, [n, d], z.dtype()),
        from_f64(gamma_bar, [n, k], gamma.dtype()),
    )
}

#[derive(Debug)]
struct StatsStep;

impl Backward<Flex, 2> for StatsStep {
    /// z and γ, checkpointed, and the statistics computed from them.
    type State = ([NodeId; 2], FlexTensor);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (inputs, stats) = ops.state;
        let [z, gamma] = inputs.map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
        let (z_bar, gamma_bar) = stats_backward(z, gamma, stats, grad);
        register_gradients(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [z_bar, gamma_bar],
        );
    }
}

impl<C: CheckpointStrategy> MixtureStatsBackend for Autodiff<Flex, C> {
    fn mixture_stats(z: FloatTensor<Self>, gamma: FloatTensor<Self>) -> FloatTensor<Self> {
        match StatsStep
            .prepare::<C>([z.node(), gamma.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let inputs = [&z, &gamma].map(|t| prep.checkpoint(t));
                let output = Flex::mixture_stats(z.into_primitive(), gamma.into_primitive());
                prep.finish((inputs, output.clone()), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::mixture_stats(
                z.into_primitive(),
                gamma.into_primitive(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmm::gmm_stats;
    use crate::testing::{assert_close_to_reference, leaf};
    use burn::tensor::activation::softmax;
    use burn::tensor::{DType, Device, TensorData};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// φ, μ, Σ as burn's general operations compute them: the reference for the fused step.
    fn composed(z: Tensor<2>, gamma: Tensor<2>) -> [Tensor<1>; 3] {
        let [n, d] = z.dims();
        let k = gamma.dims()[1];
        let gamma_sum = gamma.clone().sum_dim(0).add_scalar(MIN_WEIGHT); // [1, k]
        // Divided by a tensor: div_scalar's gradient rounds 1/n to f32, even for f64 tensors.
        let count = Tensor::<2>::full([1, k], n as f64, &z.device()).cast(z.dtype());
        let phi = (gamma_sum.clone() / count).reshape([k]);
        let mu = gamma.clone().transpose().matmul(z.clone()) / gamma_sum.clone().reshape([k, 1]);
        let centred = z.unsqueeze_dim::<3>(1) - mu.clone().unsqueeze_dim::<3>(0); // [n, k, d]
        let weighted = centred.clone() * gamma.unsqueeze_dim::<3>(2);
        let cov = weighted.permute([1, 2, 0]).matmul(centred.swap_dims(0, 1))
            / gamma_sum.reshape([k, 1, 1]);
        [phi, mu.reshape([k * d]), cov.reshape([k * d * d])]
    }

    /// The statistics and the gradients of a weighted sum of them with respect to z and the
    /// membership logits.
    fn stats_and_gradients(fused: bool, dtype: DType) -> [Vec<f64>; 5] {
        let (n, d, k) = (50, 3, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut draw = |count: usize| -> Vec<f64> {
            (0..count).map(|_| rng.random_range(-2.0..2.0)).collect()
        };
        let device = Device::flex().autodiff();
        let z = leaf(draw(n * d), [n, d], dtype, &device);
        let logits = leaf(draw(n * k), [n, k], dtype, &device);
        let gamma = softmax(logits.clone(), 1);
        let [phi, mu, cov] = if fused {
            let s = gmm_stats(z.clone(), gamma);
            [s.phi, s.mu.reshape([k * d]), s.cov.reshape([k * d * d])]
        } else {
            composed(z.clone(), gamma)
        };
        let weights = |len: usize, draw: &mut dyn FnMut(usize) -> Vec<f64>| {
            Tensor::<1>::from_data(TensorData::new(draw(len), [len]), &device).cast(dtype)
        };
        let loss = (phi.clone() * weights(k, &mut draw)).sum()
            + (mu.clone() * weights(k * d, &mut draw)).sum()
            + (cov.clone() * weights(k * d * d, &mut draw)).sum();
        let grads = loss.backward();
        let values = |t: Tensor<1>| {
            t.into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .unwrap()
        };
        let grad = |t: &Tensor<2>| {
            let [rows, cols] = t.dims();
            values(t.grad(&grads).unwrap().reshape([rows * cols]))
        };
        [
            values(phi),
            values(mu),
            values(cov),
            grad(&z),
            grad(&logits),
        ]
    }

    #[test]
    fn fused_stats_match_the_composed_operations_and_their_gradients() {
        // f64: the two differ by rounding only. f32: training's precision.
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            assert_close_to_reference(
                &["phi", "mu", "cov", "dz", "dlogits"],
                &stats_and_gradients(true, dtype),
                &stats_and_gradients(false, dtype),
                tolerance,
            );
        }
    }

    /// One component at a time, each sum down the samples: what the lanes must give, bit for
    /// bit.
    fn moments_one_by_one<const D: usize>(z: &[f64], gamma: &[f64], k: usize) -> Moments {
        let codes = z.as_chunks::<D>().0;
        let (mut sums, mut mu, mut cov) = (vec![], vec![], vec![]);
        for c in 0..k {
            let members = || codes.iter().zip(gamma.chunks_exact(k).map(|gi| gi[c]));
            let s = members().fold(MIN_WEIGHT, |s, (_, g)| s + g);
            let m: [f64; D] =
                std::array::from_fn(|j| members().fold(0.0, |sum, (zi, g)| sum + g * zi[j]) / s);
            for a in 0..D {
                for b in 0..D {
                    let sum = members().fold(0.0, |sum, (zi, g)| {
                        sum + g * (zi[a] - m[a]) * (zi[b] - m[b])
                    });
                    cov.push(sum / s);
                }
            }
            sums.push(s);
            mu.extend(m);
        }
        (sums, mu, cov)
    }

    #[test]
    fn components_summed_in_lanes_give_each_component_s_own_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let n = 203;
        let z: Vec<f64> = (0..n * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Four components fill one group of lanes; five and two leave some lanes empty.
        for k in [4, 5, 2] {
            let gamma: Vec<f64> = (0..n * k).map(|_| rng.random_range(0.0..1.0)).collect();
            let want = moments_one_by_one::<3>(&z, &gamma, k);
            assert!(moments::<3>(&z, &gamma, k) == want, "k = {k}");
            assert!(
                moments_in_lanes::<3>(&z, &gamma, k) == want,
                "k = {k}, portable"
            );
        }
    }

    #[test]
    fn gradients_split_over_helpers_give_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (n, d, k) = (1021, 3, 4);
        let z: Vec<f64> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let gamma: Vec<f64> = (0..n)
            .flat_map(|_| {
                let weights: Vec<f64> = (0..k).map(|_| rng.random_range(0.01..1.0)).collect();
                let total: f64 = weights.iter().sum();
                weights.into_iter().map(move |w| w / total)
            })
            .collect();
        let grad: Vec<f64> = (0..k * (1 + d + d * d))
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let stats = Stats::new(z, gamma, n, d, k);
        let whole = stats.gradients(&grad);
        assert_eq!(whole.each_ref().map(Vec::len), [n * d, n * k]);
        for helpers in [1, 3] {
            let _lent = helper_threads::lend_unpinned(helpers);
            assert!(helper_threads::chunks_worth(n * 4 * k * d * d) > 1, "split");
            // Compared whole: a mismatch would print thousand-value buffers.
            assert!(stats.gradients(&grad) == whole, "{helpers} helpers");
        }
        // Rows side by side give each row's own bits: row by row, and under each instruction
        // set's copy.
        assert!(
            stats_gradients_in_lanes::<3, 1>(&stats, &grad) == whole,
            "row by row"
        );
        for isa in Isa::available() {
            assert!(isa.capped(|| stats.gradients(&grad)) == whole, "{isa:?}");
        }
    }
}
