#!/usr/bin/env python3
"""Adapter: the PyTorch reference DAGMM on the 4-metric server scenario.

Reuses the reference's mixture estimate, energy and loss (../shared/bench/pytorch_dagmm.py) and
swaps in the network `dagmm-train fit` uses for the four server metrics: compression 4-16-8-1 /
1-8-16-4 (tanh), estimation 3-10-Dropout(0.5)-4 softmax. Features are prepared as ours are:
log1p on network-in bps, then min-max into [1, 2]. Prints `train_seconds S epochs E`.

    race_metrics4.py --reference PATH/pytorch_dagmm.py --data rows.csv --epochs 1000 --threads 1
"""
import argparse
import importlib.util
import time

import numpy as np
import torch
import torch.nn as nn

METRICS = ["cpu_usage", "mem_usage", "disk_busy", "net_in_bps"]


def load_reference(path):
    spec = importlib.util.spec_from_file_location("pytorch_dagmm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics4_net(reference, k=4, dropout=0.5):
    net = reference.DAGMM(len(METRICS), k=k, dropout=dropout)
    net.encoder = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1)
    )
    net.decoder = nn.Sequential(
        nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    net.estimation = nn.Sequential(
        nn.Linear(3, 10), nn.Tanh(), nn.Dropout(dropout), nn.Linear(10, k)
    )
    return net


def load_rows(path, last):
    table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    x = np.stack([table[m].astype(np.float64) for m in METRICS], axis=1)
    x = x[np.isfinite(x).all(axis=1)][-last:]
    x[:, 3] = np.log1p(x[:, 3])
    lo, hi = x.min(0), x.max(0)
    return (1.0 + (x - lo) / np.where(hi - lo > 1e-9, hi - lo, 1.0)).astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--last", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    reference = load_reference(args.reference)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.from_numpy(load_rows(args.data, args.last))
    model = metrics4_net(reference)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(perm), args.batch):
            xb = x[perm[i:i + args.batch]]
            xr, z, g = model(xb)
            phi, mu, cov = reference.gmm_params(z, g)
            rec = ((xb - xr) ** 2).sum(1).mean()
            e = reference.energy(z, phi, mu, cov, 1e-6).mean()
            pen = (1.0 / torch.diagonal(cov, dim1=1, dim2=2).clamp_min(1e-12)).sum()
            loss = rec + 0.1 * e + 0.005 * pen
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    print(f"rows {len(x)} final loss {loss.item():.4f}")
    print(f"train_seconds {seconds:.3f} epochs {args.epochs}")


if __name__ == "__main__":
    main()
