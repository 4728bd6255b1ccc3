//! Floating-point operations per second of burn's flex matrix product on one thread, on the
//! layer shapes of one KDDCUP99 training step (batch 1024) and on a large square product: the
//! Rust side of `benches/sgemm_ceiling.py`. Criterion's element rate is GFLOP/s here
//! (2·m·k·n operations per product). `cargo bench -p dagmm-benches --bench matmul`.

use std::hint::black_box;

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// (rows, inner, columns): the encoder's and decoder's widest layers, the weight gradient of
/// the first layer, and a square product for comparison.
const SHAPES: [(usize, usize, usize); 6] = [
    (1024, 118, 60),
    (1024, 60, 30),
    (1024, 30, 10),
    (1024, 60, 118),
    (118, 1024, 60),
    (2048, 2048, 2048),
];

fn matrix(rows: usize, columns: usize, device: &Device) -> Tensor<2> {
    // Values in [-1, 1) from a fixed pattern: the timing does not depend on them.
    let values = (0..rows * columns)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, columns]), device)
}

fn bench(c: &mut Criterion) {
    // One thread, as a fit runs: flex spreads large products over the rayon pool otherwise.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let device = Device::flex();
    let mut group = c.benchmark_group("matmul");
    for (m, k, n) in SHAPES {
        let (a, b) = (matrix(m, k, &device), matrix(k, n, &device));
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{m}x{k}x{n}")),
            |bench| pool.install(|| bench.iter(|| black_box(a.clone().matmul(b.clone())))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
