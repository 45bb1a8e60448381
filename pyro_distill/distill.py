"""Bayesian distillation end to end: teacher posterior -> plan -> student prior -> student posterior.

The student's prior is the teacher's posterior transformed by the plan's removals (exact Gaussian
conditioning, :mod:`pyro_distill.surgery`), optionally tempered: covariance times ``tau >= 1``
(``tau = 1`` is the paper's prior; a prior fitted on the same data counts that data twice, a larger
``tau`` discounts it). The student is fitted by the same :func:`~pyro_distill.inference.fit_posterior`
as the teacher, maximizing the ELBO ``E_q[log p(y | X, w)] - KL(q || p_teacher-derived)`` (paper eq. 2,
closed-form KL), starting from the prior mean (``init="prior"``: MAP from the prior mean, then Laplace,
then SVI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .arrays import as_data
from .gaussian import Gaussian
from .inference import FitHistory, fit_posterior
from .nets.base import BayesianNet

__all__ = ["DistillResult", "student_prior", "distill"]


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


def student_prior(teacher_net: BayesianNet, teacher_posterior: Gaussian, student_net: BayesianNet,
                  selector: str = "snr", tau: float = 1.0, seed: int = 0, ops: Sequence[Any] | None = None
                  ) -> tuple[BayesianNet, Gaussian, Any]:
    """``(student net, teacher-derived prior tempered by tau, plan)``.

    ``ops`` replays a given plan; otherwise ``surgery.plan(teacher, student, selector=...)`` makes one.
    """
    from . import surgery

    if not tau >= 1:
        raise ValueError(f"prior temperature tau must be >= 1 (1 = the teacher's posterior as it is, larger = "
                         f"weaker); got {tau}")
    if ops is None:
        ops = surgery.plan(teacher_net, student_net, selector=selector, posterior=teacher_posterior, seed=seed)
    net, prior = surgery.apply(ops, teacher_net, teacher_posterior)
    if net.config() != student_net.config():
        raise ValueError(f"the plan produced {net!r}, not the requested student {student_net!r}; make a new plan")
    if tau != 1:
        prior = prior.tempered(float(tau))
        prior.meta = dict(prior.meta) | {"tau": float(tau)}
    prior.layout = net.layout
    return net, prior, ops


def distill(teacher_net: BayesianNet, teacher_posterior: Gaussian, student_net: BayesianNet,
            X: torch.Tensor, y: torch.Tensor, selector: str = "snr", tau: float = 1.0, guide: str = "mvn",
            steps: int = 500, map_steps: int = 100, seed: int = 0, ops: Sequence[Any] | None = None,
            **fit_kwargs: Any) -> DistillResult:
    """Fit ``student_net`` on ``(X, y)`` under the prior derived from the teacher's posterior.

    ``selector`` chooses which neurons go (``"snr"``, ``"magnitude"``, ``"random"``, ``"evidence"``), ``tau``
    tempers the prior, ``guide`` is the student's posterior structure; ``steps``/``map_steps`` and any
    other keyword (``lr``, ``num_particles``, ``callback``, ``eval_every``, ...) go to ``fit_posterior``.
    """
    X, y = as_data(X, y)
    net, prior, ops = student_prior(teacher_net, teacher_posterior, student_net, selector=selector, tau=tau,
                                    seed=seed, ops=ops)
    dtype = X.dtype if X.is_floating_point() else prior.dtype
    prior = prior.to(X.device, dtype)
    fit_kwargs.setdefault("init", "prior")
    post, hist = fit_posterior(net, X, y, guide=guide, prior=prior, steps=steps, map_steps=map_steps, seed=seed,
                               **fit_kwargs)
    post.meta = dict(post.meta) | {"prior": "teacher-derived", "tau": float(tau), "selector": selector}
    return DistillResult(net, post, prior, ops, hist, {"tau": float(tau), "selector": selector, "guide": guide})
