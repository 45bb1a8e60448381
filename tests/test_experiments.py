"""The experiment runner, the mlp kind, figures, and the IDX loader."""

import errno
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pyro_distill.data.idx import IDX_FILES, fashion_mnist, read_idx, write_idx
from pyro_distill.experiments import ConfigError, RunError, latest_run, load_config, read_rows, register_kind, run
from pyro_distill.store import StorageError


def _dummy_seed(cfg, seed, ctx):
    ctx.log("start")
    for m in ("a", "b"):
        for t in range(3):
            ctx.curve("s", m, t, "accuracy", 0.1 * t + seed)
        ctx.record({"setting": "s", "method": m, "accuracy": 0.5 + 0.1 * seed, "nll": 1.0 + seed})
    if seed == cfg["train"]["fail_seed"]:
        raise ValueError("boom")
    if seed == cfg["train"]["interrupt_seed"]:
        raise KeyboardInterrupt


register_kind("dummy_test", {"train": {"steps": 10, "lr": 0.1, "fail_seed": -1, "interrupt_seed": -1},
                             "free": {}}, _dummy_seed)


def _toml(tmp_path, body, name="exp"):
    p = tmp_path / f"{name}.toml"
    p.write_text(body)
    return p


BASE = 'name = "exp"\nkind = "dummy_test"\nseeds = 2\nworkers = 1\n'


def test_unknown_keys_are_errors_naming_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.stepz'.*allowed keys in \[train\]: fail_seed, interrupt_seed, lr"):
        load_config(_toml(tmp_path, BASE + "[train]\nstepz = 3\n"))
    with pytest.raises(ConfigError, match="unknown config key 'bogus'.*allowed top-level keys"):
        load_config(_toml(tmp_path, BASE + "bogus = 1\n"))
    with pytest.raises(ConfigError, match="unknown key 'nope' in \\[quick\\]"):
        load_config(_toml(tmp_path, BASE + "[quick]\nnope = 1\n"))
    with pytest.raises(ConfigError, match="quick.train.lrr"):
        load_config(_toml(tmp_path, BASE + "[quick.train]\nlrr = 1\n"))
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(_toml(tmp_path, BASE + '[train]\nlr = "fast"\n'))
    with pytest.raises(ConfigError, match="unknown experiment kind"):
        load_config(_toml(tmp_path, 'kind = "no_such_kind"\n'))


def test_defaults_quick_overrides_and_free_tables(tmp_path):
    p = _toml(tmp_path, BASE + "[train]\nsteps = 5\n[free]\nanything = [1, 2]\n"
              "[quick]\nseeds = 1\n[quick.train]\nsteps = 1\n")
    cfg = load_config(p)
    assert cfg["seeds"] == [0, 1] and cfg["train"] == {"steps": 5, "lr": 0.1, "fail_seed": -1, "interrupt_seed": -1}
    assert cfg["free"] == {"anything": [1, 2]}
    q = load_config(p, quick=True)
    assert q["seeds"] == [0] and q["train"]["steps"] == 1 and q["quick"] is True


def test_run_directory_has_everything(tmp_path):
    p = _toml(tmp_path, BASE.replace("workers = 1", "workers = 2"))
    d = run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    assert d.parent == tmp_path / "runs" / "exp"
    for f in ("config.json", "config.source.toml", "status.json", "metrics.csv", "metrics.json", "curves.csv",
              "summary.md", "summary.json", "seeds/seed0/metrics.json", "seeds/seed1/log.txt"):
        assert (d / f).exists(), f
    assert json.loads((d / "status.json").read_text())["status"] == "complete"
    rows = read_rows(d / "metrics.csv")
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0, 1}
    assert len(read_rows(d / "curves.csv")) == 12
    summ = {(e["setting"], e["method"]): e for e in json.loads((d / "summary.json").read_text())}
    acc = summ[("s", "a")]["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.55) and acc["sd"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    assert "| s | a | 2 | 0.550 ± 0.071 |" in (d / "summary.md").read_text()
    d2 = run(p, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    assert d2 != d and latest_run("exp", tmp_path / "runs") == d2  # a new run never overwrites


def test_failed_or_interrupted_run_leaves_earlier_runs_intact(tmp_path):
    good = run(_toml(tmp_path, BASE), runs_root=tmp_path / "runs", models_root=tmp_path / "m", echo=False)
    before = {f: f.read_bytes() for f in good.rglob("*") if f.is_file()}
    with pytest.raises(RunError, match="seed 1: ValueError: boom"):
        run(_toml(tmp_path, BASE + "[train]\nfail_seed = 1\n"), runs_root=tmp_path / "runs", echo=False)
    with pytest.raises(KeyboardInterrupt):
        run(_toml(tmp_path, BASE + "[train]\ninterrupt_seed = 1\n"), runs_root=tmp_path / "runs", echo=False)
    assert {f: f.read_bytes() for f in good.rglob("*") if f.is_file()} == before
    dirs = sorted((tmp_path / "runs" / "exp").iterdir())
    assert len(dirs) == 3
    statuses = [json.loads((x / "status.json").read_text())["status"] for x in dirs]
    assert statuses == ["complete", "failed", "interrupted"]
    assert (dirs[1] / "seeds" / "seed1" / "error.txt").read_text().strip().endswith("ValueError: boom")
    assert len(read_rows(dirs[2] / "metrics.csv")) == 2  # seed 0 finished before the interruption
    assert latest_run("exp", tmp_path / "runs") == good


@dataclass(frozen=True)
class _UnitCell:
    seed: int
    index: int

    @property
    def name(self) -> str:
        return f"c{self.index}"


class _Units:
    """Task units without any fitting: the teacher records a row and hands its cells a payload; cell ``fail_cell``
    of seed ``fail_seed`` raises; seed ``teacher_fail_seed``'s teacher raises."""

    def teacher(self, cfg, seed, ctx):
        ctx.record({"setting": "teacher", "method": "teacher", "value": float(seed)})
        if seed == cfg["train"]["teacher_fail_seed"]:
            raise ValueError("no teacher")
        return {"base": 10.0 * seed}, [_UnitCell(seed, i) for i in range(1, cfg["train"]["cells"] + 1)]

    def cell(self, cfg, cell, payload, ctx):
        ctx.curve("s", cell.name, 0, "accuracy", payload["base"])
        if (cell.seed, cell.index) == (cfg["train"]["fail_seed"], cfg["train"]["fail_cell"]):
            raise ValueError("cell boom") if not cfg["train"]["disk_full"] else OSError(errno.ENOSPC, "No space")
        ctx.record({"setting": "s", "method": cell.name, "value": payload["base"] + cell.index})


register_kind("units_test", {"train": {"cells": 3, "fail_seed": -1, "fail_cell": -1, "teacher_fail_seed": -1,
                                       "disk_full": False}}, units=_Units())


def test_task_units_run_teacher_then_cells_in_row_order_on_any_worker_count(tmp_path):
    """A kind with task units: the teacher once per seed, its cells after it with its payload; rows in task order
    whatever finished first; a failed cell fails its seed (named in the error) but not the other cells; a failed
    teacher runs no cells. workers = 1 (in-process) and 2 (a pool over all cells) write the same tables."""
    body = ('name = "u"\nkind = "units_test"\nseeds = 3\n[train]\ncells = 3\nfail_seed = 1\nfail_cell = 2\n'
            'teacher_fail_seed = 2\n')
    dirs = []
    for workers in (1, 2):
        with pytest.raises(RunError, match=r"2 of 3 seeds failed \(seed 1: c2: ValueError: cell boom; "
                                           r"seed 2: teacher: ValueError: no teacher\)"):
            run(_toml(tmp_path, body, "u"), runs_root=tmp_path / f"runs{workers}", models_root=tmp_path / "m",
                echo=False, workers=workers)
        dirs.append(next((tmp_path / f"runs{workers}" / "u").iterdir()))
    for d in dirs:
        rows = read_rows(d / "metrics.csv")
        assert [(r["seed"], r["method"], r["value"]) for r in rows] == [
            (0, "teacher", 0.0), (0, "c1", 1.0), (0, "c2", 2.0), (0, "c3", 3.0),
            (1, "teacher", 1.0), (1, "c1", 11.0), (1, "c3", 13.0), (2, "teacher", 2.0)]
        s = json.loads((d / "status.json").read_text())
        assert s["status"] == "failed" and s["seeds"] == {"0": "complete", "1": "failed", "2": "failed"}
        assert s["tasks"] == {"done": 4 + 4 + 1, "outstanding": 0}
        assert sorted(s["task_time_s"]) == ["0: c1", "0: c2", "0: c3", "0: teacher", "1: c1", "1: c2", "1: c3",
                                            "1: teacher", "2: teacher"]
        assert len(json.loads((d / "seeds" / "seed1" / "metrics.json").read_text())) == 3
        assert "ValueError: cell boom" in (d / "seeds" / "seed1" / "error.txt").read_text()
        assert len(read_rows(d / "curves.csv")) == 3 + 3
    assert (dirs[0] / "metrics.csv").read_text() == (dirs[1] / "metrics.csv").read_text()
    assert (dirs[0] / "curves.csv").read_text() == (dirs[1] / "curves.csv").read_text()
    assert load_config(_toml(tmp_path, body, "u"))["workers"] == (os.cpu_count() or 1)  # not capped by seeds
    one = body.replace("seeds = 3", "seeds = 1").replace("teacher_fail_seed = 2", "teacher_fail_seed = -1")
    one = one.replace("fail_seed = 1", "fail_seed = -1")
    d1 = run(_toml(tmp_path, one, "u1"), runs_root=tmp_path / "runs_one", models_root=tmp_path / "m", echo=False,
             workers=2)  # one seed, two workers: its cells still run in a pool of 2 (not capped by the seeds)
    assert json.loads((d1 / "config.json").read_text())["workers"] == 2
    # a cell that meets a full disk: the run ends with the one StorageError line, as a whole seed does
    full = body.replace("teacher_fail_seed = 2\n", "disk_full = true\n")
    with pytest.raises(StorageError, match=r"1 of 3 seeds failed; seed 1: \[Errno 28\] no space left on the device "
                                           r"holding .*free some space or choose another output folder"):
        run(_toml(tmp_path, full, "u"), runs_root=tmp_path / "runs3", models_root=tmp_path / "m", echo=False,
            workers=1)


MLP_TOML = """
name = "tiny"
kind = "mlp"
seeds = 1
workers = 1
[data]
name = "synthetic_classification"
n_train = 80
n_test = 60
n_features = 4
n_classes = 3
[teacher]
sizes = [4, 6, 6, 3]
map_steps = 60
steps = 3
[students]
both = [4, 3, 3]
[student]
map_steps = 15
steps = 3
[distill]
taus = [1.0, 10.0]
fractions = [0.5, 1.0]
[eval]
samples = 10
curve_every = 6
curve_samples = 4
[save]
methods = ["teacher", "teacher_prior", "standard_prior"]
fractions = [0.5]
idata_draws = 40
"""


def test_mlp_kind_runs_every_method_and_figures(tmp_path):
    from pyro_distill.plots.experiments import make_all
    from pyro_distill.store import load_model

    d = run(_toml(tmp_path, MLP_TOML, "tiny"), runs_root=tmp_path / "runs", models_root=tmp_path / "models",
            echo=False)
    rows = read_rows(d / "metrics.csv")
    methods = {r["method"] for r in rows}
    assert methods == {"teacher", "teacher_map", "teacher_prior(tau=1)", "teacher_prior(tau=10)", "reduced_posterior",
                       "standard_prior", "standard_prior_cond_init", "deterministic", "kd", "prune_finetune"}
    students = [r for r in rows if r["student"] == "both"]
    assert len(students) == 2 * 8 and all(r["params"] == 4 * 3 + 3 + 3 * 3 + 3 for r in students)
    assert all(0 <= r["accuracy"] <= 1 and r["nll"] > 0 for r in rows)
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert len(models) == 1 and models[0].startswith("tiny-")
    saved = sorted(p.name for p in (tmp_path / "models" / models[0]).iterdir())
    assert saved == ["both-f0.5-standard_prior-seed0", "both-f0.5-teacher_prior-tau=1-seed0",
                     "both-f0.5-teacher_prior-tau=10-seed0", "teacher-seed0"]
    run_models = tmp_path / "models" / models[0]
    # only a student fitted under the teacher-derived prior carries it: the standard-prior one used the fan-in
    assert (run_models / "both-f0.5-teacher_prior-tau=10-seed0" / "prior.pt").exists()
    assert not (run_models / "both-f0.5-standard_prior-seed0" / "prior.pt").exists()
    # every saved model has its ArviZ InferenceData beside it, on the data it was fitted to
    from pyro_distill.diagnostics import load_idata

    idata = load_idata(run_models / "both-f0.5-teacher_prior-tau=10-seed0")
    n_half = next(r["n_train"] for r in rows if r["setting"] == "both frac=0.5")  # the stratified half
    # 40 independent draws of q, split into 4 chains x 10 for ArviZ (diagnostics.chain_split)
    assert (idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]) == (4, 10)
    assert idata.attrs["num_observations"] == n_half < 80
    assert load_idata(run_models / "teacher-seed0").attrs["num_observations"] == 80
    net, q, card = load_model(tmp_path / "models" / models[0] / "teacher-seed0")
    assert net.sizes == [4, 6, 6, 3] and card["seed"] == 0
    made = make_all(tmp_path / "runs", tmp_path / "figs")
    names = {p.name for p in made}
    assert {"tiny_curves_both_frac_0.5.png", "tiny_fraction_both.png", "tiny_summary.md"} <= names
    assert (tmp_path / "figs" / "README.md").exists()


def test_mlp_kind_rejects_bad_students(tmp_path):
    bad = MLP_TOML.replace("both = [4, 3, 3]", 'both = "wide"')
    with pytest.raises(RunError, match="students.both must be a list"):
        run(_toml(tmp_path, bad, "tiny"), runs_root=tmp_path / "runs", models_root=tmp_path / "m", echo=False)


def _write_tiny_fashion(folder, n_train=40, n_test=20):
    g = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / IDX_FILES["train_images"], g.integers(0, 256, (n_train, 5, 5)))
    write_idx(folder / IDX_FILES["train_labels"], np.arange(n_train) % 10)
    write_idx(folder / IDX_FILES["test_images"], g.integers(0, 256, (n_test, 5, 5)))
    write_idx(folder / IDX_FILES["test_labels"], np.arange(n_test) % 10)


def test_idx_loader_on_tiny_files(tmp_path, monkeypatch):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.idx.gz", arr)), arr)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.idx", arr)), arr)
    (tmp_path / "bad.gz").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    _write_tiny_fashion(tmp_path / "data" / "fashion_mnist")
    monkeypatch.setenv("PYRO_DISTILL_DATA", str(tmp_path / "data"))
    ds = fashion_mnist(pca=6)
    assert ds.X.shape == (40, 6) and ds.Xte.shape == (20, 6) and ds.num_classes == 10
    assert ds.y.dtype == torch.long and "PCA to 6" in ds.description
    full = fashion_mnist(tmp_path / "data", pca=0, max_train=30)
    assert full.X.shape == (30, 25) and torch.allclose(full.X.mean(0), torch.zeros(25), atol=1e-5)


def test_idx_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.delenv("PYRO_DISTILL_DATA", raising=False)
    monkeypatch.setattr("pyro_distill.data.idx.SYSTEM_DIRS", ())  # the Debian package may be installed here
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist(tmp_path)
    msg = str(e.value)
    for f in IDX_FILES.values():
        assert f in msg
    assert "github.com/zalandoresearch/fashion-mnist" in msg and "PYRO_DISTILL_DATA" in msg
    assert os.fspath(tmp_path) in msg
