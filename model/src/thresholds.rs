//! Energy cutoffs and the training-energy distribution they come from.

use serde::{Deserialize, Serialize};

/// Severity of a sample at or below every level's energy.
pub const NORMAL: &str = "normal";

/// Number of evenly spaced quantiles stored (every 0.1 percent, both ends included).
pub const QUANTILE_POINTS: usize = 1001;

/// A named severity level and the energy above which it applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeverityCutoff {
    pub name: String,
    pub percentile: f64,
    pub energy: f64,
}

/// Anomaly cutoff, severity cutoffs and training-energy quantiles.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Thresholds {
    /// Percentile of training energies that `cutoff` sits at.
    pub percentile: f64,
    /// A sample is anomalous when its energy is above this.
    pub cutoff: f64,
    /// Ascending severity levels; a sample takes the highest level whose energy it exceeds.
    pub severities: Vec<SeverityCutoff>,
    /// Training energies at 0, 0.1, …, 100 percent.
    pub quantiles: Vec<f64>,
}

/// Linear-interpolation percentile of sorted values (numpy's default rule).
pub fn percentile_of_sorted(sorted: &[f64], p: f64) -> f64 {
    let pos = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Thresholds {
    /// Cutoffs from training energies (must be non-empty and finite).
    pub fn from_energies(energies: &[f64], percentile: f64, severities: &[(String, f64)]) -> Self {
        let mut sorted = energies.to_vec();
        sorted.sort_by(f64::total_cmp);
        let quantiles = (0..QUANTILE_POINTS)
            .map(|i| percentile_of_sorted(&sorted, 100.0 * i as f64 / (QUANTILE_POINTS - 1) as f64))
            .collect();
        Self {
            percentile,
            cutoff: percentile_of_sorted(&sorted, percentile),
            severities: severities
                .iter()
                .map(|(name, p)| SeverityCutoff {
                    name: name.clone(),
                    percentile: *p,
                    energy: percentile_of_sorted(&sorted, *p),
                })
                .collect(),
            quantiles,
        }
    }

    pub fn is_anomaly(&self, energy: f64) -> bool {
        energy > self.cutoff
    }

    /// `normal`, or the highest severity level whose energy `energy` exceeds.
    pub fn severity(&self, energy: f64) -> &str {
        match self.severity_level(energy) {
            0 => NORMAL,
            level => &self.severities[level - 1].name,
        }
    }

    /// 0 for `normal`, else 1 + the index in `severities` of the level [`Self::severity`] names.
    pub fn severity_level(&self, energy: f64) -> usize {
        self.severities
            .iter()
            .rposition(|s| energy > s.energy)
            .map_or(0, |i| i + 1)
    }

    /// Where `energy` falls in the training-energy distribution, in percent (0–100).
    pub fn percentile_rank(&self, energy: f64) -> f64 {
        let q = &self.quantiles;
        if q.is_empty() || energy.is_nan() {
            return f64::NAN;
        }
        if energy <= q[0] {
            return 0.0;
        }
        if energy >= q[q.len() - 1] {
            return 100.0;
        }
        let hi = q.partition_point(|&v| v < energy);
        let lo = hi - 1;
        let step = 100.0 / (q.len() - 1) as f64;
        let frac = if q[hi] > q[lo] {
            (energy - q[lo]) / (q[hi] - q[lo])
        } else {
            0.0
        };
        (lo as f64 + frac) * step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear_rule() {
        let sorted: Vec<f64> = (1..=5).map(f64::from).collect();
        assert_eq!(percentile_of_sorted(&sorted, 50.0), 3.0);
        assert_eq!(percentile_of_sorted(&sorted, 99.0), 4.96);
    }

    #[test]
    fn severity_and_rank_follow_the_cutoffs() {
        let energies: Vec<f64> = (0..1000).map(f64::from).collect();
        let levels = [
            ("warning".to_string(), 99.0),
            ("critical".to_string(), 99.9),
        ];
        let t = Thresholds::from_energies(&energies, 99.0, &levels);
        assert!((t.cutoff - 989.01).abs() < 1e-9);
        assert_eq!(t.severity(10.0), "normal");
        assert_eq!(t.severity(995.0), "warning");
        assert_eq!(t.severity(999.5), "critical");
        assert_eq!([10.0, 995.0, 999.5].map(|e| t.severity_level(e)), [0, 1, 2]);
        assert!(t.is_anomaly(990.0) && !t.is_anomaly(989.0));
        assert!((t.percentile_rank(499.5) - 50.0).abs() < 0.01);
        assert_eq!(t.percentile_rank(-5.0), 0.0);
        assert_eq!(t.percentile_rank(5000.0), 100.0);
    }
}
