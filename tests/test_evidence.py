"""Evidence of the quadratic (GGN) model: exact for Bayesian linear regression; temperature and prior tuning."""

import math

import pytest
import torch
from scipy.optimize import minimize_scalar

from pyro_distill.evidence import laplace_evidence, log_evidence, optimize_prior, optimize_temperature, quadratic_model
from pyro_distill.gaussian import DenseGaussian, DiagGaussian
from pyro_distill.nets import MLP

D = torch.float64
S_NOISE = 0.7


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(0)
    net = MLP([4, 1], likelihood="gaussian", noise_scale=S_NOISE)
    X = torch.randn(30, 4, generator=g, dtype=D)
    w_true = torch.randn(net.num_params, generator=g, dtype=D)
    y = net.forward(w_true, X).squeeze(-1) + S_NOISE * torch.randn(30, generator=g, dtype=D)
    Phi = torch.cat([X, torch.ones(30, 1, dtype=D)], 1)  # the layout: weight row, then bias
    return net, X, y, Phi


def _exact(Phi, y, prior) -> float:
    cov = S_NOISE**2 * torch.eye(len(y), dtype=D) + Phi @ prior.covariance() @ Phi.T
    return float(torch.distributions.MultivariateNormal(Phi @ prior.loc, cov).log_prob(y))


def _dense_prior(p, tau=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=D) / p**0.5
    L = torch.linalg.cholesky(A @ A.T + 0.3 * torch.eye(p, dtype=D))
    return DenseGaussian(torch.randn(p, generator=g, dtype=D), L * math.sqrt(tau))


@pytest.mark.parametrize("structure", ["dense", "kron", "lowrank"])
def test_evidence_is_exact_for_bayesian_linear_regression(regression, structure) -> None:
    net, X, y, Phi = regression
    m0 = torch.randn(net.num_params, dtype=D)  # any expansion point: the model is exactly quadratic
    quad = quadratic_model(net, m0, X, y, structure, rank=net.num_params)
    priors = [DiagGaussian(torch.randn(net.num_params, dtype=D), torch.full((net.num_params,), 0.8, dtype=D))]
    if structure == "dense":
        priors.append(_dense_prior(net.num_params))
    for prior in priors:
        assert float(log_evidence(quad, prior)) == pytest.approx(_exact(Phi, y, prior), abs=1e-8)


def test_laplace_evidence_of_the_exact_posterior(regression) -> None:
    net, X, y, Phi = regression
    prior = _dense_prior(net.num_params)
    P = Phi.T @ Phi / S_NOISE**2 + prior.precision()
    cov = torch.linalg.inv(P)
    m = cov @ (Phi.T @ y / S_NOISE**2 + prior.precision() @ prior.loc)
    q = DenseGaussian.from_covariance(m, cov)
    assert laplace_evidence(net, X, y, q, prior) == pytest.approx(_exact(Phi, y, prior), abs=1e-8)


def test_temperature_by_evidence_equals_the_analytic_maximizer(regression) -> None:
    net, X, y, Phi = regression
    prior = _dense_prior(net.num_params, seed=3)
    quad = quadratic_model(net, torch.zeros(net.num_params, dtype=D), X, y, "dense")
    tau, info = optimize_temperature(quad, prior)
    ref = minimize_scalar(lambda lt: -_exact(Phi, y, prior.tempered(math.exp(lt))), bounds=(-7, 7),
                          method="bounded", options={"xatol": 1e-10})
    assert not info["at_bound"]
    assert math.log(tau) == pytest.approx(ref.x, abs=1e-5)
    assert info["log_evidence"] == pytest.approx(-ref.fun, abs=1e-8)


def test_temperature_diag_path_matches_dense_path(regression) -> None:
    net, X, y, _ = regression
    prior = DiagGaussian(torch.zeros(net.num_params, dtype=D), torch.full((net.num_params,), 0.5, dtype=D))
    w = torch.randn(net.num_params, dtype=D)
    t_diag, _ = optimize_temperature(quadratic_model(net, w, X, y, "diag"), prior)
    # a diagonal GGN is an approximation: compare the diag path with the same diagonal given densely
    qd = quadratic_model(net, w, X, y, "diag")
    qd.kind, qd.G = "dense", torch.diag(qd.G)
    t_dense, _ = optimize_temperature(qd, prior)
    assert t_diag == pytest.approx(t_dense, rel=1e-6)


def test_optimize_prior_finds_the_exact_isotropic_optimum(regression) -> None:
    net, X, y, Phi = regression
    tuned, info = optimize_prior(net, X, y, torch.zeros(net.num_params, dtype=D), structure="dense",
                                 per_layer=False, steps=400, lr=0.05, mode="quadratic")
    assert info["log_evidence"] >= info["log_evidence_start"]

    def neg(la: float) -> float:
        s = torch.full((net.num_params,), math.exp(-0.5 * la), dtype=D)
        return -_exact(Phi, y, DiagGaussian(torch.zeros(net.num_params, dtype=D), s))

    ref = minimize_scalar(neg, bounds=(-10, 10), method="bounded", options={"xatol": 1e-10})
    assert math.log(info["precisions"][0]) == pytest.approx(ref.x, abs=1e-3)
    assert info["log_evidence"] == pytest.approx(-ref.fun, abs=1e-6)


@pytest.mark.parametrize("structure", ["diag", "kron", "lowrank", "dense"])
def test_optimize_prior_per_layer_raises_the_evidence_of_an_mlp(structure) -> None:
    g = torch.Generator().manual_seed(2)
    net = MLP([5, 7, 3])
    X = torch.randn(40, 5, generator=g, dtype=D)
    y = torch.randint(0, 3, (40,), generator=g)
    w = torch.randn(net.num_params, generator=g, dtype=D) * 0.3
    tuned, info = optimize_prior(net, X, y, w, structure=structure, steps=60)
    assert len(info["precisions"]) == 2 and tuned.layout == net.layout
    assert info["log_evidence"] > info["log_evidence_start"]


def test_laplace_mode_equals_the_quadratic_mode_at_the_map(regression) -> None:
    # at the MAP of the scored prior, MacKay's evidence (no Newton step) is the exact one
    net, X, y, Phi = regression
    prior = _dense_prior(net.num_params, seed=5)
    P = Phi.T @ Phi / S_NOISE**2 + prior.precision()
    m = torch.linalg.solve(P, Phi.T @ y / S_NOISE**2 + prior.precision() @ prior.loc)
    quad = quadratic_model(net, m, X, y, "dense")
    lap = float(log_evidence(quad, prior, mode="laplace"))
    assert lap == pytest.approx(float(log_evidence(quad, prior)), abs=1e-8)
    assert lap == pytest.approx(_exact(Phi, y, prior), abs=1e-8)
    with pytest.raises(ValueError, match="mode"):
        log_evidence(quad, prior, mode="newton")


# ----------------------------------------------------------------------------- held-out choice of the scale
from pyro_distill import metrics  # noqa: E402
from pyro_distill.evidence import tune_posterior_scale  # noqa: E402
from pyro_distill.inference import fit_map, laplace, laplace_family  # noqa: E402
from pyro_distill.predictions import predictive  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    g = torch.Generator().manual_seed(3)
    net = MLP([3, 6, 3])
    X = torch.randn(140, 3, generator=g, dtype=D)
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 + 0.7 * torch.randn(140, generator=g, dtype=D) > 0.4).long() + (X[:, 2] > 1)
    w, _ = fit_map(net, X[:100], y[:100], init=0.3 * torch.randn(net.num_params, generator=g, dtype=D),
                   steps=300, lr=0.05, seed=0, progress=False)
    return net, X[:100], y[:100], X[100:], y[100:], w, net.default_prior(D)


@pytest.mark.parametrize("method", ["linearized", "mc"])
def test_temperature_picks_grid_argmin_of_the_predictive_nll(classifier, method):
    """Without refinement the choice is the grid's argmin, and every grid value is the NLL of
    ``predictive(q.tempered(T))`` (same seed) -- the cached draws change nothing (float64, 1e-9)."""
    net, X, y, Xt, yt, w, prior = classifier
    q = laplace(net, X, w, prior, kind="dense")
    qt, info = tune_posterior_scale(net, q, Xt, yt, method=method, temperature_grid=9, refine=False,
                                    num_samples=20, seed=4)
    j = min(range(9), key=info["nll_grid"].__getitem__)
    assert info["temperature"] == info["grid"][j] and info["prior_precision"] == 1.0
    for k in (0, j, 8):
        T = info["grid"][k]
        ref = metrics.nll(predictive(net, q.tempered(T), Xt, method=method, num_samples=20, seed=4), yt)
        assert info["nll_grid"][k] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(qt.covariance(), info["temperature"] * q.covariance(), rtol=1e-12, atol=0)
    _, ref = tune_posterior_scale(net, q, Xt, yt, method=method, temperature_grid=9, num_samples=20, seed=4)
    assert ref["nll"] <= min(info["nll_grid"]) + 1e-15


@pytest.mark.parametrize("kind", ["dense", "diag", "lowrank_precision", "kron"])
def test_laplace_family_equals_laplace_at_every_prior_precision(classifier, kind):
    """``laplace_family(alpha)`` (curvature once) is ``laplace`` with the prior precision times alpha (1e-10)."""
    net, X, y, _, _, w, prior = classifier
    fam = laplace_family(net, X, w, prior, kind=kind, rank=5, y=y)
    for alpha in (1.0, 0.1, 30.0):
        ref = laplace(net, X, w, prior.tempered(1 / alpha), kind=kind, rank=5, y=y)
        torch.testing.assert_close(fam(alpha).covariance(), ref.covariance(), rtol=1e-10, atol=1e-12)


def test_prior_precision_and_both_pick_the_grid_argmin(classifier):
    net, X, y, Xt, yt, w, prior = classifier
    fam = laplace_family(net, X, w, prior, kind="diag")
    q, info = tune_posterior_scale(net, fam, Xt, yt, param="prior_precision", alpha_bounds=(1e-2, 1e4),
                                   alpha_grid=7, refine=False, num_samples=16)
    j = min(range(7), key=info["nll_grid"].__getitem__)
    assert info["prior_precision"] == info["grid"][j] and info["temperature"] == 1.0
    a = info["grid"][2]
    ref = metrics.nll(predictive(net, laplace(net, X, w, prior.tempered(1 / a), kind="diag"), Xt,
                                 method="linearized", num_samples=16), yt)
    assert info["nll_grid"][2] == pytest.approx(ref, rel=1e-9)
    torch.testing.assert_close(q.covariance(), fam(info["grid"][j]).covariance(), rtol=0, atol=0)
    qb, both = tune_posterior_scale(net, fam, Xt, yt, param="both", alpha_bounds=(1e-2, 1e4), alpha_grid=7,
                                    num_samples=16)
    assert both["nll"] <= min(info["nll_grid"]) + 1e-12  # T = 1 is on the temperature grid's span
    torch.testing.assert_close(qb.covariance(), both["temperature"] * fam(both["prior_precision"]).covariance(),
                               rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="laplace_family"):
        tune_posterior_scale(net, fam(1.0), Xt, yt, param="prior_precision")


def test_temperature_matches_predictive_variance_to_held_out_residuals():
    """Bayesian linear regression, no bias, held-out inputs +-x0 (the same predictive variance s^2 at each): the
    NLL-optimal temperature makes the predictive variance ``T s^2 + sigma^2`` equal the held-out mean squared
    residual exactly (stationarity of the Gaussian NLL), up to the golden-section tolerance."""
    g = torch.Generator().manual_seed(5)
    net = MLP([4, 1], bias=False, likelihood="gaussian", noise_scale=S_NOISE)
    X = torch.randn(40, 4, generator=g, dtype=D)
    prior = DiagGaussian(torch.zeros(4, dtype=D), torch.ones(4, dtype=D))
    w = torch.zeros(4, dtype=D)  # the posterior covariance of a linear-Gaussian model does not depend on y
    q = laplace(net, X, w, prior, kind="dense")  # exact (GGN = Hessian)
    x0 = torch.randn(4, dtype=D, generator=g)
    Xt = torch.stack([x0, -x0, x0, -x0, x0, -x0])
    yt = Xt @ w + torch.tensor([3.0, -2.5, 4.0, 1.0, -3.5, 2.0], dtype=D)
    _, info = tune_posterior_scale(net, q, Xt, yt, num_samples=64, seed=2, temperature_bounds=(1e-2, 1e6))
    draws = predictive(net, q, Xt, method="linearized", num_samples=64, seed=2)  # [S, N]
    s2 = (draws - Xt @ w).square().mean(0)
    torch.testing.assert_close(s2, s2[0].expand(6), rtol=1e-12, atol=0)
    resid2 = float((yt - Xt @ w).square().mean())
    assert not info["at_bound"]
    assert info["temperature"] * float(s2[0]) + S_NOISE**2 == pytest.approx(resid2, rel=1e-6)
