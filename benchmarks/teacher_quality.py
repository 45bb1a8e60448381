"""Do the transformer and RNN teachers' Gaussian posteriors predict as well as their own MAP point?

For each teacher of ``experiments/transformer.toml`` (digits as sequences) and ``experiments/rnn_attention.toml``
(the dates task), with the experiment's own settings (architecture, MAP budget, batch size, low-rank structure and
rank): MAP, then the Laplace start in the experiment's structure (low-rank + diagonal from real curvature, see
:func:`pyro_distill.inference.laplace`) and the old start (the prior shrunk by 0.1, ``cov_init="prior"``), each
refined by the experiment's SVI budget. Reported on VALIDATION data (the transformer: 20% carved from its training
split, seeded and stratified; the RNN: the task's own validation split) -- the test splits are never read:
NLL and ECE of the MAP point, and of the sampled and the linearized predictive of each Gaussian.

    python benchmarks/teacher_quality.py [--families transformer,rnn] [--seeds 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split

from pyro_distill import metrics
from pyro_distill.evidence import optimize_prior
from pyro_distill.experiments import core
from pyro_distill.inference import fit_map, fit_posterior, laplace
from pyro_distill.nets import AttentionRNN, Transformer
from pyro_distill.predictions import predictive

ROOT = Path(__file__).resolve().parents[1]


def _seq_metrics(probs: torch.Tensor, y: torch.Tensor, pad: int) -> dict[str, float]:
    """Token-level NLL and ECE over the non-padding target positions."""
    m = y != pad
    P, t = probs[m], y[m]
    return {"nll": metrics.nll(P, t), "ece": metrics.ece(P, t), "accuracy": metrics.accuracy(P, t)}


def _report(name: str, rows: list[tuple[str, dict[str, float], float]]) -> None:
    print(f"\n{name}  (load {os.getloadavg()[0]:.2f})")
    print("| posterior | predictive | val NLL | val ECE | val accuracy | fit time (s) |")
    print("|---|---|---|---|---|---|")
    for label, r, t in rows:
        kind, pred = label.split(":")
        print(f"| {kind} | {pred} | {r['nll']:.4f} | {r['ece']:.4f} | {r['accuracy']:.4f} | {t:.1f} |")


def _evaluate(score, net, q, X, samples: int, seed: int) -> dict[str, dict[str, float]]:
    return {m: score(predictive(net, q, X, method=m, num_samples=samples, seed=seed, chunk=10))
            for m in ("mc", "linearized")}


def _family(name: str, quick: bool, seed: int, structures: list[str], svi: bool,
            scales: list[float] = ()) -> None:
    if name == "transformer":
        cfg = core.load_config(ROOT / "experiments" / "transformer.toml", quick=quick)
        from pyro_distill.experiments.transformer import _data

        d, shape = _data(cfg, seed)
        idx = torch.arange(d.X.shape[0]).numpy()
        fit, val = train_test_split(idx, test_size=0.2, random_state=seed, stratify=d.y.numpy())
        X, y, Xv, yv = d.X[fit], d.y[fit], d.X[val], d.y[val]
        net = Transformer(**shape, **cfg["net"])
        tc = cfg["teacher"]
        map_kw = {"steps": tc["map_steps"], "lr": tc["map_lr"], "batch_size": cfg["batch_size"]}
        svi_kw = {"steps": tc["steps"], "lr": tc["lr"], "batch_size": cfg["batch_size"],
                  "num_particles": cfg["num_particles"]}
        rank, samples = cfg["rank"], cfg["eval_samples"]

        def score(P):
            return {"nll": metrics.nll(P, yv), "ece": metrics.ece(P, yv), "accuracy": metrics.accuracy(P, yv)}
    else:
        cfg = core.load_config(ROOT / "experiments" / "rnn_attention.toml", quick=quick)
        from pyro_distill.data.sequences import sequence_task

        task = sequence_task("dates", seed=0, **cfg["data"])
        X, y, Xv, yv = task.X, task.y, task.Xval, task.yval
        net = AttentionRNN(**task.net_kwargs(), **cfg["net"])
        T = cfg["teacher"]
        map_kw = {"steps": T["map_steps"], "lr": T["map_lr"], "batch_size": int(cfg["batch_size"])}
        svi_kw = {"steps": T["steps"], "lr": T["lr"], "factor_lr": T["factor_lr"],
                  "batch_size": int(cfg["batch_size"]), "num_particles": T["num_particles"]}
        rank, samples = T["rank"], 16
        pad = net.pad

        def score(P):
            return _seq_metrics(P, yv, pad)
    print(f"{name}: {net!r}, N = {len(X)} (fit) / {len(Xv)} (validation), seed {seed}")
    rows = []
    t0 = time.perf_counter()
    w, _ = fit_map(net, X, y, seed=seed, **map_kw)
    t_map = time.perf_counter() - t0
    rows.append(("MAP:point", score(predictive(net, w, Xv)), t_map))
    fan_in = net.default_prior(w.dtype)
    t0 = time.perf_counter()
    tuned, info = optimize_prior(net, X, y, w, structure="diag")
    t_ev = time.perf_counter() - t0
    print(f"evidence-tuned prior precisions (per layer, diagonal GGN): log evidence {info['log_evidence_start']:.1f}"
          f" -> {info['log_evidence']:.1f} in {t_ev:.1f}s")
    starts = {}
    for kind in structures:
        for pname, prior in (("fan-in", fan_in), ("evidence", tuned)):
            t0 = time.perf_counter()
            q_lap = laplace(net, X, w, prior, kind=kind, rank=rank, seed=seed, y=y)
            t_lap = time.perf_counter() - t0
            starts[kind, pname] = q_lap
            label = f"Laplace {kind}" + (f" (rank {rank})" if kind == "lowrank" else "")
            for m, r in _evaluate(score, net, q_lap, Xv, samples, seed).items():
                rows.append((f"{label}, {pname} prior:{m}", r, t_lap))
            for c in scales if pname == "fan-in" else ():  # the covariance scaled by c (a "cold" posterior)
                P = predictive(net, q_lap.tempered(c), Xv, method="linearized", num_samples=samples, seed=seed)
                rows.append((f"{label} x {c:g}, {pname} prior:linearized", score(P), t_lap))
    if not svi:
        _report(name, rows)
        return
    for cov_init, start in (("laplace (evidence prior)", starts["lowrank", "evidence"]), ("prior", None)):
        t0 = time.perf_counter()
        if start is not None:
            q, _ = fit_posterior(net, X, y, guide="lowrank", init=start, prior=tuned, rank=rank, seed=seed, **svi_kw)
        else:
            q, _ = fit_posterior(net, X, y, guide="lowrank", init=w, map_steps=0, cov_init="prior", rank=rank,
                                 seed=seed, **svi_kw)
        dt = time.perf_counter() - t0
        for m, r in _evaluate(score, net, q, Xv, samples, seed).items():
            rows.append((f"SVI from {cov_init} start:{m}", r, dt))
    _report(name, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="transformer,rnn")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the experiments' [quick] budgets")
    ap.add_argument("--structures", default="lowrank", help="Laplace structures, e.g. lowrank,dense,diag")
    ap.add_argument("--no-svi", action="store_true", help="skip the low-rank SVI refinements")
    ap.add_argument("--cov-scales", default="", help="also score each fan-in Laplace with its covariance x c, "
                    "e.g. 0.3,0.1,0.03")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load {os.getloadavg()[0]:.2f} at start, one torch thread")
    for seed in range(a.seeds):
        for fam in a.families.split(","):
            scales = [float(c) for c in a.cov_scales.split(",") if c]
            _family(fam.strip(), a.quick, seed, a.structures.split(","), not a.no_svi, scales)


if __name__ == "__main__":
    main()
