"""The fault campaign of issue 14, case by case: each test reproduces a reported failure and asserts the
behaviour that replaced it (clear error text, intact published files, stale files rebuilt or refused,
``died`` runs, no orphan workers, no temporary files left behind)."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_distill import store
from pyro_distill.checks import LossGuard
from pyro_distill.diagnostics import diagnose_model_folder, load_idata
from pyro_distill.experiments import ConfigError, latest_run, load_config, register_kind, run
from pyro_distill.experiments.core import run_state
from pyro_distill.gaussian import DiagGaussian
from pyro_distill.inference import DivergenceError, fit_map, fit_posterior
from pyro_distill.nets.mlp import MLP
from pyro_distill.store import StorageError, load_model, save_model

REPO = Path(__file__).resolve().parents[1]


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _data(n=40, d=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() if k == 2 else torch.randint(0, k, (n,), generator=g)
    return X, y


# ============================================================================ 1. figures never publish a smoke run
def _fault_seed(cfg, seed, ctx):
    v = cfg["train"]["value"]
    for t in range(3):
        ctx.curve("s", "m", t, "accuracy", v + 0.01 * t)
    ctx.record({"setting": "s", "method": "m", "accuracy": v + 0.01 * seed, "nll": 1.0})


register_kind("fault_dummy", {"train": {"value": 0.5}}, _fault_seed)


def _toml(tmp_path: Path, name: str, value: float, extra: str = "") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'name = "{name}"\nkind = "fault_dummy"\nseeds = 2\nworkers = 1\n[train]\nvalue = {value}\n'
                 f"[quick]\nseeds = 1\n[quick.train]\nvalue = 0.1\n{extra}")
    return p


def test_figures_skip_quick_and_died_runs_and_keep_other_sections(tmp_path):
    from pyro_distill.plots.experiments import make_all

    runs, models, figs = tmp_path / "runs", tmp_path / "models", tmp_path / "figures"
    full = run(_toml(tmp_path, "exp", 0.9), runs_root=runs, models_root=models, echo=False)
    run(_toml(tmp_path, "other", 0.7), runs_root=runs, models_root=models, echo=False)
    figs.mkdir()
    (figs / "README.md").write_text("# Figures\n\nintro\n\n## transformer (merged by hand)\n\n![t](t.png)\n")
    make_all(runs, figs)
    published = (figs / "exp_summary.md").read_text()
    png = (figs / "exp_curves_s.png").read_bytes()
    assert f"from run `{full}`" in published and "0.905" in published
    time.sleep(1.1)  # a new timestamp for the next run directory
    quick = run(_toml(tmp_path, "exp", 0.9), quick=True, runs_root=runs, models_root=models, echo=False)
    assert json.loads((quick / "status.json").read_text())["quick"] is True
    assert latest_run("exp", runs) == full and latest_run("exp", runs, include_quick=True) == quick
    # a newer run that died (its process is gone) is skipped too
    dead = runs / "exp" / "99991231-000000"
    dead.mkdir()
    (dead / "status.json").write_text(json.dumps({"status": "running", "pid": _dead_pid(), "quick": False,
                                                  "host": socket.gethostname()}))
    notes: list[str] = []
    made = make_all(runs, figs, notes=notes)
    assert (figs / "exp_summary.md").read_text() == published  # the published table is intact
    assert (figs / "exp_curves_s.png").read_bytes() == png
    readme = (figs / "README.md").read_text()
    assert "## transformer (merged by hand)" in readme and "## other (run" in readme
    assert f"## exp (run `{full}`)" in readme
    assert (quick / "figures" / "exp_summary.md").exists()  # the smoke run's figures live in its own folder
    assert quick / "figures" / "exp_summary.md" in made
    assert any("quick run" in n for n in notes) and any("died" in n for n in notes)
    sources = json.loads((figs / "SOURCES.json").read_text())
    assert sources["exp_summary.md"] == str(full)
    assert not _temps(tmp_path)


# ============================================================================ 2. stale idata.nc is never reused
def test_stale_idata_is_rebuilt_and_corrupt_files_are_clear_errors(tmp_path):
    X, y = _data()
    net = MLP([3, 4, 2])
    p = net.num_params
    d = tmp_path / "m"
    save_model(d, net, DiagGaussian(torch.zeros(p, dtype=torch.float64), 0.1 * torch.ones(p, dtype=torch.float64)),
               {"data": "synthetic"})
    old = diagnose_model_folder(d, X, y, draws=20)
    assert old.attrs["posterior_sha256"] == store.fingerprint(d / "posterior.pt")
    save_model(d, net, DiagGaussian(torch.ones(p, dtype=torch.float64), 5 * torch.ones(p, dtype=torch.float64)),
               overwrite=True)
    with pytest.warns(RuntimeWarning, match="made from another posterior.pt.*rebuilt"):
        new = diagnose_model_folder(d, X, y, draws=20)
    assert new.attrs["posterior_sha256"] == store.fingerprint(d / "posterior.pt") != old.attrs["posterior_sha256"]
    assert load_idata(d).attrs["posterior_sha256"] == new.attrs["posterior_sha256"]  # the file was replaced
    assert not np.allclose(new.posterior["layer1.bias"].values, old.posterior["layer1.bias"].values)
    # other data: stale as well
    with pytest.warns(RuntimeWarning, match="another data"):
        diagnose_model_folder(d, X + 1, y, draws=20)
    # a posterior.pt changed behind the card's back (here: NaN written into it) is refused by name
    payload = torch.load(d / "posterior.pt", weights_only=False)
    payload["tensors"]["loc"][0] = float("nan")
    torch.save(payload, d / "posterior.pt")
    with pytest.raises(ValueError, match="not the file card.json describes"):
        load_model(d)
    with pytest.raises(ValueError, match="NaN"):
        load_model(d, verify=False)
    # a corrupt idata.nc and a card whose "net" is a list: one clear error each
    d2 = tmp_path / "m2"
    save_model(d2, net, DiagGaussian(torch.zeros(p), torch.ones(p)))
    (d2 / "idata.nc").write_bytes(b"garbage, not netCDF")
    with pytest.raises(ValueError, match="idata.nc is corrupt.*--overwrite"):
        diagnose_model_folder(d2, X.float(), y, draws=5)
    assert diagnose_model_folder(d2, X.float(), y, draws=5, overwrite=True).attrs["draws"] == 5
    card = json.loads((d2 / "card.json").read_text())
    (d2 / "card.json").write_text(json.dumps(card | {"net": [3, 4, 2]}))
    with pytest.raises(ValueError, match="\"net\" must be the network's config.*got list"):
        load_model(d2)
    assert not _temps(tmp_path)


# ============================================================================ 3. save writes what load reads
def test_save_with_numpy_and_path_metadata_loads_back_with_umask_modes(tmp_path):
    X, y = _data()
    net = MLP([3, 4, 2])
    q, _ = fit_posterior(net, X, y, guide="diag", steps=np.int64(3), map_steps=np.int64(2), num_particles=np.int32(2))
    assert type(q.meta["steps"]) is int
    q.meta["where"] = tmp_path  # a Path in meta
    d = tmp_path / "m"
    stale = d / ".posterior.pt.pd-999999999-abc.tmp"  # left by a killed save (no such pid)
    d.mkdir()
    stale.write_bytes(b"x" * 100)
    old = os.umask(0o027)
    try:
        save_model(d, net, q, {"steps": np.int64(3), "acc": np.float32(0.5), "path": Path("/x"), "t": (1, 2)})
    finally:
        os.umask(old)
    net2, q2, card = load_model(d)
    assert card["steps"] == 3 and card["acc"] == 0.5 and card["path"] == "/x" and card["t"] == [1, 2]
    assert card["posterior_sha256"] == store.fingerprint(d / "posterior.pt")
    torch.testing.assert_close(q2.loc, q.loc)
    for f in ("posterior.pt", "card.json"):
        assert (d / f).stat().st_mode & 0o777 == 0o640, f
    assert not stale.exists() and not _temps(tmp_path)
    with pytest.raises(ValueError, match=r"card\['bad'\].*not a JSON value"):
        save_model(tmp_path / "m3", net, q, {"bad": object()})
    assert not (tmp_path / "m3").exists()  # refused before anything was written
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(d, net, q)


# ============================================================================ 4. runs that die say so
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_run_whose_process_is_gone_or_silent_reads_died(tmp_path):
    d = tmp_path / "runs" / "exp" / "20260101-000000"
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"status": "running", "pid": _dead_pid(), "host": socket.gethostname(),
                                               "heartbeat": "2099-01-01T00:00:00+00:00"}))
    s = run_state(d)
    assert s["state"] == "died" and "is gone" in s["died_because"]
    (d / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "host": "elsewhere",
                                               "heartbeat": "2020-01-01T00:00:00+00:00"}))
    assert run_state(d)["state"] == "died" and "no heartbeat" in run_state(d)["died_because"]
    (d / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                               "heartbeat": "2099-01-01T00:00:00+00:00"}))
    assert run_state(d)["state"] == "running"
    assert latest_run("exp", tmp_path / "runs") is None


def test_diagnose_notes_a_model_from_a_died_or_quick_run(tmp_path, capsys):
    from pyro_distill.commands.diagnose import run_note

    d = tmp_path / "runs" / "exp" / "20260101-000000"
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"status": "running", "pid": _dead_pid(), "host": socket.gethostname()}))
    assert "whose state is died" in run_note({"run_dir": str(d)}, tmp_path / "m")
    assert "whose state is died" in capsys.readouterr().err
    (d / "status.json").write_text(json.dumps({"status": "complete", "quick": True}))
    assert "--quick smoke run" in run_note({"run_dir": str(d)}, tmp_path / "m")
    (d / "status.json").write_text(json.dumps({"status": "complete", "quick": False}))
    assert run_note({"run_dir": str(d)}, tmp_path / "m") is None and run_note({}, tmp_path / "m") is None


def test_live_run_records_pid_host_heartbeat(tmp_path):
    d = run(_toml(tmp_path, "exp", 0.5), runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    s = json.loads((d / "status.json").read_text())
    assert s["pid"] == os.getpid() and s["host"] == socket.gethostname() and s["heartbeat"] and not s["quick"]
    assert run_state(d)["state"] == "complete"
    assert not (tmp_path / "models").exists()  # nothing saved: no (empty) model folder, not even the root


SLOW_KIND = """
import os, time
from pyro_distill.experiments import register_kind

def run_seed(cfg, seed, ctx):
    ctx.seed_dir.mkdir(parents=True, exist_ok=True)
    (ctx.seed_dir / "pid").write_text(str(os.getpid()))
    time.sleep(cfg["train"]["sleep"])

register_kind("slow_fault", {"train": {"sleep": 120.0}}, run_seed)
"""


def _proc_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _start_slow_run(tmp_path: Path) -> subprocess.Popen:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "slowkind.py").write_text(SLOW_KIND)
    (tmp_path / "slow.toml").write_text('name = "slow"\nkind = "slow_fault"\nseeds = 2\nworkers = 2\n')
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import slowkind
        from pyro_distill.experiments import run
        run({str(tmp_path / "slow.toml")!r}, runs_root={str(tmp_path / "runs")!r},
            models_root={str(tmp_path / "models")!r}, echo=False)
    """)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", driver], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _worker_pids(tmp_path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> list[int]:
    deadline = time.time() + timeout
    pids: list[int] = []
    while time.time() < deadline and len(pids) < 2:
        pids = [int(t) for p in tmp_path.glob("runs/slow/*/seeds/seed*/pid") if (t := p.read_text())]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.2)
    assert len(pids) == 2, "the workers did not start in time"
    return pids


def _wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_proc_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _proc_alive(p)]


def test_sigterm_and_sigkill_leave_no_orphan_workers_and_an_honest_status(tmp_path):
    """Two real runs (2 seeds, 2 spawned workers each), started together: SIGTERM to one parent marks its
    run interrupted and terminates its workers; SIGKILL to the other leaves status "running", which
    readers show as died, and its workers end themselves (parent-death check)."""
    term, kill = _start_slow_run(tmp_path / "term"), _start_slow_run(tmp_path / "kill")
    term_pids, kill_pids = _worker_pids(tmp_path / "term", term), _worker_pids(tmp_path / "kill", kill)
    os.kill(term.pid, signal.SIGTERM)
    os.kill(kill.pid, signal.SIGKILL)
    term.communicate(timeout=60)
    kill.communicate(timeout=60)
    assert term.returncode != 0 and kill.returncode == -signal.SIGKILL
    assert _wait_gone(term_pids + kill_pids) == []
    run_dir = next((tmp_path / "term" / "runs" / "slow").iterdir())
    s = json.loads((run_dir / "status.json").read_text())
    assert s["status"] == "interrupted" and "SIGTERM" in s["interrupted_by"]
    assert run_state(run_dir)["state"] == "interrupted"
    run_dir = next((tmp_path / "kill" / "runs" / "slow").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"  # what the dead run left
    assert run_state(run_dir)["state"] == "died"
    for t in ("term", "kill"):  # nothing was saved: no (empty) model folders
        assert not (tmp_path / t / "models").exists()


def _saving_seed(cfg, seed, ctx):
    net = MLP([3, 4, 2])
    ctx.save_model("teacher", net, DiagGaussian(torch.zeros(net.num_params), torch.ones(net.num_params)))


register_kind("fault_saver", {"train": {"x": 0}}, _saving_seed)


def test_full_disk_is_one_clear_error_and_leaves_no_empty_model_folder(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('name = "s"\nkind = "fault_saver"\nseeds = 1\nworkers = 1\n')
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 1024)  # a full disk
    with pytest.raises(StorageError, match="only 0 MiB free") as info:
        run(cfg, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "models").glob("s-*/teacher-seed0"))  # no empty teacher folder
    run_dir = next((tmp_path / "runs" / "s").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    # torch's short-write RuntimeError on a full disk becomes the same one-line error
    err = store.storage_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4024"),
                              tmp_path / "x" / "posterior.pt")
    assert isinstance(err, StorageError) and err.errno == errno.ENOSPC and "no space left" in str(err)
    # when even error.txt cannot be written, the seed's error still reaches the user, in one stderr line
    from pyro_distill.experiments import core

    def no_space(path, text):
        raise StorageError(errno.ENOSPC, "no space left on the device")

    monkeypatch.setattr(store, "_free_bytes", lambda folder: 10**12)
    monkeypatch.setattr(core, "atomic_write_text", no_space)
    ctx = core.SeedContext(0, {}, tmp_path / "r", tmp_path / "m", echo=False)
    core._write_quietly(ctx, "Traceback ...\nValueError: boom\n")
    assert "ValueError: boom" in capsys.readouterr().err
    assert not _temps(tmp_path)


def test_unwritable_output_folders_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write into the models folder"):
        run(_toml(tmp_path, "exp", 0.5), runs_root=tmp_path / "runs", models_root=blocker / "models", echo=False)
    assert not (tmp_path / "runs" / "exp").exists()  # nothing started


# ============================================================================ CLI fit: --overwrite, checks up front
def test_cli_fit_refuses_existing_out_before_fitting_and_overwrites_on_request(tmp_path, monkeypatch, capsys):
    import pyro_distill.inference as inf
    from pyro_distill.cli import main

    out = tmp_path / "teacher"
    base = ["fit", "--out", str(out), "--sizes", "64,4,10", "--steps", "2", "--map-steps", "2", "--guide", "diag",
            "--idata-draws", "0"]
    assert main(base) == 0
    fp = json.loads((out / "card.json").read_text())["posterior_sha256"]
    real = inf.fit_posterior

    def must_not_fit(*a, **k):
        raise AssertionError("fitted before refusing")

    monkeypatch.setattr(inf, "fit_posterior", must_not_fit)
    assert main(base) == 1
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "f").write_text("")  # an --out under a file: unwritable, found before fitting
    try:  # one line on stderr (or the StorageError itself where the CLI does not catch it)
        assert main(base[:2] + [str(tmp_path / "f" / "sub" / "teacher")] + base[3:]) == 1
        assert "cannot write" in capsys.readouterr().err
    except StorageError as exc:
        assert "cannot write into the --out folder" in str(exc)
    monkeypatch.setattr(inf, "fit_posterior", real)
    assert main(base + ["--overwrite", "--seed", "1"]) == 0
    assert json.loads((out / "card.json").read_text())["posterior_sha256"] != fp
    assert main(base[:5] + ["--steps=-3"] + base[7:] + ["--overwrite"]) == 1
    assert "steps must be >= 0" in capsys.readouterr().err


# ============================================================================ config-time refusals
def test_config_refuses_bad_keys_and_values_before_any_fit(tmp_path):
    base = 'name = "t"\nkind = "mlp"\nseeds = 1\n[data]\nname = "digits"\n'
    p = tmp_path / "t.toml"
    for body, msg in [
        ('[students]\n"../x" = [64, 4, 10]\n', r"'\.\./x' is used in folder names"),
        ('[students]\n"a/b" = [64, 4, 10]\n', "plain name"),
        ("[students]\nok = [64, 4, 10]\n[teacher]\nsteps = -3\n", r"'teacher.steps' must be >= 0"),
        ("[students]\nok = [64, 4, 10]\n[teacher]\nmap_steps = -1\n", r"'teacher.map_steps' must be >= 0"),
        ("[students]\nok = [64, 4, 10]\n[teacher]\nlr = -1.0\n", r"'teacher.lr' must be a learning rate > 0"),
    ]:
        p.write_text(base + body)
        with pytest.raises(ConfigError, match=msg):
            load_config(p)
    p.write_text(base.replace('"digits"', '"digits"\ndtype = "float16"') + "[students]\nok = [64, 4, 10]\n")
    with pytest.raises(ConfigError, match="'data.dtype' must be one of.*half precision"):
        load_config(p)


# ============================================================================ 5. divergence guard and input checks
class Growing(MLP):
    """Outputs scaled by 1e4 more at every call: the loss grows by orders of magnitude."""

    calls = 0

    def forward(self, w, x):
        Growing.calls += 1
        return super().forward(w, x) * 1e4 ** (Growing.calls - 1)


def test_map_loss_growing_by_orders_of_magnitude_is_divergence():
    X, y = _data()
    Growing.calls = 0
    with pytest.raises(DivergenceError, match=r"MAP diverged at step \d+: the loss grew from .* lower lr") as info:
        fit_map(Growing([3, 4, 2]), X, y, steps=50)
    assert info.value.step >= 1 and torch.isfinite(info.value.last_good).all()


def test_linalg_failure_inside_svi_is_divergence_with_last_good_state(monkeypatch):
    import pyro_distill.inference as inf

    X, y = _data()
    net = MLP([3, 4, 2])
    real, calls = inf.elbo_terms, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")
        return real(*a, **k)

    monkeypatch.setattr(inf, "elbo_terms", failing)
    with pytest.raises(DivergenceError, match=r"SVI diverged at step 2: _?LinAlgError.*cholesky.*last good") as info:
        fit_posterior(net, X, y, guide="lowrank", steps=10, map_steps=3, rank=2, num_particles=2, cov_init="prior")
    err = info.value
    assert err.step == 2 and err.last_good.meta["step"] == 0
    assert all(torch.isfinite(t).all() for t in err.last_good._tensors().values())


@pytest.mark.parametrize("guide", ["lowrank", "mvn"])
def test_absurd_learning_rate_is_divergence_for_every_guide(guide):
    X, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DivergenceError, match="SVI diverged at step"):
            fit_posterior(MLP([3, 4, 2]), X, y, guide=guide, steps=200, lr=1e3, factor_lr=1e3, map_steps=5, rank=2,
                          num_particles=2, cov_init="prior")


def test_loss_guard_threshold():
    g = LossGuard(factor=1e3)
    assert not g.exploded(2.0) and not g.exploded(1999.0) and g.exploded(2003.0)
    g = LossGuard()
    assert not g.exploded(-0.5) and not g.exploded(500.0) and g.exploded(1000.0)  # |start| < 1: scale 1


def test_bad_inputs_are_clear_errors_naming_the_fix():
    X, y = _data()
    net = MLP([3, 4, 2])
    kw = dict(steps=1, map_steps=1, guide="diag")
    cases = [
        (dict(steps=-3), "steps must be >= 0"),
        (dict(map_steps=-1), "map_steps must be >= 0"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(lr=-1.0), "lr must be a finite number > 0"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(dtype=torch.float16), "half precision.*float32 or torch.float64"),
    ]
    for over, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fit_posterior(net, X, y, **(kw | over))
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    Xi = X.clone()
    Xi[0, 0] = float("inf")
    for Xb, yb, msg in [(Xn, y, r"X holds NaN or inf values \(in 1 of 40 rows\)"), (Xi, y, "X holds NaN or inf"),
                        (X[:0], y[:0], "training data are empty"), (X, y[:, None], r"y has shape \(40, 1\).*reshape"),
                        (X.half(), y, "half precision")]:
        with pytest.raises(ValueError, match=msg):
            fit_posterior(net, Xb, yb, **kw)
    reg = MLP([3, 4, 1], likelihood="gaussian", noise_scale=0.5)
    yr = X[:, 0].clone()
    yr[5] = float("nan")
    with pytest.raises(ValueError, match="y holds NaN or inf"):
        fit_posterior(reg, X, yr, **kw)
    with pytest.raises(ValueError, match="X holds NaN"):
        fit_map(net, Xn, y, steps=2)


def test_remove_neurons_refuses_non_integer_indices():
    from pyro_distill.surgery import SurgeryError
    from pyro_distill.surgery.mlp import remove_neurons

    with pytest.raises(SurgeryError, match=r"neuron indices must be integers, got \[1.7\]"):
        remove_neurons(MLP([3, 4, 4, 2]), 1, [1.7])
    assert remove_neurons(MLP([3, 4, 4, 2]), 1, [np.int64(1)]).neurons == (1,)


def test_idx_errors_name_the_file(tmp_path):
    from pyro_distill.data.idx import IDX_FILES, fashion_mnist, read_idx, write_idx

    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"short.idx is truncated.*3 dimensions.*only 6 bytes"):
        read_idx(short)
    write_idx(tmp_path / IDX_FILES["train_images"], np.zeros((4, 2, 2)))
    write_idx(tmp_path / IDX_FILES["train_labels"], np.arange(4))
    write_idx(tmp_path / IDX_FILES["test_images"], np.zeros((3, 3, 3)))
    write_idx(tmp_path / IDX_FILES["test_labels"], np.arange(3))
    with pytest.raises(ValueError, match=r"t10k-images.*shape \(3, 3\) but the training images are \(2, 2\)"):
        fashion_mnist(tmp_path, pca=0)
