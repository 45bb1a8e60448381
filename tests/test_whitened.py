"""The whitened SVI step (pyro_distill.whitened): same ELBO, same gradients, exact round trips, fits under dense priors.

All in float64 on a small classification MLP (p = 51); priors are dense (a Cholesky factor), low-rank + diagonal,
Kronecker (layer 1's [U | b] as one matrix-normal block, layer 2 in the diagonal remainder) and diagonal.
Tolerances: values 1e-8 relative, round trips 1e-10.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_inference import InfAfter  # the deliberately divergent net of the NaN-guard tests

from pyro_distill import whitened
from pyro_distill.data import synthetic_classification
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, Gaussian, KronGaussian, LowRankGaussian, kron_index
from pyro_distill.inference import DivergenceError, elbo_terms, fit_posterior
from pyro_distill.nets import MLP
from pyro_distill.whitened import WhitenedGuide, resolve_whiten, tril_matmul

F64 = torch.float64


@pytest.fixture(params=[256, 8], ids=["one-block", "blocks-of-8"])
def blocks(request, monkeypatch) -> int:
    """Run a test with the default block size (one block at p = 45) and with blocks of 8 (the blocked paths)."""
    monkeypatch.setattr(whitened, "_TRI_BLOCK", request.param)
    return request.param


@pytest.fixture(scope="module")
def problem():
    ds = synthetic_classification(n_train=120, n_test=10, n_features=4, n_classes=3, seed=0, dtype=F64)
    net = MLP([4, 6, 3])
    return net, ds.X, ds.y


def _rand_tril(p: int, g: torch.Generator, scale: float = 0.1) -> torch.Tensor:
    A = torch.randn(p, p, generator=g, dtype=F64) * scale / p**0.5
    return torch.tril(A, -1) + torch.diag(scale * (0.5 + torch.rand(p, generator=g, dtype=F64)))


def make_prior(kind: str, net: MLP, seed: int = 1) -> Gaussian:
    g = torch.Generator().manual_seed(seed)
    p = net.num_params
    mu = 0.3 * torch.randn(p, generator=g, dtype=F64)
    if kind == "dense":
        return DenseGaussian(mu, _rand_tril(p, g, 0.5), layout=net.layout)
    if kind == "lowrank":
        return LowRankGaussian(mu, 0.3 * torch.randn(p, 4, generator=g, dtype=F64),
                               0.1 + torch.rand(p, generator=g, dtype=F64), layout=net.layout)
    if kind == "kron":
        idx = kron_index(net.layout, "layer1.weight", "layer1.bias")
        r, c = idx.shape
        return KronGaussian.from_blocks(mu, [(idx, _rand_tril(r, g, 0.8), _rand_tril(c, g, 0.8))],
                                        0.2 + torch.rand(p, generator=g, dtype=F64), layout=net.layout)
    return DiagGaussian(mu, 0.2 + torch.rand(p, generator=g, dtype=F64), layout=net.layout)


def make_q(net: MLP, seed: int = 2) -> DenseGaussian:
    g = torch.Generator().manual_seed(seed)
    return DenseGaussian(0.5 * torch.randn(net.num_params, generator=g, dtype=F64), _rand_tril(net.num_params, g),
                         layout=net.layout)


def dense_kl(m, F, prior: Gaussian) -> torch.Tensor:
    """KL(N(m, F F^T) || prior) from dense matrices, for any (not necessarily triangular) F: the reference."""
    Sp = prior.covariance()
    Sq = F @ F.T
    Lp = torch.linalg.cholesky(Sp)
    d = torch.linalg.solve_triangular(Lp, (m - prior.loc).unsqueeze(-1), upper=False)
    tr = torch.cholesky_solve(Sq, Lp).diagonal().sum()
    return 0.5 * (tr + (d**2).sum() - m.numel() + torch.logdet(Sp) - torch.logdet(Sq))


@pytest.mark.parametrize("pk", ["dense", "lowrank", "kron", "diag"])
def test_roundtrip_original_whitened_original(problem, blocks, pk: str) -> None:
    """The Gaussian handed back equals the start it was built from (mean and factor, 1e-10)."""
    net, _, _ = problem
    prior, q = make_prior(pk, net), make_q(net)
    back = WhitenedGuide(q, prior).gaussian()
    assert isinstance(back, DenseGaussian) and back.layout == net.layout
    torch.testing.assert_close(back.loc, q.loc, rtol=0, atol=1e-10)
    torch.testing.assert_close(back.scale_tril, q.scale_tril, rtol=0, atol=1e-10)
    assert torch.equal(back.scale_tril, torch.tril(back.scale_tril))


@pytest.mark.parametrize("pk", ["dense", "lowrank", "kron", "diag"])
def test_whitened_elbo_equals_unwhitened(problem, blocks, pk: str) -> None:
    """Same q, same base noise z: the same draws, the same KL and ELBO (1e-8) as the original-coordinate path.

    The draw is ``m + z F^T`` with ``F = B M``: ``F = L`` for the triangular roots; for the low-rank prior's
    symmetric root and the Kronecker root (not triangular in the flat order) ``F`` is ``L`` times an orthogonal
    matrix (same q, the draws from the same z rotated)."""
    net, X, y = problem
    prior, q = make_prior(pk, net), make_q(net)
    g = WhitenedGuide(q, prior)
    torch.manual_seed(7)
    w1, kl1 = g.sample_kl(5)
    ll1, kl1 = elbo_terms(net, None, prior, X, y, 5, w=w1, kl=kl1)
    torch.manual_seed(7)
    z = torch.randn(5, net.num_params, dtype=F64)
    with torch.no_grad():
        F = g._root().rows(g.scale_tril.T).T
    if pk not in ("lowrank", "kron"):
        torch.testing.assert_close(F, q.scale_tril, rtol=0, atol=1e-10)
    torch.testing.assert_close(F @ F.T, q.covariance(), rtol=0, atol=1e-10)
    w2 = q.loc + z @ F.T
    ll2, kl2 = elbo_terms(net, q, prior, X, y, 5, w=w2)
    torch.testing.assert_close(w1, w2, rtol=0, atol=1e-10)
    assert float(kl1.detach()) == pytest.approx(float(kl2), rel=1e-8)
    assert float((ll1 - kl1).detach()) == pytest.approx(float(ll2 - kl2), rel=1e-8)


@pytest.mark.parametrize("pk", ["dense", "lowrank", "kron"])
def test_gradients_agree_with_autograd_in_original_coordinates(problem, blocks, pk: str) -> None:
    """The hand-written backward equals autograd of the original-coordinate ELBO seen as a function of the
    whitened parameters: ``m = mu + B a``, ``F = B M`` (then draws ``m + z F^T`` and the dense KL)."""
    net, X, y = problem
    prior, q = make_prior(pk, net), make_q(net)
    g = WhitenedGuide(q, prior)
    g.scale_tril.data.add_(torch.tril(0.01 * torch.randn(net.num_params, net.num_params, dtype=F64)))
    torch.manual_seed(3)
    w, kl = g.sample_kl(6)
    ll, kl = elbo_terms(net, None, prior, X, y, 6, w=w, kl=kl)
    (ll - kl).backward()
    ga, gM = g.loc.grad.clone(), g.scale_tril.grad.clone()

    a = g.loc.detach().clone().requires_grad_(True)
    M = g.scale_tril.detach().clone().requires_grad_(True)
    root = g._root()
    m = prior.loc + root.rows(a.unsqueeze(0)).squeeze(0)
    F = root.rows(torch.tril(M).T).T  # B M, not triangular for the low-rank root
    torch.manual_seed(3)
    z = torch.randn(6, net.num_params, dtype=F64)
    ll2, _ = elbo_terms(net, None, prior, X, y, 6, w=m + z @ F.T, kl=torch.zeros((), dtype=F64))
    (ll2 - dense_kl(m, F, prior)).backward()
    torch.testing.assert_close(ga, a.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gM, torch.tril(M.grad), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["diag", "lowrank"])
def test_cached_kl_equals_closed_form(problem, kind: str) -> None:
    """Diagonal and low-rank guides under a dense prior keep their parameters; only the KL is cached."""
    net, _, _ = problem
    prior = make_prior("dense", net)
    gen = torch.Generator().manual_seed(5)
    p = net.num_params
    loc = torch.randn(p, generator=gen, dtype=F64)
    d = 0.05 + 0.1 * torch.rand(p, generator=gen, dtype=F64)
    q = (DiagGaussian(loc, d.sqrt(), layout=net.layout) if kind == "diag" else
         LowRankGaussian(loc, 0.1 * torch.randn(p, 3, generator=gen, dtype=F64), d, layout=net.layout))
    g = WhitenedGuide(q, prior, kind)
    back = g.gaussian()
    assert type(back) is type(q)
    _, kl = g.sample_kl(2)
    assert float(kl.detach()) == pytest.approx(float(q.kl(prior)), rel=1e-10)


def test_resolve_whiten_rules(problem) -> None:
    net, _, _ = problem
    dense, low, diag = (make_prior(k, net) for k in ("dense", "lowrank", "diag"))
    assert resolve_whiten("auto", "mvn", dense) and resolve_whiten("auto", "mvn", low)
    assert resolve_whiten("auto", "mvn", make_prior("kron", net)) and not resolve_whiten("auto", "diag", low)
    assert resolve_whiten("auto", "diag", dense) and resolve_whiten("auto", "lowrank", dense)
    assert not resolve_whiten("auto", "mvn", diag) and not resolve_whiten("auto", "lowrank", low)
    assert resolve_whiten(True, "mvn", diag) and not resolve_whiten(False, "mvn", dense)
    assert not resolve_whiten("auto", "kron", dense) and not resolve_whiten("auto", "lowrank_precision", dense)
    with pytest.raises(ValueError, match=r"only the dense \(mvn\), diag and lowrank guides"):
        resolve_whiten(True, "kron", dense)
    with pytest.raises(ValueError, match="would not keep the guide's structure"):
        resolve_whiten(True, "lowrank", low)
    with pytest.raises(ValueError, match="'auto'"):
        resolve_whiten("yes", "mvn", dense)


def test_tril_matmul_equals_product() -> None:
    g = torch.Generator().manual_seed(0)
    A, B = (torch.tril(torch.randn(37, 37, generator=g, dtype=F64)) for _ in range(2))
    torch.testing.assert_close(tril_matmul(A, B, block=8), A @ B, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pk", ["dense", "lowrank", "kron"])
def test_fit_under_dense_prior_returns_dense_gaussian_and_first_elbo_matches(problem, pk: str) -> None:
    """A short whitened fit returns a DenseGaussian on the student's layout; its first step (same start, same
    draws; dense prior) has the same ELBO as the old path's (1e-8), and the ELBO goes up."""
    net, X, y = problem
    prior = make_prior(pk, net)
    start = make_q(net)
    kw = dict(guide="mvn", prior=prior, init=start, steps=60, lr=0.01, num_particles=4, seed=0,
              elbo_eval_particles=256)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q1, h1 = fit_posterior(net, X, y, whiten="auto", callback=lambda s, q: seen.append(q), eval_every=20, **kw)
        q0, h0 = fit_posterior(net, X, y, whiten=False, **kw)
    assert h1.info["whiten"] is True and h0.info["whiten"] is False
    assert isinstance(q1, DenseGaussian) and q1.layout == net.layout and q1.meta["guide"] == "dense"
    assert torch.equal(q1.scale_tril, torch.tril(q1.scale_tril))
    assert len(seen) == 3 and all(isinstance(q, DenseGaussian) and q.layout is None or q.layout == net.layout
                                  for q in seen)
    assert h1.elbo_start == pytest.approx(h0.elbo_start, rel=1e-10)
    if pk == "dense":  # the low-rank prior's root rotates the factor: same q, other draws from the same z
        assert h1.elbo[0] == pytest.approx(h0.elbo[0], rel=1e-8)
    assert h1.elbo_end > h1.elbo_start
    # the callback's Gaussian at the last step is the one handed back
    torch.testing.assert_close(seen[-1].scale_tril, q1.scale_tril, rtol=0, atol=0)


def test_identity_root_reproduces_old_path(problem, blocks) -> None:
    """Under an isotropic diagonal prior the whitened parameters ARE the old ones (B / s = I): whiten=True
    reproduces whiten=False step by step (same draws, same Adam steps), so lr and factor_lr mean the same."""
    net, X, y = problem
    p = net.num_params
    prior = DiagGaussian(torch.zeros(p, dtype=F64), torch.full((p,), 0.7, dtype=F64), layout=net.layout)
    kw = dict(guide="mvn", prior=prior, init=make_q(net), steps=30, lr=0.01, num_particles=4, seed=0)
    q1, h1 = fit_posterior(net, X, y, whiten=True, **kw)
    q0, h0 = fit_posterior(net, X, y, whiten="auto", **kw)
    assert h1.info["whiten"] is True and h0.info["whiten"] is False
    torch.testing.assert_close(torch.tensor(h1.elbo), torch.tensor(h0.elbo), rtol=1e-9, atol=0)
    torch.testing.assert_close(q1.loc, q0.loc, rtol=0, atol=1e-10)
    torch.testing.assert_close(q1.scale_tril, q0.scale_tril, rtol=0, atol=1e-10)


@pytest.mark.parametrize("guide", ["diag", "lowrank"])
def test_structured_guides_under_dense_prior_fit_and_keep_structure(problem, guide: str) -> None:
    """diag / lowrank guides under a dense prior (cached KL): same first ELBO as the old path, same structure."""
    net, X, y = problem
    prior = make_prior("dense", net)
    kw = dict(guide=guide, prior=prior, init="prior", map_steps=20, cov_init="prior", steps=20, lr=0.01,
              num_particles=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q1, h1 = fit_posterior(net, X, y, **kw)
        q0, h0 = fit_posterior(net, X, y, whiten=False, **kw)
    assert h1.info["whiten"] is True and type(q1) is type(q0)
    assert h1.elbo == pytest.approx(h0.elbo, rel=1e-8)
    for k, v in q1._tensors().items():
        torch.testing.assert_close(v, q0._tensors()[k], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pk", ["dense", "kron"])
def test_handed_back_gaussian_is_differentiable(problem, blocks, pk: str) -> None:
    """``gaussian()`` stays differentiable (a Pyro guide may use it): d tr(S)/d M_s by autograd equals the formula
    ``2 (B/s)^T (B/s) M_s`` (lower part), for the blocked triangular product and for the QR hand-back."""
    net, _, _ = problem
    g = WhitenedGuide(make_q(net), make_prior(pk, net))
    g.gaussian().scale_tril.pow(2).sum().backward()
    root, M = g._root(), g.scale_tril.detach()
    Bs = root.rows(torch.eye(net.num_params, dtype=F64)).T  # B / s as a matrix
    torch.testing.assert_close(g.scale_tril.grad.tril(), torch.tril(2 * Bs.T @ Bs @ M), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pk", ["dense", "kron"])
def test_nan_guard_hands_back_last_good_state_in_original_coordinates(problem, pk: str) -> None:
    """The NaN guard under a whitened fit: DivergenceError at the step, the last good state is the DenseGaussian
    (original coordinates) that the same number of clean steps hands back, exactly."""
    net, X, y = problem
    prior, start, k = make_prior(pk, net), make_q(net), 5
    kw = dict(guide="mvn", prior=prior, init=start, lr=0.01, num_particles=4, seed=0)
    bad = InfAfter([4, 6, 3], n=k + 2)  # one ELBO evaluation before the first step
    with pytest.raises(DivergenceError, match=f"diverged at step {k}") as info:
        fit_posterior(bad, X, y, steps=50, **kw)
    err = info.value
    assert err.step == k and len(err.history.elbo) == k and err.history.info["whiten"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok, _ = fit_posterior(net, X, y, steps=k, **kw)
    assert isinstance(err.last_good, DenseGaussian)
    for name, t in ok._tensors().items():
        torch.testing.assert_close(err.last_good._tensors()[name], t, rtol=0, atol=0)
        assert torch.isfinite(t).all()
