//! The DAGMM networks in burn: a compression autoencoder and an estimation MLP.
//!
//! Weights are initialised from our own seeded ChaCha stream (not burn's global RNG), so a
//! fit is reproducible even when several models train in parallel threads.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::codes::codes;
use crate::config::NetworkConfig;
use crate::dense::dense;
use crate::reconstruction::SQUARED_ERROR;
use crate::reconstruction_layer::reconstruction_terms_through;
use crate::softmax::softmax_rows;

/// Added under square roots of squared norms so empty or zero rows keep finite gradients.
pub const NORM_EPS: f32 = 1e-10;

/// The trainable networks (compression encoder/decoder and estimation MLP).
#[derive(Module, Debug)]
pub struct DagmmNet {
    pub encoder: Vec<Layer>,
    pub decoder: Vec<Layer>,
    pub estimation: Vec<Layer>,
}

/// A linear layer's weight `[d_input, d_output]` and bias `[d_output]` as one parameter,
/// `[d_input + 1, d_output]`, the bias its last row. Every parameter tensor is a leaf that
/// burn's graph creates, merges and frees each step, and that the optimizer takes apart and
/// rebuilds: about 3 µs each, a twentieth of a KDDCUP99 step for the 26 tensors of separate
/// weights and biases. The layer's steps read the two from the one buffer and hand back one
/// gradient; Adam updates each value on its own, so the bits are those of separate tensors.
#[derive(Module, Debug)]
pub struct Layer {
    pub params: Param<Tensor<2>>,
}

impl Layer {
    pub fn from_weights(w: &LayerWeights, device: &Device) -> Self {
        let mut values = Vec::with_capacity((w.d_input + 1) * w.d_output);
        values.extend_from_slice(&w.weight);
        values.extend_from_slice(&w.bias);
        Self {
            params: Param::from_data(TensorData::new(values, [w.d_input + 1, w.d_output]), device),
        }
    }

    pub fn weights(&self) -> LayerWeights {
        let [d_input, d_output] = self.dims();
        let mut weight = self
            .params
            .val()
            .into_data()
            .try_into_vec::<f32>()
            .expect("parameters are f32");
        let bias = weight.split_off(d_input * d_output);
        LayerWeights {
            d_input,
            d_output,
            weight,
            bias,
        }
    }

    /// `[d_input, d_output]`.
    pub fn dims(&self) -> [usize; 2] {
        let [rows, d_output] = self.params.dims();
        [rows - 1, d_output]
    }

    /// The weight `[d_input, d_output]` and bias `[d_output]` parts of `packed`, a tensor laid
    /// out as the parameters are (their values, or their gradient).
    pub fn split(packed: Tensor<2>) -> (Tensor<2>, Tensor<1>) {
        let [rows, d_output] = packed.dims();
        let d_input = rows - 1;
        (
            packed.clone().slice([0..d_input, 0..d_output]),
            packed
                .slice([d_input..rows, 0..d_output])
                .reshape([d_output]),
        )
    }
}

/// What one forward pass produces.
pub struct Forward {
    /// Compressed code z_c, `[n, latent_dim]`.
    pub z_c: Tensor<2>,
    /// The reconstruction terms per row, `[n, 3]`: relative distance, cosine and the squared
    /// error ‖x − x'‖² ([`crate::reconstruction`]).
    pub terms: Tensor<2>,
    /// z = [z_c, relative Euclidean distance, cosine similarity], `[n, latent_dim + 2]`.
    pub z: Tensor<2>,
    /// Soft mixture memberships γ, `[n, gmm_k]`.
    pub gamma: Tensor<2>,
}

impl Forward {
    /// Squared reconstruction error ‖x − x'‖² per row, `[n, 1]`.
    pub fn squared_error(&self) -> Tensor<2> {
        let n = self.terms.dims()[0];
        self.terms
            .clone()
            .slice([0..n, SQUARED_ERROR..SQUARED_ERROR + 1])
    }
}

/// Layer sizes of the encoder, decoder and estimation network, as (input, output) pairs.
pub fn layer_shapes(cfg: &NetworkConfig) -> [Vec<(usize, usize)>; 3] {
    let mut enc_sizes = vec![cfg.input_dim];
    enc_sizes.extend(&cfg.hidden);
    enc_sizes.push(cfg.latent_dim);
    let dec_sizes: Vec<usize> = enc_sizes.iter().rev().copied().collect();
    let mut est_sizes = vec![cfg.z_dim()];
    est_sizes.extend(&cfg.estimation_hidden);
    est_sizes.push(cfg.gmm_k);
    let pairs = |s: &[usize]| s.windows(2).map(|w| (w[0], w[1])).collect();
    [pairs(&enc_sizes), pairs(&dec_sizes), pairs(&est_sizes)]
}

/// Weights of one linear layer, row-major `[d_input, d_output]` (burn's own layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerWeights {
    pub d_input: usize,
    pub d_output: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// All network weights as plain values, for the bundle and the plain-Rust scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkWeights {
    pub encoder: Vec<LayerWeights>,
    pub decoder: Vec<LayerWeights>,
    pub estimation: Vec<LayerWeights>,
}

impl NetworkWeights {
    /// Uniform(-1/√fan_in, 1/√fan_in) for weights and biases, as PyTorch's default Linear init.
    pub fn init(cfg: &NetworkConfig, rng: &mut ChaCha8Rng) -> Self {
        let mut layer = |(d_input, d_output): (usize, usize)| {
            let bound = 1.0 / (d_input as f32).sqrt();
            LayerWeights {
                d_input,
                d_output,
                weight: (0..d_input * d_output)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect(),
                bias: (0..d_output)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect(),
            }
        };
        let [enc, dec, est] = layer_shapes(cfg);
        Self {
            encoder: enc.into_iter().map(&mut layer).collect(),
            decoder: dec.into_iter().map(&mut layer).collect(),
            estimation: est.into_iter().map(&mut layer).collect(),
        }
    }

    /// Whether these weights have the shapes `cfg` describes.
    pub fn matches(&self, cfg: &NetworkConfig) -> bool {
        let [enc, dec, est] = layer_shapes(cfg);
        let fits = |layers: &[LayerWeights], shapes: &[(usize, usize)]| {
            layers.len() == shapes.len()
                && layers.iter().zip(shapes).all(|(l, &(i, o))| {
                    l.d_input == i
                        && l.d_output == o
                        && l.weight.len() == i * o
                        && l.bias.len() == o
                })
        };
        fits(&self.encoder, &enc) && fits(&self.decoder, &dec) && fits(&self.estimation, &est)
    }
}

impl DagmmNet {
    pub fn from_weights(w: &NetworkWeights, device: &Device) -> Self {
        let build = |layers: &[LayerWeights]| {
            layers
                .iter()
                .map(|l| Layer::from_weights(l, device))
                .collect()
        };
        Self {
            encoder: build(&w.encoder),
            decoder: build(&w.decoder),
            estimation: build(&w.estimation),
        }
    }

    pub fn weights(&self) -> NetworkWeights {
        NetworkWeights {
            encoder: self.encoder.iter().map(Layer::weights).collect(),
            decoder: self.decoder.iter().map(Layer::weights).collect(),
            estimation: self.estimation.iter().map(Layer::weights).collect(),
        }
    }

    /// Full forward pass. `dropout_masks` holds one pre-scaled 0/(1/(1-p)) mask per estimation
    /// hidden layer during training, and is `None` for evaluation.
    pub fn forward(&self, x: Tensor<2>, dropout_masks: Option<&[Tensor<2>]>) -> Forward {
        let z_c = mlp(&self.encoder, x.clone());
        // The output layer goes with the terms: in training they then skip forming x'.
        let (output_layer, hidden_layers) = self.decoder.split_last().expect("a decoder layer");
        let hidden = hidden_layers
            .iter()
            .fold(z_c.clone(), |h, layer| dense(layer, h, true));
        let terms = reconstruction_terms_through(x, hidden, output_layer);
        let z = codes(z_c.clone(), terms.clone());
        let mut h = z.clone();
        let last = self.estimation.len() - 1;
        for (i, layer) in self.estimation.iter().enumerate() {
            h = dense(layer, h, i < last);
            if i < last
                && let Some(masks) = dropout_masks
            {
                h = h * masks[i].clone();
            }
        }
        let gamma = softmax_rows(h);
        Forward {
            z_c,
            terms,
            z,
            gamma,
        }
    }
}

/// tanh between layers, linear output (the paper's FC(..., tanh) ... FC(10, 1) pattern).
fn mlp(layers: &[Layer], mut h: Tensor<2>) -> Tensor<2> {
    let last = layers.len() - 1;
    for (i, layer) in layers.iter().enumerate() {
        h = dense(layer, h, i < last);
    }
    h
}

/// Clamp of the [`tanh_f32`] approximation: beyond it tanh(x) rounds to within one f32 ulp of ±1.
const TANH_CLAMP: f32 = 8.5;
/// tanh(x) ≈ x·P(x²)/Q(x²) on [−8.5, 8.5]: coefficients of P and Q, lowest power first, from
/// the relative-error fit in `model/scripts/tanh_fit.py` (at most 6 f32 ulp from the correctly
/// rounded tanh, 87 % of inputs within 1 ulp).
const TANH_P: [f32; 6] = [
    1.0,
    0.129_690_23,
    2.974_305_8e-3,
    9.756_675e-6,
    -1.425_236_6e-8,
    2.204_982e-11,
];
const TANH_Q: [f32; 4] = [1.0, 0.463_023_45, 2.398_233e-2, 2.355_045_1e-4];

/// tanh(x) ≈ x·P(x²)/Q(x²) on one number: the values of training's dense layers
/// ([`crate::dense`]) and the plain scorer's. Plain multiplies and adds (Rust never fuses
/// them), so every build gives the same bits. Branch-free, so loops over scoring lanes
/// vectorise.
#[inline(always)]
pub(crate) fn tanh_f32(x: f32) -> f32 {
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let t = x * x;
    let polynomial = |c: &[f32]| {
        let n = c.len();
        let highest = t * c[n - 1] + c[n - 2];
        c[..n - 2]
            .iter()
            .rev()
            .fold(highest, |acc, &ci| acc * t + ci)
    };
    // + 0 turns −0 into +0, as adding tanh's gradient term (zero in value) did when training
    // built tanh from tensor operations; the dense step's tests still compare with that form.
    (x * polynomial(&TANH_P) / polynomial(&TANH_Q)).clamp(-1.0, 1.0) + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_is_within_six_ulp_of_the_correctly_rounded_value_and_bounded() {
        let xs: Vec<f32> = (-48_000..=48_000)
            .map(|i| i as f32 / 4000.0)
            .chain((1..60).flat_map(|k| [2f32.powi(-k), -(2f32.powi(-k))]))
            .collect();
        let n = xs.len();
        let mut within_one = 0;
        for &x in &xs {
            let y = tanh_f32(x);
            let want = (x as f64).tanh() as f32;
            let ulps = (y.to_bits() as i32 - want.to_bits() as i32).unsigned_abs();
            assert!(ulps <= 6, "tanh({x}) = {y}, correctly rounded {want}");
            assert!(y.abs() <= 1.0 && y.signum() == x.signum() || x == 0.0);
            within_one += usize::from(ulps <= 1);
        }
        assert!(
            within_one * 100 >= n * 85,
            "{within_one} of {n} within 1 ulp"
        );
        for x in [1e30, -1e30, f32::MAX, f32::MIN] {
            assert_eq!(tanh_f32(x), x.signum());
        }
    }
}
