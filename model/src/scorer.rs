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
}

/// y = x W + b for a `[d_input, d_output]` row-major W, accumulated like burn's matmul
/// (fused multiply-adds from zero, bias added last) so both round the same way.
#[inline(always)]
fn linear(layer: &LayerWeights, input: &[f32], output: &mut Vec<f32>) {
    output.clear();
    output.resize(layer.d_output, 0.0);
    for (i, &xi) in input.iter().enumerate() {
        let row = &layer.weight[i * layer.d_output..(i + 1) * layer.d_output];
        for (o, &w) in output.iter_mut().zip(row) {
            *o = xi.mul_add(w, *o);
        }
    }
    for (o, &b) in output.iter_mut().zip(&layer.bias) {
        *o += b;
    }
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
            b.iter_mut().for_each(|v| *v = v.tanh());
        }
        std::mem::swap(a, b);
    }
}

/// The same loop compiled with hardware FMA: without it `mul_add` is a library call per
/// element, several times slower than the whole rest of the pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn mlp_fma(layers: &[LayerWeights], input: &[f32], a: &mut Vec<f32>, b: &mut Vec<f32>) {
    mlp_body(layers, input, a, b)
}

fn mlp(layers: &[LayerWeights], input: &[f32], a: &mut Vec<f32>, b: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA, checked just above.
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
