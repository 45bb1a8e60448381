"""Gaussians over a flat parameter vector in several structures with one interface.

* :class:`DenseGaussian` ``N(m, L L^T)``                     exact, O(p^2) memory;
* :class:`LowRankGaussian` ``N(m, W W^T + diag(d))``         O(p k) memory;
* :class:`DiagGaussian` ``N(m, diag(s^2))``                  the uncorrelated case;
* :class:`LowRankPrecisionGaussian` ``N(m, (diag(d) + F F^T)^{-1})``  low rank in PRECISION form (the
  low-rank Laplace posterior), O(p k) memory;
* :class:`KronGaussian` per block ``vec(U) ~ N(vec(M), B ⊗ A)``, block-diagonal, plus a diagonal remainder
  (KFAC): O(sum r^2 + c^2) memory; closed under conditioning / marginalizing whole rows, columns and blocks,
  and it refuses (:class:`StructureError`, naming ``to_dense()`` / ``to_lowrank(k)``) what it cannot do exactly;
* :class:`PointMass` ``w = m``: a point estimate (zero covariance; conditioning = indexing; no density).

One name per structure (:data:`STRUCTURES`, the ``kind`` of each class: ``dense``, ``lowrank``, ``diag``, ``kron``,
``lowrank_precision``); :func:`structure_name` also accepts the alias ``mvn`` for ``dense``. Each structure owns
its guide parameters (:meth:`Gaussian.guide_params` / :meth:`Gaussian.from_guide_params`), so the SVI guides hold
no per-structure code.

Two closed operations (docs/DESIGN.md): ``condition(I, v)`` fixes coordinates ``I`` to ``v`` and returns the
Gaussian over the complement ``K`` (mean ``m_K + S_KI S_II^{-1}(v - m_I)``, covariance
``S_KK - S_KI S_II^{-1} S_IK``, by Cholesky solves; Woodbury for low-rank), and ``marginalize(K)``.
Both keep the structure (Kronecker: where exact). ``kl`` is closed form between any two structures and
differentiable, so it is also the KL term of the ELBO. Nothing here knows about networks or data.

Every structure is a :class:`torch.distributions.Distribution` with ``batch_shape == ()`` and
``event_shape == (p,)``: ``sample(sample_shape)`` / ``rsample`` give ``[*sample_shape, p]`` (an int ``n`` means
``(n,)``; the ``generator=`` keyword is ours), ``mean``, ``variance``, ``stddev``, ``covariance_matrix`` and
``precision_matrix`` (dense, only when asked), ``entropy``, ``log_prob``, and
``torch.distributions.kl_divergence`` works between any two of them and against torch/Pyro
``MultivariateNormal``, ``LowRankMultivariateNormal`` and ``Independent(Normal, 1)``.
:meth:`Gaussian.from_distribution` / :func:`as_gaussian` turn those torch/Pyro distributions into ours.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    constraints,
)
from torch.distributions.kl import register_kl

from .layout import Layout

__all__ = [
    "Gaussian",
    "DenseGaussian",
    "LowRankGaussian",
    "DiagGaussian",
    "KronGaussian",
    "LowRankPrecisionGaussian",
    "PointMass",
    "STRUCTURES",
    "STRUCTURE_ALIASES",
    "structure",
    "structure_name",
    "NotPositiveDefiniteError",
    "StructureError",
    "kron_index",
    "as_gaussian",
    "load",
    "cholesky_jitter",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
#: relative jitter levels tried (times the mean diagonal) when a block is not numerically PD
JITTER_LEVELS = (0.0, 1e-12, 1e-10, 1e-8, 1e-6)


class NotPositiveDefiniteError(ValueError):
    """A covariance (block) could not be made positive definite within the jitter policy."""


def cholesky_jitter(a: torch.Tensor, what: str = "covariance") -> torch.Tensor:
    """Cholesky factor of a symmetric matrix (only its lower triangle is read) with the package's jitter policy.

    Tries ``a + eps * mean(|diag(a)|) * I`` for ``eps`` in :data:`JITTER_LEVELS` (0 first); warns with the
    amount used when ``eps > 0``; raises :class:`NotPositiveDefiniteError` when even the largest fails.
    """
    if a.shape[-1] == 0:
        return a.clone()
    scale = a.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(torch.finfo(a.dtype).tiny)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for eps in JITTER_LEVELS:
        m = a if eps == 0 else a + (eps * scale) * eye
        L, info = torch.linalg.cholesky_ex(m)
        if int(info.max()) == 0 and bool(torch.isfinite(L).all()):
            if eps > 0:
                _warn_jitter(what, eps, float(scale))
            return L
    raise NotPositiveDefiniteError(_not_pd_message(what, a.shape[-1]))


def _as_index(index: Sequence[int] | torch.Tensor, p: int) -> torch.Tensor:
    t = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    if t.numel():
        if int(t.min()) < 0 or int(t.max()) >= p:
            raise IndexError(f"coordinate indices out of range for a Gaussian of dimension {p}")
        seen = torch.zeros(p, dtype=torch.bool, device=t.device)
        seen[t] = True  # O(p) membership instead of an O(n log n) sort: cheap even for p in the millions
        if int(seen.sum()) != t.numel():
            raise ValueError("repeated coordinate indices; each coordinate can be fixed only once")
    return t


def _complement(index: torch.Tensor, p: int) -> torch.Tensor:
    mask = torch.ones(p, dtype=torch.bool)
    mask[index] = False
    return mask.nonzero().reshape(-1)


def _tri_solve(L: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(L, b, upper=False)


#: columns per block and elements per gathered chunk of the blocked products in dense conditioning
_BLOCK = 512
_SUB = 128
#: gather all needed rows at once below this many elements (1 GiB of float64), else chunk by chunk
_GATHER_ALL_ELEMS = 1 << 27
_CHUNK_ELEMS = 1 << 24


def _stair_gram(L: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, out: torch.Tensor, lower: bool,
                minus: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``out = L[ra] L[rb]^T (- Xa Xb^T)`` for sorted row sets, using that row ``r`` of the lower-triangular
    ``L`` is zero beyond column ``r``; with ``lower`` (``ra == rb``) only the lower triangle is computed
    (diagonal blocks in sub-blocks of :data:`_SUB`, so little of the upper half is wasted).

    Rows are gathered block by block (no ``|ra| x p`` copy), so the extra memory stays a few chunks.
    """
    na, nb = ra.numel(), rb.numel()

    def put(a0: int, a1: int, b0: int, b1: int, RA: torch.Tensor, RBk: torch.Tensor) -> None:
        blk = RA @ RBk.mT
        if minus is not None:
            blk.addmm_(minus[0][a0:a1], minus[1][b0:b1].mT, alpha=-1.0)
        out[a0:a1, b0:b1] = blk

    kmax = int(ra[-1]) + 1 if na else 0
    # small enough: gather the rows of ``ra`` once and take views (BLAS reads strided rows without a copy)
    RAall = L[:, :kmax].index_select(0, ra) if na * kmax <= _GATHER_ALL_ELEMS else None

    def rows_a(a0: int, a1: int, k: int) -> torch.Tensor:
        return L[:, :k].index_select(0, ra[a0:a1]) if RAall is None else RAall[a0:a1, :k]

    for b0 in range(0, nb, _BLOCK):
        b1 = min(b0 + _BLOCK, nb)
        kB = int(rb[b1 - 1]) + 1
        RB = rows_a(b0, b1, kB) if lower and RAall is not None else L[:, :kB].index_select(0, rb[b0:b1])
        step = max(_BLOCK, _CHUNK_ELEMS // max(kB, 1)) if RAall is None else na
        for a0 in range(b1 if lower else 0, na, step):
            a1 = min(a0 + step, na)
            k = min(kB, int(ra[a1 - 1]) + 1)
            put(a0, a1, b0, b1, rows_a(a0, a1, k), RB[:, :k])
        if lower:  # the diagonal block, lower part only, in narrower column strips
            for s0 in range(b0, b1, _SUB):
                s1 = min(s0 + _SUB, b1)
                k = int(rb[s1 - 1]) + 1
                put(s0, b1, s0, s1, RB[s0 - b0:, :k], RB[s0 - b0:s1 - b0, :k])


def _cholesky_inplace(a: torch.Tensor, rebuild, what: str) -> torch.Tensor:
    """Factor the symmetric matrix held in the lower triangle of ``a`` in place (``a`` becomes ``L``, upper
    zeroed), with the :func:`cholesky_jitter` policy. LAPACK overwrites ``a``, so a retry calls ``rebuild(a)``
    to refill it (failures are rare; the common path needs no second p x p buffer)."""
    n = a.shape[-1]
    if n == 0:
        return a
    d = a.diagonal()
    scale = float(d.abs().mean().clamp_min(torch.finfo(a.dtype).tiny))
    info = torch.empty((), dtype=torch.int32, device=a.device)
    for eps in JITTER_LEVELS:
        if eps > 0:
            rebuild(a)
            a.diagonal().add_(eps * scale)
        at = a.mT  # column-major view: LAPACK factors it without a copy
        torch.linalg.cholesky_ex(at, upper=True, out=(at, info))
        if int(info) == 0 and bool(torch.isfinite(a.diagonal()).all()):
            if eps > 0:
                _warn_jitter(what, eps, scale)
            return a
    raise NotPositiveDefiniteError(_not_pd_message(what, n))


def _warn_jitter(what: str, eps: float, scale: float) -> None:
    warnings.warn(
        f"{what} was not numerically positive definite; added jitter {eps * scale:.3g} "
        f"({eps:g} x mean diagonal) to the diagonal",
        RuntimeWarning,
        stacklevel=4,
    )


def _not_pd_message(what: str, n: int) -> str:
    return (
        f"{what} ({n}x{n}) is not positive definite even with jitter "
        f"{JITTER_LEVELS[-1]:g} x mean diagonal; the matrix is singular or indefinite "
        "(check for NaN/inf, duplicated coordinates, or coordinates that are exact functions of others)"
    )


_EMPTY_SHAPE = torch.Size()


def _checkable(*tensors: torch.Tensor) -> bool:
    """Parameters are checked at construction unless one carries a gradient: the differentiable Gaussians built
    at every step of a fit skip the (one-pass) check, and the fit's divergence guard watches them instead."""
    return not any(t.requires_grad for t in tensors)


def _check_finite(g: Any, name: str, t: torch.Tensor, fix: str) -> None:
    ok = torch.isfinite(t)
    if not bool(ok.all()):
        bad = (~ok).reshape(-1)
        i = int(bad.nonzero()[0])
        raise ValueError(f"{type(g).__name__}: {name} holds {int(bad.sum())} NaN/inf entries (first at flat index "
                         f"{i}: {float(t.reshape(-1)[i])}); {fix}")


def _check_positive(g: Any, name: str, t: torch.Tensor, fix: str) -> None:
    _check_finite(g, name, t, fix)
    bad = t.reshape(-1) <= 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{type(g).__name__}: {name} must be > 0 but {int(bad.sum())} entries are <= 0 (first at "
                         f"index {i}: {float(t.reshape(-1)[i])}); {fix}")


def _as_sample_shape(sample_shape: int | Sequence[int] | torch.Size) -> torch.Size:
    """torch's ``sample_shape`` convention, plus the library's older ``n`` (an int means ``(n,)``)."""
    if isinstance(sample_shape, torch.Size):
        return sample_shape
    if isinstance(sample_shape, int) or (isinstance(sample_shape, torch.Tensor) and sample_shape.dim() == 0):
        n = int(sample_shape)
        if n < 0:
            raise ValueError(f"number of draws must be >= 0, got {n}")
        return torch.Size([n])
    return torch.Size(int(k) for k in sample_shape)


class Gaussian(Distribution, ABC):
    """A Gaussian over a flat vector, with an optional :class:`Layout` naming its coordinates.

    A :class:`torch.distributions.Distribution` with ``batch_shape == ()`` and ``event_shape == (p,)``.
    """

    kind: str = ""
    arg_constraints: dict[str, constraints.Constraint] = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, layout: Layout | None = None, meta: dict | None = None,
                 validate_args: bool = False):
        if not isinstance(loc, torch.Tensor):
            raise TypeError(f"loc must be a torch.Tensor, got {type(loc).__name__}; wrap it with torch.as_tensor")
        if loc.dim() != 1:
            raise ValueError(f"loc must be a vector [p], got shape {tuple(loc.shape)}")
        self.loc = loc
        if layout is not None and layout.size != loc.shape[-1]:
            raise ValueError(
                f"layout has p={layout.size} coordinates but the Gaussian has {loc.shape[-1]}; "
                "the posterior does not belong to this architecture"
            )
        self.layout = layout
        self.meta: dict[str, Any] = dict(meta or {})
        # The structures check their own parameters (finite, positive scales) with errors that name the fix;
        # torch's argument validation stays off by default (validate_args=True adds its support check of
        # log_prob's argument).
        Distribution.__init__(self, torch.Size(), torch.Size([loc.shape[-1]]), validate_args=False)
        self._validate_args = bool(validate_args)

    # ----------------------------------------------------------------- basics
    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    @property
    def dtype(self) -> torch.dtype:
        return self.loc.dtype

    @property
    def device(self) -> torch.device:
        return self.loc.device

    @property
    @abstractmethod
    def variance(self) -> torch.Tensor: ...

    @property
    def stddev(self) -> torch.Tensor:
        return self.variance.sqrt()

    @property
    def covariance_matrix(self) -> torch.Tensor:
        """Dense ``p x p`` covariance (computed on each access: O(p^2) memory)."""
        return self.covariance()

    @property
    def precision_matrix(self) -> torch.Tensor:
        """Dense ``p x p`` precision (computed on each access: O(p^2) memory)."""
        return self.precision()

    @abstractmethod
    def covariance(self) -> torch.Tensor:
        """The dense p x p covariance (only when asked: O(p^2) memory)."""

    @abstractmethod
    def _factor_form(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(A, e)`` with covariance ``A A^T + diag(e)`` (either may be None)."""

    @abstractmethod
    def logdet(self) -> torch.Tensor:
        """log det of the covariance."""

    @abstractmethod
    def _quad(self, b: torch.Tensor) -> torch.Tensor:
        """``b_j^T S^{-1} b_j`` for each column of ``b`` (``[p, n]`` -> ``[n]``)."""

    @abstractmethod
    def _trace_inv(self, A: torch.Tensor | None, e: torch.Tensor | None) -> torch.Tensor:
        """``tr(S^{-1} (A A^T + diag(e)))``."""

    @abstractmethod
    def _replace(self, **tensors: torch.Tensor) -> Gaussian: ...

    @abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``n`` reparameterized draws ``[n, p]``."""

    def rsample(self, sample_shape: int | Sequence[int] | torch.Size = _EMPTY_SHAPE,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized draws ``[*sample_shape, p]`` (an int ``n`` means ``(n,)``)."""
        shape = _as_sample_shape(sample_shape)
        return self._draw(math.prod(shape), generator).reshape(*shape, self.dim)

    def sample(self, sample_shape: int | Sequence[int] | torch.Size = _EMPTY_SHAPE,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws ``[*sample_shape, p]`` without gradient (an int ``n`` means ``(n,)``)."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def _eps(self, *shape: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(*shape, dtype=self.dtype, device=self.device, generator=generator)

    def expand(self, batch_shape: Sequence[int] | torch.Size, _instance: Any = None) -> Gaussian:
        """Only the trivial expansion (``batch_shape == ()``) is supported: these are single Gaussians."""
        if tuple(batch_shape) == ():
            return self
        raise NotImplementedError(
            f"{type(self).__name__} has batch_shape () only; for a batch of draws use sample(sample_shape), "
            "or to_pyro().expand(batch_shape) for a Pyro site"
        )

    @classmethod
    def from_distribution(cls, d: Any, layout: Layout | None = None) -> Gaussian:
        """The library's structure for a torch/Pyro Gaussian over a vector (``batch_shape == ()``).

        ``MultivariateNormal`` -> :class:`DenseGaussian`, ``LowRankMultivariateNormal`` -> :class:`LowRankGaussian`,
        ``Independent(Normal, 1)`` (Pyro: ``Normal(loc, scale).to_event(1)``) -> :class:`DiagGaussian`; one of
        our Gaussians is returned as is (``layout`` is attached when it has none).
        """
        if isinstance(d, Gaussian):
            return _with_layout(d, layout)
        if _KRON_PYRO is not None and isinstance(d, _KRON_PYRO):  # KronGaussian.to_pyro(): the structure itself
            return _with_layout(d.gaussian, layout)
        if _LRP_PYRO is not None and isinstance(d, _LRP_PYRO):  # LowRankPrecisionGaussian.to_pyro()
            return _with_layout(d.gaussian, layout)
        if type(d).__name__ == "Delta" and type(d).__module__.startswith("pyro.") and len(d.event_shape) == 1 \
                and tuple(d.batch_shape) == ():  # PointMass.to_pyro()
            return PointMass(d.v, layout=layout)
        if not isinstance(d, Distribution):
            raise TypeError(
                f"expected a Gaussian or a torch/Pyro distribution, got {type(d).__name__}; pass a "
                "pyro_distill Gaussian, MultivariateNormal, LowRankMultivariateNormal or Normal(loc, scale).to_event(1)"
            )
        if tuple(d.batch_shape) != () or len(d.event_shape) != 1:
            raise ValueError(
                f"{type(d).__name__} with batch_shape {tuple(d.batch_shape)} and event_shape {tuple(d.event_shape)}: "
                "a Gaussian over one flat vector needs batch_shape () and event_shape (p,) "
                "(use .to_event(1) on a Normal over p coordinates)"
            )
        if isinstance(d, MultivariateNormal):
            return DenseGaussian(d.loc, d.scale_tril, layout=layout)
        if isinstance(d, LowRankMultivariateNormal):
            return LowRankGaussian(d.loc, d.cov_factor, d.cov_diag, layout=layout)
        if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, Normal):
            loc, scale = torch.broadcast_tensors(d.base_dist.loc, d.base_dist.scale)
            return DiagGaussian(loc.contiguous(), scale.contiguous(), layout=layout)
        raise TypeError(
            f"cannot convert {type(d).__name__} to a Gaussian structure; supported: MultivariateNormal, "
            "LowRankMultivariateNormal, Independent(Normal, 1) (Pyro: Normal(loc, scale).to_event(1))"
        )

    # ----------------------------------------------------------------- densities
    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - m)^T S^{-1} (x - m)`` for ``x`` of shape ``[..., p]``."""
        diff = x - self.loc
        flat = diff.reshape(-1, self.dim).T
        return self._quad(flat).reshape(diff.shape[:-1])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density at ``x`` of shape ``[..., p]``."""
        if self._validate_args:
            self._validate_sample(x)
        return -0.5 * (self.dim * math.log(2 * math.pi) + self.logdet() + self.mahalanobis(x))

    def entropy(self) -> torch.Tensor:
        return 0.5 * (self.dim * (1 + math.log(2 * math.pi)) + self.logdet())

    def kl(self, other: Gaussian | Distribution) -> torch.Tensor:
        """Closed-form ``KL(self || other)`` for any pair of structures (differentiable).

        ``KL = 1/2 [tr(S_o^{-1} S) + (m_o - m)^T S_o^{-1} (m_o - m) - p + log|S_o| - log|S|]``; ``other`` may also be
        a torch/Pyro Gaussian (converted by :func:`as_gaussian`).
        """
        other = as_gaussian(other)
        if isinstance(self, PointMass) or isinstance(other, PointMass):
            raise _no_density("KL divergence", "a point estimate has zero covariance, so the KL to or from it is "
                              "infinite; fit a Gaussian (fit_posterior) to compare distributions")
        if other.dim != self.dim:
            raise ValueError(f"KL between Gaussians of dimension {self.dim} and {other.dim}")
        special = self._kl_special(other)
        if special is not None:
            return special
        if isinstance(other, DiagGaussian):  # tr(diag(v)^{-1} S) needs only the variances: O(p) beyond them
            var = other.variance
            diff = other.loc - self.loc
            return 0.5 * ((self.variance / var).sum() + (diff**2 / var).sum() - self.dim + other.logdet()
                          - self.logdet())
        A, e = self._factor_form()
        tr = other._trace_inv(A, e)
        diff = (other.loc - self.loc).unsqueeze(-1)
        maha = other._quad(diff).sum()
        return 0.5 * (tr + maha - self.dim + other.logdet() - self.logdet())

    def _kl_special(self, other: Gaussian) -> torch.Tensor | None:
        """A structure-specific closed form of ``KL(self || other)``, or None for the generic one."""
        return None

    # ----------------------------------------------------------------- structure operations
    @abstractmethod
    def marginalize(self, keep: Sequence[int] | torch.Tensor) -> Gaussian:
        """``N(m_K, S_KK)`` over coordinates ``keep`` (in the given order)."""

    @abstractmethod
    def _condition(self, I: torch.Tensor, K: torch.Tensor, v: torch.Tensor) -> Gaussian: ...

    def condition(
        self,
        index: Sequence[int] | torch.Tensor,
        value: float | torch.Tensor = 0.0,
        layout: Layout | None = None,
    ) -> Gaussian:
        """Fix coordinates ``index`` to ``value``; the Gaussian over the remaining coordinates, in order.

        ``value`` is a scalar or a vector of ``len(index)``. ``layout`` names the result's coordinates.
        """
        I = _as_index(index, self.dim)
        if I.numel() == self.dim:
            raise ValueError("cannot condition on every coordinate: nothing would remain")
        v = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        v = v.expand(I.shape) if v.dim() == 0 else v.reshape(-1)
        if v.shape != I.shape:
            raise ValueError(f"{I.numel()} coordinates to fix but {v.numel()} values given")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("conditioning values contain NaN or inf")
        K = _complement(I, self.dim)
        if I.numel() == 0:
            out = self._replace()
        else:
            out = self._condition(I.to(self.device), K.to(self.device), v)
        out.layout = layout
        if layout is not None and layout.size != out.dim:
            raise ValueError(f"result layout has p={layout.size} but {out.dim} coordinates remain")
        return out

    def tempered(self, tau: float) -> Gaussian:
        """The same Gaussian with covariance multiplied by ``tau`` (``tau >= 1`` weakens a prior)."""
        if not tau > 0:
            raise ValueError(f"temperature must be positive, got {tau}")
        return self._scaled(math.sqrt(tau))

    @abstractmethod
    def _scaled(self, c: float) -> Gaussian: ...

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Gaussian:
        """The same Gaussian on ``device`` / in ``dtype`` (integer index tensors keep their dtype)."""
        t = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self._tensors().items()}
        return type(self)._from_tensors(t, layout=self.layout, meta=self.meta)

    def detach(self) -> Gaussian:
        t = {k: v.detach() for k, v in self._tensors().items()}
        return type(self)._from_tensors(t, layout=self.layout, meta=self.meta)

    @classmethod
    def _from_tensors(cls, tensors: dict[str, torch.Tensor], layout: Layout | None = None,
                      meta: dict | None = None) -> Gaussian:
        """Inverse of :meth:`_tensors` (used by ``to``, ``detach`` and :func:`load`)."""
        return cls(**tensors, layout=layout, meta=meta)

    @abstractmethod
    def precision(self) -> torch.Tensor:
        """Dense p x p precision (only when asked)."""

    @abstractmethod
    def to_pyro(self):
        """The matching Pyro distribution (event shape ``[p]``)."""

    # ----------------------------------------------------------------- guide parameters
    #: guide parameters kept lower triangular during a fit (their gradient's upper triangle is zeroed)
    guide_tril: tuple[str, ...] = ()
    #: the covariance parameters' default step size is the mean's ``lr`` divided by this
    guide_factor_lr_divisor: float = 1.0

    @classmethod
    def guide_params(cls, start: Gaussian, rank: int = 20, seed: int = 0) -> dict[str, Any]:
        """The unconstrained parameters (besides the mean) of a guide of this structure started at ``start``.

        Detached copies, in the order a guide registers them: float tensors (or lists of them) are parameters,
        integer tensors (or lists of them) fixed structure. A start of another structure is converted where that
        is defined (``rank``/``seed``: the random factor of a low-rank start); :meth:`from_guide_params` inverts it.
        """
        raise StructureError(f"{cls.__name__} has no guide parameters; choose a guide structure from "
                             f"{sorted(STRUCTURES)}")

    @classmethod
    def from_guide_params(cls, loc: torch.Tensor, params: dict[str, Any], layout: Layout | None = None) -> Gaussian:
        """The Gaussian of a guide's mean and parameters (differentiable in them)."""
        raise StructureError(f"{cls.__name__} has no guide parameters")

    @classmethod
    def start_around(cls, loc: torch.Tensor, sd: torch.Tensor, rank: int = 20, seed: int = 0,
                     blocks: Any = None, layout: Layout | None = None) -> Gaussian:
        """A start of this structure at ``loc`` with independent standard deviations ``sd`` (a fit's shrunk-prior
        start): covariance ``diag(sd^2)`` where the structure holds it; low rank adds the small random factor of
        :meth:`LowRankGaussian.random_start`; Kronecker needs ``blocks()`` (a callable giving the ``[r, c]``
        flat-index matrices) and uses per block the row factor ``max(sd_block) I`` and the column factor ``I``."""
        raise StructureError(f"{cls.__name__} cannot be a fit's start; choose one of {sorted(STRUCTURES)}")

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write tensors, layout and metadata to one file, atomically, and verify it by reading it back.

        Refuses to overwrite by default. ``meta`` is converted to plain JSON types (numpy scalars -> Python numbers,
        paths -> str, tuples -> lists) or refused here, naming the key. The file is written to a temporary
        ``.<name>.pd-<pid>-*.tmp`` beside it, read back with :func:`load`, then renamed over ``path``; the
        temporary is removed on every exit path, and stale ones left by a killed save in the same folder are
        removed at the next save. The file's permissions follow the umask.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        meta = plain_json(self.meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_tmp(path)
        payload = {
            "format": "pyro-distill-gaussian",
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "tensors": {k: v.detach().cpu() for k, v in self._tensors().items()},
            "layout": self.layout.to_dict() if self.layout is not None else None,
            "meta": meta,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.pd-{os.getpid()}-", suffix=".tmp")
        try:
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model follows the umask like any file
            torch.save(payload, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            load(tmp)  # verify: what was written is what load reads (raises with the reason otherwise)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.dim}{self._repr_extra()}, dtype={str(self.dtype).replace('torch.', '')})"

    def _repr_extra(self) -> str:
        return ""


# ============================================================================ dense
class DenseGaussian(Gaussian):
    """``N(loc, L L^T)`` with ``L = scale_tril`` lower triangular, positive diagonal."""

    kind = "dense"
    arg_constraints = {"loc": constraints.real_vector, "scale_tril": constraints.lower_triangular}

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, layout: Layout | None = None,
                 meta: dict | None = None, validate_args: bool = False):
        super().__init__(loc, layout, meta, validate_args)
        p = loc.shape[-1]
        if scale_tril.shape != (p, p):
            raise ValueError(f"scale_tril must be [{p}, {p}], got {tuple(scale_tril.shape)}")
        self.scale_tril = scale_tril
        if _checkable(loc, scale_tril):
            _check_finite(self, "loc", loc, "pass a finite mean (a diverged fit? refit with a smaller lr)")
            _check_finite(self, "scale_tril", scale_tril, "pass a finite Cholesky factor")
            zero = scale_tril.diagonal() == 0  # only |L_ii| enters log det: a negative diagonal entry is fine
            if bool(zero.any()):
                i = int(zero.nonzero()[0])
                raise ValueError(
                    f"DenseGaussian: scale_tril has {int(zero.sum())} zero diagonal entries (first at index {i}), so "
                    "the covariance is singular; build it with DenseGaussian.from_covariance(loc, cov), which adds "
                    "the package's jitter, or add a small positive value to the diagonal"
                )

    @classmethod
    def from_covariance(cls, loc: torch.Tensor, cov: torch.Tensor, **kw) -> DenseGaussian:
        cov = 0.5 * (cov + cov.T)
        return cls(loc, cholesky_jitter(cov, "covariance"), **kw)

    @property
    def variance(self) -> torch.Tensor:
        return (self.scale_tril**2).sum(-1)

    def covariance(self) -> torch.Tensor:
        return self.scale_tril @ self.scale_tril.T

    def _factor_form(self):
        return self.scale_tril, None

    def logdet(self) -> torch.Tensor:
        return 2 * self.scale_tril.diagonal().abs().log().sum()

    def _quad(self, b):
        return (_tri_solve(self.scale_tril, b) ** 2).sum(0)

    def precision(self):
        Linv = _tri_solve(self.scale_tril, torch.eye(self.dim, dtype=self.dtype, device=self.device))
        return Linv.T @ Linv

    def _trace_inv(self, A, e):
        out = torch.zeros((), dtype=self.dtype, device=self.device)
        if A is not None:
            out = out + (_tri_solve(self.scale_tril, A) ** 2).sum()
        if e is not None:
            Linv = _tri_solve(self.scale_tril, torch.eye(self.dim, dtype=self.dtype, device=self.device))
            out = out + ((Linv**2).sum(0) * e).sum()
        return out

    def _draw(self, n, generator):
        z = self._eps(n, self.dim, generator=generator)
        return self.loc + z @ self.scale_tril.T

    def marginalize(self, keep):
        K = _as_index(keep, self.dim).to(self.device)
        if K.numel() and bool((K == torch.arange(K.numel(), device=K.device)).all()):
            return DenseGaussian(self.loc[K], self.scale_tril[: K.numel(), : K.numel()].clone())
        LK = self.scale_tril[K]
        return DenseGaussian(self.loc[K], cholesky_jitter(LK @ LK.T, "marginal covariance"))

    def _condition(self, I, K, v):
        # Blocked Schur complement on the permuted Cholesky factor: ordering the coordinates as (I, K_A, B),
        # with A = [0, c), c = max(I) + 1 and B = [c, p), the Cholesky factor of the permuted covariance is
        #     [[C_I, 0, 0], [X_A, T, 0], [X_B, F, L_BB]]
        # with C_I C_I^T = S_II, X = S_KI C_I^{-T}, T T^T = S_{K_A K_A} - X_A X_A^T, F = (S_{B K_A} - X_B X_A^T) T^{-T}
        # and L_BB the trailing block of L unchanged (coordinates after every fixed one keep their factor rows).
        # The conditional factor is [[T, 0], [F, L_BB]]; the conditional mean m_K + X C_I^{-1} (v - m_I).
        # Row r of a lower-triangular L is zero beyond column r: every product below stops there.
        L = self.scale_tril
        if torch.is_grad_enabled() and (L.requires_grad or self.loc.requires_grad or v.requires_grad):
            return self._condition_differentiable(I, K, v)
        I, order = I.sort()
        v = v[order]
        c = int(I[-1]) + 1
        nKA = int((K < c).sum())
        KA = K[:nKA]
        nI, nK = I.numel(), K.numel()

        def build_C(buf: torch.Tensor) -> None:
            _stair_gram(L, I, I, buf, lower=True)

        C = torch.empty(nI, nI, dtype=L.dtype, device=L.device)
        build_C(C)
        _cholesky_inplace(C, build_C, "covariance of the conditioned coordinates")
        S_KI = torch.empty(nK, nI, dtype=L.dtype, device=L.device)
        _stair_gram(L, K, I, S_KI, lower=False)
        X = torch.linalg.solve_triangular(C.mT, S_KI, upper=True, left=False)  # S_KI C_I^{-T}
        del S_KI
        r = _tri_solve(C, (v - self.loc[I]).unsqueeze(-1))
        loc = self.loc[K] + (X @ r).squeeze(-1)
        XA = X[:nKA]

        def build_T(buf: torch.Tensor) -> None:
            _stair_gram(L, KA, KA, buf, lower=True, minus=(XA, XA))

        if nKA == nK:  # no trailing block: factor in place in the result buffer
            out = torch.empty(nK, nK, dtype=L.dtype, device=L.device)
            build_T(out)
            _cholesky_inplace(out, build_T, "conditional covariance")
            return DenseGaussian(loc, out)
        out = torch.zeros(nK, nK, dtype=L.dtype, device=L.device)
        if nKA:
            T = torch.empty(nKA, nKA, dtype=L.dtype, device=L.device)
            build_T(T)
            _cholesky_inplace(T, build_T, "conditional covariance")
            out[:nKA, :nKA] = T
            F = out[nKA:, :nKA]
            _stair_gram(L, K[nKA:], KA, F, lower=False, minus=(X[nKA:], XA))
            out[nKA:, :nKA] = torch.linalg.solve_triangular(T.mT, F, upper=True, left=False)
            del T
        out[nKA:, nKA:] = L[c:, c:]
        return DenseGaussian(loc, out)

    def _condition_differentiable(self, I, K, v):
        """The same Schur complement without in-place kernels, for tensors that carry gradients."""
        L = self.scale_tril
        LI, LK = L[I], L[K]
        C = cholesky_jitter(LI @ LI.T, "covariance of the conditioned coordinates")
        X = torch.linalg.solve_triangular(C.mT, LK @ LI.T, upper=True, left=False)  # S_KI C_I^{-T}
        loc = self.loc[K] + X @ _tri_solve(C, (v - self.loc[I]).unsqueeze(-1)).squeeze(-1)
        return DenseGaussian(loc, cholesky_jitter(LK @ LK.T - X @ X.T, "conditional covariance"))

    def _scaled(self, c):
        return DenseGaussian(self.loc, self.scale_tril * c, self.layout, self.meta)

    def _replace(self, **t):
        d = self._tensors() | t
        return DenseGaussian(**d, layout=self.layout, meta=self.meta)

    def _tensors(self):
        return {"loc": self.loc, "scale_tril": self.scale_tril}

    def to_pyro(self):
        import pyro.distributions as dist

        L = self.scale_tril
        neg = L.diagonal() < 0
        if bool(neg.any()):  # only |L_ii| matters here, but Pyro's log det takes log(L_ii): flip those columns
            L = L * torch.where(neg, -1.0, 1.0).to(L.dtype)
        return dist.MultivariateNormal(self.loc, scale_tril=L, validate_args=False)

    guide_tril = ("scale_tril",)
    # Full-covariance SVI with one step size for every entry of L random-walks the p^2 off-diagonal entries
    guide_factor_lr_divisor = 100.0

    @classmethod
    def guide_params(cls, start, rank=20, seed=0):
        """``scale_tril``: the start's factor, or ``diag(sd)`` of any other structure. One p x p parameter whose
        upper triangle stays zero (the fit masks its gradient); the diagonal's sign is free (only ``|L_ii|``
        enters log det)."""
        L = start.scale_tril if isinstance(start, DenseGaussian) else torch.diag(start.variance.sqrt())
        return {"scale_tril": torch.tril(L.detach()).clone()}

    @classmethod
    def from_guide_params(cls, loc, params, layout=None):
        return cls(loc, params["scale_tril"], layout=layout)

    @classmethod
    def start_around(cls, loc, sd, rank=20, seed=0, blocks=None, layout=None):
        return cls(loc, torch.diag(sd), layout=layout)


# ============================================================================ low rank
class LowRankGaussian(Gaussian):
    """``N(loc, W W^T + diag(d))`` with ``W = cov_factor`` ``[p, k]`` and ``d = cov_diag > 0``."""

    kind = "lowrank"
    arg_constraints = {"loc": constraints.real_vector, "cov_factor": constraints.independent(constraints.real, 2),
                       "cov_diag": constraints.independent(constraints.positive, 1)}
    #: rows processed at once when conditioning (bounds the temporary memory)
    chunk_rows = 1 << 17

    def __init__(self, loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor,
                 layout: Layout | None = None, meta: dict | None = None, validate_args: bool = False):
        super().__init__(loc, layout, meta, validate_args)
        p = loc.shape[-1]
        if cov_factor.dim() != 2 or cov_factor.shape[0] != p:
            raise ValueError(f"cov_factor must be [{p}, k], got {tuple(cov_factor.shape)}")
        if cov_diag.shape != (p,):
            raise ValueError(f"cov_diag must be [{p}], got {tuple(cov_diag.shape)}")
        self.cov_factor = cov_factor
        self.cov_diag = cov_diag
        if _checkable(loc, cov_factor, cov_diag):
            _check_finite(self, "loc", loc, "pass a finite mean (a diverged fit? refit with a smaller lr)")
            _check_finite(self, "cov_factor", cov_factor, "pass a finite factor")
            _check_positive(self, "cov_diag", cov_diag, "it holds variances: clamp it, e.g. cov_diag.clamp_min(1e-12)")

    @property
    def rank(self) -> int:
        return self.cov_factor.shape[-1]

    def _repr_extra(self) -> str:
        return f", rank={self.rank}"

    @property
    def variance(self):
        return (self.cov_factor**2).sum(-1) + self.cov_diag

    def covariance(self):
        return self.cov_factor @ self.cov_factor.T + torch.diag(self.cov_diag)

    def _factor_form(self):
        return self.cov_factor, self.cov_diag

    def _capacitance_tril(self) -> torch.Tensor:
        W, d = self.cov_factor, self.cov_diag
        Wt = W / d.unsqueeze(-1)
        C = W.T @ Wt
        C.diagonal().add_(1.0)
        return torch.linalg.cholesky(C)

    def logdet(self):
        return self.cov_diag.log().sum() + 2 * self._capacitance_tril().diagonal().log().sum()

    def _quad(self, b):
        # Woodbury: b^T S^{-1} b = b^T D^{-1} b - ||L_C^{-1} W^T D^{-1} b||^2
        W, d = self.cov_factor, self.cov_diag
        db = b / d.unsqueeze(-1)
        t = _tri_solve(self._capacitance_tril(), W.T @ db)
        return (b * db).sum(0) - (t**2).sum(0)

    def precision(self):
        W, d = self.cov_factor, self.cov_diag
        Lc = self._capacitance_tril()
        T = _tri_solve(Lc, (W / d.unsqueeze(-1)).T)
        return torch.diag(1 / d) - T.T @ T

    def _trace_inv(self, A, e):
        W, d = self.cov_factor, self.cov_diag
        Lc = self._capacitance_tril()
        Wd = W / d.unsqueeze(-1)  # D^{-1} W
        out = torch.zeros((), dtype=self.dtype, device=self.device)
        if A is not None:
            out = out + ((A**2) / d.unsqueeze(-1)).sum() - (_tri_solve(Lc, Wd.T @ A) ** 2).sum()
        if e is not None:
            Tcols = _tri_solve(Lc, Wd.T)  # k x p
            out = out + (e / d).sum() - ((Tcols**2).sum(0) * e).sum()
        return out

    def _draw(self, n, generator):
        z = self._eps(n, self.rank, generator=generator)
        eps = self._eps(n, self.dim, generator=generator)
        return self.loc + z @ self.cov_factor.T + eps * self.cov_diag.sqrt()

    def marginalize(self, keep):
        K = _as_index(keep, self.dim).to(self.device)
        return LowRankGaussian(self.loc[K], self.cov_factor[K], self.cov_diag[K])

    def _condition(self, I, K, v):
        # Woodbury: with C = I_k + W_I^T D_I^{-1} W_I = L_C L_C^T,
        #   mean = m_K + W_K C^{-1} W_I^T D_I^{-1} (v - m_I),  cov = D_K + (W_K L_C^{-T})(W_K L_C^{-T})^T.
        W, d = self.cov_factor, self.cov_diag
        isd = d[I].rsqrt()
        WI = W.index_select(0, I).mul_(isd.unsqueeze(-1))  # D_I^{-1/2} W_I, scaled in place (one |I| x k copy)
        C = WI.T @ WI
        C.diagonal().add_(1.0)
        Lc = cholesky_jitter(C, "capacitance matrix")
        r = WI.T @ ((v - self.loc[I]) * isd)  # W_I^T D_I^{-1} (v - m_I), length k
        del WI
        s = torch.cholesky_solve(r.unsqueeze(-1), Lc).squeeze(-1)  # C^{-1} W_I^T D_I^{-1}(v - m_I)
        # new factor W_K L_C^{-T}, computed in row chunks so no |K| x k temporary beyond the result
        # L_C^{-T} (k x k) once: C >= I, so ||L_C^{-1}|| <= 1 and this small inverse is well conditioned
        Tinv_T = _tri_solve(Lc, torch.eye(Lc.shape[0], dtype=W.dtype, device=W.device)).T
        newW = torch.empty(K.numel(), W.shape[1], dtype=W.dtype, device=W.device)
        loc = torch.empty(K.numel(), dtype=W.dtype, device=W.device)
        for a in range(0, K.numel(), self.chunk_rows):
            kk = K[a : a + self.chunk_rows]
            Wk = W.index_select(0, kk)
            torch.matmul(Wk, Tinv_T, out=newW[a : a + kk.numel()])
            torch.addmv(self.loc[kk], Wk, s, out=loc[a : a + kk.numel()])
            del Wk
        return LowRankGaussian(loc, newW, d[K])

    def _scaled(self, c):
        return LowRankGaussian(self.loc, self.cov_factor * c, self.cov_diag * c**2, self.layout, self.meta)

    def _replace(self, **t):
        d = self._tensors() | t
        return LowRankGaussian(**d, layout=self.layout, meta=self.meta)

    def _tensors(self):
        return {"loc": self.loc, "cov_factor": self.cov_factor, "cov_diag": self.cov_diag}

    def to_pyro(self):
        import pyro.distributions as dist

        return dist.LowRankMultivariateNormal(self.loc, self.cov_factor, self.cov_diag, validate_args=False)

    @classmethod
    def random_start(cls, loc: torch.Tensor, sd: torch.Tensor, cov_diag: torch.Tensor, rank: int, seed: int = 0,
                     layout: Layout | None = None) -> LowRankGaussian:
        """A low-rank start with a small random factor ``W = 0.1 sd z / sqrt(k)`` (``z`` ``[p, k]`` standard normal
        from a CPU generator seeded by ``seed``: the same draws on every device) and diagonal ``cov_diag``; the
        factor only breaks the symmetry, so the start's variances stay close to ``cov_diag``."""
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(loc.shape[-1], rank, generator=g, dtype=loc.dtype).to(loc.device)
        W = W * (0.1 * sd.unsqueeze(-1) / math.sqrt(rank))
        return cls(loc, W, cov_diag, layout=layout)

    @classmethod
    def guide_params(cls, start, rank=20, seed=0):
        """``cov_factor`` and ``log_diag``; another structure starts from its variances ``v`` as
        :meth:`random_start` with diagonal ``0.99 v`` (its correlations are not kept)."""
        if not isinstance(start, LowRankGaussian):
            var = start.variance
            start = cls.random_start(start.loc, var.sqrt(), var * 0.99, rank, seed)
        return {"cov_factor": start.cov_factor.detach().clone(), "log_diag": start.cov_diag.detach().log().clone()}

    @classmethod
    def from_guide_params(cls, loc, params, layout=None):
        return cls(loc, params["cov_factor"], params["log_diag"].exp(), layout=layout)

    @classmethod
    def start_around(cls, loc, sd, rank=20, seed=0, blocks=None, layout=None):
        return cls.random_start(loc, sd, sd**2, rank, seed, layout=layout)


# ============================================================================ diagonal
class DiagGaussian(Gaussian):
    """``N(loc, diag(scale^2))``: conditioning drops coordinates."""

    kind = "diag"
    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.independent(constraints.positive, 1)}

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, layout: Layout | None = None,
                 meta: dict | None = None, validate_args: bool = False):
        super().__init__(loc, layout, meta, validate_args)
        if scale.shape != loc.shape:
            raise ValueError(f"scale must have shape {tuple(loc.shape)}, got {tuple(scale.shape)}")
        self.scale = scale
        if _checkable(loc, scale):
            _check_finite(self, "loc", loc, "pass a finite mean (a diverged fit? refit with a smaller lr)")
            _check_positive(self, "scale", scale, "it holds standard deviations: pass scale.abs(), or variance.sqrt(), "
                            "and clamp zeros (e.g. .clamp_min(1e-12))")

    @property
    def variance(self):
        return self.scale**2

    def covariance(self):
        return torch.diag(self.scale**2)

    def _factor_form(self):
        return None, self.scale**2

    def logdet(self):
        return 2 * self.scale.log().sum()

    def _quad(self, b):
        return ((b / self.scale.unsqueeze(-1)) ** 2).sum(0)

    def precision(self):
        return torch.diag(self.scale**-2)

    def _trace_inv(self, A, e):
        out = torch.zeros((), dtype=self.dtype, device=self.device)
        var = self.scale**2
        if A is not None:
            out = out + (torch.linalg.vector_norm(A, dim=-1) ** 2 / var).sum()
        if e is not None:
            out = out + (e / var).sum()
        return out

    def _draw(self, n, generator):
        return self.loc + self._eps(n, self.dim, generator=generator) * self.scale

    def marginalize(self, keep):
        K = _as_index(keep, self.dim).to(self.device)
        return DiagGaussian(self.loc[K], self.scale[K])

    def _condition(self, I, K, v):
        return DiagGaussian(self.loc[K], self.scale[K])

    def _scaled(self, c):
        return DiagGaussian(self.loc, self.scale * c, self.layout, self.meta)

    def _replace(self, **t):
        d = self._tensors() | t
        return DiagGaussian(**d, layout=self.layout, meta=self.meta)

    def _tensors(self):
        return {"loc": self.loc, "scale": self.scale}

    def to_pyro(self):
        import pyro.distributions as dist

        return dist.Normal(self.loc, self.scale, validate_args=False).to_event(1)

    @classmethod
    def guide_params(cls, start, rank=20, seed=0):
        """``log_scale``: the log standard deviations of any start (its correlations are not kept)."""
        return {"log_scale": start.variance.detach().sqrt().log().clone()}

    @classmethod
    def from_guide_params(cls, loc, params, layout=None):
        return cls(loc, params["log_scale"].exp(), layout=layout)

    @classmethod
    def start_around(cls, loc, sd, rank=20, seed=0, blocks=None, layout=None):
        return cls(loc, sd, layout=layout)


# ============================================================================ Kronecker
class StructureError(ValueError):
    """The structure cannot do this operation exactly; the message names the structure to convert to."""


def kron_index(layout: Layout, weight: str, bias: str | None = None) -> torch.Tensor:
    """Flat indices ``[n_out, n_in (+1)]`` of a layer's weight matrix, with its bias as an extra last column
    (KFAC's augmented ``[U | b]``): the ``index`` of one :class:`KronGaussian` block."""
    n_out, n_in = layout.shape(weight)
    idx = layout.indices(weight).reshape(n_out, n_in)
    if bias is not None:
        if layout.shape(bias) != (n_out,):
            raise ValueError(f"bias {bias!r} has shape {layout.shape(bias)}, the weight {weight!r} has {n_out} rows")
        idx = torch.cat([idx, layout.indices(bias).reshape(n_out, 1)], 1)
    return idx


def _refuse(what: str) -> StructureError:
    return StructureError(
        f"KronGaussian: {what}; a Kronecker block is closed only under whole rows, whole columns or the whole "
        "block. Convert first: g.to_dense() (exact, O(p^2) memory) or g.to_lowrank(k) (approximate)"
    )


def _factor_sub(L: torch.Tensor, keep: torch.Tensor, what: str) -> torch.Tensor:
    """Cholesky factor of ``(L L^T)[keep][:, keep]`` (a leading block of ``L`` when ``keep`` is a prefix)."""
    k = keep.numel()
    if k == L.shape[0]:
        return L
    if bool((keep == torch.arange(k, device=keep.device)).all()):
        return L[:k, :k]
    Lk = L[keep]
    return cholesky_jitter(Lk @ Lk.T, what)


def _condition_rows(L: torch.Tensor, M: torch.Tensor, V: torch.Tensor, fixed: torch.Tensor,
                    what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix-normal conditioning on whole rows: with row covariance ``A = L L^T`` and rows ``J`` fixed to ``V_J``,
    the rows ``R`` are ``MN(M_R + A_RJ A_JJ^{-1} (V_J - M_J), A_RR - A_RJ A_JJ^{-1} A_JR, B)`` (B unchanged).
    Returns (new mean ``[|R|, c]``, Cholesky factor of the new row covariance)."""
    J, R = fixed.nonzero().reshape(-1), (~fixed).nonzero().reshape(-1)
    LJ, LR = L[J], L[R]
    C = cholesky_jitter(LJ @ LJ.T, f"{what}: covariance of the fixed rows")
    X = torch.linalg.solve_triangular(C.mT, LR @ LJ.T, upper=True, left=False)  # A_RJ C^{-T}
    mean = M[R] + X @ _tri_solve(C, V[J] - M[J])
    return mean, cholesky_jitter(LR @ LR.T - X @ X.T, f"{what}: conditional row covariance")


class KronGaussian(Gaussian):
    """Block-diagonal Gaussian: Kronecker-factored (matrix-normal) blocks plus a diagonal remainder.

    Block ``b`` is a matrix ``U`` (``r x c``) whose entry ``(i, j)`` is flat coordinate ``index[b][i, j]`` (so a
    layer's weight rows plus its bias column, KFAC's ``[U_t | b_t]``, is one block; see :func:`kron_index`).
    Convention: row covariance ``A = L_A L_A^T`` (``r x r``), column covariance ``B = L_B L_B^T`` (``c x c``),
    ``Cov(U_ij, U_kl) = A_ik B_jl``, i.e. ``vec(U) ~ N(vec(M), B ⊗ A)`` with column-stacking ``vec`` (the
    row-major flattening has covariance ``A ⊗ B``). Blocks are independent of each other; coordinates no block
    covers are independent with standard deviations ``rem_scale`` (in increasing flat order).
    Nothing here builds a ``p x p`` matrix unless asked (``covariance``, ``precision``, ``to_dense``, and the KL
    against a dense or low-rank prior, which uses the dense factor form: small p only).
    """

    kind = "kron"

    def __init__(self, loc: torch.Tensor, index: Sequence[torch.Tensor], row_tril: Sequence[torch.Tensor],
                 col_tril: Sequence[torch.Tensor], rem_scale: torch.Tensor, layout: Layout | None = None,
                 meta: dict | None = None, validate_args: bool = False):
        super().__init__(loc, layout, meta, validate_args)
        p = loc.shape[-1]
        index, row_tril, col_tril = list(index), list(row_tril), list(col_tril)
        if not len(index) == len(row_tril) == len(col_tril):
            raise ValueError(f"{len(index)} index matrices, {len(row_tril)} row and {len(col_tril)} column factors: "
                             "give one of each per block")
        covered = torch.zeros(p, dtype=torch.bool, device=loc.device)
        self.index: list[torch.Tensor] = []
        for b, (idx, LA, LB) in enumerate(zip(index, row_tril, col_tril)):
            idx = torch.as_tensor(idx, dtype=torch.long, device=loc.device)
            if idx.dim() != 2 or idx.numel() == 0:
                raise ValueError(f"block {b}: index must be a non-empty [rows, cols] matrix, got {tuple(idx.shape)}")
            r, c = idx.shape
            if LA.shape != (r, r) or LB.shape != (c, c):
                raise ValueError(f"block {b} is {r}x{c}: row_tril must be [{r}, {r}] and col_tril [{c}, {c}], got "
                                 f"{tuple(LA.shape)} and {tuple(LB.shape)}")
            if int(idx.min()) < 0 or int(idx.max()) >= p:
                raise IndexError(f"block {b}: flat indices out of range for a Gaussian of dimension {p}")
            if bool(covered[idx].any()) or torch.unique(idx).numel() != idx.numel():
                raise ValueError(f"block {b} shares coordinates with itself or an earlier block; blocks must be "
                                 "disjoint")
            covered[idx] = True
            self.index.append(idx)
        self.row_tril, self.col_tril = row_tril, col_tril
        self.rem_index = (~covered).nonzero().reshape(-1)
        if rem_scale.shape != (self.rem_index.numel(),):
            raise ValueError(f"{self.rem_index.numel()} coordinates are in no block, so rem_scale must be "
                             f"[{self.rem_index.numel()}], got {tuple(rem_scale.shape)}")
        self.rem_scale = rem_scale
        self._perm: torch.Tensor | None = None
        if _checkable(loc, rem_scale, *row_tril, *col_tril):
            _check_finite(self, "loc", loc, "pass a finite mean (a diverged fit? refit with a smaller lr)")
            _check_positive(self, "rem_scale", rem_scale, "it holds standard deviations: clamp it, e.g. "
                            ".clamp_min(1e-12)")
            for b, (LA, LB) in enumerate(zip(row_tril, col_tril)):
                for name, L in ((f"row_tril[{b}]", LA), (f"col_tril[{b}]", LB)):
                    _check_finite(self, name, L, "pass finite Cholesky factors")
                    if bool((L.diagonal() == 0).any()):
                        raise ValueError(f"KronGaussian: {name} has a zero diagonal entry, so that factor is singular; "
                                         "build the block from covariances or precisions (from_blocks(..., "
                                         "factors='covariance') or from_precision_factors), which add jitter")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_blocks(cls, loc: torch.Tensor, blocks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    remainder_scale: float | torch.Tensor | None = None, layout: Layout | None = None,
                    meta: dict | None = None, factors: str = "cholesky") -> KronGaussian:
        """Build from ``[(index [r, c], A, B), ...]``: ``A``/``B`` are lower Cholesky factors of the row/column
        covariances (``factors="cholesky"``) or the covariances themselves (``factors="covariance"``).

        ``remainder_scale``: the standard deviation of the coordinates no block covers: a number, a vector over
        those coordinates (increasing flat order), or a vector over all ``p`` coordinates (its uncovered entries
        are used); None when the blocks cover everything.
        """
        if factors not in ("cholesky", "covariance"):
            raise ValueError(f"factors must be 'cholesky' or 'covariance', got {factors!r}")
        idxs, LAs, LBs = [], [], []
        for b, (idx, A, B) in enumerate(blocks):
            A, B = torch.as_tensor(A, dtype=loc.dtype), torch.as_tensor(B, dtype=loc.dtype)
            if factors == "covariance":
                A = cholesky_jitter(0.5 * (A + A.mT), f"row covariance of block {b}")
                B = cholesky_jitter(0.5 * (B + B.mT), f"column covariance of block {b}")
            elif bool((A.triu(1) != 0).any()) or bool((B.triu(1) != 0).any()):
                raise ValueError(f"block {b}: factors='cholesky' but a factor is not lower triangular; pass "
                                 "factors='covariance' to give covariances")
            idxs.append(torch.as_tensor(idx, dtype=torch.long))
            LAs.append(A.to(loc.device))
            LBs.append(B.to(loc.device))
        return cls(loc, idxs, LAs, LBs, cls._remainder(loc, idxs, remainder_scale), layout=layout, meta=meta)

    @classmethod
    def from_precision_factors(cls, loc: torch.Tensor,
                               blocks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                               remainder_precision: float | torch.Tensor | None = None,
                               layout: Layout | None = None, meta: dict | None = None) -> KronGaussian:
        """Build from per-block precision factors ``[(index [r, c], P_row, P_col), ...]``: the block's precision is
        exactly ``P_row ⊗ P_col`` in this class's convention (``Prec(U_ij, U_kl) = P_row[i, k] P_col[j, l]``), so
        the covariances are ``A = P_row^{-1}``, ``B = P_col^{-1}`` (by Cholesky, never an explicit inverse).

        Damping convention for a KFAC Laplace posterior: the caller folds the data size and the prior in, e.g.
        ``P_row = sqrt(N) G + sqrt(λ) I`` (output-gradient factor, rows = output neurons) and
        ``P_col = sqrt(N) A_in + sqrt(λ) I`` (input factor, the bias as the last augmented column), whose
        product ``N G ⊗ A_in + sqrt(Nλ)(G ⊗ I + I ⊗ A_in) + λ I`` approximates ``GGN + λ I``; nothing is added
        here. ``remainder_precision``: the precision of the uncovered coordinates (number, vector over them, or
        over all p).
        """
        conv = []
        for b, (idx, Pr, Pc) in enumerate(blocks):
            covs = []
            for what, P in ((f"row precision of block {b}", Pr), (f"column precision of block {b}", Pc)):
                P = torch.as_tensor(P, dtype=loc.dtype).to(loc.device)
                covs.append(torch.cholesky_inverse(cholesky_jitter(0.5 * (P + P.mT), what)))
            conv.append((idx, covs[0], covs[1]))
        rem = None
        if remainder_precision is not None:
            rp = torch.as_tensor(remainder_precision, dtype=loc.dtype, device=loc.device)
            if bool((rp <= 0).any()):
                raise ValueError("remainder_precision must be > 0 (a precision, e.g. the prior's 1/variance)")
            rem = rp.rsqrt()
        return cls.from_blocks(loc, conv, rem, layout=layout, meta=meta, factors="covariance")

    @staticmethod
    def _remainder(loc: torch.Tensor, idxs: Sequence[torch.Tensor], scale: float | torch.Tensor | None
                   ) -> torch.Tensor:
        p = loc.shape[-1]
        covered = torch.zeros(p, dtype=torch.bool)
        for idx in idxs:
            covered[idx.cpu()] = True
        rem = (~covered).nonzero().reshape(-1)
        if scale is None:
            if rem.numel():
                raise ValueError(f"{rem.numel()} coordinates are in no block; give remainder_scale (their "
                                 "standard deviation)")
            return torch.zeros(0, dtype=loc.dtype, device=loc.device)
        s = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        if s.dim() == 0:
            return s.expand(rem.numel()).clone()
        if s.shape == (p,):
            return s[rem.to(s.device)].clone()
        if s.shape == (rem.numel(),):
            return s
        raise ValueError(f"remainder scale must be a number, a vector of the {rem.numel()} uncovered coordinates "
                         f"or of all {p}; got shape {tuple(s.shape)}")

    # ----------------------------------------------------------------- layout of the blocks
    @property
    def num_blocks(self) -> int:
        return len(self.index)

    def _repr_extra(self) -> str:
        shapes = ", ".join(f"{i.shape[0]}x{i.shape[1]}" for i in self.index[:4])
        more = ", ..." if len(self.index) > 4 else ""
        return f", blocks=[{shapes}{more}], remainder={self.rem_index.numel()}"

    def _assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Flat ``[..., p]`` from per-block ``[..., r*c]`` parts and the remainder ``[..., n_rem]`` (a gather, so
        it is differentiable)."""
        if self._perm is None:
            perm = torch.cat([i.reshape(-1) for i in self.index] + [self.rem_index])
            self._perm = torch.argsort(perm)
        return torch.cat(parts, -1).index_select(-1, self._perm)

    def _blocks_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x[..., index_b]`` for each block: ``[..., r, c]``."""
        return [x[..., idx] for idx in self.index]

    # ----------------------------------------------------------------- moments
    @property
    def variance(self) -> torch.Tensor:
        parts = [torch.outer((LA**2).sum(-1), (LB**2).sum(-1)).reshape(-1)
                 for LA, LB in zip(self.row_tril, self.col_tril)]
        return self._assemble(parts + [self.rem_scale**2])

    def covariance(self) -> torch.Tensor:
        S = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            f = idx.reshape(-1)
            S[f.unsqueeze(-1), f] = torch.kron(LA @ LA.T, LB @ LB.T)
        S[self.rem_index, self.rem_index] = self.rem_scale**2
        return S

    def precision(self) -> torch.Tensor:
        P = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            f = idx.reshape(-1)
            P[f.unsqueeze(-1), f] = torch.kron(torch.cholesky_inverse(LA), torch.cholesky_inverse(LB))
        P[self.rem_index, self.rem_index] = self.rem_scale**-2
        return P

    def precision_diagonal(self) -> torch.Tensor:
        """``diag(Sigma^{-1})`` without the ``p x p`` precision: per block ``diag((A ⊗ B)^{-1}) =
        outer(diag(A^{-1}), diag(B^{-1}))``."""
        parts = [torch.outer(torch.cholesky_inverse(LA).diagonal(), torch.cholesky_inverse(LB).diagonal()).reshape(-1)
                 for LA, LB in zip(self.row_tril, self.col_tril)]
        return self._assemble(parts + [self.rem_scale**-2])

    def precision_mv(self, v: torch.Tensor) -> torch.Tensor:
        """``Sigma^{-1} v`` for ``v`` of shape ``[p]`` or ``[p, n]`` without the ``p x p`` precision: per block
        ``(A ⊗ B)^{-1} vec(V) = vec(A^{-1} V B^{-1})`` by two Cholesky solves, the remainder divided by its
        variances."""
        vec = v.dim() == 1
        V = v.unsqueeze(-1) if vec else v
        out = torch.empty_like(V)
        out[self.rem_index] = V[self.rem_index] / (self.rem_scale**2).unsqueeze(-1)
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            r, c = idx.shape
            n = V.shape[-1]
            X = torch.cholesky_solve(V[idx].reshape(r, c * n), LA).reshape(r, c, n)       # A^{-1} V
            Y = torch.cholesky_solve(X.permute(1, 0, 2).reshape(c, r * n), LB)             # B^{-1} (A^{-1} V)^T
            out[idx.reshape(-1)] = Y.reshape(c, r, n).permute(1, 0, 2).reshape(r * c, n)
        return out.squeeze(-1) if vec else out

    def _factor_form(self):
        # dense-ish: one column per block coordinate (p x covered); used by the generic KL against dense or
        # low-rank priors only
        ncov = self.dim - self.rem_index.numel()
        A = torch.zeros(self.dim, ncov, dtype=self.dtype, device=self.device) if ncov else None
        off = 0
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            n = idx.numel()
            A[idx.reshape(-1), off:off + n] = torch.kron(LA, LB)  # (L_A ⊗ L_B)(L_A ⊗ L_B)^T = A ⊗ B, row-major
            off += n
        e = None
        if self.rem_index.numel():
            e = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            e[self.rem_index] = self.rem_scale**2
        return A, e

    def logdet(self) -> torch.Tensor:
        out = 2 * self.rem_scale.log().sum()
        for LA, LB in zip(self.row_tril, self.col_tril):
            r, c = LA.shape[0], LB.shape[0]
            out = out + 2 * (c * LA.diagonal().abs().log().sum() + r * LB.diagonal().abs().log().sum())
        return out

    @staticmethod
    def _whiten(LA: torch.Tensor, LB: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``L_A^{-1} X L_B^{-T}`` for ``X`` of shape ``[r, c, n]`` (each of the n matrices)."""
        r, c, n = X.shape
        Y = _tri_solve(LA, X.reshape(r, c * n)).reshape(r, c, n)
        return _tri_solve(LB, Y.permute(1, 0, 2).reshape(c, r * n)).reshape(c, r, n)

    def _quad(self, b):
        out = ((b[self.rem_index] / self.rem_scale.unsqueeze(-1)) ** 2).sum(0)
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            out = out + (self._whiten(LA, LB, b[idx]) ** 2).sum((0, 1))
        return out

    def _trace_inv(self, A, e):
        out = torch.zeros((), dtype=self.dtype, device=self.device)
        var = self.rem_scale**2
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            if A is not None:
                out = out + (self._whiten(LA, LB, A[idx]) ** 2).sum()
            if e is not None:  # diag((A ⊗ B)^{-1}) = outer(diag(A^{-1}), diag(B^{-1}))
                dA = torch.cholesky_inverse(LA).diagonal()
                dB = torch.cholesky_inverse(LB).diagonal()
                out = out + (e[idx] * torch.outer(dA, dB)).sum()
        if A is not None:
            out = out + ((A[self.rem_index] ** 2).sum(-1) / var).sum()
        if e is not None:
            out = out + (e[self.rem_index] / var).sum()
        return out

    def _draw(self, n, generator):
        parts = []
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            r, c = idx.shape
            Z = self._eps(n, r, c, generator=generator)
            parts.append((self.loc[idx] + LA @ Z @ LB.T).reshape(n, r * c))  # L_A Z L_B^T ~ MN(0, A, B)
        k = self.rem_index.numel()
        parts.append(self.loc[self.rem_index] + self._eps(n, k, generator=generator) * self.rem_scale)
        return self._assemble(parts)

    def _kl_special(self, other):
        if not isinstance(other, KronGaussian) or not self.same_structure(other):
            return None
        # per block: tr((B2 ⊗ A2)^{-1}(B1 ⊗ A1)) = tr(A2^{-1} A1) tr(B2^{-1} B1),
        # Mahalanobis ||L_A2^{-1} (M2 - M1) L_B2^{-T}||^2, log det(B ⊗ A) = c log det A + r log det B
        diff = other.loc - self.loc
        v1, v2 = self.rem_scale**2, other.rem_scale**2
        dr = diff[self.rem_index]
        out = ((v1 / v2).sum() + (dr**2 / v2).sum() + v2.log().sum() - v1.log().sum())
        for idx, LA1, LB1, LA2, LB2 in zip(self.index, self.row_tril, self.col_tril, other.row_tril,
                                          other.col_tril):
            r, c = idx.shape
            trA = (_tri_solve(LA2, LA1) ** 2).sum()
            trB = (_tri_solve(LB2, LB1) ** 2).sum()
            maha = (self._whiten(LA2, LB2, diff[idx].unsqueeze(-1)) ** 2).sum()
            ld = 2 * (c * (LA2.diagonal().abs().log().sum() - LA1.diagonal().abs().log().sum())
                      + r * (LB2.diagonal().abs().log().sum() - LB1.diagonal().abs().log().sum()))
            out = out + trA * trB + maha + ld
        return 0.5 * (out - self.dim)

    def same_structure(self, other: KronGaussian) -> bool:
        """Same blocks over the same coordinates (so the KL is closed blockwise)."""
        return (other.dim == self.dim and len(other.index) == len(self.index)
                and all(a.shape == b.shape and bool((a == b).all()) for a, b in zip(self.index, other.index)))

    # ----------------------------------------------------------------- conversions
    def to_dense(self) -> DenseGaussian:
        """The same Gaussian as a :class:`DenseGaussian` (Cholesky of the p x p covariance: O(p^3))."""
        return DenseGaussian.from_covariance(self.loc, self.covariance(), layout=self.layout, meta=self.meta)

    def to_lowrank(self, k: int) -> LowRankGaussian:
        """A :class:`LowRankGaussian`: the top-``k`` eigenpairs of each block (eigenpairs of ``A ⊗ B`` are the
        products ``λ_i μ_j``, ``u_i ⊗ v_j``; rank ``sum_b min(k, r_b c_b)``) plus a diagonal that keeps the exact
        variance (the remainder's variances unchanged)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"rank k must be a positive integer, got {k!r}")
        cols = []
        for idx, LA, LB in zip(self.index, self.row_tril, self.col_tril):
            r, c = idx.shape
            lam, U = torch.linalg.eigh(LA @ LA.T)
            mu, V = torch.linalg.eigh(LB @ LB.T)
            prod = torch.outer(lam.clamp_min(0), mu.clamp_min(0)).reshape(-1)
            m = min(k, r * c)
            top = torch.topk(prod, m).indices
            i, j = top // c, top % c
            Wb = (U[:, i].unsqueeze(1) * V[:, j].unsqueeze(0)).reshape(r * c, m) * prod[top].sqrt()
            W = torch.zeros(self.dim, m, dtype=self.dtype, device=self.device)
            W[idx.reshape(-1)] = Wb
            cols.append(W)
        var = self.variance
        if cols:
            W = torch.cat(cols, 1)
            d = torch.maximum(var - (W**2).sum(-1), var * torch.finfo(self.dtype).eps)
        else:
            W, d = torch.zeros(self.dim, 0, dtype=self.dtype, device=self.device), var
        return LowRankGaussian(self.loc, W, d, layout=self.layout, meta=self.meta)

    def to_pyro(self):
        """A Pyro distribution (``pyro_distill.gaussian.KronMatrixNormal``) that samples and scores through this
        structure, without a p x p matrix."""
        return _kron_pyro_class()(self)

    guide_tril = ("row_tril", "col_tril")

    @classmethod
    def guide_params(cls, start, rank=20, seed=0):
        """Per block the lower-triangular row and column factors (``kron_index``: the blocks' flat indices, fixed),
        plus the log standard deviations of the uncovered coordinates. Only a Kronecker start has blocks."""
        if not isinstance(start, KronGaussian):
            raise StructureError(f"guide 'kron' needs a KronGaussian start, got a {start.kind} Gaussian; pass a "
                                 "Kronecker start (cov_init='laplace' or 'prior' builds one for an MLP or a CNN) or "
                                 "choose the guide of the start's structure")
        return {"kron_index": [i.clone() for i in start.index],
                "row_tril": [L.detach().clone() for L in start.row_tril],
                "col_tril": [L.detach().clone() for L in start.col_tril],
                "rem_log_scale": start.rem_scale.detach().log().clone()}

    @classmethod
    def from_guide_params(cls, loc, params, layout=None):
        return cls(loc, params["kron_index"], list(params["row_tril"]), list(params["col_tril"]),
                   params["rem_log_scale"].exp(), layout=layout)

    @classmethod
    def start_around(cls, loc, sd, rank=20, seed=0, blocks=None, layout=None):
        if blocks is None:
            raise StructureError("a Kronecker start needs the network's blocks (blocks=lambda: kron_blocks(net))")
        idx = list(blocks())  # per block: row factor max(sd_block) I, column factor I (sd constant on a layer)
        eye = [torch.eye(i.shape[1], dtype=loc.dtype, device=loc.device) for i in idx]
        rows = [torch.eye(i.shape[0], dtype=loc.dtype, device=loc.device) * sd[i].max() for i in idx]
        return cls.from_blocks(loc, [(i, r, c) for i, r, c in zip(idx, rows, eye)], sd, layout=layout)

    # ----------------------------------------------------------------- structure operations
    def _rebuilt(self, loc: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 rem_scale: torch.Tensor) -> KronGaussian:
        return KronGaussian(loc, [b[0] for b in blocks], [b[1] for b in blocks], [b[2] for b in blocks], rem_scale,
                            meta=self.meta)

    def marginalize(self, keep):
        """``N(m_K, S_KK)``: closed when each block keeps whole rows x whole columns (or nothing)."""
        K = _as_index(keep, self.dim).to(self.device)
        pos = torch.full((self.dim,), -1, dtype=torch.long, device=self.device)
        pos[K] = torch.arange(K.numel(), device=self.device)
        blocks = []
        for b, (idx, LA, LB) in enumerate(zip(self.index, self.row_tril, self.col_tril)):
            pk = pos[idx]
            mask = pk >= 0
            if not bool(mask.any()):
                continue
            rows, cols = mask.any(1), mask.any(0)
            if not bool((mask == (rows.unsqueeze(1) & cols.unsqueeze(0))).all()):
                raise _refuse(f"marginalize would keep {int(mask.sum())} entries of block {b} "
                              f"({idx.shape[0]}x{idx.shape[1]}) that are not whole rows x whole columns of it")
            R, C = rows.nonzero().reshape(-1), cols.nonzero().reshape(-1)
            blocks.append((pk[R][:, C], _factor_sub(LA, R, f"rows kept of block {b}"),
                           _factor_sub(LB, C, f"columns kept of block {b}")))
        pr = pos[self.rem_index]
        kept = pr >= 0
        order = torch.argsort(pr[kept])
        return self._rebuilt(self.loc[K], blocks, self.rem_scale[kept][order])

    def _condition(self, I, K, v):
        fixed = torch.zeros(self.dim, dtype=torch.bool, device=self.device)
        fixed[I] = True
        val = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        val[I] = v
        pos = torch.full((self.dim,), -1, dtype=torch.long, device=self.device)
        pos[K] = torch.arange(K.numel(), device=self.device)
        loc = self.loc[K].clone()
        blocks = []
        for b, (idx, LA, LB) in enumerate(zip(self.index, self.row_tril, self.col_tril)):
            F = fixed[idx]
            if not bool(F.any()):
                blocks.append((pos[idx], LA, LB))
                continue
            if bool(F.all()):  # the whole block: blocks are independent, so the rest is unchanged
                continue
            rows, cols = F.all(1), F.all(0)
            if not bool((F == (rows.unsqueeze(1) | cols.unsqueeze(0))).all()):
                raise _refuse(f"cannot condition exactly on {int(F.sum())} entries of block {b} "
                              f"({idx.shape[0]}x{idx.shape[1]}) that are not whole rows or whole columns of it")
            M, V = self.loc[idx], val[idx]
            what = f"conditioning block {b}"
            if bool(rows.any()):
                M, LA = _condition_rows(LA, M, V, rows, what)
                V, idx = V[~rows], idx[~rows]
            if bool(cols.any()):
                Mt, LB = _condition_rows(LB, M.T, V.T, cols, what)
                M, idx = Mt.T, idx[:, ~cols]
            new = pos[idx]
            loc[new] = M
            blocks.append((new, LA, LB))
        keep_rem = ~fixed[self.rem_index]
        return self._rebuilt(loc, blocks, self.rem_scale[keep_rem])

    def _check_block(self, block: int) -> torch.Tensor:
        if not isinstance(block, int) or not 0 <= block < len(self.index):
            raise IndexError(f"block {block!r} out of range; this KronGaussian has blocks 0..{len(self.index) - 1}")
        return self.index[block]

    def condition_rows(self, block: int, rows: Sequence[int] | torch.Tensor, values: float | torch.Tensor = 0.0,
                       layout: Layout | None = None) -> KronGaussian:
        """Fix whole rows ``rows`` of block ``block`` to ``values`` (a number or ``[len(rows), c]``)."""
        idx = self._check_block(block)[torch.as_tensor(rows, dtype=torch.long).reshape(-1)]
        v = torch.as_tensor(values, dtype=self.dtype, device=self.device)
        return self.condition(idx.reshape(-1), v.expand(idx.shape).reshape(-1), layout=layout)

    def condition_cols(self, block: int, cols: Sequence[int] | torch.Tensor, values: float | torch.Tensor = 0.0,
                       layout: Layout | None = None) -> KronGaussian:
        """Fix whole columns ``cols`` of block ``block`` to ``values`` (a number or ``[r, len(cols)]``)."""
        idx = self._check_block(block)[:, torch.as_tensor(cols, dtype=torch.long).reshape(-1)]
        v = torch.as_tensor(values, dtype=self.dtype, device=self.device)
        return self.condition(idx.reshape(-1), v.expand(idx.shape).reshape(-1), layout=layout)

    def condition_block(self, block: int, values: float | torch.Tensor = 0.0,
                        layout: Layout | None = None) -> KronGaussian:
        """Fix the whole block ``block`` to ``values`` (a number or ``[r, c]``): the block is dropped."""
        idx = self._check_block(block)
        v = torch.as_tensor(values, dtype=self.dtype, device=self.device)
        return self.condition(idx.reshape(-1), v.expand(idx.shape).reshape(-1), layout=layout)

    def _scaled(self, c):
        return KronGaussian(self.loc, self.index, [L * c for L in self.row_tril], self.col_tril, self.rem_scale * c,
                            self.layout, self.meta)

    def _replace(self, **t):
        return KronGaussian._from_tensors(self._tensors() | t, layout=self.layout, meta=self.meta)

    def _tensors(self):
        out = {"loc": self.loc, "rem_scale": self.rem_scale}
        for b, (idx, LA, LB) in enumerate(zip(self.index, self.row_tril, self.col_tril)):
            out |= {f"block{b}.index": idx, f"block{b}.row_tril": LA, f"block{b}.col_tril": LB}
        return out

    @classmethod
    def _from_tensors(cls, tensors, layout=None, meta=None):
        t = dict(tensors)
        n = 0
        while f"block{n}.index" in t:
            n += 1
        try:
            idx = [t.pop(f"block{b}.index") for b in range(n)]
            LA = [t.pop(f"block{b}.row_tril") for b in range(n)]
            LB = [t.pop(f"block{b}.col_tril") for b in range(n)]
            loc, rem = t.pop("loc"), t.pop("rem_scale")
        except KeyError as exc:
            raise ValueError(f"missing tensor {exc} of a Kronecker Gaussian") from None
        if t:
            raise ValueError(f"unexpected tensors {sorted(t)} for a Kronecker Gaussian")
        return cls(loc, idx, LA, LB, rem, layout=layout, meta=meta)


_KRON_PYRO: type | None = None
_LRP_PYRO: type | None = None


def _pyro_wrapper(name: str, what: str) -> type:
    """A Pyro distribution class ``name`` (event shape ``[p]``) around one of this module's structures: draws,
    log densities and entropy go through the structure itself, never a p x p matrix; KLs against it registered.
    Built on first use (this module imports no Pyro); named so that it pickles (module ``__getattr__``)."""
    from pyro.distributions import TorchDistribution

    class _Wrapper(TorchDistribution):
        arg_constraints: dict = {}
        support = constraints.real_vector
        has_rsample = True

        def __init__(self, gaussian: Gaussian, validate_args: bool | None = False):
            self.gaussian = gaussian
            super().__init__(torch.Size(), torch.Size([gaussian.dim]), validate_args=validate_args)

        @property
        def mean(self) -> torch.Tensor:
            return self.gaussian.loc

        @property
        def variance(self) -> torch.Tensor:
            return self.gaussian.variance

        def rsample(self, sample_shape=_EMPTY_SHAPE) -> torch.Tensor:  # noqa: ANN001
            return self.gaussian.rsample(sample_shape)

        def sample(self, sample_shape=_EMPTY_SHAPE) -> torch.Tensor:  # noqa: ANN001
            return self.gaussian.sample(sample_shape)

        def log_prob(self, value: torch.Tensor) -> torch.Tensor:
            return self.gaussian.log_prob(value)

        def entropy(self) -> torch.Tensor:
            return self.gaussian.entropy()

        def __repr__(self) -> str:
            return f"{type(self).__name__}({self.gaussian!r})"

    _Wrapper.__name__ = _Wrapper.__qualname__ = name
    _Wrapper.__module__ = __name__
    _Wrapper.__doc__ = f"A :class:`{what}` as a Pyro distribution (event shape ``[p]``), without a p x p matrix."
    register_kl(_Wrapper, Distribution)(lambda p, q: p.gaussian.kl(q))
    register_kl(Distribution, _Wrapper)(lambda p, q: as_gaussian(p).kl(q.gaussian))
    register_kl(_Wrapper, _Wrapper)(lambda p, q: p.gaussian.kl(q.gaussian))
    return _Wrapper


def _kron_pyro_class() -> type:
    """The Pyro distribution class for :class:`KronGaussian` (``KronMatrixNormal``)."""
    global _KRON_PYRO
    if _KRON_PYRO is None:
        _KRON_PYRO = _pyro_wrapper("KronMatrixNormal", "KronGaussian")
    return _KRON_PYRO


# ============================================================================ low rank in precision form
class LowRankPrecisionGaussian(Gaussian):
    """``N(loc, Lam^{-1})`` with precision ``Lam = diag(d) + F F^T``, ``d = prec_diag > 0``, ``F = prec_factor``
    ``[p, k]``: the low-rank Laplace structure (``F = U lam^{1/2}`` the top-k GGN eigenpairs, ``d`` keeping
    ``diag(Lam)`` exact).

    Its covariance ``D^{-1} - D^{-1} F C^{-1} F^T D^{-1}`` (Woodbury; ``C = I_k + F^T D^{-1} F`` the capacitance,
    ``C >= I`` so its Cholesky factor is well conditioned) is a diagonal MINUS a low-rank term, which
    :class:`LowRankGaussian` cannot hold. Everything goes through ``C``: O(p k^2) time, O(p k) memory, never a
    ``p x p`` matrix unless asked (``covariance()``, ``precision()``, ``to_dense()``). Conditioning and
    marginalizing are exact and stay in this structure; densities need no solve at all (``b^T Lam b``).
    """

    kind = "lowrank_precision"
    arg_constraints = {"loc": constraints.real_vector, "prec_factor": constraints.independent(constraints.real, 2),
                       "prec_diag": constraints.independent(constraints.positive, 1)}

    def __init__(self, loc: torch.Tensor, prec_factor: torch.Tensor, prec_diag: torch.Tensor,
                 layout: Layout | None = None, meta: dict | None = None, validate_args: bool = False):
        super().__init__(loc, layout, meta, validate_args)
        p = loc.shape[-1]
        if prec_factor.dim() != 2 or prec_factor.shape[0] != p:
            raise ValueError(f"prec_factor must be [{p}, k], got {tuple(prec_factor.shape)}")
        if prec_diag.shape != (p,):
            raise ValueError(f"prec_diag must be [{p}], got {tuple(prec_diag.shape)}")
        self.prec_factor = prec_factor
        self.prec_diag = prec_diag
        if _checkable(loc, prec_factor, prec_diag):
            _check_finite(self, "loc", loc, "pass a finite mean (a diverged fit? refit with a smaller lr)")
            _check_finite(self, "prec_factor", prec_factor, "pass a finite factor (e.g. U * lam.clamp_min(0).sqrt())")
            _check_positive(self, "prec_diag", prec_diag, "it holds the diagonal of a precision: clamp it, e.g. "
                            "prec_diag.clamp_min(1e-6 * prior_precision_diagonal)")

    @property
    def rank(self) -> int:
        return self.prec_factor.shape[-1]

    def _repr_extra(self) -> str:
        return f", rank={self.rank}"

    def _capacitance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D^{-1} F, L_C)`` with ``C = I_k + F^T D^{-1} F = L_C L_C^T``."""
        F, d = self.prec_factor, self.prec_diag
        Fd = F / d.unsqueeze(-1)
        C = F.T @ Fd
        C.diagonal().add_(1.0)
        return Fd, torch.linalg.cholesky(C)

    def _cov_factor(self) -> torch.Tensor:
        """``T = D^{-1} F L_C^{-T}`` ``[p, k]``: the covariance is ``D^{-1} - T T^T``."""
        Fd, Lc = self._capacitance()
        return _tri_solve(Lc, Fd.T).T

    @property
    def variance(self) -> torch.Tensor:
        return 1.0 / self.prec_diag - (self._cov_factor() ** 2).sum(-1)

    def precision_diagonal(self) -> torch.Tensor:
        """``diag(Lam) = d + rowsum(F^2)`` in O(p k)."""
        return self.prec_diag + (self.prec_factor**2).sum(-1)

    def covariance(self) -> torch.Tensor:
        T = self._cov_factor()
        return torch.diag(1.0 / self.prec_diag) - T @ T.T

    def precision(self) -> torch.Tensor:
        return self.prec_factor @ self.prec_factor.T + torch.diag(self.prec_diag)

    def _root(self, z: torch.Tensor) -> torch.Tensor:
        """``z A^T`` for rows ``z`` ``[n, p]``, where ``A A^T = Lam^{-1}`` (a square root, p normals per draw).

        With ``B = D^{-1/2} F`` and ``C = I + B^T B = L L^T``:
        ``A = D^{-1/2} (I - B L^{-T} (L + I)^{-1} B^T)``. Proof: put ``H = -(L + I)^{-1}``; then
        ``(I + B L^{-T} H B^T)(...)^T = I + B L^{-T} [H L + L^T H^T + H (L L^T - I) H^T] L^{-1} B^T`` and the
        bracket is ``(I + H L)(I + H L)^T - H H^T - I = -I`` because ``I + H L = (L + I)^{-1} = -H``; so the
        product is ``I - B C^{-1} B^T = (I + B B^T)^{-1}`` and ``A A^T = D^{-1/2} (I + B B^T)^{-1} D^{-1/2} =
        Lam^{-1}``. The symmetric root ``D^{-1/2}(I + V((I + M)^{-1/2} - I) V^T)`` (``V R = B`` thin QR,
        ``M = R R^T``) is another square root of the same matrix (the two differ by an orthogonal factor: same
        distribution); this one needs neither a QR nor an eigendecomposition, whose gradients are NaN at a
        rank-deficient ``F`` (the SVI guide starts at ``F = 0``).
        """
        F, d = self.prec_factor, self.prec_diag
        isd = d.rsqrt()
        B = F * isd.unsqueeze(-1)
        C = B.T @ B
        C.diagonal().add_(1.0)
        L = torch.linalg.cholesky(C)
        Lp = L + torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        u = _tri_solve(Lp, (z @ B).T)  # (L + I)^{-1} B^T z, [k, n]
        w = torch.linalg.solve_triangular(L.mT, u, upper=True)  # L^{-T} (L + I)^{-1} B^T z
        return (z - (B @ w).T) * isd

    def _factor_form(self):
        # the covariance has no "A A^T + diag(e)" form with a thin A (it is diagonal MINUS low rank): this is the
        # dense square root (p x p). The KLs with this structure as the first argument avoid it (_kl_special).
        return self._root(torch.eye(self.dim, dtype=self.dtype, device=self.device)).T, None

    def logdet(self) -> torch.Tensor:
        _, Lc = self._capacitance()
        return -(self.prec_diag.log().sum() + 2 * Lc.diagonal().log().sum())

    def _quad(self, b):
        return (self.prec_diag.unsqueeze(-1) * b**2).sum(0) + ((self.prec_factor.T @ b) ** 2).sum(0)

    def _trace_inv(self, A, e):
        # tr(Lam (A A^T + diag(e))) = sum d A^2 + ||F^T A||^2 + e . diag(Lam)
        out = torch.zeros((), dtype=self.dtype, device=self.device)
        if A is not None:
            out = out + (self.prec_diag.unsqueeze(-1) * A**2).sum() + ((self.prec_factor.T @ A) ** 2).sum()
        if e is not None:
            out = out + (e * self.precision_diagonal()).sum()
        return out

    def _draw(self, n, generator):
        return self.loc + self._root(self._eps(n, self.dim, generator=generator))

    def _kl_special(self, other):
        if isinstance(other, DiagGaussian):  # the generic path needs only this structure's variances
            return None
        # tr(S_o^{-1} S) with S = D^{-1} - T T^T: two trace terms of the other structure, O(p k^2) for the
        # diagonal, low-rank and precision-form structures (dense and Kronecker: their own cost)
        T = self._cov_factor()
        tr = other._trace_inv(None, 1.0 / self.prec_diag) - other._trace_inv(T, None)
        diff = (other.loc - self.loc).unsqueeze(-1)
        maha = other._quad(diff).sum()
        return 0.5 * (tr + maha - self.dim + other.logdet() - self.logdet())

    def marginalize(self, keep):
        """``N(m_K, (Lam/Lam_JJ)^{-1})`` over ``keep``; the Schur complement stays diagonal plus rank k:
        ``Lam_KK - F_K F_J^T (D_J + F_J F_J^T)^{-1} F_J F_K^T = D_K + F_K (I + G_J)^{-1} F_K^T`` with
        ``G_J = F_J^T D_J^{-1} F_J`` (Woodbury: ``F_J^T (D_J + F_J F_J^T)^{-1} F_J = G_J (I + G_J)^{-1}``), so the
        new factor is ``F_K L^{-T}`` with ``L L^T = I + G_J``."""
        K = _as_index(keep, self.dim)
        J = _complement(K, self.dim).to(self.device)
        K = K.to(self.device)
        F, d = self.prec_factor, self.prec_diag
        FK = F.index_select(0, K)
        if J.numel():
            FJ = F.index_select(0, J) * d[J].rsqrt().unsqueeze(-1)
            C = FJ.T @ FJ
            C.diagonal().add_(1.0)
            Lc = cholesky_jitter(C, "capacitance of the marginalized coordinates")
            FK = _tri_solve(Lc, FK.T).T
        return LowRankPrecisionGaussian(self.loc[K], FK, d[K])

    def _condition(self, I, K, v):
        # Conditional precision Lam_KK = D_K + F_K F_K^T (exact, same structure); conditional mean
        # m_K - Lam_KK^{-1} Lam_KI (v - m_I) with Lam_KI = F_K F_I^T and, by push-through,
        # Lam_KK^{-1} F_K = D_K^{-1} F_K C_K^{-1}, C_K = I + F_K^T D_K^{-1} F_K.
        F, d = self.prec_factor, self.prec_diag
        FK, dK = F.index_select(0, K), d[K]
        r = F.index_select(0, I).T @ (v - self.loc[I])
        FdK = FK / dK.unsqueeze(-1)
        C = FK.T @ FdK
        C.diagonal().add_(1.0)
        Lc = cholesky_jitter(C, "capacitance of the kept coordinates")
        s = torch.cholesky_solve(r.unsqueeze(-1), Lc).squeeze(-1)
        return LowRankPrecisionGaussian(self.loc[K] - FdK @ s, FK, dK)

    def _scaled(self, c):
        # covariance times c^2 = precision over c^2
        return LowRankPrecisionGaussian(self.loc, self.prec_factor / c, self.prec_diag / c**2, self.layout, self.meta)

    def _replace(self, **t):
        d = self._tensors() | t
        return LowRankPrecisionGaussian(**d, layout=self.layout, meta=self.meta)

    def _tensors(self):
        return {"loc": self.loc, "prec_factor": self.prec_factor, "prec_diag": self.prec_diag}

    # ----------------------------------------------------------------- conversions
    def to_dense(self) -> DenseGaussian:
        """The same Gaussian as a :class:`DenseGaussian` (Cholesky of the p x p precision, then its inverse)."""
        Lp = cholesky_jitter(0.5 * (self.precision() + self.precision().T), "precision")
        return DenseGaussian.from_covariance(self.loc, torch.cholesky_inverse(Lp), layout=self.layout,
                                             meta=self.meta)

    def to_lowrank(self, k: int, iters: int = 8, oversample: int = 10, seed: int = 0) -> LowRankGaussian:
        """A covariance-form :class:`LowRankGaussian`: the top-``k`` eigenpairs of the covariance as ``W``, plus a
        diagonal that keeps the exact variance (``S - W W^T`` is PSD, so it is >= 0; clamped for round-off).

        Exact eigenpairs for ``p <= 2048`` (dense ``eigh``); above, randomized subspace iteration (``iters``
        steps, ``k + oversample`` columns, covariance products by Woodbury) -- approximate.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"rank k must be a positive integer, got {k!r}")
        p = self.dim
        k = min(k, p)
        if p <= 2048:
            vals, vecs = torch.linalg.eigh(self.covariance())
            vals, vecs = vals[-k:], vecs[:, -k:]
        else:
            T = self._cov_factor()
            d = self.prec_diag

            def S(X: torch.Tensor) -> torch.Tensor:
                return X / d.unsqueeze(-1) - T @ (T.T @ X)

            g = torch.Generator(device=self.device).manual_seed(seed)
            Q = torch.randn(p, min(p, k + oversample), generator=g, dtype=self.dtype, device=self.device)
            for _ in range(iters):
                Q = torch.linalg.qr(S(Q)).Q
            vals, U = torch.linalg.eigh(Q.T @ S(Q))
            vals, vecs = vals[-k:], Q @ U[:, -k:]
        W = vecs * vals.clamp_min(0).sqrt()
        var = self.variance
        e = torch.maximum(var - (W**2).sum(-1), var * torch.finfo(self.dtype).eps)
        return LowRankGaussian(self.loc, W, e, layout=self.layout, meta=self.meta)

    def to_pyro(self):
        """A Pyro distribution (``pyro_distill.gaussian.LowRankPrecisionNormal``) that samples and scores through
        this structure, without a p x p matrix."""
        return _lrp_pyro_class()(self)

    @classmethod
    def guide_params(cls, start, rank=20, seed=0):
        """``prec_factor`` and ``log_prec_diag``; another structure starts from its variances ``v`` as precision
        ``diag(1 / v)`` with a zero ``[p, rank]`` factor (a valid start in precision form; correlations dropped)."""
        if not isinstance(start, LowRankPrecisionGaussian):
            F = torch.zeros(start.dim, rank, dtype=start.dtype, device=start.device)
            start = LowRankPrecisionGaussian(start.loc, F, 1.0 / start.variance)
        return {"prec_factor": start.prec_factor.detach().clone(),
                "log_prec_diag": start.prec_diag.detach().log().clone()}

    @classmethod
    def from_guide_params(cls, loc, params, layout=None):
        return cls(loc, params["prec_factor"], params["log_prec_diag"].exp(), layout=layout)

    @classmethod
    def start_around(cls, loc, sd, rank=20, seed=0, blocks=None, layout=None):
        F = torch.zeros(loc.shape[-1], rank, dtype=loc.dtype, device=loc.device)  # a valid start in precision form
        return cls(loc, F, 1.0 / sd**2, layout=layout)


# ============================================================================ point mass
def _no_density(what: str, why: str = "") -> TypeError:
    return TypeError(f"PointMass has no {what}: a point estimate is not a density"
                     + (f" ({why})" if why else "; evaluate the network at .mean, or fit a Gaussian (fit_posterior) "
                        "where a density is needed"))


class PointMass(Gaussian):
    """A point estimate ``w = loc`` as a member of the family: the Gaussian with zero covariance.

    Mean, ``variance`` / ``covariance`` zero, draws that all equal the point (no random numbers are consumed),
    conditioning and marginalizing = indexing (the fixed coordinates are dropped), ``tempered`` = itself,
    ``save``/``load``, ``to_pyro`` = Pyro's ``Delta``. It has no density: ``log_prob``, ``entropy``, ``kl`` and
    ``precision`` raise a ``TypeError`` that says so. What point fits (MAP, the point baselines) hand to their
    callbacks, and what predictives and metrics treat as the network's own prediction.
    """

    kind = "point"
    has_rsample = True

    def __init__(self, loc: torch.Tensor, layout: Layout | None = None, meta: dict | None = None,
                 validate_args: bool = False):
        super().__init__(loc, layout, meta, validate_args)
        if _checkable(loc):
            _check_finite(self, "loc", loc, "pass finite weights (a diverged fit? refit with a smaller lr)")

    @property
    def variance(self) -> torch.Tensor:
        return torch.zeros_like(self.loc)

    def covariance(self) -> torch.Tensor:
        return torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)

    def _factor_form(self):
        return None, self.variance

    def logdet(self) -> torch.Tensor:
        raise _no_density("log determinant", "its covariance is zero, so log det is -inf")

    def _quad(self, b):
        raise _no_density("Mahalanobis distance", "its covariance is zero and has no inverse")

    def _trace_inv(self, A, e):
        raise _no_density("inverse covariance", "its covariance is zero")

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Undefined: raises (a point mass has no density with respect to Lebesgue measure)."""
        raise _no_density("log_prob")

    def entropy(self) -> torch.Tensor:
        raise _no_density("entropy", "the differential entropy of a point mass is -inf")

    def precision(self) -> torch.Tensor:
        raise _no_density("precision matrix", "its covariance is zero and has no inverse")

    def _draw(self, n, generator):
        return self.loc.expand(n, self.dim)

    def sample(self, sample_shape: int | Sequence[int] | torch.Size = _EMPTY_SHAPE,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The point repeated ``[*sample_shape, p]`` (a new tensor; ``generator`` is not used)."""
        shape = _as_sample_shape(sample_shape)
        return self.loc.detach().expand(*shape, self.dim).clone()

    def marginalize(self, keep):
        K = _as_index(keep, self.dim).to(self.device)
        return PointMass(self.loc[K])

    def _condition(self, I, K, v):
        return PointMass(self.loc[K])

    def _scaled(self, c):
        return PointMass(self.loc, self.layout, self.meta)

    def _replace(self, **t):
        d = self._tensors() | t
        return PointMass(**d, layout=self.layout, meta=self.meta)

    def _tensors(self):
        return {"loc": self.loc}

    def to_pyro(self):
        """Pyro's ``Delta`` at the point (event shape ``[p]``)."""
        import pyro.distributions as dist

        return dist.Delta(self.loc, event_dim=1)


def _lrp_pyro_class() -> type:
    """The Pyro distribution class for :class:`LowRankPrecisionGaussian` (``LowRankPrecisionNormal``)."""
    global _LRP_PYRO
    if _LRP_PYRO is None:
        _LRP_PYRO = _pyro_wrapper("LowRankPrecisionNormal", "LowRankPrecisionGaussian")
    return _LRP_PYRO


def __getattr__(name: str) -> Any:
    if name == "KronMatrixNormal":  # importable (and picklable) once Pyro is wanted
        return _kron_pyro_class()
    if name == "LowRankPrecisionNormal":
        return _lrp_pyro_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: a save's temporary file: ``.<name>.pd-<pid>-<random>.tmp`` (pid: the writer, so a live writer's file is kept)
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.pd-(?P<pid>\d+)-[^/]*\.tmp$")
#: the temporaries of saves before the pid was recorded: ``.<name>.<8 random chars>.tmp``
_LEGACY_TMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a writer of a temporary file, a run's driver)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _clean_stale_tmp(path: Path) -> None:
    """Remove temporaries of killed saves in ``path``'s folder: those whose writer process is gone, and the
    pre-pid kind for this file name (no live writer makes those any more)."""
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for e in entries:
        if not e.name.endswith(".tmp") or not e.is_file(follow_symlinks=False):
            continue
        m = _TMP_RE.match(e.name)
        stale = (not pid_alive(int(m["pid"]))) if m else bool(
            (lm := _LEGACY_TMP_RE.match(e.name)) and lm["name"] == path.name)
        if stale:
            try:
                os.unlink(e.path)
            except OSError:
                pass


def plain_json(obj: Any, key: str = "meta") -> Any:
    """``obj`` as plain JSON types (what ``torch.load(weights_only=True)`` and ``json`` read back), or a ValueError
    naming the key: numpy scalars and 0-d tensors -> Python numbers, arrays and tensors -> lists, paths and torch
    dtypes -> str, tuples and sets -> lists. Non-finite floats stay. One converter for Gaussian metadata and
    model cards (``store`` uses it)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"cannot save {key}: key {k!r} is a {type(k).__name__}; {key} keys must be str")
            out[k] = plain_json(v, f"{key}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain_json(v, f"{key}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    mod = type(obj).__module__
    if isinstance(obj, torch.Tensor) or mod == "numpy":
        if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
            return plain_json(obj.item(), key)
        if hasattr(obj, "tolist"):
            return plain_json(obj.tolist(), key)
    raise ValueError(
        f"cannot save {key}: a {type(obj).__name__} is not plain data (not a JSON value); store it as str, int, "
        "float, bool, None, or lists/dicts of them (e.g. str(x) or x.tolist())"
    )


#: the Gaussian structures a guide (and a Laplace start) can have, by their one name (``Gaussian.kind``)
STRUCTURES: dict[str, type[Gaussian]] = {c.kind: c for c in (DenseGaussian, LowRankGaussian, DiagGaussian,
                                                                 KronGaussian, LowRankPrecisionGaussian)}
#: other names accepted where a structure is named (configs and saved runs use "mvn" for the dense one)
STRUCTURE_ALIASES: dict[str, str] = {"mvn": "dense"}
#: what ``load`` reads: the structures and the point mass
_KINDS: dict[str, type[Gaussian]] = STRUCTURES | {PointMass.kind: PointMass}


def structure_name(name: str, what: str = "structure") -> str:
    """The canonical name of a Gaussian structure (``"mvn"`` -> ``"dense"``), or a ValueError listing them."""
    name = STRUCTURE_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in STRUCTURES:
        raise ValueError(f"unknown {what} {name!r}; choose one of {tuple(STRUCTURES)} ('mvn' = 'dense', the full "
                         "covariance)")
    return name


def structure(name: str) -> type[Gaussian]:
    """The Gaussian class of a structure name (aliases accepted)."""
    return STRUCTURES[structure_name(name)]


def _with_layout(g: Gaussian, layout: Layout | None) -> Gaussian:
    if layout is None or g.layout == layout:
        return g
    if g.layout is not None:
        raise ValueError(f"the Gaussian's layout {g.layout} differs from the expected {layout}; "
                         "it belongs to another architecture")
    if layout.size != g.dim:
        raise ValueError(f"layout has p={layout.size} coordinates but the Gaussian has {g.dim}")
    out = g._replace()
    out.layout = layout
    return out


def as_gaussian(x: Any, p: int | None = None, layout: Layout | None = None) -> Gaussian:
    """A prior or posterior given as one of our Gaussians or a torch/Pyro distribution, as our structure.

    ``p`` (when given) is the dimension the caller needs; ``layout`` is attached when the Gaussian has none.
    Raises TypeError for anything else, naming what is accepted.
    """
    if not isinstance(x, (Gaussian, Distribution)):
        raise TypeError(
            f"expected a Gaussian prior/posterior, got {type(x).__name__}; pass a pyro_distill Gaussian "
            "(DenseGaussian, LowRankGaussian, DiagGaussian, KronGaussian, PointMass) or a torch/Pyro "
            "MultivariateNormal, LowRankMultivariateNormal or Normal(loc, scale).to_event(1)"
        )
    g = Gaussian.from_distribution(x, layout=None)
    if p is not None and g.dim != p:
        raise ValueError(f"the Gaussian has {g.dim} coordinates but {p} are needed (it belongs to another "
                         "architecture)")
    return _with_layout(g, layout)


# torch.distributions.kl_divergence between our structures, and between ours and torch's Gaussians
@register_kl(Gaussian, Gaussian)
def _kl_gaussian_gaussian(p: Gaussian, q: Gaussian) -> torch.Tensor:
    return p.kl(q)


def _register_torch_kl(torch_type: type) -> None:
    @register_kl(Gaussian, torch_type)
    def _ours_torch(p, q):  # noqa: ANN001, ANN202
        return p.kl(Gaussian.from_distribution(q))

    @register_kl(torch_type, Gaussian)
    def _torch_ours(p, q):  # noqa: ANN001, ANN202
        return Gaussian.from_distribution(p).kl(q)


for _t in (MultivariateNormal, LowRankMultivariateNormal, Independent):
    _register_torch_kl(_t)


def load(path: str | os.PathLike, layout: Layout | None = None, map_location: str = "cpu") -> Gaussian:
    """Read a Gaussian written by :meth:`Gaussian.save`.

    When ``layout`` is given, the saved layout must equal it (a posterior of another architecture is
    refused with both layouts in the message).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved Gaussian at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise ValueError(f"{path} is not a readable pyro-distill Gaussian file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != "pyro-distill-gaussian":
        raise ValueError(f"{path} is not a pyro-distill Gaussian file")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer format version {payload['version']}; upgrade pyro-distill")
    kind = payload.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown Gaussian kind {kind!r}")
    saved_layout = Layout.from_dict(payload["layout"]) if payload.get("layout") is not None else None
    if layout is not None and saved_layout is not None and saved_layout != layout:
        raise ValueError(
            f"{path} holds a posterior of another architecture:\n  saved:    {saved_layout}\n  expected: {layout}"
        )
    tensors = payload.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path}: the file holds no tensors of a {kind} Gaussian (corrupt file); save it again")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{path}: tensor {name!r} of the saved {kind} Gaussian holds NaN/inf (a diverged fit was saved); "
                "refit the posterior (e.g. with a smaller lr) and save it again"
            )
    try:
        return _KINDS[kind]._from_tensors(tensors, layout=saved_layout or layout, meta=payload.get("meta") or {})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: inconsistent tensors for a {kind} Gaussian: {exc}") from exc
