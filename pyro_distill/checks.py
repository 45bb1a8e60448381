"""Input validation and the loss-growth guard of the fitting loops (called from :mod:`pyro_distill.inference`).

Every check raises ``ValueError`` naming the argument, the bad value and the fix, before any work starts, so
that bad inputs are never reported later as a numerical divergence. :class:`LossGuard` is the divergence
guard's second half: besides a non-finite loss (checked in the loops), a loss that grows by orders of
magnitude over its starting value, ``loss > start + GROWTH_FACTOR * max(|start|, 1)``, stops the fit with
:class:`pyro_distill.inference.DivergenceError` (a fit that far from its start is numerically broken, not
slowly converging), and a linear-algebra failure (e.g. a Cholesky factorization of a covariance that stopped
being positive definite) inside a step is reported the same way, with the step and the last good state.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = [
    "GROWTH_FACTOR",
    "LINALG_ERRORS",
    "LossGuard",
    "count",
    "positive",
    "batch_size",
    "float_dtype",
    "data",
]

#: a loss larger than ``start + GROWTH_FACTOR * max(|start|, 1)`` counts as divergence
GROWTH_FACTOR = 1e3
#: what a factorization inside a step raises when its matrix is not positive definite / singular
LINALG_ERRORS: tuple[type[BaseException], ...] = (torch.linalg.LinAlgError,)
#: floating dtypes a fit may run in (half precision underflows the log-likelihoods and the Cholesky factors)
FIT_DTYPES = (torch.float32, torch.float64)


def count(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as a plain ``int >= minimum`` (numpy and torch integers accepted); else a clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value.item())
        else:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__}); "
                             f"pass a whole number such as {max(minimum, 1) * 100}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass a whole number such as "
                         f"{max(minimum, 1) * 100}")
    return value


def positive(name: str, value: Any) -> float:
    """``value`` as a finite ``float > 0`` (learning rates, scales); else a clear ValueError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if isinstance(value, bool) or not v > 0 or v == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; a typical value is 1e-3")
    return v


def batch_size(value: Any) -> int | None:
    """``None`` (full batch) or an integer ``>= 1``."""
    if value is None:
        return None
    return count("batch_size", value, minimum=1)


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fit runs in: float32 or float64 only (float16/bfloat16 are refused with the reason)."""
    if dtype not in FIT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported for fitting: half precision underflows the summed "
                         "log-likelihoods and breaks the Cholesky factors of the covariance; use torch.float32 "
                         "or torch.float64 (TOML: data.dtype = \"float32\" or \"float64\")")
    return dtype


def data(net: Any, X: torch.Tensor, y: torch.Tensor) -> None:
    """The training data are usable: tensors, at least one row, finite inputs, labels ``(N,)`` and finite."""
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"X and y must be torch tensors, got {type(X).__name__} and {type(y).__name__}; "
                         "convert with torch.as_tensor")
    if X.dim() == 0 or X.shape[0] == 0 or y.numel() == 0:
        raise ValueError(f"the training data are empty (X {tuple(X.shape)}, y {tuple(y.shape)}); "
                         "pass at least one example")
    if getattr(net, "embedding", None) == "patch" and X.dim() == 3:  # NaN rows are the transformer's padding
        nan = torch.isnan(X)
        if bool(torch.isinf(X).any()) or bool((nan.any(-1) & ~nan.all(-1)).any()):
            raise ValueError("X holds inf values or partly-NaN positions; a padded position must be a whole NaN row "
                             "(and nothing else may be NaN or inf): clean the inputs before fitting")
    elif X.is_floating_point() and not bool(torch.isfinite(X).all()):
        bad = int((~torch.isfinite(X)).any(dim=tuple(range(1, X.dim())) if X.dim() > 1 else 0).sum())
        raise ValueError(f"X holds NaN or inf values (in {bad} of {X.shape[0]} rows); remove or impute those rows "
                         "before fitting")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).reshape(y.shape[0], -1).any(-1).sum()) if y.dim() else 1
        raise ValueError(f"y holds NaN or inf values ({bad} of {y.shape[0] if y.dim() else 1} labels); remove "
                         "those examples before fitting")
    if y.dim() == 0:
        raise ValueError(f"y must have one entry per row of X (shape ({X.shape[0]},)), got a scalar")
    if y.dim() == 2 and y.shape[1] == 1 and not hasattr(net, "split"):  # seq2seq nets take [N, T] targets
        raise ValueError(f"y has shape {tuple(y.shape)}; it must be ({y.shape[0]},), one label per row: flatten it "
                         "with y.reshape(-1)")


class LossGuard:
    """Watches a minimized loss: :meth:`exploded` is true once it exceeds its first value by orders of
    magnitude. It also keeps a copy of the parameters every ``every`` steps (:meth:`keep`), the state to
    hand back when a later step fails."""

    def __init__(self, factor: float = GROWTH_FACTOR, every: int = 50):
        self.factor = float(factor)
        self.every = max(1, int(every))
        self.start: float | None = None
        self.snapshot: Any = None
        self.snapshot_step = 0

    def exploded(self, loss: float) -> bool:
        """True when ``loss > start + factor * max(|start|, 1)`` (the first finite loss seen is the start)."""
        if self.start is None:
            self.start = float(loss)
            return False
        return float(loss) > self.start + self.factor * max(abs(self.start), 1.0)

    def limit(self) -> float:
        """The loss above which :meth:`exploded` is true."""
        return float("inf") if self.start is None else self.start + self.factor * max(abs(self.start), 1.0)

    def keep(self, step: int, state: torch.Tensor, force: bool = False) -> None:
        """Copy ``state`` (the parameters before step ``step``) every ``every`` steps, or now if ``force``."""
        if force or self.snapshot is None or step % self.every == 0:
            self.snapshot = state.detach().clone()
            self.snapshot_step = step
