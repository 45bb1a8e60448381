"""Conditioning benchmark, one run: dense and low-rank ``Gaussian.condition`` against references measured alike.

Dense (float64, 10% of the coordinates fixed at random): time, achieved GFLOP/s as a fraction of this machine's
float64 matmul GFLOP/s measured in the same run, and speed-up over a naive explicit-inverse implementation
(``S = L L^T``, ``inv(S_II)``, Schur complement, Cholesky). The flop count is that of the blocked Schur algorithm
with the triangular structure exploited exactly (the work it must do, not the work a wasteful code would do);
the matmul rate is measured right before and after each dense run (the machine is shared, the rate drifts).

Low-rank (p = 1,000,000, rank 50, 100,000 fixed): time, and peak resident memory of the whole process during
``condition`` (input factor + result + temporaries), as a multiple of the factor's size. Measured in a fresh
subprocess: the kernel's peak-RSS counter (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before
the call and read after it; the baseline is the RSS before the Gaussian was allocated.

    .venv/bin/python benchmarks/conditioning.py [--dense 5000,20000] [--naive-max 10000] [--lowrank-p 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pyro_distill.gaussian import DenseGaussian, LowRankGaussian  # noqa: E402

F64 = torch.float64


def matmul_gflops(n: int = 3000, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=F64), torch.randn(n, n, dtype=F64)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def dense_flops(p: int, I: torch.Tensor) -> float:
    """Flops of the blocked Schur complement that exploits the lower-triangular factor exactly."""
    I = I.sort().values.to(F64)
    mask = torch.ones(p, dtype=torch.bool)
    mask[I.long()] = False
    K = mask.nonzero().reshape(-1).to(F64)
    c = float(I[-1]) + 1
    KA, nB = K[K < c], float((K >= c).sum())
    nI, nK, nKA = I.numel(), K.numel(), KA.numel()
    lower_stair = lambda r: float((2 * (r + 1) * torch.arange(r.numel(), 0, -1, dtype=F64)).sum())  # noqa: E731
    # S_KI: sum_i sum_k 2 (min(k, i) + 1)
    csum = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(K + 1, 0)])
    pos = torch.searchsorted(K, I)
    s_ki = float((2 * (csum[pos] + (nK - pos) * (I + 1))).sum())
    f = lower_stair(I) + nI**3 / 3 + s_ki + nK * nI**2 + nKA**2 * nI + lower_stair(KA) + nKA**3 / 3
    if nB:
        f += 2 * nB * float((KA + 1).sum()) + 2 * nB * nKA * nI + nB * nKA**2
    return f


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024.0


def dense_bytes_needed(p: int, frac: float, naive: bool) -> float:
    """L, the result, and slack for chunks and allocator fragmentation (the p = 20,000 run reached 8.7 GB RSS);
    the naive reference adds S and its K x K copies."""
    nK = p - int(frac * p)
    base = 8.0 * (p * p + nK * nK) * 1.5
    return base + (8.0 * (p * p + 2 * nK * nK) if naive else 0.0)


def naive_condition(m: torch.Tensor, L: torch.Tensor, I: torch.Tensor, v: torch.Tensor):
    """The textbook version: full covariance, explicit inverse of S_II, Schur complement, Cholesky."""
    mask = torch.ones(m.numel(), dtype=torch.bool)
    mask[I] = False
    K = mask.nonzero().reshape(-1)
    S = L @ L.T
    inv = torch.linalg.inv(S[I][:, I])
    S_KI = S[K][:, I]
    mean = m[K] + S_KI @ (inv @ (v - m[I]))
    cov = S[K][:, K] - S_KI @ inv @ S_KI.T
    return mean, torch.linalg.cholesky(0.5 * (cov + cov.T))


def bench_dense(p: int, frac: float, naive: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    L = torch.randn(p, p, generator=gen, dtype=F64).tril_(-1).mul_(0.2 / p**0.5)
    L.diagonal().add_(1.0)  # well conditioned: singular values of L within about [0.6, 1.4]
    m = torch.randn(p, generator=gen, dtype=F64)
    I = torch.randperm(p, generator=gen)[: int(frac * p)]
    v = torch.randn(I.numel(), generator=gen, dtype=F64)
    g = DenseGaussian(m, L)
    before = matmul_gflops()
    t0 = time.perf_counter()
    out = g.condition(I, v)
    t = time.perf_counter() - t0
    peak = 0.5 * (before + matmul_gflops())  # the machine is shared: the matmul rate right around this run
    fl = dense_flops(p, I)
    row = {"p": p, "fixed": I.numel(), "time_s": t, "gflop": fl / 1e9, "gflops": fl / t / 1e9, "matmul_gflops": peak,
           "ratio_to_matmul": fl / t / 1e9 / peak}
    if naive:
        t0 = time.perf_counter()
        mean, Lk = naive_condition(m, L, I, v)
        row["naive_time_s"] = time.perf_counter() - t0
        row["speedup_vs_naive"] = row["naive_time_s"] / t
        row["max_abs_diff_mean"] = float((mean - out.mean).abs().max())
        row["max_abs_diff_factor"] = float((Lk - out.scale_tril).abs().max())
    return row


def _lowrank_child(p: int, k: int, n_fixed: int, dtype: str) -> None:
    def status(key: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024.0

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    I = torch.randperm(p, generator=gen)[:n_fixed]
    v = torch.zeros(n_fixed, dtype=dt)
    base = status("VmRSS:")
    W = torch.empty(p, k, dtype=dt).normal_(generator=gen).mul_(0.1)  # in place: no creation spike
    d = torch.empty(p, dtype=dt).uniform_(0.5, 1.5, generator=gen)
    m = torch.empty(p, dtype=dt).normal_(generator=gen)
    g = LowRankGaussian(m, W, d)
    g.condition(I[:10], v[:10])  # warm up the kernels
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0, c0 = time.perf_counter(), time.process_time()
    out = g.condition(I, v)
    t, cpu = time.perf_counter() - t0, time.process_time() - c0
    factor = W.numel() * W.element_size()
    print(json.dumps({"p": p, "rank": k, "fixed": n_fixed, "dtype": dtype, "time_s": t, "cpu_s": cpu,
                      "factor_MB": factor / 2**20, "peak_MB": (status("VmHWM:") - base) / 2**20,
                      "peak_over_factor": (status("VmHWM:") - base) / factor, "result_rank": out.rank}))


def bench_lowrank(p: int, k: int, n_fixed: int, dtype: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--lowrank-child", f"{p},{k},{n_fixed},{dtype}"],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="5000,20000", help="dense sizes p (comma-separated)")
    ap.add_argument("--frac", type=float, default=0.1, help="fraction of coordinates fixed")
    ap.add_argument("--naive-max", type=int, default=10000, help="run the naive reference only up to this p")
    ap.add_argument("--lowrank-p", type=int, default=1_000_000)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--lowrank-fixed", type=int, default=100_000)
    ap.add_argument("--lowrank-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-lowrank", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.lowrank_child:
        p, k, n, dt = args.lowrank_child.split(",")
        _lowrank_child(int(p), int(k), int(n), dt)
        return
    results: dict = {"threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    peak = matmul_gflops()
    results["matmul_gflops"] = peak
    print(f"float64 matmul (3000^3): {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    results["lowrank"] = []
    for dt in () if args.skip_lowrank else ("float64", "float32"):
        r = bench_lowrank(args.lowrank_p, args.rank, args.lowrank_fixed, dt)
        results["lowrank"].append(r)
        print(f"low-rank p={r['p']:,} rank {r['rank']} fixed {r['fixed']:,} {dt}: {r['time_s']:.3f} s wall, "
              f"{r['cpu_s']:.3f} s CPU over all threads (target < 1 s), peak {r['peak_MB']:.0f} MB = "
              f"{r['peak_over_factor']:.2f}x the factor ({r['factor_MB']:.0f} MB; target < 3x)")
    results["dense"] = []
    for p in (int(s) for s in args.dense.split(",") if s):
        need, avail = dense_bytes_needed(p, args.frac, p <= args.naive_max), mem_available()
        if need > avail:
            print(f"dense p={p:,}: skipped, needs about {need / 2**30:.1f} GiB and {avail / 2**30:.1f} GiB are "
                  "available (a shared machine: running it would get this or another process OOM-killed)", flush=True)
            results["dense"].append({"p": p, "skipped": "memory", "need_GiB": need / 2**30, "avail_GiB": avail / 2**30})
            continue
        r = bench_dense(p, args.frac, p <= args.naive_max)
        results["dense"].append(r)
        line = (f"dense p={p:,} fixed {r['fixed']:,}: {r['time_s']:.2f} s, {r['gflop']:.0f} GFLOP, "
                f"{r['gflops']:.1f} GFLOP/s = {r['ratio_to_matmul']:.2f} of matmul ({r['matmul_gflops']:.1f} GFLOP/s "
                "measured just before and after; target >= 0.5)")
        if "naive_time_s" in r:
            line += (f"; naive explicit inverse {r['naive_time_s']:.2f} s -> speed-up {r['speedup_vs_naive']:.1f}x "
                     f"(max |diff| mean {r['max_abs_diff_mean']:.1e}, factor {r['max_abs_diff_factor']:.1e})")
        else:
            line += f"; naive reference not run above p={args.naive_max}"
        print(line, flush=True)
    results["loadavg_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()[0]:.1f} (2 cores shared: absolute times vary with it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
