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
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
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

fn run_server(args: ServeArgs) -> Result<()> {
    let auth_token = match &args.auth_token_file {
        Some(path) => {
            let token =
                std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
            let token = token.trim().to_string();
            anyhow::ensure!(
                !token.is_empty(),
                "{}: the token file is empty",
                path.display()
            );
            Some(token)
        }
        None => None,
    };
    anyhow::ensure!(args.max_samples > 0, "--max-samples must be at least 1");
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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(w) = args.workers {
        runtime.worker_threads(w.max(1));
    }
    runtime.build()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        server::spawn_sighup_reloader(state.clone());
        server::serve(listener, state, server::shutdown_signal()).await?;
        Ok(())
    })
}

fn run_batch(args: ScoreArgs) -> Result<()> {
    use dagmm_datasets::read::{ReadOptions, ShapeOption};
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
