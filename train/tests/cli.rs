//! The `dagmm-train` binary as an operator runs it: fit per host, and one-line errors (never a
//! panic) for bad input.

use std::path::Path;
use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dagmm-train"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// A small wide CSV export: `hosts` hosts, `n` one-minute samples each.
fn export(hosts: &[&str], n: usize) -> String {
    let mut s = String::from("timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps,alert\n");
    for h in hosts {
        for i in 0..n {
            let load = (i as f64 / 40.0).sin() * 0.5 + 0.5;
            s += &format!(
                "{},{h},{:.2},{:.2},{:.2},{:.0},{}\n",
                1_791_158_400 + 60 * i,
                10.0 + 50.0 * load,
                40.0 + (i % 7) as f64,
                3.0 + 5.0 * load,
                1e5 * (1.0 + 9.0 * load),
                i % 50 == 0
            );
        }
    }
    s
}

#[test]
fn fits_one_model_per_host_and_skips_small_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = export(&["web-01", "db-01"], 120);
    text += &export(&["tiny"], 10)
        .lines()
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    let input = write(dir.path(), "history.csv", &text);
    let out = dir.path().join("models");
    let o = train(&[
        "fit",
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
        "--group-by",
        "host",
        "--epochs",
        "3",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("web-01.dagmm").is_file() && out.join("db-01.dagmm").is_file());
    assert!(!out.join("tiny.dagmm").exists());
    assert!(stderr(&o).contains("skipped tiny"), "{}", stderr(&o));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(
        summary.contains("trained 2 model(s)") && summary.contains("web-01.dagmm"),
        "{summary}"
    );
    let bundle = dagmm_model::Bundle::load(&out.join("web-01.dagmm"))
        .unwrap()
        .bundle;
    assert_eq!(bundle.training.rows_dropped["alert raised"], 3);
    assert_eq!(bundle.training.rows_used, 117);
    assert_eq!(bundle.history.len(), 3);
}

#[test]
fn bad_input_gives_a_one_line_error_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write(dir.path(), "ok.csv", &export(&["a"], 80));
    let no_disk = write(
        dir.path(),
        "nodisk.csv",
        "timestamp,host,cpu_usage,mem_usage,net_in_bps\n1,a,1,2,3\n",
    );
    let text_cpu = write(
        dir.path(),
        "text.csv",
        "timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps\n1,a,x,2,3,4\n",
    );
    let empty = write(dir.path(), "empty.csv", "");
    let all_alerts = write(
        dir.path(),
        "alerts.csv",
        &export(&["a"], 80).replace(",false\n", ",true\n"),
    );
    let out = dir.path().join("m");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["fit", "--input", &no_disk, "--out", out],
            "`disk_busy`",
        ),
        (
            vec!["fit", "--input", &text_cpu, "--out", out],
            "`cpu_usage`",
        ),
        (
            vec!["fit", "--input", &empty, "--out", out],
            "empty.csv: no rows",
        ),
        (
            vec![
                "fit",
                "--input",
                "/nonexistent/history.parquet",
                "--out",
                out,
            ],
            "/nonexistent/history.parquet",
        ),
        (
            vec!["fit", "--input", &all_alerts, "--out", out],
            "no group has enough rows",
        ),
        (
            vec!["fit", "--input", &ok, "--out", out, "--gmm-k", "0"],
            "gmm_k",
        ),
        (
            vec!["fit", "--input", &ok, "--out", out, "--hidden", ""],
            "hidden",
        ),
        (
            vec!["fit", "--input", &ok, "--out", out, "--lr", "0"],
            "learning_rate",
        ),
        (
            vec!["fit", "--input", &ok, "--out", out, "--epochs", "0"],
            "epochs",
        ),
        (
            vec!["fit", "--input", &ok, "--out", out, "--from", "yesterday"],
            "--from",
        ),
        (
            vec!["fit", "--input", &ok, "--out", out, "--columns", "gpu=x"],
            "gpu",
        ),
    ];
    for (args, needle) in cases {
        let o = train(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }
}

#[test]
fn generate_writes_the_sample_export() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.parquet");
    let o = train(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--hosts",
        "2",
        "--days",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table =
        dagmm_datasets::read::read_metrics(out.to_str().unwrap(), &Default::default()).unwrap();
    assert!(table.len() > 1000);
}

#[test]
fn report_writes_every_figure_as_a_non_blank_image_and_the_pages() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "history.csv", &export(&["web-01"], 300));
    let models = dir.path().join("models");
    let o = train(&[
        "fit",
        "--input",
        &input,
        "--out",
        models.to_str().unwrap(),
        "--group-by",
        "host",
        "--epochs",
        "20",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("report");
    let model = models.join("web-01.dagmm");
    let o = train(&[
        "report",
        "--model",
        model.to_str().unwrap(),
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let figures = [
        ("scatter_cpu_mem_disk", (1200, 800)),
        ("scatter_cpu_mem_net", (1200, 800)),
        ("energy_distribution", (1200, 800)),
        ("energy_over_time_web-01", (1400, 1200)),
        ("training_curves", (1200, 800)),
        ("latent_space", (1200, 800)),
        ("contributions", (1200, 800)),
    ];
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    for (name, size) in figures {
        let img = image::open(out.join(format!("{name}.png")))
            .unwrap_or_else(|e| panic!("{name}.png: {e}"))
            .to_luma8();
        assert_eq!(img.dimensions(), size, "{name}");
        let pixels: Vec<f64> = img.pixels().map(|p| f64::from(p.0[0])).collect();
        let mean = pixels.iter().sum::<f64>() / pixels.len() as f64;
        let variance = pixels.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / pixels.len() as f64;
        assert!(
            variance > 50.0,
            "{name}.png looks blank (variance {variance:.1})"
        );
        let svg = std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 2000, "{name}.svg");
        assert!(
            index.contains(&format!("{name}.png")) && readme.contains(&format!("{name}.png")),
            "{name} not linked"
        );
    }
    assert!(index.contains("Model card") && index.contains("rows dropped"));
    assert!(
        !index.contains("http://") && !index.contains("https://"),
        "the page needs no network"
    );
}

#[test]
fn report_on_a_corrupt_bundle_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "h.csv", &export(&["a"], 60));
    let bundle = write(dir.path(), "bad.dagmm", "DAGMM-BUNDLE 1 sha256:00\n{}");
    let o = train(&[
        "report",
        "--model",
        &bundle,
        "--input",
        &input,
        "--out",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
}

#[test]
fn evaluate_smoke_run_writes_the_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("f0,f1,f2,label\n");
    for i in 0..200 {
        let anomaly = i % 10 == 0;
        let base = if anomaly {
            0.9
        } else {
            0.1 + (i % 7) as f64 / 100.0
        };
        text += &format!(
            "{base},{},{},{}\n",
            base * 0.5,
            1.0 - base,
            u8::from(anomaly)
        );
    }
    let input = write(dir.path(), "labelled.csv", &text);
    let json = dir.path().join("eval.json");
    let o = train(&[
        "evaluate",
        "--input",
        &input,
        "--label-column",
        "label",
        "--features",
        "f*",
        "--train-filter",
        "label == 0",
        "--split",
        "0.5",
        "--seeds",
        "2",
        "--threshold",
        "top-ratio:0.1",
        "--epochs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("top 10.0 % of test energies flagged"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["precision", "recall", "f1", "roc_auc", "pr_auc"] {
        assert!(report["mean"][key].as_f64().is_some(), "mean.{key}");
        assert!(report["std"][key].as_f64().is_some(), "std.{key}");
    }
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        // One epoch, so one epoch time, within the run's training time.
        let epochs = run["epoch_seconds"].as_array().unwrap();
        assert_eq!(epochs.len(), 1);
        let epoch = epochs[0].as_f64().unwrap();
        assert!(epoch > 0.0 && epoch <= run["train_seconds"].as_f64().unwrap());
    }
    let bad = train(&["evaluate", "--input", &input, "--label-column", "nope"]);
    assert!(stderr(&bad).contains("missing label column `nope`"));
    let bad = train(&["evaluate", "--input", &input, "--range-trim", "0.5"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--range-trim must be at least 0 and below 0.5"));
}
