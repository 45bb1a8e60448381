"""Bayesian distillation end to end: teacher posterior -> plan -> student prior -> student posterior.

The student's prior is the teacher's posterior transformed by the plan's removals (exact Gaussian
conditioning, :mod:`pyro_distill.surgery`), optionally tempered: covariance times ``tau`` (``tau = 1`` is the
paper's prior; a prior fitted on the same data counts that data twice, a larger ``tau`` discounts it;
``tau="evidence"`` picks it by the student's Laplace evidence, :func:`evidence_temperature`). The student is
fitted by the same :func:`~pyro_distill.inference.fit_posterior` as the teacher, maximizing the ELBO
``E_q[log p(y | X, w)] - KL(q || p_teacher-derived)`` (paper eq. 2, closed-form KL), starting from the prior
mean (``init="prior"``: MAP from the prior mean, then Laplace, then SVI).

:func:`reduced_posterior` is the same-data alternative (Bayesian model reduction): the conditioned teacher
posterior is the *start*, the student's own fan-in prior the prior, so no datum is counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .arrays import as_data, as_prior
from .gaussian import STRUCTURE_ALIASES, DenseGaussian, DiagGaussian, Gaussian, StructureError, structure_name
from .inference import FitHistory, fit_map, fit_posterior
from .nets.base import BayesianNet
from .surgery.base import Reduction, savage_dickey

__all__ = ["DistillResult", "student_prior", "distill", "savage_dickey", "model_reduction", "reduced_posterior",
           "evidence_temperature", "EVIDENCE_TAU_BOUNDS", "SAMPLED_CURVATURE_RATIO", "divided_prior"]

#: the search range of ``tau="evidence"`` (see :func:`evidence_temperature` for why it starts at 1)
EVIDENCE_TAU_BOUNDS = (1.0, 1e3)

#: ``curvature="auto"`` of :func:`evidence_temperature` samples the GGN diagonal when its exact form needs more
#: than this many times the backward passes per example (a sequence model: target positions x (classes - 1))
SAMPLED_CURVATURE_RATIO = 16


@dataclass
class DistillResult:
    """What :func:`distill` returns: the student network, its fitted posterior, the (tempered) prior it
    was fitted under, the plan that made it, and the fit history. Unpacks as ``net, posterior, history``."""

    net: BayesianNet
    posterior: Gaussian
    prior: Gaussian
    plan: Any
    history: FitHistory
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.net, self.posterior, self.history))

    def __repr__(self) -> str:
        ops = len(self.plan) if hasattr(self.plan, "__len__") else "?"
        return (f"DistillResult(net={self.net!r}, posterior={self.posterior.kind} p={self.posterior.dim}, "
                f"prior={self.prior.kind}, plan={ops} ops, history={self.history!r}, info={self.info})")


def _check_tau(tau: float | str) -> None:
    if tau == "evidence":
        return
    if isinstance(tau, str) or not tau >= 1:
        raise ValueError(f"prior temperature tau must be >= 1 (1 = the teacher's posterior as it is, larger = weaker) "
                         f"or 'evidence' (chosen by the student's log evidence); got {tau!r}")


def student_prior(teacher_net: BayesianNet, teacher_posterior: Gaussian, student_net: BayesianNet,
                  selector: str = "snr", tau: float | str = 1.0, seed: int = 0, ops: Sequence[Any] | None = None,
                  X: torch.Tensor | None = None, y: torch.Tensor | None = None,
                  evidence: dict[str, Any] | None = None) -> tuple[BayesianNet, Gaussian, Any]:
    """``(student net, teacher-derived prior tempered by tau, plan)``.

    ``ops`` replays a given plan; otherwise ``surgery.plan(teacher, student, selector=...)`` makes one.
    ``tau="evidence"`` chooses the temperature by :func:`evidence_temperature` on the student's training data
    ``(X, y)`` (keywords in ``evidence``); the chosen value and its evidence go to ``prior.meta``
    (``tau``, ``tau_rule``, ``log_evidence``, ``tau_at_bound``).
    """
    from . import surgery

    _check_tau(tau)
    teacher_posterior = as_prior(teacher_posterior, teacher_net)
    if tau == "evidence" and (X is None or y is None):
        raise ValueError("tau='evidence' scores temperatures on the student's training data: pass X and y")
    if ops is None:
        ops = surgery.plan(teacher_net, student_net, selector=selector, posterior=teacher_posterior, seed=seed)
    net, prior = surgery.apply(ops, teacher_net, teacher_posterior)
    if net.config() != student_net.config():
        raise ValueError(f"the plan produced {net!r}, not the requested student {student_net!r}; make a new plan")
    prior.layout = net.layout
    if tau == "evidence":
        value, info = evidence_temperature(net, prior, X, y, seed=seed, **(evidence or {}))
        meta = {"tau": value, "tau_rule": "evidence", "log_evidence": info["log_evidence"],
                "log_evidence_tau1": info["log_evidence_tau1"], "tau_at_bound": info["at_bound"],
                "evidence_structure": info["structure"]}
        prior = prior.tempered(value) if value != 1 else prior
        prior.meta = dict(prior.meta) | meta
    elif tau != 1:
        prior = prior.tempered(float(tau))
        prior.meta = dict(prior.meta) | {"tau": float(tau)}
    prior.layout = net.layout
    return net, prior, ops


def distill(teacher_net: BayesianNet, teacher_posterior: Gaussian, student_net: BayesianNet,
            X: torch.Tensor, y: torch.Tensor, selector: str = "snr", tau: float | str = 1.0, guide: str = "dense",
            steps: int = 500, map_steps: int = 100, seed: int = 0, ops: Sequence[Any] | None = None,
            evidence: dict[str, Any] | None = None, **fit_kwargs: Any) -> DistillResult:
    """Fit ``student_net`` on ``(X, y)`` under the prior derived from the teacher's posterior.

    ``selector`` chooses which neurons go (``"snr"``, ``"magnitude"``, ``"random"``, ``"evidence"``), ``tau``
    tempers the prior (a number >= 1, or ``"evidence"``: chosen on ``(X, y)``, see :func:`evidence_temperature`;
    ``evidence`` holds its keywords), ``guide`` is the student's posterior structure; ``steps``/``map_steps`` and
    any other keyword (``lr``, ``num_particles``, ``callback``, ``eval_every``, ...) go to ``fit_posterior``.
    """
    X, y = as_data(X, y)
    ev = {"map_steps": map_steps} | dict(evidence or {})
    net, prior, ops = student_prior(teacher_net, teacher_posterior, student_net, selector=selector, tau=tau,
                                    seed=seed, ops=ops, X=X, y=y, evidence=ev)
    dtype = X.dtype if X.is_floating_point() else prior.dtype
    prior = prior.to(X.device, dtype)
    fit_kwargs.setdefault("init", "prior")
    post, hist = fit_posterior(net, X, y, guide=guide, prior=prior, steps=steps, map_steps=map_steps, seed=seed,
                               **fit_kwargs)
    tau_value = float(prior.meta.get("tau", 1.0)) if tau == "evidence" else float(tau)
    info: dict[str, Any] = {"tau": tau_value, "selector": selector, "guide": guide}
    if tau == "evidence":
        info |= {"tau_rule": "evidence", "log_evidence": prior.meta["log_evidence"],
                 "tau_at_bound": prior.meta["tau_at_bound"]}
    post.meta = dict(post.meta) | {"prior": "teacher-derived", "tau": tau_value, "selector": selector}
    return DistillResult(net, post, prior, ops, hist, info)


# ============================================================================ Bayesian model reduction
def model_reduction(ops: Sequence[Any], teacher_net: BayesianNet, teacher_posterior: Gaussian,
                    teacher_prior: Gaussian | None = None) -> tuple[BayesianNet, Gaussian, float]:
    """``(student net, conditioned teacher posterior, log evidence change)`` of a plan, by Bayesian model reduction.

    Each operation conditions the current posterior ``q`` on its fixed coordinates ``u_I = v`` (and marginalizes
    unused ones); the log evidence changes by :func:`savage_dickey` ``log q(u_I = v) - log p0(u_I = v)``, with
    ``p0`` the prior the teacher was fitted under (default: the teacher's fan-in prior) carried through the same
    operations. Summing over the operations gives the joint ratio of the whole plan (chain rule:
    ``q(u_I1, u_I2) = q(u_I1) q(u_I2 | u_I1)``, likewise ``p0``). A structure that cannot marginalize a removed
    set exactly (Kronecker) gives ``nan`` for the change; the conditioned posterior is still exact.
    """
    p0 = teacher_prior if teacher_prior is not None else teacher_net.default_prior(torch.float64,
                                                                                   teacher_posterior.device)
    if teacher_posterior.dim != teacher_net.num_params:
        raise ValueError(f"the posterior has {teacher_posterior.dim} coordinates but {teacher_net!r} has "
                         f"p={teacher_net.num_params}")
    state, delta = Reduction(teacher_net, teacher_posterior, p0), 0.0
    for op in ops:
        I, v, _ = op.removed(state.net)
        if I.numel() and math.isfinite(delta):
            try:
                delta += float(savage_dickey(state.q, state.p0, I, v))
            except StructureError:
                delta = float("nan")
        state.step(op)
    return state.net, state.q, delta


def reduced_posterior(teacher_net: BayesianNet, teacher_posterior: Gaussian, student_net: BayesianNet,
                      X: torch.Tensor, y: torch.Tensor, selector: str = "snr", guide: str = "dense", steps: int = 500,
                      seed: int = 0, ops: Sequence[Any] | None = None, teacher_prior: Gaussian | None = None,
                      **fit_kwargs: Any) -> DistillResult:
    """The student's posterior by Bayesian model reduction (BMR) of the teacher's, refined by SVI.

    Derivation. Let the teacher's posterior be ``q(u) ~= p(u | D) ∝ p(D | u) p0(u)`` and let the student be the
    teacher with ``u_I`` fixed to ``v`` (surgery: the fixed network computes the student's function). The reduced
    model's prior is ``p0(u_K | u_I = v)``; for an independent prior (the fan-in prior) that is ``p0(u_K)``.
    Its posterior is ``p(u_K | D, u_I = v) ∝ p(D | u_K, v) p0(u_K | v)``, which is exactly the full posterior
    conditioned on ``u_I = v``: ``p(u_K, v | D) = p(D | u_K, v) p0(u_K | v) p0(v) / p(D)``. So conditioning the
    Gaussian ``q`` (what surgery does) *is* the BMR posterior of the student, with no further use of ``D``, and
    the evidence changes by the Savage-Dickey ratio (:func:`savage_dickey`)::

        log p(D | student) - log p(D | teacher) = log q(u_I = v) - log p0(u_I = v).

    Both are exact for Bayesian linear regression (``tests/test_reduction.py``) and as good as ``q`` otherwise.
    Hence on the teacher's own data (or a subset), the conditioned Gaussian is a *posterior*, not a prior: using
    it as the prior of an ELBO on ``D`` counts ``D`` twice. Here it is the SVI *start* (mean and covariance as
    they are: no MAP restart, no Laplace), and the ELBO's prior is the student's own fan-in prior, so the data
    enter once, through the likelihood. The fan-in prior of a layer whose input width shrank differs from the
    teacher's; SVI absorbs that (and the error of ``q``) in ``steps`` steps.

    Returns a :class:`DistillResult` whose ``prior`` is the student's fan-in prior and whose
    ``info["log_evidence_change"]`` is the plan's Savage-Dickey log evidence change (:func:`model_reduction`).
    Keywords go to :func:`~pyro_distill.inference.fit_posterior` (``map_steps`` is unused: there is no MAP).
    """
    from . import surgery

    X, y = as_data(X, y)
    if ops is None:
        ops = surgery.plan(teacher_net, student_net, selector=selector, posterior=teacher_posterior, seed=seed)
    net, start, delta = model_reduction(ops, teacher_net, teacher_posterior, teacher_prior)
    if net.config() != student_net.config():
        raise ValueError(f"the plan produced {net!r}, not the requested student {student_net!r}; make a new plan")
    dtype = X.dtype if X.is_floating_point() else start.dtype
    start = start.to(X.device, dtype)
    if structure_name(guide, "guide") == "dense" and not isinstance(start, DenseGaussian):
        start = DenseGaussian.from_covariance(start.loc, start.covariance(), layout=start.layout, meta=start.meta)
    start.layout = net.layout
    prior = net.default_prior(dtype, X.device)
    fit_kwargs.pop("init", None)
    fit_kwargs.pop("map_steps", None)
    post, hist = fit_posterior(net, X, y, guide=guide, prior=prior, init=start, steps=steps, seed=seed,
                               **fit_kwargs)
    info = {"method": "reduced_posterior", "log_evidence_change": delta, "selector": selector, "guide": guide}
    post.meta = dict(post.meta) | {"prior": "standard (fan-in)", "start": "conditioned teacher posterior",
                                   "log_evidence_change": delta, "selector": selector}
    return DistillResult(net, post, prior, ops, hist, info)


# ============================================================================ temperature by evidence
def evidence_temperature(net: BayesianNet, prior: Gaussian, X: torch.Tensor, y: torch.Tensor,
                         bounds: tuple[float, float] = EVIDENCE_TAU_BOUNDS, map_steps: int = 300,
                         map_lr: float = 1e-2, structure: str = "auto", dense_max: int = 4000, seed: int = 0,
                         batch_size: int | None = None, grid: int = 401, curvature: str = "auto",
                         samples: int = 4) -> tuple[float, dict[str, Any]]:
    """The temperature ``tau`` of the prior ``N(mu, tau S)`` that maximizes the student's log evidence on its own
    training data ``(X, y)`` (the Laplace / quadratic-model evidence of :mod:`pyro_distill.evidence`).

    Expansion point: the MAP of ``net`` under ``prior`` at ``tau = 1``, ``map_steps`` Adam steps from the prior
    mean (``map_steps=0``: the prior mean itself). The evidence at every ``tau`` uses the same quadratic model
    with the term ``h`` that corrects for the point not being that ``tau``'s MAP (exact for a model linear in
    ``w``). Curvature (``structure="auto"``): the dense GGN when ``p <= dense_max`` (any prior structure: the
    prior's covariance is made dense, O(p^3) once); above that a diagonal GGN with a diagonal prior, and for a
    correlated (low-rank, Kronecker, dense) prior its diagonal surrogate ``N(mu, tau diag(S))`` -- recorded as
    ``structure="diag-surrogate"``, an approximation that ignores the prior's correlations. With a diagonal GGN
    the Newton-step term is unreliable (it can blow the evidence up), so that path scores MacKay's form instead,
    the expansion point standing for every ``tau``'s MAP (``evidence.log_evidence(mode="laplace")``)::

        log Z(tau) = l0 - 1/(2 tau) sum_i a_i^2 / s_i - 1/2 sum_i log(1 + tau s_i G_ii),   a = mu - m0.

    Why ``bounds`` start at 1 by default. The teacher's posterior already holds the teacher's data; when the
    student's data are those data (or a subset), the evidence is computed on data the prior has seen, and is
    biased towards sharper priors: as ``tau -> 0`` the prior collapses onto its mean, whose likelihood on those
    data is near its maximum, so the evidence rewards the double counting rather than detecting it. ``tau < 1``
    would also claim more certainty than the teacher's own posterior, which no data justify. So ``tau`` is
    searched continuously (log-grid, then golden section) over ``[1, 1e3]``; ``info["at_bound"]`` flags an
    optimum at 1 (the data would have liked a sharper prior). On genuinely new data pass e.g.
    ``bounds=(1e-2, 1e3)``.

    Diagonal curvature (``curvature``): ``"exact"`` (``GGN.diagonal()``: one backward pass per output group and
    factor column, ``groups x (C - 1)`` per example: ~0.4 s per sequence for the RNN dates student), ``"sampled"``
    (``GGN.diagonal("sampled", samples, seed)``: the sampled-label Fisher, unbiased for the GGN diagonal, ``samples``
    backward passes per example; 4 draws: ~6 ms per dates sequence, tau within 0.2% of the exact diagonal's on 200
    sequences, ``benchmarks/laplace_scale.py``), ``"auto"`` (default): sampled when the exact diagonal needs more than
    :data:`SAMPLED_CURVATURE_RATIO` times the passes of the sampled one and has no closed form (not an MLP), else
    exact. The dense path is always exact (``curvature="sampled"`` with ``structure="dense"`` is refused).

    Returns ``(tau, info)``, ``info``: ``log_evidence`` (at ``tau``), ``log_evidence_tau1``, ``at_bound``,
    ``structure``, ``curvature`` (``"exact"`` or ``"sampled"``), ``map_steps``.
    """
    from .evidence import _to_double, log_evidence, optimize_temperature, quadratic_model

    X, y = as_data(X, y)
    structure = STRUCTURE_ALIASES.get(structure, structure)  # "mvn" = "dense"
    if structure not in ("auto", "dense", "diag"):
        raise ValueError(f"evidence structure must be 'auto', 'dense' or 'diag', got {structure!r}")
    if prior.dim != net.num_params:
        raise ValueError(f"the prior has {prior.dim} coordinates, the network p={net.num_params}")
    if curvature not in ("auto", "exact", "sampled"):
        raise ValueError(f"evidence curvature must be 'auto', 'exact' or 'sampled', got {curvature!r}")
    if curvature == "sampled" and structure == "dense":
        raise ValueError("a sampled curvature is a diagonal: pass structure='diag' (or 'auto') with "
                         "curvature='sampled', or curvature='exact' for the dense GGN")
    dtype = X.dtype if X.is_floating_point() else prior.dtype
    px = prior.to(X.device, dtype)
    w0 = px.loc.detach().clone()
    if map_steps > 0:
        w0, _ = fit_map(net, X, y, px, init=w0, steps=map_steps, lr=map_lr, seed=seed, batch_size=batch_size,
                        progress=False)
    kind = structure if structure != "auto" else ("dense" if net.num_params <= dense_max else "diag")
    if curvature == "sampled":
        kind = "diag"
    est = "exact" if kind == "dense" else _diag_estimator(net, w0, X, y, curvature, samples)
    if est == "sampled":
        quad = _sampled_quadratic_model(net, w0, X, y, samples, seed)
    else:
        quad = quadratic_model(net, w0, X, y, kind, seed=seed)
    scored = prior.to(dtype=torch.float64)
    label = kind
    if kind == "diag" and not isinstance(scored, DiagGaussian):
        scored = DiagGaussian(scored.loc, scored.variance.sqrt(), layout=scored.layout)
        label = "diag-surrogate"
    mode = "quadratic" if kind == "dense" else "laplace"
    if mode == "quadratic":
        tau, info = optimize_temperature(quad, scored, bounds=bounds, grid=grid)
    else:
        qd = _to_double(quad)
        c = float(scored.mahalanobis(qd.m0.to(scored.loc)))
        sg = (scored.variance * qd.G.to(scored.variance)).clamp_min(0)
        l0 = float(qd.l0)

        def f(log_tau: float) -> float:
            t = math.exp(log_tau)
            return l0 - 0.5 * c / t - 0.5 * float(torch.log1p(t * sg).sum())

        tau, info = _maximize_log(f, bounds, grid)
    with torch.no_grad():
        ev1 = float(log_evidence(_to_double(quad), scored, mode)) if bounds[0] <= 1 <= bounds[1] else float("nan")
    return tau, {"log_evidence": info["log_evidence"], "log_evidence_tau1": ev1, "at_bound": info["at_bound"],
                 "structure": label, "mode": mode, "map_steps": map_steps, "bounds": list(bounds), "curvature": est}


def _diag_estimator(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, curvature: str,
                    samples: int) -> str:
    """``"exact"`` or ``"sampled"`` for the diagonal GGN (``curvature="auto"``: see :func:`evidence_temperature`)."""
    from .curvature import GGN
    from .nets.mlp import MLP

    if curvature != "auto":
        return curvature
    if isinstance(net, MLP):
        return "exact"
    op = GGN(net, w.detach(), X[:1], None if y is None else y[:1])
    ratio = op.backward_passes("exact") / op.backward_passes("sampled", samples)
    return "sampled" if ratio > SAMPLED_CURVATURE_RATIO else "exact"


def _sampled_quadratic_model(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, samples: int,
                             seed: int) -> Any:
    """``evidence.quadratic_model(..., "diag")`` with the GGN diagonal sampled (``GGN.diagonal("sampled")``)."""
    from .curvature import GGN
    from .evidence import QuadraticModel

    w = w.detach()
    l0, g = net.log_likelihood_and_grad(w, X, y)
    G = GGN(net, w, X, y).diagonal("sampled", samples=samples, seed=seed)
    return QuadraticModel(w, l0, g, "diag", G, info={"curvature": "sampled", "samples": int(samples)})


def _maximize_log(f: Any, bounds: tuple[float, float], grid: int) -> tuple[float, dict[str, Any]]:
    """Maximize ``f(log tau)`` over ``bounds``: a log-spaced grid, then golden section around its best point."""
    xs = torch.linspace(math.log(bounds[0]), math.log(bounds[1]), grid, dtype=torch.float64).tolist()
    vals = [f(x) for x in xs]
    i = max(range(grid), key=vals.__getitem__)
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, grid - 1)]
    gr = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - gr * (b - a), a + gr * (b - a)
        if f(c) > f(d):
            b = d
        else:
            a = c
    best = max((f(0.5 * (a + b)), 0.5 * (a + b)), (vals[i], xs[i]))
    return math.exp(best[1]), {"log_evidence": best[0], "at_bound": i in (0, grid - 1)}



# ============================================================================ dividing the overlap out
def divided_prior(net: BayesianNet, prior: Gaussian, X: torch.Tensor, y: torch.Tensor,
                  floor: float | None = None, dense_max: int = 4000) -> tuple[DenseGaussian, dict[str, Any]]:
    """The teacher-derived ``prior`` with the student's own data divided out: ``prior / p(y | X, w)``.

    ``prior`` (the conditioned teacher posterior) already holds ``(X, y)`` when they are (part of) the teacher's
    data. With the log-likelihood's quadratic model at the prior mean ``m`` (value, gradient ``g``, GGN ``G``),
    the likelihood is a Gaussian factor with natural parameters ``(g + G m, G)``; dividing it out of
    ``N(m, S)`` subtracts them::

        Lambda = S^{-1} - G,      eta = S^{-1} m - (g + G m),      mean = Lambda^{-1} eta.

    Exact for Bayesian linear regression (it returns the prior the posterior came from); for a network, and
    whenever the teacher saw the data in a different way, ``Lambda`` can lose positive definiteness: its
    eigenvalues are clipped from below at ``floor`` (default: the smallest precision of the student's fan-in
    prior, the weakest prior the student would have had without a teacher). Dense only (``p <= dense_max``).
    Returns the prior and ``{"clipped": number of clipped eigenvalues, "floor": floor}``.
    """
    from .evidence import quadratic_model

    X, y = as_data(X, y)
    if net.num_params > dense_max:
        raise ValueError(f"divided_prior works densely: p={net.num_params} > dense_max={dense_max}; use a smaller "
                         "student or raise dense_max")
    if prior.dim != net.num_params:
        raise ValueError(f"the prior has {prior.dim} coordinates, the network p={net.num_params}")
    p64 = prior.to(dtype=torch.float64)
    dtype = X.dtype if X.is_floating_point() else torch.float64
    quad = quadratic_model(net, prior.loc.detach().to(X.device, dtype), X, y, "dense")
    G = quad.G.to(p64.loc)
    g = quad.grad.to(p64.loc)
    m = p64.loc
    P = p64.precision()
    Lam = P - G
    Lam = 0.5 * (Lam + Lam.T)
    eta = P @ m - (g + G @ m)
    if floor is None:
        floor = float((1 / net.default_prior(torch.float64).variance).min())
    evals, V = torch.linalg.eigh(Lam)
    clipped = int((evals < floor).sum())
    evals = evals.clamp_min(floor)
    cov = (V / evals) @ V.T
    mean = cov @ eta
    out = DenseGaussian.from_covariance(mean, 0.5 * (cov + cov.T), layout=prior.layout,
                                        meta=dict(prior.meta) | {"divided": True, "clipped": clipped})
    return out, {"clipped": clipped, "floor": floor}
