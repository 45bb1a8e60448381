"""Seeded row subsets of a training split drawn with torch's generator (the sequence and transformer kinds).

:func:`pyro_distill.data.subsample` draws the MLP kind's stratified subsample with NumPy's generator; these two
draw with ``torch.Generator`` (the draws the RNN and transformer experiments were run with, kept so that their
numbers reproduce). :func:`holdout_indices` is the held-out split the teacher settings are chosen and reported on
(``benchmarks/teacher_quality.py``, ``benchmarks/teacher_calibration.py``).
"""

from __future__ import annotations

import torch

__all__ = ["holdout_indices", "random_indices", "stratified_indices"]


def _check(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"student.fractions must lie in (0, 1], got {fraction}")


def random_indices(n: int, fraction: float, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random ``fraction`` of ``n`` rows (at least one); ``None`` for fraction 1."""
    _check(fraction)
    if fraction == 1:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, round(fraction * n))].sort().values


def stratified_indices(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded, per-class ``fraction`` of the rows (at least one per class); ``None`` for 1."""
    _check(fraction)
    if fraction == 1:
        return None
    g = torch.Generator().manual_seed(seed)
    parts = []
    for c in torch.unique(y):
        members = (y == c).nonzero().reshape(-1)
        k = max(1, round(fraction * members.numel()))
        parts.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.cat(parts).sort().values


def holdout_indices(n: int, seed: int, labels: torch.Tensor | None = None,
                    fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, held_out)`` indices of ``n`` rows: a seeded ``fraction`` held out (scikit-learn's
    ``train_test_split`` with ``random_state=seed``, stratified by ``labels`` when given). The teacher-settings
    protocol calls it twice on a training split: ``seed`` for the report rows, then ``1000 + seed`` on the rest for
    the tuning rows."""
    from sklearn.model_selection import train_test_split

    kept, held = train_test_split(torch.arange(n).numpy(), test_size=fraction, random_state=seed,
                                  stratify=None if labels is None else labels.numpy())
    return torch.as_tensor(kept), torch.as_tensor(held)
