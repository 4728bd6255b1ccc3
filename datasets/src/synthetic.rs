//! A seeded generator of realistic server-metric exports, used for the bundled sample data,
//! tests and benchmarks.
//!
//! Each host follows a daily load curve (AR(1) noise on a shifted cosine). CPU and network-in
//! follow the load (network log-normally), memory drifts upward through the day and resets at a
//! nightly restart, disk busy follows load with a nightly backup burst. Rows go missing in a
//! few gaps and single values are sometimes null. Labelled anomalies of five kinds are injected:
//!
//! | kind | what happens | raises a threshold alert |
//! | --- | --- | --- |
//! | `cpu_saturation` | CPU 96–100 % while network-in is idle | yes (CPU > 95 %) |
//! | `memory_leak` | memory ramps to ~97 % over 1.5–2.5 h | near the end |
//! | `disk_saturation` | disk busy 97–100 % with normal CPU | yes |
//! | `network_flood` | network-in ×30–60 with CPU barely moving | no |
//! | `combination` | peak-hour CPU with night-time network-in: each value normal, the pair not | no |
//!
//! The `alert` column is what a threshold monitor would have raised (any percent metric > 95).

use polars::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::DataError;

/// Anomaly kinds, in the order they are cycled through.
pub const ANOMALY_KINDS: [&str; 5] = [
    "cpu_saturation",
    "memory_leak",
    "disk_saturation",
    "network_flood",
    "combination",
];
/// The single metric each kind drives (index into the four metrics); `None` for kinds that
/// move two metrics on purpose (CPU saturation idles the network too) and for combinations.
pub const KIND_METRIC: [Option<usize>; 5] = [None, Some(1), Some(2), Some(3), None];
/// Alert threshold on the percent metrics.
pub const ALERT_PERCENT: f64 = 95.0;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSpec {
    pub hosts: usize,
    pub days: f64,
    /// Seconds between samples.
    pub step_s: i64,
    /// Anomaly events per host per day.
    pub anomalies_per_day: f64,
    pub seed: u64,
    /// First timestamp, epoch ms.
    pub start_ms: i64,
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self {
            hosts: 6,
            days: 4.0,
            step_s: 60,
            anomalies_per_day: 2.0,
            seed: 7,
            // 2026-10-05T00:00:00Z
            start_ms: 1_791_158_400_000,
        }
    }
}

/// A generated export, column by column.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleExport {
    pub time_ms: Vec<i64>,
    pub host: Vec<String>,
    /// The four metrics; `None` is a missing value.
    pub values: Vec<[Option<f64>; 4]>,
    pub alert: Vec<bool>,
    pub is_anomaly: Vec<bool>,
    /// Anomaly kind, empty for normal rows.
    pub anomaly_kind: Vec<String>,
}

/// Per-host behaviour drawn from the seed.
struct HostProfile {
    cpu_base: f64,
    cpu_amp: f64,
    mem_base: f64,
    mem_drift: f64,
    disk_base: f64,
    disk_amp: f64,
    net_base: f64,
    net_gain: f64,
    peak_hour: f64,
    backup_hour: f64,
}

impl HostProfile {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        Self {
            cpu_base: rng.random_range(8.0..20.0),
            cpu_amp: rng.random_range(30.0..50.0),
            mem_base: rng.random_range(35.0..60.0),
            mem_drift: rng.random_range(4.0..12.0),
            disk_base: rng.random_range(2.0..6.0),
            disk_amp: rng.random_range(5.0..15.0),
            net_base: 10f64.powf(rng.random_range(5.0..6.5)),
            net_gain: rng.random_range(1.5..3.0),
            peak_hour: rng.random_range(11.0..16.0),
            backup_hour: rng.random_range(1.0..4.0),
        }
    }

    /// Metrics of a normal sample at hour-of-day `hour` with load in [0, 1].
    fn sample(&self, hour: f64, load: f64, rng: &mut ChaCha8Rng, noise: &Normal<f64>) -> [f64; 4] {
        let mut cpu = self.cpu_base + self.cpu_amp * load + 2.0 * noise.sample(rng);
        let restart_age = (hour - self.backup_hour).rem_euclid(24.0) / 24.0;
        let mem = self.mem_base + self.mem_drift * restart_age + noise.sample(rng);
        let mut disk = self.disk_base + self.disk_amp * load + 1.5 * noise.sample(rng).abs();
        if (hour - self.backup_hour).rem_euclid(24.0) < 0.33 {
            disk = rng.random_range(55.0..75.0);
            cpu += 8.0;
        }
        let net = self.net_base * (self.net_gain * load + 0.1 * noise.sample(rng)).exp();
        [
            cpu.clamp(0.0, 100.0),
            mem.clamp(0.0, 100.0),
            disk.clamp(0.0, 100.0),
            net.max(0.0),
        ]
    }

    fn load(&self, hour: f64) -> f64 {
        0.5 + 0.5 * (2.0 * std::f64::consts::PI * (hour - self.peak_hour) / 24.0).cos()
    }
}

/// Host names: a few roles, numbered.
fn host_name(i: usize) -> String {
    const ROLES: [&str; 6] = ["web", "db", "cache", "app", "batch", "proxy"];
    format!("{}-{:02}", ROLES[i % ROLES.len()], i / ROLES.len() + 1)
}

/// Generate an export.
pub fn generate(spec: &SampleSpec) -> SampleExport {
    let mut out = SampleExport::default();
    let noise = Normal::new(0.0, 1.0).expect("unit normal");
    let steps = (spec.days * 86_400.0 / spec.step_s as f64) as usize;
    for h in 0..spec.hosts {
        let mut rng =
            ChaCha8Rng::seed_from_u64(spec.seed.wrapping_mul(1_000_003).wrapping_add(h as u64));
        let profile = HostProfile::draw(&mut rng);
        let events = plan_anomalies(spec, steps, h, &mut rng);
        let gaps: Vec<(usize, usize)> = (0..3)
            .map(|_| {
                let start = rng.random_range(0..steps.max(1));
                (start, start + rng.random_range(10..60))
            })
            .collect();
        let mut ar = 0.0;
        for s in 0..steps {
            if gaps.iter().any(|&(a, b)| s >= a && s < b) {
                continue;
            }
            let t_ms = spec.start_ms + s as i64 * spec.step_s * 1000;
            let hour = (t_ms.rem_euclid(86_400_000)) as f64 / 3_600_000.0;
            ar = 0.9 * ar + 0.05 * noise.sample(&mut rng);
            let load = (profile.load(hour) + ar).clamp(0.0, 1.0);
            let mut v = profile.sample(hour, load, &mut rng, &noise);
            let event = events.iter().find(|e| s >= e.start && s < e.start + e.len);
            if let Some(e) = event {
                inject(&mut v, e, s, &profile, &mut rng);
            }
            let mut values = v.map(Some);
            if rng.random_bool(0.002) {
                values[rng.random_range(0..4)] = None;
            }
            out.time_ms.push(t_ms);
            out.host.push(host_name(h));
            out.alert.push(v[..3].iter().any(|&p| p > ALERT_PERCENT));
            out.values.push(values);
            out.is_anomaly.push(event.is_some());
            out.anomaly_kind
                .push(event.map_or(String::new(), |e| ANOMALY_KINDS[e.kind].to_string()));
        }
    }
    out
}

struct Event {
    kind: usize,
    start: usize,
    len: usize,
}

/// Non-overlapping events after the first half day, kinds cycling per host.
fn plan_anomalies(
    spec: &SampleSpec,
    steps: usize,
    host: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Event> {
    let count = (spec.anomalies_per_day * spec.days).round() as usize;
    let per_min = 60 / spec.step_s.max(1) as usize;
    let first = steps / (2 * spec.days.max(0.5) as usize).max(1);
    let mut events: Vec<Event> = Vec::new();
    for i in 0..count {
        let kind = (host + i) % ANOMALY_KINDS.len();
        let len = per_min.max(1)
            * match kind {
                1 => rng.random_range(90..150),
                _ => rng.random_range(8..25),
            };
        for _ in 0..50 {
            if steps <= first + len {
                break;
            }
            let start = rng.random_range(first..steps - len);
            if events
                .iter()
                .all(|e| start + len + 30 < e.start || e.start + e.len + 30 < start)
            {
                events.push(Event { kind, start, len });
                break;
            }
        }
    }
    events
}

fn inject(v: &mut [f64; 4], e: &Event, step: usize, p: &HostProfile, rng: &mut ChaCha8Rng) {
    match ANOMALY_KINDS[e.kind] {
        "cpu_saturation" => {
            v[0] = rng.random_range(96.0..100.0);
            v[3] = p.net_base * rng.random_range(0.2..0.5);
        }
        "memory_leak" => {
            let progress = (step - e.start) as f64 / e.len as f64;
            v[1] = v[1] + (97.0 - v[1]) * progress.powf(0.7);
        }
        "disk_saturation" => v[2] = rng.random_range(97.0..100.0),
        "network_flood" => {
            v[3] *= rng.random_range(30.0..60.0);
            v[0] = (v[0] + 5.0).min(100.0);
        }
        _ => {
            // Peak-hour CPU with night-time network: each value within its normal range.
            v[0] = p.cpu_base + p.cpu_amp * rng.random_range(0.85..0.95);
            v[3] = p.net_base * (p.net_gain * 0.03).exp();
        }
    }
}

impl SampleExport {
    pub fn len(&self) -> usize {
        self.time_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.time_ms.is_empty()
    }

    /// As a DataFrame with the default export column names plus `is_anomaly` and `anomaly_kind`.
    pub fn to_dataframe(&self) -> Result<DataFrame, DataError> {
        let metric = |j: usize| {
            self.values
                .iter()
                .map(|v| v[j])
                .collect::<Vec<Option<f64>>>()
        };
        let time = Column::new("timestamp".into(), &self.time_ms)
            .cast(&DataType::Datetime(
                TimeUnit::Milliseconds,
                Some(TimeZone::UTC),
            ))
            .map_err(|e| DataError::Other(e.to_string()))?;
        DataFrame::new_infer_height(vec![
            time,
            Column::new("host".into(), &self.host),
            Column::new("cpu_usage".into(), metric(0)),
            Column::new("mem_usage".into(), metric(1)),
            Column::new("disk_busy".into(), metric(2)),
            Column::new("net_in_bps".into(), metric(3)),
            Column::new("alert".into(), &self.alert),
            Column::new("is_anomaly".into(), &self.is_anomaly),
            Column::new("anomaly_kind".into(), &self.anomaly_kind),
        ])
        .map_err(|e| DataError::Other(e.to_string()))
    }
}

/// Write a DataFrame as zstd Parquet (via a temp file renamed into place) or CSV, by extension.
pub fn write_frame(df: &mut DataFrame, path: &std::path::Path) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = tempfile::Builder::new()
        .prefix(".dagmm-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    let fail = |e: PolarsError| DataError::Other(format!("{}: {e}", path.display()));
    match crate::read::FileFormat::of(path) {
        Some(crate::read::FileFormat::Parquet) => {
            ParquetWriter::new(tmp.as_file())
                .with_compression(ParquetCompression::Zstd(None))
                .finish(df)
                .map_err(fail)?;
        }
        Some(crate::read::FileFormat::Csv) => {
            CsvWriter::new(tmp.as_file())
                .include_header(true)
                .finish(df)
                .map_err(fail)?;
        }
        None => {
            return Err(DataError::UnsupportedFormat {
                path: path.to_path_buf(),
            });
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// The reference scenario: 1000 normal 4-metric samples of one host (consecutive minutes) and
/// two injected anomalies (CPU saturation with idle network; disk saturation with high memory).
pub fn reference_scenario(seed: u64) -> (Vec<[f64; 4]>, Vec<[f64; 4]>) {
    // Gaps and nulls remove some rows; generate a margin and keep the first 1000 complete ones.
    let spec = SampleSpec {
        hosts: 1,
        days: 1.0,
        anomalies_per_day: 0.0,
        seed,
        ..Default::default()
    };
    let normal: Vec<[f64; 4]> = generate(&spec)
        .values
        .iter()
        .filter(|v| v.iter().all(Option::is_some))
        .map(|v| v.map(|x| x.expect("complete row")))
        .take(1000)
        .collect();
    let median_net = {
        let mut n: Vec<f64> = normal.iter().map(|v| v[3]).collect();
        n.sort_by(f64::total_cmp);
        n[n.len() / 2]
    };
    let anomalies = vec![
        [99.0, 45.0, 5.0, median_net * 0.05],
        [12.0, 93.0, 98.0, median_net],
    ];
    (normal, anomalies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_seeded_and_has_every_anomaly_kind() {
        let spec = SampleSpec {
            hosts: 5,
            days: 2.0,
            ..Default::default()
        };
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        assert_ne!(
            a,
            generate(&SampleSpec {
                seed: 8,
                ..spec.clone()
            })
        );
        for kind in ANOMALY_KINDS {
            assert!(a.anomaly_kind.iter().any(|k| k == kind), "{kind} missing");
        }
        let gaps = 5 * 2 * 1440 - a.len();
        assert!(gaps > 0, "some rows are missing");
        assert!(a.values.iter().any(|v| v.iter().any(Option::is_none)));
        // Percent metrics stay in range and saturations raise alerts.
        assert!(
            a.values
                .iter()
                .flatten()
                .take(4000)
                .flatten()
                .all(|x| *x >= 0.0)
        );
        let saturated_alerts = (0..a.len())
            .filter(|&i| a.anomaly_kind[i] == "cpu_saturation")
            .all(|i| a.alert[i]);
        assert!(saturated_alerts);
    }

    #[test]
    fn dataframe_round_trips_through_parquet_and_csv() {
        let spec = SampleSpec {
            hosts: 2,
            days: 0.5,
            ..Default::default()
        };
        let export = generate(&spec);
        let dir = tempfile::tempdir().unwrap();
        for name in ["x.parquet", "x.csv"] {
            let path = dir.path().join(name);
            write_frame(&mut export.to_dataframe().unwrap(), &path).unwrap();
            let table =
                crate::read::read_metrics(path.to_str().unwrap(), &Default::default()).unwrap();
            assert_eq!(table.len(), export.len());
            assert_eq!(table.time_ms[5], Some(export.time_ms[5]));
            assert_eq!(table.host(5), export.host[5]);
            assert_eq!(table.values[5][3], export.values[5][3].unwrap_or(f64::NAN));
        }
    }
}
