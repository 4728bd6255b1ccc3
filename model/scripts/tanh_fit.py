#!/usr/bin/env python3
"""Fit the rational tanh used in training (model/src/network.rs, `tanh`).

tanh(x) ~ x * P(x^2) / Q(x^2) on [-C, C], P of degree 5, Q of degree 3 with Q(0) = 1. The fit
is on g(t) = tanh(sqrt t) / sqrt t, so its error is relative: linearised least squares
(Sanathanan-Koerner: divide by the previous Q) with Lawson-style weights that push towards the
smallest maximum error. Then the f32 evaluation the network performs (clamp, Horner with a
rounding after every operation, one division) is checked against the correctly rounded tanh.

    python3 model/scripts/tanh_fit.py [C]      (needs numpy; C defaults to 8.5)
"""
import sys

import numpy as np

C = float(sys.argv[1]) if len(sys.argv) > 1 else 8.5
N_P, N_Q = 6, 4

x = np.concatenate([np.linspace(0, 1, 6000), np.linspace(1, C, 12000)])
t = x * x
g = np.ones_like(x)
g[x > 0] = np.tanh(x[x > 0]) / x[x > 0]


def fit():
    q_prev = np.ones_like(t)
    weights = np.ones_like(t)
    best = None
    for _ in range(200):
        a = np.zeros((len(t), N_P + N_Q - 1))
        for i in range(N_P):
            a[:, i] = t**i
        for j in range(1, N_Q):
            a[:, N_P + j - 1] = -g * t**j
        scale = weights / (g * q_prev)
        sol, *_ = np.linalg.lstsq(a * scale[:, None], g * scale, rcond=None)
        p, q = sol[:N_P], np.concatenate([[1.0], sol[N_P:]])
        big_q = np.polyval(q[::-1], t)
        err = np.abs(np.polyval(p[::-1], t) / big_q / g - 1)
        if best is None or err.max() < best[0]:
            best = (err.max(), p, q)
        q_prev = big_q
        weights = weights * (err / err.max() + 1e-3)
        weights /= weights.max()
    return best


def tanh_f32(xs, p, q):
    f = np.float32
    xs = np.clip(xs.astype(f), f(-C), f(C))
    tt = xs * xs
    big_p = tt * f(p[-1])
    for c in p[-2:0:-1]:
        big_p = (big_p + f(c)) * tt
    big_p = big_p + f(p[0])
    big_q = tt * f(q[-1])
    for c in q[-2:0:-1]:
        big_q = (big_q + f(c)) * tt
    big_q = big_q + f(q[0])
    return np.clip(xs * big_p / big_q, f(-1), f(1))


err, p, q = fit()
print(f"clamp {C}: max relative error of the fit {err:.3g}")
print("P =", [float(f"{v:.9g}") for v in p])
print("Q =", [float(f"{v:.9g}") for v in q])
tiny = np.float32(2.0) ** -np.arange(1, 60)
xs = np.concatenate([np.linspace(-12, 12, 4_000_001), tiny, -tiny]).astype(np.float32)
got = tanh_f32(xs, np.float32(p), np.float32(q))
want = np.tanh(xs.astype(np.float64)).astype(np.float32)
ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
print(f"f32: max {ulps.max()} ulp (at x = {xs[ulps.argmax()]}), "
      f"{(ulps <= 1).mean():.1%} within 1 ulp, {(ulps == 0).mean():.1%} exact")
