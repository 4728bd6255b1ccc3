//! Prometheus metrics of the server.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::registry::ModelMap;

/// Distinct hosts tracked in `dagmm_last_energy`; later hosts share the `_other` label so a
/// flood of host names cannot grow memory without bound.
const MAX_HOST_SERIES: usize = 10_000;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub anomalies: IntCounterVec,
    pub scored: IntCounterVec,
    pub last_energy: GaugeVec,
    model_age: GaugeVec,
    pub reloads: IntCounterVec,
    pub stream: StreamMetrics,
    hosts_seen: Mutex<HashSet<String>>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "dagmm_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "dagmm_http_request_duration_seconds",
                "HTTP request latency by route and status",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["route", "status"],
        )
        .expect("valid metric");
        let anomalies = IntCounterVec::new(
            Opts::new(
                "dagmm_anomalies_total",
                "Anomalous samples by model and severity",
            ),
            &["model", "severity"],
        )
        .expect("valid metric");
        let scored = IntCounterVec::new(
            Opts::new("dagmm_samples_scored_total", "Samples scored by model"),
            &["model"],
        )
        .expect("valid metric");
        let last_energy = GaugeVec::new(
            Opts::new(
                "dagmm_last_energy",
                "Energy of the last sample scored, by model and host",
            ),
            &["model", "host"],
        )
        .expect("valid metric");
        let model_age = GaugeVec::new(
            Opts::new(
                "dagmm_model_age_seconds",
                "Seconds since each serving model was trained",
            ),
            &["model"],
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new("dagmm_reloads_total", "Model reloads by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        for c in [&requests, &anomalies, &scored, &reloads] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(last_energy.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(model_age.clone()))
            .expect("unique metric");
        let stream = StreamMetrics::register(&registry);
        Self {
            registry,
            stream,
            requests,
            latency,
            anomalies,
            scored,
            last_energy,
            model_age,
            reloads,
            hosts_seen: Mutex::new(HashSet::new()),
        }
    }

    /// Host label for the last-energy gauge, capped in cardinality.
    pub fn host_label(&self, host: &str) -> String {
        let mut seen = self.hosts_seen.lock().expect("not poisoned");
        if seen.contains(host) {
            return host.to_string();
        }
        if seen.len() < MAX_HOST_SERIES {
            seen.insert(host.to_string());
            return host.to_string();
        }
        "_other".to_string()
    }

    /// Prometheus text exposition, with model ages computed now.
    pub fn render(&self, models: &ModelMap) -> String {
        self.model_age.reset();
        let now = chrono::Utc::now();
        for m in models.values() {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&m.trained_at) {
                let age = (now - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0;
                self.model_age
                    .with_label_values(&[m.name.as_str()])
                    .set(age);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// Counters of the JetStream consumer (`dagmm-serve stream` or `serve --nats`).
pub struct StreamMetrics {
    /// Input messages taken from the stream.
    pub consumed: IntCounter,
    /// Verdicts published (and acknowledged by JetStream).
    pub scored: IntCounter,
    /// Messages or samples sent to the dead-letter subject, by error code.
    pub dead_lettered: IntCounterVec,
    /// Input messages seen more than once (a replica died or timed out before acking).
    pub redelivered: IntCounter,
    /// Messages left un-acked for redelivery because publishing their results failed.
    pub publish_failures: IntCounter,
    /// Republished verdicts the results stream already held (dropped by `Nats-Msg-Id`).
    pub duplicates_dropped: IntCounter,
    /// Messages the server still holds for the consumer, as of the last message received.
    pub lag: IntGauge,
}

impl StreamMetrics {
    fn register(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let consumed = counter(
            "dagmm_stream_messages_consumed_total",
            "Messages taken from the input stream",
        );
        let scored = counter(
            "dagmm_stream_verdicts_published_total",
            "Verdicts published to the results subject",
        );
        let redelivered = counter(
            "dagmm_stream_redelivered_total",
            "Input messages delivered more than once",
        );
        let publish_failures = counter(
            "dagmm_stream_publish_failures_total",
            "Input messages left for redelivery because a result could not be published",
        );
        let duplicates_dropped = counter(
            "dagmm_stream_duplicates_dropped_total",
            "Republished verdicts or dead letters JetStream already stored, dropped by Nats-Msg-Id",
        );
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "dagmm_stream_dead_lettered_total",
                "Messages or samples sent to the dead-letter subject, by error code",
            ),
            &["code"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(dead_lettered.clone()))
            .expect("unique metric");
        let lag = IntGauge::new(
            "dagmm_stream_lag_messages",
            "Messages pending for the consumer, as of the last delivery",
        )
        .expect("valid metric");
        registry
            .register(Box::new(lag.clone()))
            .expect("unique metric");
        Self {
            consumed,
            scored,
            dead_lettered,
            redelivered,
            publish_failures,
            duplicates_dropped,
            lag,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
