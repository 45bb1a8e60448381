"""numpy (and other array-like) inputs at the public entry points, converted once to tensors.

The rule: a ``torch.Tensor`` passes unchanged; anything else goes through ``numpy.asarray`` and then
``float64 -> float64`` (asked for explicitly), every other float ``-> float32`` (torch's default),
every integer (the int64 labels numpy and scikit-learn produce, token ids) ``-> torch.long``, bool stays bool.
:func:`as_prior` does the same for Gaussians: a torch/Pyro ``MultivariateNormal``, ``LowRankMultivariateNormal`` or
``Independent(Normal)`` becomes the library's structure (``gaussian.as_gaussian``) with the network's layout.
Knows no data sets: ``fit_posterior``, ``fit_map``, ``metrics``, ``distill`` and ``baselines`` call it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_tensor", "as_data", "as_prior"]


def as_tensor(x: Any, name: str = "input") -> torch.Tensor:
    """``x`` as a tensor by the rule above (a tensor is returned as it is, never copied)."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}") from exc
    if a.dtype == np.float64:
        return torch.from_numpy(np.ascontiguousarray(a))
    if np.issubdtype(a.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if np.issubdtype(a.dtype, np.integer):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if a.dtype == np.bool_:
        return torch.from_numpy(np.ascontiguousarray(a))
    raise TypeError(f"{name} has numpy dtype {a.dtype}, which is neither float, integer nor bool; convert it "
                    "(e.g. X.astype(np.float32), y.astype(np.int64))")


def as_data(X: Any, y: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(X, y)`` as tensors (``y=None`` stays ``None``)."""
    return as_tensor(X, "X"), (None if y is None else as_tensor(y, "y"))


def as_prior(g: Any, net: Any = None) -> Any:
    """``None``, one of our Gaussians, or a torch/Pyro Gaussian distribution -> ``None`` or our structure, checked
    against ``net.num_params`` and given ``net.layout`` when it has none (``gaussian.as_gaussian``)."""
    if g is None:
        return None
    from .gaussian import as_gaussian

    return as_gaussian(g, None if net is None else net.num_params, None if net is None else net.layout)
