//! `dagmm-serve`: the long-running scoring server (`serve`).

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
#[command(name = "dagmm-serve", version, about = "Score server metrics with DAGMM models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve POST /v1/score over HTTP.
    Serve(ServeArgs),
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
            tracing_subscriber::EnvFilter::try_from_env("DAGMM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_server(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_server(args: ServeArgs) -> Result<()> {
    let auth_token = match &args.auth_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
            let token = token.trim().to_string();
            anyhow::ensure!(!token.is_empty(), "{}: the token file is empty", path.display());
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
        let listener = tokio::net::TcpListener::bind(&args.addr).await.with_context(|| format!("cannot listen on {}", args.addr))?;
        server::spawn_sighup_reloader(state.clone());
        server::serve(listener, state, server::shutdown_signal()).await?;
        Ok(())
    })
}
