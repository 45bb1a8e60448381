"""The one posterior predictive: sampled and linearized, every family, point estimates, metrics columns."""

import pytest
import torch

from pyro_distill import metrics
from pyro_distill.data.sequences import dates
from pyro_distill.gaussian import DenseGaussian, DiagGaussian
from pyro_distill.nets import MLP, AttentionRNN, Transformer
from pyro_distill.predictions import predictive

D = torch.float64


def _dense(p: int, scale: float, seed: int = 0) -> DenseGaussian:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=D) * (scale / p**0.5)
    L = torch.linalg.cholesky(A @ A.T + 1e-3 * torch.eye(p, dtype=D))
    return DenseGaussian(torch.randn(p, generator=g, dtype=D) * 0.3, L)


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_linearized_equals_sampled_for_a_linear_model(likelihood) -> None:
    # f(x, w) = U x + b is linear in w: J(x)(w - m) + f(x, m) = f(x, w) for every draw
    net = MLP([4, 3], likelihood=likelihood)
    q = _dense(net.num_params, 1.0)
    X = torch.randn(11, 4, dtype=D)
    a = predictive(net, q, X, "mc", num_samples=40, seed=3)
    b = predictive(net, q, X, "linearized", num_samples=40, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_linear_regression_predictive_moments_match_the_analytic_ones() -> None:
    net = MLP([3, 1], likelihood="gaussian")
    q = _dense(net.num_params, 0.5, seed=1)
    X = torch.randn(6, 3, dtype=D)
    draws = predictive(net, q, X, "linearized", num_samples=20000, seed=0)
    Phi = torch.cat([X, torch.ones(6, 1, dtype=D)], 1)  # layout: weight row then bias
    mean, var = Phi @ q.mean, ((Phi @ q.covariance()) * Phi).sum(-1)
    torch.testing.assert_close(draws.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(draws.var(0), var, rtol=0.05, atol=1e-3)


def test_linearized_differs_from_sampled_for_a_nonlinear_net_and_is_a_distribution() -> None:
    net = MLP([5, 8, 3], activation="tanh")
    q = DiagGaussian(torch.randn(net.num_params, dtype=D) * 0.5, torch.full((net.num_params,), 0.5, dtype=D))
    X = torch.randn(9, 5, dtype=D)
    a = predictive(net, q, X, "mc", num_samples=64)
    b = predictive(net, q, X, "linearized", num_samples=64)
    torch.testing.assert_close(b.sum(-1), torch.ones(9, dtype=D))
    assert float((a - b).abs().max()) > 1e-3


def test_small_variance_linearized_approaches_the_network() -> None:
    net = Transformer(input_dim=5, n_classes=3, max_len=7, d_model=6, heads=[3, 2], ffn=[True, True], d_head=2,
                      d_ff=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 7, 5, generator=g, dtype=D)
    x[0, 4:] = float("nan")
    m = torch.randn(net.num_params, generator=g, dtype=D) * 0.3
    q = DiagGaussian(m, torch.full((net.num_params,), 1e-5, dtype=D))
    lin = predictive(net, q, x, "linearized", num_samples=8)
    point = torch.softmax(net.forward(m, x), -1)
    torch.testing.assert_close(lin, point, atol=1e-4, rtol=0)


def test_sequence_model_predictive_shape() -> None:
    task = dates(n_train=30, n_val=5, n_test=5, seed=1)
    net = AttentionRNN(**task.net_kwargs(), emb=4, hidden=5, attn=3)
    q = DiagGaussian(torch.randn(net.num_params) * 0.3, torch.full((net.num_params,), 0.01))
    X = task.X[:6]
    out = predictive(net, q, X, "linearized", num_samples=5)
    ref = predictive(net, q, X, "mc", num_samples=5)
    assert out.shape == ref.shape and out.shape[0] == 6
    torch.testing.assert_close(out, ref, atol=5e-3, rtol=0)


def test_point_estimates_and_weight_vectors() -> None:
    net = MLP([4, 6, 3])
    w = torch.randn(net.num_params, dtype=D)
    X = torch.randn(5, 4, dtype=D)
    point = DiagGaussian(w, torch.full_like(w, 1e-30))
    expect = torch.softmax(net.forward(w, X), -1)
    for q in (w, point):
        for method in ("mc", "linearized"):
            torch.testing.assert_close(predictive(net, q, X, method), expect)
    with pytest.raises(ValueError, match="unknown predictive method"):
        predictive(net, w, X, "probit-ish")
    with pytest.raises(ValueError, match="p="):
        predictive(net, w[:-1], X)


def test_evaluate_reports_both_predictives() -> None:
    net = MLP([4, 6, 3])
    q = DiagGaussian(torch.randn(net.num_params, dtype=D) * 0.3, torch.full((net.num_params,), 0.2, dtype=D))
    X = torch.randn(20, 4, dtype=D)
    y = torch.randint(0, 3, (20,))
    res = metrics.evaluate(net, q, X, y, num_samples=30)
    for k in ("accuracy", "nll", "ece", "brier", "accuracy_lin", "nll_lin", "ece_lin", "brier_lin"):
        assert k in res
    assert "nll_lin" not in metrics.evaluate(net, q.mean, X, y)
    assert "nll_lin" not in metrics.evaluate(net, q, X, y, linearized=False)
