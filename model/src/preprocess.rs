//! Feature transforms and the scaler fitted on the training window, stored in the bundle so
//! scoring applies exactly what training saw.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Transform applied to a raw metric before scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    Identity,
    /// log(1 + x): for heavy-tailed rates such as network bits/s.
    Log1p,
}

impl Transform {
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Transform::Identity => x,
            Transform::Log1p => x.ln_1p(),
        }
    }

    pub fn invert(self, y: f64) -> f64 {
        match self {
            Transform::Identity => y,
            Transform::Log1p => y.exp_m1(),
        }
    }
}

/// One input feature of a model: what it is called, its unit and how it is transformed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Canonical name used in requests and outputs (e.g. `cpu_usage`).
    pub name: String,
    /// Human-readable unit (e.g. `%`, `bit/s`).
    pub unit: String,
    pub transform: Transform,
    /// Smallest valid raw value, if any (rates cannot be negative).
    pub min_valid: Option<f64>,
    /// Largest valid raw value, if any (percentages stop at 100).
    pub max_valid: Option<f64>,
}

impl FeatureSpec {
    /// The four server metrics in their fixed order.
    pub fn server_metrics() -> Vec<FeatureSpec> {
        let percent = |name: &str| FeatureSpec {
            name: name.into(),
            unit: "%".into(),
            transform: Transform::Identity,
            min_valid: Some(0.0),
            max_valid: Some(100.0),
        };
        vec![
            percent("cpu_usage"),
            percent("mem_usage"),
            percent("disk_busy"),
            FeatureSpec {
                name: "net_in_bps".into(),
                unit: "bit/s".into(),
                transform: Transform::Log1p,
                min_valid: Some(0.0),
                max_valid: None,
            },
        ]
    }

    /// Plain numeric features with no transform or bounds (labelled benchmark data).
    pub fn plain(names: &[String]) -> Vec<FeatureSpec> {
        names
            .iter()
            .map(|name| FeatureSpec {
                name: name.clone(),
                unit: String::new(),
                transform: Transform::Identity,
                min_valid: None,
                max_valid: None,
            })
            .collect()
    }
}

/// Ranges below this count as a constant feature.
const MIN_RANGE: f64 = 1e-9;
/// Default lower end of the scaled training range: values lie in [offset, offset + 1].
pub const SCALE_OFFSET: f64 = 1.0;

fn default_offset() -> f64 {
    SCALE_OFFSET
}

/// Transform-then-min-max scaling of the training window into [1, 2].
///
/// Why [1, 2]: the reconstruction feature ‖x − x'‖/‖x‖ divides by the input's norm. With z-scores
/// (or min-max into [0, 1]) quiet samples sit near the origin, their relative error is inflated
/// and noisy, the mixture spreads a wide component over large relative errors, and real
/// anomalies land inside it. Keeping ‖x‖ between 1 and 2 per dimension makes the relative
/// distance track the reconstruction error itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessor {
    pub features: Vec<FeatureSpec>,
    /// Per-feature minimum of the transformed training values.
    pub min: Vec<f64>,
    /// Per-feature maximum of the transformed training values.
    pub max: Vec<f64>,
    /// Per-feature raw minimum seen in training (for out-of-range flags).
    pub raw_min: Vec<f64>,
    /// Per-feature raw maximum seen in training.
    pub raw_max: Vec<f64>,
    /// Lower end of the scaled range (bundles from before it was recorded used 1).
    #[serde(default = "default_offset")]
    pub offset: f64,
    /// Clamp scaled values to the training range [offset, offset + 1]. Off unless asked for:
    /// for server metrics a value beyond anything seen in training is exactly what must stand
    /// out. On small, wide benchmark sets (Arrhythmia: about 190 training rows, 274 features)
    /// the training range underestimates the normal one, and a single stray feature far outside
    /// it would otherwise decide a normal row's energy.
    #[serde(default)]
    pub clamp: bool,
}

impl Preprocessor {
    /// Fit on raw rows (row-major, `features.len()` values per row).
    pub fn fit(features: Vec<FeatureSpec>, rows: &[f64]) -> Result<Self, ModelError> {
        let d = features.len();
        check_rows(rows, d)?;
        let mut min = vec![f64::INFINITY; d];
        let mut max = vec![f64::NEG_INFINITY; d];
        let mut raw_min = vec![f64::INFINITY; d];
        let mut raw_max = vec![f64::NEG_INFINITY; d];
        for row in rows.chunks_exact(d) {
            for (j, (&raw, spec)) in row.iter().zip(&features).enumerate() {
                if !raw.is_finite() {
                    return Err(ModelError::InvalidData(format!(
                        "feature {} has a non-finite value {raw}",
                        spec.name
                    )));
                }
                let t = spec.transform.apply(raw);
                min[j] = min[j].min(t);
                max[j] = max[j].max(t);
                raw_min[j] = raw_min[j].min(raw);
                raw_max[j] = raw_max[j].max(raw);
            }
        }
        Ok(Self {
            features,
            min,
            max,
            raw_min,
            raw_max,
            offset: SCALE_OFFSET,
            clamp: false,
        })
    }

    /// The same scaling with each feature's range taken `share` of the way in from both ends
    /// of its sorted training values (nearest rank) instead of from the extremes: with a few
    /// hundred training rows a single stray value otherwise sets the range, and the bulk of
    /// the feature is squeezed into a sliver of it. A share under half a row per end leaves
    /// the plain minimum and maximum.
    pub fn with_trimmed_ranges(mut self, rows: &[f64], share: f64) -> Result<Self, ModelError> {
        let d = self.dim();
        if !(0.0..0.5).contains(&share) {
            return Err(ModelError::InvalidData(format!(
                "range trim must be in [0, 0.5), got {share}"
            )));
        }
        let n = check_rows(rows, d)?;
        let low = ((n - 1) as f64 * share).round() as usize;
        let high = ((n - 1) as f64 * (1.0 - share)).round() as usize;
        if low == 0 && high == n - 1 {
            // The extremes themselves, which `fit` found.
            return Ok(self);
        }
        for (j, spec) in self.features.iter().enumerate() {
            let mut values: Vec<f64> = rows
                .chunks_exact(d)
                .map(|row| spec.transform.apply(row[j]))
                .collect();
            values.sort_by(f64::total_cmp);
            self.min[j] = values[low];
            self.max[j] = values[high];
        }
        Ok(self)
    }

    /// What feature `j` is divided by. A feature constant in training keeps its own unit
    /// (range 1), so a later deviation is measured as it is rather than blown up by 1e9.
    fn range(&self, j: usize) -> f64 {
        let range = self.max[j] - self.min[j];
        if range < MIN_RANGE { 1.0 } else { range }
    }

    pub fn dim(&self) -> usize {
        self.features.len()
    }

    /// Map one raw value of feature `j` to model space.
    pub fn scale(&self, j: usize, raw: f64) -> f64 {
        let t = self.features[j].transform.apply(raw);
        let unit = (t - self.min[j]) / self.range(j);
        self.offset
            + if self.clamp {
                unit.clamp(0.0, 1.0)
            } else {
                unit
            }
    }

    /// Map a model-space value of feature `j` back to its raw unit.
    pub fn unscale(&self, j: usize, scaled: f64) -> f64 {
        let t = (scaled - self.offset) * self.range(j) + self.min[j];
        self.features[j].transform.invert(t)
    }

    /// Scale whole rows into f32 model inputs.
    pub fn scale_rows(&self, rows: &[f64]) -> Vec<f32> {
        let d = self.dim();
        rows.chunks_exact(d)
            .flat_map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(j, &x)| self.scale(j, x) as f32)
            })
            .collect()
    }

    /// Whether a raw value lies outside what training saw.
    pub fn out_of_range(&self, j: usize, raw: f64) -> bool {
        raw < self.raw_min[j] || raw > self.raw_max[j]
    }
}

/// The number of rows of `d` values in `rows`: an error for none, or a ragged last row.
fn check_rows(rows: &[f64], d: usize) -> Result<usize, ModelError> {
    if d == 0 || rows.is_empty() || !rows.len().is_multiple_of(d) {
        return Err(ModelError::InvalidData(format!(
            "expected rows of {d} values, got {} values",
            rows.len()
        )));
    }
    Ok(rows.len() / d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_and_unscale_round_trip_through_log1p() {
        let rows = vec![10.0, 20.0, 5.0, 1e3, 90.0, 60.0, 50.0, 1e7];
        let p = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap();
        assert!((p.scale(0, 10.0) - SCALE_OFFSET).abs() < 1e-12);
        assert!((p.scale(3, 1e7) - SCALE_OFFSET - 1.0).abs() < 1e-12);
        for (j, raw) in [(0, 37.0), (3, 12345.0)] {
            assert!((p.unscale(j, p.scale(j, raw)) - raw).abs() < 1e-6 * raw);
        }
    }

    #[test]
    fn constant_column_scales_to_a_constant_not_nan() {
        let rows = vec![5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0];
        let p = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap();
        assert_eq!(p.scale(0, 5.0), SCALE_OFFSET);
        // A later deviation keeps the feature's own unit instead of being divided by ~0.
        assert_eq!(p.scale(0, 6.0), SCALE_OFFSET + 1.0);
        assert_eq!(p.unscale(0, SCALE_OFFSET + 1.0), 6.0);
    }

    #[test]
    fn trimmed_ranges_leave_out_the_extremes_of_each_feature() {
        // 201 rows: 0, 1, …, 199 and one stray 10,000 in the first feature; the second
        // feature counts down.
        let mut rows = Vec::new();
        for i in 0..201 {
            let first = if i == 200 { 10_000.0 } else { i as f64 };
            rows.extend([first, 200.0 - i as f64]);
        }
        let fitted = Preprocessor::fit(
            FeatureSpec::plain(&["a".to_string(), "b".to_string()]),
            &rows,
        )
        .unwrap();
        assert_eq!((fitted.min[0], fitted.max[0]), (0.0, 10_000.0));
        // 1 % of 200 gaps is two rows in from each end.
        let trimmed = fitted.clone().with_trimmed_ranges(&rows, 0.01).unwrap();
        assert_eq!((trimmed.min[0], trimmed.max[0]), (2.0, 198.0));
        assert_eq!((trimmed.min[1], trimmed.max[1]), (2.0, 198.0));
        // The unscaled extremes, which explanations report, stay the data's.
        assert_eq!(trimmed.raw_max[0], 10_000.0);
        let untrimmed = fitted.clone().with_trimmed_ranges(&rows, 0.0).unwrap();
        assert_eq!(untrimmed, fitted);
        assert!(fitted.clone().with_trimmed_ranges(&rows, 0.5).is_err());
        assert!(fitted.with_trimmed_ranges(&rows[..3], 0.01).is_err());
    }

    #[test]
    fn clamping_keeps_scaled_values_in_the_training_range_only_when_asked() {
        let rows = vec![10.0, 20.0, 5.0, 1e3, 90.0, 60.0, 50.0, 1e7];
        let free = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap();
        let clamped = Preprocessor {
            clamp: true,
            ..free.clone()
        };
        // cpu_usage trained on [10, 90]: 100 lies above, 0 below, 50 inside.
        assert!(free.scale(0, 100.0) > SCALE_OFFSET + 1.0);
        assert_eq!(clamped.scale(0, 100.0), SCALE_OFFSET + 1.0);
        assert_eq!(clamped.scale(0, 0.0), SCALE_OFFSET);
        assert_eq!(clamped.scale(0, 50.0), free.scale(0, 50.0));
    }

    #[test]
    fn non_finite_training_value_is_an_error_naming_the_feature() {
        let rows = vec![1.0, 2.0, f64::NAN, 4.0];
        let err = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap_err();
        assert!(err.to_string().contains("disk_busy"));
    }
}
