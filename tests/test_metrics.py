"""Metrics against hand computations."""

import math

import pytest
import torch

from pyro_distill import metrics
from pyro_distill.gaussian import DiagGaussian, PointMass
from pyro_distill.nets.mlp import MLP

P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]], dtype=torch.float64)
Y = torch.tensor([0, 2, 2, 1])


def test_accuracy_nll_brier_by_hand():
    assert metrics.accuracy(P, Y) == pytest.approx(0.5)
    assert metrics.nll(P, Y) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.4) + math.log(0.05)) / 4)
    b = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.6**2 + 0.7**2) + (0.3**2 + 0.3**2 + 0.6**2)
         + (0.05**2 + 0.95**2 + 0.9**2)) / 4
    assert metrics.brier(P, Y) == pytest.approx(b)


def test_ece_15_bins_by_hand():
    # confidences 0.7 (bin 10, correct), 0.6 (bin 8, wrong), 0.4 (bin 5, correct), 0.9 (bin 13, wrong)
    e = (abs(1 - 0.7) + abs(0 - 0.6) + abs(1 - 0.4) + abs(0 - 0.9)) / 4
    assert metrics.ece(P, Y) == pytest.approx(e)
    # two rows sharing one bin: |mean acc - mean conf| weighted by 2/2
    p2 = torch.tensor([[0.62, 0.38], [0.64, 0.36]], dtype=torch.float64)
    assert metrics.ece(p2, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.63))


def test_ece_equal_mass_bins_by_hand():
    # sorted confidences 0.4 (correct), 0.6 (wrong), 0.7 (correct), 0.9 (wrong); two bins of two rows each
    e = 0.5 * abs(0.5 - 0.5) + 0.5 * abs(0.5 - 0.8)
    assert metrics.ece(P, Y, n_bins=2, binning="mass") == pytest.approx(e)
    # one row per bin: the same as the equal-width estimator with every row in its own bin
    assert metrics.ece(P, Y, n_bins=4, binning="mass") == pytest.approx(metrics.ece(P, Y))
    assert metrics.ece(P, Y, n_bins=99, binning="mass") == pytest.approx(metrics.ece(P, Y))  # more bins than rows
    # one bin: calibration in the large, |accuracy - mean confidence|
    assert metrics.ece(P, Y, n_bins=1, binning="mass") == pytest.approx(abs(0.5 - 0.65))
    with pytest.raises(ValueError, match="binning"):
        metrics.ece(P, Y, binning="quantile")
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece(P, Y, n_bins=0)


def test_paired_bootstrap_of_a_metric_difference():
    gen = torch.Generator().manual_seed(0)
    n = 400
    logits = 3 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    Pa = logits.softmax(-1)
    y = torch.multinomial(Pa, 1, generator=gen).squeeze(-1)  # labels drawn from Pa: Pa is calibrated
    Pb = (4 * logits).softmax(-1)  # the same ranking, much over-confident
    same = metrics.paired_bootstrap(metrics.ece, Pa, Pa, y, n_boot=50, seed=1)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0 and same["p_greater"] == 0
    r = metrics.paired_bootstrap(metrics.nll, Pb, Pa, y, n_boot=300, seed=1)
    assert r["diff"] == pytest.approx(metrics.nll(Pb, y) - metrics.nll(Pa, y))
    assert 0 < r["lo"] < r["diff"] < r["hi"] and r["p_greater"] == 1.0 and r["se"] > 0
    assert r["n"] == n and r["n_boot"] == 300
    assert metrics.paired_bootstrap(metrics.nll, Pb, Pa, y, n_boot=300, seed=1) == r  # seeded
    e = metrics.paired_bootstrap(lambda p, t: metrics.ece(p, t, binning="mass"), Pb, Pa, y, n_boot=100, seed=2)
    assert e["lo"] > 0  # the over-confident one is resolvably worse calibrated
    with pytest.raises(ValueError, match="same rows"):
        metrics.paired_bootstrap(metrics.ece, Pa, Pa[:10], y)
    with pytest.raises(ValueError, match="n_boot"):
        metrics.paired_bootstrap(metrics.ece, Pa, Pa, y, n_boot=1)
    with pytest.raises(ValueError, match="level"):
        metrics.paired_bootstrap(metrics.ece, Pa, Pa, y, level=1.0)


def test_agreement_and_shape_errors():
    t = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.1, 0.8, 0.1], [0.0, 0.1, 0.9]], dtype=torch.float64)
    assert metrics.agreement(P, t) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        metrics.agreement(P, t[:2])
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy(P, Y[:3])


def test_regression_rmse_and_mixture_nll_by_hand():
    draws = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)  # S=2, N=2
    y = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert metrics.rmse(draws, y) == pytest.approx(math.sqrt((0 + 4) / 2))
    s = 0.5
    def npdf(x, m):
        return math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    nll = -(math.log(0.5 * (npdf(1, 0) + npdf(1, 2))) + math.log(0.5 * (npdf(3, 1) + npdf(3, 1)))) / 2
    assert metrics.regression_nll(draws, y, s) == pytest.approx(nll)


def test_evaluate_point_and_gaussian_agree_for_a_point_mass():
    torch.manual_seed(0)
    net = MLP([3, 4, 2])
    w = net.init_weights(torch.Generator().manual_seed(1), torch.float64)
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    a = metrics.evaluate(net, w, X, y)
    b = metrics.evaluate(net, PointMass(w), X, y)  # a point estimate as a member of the Gaussian family
    assert a == b
    probs = torch.softmax(net(w, X), -1)
    assert a["accuracy"] == pytest.approx(metrics.accuracy(probs, y))
    assert a["params"] == net.num_params == 3 * 4 + 4 + 4 * 2 + 2
    # a broad Gaussian averages softmaxes over draws
    q = DiagGaussian(w, torch.full_like(w, 0.5))
    res = metrics.evaluate(net, q, X, y, num_samples=50, teacher_probs=probs)
    assert 0 <= res["agreement"] <= 1 and res["nll"] > 0


def test_evaluate_regression_uses_noise_scale():
    net = MLP([2, 3, 1], likelihood="gaussian", noise_scale=0.3)
    w = net.init_weights(torch.Generator().manual_seed(0), torch.float64)
    X = torch.randn(10, 2, dtype=torch.float64)
    y = torch.randn(10, dtype=torch.float64)
    res = metrics.evaluate(net, w, X, y)
    f = net(w, X).squeeze(-1)
    assert res["rmse"] == pytest.approx(float(((f - y) ** 2).mean().sqrt()))
    assert res["nll"] == pytest.approx(float(-torch.distributions.Normal(f, 0.3).log_prob(y).mean()))
