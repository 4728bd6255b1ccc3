//! `dagmm-train generate`: write the seeded synthetic metric export.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use dagmm_datasets::synthetic::{SampleSpec, generate, write_frame};

#[derive(Args)]
pub struct GenerateArgs {
    /// Output file (.parquet or .csv).
    #[arg(long, default_value = "datasets/sample/metrics.parquet")]
    out: PathBuf,
    #[arg(long, default_value_t = SampleSpec::default().hosts)]
    hosts: usize,
    #[arg(long, default_value_t = SampleSpec::default().days)]
    days: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = SampleSpec::default().step_s)]
    step: i64,
    /// Anomaly events per host per day.
    #[arg(long, default_value_t = SampleSpec::default().anomalies_per_day)]
    anomalies_per_day: f64,
    #[arg(long, default_value_t = SampleSpec::default().seed)]
    seed: u64,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    anyhow::ensure!(
        args.hosts > 0 && args.days > 0.0 && args.step > 0,
        "--hosts, --days and --step must be positive"
    );
    let spec = SampleSpec {
        hosts: args.hosts,
        days: args.days,
        step_s: args.step,
        anomalies_per_day: args.anomalies_per_day,
        seed: args.seed,
        ..SampleSpec::default()
    };
    let export = generate(&spec);
    let anomalies = export.is_anomaly.iter().filter(|&&a| a).count();
    write_frame(&mut export.to_dataframe()?, &args.out)?;
    println!(
        "wrote {} rows ({} hosts, {} anomalous rows) to {}",
        export.len(),
        args.hosts,
        anomalies,
        args.out.display()
    );
    Ok(())
}
