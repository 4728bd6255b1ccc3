//! `dagmm-train`: fit DAGMM models from exported metric history.
//!
//! Subcommands, one module each: `fit` (train and save bundles), `generate` (write the seeded
//! sample export), `report` (figures and a model card), `evaluate` (detection quality on
//! labelled data).

mod evaluate;
mod fit;
mod generate;
mod report;

use clap::{Parser, Subcommand};

/// A training step allocates and frees some forty buffers of a few to a few hundred kilobytes
/// (every tensor burn's graph makes); glibc's allocator spent about 4 % of a KDDCUP99 step on
/// them, consolidating and splitting its free chunks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "dagmm-train",
    version,
    about = "Train DAGMM anomaly-detection models on server metrics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit one model (or one per group) from a metric export and save the bundles.
    Fit(Box<fit::FitArgs>),
    /// Write the seeded synthetic sample export (what datasets/sample/ holds).
    Generate(generate::GenerateArgs),
    /// Figures, a model card and an HTML page for one model (PNG and SVG).
    Report(report::ReportArgs),
    /// Detection quality on labelled data over several seeds (precision, recall, F1, ROC-AUC, PR-AUC).
    Evaluate(Box<evaluate::EvaluateArgs>),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fit(args) => fit::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Report(args) => report::run(args),
        Command::Evaluate(args) => evaluate::run(*args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
