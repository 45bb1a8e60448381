"""The experiment runner: TOML config -> seeds in parallel processes -> ``runs/NAME/<timestamp>/``.

An experiment *kind* (MLP distillation, attention RNN, transformer, ...) registers itself with
:func:`register_kind`: its full nested dict of allowed keys with defaults, and a function that runs one
seed. The runner validates a TOML file against those defaults (an unknown key is an error naming the
key and the allowed ones), resolves ``--quick`` overrides, runs every seed in its own process
(spawn context, one torch thread each) and writes, atomically::

    runs/NAME/<timestamp>/
        config.json          the resolved configuration (defaults + file + quick overrides)
        config.source.toml   the file as given
        status.json          running | complete | failed | interrupted, per-seed status, timings
        metrics.csv/.json    one row per (setting, method, seed): what ``ctx.record`` received
        curves.csv           learning curves: setting, method, seed, step, metric, value
        summary.md/.json     mean ± sd over seeds per setting x method
        seeds/seed<k>/       that seed's metrics.json, curves.csv and log.txt
    models/NAME-<timestamp>/<model>-seed<k>/   every Gaussian saved with ``ctx.save_model``

A run directory is always new (unique timestamp, created with ``exist_ok=False``), so a failed or
interrupted run can never touch an earlier one. The runner holds no mathematics.
"""

from __future__ import annotations

import copy
import csv
import importlib
import io
import json
import math
import os
import pkgutil
import sys
import time
import tomllib
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..store import atomic_write_text

__all__ = [
    "register_kind",
    "kinds",
    "SeedContext",
    "ConfigError",
    "RunError",
    "load_config",
    "run",
    "latest_run",
    "read_rows",
    "summarize",
    "RESERVED_KEYS",
]

#: top-level keys every experiment file may have, whatever its kind
RESERVED_KEYS = {"name": str, "kind": str, "seeds": (int, list), "workers": int, "quick": dict, "description": str}

MetricRow = dict[str, Any]
#: numeric row columns that describe a setting rather than measure it (left out of summary.md)
DESCRIPTIVE = {"fraction", "n_train", "tau", "seed"}


class ConfigError(ValueError):
    """A configuration file that cannot be run; the message names the key and the fix."""


class RunError(RuntimeError):
    """Some seeds of a run failed; the run directory holds what finished and each error."""


@dataclass
class _Kind:
    name: str
    defaults: dict[str, Any]
    run_seed: Callable[[dict, int, SeedContext], None]
    module: str


_KINDS: dict[str, _Kind] = {}


def register_kind(name: str, defaults: dict[str, Any], run_seed: Callable[[dict, int, SeedContext], None]) -> None:
    """Make experiment files with ``kind = name`` runnable.

    ``defaults`` is the full nested dict of allowed keys (tables are dicts) with their default values;
    an EMPTY dict default is a free-form table (any keys). ``run_seed(cfg, seed, ctx)`` runs one seed of
    the resolved config ``cfg`` and reports through ``ctx`` (:class:`SeedContext`). It must be a
    module-level function: seeds run in spawned processes, which import ``run_seed.__module__``.
    """
    clash = set(defaults) & set(RESERVED_KEYS)
    if clash:
        raise ValueError(f"kind {name!r}: defaults may not redefine the reserved keys {sorted(clash)}")
    _KINDS[name] = _Kind(name, copy.deepcopy(defaults), run_seed, run_seed.__module__)


def kinds() -> dict[str, dict[str, Any]]:
    """Registered kinds and their defaults (imports every module of this package first)."""
    _import_all()
    return {k: copy.deepcopy(v.defaults) for k, v in _KINDS.items()}


def _import_all() -> None:
    pkg = importlib.import_module(__package__)
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "core":
            importlib.import_module(f"{__package__}.{m.name}")


def _get_kind(name: str) -> _Kind:
    if name not in _KINDS:
        try:  # convention: kind NAME lives in pyro_distill.experiments.NAME
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
        if name not in _KINDS:
            _import_all()
    if name not in _KINDS:
        raise ConfigError(f"unknown experiment kind {name!r}; known kinds: {sorted(_KINDS)}")
    return _KINDS[name]


# ============================================================================ configuration
def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(v), type(v).__name__)


def _check_value(path: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float))
        if ok and isinstance(default, float):
            value = float(value)
        elif ok and isinstance(default, int) and isinstance(value, float):
            ok = value.is_integer()
            value = int(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key {path!r} must be a {_type_name(default)} (default {default!r}), "
                          f"got {value!r}")
    return value


def _merge(defaults: dict[str, Any], given: dict[str, Any], where: str) -> dict[str, Any]:
    """``defaults`` updated by ``given``; unknown keys are errors (except in free-form tables)."""
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        path = f"{where}.{key}" if where else key
        if defaults and key not in defaults:
            allowed = ", ".join(sorted(defaults))
            raise ConfigError(f"unknown config key {path!r}; allowed keys{' in [' + where + ']' if where else ''}: "
                              f"{allowed}")
        d = defaults.get(key)
        if isinstance(d, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a table, got {value!r}")
            out[key] = _merge(d, value, path) if d else copy.deepcopy(value)
        else:
            out[key] = _check_value(path, d, value)
    return out


def resolve_config(raw: dict[str, Any], quick: bool = False, source: str = "<config>") -> dict[str, Any]:
    """Validate a parsed config against its kind's defaults and apply ``[quick]`` overrides when asked."""
    if "kind" not in raw:
        raise ConfigError(f"{source}: missing top-level key 'kind'; known kinds: {sorted(kinds())}")
    kind = _get_kind(str(raw["kind"]))
    allowed_top = dict(RESERVED_KEYS) | kind.defaults
    for key in raw:
        if key not in allowed_top:
            raise ConfigError(f"{source}: unknown config key {key!r} for kind {kind.name!r}; allowed top-level "
                              f"keys: {', '.join(sorted(allowed_top))}")
    body = {k: v for k, v in raw.items() if k not in RESERVED_KEYS}
    cfg = _merge(kind.defaults, body, "")
    quick_tab = raw.get("quick", {})
    if not isinstance(quick_tab, dict):
        raise ConfigError(f"{source}: [quick] must be a table of overrides")
    for key in quick_tab:
        if key not in allowed_top or key in ("quick", "name", "kind"):
            raise ConfigError(f"{source}: unknown key {key!r} in [quick]; it may override: "
                              f"{', '.join(sorted(set(allowed_top) - {'quick', 'name', 'kind'}))}")
    qbody = {k: v for k, v in quick_tab.items() if k not in RESERVED_KEYS}
    _merge(kind.defaults, qbody, "quick")  # validates the overrides even when not used
    if quick:
        cfg = _merge(kind.defaults, _deep_update(body, qbody), "")
    top = {k: raw[k] for k in RESERVED_KEYS if k in raw and k != "quick"}
    if quick:
        top.update({k: quick_tab[k] for k in ("seeds", "workers", "description") if k in quick_tab})
    name = str(top.get("name", Path(source).stem))
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"{source}: experiment name {name!r} must be a plain folder name")
    seeds = top.get("seeds", 5)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
        raise ConfigError(f"{source}: 'seeds' must be a count or a list of integers, got {seeds!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else seeds
    if not seed_list or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seed_list) or \
            len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"{source}: 'seeds' must give at least one distinct non-negative integer, got {seeds!r}")
    workers = top.get("workers", min(len(seed_list), os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{source}: 'workers' must be a positive integer, got {workers!r}")
    return {"name": name, "kind": kind.name, "description": top.get("description", ""), "seeds": seed_list,
            "workers": min(workers, len(seed_list)), "quick": bool(quick)} | cfg


def _deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike, quick: bool = False) -> dict[str, Any]:
    """Read and resolve an experiment TOML file (see :func:`resolve_config`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"experiment file {path} not found; the shipped ones are in experiments/*.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return resolve_config(raw, quick=quick, source=str(path))


# ============================================================================ one seed
@dataclass
class SeedContext:
    """What a kind's ``run_seed`` reports through. Rows and curves are flushed atomically to
    ``run_dir/seeds/seed<k>/`` on every :meth:`record`, so a crash keeps what was measured."""

    seed: int
    cfg: dict[str, Any]
    run_dir: Path
    models_dir: Path
    rows: list[MetricRow] = field(default_factory=list)
    curves: list[MetricRow] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    echo: bool = True

    @property
    def seed_dir(self) -> Path:
        return self.run_dir / "seeds" / f"seed{self.seed}"

    def record(self, row: MetricRow) -> None:
        """One metrics row: needs ``setting`` and ``method``; ``seed`` is filled in; other values are metrics."""
        missing = [k for k in ("setting", "method") if k not in row]
        if missing:
            raise ValueError(f"a metrics row needs the keys {missing}; got {sorted(row)}")
        r = {"setting": str(row["setting"]), "method": str(row["method"]), "seed": self.seed}
        r |= {k: _plain(v) for k, v in row.items() if k not in r}
        self.rows.append(r)
        self.flush()

    def curve(self, setting: str, method: str, step: int, metric: str, value: float) -> None:
        """One point of a learning curve (metric vs optimization step)."""
        self.curves.append({"setting": str(setting), "method": str(method), "seed": self.seed, "step": int(step),
                            "metric": str(metric), "value": float(value)})

    def save_model(self, name: str, net: Any, gaussian: Any, card: dict[str, Any] | None = None,
                   data: tuple[Any, Any] | None = None, prior: Any = None, idata_draws: int = 0) -> Path:
        """Save a fitted Gaussian to ``models/<experiment>-<timestamp>/<name>-seed<k>/`` (never overwrites),
        with its ArviZ ``idata.nc`` when ``data = (X, y)`` (the data it was fitted to) and ``idata_draws > 0``:
        ``lp`` under ``prior``, the prior it was fitted under (None: the net's default). Draw seed 0, as
        ``pyro-distill diagnose`` uses by default, so that it reuses the file."""
        from ..store import save_model

        if not name or any(c in name for c in "/\\"):
            raise ValueError(f"model name {name!r} must be a plain folder name")
        folder = self.models_dir / f"{name}-seed{self.seed}"
        info = {"experiment": self.cfg.get("name"), "seed": self.seed, "run_dir": str(self.run_dir)} | dict(card or {})
        out = save_model(folder, net, gaussian, info)
        self.saved.append(str(out))
        if data is not None and idata_draws > 0:
            from ..diagnostics import diagnose_model_folder

            diagnose_model_folder(out, data[0], data[1], draws=idata_draws, seed=0, prior=prior)
        return out

    def log(self, msg: str) -> None:
        """A progress line: printed with the seed, and appended to the seed's log.txt."""
        line = f"[{datetime.now(UTC).strftime('%H:%M:%S')} seed {self.seed}] {msg}"
        if self.echo:
            print(line, flush=True)
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        with open(self.seed_dir / "log.txt", "a") as f:
            f.write(line + "\n")

    def flush(self) -> None:
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.seed_dir / "metrics.json", json.dumps(self.rows, indent=1))
        atomic_write_text(self.seed_dir / "curves.csv", _to_csv(self.curves, _CURVE_COLS))


_CURVE_COLS = ["setting", "method", "seed", "step", "metric", "value"]


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _run_one(kind_name: str, module: str, cfg: dict[str, Any], seed: int, run_dir: str, models_dir: str,
             echo: bool) -> dict[str, Any]:
    """Run one seed (in a worker process or in-process); returns its rows, curves and status."""
    if module and kind_name not in _KINDS:
        importlib.import_module(module)
    kind = _get_kind(kind_name)
    ctx = SeedContext(seed, cfg, Path(run_dir), Path(models_dir), echo=echo)
    t0 = time.perf_counter()
    try:
        kind.run_seed(copy.deepcopy(cfg), seed, ctx)
    except Exception as exc:  # a failed seed is reported, not fatal to the others
        tb = traceback.format_exc()
        ctx.flush()
        atomic_write_text(ctx.seed_dir / "error.txt", tb)
        return {"seed": seed, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "rows": ctx.rows,
                "curves": ctx.curves, "models": ctx.saved, "time_s": time.perf_counter() - t0}
    ctx.flush()
    return {"seed": seed, "status": "complete", "error": None, "rows": ctx.rows, "curves": ctx.curves,
            "models": ctx.saved, "time_s": time.perf_counter() - t0}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# ============================================================================ the run
def _new_run_dir(root: Path, name: str) -> tuple[Path, str]:
    base = root / name
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        ts = stamp if i == 0 else f"{stamp}-{i}"
        try:
            (base / ts).mkdir(exist_ok=False)
            return base / ts, ts
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {base}")


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "status.json", json.dumps(status, indent=1, default=str))


def run(config_path: str | os.PathLike, quick: bool = False, runs_root: str | os.PathLike = "runs",
        models_root: str | os.PathLike = "models", workers: int | None = None, echo: bool = True) -> Path:
    """Run an experiment file; returns the new run directory ``runs_root/NAME/<timestamp>/``.

    Seeds run in ``workers`` spawned processes (one torch thread each; ``workers=1`` runs in this
    process). A failed seed does not stop the others; :class:`RunError` is raised at the end, after
    the summary of the seeds that finished has been written.
    """
    cfg = load_config(config_path, quick=quick)
    if workers is not None:
        cfg["workers"] = max(1, min(int(workers), len(cfg["seeds"])))
    kind = _get_kind(cfg["kind"])
    run_dir, stamp = _new_run_dir(Path(runs_root), cfg["name"])
    models_dir = Path(models_root) / f"{cfg['name']}-{stamp}"
    cfg_out = cfg | {"run_dir": str(run_dir), "models_dir": str(models_dir), "timestamp": stamp}
    atomic_write_text(run_dir / "config.json", json.dumps(cfg_out, indent=1))
    atomic_write_text(run_dir / "config.source.toml", Path(config_path).read_text())
    status: dict[str, Any] = {"status": "running", "started": datetime.now(UTC).isoformat(), "quick": quick,
                              "seeds": {str(s): "pending" for s in cfg["seeds"]}, "errors": {},
                              "python": sys.version.split()[0]}
    _write_status(run_dir, status)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    args = [(kind.name, kind.module, cfg_out, s, str(run_dir), str(models_dir), echo) for s in cfg["seeds"]]
    try:
        if cfg["workers"] == 1:
            for a in args:
                status["seeds"][str(a[3])] = "running"
                _write_status(run_dir, status)
                res = _run_one(*a)
                results.append(res)
                _note(status, res, run_dir)
        else:
            with ProcessPoolExecutor(max_workers=cfg["workers"], mp_context=get_context("spawn"),
                                     initializer=_worker_init) as ex:
                futs = {ex.submit(_run_one, *a): a[3] for a in args}
                try:
                    for fut in as_completed(futs):
                        try:
                            res = fut.result()
                        except Exception as exc:  # the worker process itself died
                            res = {"seed": futs[fut], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                   "rows": [], "curves": [], "models": [], "time_s": 0.0}
                        results.append(res)
                        _note(status, res, run_dir)
                except BaseException:
                    ex.shutdown(wait=False, cancel_futures=True)
                    raise
    except BaseException as exc:  # KeyboardInterrupt included: mark, write what finished, re-raise
        status["status"] = "interrupted"
        status["interrupted_by"] = type(exc).__name__
        _finish(run_dir, cfg_out, results, status, time.perf_counter() - t0)
        raise
    failed = [r for r in results if r["status"] != "complete"]
    status["status"] = "failed" if failed else "complete"
    _finish(run_dir, cfg_out, results, status, time.perf_counter() - t0)
    if failed:
        msgs = "; ".join(f"seed {r['seed']}: {r['error']}" for r in failed)
        raise RunError(f"{len(failed)} of {len(results)} seeds failed ({msgs}); see {run_dir}/seeds/*/error.txt")
    return run_dir


def _note(status: dict[str, Any], res: dict[str, Any], run_dir: Path) -> None:
    status["seeds"][str(res["seed"])] = res["status"]
    if res["error"]:
        status["errors"][str(res["seed"])] = res["error"]
    _write_status(run_dir, status)


def _finish(run_dir: Path, cfg: dict[str, Any], results: list[dict[str, Any]], status: dict[str, Any],
            elapsed: float) -> None:
    results = sorted(results, key=lambda r: cfg["seeds"].index(r["seed"]))
    rows = [r for res in results for r in res["rows"]]
    curves = [c for res in results for c in res["curves"]]
    cols = _columns(rows)
    atomic_write_text(run_dir / "metrics.json", json.dumps(rows, indent=1))
    atomic_write_text(run_dir / "metrics.csv", _to_csv(rows, cols))
    atomic_write_text(run_dir / "curves.csv", _to_csv(curves, _CURVE_COLS))
    summ = summarize(rows)
    atomic_write_text(run_dir / "summary.json", json.dumps(summ, indent=1))
    atomic_write_text(run_dir / "summary.md", summary_markdown(summ, title=f"{cfg['name']} ({run_dir.name})",
                                                              seeds=len(results)))
    status["finished"] = datetime.now(UTC).isoformat()
    status["elapsed_s"] = round(elapsed, 1)
    status["seed_time_s"] = {str(r["seed"]): round(r["time_s"], 1) for r in results}
    status["models"] = [m for r in results for m in r["models"]]
    _write_status(run_dir, status)


# ============================================================================ tables
def _columns(rows: list[MetricRow]) -> list[str]:
    cols = ["setting", "method", "seed"]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _to_csv(rows: list[MetricRow], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return buf.getvalue()


def read_rows(path: str | os.PathLike) -> list[MetricRow]:
    """Rows of a CSV written by the runner, numbers parsed back."""
    with open(path, newline="") as f:
        out = []
        for r in csv.DictReader(f):
            out.append({k: _num(v) for k, v in r.items()})
        return out


def _num(v: str) -> Any:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _is_metric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(rows: list[MetricRow]) -> list[dict[str, Any]]:
    """Mean and sample sd (ddof 1; 0 for one seed) of every numeric column per (setting, method), in the
    order the pairs first appear."""
    groups: dict[tuple[str, str], list[MetricRow]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    out = []
    for (setting, method), rs in groups.items():
        entry: dict[str, Any] = {"setting": setting, "method": method, "n": len(rs), "metrics": {}}
        keys = [k for k in _columns(rs) if k not in ("setting", "method", "seed")]
        for k in keys:
            vals = [r[k] for r in rs if _is_metric(r.get(k))]
            if not vals:
                continue
            m = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            entry["metrics"][k] = {"mean": m, "sd": sd, "n": len(vals)}
        out.append(entry)
    return out


def _fmt(m: float, sd: float) -> str:
    a = abs(m)
    digits = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 10 else 3
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def summary_markdown(summary: list[dict[str, Any]], title: str = "", seeds: int | None = None,
                     metrics: list[str] | None = None) -> str:
    """A markdown table: one row per setting x method, ``mean ± sd`` over seeds per metric."""
    if metrics is None:
        metrics = []
        for e in summary:
            for k in e["metrics"]:
                if k not in metrics and k not in DESCRIPTIVE:
                    metrics.append(k)
    lines = [f"## {title}", ""] if title else []
    if seeds is not None:
        lines += [f"mean ± sd over seeds (n = number of seeds per row; {seeds} seeds run)", ""]
    lines.append("| setting | method | n | " + " | ".join(metrics) + " |")
    lines.append("|---|---|---|" + "---|" * len(metrics))
    for e in summary:
        cells = [_fmt(e["metrics"][k]["mean"], e["metrics"][k]["sd"]) if k in e["metrics"] else "" for k in metrics]
        lines.append(f"| {e['setting']} | {e['method']} | {e['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latest_run(name: str, runs_root: str | os.PathLike = "runs", complete_only: bool = True) -> Path | None:
    """The newest run directory of experiment ``name`` (status complete, unless ``complete_only=False``)."""
    base = Path(runs_root) / name
    if not base.is_dir():
        return None
    for d in sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        st = d / "status.json"
        if not st.exists():
            continue
        try:
            s = json.loads(st.read_text())
        except json.JSONDecodeError:
            continue
        if not complete_only or s.get("status") == "complete":
            return d
    return None
