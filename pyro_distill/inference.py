"""Fitting a Gaussian posterior over a network's flat weights: MAP, Laplace, then SVI (teacher and student alike).

The recipe (measured, see README "Fitting recipe"): a MAP point by Adam on the log joint, a Laplace
covariance at MAP from the generalized Gauss-Newton matrix plus the prior precision, then SVI on the
ELBO ``E_q[log p(y | X, w)] - KL(q || p)`` with the KL in closed form (both Gaussian) and the
expected log-likelihood by reparameterized draws. The model is the network's Pyro model (one site
``"w"``); the guide is :class:`GaussianGuide`, a Pyro module over one of the Gaussian structures (:data:`GUIDES`),
whose parameters the structure itself defines. A point fit (MAP) hands its callback a
:class:`~pyro_distill.gaussian.PointMass`, the SVI phase its Gaussians: callbacks always get a Gaussian.
Full-covariance SVI with one Adam step size for every entry of the Cholesky factor random-walks the
p^2 off-diagonal entries and inflates the variance; the factor therefore gets its own, much smaller,
step (``factor_lr``) on top of the Laplace start, and the ELBO at start and end is reported.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule, PyroParam

from . import checks
from .arrays import as_data, as_prior
from .gaussian import (
    STRUCTURES,
    DenseGaussian,
    DiagGaussian,
    Gaussian,
    LowRankGaussian,
    LowRankPrecisionGaussian,
    PointMass,
    cholesky_jitter,
    structure,
    structure_name,
)
from .nets.base import BayesianNet
from .training import DivergenceError, FitHistory, fit_point
from .whitened import (
    WhitenedGuide,
    mask_tril_grads,
    register_structure_params,
    resolve_whiten,
    structure_params,
)

__all__ = [
    "FitHistory",
    "DivergenceError",
    "GaussianGuide",
    "fit_map",
    "laplace",
    "laplace_family",
    "fit_posterior",
    "elbo_terms",
    "GUIDES",
    "guide_name",
]

#: the guide structures, by their one name (``"mvn"`` is accepted everywhere for ``"dense"``)
GUIDES = tuple(STRUCTURES)


def guide_name(name: str) -> str:
    """The canonical name of a guide (``"mvn"`` -> ``"dense"``), or a ValueError naming the choices."""
    return structure_name(name, "guide")
log = logging.getLogger(__name__)


# ============================================================================ guide
class GaussianGuide(PyroModule):
    """A Pyro guide ``q(w) = N(loc, S)`` over the single site ``"w"`` in one of the structures of
    :data:`GUIDES` (``"mvn"`` is accepted for ``"dense"``; default: the start's own structure).

    The structure owns its parameters (:meth:`~pyro_distill.gaussian.Gaussian.guide_params` from the start,
    converting a start of another structure where defined, with ``rank``/``seed`` for a random low-rank factor;
    :meth:`~pyro_distill.gaussian.Gaussian.from_guide_params` back), so nothing here depends on the kind:
    dense ``S = L L^T`` (``L`` lower triangular), low rank ``W W^T + diag(d)``, diagonal ``diag(s^2)``, Kronecker
    (per block lower-triangular row and column factors), low-rank precision ``(diag(d) + F F^T)^{-1}``.
    Calling it with ``num_particles`` draws ``[num_particles, p]``.
    """

    def __init__(self, init: Gaussian, kind: str | None = None, rank: int = 20, seed: int = 0):
        super().__init__()
        kind = guide_name(kind or init.kind)
        self.kind = kind
        self.structure = structure(kind)
        self.layout = init.layout
        self.loc = PyroParam(init.loc.detach().clone())
        self._names = register_structure_params(self, self.structure, init, rank, seed)

    def scale_params(self) -> list[torch.nn.Parameter]:
        """Parameters of the covariance (they get ``factor_lr``)."""
        return [p for n, p in self.named_parameters() if not n.startswith("loc")]

    def mask_grad(self) -> None:
        """Zero the gradient's upper triangle of the triangular factors (dense, Kronecker): keeps them lower
        triangular under Adam."""
        mask_tril_grads(self, self.structure)

    def gaussian(self) -> Gaussian:
        """The current q as a Gaussian (differentiable)."""
        return self.structure.from_guide_params(self.loc, structure_params(self, self._names), self.layout)

    def forward(self, *args, num_particles: int = 1, **kwargs) -> torch.Tensor:
        d = self.gaussian().to_pyro()
        # One site "w"; particles are a leading batch dim the network broadcasts over.
        return pyro.sample("w", d.expand([num_particles]) if num_particles > 1 else d)


class _DenseSampleKL(torch.autograd.Function):
    """Draws ``w = m + z L^T`` and ``KL(N(m, L L^T) || N(mu, diag(v)))`` with a hand-written backward.

    Autograd would materialize three p x p gradient buffers (draws, trace term, log det) and sum them;
    here one buffer is built and updated in place, which halves the per-step time of the dense guide.
    """

    @staticmethod
    def forward(ctx, loc, L, z, mu, var):
        w = torch.addmm(loc, z, L.T)
        rn = torch.linalg.vector_norm(L, dim=-1) ** 2
        d = L.diagonal()
        kl = 0.5 * ((rn / var).sum() + ((mu - loc) ** 2 / var).sum() - loc.numel() + var.log().sum()
                    - 2 * d.abs().log().sum())
        ctx.save_for_backward(loc, L, z, mu, var)
        return w, kl

    @staticmethod
    def backward(ctx, gw, gkl):
        loc, L, z, mu, var = ctx.saved_tensors
        gL = gw.T @ z
        gL.addcmul_(L, (gkl / var).unsqueeze(-1))
        gL.diagonal().sub_(gkl / L.diagonal())
        gL.tril_()
        gloc = gw.sum(0) + gkl * (loc - mu) / var
        return gloc, gL, None, None, None


def elbo_terms(net: BayesianNet, q: Gaussian | None, prior: Gaussian, X: torch.Tensor, y: torch.Tensor,
               num_particles: int, subsample_size: int | None = None, noise_scale=None,
               w: torch.Tensor | None = None, kl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected log-likelihood estimate scaled to the full data, closed-form KL(q || prior)).

    The log-likelihood comes from the network's Pyro model run on draws of ``q``: the model's
    ``"y"`` site under the ``"data"`` plate (which scales a minibatch by N/B). Draws ``w`` and their
    ``kl`` may come from the caller (the whitened guide); ``q`` is then not needed.
    """
    if w is None:
        if isinstance(q, DenseGaussian) and isinstance(prior, DiagGaussian) and q.loc.requires_grad:
            z = torch.randn(num_particles, q.dim, dtype=q.dtype, device=q.device)
            w, kl = _DenseSampleKL.apply(q.loc, q.scale_tril, z, prior.loc, prior.variance)
        else:
            w = q.rsample(num_particles)
    model_tr = poutine.trace(poutine.condition(net.model, data={"w": w})).get_trace(
        X, y, prior, subsample_size, noise_scale)
    site = model_tr.nodes["y"]
    ll = site["fn"].log_prob(site["value"]).sum() * site["scale"] / w.shape[0]
    return ll, (q.kl(prior) if kl is None else kl)


# ============================================================================ MAP
def _seed(seed: int | None) -> None:
    if seed is not None:
        pyro.set_rng_seed(seed)


def _log_joint(net, w, prior, X, y, idx=None, noise_scale=None):
    N = X.shape[0]
    if idx is None:
        ll = net.log_likelihood(w, X, y, noise_scale).sum()
    else:
        ll = net.log_likelihood(w, X[idx], y[idx], noise_scale).sum() * (N / idx.numel())
    return ll + prior.log_prob(w)


def fit_map(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, prior: Gaussian | None = None,
            init: torch.Tensor | None = None, steps: int = 1000, lr: float = 1e-2, batch_size: int | None = None,
            seed: int | None = 0, history: FitHistory | None = None, progress: bool | None = None,
            callback: Callable[[int, PointMass], dict[str, float] | None] | None = None,
            eval_every: int = 0, fit_noise: bool = False,
            schedule: str = "constant") -> tuple[torch.Tensor, FitHistory]:
    """Maximize ``log p(y | X, w) + log p(w)`` by Adam (full batch unless ``batch_size``).

    ``schedule``: ``"constant"`` step size or ``"cosine"`` decay to 0 over ``steps``
    (:func:`pyro_distill.training.fit_point`): with minibatches the decay lets the fit end at the mode, not at a
    noisy iterate around it, which matters for a Laplace approximation built there.

    Returns the MAP weights ``[p]`` and the history (``map_loss`` = negative log joint per datum).
    ``callback(step, point)`` gets the current weights as a :class:`~pyro_distill.gaussian.PointMass` every
    ``eval_every`` steps (inside :func:`fit_posterior` the same callback sees the SVI phase's Gaussians).
    ``progress``: a tqdm bar (``None``: only when stderr is a terminal and ``$CI`` is unset). A non-finite
    loss, a linear-algebra failure in a step, or a loss grown past ``start + 1e3 max(|start|, 1)``
    (:class:`pyro_distill.checks.LossGuard`) stops it with :class:`DivergenceError`.
    """
    X, y = as_data(X, y)
    prior = as_prior(prior, net)
    steps, lr, batch_size = checks.count("steps", steps), checks.positive("lr", lr), checks.batch_size(batch_size)
    checks.data(net, X, y)
    progress = _auto_progress(progress)
    _seed(seed)
    history = history or FitHistory()
    # token inputs (long) carry no float dtype: the weights then follow the prior (or float32)
    wdtype = X.dtype if X.is_floating_point() else (prior.dtype if prior is not None else torch.float32)
    prior = prior if prior is not None else net.default_prior(wdtype, X.device)
    if init is None:
        g = torch.Generator().manual_seed(seed or 0)
        init = net.init_weights(g, wdtype).to(X.device)
    log_noise = torch.zeros((), dtype=X.dtype, device=X.device, requires_grad=True) if fit_noise else None
    N = X.shape[0]

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return -_log_joint(net, w, prior, X, y, idx, None if log_noise is None else log_noise.exp()) / N

    extra = [] if log_noise is None else [log_noise]
    w, history = fit_point(loss, init.to(device=X.device, dtype=wdtype), N, steps, lr, batch_size, extra_params=extra,
                           history=history, callback=callback, eval_every=eval_every,
                           progress=(lambda r: _progress(r, True, "MAP")) if progress else None, schedule=schedule)
    if history.map_loss:
        log.info("MAP: %d steps in %.1fs, loss %.4g -> %.4g", steps, history.map_time_s, history.map_loss[0],
                 history.map_loss[-1])
    if log_noise is not None:
        history.info["noise_scale"] = float(log_noise.detach().exp())
    return w, history


# ============================================================================ Laplace
def _output_jacobian_chunks(net, w, X, chunk):
    """Yield (outputs [B, C], jacobian [B, C, p]) over chunks of the data."""
    from torch.func import jacrev

    for a in range(0, X.shape[0], chunk):
        xb = X[a : a + chunk]
        out = net.forward(w, xb)
        J = jacrev(lambda ww, xb=xb: net.forward(ww, xb))(w)
        yield out.detach(), J.detach()


def ggn(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, diag_only: bool = False,
        noise_scale: float | None = None) -> torch.Tensor:
    """The generalized Gauss-Newton matrix ``sum_n J_n^T H_n J_n`` of the negative log-likelihood at ``w``
    (``H_n = diag(pi) - pi pi^T`` for a softmax, ``I / s^2`` for a Gaussian). ``diag_only`` returns its diagonal.

    The reference implementation by full Jacobians (``jacrev``), kept for tests and as the baseline of
    ``benchmarks/curvature.py``; :func:`laplace` uses the operator of :mod:`pyro_distill.curvature`, which is
    exact too and much faster."""
    p = w.shape[-1]
    G = torch.zeros(p, dtype=w.dtype, device=w.device) if diag_only else torch.zeros(p, p, dtype=w.dtype,
                                                                                       device=w.device)
    C = net.num_outputs
    chunk = max(1, int(2e7 // max(1, C * p)))
    for out, J in _output_jacobian_chunks(net, w, X, chunk):
        if net.likelihood == "categorical":
            pi = torch.softmax(out, -1)
            Jw = (pi.sqrt().unsqueeze(-1) * J).reshape(-1, p)
            V = torch.einsum("bc,bcp->bp", pi, J)
            if diag_only:
                G += (Jw**2).sum(0) - (V**2).sum(0)
            else:
                G += Jw.T @ Jw - V.T @ V
        else:
            s2 = float(net.noise_scale if noise_scale is None else noise_scale) ** 2
            Jf = J.reshape(-1, p)
            G += ((Jf**2).sum(0) if diag_only else Jf.T @ Jf) / s2
    return G


def laplace(net: BayesianNet, X: torch.Tensor, w_map: torch.Tensor, prior: Gaussian, kind: str = "dense",
            rank: int = 20, noise_scale: float | None = None, seed: int = 0, y: torch.Tensor | None = None,
            ggn_op: Any = None) -> Gaussian:
    """Laplace approximation at ``w_map``: precision ``Lam = G + P0`` (``G`` the GGN of the negative
    log-likelihood from :mod:`pyro_distill.curvature`, ``P0`` the prior precision), in the structure ``kind``:

    * ``"dense"`` (``"mvn"``): the exact inverse of ``Lam`` (float64 inside; ``G`` built by one syrk pass);
    * ``"diag"``: ``N(w, diag(1 / diag(Lam)))`` from the exact GGN diagonal;
    * ``"lowrank"``: ``N(w, diag(d) + W W^T)`` with ``d = 1 / diag(Lam)`` (the diagonal Laplace: the exact
      diagonal of the precision) and ``W`` the ``rank`` directions in which that diagonal underestimates the
      covariance most. With ``C = D^{1/2} Lam D^{1/2}`` (unit diagonal) the exact covariance is
      ``D^{1/2} C^{-1} D^{1/2}``; its excess over ``D`` in an eigendirection ``v`` of ``C`` with eigenvalue
      ``c < 1`` is ``(1/c - 1)``, so ``W = D^{1/2} [v_i sqrt(1/c_i - 1)]`` over the smallest eigenpairs of ``C``
      (Lanczos on ``c_max I - C``, matrix-free: one GGN product per step). Along those directions the result
      equals the exact Laplace covariance; elsewhere it is the diagonal one. (A precision-form
      ``top-k(G) + diag`` would give ``diag - low-rank`` covariance, which this structure cannot hold.)
    * ``"kron"``: per MLP layer, KFAC factors with the prior precision ``alpha`` (isotropic per layer) added by
      Martens-Grosse damping: ``Lam_t ~= (B_t + pi sqrt(alpha) I) ⊗ (A_t + sqrt(alpha) / pi I)`` with
      ``pi^2 = (tr B_t / r) / (tr A_t / c)``; see :func:`kron_laplace`.
    * ``"lowrank_precision"``: precision ``diag(d) + F F^T`` (:class:`LowRankPrecisionGaussian`) with
      ``F = U lam^{1/2}`` the top-``rank`` GGN eigenpairs and ``d`` keeping ``diag(Lam)`` exact; see
      :func:`_lowrank_precision_laplace`.

    ``y`` masks padded targets of sequence models; ``ggn_op`` reuses a :class:`~pyro_distill.curvature.GGN`.
    """
    from .curvature import GGN

    kind = structure_name(kind, "Laplace structure")
    w_map = w_map.detach()
    if kind == "kron":
        return kron_laplace(net, X, w_map, prior, noise_scale=noise_scale, y=y)
    op = ggn_op if ggn_op is not None else GGN(net, w_map, X, y, noise_scale=noise_scale)
    meta = {"source": f"laplace-{kind}"}
    if kind == "lowrank_precision":
        return _lowrank_precision_laplace(op, prior, w_map, rank, seed, net, meta)
    if kind == "dense":
        Lam = op.dense().double()
        Lam += prior.precision().to(device=Lam.device, dtype=torch.float64)
        Lam = 0.5 * (Lam + Lam.T)
        LL = cholesky_jitter(Lam, "Laplace precision")
        del Lam
        S = torch.cholesky_inverse(LL)
        del LL
        L = cholesky_jitter(0.5 * (S + S.T), "Laplace covariance")
        return DenseGaussian(w_map.clone(), L.to(w_map.dtype), layout=net.layout, meta={"source": "laplace"})
    prec_diag = op.diagonal().clamp_min(0) + _precision_diagonal(prior).to(w_map)
    d = 1.0 / prec_diag
    if kind == "diag":
        return DiagGaussian(w_map.clone(), d.sqrt(), layout=net.layout, meta=meta)
    return _lowrank_laplace(op, prior, w_map, d, rank, seed, net, meta)


def _lowrank_precision_laplace(op: Any, prior: Gaussian, w_map: torch.Tensor, rank: int, seed: int,
                               net: BayesianNet, meta: dict[str, Any]) -> LowRankPrecisionGaussian:
    """Precision ``Lam ~= diag(d) + F F^T``: ``F = U lam^{1/2}`` over the top-``rank`` GGN eigenpairs (Lanczos,
    one GGN product per step), ``d = diag(G) - rowsum(F^2) + diag(P0)`` so that ``diag(Lam)`` is exact. The prior
    enters through its diagonal (exact for a diagonal prior; a non-diagonal ``P0`` loses its off-diagonal).

    ``diag(G) - rowsum(F^2) = diag(G - U lam U^T) >= 0`` in exact arithmetic (the remainder is PSD), so the clamp
    at ``1e-6 diag(P0)`` only absorbs round-off (with ``rank = p`` the difference is 0 +- eps |G|) and keeps
    ``d > 0``.
    """
    k = max(1, min(int(rank), w_map.shape[-1]))
    lam, U = op.eigh_topk(k, seed=seed)
    F = U * lam.clamp_min(0).sqrt()  # the GGN is PSD: negative eigenvalues are round-off
    p0 = _precision_diagonal(prior).to(w_map)
    d = torch.maximum(op.diagonal().to(w_map) - (F**2).sum(-1) + p0, p0 * 1e-6)
    ei = getattr(op, "eig_info", {})
    info = dict(meta, rank=k, lam_max=float(lam.max()), lam_min=float(lam.min()),
                lanczos_iterations=int(ei.get("iterations", 0)), eig_residual=float(ei.get("residual", 0.0)))
    return LowRankPrecisionGaussian(w_map.clone(), F.to(w_map.dtype), d, layout=net.layout, meta=info)


def _precision_diagonal(prior: Gaussian) -> torch.Tensor:
    """``diag(P0)`` of a prior without forming ``P0`` where the structure allows it."""
    if isinstance(prior, DiagGaussian):
        return 1.0 / prior.variance
    if isinstance(prior, LowRankGaussian):  # Woodbury: D^{-1} - D^{-1} W C^{-1} W^T D^{-1}
        Wd = prior.cov_factor / prior.cov_diag.unsqueeze(-1)
        T = torch.linalg.solve_triangular(prior._capacitance_tril(), Wd.T, upper=False)
        return 1.0 / prior.cov_diag - (T**2).sum(0)
    if isinstance(prior, DenseGaussian):
        Linv = torch.linalg.solve_triangular(prior.scale_tril, torch.eye(prior.dim, dtype=prior.dtype,
                                                                          device=prior.device), upper=False)
        return (Linv**2).sum(0)
    pd_ = getattr(prior, "precision_diagonal", None)
    return pd_() if callable(pd_) else prior.precision().diagonal()


def _precision_mv(prior: Gaussian, v: torch.Tensor) -> torch.Tensor:
    """``P0 v`` by solves (no inverse matrix)."""
    if isinstance(prior, DiagGaussian):
        return v / prior.variance
    if isinstance(prior, DenseGaussian):
        return torch.cholesky_solve(v.unsqueeze(-1), prior.scale_tril).squeeze(-1)
    if isinstance(prior, LowRankGaussian):
        W, dd = prior.cov_factor, prior.cov_diag
        Lc = prior._capacitance_tril()
        t = torch.cholesky_solve((W.T @ (v / dd)).unsqueeze(-1), Lc).squeeze(-1)
        return v / dd - (W @ t) / dd
    if isinstance(prior, LowRankPrecisionGaussian):  # (diag(d) + F F^T) v: no solve at all
        return prior.prec_diag * v + prior.prec_factor @ (prior.prec_factor.T @ v)
    pmv = getattr(prior, "precision_mv", None)  # a structure's own product (KronGaussian: A^{-1} V B^{-1} per block)
    return pmv(v) if callable(pmv) else prior.precision() @ v


def _lowrank_laplace(op: Any, prior: Gaussian, w_map: torch.Tensor, d: torch.Tensor, rank: int, seed: int,
                     net: BayesianNet, meta: dict[str, Any]) -> LowRankGaussian:
    from .curvature import _lanczos

    p = w_map.shape[-1]
    k = max(1, min(rank, p - 1))
    sd = d.sqrt()
    pr = prior.to(w_map.device, w_map.dtype)

    def C(v: torch.Tensor) -> torch.Tensor:
        u = sd * v
        return sd * (op.mv(u) + _precision_mv(pr, u))

    # c_max by a few power steps (C >= 0, unit diagonal so c_max >= 1), then the top of c_max I - C
    gen = torch.Generator(device=w_map.device).manual_seed(seed)
    z = torch.randn(p, generator=gen, dtype=w_map.dtype, device=w_map.device)
    z = z / z.norm()
    cmax = 1.0
    for _ in range(20):
        cz = C(z)
        cmax = max(cmax, float(z @ cz))
        z = cz / cz.norm().clamp_min(1e-300)
    shift = 1.05 * cmax
    tol = 1e-6 if w_map.dtype == torch.float64 else 1e-4
    out = _lanczos(lambda v: shift * v - C(v), p, k, seed, tol, max(3 * k, k + 60), w_map.dtype, w_map.device)
    V, lanczos_info = out[1], (out[2] if len(out) > 2 else {})
    c = torch.stack([V[:, j] @ C(V[:, j]) for j in range(V.shape[1])])  # Rayleigh quotients under C itself
    excess = (1.0 / c.clamp_min(1e-12) - 1.0).clamp_min(0)  # directions with c >= 1 add nothing
    W = sd.unsqueeze(-1) * V * excess.sqrt()
    info = dict(meta, rank=k, c_min=float(c.min()), c_max=cmax,
                lanczos_iterations=int(lanczos_info.get("iterations", 0)))
    return LowRankGaussian(w_map.clone(), W.to(w_map.dtype), d.to(w_map.dtype), layout=net.layout, meta=info)


def kron_blocks(net: BayesianNet) -> list[torch.Tensor]:
    """The Kronecker blocks of a family (``net.kron_index()``: one ``[rows, cols]`` flat-index matrix per layer,
    the bias as the last column), or a clear error for a family without them."""
    fn = getattr(net, "kron_index", None)
    if fn is None:
        raise ValueError(f"{type(net).__name__} has no Kronecker block structure (kron_index); use guide/kind "
                         "'lowrank', 'diag' or 'mvn'")
    return list(fn())


def kron_laplace(net: BayesianNet, X: torch.Tensor, w_map: torch.Tensor, prior: Gaussian,
                 noise_scale: float | None = None, y: torch.Tensor | None = None,
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, ggn_op: Any = None) -> Gaussian:
    """KFAC Laplace (Ritter, Botev & Barber 2018) as a :class:`~pyro_distill.gaussian.KronGaussian`: per MLP
    layer ``vec([U_t | b_t]) ~ N(., (B_t + pi sqrt(alpha_t) I)^{-1} ⊗ (A_t + sqrt(alpha_t)/pi I)^{-1})`` with the
    KFAC factors ``B_t`` (output side, a sum over the data) and ``A_t`` (input side, a mean) of
    :func:`pyro_distill.curvature.kfac` scaled so that ``B_t ⊗ A_t`` approximates the GGN block, ``alpha_t`` the
    layer's prior precision (the prior must be diagonal and constant on each layer) and ``pi`` the damping
    split of Martens & Grosse (2015). Coordinates outside the layers keep the diagonal Laplace. ``factors`` (from
    ``kfac``) and ``ggn_op`` reuse curvature already computed (:func:`laplace_family`)."""
    from .curvature import GGN, kfac, kfac_indices
    from .gaussian import KronGaussian

    if not isinstance(prior, DiagGaussian):
        raise ValueError("a Kronecker Laplace needs a diagonal (per-layer isotropic) prior; convert the prior "
                         "or use kind='lowrank'/'diag'")
    factors = factors if factors is not None else kfac(net, w_map, X, y, noise_scale=noise_scale)
    var = prior.variance.to(w_map)
    blocks = []
    covered = torch.zeros(net.num_params, dtype=torch.bool, device=w_map.device)
    for name, (A, B) in factors.items():
        idx = kfac_indices(net, name).to(w_map.device).reshape(B.shape[0], A.shape[0])
        v = var[idx]
        if bool((v - v.reshape(-1)[0]).abs().max() > 1e-12 * float(v.reshape(-1)[0])):
            raise ValueError(f"{name}: the prior variance is not constant on the layer; a Kronecker Laplace needs "
                             "an isotropic prior per layer (use kind='lowrank' or 'diag')")
        alpha = 1.0 / float(v.reshape(-1)[0])
        r, c = B.shape[0], A.shape[0]
        pi = math.sqrt(max(float(B.diagonal().mean()), 1e-30) / max(float(A.diagonal().mean()), 1e-30))
        eye_r = torch.eye(r, dtype=B.dtype, device=B.device)
        eye_c = torch.eye(c, dtype=A.dtype, device=A.device)
        blocks.append((idx, B + pi * math.sqrt(alpha) * eye_r, A + math.sqrt(alpha) / pi * eye_c))
        covered[idx.reshape(-1)] = True
    rest = (~covered).nonzero().reshape(-1)
    rem = None
    if rest.numel():
        op = ggn_op if ggn_op is not None else GGN(net, w_map, X, y, noise_scale=noise_scale)
        gd = op.diagonal()[rest]
        rem = gd.clamp_min(0) + 1.0 / var[rest]
    return KronGaussian.from_precision_factors(w_map.clone(), blocks, remainder_precision=rem, layout=net.layout,
                                               meta={"source": "laplace-kron"})


class _CachedGGN:
    """A GGN operator whose diagonal, dense matrix and top-k eigenpairs are computed once (products pass
    through): :func:`laplace` can then rebuild its Gaussian at many prior precisions for the cost of the
    structure's algebra alone."""

    def __init__(self, op: Any):
        self.op, self._cache = op, {}
        self.eig_info: dict[str, Any] = {}

    def _get(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.mv(v)

    def mm(self, V: torch.Tensor) -> torch.Tensor:
        return self.op.mm(V)

    def diagonal(self) -> torch.Tensor:
        return self._get("diagonal", self.op.diagonal)

    def dense(self) -> torch.Tensor:
        return self._get("dense", self.op.dense).clone()  # laplace adds the prior in place

    def eigh_topk(self, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._get(("eigh", k, seed), lambda: self.op.eigh_topk(k, seed=seed))
        self.eig_info = getattr(self.op, "eig_info", {})
        return out


def laplace_family(net: BayesianNet, X: torch.Tensor, w_map: torch.Tensor, prior: Gaussian, kind: str = "dense",
                   rank: int = 20, noise_scale: float | None = None, seed: int = 0, y: torch.Tensor | None = None,
                   ggn_op: Any = None) -> Callable[[float], Gaussian]:
    """``alpha -> laplace(..., prior with precision alpha P0)``: the Laplace Gaussian with precision
    ``Lam(alpha) = G + alpha P0`` in structure ``kind``, the curvature computed once (the GGN diagonal, dense
    matrix, top-k eigenpairs or KFAC factors are cached) and the Gaussian rebuilt per ``alpha`` by :func:`laplace`
    itself (``alpha = 1`` gives exactly ``laplace(net, X, w_map, prior, kind, ...)``). For ``"lowrank"`` the
    Lanczos run on ``D^1/2 Lam D^1/2`` depends on ``alpha`` and is repeated (GGN products, no new curvature)."""
    from .curvature import GGN, kfac

    kind = structure_name(kind, "Laplace structure")
    w_map = w_map.detach()
    op = _CachedGGN(ggn_op if ggn_op is not None else GGN(net, w_map, X, y, noise_scale=noise_scale))
    factors = kfac(net, w_map, X, y, noise_scale=noise_scale) if kind == "kron" else None

    def build(alpha: float) -> Gaussian:
        if not alpha > 0:
            raise ValueError(f"the prior precision scale alpha must be positive, got {alpha}")
        pa = prior if alpha == 1.0 else prior.tempered(1.0 / alpha)
        if kind == "kron":
            return kron_laplace(net, X, w_map, pa, noise_scale=noise_scale, y=y, factors=factors, ggn_op=op)
        return laplace(net, X, w_map, pa, kind=kind, rank=rank, noise_scale=noise_scale, seed=seed, y=y,
                       ggn_op=op)

    return build


# ============================================================================ SVI
def _auto_progress(progress: bool | None) -> bool:
    """``None`` means auto: a bar when stderr is a terminal, none in CI (``$CI`` set) or when piped."""
    if progress is not None:
        return bool(progress)
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) and not os.environ.get("CI")


def _progress(it, enabled: bool | None, desc: str):
    if not _auto_progress(enabled):
        return _Quiet(it)
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, mininterval=0.5)


class _Quiet:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **_):
        pass


def _check_inputs(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, guide: str, prior: Gaussian | None) -> None:
    guide_name(guide)
    checks.data(net, X, y)
    net.check_data(X, y)
    if prior is not None and prior.dim != net.num_params:
        raise ValueError(
            f"prior has {prior.dim} coordinates but the network has p={net.num_params}; "
            "the prior belongs to another architecture"
        )
    if prior is not None and prior.layout is not None and prior.layout != net.layout:
        raise ValueError(f"prior layout {prior.layout} does not match the network's {net.layout}")


def _convert_start(start: Gaussian, kind: str, rank: int) -> Gaussian:
    """A Laplace start of another structure in the guide's structure ``kind``."""
    if kind == "dense":
        return start if isinstance(start, DenseGaussian) else start.to_dense()
    if kind == "lowrank":
        return start if isinstance(start, LowRankGaussian) else start.to_lowrank(rank)
    if kind == "diag":
        return DiagGaussian(start.loc, start.variance.sqrt(), layout=start.layout)
    raise ValueError(f"a {start.kind} Laplace start cannot start a {kind!r} guide: the conversion exists for dense, "
                     "lowrank and diag guides; use laplace_kind=None (the guide's own structure)")


def fit_posterior(
    net: BayesianNet,
    X: torch.Tensor,
    y: torch.Tensor,
    guide: str = "dense",
    prior: Gaussian | None = None,
    steps: int = 1000,
    lr: float = 1e-3,
    factor_lr: float | None = None,
    num_particles: int = 8,
    batch_size: int | None = None,
    init: str | torch.Tensor | Gaussian = "map",
    map_steps: int = 1500,
    map_lr: float = 1e-2,
    map_schedule: str = "constant",
    cov_init: str = "laplace",
    rank: int = 20,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    callback: Callable[[int, Gaussian], dict[str, float] | None] | None = None,
    eval_every: int = 0,
    elbo_eval_particles: int = 64,
    snapshot_every: int = 50,
    whiten: bool | str = "auto",
    laplace_kind: str | None = None,
    curvature_rows: int = 0,
    start_temperature: float = 1.0,
) -> tuple[Gaussian, FitHistory]:
    """Fit ``q(w) = N(m, S)`` to ``p(w | X, y)`` for ``net`` under ``prior`` (default: the net's fan-in prior).

    Phases: (1) ``init``: ``"map"`` runs ``map_steps`` of MAP (Adam at ``map_lr``, ``map_schedule``
    ``"constant"`` or ``"cosine"``: :func:`fit_map`) from a random start, ``"prior"`` runs them
    from the prior mean (the student's start), a tensor (or a :class:`~pyro_distill.gaussian.PointMass`) is a given
    start for MAP, a :class:`Gaussian` is taken as the SVI start as it is (no MAP, no Laplace); (2)
    ``cov_init="laplace"``: covariance
    from the GGN Laplace approximation (``"prior"``: the prior's covariance shrunk by 1e-2);
    (3) ``steps`` of SVI with Adam (``lr`` for the mean, ``factor_lr`` for the covariance parameters:
    default ``lr / 100`` for ``dense``, ``lr`` otherwise). ``guide`` names the structure (:data:`GUIDES`; ``"mvn"``
    is accepted for ``"dense"``); a given Gaussian ``init`` of another structure is converted by the structure's
    :meth:`~pyro_distill.gaussian.Gaussian.guide_params` (a low-rank guide gets a random ``rank``-column factor).

    Returns the fitted Gaussian (layout = ``net.layout``) and a :class:`FitHistory`. A non-finite loss
    or gradient stops the fit with :class:`DivergenceError` carrying the step and the last good state (the
    parameters before the failing step, or, if an earlier step already left non-finite parameters, the
    snapshot taken every ``snapshot_every`` steps). ``callback(step, q)`` receives a copy of q.

    ``laplace_kind``: the structure of the Laplace start when it should differ from the guide's, e.g. ``"kron"``
    (KFAC, curvature in O(N p)) for a dense guide whose dense GGN would cost O(N C p^2) (Fashion-MNIST's
    60,000 images at p = 8,074: 3.9e13 flops); the start is converted exactly (``to_dense()``) or to the guide's
    structure (``to_lowrank(rank)``, the diagonal).

    ``curvature_rows``: the Laplace start's GGN from this many seeded random rows, scaled to the full sum
    (:func:`pyro_distill.curvature.subsampled_ggn`; 0: all rows); the rows it used are in
    ``history.info["curvature_rows"]``. Not for the ``"kron"`` structure, whose KFAC factors cost one pass over all
    rows anyway.

    ``start_temperature``: the SVI start's covariance times this (the Laplace or shrunk-prior start, or a given
    Gaussian ``init``), e.g. the temperature a held-out split chose for the Laplace Gaussian
    (:func:`pyro_distill.evidence.tune_posterior_scale`): where the Laplace spread at ``T = 1`` is far too wide, SVI
    with a small covariance step size cannot shrink it in its budget, and starting at the tuned scale lets it grow.

    ``whiten`` (``"auto"``: on when the prior is not diagonal): SVI in the prior's whitened coordinates
    (:mod:`pyro_distill.whitened`), so the KL to a dense or low-rank prior costs O(p^2) per step, not O(p^3);
    the result, callbacks and histories are in the original coordinates, and ``lr`` / ``factor_lr`` keep
    their meaning. ``history.info["whiten"]`` records whether it was used.
    """
    X, y = as_data(X, y)
    prior = as_prior(prior, net)
    if isinstance(init, torch.distributions.Distribution):
        init = as_prior(init, net)
    if isinstance(init, PointMass):  # a point estimate is a start for MAP (it has no covariance to start SVI from)
        init = init.mean.detach()
    progress = _auto_progress(progress)
    _check_inputs(net, X, y, guide, prior)
    guide = guide_name(guide)
    steps, map_steps = checks.count("steps", steps), checks.count("map_steps", map_steps)
    lr, map_lr = checks.positive("lr", lr), checks.positive("map_lr", map_lr)
    factor_lr = None if factor_lr is None else checks.positive("factor_lr", factor_lr)
    num_particles, batch_size = checks.count("num_particles", num_particles, 1), checks.batch_size(batch_size)
    snapshot_every = checks.count("snapshot_every", snapshot_every, 1)
    curvature_rows = checks.count("curvature_rows", curvature_rows)
    start_temperature = checks.positive("start_temperature", start_temperature)
    device = torch.device(device) if device is not None else X.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but CUDA is not available; use device='cpu'")
    dtype = checks.float_dtype(dtype or (X.dtype if X.is_floating_point() else torch.float32))
    X = X.to(device=device, dtype=dtype) if X.is_floating_point() else X.to(device)
    y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    prior = (prior if prior is not None else net.default_prior(dtype, device)).to(device, dtype)
    _seed(seed)
    history = FitHistory()
    history.info.update(guide=guide, steps=steps, lr=lr, num_particles=num_particles, p=net.num_params,
                        N=X.shape[0], dtype=str(dtype))
    kind = guide
    N = X.shape[0]

    # ---- phase 1-2: starting Gaussian
    if isinstance(init, Gaussian):
        if init.dim != net.num_params:
            raise ValueError(f"init Gaussian has {init.dim} coordinates, the network p={net.num_params}")
        start = init.to(device, dtype)  # the guide converts it to its structure (guide_params)
    else:
        if isinstance(init, str):
            if init not in ("map", "prior"):
                raise ValueError(f"unknown init {init!r}; use 'map', 'prior', a weight tensor or a Gaussian")
            w0 = prior.loc.detach().clone() if init == "prior" else None
        else:
            w0 = torch.as_tensor(init).to(device=device, dtype=dtype)
            if w0.shape != (net.num_params,):
                raise ValueError(f"init weights have shape {tuple(w0.shape)}, the network needs [{net.num_params}]")
        if map_steps > 0:
            w0, _ = fit_map(net, X, y, prior, init=w0, steps=map_steps, lr=map_lr, batch_size=batch_size,
                            seed=seed, history=history, progress=progress, schedule=map_schedule,
                            callback=callback, eval_every=eval_every)
            history.map_weights = w0.detach().clone()
        elif w0 is None:
            w0 = net.init_weights(torch.Generator().manual_seed(seed or 0), dtype).to(device)
        t0 = time.perf_counter()
        if cov_init == "laplace":
            lk = structure_name(laplace_kind, "Laplace structure") if laplace_kind else kind
            ggn_op = None
            if curvature_rows:
                if lk == "kron":
                    raise ValueError("curvature_rows subsamples the GGN of the dense, diag and lowrank Laplace; the "
                                     "kron (KFAC) start takes one pass over all rows: use curvature_rows=0")
                from .curvature import subsampled_ggn

                ggn_op = subsampled_ggn(net, w0, X, y, rows=curvature_rows, seed=seed or 0)
            start = laplace(net, X, w0, prior, kind=lk, rank=rank, seed=seed or 0, y=y, ggn_op=ggn_op)
            history.info["curvature_rows"] = int(X.shape[0]) if ggn_op is None else ggn_op.N
            if lk != kind:
                start = _convert_start(start, kind, rank)
        elif cov_init == "prior":
            start = _shrunk_prior_start(prior, w0, kind, rank, seed or 0, net)
        else:
            raise ValueError(f"unknown cov_init {cov_init!r}; use 'laplace' or 'prior'")
        history.laplace_time_s = time.perf_counter() - t0
        log.info("%s start (%s): %.1fs", "Laplace" if cov_init == "laplace" else "shrunk-prior", kind,
                 history.laplace_time_s)
    if start_temperature != 1.0:
        start = start.tempered(start_temperature)
    start.layout = net.layout

    # ---- phase 3: SVI
    if guide == "lowrank_precision" and whiten is True:
        raise ValueError("whiten=True with guide 'lowrank_precision': no whitened form of the precision-form guide "
                         "exists (its KL is already O(p k^2)); use whiten='auto' or False")
    whitened = resolve_whiten(whiten, guide, prior) if guide != "lowrank_precision" else False
    history.info["whiten"] = whitened
    g = (WhitenedGuide(start, prior, guide, rank=rank, seed=seed or 0) if whitened
         else GaussianGuide(start, guide, rank=rank, seed=seed or 0))
    g.to(device)
    flr = factor_lr if factor_lr is not None else lr / structure(guide).guide_factor_lr_divisor
    opt = torch.optim.Adam([{"params": [g.loc], "lr": lr}, {"params": g.scale_params(), "lr": flr}],
                           **_adam_kwargs(device))
    sub = None if batch_size is None or batch_size >= N else batch_size

    def full_elbo(q: Gaussian) -> float:
        with torch.no_grad():
            gen = torch.Generator(device=device).manual_seed(12345)
            w = q.rsample(elbo_eval_particles, generator=gen)
            ll = net.log_likelihood(w, X, y).sum(-1).mean()
            return float(ll - q.kl(prior))

    history.elbo_start = full_elbo(g.gaussian())
    # A snapshot of the parameters every `snapshot_every` steps: the state handed back if an Adam step ever
    # leaves non-finite parameters (otherwise the parameters before the failing step are returned exactly).
    snap = [p.detach().clone() for p in g.parameters()]
    snap_step = 0
    t0 = time.perf_counter()
    it = _progress(range(steps), progress, f"SVI[{guide}]")
    guard = checks.LossGuard()
    for step in it:
        opt.zero_grad(set_to_none=True)
        why = None  # set when the current parameters themselves are bad: the snapshot is handed back
        try:
            if whitened:  # draws and KL(q || prior) in the prior's whitened coordinates: O(p^2)
                w, kl = g.sample_kl(num_particles)
                ll, kl = elbo_terms(net, None, prior, X, y, num_particles, sub, w=w, kl=kl)
            else:
                ll, kl = elbo_terms(net, g.gaussian(), prior, X, y, num_particles, sub)
            loss = -(ll - kl)
            lossv = loss.detach().item()
            bad = not math.isfinite(lossv)
            if not bad and guard.exploded(lossv):
                bad, why = True, (f"the loss (-ELBO) grew from {guard.start:.4g} to {lossv:.4g}, more than "
                                  f"{checks.GROWTH_FACTOR:g}x its start")
            if not bad:
                loss.backward()
                g.mask_grad()
                # a sum is NaN/inf iff some entry is (or the sum overflows): one pass, no p x p temporary
                bad = not all(_finite(p.grad) for p in g.parameters() if p.grad is not None)
        except checks.LINALG_ERRORS as exc:
            lossv, bad, why = float("nan"), True, f"{type(exc).__name__} ({str(exc).splitlines()[0]})"
        if bad:
            history.svi_time_s += time.perf_counter() - t0
            if why is None and _guide_finite(g):
                last, good_step = _clone_gaussian(g.gaussian()), step
            else:
                with torch.no_grad():
                    for p, sp in zip(g.parameters(), snap):
                        p.copy_(sp)
                last, good_step = _clone_gaussian(g.gaussian()), snap_step
            last.meta = {"source": "svi (stopped by the NaN guard)", "step": good_step}
            raise DivergenceError(
                f"SVI diverged at step {step}: {why or f'the ELBO or its gradient is not finite (loss {lossv})'}. "
                f"The returned state is the last good one (from step {good_step}); lower lr (now {lr}) or "
                f"factor_lr (now {flr}), or use more particles / float64.", step, last, history)
        opt.step()
        if (step + 1) % snapshot_every == 0 and _guide_finite(g):
            with torch.no_grad():
                for p, sp in zip(g.parameters(), snap):
                    sp.copy_(p)
            snap_step = step + 1
        history.elbo.append(-lossv)
        history.time_s.append(time.perf_counter() - t0)
        if callback is not None and eval_every and (step + 1) % eval_every == 0:
            out = callback(map_steps + step + 1 if not isinstance(init, Gaussian) else step + 1,
                           _clone_gaussian(g.gaussian()))
            for k, v in (out or {}).items():
                history.log(k, map_steps + step + 1, v)
        if progress and step % 25 == 0:
            it.set_postfix(elbo=f"{-lossv:.1f}")
    history.svi_time_s += time.perf_counter() - t0
    post = _clone_gaussian(g.gaussian())
    post.layout = net.layout
    post.meta = {"source": "svi", "guide": guide, "steps": steps}
    history.elbo_end = full_elbo(post)
    log.info("SVI[%s]: %d steps in %.1fs, ELBO %.1f -> %.1f", guide, steps, history.svi_time_s,
             history.elbo_start, history.elbo_end)
    if history.elbo_end < history.elbo_start - 0.05 * abs(history.elbo_start) and steps > 0:
        warnings.warn(f"SVI ended with a lower ELBO ({history.elbo_end:.1f}) than its start "
                      f"({history.elbo_start:.1f}); the step sizes may be too large", RuntimeWarning, stacklevel=2)
    return post, history


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach().sum()))


def _guide_finite(g: GaussianGuide | WhitenedGuide) -> bool:
    """The Gaussian the guide represents is finite (its parameters may be finite while exp(log scale) is not)."""
    with torch.no_grad():
        if isinstance(g, WhitenedGuide):  # without the O(p^3) hand-back to the original coordinates
            return g.finite()
        return all(_finite(t) for t in g.gaussian()._tensors().values())


def _clone_gaussian(q: Gaussian) -> Gaussian:
    """A detached copy that does not share storage with live parameters."""
    return type(q)._from_tensors({k: v.detach().clone() for k, v in q._tensors().items()}, layout=q.layout,
                                 meta=dict(q.meta))


def _adam_kwargs(device: torch.device) -> dict[str, Any]:
    # The fused kernel makes one pass over each p x p factor instead of several.
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _shrunk_prior_start(prior: Gaussian, w0: torch.Tensor, kind: str, rank: int, seed: int, net) -> Gaussian:
    """The start of ``cov_init="prior"``: centred at ``w0`` with standard deviations ``0.1 x`` the prior's, in the
    structure ``kind`` (:meth:`~pyro_distill.gaussian.Gaussian.start_around`)."""
    s = (prior.variance.sqrt() * 0.1).detach()
    return structure(kind).start_around(w0.detach().clone(), s, rank, seed, blocks=lambda: kron_blocks(net),
                                        layout=net.layout)


def predictive(net: BayesianNet, q: Gaussian, X: torch.Tensor, num_samples: int = 200, seed: int = 0,
               chunk: int = 50, method: str = "mc") -> torch.Tensor:
    """Posterior predictive (see :func:`pyro_distill.predictions.predictive`): class probabilities ``[N, C]``
    averaged over draws (classification) or the draws' outputs (regression)."""
    from .predictions import predictive as _predictive

    return _predictive(net, q, X, method=method, num_samples=num_samples, seed=seed, chunk=chunk)
