//! Scoring live samples from NATS JetStream.
//!
//! Every replica pulls from one durable consumer, so JetStream hands each message to one replica
//! at a time and redelivers it when that replica dies before acking. A message is acked only
//! after all of its verdicts (or dead letters) are stored by JetStream; the verdicts carry a
//! `Nats-Msg-Id` made from the input's stream sequence, so a redelivered message republishes the
//! same ids and the results stream drops the copies (at-least-once in, exactly-once stored, as
//! long as redelivery happens inside the duplicate window).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, message::PublishMessage};
use axum::body::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::app::{AppState, record_verdict, score_sample};
use crate::error::ApiError;
use crate::request::{self, Sample};

/// How long an idle pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Original payload kept in a dead letter; larger ones are cut so the letter itself fits.
const DEAD_LETTER_PAYLOAD_BYTES: usize = 64 * 1024;
/// Pause before retrying after NATS refused a pull (e.g. while reconnecting).
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where to read samples and where to write verdicts.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// Token for servers that require one.
    pub nats_token: Option<String>,
    /// Input stream, created with `subjects` if missing.
    pub stream: String,
    pub subjects: Vec<String>,
    /// Durable pull consumer shared by every replica.
    pub consumer: String,
    /// Verdicts go to `<results>.<host>`.
    pub results: String,
    /// Stream that stores the verdicts (and de-duplicates them), created if missing.
    pub results_stream: String,
    /// Subject and stream for messages that cannot be scored.
    pub dead_letter: String,
    pub dead_letter_stream: String,
    /// Messages asked for in one pull.
    pub pull_batch: usize,
    /// Pull loops per replica; each holds at most one pull batch.
    pub concurrency: usize,
    /// Unacked messages the consumer allows across all replicas.
    pub max_ack_pending: i64,
    /// Redelivery delay for a message whose replica went silent.
    pub ack_wait: Duration,
    /// Window in which the results stream drops republished verdicts; must exceed `ack_wait`.
    pub duplicate_window: Duration,
    /// Most samples in one message.
    pub max_samples: usize,
}

impl StreamConfig {
    /// The defaults of `dagmm-serve stream`, for the given server.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_token: None,
            stream: "METRICS".into(),
            subjects: vec!["metrics.>".into()],
            consumer: "dagmm-scorers".into(),
            results: "scores".into(),
            results_stream: "SCORES".into(),
            dead_letter: "dagmm.dead-letter".into(),
            dead_letter_stream: "DAGMM_DEAD_LETTER".into(),
            pull_batch: 256,
            concurrency: 4,
            max_ack_pending: 8192,
            ack_wait: Duration::from_secs(30),
            duplicate_window: Duration::from_secs(300),
            max_samples: 1000,
        }
    }

    /// Verdicts one pull loop may have awaiting JetStream's ack: at least one whole message.
    pub fn ack_window(&self) -> usize {
        self.max_samples.max(1024)
    }

    /// Refuse settings that would loop, lose results or never progress.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            !self.subjects.is_empty(),
            "--subjects: give at least one subject"
        );
        for (flag, subject) in [
            ("--results", &self.results),
            ("--dead-letter", &self.dead_letter),
        ] {
            anyhow::ensure!(
                valid_literal_subject(subject),
                "{flag}: `{subject}` must be a subject without wildcards or empty tokens"
            );
            let probe = format!("{subject}.x");
            if let Some(input) = self
                .subjects
                .iter()
                .find(|s| subject_matches(s, subject) || subject_matches(s, &probe))
            {
                anyhow::bail!(
                    "{flag}: `{subject}` is inside the input subjects (`{input}`); verdicts would be scored again"
                );
            }
        }
        for (flag, name) in [
            ("--stream", &self.stream),
            ("--consumer", &self.consumer),
            ("--results-stream", &self.results_stream),
            ("--dead-letter-stream", &self.dead_letter_stream),
        ] {
            anyhow::ensure!(
                !name.is_empty()
                    && !name
                        .chars()
                        .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\')),
                "{flag}: `{name}` is not a valid JetStream name (no spaces, dots, wildcards or slashes)"
            );
        }
        anyhow::ensure!(self.pull_batch > 0, "--pull-batch must be at least 1");
        anyhow::ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        anyhow::ensure!(self.max_samples > 0, "--max-samples must be at least 1");
        anyhow::ensure!(
            self.max_ack_pending >= (self.pull_batch * self.concurrency) as i64,
            "--max-ack-pending ({}) must be at least --pull-batch × --concurrency ({})",
            self.max_ack_pending,
            self.pull_batch * self.concurrency
        );
        anyhow::ensure!(
            self.duplicate_window > self.ack_wait,
            "the duplicate window must be longer than --ack-wait, or redelivered messages would publish duplicate verdicts"
        );
        Ok(())
    }
}

fn valid_literal_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(char::is_whitespace))
}

/// NATS subject matching: `*` matches one token, a final `>` one or more.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(s)) if p == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// The host a subject names: the tokens after the literal start of the input subject that
/// matches it (`metrics.web-01` under `metrics.>` is `web-01`).
pub fn host_from_subject(subject: &str, patterns: &[String]) -> Option<String> {
    let pattern = patterns.iter().find(|p| subject_matches(p, subject))?;
    let literal = pattern
        .split('.')
        .take_while(|t| *t != "*" && *t != ">")
        .count();
    let rest: Vec<&str> = subject.split('.').skip(literal).collect();
    (!rest.is_empty()).then(|| rest.join("."))
}

/// A host name made safe as the last tokens of a subject: NATS forbids spaces and wildcards,
/// and empty tokens.
pub fn subject_tokens(host: Option<&str>) -> String {
    let cleaned = dagmm_model::bundle::plain_name_chars(host.unwrap_or(""));
    let tokens: Vec<&str> = cleaned
        .split('.')
        .map(|t| if t.is_empty() { "_" } else { t })
        .collect();
    if cleaned.is_empty() {
        "_unknown".to_string()
    } else {
        tokens.join(".")
    }
}

/// One message JetStream must store before the input is acked.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub subject: String,
    /// `Nats-Msg-Id`: the same on every redelivery of the input.
    pub msg_id: String,
    pub payload: Bytes,
}

/// What scoring one input message produced.
#[derive(Debug, Default)]
pub struct Plan {
    pub publishes: Vec<Outgoing>,
    pub verdicts: usize,
    /// Error codes of what went to the dead-letter subject.
    pub dead_codes: Vec<&'static str>,
}

/// Where an input message came from, for ids and dead letters.
#[derive(Debug, Clone)]
pub struct Origin {
    pub subject: String,
    pub stream: String,
    pub stream_sequence: u64,
    pub delivered: i64,
}

fn dead_letter(
    cfg: &StreamConfig,
    origin: &Origin,
    err: &ApiError,
    sample_index: Option<usize>,
    payload: &[u8],
) -> Outgoing {
    let truncated = payload.len() > DEAD_LETTER_PAYLOAD_BYTES;
    let kept = &payload[..payload.len().min(DEAD_LETTER_PAYLOAD_BYTES)];
    let body = json!({
        "error": {"code": err.code, "message": err.message, "field": err.field},
        "subject": origin.subject,
        "stream": origin.stream,
        "stream_sequence": origin.stream_sequence,
        "delivered": origin.delivered,
        "sample_index": sample_index,
        "payload": String::from_utf8_lossy(kept),
        "payload_truncated": truncated,
    });
    let suffix = sample_index.map_or_else(|| "dead".to_string(), |i| format!("{i}.dead"));
    Outgoing {
        subject: cfg.dead_letter.clone(),
        msg_id: format!("{}:{}:{suffix}", origin.stream, origin.stream_sequence),
        payload: Bytes::from(body.to_string()),
    }
}

/// The sample as it was sent (metrics plus echo fields), for its dead letter.
fn sample_json(sample: &Sample) -> Vec<u8> {
    let mut obj: Map<String, Value> = sample.metrics.clone();
    for (key, value) in [
        ("id", sample.id.clone()),
        ("timestamp", sample.timestamp.clone()),
        ("host", sample.host.clone().map(Value::String)),
        ("model", sample.model.clone().map(Value::String)),
    ] {
        if let Some(v) = value {
            obj.insert(key.to_string(), v);
        }
    }
    Value::Object(obj).to_string().into_bytes()
}

/// Score one input message into the messages to publish. Bad samples are dead-lettered one
/// by one, so a batch with one broken sample still gets its other verdicts.
pub fn plan_message(state: &AppState, cfg: &StreamConfig, origin: &Origin, payload: &[u8]) -> Plan {
    let mut plan = Plan::default();
    let req = match request::parse(payload, cfg.max_samples) {
        Ok(r) => r,
        Err(e) => {
            plan.dead_codes.push(e.code);
            plan.publishes
                .push(dead_letter(cfg, origin, &e, None, payload));
            return plan;
        }
    };
    let subject_host = host_from_subject(&origin.subject, &cfg.subjects);
    let models = state.registry.snapshot();
    let mut scratch = None;
    for (i, mut sample) in req.samples.into_iter().enumerate() {
        if sample.host.is_none() {
            sample.host = subject_host.clone();
        }
        match score_sample(&models, req.model.as_deref(), &sample, &mut scratch) {
            Ok((model, scored)) => {
                record_verdict(&state.metrics, &model, &scored);
                let payload = serde_json::to_vec(&scored).unwrap_or_default();
                plan.publishes.push(Outgoing {
                    subject: format!("{}.{}", cfg.results, subject_tokens(scored.host.as_deref())),
                    msg_id: format!("{}:{}:{i}", origin.stream, origin.stream_sequence),
                    payload: Bytes::from(payload),
                });
                plan.verdicts += 1;
            }
            Err(e) => {
                plan.dead_codes.push(e.code);
                plan.publishes
                    .push(dead_letter(cfg, origin, &e, Some(i), &sample_json(&sample)));
            }
        }
    }
    plan
}

/// Use the stream that already captures `subjects[0]`, else get or create `name`.
async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[String],
    duplicate_window: Option<Duration>,
) -> Result<jetstream::stream::Stream> {
    if let Ok(existing) = js.stream_by_subject(subjects[0].clone()).await {
        if existing != name {
            tracing::info!(stream = %existing, subject = %subjects[0], "using the stream that already holds this subject");
        }
        return js
            .get_stream(&existing)
            .await
            .map_err(|e| anyhow!("stream `{existing}`: {e}"));
    }
    let mut config = jetstream::stream::Config {
        name: name.to_string(),
        subjects: subjects.to_vec(),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    if let Some(window) = duplicate_window {
        config.duplicate_window = window;
    }
    js.get_or_create_stream(config)
        .await
        .map_err(|e| anyhow!("stream `{name}` ({}): {e}", subjects.join(", ")))
}

/// Connect, create what is missing and return the shared consumer.
async fn connect(
    cfg: &StreamConfig,
) -> Result<(async_nats::Client, jetstream::Context, PullConsumer)> {
    let mut options = async_nats::ConnectOptions::new()
        .name("dagmm-serve")
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            tracing::info!(%event, "nats connection event");
        });
    if let Some(token) = &cfg.nats_token {
        options = options.token(token.clone());
    }
    let client = options
        .connect(cfg.nats_url.as_str())
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cfg.nats_url))?;
    // Waiting for ack permits (instead of failing) keeps in-flight publishes bounded.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .backpressure_on_inflight(true)
        .max_ack_inflight(cfg.ack_window() * cfg.concurrency)
        .build(client.clone());
    let input = ensure_stream(&js, &cfg.stream, &cfg.subjects, None).await?;
    ensure_stream(
        &js,
        &cfg.results_stream,
        &[format!("{}.>", cfg.results)],
        Some(cfg.duplicate_window),
    )
    .await?;
    ensure_stream(
        &js,
        &cfg.dead_letter_stream,
        std::slice::from_ref(&cfg.dead_letter),
        Some(cfg.duplicate_window),
    )
    .await?;
    let consumer: PullConsumer = input
        .get_or_create_consumer(
            &cfg.consumer,
            jetstream::consumer::pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: cfg.ack_wait,
                max_ack_pending: cfg.max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            anyhow!(
                "consumer `{}` on stream `{}`: {e}",
                cfg.consumer,
                cfg.stream
            )
        })?;
    Ok((client, js, consumer))
}

/// Consume until `shutdown` turns true, then finish the messages in hand and return.
pub async fn run(
    state: Arc<AppState>,
    cfg: StreamConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    cfg.validate()?;
    let (client, js, consumer) = connect(&cfg).await?;
    tracing::info!(
        nats = %cfg.nats_url,
        stream = %consumer.cached_info().stream_name,
        consumer = %cfg.consumer,
        results = %cfg.results,
        "consuming"
    );
    let cfg = Arc::new(cfg);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..cfg.concurrency {
        workers.spawn(pull_loop(
            worker,
            state.clone(),
            cfg.clone(),
            js.clone(),
            consumer.clone(),
            shutdown.clone(),
        ));
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    while let Some(done) = workers.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a pull loop ended abnormally");
        }
    }
    // Acks are plain publishes sitting in the client's buffer until flushed.
    client
        .flush()
        .await
        .map_err(|e| anyhow!("flushing acks to NATS: {e}"))?;
    tracing::info!("stream consumer drained");
    Ok(())
}

async fn pull_loop(
    worker: usize,
    state: Arc<AppState>,
    cfg: Arc<StreamConfig>,
    js: jetstream::Context,
    consumer: PullConsumer,
    mut shutdown: watch::Receiver<bool>,
) {
    'pulls: while !*shutdown.borrow() {
        let batch = consumer
            .batch()
            .max_messages(cfg.pull_batch)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(worker, error = %e, "pull request failed; retrying");
                tokio::select! {
                    _ = shutdown.changed() => {}
                    () = tokio::time::sleep(RETRY_PAUSE) => {}
                }
                continue;
            }
        };
        let mut chunks = batch.ready_chunks(cfg.pull_batch);
        loop {
            // Stop waiting for more as soon as asked; what has arrived is still handled.
            let chunk = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break 'pulls,
                chunk = chunks.next() => chunk,
            };
            let Some(chunk) = chunk else { break };
            let mut messages = Vec::with_capacity(chunk.len());
            for item in chunk {
                match item {
                    Ok(m) => messages.push(m),
                    Err(e) => tracing::debug!(worker, error = %e, "pull ended early"),
                }
            }
            if !messages.is_empty() {
                handle_messages(&state, &cfg, &js, messages).await;
            }
        }
    }
}

/// Score, publish, wait for JetStream to store every publish, then ack; a message whose
/// publishes failed is nak'ed so it comes back.
async fn handle_messages(
    state: &Arc<AppState>,
    cfg: &Arc<StreamConfig>,
    js: &jetstream::Context,
    messages: Vec<jetstream::Message>,
) {
    let m = &state.metrics.stream;
    let mut inputs = Vec::with_capacity(messages.len());
    for msg in &messages {
        m.consumed.inc();
        let origin = match msg.info() {
            Ok(info) => {
                if info.delivered > 1 {
                    m.redelivered.inc();
                }
                m.lag.set(i64::try_from(info.pending).unwrap_or(i64::MAX));
                Origin {
                    subject: msg.subject.to_string(),
                    stream: info.stream.to_string(),
                    stream_sequence: info.stream_sequence,
                    delivered: info.delivered,
                }
            }
            // Not a JetStream delivery; nothing stable to derive ids from.
            Err(_) => Origin {
                subject: msg.subject.to_string(),
                stream: cfg.stream.clone(),
                stream_sequence: 0,
                delivered: 1,
            },
        };
        inputs.push((origin, msg.payload.clone()));
    }
    // Scoring is CPU work; keep it off the threads that run HTTP and NATS I/O.
    let (s, c) = (state.clone(), cfg.clone());
    let plans = tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .map(|(origin, payload)| plan_message(&s, &c, origin, payload))
            .collect::<Vec<Plan>>()
    })
    .await;
    let plans = match plans {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "scoring panicked; messages will be redelivered");
            for msg in &messages {
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
            return;
        }
    };
    // Publish in groups of at most `ack_window` verdicts: an un-awaited ack holds one of the
    // context's permits, so a group must fit in this loop's share of them.
    let window = cfg.ack_window();
    let mut group_start = 0;
    let mut in_group = 0;
    for (i, plan) in plans.iter().enumerate() {
        if in_group > 0 && in_group + plan.publishes.len() > window {
            publish_and_ack(state, js, &messages[group_start..i], &plans[group_start..i]).await;
            group_start = i;
            in_group = 0;
        }
        in_group += plan.publishes.len();
    }
    publish_and_ack(state, js, &messages[group_start..], &plans[group_start..]).await;
}

/// Send every publish of the group first so their acks come back in parallel, then settle
/// each message: ack when all its publishes are stored, nak otherwise.
async fn publish_and_ack(
    state: &Arc<AppState>,
    js: &jetstream::Context,
    messages: &[jetstream::Message],
    plans: &[Plan],
) {
    let m = &state.metrics.stream;
    let mut pending = Vec::with_capacity(plans.len());
    for plan in plans {
        let mut acks = Vec::with_capacity(plan.publishes.len());
        let mut failed = false;
        for out in &plan.publishes {
            let publish = PublishMessage::build()
                .payload(out.payload.clone())
                .message_id(&out.msg_id);
            match js.send_publish(out.subject.clone(), publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    tracing::warn!(subject = %out.subject, error = %e, "publish failed");
                    failed = true;
                    break;
                }
            }
        }
        pending.push((acks, failed));
    }
    for ((msg, plan), (acks, mut failed)) in messages.iter().zip(plans).zip(pending) {
        for ack in acks {
            match ack.await {
                Ok(stored) if stored.duplicate => m.duplicates_dropped.inc(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream did not store a result");
                    failed = true;
                }
            }
        }
        if failed {
            m.publish_failures.inc();
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            continue;
        }
        m.scored.inc_by(plan.verdicts as u64);
        for code in &plan.dead_codes {
            m.dead_lettered.with_label_values(&[code]).inc();
        }
        if let Err(e) = msg.ack().await {
            // The message comes back after ack_wait; its verdicts are de-duplicated then.
            tracing::warn!(error = %e, "ack failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("metrics.>", "metrics.web-01"));
        assert!(subject_matches("metrics.>", "metrics.web-01.example.com"));
        assert!(!subject_matches("metrics.>", "metrics"));
        assert!(subject_matches("metrics.*", "metrics.a"));
        assert!(!subject_matches("metrics.*", "metrics.a.b"));
        assert!(!subject_matches("metrics.a", "metrics.b"));
        assert!(subject_matches("a.b", "a.b"));
    }

    #[test]
    fn hosts_come_from_the_subject_tail() {
        let subjects = vec!["metrics.>".to_string(), "dc1.*.hosts".to_string()];
        assert_eq!(
            host_from_subject("metrics.web-01.example.com", &subjects).as_deref(),
            Some("web-01.example.com")
        );
        assert_eq!(
            host_from_subject("dc1.db-2.hosts", &subjects).as_deref(),
            Some("db-2.hosts")
        );
        assert_eq!(host_from_subject("other.web-01", &subjects), None);
        assert_eq!(subject_tokens(Some("web 01*")), "web_01_");
        assert_eq!(subject_tokens(Some("a..b.")), "a._.b._");
        assert_eq!(subject_tokens(None), "_unknown");
    }

    #[test]
    fn settings_that_would_loop_or_duplicate_are_refused() {
        let ok = StreamConfig::new("nats://127.0.0.1:4222");
        ok.validate().unwrap();
        let mut looped = ok.clone();
        looped.results = "metrics.scores".into();
        assert!(
            looped
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--results")
        );
        let mut wildcard = ok.clone();
        wildcard.dead_letter = "dead.>".into();
        assert!(wildcard.validate().is_err());
        let mut window = ok.clone();
        window.duplicate_window = window.ack_wait;
        assert!(window.validate().is_err());
        let mut name = ok.clone();
        name.stream = "MY.STREAM".into();
        assert!(
            name.validate()
                .unwrap_err()
                .to_string()
                .contains("--stream")
        );
        let mut pending = ok;
        pending.max_ack_pending = 10;
        assert!(pending.validate().is_err());
    }
}
