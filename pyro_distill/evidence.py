"""Marginal likelihood (evidence) for choosing a Gaussian prior: Laplace / quadratic-model evidence.

The log-likelihood is replaced by its second-order (GGN) model around a point ``m0`` (a MAP estimate)::

    log p(y | X, w) ~= l0 + g^T d - 1/2 d^T G d,     d = w - m0,

with ``l0`` and ``g`` the log-likelihood and its gradient at ``m0`` and ``G`` the GGN (in one of the structures
of :mod:`pyro_distill.curvature`: dense, diagonal, Kronecker (KFAC) or top-k low-rank). Under a Gaussian prior
``N(mu, S0)`` the evidence of that model is a closed-form Gaussian integral; with ``a = mu - m0`` and
``h = g - G a``::

    log Z = l0 + g^T a - 1/2 a^T G a + 1/2 h^T (G + S0^{-1})^{-1} h - 1/2 log det(I + S0 G).

For a model linear in ``w`` with a Gaussian likelihood (Bayesian linear regression) the model is exact and so is
``log Z``, at any ``m0``; for a network it is the Laplace evidence (MacKay 1992; Immer et al. 2021) with the
``h`` term accounting for ``m0`` not being the MAP of the prior being scored. (At that MAP it reduces to the
usual ``log p(y | m) + log p0(m) - log q(m)`` of the Laplace Gaussian ``q``, which :func:`laplace_evidence`
computes for any fitted Gaussian.)

* :func:`quadratic_model` -- ``(l0, g, G)`` at a point, in a chosen structure;
* :func:`log_evidence` -- ``log Z`` for a prior (differentiable in the prior's tensors);
* :func:`optimize_prior` -- per-layer (or global) isotropic prior precisions that maximize ``log Z`` (MacKay);
* :func:`optimize_temperature` -- the temperature ``tau`` of a given Gaussian prior ``N(mu, tau S)`` (e.g. a
  teacher-derived prior) that maximizes ``log Z``, from one eigendecomposition of the prior-whitened GGN, after
  which every ``tau`` costs O(p);
* :func:`tune_posterior_scale` -- the global prior precision ``alpha`` (``Lam = G + alpha P0``) and/or the
  posterior temperature ``T`` (covariance x ``T``) of a Laplace Gaussian chosen by the negative log-likelihood of
  its predictive on held-out TUNING data (grid over ``log alpha`` / ``log T``, golden-section refinement; the
  ``method="gridsearch"`` of laplace-torch's ``optimize_prior_precision``). The evidence assumes the GGN model and
  the prior are right; when the structure or the prior is off (the transformer's Laplace is under-confident under
  the fan-in prior in every structure, and evidence-tuned precisions did not help), the held-out likelihood is
  the criterion that measures what the predictive is used for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .gaussian import STRUCTURE_ALIASES, DenseGaussian, DiagGaussian, Gaussian, LowRankGaussian
from .nets.base import BayesianNet

__all__ = ["QuadraticModel", "quadratic_model", "log_evidence", "laplace_evidence", "optimize_prior",
           "optimize_temperature", "tune_posterior_scale", "STRUCTURES", "SCALE_PARAMS"]

STRUCTURES = ("dense", "diag", "kron", "lowrank")


@dataclass
class QuadraticModel:
    """``log p(y | X, m0 + d) ~= l0 + g^T d - 1/2 d^T G d`` with ``G`` in one structure.

    ``dense``: ``G`` ``[p, p]``; ``diag``: ``G`` ``[p]``; ``lowrank``: ``(values [k], vectors [p, k])``;
    ``kron``: a list of ``(flat indices [r, c], B [r, r], A [c, c])`` blocks with ``G_block = B ⊗ A`` over the
    row-major vec of the ``r x c`` matrix, plus ``remainder`` (indices, diagonal) for coordinates outside them.
    """

    m0: torch.Tensor
    l0: torch.Tensor
    grad: torch.Tensor
    kind: str
    G: Any
    remainder: tuple[torch.Tensor, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.m0.shape[-1]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` for ``v`` ``[p]``."""
        if self.kind == "dense":
            return self.G @ v
        if self.kind == "diag":
            return self.G * v
        if self.kind == "lowrank":
            lam, U = self.G
            return U @ (lam * (U.T @ v))
        out = torch.zeros_like(v)
        for idx, B, A in self.G:
            out[idx.reshape(-1)] = (B @ v[idx] @ A.T).reshape(-1)
        if self.remainder is not None:
            ri, rd = self.remainder
            out[ri] = rd * v[ri]
        return out


def quadratic_model(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, structure: str = "diag",
                    rank: int = 50, noise_scale: float | None = None, seed: int = 0) -> QuadraticModel:
    """The log-likelihood's value, gradient and GGN at ``w`` on ``(X, y)``, the GGN in ``structure``."""
    from .curvature import GGN, kfac, kfac_indices

    structure = STRUCTURE_ALIASES.get(structure, structure)  # "mvn" = "dense"
    if structure not in STRUCTURES:
        raise ValueError(f"unknown curvature structure {structure!r}; choose one of {STRUCTURES}")
    w = w.detach()
    l0, g = net.log_likelihood_and_grad(w, X, y, noise_scale)
    op = GGN(net, w, X, y, noise_scale=noise_scale)
    if structure == "dense":
        G: Any = op.dense()
    elif structure == "diag":
        G = op.diagonal()
    elif structure == "lowrank":
        G = op.eigh_topk(min(rank, net.num_params), seed=seed)
        G = (G[0].clamp_min(0), G[1])
    else:
        factors = kfac(net, w, X, y, noise_scale=noise_scale)
        G = []
        covered = torch.zeros(net.num_params, dtype=torch.bool)
        for name, (A, B) in factors.items():
            idx = kfac_indices(net, name).reshape(B.shape[0], A.shape[0])
            G.append((idx.to(w.device), B, A))
            covered[idx.reshape(-1)] = True
        rest = (~covered).nonzero().reshape(-1)
        remainder = None
        if rest.numel():
            remainder = (rest.to(w.device), op.diagonal()[rest.to(w.device)])
        return QuadraticModel(w, l0, g, "kron", G, remainder)
    return QuadraticModel(w, l0, g, structure, G)


def _prior_diag(prior: Gaussian) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(prior, DiagGaussian):
        raise TypeError("this structure scores diagonal priors only; use optimize_temperature for a correlated one")
    return prior.loc, prior.variance


def log_evidence(quad: QuadraticModel, prior: Gaussian, mode: str = "quadratic") -> torch.Tensor:
    """``log Z`` of the quadratic model under ``prior`` (see the module docstring).

    ``mode="quadratic"``: the exact evidence of the quadratic model, which moves the expansion point to the
    scored prior's MAP by one Newton step under ``G`` (exact for a linear-Gaussian model; with a diagonal or
    Kronecker ``G`` of a network that step can be far off). ``mode="laplace"``: MacKay's evidence with ``m0``
    taken as the MAP of every prior scored (laplace-torch's convention),
    ``l0 - 1/2 (m0 - mu)^T S0^{-1} (m0 - mu) - 1/2 log det(I + S0 G)``; both agree when ``m0`` is the MAP.

    Any prior structure with a dense ``G`` (the prior is made dense: p up to a few thousand); a diagonal prior
    with every ``G`` structure (a Kronecker ``G`` needs the prior variance constant on each Kronecker block,
    as the fan-in prior is). Differentiable in the prior's tensors.
    """
    if prior.dim != quad.dim:
        raise ValueError(f"prior has {prior.dim} coordinates, the model p={quad.dim}")
    if mode not in ("quadratic", "laplace"):
        raise ValueError(f"unknown evidence mode {mode!r}; choose 'quadratic' or 'laplace'")
    m0, g = quad.m0.to(prior.loc), quad.grad.to(prior.loc)
    a = prior.loc - m0
    if mode == "laplace":  # drop the Newton step: h = 0, const = l0 - 1/2 a^T S0^{-1} a
        h = torch.zeros_like(a)
        const = quad.l0.to(prior.loc) - 0.5 * prior.mahalanobis(m0)
    else:
        Ga = quad.matvec(a)
        h = g - Ga
        const = quad.l0.to(prior.loc) + g @ a - 0.5 * (a @ Ga)
    if quad.kind == "dense":
        P0 = prior.precision()
        M = quad.G.to(P0) + P0
        LM = torch.linalg.cholesky(0.5 * (M + M.T))
        quad_term = (torch.linalg.solve_triangular(LM, h.unsqueeze(-1), upper=False) ** 2).sum()
        logdet = 2 * LM.diagonal().log().sum() + prior.logdet()  # det(I + S0 G) = det(S0) det(G + S0^{-1})
        return const + 0.5 * quad_term - 0.5 * logdet
    mu, v = _prior_diag(prior)
    if quad.kind == "diag":
        Gd = quad.G.to(v)
        return const + 0.5 * (h**2 / (Gd + 1 / v)).sum() - 0.5 * torch.log1p(v * Gd).sum()
    if quad.kind == "lowrank":
        lam, U = (t.to(v) for t in quad.G)
        sl = lam.sqrt()
        K = sl.unsqueeze(-1) * (U.T * v) @ U * sl  # lam^1/2 U^T V U lam^1/2
        K.diagonal().add_(1.0)
        LK = torch.linalg.cholesky(K)
        r = torch.linalg.solve_triangular(LK, (sl * (U.T @ (v * h))).unsqueeze(-1), upper=False)
        quad_term = (v * h * h).sum() - (r**2).sum()
        return const + 0.5 * quad_term - LK.diagonal().log().sum()
    total = const
    for idx, B, A in quad.G:
        vb = v[idx]
        if bool((vb != vb.reshape(-1)[0]).any()):
            raise ValueError("a Kronecker curvature needs the prior variance constant on each layer block")
        vt = vb.reshape(-1)[0]
        gb, Qb = torch.linalg.eigh(B.to(v))
        ga, Qa = torch.linalg.eigh(A.to(v))
        lam = (gb.clamp_min(0).unsqueeze(-1) * ga.clamp_min(0))
        Ht = Qb.T @ h[idx] @ Qa
        total = total + 0.5 * (Ht**2 / (lam + 1 / vt)).sum() - 0.5 * torch.log1p(vt * lam).sum()
    if quad.remainder is not None:
        ri, rd = quad.remainder
        rd = rd.to(v)
        total = total + 0.5 * (h[ri] ** 2 / (rd + 1 / v[ri])).sum() - 0.5 * torch.log1p(v[ri] * rd).sum()
    return total


def laplace_evidence(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, q: Gaussian, prior: Gaussian,
                     noise_scale: float | None = None) -> float:
    """``log p(y | X, m) + log p0(m) - log q(m)`` at the mean ``m`` of a Laplace Gaussian ``q`` (any structure):
    the Laplace evidence when ``q`` has precision ``GGN + prior precision`` at the MAP ``m``."""
    m = q.mean.detach()
    with torch.no_grad():
        ll = net.log_likelihood(m, X, y, noise_scale).sum()
        return float(ll + prior.log_prob(m.to(prior.loc)) - q.log_prob(m))


def _groups(net: BayesianNet, per_layer: bool) -> list[torch.Tensor]:
    """Flat index groups sharing one prior precision: one per layer (weight and bias of a layer together,
    as the fan-in prior scales them) or one for everything."""
    if not per_layer:
        return [torch.arange(net.num_params)]
    groups: dict[str, list[torch.Tensor]] = {}
    for b in net.layout:
        groups.setdefault(b.name.rsplit(".", 1)[0], []).append(net.layout.indices(b.name))
    return [torch.cat(v) for v in groups.values()]


def optimize_prior(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, w_map: torch.Tensor,
                   prior: DiagGaussian | None = None, structure: str = "diag", per_layer: bool = True,
                   quad: QuadraticModel | None = None, steps: int = 200, lr: float = 0.1,
                   noise_scale: float | None = None, mode: str = "laplace") -> tuple[DiagGaussian, dict[str, Any]]:
    """Isotropic zero-mean prior precisions (one per layer with ``per_layer``, else one) maximizing
    :func:`log_evidence` at ``w_map`` (Adam on the log precisions, from ``prior``'s (default: the network's fan-in
    prior) mean precision per group). ``mode``: ``"laplace"`` (MacKay, the default: ``w_map`` stands for the MAP of
    every candidate prior) or ``"quadratic"`` (exact for linear-Gaussian models). Returns the tuned
    :class:`DiagGaussian` and ``{"log_evidence_start", "log_evidence", "precisions"}``."""
    quad = quad if quad is not None else quadratic_model(net, w_map, X, y, structure, noise_scale=noise_scale)
    dtype = w_map.dtype
    prior = prior if prior is not None else net.default_prior(dtype, w_map.device)
    groups = [g.to(w_map.device) for g in _groups(net, per_layer)]
    start = torch.stack([(1 / prior.variance[g]).mean() for g in groups]).log().to(torch.float64)
    log_alpha = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([log_alpha], lr=lr)

    def build(la: torch.Tensor) -> DiagGaussian:
        var = torch.empty(net.num_params, dtype=torch.float64, device=w_map.device)
        for gi, g in enumerate(groups):
            var = var.index_put((g,), torch.exp(-la[gi]).expand(g.numel()))
        return DiagGaussian(torch.zeros_like(var), var.sqrt(), layout=net.layout, meta={"source": "evidence"})

    qd = _to_double(quad)
    with torch.no_grad():
        ev0 = float(log_evidence(qd, build(start), mode))
    for _ in range(steps):
        opt.zero_grad()
        loss = -log_evidence(qd, build(log_alpha), mode)
        loss.backward()
        opt.step()
    with torch.no_grad():
        best = build(log_alpha.detach())
        ev = float(log_evidence(qd, best, mode))
    tuned = DiagGaussian(best.loc.to(dtype), best.scale.to(dtype), layout=net.layout,
                         meta={"source": "evidence-tuned prior"})
    return tuned, {"log_evidence_start": ev0, "log_evidence": ev,
                   "precisions": [float(x) for x in log_alpha.detach().exp()]}


def _to_double(quad: QuadraticModel) -> QuadraticModel:
    def d(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.double() if t.is_floating_point() else t
        if isinstance(t, (tuple, list)):
            return type(t)(d(x) for x in t)
        return t

    return QuadraticModel(d(quad.m0), d(quad.l0), d(quad.grad), quad.kind, d(quad.G), d(quad.remainder),
                          dict(quad.info))


def _whitened_spectrum(quad: QuadraticModel, prior: Gaussian) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu, beta, const)``: eigenvalues ``mu`` of ``L^T G L`` (``S = L L^T`` the prior covariance at tau = 1),
    ``beta = V^T L^T h`` and the tau-free part of ``log Z``."""
    q = _to_double(quad)
    p = prior.to(dtype=torch.float64)
    a = p.loc - q.m0
    Ga = q.matvec(a)
    h = q.grad - Ga
    const = q.l0 + q.grad @ a - 0.5 * (a @ Ga)
    if q.kind == "diag" and isinstance(p, DiagGaussian):
        return p.variance * q.G, p.scale * h, const
    if isinstance(p, DiagGaussian):
        L = torch.diag(p.scale)
    elif isinstance(p, DenseGaussian):
        L = p.scale_tril
    elif isinstance(p, LowRankGaussian):
        L = torch.linalg.cholesky(p.covariance())
    else:
        L = torch.linalg.cholesky(p.covariance())
    if q.kind == "dense":
        GL = q.G @ L
    else:
        GL = torch.stack([q.matvec(L[:, j]) for j in range(L.shape[1])], 1)
    M = L.T @ GL
    mu, V = torch.linalg.eigh(0.5 * (M + M.T))
    return mu.clamp_min(0), V.T @ (L.T @ h), const


def optimize_temperature(quad: QuadraticModel, prior: Gaussian, bounds: tuple[float, float] = (1e-3, 1e3),
                         grid: int = 401) -> tuple[float, dict[str, Any]]:
    """The temperature ``tau`` of ``N(mu, tau S)`` (``prior`` = ``N(mu, S)``) maximizing :func:`log_evidence`::

        log Z(tau) = const + 1/2 sum_i beta_i^2 / (mu_i + 1/tau) - 1/2 sum_i log(1 + tau mu_i)

    with ``mu_i`` the eigenvalues of the prior-whitened GGN ``L^T G L`` and ``beta = V^T L^T h``: one
    eigendecomposition (O(p^3) for a correlated prior; O(p) for a diagonal prior with a diagonal ``G``), then a
    log-spaced grid over ``bounds`` refined by golden-section search. Returns ``tau`` and
    ``{"log_evidence", "tau_grid", "log_evidence_grid", "at_bound"}``.
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"temperature bounds must satisfy 0 < lo < hi, got {bounds}")
    mu, beta, const = _whitened_spectrum(quad, prior)
    b2 = beta**2

    def f(log_tau: float) -> float:
        t = math.exp(log_tau)
        return float(const + 0.5 * (b2 / (mu + 1 / t)).sum() - 0.5 * torch.log1p(t * mu).sum())

    best, xs, vals, i = _grid_golden(f, math.log(lo), math.log(hi), grid, 60, maximize=True)
    tau = math.exp(best[1])
    return tau, {"log_evidence": best[0], "tau_grid": [math.exp(v) for v in xs], "log_evidence_grid": vals,
                 "at_bound": i in (0, grid - 1)}


def _grid_golden(f: Callable[[float], float], lo: float, hi: float, grid: int, iters: int, maximize: bool
                 ) -> tuple[tuple[float, float], list[float], list[float], int]:
    """Optimize ``f`` on ``[lo, hi]``: ``grid`` equally spaced points, then ``iters`` golden-section steps on the
    bracket around the best grid point. Returns ``((f*, x*), grid xs, grid values, index of the best grid
    point)``; ``x*`` is the grid point itself unless the refinement improved on it (``iters = 0``: the grid's)."""
    sgn = 1.0 if maximize else -1.0

    def g(x: float) -> float:
        return sgn * f(x)

    xs = torch.linspace(lo, hi, grid, dtype=torch.float64).tolist()
    vals = [g(x) for x in xs]
    i = max(range(grid), key=vals.__getitem__)
    best = (vals[i], xs[i])
    if iters > 0 and grid > 1:
        a, b = xs[max(i - 1, 0)], xs[min(i + 1, grid - 1)]
        gr = (math.sqrt(5) - 1) / 2
        c, d = b - gr * (b - a), a + gr * (b - a)
        fc, fd = g(c), g(d)
        for _ in range(iters):
            if fc > fd:
                b, d, fd = d, c, fc
                c = b - gr * (b - a)
                fc = g(c)
            else:
                a, c, fc = c, d, fd
                d = a + gr * (b - a)
                fd = g(d)
        x = 0.5 * (a + b)
        best = max((g(x), x), best)
    return (sgn * best[0], best[1]), xs, [sgn * v for v in vals], i


# ============================================================================ held-out choice of the posterior scale
#: what :func:`tune_posterior_scale` tunes: the posterior temperature, the global prior precision, or both
SCALE_PARAMS = ("temperature", "prior_precision", "both")


class _HeldOut:
    """The held-out NLL of a Gaussian's predictive as a function of its temperature ``T``, from ONE set of draws.

    ``delta_s = w_s - m`` are drawn once from ``q`` (seeded); the temperature-``T`` Gaussian ``q.tempered(T)``
    then has the draws ``m + sqrt(T) delta_s`` (common random numbers across ``T``). ``"linearized"``: the outputs
    ``f(x, m) + sqrt(T) J(x) delta_s`` from one pass of Jacobian-vector products, so every ``T`` costs only the
    likelihood; ``"mc"``: the network at ``m + sqrt(T) delta_s``, one forward pass per ``T``.
    Categorical: ``-mean_n log (1/S) sum_s softmax(out_s)[y_n]`` over the non-padding targets (``net.pad`` for a
    sequence model). Gaussian: the moment-matched predictive ``N(y; mean, var + s^2)`` (linearized: mean
    ``f(x, m)``, ``var = T mean_s (J delta_s)^2``; sampled: the draws' mean and variance)."""

    def __init__(self, net: BayesianNet, q: Gaussian, X: torch.Tensor, y: torch.Tensor, method: str,
                 num_samples: int, seed: int, chunk: int, noise_scale: float | None):
        from .predictions import _linearized_outputs, weight_draws

        self.net, self.X, self.y, self.method, self.chunk = net, X, y, method, chunk
        self.m = q.mean.detach().to(device=X.device, dtype=X.dtype if X.is_floating_point() else q.dtype)
        with torch.no_grad():
            self.delta = weight_draws(q, num_samples, seed, X).to(self.m) - self.m
            if method == "linearized":
                self.f0 = net.forward(self.m, X)
                self.tangents = torch.cat([t - self.f0 for t in _linearized_outputs(net, self.m, self.delta, X,
                                                                                     chunk)])
        if net.likelihood == "categorical":
            pad = getattr(net, "pad", None)
            self.mask = (y != pad) if (pad is not None and y.dim() > 1) else torch.ones_like(y, dtype=torch.bool)
        else:
            s = net.noise_scale if noise_scale is None else noise_scale
            if s is None:
                raise ValueError("this network's noise scale is fitted: pass noise_scale")
            self.s2 = float(s) ** 2

    def outputs(self, T: float) -> torch.Tensor:
        c = math.sqrt(T)
        with torch.no_grad():
            if self.method == "linearized":
                return self.f0 + c * self.tangents
            W = self.m + c * self.delta
            return torch.cat([self.net.forward(W[a : a + self.chunk], self.X)
                              for a in range(0, W.shape[0], self.chunk)])

    def nll(self, T: float) -> float:
        out = self.outputs(T).double()
        if self.net.likelihood == "categorical":
            lp = torch.log_softmax(out, -1)
            idx = self.y.long().clamp_min(0).unsqueeze(0).unsqueeze(-1).expand(lp.shape[:-1] + (1,))
            lpy = torch.logsumexp(lp.gather(-1, idx).squeeze(-1), 0) - math.log(out.shape[0])
            return float(-lpy[self.mask].mean())
        yy = self.y.double().reshape(out.shape[1:])
        if self.method == "linearized":
            mean, var = self.f0.double(), (out - self.f0.double()).square().mean(0)
        else:
            mean, var = out.mean(0), out.var(0, unbiased=False)
        v = var + self.s2
        return float((0.5 * torch.log(2 * math.pi * v) + 0.5 * (yy - mean) ** 2 / v).mean())


def tune_posterior_scale(net: BayesianNet, q: Gaussian | Callable[[float], Gaussian], X_tune: torch.Tensor,
                         y_tune: torch.Tensor, param: str = "temperature", method: str = "linearized",
                         temperature_bounds: tuple[float, float] = (1e-4, 1e2), temperature_grid: int = 49,
                         alpha_bounds: tuple[float, float] = (1e-2, 1e6), alpha_grid: int = 17,
                         refine: bool = True, temperature_steps: int = 60, alpha_steps: int = 12,
                         num_samples: int = 50, seed: int = 0,
                         chunk: int = 25, noise_scale: float | None = None) -> tuple[Gaussian, dict[str, Any]]:
    """The scale of a (Laplace) Gaussian posterior chosen by held-out negative log-likelihood.

    ``NLL(alpha, T) = -1/n sum_n log p_lin(y_n | x_n)`` on the tuning data ``(X_tune, y_tune)`` -- a split carved
    from the TRAINING data, never the data the result is reported on, never the test split -- of the predictive
    (``method``: ``"linearized"``, the GLM predictive consistent with a GGN Laplace, or ``"mc"``) of::

        q(alpha, T) = N(m, T * Lam(alpha)^-1),      Lam(alpha) = G + alpha * P0.

    ``param="temperature"``: ``q`` is a Gaussian, ``alpha`` stays 1 and ``log T`` is searched on a grid over
    ``temperature_bounds`` (from one set of draws, see :class:`_HeldOut`: each ``T`` is almost free).
    ``param="prior_precision"``: ``q`` is ``alpha -> Gaussian`` (:func:`pyro_distill.inference.laplace_family`,
    the curvature computed once), ``T = 1`` and ``log alpha`` is searched over ``alpha_bounds`` (laplace-torch's
    ``optimize_prior_precision(method="gridsearch")``). ``param="both"``: for every ``alpha`` the best ``T``
    (profile likelihood). Each search: the grid's argmin, then (``refine``) golden-section steps in the bracket
    around it (``temperature_steps`` for ``T``; ``alpha_steps`` for ``alpha``, each a rebuild); the result is never
    worse than the grid's best. Draws are seeded by ``seed`` and shared across the grid.

    Returns the tuned Gaussian ``q(alpha*, T*)`` and ``{"temperature", "prior_precision", "nll", "nll_start"
    (alpha = T = 1), "nll_map" (T = 0: the mean's own prediction), "grid" (the searched values), "nll_grid",
    "at_bound" (the grid's best at an end: widen the bounds), "param", "method", "num_samples", "n_tune"}``; with
    ``"both"`` also ``"temperature_grid"`` (the best
    ``T`` per ``alpha``).
    """
    if param not in SCALE_PARAMS:
        raise ValueError(f"unknown scale parameter {param!r}; choose one of {SCALE_PARAMS}")
    if method not in ("linearized", "mc"):
        raise ValueError(f"unknown predictive method {method!r}; choose 'linearized' or 'mc'")
    for name, (lo, hi) in (("temperature_bounds", temperature_bounds), ("alpha_bounds", alpha_bounds)):
        if not 0 < lo < hi:
            raise ValueError(f"{name} must satisfy 0 < lo < hi, got {(lo, hi)}")
    if param == "temperature":
        if not isinstance(q, Gaussian):
            raise TypeError("param='temperature' tunes a Gaussian: pass the Gaussian itself")
        build: Callable[[float], Gaussian] = lambda alpha: q  # noqa: E731
    else:
        if isinstance(q, Gaussian) or not callable(q):
            raise TypeError(f"param={param!r} rebuilds the Laplace Gaussian per prior precision: pass "
                            "inference.laplace_family(net, X, w_map, prior, kind=...) instead of a Gaussian")
        build = q

    def held(alpha: float) -> _HeldOut:
        return _HeldOut(net, build(alpha), X_tune, y_tune, method, num_samples, seed, chunk, noise_scale)

    def best_T(h: _HeldOut, iters: int) -> tuple[tuple[float, float], list[float], list[float], int]:
        lo, hi = temperature_bounds
        return _grid_golden(lambda x: h.nll(math.exp(x)), math.log(lo), math.log(hi), temperature_grid, iters,
                            maximize=False)

    h1 = held(1.0)
    info: dict[str, Any] = {"param": param, "method": method, "num_samples": num_samples,
                            "n_tune": int(X_tune.shape[0]), "nll_start": h1.nll(1.0), "nll_map": h1.nll(0.0)}
    if param == "temperature":
        (nll, logT), xs, vals, i = best_T(h1, temperature_steps if refine else 0)
        alpha, T = 1.0, math.exp(logT)
        info |= {"grid": [math.exp(x) for x in xs], "nll_grid": vals}
    else:
        inner: dict[float, float] = {}

        def f(log_alpha: float) -> float:
            h = held(math.exp(log_alpha))
            if param == "prior_precision":
                return h.nll(1.0)
            (v, logT), *_ = best_T(h, temperature_steps if refine else 0)
            inner[log_alpha] = math.exp(logT)
            return v

        lo, hi = alpha_bounds
        (nll, la), xs, vals, i = _grid_golden(f, math.log(lo), math.log(hi), alpha_grid, alpha_steps if refine else 0,
                                              maximize=False)
        alpha = math.exp(la)
        T = inner.get(la, 1.0) if param == "both" else 1.0
        info |= {"grid": [math.exp(x) for x in xs], "nll_grid": vals}
        if param == "both":
            info["temperature_grid"] = [inner[x] for x in xs]
    info |= {"temperature": T, "prior_precision": alpha, "nll": nll, "at_bound": i in (0, len(xs) - 1)}
    q_best = build(alpha)
    return (q_best if T == 1.0 else q_best.tempered(T)), info
