//! The deployment that inspired the project: 1000 normal samples of four server metrics plus
//! two injected anomalies, trained with the default settings (1000 epochs). Both anomalies must
//! land above the p99 cutoff and at most 1.5 % of normal samples may, for every seed.

use dagmm_datasets::synthetic::reference_scenario;
use dagmm_model::{FeatureSpec, NetworkConfig, Preprocessor, TrainConfig, fit};

const SEEDS: [u64; 5] = [0, 1, 2, 3, 4];

fn run(seed: u64) -> (Vec<f64>, Vec<f64>, f64) {
    let (normal, anomalies) = reference_scenario(seed);
    assert_eq!(normal.len(), 1000);
    let rows: Vec<f64> = normal.iter().chain(&anomalies).flatten().copied().collect();
    let pre = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap();
    let cfg = TrainConfig {
        seed,
        ..TrainConfig::default()
    };
    let out = fit(&NetworkConfig::metrics4(), &cfg, pre, &rows, &mut |_| {}).unwrap();
    let (normal_e, anomaly_e) = out.train_energies.split_at(normal.len());
    (
        normal_e.to_vec(),
        anomaly_e.to_vec(),
        out.model.thresholds.cutoff,
    )
}

#[test]
fn both_anomalies_exceed_the_p99_cutoff_for_every_seed() {
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = SEEDS
            .iter()
            .map(|&seed| s.spawn(move || (seed, run(seed))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (seed, (normal, anomalies, cutoff)) in results {
        let flagged_normal = normal.iter().filter(|&&e| e > cutoff).count();
        eprintln!(
            "seed {seed}: cutoff {cutoff:.3}, anomalies {anomalies:.3?}, normal above cutoff {flagged_normal}"
        );
        assert!(
            anomalies.iter().all(|&e| e > cutoff),
            "seed {seed}: an anomaly is below the cutoff"
        );
        assert!(
            flagged_normal as f64 <= 0.015 * normal.len() as f64,
            "seed {seed}: {flagged_normal} normal samples flagged"
        );
    }
}
