//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use dagmm_datasets::clean::{CleanOptions, MissingPolicy, Window, prepare_groups};
use dagmm_datasets::read::{ReadOptions, read_metrics};
use dagmm_model::{
    Bundle, FeatureSpec, NetworkConfig, Preprocessor, TrainConfig, TrainingSummary, fit,
};

/// The bundled sample export.
pub fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/sample/metrics.parquet")
}

/// Train a quick model on one host of the sample data (rows before `to_ms` if given) and save it.
pub fn train_sample_model(host: &str, dir: &Path, epochs: usize, to_ms: Option<i64>) -> PathBuf {
    let table = read_metrics(
        sample_path().to_str().unwrap(),
        &ReadOptions {
            group_by: Some("host".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let features = FeatureSpec::server_metrics();
    let opts = CleanOptions {
        missing: MissingPolicy::Drop,
        window: match to_ms {
            Some(to) => Window::Range {
                from: None,
                to: Some(to),
            },
            None => Window::Last(1000),
        },
        bounds: std::array::from_fn(|j| (features[j].min_valid, features[j].max_valid)),
        min_rows: 50,
        grouped: true,
    };
    let (groups, _) = prepare_groups(&table, &opts).unwrap();
    let group = groups
        .iter()
        .find(|g| g.name.as_deref() == Some(host))
        .unwrap();
    let rows: Vec<f64> = group.rows.iter().flatten().copied().collect();
    let pre = Preprocessor::fit(features, &rows).unwrap();
    let cfg = TrainConfig {
        epochs,
        batch_size: 512,
        ..TrainConfig::default()
    };
    let out = fit(&NetworkConfig::metrics4(), &cfg, pre, &rows, &mut |_| {}).unwrap();
    let bundle = Bundle {
        name: host.to_string(),
        created_at: "2026-11-01T00:00:00Z".into(),
        model: out.model,
        training: TrainingSummary {
            group: Some(host.into()),
            rows_used: group.rows.len(),
            ..Default::default()
        },
        history: out.history,
    };
    let path = dir.join(format!("{host}.dagmm"));
    bundle.save(&path).unwrap();
    path
}

/// A minimal HTTP/1.1 exchange; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading the whole body and close; ignore write errors then.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, dechunk(&body))
}

/// Undo chunked transfer encoding if the body uses it.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size_line, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
            return body.to_string();
        };
        if size == 0 {
            return out;
        }
        if after.len() < size {
            return body.to_string();
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

pub const JSON: (&str, &str) = ("content-type", "application/json");
