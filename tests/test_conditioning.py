"""Exact Gaussian conditioning in every structure against a dense float64 Schur-complement reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyro_distill.gaussian as G
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, LowRankGaussian, NotPositiveDefiniteError

F64 = torch.float64


def reference(m: torch.Tensor, S: torch.Tensor, I: torch.Tensor, v: torch.Tensor):
    """Dense Schur complement: m_K + S_KI S_II^{-1}(v - m_I), S_KK - S_KI S_II^{-1} S_IK (float64 solves)."""
    mask = torch.ones(m.numel(), dtype=torch.bool)
    mask[I] = False
    K = mask.nonzero().reshape(-1)
    S_II, S_KI = S[I][:, I], S[K][:, I]
    mean = m[K] + S_KI @ torch.linalg.solve(S_II, v - m[I])
    cov = S[K][:, K] - S_KI @ torch.linalg.solve(S_II, S_KI.T)
    return mean, cov


def random_cov(gen: torch.Generator, p: int, log10_cond: float) -> torch.Tensor:
    """Random SPD matrix with eigenvalues log-spaced over ``log10_cond`` decades (max eigenvalue 1)."""
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))
    ev = torch.logspace(0, -log10_cond, p, dtype=F64)
    return (Q * ev) @ Q.T


problem = st.fixed_dictionaries({
    "p": st.integers(2, 40),
    "seed": st.integers(0, 2**31 - 1),
    "frac": st.floats(0.05, 0.9),
    "cond": st.sampled_from([0.0, 2.0, 6.0]),
    "prefix": st.booleans(),
})


def _setup(pr):
    gen = torch.Generator().manual_seed(pr["seed"])
    p = pr["p"]
    n = min(p - 1, max(1, int(pr["frac"] * p)))
    pool = (p + 1) // 2 if pr["prefix"] and n <= (p + 1) // 2 else p  # fixed coordinates all early, or anywhere
    I = torch.randperm(pool, generator=gen)[:n]
    v = torch.randn(n, generator=gen, dtype=F64)
    m = torch.randn(p, generator=gen, dtype=F64)
    return gen, p, I, v, m


def _tol(cond: float) -> float:
    return 1e-9 * 10**cond


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Tiny blocks so the blocked dense path (several row/column blocks, chunks) runs on small problems."""
    monkeypatch.setattr(G, "_BLOCK", 5)
    monkeypatch.setattr(G, "_CHUNK_ELEMS", 40)
    monkeypatch.setattr(G, "_SUB", 2)
    monkeypatch.setattr(G, "_GATHER_ALL_ELEMS", 60)  # small problems gather at once, larger ones chunk
    monkeypatch.setattr(LowRankGaussian, "chunk_rows", 7)


@settings(max_examples=40, deadline=None)
@given(problem)
def test_dense_equals_schur_reference(pr):
    gen, p, I, v, m = _setup(pr)
    S = random_cov(gen, p, pr["cond"])
    g = DenseGaussian(m, torch.linalg.cholesky(S))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # jitter may be needed at cond 1e6; it is tested below
        out = g.condition(I, v)
    mean, cov = reference(m, S, I, v)
    tol = _tol(pr["cond"])
    assert isinstance(out, DenseGaussian) and out.dim == p - I.numel()
    assert torch.equal(out.scale_tril, out.scale_tril.tril())
    assert torch.allclose(out.mean, mean, atol=tol * (1 + mean.abs().max()), rtol=0)
    assert torch.allclose(out.covariance(), cov, atol=tol, rtol=0)


@settings(max_examples=40, deadline=None)
@given(problem, st.integers(1, 6))
def test_lowrank_equals_schur_reference_and_dense(pr, k):
    gen, p, I, v, m = _setup(pr)
    W = torch.randn(p, k, generator=gen, dtype=F64)
    d = torch.logspace(0, -pr["cond"], p, dtype=F64)[torch.randperm(p, generator=gen)]
    g = LowRankGaussian(m, W, d)
    out = g.condition(I, v)
    assert isinstance(out, LowRankGaussian) and out.rank == k
    S = W @ W.T + torch.diag(d)
    mean, cov = reference(m, S, I, v)
    scale = float(S.diagonal().max())
    tol = _tol(pr["cond"]) * scale
    assert torch.allclose(out.mean, mean, atol=tol * (1 + mean.abs().max()), rtol=0)
    assert torch.allclose(out.covariance(), cov, atol=tol, rtol=0)
    # the dense path on the same covariance agrees
    dense = DenseGaussian(m, torch.linalg.cholesky(S)).condition(I, v)
    assert torch.allclose(dense.mean, out.mean, atol=tol * (1 + mean.abs().max()), rtol=0)
    assert torch.allclose(dense.covariance(), out.covariance(), atol=tol, rtol=0)


@settings(max_examples=25, deadline=None)
@given(problem)
def test_diag_drops_coordinates(pr):
    gen, p, I, v, m = _setup(pr)
    s = torch.rand(p, generator=gen, dtype=F64) + 0.1
    out = DiagGaussian(m, s).condition(I, v)
    mean, cov = reference(m, torch.diag(s**2), I, v)
    assert isinstance(out, DiagGaussian)
    assert torch.equal(out.mean, mean) and torch.allclose(out.covariance(), cov, atol=0, rtol=0)


@settings(max_examples=30, deadline=None)
@given(problem, st.sampled_from(["dense", "lowrank", "diag"]), st.integers(0, 2**31 - 1))
def test_condition_twice_equals_condition_on_union(pr, kind, seed2):
    gen, p, I, v, m = _setup(pr)
    if p - I.numel() < 2:
        return
    S = random_cov(gen, p, 2.0)
    if kind == "dense":
        g = DenseGaussian(m, torch.linalg.cholesky(S))
    elif kind == "lowrank":
        W = torch.randn(p, 3, generator=gen, dtype=F64)
        g = LowRankGaussian(m, W, torch.rand(p, generator=gen, dtype=F64) + 0.1)
    else:
        g = DiagGaussian(m, torch.rand(p, generator=gen, dtype=F64) + 0.1)
    # J: some of the remaining coordinates, in the original numbering
    mask = torch.ones(p, dtype=torch.bool)
    mask[I] = False
    K = mask.nonzero().reshape(-1)
    g2 = torch.Generator().manual_seed(seed2)
    nJ = int(torch.randint(1, K.numel(), (), generator=g2))
    posJ = torch.randperm(K.numel(), generator=g2)[:nJ]
    J, w = K[posJ], torch.randn(nJ, generator=g2, dtype=F64)
    step = g.condition(I, v).condition(posJ, w)
    once = g.condition(torch.cat([I, J]), torch.cat([v, w]))
    assert type(step) is type(once)
    assert torch.allclose(step.mean, once.mean, atol=1e-8, rtol=0)
    assert torch.allclose(step.covariance(), once.covariance(), atol=1e-8, rtol=0)


def test_unsorted_index_keeps_value_pairing():
    gen = torch.Generator().manual_seed(0)
    S = random_cov(gen, 9, 1.0)
    m = torch.randn(9, generator=gen, dtype=F64)
    g = DenseGaussian(m, torch.linalg.cholesky(S))
    I, v = torch.tensor([7, 2, 4]), torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    a = g.condition(I, v)
    b = g.condition(torch.tensor([2, 4, 7]), torch.tensor([-2.0, 3.0, 1.0], dtype=F64))
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.covariance(), b.covariance())


def test_jitter_warns_with_amount_on_singular_block():
    # coordinates 0 and 1 are identical to float precision: S_II is numerically singular, the policy adds the
    # smallest jitter that works (an exactly zero diagonal of L is refused at construction)
    L = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-20, 0.0], [0.5, 0.5, 1.0]], dtype=F64)
    g = DenseGaussian(torch.zeros(3, dtype=F64), L)
    with pytest.warns(RuntimeWarning, match=r"added jitter .* x mean diagonal"):
        out = g.condition([0, 1], torch.tensor([1.0, 1.0], dtype=F64))
    assert torch.allclose(out.mean, torch.tensor([0.5], dtype=F64), atol=1e-5)


def test_jitter_raises_when_not_positive_definite():
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite even with jitter"):
        G.cholesky_jitter(-torch.eye(3, dtype=F64))
    L = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]], dtype=F64)
    with pytest.raises(ValueError, match="NaN"):  # refused at construction now, naming the NaN
        DenseGaussian(torch.zeros(2, dtype=F64), L).condition([1], 0.0)


def test_bad_condition_inputs():
    g = DenseGaussian(torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64))
    with pytest.raises(IndexError, match="out of range"):
        g.condition([4], 0.0)
    with pytest.raises(ValueError, match="repeated"):
        g.condition([1, 1], 0.0)
    with pytest.raises(ValueError, match="every coordinate"):
        g.condition([0, 1, 2, 3], 0.0)
    with pytest.raises(ValueError, match="values given"):
        g.condition([0, 1], torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        g.condition([0], float("nan"))


def test_dense_condition_is_differentiable():
    gen = torch.Generator().manual_seed(3)
    S = random_cov(gen, 8, 1.0)
    L = torch.linalg.cholesky(S).requires_grad_(True)
    m = torch.randn(8, generator=gen, dtype=F64)
    out = DenseGaussian(m, L).condition([1, 5], torch.tensor([0.3, -1.0], dtype=F64))
    mean, cov = reference(m, S, torch.tensor([1, 5]), torch.tensor([0.3, -1.0], dtype=F64))
    assert torch.allclose(out.covariance(), cov, atol=1e-10) and torch.allclose(out.mean, mean, atol=1e-10)
    (out.mean.sum() + out.logdet()).backward()
    assert L.grad is not None and torch.isfinite(L.grad).all()
    with torch.no_grad():
        fast = DenseGaussian(m, L).condition([1, 5], torch.tensor([0.3, -1.0], dtype=F64))
    assert torch.allclose(fast.scale_tril, out.scale_tril.detach(), atol=1e-10)
