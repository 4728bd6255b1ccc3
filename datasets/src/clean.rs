//! Cleaning and training windows, per host.
//!
//! Per host, in time order: rows without a time are dropped; repeated timestamps keep the last
//! row; rows that raised an alert are dropped; missing values (null, NaN, ±inf) are dropped or
//! forward-filled within a maximum gap; out-of-range values are clipped into range (percent to
//! [0, 100], rates to ≥ 0) and counted; then the window is taken (the last N rows, or a time
//! range). Every rule's count is reported.

use std::collections::{BTreeMap, HashMap};

use crate::DataError;
use crate::columns::METRICS;
use crate::read::MetricTable;

/// What to do with a missing metric value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingPolicy {
    /// Drop the row.
    Drop,
    /// Use the host's previous value of that metric if it is at most `max_gap_ms` older;
    /// otherwise drop the row.
    ForwardFill { max_gap_ms: i64 },
}

/// Which rows of each host to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The most recent N rows per host (after cleaning).
    Last(usize),
    /// Rows with from ≤ time < to (epoch ms; either end open).
    Range { from: Option<i64>, to: Option<i64> },
    /// Every row.
    All,
}

/// Cleaning and windowing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CleanOptions {
    pub missing: MissingPolicy,
    pub window: Window,
    /// Valid (min, max) of each metric; values outside are clipped and counted.
    pub bounds: [(Option<f64>, Option<f64>); 4],
    /// Groups with fewer rows than this after cleaning are skipped.
    pub min_rows: usize,
    /// One group per value of the table's group column; otherwise one group of everything.
    pub grouped: bool,
}

/// What cleaning did, rule by rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CleaningReport {
    pub rows_in: usize,
    /// Rows removed, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Missing values filled from the previous sample.
    pub filled: usize,
    /// Values clipped into range, by metric.
    pub clipped: BTreeMap<String, usize>,
}

impl CleaningReport {
    fn drop(&mut self, reason: &str, count: usize) {
        if count > 0 {
            *self.dropped.entry(reason.to_string()).or_default() += count;
        }
    }

    fn merge(&mut self, other: &CleaningReport) {
        self.rows_in += other.rows_in;
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        self.filled += other.filled;
        for (k, v) in &other.clipped {
            *self.clipped.entry(k.clone()).or_default() += v;
        }
    }
}

/// Clean rows of one group, ready to train on.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupData {
    /// Group value (`None`: all rows in one model).
    pub name: Option<String>,
    pub rows: Vec<[f64; 4]>,
    pub time_ms: Vec<i64>,
    pub report: CleaningReport,
}

/// A group left out, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedGroup {
    pub name: Option<String>,
    pub why: String,
    pub report: CleaningReport,
}

/// Rows of one group as (time, values).
type TimedRows = Vec<(i64, [f64; 4])>;

/// Clean every host's series, take the windows, and split into groups.
pub fn prepare_groups(
    table: &MetricTable,
    opts: &CleanOptions,
) -> Result<(Vec<GroupData>, Vec<SkippedGroup>), DataError> {
    if let Window::Last(0) = opts.window {
        return Err(DataError::InvalidOption {
            option: "--last",
            why: "must be at least 1".into(),
        });
    }
    if let MissingPolicy::ForwardFill { max_gap_ms } = opts.missing
        && max_gap_ms < 0
    {
        return Err(DataError::InvalidOption {
            option: "--max-gap",
            why: "must not be negative".into(),
        });
    }
    // Rows of each host, hosts in first-seen order so the output is deterministic.
    let mut by_host: Vec<Vec<usize>> = vec![Vec::new(); table.host_names.len()];
    for (i, &h) in table.host_index.iter().enumerate() {
        by_host[h as usize].push(i);
    }
    let mut groups: Vec<(Option<String>, GroupData)> = Vec::new();
    let mut group_index: HashMap<Option<String>, usize> = HashMap::new();
    for rows in &by_host {
        let (kept, report) = clean_host(table, rows, opts);
        // A host's rows may fall into several groups when grouping by another column.
        let mut per_group: Vec<(Option<String>, TimedRows)> = Vec::new();
        for (row, t, values) in kept {
            let key = opts.grouped.then(|| table.group_of(row).to_string());
            match per_group.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push((t, values)),
                None => per_group.push((key, vec![(t, values)])),
            }
        }
        if per_group.is_empty() {
            per_group.push((
                opts.grouped.then(|| table.group_of(rows[0]).to_string()),
                Vec::new(),
            ));
        }
        for (i, (key, rows)) in per_group.into_iter().enumerate() {
            let slot = *group_index.entry(key.clone()).or_insert_with(|| {
                groups.push((
                    key.clone(),
                    GroupData {
                        name: key.clone(),
                        rows: vec![],
                        time_ms: vec![],
                        report: CleaningReport::default(),
                    },
                ));
                groups.len() - 1
            });
            let g = &mut groups[slot].1;
            if i == 0 {
                g.report.merge(&report);
            }
            for (t, v) in rows {
                g.time_ms.push(t);
                g.rows.push(v);
            }
        }
    }
    let mut ready = Vec::new();
    let mut skipped = Vec::new();
    for (_, g) in groups {
        if g.rows.len() < opts.min_rows.max(1) {
            skipped.push(SkippedGroup {
                why: format!(
                    "{} rows after cleaning, fewer than the minimum {}",
                    g.rows.len(),
                    opts.min_rows.max(1)
                ),
                name: g.name,
                report: g.report,
            });
        } else {
            ready.push(g);
        }
    }
    Ok((ready, skipped))
}

/// Clean one host's rows; returns (row index, time, values) of the kept rows in time order.
fn clean_host(
    table: &MetricTable,
    rows: &[usize],
    opts: &CleanOptions,
) -> (Vec<(usize, i64, [f64; 4])>, CleaningReport) {
    let mut report = CleaningReport {
        rows_in: rows.len(),
        ..Default::default()
    };
    let mut timed: Vec<(usize, i64)> = rows
        .iter()
        .filter_map(|&r| table.time_ms[r].map(|t| (r, t)))
        .collect();
    report.drop("missing timestamp", rows.len() - timed.len());
    timed.sort_by_key(|&(r, t)| (t, r));
    // Repeated timestamps: the later row in the export wins.
    let before = timed.len();
    let mut deduped: Vec<(usize, i64)> = Vec::with_capacity(timed.len());
    for (r, t) in timed {
        match deduped.last_mut() {
            Some(last) if last.1 == t => *last = (r, t),
            _ => deduped.push((r, t)),
        }
    }
    report.drop("duplicate timestamp", before - deduped.len());

    let mut last_valid: [Option<(i64, f64)>; 4] = [None; 4];
    let mut kept = Vec::with_capacity(deduped.len());
    let (mut alerts, mut missing, mut beyond_gap) = (0, 0, 0);
    for (r, t) in deduped {
        let mut values = table.values[r];
        // Remember good values even on alert rows: they are real measurements for filling.
        let mut complete = true;
        for (j, v) in values.iter_mut().enumerate() {
            if v.is_finite() {
                last_valid[j] = Some((t, *v));
                continue;
            }
            match (opts.missing, last_valid[j]) {
                (MissingPolicy::ForwardFill { max_gap_ms }, Some((t0, v0)))
                    if t - t0 <= max_gap_ms =>
                {
                    *v = v0;
                    report.filled += 1;
                }
                _ => complete = false,
            }
        }
        if table.alert[r] {
            alerts += 1;
            continue;
        }
        if !complete {
            match opts.missing {
                MissingPolicy::Drop => missing += 1,
                MissingPolicy::ForwardFill { .. } => beyond_gap += 1,
            }
            continue;
        }
        for (j, v) in values.iter_mut().enumerate() {
            let (lo, hi) = opts.bounds[j];
            let clipped = v
                .max(lo.unwrap_or(f64::NEG_INFINITY))
                .min(hi.unwrap_or(f64::INFINITY));
            if clipped != *v {
                *report.clipped.entry(METRICS[j].to_string()).or_default() += 1;
                *v = clipped;
            }
        }
        kept.push((r, t, values));
    }
    report.drop("alert raised", alerts);
    report.drop("missing value", missing);
    report.drop("missing value beyond max gap", beyond_gap);

    let before = kept.len();
    match opts.window {
        Window::All => {}
        Window::Last(n) => {
            if kept.len() > n {
                kept.drain(..kept.len() - n);
            }
            report.drop("before the last-N window", before - kept.len());
        }
        Window::Range { from, to } => {
            kept.retain(|&(_, t, _)| from.is_none_or(|f| t >= f) && to.is_none_or(|e| t < e));
            report.drop("outside the time range", before - kept.len());
        }
    }
    (kept, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn table(rows: &[(&str, Option<i64>, [f64; 4], bool)]) -> MetricTable {
        let (host_index, host_names) = crate::read::index_names(rows.iter().map(|r| r.0));
        MetricTable {
            time_ms: rows.iter().map(|r| r.1).collect(),
            host_index,
            host_names,
            group: None,
            values: rows.iter().map(|r| r.2).collect(),
            alert: rows.iter().map(|r| r.3).collect(),
        }
    }

    fn opts(missing: MissingPolicy, window: Window) -> CleanOptions {
        CleanOptions {
            missing,
            window,
            bounds: [
                (Some(0.0), Some(100.0)),
                (Some(0.0), Some(100.0)),
                (Some(0.0), Some(100.0)),
                (Some(0.0), None),
            ],
            min_rows: 1,
            grouped: true,
        }
    }

    #[test]
    fn every_rule_is_applied_and_counted() {
        let ok = [10.0, 20.0, 30.0, 1e4];
        let t = table(&[
            ("a", Some(5 * MIN), ok, false),
            ("a", Some(MIN), ok, false),
            ("a", None, ok, false),
            ("a", Some(2 * MIN), ok, true),
            ("a", Some(3 * MIN), [f64::NAN, 20.0, 30.0, 1e4], false),
            ("a", Some(4 * MIN), [120.0, 20.0, -3.0, -1.0], false),
            ("a", Some(4 * MIN), [50.0, 20.0, 30.0, 1e4], false),
        ]);
        let (groups, skipped) =
            prepare_groups(&t, &opts(MissingPolicy::Drop, Window::All)).unwrap();
        assert!(skipped.is_empty());
        let g = &groups[0];
        assert_eq!(g.time_ms, vec![MIN, 4 * MIN, 5 * MIN]);
        assert_eq!(g.rows[1], [50.0, 20.0, 30.0, 1e4], "later duplicate wins");
        let r = &g.report;
        assert_eq!(r.rows_in, 7);
        assert_eq!(r.dropped["missing timestamp"], 1);
        assert_eq!(r.dropped["duplicate timestamp"], 1);
        assert_eq!(r.dropped["alert raised"], 1);
        assert_eq!(r.dropped["missing value"], 1);
        assert!(
            r.clipped.is_empty(),
            "the clipped row lost to its duplicate"
        );
    }

    #[test]
    fn clipping_is_counted_per_metric() {
        let t = table(&[("a", Some(MIN), [120.0, 20.0, -3.0, -1.0], false)]);
        let (groups, _) = prepare_groups(&t, &opts(MissingPolicy::Drop, Window::All)).unwrap();
        assert_eq!(groups[0].rows[0], [100.0, 20.0, 0.0, 0.0]);
        assert_eq!(groups[0].report.clipped.len(), 3);
    }

    #[test]
    fn forward_fill_respects_the_max_gap() {
        let ok = [10.0, 20.0, 30.0, 1e4];
        let gap = [10.0, f64::NAN, 30.0, 1e4];
        let t = table(&[
            ("a", Some(0), ok, false),
            ("a", Some(MIN), gap, false),
            ("a", Some(10 * MIN), gap, false),
        ]);
        let (groups, _) = prepare_groups(
            &t,
            &opts(
                MissingPolicy::ForwardFill {
                    max_gap_ms: 5 * MIN,
                },
                Window::All,
            ),
        )
        .unwrap();
        assert_eq!(groups[0].rows.len(), 2);
        assert_eq!(groups[0].rows[1][1], 20.0);
        assert_eq!(groups[0].report.filled, 1);
        assert_eq!(groups[0].report.dropped["missing value beyond max gap"], 1);
    }

    #[test]
    fn windows_keep_the_latest_rows_per_host_or_a_range() {
        let rows: Vec<_> = (0..10)
            .flat_map(|i| {
                [
                    ("a", Some(i * MIN), [1.0; 4], false),
                    ("b", Some(i * MIN), [2.0; 4], false),
                ]
            })
            .collect();
        let t = table(&rows);
        let (groups, _) = prepare_groups(&t, &opts(MissingPolicy::Drop, Window::Last(3))).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].time_ms, vec![7 * MIN, 8 * MIN, 9 * MIN]);
        assert_eq!(groups[1].report.dropped["before the last-N window"], 7);
        let range = Window::Range {
            from: Some(2 * MIN),
            to: Some(4 * MIN),
        };
        let (groups, _) = prepare_groups(&t, &opts(MissingPolicy::Drop, range)).unwrap();
        assert_eq!(groups[0].time_ms, vec![2 * MIN, 3 * MIN]);
        let mut one = opts(MissingPolicy::Drop, Window::Last(3));
        one.grouped = false;
        let (groups, _) = prepare_groups(&t, &one).unwrap();
        assert_eq!(
            (groups.len(), groups[0].rows.len(), groups[0].name.clone()),
            (1, 6, None)
        );
    }

    #[test]
    fn small_groups_are_skipped_with_a_reason() {
        let t = table(&[
            ("a", Some(0), [1.0; 4], false),
            ("b", Some(0), [1.0; 4], true),
        ]);
        let mut o = opts(MissingPolicy::Drop, Window::All);
        o.min_rows = 1;
        let (groups, skipped) = prepare_groups(&t, &o).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(skipped[0].name.as_deref(), Some("b"));
        assert!(skipped[0].why.contains("0 rows"));
    }
}
