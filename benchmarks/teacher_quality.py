"""Do the transformer and RNN teachers' Gaussian posteriors predict as well as their own MAP point?

For each teacher of ``experiments/transformer.toml`` (digits as sequences) and ``experiments/rnn_attention.toml``
(the dates task), with the experiment's own settings (architecture, MAP budget, batch size, low-rank structure and
rank): MAP, then the Laplace start in the experiment's structure (low-rank + diagonal from real curvature, see
:func:`pyro_distill.inference.laplace`) and the old start (the prior shrunk by 0.1, ``cov_init="prior"``), each
refined by the experiment's SVI budget. Reported on VALIDATION data (the transformer: 20% carved from its training
split, seeded and stratified; the RNN: the task's own validation split) -- the test splits are never read:
NLL and ECE of the MAP point, and of the sampled and the linearized predictive of each Gaussian.

``--tune validation`` chooses the posterior's scale on held-out data (``evidence.tune_posterior_scale``):
a TUNING split (20%, seeded, stratified for the transformer) is carved out of the fitting data before MAP, so the
data are train / tune / report (the report split stays the validation split above, never used for a choice), and
for each Laplace structure the temperature ``T`` of the covariance (and with ``--tune-param both`` also the global
prior precision ``alpha``, ``Lam = G + alpha P0``, for the structures that rebuild cheaply) minimizing the tuning
NLL of the linearized predictive (a separate ``T`` for the sampled one) is reported on the report split.

``--svi-start`` (with ``--tune validation``): the SVI refinement starts from the tuned Laplace (``tuned``, what a
runner does with ``teacher.start_temperature`` set to the tuned T) or from the Laplace at T = 1 (``laplace``).

    python benchmarks/teacher_quality.py [--families transformer,rnn] [--seeds 1] [--first-seed 0] [--quick]
    python benchmarks/teacher_quality.py --families rnn --structures lowrank --tune validation --prior-variance 10 \
        --curvature-rows 500 --tune-methods linearized --svi-start tuned --seeds 3
    python benchmarks/teacher_quality.py --families transformer --structures lowrank,dense --tune validation --no-svi
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from pyro_distill import metrics
from pyro_distill.curvature import subsampled_ggn
from pyro_distill.data.subsets import holdout_indices
from pyro_distill.evidence import optimize_prior, tune_posterior_scale
from pyro_distill.experiments import core
from pyro_distill.inference import fit_map, fit_posterior, laplace_family
from pyro_distill.nets import AttentionRNN, Transformer
from pyro_distill.predictions import predictive

ROOT = Path(__file__).resolve().parents[1]


def _seq_metrics(probs: torch.Tensor, y: torch.Tensor, pad: int) -> dict[str, float]:
    """Token-level NLL and ECE over the non-padding target positions."""
    m = y != pad
    P, t = probs[m], y[m]
    return _scores(P, t)


def _scores(P: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """NLL, ECE, accuracy and the mean confidence minus accuracy (> 0 over-confident: the sign says whether
    averaging over weights, which softens, can lower the NLL)."""
    acc = metrics.accuracy(P, t)
    return {"nll": metrics.nll(P, t), "ece": metrics.ece(P, t), "accuracy": acc,
            "gap": float(P.max(-1).values.mean()) - acc}


def _report(name: str, rows: list[tuple[str, dict[str, float], float]]) -> None:
    print(f"\n{name}  (load {os.getloadavg()[0]:.2f})")
    print("| posterior | predictive | val NLL | val ECE | val accuracy | confidence - accuracy | fit time (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, r, t in rows:
        kind, pred = label.split(":")
        print(f"| {kind} | {pred} | {r['nll']:.4f} | {r['ece']:.4f} | {r['accuracy']:.4f} | {r['gap']:+.4f} | "
              f"{t:.1f} |")


#: the predictives scored for each Gaussian (``--eval-methods``)
_EVAL_METHODS = ["mc", "linearized"]


class _Rows(list):
    """The table's rows, each also printed as it comes (a run cut short by a time limit keeps its numbers)."""

    def append(self, row) -> None:
        label, r, t = row
        print(f"  row | {label} | NLL {r['nll']:.4f} | ECE {r['ece']:.4f} | acc {r['accuracy']:.4f} | "
              f"conf-acc {r.get('gap', float('nan')):+.4f} | {t:.1f}s", flush=True)
        super().append(row)

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self


def _evaluate(score, net, q, X, samples: int, seed: int) -> dict[str, dict[str, float]]:
    return {m: score(predictive(net, q, X, method=m, num_samples=samples, seed=seed, chunk=10))
            for m in _EVAL_METHODS}


#: structures whose Laplace Gaussian rebuilds per prior precision without new curvature (laplace_family)
_CHEAP_ALPHA = ("dense", "diag", "lowrank_precision", "kron")


def _tune_split(n: int, seed: int, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, tuning rows): 20% of the fitting data, seeded (stratified by ``labels`` when given)."""
    return holdout_indices(n, 1000 + seed, labels)


def _family(name: str, quick: bool, seed: int, structures: list[str], svi: bool,
            scales: list[float] = (), tune: str = "none", tune_param: str = "temperature",
            curvature_rows: int = 0, tune_methods: tuple[str, ...] = ("linearized", "mc"),
            prior_variance: float = 1.0, svi_start: str = "tuned") -> None:
    if name == "transformer":
        cfg = core.load_config(ROOT / "experiments" / "transformer.toml", quick=quick)
        from pyro_distill.experiments.transformer import _data

        d, shape = _data(cfg, seed)
        fit, val = holdout_indices(d.X.shape[0], seed, d.y)
        X, y, Xv, yv = d.X[fit], d.y[fit], d.X[val], d.y[val]
        net = Transformer(**shape, **cfg["net"])
        tc = cfg["teacher"]
        map_kw = {"steps": tc["map_steps"], "lr": tc["map_lr"], "batch_size": cfg["batch_size"]}
        # the experiment's teacher has no SVI now (a tuned KFAC Laplace): the refinement rows keep its former 300 steps
        svi_kw = {"steps": tc["steps"] or 300, "lr": tc["lr"], "batch_size": cfg["batch_size"],
                  "num_particles": cfg["num_particles"]}
        rank, samples = cfg["rank"], cfg["eval_samples"]

        def score(P):
            return _scores(P, yv)
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
    if tune == "validation":
        fit_rows, tune_rows = _tune_split(len(X), seed, y if name == "transformer" else None)
        X, y, Xt, yt = X[fit_rows], y[fit_rows], X[tune_rows], y[tune_rows]
        print(f"tuning split: {len(Xt)} rows carved from the fitting data (not used by MAP or the curvature)")
    print(f"{name}: {net!r}, N = {len(X)} (fit) / {len(Xv)} (validation), seed {seed}; prior: fan-in, variance "
          f"x {prior_variance:g}")
    rows = _Rows()
    t0 = time.perf_counter()
    fan_in = net.default_prior(torch.float32).tempered(prior_variance)
    w, _ = fit_map(net, X, y, fan_in, seed=seed, **map_kw)
    t_map = time.perf_counter() - t0
    rows.append(("MAP:point", score(predictive(net, w, Xv)), t_map))
    fan_in = fan_in.to(dtype=w.dtype)
    priors = [("fan-in", fan_in)]
    if tune == "none":
        t0 = time.perf_counter()
        tuned, info = optimize_prior(net, X, y, w, structure="diag")
        t_ev = time.perf_counter() - t0
        print(f"evidence-tuned prior precisions (per layer, diagonal GGN): log evidence "
              f"{info['log_evidence_start']:.1f} -> {info['log_evidence']:.1f} in {t_ev:.1f}s")
        priors.append(("evidence", tuned))
    ggn_op = None
    if 0 < curvature_rows < len(X):
        ggn_op = subsampled_ggn(net, w, X, y, rows=curvature_rows, seed=2000 + seed)
        print(f"curvature from {curvature_rows} of the {len(X)} fitting rows, scaled by {len(X) / curvature_rows:.2f}")
    starts = {}
    for kind in structures:
        for pname, prior in priors:
            t0 = time.perf_counter()
            family = laplace_family(net, X, w, prior, kind=kind, rank=rank, seed=seed, y=y, ggn_op=ggn_op)
            q_lap = family(1.0)  # equals laplace(net, X, w, prior, kind=kind, ...)
            t_lap = time.perf_counter() - t0
            starts[kind, pname] = q_lap
            label = f"Laplace {kind}" + (f" (rank {rank})" if kind == "lowrank" else "")
            for m, r in _evaluate(score, net, q_lap, Xv, samples, seed).items():
                rows.append((f"{label}, {pname} prior:{m}", r, t_lap))
            for c in scales if pname == "fan-in" else ():  # the covariance scaled by c (a "cold" posterior)
                P = predictive(net, q_lap.tempered(c), Xv, method="linearized", num_samples=samples, seed=seed)
                rows.append((f"{label} x {c:g}, {pname} prior:linearized", score(P), t_lap))
            if tune == "validation":
                rows += _tuned_rows(net, family, q_lap, kind, label, Xt, yt, Xv, score, samples, seed, tune_param,
                                    starts, tune_methods)
    if not svi:
        _report(name, rows)
        return
    if tune == "validation":
        svi_structures = [k for k in ("lowrank", "kron") if (k, "tuned") in starts]
        if not svi_structures:
            raise SystemExit("the SVI refinement after tuning starts from a tuned lowrank or kron Laplace: include "
                             "one of them in --structures, or pass --no-svi")
        for kind in svi_structures:  # the SVI refinement in the same structure, from the (tuned) Laplace start
            q0, T0 = starts[kind, "tuned"] if svi_start == "tuned" else (starts[kind, "fan-in"], 1.0)
            t0 = time.perf_counter()
            q, _ = fit_posterior(net, X, y, guide=kind, init=q0, prior=fan_in, rank=rank, seed=seed, **svi_kw)
            dt = time.perf_counter() - t0
            for m, r in _evaluate(score, net, q, Xv, samples, seed).items():
                rows.append((f"SVI from the {svi_start} {kind} start (T = {T0:.3g}), fan-in prior:{m}", r, dt))
            qT, info = tune_posterior_scale(net, q, Xt, yt, num_samples=samples, seed=seed)
            print(f"{kind} SVI result: linearized T = {info['temperature']:.4g} (tuning NLL {info['nll_start']:.4f} "
                  f"at T = 1 -> {info['nll']:.4f}, MAP {info['nll_map']:.4f}; at bound: {info['at_bound']})")
            r = score(predictive(net, qT, Xv, method="linearized", num_samples=samples, seed=seed, chunk=10))
            rows.append((f"{kind} SVI result x T = {info['temperature']:.3g} (tuned again):linearized", r, dt))
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


def _tuned_rows(net, family, q_lap, kind, label, Xt, yt, Xv, score, samples, seed, tune_param, starts,
                tune_methods=("linearized", "mc")):
    """Rows of the scale tuned on (Xt, yt) and scored on Xv: T for the linearized predictive, T for the sampled
    one, and with ``tune_param="both"`` (alpha, T) for the structures that rebuild cheaply."""
    rows = []
    for method in tune_methods:
        t0 = time.perf_counter()
        q, info = tune_posterior_scale(net, q_lap, Xt, yt, method=method, num_samples=samples, seed=seed,
                                       temperature_steps=60 if method == "linearized" else 20)
        dt = time.perf_counter() - t0
        print(f"{label}: {method} T = {info['temperature']:.4g} (tuning NLL {info['nll_start']:.4f} at T = 1 -> "
              f"{info['nll']:.4f}, MAP {info['nll_map']:.4f}; at bound: {info['at_bound']}) in {dt:.1f}s")
        if method == "linearized":
            starts[kind, "tuned"] = (q, info["temperature"])
        P = predictive(net, q, Xv, method=method, num_samples=samples, seed=seed, chunk=10)
        rows.append((f"{label} x T = {info['temperature']:.3g} (tuned for {method}):{method}", score(P), dt))
    if tune_param == "both" and kind in _CHEAP_ALPHA:
        t0 = time.perf_counter()
        q, info = tune_posterior_scale(net, family, Xt, yt, param="both", alpha_bounds=(1e-2, 1e6), alpha_grid=9,
                                       alpha_steps=6, num_samples=samples, seed=seed)
        dt = time.perf_counter() - t0
        grid = ", ".join(f"{a:.3g}: {v:.4f} (T {t:.3g})" for a, v, t in zip(info["grid"], info["nll_grid"],
                                                                           info["temperature_grid"]))
        print(f"{label}: alpha = {info['prior_precision']:.4g}, T = {info['temperature']:.4g} (tuning NLL "
              f"{info['nll']:.4f}) in {dt:.1f}s; grid alpha: NLL (T) {grid}")
        for m, r in _evaluate(score, net, q, Xv, samples, seed).items():
            rows.append((f"{label} alpha = {info['prior_precision']:.3g}, T = {info['temperature']:.3g} (tuned):{m}",
                         r, dt))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="transformer,rnn")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--quick", action="store_true", help="the experiments' [quick] budgets")
    ap.add_argument("--structures", default="lowrank", help="Laplace structures, e.g. lowrank,dense,diag,kron "
                    "(kron: KFAC over the transformer's linear maps)")
    ap.add_argument("--no-svi", action="store_true", help="skip the low-rank SVI refinements")
    ap.add_argument("--cov-scales", default="", help="also score each fan-in Laplace with its covariance x c, "
                    "e.g. 0.3,0.1,0.03")
    ap.add_argument("--tune", choices=("none", "validation"), default="none",
                    help="choose the posterior's scale on a tuning split carved from the fitting data")
    ap.add_argument("--tune-param", choices=("temperature", "both"), default="temperature",
                    help="with --tune validation: T only, or also the global prior precision alpha")
    ap.add_argument("--curvature-rows", type=int, default=0,
                    help="GGN from this many random fitting rows, scaled to the full sum (0: all; for the RNN)")
    ap.add_argument("--tune-methods", default="linearized,mc",
                    help="with --tune validation: the predictives whose temperature is tuned (linearized first)")
    ap.add_argument("--eval-methods", default="mc,linearized", help="predictives scored for each Gaussian")
    ap.add_argument("--prior-variance", type=float, default=1.0,
                    help="the fan-in prior's variance times this for MAP, Laplace and SVI (the 'fan-in' rows)")
    ap.add_argument("--svi-start", choices=("tuned", "laplace"), default="tuned",
                    help="with --tune validation: SVI from the tuned Laplace, or from the Laplace at T = 1 (what a "
                         "runner's teacher.cov_init = 'laplace' does)")
    a = ap.parse_args()
    _EVAL_METHODS[:] = a.eval_methods.split(",")
    torch.set_num_threads(1)
    print(f"load {os.getloadavg()[0]:.2f} at start, one torch thread")
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        for fam in a.families.split(","):
            scales = [float(c) for c in a.cov_scales.split(",") if c]
            _family(fam.strip(), a.quick, seed, a.structures.split(","), not a.no_svi, scales, a.tune, a.tune_param,
                    a.curvature_rows, tuple(a.tune_methods.split(",")), a.prior_variance, a.svi_start)


if __name__ == "__main__":
    main()
