#!/usr/bin/env python3
"""NumPy implementation of one NuMax ADMM iteration, to time against kiln's (`kiln embed`).

The same iteration as `src/embed/numax.rs`, on the same problem: points in principal
coordinates (centred, projected on the span of the data — exact for the secants), dense
n x n secant matrices with the Gram trick, faer's role played by numpy.linalg.eigh, 10
warm-started conjugate-gradient steps, every secant active (no column generation), L = P = I
start. Prints the median time per iteration over `--iters` iterations after `--warmup`.

    python3 bench/numax_numpy.py --data translating-squares --delta 0.4
    python3 bench/numax_numpy.py --data tests/data/digits.csv --limit 500 --delta 0.4
"""
import argparse
import json
import time

import numpy as np


def translating_squares():
    pts = []
    for top in range(9):
        for left in range(9):
            img = np.zeros((16, 16))
            img[top:top + 8, left:left + 8] = 1.0
            pts.append(img.ravel())
    return np.array(pts)


def load(path, limit):
    if path == "translating-squares":
        x = translating_squares()
    else:
        with open(path) as f:
            header = f.readline().strip().split(",")
        keep = [i for i, h in enumerate(header) if h.lower() != "label"]
        x = np.loadtxt(path, delimiter=",", skiprows=1, usecols=keep)
    return x[:limit] if limit else x


def principal_coordinates(x):
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    keep = s**2 > 1e-12 * s[0] ** 2
    return u[:, keep] * s[keep]


class Ops:
    def __init__(self, x):
        self.x = x
        sq = (x * x).sum(axis=1)
        dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
        n = x.shape[0]
        inv = np.zeros((n, n))
        off = ~np.eye(n, dtype=bool) & (dist > 1e-12)
        inv[off] = 1.0 / dist[off]
        self.inv = inv
        self.mask = (inv > 0).astype(float)

    def apply(self, psi):
        g = self.x @ psi @ self.x.T
        h = np.diag(g)
        return (h[:, None] + h[None, :] - 2 * g) * self.inv

    def adjoint(self, w):
        c = w * self.inv
        m = np.diag(c.sum(axis=1)) - c
        return self.x.T @ m @ self.x


def cg(ops, rhs, l, c1, c2, steps):
    def normal(p):
        return c1 * ops.adjoint(ops.apply(p)) + c2 * p

    r = rhs - normal(l)
    p = r.copy()
    rs = (r * r).sum()
    for _ in range(steps):
        ap = normal(p)
        pap = (p * ap).sum()
        if pap <= 0:
            break
        alpha = rs / pap
        l = l + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum()
        p = r + (rs_new / rs) * p
        rs = rs_new
    return l


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="translating-squares")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--delta", type=float, default=0.4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cg-steps", type=int, default=10)
    args = ap.parse_args()

    x = principal_coordinates(load(args.data, args.limit))
    n, d = x.shape
    ops = Ops(x)
    b1, b2, eta, delta = 1.0, 1.0, 1.618, args.delta
    l = np.eye(d)
    lam = np.zeros((d, d))
    omega = np.zeros((n, n))
    a = ops.apply(l)
    times = []
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        s, u = np.linalg.eigh(l - lam)
        s = np.maximum(s - 1.0 / b2, 0.0)
        p = (u * s) @ u.T
        q = np.clip(a + omega, 1 - delta, 1 + delta) * ops.mask
        rhs = b1 * ops.adjoint((q - omega) * ops.mask) + 2 * b2 * (p + lam)
        l = cg(ops, rhs, l, b1, 2 * b2, args.cg_steps)
        a = ops.apply(l)
        lam = lam - eta * (l - p)
        omega = omega - eta * (q - a)
        r1 = np.linalg.norm(l - p) / max(np.linalg.norm(l), np.linalg.norm(p))
        r2 = np.linalg.norm(q - a) / max(np.linalg.norm(q), np.linalg.norm(a))
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({
        "data": args.data, "points": n, "reduced_dim": d, "iters": args.iters,
        "median_s_per_iter": times[len(times) // 2], "min_s_per_iter": times[0],
        "residuals": [r1, r2], "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
