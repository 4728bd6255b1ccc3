//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, fitting, saving, loading or scoring a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid {field}: {why}")]
    InvalidConfig { field: &'static str, why: String },
    #[error("invalid training data: {0}")]
    InvalidData(String),
    #[error("training diverged at epoch {epoch}: {what} is not finite")]
    Diverged { epoch: usize, what: &'static str },
    #[error("{path}: {why}")]
    Bundle { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sample field {field}: {why}")]
    InvalidSample { field: String, why: String },
}
