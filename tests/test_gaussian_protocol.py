"""The Gaussian structures as torch distributions: shapes, moments, KL registration, conversions, validation, files."""

from __future__ import annotations

import itertools

import pyro.distributions as pdist
import pytest
import torch
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from pyro_distill.gaussian import DenseGaussian, DiagGaussian, Gaussian, LowRankGaussian, as_gaussian
from pyro_distill.layout import Layout

P = 5
KINDS = ("dense", "lowrank", "diag")


def make(kind: str, p: int = P, seed: int = 0) -> Gaussian:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(p, generator=g, dtype=torch.float64)
    if kind == "dense":
        L = torch.tril(torch.randn(p, p, generator=g, dtype=torch.float64)) * 0.4
        L.diagonal().copy_(0.5 + torch.rand(p, generator=g, dtype=torch.float64))
        return DenseGaussian(loc, L)
    if kind == "lowrank":
        W = torch.randn(p, 2, generator=g, dtype=torch.float64) * 0.6
        return LowRankGaussian(loc, W, 0.3 + torch.rand(p, generator=g, dtype=torch.float64))
    return DiagGaussian(loc, 0.5 + torch.rand(p, generator=g, dtype=torch.float64))


def torch_twin(q: Gaussian) -> Distribution:
    """The same Gaussian as a plain torch distribution (the dense reference)."""
    return MultivariateNormal(q.loc, q.covariance())


# ------------------------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("kind", KINDS)
def test_is_a_torch_distribution_with_shapes(kind: str) -> None:
    q = make(kind)
    assert isinstance(q, Distribution)
    assert q.batch_shape == torch.Size() and q.event_shape == torch.Size([P])
    gen = torch.Generator().manual_seed(0)
    assert q.sample().shape == (P,)
    assert q.sample((3,)).shape == (3, P)
    assert q.sample(torch.Size([2, 3])).shape == (2, 3, P)
    assert q.rsample((4,)).shape == (4, P)
    assert q.sample(7, generator=gen).shape == (7, P)  # the library's older int form keeps working
    torch.testing.assert_close(q.sample((2, 3), generator=torch.Generator().manual_seed(1)).reshape(6, P),
                               q.sample(6, generator=torch.Generator().manual_seed(1)))
    assert q.log_prob(q.sample((2, 3))).shape == (2, 3)
    assert q.expand(torch.Size()) is q
    with pytest.raises(NotImplementedError, match="to_pyro"):
        q.expand((2,))
    assert repr(q).startswith(type(q).__name__ + "(p=5") and "tensor" not in repr(q) and len(repr(q)) < 80
    assert not q._validate_args  # torch's sample checks are opt-in, as validate_args=True
    strict = type(q)(**q._tensors(), validate_args=True)
    with pytest.raises(ValueError, match="event_shape"):
        strict.log_prob(torch.zeros(P + 1, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_moments_match_torch_mvn(kind: str) -> None:
    """float64, exact references: mean, variance, stddev, covariance, precision, entropy, log_prob (1e-10)."""
    q = make(kind)
    ref = torch_twin(q)
    tol = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(q.mean, ref.mean, **tol)
    torch.testing.assert_close(q.mode, ref.mean, **tol)
    torch.testing.assert_close(q.variance, ref.variance, **tol)
    torch.testing.assert_close(q.stddev, ref.stddev, **tol)
    torch.testing.assert_close(q.covariance_matrix, ref.covariance_matrix, **tol)
    torch.testing.assert_close(q.precision_matrix, ref.precision_matrix, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(q.entropy(), ref.entropy(), **tol)
    x = ref.sample((4,))
    torch.testing.assert_close(q.log_prob(x), ref.log_prob(x), **tol)


@pytest.mark.parametrize("kq,kp", list(itertools.product(KINDS, KINDS)))
def test_kl_divergence_registered(kq: str, kp: str) -> None:
    """``torch.distributions.kl_divergence`` on our structures equals ours and torch's dense KL (1e-10)."""
    q, p = make(kq, seed=1), make(kp, seed=2)
    ours = q.kl(p)
    torch.testing.assert_close(kl_divergence(q, p), ours, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours, kl_divergence(torch_twin(q), torch_twin(p)), atol=1e-10, rtol=1e-10)
    # against torch's / Pyro's own distributions, both directions
    torch.testing.assert_close(kl_divergence(q, p.to_pyro()), ours, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(kl_divergence(q.to_pyro(), p), ours, atol=1e-10, rtol=1e-10)


def test_kl_against_torch_independent_normal() -> None:
    q = make("dense")
    d = Independent(Normal(torch.zeros(P, dtype=torch.float64), 2.0 * torch.ones(P, dtype=torch.float64)), 1)
    ref = kl_divergence(torch_twin(q), MultivariateNormal(d.mean, torch.diag(d.variance)))
    torch.testing.assert_close(kl_divergence(q, d), ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(q.kl(d), ref, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ conversions
def test_from_distribution_roundtrips() -> None:
    lay = Layout([("w", (P,))])
    for kind, cls in (("dense", DenseGaussian), ("lowrank", LowRankGaussian), ("diag", DiagGaussian)):
        q = make(kind)
        back = Gaussian.from_distribution(q.to_pyro(), layout=lay)
        assert type(back) is cls and back.layout == lay
        torch.testing.assert_close(back.loc, q.loc)
        torch.testing.assert_close(back.covariance(), q.covariance(), atol=1e-12, rtol=0)
        assert Gaussian.from_distribution(q) is q
    # plain torch classes too, and a scalar-scale Normal broadcast over the vector
    m = torch.zeros(P, dtype=torch.float64)
    S = torch.eye(P, dtype=torch.float64) * 3
    assert isinstance(Gaussian.from_distribution(MultivariateNormal(m, S)), DenseGaussian)
    W = torch.ones(P, 1, dtype=torch.float64)
    lr = Gaussian.from_distribution(LowRankMultivariateNormal(m, W, torch.ones(P, dtype=torch.float64)))
    torch.testing.assert_close(lr.covariance(), W @ W.T + torch.eye(P, dtype=torch.float64))
    dg = Gaussian.from_distribution(pdist.Normal(m, 0.5).to_event(1))
    assert isinstance(dg, DiagGaussian)
    torch.testing.assert_close(dg.variance, torch.full((P,), 0.25, dtype=torch.float64))


def test_as_gaussian_accepts_and_refuses() -> None:
    q = make("diag")
    assert as_gaussian(q) is q
    assert isinstance(as_gaussian(q.to_pyro(), p=P), DiagGaussian)
    lay = Layout([("w", (P,))])
    assert as_gaussian(q, layout=lay).layout == lay and q.layout is None
    with pytest.raises(TypeError, match="MultivariateNormal"):
        as_gaussian(torch.zeros(P))
    with pytest.raises(TypeError, match="cannot convert"):
        as_gaussian(pdist.Gamma(torch.ones(P), 1.0).to_event(1))
    with pytest.raises(ValueError, match="to_event"):
        as_gaussian(Normal(torch.zeros(P), 1.0))
    with pytest.raises(ValueError, match="3 are needed"):
        as_gaussian(q, p=3)


# ------------------------------------------------------------------------------------------------ validation
def test_parameters_validated_with_the_fix_named() -> None:
    z = torch.zeros(3, dtype=torch.float64)
    one = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scale must be > 0 .*index 1: -0.5.*abs"):
        DiagGaussian(z, torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="scale must be > 0"):
        DiagGaussian(z, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="loc holds 1 NaN"):
        DiagGaussian(torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64), one)
    with pytest.raises(ValueError, match="cov_diag must be > 0.*clamp"):
        LowRankGaussian(z, torch.ones(3, 1, dtype=torch.float64), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="cov_factor holds"):
        LowRankGaussian(z, torch.full((3, 1), float("inf"), dtype=torch.float64), one)
    with pytest.raises(ValueError, match="zero diagonal entries .*from_covariance"):
        DenseGaussian(z, torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="scale_tril holds"):
        DenseGaussian(z, torch.full((3, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="loc holds"):
        DenseGaussian(torch.full((3,), float("inf"), dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    # only |L_ii| matters: a negative diagonal is a valid factor, and Pyro sees the same covariance
    L = torch.diag(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    q = DenseGaussian(z, L)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(q.to_pyro().log_prob(x), q.log_prob(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.log_prob(x), MultivariateNormal(z, L @ L.T).log_prob(x), atol=1e-12, rtol=0)
    # a differentiable Gaussian inside a fit is not checked (the fit's divergence guard is)
    DiagGaussian(z, torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64, requires_grad=True))


# ------------------------------------------------------------------------------------------------ files
def test_save_plain_meta_verified_and_umask(tmp_path) -> None:
    np = pytest.importorskip("numpy")
    import os

    q = make("lowrank")
    q.meta = {"steps": np.int64(3), "lr": np.float32(0.5), "dir": tmp_path / "x", "sizes": (64, 10),
              "nested": {"arr": np.arange(3), "t": torch.tensor(2.0)}}
    old = os.umask(0o027)
    try:
        f = q.save(tmp_path / "posterior.pt")
    finally:
        os.umask(old)
    assert (f.stat().st_mode & 0o777) == 0o640
    from pyro_distill.gaussian import load

    back = load(f)
    assert back.meta == {"steps": 3, "lr": 0.5, "dir": str(tmp_path / "x"), "sizes": [64, 10],
                         "nested": {"arr": [0, 1, 2], "t": 2.0}}
    assert type(back.meta["steps"]) is int
    q.meta = {"bad": object()}
    with pytest.raises(ValueError, match=r"meta\['bad'\].*not plain data"):
        q.save(tmp_path / "other.pt")
    assert not (tmp_path / "other.pt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_stale_temporaries_cleaned_and_nan_file_refused(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from pyro_distill.gaussian import load

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".posterior.pt.pd-{pid}-abc123.tmp"
    legacy = tmp_path / ".posterior.pt.k2j4_x9q.tmp"
    live = tmp_path / f".prior.pt.pd-{os.getpid()}-zzz.tmp"  # a save in progress in this very process: kept
    for p in (stale, legacy, live):
        p.write_bytes(b"x" * 10)
    q = make("diag")
    q.save(tmp_path / "posterior.pt")
    assert not stale.exists() and not legacy.exists() and live.exists()
    # a file holding NaN (written past the checks) is refused at load with the cause named
    payload = torch.load(tmp_path / "posterior.pt", weights_only=True)
    payload["tensors"]["loc"][0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"'loc'.*NaN/inf.*diverged"):
        load(tmp_path / "nan.pt")
