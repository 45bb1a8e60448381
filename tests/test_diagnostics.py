"""ArviZ diagnostics: InferenceData groups and coords, log-likelihood against the Pyro model, the posterior
k-hat on an exact posterior vs a poor guide, NUTS on a 2-parameter model, netCDF round trip, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pyro.poutine as poutine
import pytest
import torch

from pyro_distill import diagnostics as D
from pyro_distill.gaussian import DenseGaussian, DiagGaussian
from pyro_distill.nets import MLP
from pyro_distill.nets.base import net_from_config

DT = torch.float64


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(0)
    net = MLP([3, 4, 2])
    X = torch.randn(15, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (15,), generator=g)
    p = net.num_params
    A = torch.randn(p, p, generator=g, dtype=DT) * 0.05
    q = DenseGaussian(0.3 * torch.randn(p, generator=g, dtype=DT), torch.tril(A) + 0.2 * torch.eye(p, dtype=DT),
                      layout=net.layout, meta={"source": "unit test"})
    return net, q, X, y


def blr(n: int = 40, d: int = 2, noise: float = 0.5, seed: int = 0):
    """Bayesian linear regression as an MLP with no hidden layer; returns net, data, exact posterior."""
    g = torch.Generator().manual_seed(seed)
    net = MLP([d, 1], activation="identity", likelihood="gaussian", noise_scale=noise)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = X @ torch.arange(1.0, d + 1, dtype=DT) - 0.5 + noise * torch.randn(n, generator=g, dtype=DT)
    Phi = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)  # layout: layer1.weight (1 x d), then layer1.bias
    prec = torch.diag(1 / net.default_prior(DT).variance) + Phi.T @ Phi / noise**2
    cov = torch.cholesky_inverse(torch.linalg.cholesky(prec))
    mean = cov @ (Phi.T @ y) / noise**2
    return net, X, y, DenseGaussian.from_covariance(mean, cov, layout=net.layout)


def test_groups_shapes_coords_attrs(small):
    net, q, X, y = small
    idata = D.to_inference_data(net, q, X, y, draws=30, chains=2, seed=1)
    for g in D.GROUPS:
        assert g in idata.groups(), g
    post = idata.posterior
    assert list(post.data_vars) == net.layout.names
    assert post["layer1.weight"].dims == ("chain", "draw", "layer1_neuron", "input")
    assert post["layer1.weight"].shape == (2, 30, 4, 3)
    assert post["layer2.weight"].dims == ("chain", "draw", "output", "layer1_neuron")
    assert post["layer1.bias"].dims == ("chain", "draw", "layer1_neuron")
    assert post.sizes["output"] == 2 and list(post["input"].values) == [0, 1, 2]
    assert idata.posterior_predictive["y"].shape == (2, 30, 15)
    yrep = idata.posterior_predictive["y"].values
    assert yrep.min() >= 0 and yrep.max() <= 1 and np.issubdtype(yrep.dtype, np.integer)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    np.testing.assert_allclose(idata.constant_data["X"].values, X.numpy())
    assert net_from_config(json.loads(idata.attrs["net_config"])).config() == net.config()
    assert json.loads(idata.attrs["source"]) == {"source": "unit test"}
    assert idata.attrs["draws"] == 30 and idata.attrs["gaussian_kind"] == "dense"
    # the draws are the Gaussian's: same seed, same draws
    w = D.weights_from_idata(idata, net)
    w2 = D.weights_from_idata(D.to_inference_data(net, q, X, y, draws=30, chains=2, seed=1), net)
    torch.testing.assert_close(w, w2)


def test_densities_are_float64_for_float32_draws(small):
    """Pointwise log-likelihood, lp and log q are kept in float64 (PSIS in float32 gives NaN elpd for
    observations predicted with probability 1 in every draw)."""
    net, q, X, y = small
    idata = D.to_inference_data(net, q.to(dtype=torch.float32), X.float(), y, draws=20)
    assert idata.posterior["layer1.weight"].dtype == np.float32
    assert idata.log_likelihood["y"].dtype == np.float64
    assert idata.sample_stats["lp"].dtype == np.float64 and idata.sample_stats["log_q"].dtype == np.float64


def test_log_likelihood_matches_pyro_model(small):
    net, q, X, y = small
    idata = D.to_inference_data(net, q, X, y, draws=25, seed=3)
    w = D.weights_from_idata(idata, net).reshape(25, -1)
    tr = poutine.trace(poutine.condition(net.model, data={"w": w})).get_trace(X, y)
    site = tr.nodes["y"]
    ll_model = site["fn"].log_prob(site["value"])  # [draws, N]
    ll = torch.as_tensor(idata.log_likelihood["y"].values).reshape(25, -1)
    torch.testing.assert_close(ll, ll_model)
    torch.testing.assert_close(ll.sum(-1), net.log_likelihood(w, X, y).sum(-1))
    prior_lp = tr.nodes["w"]["fn"].log_prob(w)
    lp = torch.as_tensor(idata.sample_stats["lp"].values).reshape(-1)
    torch.testing.assert_close(lp, prior_lp + ll_model.sum(-1))
    torch.testing.assert_close(torch.as_tensor(idata.sample_stats["log_q"].values).reshape(-1), q.log_prob(w))


def test_khat_exact_posterior_small_poor_guide_large():
    net, X, y, post = blr()
    exact = D.posterior_khat(net, post, X, y, draws=1000)
    assert exact.k < 0.5 and exact.reading.startswith("good")
    near = D.posterior_khat(net, post.tempered(1.2), X, y, draws=1000)  # a little too wide: still good
    assert near.k < 0.5
    narrow = D.posterior_khat(net, post.tempered(0.15), X, y, draws=1000)  # far too narrow
    assert narrow.k > 0.7 and narrow.reading == "unreliable"
    shifted = DenseGaussian(post.mean + 4 * post.variance.sqrt(), post.scale_tril, layout=net.layout)
    assert D.posterior_khat(net, shifted, X, y, draws=1000).k > 0.7
    # the same number from the InferenceData
    idata = D.to_inference_data(net, post.tempered(0.15), X, y, draws=1000)
    assert D.khat_from_idata(idata).k > 0.7


def test_khat_reading_thresholds():
    assert D.khat_reading(0.3) == "good"
    assert D.khat_reading(0.6) == "usable"
    assert D.khat_reading(0.9) == "unreliable"


def test_netcdf_round_trip(small, tmp_path):
    az = D.az
    net, q, X, y = small
    idata = D.to_inference_data(net, q, X, y, draws=20, chains=2)
    path = D.save_idata(tmp_path / "m", idata)
    back = az.from_netcdf(path)
    for g in D.GROUPS:
        a, b = getattr(idata, g), getattr(back, g)
        for v in a.data_vars:
            np.testing.assert_array_equal(a[v].values, b[v].values)
            assert a[v].dims == b[v].dims
    assert back.attrs["net_config"] == idata.attrs["net_config"]
    torch.testing.assert_close(D.weights_from_idata(back, net), D.weights_from_idata(idata, net))
    with pytest.raises(FileExistsError, match="overwrite"):
        D.save_idata(tmp_path / "m", idata)
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no temporary left


def test_nuts_recovers_two_parameter_posterior():
    net, X, y, post = blr(n=30, d=1)
    assert net.num_params == 2
    ref = D.nuts_reference(net, X, y, num_chains=2, num_samples=300, warmup_steps=200, init=post, seed=0,
                           max_tree_depth=5, processes=1)
    w = D.weights_from_idata(ref, net).reshape(-1, 2)
    sd = post.variance.sqrt()
    assert ((w.mean(0) - post.mean).abs() / sd).max() < 0.3
    assert ((w.var(0) / post.variance) - 1).abs().max() < 0.3
    summ = D.reference_summary(ref)
    assert all(s["rhat_max"] < 1.05 for s in summ.values())
    cmp = D.compare_to_reference(net, post, ref, X, y, draws=500)
    assert cmp["blocks"]["layer1.weight"]["mean_err_sd"] < 0.3
    assert abs(cmp["elpd_loo_diff"]) < 1.0
    # NUTS preconditioned by a Gaussian (its covariance as the fixed mass matrix) samples the same posterior
    pre = D.nuts_reference(net, X, y, num_chains=2, num_samples=300, warmup_steps=100, init=post, seed=1,
                           max_tree_depth=5, processes=1, full_mass=True, mass_from_init=True, adapt_mass=False)
    w = D.weights_from_idata(pre, net).reshape(-1, 2)
    assert ((w.mean(0) - post.mean).abs() / sd).max() < 0.3
    assert ((w.var(0) / post.variance) - 1).abs().max() < 0.3
    with pytest.raises(ValueError, match="Gaussian init"):
        D.nuts_reference(net, X, y, num_chains=1, mass_from_init=True, processes=1)


def test_nuts_potential_is_the_model_density(small):
    """The potential NUTS runs on is -log p(w, D) of ``net.model``, traced by Pyro, for any prior, and
    its gradient (hand-written for the MLP) is autograd's through the traced model."""
    net, q, X, y = small
    for prior in (None, q):
        pr = prior if prior is not None else net.default_prior(DT)
        pot = D.LogJointPotential(net, X, y, pr)
        for w in q.sample(3, generator=torch.Generator().manual_seed(1)):
            w = w.requires_grad_()
            tr = poutine.trace(poutine.condition(net.model, {"w": w})).get_trace(X, y, pr)
            ref = -tr.log_prob_sum()
            (g_ref,) = torch.autograd.grad(ref, w)
            v = pot({"w": w})
            (g,) = torch.autograd.grad(v, w)
            torch.testing.assert_close(v.detach(), ref.detach())
            torch.testing.assert_close(g, g_ref)
    assert pot.calls == 3


def test_nuts_worker_processes_and_convergence_warning():
    """Chains in spawned worker processes give the same draws as in this process (same seeds); too short
    a run is flagged with a warning naming the R-hat; a bad start shape is refused."""
    net, X, y, post = blr(n=20, d=1)
    kw = dict(num_chains=2, num_samples=30, warmup_steps=30, init=post, seed=3, max_tree_depth=4)
    with pytest.warns(RuntimeWarning, match="R-hat"):
        one = D.nuts_reference(net, X, y, processes=1, rhat_warn=1.0, **kw)
    two = D.nuts_reference(net, X, y, processes=2, rhat_warn=10.0, **kw)
    np.testing.assert_allclose(one.posterior["layer1.bias"].values, two.posterior["layer1.bias"].values)
    assert two.attrs["processes"] == 2 and len(json.loads(two.attrs["leapfrog_per_iter_per_chain"])) == 2
    with pytest.raises(ValueError, match="init weights"):
        D.nuts_reference(net, X, y, num_chains=2, init=torch.zeros(3, 2, dtype=DT), processes=1)


def test_restricted_prior_and_index_map():
    from pyro_distill import surgery
    from pyro_distill.commands.diagnose import restricted_prior, student_to_teacher_index

    teacher = MLP([3, 4, 4, 2])
    ops = [surgery.RemoveLayer(2), surgery.RemoveNeurons(1, [0, 3])]
    idx = student_to_teacher_index(ops, teacher)
    student = MLP([3, 2, 2])
    assert idx.numel() == student.num_params
    w = torch.randn(5, teacher.num_params, dtype=DT)
    ws = w[:, idx]
    # the student's first layer is the teacher's neurons 1, 2 of layer 1
    torch.testing.assert_close(student.layout.view(ws, "layer1.weight"),
                               teacher.layout.view(w, "layer1.weight")[:, [1, 2]])
    rp = restricted_prior(teacher, ops)
    assert isinstance(rp, DiagGaussian) and rp.dim == student.num_params
    # the output layer keeps the teacher's fan-in scale (1/sqrt(4)), not the student's (1/sqrt(2))
    torch.testing.assert_close(student.layout.view(rp.variance.sqrt(), "layer2.weight"),
                               torch.full((2, 2), 0.5, dtype=DT))


def test_bad_input_errors(small):
    net, q, X, y = small
    with pytest.raises(ValueError, match="another architecture"):
        D.to_inference_data(MLP([3, 5, 2]), q, X, y, draws=5)
    with pytest.raises(ValueError, match="draws"):
        D.to_inference_data(net, q, X, y, draws=0)
    with pytest.raises(ValueError, match="labels"):
        D.to_inference_data(net, q, X, torch.full((15,), 7), draws=5)
    with pytest.raises(FileNotFoundError, match="diagnose"):
        D.load_idata("/nonexistent/folder")


def test_diagnose_table_and_cli(tmp_path, capsys):
    from pyro_distill import surgery
    from pyro_distill.cli import main
    from pyro_distill.store import save_model

    teacher = MLP([20, 4, 4, 3])
    g = torch.Generator().manual_seed(0)
    qt = DenseGaussian(0.3 * torch.randn(teacher.num_params, generator=g),
                       0.05 * torch.eye(teacher.num_params), layout=teacher.layout, meta={"source": "unit test"})
    ops = surgery.Plan([surgery.RemoveLayer(2), surgery.RemoveNeurons(1, [0])], teacher=teacher.config())
    student, prior = surgery.apply(ops, teacher, qt)
    spec = {"name": "synthetic_classification", "split_seed": 0}
    save_model(tmp_path / "teacher", teacher, qt, card={"data": spec})
    save_model(tmp_path / "student", student, prior.tempered(0.5), card={"data": spec, "plan": ops.to_dict()},
               prior=prior)
    out = tmp_path / "fig"
    rc = main(["diagnose", str(tmp_path / "student"), "--against", str(tmp_path / "teacher"), "--draws", "60",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("teacher", "student prior", "student"):
        assert name in text
    assert "q k-hat" in text and "unreliable" in text
    for f in ("khat.png", "ppc.png", "forest.png", "correlation.png", "table.txt", "diagnose.json"):
        assert (out / f).stat().st_size > 0, f
    rows = json.loads((out / "diagnose.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["teacher", "student prior", "student"]
    assert all(math.isfinite(r["elpd_loo"]) for r in rows)
    assert (tmp_path / "student" / "idata.nc").exists() and (tmp_path / "teacher" / "idata.nc").exists()
    # a second run reuses the saved files; other settings are refused without --overwrite
    again = ["--no-figures", "--out", str(tmp_path / "again")]
    assert main(["diagnose", str(tmp_path / "student"), "--draws", "60", *again]) == 0
    assert main(["diagnose", str(tmp_path / "student"), "--draws", "50", *again]) == 1
    assert "overwrite" in capsys.readouterr().err


def test_diagnose_run_folder_over_seeds(tmp_path, capsys):
    """A run's folder of `<model>-seed<k>` folders: every model on its own data (the student on its 10%
    subsample), a prior row per student found through its same-seed teacher, mean +- sd over seeds."""
    from pyro_distill import surgery
    from pyro_distill.cli import main
    from pyro_distill.store import model_folder_name, save_model

    teacher = MLP([20, 4, 4, 3])
    ops = surgery.Plan([surgery.RemoveLayer(2), surgery.RemoveNeurons(1, [0])], teacher=teacher.config())
    spec = {"name": "synthetic_classification", "split_seed": 0}
    run = tmp_path / "run"
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        qt = DenseGaussian(0.3 * torch.randn(teacher.num_params, generator=g),
                           0.05 * torch.eye(teacher.num_params), layout=teacher.layout, meta={"source": "unit test"})
        student, prior = surgery.apply(ops, teacher, qt)
        save_model(run / model_folder_name("teacher", seed), teacher, qt, card={"data": spec})
        save_model(run / model_folder_name("small-f0.1", seed), student, prior.tempered(0.5),
                   card={"data": spec | {"fraction": 0.1, "subsample_seed": seed}, "plan": ops.to_dict()}, prior=prior)
    out = tmp_path / "fig"
    assert main(["diagnose", str(run), "--draws", "40", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| small-f0.1 prior | 2 |" in text and "| teacher | 2 |" in text and " ± " in text
    assert text.index("| teacher |") < text.index("| small-f0.1 prior |") < text.index("| small-f0.1 |")
    res = json.loads((out / "diagnose_run.json").read_text())
    assert set(res["groups"]) == {"teacher", "small-f0.1", "small-f0.1 prior"}
    n_obs = {r["model"]: r["n_obs"] for r in res["rows"]}
    assert n_obs["teacher-seed0"] == 1000 and n_obs["small-f0.1-seed1"] == 100  # each on its own data
    assert all(math.isfinite(r["elpd_loo"]) for r in res["rows"]) and (out / "table.md").exists()
    # figures of the first seed: teacher, the conditioned teacher and the student, each on its own data
    assert {"khat.png", "ppc.png", "forest.png", "correlation.png"} <= {p.name for p in out.iterdir()}
    assert (run / "small-f0.1-seed1" / "idata.nc").exists()
    assert main(["diagnose", str(run), "--against", str(run / "teacher-seed0")]) == 1
    assert "alone" in capsys.readouterr().err
