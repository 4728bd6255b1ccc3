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
        self.rank_with(energy, |q| q.partition_point(|&v| v < energy))
    }

    /// [`Self::percentile_rank`] with `first_at_least(q)` finding the first quantile ≥ `energy`
    /// (called only when `energy` lies strictly inside the quantiles' range).
    #[inline]
    fn rank_with(&self, energy: f64, first_at_least: impl FnOnce(&[f64]) -> usize) -> f64 {
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
        let hi = first_at_least(q);
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

/// Evenly spaced buckets over the quantiles' range, each knowing the first quantile at or above
/// its lower edge, so an energy's place among the quantiles is found from its bucket in a step or
/// two instead of a ten-step binary search, which was 6 % of batch scoring. Gives exactly
/// [`Thresholds::percentile_rank`] of the thresholds it was built from.
#[derive(Debug, Clone)]
pub struct PercentileIndex {
    origin: f64,
    buckets_per_unit: f64,
    /// `first[b]`: index of the first quantile at or above bucket b's lower edge (`BUCKETS + 1`
    /// entries, the last one past every quantile).
    first: Vec<usize>,
}

impl PercentileIndex {
    const BUCKETS: usize = 4096;

    pub fn new(thresholds: &Thresholds) -> Self {
        let q = &thresholds.quantiles;
        let (origin, span) = match (q.first(), q.last()) {
            (Some(&lo), Some(&hi)) if hi > lo && (hi - lo).is_finite() => (lo, hi - lo),
            // One value, or none: no energy lies strictly inside, and no bucket is used.
            _ => (0.0, 1.0),
        };
        let buckets_per_unit = Self::BUCKETS as f64 / span;
        let first = (0..=Self::BUCKETS)
            .map(|b| {
                let edge = origin + b as f64 / buckets_per_unit;
                q.partition_point(|&v| v < edge)
            })
            .collect();
        Self {
            origin,
            buckets_per_unit,
            first,
        }
    }

    /// `thresholds.percentile_rank(energy)`, found through the buckets, for the thresholds
    /// the index was built from (for others the check below makes it a plain search).
    #[inline]
    pub fn rank(&self, thresholds: &Thresholds, energy: f64) -> f64 {
        thresholds.rank_with(energy, |q| {
            let bucket =
                (((energy - self.origin) * self.buckets_per_unit) as usize).min(Self::BUCKETS - 1);
            // Rounding in the bucket arithmetic can pick a neighbouring bucket; the check below
            // notices, and the full search answers.
            let (start, end) = (self.first[bucket], self.first[bucket + 1].min(q.len()));
            let start = start.min(end);
            let hi = start + q[start..end].partition_point(|&v| v < energy);
            let below_is_less = hi == 0 || q[hi - 1] < energy;
            let here_is_at_least = hi == q.len() || q[hi] >= energy;
            if below_is_less && here_is_at_least {
                hi
            } else {
                q.partition_point(|&v| v < energy)
            }
        })
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

    #[test]
    fn the_bucket_index_ranks_exactly_like_the_binary_search() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // A dense bulk with ties, a heavy tail, one extreme outlier; and degenerate ones.
        let mut skewed: Vec<f64> = (0..5000).map(|_| rng.random_range(-8.0..4.0)).collect();
        skewed.extend((0..300).map(|i| 4.0 + f64::from(i).powi(2)));
        skewed.extend([1e9, 2.5, 2.5, 2.5, 2.5]);
        let sets: Vec<Vec<f64>> = vec![
            skewed,
            (0..1000).map(f64::from).collect(),
            vec![3.0; 10],
            vec![-1.0, 1.0],
        ];
        for energies in sets {
            let t = Thresholds::from_energies(&energies, 99.0, &[]);
            let index = PercentileIndex::new(&t);
            let mut probes: Vec<f64> = t
                .quantiles
                .iter()
                .flat_map(|&v| [v, v.next_down(), v.next_up(), v + 1e-3, v - 1e-3])
                .collect();
            probes.extend((0..20_000).map(|_| rng.random_range(-10.0..2e3)));
            probes.extend([
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::MAX,
                -f64::MAX,
            ]);
            for e in probes {
                let (want, got) = (t.percentile_rank(e), index.rank(&t, e));
                assert!(
                    want.to_bits() == got.to_bits(),
                    "energy {e}: binary search {want}, index {got}"
                );
            }
        }
        let empty = Thresholds::default();
        assert!(PercentileIndex::new(&empty).rank(&empty, 1.0).is_nan());
    }
}
