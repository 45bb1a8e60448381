"""LowRankPrecisionGaussian ``N(m, (diag(d) + F F^T)^{-1})`` against the dense computation in float64.

The reference of every quantity is the dense precision ``Lam = diag(d) + F F^T`` inverted (``S = Lam^{-1}``):
moments, densities, KLs (dense formulas), conditioning (``DenseGaussian.from_covariance(m, S).condition``) and
marginals (``S_KK``). Tolerances 1e-10 unless stated.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, kl_divergence

from pyro_distill import surgery
from pyro_distill.gaussian import (
    DenseGaussian,
    DiagGaussian,
    Gaussian,
    LowRankGaussian,
    LowRankPrecisionGaussian,
    as_gaussian,
    load,
)
from pyro_distill.nets.mlp import MLP

D = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


def make(p: int = 9, k: int = 3, seed: int = 0, layout=None) -> LowRankPrecisionGaussian:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(p, generator=g, dtype=D)
    F = torch.randn(p, k, generator=g, dtype=D)
    d = 0.3 + torch.rand(p, generator=g, dtype=D)
    return LowRankPrecisionGaussian(loc, F, d, layout=layout)


def dense_cov(q: LowRankPrecisionGaussian) -> torch.Tensor:
    return torch.linalg.inv(q.prec_factor @ q.prec_factor.T + torch.diag(q.prec_diag))


def dense_kl(m1, S1, m2, S2) -> torch.Tensor:
    p = m1.numel()
    P2 = torch.linalg.inv(S2)
    diff = m2 - m1
    return 0.5 * (torch.trace(P2 @ S1) + diff @ P2 @ diff - p + torch.logdet(S2) - torch.logdet(S1))


def test_moments_density_entropy_equal_dense() -> None:
    q = make()
    S = dense_cov(q)
    torch.testing.assert_close(q.covariance(), S, **TOL)
    torch.testing.assert_close(q.covariance_matrix, S, **TOL)
    torch.testing.assert_close(q.precision(), torch.linalg.inv(S), **TOL)
    torch.testing.assert_close(q.variance, S.diagonal(), **TOL)
    torch.testing.assert_close(q.precision_diagonal(), q.precision().diagonal(), **TOL)
    torch.testing.assert_close(q.logdet(), torch.logdet(S), **TOL)
    ref = MultivariateNormal(q.loc, S)
    x = torch.randn(2, 5, q.dim, generator=torch.Generator().manual_seed(1), dtype=D)
    torch.testing.assert_close(q.log_prob(x), ref.log_prob(x), **TOL)
    torch.testing.assert_close(q.entropy(), ref.entropy(), **TOL)
    torch.testing.assert_close(q.mahalanobis(x), ((x - q.loc) @ torch.linalg.inv(S) * (x - q.loc)).sum(-1), **TOL)
    assert repr(q) == "LowRankPrecisionGaussian(p=9, rank=3, dtype=float64)"


def test_sampler_is_an_exact_square_root_and_matches_moments() -> None:
    q = make(p=7, k=3)
    S = dense_cov(q)
    # the linear map of the sampler: x = m + A z with A A^T = Lam^{-1}
    A = q._root(torch.eye(q.dim, dtype=D)).T
    torch.testing.assert_close(A @ A.T, S, **TOL)
    Af, e = q._factor_form()
    assert e is None
    torch.testing.assert_close(Af @ Af.T, S, **TOL)
    # the symmetric QR construction of the brief is another square root of the same matrix
    d = q.prec_diag
    B = q.prec_factor / d.sqrt().unsqueeze(-1)
    V, R = torch.linalg.qr(B)
    M = R @ R.T
    w, U = torch.linalg.eigh(torch.eye(3, dtype=D) + M)
    N = U @ torch.diag(w.rsqrt()) @ U.T
    Aqr = (torch.eye(q.dim, dtype=D) + V @ (N - torch.eye(3, dtype=D)) @ V.T) / d.sqrt().unsqueeze(-1)
    torch.testing.assert_close(Aqr @ Aqr.T, S, **TOL)
    # draws follow x = m + A z exactly for the generator's z
    z = torch.randn(4, q.dim, generator=torch.Generator().manual_seed(5), dtype=D)
    x = q.rsample((4,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, q.loc + z @ A.T, **TOL)
    # moments of many draws: standard errors ~ 1/sqrt(n), loose tolerance
    n = 200_000
    xs = q.sample((n,), generator=torch.Generator().manual_seed(2))
    assert xs.shape == (n, q.dim)
    torch.testing.assert_close(xs.mean(0), q.loc, atol=6 * S.diagonal().max().sqrt() / math.sqrt(n), rtol=0)
    torch.testing.assert_close(torch.cov(xs.T), S, atol=0.02 * S.abs().max(), rtol=0)
    assert q.sample((2, 3)).shape == (2, 3, q.dim) and q.sample().shape == (q.dim,)


@pytest.mark.parametrize("I", [[0, 4, 5], [8], [1, 2, 3, 6, 7]])
def test_condition_equals_dense_conditioning(I) -> None:
    q = make()
    v = torch.linspace(-1, 1, len(I), dtype=D)
    c = q.condition(I, v)
    assert isinstance(c, LowRankPrecisionGaussian) and c.rank == q.rank
    ref = DenseGaussian.from_covariance(q.loc, dense_cov(q)).condition(I, v)
    torch.testing.assert_close(c.loc, ref.loc, **TOL)
    torch.testing.assert_close(c.covariance(), ref.covariance(), **TOL)
    torch.testing.assert_close(q.condition(I).loc, DenseGaussian.from_covariance(q.loc, dense_cov(q)).condition(I).loc,
                               **TOL)


@pytest.mark.parametrize("keep", [[3, 0, 7], list(range(9)), [8, 1, 2, 5, 4, 6]])
def test_marginalize_equals_dense_marginal(keep) -> None:
    q = make()
    S = dense_cov(q)
    K = torch.tensor(keep)
    mq = q.marginalize(keep)
    assert isinstance(mq, LowRankPrecisionGaussian) and mq.rank == q.rank
    torch.testing.assert_close(mq.loc, q.loc[K], **TOL)
    torch.testing.assert_close(mq.covariance(), S[K][:, K], **TOL)


def _others(p: int):
    g = torch.Generator().manual_seed(7)
    loc = torch.randn(p, generator=g, dtype=D)
    W = torch.randn(p, 2, generator=g, dtype=D) * 0.5
    L = torch.tril(torch.randn(p, p, generator=g, dtype=D)) * 0.2 + torch.eye(p, dtype=D)
    return [DiagGaussian(loc, 0.5 + torch.rand(p, generator=g, dtype=D)),
            LowRankGaussian(loc, W, 0.4 + torch.rand(p, generator=g, dtype=D)),
            DenseGaussian(loc, L),
            make(p=p, k=2, seed=3)]


@pytest.mark.parametrize("which", range(4))
def test_kl_equals_dense_both_directions(which: int) -> None:
    q = make()
    o = _others(q.dim)[which]
    S, So = dense_cov(q), o.covariance()
    torch.testing.assert_close(q.kl(o), dense_kl(q.loc, S, o.loc, So), **TOL)
    torch.testing.assert_close(o.kl(q), dense_kl(o.loc, So, q.loc, S), **TOL)
    torch.testing.assert_close(kl_divergence(q, o), q.kl(o), **TOL)
    torch.testing.assert_close(kl_divergence(o, q), o.kl(q), **TOL)
    torch.testing.assert_close(q.kl(q), torch.zeros((), dtype=D), atol=1e-10, rtol=0)


def test_kl_against_torch_and_pyro_distributions() -> None:
    q = make()
    S = dense_cov(q)
    g = torch.Generator().manual_seed(9)
    t = LowRankMultivariateNormal(torch.randn(q.dim, generator=g, dtype=D),
                                  torch.randn(q.dim, 2, generator=g, dtype=D), 0.5 + torch.rand(q.dim, dtype=D))
    torch.testing.assert_close(kl_divergence(q, t), dense_kl(q.loc, S, t.loc, t.covariance_matrix), **TOL)
    torch.testing.assert_close(kl_divergence(t, q), dense_kl(t.loc, t.covariance_matrix, q.loc, S), **TOL)
    d = q.to_pyro()
    torch.testing.assert_close(kl_divergence(d, t), kl_divergence(q, t), **TOL)
    torch.testing.assert_close(kl_divergence(t, d), kl_divergence(t, q), **TOL)
    torch.testing.assert_close(kl_divergence(d, q.to_pyro()), torch.zeros((), dtype=D), atol=1e-10, rtol=0)


def test_gradients_flow_through_rsample_and_kl() -> None:
    q0 = make(p=6, k=2)
    loc = q0.loc.clone().requires_grad_()
    F = torch.zeros(6, 2, dtype=D, requires_grad=True)  # the SVI guide's start: a zero factor
    logd = q0.prec_diag.log().clone().requires_grad_()
    prior = _others(6)[1]
    for Fv in (F, (q0.prec_factor.clone()).requires_grad_()):
        q = LowRankPrecisionGaussian(loc, Fv, logd.exp())
        x = q.rsample((5,), generator=torch.Generator().manual_seed(0))
        loss = (x**2).sum() + q.kl(prior) + prior.kl(q) + q.log_prob(x.detach()).sum()
        grads = torch.autograd.grad(loss, [loc, Fv, logd])
        assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
        assert float(grads[2].abs().sum()) > 0


def test_gradient_equals_finite_difference() -> None:
    q0 = make(p=5, k=2)
    prior = _others(5)[2]

    def f(Fv: torch.Tensor) -> torch.Tensor:
        q = LowRankPrecisionGaussian(q0.loc, Fv, q0.prec_diag)
        x = q.rsample((3,), generator=torch.Generator().manual_seed(0))
        return (x.sin()).sum() + q.kl(prior)

    assert torch.autograd.gradcheck(f, (q0.prec_factor.clone().requires_grad_(),))


def test_tempered_scales_the_covariance() -> None:
    q = make()
    t = q.tempered(2.5)
    assert isinstance(t, LowRankPrecisionGaussian)
    torch.testing.assert_close(t.covariance(), 2.5 * dense_cov(q), **TOL)
    torch.testing.assert_close(t.loc, q.loc, **TOL)


def test_save_load_roundtrip_and_conversions(tmp_path) -> None:
    q = make()
    q.meta = {"source": "test"}
    path = q.save(tmp_path / "q.pt")
    r = load(path)
    assert isinstance(r, LowRankPrecisionGaussian) and r.meta == {"source": "test"}
    for a, b in zip(q._tensors().values(), r._tensors().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dq = q.to_dense()
    assert isinstance(dq, DenseGaussian)
    torch.testing.assert_close(dq.covariance(), dense_cov(q), **TOL)
    full = q.to_lowrank(q.dim)  # every eigenpair: the covariance itself (diagonal clamped at round-off)
    torch.testing.assert_close(full.covariance(), dense_cov(q), atol=1e-10, rtol=0)
    lr = q.to_lowrank(2)
    assert isinstance(lr, LowRankGaussian) and lr.rank == 2
    torch.testing.assert_close(lr.variance, q.variance, **TOL)
    assert Gaussian.from_distribution(q) is q and as_gaussian(q.to_pyro()) is q
    f32 = q.to(dtype=torch.float32)
    assert f32.dtype == torch.float32 and isinstance(f32, LowRankPrecisionGaussian)


def test_to_pyro_samples_and_scores_without_dense() -> None:
    import pyro.distributions as dist

    q = make()
    d = q.to_pyro()
    assert isinstance(d, dist.TorchDistribution) and d.event_shape == (q.dim,) and d.batch_shape == ()
    x = d.rsample((4,))
    torch.testing.assert_close(d.log_prob(x), q.log_prob(x), **TOL)
    e = d.expand([3])
    assert e.sample().shape == (3, q.dim) and e.log_prob(e.sample()).shape == (3,)


def test_validation_names_the_fix() -> None:
    q = make()
    with pytest.raises(ValueError, match=r"prec_diag must be > 0.*clamp"):
        LowRankPrecisionGaussian(q.loc, q.prec_factor, -q.prec_diag)
    F = q.prec_factor.clone()
    F[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"prec_factor holds 1 NaN"):
        LowRankPrecisionGaussian(q.loc, F, q.prec_diag)
    with pytest.raises(ValueError, match=r"prec_factor must be \[9, k\]"):
        LowRankPrecisionGaussian(q.loc, q.prec_factor[:4], q.prec_diag)


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_surgery_equals_surgery_on_dense(bias: bool) -> None:
    net = MLP([4, 5, 5, 3], activation="relu", bias=bias)
    q = make(p=net.num_params, k=6, seed=11, layout=net.layout)
    qd = DenseGaussian.from_covariance(q.loc, dense_cov(q), layout=net.layout)
    ops = [surgery.remove_neurons(net, 1, [0, 3])]
    ops.append(surgery.remove_neurons(ops[0].architecture(net), 2, [1, 2]))
    mid = ops[1].architecture(ops[0].architecture(net))
    ops.append(surgery.remove_layer(mid, 2))  # n_2 = n_1 = 3 after the removals
    for k in range(1, len(ops) + 1):
        s_net, s_q = surgery.apply(ops[:k], net, q)
        _, s_qd = surgery.apply(ops[:k], net, qd)
        assert isinstance(s_q, LowRankPrecisionGaussian), f"{ops[:k]} left the precision structure"
        assert s_q.layout == s_net.layout and s_q.dim == s_net.num_params
        torch.testing.assert_close(s_q.loc, s_qd.loc, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(s_q.covariance(), s_qd.covariance(), atol=1e-9, rtol=1e-9)


# ============================================================================ Laplace and the SVI guide
@pytest.fixture(scope="module")
def problem():
    from pyro_distill.inference import ggn

    g = torch.Generator().manual_seed(0)
    net = MLP([3, 4, 3])  # p = 31
    X = torch.randn(30, 3, generator=g, dtype=D)
    y = torch.randint(0, 3, (30,), generator=g)
    w = torch.randn(net.num_params, generator=g, dtype=D) * 0.5
    prior = net.default_prior(D)
    Lam = ggn(net, w, X) + prior.precision()
    return net, X, y, w, prior, Lam


def test_laplace_lowrank_precision_full_rank_equals_dense_laplace(problem) -> None:
    from pyro_distill.inference import laplace

    net, X, _, w, prior, Lam = problem
    q = laplace(net, X, w, prior, "lowrank_precision", rank=net.num_params)
    assert isinstance(q, LowRankPrecisionGaussian) and q.rank == net.num_params and q.layout == net.layout
    qd = laplace(net, X, w, prior, "dense")
    torch.testing.assert_close(q.covariance(), qd.covariance(), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(q.precision(), Lam, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(q.loc, w, rtol=0, atol=0)


def test_laplace_lowrank_precision_keeps_the_exact_precision_diagonal(problem) -> None:
    from pyro_distill.inference import ggn, laplace

    net, X, _, w, prior, Lam = problem
    q = laplace(net, X, w, prior, "lowrank_precision", rank=5)
    assert q.rank == 5
    torch.testing.assert_close(q.precision_diagonal(), Lam.diagonal(), atol=1e-10, rtol=1e-10)
    # F F^T is the GGN's best rank-5 part: G - F F^T is PSD with the remaining eigenvalues
    G = ggn(net, w, X)
    ev = torch.linalg.eigvalsh(G)
    torch.testing.assert_close(torch.linalg.eigvalsh(q.prec_factor @ q.prec_factor.T)[-5:], ev[-5:],
                               atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("cov_init", ["laplace", "prior"])
def test_lowrank_precision_guide_fits(problem, cov_init) -> None:
    from pyro_distill.inference import GUIDES, GaussianGuide, fit_posterior

    net, X, y, _, _, _ = problem
    assert "lowrank_precision" in GUIDES
    q, h = fit_posterior(net, X, y, guide="lowrank_precision", steps=40, map_steps=100, lr=5e-3, cov_init=cov_init,
                         rank=4, num_particles=4, seed=0)
    assert isinstance(q, LowRankPrecisionGaussian) and q.layout == net.layout and q.rank == 4
    assert math.isfinite(h.elbo_end) and h.elbo_end >= h.elbo_start - 1.0
    guide = GaussianGuide(q, "lowrank_precision")
    names = {n.removesuffix("_unconstrained") for n, _ in guide.named_parameters()}
    assert names == {"loc", "prec_factor", "log_prec_diag"}
    r = guide.gaussian()
    torch.testing.assert_close(r.covariance(), q.covariance(), atol=1e-12, rtol=1e-12)
    assert r.prec_factor.requires_grad


def test_as_a_prior_its_precision_products_need_no_dense_matrix() -> None:
    from pyro_distill.inference import _precision_diagonal, _precision_mv

    q = make()
    v = torch.randn(q.dim, generator=torch.Generator().manual_seed(4), dtype=D)
    torch.testing.assert_close(_precision_mv(q, v), q.precision() @ v, **TOL)
    torch.testing.assert_close(_precision_diagonal(q), q.precision().diagonal(), **TOL)
