//! Which export columns hold the time, the host, each metric and the alert flag.

use crate::DataError;

/// Canonical names of the four metrics, in the fixed feature order of every model.
pub const METRICS: [&str; 4] = ["cpu_usage", "mem_usage", "disk_busy", "net_in_bps"];
/// Short keys accepted by `--columns cpu=…,mem=…,disk=…,net_in=…`.
pub const METRIC_KEYS: [&str; 4] = ["cpu", "mem", "disk", "net_in"];

/// Column names in an export. Defaults are the canonical names.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMap {
    pub time: String,
    pub host: String,
    /// Column of each metric, in [`METRICS`] order.
    pub metrics: [String; 4],
    pub alert: String,
    /// Long shape: the column holding the metric name and the one holding its value.
    pub long_metric: String,
    pub long_value: String,
}

impl Default for ColumnMap {
    fn default() -> Self {
        Self {
            time: "timestamp".into(),
            host: "host".into(),
            metrics: METRICS.map(String::from),
            alert: "alert".into(),
            long_metric: "metric".into(),
            long_value: "value".into(),
        }
    }
}

impl ColumnMap {
    /// Apply a `cpu=…,mem=…,disk=…,net_in=…` override (any subset; canonical names also work).
    pub fn with_metric_overrides(mut self, spec: &str) -> Result<Self, DataError> {
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, column) = pair
                .split_once('=')
                .ok_or_else(|| DataError::InvalidOption {
                    option: "--columns",
                    why: format!("`{pair}` is not KEY=COLUMN"),
                })?;
            let key = key.trim();
            let index = METRIC_KEYS
                .iter()
                .position(|k| *k == key)
                .or_else(|| METRICS.iter().position(|m| *m == key))
                .ok_or_else(|| DataError::InvalidOption {
                    option: "--columns",
                    why: format!(
                        "unknown metric `{key}` (expected one of {})",
                        METRIC_KEYS.join(", ")
                    ),
                })?;
            let column = column.trim();
            if column.is_empty() {
                return Err(DataError::InvalidOption {
                    option: "--columns",
                    why: format!("empty column for `{key}`"),
                });
            }
            self.metrics[index] = column.to_string();
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_change_only_the_named_metrics() {
        let map = ColumnMap::default()
            .with_metric_overrides("cpu=CPU%, net_in=rx_bits")
            .unwrap();
        assert_eq!(
            map.metrics,
            ["CPU%", "mem_usage", "disk_busy", "rx_bits"].map(String::from)
        );
    }

    #[test]
    fn bad_overrides_are_errors() {
        assert!(
            ColumnMap::default()
                .with_metric_overrides("gpu=x")
                .unwrap_err()
                .to_string()
                .contains("gpu")
        );
        assert!(ColumnMap::default().with_metric_overrides("cpu").is_err());
        assert!(ColumnMap::default().with_metric_overrides("cpu=").is_err());
    }
}
