"""Laplace and curvature at scale: the low-rank Laplace of a p = 55k MLP and the RNN's exact GGN diagonal.

* ``lowrank``: ``laplace(kind=...)`` for ``lowrank_precision``, ``lowrank`` (rank ``--rank``), ``kron`` and ``diag``
  on MLP [784,64,64,10] (p = 55,050) at weights drawn from the fan-in prior, ``--n`` random inputs (10,000);
* ``rnn``: the exact GGN diagonal of the dates teacher of ``experiments/rnn_attention.toml`` (p = 15,598) on
  ``--rnn-n`` training sequences (4,000), time per sequence.

* ``rnn_evidence``: the attention-free dates student of the same config (p = 14,558): time per sequence of its
  exact GGN diagonal vs the sampled one (``GGN.diagonal("sampled", samples)``, the sampled-label Fisher), and the
  temperature ``tau`` that ``evidence_temperature`` chooses with each (``curvature="exact"`` / ``"sampled"``) on
  ``--tau-n`` sequences (300), under the conditioned prior of a quickly fitted teacher (MAP + low-rank SVI, the
  config's ``[quick]`` budgets).

  Measured 2026-12-02 (2 shared cores, load 9-10, nice 19, one thread; ``--only rnn_evidence --tau-n 200``): exact
  diagonal 251 ms per sequence (143 backward passes; N = 50), sampled 1.5 ms (1 draw, relative error 0.28 on 50
  sequences) and 5.7 ms (4 draws, 0.16); tau by evidence on 200 sequences, same MAP point (seed 0): exact 47.30
  (217 s), sampled 48.56 (1 draw) and 47.20 (4 draws), 6 s each including the 100 MAP steps.

One torch thread; the load average is printed with every line.

    python benchmarks/laplace_scale.py [--quick] [--only lowrank rnn rnn_evidence]
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


def rnn_evidence(n_time: int, n_tau: int, samples: list[int], teacher_steps: tuple[int, int]) -> None:
    from pyro_distill.distill import evidence_temperature
    from pyro_distill.inference import fit_posterior
    from pyro_distill.surgery.rnn import RemoveAttention

    task = sequence_task("dates", seed=0, n_train=max(n_time, n_tau, 10), n_val=10, n_test=10)
    teacher = AttentionRNN(**task.net_kwargs(), emb=16, hidden=32, attn=16)
    op = RemoveAttention("w")
    student = op.architecture(teacher)
    w = student.init_weights(torch.Generator().manual_seed(0))
    X, y = task.X[:n_time], task.y[:n_time]
    G = GGN(student, w, X, y)
    t = time.perf_counter()
    ex = G.diagonal()
    dt = time.perf_counter() - t
    print(f"AttentionRNN dates student (p = {student.num_params}), N = {n_time}: exact GGN diagonal "
          f"{1000 * dt / n_time:.1f} ms per sequence ({G.backward_passes()} backward passes)  {_load()}", flush=True)
    for k in samples:
        t = time.perf_counter()
        sd = G.diagonal("sampled", samples=k, seed=0)
        ds = time.perf_counter() - t
        rel = float((sd - ex).norm() / ex.norm())
        print(f"  sampled, {k} draw(s): {1000 * ds / n_time:.1f} ms per sequence ({dt / ds:.0f}x faster), "
              f"relative error ||d - d_exact|| / ||d_exact|| = {rel:.3f}  {_load()}", flush=True)
    # tau by evidence with both diagonals, under the conditioned prior of a quick teacher
    Xt, yt = task.X[:n_tau], task.y[:n_tau]
    t = time.perf_counter()
    q_t, _ = fit_posterior(teacher, Xt, yt, guide="lowrank", steps=teacher_steps[1], lr=1e-3, factor_lr=1e-4,
                           map_steps=teacher_steps[0], map_lr=1e-2, num_particles=1, batch_size=64,
                           init=teacher.init_weights(torch.Generator().manual_seed(10_000)), cov_init="prior",
                           rank=10, seed=0, progress=False)
    _, prior = op.apply(teacher, q_t)
    prior.layout = student.layout
    print(f"  teacher on N = {n_tau} ({teacher_steps[0]} MAP + {teacher_steps[1]} SVI steps): "
          f"{time.perf_counter() - t:.0f} s  {_load()}", flush=True)
    runs = [("exact", 1, 0)] + [("sampled", k, s) for k in samples for s in (0, 1)]
    for curv, k, seed in runs:
        t = time.perf_counter()
        tau, info = evidence_temperature(student, prior, Xt, yt, map_steps=100, map_lr=1e-2, batch_size=64,
                                         seed=seed, curvature=curv, samples=k)
        label = "exact" if curv == "exact" else f"sampled ({k} draw(s), seed {seed})"
        print(f"  tau by evidence, {label}: tau = {tau:.2f}, log evidence {info['log_evidence']:.1f} "
              f"(tau=1: {info['log_evidence_tau1']:.1f}), at bound {info['at_bound']}, "
              f"{time.perf_counter() - t:.0f} s  {_load()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["lowrank", "rnn", "rnn_evidence"],
                    choices=["lowrank", "rnn", "rnn_evidence"])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--rnn-n", type=int, default=4_000)
    ap.add_argument("--tau-n", type=int, default=300, help="sequences for the tau-by-evidence comparison")
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4], help="label draws of the sampled diagonal")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if "lowrank" in a.only:
        lowrank(500, 5, [64, 16, 10]) if a.quick else lowrank(a.n, a.rank, [784, 64, 64, 10])
    if "rnn" in a.only:
        rnn(20 if a.quick else a.rnn_n)
    if "rnn_evidence" in a.only:
        if a.quick:
            rnn_evidence(10, 20, a.samples, (20, 5))
        else:
            rnn_evidence(50, a.tau_n, a.samples, (300, 100))


if __name__ == "__main__":
    main()
