//! Train on the first three days of the sample export, batch-score all of it, and check that
//! injected anomalies are flagged, that every row is accounted for, and that the output equals
//! what `POST /score` answers for the same rows.

mod common;

use std::path::Path;

use common::{sample_path, train_sample_model};
use dagmm_datasets::read::{ReadOptions, read_file};
use dagmm_datasets::synthetic::{ANOMALY_KINDS, KIND_METRIC};
use dagmm_serve::app::score_request;
use dagmm_serve::batch::{BatchOptions, Explain, run};
use dagmm_serve::registry::Registry;
use dagmm_serve::request::parse;
use polars::prelude::*;
use serde_json::json;

/// 2026-10-08T00:00:00Z: the first three days train, the rest is new to the models.
const SPLIT_MS: i64 = 1_791_417_600_000;
const HOSTS: [&str; 2] = ["web-01", "db-01"];

fn options(input: &str, output: &Path) -> BatchOptions {
    BatchOptions {
        input: input.to_string(),
        output: output.to_path_buf(),
        read: ReadOptions::default(),
        default_model: None,
        label_column: Some("is_anomaly".into()),
        chunk_rows: 5000,
        explain: Explain::All,
        progress: None,
    }
}

/// Assert that these columns of two frames are equal, nulls included.
fn assert_same_columns(a: &DataFrame, b: &DataFrame, names: &[&str]) {
    for name in names {
        let column = |df: &DataFrame| df.column(name).unwrap().as_materialized_series().clone();
        assert!(
            column(a).equals_missing(&column(b)),
            "column {name} differs"
        );
    }
}

/// A registry holding one `web-01` model trained for `epochs` on the sample data, under `dir`.
fn web01_registry(dir: &Path, epochs: usize) -> Registry {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    train_sample_model("web-01", &models, epochs, None);
    Registry::open(&models).unwrap()
}

#[test]
fn batch_scores_flag_injected_anomalies_and_equal_the_servers_answers() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    for host in HOSTS {
        train_sample_model(host, &models, 150, Some(SPLIT_MS));
    }
    let registry = Registry::open(&models).unwrap();
    let snapshot = registry.snapshot();
    let output = dir.path().join("scored.parquet");
    let summary = run(
        &snapshot,
        &options(sample_path().to_str().unwrap(), &output),
    )
    .unwrap();

    let scored = read_file(&output).unwrap();
    let input = read_file(&sample_path()).unwrap();
    // The summary's top rows are the output's highest energies, highest first.
    let mut energies: Vec<f64> = scored
        .column("energy")
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    energies.sort_by(|a, b| b.total_cmp(a));
    let top: Vec<f64> = summary.top.iter().map(|r| r.energy).collect();
    assert_eq!(top, energies[..20]);
    assert_eq!(
        scored.height(),
        input.height(),
        "every input row is in the output"
    );
    for name in input.get_column_names() {
        assert!(scored.schema().contains(name), "input column {name} kept");
    }
    let unrouted = summary
        .not_scored
        .iter()
        .filter(|(r, _)| r.starts_with("no model"))
        .map(|(_, n)| n)
        .sum::<usize>();
    assert!(
        unrouted > 0,
        "hosts without a model are counted, not dropped"
    );
    assert_eq!(summary.rows_in, input.height());

    // Injected anomalies after the split, on hosts with a model.
    let host = scored.column("host").unwrap().str().unwrap().clone();
    let time = scored
        .column("timestamp")
        .unwrap()
        .cast(&DataType::Int64)
        .unwrap();
    let time = time.i64().unwrap().clone();
    let kind = scored
        .column("anomaly_kind")
        .unwrap()
        .str()
        .unwrap()
        .clone();
    let anomaly = scored.column("anomaly").unwrap().bool().unwrap().clone();
    // Written as a categorical column (a Parquet dictionary); its values are the metric names.
    let top = scored
        .column("top_metric")
        .unwrap()
        .cast(&DataType::String)
        .unwrap();
    let top = top.str().unwrap().clone();
    let energy = scored.column("energy").unwrap().f64().unwrap().clone();
    let (mut injected, mut flagged, mut normal, mut false_alarms) = (0, 0, 0, 0);
    let (mut single, mut single_top) = (0, 0);
    // Events: runs of rows of one kind on one host; detected when any row is flagged.
    let mut events: Vec<(String, String, bool)> = Vec::new();
    // Per kind: rows, rows flagged, flagged rows whose injected metric contributed most.
    let mut per_kind: std::collections::BTreeMap<String, (usize, usize, usize)> =
        Default::default();
    for i in 0..scored.height() {
        let ours = HOSTS.contains(&host.get(i).unwrap_or(""))
            && time.get(i).is_some_and(|t| t >= SPLIT_MS);
        let Some(flag) = anomaly.get(i) else { continue };
        if !ours {
            continue;
        }
        let k = kind.get(i).unwrap_or("");
        if k.is_empty() {
            normal += 1;
            false_alarms += usize::from(flag);
            continue;
        }
        injected += 1;
        flagged += usize::from(flag);
        let h = host.get(i).unwrap_or("").to_string();
        let continues = i > 0 && kind.get(i - 1) == Some(k) && host.get(i - 1) == Some(h.as_str());
        match events.last_mut() {
            Some(last) if continues => last.2 |= flag,
            _ => events.push((h, k.to_string(), flag)),
        }
        let kind_index = ANOMALY_KINDS.iter().position(|x| *x == k).unwrap();
        let entry = per_kind.entry(k.to_string()).or_default();
        entry.0 += 1;
        entry.1 += usize::from(flag);
        if let (Some(metric), true) = (KIND_METRIC[kind_index], flag) {
            single += 1;
            let on_top = top.get(i) == Some(dagmm_datasets::METRICS[metric]);
            single_top += usize::from(on_top);
            entry.2 += usize::from(on_top);
        }
    }
    let recall = flagged as f64 / injected as f64;
    let false_rate = false_alarms as f64 / normal as f64;
    let top_share = single_top as f64 / single.max(1) as f64;
    eprintln!(
        "held-out days: {flagged}/{injected} injected anomalous rows flagged (recall {recall:.3}), \
         {false_alarms}/{normal} normal rows flagged ({:.2} %); injected metric on top in {single_top}/{single} \
         flagged single-metric anomalies ({:.1} %)",
        100.0 * false_rate,
        100.0 * top_share
    );
    eprint!("{}", summary.render(&output));
    for (k, (n, f, on_top)) in &per_kind {
        let ev: Vec<_> = events.iter().filter(|e| &e.1 == k).collect();
        let found = ev.iter().filter(|e| e.2).count();
        eprintln!(
            "  {k:<16} rows flagged {f}/{n}, events detected {found}/{}, injected metric on top {on_top}",
            ev.len()
        );
    }
    let detected = events.iter().filter(|e| e.2).count();
    eprintln!("events detected: {detected}/{}", events.len());
    assert!(injected > 0 && recall >= 0.2, "row recall {recall}");
    assert!(
        detected as f64 >= 0.6 * events.len() as f64,
        "detected {detected} of {} events",
        events.len()
    );
    assert!(
        top_share >= 0.8,
        "injected metric on top in only {:.1} %",
        100.0 * top_share
    );
    assert!(false_rate <= 0.05, "false alarm rate {false_rate}");

    // The same rows through the server's scoring path give the same numbers.
    let metric_cols: Vec<Vec<Option<f64>>> = dagmm_datasets::METRICS
        .iter()
        .map(|m| scored.column(m).unwrap().f64().unwrap().iter().collect())
        .collect();
    let mut compared = 0;
    for i in (0..scored.height()).step_by(97) {
        let h = host.get(i).unwrap();
        let values: Option<Vec<f64>> = metric_cols.iter().map(|c| c[i]).collect();
        let (Some(values), Some(e)) = (values, energy.get(i)) else {
            continue;
        };
        let body = json!({"samples": [{"host": h, "cpu_usage": values[0], "mem_usage": values[1], "disk_busy": values[2], "net_in_bps": values[3]}]});
        let Ok(served) = score_request(&snapshot, &parse(body.to_string().as_bytes(), 10).unwrap())
        else {
            continue; // values the server rejects (e.g. out of range) are null in batch output too
        };
        let v = &served[0].1.verdict;
        assert_eq!(v.energy, e, "row {i}");
        assert_eq!(Some(v.anomaly), anomaly.get(i));
        assert_eq!(Some(v.top_metric.as_str()), top.get(i));
        let percentile = scored.column("percentile").unwrap().f64().unwrap().get(i);
        assert_eq!(Some(v.percentile), percentile);
        for ex in &v.explanation {
            let c = scored
                .column(&format!("contribution_{}", ex.metric))
                .unwrap()
                .f32()
                .unwrap()
                .get(i);
            assert_eq!(Some(ex.contribution), c);
        }
        compared += 1;
    }
    assert!(compared > 50, "compared {compared} rows");
}

#[test]
fn bad_batch_input_is_a_clear_error_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let registry = web01_registry(dir.path(), 2);
    let snapshot = registry.snapshot();
    let out = dir.path().join("out.parquet");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let corrupt = write("corrupt.parquet", b"PAR1 definitely not parquet PAR1");
    // Cut out of the middle, footer kept: the footer points past the end of the file.
    let whole = std::fs::read(sample_path()).unwrap();
    let mut cut = whole[..whole.len() / 2].to_vec();
    cut.extend_from_slice(&whole[whole.len() - 4096..]);
    let truncated = write("truncated.parquet", &cut);
    let empty = write("empty.csv", b"");
    let header_only = write(
        "header.csv",
        b"timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps\n",
    );
    let no_cpu = write(
        "nocpu.csv",
        b"timestamp,host,mem_usage,disk_busy,net_in_bps\n1,web-01,1,2,3\n",
    );
    // A second file that fails after the first has been scored and partly written.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(sample_path(), mixed.join("a.parquet")).unwrap();
    std::fs::write(
        mixed.join("b.csv"),
        "timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps,extra\n1,web-01,1,2,3,4,5\n",
    )
    .unwrap();
    let cases: Vec<(BatchOptions, &str)> = vec![
        (options(&corrupt, &out), "corrupt.parquet"),
        (
            options(&truncated, &out),
            "truncated.parquet: cannot read as Parquet: row group",
        ),
        (
            options(mixed.to_str().unwrap(), &out),
            "b.csv: columns differ from the first input file",
        ),
        (options(&empty, &out), "empty.csv: no rows"),
        (options(&header_only, &out), "header.csv: no rows"),
        (options(&no_cpu, &out), "`cpu_usage`"),
        (options("/nonexistent/*.parquet", &out), "no input files"),
        (
            BatchOptions {
                default_model: Some("nope".into()),
                ..options(sample_path().to_str().unwrap(), &out)
            },
            "nope",
        ),
        (
            options(
                sample_path().to_str().unwrap(),
                Path::new("/nonexistent-dir/out.parquet"),
            ),
            "/nonexistent-dir/out.parquet",
        ),
        (
            options(sample_path().to_str().unwrap(), &dir.path().join("out.txt")),
            "out.txt",
        ),
    ];
    for (opts, needle) in cases {
        let err = format!("{:#}", run(&snapshot, &opts).unwrap_err());
        assert!(err.contains(needle), "expected {needle:?} in {err}");
        assert!(!out.exists(), "no output left behind ({needle})");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn chunks_that_cut_across_row_groups_score_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let registry = web01_registry(dir.path(), 2);
    // Row groups of 700 rows read in slices of 1000: every slice spans two row groups.
    let spec = dagmm_datasets::synthetic::SampleSpec {
        hosts: 1,
        days: 3.0,
        ..Default::default()
    };
    let mut df = dagmm_datasets::synthetic::generate(&spec)
        .to_dataframe()
        .unwrap();
    let input = dir.path().join("groups.parquet");
    ParquetWriter::new(std::fs::File::create(&input).unwrap())
        .with_row_group_size(Some(700))
        .finish(&mut df)
        .unwrap();
    let output = dir.path().join("out.parquet");
    let opts = BatchOptions {
        chunk_rows: 1000,
        label_column: None,
        ..options(input.to_str().unwrap(), &output)
    };
    let summary = run(&registry.snapshot(), &opts).unwrap();
    assert_eq!(summary.rows_in, df.height());
    assert_eq!(read_file(&output).unwrap().height(), df.height());
}

#[test]
fn explaining_only_anomalies_keeps_every_score_and_explains_the_flagged_rows() {
    let dir = tempfile::tempdir().unwrap();
    let registry = web01_registry(dir.path(), 20);
    let input = sample_path();
    let score = |explain: Explain, name: &str| {
        let output = dir.path().join(name);
        let opts = BatchOptions {
            explain,
            label_column: None,
            default_model: Some("web-01".into()),
            ..options(input.to_str().unwrap(), &output)
        };
        run(&registry.snapshot(), &opts).unwrap();
        read_file(&output).unwrap()
    };
    let full = score(Explain::All, "all.parquet");
    let flagged_only = score(Explain::Anomalies, "anomalies.parquet");
    assert_eq!(full.height(), flagged_only.height());
    assert_same_columns(
        &full,
        &flagged_only,
        &[
            "energy",
            "anomaly",
            "severity",
            "percentile",
            "model",
            "reason",
        ],
    );
    let anomaly = full.column("anomaly").unwrap().bool().unwrap().clone();
    let flagged = (0..anomaly.len())
        .filter(|&i| anomaly.get(i) == Some(true))
        .count();
    assert!(
        flagged > 0 && flagged < full.height(),
        "{flagged} rows flagged"
    );
    let mut explained_columns = vec!["top_metric".to_string()];
    explained_columns.extend(
        dagmm_datasets::METRICS
            .iter()
            .map(|m| format!("contribution_{m}")),
    );
    for name in &explained_columns {
        let a = full.column(name).unwrap().as_materialized_series().clone();
        let b = flagged_only
            .column(name)
            .unwrap()
            .as_materialized_series()
            .clone();
        for i in 0..full.height() {
            let (va, vb) = (a.get(i).unwrap(), b.get(i).unwrap());
            match anomaly.get(i) {
                Some(true) => assert_eq!(va, vb, "row {i} {name}"),
                _ => assert!(vb.is_null(), "row {i} {name}: {vb:?} on an unflagged row"),
            }
        }
    }
}

#[test]
fn parquet_output_copies_the_input_and_scores_like_the_decoding_path() {
    let dir = tempfile::tempdir().unwrap();
    let registry = web01_registry(dir.path(), 20);
    let input = sample_path();
    assert!(
        dagmm_serve::parquet_copy::plan(std::slice::from_ref(&input))
            .unwrap()
            .is_some(),
        "the sample export is copied, not re-encoded"
    );
    // CSV output always decodes and re-encodes: the reference for the copying path.
    let score = |name: &str| {
        let output = dir.path().join(name);
        let opts = BatchOptions {
            label_column: None,
            chunk_rows: 3000,
            ..options(input.to_str().unwrap(), &output)
        };
        run(&registry.snapshot(), &opts).unwrap();
        read_file(&output).unwrap()
    };
    let copied = score("scored.parquet");
    let decoded = score("scored.csv");
    let original = read_file(&input).unwrap();

    let names = original.get_column_names_owned();
    assert!(
        copied.select(names).unwrap().equals_missing(&original),
        "input columns are the input's, value for value and type for type"
    );
    assert_eq!(copied.height(), decoded.height());
    let mut score_columns = vec!["energy".to_string(), "percentile".to_string()];
    score_columns.extend(
        dagmm_datasets::METRICS
            .iter()
            .map(|m| format!("contribution_{m}")),
    );
    for name in &score_columns {
        // Contributions are f32, read back from the CSV as f64: compared in the Parquet
        // column's own type (the CSV holds each f32's shortest decimal form).
        let a = copied.column(name).unwrap();
        let b = decoded.column(name).unwrap().cast(a.dtype()).unwrap();
        let as_f64 = |c: &Column| c.cast(&DataType::Float64).unwrap();
        let (a, b) = (as_f64(a), as_f64(&b));
        let (a, b) = (a.f64().unwrap(), b.f64().unwrap());
        assert!(a.null_count() < a.len(), "{name} has values");
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            assert_eq!(x, y, "row {i} {name}");
        }
    }
    for name in ["anomaly", "severity", "top_metric", "model", "reason"] {
        let text = |df: &DataFrame| {
            df.column(name)
                .unwrap()
                .cast(&DataType::String)
                .unwrap()
                .as_materialized_series()
                .clone()
        };
        assert!(
            text(&copied).equals_missing(&text(&decoded)),
            "column {name} differs"
        );
    }
}

#[test]
fn inputs_that_cannot_be_copied_take_the_decoding_path() {
    use dagmm_serve::parquet_copy::{MAX_ROW_GROUP_ROWS, plan};
    let dir = tempfile::tempdir().unwrap();
    let n = MAX_ROW_GROUP_ROWS + 1;
    let mut df = df!(
        "timestamp" => (0..n as i64).map(|i| i * 60_000).collect::<Vec<_>>(),
        "cpu_usage" => vec![1.0f64; n],
    )
    .unwrap();
    let big = dir.path().join("big.parquet");
    ParquetWriter::new(std::fs::File::create(&big).unwrap())
        .with_row_group_size(Some(n))
        .finish(&mut df)
        .unwrap();
    let small = dir.path().join("small.parquet");
    ParquetWriter::new(std::fs::File::create(&small).unwrap())
        .with_row_group_size(Some(n / 2))
        .finish(&mut df)
        .unwrap();
    let csv = dir.path().join("small.csv");
    CsvWriter::new(std::fs::File::create(&csv).unwrap())
        .finish(&mut df)
        .unwrap();
    let copied = plan(std::slice::from_ref(&small)).unwrap().expect("copied");
    assert_eq!(copied.row_groups.len(), 2);
    assert!(plan(std::slice::from_ref(&big)).unwrap().is_none());
    assert!(plan(&[small.clone(), csv]).unwrap().is_none());
}

#[test]
fn an_export_split_across_files_is_copied_file_by_file_with_the_same_scores() {
    let dir = tempfile::tempdir().unwrap();
    let registry = web01_registry(dir.path(), 10);
    let whole = read_file(&sample_path()).unwrap();
    let parts = dir.path().join("parts");
    std::fs::create_dir_all(&parts).unwrap();
    let cut = whole.height() / 3;
    for (i, (offset, len)) in [(0, cut), (cut, whole.height() - cut)]
        .into_iter()
        .enumerate()
    {
        let mut part = whole.slice(offset as i64, len);
        let file = std::fs::File::create(parts.join(format!("part-{i}.parquet"))).unwrap();
        ParquetWriter::new(file)
            .with_row_group_size(Some(4000))
            .finish(&mut part)
            .unwrap();
    }
    let files: Vec<_> = (0..2)
        .map(|i| parts.join(format!("part-{i}.parquet")))
        .collect();
    assert!(dagmm_serve::parquet_copy::plan(&files).unwrap().is_some());
    let score = |input: &str, name: &str| {
        let output = dir.path().join(name);
        let opts = BatchOptions {
            label_column: None,
            ..options(input, &output)
        };
        run(&registry.snapshot(), &opts).unwrap();
        read_file(&output).unwrap()
    };
    let split = score(parts.to_str().unwrap(), "split.parquet");
    let single = score(sample_path().to_str().unwrap(), "single.parquet");
    assert!(split.equals_missing(&single), "same rows, same scores");
}

#[test]
fn a_long_export_sorted_by_metric_scores_like_the_wide_one() {
    let dir = tempfile::tempdir().unwrap();
    let registry = web01_registry(dir.path(), 10);
    let wide = read_file(&sample_path())
        .unwrap()
        .slice(0, 6000)
        .select([
            "timestamp",
            "host",
            "cpu_usage",
            "mem_usage",
            "disk_busy",
            "net_in_bps",
        ])
        .unwrap();
    // One metric after another: every chunk of the long file holds a single metric, so only a
    // reader that pivots the whole file sees complete rows.
    let blocks: Vec<LazyFrame> = dagmm_datasets::METRICS
        .iter()
        .map(|m| {
            wide.clone().lazy().select([
                col("timestamp"),
                col("host"),
                lit(*m).alias("metric"),
                col(*m).alias("value"),
            ])
        })
        .collect();
    let mut long = concat(blocks, UnionArgs::default())
        .unwrap()
        .collect()
        .unwrap();
    let long_path = dir.path().join("long.parquet");
    ParquetWriter::new(std::fs::File::create(&long_path).unwrap())
        .finish(&mut long)
        .unwrap();
    let mut wide_copy = wide.clone();
    let wide_path = dir.path().join("wide.parquet");
    ParquetWriter::new(std::fs::File::create(&wide_path).unwrap())
        .finish(&mut wide_copy)
        .unwrap();
    let score = |input: &Path, name: &str| {
        let output = dir.path().join(name);
        let opts = BatchOptions {
            label_column: None,
            chunk_rows: 1000,
            ..options(input.to_str().unwrap(), &output)
        };
        let summary = run(&registry.snapshot(), &opts).unwrap();
        let df = read_file(&output)
            .unwrap()
            .sort(["timestamp", "host"], SortMultipleOptions::default())
            .unwrap();
        (summary, df)
    };
    let (long_summary, from_long) = score(&long_path, "long-scored.parquet");
    let (wide_summary, from_wide) = score(&wide_path, "wide-scored.parquet");
    assert_eq!(
        from_long.height(),
        wide.height(),
        "one row per time and host"
    );
    assert_eq!(long_summary.rows_scored, wide_summary.rows_scored);
    assert!(
        wide_summary.rows_scored > 5900,
        "{} scored",
        wide_summary.rows_scored
    );
    assert_same_columns(
        &from_long,
        &from_wide,
        &["energy", "percentile", "contribution_cpu_usage"],
    );
}

#[test]
fn a_csv_export_is_scored_chunk_by_chunk_like_the_parquet_one() {
    let dir = tempfile::tempdir().unwrap();
    let registry = web01_registry(dir.path(), 10);
    let mut input = read_file(&sample_path()).unwrap();
    let csv = dir.path().join("export.csv");
    CsvWriter::new(std::fs::File::create(&csv).unwrap())
        .finish(&mut input)
        .unwrap();
    let chunks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let score = |input: &Path, name: &str| {
        let output = dir.path().join(name);
        let seen = chunks.clone();
        let opts = BatchOptions {
            label_column: None,
            chunk_rows: 3000,
            progress: Some(Box::new(move |done, total| {
                seen.lock().unwrap().push((done, total))
            })),
            ..options(input.to_str().unwrap(), &output)
        };
        let summary = run(&registry.snapshot(), &opts).unwrap();
        (summary, read_file(&output).unwrap())
    };
    let (csv_summary, from_csv) = score(&csv, "from-csv.parquet");
    let progress = std::mem::take(&mut *chunks.lock().unwrap());
    let (parquet_summary, from_parquet) = score(&sample_path(), "from-parquet.parquet");
    // Blocks hold about as many bytes as 3000 rows of four metrics take; the sample's rows
    // carry a few more columns, so there are somewhat more, smaller chunks.
    assert!(
        progress.len() >= input.height() / 6000,
        "read in chunks: {} progress steps for {} rows",
        progress.len(),
        input.height()
    );
    assert_eq!(progress.last(), Some(&(input.height(), input.height())));
    assert_eq!(csv_summary.rows_scored, parquet_summary.rows_scored);
    assert_eq!(csv_summary.not_scored, parquet_summary.not_scored);
    assert_eq!(from_csv.height(), from_parquet.height());
    assert_same_columns(
        &from_csv,
        &from_parquet,
        &["energy", "percentile", "contribution_disk_busy"],
    );
}
