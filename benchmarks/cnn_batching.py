"""How to batch a CNN over posterior draws: grouped convolution (``CNN.forward`` with ``w`` ``[S, p]``) against
``torch.func.vmap`` of the single-draw forward.

Digits (1,437 training images of 8x8, the real data), CNN channels [6, 16], kernel 3, padding 1, max-pool 2,
dense [32, 10] (p = 2,064), S = 50 draws, float32. Timed: the forward alone, and forward + backward of the
summed log-likelihood (one SVI step's network cost). Interleaved rounds (both methods each round), the
median per method and the median of the per-round ratios, because the CPU is shared. Both must agree.

    python benchmarks/cnn_batching.py            # 5 rounds (about 80 s on one free thread)
    python benchmarks/cnn_batching.py --quick    # 3 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.func import vmap

from pyro_distill.data import digits
from pyro_distill.nets import CNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = digits(seed=0)
    X, y = ds.X, ds.y
    net = CNN((8, 8), channels=[6, 16], dense=[32, 10])
    W = net.prior_scales().float() * torch.randn(args.draws, net.num_params, generator=torch.Generator().manual_seed(0))

    def grouped(w):
        return net.forward(w, X)

    def vmapped(w):
        return vmap(lambda w1: net.forward(w1, X))(w)

    def backward(fn):
        def run(w):
            w = w.detach().requires_grad_(True)
            ll = net.output_dist(fn(w)).log_prob(y).sum()
            (g,) = torch.autograd.grad(ll, w)
            return g
        return run

    a, b = grouped(W), vmapped(W)
    err = float((a - b).abs().max())
    assert err < 1e-4, f"grouped and vmap forward disagree by {err}"
    ga, gb = backward(grouped)(W), backward(vmapped)(W)
    assert torch.allclose(ga, gb, atol=1e-3, rtol=1e-3), "gradients disagree"
    rounds = 3 if args.quick else 5
    results: dict[str, dict[str, list[float]]] = {}
    tasks = {"forward": (grouped, vmapped), "forward+backward": (backward(grouped), backward(vmapped))}
    for task, fns in tasks.items():
        times: dict[str, list[float]] = {"grouped": [], "vmap": []}
        for r in range(rounds):
            order = [("grouped", fns[0]), ("vmap", fns[1])][:: 1 if r % 2 == 0 else -1]
            for name, fn in order:
                t0 = time.perf_counter()
                fn(W)
                times[name].append(time.perf_counter() - t0)
        results[task] = times
        ratio = statistics.median(v / g for g, v in zip(times["grouped"], times["vmap"]))
        print(f"{task:17s} S={args.draws} N={X.shape[0]}: grouped {1e3 * statistics.median(times['grouped']):7.1f} ms,"
              f" vmap {1e3 * statistics.median(times['vmap']):7.1f} ms, vmap/grouped = {ratio:.2f} "
              f"({rounds} rounds, {args.threads} thread(s), max |diff| {err:.1e})")
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
