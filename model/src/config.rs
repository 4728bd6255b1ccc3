//! Hyper-parameters of the DAGMM networks and of training, checked before any work starts.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Shape of the compression and estimation networks (saved in the bundle beside the weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Number of input features after preprocessing.
    pub input_dim: usize,
    /// Encoder hidden layer sizes, outermost first; the decoder mirrors them.
    pub hidden: Vec<usize>,
    /// Size of the compressed code z_c.
    pub latent_dim: usize,
    /// Estimation network hidden layer sizes.
    pub estimation_hidden: Vec<usize>,
    /// Number of Gaussian mixture components K.
    pub gmm_k: usize,
    /// Dropout probability in the estimation network (paper: 0.5).
    pub dropout: f64,
}

impl NetworkConfig {
    /// Dimension of z = [z_c, relative distance, cosine similarity].
    pub fn z_dim(&self) -> usize {
        self.latent_dim + 2
    }

    /// The network used for the four server metrics: 4-16-8-1 / 1-8-16-4, estimation 3-10-K.
    pub fn metrics4() -> Self {
        Self {
            input_dim: 4,
            hidden: vec![16, 8],
            latent_dim: 1,
            estimation_hidden: vec![10],
            gmm_k: 4,
            dropout: 0.5,
        }
    }

    /// Reject shapes that cannot build a network.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, why: String| Err(ModelError::InvalidConfig { field, why });
        if self.input_dim == 0 {
            return bad("input_dim", "must be at least 1".into());
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return bad(
                "hidden",
                format!(
                    "needs one or more non-zero layer sizes, got {:?}",
                    self.hidden
                ),
            );
        }
        if self.latent_dim == 0 {
            return bad("latent_dim", "must be at least 1".into());
        }
        if self.z_dim() > MAX_Z_DIM {
            return bad(
                "latent_dim",
                format!(
                    "at most {} (z has latent_dim + 2 dimensions)",
                    MAX_Z_DIM - 2
                ),
            );
        }
        if self.estimation_hidden.is_empty() || self.estimation_hidden.contains(&0) {
            return bad(
                "estimation_hidden",
                format!(
                    "needs one or more non-zero layer sizes, got {:?}",
                    self.estimation_hidden
                ),
            );
        }
        if !(1..=MAX_GMM_K).contains(&self.gmm_k) {
            return bad(
                "gmm_k",
                format!(
                    "needs 1 to {MAX_GMM_K} mixture components, got {}",
                    self.gmm_k
                ),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            );
        }
        Ok(())
    }
}

/// The covariance is factorised element by element in the training graph, so z stays small.
pub const MAX_Z_DIM: usize = 12;
/// Upper bound on mixture components (the scorer keeps per-component values on the stack).
pub const MAX_GMM_K: usize = 64;

/// How training runs; everything here is recorded in the bundle's training summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Weight of the mean sample energy in the loss (paper λ1 = 0.1).
    pub lambda_energy: f64,
    /// Weight of the covariance-diagonal penalty Σ 1/Σ_kjj (paper λ2 = 0.005).
    pub lambda_cov: f64,
    /// Added to every covariance diagonal so Cholesky never meets a singular matrix.
    pub cov_reg: f64,
    pub seed: u64,
    /// Share of the epochs that train the autoencoder on reconstruction alone before the joint
    /// loss starts; without it the energy and covariance terms pull z together before the
    /// autoencoder has learned anything and the fit settles on a useless reconstruction.
    pub warmup_fraction: f64,
    /// Percentile of training energies used as the anomaly cutoff.
    pub percentile: f64,
    /// Severity levels above normal, as (name, percentile of training energies), ascending.
    pub severities: Vec<(String, f64)>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1000,
            batch_size: 1024,
            learning_rate: 1e-3,
            lambda_energy: 0.1,
            lambda_cov: 0.005,
            cov_reg: 1e-4,
            seed: 42,
            warmup_fraction: 0.2,
            percentile: 99.0,
            severities: vec![("warning".into(), 99.0), ("critical".into(), 99.9)],
        }
    }
}

impl TrainConfig {
    /// Reject values that would make training meaningless or crash it.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, why: String| Err(ModelError::InvalidConfig { field, why });
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("must be a positive number, got {}", self.learning_rate),
            );
        }
        for (field, value) in [
            ("lambda_energy", self.lambda_energy),
            ("lambda_cov", self.lambda_cov),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(field, format!("must be finite and >= 0, got {value}"));
            }
        }
        if !(self.cov_reg.is_finite() && self.cov_reg > 0.0) {
            return bad(
                "cov_reg",
                format!("must be a positive number, got {}", self.cov_reg),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            return bad(
                "warmup_fraction",
                format!("must be in [0, 1), got {}", self.warmup_fraction),
            );
        }
        if !(self.percentile > 0.0 && self.percentile < 100.0) {
            return bad(
                "percentile",
                format!("must be in (0, 100), got {}", self.percentile),
            );
        }
        let mut previous = 0.0;
        for (name, p) in &self.severities {
            if name.is_empty() || name == "normal" {
                return bad(
                    "severities",
                    format!("level name {name:?} is reserved or empty"),
                );
            }
            if !(*p > 0.0 && *p < 100.0) || *p < previous {
                return bad(
                    "severities",
                    format!("percentiles must be ascending in (0, 100), got {p} for {name}"),
                );
            }
            previous = *p;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_configs_are_valid() {
        NetworkConfig::metrics4().validate().unwrap();
        TrainConfig::default().validate().unwrap();
    }

    #[test]
    fn zero_components_empty_layers_and_bad_lr_are_errors() {
        let mut net = NetworkConfig::metrics4();
        net.gmm_k = 0;
        assert!(net.validate().unwrap_err().to_string().contains("gmm_k"));
        let mut net = NetworkConfig::metrics4();
        net.hidden.clear();
        assert!(net.validate().unwrap_err().to_string().contains("hidden"));
        let mut train = TrainConfig {
            learning_rate: 0.0,
            ..Default::default()
        };
        assert!(
            train
                .validate()
                .unwrap_err()
                .to_string()
                .contains("learning_rate")
        );
        train.learning_rate = f64::NAN;
        assert!(train.validate().is_err());
        let train = TrainConfig {
            percentile: 100.0,
            ..Default::default()
        };
        assert!(train.validate().is_err());
    }
}
