//! Samples per second of the plain-Rust scorer, energy alone and full verdicts (energy plus
//! per-metric explanation), at batch sizes 1, 64 and 4096: one row per pass (what a `/score`
//! request does) and sixteen rows per pass in SIMD lanes (what batch scoring does).
//! `cargo bench -p dagmm-benches --bench scorer`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dagmm_datasets::synthetic::reference_scenario;
use dagmm_model::scorer::LANES;
use dagmm_model::{Explainer, FeatureSpec, NetworkConfig, Preprocessor, TrainConfig, fit};

fn model() -> (Explainer, Vec<[f64; 4]>) {
    let (normal, _) = reference_scenario(0);
    let rows: Vec<f64> = normal.iter().flatten().copied().collect();
    let pre = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap();
    let cfg = TrainConfig {
        epochs: 50,
        ..TrainConfig::default()
    };
    let out = fit(&NetworkConfig::metrics4(), &cfg, pre, &rows, &mut |_| {}).unwrap();
    (Explainer::new(out.model), normal)
}

fn bench(c: &mut Criterion) {
    let (explainer, samples) = model();
    let mut group = c.benchmark_group("scorer");
    for batch in [1usize, 64, 4096] {
        let rows: Vec<[f64; 4]> = samples.iter().cycle().take(batch).copied().collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("energy", batch), &rows, |b, rows| {
            let mut s = explainer.scorer().new_scratch();
            b.iter(|| {
                rows.iter()
                    .map(|r| explainer.energy(black_box(r), &mut s))
                    .sum::<f64>()
            })
        });
        group.bench_with_input(BenchmarkId::new("verdict", batch), &rows, |b, rows| {
            let mut s = explainer.scorer().new_scratch();
            b.iter(|| {
                rows.iter()
                    .map(|r| explainer.verdict(black_box(r), &mut s).energy)
                    .sum::<f64>()
            })
        });
        group.bench_with_input(BenchmarkId::new("assess_lanes", batch), &rows, |b, rows| {
            let mut s = explainer.scorer().new_scratch();
            b.iter(|| {
                rows.chunks(LANES)
                    .map(|block| {
                        let refs: Vec<&[f64]> = block.iter().map(|r| black_box(&r[..])).collect();
                        explainer.assess_lanes::<LANES>(&refs, &mut s)[0].energy
                    })
                    .sum::<f64>()
            })
        });
    }
    let x: Vec<f32> = samples
        .iter()
        .cycle()
        .take(4096)
        .flat_map(|r| {
            let p = &explainer.model().preprocessor;
            (0..4).map(move |j| p.scale(j, r[j]) as f32)
        })
        .collect();
    group.throughput(Throughput::Elements(4096));
    group.bench_function("energies_scaled_lanes/4096", |b| {
        b.iter(|| explainer.scorer().energies_scaled(black_box(&x)).len())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
