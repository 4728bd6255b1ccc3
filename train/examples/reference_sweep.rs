//! Reference-scenario sweep: energies of the two injected anomalies against the p99 cutoff for
//! several seeds and settings. `cargo run --release -p dagmm-train --example reference_sweep`.

use std::time::Instant;

use dagmm_datasets::synthetic::reference_scenario;
use dagmm_model::{FeatureSpec, NetworkConfig, Preprocessor, TrainConfig, fit};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let seeds: u64 = get("--seeds", "10").parse().unwrap();
    let mut net = NetworkConfig::metrics4();
    net.latent_dim = get("--latent-dim", &net.latent_dim.to_string())
        .parse()
        .unwrap();
    net.gmm_k = get("--gmm-k", &net.gmm_k.to_string()).parse().unwrap();
    net.hidden = get("--hidden", "16,8")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let base = TrainConfig {
        epochs: get("--epochs", "1000").parse().unwrap(),
        learning_rate: get("--lr", "0.001").parse().unwrap(),
        batch_size: get("--batch-size", "1024").parse().unwrap(),
        ..TrainConfig::default()
    };
    let mut failures = 0;
    for seed in 0..seeds {
        let (normal, anomalies) = reference_scenario(seed);
        let rows: Vec<f64> = normal.iter().chain(&anomalies).flatten().copied().collect();
        let pre = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap();
        let cfg = TrainConfig {
            seed,
            ..base.clone()
        };
        let start = Instant::now();
        let out = fit(&net, &cfg, pre, &rows, &mut |_| {}).unwrap();
        let cutoff = out.model.thresholds.cutoff;
        let (n, a) = out.train_energies.split_at(normal.len());
        let flagged = n.iter().filter(|&&e| e > cutoff).count();
        let ok = a.iter().all(|&e| e > cutoff) && flagged <= 15;
        failures += usize::from(!ok);
        println!(
            "seed {seed}: {:.2} s, cutoff {cutoff:.3}, anomalies {:.3} {:.3}, normal flagged {flagged} {}",
            start.elapsed().as_secs_f64(),
            a[0],
            a[1],
            if ok { "ok" } else { "MISS" }
        );
    }
    println!("{failures} of {seeds} seeds missed");
}
