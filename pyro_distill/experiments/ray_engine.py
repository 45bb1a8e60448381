"""The ``ray`` engine of the experiment runner: each task unit of a run is one Ray task (one CPU, one torch thread).

Units (:class:`pyro_distill.experiments.core.TaskSpec`): a kind with task units (the ``mlp`` protocol,
:mod:`.protocol`) runs each seed's teacher fit as one task, and, as soon as it finishes, each of that seed's cells
(student x fraction x method x tau) as its own task; the teacher's result (net, posterior, every student's plan and
prior) goes to its cells through Ray's object store (the teacher task's second return value, never fetched by the
driver), or, with ``teacher_via = "file"`` (``run(..., engine_options={"teacher_via": "file"})``), through
``seeds/seed<k>/teacher.pkl`` in the run folder (a shared filesystem on a cluster), which the cells read. A kind
that only registers ``run_seed`` (the compatibility path) runs each whole seed as one task.

``ray.init(address=...)``: without an address a local Ray instance with ``workers`` CPUs (no dashboard, quiet
logging) that lives as long as the run; with ``"auto"`` (the cluster this machine joined with ``ray start``) or
``"ray://HOST:10001"`` (Ray Client) it joins an existing cluster and leaves it running. When Ray is already
initialised in this process (a notebook, a test), that instance is used and left running.

The driver (this process) keeps the run folder: results come back through Ray's object store and are written by
:func:`pyro_distill.experiments.core.run` exactly as the local engine's are; each task also writes its own
``seeds/seed<k>/`` files and model folders, so on a multi-node cluster ``runs/`` and ``models/`` should be one
shared filesystem mounted at the same path on every node (otherwise those per-task files stay on the worker nodes;
metrics.csv and the summary on the driver are complete either way).

Fault tolerance: a task whose worker process dies (killed, out of memory, node lost) is re-run by Ray up to
``max_retries`` times; the driver receives one result per task, so each cell's rows appear once. A retried
attempt finds its ``attempt`` marker (``seeds/seed<k>/attempt`` for a whole seed,
``seeds/seed<k>/tasks/task<i>.attempt`` for a unit) left by the one before and may replace the model folders that
attempt saved. A task that raises is a failed task with its error (``status.json`` ``errors``), like the local
engine's; the other tasks go on.

Nothing here imports Ray at module level: ``import ray`` happens when a ray engine is made.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .core import ConfigError, Engine, TaskSpec, _failed, run_task

__all__ = ["RayEngine", "DEFAULT_MAX_RETRIES", "TEACHER_VIA", "import_ray"]

#: times Ray re-runs a task whose worker died (not a task that raised: that is a failed task)
DEFAULT_MAX_RETRIES = 3
#: how a teacher task's result reaches its cells: Ray's object store, or a file in the run folder
TEACHER_VIA = ("object_store", "file")


def import_ray() -> Any:
    """``ray``, or an error that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("engine = \"ray\" needs Ray: pip install -e \".[ray]\" (or pip install ray); "
                          f"or run with --engine local ({exc})") from None
    return ray


def _task(spec_bytes: bytes, payload_bytes: bytes | str | None, sys_path: list[str],
          teacher_via: str = "object_store") -> tuple[dict[str, Any], bytes | str | None]:
    """One task on a Ray worker: one torch thread, the driver's import path (so kinds registered from a script
    or a test module import here too), the attempt counted in its marker file. Returns ``(result, payload)``: a
    teacher's payload stays in the object store for its cells. The task and the payload travel pickled and are
    unpickled here, after the import path is set (they may hold objects of the kind's module); a ``str`` payload is
    the file a teacher wrote it to (``teacher_via = "file"``)."""
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    for p in sys_path:
        if p and p not in sys.path and os.path.isdir(p):
            sys.path.append(p)
    spec: TaskSpec = pickle.loads(spec_bytes)
    if isinstance(payload_bytes, str):
        payload_bytes = Path(payload_bytes).read_bytes()
    payload = pickle.loads(payload_bytes) if payload_bytes is not None else None
    seed_dir = Path(spec.run_dir) / "seeds" / f"seed{spec.seed}"
    marker = seed_dir / "attempt" if spec.unit == "seed" else seed_dir / "tasks" / f"task{spec.index}.attempt"
    try:
        attempt = int(marker.read_text()) + 1
    except (OSError, ValueError):
        attempt = 1
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(attempt))
    res = run_task(spec, payload, attempt)
    res["attempt"] = attempt
    payload = res.pop("payload", None)
    if payload is None:
        return res, None
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    if teacher_via == "file":
        path = seed_dir / "teacher.pkl"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a cell never reads a half-written file
        return res, str(path)
    return res, data


def _unwrapped(fn: Any, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``; an interrupt (SIGTERM's handler, Ctrl-C) raised inside Ray's compiled calls comes out
    as a SystemError caused by it: re-raise the interrupt itself, so the run is marked with its real cause."""
    try:
        return fn(*args, **kw)
    except SystemError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, BaseException) and not isinstance(cause, Exception):
            raise cause from None
        raise


class RayEngine(Engine):
    """Task units as Ray tasks (see the module docstring). ``workers``: CPUs of the local instance started when
    ``address`` is empty (ignored when joining a cluster: the cluster's CPUs bound the parallelism);
    ``max_retries``: re-runs of a task whose worker died; ``echo``: forward the workers' log lines;
    ``teacher_via``: how a teacher's result reaches its cells (``"object_store"`` or ``"file"``)."""

    name = "ray"

    def __init__(self, workers: int, address: str = "", echo: bool = True,
                 max_retries: int = DEFAULT_MAX_RETRIES, teacher_via: str = "object_store"):
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if teacher_via not in TEACHER_VIA:
            raise ConfigError(f"teacher_via must be one of {list(TEACHER_VIA)}, got {teacher_via!r}")
        self.teacher_via = teacher_via
        self.ray = import_ray()
        self.workers, self.address, self.echo, self.max_retries = int(workers), address, echo, max_retries
        self.owns = False  # True when this engine started (and so must stop) the Ray instance
        self.pending: list[Any] = []
        self.init_s = 0.0

    def start(self) -> None:
        """``ray.init`` unless Ray is already up in this process (then that instance is used as it is)."""
        ray = self.ray
        if ray.is_initialized():
            return
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": self.echo,
                              "logging_level": logging.ERROR}
        if self.address:
            kw["address"] = self.address
        else:
            kw["num_cpus"] = self.workers
        # ray.init installs its own SIGTERM handler (it exits the driver): put the runner's back, so that SIGTERM
        # marks the run interrupted and cancels the tasks, as with the local engine
        sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None), signal.SIGINT) if s is not None]
        saved = {s: signal.getsignal(s) for s in sigs} if threading.current_thread() is threading.main_thread() else {}
        try:
            ray.init(**kw)
        except ConnectionError as exc:
            raise ConfigError(f"could not join the Ray cluster at address {self.address!r}: {exc}; start one "
                              "with `ray start --head` (see README, Ray), or leave --address out for a local "
                              "instance") from None
        finally:
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)
        self.owns = True
        self.init_s = time.perf_counter() - t0

    def results(self, tasks: list[TaskSpec], started: Any) -> Any:
        ray = self.ray
        self.start()
        remote = ray.remote(_task).options(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False,
                                           num_returns=2)
        sys_path = [p for p in sys.path if p]
        refs: dict[Any, TaskSpec] = {}
        payloads: dict[Any, Any] = {}  # result ref -> its payload ref (held until the task's cells are submitted)
        self.pending = []

        def submit(spec: TaskSpec, payload: Any = None) -> None:
            res_ref, pay_ref = remote.remote(pickle.dumps(spec), payload, sys_path, self.teacher_via)
            refs[res_ref] = spec
            if spec.unit == "teacher":
                payloads[res_ref] = pay_ref
            self.pending.append(res_ref)
            started(spec)

        for t in tasks:
            submit(t)
        while self.pending:
            # a timeout, so that SIGTERM / Ctrl-C reach this (main) thread's handlers within a second
            ready, self.pending = _unwrapped(ray.wait, self.pending, num_returns=1, timeout=1.0)
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    res = _unwrapped(ray.get, ref)
                except ray.exceptions.RayTaskError as exc:  # the task raised past run_task (a BaseException)
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    res = _failed(spec, f"{type(cause).__name__}: {cause}")
                except ray.exceptions.RayError as exc:  # its worker died more than max_retries times, or lost
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    res = _failed(spec, f"{type(exc).__name__} after {self.max_retries} retries: {first}")
                pay_ref = payloads.pop(ref, None)
                for c in res.get("next", []):  # a teacher's cells get its payload from the object store
                    submit(c, pay_ref)
                yield res

    def abort(self) -> None:
        """Cancel the tasks still pending or running (their workers are killed), then stop an own instance."""
        for ref in self.pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        self.pending = []
        self.close()

    def close(self) -> None:
        if self.owns:
            self.ray.shutdown()
            self.owns = False
