"""Is a transformer teacher's posterior predictive calibrated worse than its own MAP point by more than the test
split can resolve?

Re-derives each seed's teacher of a finished ``transformer`` run with the run's own ``config.json``
(:func:`pyro_distill.experiments.transformer.fit_teacher`, the function the runner calls) and first checks that
its NLL and ECE equal the run's ``teacher`` rows (``vi`` and ``teacher_map``) -- so the numbers below describe
the published teachers, not new ones. Then on each seed's test split (the run's own data; nothing here is
chosen, so reading the test split is reporting, not tuning) it compares the posterior predictive (sampled, the
run's ``eval_samples`` and seed, and linearized) with the MAP point:

* ECE with 15 equal-width bins (the number the run reports) and with 15 equal-mass bins
  (``metrics.ece(binning="mass")``), and the mean confidence minus the accuracy (over-confidence in the large);
* the paired bootstrap over the test rows of ``ECE(posterior) - ECE(MAP)`` and of the NLL difference
  (:func:`pyro_distill.metrics.paired_bootstrap`, 95% intervals), per seed and pooled over seeds (every seed's
  test rows together, each scored by its own seed's teacher);
* the estimator's floor: the mean ECE of each predictive against labels drawn from that predictive itself
  (a perfectly calibrated model with the same confidences), the ECE the test split shows with no miscalibration.

``--split validation`` asks the same on held-out VALIDATION data instead (what the quality target of the curvature
issue names): teachers with the run's settings, fitted by the same function on the training rows minus the tuning
and report splits of ``benchmarks/teacher_quality.py --tune validation`` (the tuning split is where
``teacher.temperature`` was chosen), scored on the report rows.

    python benchmarks/teacher_calibration.py --run runs/transformer/20261203-084856 [--split test|validation]
        [--seeds 0,1,2,3,4] [--boot 2000] [--json out.json]

Cost: one teacher fit per seed (the run's MAP budget and KFAC Laplace: 18-31 s each on one thread at load 1-2), then
the bootstraps (about 20 s per seed at 2,000 resamples).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics as st
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pyro_distill import metrics
from pyro_distill.data.subsets import holdout_indices
from pyro_distill.experiments.transformer import _data, fit_teacher
from pyro_distill.predictions import predictive
from pyro_distill.store import atomic_write_text


def _ece_mass(P: torch.Tensor, t: torch.Tensor) -> float:
    return metrics.ece(P, t, binning="mass")


def _floor(P: torch.Tensor, draws: int, seed: int) -> float:
    """Mean equal-width ECE of ``P`` against labels drawn from ``P`` itself (calibrated by construction)."""
    gen = torch.Generator().manual_seed(seed)
    return st.mean(metrics.ece(P, torch.multinomial(P.double(), 1, generator=gen).squeeze(-1))
                   for _ in range(draws))


def _run_rows(run: Path) -> dict[tuple[str, int], dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return {(r["method"], int(r["seed"])): r for r in csv.DictReader(f) if r["setting"] == "teacher"}


def _validation_split(cfg: dict[str, Any], seed: int) -> SimpleNamespace:
    """benchmarks/teacher_quality.py's splits of the seed's training rows: report = 20% (seeded, stratified), and
    of the rest 20% more for tuning (the split ``teacher.temperature`` was chosen on) -- the teacher is fitted on
    what remains and scored on the report rows. The test split is not read."""
    d, _ = _data(cfg, seed)
    fit, report = holdout_indices(len(d.X), seed, d.y)
    X, y = d.X[fit], d.y[fit]
    rows, _tune = holdout_indices(len(X), 1000 + seed, y)
    return SimpleNamespace(X=X[rows], y=y[rows], Xte=d.X[report], yte=d.y[report])


def _predictives(cfg: dict[str, Any], seed: int, split: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    net, q, hist, d = fit_teacher(cfg, seed, data=_validation_split(cfg, seed) if split == "validation" else None)
    S = cfg["eval_samples"]
    return {"y": d.yte, "map": predictive(net, hist.map_weights, d.Xte),
            "mc": metrics.predict(net, q, d.Xte, num_samples=S, seed=seed),
            "linearized": metrics.predict(net, q, d.Xte, num_samples=S, seed=seed, method="linearized"),
            "fit_s": time.perf_counter() - t0}


def _check(rows: dict[tuple[str, int], dict[str, str]], seed: int, p: dict[str, Any]) -> float:
    """The largest |difference| between the re-derived teacher's NLL / ECE and the run's rows."""
    y, worst = p["y"], 0.0
    for method, key, P in (("vi", "", p["mc"]), ("vi", "_lin", p["linearized"]), ("teacher_map", "", p["map"])):
        r = rows.get((method, seed))
        if r is None:
            raise SystemExit(f"the run has no teacher row {method!r} for seed {seed}: pass a finished transformer "
                             "run whose teacher has a MAP point (teacher.map_steps > 0)")
        for name, fn in (("nll", metrics.nll), ("ece", metrics.ece)):
            worst = max(worst, abs(fn(P, y) - float(r[name + key])))
    return worst


def _describe(P: torch.Tensor, y: torch.Tensor, floor_draws: int, seed: int) -> dict[str, float]:
    conf = P.double().max(-1).values.mean().item()
    acc = metrics.accuracy(P, y)
    return {"nll": metrics.nll(P, y), "ece": metrics.ece(P, y), "ece_mass": _ece_mass(P, y), "gap": conf - acc,
            "floor": _floor(P, floor_draws, seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished transformer run folder (config.json, "
                    "metrics.csv)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the run's)")
    ap.add_argument("--split", choices=("test", "validation"), default="test",
                    help="test: the run's own teachers on its test splits (checked against its rows); validation: "
                    "teachers with the run's settings fitted without the tuning and report rows of "
                    "benchmarks/teacher_quality.py, scored on the report rows")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--floor-draws", type=int, default=200, help="label draws for the calibrated floor")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |difference| from the run's rows")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PYRO_DISTILL_THREADS") or 1),
                    help="torch threads; the run's workers' count (default $PYRO_DISTILL_THREADS, else 1) "
                    "reproduces its teachers")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here (never overwrites)")
    a = ap.parse_args()
    for name in ("config.json", "metrics.csv"):
        if not (a.run / name).is_file():
            raise SystemExit(f"{a.run / name} is missing: pass the folder of a finished transformer run")
    if a.json is not None and a.json.exists():
        raise SystemExit(f"{a.json} exists: choose a new path (results are never overwritten)")
    cfg = json.loads((a.run / "config.json").read_text())
    if cfg.get("kind") != "transformer":
        raise SystemExit(f"{a.run} is a {cfg.get('kind')!r} run; this benchmark re-derives transformer teachers")
    run_seeds = cfg["seeds"] if isinstance(cfg["seeds"], list) else list(range(int(cfg["seeds"])))
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()] or run_seeds
    notes: list[str] = []
    rows = _run_rows(a.run)
    # the runner's worker thread policy: float sums in another order give another MAP point after 700 steps
    torch.set_num_threads(a.threads)
    out: dict[str, Any] = {"run": str(a.run), "split": a.split, "boot": a.boot, "seeds": {}}
    pooled: dict[str, list[torch.Tensor]] = {"y": [], "map": [], "mc": [], "linearized": []}
    print(f"run {a.run}: teacher {cfg['teacher']}; {a.split} rows per seed, bootstrap {a.boot} resamples\n")
    print("| seed | predictive | NLL | ECE (width) | ECE (mass) | conf - acc | calibrated floor | "
          "ECE - MAP's [95% CI] | P(worse) | NLL - MAP's [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        p = _predictives(cfg, seed, a.split)
        if a.split == "test":
            err = _check(rows, seed, p)
            if err > a.tolerance:
                raise SystemExit(f"seed {seed}: the re-derived teacher differs from the run's rows by {err:.2e} (> "
                                 f"{a.tolerance:g}): the code or the data changed since the run; rerun the "
                                 "experiment")
            notes.append(f"seed {seed}: teacher re-derived in {p['fit_s']:.0f} s, NLL and ECE equal the run's rows "
                         f"to {err:.1e}")
        else:
            notes.append(f"seed {seed}: teacher fitted in {p['fit_s']:.0f} s, scored on {len(p['y'])} report rows")
        for k in pooled:
            pooled[k].append(p[k])
        out["seeds"][seed] = _table(seed, p, a.boot, a.floor_draws, f"{seed}")
    cat = {k: torch.cat(v) for k, v in pooled.items()}
    out["pooled"] = _table(0, cat, a.boot, a.floor_draws, f"pooled ({len(cat['y'])} rows)")
    print("\n" + "\n".join(notes))
    if a.json is not None:
        atomic_write_text(a.json, json.dumps(out, indent=1))
        print(f"\nwrote {a.json}")


def _table(seed: int, p: dict[str, Any], boot: int, floor_draws: int, label: str) -> dict[str, Any]:
    """Print one seed's (or the pooled) rows of the table and return their numbers."""
    y, res = p["y"], {}
    for name in ("map", "mc", "linearized"):
        d = _describe(p[name], y, floor_draws, seed)
        if name != "map":
            d["ece_diff"] = metrics.paired_bootstrap(metrics.ece, p[name], p["map"], y, n_boot=boot, seed=seed)
            d["ece_mass_diff"] = metrics.paired_bootstrap(_ece_mass, p[name], p["map"], y, n_boot=boot, seed=seed)
            d["nll_diff"] = metrics.paired_bootstrap(metrics.nll, p[name], p["map"], y, n_boot=boot, seed=seed)
        res[name] = d
        e, n = d.get("ece_diff"), d.get("nll_diff")
        diff = "" if e is None else f"{e['diff']:+.4f} [{e['lo']:+.4f}, {e['hi']:+.4f}] | {e['p_greater']:.2f}"
        nd = "" if n is None else f"{n['diff']:+.4f} [{n['lo']:+.4f}, {n['hi']:+.4f}]"
        print(f"| {label} | {name} | {d['nll']:.4f} | {d['ece']:.4f} | {d['ece_mass']:.4f} | {d['gap']:+.4f} | "
              f"{d['floor']:.4f} | {diff or ' | '} | {nd} |")
    return res


if __name__ == "__main__":
    main()
