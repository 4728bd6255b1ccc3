//! Train a small model on the sample data, start the server on an ephemeral port, and check
//! verdicts, energies, operations routes and every kind of bad request.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{JSON, http, train_sample_model};
use dagmm_model::{Bundle, Explainer};
use dagmm_serve::app::{AppState, ServerConfig};
use dagmm_serve::metrics::Metrics;
use dagmm_serve::registry::Registry;
use serde_json::{Value, json};

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(models: &std::path::Path, config: ServerConfig) -> Server {
    let registry = Registry::open(models).unwrap();
    let state = Arc::new(AppState {
        registry,
        metrics: Metrics::new(),
        config,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            dagmm_serve::server::serve(listener, state, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    Server {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

fn post(addr: SocketAddr, body: &Value) -> (u16, Value) {
    let (status, text) = http(
        addr,
        "POST",
        "/v1/score",
        &[JSON],
        body.to_string().as_bytes(),
    );
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn sample(cpu: f64, mem: f64, disk: f64, net: f64) -> Value {
    json!({"cpu_usage": cpu, "mem_usage": mem, "disk_busy": disk, "net_in_bps": net})
}

#[test]
fn scores_samples_with_the_library_energies_and_reports_operations_state() {
    let dir = tempfile::tempdir().unwrap();
    let bundle_path = train_sample_model("web-01", dir.path(), 300, None);
    let loaded = Bundle::load(&bundle_path).unwrap();
    let explainer = Explainer::new(loaded.bundle.model.clone());
    let server = start(dir.path(), ServerConfig::default());

    // Normal-looking samples from the training window, and blatant anomalies.
    let normal = [[30.0, 45.0, 8.0, 2e6], [25.0, 50.0, 6.0, 1.5e6]];
    let anomalous = [[99.5, 99.0, 99.0, 1.0], [100.0, 5.0, 100.0, 1e12]];
    let samples: Vec<Value> = normal
        .iter()
        .chain(&anomalous)
        .map(|s| sample(s[0], s[1], s[2], s[3]))
        .collect();
    let (status, body) = post(server.addr, &json!({"model": "web-01", "samples": samples}));
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    let mut scratch = explainer.scorer().new_scratch();
    for (raw, r) in normal.iter().chain(&anomalous).zip(results) {
        let expected = explainer.verdict(raw, &mut scratch);
        assert_eq!(
            r["energy"].as_f64().unwrap(),
            expected.energy,
            "server and library energies differ"
        );
        assert_eq!(r["model"]["sha256"], loaded.sha256.as_str());
        let shares: f64 = r["explanation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["contribution"].as_f64().unwrap())
            .sum();
        // Each share is rounded to f32 on its own.
        assert!((shares - 1.0).abs() < 1e-6, "shares sum to {shares}");
        assert!(r["percentile"].as_f64().unwrap() >= 0.0);
    }
    for r in &results[2..] {
        assert_eq!(r["anomaly"], true, "{r}");
        assert_ne!(r["severity"], "normal");
        assert_eq!(r["out_of_range"], true);
    }

    // One bare sample, routed by host; id/timestamp/host echoed.
    let mut one = sample(30.0, 45.0, 8.0, 2e6);
    one["host"] = json!("web-01");
    one["id"] = json!(42);
    one["timestamp"] = json!("2026-10-08T12:00:00Z");
    let (status, body) = post(server.addr, &one);
    assert_eq!(status, 200, "{body}");
    let r = &body["results"][0];
    assert_eq!(
        (r["id"].clone(), r["host"].clone()),
        (json!(42), json!("web-01"))
    );
    assert_eq!(r["timestamp"], "2026-10-08T12:00:00Z");

    assert_eq!(http(server.addr, "GET", "/healthz", &[], b"").0, 200);
    assert_eq!(http(server.addr, "GET", "/readyz", &[], b"").0, 200);
    let (status, models) = http(server.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models[0]["name"], "web-01");
    assert!(models[0]["thresholds"]["cutoff"].as_f64().is_some());
    let (status, spec) = http(server.addr, "GET", "/openapi.json", &[], b"");
    assert_eq!(status, 200);
    assert!(spec.contains("/v1/score"));
    let (_, metrics) = http(server.addr, "GET", "/metrics", &[], b"");
    assert!(
        metrics.contains("dagmm_http_requests_total{route=\"/v1/score\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("dagmm_anomalies_total{model=\"web-01\""));
    assert!(metrics.contains("dagmm_last_energy{host=\"web-01\",model=\"web-01\"}"));
    assert!(metrics.contains("dagmm_model_age_seconds{model=\"web-01\"}"));
}

#[test]
fn every_bad_request_gets_a_4xx_with_the_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    train_sample_model("db-01", dir.path(), 5, None);
    let token_config = ServerConfig {
        max_samples: 3,
        max_body_bytes: 4096,
        auth_token: Some("s3cret".into()),
        ..Default::default()
    };
    let server = start(dir.path(), token_config);
    let auth = ("authorization", "Bearer s3cret");
    let ok = sample(10.0, 20.0, 3.0, 1e5);
    // (what, headers, body, status, error code, error field)
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        ("malformed JSON", vec![JSON, auth], b"{\"cpu_usage\": ".to_vec(), 400, "malformed_json", Some("body")),
        ("wrong content type", vec![("content-type", "text/plain"), auth], ok.to_string().into_bytes(), 415, "unsupported_media_type", Some("content-type")),
        ("unknown model", vec![JSON, auth], json!({"model": "nope", "samples": [ok]}).to_string().into_bytes(), 404, "unknown_model", Some("model")),
        ("missing metric", vec![JSON, auth], json!({"samples": [{"cpu_usage": 1, "mem_usage": 2, "disk_busy": 3}]}).to_string().into_bytes(), 422, "invalid_value", Some("samples[0].net_in_bps")),
        ("extra metric", vec![JSON, auth], json!({"samples": [{"cpu_usage": 1, "mem_usage": 2, "disk_busy": 3, "net_in_bps": 4, "gpu": 5}]}).to_string().into_bytes(), 422, "invalid_value", Some("samples[0].gpu")),
        ("string value", vec![JSON, auth], json!({"cpu_usage": "93", "mem_usage": 2, "disk_busy": 3, "net_in_bps": 4}).to_string().into_bytes(), 422, "invalid_value", Some("cpu_usage")),
        ("NaN literal", vec![JSON, auth], b"{\"cpu_usage\": NaN, \"mem_usage\": 2, \"disk_busy\": 3, \"net_in_bps\": 4}".to_vec(), 400, "malformed_json", Some("body")),
        ("infinity overflow", vec![JSON, auth], b"{\"cpu_usage\": 1, \"mem_usage\": 2, \"disk_busy\": 3, \"net_in_bps\": 1e999}".to_vec(), 400, "malformed_json", Some("body")),
        ("negative rate", vec![JSON, auth], json!({"cpu_usage": 1, "mem_usage": 2, "disk_busy": 3, "net_in_bps": -4}).to_string().into_bytes(), 422, "invalid_value", Some("net_in_bps")),
        ("percent over 100", vec![JSON, auth], json!({"cpu_usage": 140, "mem_usage": 2, "disk_busy": 3, "net_in_bps": 4}).to_string().into_bytes(), 422, "invalid_value", Some("cpu_usage")),
        ("too many samples", vec![JSON, auth], json!({"samples": [ok, ok, ok, ok]}).to_string().into_bytes(), 413, "too_many_samples", Some("samples")),
        ("body too large", vec![JSON, auth], vec![b' '; 10_000], 413, "body_too_large", Some("body")),
        ("missing token", vec![JSON], ok.to_string().into_bytes(), 401, "missing_token", None),
        ("wrong token", vec![JSON, ("authorization", "Bearer nope")], ok.to_string().into_bytes(), 401, "invalid_token", None),
    ];
    for (what, headers, body, status, code, field) in cases {
        let (got, text) = http(server.addr, "POST", "/v1/score", &headers, &body);
        assert_eq!(got, status, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        assert_eq!(v["error"]["code"], code, "{what}: {text}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        if let Some(field) = field {
            assert_eq!(v["error"]["field"], field, "{what}: {text}");
        }
    }
    // Health stays open without a token; everything else needs it.
    assert_eq!(http(server.addr, "GET", "/healthz", &[], b"").0, 200);
    assert_eq!(http(server.addr, "GET", "/v1/models", &[], b"").0, 401);
    assert_eq!(http(server.addr, "GET", "/v1/models", &[auth], b"").0, 200);
    // The server is still up and scoring after all of that.
    let (status, _) = http(
        server.addr,
        "POST",
        "/v1/score",
        &[JSON, auth],
        ok.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
}

#[test]
fn reload_swaps_models_and_keeps_the_old_one_when_a_bundle_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = train_sample_model("cache-01", dir.path(), 5, None);
    let server = start(dir.path(), ServerConfig::default());
    let before = Bundle::load(&path).unwrap().sha256;
    std::fs::write(&path, b"DAGMM-BUNDLE 1 sha256:00\n{}").unwrap();
    let (status, report) = http(server.addr, "POST", "/v1/admin/reload", &[], b"");
    assert_eq!(status, 200);
    let report: Value = serde_json::from_str(&report).unwrap();
    assert!(
        report["failed"][0]["error"]
            .as_str()
            .unwrap()
            .contains("checksum"),
        "{report}"
    );
    assert_eq!(report["loaded"], json!(["cache-01"]));
    let (status, body) = post(server.addr, &sample(10.0, 20.0, 3.0, 1e5));
    assert_eq!(status, 200);
    assert_eq!(
        body["results"][0]["model"]["sha256"],
        before.as_str(),
        "the old model keeps serving"
    );
    // A fixed bundle is picked up by the next reload.
    let new_path = train_sample_model("cache-01", dir.path(), 6, None);
    let after = Bundle::load(&new_path).unwrap().sha256;
    http(server.addr, "POST", "/v1/admin/reload", &[], b"");
    let (_, body) = post(server.addr, &sample(10.0, 20.0, 3.0, 1e5));
    assert_eq!(body["results"][0]["model"]["sha256"], after.as_str());
}
