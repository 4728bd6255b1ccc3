//! `dagmm-train fit`: read an export, clean it, take the training windows, fit one DAGMM per
//! group in parallel, and save one bundle per model.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use dagmm_datasets::METRICS;
use dagmm_datasets::clean::{
    CleanOptions, GroupData, MissingPolicy, SkippedGroup, Window, prepare_groups,
};
use dagmm_datasets::cli::ColumnArgs;
use dagmm_datasets::read::{ReadOptions, ShapeOption, format_time, parse_time_text, read_metrics};
use dagmm_model::bundle::EXTENSION;
use dagmm_model::{
    Bundle, EpochLosses, FeatureSpec, NetworkConfig, Preprocessor, TrainConfig, TrainingSummary,
    cores_per_fit, fit_on_cores,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

#[derive(Clone, Copy, ValueEnum)]
enum ShapeArg {
    Auto,
    Wide,
    Long,
}

#[derive(Clone, Copy, ValueEnum)]
enum MissingArg {
    /// Drop rows with any missing metric.
    Drop,
    /// Carry the host's previous value forward, up to --max-gap.
    Ffill,
}

#[derive(Args)]
pub struct FitArgs {
    /// Export to train on: a Parquet/CSV file, a directory of them, or a glob.
    #[arg(long)]
    input: String,
    /// Directory the bundles are written to (`<name>.dagmm`).
    #[arg(long, default_value = "models")]
    out: PathBuf,
    /// Model name when not grouping.
    #[arg(long, default_value = "default")]
    name: String,
    /// Fit one model per value of this column (e.g. `host`).
    #[arg(long)]
    group_by: Option<String>,

    #[command(flatten)]
    columns: ColumnArgs,
    #[arg(long, value_enum, default_value = "auto")]
    shape: ShapeArg,

    /// Train on the most recent N samples per host.
    #[arg(long, default_value_t = 1000, conflicts_with_all = ["from", "to"])]
    last: usize,
    /// Train on samples at or after this RFC 3339 time.
    #[arg(long)]
    from: Option<String>,
    /// Train on samples before this RFC 3339 time.
    #[arg(long)]
    to: Option<String>,
    #[arg(long, value_enum, default_value = "drop")]
    missing: MissingArg,
    /// Longest gap forward-filling bridges, in seconds.
    #[arg(long, default_value_t = 300)]
    max_gap: i64,
    /// Groups with fewer clean rows than this are skipped.
    #[arg(long, default_value_t = 50)]
    min_rows: usize,

    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    lr: f64,
    #[arg(long, default_value_t = NetworkConfig::metrics4().latent_dim)]
    latent_dim: usize,
    #[arg(long, default_value_t = NetworkConfig::metrics4().gmm_k)]
    gmm_k: usize,
    /// Encoder hidden layer sizes, comma-separated (the decoder mirrors them).
    #[arg(long, default_value = "16,8")]
    hidden: String,
    /// Estimation network hidden layer sizes, comma-separated.
    #[arg(long, default_value = "10")]
    estimation_hidden: String,
    #[arg(long, default_value_t = NetworkConfig::metrics4().dropout)]
    dropout: f64,
    /// λ1: weight of the mean energy in the loss.
    #[arg(long, default_value_t = TrainConfig::default().lambda_energy)]
    lambda_energy: f64,
    /// λ2: weight of the covariance-diagonal penalty.
    #[arg(long, default_value_t = TrainConfig::default().lambda_cov)]
    lambda_cov: f64,
    /// Added to covariance diagonals so they never go singular.
    #[arg(long, default_value_t = TrainConfig::default().cov_reg)]
    cov_reg: f64,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Share of the epochs that train the autoencoder alone before the joint loss.
    #[arg(long, default_value_t = TrainConfig::default().warmup_fraction)]
    warmup: f64,
    /// Percentile of training energies used as the anomaly cutoff.
    #[arg(long, default_value_t = TrainConfig::default().percentile)]
    percentile: f64,
    /// Severity levels as NAME=PERCENTILE pairs, ascending.
    #[arg(long, default_value = "warning=99,critical=99.9")]
    severity: String,
    /// No progress bars; only the final summary.
    #[arg(long, short)]
    quiet: bool,
}

/// Parse `16,8` into layer sizes (an empty list is left to config validation).
pub fn parse_sizes(option: &str, text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .with_context(|| format!("{option}: `{s}` is not a layer size"))
        })
        .collect()
}

fn parse_severities(text: &str) -> Result<Vec<(String, f64)>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (name, p) = pair
                .split_once('=')
                .with_context(|| format!("--severity: `{pair}` is not NAME=PERCENTILE"))?;
            Ok((
                name.trim().to_string(),
                p.trim()
                    .parse()
                    .with_context(|| format!("--severity: `{p}` is not a number"))?,
            ))
        })
        .collect()
}

fn parse_time_arg(option: &str, text: &Option<String>) -> Result<Option<i64>> {
    text.as_deref()
        .map(|t| {
            parse_time_text(t).with_context(|| format!("{option}: `{t}` is not an RFC 3339 time"))
        })
        .transpose()
}

/// File-system-safe model name.
pub fn model_file_name(name: &str) -> String {
    let safe = dagmm_model::bundle::plain_name_chars(name);
    let safe = safe.trim_start_matches('.');
    if safe.is_empty() {
        "unnamed".into()
    } else {
        safe.to_string()
    }
}

struct Trained {
    name: String,
    path: PathBuf,
    rows: usize,
    dropped: usize,
    cutoff: f64,
    final_loss: f64,
    seconds: f64,
}

pub fn run(args: FitArgs) -> Result<()> {
    let started = Instant::now();
    let network = NetworkConfig {
        input_dim: METRICS.len(),
        hidden: parse_sizes("--hidden", &args.hidden)?,
        latent_dim: args.latent_dim,
        estimation_hidden: parse_sizes("--estimation-hidden", &args.estimation_hidden)?,
        gmm_k: args.gmm_k,
        dropout: args.dropout,
    };
    let train = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        lambda_energy: args.lambda_energy,
        lambda_cov: args.lambda_cov,
        cov_reg: args.cov_reg,
        seed: args.seed,
        warmup_fraction: args.warmup,
        percentile: args.percentile,
        severities: parse_severities(&args.severity)?,
    };
    // Every hyper-parameter is checked before any data is read.
    network.validate()?;
    train.validate()?;
    if args.max_gap < 0 {
        bail!("--max-gap must not be negative");
    }
    let window = if args.from.is_some() || args.to.is_some() {
        let (from, to) = (
            parse_time_arg("--from", &args.from)?,
            parse_time_arg("--to", &args.to)?,
        );
        if let (Some(f), Some(t)) = (from, to)
            && f >= t
        {
            bail!("--from must be before --to");
        }
        Window::Range { from, to }
    } else {
        Window::Last(args.last)
    };

    let features = FeatureSpec::server_metrics();
    let read = ReadOptions {
        columns: args.columns.column_map()?,
        shape: match args.shape {
            ShapeArg::Auto => ShapeOption::Auto,
            ShapeArg::Wide => ShapeOption::Wide,
            ShapeArg::Long => ShapeOption::Long,
        },
        group_by: args.group_by.clone(),
    };
    let table = read_metrics(&args.input, &read)?;
    let clean = CleanOptions {
        missing: match args.missing {
            MissingArg::Drop => MissingPolicy::Drop,
            MissingArg::Ffill => MissingPolicy::ForwardFill {
                max_gap_ms: args.max_gap * 1000,
            },
        },
        window,
        bounds: std::array::from_fn(|j| (features[j].min_valid, features[j].max_valid)),
        min_rows: args.min_rows,
        grouped: args.group_by.is_some(),
    };
    let (groups, skipped) = prepare_groups(&table, &clean)?;
    if groups.is_empty() {
        let mut dropped = std::collections::BTreeMap::<&str, usize>::new();
        for s in &skipped {
            for (reason, n) in &s.report.dropped {
                *dropped.entry(reason).or_default() += n;
            }
        }
        let dropped: Vec<String> = dropped.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        bail!(
            "{}: no group has enough rows left after cleaning ({} rows read; fewer than --min-rows {} remain; removed: {})",
            args.input,
            table.len(),
            args.min_rows,
            if dropped.is_empty() {
                "none".to_string()
            } else {
                dropped.join(", ")
            }
        );
    }
    for s in &skipped {
        eprintln!(
            "skipped {}: {}",
            s.name.as_deref().unwrap_or(&args.name),
            s.why
        );
    }

    let bars = MultiProgress::with_draw_target(if args.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    // Hosts train side by side, each on a core of its own; spare cores (fewer hosts than
    // threads) split the larger products of each fit.
    let plan = FitPlan {
        network: &network,
        train: &train,
        features: &features,
        cores: cores_per_fit(groups.len()),
    };
    let results: Vec<Result<Trained>> = groups
        .par_iter()
        .map(|group| {
            let name = group.name.clone().unwrap_or_else(|| args.name.clone());
            let bar = bars.add(epoch_bar(&name, train.epochs));
            let outcome = fit_group(&args, group, &name, &plan, &bar);
            bar.finish_and_clear();
            outcome.with_context(|| format!("model {name}"))
        })
        .collect();

    print_summary(&args, &train, results, &skipped, started.elapsed())
}

fn epoch_bar(name: &str, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(epochs as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] epoch {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// What every host's fit shares.
struct FitPlan<'a> {
    network: &'a NetworkConfig,
    train: &'a TrainConfig,
    features: &'a [FeatureSpec],
    /// Cores per fit: more than one where there are fewer hosts than threads.
    cores: usize,
}

fn fit_group(
    args: &FitArgs,
    group: &GroupData,
    name: &str,
    plan: &FitPlan,
    bar: &ProgressBar,
) -> Result<Trained> {
    let FitPlan {
        network,
        train,
        features,
        cores,
    } = *plan;
    let rows: Vec<f64> = group.rows.iter().flatten().copied().collect();
    let preprocessor = Preprocessor::fit(features.to_vec(), &rows)?;
    let out = fit_on_cores(
        network,
        train,
        preprocessor,
        &rows,
        cores,
        &mut |l: &EpochLosses| {
            bar.set_position(l.epoch as u64);
            bar.set_message(format!(
                "loss {:.4} (recon {:.4}, energy {:.3}, cov {:.3})",
                l.total, l.reconstruction, l.energy, l.cov_penalty
            ));
        },
    )?;
    let report = &group.report;
    let summary = TrainingSummary {
        group: group.name.clone(),
        source: vec![args.input.clone()],
        rows_used: group.rows.len(),
        rows_dropped: report.dropped.clone(),
        values_clipped: report.clipped.clone(),
        time_range: match (group.time_ms.first(), group.time_ms.last()) {
            (Some(&a), Some(&b)) => Some((format_time(a), format_time(b))),
            _ => None,
        },
        final_losses: out.history.last().copied(),
        train_config: Some(train.clone()),
        seconds: out.seconds,
    };
    let bundle = Bundle {
        name: name.to_string(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        model: out.model,
        training: summary,
        history: out.history,
    };
    let path = args
        .out
        .join(format!("{}.{EXTENSION}", model_file_name(name)));
    bundle.save(&path)?;
    Ok(Trained {
        name: name.to_string(),
        path,
        rows: group.rows.len(),
        dropped: report.dropped.values().sum(),
        cutoff: bundle.model.thresholds.cutoff,
        final_loss: bundle.training.final_losses.map_or(f64::NAN, |l| l.total),
        seconds: out.seconds,
    })
}

fn print_summary(
    args: &FitArgs,
    train: &TrainConfig,
    results: Vec<Result<Trained>>,
    skipped: &[SkippedGroup],
    elapsed: Duration,
) -> Result<()> {
    let mut failures = Vec::new();
    let mut trained = Vec::new();
    for r in results {
        match r {
            Ok(t) => trained.push(t),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    println!(
        "{:<16} {:>6} {:>8} {:>12} {:>10} {:>8}  bundle",
        "model", "rows", "dropped", "cutoff(p)", "loss", "seconds"
    );
    for t in &trained {
        println!(
            "{:<16} {:>6} {:>8} {:>12.4} {:>10.4} {:>8.1}  {}",
            t.name,
            t.rows,
            t.dropped,
            t.cutoff,
            t.final_loss,
            t.seconds,
            t.path.display()
        );
    }
    println!(
        "trained {} model(s) on {} ({} epochs, cutoff = p{} of training energies) in {:.1} s; {} skipped, {} failed",
        trained.len(),
        args.input,
        train.epochs,
        train.percentile,
        elapsed.as_secs_f64(),
        skipped.len(),
        failures.len()
    );
    for f in &failures {
        eprintln!("failed: {f}");
    }
    if !failures.is_empty() {
        bail!("{} model(s) failed to train", failures.len());
    }
    Ok(())
}
