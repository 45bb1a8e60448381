"""The one point-estimate fitting loop: Adam over a flat weight vector ``w`` on a loss closure.

Every point estimate in the library is fitted here: MAP (:func:`pyro_distill.inference.fit_map`), the point
baselines (:mod:`pyro_distill.baselines`: deterministic, Hinton KD, prune + fine-tune, token-level KD,
TinyBERT-style KD). A step draws a minibatch ``idx`` (``batch_size`` rows with replacement, or ``None`` = the
full batch), evaluates ``loss(w, idx)`` and takes one Adam step. The divergence guard is the library's: a
non-finite loss, a linear-algebra failure inside the loss, or a loss grown past
``start + GROWTH_FACTOR * max(|start|, 1)`` (:class:`pyro_distill.checks.LossGuard`) stops the fit with
:class:`DivergenceError`, which carries the step and the last good weights.

Also home of :class:`FitHistory` and :class:`DivergenceError` (re-exported by :mod:`pyro_distill.inference`),
so that this module needs nothing above :mod:`pyro_distill.gaussian` (callbacks get the weights as a
:class:`~pyro_distill.gaussian.PointMass`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import checks
from .gaussian import PointMass

if TYPE_CHECKING:
    from .gaussian import Gaussian

__all__ = ["DivergenceError", "FitHistory", "LossClosure", "SCHEDULES", "fit_point"]

#: step-size schedules of :func:`fit_point` (the MAP phase of every fit)
SCHEDULES = ("constant", "cosine")

#: ``loss(w, idx)``: the scalar loss of weights ``w`` on the rows ``idx`` (a long tensor) or on all rows (``None``)
LossClosure = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class DivergenceError(RuntimeError):
    """SVI or MAP produced a non-finite loss or gradient. ``last_good`` holds the state before that step."""

    def __init__(self, msg: str, step: int, last_good: Gaussian | torch.Tensor | None, history: FitHistory):
        super().__init__(msg)
        self.step = step
        self.last_good = last_good
        self.history = history


@dataclass
class FitHistory:
    """What happened during a fit: losses per step, wall time, and the ELBO at start and end."""

    map_loss: list[float] = field(default_factory=list)
    elbo: list[float] = field(default_factory=list)
    time_s: list[float] = field(default_factory=list)
    elbo_start: float | None = None
    elbo_end: float | None = None
    map_time_s: float = 0.0
    laplace_time_s: float = 0.0
    svi_time_s: float = 0.0
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    #: the MAP point the posterior fit started from (``fit_posterior`` with ``map_steps > 0``), kept so a run can
    #: check the posterior's predictive against its own MAP point
    map_weights: torch.Tensor | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        e = (f", ELBO {self.elbo_start:.1f} -> {self.elbo_end:.1f}" if self.elbo_start is not None
             and self.elbo_end is not None else "")
        return (f"FitHistory(map_steps={len(self.map_loss)}, svi_steps={len(self.elbo)}{e}, "
                f"time {self.map_time_s + self.laplace_time_s + self.svi_time_s:.1f}s, curves={sorted(self.curves)})")

    def log(self, name: str, step: int, value: float) -> None:
        self.curves.setdefault(name, []).append((step, float(value)))

    def to_dict(self) -> dict[str, Any]:
        """The plain fields (losses, times, curves, info); the MAP weights tensor is left out."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "map_weights"}


def fit_point(loss: LossClosure, init: torch.Tensor, n: int, steps: int, lr: float, batch_size: int | None = None,
              generator: torch.Generator | None = None, extra_params: Sequence[torch.Tensor] = (),
              history: FitHistory | None = None,
              callback: Callable[[int, PointMass], dict[str, float] | None] | None = None, eval_every: int = 0,
              name: str = "MAP", hint: str = "lower lr",
              progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
              schedule: str = "constant") -> tuple[torch.Tensor, FitHistory]:
    """Minimize ``loss(w, idx)`` over ``w`` (started at a copy of ``init``) by ``steps`` Adam steps of size ``lr``.

    ``idx``: ``batch_size`` row indices of ``range(n)`` drawn with replacement each step from ``generator``
    (the global torch generator when ``None``), or ``None`` (full batch) when ``batch_size`` is ``None`` or
    ``>= n``. ``extra_params`` (e.g. a log noise scale the closure reads) are optimized in the same Adam,
    after ``w``. Every ``eval_every`` steps ``callback(step, PointMass(w))`` runs; a dict it returns goes into
    ``history.curves``. ``history.map_loss`` gets the loss of every step. ``name`` and ``hint`` word the
    :class:`DivergenceError` ("``name`` diverged at step k: ...; ``hint`` (now lr)"). ``progress`` wraps the
    step range (a tqdm bar; its ``set_postfix`` is called every 50 steps). ``schedule``: ``"constant"`` (Adam at
    ``lr`` throughout) or ``"cosine"`` (the step size decays from ``lr`` to 0 on a half cosine over ``steps``, so a
    minibatch fit ends at a converged point rather than at a noisy iterate). Returns the weights and the history.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    history = history if history is not None else FitHistory()
    w = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, *extra_params], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)) if schedule == "cosine" else None
    device = init.device
    t0 = time.perf_counter()
    it = progress(range(steps)) if progress is not None else range(steps)
    guard = checks.LossGuard()
    for step in it:
        idx = None if batch_size is None or batch_size >= n else torch.randint(
            0, n, (batch_size,), device=device, generator=generator)
        opt.zero_grad(set_to_none=True)
        try:
            value = loss(w, idx)
        except checks.LINALG_ERRORS as exc:
            raise DivergenceError(f"{name} diverged at step {step}: {type(exc).__name__} "
                                  f"({str(exc).splitlines()[0]}); last good weights from step {guard.snapshot_step}; "
                                  f"{hint} (now {lr})", step, guard.snapshot, history) from exc
        if not bool(torch.isfinite(value)):
            raise DivergenceError(f"{name} diverged at step {step}: loss is {value.item()}; {hint} (now {lr})",
                                  step, w.detach().clone(), history)
        if guard.exploded(float(value.detach())):
            raise DivergenceError(f"{name} diverged at step {step}: the loss grew from {guard.start:.4g} to "
                                  f"{float(value.detach()):.4g} (more than {checks.GROWTH_FACTOR:g}x its start); last "
                                  f"good weights from step {guard.snapshot_step}; {hint} (now {lr})", step,
                                  guard.snapshot, history)
        guard.keep(step, w)
        value.backward()
        opt.step()
        if sched is not None:
            sched.step()
        history.map_loss.append(float(value.detach()))
        if callback is not None and eval_every and (step + 1) % eval_every == 0:
            for k, v in (callback(step + 1, PointMass(w.detach())) or {}).items():  # one type: a Gaussian
                history.log(k, step + 1, v)
        if step % 50 == 0 and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{float(value.detach()):.4f}")
    history.map_time_s += time.perf_counter() - t0
    return w.detach(), history
