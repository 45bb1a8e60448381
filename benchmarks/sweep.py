"""The digits sweep on the local engine vs Ray on the same cores: wall time, scheduling overhead per task, and what
a 5-seed full sweep costs in tasks and CPU-hours (issue 17), so a user can size a cluster.

``python benchmarks/sweep.py [--quick] [--seeds N] [--workers 2] [--noop 200] [--from-run RUN_DIR]``

1. Start-up and scheduling overhead, without any fit: the local engine's spawned pool (``workers`` processes that
   import torch, as the runner's do) and a local Ray instance (``ray.init`` with ``workers`` CPUs, then its
   workers' first task); then ``--noop`` empty tasks through each, the time per task at ``workers`` in parallel.
2. The sweep itself: ``experiments/digits.toml`` (``--quick``: its [quick] table), ``--seeds`` seeds, through
   ``run(..., engine="local")`` and ``run(..., engine="ray")``; wall time, the time inside the task units
   (status.json ``task_time_s``: each seed's teacher fit and each cell, student x fraction x method x tau), and the
   rest (start-up, scheduling, result transfer, tables) per task.
3. Sizing: an mlp seed is 1 teacher task + one task per cell (41 for the full digits config), so a 5-seed sweep of
   the FULL config is about 210 tasks whose longest chain is a teacher fit followed by its longest cell. Its CPU time
   is the measured time per seed x 5 when the sweep ran the full config; after ``--quick`` it is extrapolated cell by
   cell from the quick cells (each cell's fit time x full/quick optimizer steps x full/quick training rows, plus the
   measured per-row evaluation time): an indication only (MAP and SVI steps weighed alike; SVI steps cost more, so it
   is a low estimate). ``--from-run`` reads a finished full run instead (exact).

The machine this runs on may be shared: the 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _noop(x: int) -> int:
    return x


def _warm(_: int) -> int:
    import torch  # what a runner worker imports first

    torch.set_num_threads(1)
    return os.getpid()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _dump_toml(raw: dict[str, Any]) -> str:
    """A flat writer for experiment files: top-level keys, then one [table] per dict (nested dicts inline)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{json.dumps(kk)} = {_toml_value(x)}" for kk, x in v.items()]
    return "\n".join(lines) + "\n"


def overhead(workers: int, n: int) -> dict[str, float]:
    """Start-up of each engine and the time per empty task with ``workers`` in parallel."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        list(ex.map(_warm, range(workers)))
        out["local_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(ex.map(_noop, range(n)))
        out["local_task_ms"] = 1000 * (time.perf_counter() - t0) / n
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out["ray_init_s"] = time.perf_counter() - t0
    warm, noop = ray.remote(_warm).options(num_cpus=1), ray.remote(_noop).options(num_cpus=1)
    t0 = time.perf_counter()
    ray.get([warm.remote(i) for i in range(workers)])
    out["ray_first_tasks_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.get([noop.remote(i) for i in range(n)])
    out["ray_task_ms"] = 1000 * (time.perf_counter() - t0) / n
    ray.shutdown()
    return out


def sweep(cfg_path: Path, engine: str, workers: int, root: Path) -> dict[str, Any]:
    """One run of the sweep; wall time and the time spent inside its tasks."""
    from pyro_distill.experiments import read_rows, run

    t0 = time.perf_counter()
    d = run(cfg_path, runs_root=root / engine / "runs", models_root=root / engine / "models", workers=workers,
            engine=engine, echo=False)
    wall = time.perf_counter() - t0
    st = json.loads((d / "status.json").read_text())
    task_s = [float(v) for v in (st.get("task_time_s") or st["seed_time_s"]).values()]  # per task unit
    return {"engine": engine, "wall_s": wall, "tasks": len(task_s), "task_s": task_s,
            "rows": read_rows(d / "metrics.csv"), "run_dir": d, "status": st["status"]}


def _budget(cfg: dict[str, Any], role: str) -> int:
    t = cfg["teacher"] if role == "teacher" else cfg["student"]
    return int(t["map_steps"]) + int(t["steps"])


def full_cells(cfg: dict[str, Any], n_train: int) -> list[dict[str, Any]]:
    """The cells one seed of ``cfg`` runs (the loops of experiments/mlp.py: student x fraction x method x tau)."""
    from pyro_distill.experiments.protocol import VI_METHODS

    dc = cfg["distill"]
    cells = [{"student": "teacher", "method": "teacher", "n": n_train, "budget": _budget(cfg, "teacher")}]
    for s in cfg["students"]:
        for f in dc["student_fractions"].get(s, dc["fractions"]):
            base = not dc["baseline_students"] or s in dc["baseline_students"]
            base = base and (not dc["baseline_fractions"] or f in dc["baseline_fractions"])
            for m in dc["methods"]:
                if m not in ("teacher_prior", "reduced_posterior") and not base:
                    continue
                for tau in (dc["taus"] if m == "teacher_prior" else [None]):
                    label = f"teacher_prior(tau={tau if isinstance(tau, str) else f'{tau:g}'})" if tau else m
                    cells.append({"student": s, "method": label, "n": max(1, round(f * n_train)),
                                  "budget": _budget(cfg, "student"), "vi": m in VI_METHODS})
    return cells


def size_full(quick_cfg: dict[str, Any], full_cfg: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """Extrapolate one full seed's CPU seconds from the quick run's cells (see the module docstring)."""
    rows = res["rows"]
    seeds = max(1, res["tasks"])
    fit_s = sum(float(r["time_s"]) for r in rows) / seeds
    eval_per_row = max(0.0, sum(res["task_s"]) / seeds - fit_s) / max(1, len(rows) / seeds)
    per: dict[tuple[str, str], list[float]] = {}  # seconds per optimizer step per training row
    for r in rows:
        role = "teacher" if r["method"] == "teacher" else "student"
        key = (str(r["student"]), str(r["method"]))
        per.setdefault(key, []).append(float(r["time_s"]) / (_budget(quick_cfg, role) * float(r["n_train"])))
    rate = {k: sum(v) / len(v) for k, v in per.items()}
    n_train = int(next(r["n_train"] for r in rows if r["method"] == "teacher"))
    cells = full_cells(full_cfg, n_train)
    total, missing = 0.0, []
    for c in cells:
        k = (c["student"], c["method"])
        if k not in rate:
            missing.append(k)
            continue
        total += rate[k] * c["budget"] * c["n"] + eval_per_row
    return {"cells": len(cells), "cpu_s_per_seed": total, "unmeasured_cells": missing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "experiments" / "digits.toml"))
    ap.add_argument("--quick", action="store_true", help="the config's [quick] table (a few steps)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds in the measured sweep (tasks); default 1")
    ap.add_argument("--workers", type=int, default=2, help="cores used by either engine (default 2)")
    ap.add_argument("--noop", type=int, default=200, help="empty tasks for the per-task overhead (default 200)")
    ap.add_argument("--full-seeds", type=int, default=5, help="seeds of the sweep to size (default 5)")
    ap.add_argument("--from-run", default=None, help="size from a finished full run's folder instead")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pyro_distill.experiments.core import load_config

    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} cores; "
          f"workers = {args.workers}, seeds = {args.seeds}, {'quick' if args.quick else 'full'} config")
    if args.from_run:
        st = json.loads((Path(args.from_run) / "status.json").read_text())
        per = [float(v) for v in st["seed_time_s"].values()]
        cpu = sum(per) / len(per) * args.full_seeds
        units = st.get("task_time_s") or {}
        n_units = len(units) / max(1, len(per)) * args.full_seeds if units else args.full_seeds
        print(f"{args.from_run}: {len(per)} seeds, {sum(per) / len(per):.0f} s per seed; a {args.full_seeds}-seed"
              f" sweep: {n_units:.0f} task units, {cpu / 3600:.2f} CPU-hours"
              + (f", longest unit {max(units.values()):.0f} s" if units else ""))
        return
    o = overhead(args.workers, args.noop)
    print(f"local pool: start {o['local_start_s']:.1f} s ({args.workers} spawned workers importing torch), "
          f"{o['local_task_ms']:.2f} ms per empty task")
    print(f"ray:        ray.init {o['ray_init_s']:.1f} s, first {args.workers} tasks {o['ray_first_tasks_s']:.1f} s "
          f"(worker start + torch import), {o['ray_task_ms']:.2f} ms per empty task")

    raw = tomllib.loads(Path(args.config).read_text())
    raw["seeds"] = args.seeds
    raw.setdefault("quick", {})["seeds"] = args.seeds
    raw.pop("engine", None)
    raw.pop("address", None)
    with tempfile.TemporaryDirectory(prefix="pyro-distill-sweep-") as tmp:
        cfg_path = Path(tmp) / f"{raw.get('name', 'sweep')}.toml"
        cfg_path.write_text(_dump_toml(raw))
        results = [sweep(cfg_path, e, args.workers, Path(tmp)) for e in ("local", "ray")]
        print("\n| engine | tasks | wall s | in tasks, CPU s | wall - busiest worker, s per task |")
        print("|---|---|---|---|---|")
        for r in results:
            # the tasks' own time packed onto the workers (longest first); the rest of the wall is the engine's
            busy = [0.0] * args.workers
            for t in sorted(r["task_s"], reverse=True):
                busy[busy.index(min(busy))] += t
            extra = (r["wall_s"] - max(busy)) / max(1, r["tasks"])
            print(f"| {r['engine']} | {r['tasks']} | {r['wall_s']:.1f} | {sum(r['task_s']):.1f} | {extra:.1f} |")
        loc, ray_ = results
        same = [{k: v for k, v in x.items() if k != "time_s"} for x in loc["rows"]] == \
               [{k: v for k, v in x.items() if k != "time_s"} for x in ray_["rows"]]
        print(f"\nmetrics.csv identical but for time_s: {same}")
        per_task = sum(loc["task_s"]) / len(loc["task_s"])
        cfg = load_config(cfg_path, quick=args.quick)
        full = load_config(args.config)
        n_units = loc["tasks"] / max(1, args.seeds)
        print(f"\nsizing: {n_units:.0f} task units per seed (1 teacher + its cells), {per_task:.1f} CPU s per unit "
              "measured")
        if not args.quick:
            cpu = sum(loc["task_s"]) / max(1, args.seeds) * args.full_seeds
            print(f"a {args.full_seeds}-seed sweep: {n_units * args.full_seeds:.0f} task units, {cpu / 3600:.2f} "
                  f"CPU-hours; wall >= the longest teacher + its longest cell")
        else:
            est = size_full(cfg, full, loc)
            cpu = est["cpu_s_per_seed"] * args.full_seeds
            print(f"full config (extrapolated from the quick cells, a low estimate): {est['cells']} cells per seed, "
                  f"~{est['cpu_s_per_seed'] / 60:.1f} CPU-min per seed; a {args.full_seeds}-seed sweep: "
                  f"{(est['cells'] + 1) * args.full_seeds} task units, ~{cpu / 3600:.3f} CPU-hours"
                  + (f" (cells without a quick measurement left out: {est['unmeasured_cells']})"
                     if est["unmeasured_cells"] else ""))
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
