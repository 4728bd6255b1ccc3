//! The DAGMM model (Zong et al., ICLR 2018): networks, GMM statistics, energy, the training
//! loop, the saved bundle and a plain-Rust scorer.
//!
//! This crate knows nothing of export file formats, HTTP or command lines: it takes rows of
//! numbers and gives back a fitted [`DagmmModel`], a plain value to save, load and score with.

pub mod adam;
pub mod bundle;
mod chained_product;
pub mod codes;
pub mod config;
pub mod cpu_pinning;
pub mod dense;
mod error;
pub mod eval;
pub mod explain;
mod fastmath;
pub mod gmm;
mod helper_threads;
pub mod mixture_energy;
pub mod mixture_factors;
pub mod mixture_stats;
pub mod network;
pub mod objective;
pub mod preprocess;
pub mod reconstruction;
pub mod reconstruction_layer;
pub mod scorer;
pub mod softmax;
mod sparse_rows;
mod step_support;
#[cfg(test)]
mod testing;
pub mod thresholds;
pub mod training;

use serde::{Deserialize, Serialize};

pub use bundle::{Bundle, LoadedBundle, TrainingSummary};
pub use config::{NetworkConfig, TrainConfig};
pub use error::ModelError;
pub use explain::{Assessment, Direction, Explainer, MetricExplanation, Verdict};
pub use gmm::GmmParams;
pub use network::NetworkWeights;
pub use preprocess::{FeatureSpec, Preprocessor, Transform};
pub use scorer::Scorer;
pub use thresholds::Thresholds;
pub use training::{EpochLosses, FitOutput, cores_per_fit, fit, fit_on_cores};

/// A fitted DAGMM: everything needed to score a raw sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DagmmModel {
    pub network: NetworkConfig,
    pub preprocessor: Preprocessor,
    pub weights: NetworkWeights,
    pub gmm: GmmParams,
    pub thresholds: Thresholds,
}

impl DagmmModel {
    /// Check that the parts fit together (used after loading a bundle).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.network.validate()?;
        let bad = |why: String| Err(ModelError::InvalidData(why));
        if self.preprocessor.dim() != self.network.input_dim {
            return bad(format!(
                "preprocessor has {} features, network expects {}",
                self.preprocessor.dim(),
                self.network.input_dim
            ));
        }
        if !self.weights.matches(&self.network) {
            return bad("network weights do not match the network configuration".into());
        }
        let all_finite = [
            &self.weights.encoder,
            &self.weights.decoder,
            &self.weights.estimation,
        ]
        .into_iter()
        .flatten()
        .all(|l| l.weight.iter().chain(&l.bias).all(|v| v.is_finite()));
        if !all_finite {
            return bad("network weights contain NaN or infinity".into());
        }
        if self.gmm.k != self.network.gmm_k || self.gmm.d != self.network.z_dim() {
            return bad("GMM dimensions do not match the network".into());
        }
        // The stored factor must be the factor of the stored covariances.
        let refactored = GmmParams::new(
            self.gmm.phi.clone(),
            self.gmm.mu.clone(),
            self.gmm.cov.clone(),
            self.gmm.cov_reg,
        )?;
        if refactored.chol != self.gmm.chol {
            return bad("stored Cholesky factors do not match the covariances".into());
        }
        if !self.thresholds.cutoff.is_finite() || self.thresholds.quantiles.is_empty() {
            return bad("thresholds are missing or not finite".into());
        }
        Ok(())
    }
}
