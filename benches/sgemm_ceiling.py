"""How fast can one core multiply matrices of the KDDCUP99 network's shapes?

PyTorch's single-threaded float32 matrix product (oneDNN/MKL-class kernels) on the layer shapes
of one training step with a batch of 1024, and on a large square product for comparison. It
bounds what the PyTorch reference's training can reach: a whole epoch also has element-wise work
and the mixture, which run slower than these products. The same shapes through burn flex:
`cargo bench -p dagmm-benches --bench matmul`.

    $DAGMM_TORCH_VENV/bin/python benches/sgemm_ceiling.py
"""

import time

import torch

torch.set_num_threads(1)

SHAPES = [
    # (rows, inner, columns): encoder and decoder layers of the paper's KDDCUP99 network
    (1024, 118, 60),
    (1024, 60, 30),
    (1024, 30, 10),
    (1024, 60, 118),
    # the weight gradient of the largest layer
    (118, 1024, 60),
    (2048, 2048, 2048),
]


def gflops(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    flop = 2 * m * k * n
    reps = max(10, int(4e9 / flop))
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return flop * reps / (time.perf_counter() - start) / 1e9


for m, k, n in SHAPES:
    print(f"{m:5d} x {k:4d} @ {k:4d} x {n:4d}: {gflops(m, k, n):6.1f} GFLOP/s")
