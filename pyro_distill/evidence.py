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
  which every ``tau`` costs O(p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .gaussian import STRUCTURE_ALIASES, DenseGaussian, DiagGaussian, Gaussian, LowRankGaussian
from .nets.base import BayesianNet

__all__ = ["QuadraticModel", "quadratic_model", "log_evidence", "laplace_evidence", "optimize_prior",
           "optimize_temperature", "STRUCTURES"]

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

    xs = torch.linspace(math.log(lo), math.log(hi), grid, dtype=torch.float64).tolist()
    vals = [f(x) for x in xs]
    i = max(range(grid), key=vals.__getitem__)
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, grid - 1)]
    gr = (math.sqrt(5) - 1) / 2
    c, d = b - gr * (b - a), a + gr * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - gr * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + gr * (b - a)
            fd = f(d)
    x = 0.5 * (a + b)
    best = max((f(x), x), (vals[i], xs[i]))
    tau = math.exp(best[1])
    return tau, {"log_evidence": best[0], "tau_grid": [math.exp(v) for v in xs], "log_evidence_grid": vals,
                 "at_bound": i in (0, grid - 1)}
