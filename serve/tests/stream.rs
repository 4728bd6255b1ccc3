//! `dagmm-serve stream` against a real NATS JetStream server: failover without loss,
//! dead letters, drain on SIGTERM and reconnection after a server restart.
//!
//! The server comes from `DAGMM_TEST_NATS_URL` (CI starts one), else a `nats-server` on PATH is
//! started per test. Without either the tests say so and pass, except under CI (`CI` set),
//! where a missing server is a failure.

#[path = "../../tests/common.rs"]
mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use serde_json::{Value, json};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A nats-server with JetStream that this test started (and stops on drop).
struct OwnNats {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
}

impl OwnNats {
    fn start() -> Option<Self> {
        let store = tempfile::tempdir().unwrap();
        Self::start_on(free_port(), store)
    }

    fn start_on(port: u16, store: tempfile::TempDir) -> Option<Self> {
        let child = Self::spawn(port, store.path())?;
        wait_for_port(port);
        Some(Self { child, port, store })
    }

    fn spawn(port: u16, store: &Path) -> Option<Child> {
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stop the server and start it again on the same port with the same store.
    fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Self::spawn(self.port, self.store.path()).expect("nats-server restarts");
        wait_for_port(self.port);
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Say why a test cannot run here; under CI that is a failure.
fn skip(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{why}: CI must provide nats-server (see .ci/run)"
    );
    eprintln!(
        "skipping: {why}; install nats-server (apt-get install nats-server) to run this test"
    );
}

/// The server to test against: CI's, else one of our own.
fn nats() -> Option<(String, Option<OwnNats>)> {
    if let Ok(url) = std::env::var("DAGMM_TEST_NATS_URL") {
        return Some((url, None));
    }
    match OwnNats::start() {
        Some(own) => Some((own.url(), Some(own))),
        None => {
            skip("nats-server is not installed");
            None
        }
    }
}

/// Names no other test (or earlier run against the same server) uses.
struct Names {
    prefix: String,
}

impl Names {
    fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self {
            prefix: format!("{test}{}", nanos % 1_000_000_000_000),
        }
    }
    fn stream(&self) -> String {
        format!("{}_IN", self.prefix.to_uppercase())
    }
    fn results_stream(&self) -> String {
        format!("{}_OUT", self.prefix.to_uppercase())
    }
    fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.prefix.to_uppercase())
    }
    fn subject(&self, host: &str) -> String {
        format!("{}.metrics.{host}", self.prefix)
    }
    fn results(&self) -> String {
        format!("{}.scores", self.prefix)
    }
    fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }
}

/// A `dagmm-serve stream` process.
struct Replica {
    child: Child,
    metrics: SocketAddr,
}

impl Replica {
    fn start(url: &str, model: &Path, names: &Names, extra: &[&str]) -> Self {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dagmm-serve"))
            .arg("stream")
            .arg("--models")
            .arg(model)
            .args(["--nats", url])
            .args(["--stream", &names.stream()])
            .args(["--subjects", &format!("{}.metrics.>", names.prefix)])
            .args(["--consumer", "scorers"])
            .args(["--results", &names.results()])
            .args(["--results-stream", &names.results_stream()])
            .args(["--dead-letter", &names.dead()])
            .args(["--dead-letter-stream", &names.dead_stream()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(extra)
            .env("DAGMM_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        wait_for_port(metrics.port());
        Self { child, metrics }
    }

    fn metric(&self, name: &str) -> f64 {
        let (status, text) = common::http(self.metrics, "GET", "/metrics", &[], b"");
        assert_eq!(status, 200);
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "replica did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model(dir: &Path) -> PathBuf {
    common::train_sample_model("web-01", dir, 30, None)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.unwrap();
    jetstream::ContextBuilder::new()
        .backpressure_on_inflight(true)
        .build(client)
}

/// Wait until the replica has created the input stream and its consumer.
async fn wait_for_consumer(js: &jetstream::Context, names: &Names) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stream) = js.get_stream(names.stream()).await
            && stream.consumer_info("scorers").await.is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never created its consumer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every message stored so far in a stream, as (subject, JSON body).
async fn read_all(js: &jetstream::Context, stream: &str) -> Vec<(String, Value)> {
    let stream = js.get_stream(stream).await.unwrap();
    let total = stream.get_info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::with_capacity(total);
    let mut messages = consumer.messages().await.unwrap();
    while out.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stored messages arrive")
            .unwrap()
            .unwrap();
        out.push((
            m.subject.to_string(),
            serde_json::from_slice(&m.payload).unwrap(),
        ));
    }
    out
}

/// A trained model, a replica with `extra` flags, and a client, for one test.
struct Setup {
    _dir: tempfile::TempDir,
    model: PathBuf,
    names: Names,
    replica: Replica,
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
}

fn setup(url: &str, test: &str, extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let names = Names::new(test);
    let replica = Replica::start(url, &model, &names, extra);
    let rt = runtime();
    let js = rt.block_on(connect(url));
    rt.block_on(wait_for_consumer(&js, &names));
    Setup {
        _dir: dir,
        model,
        names,
        replica,
        rt,
        js,
    }
}

fn sample_json(id: u64, cpu: f64) -> Value {
    json!({"id": id, "cpu_usage": cpu, "mem_usage": 45.0, "disk_busy": 12.0, "net_in_bps": 2.0e6})
}

#[test]
fn fifty_thousand_samples_survive_a_replica_killed_mid_stream() {
    let Some((url, _own)) = nats() else { return };
    const SAMPLES: u64 = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let names = Names::new("failover");
    let fast_redelivery = ["--ack-wait-ms", "2000", "--duplicate-window-s", "120"];
    let first = Replica::start(&url, &model, &names, &fast_redelivery);
    let rt = runtime();
    let js = rt.block_on(connect(&url));
    rt.block_on(wait_for_consumer(&js, &names));

    // Publish every sample, each its own message, on 100 host subjects.
    let started = Instant::now();
    rt.block_on(async {
        // Acks are awaited in windows: an unawaited ack holds one of the context's permits.
        let mut acks = Vec::new();
        for id in 0..SAMPLES {
            let subject = names.subject(&format!("host-{:02}", id % 100));
            let body = sample_json(id, 10.0 + (id % 50) as f64).to_string();
            acks.push(js.publish(subject, body.into()).await.unwrap());
            if acks.len() == 1000 {
                for ack in acks.drain(..) {
                    ack.await.unwrap();
                }
            }
        }
        for ack in acks {
            ack.await.unwrap();
        }
    });
    eprintln!(
        "published {SAMPLES} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let second = Replica::start(&url, &model, &names, &fast_redelivery);

    // Kill the first replica once part of the work is done.
    let results_stream = names.results_stream();
    let stored = |js: &jetstream::Context| {
        let js = js.clone();
        let name = results_stream.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap()
                .get_info()
                .await
                .unwrap()
                .state
                .messages
        }
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while rt.block_on(stored(&js)) < SAMPLES * 2 / 5 {
        assert!(Instant::now() < deadline, "scoring made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut first = first;
    first.child.kill().unwrap(); // SIGKILL: no drain, no acks for what it held
    first.child.wait().unwrap();
    let at_kill = rt.block_on(stored(&js));
    while rt.block_on(stored(&js)) < SAMPLES {
        assert!(
            Instant::now() < deadline,
            "only {} of {SAMPLES} verdicts after 300 s",
            rt.block_on(stored(&js))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give a straggling redelivery the chance to show up as an extra message.
    std::thread::sleep(Duration::from_secs(3));

    let results = rt.block_on(read_all(&js, &names.results_stream()));
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (subject, body) in &results {
        let id = body["id"].as_u64().expect("the verdict echoes the id");
        assert_eq!(
            subject,
            &format!("{}.host-{:02}", names.results(), id % 100),
            "verdict on the host's subject"
        );
        assert!(body["energy"].as_f64().is_some_and(f64::is_finite));
        *seen.entry(id).or_default() += 1;
    }
    let missing: Vec<u64> = (0..SAMPLES).filter(|id| !seen.contains_key(id)).collect();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let redelivered = second.metric("dagmm_stream_redelivered_total");
    let dropped = second.metric("dagmm_stream_duplicates_dropped_total");
    eprintln!(
        "killed the first replica at {at_kill} verdicts; {} verdicts stored, {} missing, {duplicates} duplicates; \
         the survivor took {redelivered} redelivered messages and JetStream dropped {dropped} republished verdicts",
        results.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost ids, e.g. {:?}",
        &missing[..missing.len().min(10)]
    );
    // Redeliveries republish the same Nats-Msg-Id inside the duplicate window, so JetStream
    // stores each verdict once.
    assert_eq!(duplicates, 0, "duplicate verdicts stored");

    // Nothing is left unacked, and the survivor drains and exits cleanly on SIGTERM.
    let info = rt.block_on(async {
        js.get_stream(names.stream())
            .await
            .unwrap()
            .consumer_info("scorers")
            .await
            .unwrap()
    });
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    let status = second.terminate();
    assert!(status.success(), "replica exit status {status}");
}

#[test]
fn bad_messages_go_to_the_dead_letter_subject_with_a_reason() {
    let Some((url, _own)) = nats() else { return };
    // One pull loop keeps dead letters in input order.
    let Setup {
        _dir,
        model,
        names,
        replica,
        rt,
        js,
        ..
    } = setup(&url, "deadletter", &["--concurrency", "1"]);

    let good = json!({"cpu_usage": 30.0, "mem_usage": 45.0, "disk_busy": 12.0, "net_in_bps": 2.0e6, "id": "good"});
    let messages: Vec<(String, String)> = vec![
        (names.subject("web-01"), "{not json".into()),
        (names.subject("web-01"), r#"{"model":"nope","cpu_usage":1,"mem_usage":1,"disk_busy":1,"net_in_bps":1}"#.into()),
        (names.subject("web-01"), r#"{"id":"nan","cpu_usage":"NaN","mem_usage":1,"disk_busy":1,"net_in_bps":1}"#.into()),
        (names.subject("web-01"), r#"{"cpu_usage":1e999}"#.into()),
        (
            names.subject("web-01"),
            json!({"samples": [sample_json(1, 20.0), {"id": 2, "cpu_usage": 20.0}, sample_json(3, 25.0)]}).to_string(),
        ),
        // No host in the payload: it comes from the subject.
        (names.subject("db-07"), good.to_string()),
    ];
    rt.block_on(async {
        for (subject, body) in &messages {
            js.publish(subject.clone(), body.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while replica.metric("dagmm_stream_messages_consumed_total") < messages.len() as f64
        || rt.block_on(async {
            js.get_stream(names.stream())
                .await
                .unwrap()
                .consumer_info("scorers")
                .await
                .unwrap()
                .num_ack_pending
        }) > 0
    {
        assert!(Instant::now() < deadline, "messages were not all handled");
        std::thread::sleep(Duration::from_millis(50));
    }

    let dead = rt.block_on(read_all(&js, &names.dead_stream()));
    let codes: Vec<(&str, Option<u64>)> = dead
        .iter()
        .map(|(_, b)| {
            (
                b["error"]["code"].as_str().unwrap(),
                b["sample_index"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("malformed_json", None),
            ("unknown_model", Some(0)),
            ("invalid_value", Some(0)),
            ("malformed_json", None),
            ("invalid_value", Some(1)),
        ],
        "{dead:?}"
    );
    assert_eq!(dead[0].1["payload"], "{not json");
    assert_eq!(dead[2].1["error"]["field"], "cpu_usage");
    assert!(dead[2].1["payload"].as_str().unwrap().contains("\"nan\""));
    assert_eq!(dead[4].1["error"]["field"], "samples[1].mem_usage");
    assert!(
        dead.iter()
            .all(|(s, b)| s == &names.dead() && b["stream_sequence"].as_u64().unwrap() > 0)
    );

    let results = rt.block_on(read_all(&js, &names.results_stream()));
    let ids: Vec<&Value> = results.iter().map(|(_, b)| &b["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!(3), &json!("good")]);
    let (subject, verdict) = &results[2];
    assert_eq!(subject, &format!("{}.db-07", names.results()));
    assert_eq!(verdict["host"], "db-07");

    // The verdict is the one the HTTP path computes for the same sample.
    let registry = dagmm_serve::registry::Registry::open(&model).unwrap();
    let mut req = dagmm_serve::request::parse(good.to_string().as_bytes(), 10).unwrap();
    req.samples[0].host = Some("db-07".into());
    let (_, http) = dagmm_serve::app::score_request(&registry.snapshot(), &req)
        .unwrap()
        .remove(0);
    // Compared as JSON text, as both reach a client: `to_value` would widen the f32
    // contribution shares to f64 digits the text never has.
    let http: Value = serde_json::from_str(&serde_json::to_string(&http).unwrap()).unwrap();
    assert_eq!(verdict, &http);
    assert_eq!(replica.metric("dagmm_stream_dead_lettered_total"), 5.0);
    assert_eq!(replica.metric("dagmm_stream_verdicts_published_total"), 3.0);
}

#[test]
fn scoring_resumes_after_the_nats_server_restarts() {
    // Needs a server of its own to restart.
    let Some(mut own) = OwnNats::start() else {
        skip("nats-server is not installed");
        return;
    };
    let url = own.url();
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let names = Names::new("restart");
    let replica = Replica::start(&url, &model, &names, &[]);
    let rt = runtime();
    let publish = |url: &str, from: u64, to: u64| {
        rt.block_on(async {
            let js = connect(url).await;
            wait_for_consumer(&js, &names).await;
            for id in from..to {
                js.publish(
                    names.subject("web-01"),
                    sample_json(id, 20.0).to_string().into(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            }
        })
    };
    let wait_for = |url: &str, n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        rt.block_on(async {
            let js = connect(url).await;
            loop {
                let stored = match js.get_stream(names.results_stream()).await {
                    Ok(s) => s.get_info().await.map(|i| i.state.messages).unwrap_or(0),
                    Err(_) => 0,
                };
                if stored >= n {
                    return stored;
                }
                assert!(Instant::now() < deadline, "{stored} of {n} verdicts");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    publish(&url, 0, 100);
    assert_eq!(wait_for(&url, 100), 100);
    own.restart_after(Duration::from_millis(500));
    publish(&url, 100, 200);
    assert_eq!(wait_for(&url, 200), 200);
    assert!(replica.terminate().success());
    drop(own);
}

#[test]
fn batches_larger_than_the_ack_window_are_all_scored() {
    let Some((url, _own)) = nats() else { return };
    // One loop with 1024 ack permits receives 12 000 verdicts' worth of messages at once.
    let Setup {
        _dir,
        names,
        replica,
        rt,
        js,
        ..
    } = setup(&url, "batches", &["--concurrency", "1"]);
    const MESSAGES: u64 = 40;
    const PER_MESSAGE: u64 = 300;
    rt.block_on(async {
        for m in 0..MESSAGES {
            let samples: Vec<Value> = (0..PER_MESSAGE)
                .map(|i| sample_json(m * PER_MESSAGE + i, 15.0 + i as f64 / 10.0))
                .collect();
            let body = json!({"samples": samples}).to_string();
            js.publish(names.subject("web-01"), body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while replica.metric("dagmm_stream_verdicts_published_total") < (MESSAGES * PER_MESSAGE) as f64
    {
        assert!(
            Instant::now() < deadline,
            "{} of {} verdicts",
            replica.metric("dagmm_stream_verdicts_published_total"),
            MESSAGES * PER_MESSAGE
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let results = rt.block_on(read_all(&js, &names.results_stream()));
    let mut ids: Vec<u64> = results
        .iter()
        .map(|(_, b)| b["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..MESSAGES * PER_MESSAGE).collect::<Vec<_>>());
    assert!(replica.terminate().success());
}
