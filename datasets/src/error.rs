//! The one error type of the datasets crate; every variant names the file or column involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read as {format}: {why}")]
    Read {
        path: PathBuf,
        format: &'static str,
        why: String,
    },
    #[error("{path}: unsupported file type (expected .parquet or .csv)")]
    UnsupportedFormat { path: PathBuf },
    #[error("no input files match {0}")]
    NoInput(String),
    #[error("{source_name}: missing column `{column}`{hint}")]
    MissingColumn {
        source_name: String,
        column: String,
        hint: String,
    },
    #[error("{source_name}: column `{column}` has type {found}, expected {expected}")]
    WrongType {
        source_name: String,
        column: String,
        found: String,
        expected: &'static str,
    },
    #[error("{source_name}: column `{column}` row {row}: {why}")]
    BadValue {
        source_name: String,
        column: String,
        row: usize,
        why: String,
    },
    #[error("{0}: no rows")]
    Empty(String),
    #[error("invalid {option}: {why}")]
    InvalidOption { option: &'static str, why: String },
    #[error("{0}")]
    Other(String),
}
