"""Laplace and curvature at scale: the low-rank Laplace of a p = 55k MLP and the RNN's exact GGN diagonal.

* ``lowrank``: ``laplace(kind=...)`` for ``lowrank_precision``, ``lowrank`` (rank ``--rank``), ``kron`` and ``diag``
  on MLP [784,64,64,10] (p = 55,050) at weights drawn from the fan-in prior, ``--n`` random inputs (10,000);
* ``rnn``: the exact GGN diagonal of the dates teacher of ``experiments/rnn_attention.toml`` (p = 15,598) on
  ``--rnn-n`` training sequences (4,000), time per sequence.

One torch thread; the load average is printed with every line.

    python benchmarks/laplace_scale.py [--quick] [--only lowrank rnn]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pyro_distill.curvature import GGN
from pyro_distill.data.sequences import sequence_task
from pyro_distill.inference import laplace
from pyro_distill.nets import MLP, AttentionRNN


def _load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def lowrank(n: int, rank: int, sizes: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    net = MLP(sizes)
    X = torch.randn(n, sizes[0], generator=g)
    w = net.init_weights(g)
    prior = net.default_prior()
    print(f"MLP {sizes} (p = {net.num_params}), N = {n}, {_load()}", flush=True)
    for kind in ("lowrank_precision", "lowrank", "kron", "diag"):
        t = time.perf_counter()
        q = laplace(net, X, w, prior, kind=kind, rank=rank)
        extra = {k: v for k, v in q.meta.items() if k in ("rank", "lanczos_iterations")}
        print(f"  laplace(kind={kind!r}): {time.perf_counter() - t:.1f} s {extra}  {_load()}", flush=True)


def rnn(n: int) -> None:
    task = sequence_task("dates", seed=0, n_train=max(n, 10), n_val=10, n_test=10)
    net = AttentionRNN(**task.net_kwargs(), emb=16, hidden=32, attn=16)
    w = net.init_weights(torch.Generator().manual_seed(0))
    op = GGN(net, w, task.X[:n], task.y[:n])
    t = time.perf_counter()
    op.diagonal()
    dt = time.perf_counter() - t
    print(f"AttentionRNN dates (p = {net.num_params}), N = {n}: exact GGN diagonal {dt:.1f} s "
          f"({1000 * dt / n:.1f} ms per sequence)  {_load()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["lowrank", "rnn"], choices=["lowrank", "rnn"])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--rnn-n", type=int, default=4_000)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if "lowrank" in a.only:
        lowrank(500, 5, [64, 16, 10]) if a.quick else lowrank(a.n, a.rank, [784, 64, 64, 10])
    if "rnn" in a.only:
        rnn(20 if a.quick else a.rnn_n)


if __name__ == "__main__":
    main()
