"""The model folder and the one data registry: every kind's saved models (MLP, RNN, transformer) are re-diagnosed
by `pyro-distill diagnose models/<run>` on exactly the data they were fitted to (the card's data spec), specs
rebuild their data bit for bit (non-default sizes, Fashion-MNIST's pca / max_train), and store owns the folder
format (names, prior.pt, cards)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_distill import store
from pyro_distill.data import specs
from pyro_distill.data.idx import IDX_FILES, fashion_mnist, write_idx
from pyro_distill.data.tabular import subsample, synthetic_classification, synthetic_regression
from pyro_distill.gaussian import DiagGaussian
from pyro_distill.nets import MLP


def _same(a, b) -> bool:
    return all(torch.equal(x, z) and x.dtype == z.dtype for x, z in zip(a, b))


def _run(tmp_path: Path, toml: str, name: str) -> Path:
    """Run a tiny experiment; returns its models folder (models/<experiment>-<timestamp>)."""
    from pyro_distill.experiments.core import run

    (tmp_path / f"{name}.toml").write_text(toml)
    run(tmp_path / f"{name}.toml", runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    (models,) = (tmp_path / "models").iterdir()
    return models


def _diagnose(models: Path, out: Path, draws: int) -> dict:
    from pyro_distill.cli import main

    assert main(["diagnose", str(models), "--draws", str(draws), "--no-figures", "--out", str(out)]) == 0
    res = json.loads((out / "diagnose_run.json").read_text())
    assert all(np.isfinite(r["elpd_loo"]) for r in res["rows"])
    return res


# ============================================================================ the registry
def test_synthetic_specs_rebuild_non_default_sizes_and_steps():
    spec = {"name": "synthetic_classification", "n_train": 37, "n_test": 11, "n_features": 5, "n_classes": 4,
            "split_seed": 3, "dtype": "float64"}
    ds = specs.load(spec)
    ref = synthetic_classification(n_train=37, n_test=11, n_features=5, n_classes=4, seed=3, dtype=torch.float64)
    assert _same(ds, ref) and ds.X.shape == (37, 5) and ds.Xte.shape == (11, 5)
    full = specs.complete(spec)
    assert full == specs.complete(json.loads(json.dumps(full)))  # plain JSON, a fixed point
    assert _same(specs.load(full), ref)
    reg = specs.load({"name": "synthetic_regression", "n_train": 23, "n_test": 7, "n_features": 3, "noise": 0.1})
    assert _same(reg, synthetic_regression(n_train=23, n_test=7, n_features=3, noise=0.1))
    # the steps after the generator: validation carve-out, then the training subsample (the MLP kind's order)
    sub = specs.load(full | {"validation": 0.25, "validation_seed": 1, "fraction": 0.5, "subsample_seed": 2})
    want = subsample(specs.validation_split(ref, 0.25, 1), 0.5, seed=2)
    assert _same(sub, want) and sub.Xte.shape[0] < 37
    perm = specs.load(full | {"fraction": 0.5, "subsample": "permutation", "subsample_seed": 4})
    idx = torch.randperm(37, generator=torch.Generator().manual_seed(4))[:18].sort().values  # round(18.5) = 18
    assert torch.equal(perm.X, ref.X[idx]) and torch.equal(perm.Xte, ref.Xte)
    with pytest.raises(ValueError, match=r"unknown keys \['n_trian'\].*allowed"):
        specs.complete({"name": "digits", "n_trian": 5})
    with pytest.raises(ValueError, match="unknown data set 'nope'.*digits"):
        specs.load("nope")
    with pytest.raises(ValueError, match="fraction must lie in"):
        specs.complete({"name": "digits", "fraction": 0})


def test_fashion_spec_rebuilds_pca_and_stratified_max_train(tmp_path, monkeypatch):
    from pyro_distill.data import idx as idx_mod

    g = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()
    write_idx(d / IDX_FILES["train_images"], g.integers(0, 256, (60, 4, 4)))
    write_idx(d / IDX_FILES["train_labels"], np.arange(60) % 10)
    write_idx(d / IDX_FILES["test_images"], g.integers(0, 256, (30, 4, 4)))
    write_idx(d / IDX_FILES["test_labels"], np.arange(30) % 10)
    monkeypatch.setattr(idx_mod, "SYSTEM_DIRS", ())
    monkeypatch.delenv("PYRO_DISTILL_DATA", raising=False)
    spec = {"name": "fashion_mnist", "dir": str(d), "pca": 6, "max_train": 20, "split_seed": 1}
    ds = specs.load(spec)
    assert _same(ds, fashion_mnist(d, pca=6, max_train=20, seed=1)) and ds.X.shape == (20, 6)
    assert ds.Xte.shape == (30, 6)
    small = specs.load(spec | {"max_test": 10})  # the CNN kind's stratified test subset
    assert small.Xte.shape == (10, 6) and torch.equal(small.X, ds.X)
    # the experiment [data] table of the mlp kind names the same spec (its other sets' keys dropped)
    from pyro_distill.experiments.mlp import DEFAULTS, load_data

    table = DEFAULTS["data"] | {"name": "fashion_mnist", "dir": str(d), "pca": 6, "max_train": 20, "split_seed": 1}
    assert specs.from_table(table) == specs.complete(spec)
    assert _same(load_data(table, torch.float32), ds)
    # a card holding that spec is diagnosed on that data
    net = MLP([6, 3, 10])
    p = net.num_params
    q = DiagGaussian(torch.zeros(p), 0.1 * torch.ones(p), layout=net.layout)
    store.save_model(tmp_path / "m", net, q, {"data": specs.from_table(table)})
    m = store.open_model(tmp_path / "m")
    assert m.data_spec == specs.complete(spec) and m.prior is None
    from pyro_distill.cli import main

    assert main(["diagnose", str(tmp_path / "m"), "--draws", "8", "--no-figures", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "diagnose.json").read_text())["rows"][0]["n_obs"] == 20


# ============================================================================ the folder
def test_store_names_prior_and_card(tmp_path):
    assert store.model_folder_name("both-f0.1-teacher_prior-tau=1", 3) == "both-f0.1-teacher_prior-tau=1-seed3"
    for name, seed in (("teacher", 0), ("a-seed-b", 12), ("x-seed1", 2)):
        assert store.parse_model_folder_name(store.model_folder_name(name, seed)) == (name, seed)
    assert store.parse_model_folder_name("by-hand") == ("by-hand", 0)
    with pytest.raises(ValueError, match="plain folder name"):
        store.model_folder_name("a/b", 0)
    net = MLP([3, 4, 2])
    p = net.num_params
    q = DiagGaussian(torch.zeros(p), torch.ones(p))
    prior = DiagGaussian(torch.full((p,), 0.5), torch.full((p,), 2.0))
    folder = store.save_model(tmp_path / "m", net, q, {"data": {"name": "digits"}}, prior=prior)
    card = json.loads((folder / store.CARD_FILE).read_text())
    assert card[store.PRIOR_FINGERPRINT_KEY] == store.fingerprint(folder / store.PRIOR_FILE)
    m = store.open_model(folder)
    assert m.has_prior and torch.equal(m.prior.loc, prior.loc) and m.prior_source.endswith(store.PRIOR_FILE)
    assert m.data_spec == {"name": "digits"} and store.model_folders(tmp_path) == [folder]
    DiagGaussian(torch.zeros(p), torch.ones(p)).save(folder / store.PRIOR_FILE, overwrite=True)  # replaced behind
    with pytest.raises(ValueError, match="prior.pt is not the file card.json describes"):
        store.open_model(folder)


# ============================================================================ every kind, re-diagnosed
MLP_TOML = """
name = "mlp_tiny"
kind = "mlp"
seeds = 1
workers = 1
[data]
name = "synthetic_classification"
n_train = 60
n_test = 30
n_features = 5
n_classes = 3
split_seed = 2
[teacher]
sizes = [5, 6, 6, 3]
guide = "diag"
map_steps = 5
steps = 2
num_particles = 1
[students]
small = [5, 4, 3]
[student]
guide = "diag"
map_steps = 3
steps = 2
num_particles = 1
[distill]
taus = [1.0]
fractions = [0.5]
methods = ["teacher_prior", "standard_prior"]
[eval]
samples = 4
curve_every = 0
[save]
methods = ["teacher", "teacher_prior", "standard_prior"]
fractions = [0.5]
idata_draws = 8
"""


def test_mlp_run_rediagnosed_on_its_own_sizes(tmp_path):
    models = _run(tmp_path, MLP_TOML, "mlp")
    teacher = store.open_model(models / store.model_folder_name("teacher", 0))
    assert teacher.data_spec == specs.complete({"name": "synthetic_classification", "n_train": 60, "n_test": 30,
                                                "n_features": 5, "n_classes": 3, "split_seed": 2})
    res = _diagnose(models, tmp_path / "out", 8)
    n_obs = {r["model"]: r["n_obs"] for r in res["rows"]}
    assert n_obs["teacher-seed0"] == 60  # the configured size, not the generator's default 1000
    assert 25 <= n_obs["small-f0.5-teacher_prior-tau=1-seed0"] <= 35  # its own stratified half
    assert "small-f0.5-teacher_prior-tau=1-seed0 prior" in n_obs  # the conditioned teacher's row


RNN_TOML = """
name = "rnn_tiny"
kind = "rnn"
seeds = 1
workers = 1
tasks = ["digit_sum"]
methods = ["teacher_prior", "standard_prior"]
idata_draws = 8
[data]
n_train = 30
n_val = 6
n_test = 6
[net]
emb = 3
hidden = 4
attn = 2
[teacher]
map_steps = 3
steps = 2
rank = 2
[student]
steps = 2
rank = 2
fractions = [1.0, 0.5]
[eval]
every = 2
samples = 2
"""


def test_rnn_run_rediagnosed(tmp_path):
    models = _run(tmp_path, RNN_TOML, "rnn")
    card = store.open_model(models / store.model_folder_name("digit_sum-frac=0.5-teacher_prior", 0)).card
    assert card["data"]["name"] == "digit_sum" and card["data"]["subsample"] == "permutation"
    res = _diagnose(models, tmp_path / "out", 8)
    n_obs = {r["model"]: r["n_obs"] for r in res["rows"]}
    assert n_obs["digit_sum-teacher-seed0"] == 30 and n_obs["digit_sum-frac=0.5-standard_prior-seed0"] == 15


TRANSFORMER_TOML = """
name = "tr_tiny"
kind = "transformer"
seeds = 1
workers = 1
task = "match"
n_train = 24
n_test = 12
methods = ["teacher_prior"]
rank = 2
batch_size = 8
num_particles = 1
eval_samples = 4
curve_points = 1
save_models = true
idata_draws = 8
[net]
d_model = 4
heads = [2, 1]
ffn = [true, true]
d_head = 2
d_ff = 4
[students]
one_head = { heads = [1, 1] }
[teacher]
map_steps = 3
steps = 2
[student]
map_steps = 2
steps = 2
fractions = [0.5]
"""


def test_transformer_run_rediagnosed(tmp_path):
    models = _run(tmp_path, TRANSFORMER_TOML, "tr")
    res = _diagnose(models, tmp_path / "out", 8)
    n_obs = {r["model"]: r["n_obs"] for r in res["rows"]}
    assert n_obs["transformer-teacher-seed0"] == 24
    assert n_obs["transformer-one_head-frac=0.5-seed0"] == 12  # 6 of each class (stratified half)
    assert "transformer-one_head-frac=0.5-seed0 prior" in n_obs


def test_diagnostics_imports_neither_data_nor_surgery():
    """The import rule (docs/DESIGN.md): diagnostics reads models through store; data and surgery come from callers."""
    import ast

    import pyro_distill.diagnostics as D

    for path in Path(D.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # `from .. import data` names the module in the aliases
                mods = [("." * node.level) + (node.module or a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                parts = m.lstrip(".").split(".")
                assert not (m.startswith("..") and parts[0] in ("data", "surgery")), f"{path.name} imports {m}"
                assert not m.startswith(("pyro_distill.data", "pyro_distill.surgery")), f"{path.name} imports {m}"
