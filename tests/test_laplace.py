"""Laplace in every structure from real curvature (dense, diag, low-rank + diag, Kronecker) and the Kron guide."""

import math

import pytest
import torch

from pyro_distill.curvature import kfac
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, KronGaussian, LowRankGaussian
from pyro_distill.inference import fit_posterior, ggn, laplace
from pyro_distill.nets import MLP

D = torch.float64


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    net = MLP([5, 6, 6, 3])
    X = torch.randn(40, 5, generator=g, dtype=D)
    y = torch.randint(0, 3, (40,), generator=g)
    w = torch.randn(net.num_params, generator=g, dtype=D) * 0.5
    prior = net.default_prior(D)
    Lam = ggn(net, w, X) + prior.precision()
    return net, X, y, w, prior, Lam


def test_dense_and_diag_laplace_equal_the_reference(problem) -> None:
    net, X, _, w, prior, Lam = problem
    q = laplace(net, X, w, prior, "dense")
    assert isinstance(q, DenseGaussian)
    torch.testing.assert_close(q.covariance(), torch.linalg.inv(Lam), rtol=0, atol=1e-10)
    qd = laplace(net, X, w, prior, "diag")
    assert isinstance(qd, DiagGaussian)
    torch.testing.assert_close(qd.variance, 1 / Lam.diagonal(), rtol=1e-10, atol=0)


def test_lowrank_laplace_keeps_the_diagonal_and_is_exact_along_its_directions(problem) -> None:
    net, X, _, w, prior, Lam = problem
    q = laplace(net, X, w, prior, "lowrank", rank=8)
    assert isinstance(q, LowRankGaussian) and q.rank == 8
    d = 1 / Lam.diagonal()
    torch.testing.assert_close(q.cov_diag, d, rtol=1e-10, atol=0)  # the exact diagonal of the precision
    # the smallest eigenpairs of C = D^1/2 Lam D^1/2: along them the covariance equals the exact one
    C = d.sqrt().unsqueeze(-1) * Lam * d.sqrt()
    c, V = torch.linalg.eigh(C)
    Ct = (q.covariance() / d.sqrt().unsqueeze(-1)) / d.sqrt()  # D^-1/2 S D^-1/2
    for j in range(3):
        v = V[:, j]
        assert float(v @ Ct @ v) == pytest.approx(1 / float(c[j]), rel=1e-6)
    # and it is closer to the exact covariance than the diagonal alone
    S = torch.linalg.inv(Lam)
    assert (q.covariance() - S).norm() < (torch.diag(d) - S).norm()


def test_kron_laplace_is_the_damped_kfac_product(problem) -> None:
    net, X, y, w, prior, _ = problem
    q = laplace(net, X, w, prior, "kron")
    assert isinstance(q, KronGaussian) and q.num_blocks == net.num_layers
    P = q.precision()
    for t, (A, B) in enumerate(kfac(net, w, X, y).values()):
        idx = net.kron_index()[t].reshape(-1)
        alpha = 1 / float(prior.variance[idx[0]])
        pi = math.sqrt(float(B.diagonal().mean()) / float(A.diagonal().mean()))
        Pr = B + pi * math.sqrt(alpha) * torch.eye(B.shape[0], dtype=D)
        Pc = A + math.sqrt(alpha) / pi * torch.eye(A.shape[0], dtype=D)
        torch.testing.assert_close(P[idx][:, idx], torch.kron(Pr, Pc), rtol=1e-8, atol=1e-8)


def test_kron_laplace_refuses_a_correlated_prior(problem) -> None:
    net, X, _, w, _, _ = problem
    dense_prior = DenseGaussian(torch.zeros(net.num_params, dtype=D), torch.eye(net.num_params, dtype=D))
    with pytest.raises(ValueError, match="diagonal"):
        laplace(net, X, w, dense_prior, "kron")


@pytest.mark.parametrize("guide", ["mvn", "diag", "lowrank", "kron"])
@pytest.mark.parametrize("cov_init", ["laplace", "prior"])
def test_every_guide_starts_from_laplace_or_the_prior_and_svi_improves(problem, guide, cov_init) -> None:
    net, X, y, _, _, _ = problem
    q, h = fit_posterior(net, X, y, guide=guide, steps=60, map_steps=100, lr=5e-3, cov_init=cov_init, rank=4,
                         num_particles=4, seed=0)
    assert q.kind == {"mvn": "dense"}.get(guide, guide) and q.layout == net.layout
    assert math.isfinite(h.elbo_end) and h.elbo_end >= h.elbo_start - 1.0
