"""The experiment runner: TOML config -> seeds in parallel processes -> ``runs/NAME/<timestamp>/``.

An experiment *kind* (MLP distillation, attention RNN, transformer, ...) registers itself with
:func:`register_kind`: its full nested dict of allowed keys with defaults, and its *task units* (the protocol of
:mod:`.protocol`: a teacher task per seed whose result its cells reuse, and one cell per student x setting x method)
or, on the compatibility path, a function that runs one whole seed. The runner validates a TOML file against those
defaults (an unknown key is an error naming the key and the allowed ones), resolves ``--quick`` overrides, schedules
the tasks (:class:`TaskSpec`: every seed's teacher first, then each seed's cells as soon as its teacher is done) on
an *engine* (:class:`Engine`; ``engine = "local"``: spawned processes of this machine, one torch thread each;
``"ray"``: Ray tasks on a local instance or a cluster, :mod:`.ray_engine`) and writes, atomically, the same files
whatever the engine and the order tasks finish in (the tables rewritten as each task finishes; a seed's rows in
task order)::

    runs/NAME/<timestamp>/
        config.json          the resolved configuration (defaults + file + quick overrides)
        config.source.toml   the file as given
        status.json          running | complete | failed | interrupted (read back as ``died`` when the
                             process is gone or its heartbeat stale), pid, host, heartbeat, per-seed
                             status and errors, task counts, retried tasks (``attempts``), timings
        metrics.csv/.json    one row per (setting, method, seed): what ``ctx.record`` received
        curves.csv           learning curves: setting, method, seed, step, metric, value
        summary.md/.json     mean ± sd over seeds per setting x method
        seeds/seed<k>/       that seed's metrics.json, curves.csv, log.txt (error.txt when a task failed);
                             tasks/task<i>.json: one task's rows and curves as it records them
    models/NAME-<timestamp>/<model>-seed<k>/   every Gaussian saved with ``ctx.save_model``

A run directory is always new (unique timestamp, created with ``exist_ok=False``), so a failed or
interrupted run can never touch an earlier one. The runner holds no mathematics.

Reliability: the output folders are checked writable before any fit; a thread refreshes ``heartbeat``
in status.json every :data:`HEARTBEAT_S` seconds; SIGTERM/SIGHUP mark the run ``interrupted`` and
terminate the worker processes; each worker exits on its own when the parent dies (a thread watching
``os.getppid()``); :func:`run_state` reports a ``running`` run whose process is gone (same host) or whose
heartbeat is older than :data:`STALE_S` as ``died``; a full disk or read-only folder is one
:class:`pyro_distill.store.StorageError` line.
"""

from __future__ import annotations

import copy
import csv
import errno
import importlib
import io
import json
import math
import os
import pkgutil
import signal
import socket
import sys
import threading
import time
import tomllib
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..store import StorageError, atomic_write_text, check_writable, pid_alive, storage_error

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
    "run_state",
    "RESERVED_KEYS",
    "HEARTBEAT_S",
    "STALE_S",
    "ENGINES",
    "Engine",
    "LocalEngine",
    "make_engine",
    "TaskSpec",
    "TaskContext",
    "run_task",
]

#: seconds between two heartbeats written into a running run's status.json
HEARTBEAT_S = 15.0
#: a ``running`` status whose heartbeat is older than this many seconds is read as ``died``
STALE_S = 180.0

#: top-level keys every experiment file may have, whatever its kind
RESERVED_KEYS = {"name": str, "kind": str, "seeds": (int, list), "workers": int, "quick": dict, "description": str,
                 "engine": str, "address": str}
#: where the seeds run: ``local`` (a process pool on this machine) or ``ray`` (pyro_distill.experiments.ray_engine)
ENGINES = ("local", "ray")

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
    run_seed: Callable[[dict, int, SeedContext], None] | None
    module: str
    units: Any = None


_KINDS: dict[str, _Kind] = {}


def register_kind(name: str, defaults: dict[str, Any], run_seed: Callable[[dict, int, SeedContext], None] | None = None,
                  units: Any = None) -> None:
    """Make experiment files with ``kind = name`` runnable.

    ``defaults`` is the full nested dict of allowed keys (tables are dicts) with their default values;
    an EMPTY dict default is a free-form table (any keys). Either or both of:

    * ``units``: the kind's task units (e.g. :class:`pyro_distill.experiments.protocol.Protocol`), an object with
      ``teacher(cfg, seed, ctx) -> (payload, cells)`` (once per seed; ``cells`` have ``index`` >= 1 and ``name``)
      and ``cell(cfg, cell, payload, ctx)`` (one student x setting x method); ``payload.part(cell)``, when defined,
      is what one cell needs. The runner schedules the teachers first, then each seed's cells as soon as its
      teacher is done, in parallel on its engine;
    * ``run_seed(cfg, seed, ctx)``: one whole seed in one task (the compatibility path for kinds without units).

    Both report through ``ctx`` (:class:`SeedContext`). They must be module-level objects: tasks run in spawned
    processes, which import the module that registered the kind.
    """
    clash = set(defaults) & set(RESERVED_KEYS)
    if clash:
        raise ValueError(f"kind {name!r}: defaults may not redefine the reserved keys {sorted(clash)}")
    if run_seed is None and units is None:
        raise ValueError(f"kind {name!r}: register a run_seed function or task units")
    # the module a spawned worker imports to find the kind: the run_seed's, else the caller's (it registers the kind)
    module = run_seed.__module__ if run_seed is not None else sys._getframe(1).f_globals.get("__name__", "")
    _KINDS[name] = _Kind(name, copy.deepcopy(defaults), run_seed, module, units)


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
    _check_range(path, value)
    return value


#: floating dtypes an experiment may run in (half precision breaks the fits: see pyro_distill.checks)
_DTYPES = ("float32", "float64")


def _check_range(path: str, value: Any) -> None:
    """Values that no fit accepts, refused before any seed starts: negative step counts, learning rates
    that are not positive, dtypes other than float32/float64."""
    key = path.rsplit(".", 1)[-1]
    num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if num and (key == "steps" or key.endswith("_steps")) and value < 0:
        raise ConfigError(f"config key {path!r} must be >= 0 (a number of optimizer steps), got {value!r}")
    if num and (key == "lr" or key.endswith("_lr")) and not value > 0:
        raise ConfigError(f"config key {path!r} must be a learning rate > 0, got {value!r}")
    if key == "dtype" and isinstance(value, str) and value not in _DTYPES:
        raise ConfigError(f"config key {path!r} must be one of {list(_DTYPES)}, got {value!r} (half precision "
                          "underflows the log-likelihoods and breaks the covariance factors)")


def _check_free_key(path: str, key: str) -> None:
    """Keys of free-form tables name folders and files (e.g. a student's model folder): plain names only."""
    if not key or key.startswith(".") or any(c in key for c in "/\\") or key != key.strip():
        raise ConfigError(f"config key {path!r}: {key!r} is used in folder names; use a plain name (letters, digits, "
                          "'_', '-'; no '/', '\\' or leading '.')")


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
            if not d:
                for k in value:
                    _check_free_key(f"{path}.{k}", str(k))
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
        top.update({k: quick_tab[k] for k in ("seeds", "workers", "description", "engine", "address")
                    if k in quick_tab})
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
    # a kind with task units runs a seed's cells in parallel: its workers are not bounded by the number of seeds
    n_tasks_max = len(seed_list) if kind.units is None else 1 << 30
    workers = top.get("workers", min(n_tasks_max, os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{source}: 'workers' must be a positive integer, got {workers!r}")
    engine, address = top.get("engine", "local"), top.get("address", "")
    _check_engine(engine, address, source)
    return {"name": name, "kind": kind.name, "description": top.get("description", ""), "seeds": seed_list,
            "workers": min(workers, n_tasks_max), "quick": bool(quick), "engine": engine,
            "address": address} | cfg


def _check_engine(engine: Any, address: Any, source: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"{source}: 'engine' must be one of {list(ENGINES)}, got {engine!r}")
    if not isinstance(address, str):
        raise ConfigError(f"{source}: 'address' must be a string (a Ray address: 'auto', 'HOST:6379' or "
                          f"'ray://HOST:10001'), got {address!r}")
    if address and engine != "ray":
        raise ConfigError(f"{source}: 'address' = {address!r} is a Ray cluster address; set engine = \"ray\" "
                          "(CLI: --engine ray) or remove it")


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
    overwrite: bool = False

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
        from ..store import model_folder_name, save_model

        folder = self.models_dir / model_folder_name(name, self.seed)
        info = {"experiment": self.cfg.get("name"), "seed": self.seed, "run_dir": str(self.run_dir),
                "quick": bool(self.cfg.get("quick", False))} | dict(card or {})
        out = save_model(folder, net, gaussian, info, overwrite=self.overwrite, prior=prior)
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


class TaskContext(SeedContext):
    """The :class:`SeedContext` of one task unit (a teacher or a cell) of a seed: its rows and curves are flushed to
    ``seeds/seed<k>/tasks/task<index>.json`` (the runner merges a seed's tasks into ``seeds/seed<k>/metrics.json``
    and ``curves.csv`` in task order); log lines go to the seed's log.txt."""

    index: int = 0

    def flush(self) -> None:
        path = self.seed_dir / "tasks" / f"task{self.index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"rows": self.rows, "curves": self.curves}, indent=1))


@dataclass(frozen=True)
class TaskSpec:
    """One unit of work of a run. ``unit``: ``"seed"`` (a kind's whole ``run_seed``), ``"teacher"`` (a seed's
    teacher task) or ``"cell"`` (``cell``: one student x setting x method of that seed, rows ordered by
    ``cell.index``)."""

    kind: str
    module: str
    cfg: dict[str, Any]
    seed: int
    run_dir: str
    models_dir: str
    echo: bool = True
    overwrite: bool = False
    unit: str = "seed"
    cell: Any = None

    @property
    def index(self) -> int:
        return int(self.cell.index) if self.unit == "cell" else 0

    @property
    def name(self) -> str:
        return {"seed": f"seed {self.seed}", "teacher": "teacher"}.get(self.unit) or str(self.cell.name)

    def follow(self, cell: Any) -> TaskSpec:
        """The task of one of this teacher's cells."""
        return TaskSpec(self.kind, self.module, self.cfg, self.seed, self.run_dir, self.models_dir, self.echo,
                        self.overwrite, "cell", cell)


#: kept for callers of the old name: one task's arguments
Task = TaskSpec


def run_task(spec: TaskSpec, payload: Any = None, attempt: int = 1) -> dict[str, Any]:
    """Run one task (in a worker process or in-process); returns its result: ``seed``, ``index``, ``unit``,
    ``task`` (its name), ``status``, ``error``, ``rows``, ``curves``, ``models``, ``time_s``; a teacher's also
    ``next`` (its cells' :class:`TaskSpec`) and ``payload`` (what they need: the engine passes it on and removes it).
    ``attempt > 1`` (a retry after a worker died) may replace the model folders the dead attempt saved."""
    if spec.module and spec.kind not in _KINDS:
        importlib.import_module(spec.module)
    kind = _get_kind(spec.kind)
    overwrite = spec.overwrite or attempt > 1
    args = (spec.seed, spec.cfg, Path(spec.run_dir), Path(spec.models_dir))
    if spec.unit == "seed":
        ctx: SeedContext = SeedContext(*args, echo=spec.echo, overwrite=overwrite)
    else:
        ctx = TaskContext(*args, echo=spec.echo, overwrite=overwrite)
        ctx.index = spec.index
    out: dict[str, Any] = {"seed": spec.seed, "index": spec.index, "unit": spec.unit, "task": spec.name}
    t0 = time.perf_counter()
    try:
        cfg = copy.deepcopy(spec.cfg)
        if spec.unit == "seed":
            if kind.run_seed is None:
                kind.units.run_seed(cfg, spec.seed, ctx)
            else:
                kind.run_seed(cfg, spec.seed, ctx)
        elif spec.unit == "teacher":
            payload, cells = kind.units.teacher(cfg, spec.seed, ctx)
            out |= {"payload": payload, "next": [spec.follow(c) for c in cells]}
        else:
            kind.units.cell(cfg, spec.cell, payload, ctx)
    except Exception as exc:  # a failed task is reported, not fatal to the others
        err = storage_error(exc, ctx.models_dir) if isinstance(exc, (OSError, RuntimeError)) else None
        exc = err or exc
        where = "" if spec.unit == "seed" else f"{spec.name}: "
        _write_quietly(ctx, traceback.format_exc(), where)
        return out | {"status": "failed", "error": f"{where}{type(exc).__name__}: {exc}", "rows": ctx.rows,
                      "curves": ctx.curves, "models": ctx.saved, "time_s": time.perf_counter() - t0,
                      "storage": isinstance(exc, StorageError)}
    ctx.flush()
    return out | {"status": "complete", "error": None, "rows": ctx.rows, "curves": ctx.curves, "models": ctx.saved,
                  "time_s": time.perf_counter() - t0}


def _part(payload: Any, spec: TaskSpec) -> Any:
    """What the cell ``spec`` needs of its teacher's payload (``payload.part(cell)`` when the kind defines it)."""
    part = getattr(payload, "part", None)
    return part(spec.cell) if callable(part) else payload


def _write_quietly(ctx: SeedContext, tb: str, where: str = "") -> None:
    """Flush a failed seed's (task's) rows and its error.txt (a task's error is appended, headed by the task's
    name); when even that fails (full disk), one line on stderr."""
    try:
        ctx.flush()
        if where:
            ctx.seed_dir.mkdir(parents=True, exist_ok=True)
            with open(ctx.seed_dir / "error.txt", "a") as f:
                f.write(f"== {where.rstrip(': ')}\n{tb}\n")
        else:
            atomic_write_text(ctx.seed_dir / "error.txt", tb)
    except OSError as exc:
        print(f"pyro-distill: seed {ctx.seed}: could not write {ctx.seed_dir / 'error.txt'} ({exc}); the error "
              f"was: {tb.strip().splitlines()[-1]}", file=sys.stderr, flush=True)


def _worker_init(parent_pid: int | None = None, poll_s: float = 1.0) -> None:
    """Worker setup: one torch thread, and a daemon thread that ends the worker as soon as its parent is gone
    (``os.getppid()`` no longer the parent: reparented after a SIGKILL), so no orphan keeps computing."""
    import torch

    # the thread policy of the CLI (pyro_distill.cli.thread_count): --threads / $PYRO_DISTILL_THREADS, else one
    torch.set_num_threads(int(os.environ.get("PYRO_DISTILL_THREADS") or 1))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if parent_pid is None:
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(poll_s)

    threading.Thread(target=watch, name="pyro-distill-parent-watch", daemon=True).start()


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


class _Status:
    """status.json of a live run: every write under one lock, plus a heartbeat thread."""

    def __init__(self, run_dir: Path, status: dict[str, Any], every: float = HEARTBEAT_S):
        self.run_dir, self.data, self.every = run_dir, status, every
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="pyro-distill-heartbeat", daemon=True)

    def write(self) -> None:
        with self.lock:
            self.data["heartbeat"] = datetime.now(UTC).isoformat()
            _write_status(self.run_dir, self.data)

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.write()
            except OSError:  # a full disk: the main thread reports it; the reader sees a stale heartbeat
                pass

    def start(self) -> None:
        self.write()
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


class _Terminated(BaseException):
    """Raised in the main thread by the SIGTERM / SIGHUP handler of a run."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _install_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise :class:`_Terminated` in the main thread (restored after the run)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}

    def handler(signum, frame):
        raise _Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    return old


def _restore_signals(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def _terminate_pool(ex: ProcessPoolExecutor) -> None:
    """Stop every worker now (running seeds included) and let the executor wind down."""
    procs = list(getattr(ex, "_processes", {}).values())  # the pool's live processes (a CPython detail)
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            p.terminate()
        except (OSError, ValueError, AttributeError):
            pass
    for p in procs:
        try:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        except (OSError, ValueError, AttributeError, AssertionError):
            pass


# ============================================================================ engines (the executor seam)
class Engine:
    """Where the tasks of a run execute. :meth:`results` runs the given tasks (:class:`TaskSpec`) and, as each teacher
    task finishes, the cells it lists (``result["next"]``, each given ``_part(result["payload"], cell)``), and yields
    one result dict (see :func:`run_task`, the ``payload`` removed) per task as it finishes, in any order;
    ``started(spec)`` is called when a task is handed to a worker. :meth:`abort` stops everything still running
    (interrupt); :meth:`close` releases the engine after the last result. A task that fails is a result with
    ``status = "failed"``, never an exception: exceptions out of :meth:`results` end the run as interrupted."""

    name = "engine"

    def results(self, tasks: list[TaskSpec], started: Callable[[TaskSpec], None]) -> Any:  # Iterator[dict]
        raise NotImplementedError

    def abort(self) -> None:
        """Stop every task still running (called on SIGTERM / Ctrl-C / an error in the driver)."""

    def close(self) -> None:
        """Release the engine's resources after a run whose every task has reported."""


class LocalEngine(Engine):
    """Tasks in ``workers`` spawned processes of this machine (one torch thread each, each exiting when this
    process dies), first in first out: the teachers first, then each seed's cells once its teacher is done;
    ``workers = 1`` runs them one after another in this process (the payload passed on without a copy)."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = int(workers)
        self.pool: ProcessPoolExecutor | None = None

    def results(self, tasks: list[TaskSpec], started: Callable[[TaskSpec], None]) -> Any:
        if self.workers == 1:
            queue: deque = deque((t, None) for t in tasks)
            while queue:
                spec, payload = queue.popleft()
                started(spec)
                res = run_task(spec, payload)
                pay = res.pop("payload", None)
                queue.extend((c, _part(pay, c)) for c in res.get("next", []))
                yield res
            return
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                        initializer=_worker_init, initargs=(os.getpid(),))
        futs: dict[Any, TaskSpec] = {}
        failed: list[dict[str, Any]] = []

        def submit(spec: TaskSpec, payload: Any = None) -> None:
            try:
                futs[self.pool.submit(run_task, spec, payload)] = spec
                started(spec)
            except Exception as exc:  # noqa: BLE001 - a broken pool (a worker died): the task is failed
                failed.append(_failed(spec, f"{type(exc).__name__}: {exc}"))

        for t in tasks:
            submit(t)
        while futs or failed:
            while failed:
                yield failed.pop(0)
            if not futs:
                break
            done, _ = wait(list(futs), return_when=FIRST_COMPLETED)
            for fut in done:
                spec = futs.pop(fut)
                try:
                    res = fut.result()
                except Exception as exc:  # the worker process itself died
                    res = _failed(spec, f"{type(exc).__name__}: {exc}")
                pay = res.pop("payload", None)
                for c in res.get("next", []):
                    submit(c, _part(pay, c))
                yield res

    def abort(self) -> None:
        if self.pool is not None:
            _terminate_pool(self.pool)
            self.pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def make_engine(name: str, workers: int, address: str = "", echo: bool = True, **options: Any) -> Engine:
    """The engine called ``name`` (:data:`ENGINES`): ``local`` (process pool), ``ray`` (``address``: a cluster
    to join; empty: a local Ray instance with ``workers`` CPUs; ``options``: e.g. ``max_retries``)."""
    if name == "local":
        return LocalEngine(workers)
    if name == "ray":
        from .ray_engine import RayEngine  # imports ray only now: the local engine never needs it

        return RayEngine(workers=workers, address=address, echo=echo, **options)
    raise ConfigError(f"unknown engine {name!r}; choose one of {list(ENGINES)}")


def _failed(spec: TaskSpec, error: str) -> dict[str, Any]:
    """The result of a task that returned nothing (its worker died, or the engine lost it)."""
    where = "" if spec.unit == "seed" else f"{spec.name}: "
    return {"seed": spec.seed, "index": spec.index, "unit": spec.unit, "task": spec.name, "status": "failed",
            "error": where + error, "rows": [], "curves": [], "models": [], "time_s": 0.0}


def run(config_path: str | os.PathLike, quick: bool = False, runs_root: str | os.PathLike = "runs",
        models_root: str | os.PathLike = "models", workers: int | None = None, echo: bool = True,
        overwrite: bool = False, engine: str | None = None, address: str | None = None,
        engine_options: dict[str, Any] | None = None) -> Path:
    """Run an experiment file; returns the new run directory ``runs_root/NAME/<timestamp>/``.

    The kind's task units (a teacher task per seed, then its cells; a kind without units: one task per seed) run on
    the ``engine`` (default: the file's ``engine``, else ``local``): ``local`` runs them in ``workers`` spawned
    processes (one torch thread each; ``workers=1`` runs in this process); ``ray`` runs them as Ray tasks (one CPU,
    one torch thread each) on the cluster at ``address`` (default: the file's ``address``; empty: a local Ray
    instance with ``workers`` CPUs), a task whose worker died retried (``engine_options``: ``max_retries``). The
    run folder is filled the same way by both: rows, curves and summary rewritten as each task finishes. A failed
    task (a seed fails with it; a failed teacher runs no cells) does not stop the others; :class:`RunError` is
    raised at the end, after the summary of what finished has been written
    (:class:`pyro_distill.store.StorageError` instead when a seed failed for a full disk or a read-only
    folder). ``runs_root`` and ``models_root`` are checked writable before anything runs. ``overwrite`` lets a
    seed replace model folders that already exist under ``models_root/NAME-<timestamp>/`` (otherwise that is an
    error before any fit).
    """
    cfg = load_config(config_path, quick=quick)
    if workers is not None:  # whole-seed kinds cannot use more workers than seeds; kinds with task units can
        units = _get_kind(cfg["kind"]).units is not None
        cfg["workers"] = max(1, int(workers) if units else min(int(workers), len(cfg["seeds"])))
    if engine is not None:
        cfg["engine"] = engine
    if address is not None:
        cfg["address"] = address
    _check_engine(cfg["engine"], cfg["address"], "run()")
    kind = _get_kind(cfg["kind"])
    check_writable(runs_root, what="runs folder")
    check_writable(models_root, what="models folder")
    run_dir, stamp = _new_run_dir(Path(runs_root), cfg["name"])
    models_dir = Path(models_root) / f"{cfg['name']}-{stamp}"
    if models_dir.exists() and any(models_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{models_dir} already holds model folders; pass overwrite=True (CLI: --overwrite) or "
                              "use another --models folder")
    cfg_out = cfg | {"run_dir": str(run_dir), "models_dir": str(models_dir), "timestamp": stamp}
    atomic_write_text(run_dir / "config.json", json.dumps(cfg_out, indent=1))
    atomic_write_text(run_dir / "config.source.toml", Path(config_path).read_text())
    status = _Status(run_dir, {"status": "running", "started": datetime.now(UTC).isoformat(), "quick": quick,
                               "pid": os.getpid(), "host": socket.gethostname(), "heartbeat_s": HEARTBEAT_S,
                               "engine": cfg["engine"], "address": cfg["address"],
                               "seeds": {str(s): "pending" for s in cfg["seeds"]}, "errors": {},
                               "python": sys.version.split()[0]})
    merged = _Merged(cfg_out)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    unit = "seed" if kind.units is None else "teacher"
    args = [TaskSpec(kind.name, kind.module, cfg_out, s, str(run_dir), str(models_dir), echo, overwrite, unit)
            for s in cfg["seeds"]]
    status.start()
    old_handlers = _install_signals()
    eng: Engine | None = None
    bar = None

    def started(spec: TaskSpec) -> None:
        with status.lock:
            if status.data["seeds"][str(spec.seed)] == "pending":
                status.data["seeds"][str(spec.seed)] = "running"
        status.write()

    try:
        eng = make_engine(cfg["engine"], cfg["workers"], cfg["address"], echo=echo, **(engine_options or {}))
        from tqdm import tqdm

        from ..inference import _auto_progress  # a bar only on a terminal, none in CI or when piped

        bar = tqdm(total=len(args), unit="task", desc=f"{cfg['name']} [{eng.name}]",
                   disable=not (echo and _auto_progress(None)), file=sys.stderr)
        for res in eng.results(args, started):
            # one result per task: a task reported twice (retried after its first result) keeps the last
            if res.get("next"):
                bar.total += len(res["next"])
                bar.refresh()
            merged.add(res)
            results[:] = merged.seeds()
            _note(status, merged, res)
            if res["unit"] != "seed":
                merged.flush_seed(res["seed"])
            _write_tables(status.run_dir, cfg_out, results, partial=True)
            bar.update(1)
        eng.close()
    except BaseException as exc:  # KeyboardInterrupt, SIGTERM/SIGHUP included: mark, write what finished, re-raise
        if eng is not None:
            try:
                eng.abort()
            except Exception as aerr:  # noqa: BLE001 - the run is being marked interrupted whatever happens here
                print(f"pyro-distill run: stopping the {eng.name} engine: {aerr}", file=sys.stderr)
        if bar is not None:
            bar.close()
        status.close()
        status.data["status"] = "interrupted"
        status.data["interrupted_by"] = str(exc) if isinstance(exc, _Terminated) else type(exc).__name__
        _restore_signals(old_handlers)
        try:
            _finish(status, cfg_out, results, time.perf_counter() - t0)
        except OSError as werr:
            print(f"pyro-distill run: could not write the summary of {run_dir}: {werr}", file=sys.stderr)
        if isinstance(exc, _Terminated):
            raise KeyboardInterrupt(f"run {run_dir} interrupted by {exc}") from None
        raise
    bar.close()
    status.close()
    _restore_signals(old_handlers)
    failed = [r for r in results if r["status"] != "complete"]
    status.data["status"] = "failed" if failed else "complete"
    _finish(status, cfg_out, results, time.perf_counter() - t0)
    full = [r for r in failed if r.get("storage")]
    if full:
        err = full[0]["error"]  # "[<task>: ]StorageError: <what and the fix>"
        err = err.split("StorageError: ", 1)[1] if "StorageError: " in err else err.split(": ", 1)[-1]
        raise StorageError(errno.ENOSPC, f"{len(failed)} of {len(results)} seeds failed; seed {full[0]['seed']}: "
                           f"{err} (run directory {run_dir})")
    if failed:
        msgs = "; ".join(f"seed {r['seed']}: {r['error']}" for r in failed)
        raise RunError(f"{len(failed)} of {len(results)} seeds failed ({msgs}); see {run_dir}/seeds/*/error.txt")
    return run_dir


class _Merged:
    """The task results of a run merged per seed, in task order: a seed is ``running`` while its teacher or one of
    its cells is outstanding, then ``failed`` if any of its tasks failed (a failed teacher: its cells never run),
    else ``complete``."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.tasks: dict[int, dict[int, dict[str, Any]]] = {}
        self.outstanding: dict[int, set[int]] = {s: {0} for s in cfg["seeds"]}

    def add(self, res: dict[str, Any]) -> None:
        seed, nxt = res["seed"], res.pop("next", None) or []
        self.tasks.setdefault(seed, {})[res["index"]] = res
        self.outstanding[seed].discard(res["index"])
        self.outstanding[seed].update(c.index for c in nxt)

    def seed(self, seed: int) -> dict[str, Any]:
        tasks = [self.tasks[seed][i] for i in sorted(self.tasks[seed])]
        failed = [t for t in tasks if t["status"] != "complete"]
        state = "running" if self.outstanding[seed] else "failed" if failed else "complete"
        return {"seed": seed, "status": state, "error": "; ".join(t["error"] for t in failed) or None,
                "rows": [r for t in tasks for r in t["rows"]], "curves": [c for t in tasks for c in t["curves"]],
                "models": [m for t in tasks for m in t["models"]], "time_s": sum(t["time_s"] for t in tasks),
                "storage": any(t.get("storage") for t in failed), "tasks": len(tasks)}

    def seeds(self) -> list[dict[str, Any]]:
        return [self.seed(s) for s in self.cfg["seeds"] if s in self.tasks]

    def flush_seed(self, seed: int) -> None:
        """``seeds/seed<k>/metrics.json`` and ``curves.csv``: the seed's finished tasks merged in task order."""
        r, d = self.seed(seed), Path(self.cfg["run_dir"]) / "seeds" / f"seed{seed}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "metrics.json", json.dumps(r["rows"], indent=1))
            atomic_write_text(d / "curves.csv", _to_csv(r["curves"], _CURVE_COLS))
        except OSError:  # a full disk: the run-level tables report it at the end
            pass


def _note(status: _Status, merged: _Merged, res: dict[str, Any]) -> None:
    seed = merged.seed(res["seed"])
    with status.lock:
        status.data["seeds"][str(res["seed"])] = seed["status"]
        if seed["error"]:
            status.data["errors"][str(res["seed"])] = seed["error"]
        else:
            status.data["errors"].pop(str(res["seed"]), None)
        if res.get("attempt", 1) > 1:  # the engine retried the task (its worker died)
            key = str(res["seed"]) if res["unit"] == "seed" else f"{res['seed']}: {res['task']}"
            status.data.setdefault("attempts", {})[key] = res["attempt"]
        if res["unit"] != "seed":
            done = sum(len(t) for t in merged.tasks.values())
            status.data["tasks"] = {"done": done, "outstanding": sum(map(len, merged.outstanding.values()))}
            # the seconds inside each task ("<seed>: <task name>"), for sizing a sweep (benchmarks/sweep.py)
            status.data.setdefault("task_time_s", {})[f"{res['seed']}: {res['task']}"] = round(res["time_s"], 2)
    status.write()


def _finish(status: _Status, cfg: dict[str, Any], results: list[dict[str, Any]], elapsed: float) -> None:
    run_dir = status.run_dir
    results = sorted(results, key=lambda r: cfg["seeds"].index(r["seed"]))
    models_dir = Path(cfg["models_dir"])
    try:  # no empty model folders: a run (or seed) that saved nothing leaves no models/NAME-<timestamp>/
        if models_dir.is_dir() and not any(models_dir.iterdir()):
            models_dir.rmdir()
    except OSError:
        pass
    with status.lock:
        status.data["finished"] = datetime.now(UTC).isoformat()
        status.data["elapsed_s"] = round(elapsed, 1)
        status.data["seed_time_s"] = {str(r["seed"]): round(r["time_s"], 1) for r in results}
        status.data["models"] = [m for r in results for m in r["models"]]
    try:
        _write_tables(run_dir, cfg, results)
    finally:
        status.write()  # the final state, even when a table could not be written


def _write_tables(run_dir: Path, cfg: dict[str, Any], results: list[dict[str, Any]], partial: bool = False) -> None:
    """metrics.csv/.json, curves.csv and summary.md/.json of the seeds in ``results`` (in the config's seed
    order, whatever order they finished in). ``partial``: a refresh while the run goes on, so a reader sees each
    seed as soon as it finishes; a failed refresh (full disk) is left to the final write to report."""
    results = sorted(results, key=lambda r: cfg["seeds"].index(r["seed"]))
    rows = [r for res in results for r in res["rows"]]
    curves = [c for res in results for c in res["curves"]]
    try:
        atomic_write_text(run_dir / "metrics.json", json.dumps(rows, indent=1))
        atomic_write_text(run_dir / "metrics.csv", _to_csv(rows, _columns(rows)))
        atomic_write_text(run_dir / "curves.csv", _to_csv(curves, _CURVE_COLS))
        summ = summarize(rows)
        atomic_write_text(run_dir / "summary.json", json.dumps(summ, indent=1))
        atomic_write_text(run_dir / "summary.md", summary_markdown(summ, title=f"{cfg['name']} ({run_dir.name})",
                                                                  seeds=len(results)))
    except Exception:  # noqa: BLE001 - a refresh never stops a run; the final write raises what it meets
        if not partial:
            raise


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


def _age_s(iso: Any) -> float | None:
    try:
        t = datetime.fromisoformat(str(iso))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (datetime.now(UTC) - t).total_seconds()


def run_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's status.json with ``"state"`` added: the status as written, except that a ``running`` run whose
    process is gone (same host: its pid no longer exists) or whose heartbeat (else its start) is older than
    :data:`STALE_S` reads ``died`` (``"died_because"`` says why). No or unreadable status.json: ``unknown``."""
    path = Path(run_dir) / "status.json"
    try:
        s = json.loads(path.read_text())
        if not isinstance(s, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return {"state": "unknown", "reason": f"{path}: {exc}"}
    state = str(s.get("status", "unknown"))
    if state == "running":
        pid, host = s.get("pid"), s.get("host")
        age = _age_s(s.get("heartbeat") or s.get("started"))
        limit = max(STALE_S, 4 * float(s.get("heartbeat_s") or HEARTBEAT_S))
        if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
            state, s["died_because"] = "died", f"its process {pid} on {host} is gone"
        elif age is not None and age > limit:
            state, s["died_because"] = "died", f"no heartbeat for {age:.0f} s (limit {limit:.0f} s)"
    s["state"] = state
    return s


def latest_run(name: str, runs_root: str | os.PathLike = "runs", complete_only: bool = True,
               include_quick: bool = False) -> Path | None:
    """The newest run directory of experiment ``name``: state ``complete`` (unless ``complete_only=False``) and
    not a ``--quick`` smoke run (unless ``include_quick``)."""
    base = Path(runs_root) / name
    if not base.is_dir():
        return None
    for d in sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        s = run_state(d)
        if s["state"] == "unknown":
            continue
        if s.get("quick") and not include_quick:
            continue
        if not complete_only or s["state"] == "complete":
            return d
    return None
