"""The three Gaussian structures against dense closed-form references, Monte Carlo and torch.distributions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from pyro_distill import gaussian as G
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, LowRankGaussian
from pyro_distill.layout import Layout

KINDS = ("dense", "lowrank", "diag")
P = 6


def make(kind: str, p: int = P, seed: int = 0, dtype: torch.dtype = torch.float64, layout: Layout | None = None):
    """A random, well-conditioned Gaussian of the given structure."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(p, generator=g, dtype=dtype)
    if kind == "dense":
        L = torch.tril(torch.randn(p, p, generator=g, dtype=dtype)) * 0.4
        L.diagonal().copy_(0.5 + torch.rand(p, generator=g, dtype=dtype))
        return DenseGaussian(loc, L, layout=layout)
    if kind == "lowrank":
        W = torch.randn(p, 2, generator=g, dtype=dtype) * 0.6
        d = 0.3 + torch.rand(p, generator=g, dtype=dtype)
        return LowRankGaussian(loc, W, d, layout=layout)
    return DiagGaussian(loc, 0.5 + torch.rand(p, generator=g, dtype=dtype), layout=layout)


def ref_kl(m0, S0, m1, S1) -> torch.Tensor:
    """KL(N(m0, S0) || N(m1, S1)) = 1/2 [tr(S1^-1 S0) + (m1-m0)^T S1^-1 (m1-m0) - p + log|S1| - log|S0|]."""
    p = m0.shape[-1]
    S1inv = torch.linalg.inv(S1)
    d = m1 - m0
    return 0.5 * (torch.trace(S1inv @ S0) + d @ S1inv @ d - p + torch.logdet(S1) - torch.logdet(S0))


# ------------------------------------------------------------------------------------------------ basics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_moments_consistent(kind: str, dtype: torch.dtype) -> None:
    q = make(kind, dtype=dtype)
    S = q.covariance()
    assert S.shape == (P, P) and S.dtype == dtype and q.dtype == dtype and q.dim == P
    torch.testing.assert_close(S, S.T)
    assert torch.linalg.eigvalsh(S.double()).min() > 0
    torch.testing.assert_close(q.variance, S.diagonal())
    torch.testing.assert_close(q.mean, q.loc)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(q.logdet(), torch.logdet(S.double()).to(dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(q.precision() @ S, torch.eye(P, dtype=dtype), atol=tol * 10, rtol=0)
    torch.testing.assert_close(q.entropy(), MultivariateNormal(q.loc.double(), S.double()).entropy().to(dtype),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_moments(kind: str) -> None:
    q = make(kind)
    gen = torch.Generator().manual_seed(1)
    n = 100_000
    x = q.sample(n, generator=gen)
    assert x.shape == (n, P) and not x.requires_grad
    S = q.covariance()
    # standard error of a mean is sqrt(var / n) <= ~0.006 here; of a covariance entry ~ sqrt(2/n) * var
    torch.testing.assert_close(x.mean(0), q.loc, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), S, atol=0.03, rtol=0.02)
    # seeded: the same generator seed gives the same draws
    torch.testing.assert_close(q.sample(3, generator=torch.Generator().manual_seed(7)),
                               q.sample(3, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("kind", KINDS)
def test_rsample_is_differentiable(kind: str) -> None:
    q = make(kind)
    t = {k: v.clone().requires_grad_(True) for k, v in q._tensors().items()}
    q2 = type(q)(**t)
    q2.rsample(4).sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in t.values())


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_torch(kind: str) -> None:
    q = make(kind)
    ref = MultivariateNormal(q.loc, covariance_matrix=q.covariance())
    x = torch.randn(4, 3, P, dtype=torch.float64)
    lp = q.log_prob(x)
    assert lp.shape == (4, 3)
    torch.testing.assert_close(lp, ref.log_prob(x))
    torch.testing.assert_close(q.mahalanobis(x[0, 0]), (x[0, 0] - q.loc) @ torch.linalg.solve(q.covariance(),
                                                                                               x[0, 0] - q.loc))


@pytest.mark.parametrize("kind", KINDS)
def test_to_pyro_matches(kind: str) -> None:
    q = make(kind)
    d = q.to_pyro()
    assert tuple(d.event_shape) == (P,) and tuple(d.batch_shape) == ()
    x = torch.randn(5, P, dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), q.log_prob(x))
    torch.testing.assert_close(d.mean, q.mean)
    torch.testing.assert_close(d.variance, q.variance)


def test_dense_negative_diagonal_factor() -> None:
    """Only |L_ii| matters (the SVI guide leaves the sign free): density and Pyro distribution agree."""
    q = make("dense")
    L = q.scale_tril.clone()
    L[:, 2] *= -1  # flip one column: same covariance, negative diagonal entry
    q2 = DenseGaussian(q.loc, L)
    x = torch.randn(3, P, dtype=torch.float64)
    torch.testing.assert_close(q2.covariance(), q.covariance())
    torch.testing.assert_close(q2.log_prob(x), q.log_prob(x))
    torch.testing.assert_close(q2.to_pyro().log_prob(x), q.log_prob(x))


# ------------------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("a,b", list(itertools.product(KINDS, KINDS)))
def test_kl_all_pairs_vs_dense_reference(a: str, b: str) -> None:
    q, r = make(a, seed=1), make(b, seed=2)
    kl = q.kl(r)
    ref = ref_kl(q.loc, q.covariance(), r.loc, r.covariance())
    torch.testing.assert_close(kl, ref, atol=1e-10, rtol=1e-10)
    assert kl > 0
    torch.testing.assert_close(q.kl(q), torch.zeros((), dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("a,b", list(itertools.product(KINDS, KINDS)))
def test_kl_vs_monte_carlo(a: str, b: str) -> None:
    """KL(q||r) = E_q[log q - log r], estimated from 100k draws, within 4 standard errors."""
    q, r = make(a, p=4, seed=3), make(b, p=4, seed=4)
    x = q.sample(100_000, generator=torch.Generator().manual_seed(0))
    diff = q.log_prob(x) - r.log_prob(x)
    se = diff.std() / math.sqrt(diff.numel())
    assert abs(float(diff.mean() - q.kl(r))) < 4 * float(se) + 1e-6


def test_kl_is_differentiable_and_checks_dim() -> None:
    q, r = make("dense"), make("lowrank")
    L = q.scale_tril.clone().requires_grad_(True)
    DenseGaussian(q.loc, L).kl(r).backward()
    assert torch.isfinite(L.grad).all()
    with pytest.raises(ValueError, match="dimension"):
        q.kl(make("diag", p=P + 1))


# ------------------------------------------------------------------------------------------------ structure ops
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [[0, 1, 2], [4, 1, 3], [5], list(range(P))])
def test_marginalize_vs_dense(kind: str, keep: list[int]) -> None:
    q = make(kind)
    m = q.marginalize(keep)
    assert type(m) is type(q) and m.dim == len(keep)
    K = torch.tensor(keep)
    torch.testing.assert_close(m.loc, q.loc[K])
    torch.testing.assert_close(m.covariance(), q.covariance()[K][:, K])


def test_marginalize_errors() -> None:
    q = make("dense")
    with pytest.raises(IndexError, match="out of range"):
        q.marginalize([0, P])
    with pytest.raises(ValueError, match="repeated"):
        q.marginalize([1, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_condition_vs_dense(kind: str) -> None:
    """Fixing coordinates I = v: m_K + S_KI S_II^-1 (v - m_I), S_KK - S_KI S_II^-1 S_IK."""
    q = make(kind)
    I, K = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 5])
    v = torch.tensor([0.3, -1.0], dtype=torch.float64)
    S, m = q.covariance(), q.loc
    A = torch.linalg.solve(S[I][:, I], S[I][:, K])
    c = q.condition(I, v)
    assert type(c) is type(q)
    torch.testing.assert_close(c.loc, m[K] + A.T @ (v - m[I]))
    torch.testing.assert_close(c.covariance(), S[K][:, K] - S[K][:, I] @ A)


@pytest.mark.parametrize("kind", KINDS)
def test_tempered(kind: str) -> None:
    q = make(kind, layout=Layout([("w", (P,))]))
    t = q.tempered(2.5)
    assert type(t) is type(q) and t.layout == q.layout
    torch.testing.assert_close(t.loc, q.loc)
    torch.testing.assert_close(t.covariance(), 2.5 * q.covariance())
    torch.testing.assert_close(q.tempered(1.0).covariance(), q.covariance())
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            q.tempered(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_precision(kind: str) -> None:
    q = make(kind)
    torch.testing.assert_close(q.precision(), torch.linalg.inv(q.covariance()))


@pytest.mark.parametrize("kind", KINDS)
def test_to_dtype_and_detach(kind: str) -> None:
    q = make(kind, layout=Layout([("w", (P,))]))
    q32 = q.to(dtype=torch.float32)
    assert q32.dtype == torch.float32 and q32.layout == q.layout
    torch.testing.assert_close(q32.covariance().double(), q.covariance(), atol=1e-5, rtol=1e-5)
    assert not any(v.requires_grad for v in q.detach()._tensors().values())


def test_constructor_errors() -> None:
    loc = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="scale_tril must be"):
        DenseGaussian(loc, torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cov_factor must be"):
        LowRankGaussian(loc, torch.zeros(4, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cov_diag must be"):
        LowRankGaussian(loc, torch.zeros(3, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale must have shape"):
        DiagGaussian(loc, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="loc must be a vector"):
        DiagGaussian(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="another architecture|does not belong"):
        DiagGaussian(loc, torch.ones(3, dtype=torch.float64), layout=Layout([("w", (4,))]))


def test_from_covariance_and_jitter() -> None:
    q = make("dense")
    S = q.covariance()
    d = DenseGaussian.from_covariance(q.loc, S)
    torch.testing.assert_close(d.covariance(), S)
    # a rank-deficient PSD matrix gets jitter with a warning; an indefinite one is refused with the fix named
    v = torch.randn(P, 1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="jitter"):
        L = G.cholesky_jitter(v @ v.T)
    torch.testing.assert_close(L @ L.T, v @ v.T, atol=1e-5, rtol=0)
    with pytest.raises(G.NotPositiveDefiniteError, match="not positive definite"):
        G.cholesky_jitter(-torch.eye(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind: str, tmp_path) -> None:
    lay = Layout([("layer1.weight", (2, 2)), ("layer1.bias", (2,))])
    q = make(kind, layout=lay)
    q.meta = {"source": "test", "steps": 3, "nested": {"a": [1, 2]}}
    path = q.save(tmp_path / "sub" / "post.pt")
    assert path.exists()
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]  # no temporary left behind
    r = G.load(path)
    assert type(r) is type(q) and r.layout == lay and r.meta == q.meta and r.dtype == q.dtype
    for k, v in q._tensors().items():
        torch.testing.assert_close(r._tensors()[k], v, rtol=0, atol=0)
    # with the matching layout the load succeeds too
    assert G.load(path, layout=lay).layout == lay


def test_save_refuses_to_overwrite(tmp_path) -> None:
    q, q2 = make("diag"), make("diag", seed=5)
    path = q.save(tmp_path / "post.pt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        q2.save(path)
    torch.testing.assert_close(G.load(path).loc, q.loc)  # untouched
    q2.save(path, overwrite=True)
    torch.testing.assert_close(G.load(path).loc, q2.loc)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved Gaussian"):
        G.load(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable"):
        G.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"hello": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a pyro-distill Gaussian"):
        G.load(foreign)
    lay = Layout([("a", (6,))])
    path = make("dense", layout=lay).save(tmp_path / "post.pt")
    other = Layout([("a", (3,)), ("b", (3,))])
    with pytest.raises(ValueError, match="another architecture"):
        G.load(path, layout=other)
    newer = tmp_path / "newer.pt"
    payload = torch.load(path, weights_only=True)
    torch.save(payload | {"version": G.FORMAT_VERSION + 1}, newer)
    with pytest.raises(ValueError, match="upgrade"):
        G.load(newer)
    broken = tmp_path / "broken.pt"
    payload["tensors"]["scale_tril"] = torch.eye(3, dtype=torch.float64)
    torch.save(payload, broken)
    with pytest.raises(ValueError, match="inconsistent"):
        G.load(broken)


def test_start_around_each_structure() -> None:
    """The shrunk-prior start of every structure: mean loc, variances sd^2 (low rank: plus its small seeded
    random factor, 0.01 sd^2 chi2_k / k; Kronecker: max(sd) of each block, sd elsewhere)."""
    from pyro_distill.gaussian import STRUCTURES, StructureError, structure

    g = torch.Generator().manual_seed(0)
    loc, sd = torch.randn(10, generator=g, dtype=torch.float64), torch.rand(10, generator=g, dtype=torch.float64) + 0.5
    sd[:6] = 0.7  # one Kronecker block [2, 3] over the first six coordinates
    blocks = lambda: [torch.arange(6).reshape(2, 3)]  # noqa: E731
    for name in STRUCTURES:
        q = structure(name).start_around(loc, sd, rank=2, seed=3, blocks=blocks)
        assert q.kind == name and torch.equal(q.loc, loc)
        if name == "lowrank":
            extra = q.variance - sd**2
            assert bool((extra >= 0).all()) and bool((extra <= 0.2 * sd**2).all())
            again = structure(name).start_around(loc, sd, rank=2, seed=3)
            assert torch.equal(q.cov_factor, again.cov_factor)
        else:
            torch.testing.assert_close(q.variance, sd**2, rtol=1e-14, atol=0)
    with pytest.raises(StructureError, match="needs the network's blocks"):
        structure("kron").start_around(loc, sd)
