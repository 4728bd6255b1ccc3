//! A plain-Rust forward pass and energy, with no burn in the loop: what serving and batch
//! scoring use. It follows the burn graph operation by operation (f32 networks, f64 mixture),
//! and a test holds it to burn's energies.

use crate::DagmmModel;
use crate::config::MAX_Z_DIM;
use crate::gmm::GmmParams;
use crate::network::{LayerWeights, NORM_EPS};

/// Scores samples with a fitted model's weights. Cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Scorer {
    encoder: Vec<LayerWeights>,
    decoder: Vec<LayerWeights>,
    estimation: Vec<LayerWeights>,
    gmm: GmmParams,
    log_norms: Vec<f64>,
    input_dim: usize,
    latent_dim: usize,
    widest: usize,
}

/// Reusable buffers for one thread's scoring, so the hot loop never allocates.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    x_hat: Vec<f32>,
    /// Scaled input and counterfactual buffers for callers that build inputs per sample.
    pub x: Vec<f32>,
    pub counterfactual: Vec<f32>,
    /// The sample's reconstruction and per-metric shares, as left by `Explainer::assess`.
    pub expected: Vec<f32>,
    pub shares: Vec<f64>,
}

/// y = x W + b for a `[d_input, d_output]` row-major W, accumulated like burn's matmul
/// (fused multiply-adds from zero, bias added last) so both round the same way. Outputs are
/// taken eight at a time in a local accumulator that stays in a register; accumulating in the
/// output buffer made every step a store and a reload.
#[inline(always)]
fn linear(layer: &LayerWeights, input: &[f32], output: &mut Vec<f32>) {
    const LANES: usize = 8;
    let d_out = layer.d_output;
    output.clear();
    output.resize(d_out, 0.0);
    let mut o0 = 0;
    while o0 + LANES <= d_out {
        let mut acc = [0f32; LANES];
        for (i, &xi) in input.iter().enumerate() {
            let start = i * d_out + o0;
            let w: &[f32; LANES] = layer.weight[start..start + LANES]
                .try_into()
                .expect("eight weights");
            for (a, &wk) in acc.iter_mut().zip(w) {
                *a = xi.mul_add(wk, *a);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            output[o0 + k] = a + layer.bias[o0 + k];
        }
        o0 += LANES;
    }
    for (o, out) in output.iter_mut().enumerate().skip(o0) {
        let mut acc = 0f32;
        for (i, &xi) in input.iter().enumerate() {
            acc = xi.mul_add(layer.weight[i * d_out + o], acc);
        }
        *out = acc + layer.bias[o];
    }
}

/// tanh of one value, branch-free so loops over slices vectorise (libm's `tanhf` is a call per
/// element and took over a third of batch-scoring time). Evaluated in f64 and rounded once, so
/// the result is the correctly rounded f32 in all but rare ties, like libm's. Below |x| = 0.3 an
/// odd Taylor series to x^13; above, 1 − 2/(e^{2|x|} + 1) with e^y from a range-reduced
/// polynomial; |x| ≥ 10 gives ±1, as f32 rounds there anyway.
#[inline(always)]
fn tanh_f32(x: f32) -> f32 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2: f64 = std::f64::consts::LN_2;
    let a = f64::from(x.abs().min(10.0));
    let a2 = a * a;
    let series = a
        * (1.0
            + a2 * (-1.0 / 3.0
                + a2 * (2.0 / 15.0
                    + a2 * (-17.0 / 315.0
                        + a2 * (62.0 / 2835.0
                            + a2 * (-1382.0 / 155_925.0 + a2 * (21_844.0 / 6_081_075.0)))))));
    let y = 2.0 * a;
    let n = (y * LOG2E + 0.5).floor();
    let r = y - n * LN2;
    let exp_r = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0
                            + r * (1.0 / 720.0 + r * (1.0 / 5040.0 + r / 40_320.0)))))));
    // 2^n through f32 bits: packed f64 → i64 conversion needs AVX-512, f64 → i32 does not.
    let scale = f64::from(f32::from_bits(((n as i32 + 127) << 23) as u32));
    let large = 1.0 - 2.0 / (exp_r * scale + 1.0);
    let t = if a < 0.3 { series } else { large };
    (t as f32).copysign(x)
}

/// Run an MLP (tanh between layers, linear output); the result is left in `a`.
#[inline(always)]
fn mlp_body(layers: &[LayerWeights], input: &[f32], a: &mut Vec<f32>, b: &mut Vec<f32>) {
    a.clear();
    a.extend_from_slice(input);
    let last = layers.len() - 1;
    for (i, layer) in layers.iter().enumerate() {
        linear(layer, a, b);
        if i < last {
            b.iter_mut().for_each(|v| *v = tanh_f32(*v));
        }
        std::mem::swap(a, b);
    }
}

/// The same loop compiled with hardware FMA (without it `mul_add` is a library call per
/// element) and AVX2 (eight tanh at once).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
fn mlp_fma(layers: &[LayerWeights], input: &[f32], a: &mut Vec<f32>, b: &mut Vec<f32>) {
    mlp_body(layers, input, a, b)
}

fn mlp(layers: &[LayerWeights], input: &[f32], a: &mut Vec<f32>, b: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports FMA and AVX2, checked just above.
        return unsafe { mlp_fma(layers, input, a, b) };
    }
    mlp_body(layers, input, a, b)
}

impl Scorer {
    pub fn new(model: &DagmmModel) -> Self {
        let widest = model
            .weights
            .encoder
            .iter()
            .chain(&model.weights.decoder)
            .map(|l| l.d_input.max(l.d_output))
            .max()
            .unwrap_or(0);
        Self {
            encoder: model.weights.encoder.clone(),
            decoder: model.weights.decoder.clone(),
            estimation: model.weights.estimation.clone(),
            gmm: model.gmm.clone(),
            log_norms: model.gmm.log_norms(),
            input_dim: model.network.input_dim,
            latent_dim: model.network.latent_dim,
            widest,
        }
    }

    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    pub fn new_scratch(&self) -> Scratch {
        Scratch {
            a: Vec::with_capacity(self.widest),
            b: Vec::with_capacity(self.widest),
            x_hat: Vec::with_capacity(self.input_dim),
            x: Vec::with_capacity(self.input_dim),
            counterfactual: Vec::with_capacity(self.input_dim),
            expected: Vec::with_capacity(self.input_dim),
            shares: Vec::with_capacity(self.input_dim),
        }
    }

    /// Code z = [z_c, relative distance, cosine] of one scaled sample; x' is left in the scratch.
    pub fn code(&self, x: &[f32], s: &mut Scratch) -> [f64; MAX_Z_DIM] {
        mlp(&self.encoder, x, &mut s.a, &mut s.b);
        let mut z = [0f64; MAX_Z_DIM];
        for (zi, &v) in z.iter_mut().zip(&s.a) {
            *zi = f64::from(v);
        }
        let z_c = std::mem::take(&mut s.a);
        mlp(&self.decoder, &z_c, &mut s.a, &mut s.b);
        s.x_hat.clear();
        s.x_hat.extend_from_slice(&s.a);
        s.a = z_c;
        let (mut xx, mut dd, mut hh, mut xh) = (0f32, 0f32, 0f32, 0f32);
        for (&xi, &hi) in x.iter().zip(&s.x_hat) {
            xx += xi * xi;
            dd += (xi - hi) * (xi - hi);
            hh += hi * hi;
            xh += xi * hi;
        }
        let x_norm = (xx + NORM_EPS).sqrt();
        z[self.latent_dim] = f64::from((dd + NORM_EPS).sqrt() / x_norm);
        z[self.latent_dim + 1] = f64::from(xh / (x_norm * (hh + NORM_EPS).sqrt()));
        z
    }

    /// The reconstruction x' of the last sample passed to [`Scorer::code`].
    pub fn reconstruction<'a>(&self, s: &'a Scratch) -> &'a [f32] {
        &s.x_hat
    }

    /// Energy of one scaled sample.
    pub fn energy_scaled(&self, x: &[f32], s: &mut Scratch) -> f64 {
        let z = self.code(x, s);
        self.gmm
            .energy_with(&z[..self.latent_dim + 2], &self.log_norms)
    }

    /// Soft mixture memberships γ of a code z (estimation network without dropout, softmax).
    pub fn memberships(&self, z: &[f64], s: &mut Scratch) -> Vec<f64> {
        let input: Vec<f32> = z[..self.latent_dim + 2].iter().map(|&v| v as f32).collect();
        mlp(&self.estimation, &input, &mut s.a, &mut s.b);
        let max = s.a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = s.a.iter().map(|&v| f64::from(v - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / total).collect()
    }

    /// Energies of row-major scaled samples.
    pub fn energies_scaled(&self, x: &[f32]) -> Vec<f64> {
        let mut s = self.new_scratch();
        x.chunks_exact(self.input_dim)
            .map(|row| self.energy_scaled(row, &mut s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::tanh_f32;

    /// Distance from the exact value in units of the f32 spacing at the result.
    fn ulps(x: f32) -> f64 {
        let got = tanh_f32(x);
        let exact = f64::from(x).tanh();
        let spacing = f64::from(f32::from_bits(got.abs().to_bits() + 1) - got.abs())
            .min(f64::from(
                got.abs() - f32::from_bits(got.abs().to_bits().saturating_sub(1)),
            ))
            .max(f64::from(f32::MIN_POSITIVE));
        (f64::from(got) - exact).abs() / spacing
    }

    #[test]
    fn fast_tanh_is_correctly_rounded() {
        let mut worst = (0f64, 0f32);
        let mut x = -12.0f32;
        while x <= 12.0 {
            let err = ulps(x);
            if err > worst.0 {
                worst = (err, x);
            }
            x += 1.0 / 4096.0;
        }
        for x in [
            1e-30f32,
            -1e-30,
            1e-4,
            0.3,
            -0.3,
            0.299_999_98,
            9.0,
            10.0,
            f32::MAX,
            f32::MIN,
        ] {
            assert!(ulps(x) <= 0.51, "tanh({x}) off by {} ulp", ulps(x));
        }
        assert!(worst.0 <= 0.51, "{} ulp at x = {}", worst.0, worst.1);
        assert_eq!(tanh_f32(0.0), 0.0);
        assert!(tanh_f32(-0.0).is_sign_negative());
        assert_eq!((tanh_f32(30.0), tanh_f32(-30.0)), (1.0, -1.0));
    }
}
