"""The ``ray`` engine of the experiment runner (issue 17): the same metrics as the local process pool (the digits MLP
as task units: a teacher task per seed, one Ray task per cell), a worker killed mid-sweep retried without duplicated
rows (a whole seed, and a single cell), a task that raises recorded as failed, the CLI and TOML options, and no
``import ray`` unless the ray engine is asked for. One local Ray instance (2 CPUs) for the module:
Ray takes seconds to start."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (the dev extra has it)")

from pyro_distill.experiments import ConfigError, RunError, load_config, read_rows, register_kind, run  # noqa: E402
from pyro_distill.experiments.core import run_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for every test here; the engine finds it initialised and leaves it running."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _toml(tmp_path: Path, body: str, name: str = "exp") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(body)
    return p


# ---------------------------------------------------------------------------- a kind that dies or raises on demand
def _fragile_seed(cfg, seed, ctx):
    """Seed ``kill_seed`` SIGKILLs its own worker on its first attempt (a marker file says it did); seed
    ``fail_seed`` raises; every seed records two rows, one before and one after the fault point."""
    ctx.record({"setting": "s", "method": "before", "value": 10.0 * seed})
    marker = Path(cfg["train"]["marker_dir"]) / f"killed-seed{seed}"
    if seed == cfg["train"]["kill_seed"] and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    if seed == cfg["train"]["fail_seed"]:
        raise ValueError("boom")
    ctx.record({"setting": "s", "method": "after", "value": 10.0 * seed + 1})


register_kind("ray_fragile", {"train": {"marker_dir": "", "kill_seed": -1, "fail_seed": -1}}, _fragile_seed)


@dataclass(frozen=True)
class _Cell:
    seed: int
    index: int

    @property
    def name(self) -> str:
        return f"c{self.index}"


class _FragileUnits:
    """Task units: the teacher hands 3 cells a payload; cell ``kill_cell`` of seed ``kill_seed`` SIGKILLs its worker on
    its first attempt (after recording a row, so a duplicate would show); cell ``fail_cell`` raises."""

    def teacher(self, cfg, seed, ctx):
        ctx.record({"setting": "teacher", "method": "teacher", "value": float(seed)})
        return {"base": 10.0 * seed, "pid": os.getpid()}, [_Cell(seed, i) for i in (1, 2, 3)]

    def cell(self, cfg, cell, payload, ctx):
        t = cfg["train"]
        ctx.record({"setting": "s", "method": cell.name, "value": payload["base"] + cell.index})
        marker = Path(t["marker_dir"]) / f"killed-{cell.seed}-{cell.index}"
        if (cell.seed, cell.index) == (t["kill_seed"], t["kill_cell"]) and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if cell.index == t["fail_cell"]:
            raise ValueError("cell boom")


register_kind("ray_fragile_units", {"train": {"marker_dir": "", "kill_seed": -1, "kill_cell": -1, "fail_cell": -1}},
              units=_FragileUnits())


def test_units_a_killed_cell_is_retried_alone_and_every_cell_reports_once(tmp_path):
    """Teacher and cells as separate Ray tasks, the payload through the object store: the worker of cell 2 of seed 1
    is SIGKILLed mid-cell; Ray re-runs that cell only, and every (seed, task) row appears exactly once; cell 3 of
    every seed raises: each recorded failed with its error while the rest completes."""
    (tmp_path / "markers").mkdir()
    p = _toml(tmp_path, f'name = "fu"\nkind = "ray_fragile_units"\nseeds = 2\nengine = "ray"\n[train]\n'
                        f'marker_dir = "{tmp_path / "markers"}"\nkill_seed = 1\nkill_cell = 2\nfail_cell = 3\n')
    with pytest.raises(RunError, match=r"2 of 2 seeds failed \(seed 0: c3: ValueError: cell boom; "
                                       r"seed 1: c3: ValueError: cell boom\)"):
        run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    d = next((tmp_path / "runs" / "fu").iterdir())
    assert (tmp_path / "markers" / "killed-1-2").exists()  # the kill did happen
    rows = read_rows(d / "metrics.csv")
    assert [(r["seed"], r["method"], r["value"]) for r in rows] == [
        (0, "teacher", 0.0), (0, "c1", 1.0), (0, "c2", 2.0), (0, "c3", 3.0),
        (1, "teacher", 1.0), (1, "c1", 11.0), (1, "c2", 12.0), (1, "c3", 13.0)]
    s = json.loads((d / "status.json").read_text())
    assert s["attempts"] == {"1: c2": 2} and s["tasks"] == {"done": 8, "outstanding": 0}
    assert (d / "seeds" / "seed1" / "tasks" / "task2.attempt").read_text() == "2"
    assert (d / "seeds" / "seed1" / "tasks" / "task1.attempt").read_text() == "1"
    assert s["errors"] == {"0": "c3: ValueError: cell boom", "1": "c3: ValueError: cell boom"}


def test_units_teacher_result_through_a_file(tmp_path):
    """``teacher_via = "file"``: each teacher writes its result to seeds/seed<k>/teacher.pkl and its cells read it
    there (a shared filesystem instead of the object store): the same rows; a bad setting is a ConfigError."""
    p = _toml(tmp_path, 'name = "ff"\nkind = "ray_fragile_units"\nseeds = 2\nengine = "ray"\n')
    d = run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False,
            engine_options={"teacher_via": "file"})
    assert [(r["seed"], r["method"], r["value"]) for r in read_rows(d / "metrics.csv")] == [
        (0, "teacher", 0.0), (0, "c1", 1.0), (0, "c2", 2.0), (0, "c3", 3.0),
        (1, "teacher", 1.0), (1, "c1", 11.0), (1, "c2", 12.0), (1, "c3", 13.0)]
    assert all((d / "seeds" / f"seed{k}" / "teacher.pkl").is_file() for k in (0, 1))
    with pytest.raises(ConfigError, match=r"teacher_via must be one of \['object_store', 'file'\], got 'nfs'"):
        run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False,
            engine_options={"teacher_via": "nfs"})


def test_config_takes_engine_and_address(tmp_path):
    base = 'name = "e"\nkind = "ray_fragile"\nseeds = 2\n'
    cfg = load_config(_toml(tmp_path, base))
    assert cfg["engine"] == "local" and cfg["address"] == ""
    cfg = load_config(_toml(tmp_path, base + 'engine = "ray"\naddress = "auto"\n'))
    assert cfg["engine"] == "ray" and cfg["address"] == "auto"
    with pytest.raises(ConfigError, match=r"'engine' must be one of \['local', 'ray'\], got 'dask'"):
        load_config(_toml(tmp_path, base + 'engine = "dask"\n'))
    with pytest.raises(ConfigError, match='is a Ray cluster address; set engine = "ray"'):
        load_config(_toml(tmp_path, base + 'address = "auto"\n'))


def test_killed_worker_is_retried_and_a_raising_task_is_a_failed_seed(tmp_path):
    """Seed 1's worker is SIGKILLed mid-task (after it flushed a row): Ray re-runs it, and every (seed, method)
    row appears exactly once; seed 2 raises: recorded failed with its error while seeds 0 and 1 complete."""
    (tmp_path / "markers").mkdir()
    p = _toml(tmp_path, f'name = "frag"\nkind = "ray_fragile"\nseeds = 3\nengine = "ray"\n[train]\n'
                        f'marker_dir = "{tmp_path / "markers"}"\nkill_seed = 1\nfail_seed = 2\n')
    with pytest.raises(RunError, match=r"1 of 3 seeds failed \(seed 2: ValueError: boom\)"):
        run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    d = next((tmp_path / "runs" / "frag").iterdir())
    assert (tmp_path / "markers" / "killed-seed1").exists()  # the kill did happen
    rows = read_rows(d / "metrics.csv")
    keys = [(r["seed"], r["method"]) for r in rows]
    assert keys == [(0, "before"), (0, "after"), (1, "before"), (1, "after"), (2, "before")]
    assert [r["value"] for r in rows] == [0.0, 1.0, 10.0, 11.0, 20.0]
    s = json.loads((d / "status.json").read_text())
    assert s["status"] == "failed" and s["engine"] == "ray"
    assert s["seeds"] == {"0": "complete", "1": "complete", "2": "failed"}
    assert s["errors"] == {"2": "ValueError: boom"} and s["attempts"] == {"1": 2}
    assert (d / "seeds" / "seed1" / "attempt").read_text() == "2"
    assert len(json.loads((d / "seeds" / "seed1" / "metrics.json").read_text())) == 2  # the retry's rows only
    assert (d / "seeds" / "seed2" / "error.txt").read_text().strip().endswith("ValueError: boom")


def test_worker_dying_past_max_retries_is_a_failed_seed(tmp_path):
    (tmp_path / "markers").mkdir()
    p = _toml(tmp_path, f'name = "frag"\nkind = "ray_fragile"\nseeds = 2\nengine = "ray"\n[train]\n'
                        f'marker_dir = "{tmp_path / "markers"}"\nkill_seed = 0\n')
    with pytest.raises(RunError, match=r"seed 0: WorkerCrashedError after 0 retries"):
        run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False,
            engine_options={"max_retries": 0})
    d = next((tmp_path / "runs" / "frag").iterdir())
    assert [(r["seed"], r["method"]) for r in read_rows(d / "metrics.csv")] == [(1, "before"), (1, "after")]
    assert run_state(d)["state"] == "failed"


def test_cli_engine_ray(tmp_path, capsys):
    from pyro_distill.cli import main

    p = _toml(tmp_path, 'name = "c"\nkind = "ray_fragile"\nseeds = 2\n')
    code = main(["run", str(p), "--engine", "ray", "--workers", "2", "--runs", str(tmp_path / "runs"),
                 "--models", str(tmp_path / "models")])
    assert code == 0, capsys.readouterr().err
    d = next((tmp_path / "runs" / "c").iterdir())
    assert json.loads((d / "config.json").read_text())["engine"] == "ray"
    assert len(read_rows(d / "metrics.csv")) == 4
    code = main(["run", str(p), "--address", "auto", "--runs", str(tmp_path / "runs")])
    assert code == 1 and 'set engine = "ray"' in capsys.readouterr().err


DIGITS_TOML = """
name = "digits_tiny"
kind = "mlp"
seeds = 2
workers = 2
[data]
name = "digits"
[teacher]
sizes = [64, 8, 10]
map_steps = 40
steps = 3
num_particles = 2
[students]
narrow = [64, 5, 10]
[student]
map_steps = 10
steps = 3
num_particles = 2
[distill]
taus = [1.0, 10.0]
fractions = [0.5]
methods = ["teacher_prior", "standard_prior", "deterministic"]
[eval]
samples = 8
curve_every = 5
curve_samples = 4
[save]
methods = ["teacher"]
idata_draws = 0
"""


def test_ray_and_local_engines_write_identical_metrics(tmp_path):
    """The digits MLP (tiny budget), 2 seeds, on the local engine and on Ray (2 CPUs), one torch thread per task:
    every metrics column but the wall times is equal exactly, and so are the learning curves and the saved
    teachers. Each seed is a teacher task and 5 cell tasks (its Gaussian to the cells through the object store).
    Both engines run every task in a fresh worker process (``workers = 2``): a task run inside the test process
    could see state left by other test files in the same pytest worker (seen once under ``-n 2``)."""
    import torch

    from pyro_distill.store import load_model

    p = _toml(tmp_path, DIGITS_TOML, "digits_tiny")
    assert torch.get_num_threads() == 1  # tests/conftest.py
    d_local = run(p, runs_root=tmp_path / "local", models_root=tmp_path / "mlocal", echo=False, engine="local",
                  workers=2)
    d_ray = run(p, runs_root=tmp_path / "ray", models_root=tmp_path / "mray", echo=False, engine="ray")
    local, remote = read_rows(d_local / "metrics.csv"), read_rows(d_ray / "metrics.csv")
    assert len(local) == 2 * (2 + 2 + 2) and {r["seed"] for r in local} == {0, 1}
    assert list(local[0]) == list(remote[0])  # the same columns in the same order
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(local) == strip(remote)
    assert (d_local / "curves.csv").read_text() == (d_ray / "curves.csv").read_text()
    assert len(read_rows(d_local / "curves.csv")) > 0
    for seed in (0, 1):  # the saved teacher posteriors are equal exactly
        _, qa, _ = load_model(next((tmp_path / "mlocal").iterdir()) / f"teacher-seed{seed}")
        _, qb, _ = load_model(next((tmp_path / "mray").iterdir()) / f"teacher-seed{seed}")
        assert torch.equal(qa.mean, qb.mean) and torch.equal(qa.variance, qb.variance)
    assert json.loads((d_ray / "status.json").read_text())["status"] == "complete"


def test_nothing_imports_ray_unless_asked():
    """The package, the experiment kinds and the CLI parser load without Ray; only the ray engine imports it."""
    code = ("import sys\nfrom pyro_distill.cli import build_parser\nbuild_parser()\n"
            "import pyro_distill.experiments.ray_engine\nfrom pyro_distill.experiments import kinds\nkinds()\n"
            "from pyro_distill.experiments.core import make_engine\nmake_engine('local', 2)\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def _sleepy_seed(cfg, seed, ctx):
    ctx.seed_dir.mkdir(parents=True, exist_ok=True)
    (ctx.seed_dir / "pid").write_text(str(os.getpid()))
    time.sleep(cfg["train"]["sleep"])


register_kind("ray_sleepy", {"train": {"sleep": 120.0}}, _sleepy_seed)


def test_sigterm_marks_a_ray_run_interrupted_and_kills_its_tasks(tmp_path):
    """SIGTERM to the driver while both seeds sleep in Ray workers: the run is marked interrupted by SIGTERM, as a
    local run is, and the workers running the seeds are gone (force-cancelled). Last in the file: it kills the
    module's two warm workers."""
    p = _toml(tmp_path, 'name = "slow"\nkind = "ray_sleepy"\nseeds = 2\nengine = "ray"\n')
    pids: list[int] = []

    def terminate_when_running() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(pids) < 2:
            pids[:] = [int(t) for f in tmp_path.glob("runs/slow/*/seeds/seed*/pid") if (t := f.read_text())]
            time.sleep(0.1)
        if len(pids) == 2:  # only while the run (and so its SIGTERM handler) is live
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt, match="interrupted by received SIGTERM"):
        run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    assert len(pids) == 2
    d = next((tmp_path / "runs" / "slow").iterdir())
    s = run_state(d)
    assert s["state"] == "interrupted" and s["interrupted_by"] == "received SIGTERM"
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(q) for q in pids):
        time.sleep(0.2)
    assert not [q for q in pids if _alive(q)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
