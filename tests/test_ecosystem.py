"""A Pyro / torch / ArviZ user's habits: numpy inputs, the CLI workflow end to end, ArviZ on a saved model,
fast ``--help``, the thread policy and short reprs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_distill as pd
from pyro_distill import baselines, cli, metrics
from pyro_distill.arrays import as_data, as_tensor
from pyro_distill.nets.mlp import MLP


@pytest.fixture(scope="module")
def small():
    """A small slice of digits as numpy arrays (int64 labels, float64 and float32 features)."""
    ds = pd.data.digits(seed=0)
    return ds.X[:200].numpy(), ds.y[:200].numpy(), ds.Xte[:100].numpy(), ds.yte[:100].numpy()


# ---------------------------------------------------------------- numpy inputs
def test_as_tensor_rule():
    assert as_tensor(np.zeros(3, dtype=np.float64)).dtype == torch.float64
    assert as_tensor(np.zeros(3, dtype=np.float16)).dtype == torch.float32
    assert as_tensor(np.zeros(3, dtype=np.float32)).dtype == torch.float32
    assert as_tensor(np.arange(3, dtype=np.int32)).dtype == torch.long
    assert as_tensor(np.arange(3)).dtype == torch.long
    assert as_tensor([0.5, 1.5]).dtype == torch.float64  # a Python float list is float64 in numpy
    t = torch.ones(2)
    assert as_tensor(t) is t  # tensors pass unchanged
    X, y = as_data(np.ones((2, 3), dtype=np.float32), np.array([0, 1]))
    assert X.dtype == torch.float32 and y.dtype == torch.long and torch.equal(y, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="convert it"):
        as_tensor(np.array(["a", "b"]))


def test_fit_posterior_and_metrics_on_numpy_match_tensors(small):
    X, y, Xte, yte = small
    assert y.dtype == np.int64  # the case that used to fail: "classification labels must be integers"
    net = MLP([64, 8, 10])
    qn, _ = pd.fit_posterior(net, X, y, guide="diag", steps=3, map_steps=5, progress=False)
    qt, _ = pd.fit_posterior(net, torch.from_numpy(X), torch.from_numpy(y), guide="diag", steps=3, map_steps=5,
                             progress=False)
    assert qn.dtype == torch.float32
    torch.testing.assert_close(qn.mean, qt.mean, rtol=0, atol=0)  # same seed, same data: identical
    rn = metrics.evaluate(net, qn, Xte, yte, num_samples=20)
    rt = metrics.evaluate(net, qt, torch.from_numpy(Xte), torch.from_numpy(yte), num_samples=20)
    assert rn == rt
    p = metrics.predict(net, qn, Xte, num_samples=20)
    assert p.shape == (100, 10)
    # float64 features keep float64 all the way through
    q64, _ = pd.fit_posterior(net, X.astype(np.float64), y, guide="diag", steps=2, map_steps=2, progress=False)
    assert q64.dtype == torch.float64


def test_map_distill_and_baselines_take_numpy(small):
    X, y, _, _ = small
    net = MLP([64, 8, 10])
    w, _ = pd.fit_map(net, X, y, steps=3, progress=False)
    assert w.shape == (net.num_params,)
    tp = metrics.predict(net, w, X).numpy()
    wk, _ = baselines.knowledge_distillation(net, X, y, tp, steps=2)
    wd, _ = baselines.deterministic(net, X, y, steps=2)
    assert wk.shape == wd.shape == (net.num_params,)
    teacher = MLP([64, 8, 8, 10])
    tq, _ = pd.fit_posterior(teacher, X, y, guide="diag", steps=2, map_steps=3, progress=False)
    res = pd.distill(teacher, tq, MLP([64, 8, 10]), X, y, guide="diag", steps=2, map_steps=2, progress=False)
    assert res.posterior.dim == MLP([64, 8, 10]).num_params
    r = repr(res)
    assert len(r) < 400 and "DistillResult" in r and "tensor(" not in r


def test_kd_raises_no_requires_grad_warning(small):
    import warnings

    X, y, _, _ = small
    net = MLP([64, 8, 10])
    tp = torch.full((X.shape[0], 10), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        baselines.knowledge_distillation(net, X, y, tp, steps=2)


# ---------------------------------------------------------------- progress / threads / --help
def test_progress_auto_is_off_when_not_a_terminal(monkeypatch):
    from pyro_distill.inference import _auto_progress

    assert _auto_progress(True) is True and _auto_progress(False) is False
    monkeypatch.setattr(sys, "stderr", open("/dev/null", "w"))  # noqa: SIM115 - not a TTY
    assert _auto_progress(None) is False


def test_thread_policy_order():
    assert cli.thread_count(3, {"PYRO_DISTILL_THREADS": "2", "OMP_NUM_THREADS": "4"}) == (3, "--threads")
    assert cli.thread_count(None, {"PYRO_DISTILL_THREADS": "2", "OMP_NUM_THREADS": "4"})[0] == 2
    assert cli.thread_count(None, {"OMP_NUM_THREADS": "4"})[0] == 4
    assert cli.thread_count(None, {}) == (1, "default (one thread per process)")
    with pytest.raises(ValueError, match="positive integer"):
        cli.thread_count(None, {"PYRO_DISTILL_THREADS": "many"})


def test_help_of_every_subcommand_without_torch():
    """``--help`` loads no torch (that is what makes it fast); each subcommand answers."""
    parser = cli.build_parser()
    names = sorted(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert {"fit", "demo", "plan", "distill", "run", "figures", "diagnose"} <= set(names)
    code = ("import sys, contextlib, io\nimport pyro_distill.cli as c\n"
            f"for n in [None] + {names!r}:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n"
            "            c.main(([n] if n else []) + ['--help'])\n"
            "        except SystemExit as e:\n"
            "            assert e.code == 0, (n, e.code)\n"
            "    assert 'usage: pyro-distill' in buf.getvalue(), n\n"
            "assert 'torch' not in sys.modules, 'a --help imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_selector_names_match_the_planner():
    from pyro_distill.commands.surgery import DEFAULT_SELECTOR, SELECTOR_NAMES
    from pyro_distill.surgery.plan import SELECTORS

    assert tuple(sorted(SELECTORS)) == SELECTOR_NAMES and DEFAULT_SELECTOR in SELECTORS


def test_plan_without_posterior_says_which_selector(capsys):
    assert cli.main(["plan", "--teacher", "64,32,32,10", "--student", "64,16,10"]) == 0
    out = capsys.readouterr().out
    assert "selector: random" in out and "snr" in out and "--posterior" in out


# ---------------------------------------------------------------- the CLI workflow + ArviZ
def test_cli_fit_plan_distill_fit_prior_diagnose_and_arviz(tmp_path, capsys):
    """fit -> plan -> distill -> fit --prior -> diagnose on 10% of digits with tiny step counts; the saved
    idata.nc of every model opens in ArviZ with 4 chains and finite r_hat."""
    import arviz as az

    m = tmp_path / "models"
    small = ["--fraction", "0.1", "--steps", "5", "--map-steps", "10", "--idata-draws", "20"]
    assert cli.main(["fit", "--data", "digits", "--sizes", "64,8,8,10", "--guide", "diag",
                     "--out", str(m / "teacher"), *small]) == 0
    assert cli.main(["plan", "--posterior", str(m / "teacher"), "--student", "64,4,10"]) == 0
    assert "selector: snr (the default, as in distill)" in capsys.readouterr().out
    assert cli.main(["distill", str(m / "teacher"), "--student", "64,4,10", "--out", str(m / "prior"),
                     "--idata-draws", "20"]) == 0
    assert cli.main(["fit", "--data", "digits", "--prior", str(m / "prior"), "--guide", "diag",
                     "--out", str(m / "student"), *small]) == 0
    card = json.loads((m / "student" / "card.json").read_text())
    assert card["net"]["sizes"] == [64, 4, 10] and card["role"].startswith("student")
    assert card["data"] == {"name": "digits", "split_seed": 0, "fraction": 0.1, "subsample_seed": 0}
    assert "plan" in card and (m / "student" / "prior.pt").exists()
    capsys.readouterr()
    # the distill folder's posterior is its prior: one row for it, not two
    assert cli.main(["diagnose", str(m / "prior"), "--against", str(m / "teacher"), "--draws", "20",
                     "--no-figures", "--out", str(tmp_path / "d1")]) == 0
    rows = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith(("teacher", "prior"))]
    assert rows == ["teacher", "prior"]
    assert cli.main(["diagnose", str(m / "student"), "--against", str(m / "teacher"), "--draws", "20",
                     "--no-figures", "--out", str(tmp_path / "d2")]) == 0
    out = capsys.readouterr().out
    assert "student prior" in out and "\nstudent " in out
    for name in ("teacher", "prior", "student"):
        idata = az.from_netcdf(m / name / "idata.nc")
        assert idata.posterior.sizes["chain"] == 4 and idata.posterior.sizes["draw"] == 5
        summ = az.summary(idata, kind="diagnostics")  # every block of the posterior group
        assert np.isfinite(summ["r_hat"].to_numpy()).all()
        assert summ.shape[0] == json.loads((m / name / "card.json").read_text())["p"]
        assert np.isfinite(az.rhat(idata)["layer1.bias"].to_numpy()).all()


def test_cli_fit_rejects_a_network_that_does_not_fit_the_data(tmp_path, capsys):
    assert cli.main(["fit", "--data", "digits", "--sizes", "10,4,3", "--out", str(tmp_path / "x")]) == 1
    assert "needs a network from 64 inputs to 10 outputs" in capsys.readouterr().err
    assert not Path(tmp_path / "x").exists() or not any(Path(tmp_path / "x").iterdir())


# ---------------------------------------------------------------- torch / Pyro distributions at the entry points
def test_pyro_distributions_as_prior_and_posterior(small):
    """A Pyro user's session: a pyro MultivariateNormal prior gives the same fit as the library's DenseGaussian
    (same seed: equal to float precision); metrics take a torch distribution; the Gaussians sample and KL
    like torch distributions."""
    import pyro.distributions as dist

    from pyro_distill.gaussian import DenseGaussian

    X, y, Xte, yte = small
    net = MLP([64, 4, 10])
    p = net.num_params
    scale = 0.5
    pyro_prior = dist.MultivariateNormal(torch.zeros(p), scale_tril=scale * torch.eye(p))
    ours = DenseGaussian(torch.zeros(p), scale * torch.eye(p), layout=net.layout)
    qa, _ = pd.fit_posterior(net, X, y, prior=pyro_prior, guide="diag", steps=3, map_steps=5, progress=False)
    qb, _ = pd.fit_posterior(net, X, y, prior=ours, guide="diag", steps=3, map_steps=5, progress=False)
    torch.testing.assert_close(qa.mean, qb.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qa.variance, qb.variance, rtol=1e-6, atol=1e-6)
    r_ours = metrics.evaluate(net, qa, Xte, yte, num_samples=20)
    r_torch = metrics.evaluate(net, torch.distributions.Independent(torch.distributions.Normal(qa.mean, qa.stddev), 1),
                               Xte, yte, num_samples=20)
    assert r_ours["accuracy"] == r_torch["accuracy"] and abs(r_ours["nll"] - r_torch["nll"]) < 1e-6
    assert ours.sample((3,)).shape == (3, p)
    kl = torch.distributions.kl_divergence(qa.to(dtype=torch.float64), ours.to(dtype=torch.float64))
    torch.testing.assert_close(kl, qa.to(dtype=torch.float64).kl(ours.to(dtype=torch.float64)))
    w, _ = pd.fit_map(net, X, y, prior=dist.Normal(torch.zeros(p), torch.ones(p)).to_event(1), steps=2)
    assert w.shape == (p,)
    with pytest.raises(ValueError, match="coordinates"):
        pd.fit_posterior(net, X, y, prior=dist.MultivariateNormal(torch.zeros(3), torch.eye(3)), steps=1)


def test_each_fitting_phase_logs_one_line(small, caplog):
    import logging

    X, y, _, _ = small
    with caplog.at_level(logging.INFO, logger="pyro_distill.inference"):
        pd.fit_posterior(MLP([64, 4, 10]), X, y, guide="diag", steps=3, map_steps=4, progress=False)
    msgs = [r.getMessage() for r in caplog.records if r.name == "pyro_distill.inference"]
    assert sum(m.startswith("MAP: 4 steps") for m in msgs) == 1
    assert sum(m.startswith("Laplace start") for m in msgs) == 1
    svi = [m for m in msgs if m.startswith("SVI[diag]: 3 steps")]
    assert len(svi) == 1 and "ELBO" in svi[0] and "->" in svi[0]
