//! Gaussian mixture statistics and sample energy.
//!
//! Two forms of the same maths: a differentiable one on burn tensors used inside the training
//! loss, and one on scoring lanes used by the scorer (in f64 for the energies it reports, in
//! f32 for the energy drops behind the f32 contribution shares). Both factorise
//! Σ_k + cov_reg·I with Cholesky and take the log-sum-exp over components, so energies stay
//! finite far from every component.

// Index loops read closest to the textbook Cholesky and substitution formulas.
#![allow(clippy::needless_range_loop)]

use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::config::{MAX_GMM_K, MAX_Z_DIM};
use crate::fastmath::LaneFloat;
use crate::mixture_energy::mixture_energy;
use crate::mixture_factors::mixture_factors;
use crate::mixture_stats::mixture_stats;

const LN_2PI: f64 = 1.837_877_066_409_345_5;
/// Floor for mixture weights and membership sums, so an empty component gives log(φ) = −27.6,
/// not −∞, and its mean is not 0/0.
pub(crate) const MIN_WEIGHT: f64 = 1e-12;

/// Mixture parameters as differentiable tensors.
pub struct GmmTensors {
    /// Mixture weights φ, `[k]`.
    pub phi: Tensor<1>,
    /// Means μ, `[k, d]`.
    pub mu: Tensor<2>,
    /// Covariances Σ (without regularisation), `[k, d, d]`.
    pub cov: Tensor<3>,
}

/// φ, μ, Σ from memberships γ `[n, k]` and codes z `[n, d]` (paper eq. 5).
pub fn gmm_stats(z: Tensor<2>, gamma: Tensor<2>) -> GmmTensors {
    let d = z.dims()[1];
    let k = gamma.dims()[1];
    let packed = mixture_stats(z, gamma);
    GmmTensors {
        phi: packed.clone().slice([0..k, 0..1]).reshape([k]),
        mu: packed.clone().slice([0..k, 1..1 + d]),
        cov: packed
            .slice([0..k, 1 + d..1 + d + d * d])
            .reshape([k, d, d]),
    }
}

/// Per-sample energy E(z) = −log Σ_k φ_k N(z | μ_k, Σ_k + cov_reg·I), `[n]`, and the penalty
/// Σ_k φ_k Σ_j v_j / (Σ_k + cov_reg·I)_jj, where v_j is the variance of z_j over the batch.
///
/// Two changes to the paper's Σ_k Σ_j 1/Σ_kjj, both held constant for the gradient: dividing by
/// v_j makes the penalty independent of each dimension's scale (a well-trained autoencoder gives
/// reconstruction features with variances near 1e-4, for which 1/Σ_jj runs into the thousands,
/// and the fit then spreads z by wrecking the reconstruction); weighting by φ_k stops near-empty
/// components, whose variances are tiny, from dominating. It still grows without bound as a
/// component narrows onto a point, which is what the penalty is for.
pub fn energy(z: Tensor<2>, gmm: &GmmTensors, cov_reg: f64) -> (Tensor<1>, Tensor<1>) {
    let d = z.dims()[1];
    let k = gmm.phi.dims()[0];
    let spread = code_spread(&z, cov_reg);
    let factors = mixture_factors(gmm.phi.clone(), gmm.cov.clone(), spread, cov_reg);
    let chol = factors.clone().slice([0..k, 0..d * d]).reshape([k, d, d]);
    let log_norm = factors.clone().slice([0..k, d * d..d * d + 1]).reshape([k]);
    let penalty = factors.slice([0..k, d * d + 1..d * d + 2]).sum();
    let energies = mixture_energy(z, gmm.mu.clone(), chol, log_norm);
    (energies, penalty)
}

/// Each dimension's population variance over the batch (n, not n − 1, so a one-row batch gives
/// 0 rather than NaN) plus cov_reg, `[d]`, held constant for the gradient.
pub(crate) fn code_spread(z: &Tensor<2>, cov_reg: f64) -> Tensor<1> {
    let [n, d] = z.dims();
    let detached = z.clone().detach();
    if detached.dtype() == DType::F32 && n > 0 {
        // burn's operations below, value by value in their order (flex sums each column of a
        // first-dimension mean row after row), without a tensor operation per step: these
        // six took about 27 µs of a KDDCUP99 training step.
        let values = detached
            .into_data()
            .try_into_vec::<f32>()
            .expect("an f32 tensor holds f32 values");
        let spread = spread_f32(&values, n, d, cov_reg);
        return Tensor::from_data(TensorData::new(spread, [d]), &z.device());
    }
    let centred = detached.clone() - detached.mean_dim(0);
    (centred.clone() * centred)
        .mean_dim(0)
        .add_scalar(cov_reg)
        .reshape([d])
}

/// [`code_spread`] of f32 codes, `n` rows of `d`.
fn spread_f32(z: &[f32], n: usize, d: usize, cov_reg: f64) -> Vec<f32> {
    let count = n as f32;
    let mut mean = vec![0f32; d];
    for row in z.chunks_exact(d) {
        for (sum, &v) in mean.iter_mut().zip(row) {
            *sum += v;
        }
    }
    mean.iter_mut().for_each(|sum| *sum /= count);
    let mut spread = vec![0f32; d];
    for row in z.chunks_exact(d) {
        for ((sum, &v), &m) in spread.iter_mut().zip(row).zip(&mean) {
            let centred = v - m;
            *sum += centred * centred;
        }
    }
    spread
        .iter()
        .map(|&sum| sum / count + cov_reg as f32)
        .collect()
}

/// Fitted mixture parameters in f64, with each regularised covariance's Cholesky factor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GmmParams {
    pub k: usize,
    pub d: usize,
    pub phi: Vec<f64>,
    /// Means, `k` rows of `d`.
    pub mu: Vec<Vec<f64>>,
    /// Covariances without regularisation, `k` row-major `d × d` matrices.
    pub cov: Vec<Vec<f64>>,
    /// Added to each covariance diagonal before factorising.
    pub cov_reg: f64,
    /// Lower Cholesky factor of Σ_k + cov_reg·I, row-major `d × d`.
    pub chol: Vec<Vec<f64>>,
}

impl GmmParams {
    /// Build from φ, μ, Σ, factorising every regularised covariance.
    pub fn new(
        phi: Vec<f64>,
        mu: Vec<Vec<f64>>,
        cov: Vec<Vec<f64>>,
        cov_reg: f64,
    ) -> Result<Self, ModelError> {
        let k = phi.len();
        let d = mu.first().map_or(0, Vec::len);
        let shapes_ok = (1..=MAX_GMM_K).contains(&k)
            && (1..=MAX_Z_DIM).contains(&d)
            && mu.len() == k
            && cov.len() == k
            && mu.iter().all(|m| m.len() == d)
            && cov.iter().all(|c| c.len() == d * d);
        if !shapes_ok {
            return Err(ModelError::InvalidData(format!(
                "GMM parameters have inconsistent shapes (k = {k}, d = {d})"
            )));
        }
        let all_finite = phi
            .iter()
            .chain(mu.iter().flatten())
            .chain(cov.iter().flatten())
            .all(|v| v.is_finite());
        if !all_finite {
            return Err(ModelError::InvalidData(
                "GMM parameters contain NaN or infinity".into(),
            ));
        }
        let chol = cov
            .iter()
            .enumerate()
            .map(|(c, sigma)| {
                cholesky(sigma, d, cov_reg).ok_or_else(|| {
                    ModelError::InvalidData(format!(
                        "covariance of component {c} is not positive definite"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            k,
            d,
            phi,
            mu,
            cov,
            cov_reg,
            chol,
        })
    }

    /// Build from the tensors of [`gmm_stats`].
    pub fn from_tensors(t: &GmmTensors, cov_reg: f64) -> Result<Self, ModelError> {
        let [k, d] = t.mu.dims();
        let read = |data: TensorData| -> Vec<f64> {
            data.try_into_vec::<f32>()
                .expect("f32 tensor")
                .into_iter()
                .map(f64::from)
                .collect()
        };
        let phi = read(t.phi.to_data());
        let mu = read(t.mu.to_data())
            .chunks(d)
            .map(<[f64]>::to_vec)
            .collect();
        let cov = read(t.cov.to_data())
            .chunks(d * d)
            .map(<[f64]>::to_vec)
            .collect();
        let _ = k;
        Self::new(phi, mu, cov, cov_reg)
    }

    /// Energy of one code vector `z` (length `d`).
    pub fn energy(&self, z: &[f64]) -> f64 {
        let mut lanes = [[0f64; 1]; MAX_Z_DIM];
        for (l, &v) in lanes.iter_mut().zip(z) {
            l[0] = v;
        }
        LaneMixture::<f64>::new(self).energies::<1>(&lanes[..self.d])[0]
    }

    /// Per-component constant of the log density: log φ_k − log|L_k| − d/2·log 2π. Scorers
    /// compute it once per model instead of once per sample.
    pub fn log_norms(&self) -> Vec<f64> {
        (0..self.k)
            .map(|c| log_norm(self.phi[c], &self.chol[c], self.d))
            .collect()
    }
}

/// log φ − log|L| − d/2·log 2π for a component with weight φ and Cholesky factor L
/// (row-major `d × d`).
pub(crate) fn log_norm(phi: f64, chol: &[f64], d: usize) -> f64 {
    let half_log_det: f64 = (0..d).map(|j| chol[j * d + j].ln()).sum();
    phi.max(MIN_WEIGHT).ln() - half_log_det - 0.5 * d as f64 * LN_2PI
}

/// A mixture's parameters laid out for scoring lanes in one float type: f64 for the energies
/// reported, f32 for the energy drops that explain a verdict (a register holds twice the lanes,
/// and the polynomials are shorter).
#[derive(Debug, Clone)]
pub(crate) struct LaneMixture<T> {
    k: usize,
    d: usize,
    /// Means, `k × d`.
    mu: Vec<T>,
    /// Cholesky factors, `k` row-major `d × d` matrices.
    chol: Vec<T>,
    /// 1 / L_jj, `k × d`.
    inverse_pivots: Vec<T>,
    /// [`GmmParams::log_norms`].
    log_norms: Vec<T>,
}

impl<T: LaneFloat> LaneMixture<T> {
    pub(crate) fn new(gmm: &GmmParams) -> Self {
        Self::from_parts(
            gmm.d,
            &gmm.mu.concat(),
            &gmm.chol.concat(),
            &gmm.log_norms(),
        )
    }

    /// From means (`k × d`), row-major Cholesky factors (`k` of `d × d`) and
    /// [`GmmParams::log_norms`]; k is the number of log norms.
    pub(crate) fn from_parts(d: usize, mu: &[f64], chol: &[f64], log_norms: &[f64]) -> Self {
        let convert = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        let inverse_pivots: Vec<f64> = chol
            .chunks_exact(d * d)
            .flat_map(|l| (0..d).map(move |j| l[j * d + j].recip()))
            .collect();
        Self {
            k: log_norms.len(),
            d,
            mu: convert(mu),
            chol: convert(chol),
            inverse_pivots: convert(&inverse_pivots),
            log_norms: convert(log_norms),
        }
    }

    /// Energies of L codes side by side (`z[j][r]` is dimension j of code r): the mixture's
    /// negative log density by log-sum-exp, with branch-free `exp` and `ln` so the lanes
    /// vectorise. A code far from every component gets `T::MAX`, never infinity or NaN.
    #[inline(always)]
    pub(crate) fn energies<const L: usize>(&self, z: &[[T; L]]) -> [T; L] {
        let d = self.d;
        // Only the first k are written and read: zeroing all MAX_GMM_K for every block of
        // rows cost more than the mixture's arithmetic for small k.
        let mut log_components = [const { std::mem::MaybeUninit::<[T; L]>::uninit() }; MAX_GMM_K];
        let mut best = [T::NEG_INFINITY; L];
        // Forward substitution L y = z − μ_c (row j written before it is read), for each
        // component in turn; the Mahalanobis distance is |y|².
        let mut y = [[T::ZERO; L]; MAX_Z_DIM];
        for c in 0..self.k {
            let l = &self.chol[c * d * d..(c + 1) * d * d];
            let mu = &self.mu[c * d..(c + 1) * d];
            let mut maha = [T::ZERO; L];
            for j in 0..d {
                let inverse_pivot = self.inverse_pivots[c * d + j];
                // Each step runs across the lanes (so it vectorises), in the order a one-row
                // substitution takes: z_j − μ_j, then minus L_jp y_p for p ascending.
                let mut rhs = [T::ZERO; L];
                for r in 0..L {
                    rhs[r] = z[j][r] - mu[j];
                }
                for p in 0..j {
                    let l_jp = l[j * d + p];
                    for r in 0..L {
                        rhs[r] -= l_jp * y[p][r];
                    }
                }
                for r in 0..L {
                    y[j][r] = rhs[r] * inverse_pivot;
                    maha[r] += y[j][r] * y[j][r];
                }
            }
            let mut lc = [T::ZERO; L];
            for r in 0..L {
                lc[r] = self.log_norms[c] - T::HALF * maha[r];
                best[r] = best[r].max(lc[r]);
            }
            log_components[c].write(lc);
        }
        let mut sum = [T::ZERO; L];
        for lc in &log_components[..self.k] {
            // SAFETY: the loop above wrote each of the first k.
            let lc = unsafe { lc.assume_init_ref() };
            let mut shifted = [T::ZERO; L];
            for r in 0..L {
                shifted[r] = lc[r] - best[r];
            }
            let terms = T::exp_non_positive(shifted);
            for r in 0..L {
                sum[r] += terms[r];
            }
        }
        // The best component contributes exactly 1, so the sum lies in [1, K].
        let log_sum = T::ln_at_least_one(sum);
        let mut energies = [T::ZERO; L];
        for r in 0..L {
            let e = -(best[r] + log_sum[r]);
            energies[r] = if e.is_finite() { e } else { T::MAX };
        }
        energies
    }
}

/// Lower Cholesky factor of `sigma + reg·I` (row-major `d × d`); `None` if not positive definite.
pub fn cholesky(sigma: &[f64], d: usize, reg: f64) -> Option<Vec<f64>> {
    let (l, positive) = regularised_cholesky(sigma, d, reg);
    positive.then_some(l)
}

/// Lower Cholesky factor of `sigma + reg·I`, each pivot floored at `reg` (in exact arithmetic a
/// pivot is at least `reg`; the floor only absorbs rounding), and whether every pivot was
/// positive before the floor. Training's factor step and the fitted model's factors both come
/// from here, so they agree.
pub(crate) fn regularised_cholesky(sigma: &[f64], d: usize, reg: f64) -> (Vec<f64>, bool) {
    let mut l = vec![0.0; d * d];
    let mut positive = true;
    for j in 0..d {
        let mut pivot = sigma[j * d + j] + reg;
        for p in 0..j {
            pivot -= l[j * d + p] * l[j * d + p];
        }
        positive &= pivot > 0.0;
        let l_jj = pivot.max(reg).sqrt();
        l[j * d + j] = l_jj;
        for i in j + 1..d {
            let mut off = sigma[i * d + j];
            for p in 0..j {
                off -= l[i * d + p] * l[j * d + p];
            }
            l[i * d + j] = off / l_jj;
        }
    }
    (l, positive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spread_gives_burns_composed_variance_bit_for_bit() {
        use burn::tensor::Device;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let device = Device::flex().autodiff();
        for (n, d) in [(1024, 3), (1, 3), (37, 5), (200, 1)] {
            let values: Vec<f32> = (0..n * d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let z = Tensor::<2>::from_data(TensorData::new(values, [n, d]), &device);
            let centred = z.clone() - z.clone().mean_dim(0);
            let composed = (centred.clone() * centred)
                .mean_dim(0)
                .add_scalar(1e-6)
                .reshape([d]);
            let bits = |t: Tensor<1>| -> Vec<u32> {
                let values = t.into_data().try_into_vec::<f32>().unwrap();
                values.iter().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(code_spread(&z, 1e-6)), bits(composed), "[{n}, {d}]");
        }
    }

    /// The energy as burn's general operations compute it, from the same factors: the
    /// reference for the fused step.
    fn energy_composed(z: Tensor<2>, gmm: &GmmTensors, cov_reg: f64) -> (Tensor<1>, Tensor<1>) {
        let [n, d] = z.dims();
        let k = gmm.phi.dims()[0];
        let factors = factors(&z, gmm, cov_reg);
        let mut ys: Vec<Tensor<2>> = Vec::with_capacity(d);
        let mut mahalanobis = Tensor::<2>::zeros([n, k], &z.device()).cast(z.dtype());
        for j in 0..d {
            let mut rhs = z.clone().slice([0..n, j..j + 1])
                - gmm.mu.clone().slice([0..k, j..j + 1]).reshape([1, k]);
            for (p, y_p) in ys.iter().enumerate() {
                rhs = rhs - y_p.clone() * factors.l[j][p].clone().unwrap();
            }
            let y_j = rhs / factors.l[j][j].clone().unwrap();
            mahalanobis = mahalanobis + y_j.clone() * y_j.clone();
            ys.push(y_j);
        }
        let log_component = factors.log_norm - mahalanobis.mul_scalar(0.5);
        let shift = log_component.clone().max_dim(1).detach();
        let lse = (log_component - shift.clone()).exp().sum_dim(1).log() + shift;
        (lse.neg().reshape([n]), factors.penalty)
    }

    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    /// −log Σ_k φ_k N(z | μ_k, Σ_k) for 2-D components, from the explicit inverse and determinant.
    fn closed_form(z: [f64; 2], phi: &[f64], mu: &[[f64; 2]], cov: &[[f64; 4]]) -> f64 {
        let density: f64 = (0..phi.len())
            .map(|k| {
                let [a, b, c, d] = cov[k];
                let det = a * d - b * c;
                let (x, y) = (z[0] - mu[k][0], z[1] - mu[k][1]);
                let maha = (d * x * x - (b + c) * x * y + a * y * y) / det;
                phi[k] * (-0.5 * maha).exp() / (2.0 * std::f64::consts::PI * det.sqrt())
            })
            .sum();
        -density.ln()
    }

    fn known_mixture() -> (Vec<f64>, Vec<[f64; 2]>, Vec<[f64; 4]>) {
        (
            vec![0.3, 0.7],
            vec![[0.0, 0.0], [3.0, -1.0]],
            vec![[1.0, 0.4, 0.4, 0.5], [0.3, -0.1, -0.1, 2.0]],
        )
    }

    fn draw(n: usize) -> Vec<[f64; 2]> {
        let (phi, mu, cov) = known_mixture();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let normal = Normal::new(0.0, 1.0).unwrap();
        (0..n)
            .map(|_| {
                let k = usize::from(rng.random_range(0.0..1.0) > phi[0]);
                let l = cholesky(&cov[k], 2, 0.0).unwrap();
                let (e0, e1) = (normal.sample(&mut rng), normal.sample(&mut rng));
                [mu[k][0] + l[0] * e0, mu[k][1] + l[2] * e0 + l[3] * e1]
            })
            .collect()
    }

    #[test]
    fn f64_energy_matches_closed_form_density() {
        let (phi, mu, cov) = known_mixture();
        let params = GmmParams::new(
            phi.clone(),
            mu.iter().map(|m| m.to_vec()).collect(),
            cov.iter().map(|c| c.to_vec()).collect(),
            1e-12,
        )
        .unwrap();
        for z in draw(2000) {
            let expected = closed_form(z, &phi, &mu, &cov);
            assert!((params.energy(&z) - expected).abs() <= 1e-4 * expected.abs().max(1.0));
        }
    }

    #[test]
    fn burn_energy_matches_closed_form_density() {
        let (phi, mu, cov) = known_mixture();
        let device = Device::flex();
        let f = |v: Vec<f64>| v.into_iter().map(|e| e as f32).collect::<Vec<f32>>();
        let gmm = GmmTensors {
            phi: Tensor::from_data(TensorData::new(f(phi.clone()), [2]), &device),
            mu: Tensor::from_data(
                TensorData::new(f(mu.iter().flatten().copied().collect()), [2, 2]),
                &device,
            ),
            cov: Tensor::from_data(
                TensorData::new(f(cov.iter().flatten().copied().collect()), [2, 2, 2]),
                &device,
            ),
        };
        let samples = draw(2000);
        let z = Tensor::<2>::from_data(
            TensorData::new(f(samples.iter().flatten().copied().collect()), [2000, 2]),
            &device,
        );
        let (e, _) = energy(z, &gmm, 1e-9);
        let e = e.into_data().try_into_vec::<f32>().unwrap();
        for (z, e) in samples.iter().zip(e) {
            let expected = closed_form(*z, &phi, &mu, &cov);
            assert!(
                (f64::from(e) - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                "{e} vs {expected}"
            );
        }
    }

    fn identity(d: usize) -> TensorData {
        let mut v = vec![0f32; d * d];
        for i in 0..d {
            v[i * d + i] = 1.0;
        }
        TensorData::new(v, [d, d])
    }

    /// The Cholesky factors, log normalisers and penalty as burn's general operations compute
    /// them: with [`energy_composed`], the reference for the fused steps.
    struct Factors {
        /// Cholesky factor entries L_ij (i ≥ j) of Σ_k + cov_reg·I across components, each `[1, k]`.
        l: Vec<Vec<Option<Tensor<2>>>>,
        /// log φ_k − log|L_k| − d/2·log 2π, `[1, k]`.
        log_norm: Tensor<2>,
        /// The covariance penalty, `[1]`.
        penalty: Tensor<1>,
    }

    fn factors(z: &Tensor<2>, gmm: &GmmTensors, cov_reg: f64) -> Factors {
        let d = z.dims()[1];
        let k = gmm.phi.dims()[0];
        let device = z.device();
        // Work in z's element type (f32 in training, f64 for reference checks).
        let dtype = z.dtype();
        let zeros = |shape: [usize; 2]| Tensor::<2>::zeros(shape, &device).cast(dtype);
        let eye = Tensor::<2>::from_data(identity(d), &device)
            .cast(dtype)
            .unsqueeze_dim::<3>(0);
        let cov = gmm.cov.clone() + eye.mul_scalar(cov_reg);
        let entry = |i: usize, j: usize| {
            cov.clone()
                .slice([0..k, i..i + 1, j..j + 1])
                .reshape([1, k])
        };

        // Cholesky Σ = L Lᵀ entry by entry on [1, k] tensors: differentiable and tiny (d ≤ 12).
        // Each pivot is at least cov_reg in exact arithmetic; the clamp only absorbs f32 rounding.
        let mut l: Vec<Vec<Option<Tensor<2>>>> = vec![vec![None; d]; d];
        // Population variance (n, not n − 1), so a one-row batch gives 0 rather than NaN.
        let detached = z.clone().detach();
        let centred_z = detached.clone() - detached.mean_dim(0);
        let spread = (centred_z.clone() * centred_z)
            .mean_dim(0)
            .add_scalar(cov_reg); // [1, d]
        let mut inverse_diagonals = zeros([1, k]);
        for j in 0..d {
            let c_jj = entry(j, j);
            let v_j = spread.clone().slice([0..1, j..j + 1]); // [1, 1]
            inverse_diagonals = inverse_diagonals + v_j / c_jj.clone();
            let mut pivot = c_jj;
            for p in 0..j {
                let l_jp = l[j][p].clone().unwrap();
                pivot = pivot - l_jp.clone() * l_jp;
            }
            let l_jj = pivot.clamp_min(cov_reg).sqrt();
            for i in j + 1..d {
                let mut off = entry(i, j);
                for p in 0..j {
                    off = off - l[i][p].clone().unwrap() * l[j][p].clone().unwrap();
                }
                l[i][j] = Some(off / l_jj.clone());
            }
            l[j][j] = Some(l_jj);
        }
        let half_log_det = (0..d)
            .map(|j| l[j][j].clone().unwrap().log())
            .reduce(|sum, term| sum + term)
            .expect("d ≥ 1");
        let penalty = (inverse_diagonals * gmm.phi.clone().detach().reshape([1, k])).sum();
        let log_phi = gmm.phi.clone().clamp_min(MIN_WEIGHT).log().reshape([1, k]);
        let log_norm = log_phi - half_log_det - 0.5 * d as f64 * LN_2PI;
        Factors {
            l,
            log_norm,
            penalty,
        }
    }

    /// Energies, penalty and the gradients of a weighted loss with respect to z and the
    /// membership logits, through `gmm_stats` and either energy.
    fn energy_and_gradients(fused: bool, dtype: burn::tensor::DType) -> [Vec<f64>; 4] {
        use rand::{Rng, SeedableRng};
        let (n, d, k) = (64, 3, 4);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut draw = |count: usize, scale: f64| -> Vec<f64> {
            (0..count)
                .map(|_| rng.random_range(-scale..scale))
                .collect()
        };
        let device = Device::flex().autodiff();
        let tensor = |v: Vec<f64>, dims: [usize; 2]| crate::testing::leaf(v, dims, dtype, &device);
        let z = tensor(draw(n * d, 2.0), [n, d]);
        let logits = tensor(draw(n * k, 3.0), [n, k]);
        let weights =
            Tensor::<1>::from_data(TensorData::new(draw(n, 1.0), [n]), &device).cast(dtype);
        let stats = gmm_stats(
            z.clone(),
            burn::tensor::activation::softmax(logits.clone(), 1),
        );
        let (energies, penalty) = if fused {
            energy(z.clone(), &stats, 1e-2)
        } else {
            energy_composed(z.clone(), &stats, 1e-2)
        };
        let values = |t: Tensor<1>| {
            t.into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .unwrap()
        };
        let grads = ((energies.clone() * weights).sum() + penalty.clone()).backward();
        let grad =
            |t: &Tensor<2>| values(t.grad(&grads).unwrap().reshape([t.dims()[0] * t.dims()[1]]));
        [values(energies), values(penalty), grad(&z), grad(&logits)]
    }

    #[test]
    fn fused_energy_matches_the_composed_operations_and_their_gradients() {
        use burn::tensor::DType::{F32, F64};
        // f64: the two differ by rounding only. f32: training's precision.
        for (dtype, tolerance) in [(F64, 1e-10), (F32, 2e-4)] {
            let fused = energy_and_gradients(true, dtype);
            let composed = energy_and_gradients(false, dtype);
            let names = ["energy", "penalty", "dz", "dlogits"];
            crate::testing::assert_close_to_reference(&names, &fused, &composed, tolerance);
        }
    }

    #[test]
    fn stats_recover_the_mixture_from_hard_memberships() {
        let samples = draw(4000);
        let device = Device::flex();
        let (_, mu, _) = known_mixture();
        // Assign each sample to the nearer true mean: hard γ.
        let gamma: Vec<f32> = samples
            .iter()
            .flat_map(|s| {
                let d0 = (s[0] - mu[0][0]).powi(2) + (s[1] - mu[0][1]).powi(2);
                let d1 = (s[0] - mu[1][0]).powi(2) + (s[1] - mu[1][1]).powi(2);
                if d0 < d1 { [1.0, 0.0] } else { [0.0, 1.0] }
            })
            .collect();
        let z: Vec<f32> = samples.iter().flatten().map(|&v| v as f32).collect();
        let t = gmm_stats(
            Tensor::from_data(TensorData::new(z, [4000, 2]), &device),
            Tensor::from_data(TensorData::new(gamma, [4000, 2]), &device),
        );
        let p = GmmParams::from_tensors(&t, 1e-6).unwrap();
        assert!((p.phi[0] + p.phi[1] - 1.0).abs() < 1e-4);
        assert!((p.mu[1][0] - 3.0).abs() < 0.1 && (p.mu[1][1] + 1.0).abs() < 0.1);
    }

    #[test]
    fn energy_stays_finite_far_from_every_component() {
        let params = GmmParams::new(
            vec![0.5, 0.5],
            vec![vec![0.0, 0.0], vec![1.0, 1.0]],
            vec![vec![1e-3, 0.0, 0.0, 1e-3]; 2],
            1e-6,
        )
        .unwrap();
        for far in [1e2, 1e4, 1e6] {
            let e = params.energy(&[far, -far]);
            assert!(e.is_finite() && e > 1e3, "energy {e}");
        }
        let device = Device::flex();
        let gmm = GmmTensors {
            phi: Tensor::from_data(TensorData::new(vec![0.5f32, 0.5], [2]), &device),
            mu: Tensor::from_data(TensorData::new(vec![0f32, 0.0, 1.0, 1.0], [2, 2]), &device),
            cov: Tensor::from_data(
                TensorData::new(
                    vec![1e-3f32, 0.0, 0.0, 1e-3, 1e-3, 0.0, 0.0, 1e-3],
                    [2, 2, 2],
                ),
                &device,
            ),
        };
        let z = Tensor::<2>::from_data(TensorData::new(vec![1e3f32, -1e3], [1, 2]), &device);
        let (e, p) = energy(z, &gmm, 1e-6);
        let e = e.into_data().try_into_vec::<f32>().unwrap()[0];
        assert!(e.is_finite() && e > 1e3);
        assert!(p.into_data().try_into_vec::<f32>().unwrap()[0].is_finite());
    }

    #[test]
    fn singular_covariance_is_rescued_by_regularisation() {
        let singular = vec![vec![1.0, 1.0, 1.0, 1.0]];
        assert!(GmmParams::new(vec![1.0], vec![vec![0.0, 0.0]], singular.clone(), 0.0).is_err());
        let p = GmmParams::new(vec![1.0], vec![vec![0.0, 0.0]], singular, 1e-4).unwrap();
        assert!(p.energy(&[0.3, -0.3]).is_finite());
    }
}
