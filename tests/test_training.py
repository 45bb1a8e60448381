"""The point-estimate loop every MAP phase and point baseline runs (:func:`pyro_distill.training.fit_point`): its
step-size schedules."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_distill.training import SCHEDULES, fit_point


def _moves(schedule: str, steps: int = 40) -> list[float]:
    """How far each step moved the weights of a noisy least-squares fit (minibatches of 8 rows out of 64)."""
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
    seen: list[torch.Tensor] = [torch.zeros(5)]

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        rows = slice(None) if idx is None else idx
        return ((A[rows] @ w - b[rows]) ** 2).mean()

    def cb(step, point):
        seen.append(point.mean.clone())

    fit_point(loss, torch.zeros(5), 64, steps, 0.1, batch_size=8, generator=torch.Generator().manual_seed(1),
              callback=cb, eval_every=1, schedule=schedule)
    return [float((b_ - a_).norm()) for a_, b_ in zip(seen, seen[1:])]


def test_cosine_schedule_decays_the_step_to_zero() -> None:
    """Adam's steps have size ~lr per coordinate: with ``"cosine"`` the last step is ~lr (pi / T)^2 / 4, so the fit
    ends at a point instead of random-walking around the mode as the constant step does."""
    assert SCHEDULES == ("constant", "cosine")
    const, cos = _moves("constant"), _moves("cosine")
    assert len(const) == len(cos) == 40
    assert const[-1] > 0.02  # the constant step keeps moving the minibatch fit
    assert cos[-1] < 0.1 * (math.pi / 40) ** 2 * math.sqrt(5) + 1e-6 and cos[-1] < 0.05 * const[-1]
    assert cos[0] == pytest.approx(const[0])  # the first step is the same lr


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'linear'; use one of constant, cosine"):
        fit_point(lambda w, idx: (w**2).sum(), torch.zeros(2), 4, 3, 0.1, schedule="linear")
