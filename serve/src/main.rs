//! `dagmm-serve`: the long-running scoring server (`serve`) and batch scoring of history (`score`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dagmm_serve::app::{AppState, ServerConfig};
use dagmm_serve::metrics::Metrics;
use dagmm_serve::registry::Registry;
use dagmm_serve::server;

#[derive(Parser)]
#[command(
    name = "dagmm-serve",
    version,
    about = "Score server metrics with DAGMM models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve POST /v1/score over HTTP.
    Serve(ServeArgs),
    /// Score a whole export (Parquet/CSV) into a Parquet or CSV file.
    Score(ScoreArgs),
    /// Score samples from a NATS JetStream stream and publish the verdicts (no HTTP scoring).
    Stream(StreamArgs),
}

/// JetStream settings shared by `stream` and `serve --nats`.
#[derive(clap::Args)]
struct StreamFlags {
    /// Input stream (created with --subjects if missing).
    #[arg(long = "stream", env = "DAGMM_NATS_STREAM", default_value = "METRICS")]
    stream_name: String,
    /// Input subjects, comma-separated; `metrics.<host>` names the host of samples without one.
    #[arg(
        long,
        env = "DAGMM_NATS_SUBJECTS",
        default_value = "metrics.>",
        value_delimiter = ','
    )]
    subjects: Vec<String>,
    /// Durable pull consumer shared by every replica.
    #[arg(long, env = "DAGMM_NATS_CONSUMER", default_value = "dagmm-scorers")]
    consumer: String,
    /// Verdicts are published to `<results>.<host>`.
    #[arg(long, env = "DAGMM_NATS_RESULTS", default_value = "scores")]
    results: String,
    /// Stream storing (and de-duplicating) the verdicts, created if missing.
    #[arg(long, env = "DAGMM_NATS_RESULTS_STREAM", default_value = "SCORES")]
    results_stream: String,
    /// Subject for messages that cannot be scored, with the reason.
    #[arg(
        long,
        env = "DAGMM_NATS_DEAD_LETTER",
        default_value = "dagmm.dead-letter"
    )]
    dead_letter: String,
    /// Stream storing the dead letters, created if missing.
    #[arg(
        long,
        env = "DAGMM_NATS_DEAD_LETTER_STREAM",
        default_value = "DAGMM_DEAD_LETTER"
    )]
    dead_letter_stream: String,
    /// Messages asked for in one pull.
    #[arg(long, env = "DAGMM_NATS_PULL_BATCH", default_value_t = 256)]
    pull_batch: usize,
    /// Concurrent pull loops in this replica.
    #[arg(long, env = "DAGMM_NATS_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// Unacked messages the consumer allows across all replicas.
    #[arg(long, env = "DAGMM_NATS_MAX_ACK_PENDING", default_value_t = 8192)]
    max_ack_pending: i64,
    /// Milliseconds before a message a replica did not ack is redelivered.
    #[arg(long, env = "DAGMM_NATS_ACK_WAIT_MS", default_value_t = 30_000)]
    ack_wait_ms: u64,
    /// Seconds during which the results stream drops republished verdicts (must exceed ack wait).
    #[arg(long, env = "DAGMM_NATS_DUPLICATE_WINDOW_S", default_value_t = 300)]
    duplicate_window_s: u64,
    /// File holding the NATS token, for servers that require one.
    #[arg(long, env = "DAGMM_NATS_TOKEN_FILE")]
    nats_token_file: Option<PathBuf>,
}

impl StreamFlags {
    fn config(
        &self,
        nats_url: &str,
        max_samples: usize,
    ) -> Result<dagmm_serve::stream::StreamConfig> {
        Ok(dagmm_serve::stream::StreamConfig {
            nats_url: nats_url.to_string(),
            nats_token: self
                .nats_token_file
                .as_deref()
                .map(|p| read_secret(p, "NATS token"))
                .transpose()?,
            stream: self.stream_name.clone(),
            subjects: self.subjects.clone(),
            consumer: self.consumer.clone(),
            results: self.results.clone(),
            results_stream: self.results_stream.clone(),
            dead_letter: self.dead_letter.clone(),
            dead_letter_stream: self.dead_letter_stream.clone(),
            pull_batch: self.pull_batch,
            concurrency: self.concurrency,
            max_ack_pending: self.max_ack_pending,
            ack_wait: Duration::from_millis(self.ack_wait_ms),
            duplicate_window: Duration::from_secs(self.duplicate_window_s),
            max_samples,
        })
    }
}

#[derive(clap::Args)]
struct StreamArgs {
    /// A bundle file, or a directory of bundles (model name = file stem).
    #[arg(long, env = "DAGMM_MODELS")]
    models: PathBuf,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "DAGMM_NATS_URL")]
    nats: String,
    #[command(flatten)]
    stream: StreamFlags,
    /// Most samples in one message.
    #[arg(long, env = "DAGMM_MAX_SAMPLES", default_value_t = ServerConfig::default().max_samples)]
    max_samples: usize,
    /// Also serve /metrics, /healthz and /readyz on this address.
    #[arg(long, env = "DAGMM_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long, env = "DAGMM_WORKERS")]
    workers: Option<usize>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExplainRows {
    All,
    Anomalies,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// A bundle file, or a directory of per-host bundles (model name = host).
    #[arg(long, env = "DAGMM_MODELS")]
    models: PathBuf,
    /// Export to score: a Parquet/CSV file, a directory of them, or a glob.
    #[arg(long)]
    input: String,
    /// Output file; `.parquet` (zstd) or `.csv`.
    #[arg(long)]
    output: PathBuf,
    /// Model for rows whose host has no bundle of its own.
    #[arg(long)]
    default_model: Option<String>,
    /// Ground-truth column (0/1 or boolean): also print precision, recall, F1, ROC-AUC, PR-AUC.
    #[arg(long)]
    label_column: Option<String>,
    #[command(flatten)]
    columns: dagmm_datasets::cli::ColumnArgs,
    /// Treat the input as the long shape (`timestamp, host, metric, value`); detected otherwise.
    #[arg(long)]
    long: bool,
    /// Rows read and scored per step (bounds memory).
    #[arg(long, default_value_t = dagmm_serve::batch::DEFAULT_CHUNK_ROWS)]
    chunk_rows: usize,
    /// Which rows get `top_metric` and contribution columns: `all` (as `POST /score` answers)
    /// or `anomalies` (flagged rows only; about five times less scoring work).
    #[arg(long, value_enum, default_value = "all")]
    explain: ExplainRows,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Let the OS move the scoring threads between CPUs. By default each is pinned to a CPU
    /// of its own (Linux with glibc); on a machine busy with other work, unpinned threads may do better.
    #[arg(long)]
    no_pin: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A bundle file, or a directory of bundles (model name = file stem).
    #[arg(long, env = "DAGMM_MODELS")]
    models: PathBuf,
    /// Address to listen on (loopback by default; put a proxy in front to expose it).
    #[arg(long, env = "DAGMM_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// File holding the bearer token every route but the health checks requires.
    #[arg(long, env = "DAGMM_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Most samples in one request.
    #[arg(long, env = "DAGMM_MAX_SAMPLES", default_value_t = ServerConfig::default().max_samples)]
    max_samples: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "DAGMM_MAX_BODY_BYTES", default_value_t = ServerConfig::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Request timeout, in milliseconds.
    #[arg(long, env = "DAGMM_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Worker threads (default: one per core).
    #[arg(long, env = "DAGMM_WORKERS")]
    workers: Option<usize>,
    /// Also consume samples from NATS JetStream at this URL (see the `stream` command).
    #[arg(long, env = "DAGMM_NATS_URL")]
    nats: Option<String>,
    #[command(flatten)]
    stream: StreamFlags,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAGMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // A library panic must still end as one error line, not a backtrace.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cli.command {
        Command::Serve(args) => run_server(args),
        Command::Score(args) => run_batch(args),
        Command::Stream(args) => run_stream(args),
    }))
    .unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown cause");
        Err(anyhow::anyhow!("internal error: {why}"))
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn read_secret(path: &std::path::Path, what: &str) -> Result<String> {
    let secret = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let secret = secret.trim().to_string();
    anyhow::ensure!(
        !secret.is_empty(),
        "{}: the {what} file is empty",
        path.display()
    );
    Ok(secret)
}

fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(w) = workers {
        runtime.worker_threads(w.max(1));
    }
    Ok(runtime.build()?)
}

/// One stop signal for every part of the process (HTTP and stream).
fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        server::shutdown_signal().await;
        let _ = tx.send(true);
    });
    rx
}

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn run_server(args: ServeArgs) -> Result<()> {
    let auth_token = args
        .auth_token_file
        .as_deref()
        .map(|p| read_secret(p, "token"))
        .transpose()?;
    anyhow::ensure!(args.max_samples > 0, "--max-samples must be at least 1");
    let stream_config = match &args.nats {
        Some(url) => {
            let cfg = args.stream.config(url, args.max_samples)?;
            cfg.validate()?;
            Some(cfg)
        }
        None => None,
    };
    let registry = Registry::open(&args.models).map_err(|e| anyhow::anyhow!(e))?;
    let state = Arc::new(AppState {
        registry,
        metrics: Metrics::new(),
        config: ServerConfig {
            max_body_bytes: args.max_body_bytes,
            max_samples: args.max_samples,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            auth_token,
        },
    });
    runtime(args.workers)?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        server::spawn_sighup_reloader(state.clone());
        let stop = stop_on_signal();
        let http = server::serve(listener, state.clone(), stopped(stop.clone()));
        match stream_config {
            Some(cfg) => {
                let consume = dagmm_serve::stream::run(state, cfg, stop);
                let (http, consume) = tokio::join!(http, consume);
                http?;
                consume?;
            }
            None => http.await?,
        }
        Ok(())
    })
}

fn run_stream(args: StreamArgs) -> Result<()> {
    let cfg = args.stream.config(&args.nats, args.max_samples)?;
    cfg.validate()?;
    let registry = Registry::open(&args.models).map_err(|e| anyhow::anyhow!(e))?;
    let state = Arc::new(AppState {
        registry,
        metrics: Metrics::new(),
        config: ServerConfig::default(),
    });
    runtime(args.workers)?.block_on(async move {
        server::spawn_sighup_reloader(state.clone());
        let stop = stop_on_signal();
        let ops = match &args.metrics_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                Some(tokio::spawn(server::serve_ops(
                    listener,
                    state.clone(),
                    stopped(stop.clone()),
                )))
            }
            None => None,
        };
        dagmm_serve::stream::run(state, cfg, stop).await?;
        if let Some(ops) = ops {
            ops.await??;
        }
        Ok(())
    })
}

/// Batch scoring allocates and frees buffers from a few hundred kilobytes to a few megabytes
/// for every chunk. By default glibc maps the large ones fresh and hands freed memory back to
/// the kernel, so each chunk paid page faults to have it zeroed again: about a tenth of a
/// 10 M-row run. Keep freed memory in the heap for the next chunk instead; the process then
/// holds its peak, which the chunk and row-group sizes bound.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: `mallopt` only sets allocator parameters, and this runs before batch scoring
    // starts any thread. A refused value leaves glibc's default, which is merely slower.
    unsafe {
        // 32 MiB is the largest threshold glibc accepts on 64-bit targets.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// Give each scoring thread (rayon's global pool) a CPU of its own. Scoring wakes the pool for
/// every chunk, and Linux often placed both woken threads on the waking thread's CPU, where they
/// took turns while the other CPU sat idle for milliseconds: pinned, a 10 M-row run took about
/// 4 % less time. Threads past the number of allowed CPUs wrap around; nothing is pinned where
/// [`pinnable_cpus`](dagmm_model::cpu_pinning::pinnable_cpus) says no. A pool that cannot be
/// set up (already built) stays as it is.
fn pin_scoring_threads() {
    use dagmm_model::cpu_pinning::{pin_current_thread, pinnable_cpus};
    let Some(allowed) = pinnable_cpus() else {
        return;
    };
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(move |thread| {
            // A refused affinity leaves the thread unpinned.
            pin_current_thread(allowed[thread % allowed.len()]);
        })
        .build_global();
}

fn run_batch(args: ScoreArgs) -> Result<()> {
    use dagmm_datasets::read::{ReadOptions, ShapeOption};
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

    keep_freed_memory();
    if !args.no_pin {
        pin_scoring_threads();
    }
    anyhow::ensure!(args.chunk_rows > 0, "--chunk-rows must be at least 1");
    let registry = Registry::open(&args.models).map_err(|e| anyhow::anyhow!(e))?;
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if args.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {human_pos}/{human_len} rows {per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let progress_bar = bar.clone();
    let opts = dagmm_serve::batch::BatchOptions {
        input: args.input.clone(),
        output: args.output.clone(),
        read: ReadOptions {
            columns: args.columns.column_map()?,
            shape: if args.long {
                ShapeOption::Long
            } else {
                ShapeOption::Auto
            },
            group_by: None,
        },
        default_model: args.default_model.clone(),
        label_column: args.label_column.clone(),
        chunk_rows: args.chunk_rows,
        explain: match args.explain {
            ExplainRows::All => dagmm_serve::batch::Explain::All,
            ExplainRows::Anomalies => dagmm_serve::batch::Explain::Anomalies,
        },
        progress: Some(Box::new(move |done, total| {
            progress_bar.set_length(total as u64);
            progress_bar.set_position(done as u64);
        })),
    };
    let summary = dagmm_serve::batch::run(&registry.snapshot(), &opts)?;
    bar.finish_and_clear();
    print!("{}", summary.render(&args.output));
    Ok(())
}
