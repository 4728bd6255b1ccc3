//! Command-line options for naming export columns, shared by every binary that reads exports.

use crate::{ColumnMap, DataError};

/// `--columns`, `--time-column`, `--host-column`, `--alert-column`.
#[derive(clap::Args, Debug, Clone)]
pub struct ColumnArgs {
    /// Metric column names: `cpu=…,mem=…,disk=…,net_in=…` (any subset).
    #[arg(long, default_value = "")]
    pub columns: String,
    #[arg(long, default_value = "timestamp")]
    pub time_column: String,
    #[arg(long, default_value = "host")]
    pub host_column: String,
    /// Boolean column marking samples that already raised an alert.
    #[arg(long, default_value = "alert")]
    pub alert_column: String,
}

impl ColumnArgs {
    /// The column map these options describe.
    pub fn column_map(&self) -> Result<ColumnMap, DataError> {
        Ok(ColumnMap {
            time: self.time_column.clone(),
            host: self.host_column.clone(),
            alert: self.alert_column.clone(),
            ..ColumnMap::default().with_metric_overrides(&self.columns)?
        })
    }
}
