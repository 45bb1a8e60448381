"""Model extraction from an argmax-only teacher: the student sees no training data and no labels.

The only access to the teacher is an **oracle** ``X -> top-1 labels`` (a ``Callable[[Tensor], Tensor]``), asked
on inputs the student chooses, at most ``budget`` of them. :func:`extract` takes the oracle, a **query source**
and the student; it has no parameter through which training data or labels could enter. Query sources
(all return inputs in the student's format, ``[n, *input_shape]``):

* :class:`GaussianQueries` -- ``x ~ N(0, I)``: Gaussian in the standardized scale of the teacher's inputs (the
  shipped data sets are standardized per feature, so this is "typical magnitude, no structure");
* :class:`PoolQueries` -- rows of an unlabeled pool, e.g. another data set shipped here: patches of
  scikit-learn's sample photographs (:func:`sample_image_patches`) for a digits teacher, the digits resized to
  28x28 (:func:`digits_images`) for a Fashion-MNIST teacher; :meth:`PoolQueries.from_dataset` reads only the
  object's ``X`` attribute (never ``y``);
* the active strategy of :func:`extract` (``strategy="entropy"``): rounds of queries, each round the
  ``k`` candidates of maximal predictive entropy under the current student among ``pool_factor * k`` drawn
  from the source (uncertainty sampling: queries near the student's decision boundaries).

The student is fitted by MAP (cross-entropy on the oracle's labels plus the fan-in prior's ``-log p(w) / n``:
:func:`pyro_distill.baselines.deterministic`), warm-started across rounds; the total number of optimizer steps
is ``steps`` whatever the strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .baselines import deterministic
from .gaussian import Gaussian
from .nets.base import BayesianNet
from .predictions import predictive

__all__ = ["Oracle", "QuerySource", "GaussianQueries", "PoolQueries", "BudgetedOracle", "BudgetExceeded",
           "teacher_oracle", "extract", "ExtractionResult", "STRATEGIES", "resize_images", "standardize",
           "sample_image_patches", "digits_images"]

#: a teacher that answers only top-1 labels: inputs ``[n, ...]`` -> labels ``[n]`` (integers)
Oracle = Callable[[torch.Tensor], torch.Tensor]
STRATEGIES = ("random", "entropy")


class QuerySource(Protocol):
    """Where queries come from: ``draw(n, generator)`` returns ``n`` inputs ``[n, *input_shape]``."""

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor: ...


class GaussianQueries:
    """``x ~ N(0, I)`` of shape ``input_shape`` (the standardized scale of the teacher's input space)."""

    def __init__(self, input_shape: Sequence[int], dtype: torch.dtype = torch.float32):
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = dtype

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, *self.input_shape, generator=generator, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"GaussianQueries({self.input_shape})"


class PoolQueries:
    """Rows of an unlabeled pool ``X`` ``[M, *input_shape]``, drawn without replacement while rows remain (then
    the pool is reshuffled: a row may be asked again). The pool holds inputs only."""

    def __init__(self, X: torch.Tensor, name: str = "pool"):
        if not isinstance(X, torch.Tensor) or X.dim() < 2 or X.shape[0] == 0:
            raise ValueError("a query pool needs a non-empty tensor of inputs [M, ...]")
        self.X, self.name = X, name
        self._order: torch.Tensor | None = None
        self._pos = 0

    @classmethod
    def from_dataset(cls, ds: Any, name: str | None = None) -> PoolQueries:
        """A pool from any object with an ``X`` attribute (a :class:`~pyro_distill.data.Dataset`, ...). Only ``X``
        is read: an object whose labels cannot be read works."""
        return cls(ds.X, name or getattr(ds, "name", "pool") or "pool")

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        out = []
        while n > 0:
            if self._order is None or self._pos >= len(self._order):
                self._order, self._pos = torch.randperm(self.X.shape[0], generator=generator), 0
            take = self._order[self._pos:self._pos + n]
            self._pos += take.numel()
            n -= take.numel()
            out.append(self.X[take])
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"PoolQueries({self.name!r}, {tuple(self.X.shape)})"


class BudgetExceeded(RuntimeError):
    """More queries were asked than the budget allows."""


class BudgetedOracle:
    """An oracle that counts its queries, refuses to exceed ``budget`` and checks its answers are ``[n]`` labels."""

    def __init__(self, oracle: Oracle, budget: int):
        if budget < 1:
            raise ValueError(f"the query budget must be >= 1, got {budget}")
        self.oracle, self.budget, self.used = oracle, int(budget), 0

    @property
    def left(self) -> int:
        return self.budget - self.used

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        n = X.shape[0]
        if n > self.left:
            raise BudgetExceeded(f"{n} queries asked but only {self.left} of the budget {self.budget} are left")
        self.used += n
        with torch.no_grad():
            lab = torch.as_tensor(self.oracle(X))
        if lab.shape != (n,) or lab.is_floating_point() or lab.is_complex():
            raise ValueError(f"the oracle must answer one integer label per query ([{n}]), got {lab.dtype} "
                             f"{tuple(lab.shape)}; an argmax oracle returns probs.argmax(-1)")
        return lab.long()


def teacher_oracle(net: BayesianNet, q: Gaussian | torch.Tensor, num_samples: int = 50, seed: int = 0,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Oracle:
    """The argmax of a teacher's posterior predictive: ``x -> argmax_c p_T(c | x)``, inputs passed through
    ``transform`` first (e.g. a reshape into the teacher's format). The student's code sees only the labels."""

    def oracle(X: torch.Tensor) -> torch.Tensor:
        Xt = transform(X) if transform is not None else X
        return predictive(net, q, Xt, num_samples=num_samples, seed=seed).argmax(-1)

    return oracle


@dataclass
class ExtractionResult:
    """The extracted student's weights, the queries asked and the oracle's answers, one dict per round."""

    weights: torch.Tensor
    queries: torch.Tensor
    labels: torch.Tensor
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return int(self.labels.shape[0])


def _entropy(student: BayesianNet, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(student.forward(w, X), -1)
    return -(logp.exp() * logp).sum(-1)


def extract(oracle: Oracle, student: BayesianNet, source: QuerySource, budget: int, strategy: str = "random",
            rounds: int = 4, pool_factor: int = 10, steps: int = 600, lr: float = 1e-2, seed: int = 0,
            batch_size: int | None = None, dtype: torch.dtype = torch.float32) -> ExtractionResult:
    """Fit ``student`` to the oracle's top-1 labels on at most ``budget`` queries from ``source``.

    ``strategy="random"``: all ``budget`` queries drawn from the source at once, one fit of ``steps`` steps.
    ``strategy="entropy"``: ``rounds`` rounds of ``budget / rounds`` queries; the first drawn from the source,
    each later one the highest-entropy of ``pool_factor`` times as many candidates under the current student;
    after each round a warm-started fit of ``steps / rounds`` steps on every answer so far.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown extraction strategy {strategy!r}; choose one of {STRATEGIES}")
    if rounds < 1 or pool_factor < 1:
        raise ValueError(f"rounds and pool_factor must be >= 1, got {rounds} and {pool_factor}")
    ask = BudgetedOracle(oracle, budget)
    gen = torch.Generator().manual_seed(seed)
    R = 1 if strategy == "random" else min(rounds, budget)
    sizes = [budget // R + (1 if r < budget % R else 0) for r in range(R)]
    step_sizes = [steps // R + (1 if r < steps % R else 0) for r in range(R)]
    Xq: list[torch.Tensor] = []
    yq: list[torch.Tensor] = []
    w = None
    log = []
    for r, (k, s) in enumerate(zip(sizes, step_sizes)):
        if r == 0 or w is None:
            Xr = source.draw(k, gen).to(dtype)
        else:
            cand = source.draw(k * pool_factor, gen).to(dtype)
            Xr = cand[torch.topk(_entropy(student, w, cand), k).indices]
        Xq.append(Xr)
        yq.append(ask(Xr))
        X, y = torch.cat(Xq), torch.cat(yq)
        w, hist = deterministic(student, X, y, steps=s, lr=lr, seed=seed + r, init=w, batch_size=batch_size)
        log.append({"round": r, "queries": int(X.shape[0]), "steps": s,
                    "loss": hist.map_loss[-1] if hist.map_loss else float("nan"),
                    "classes_seen": int(torch.unique(y).numel())})
    return ExtractionResult(w, torch.cat(Xq), torch.cat(yq), log)


# ============================================================================ query pools from shipped data
def standardize(X: torch.Tensor) -> torch.Tensor:
    """Per-feature standardization with the pool's OWN statistics (the teacher's training statistics are not
    the student's to know); constant features get scale 1."""
    flat = X.reshape(X.shape[0], -1)
    sd = flat.std(0)
    sd = torch.where(sd < 1e-8, torch.ones_like(sd), sd)
    return ((flat - flat.mean(0)) / sd).reshape(X.shape)


def resize_images(X: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Single-channel images ``[N, H, W]`` (or ``[N, 1, H, W]``) resized to ``size = (h, w)`` (area averaging
    when shrinking, bilinear when enlarging); returns ``[N, h, w]``."""
    img = X.unsqueeze(1) if X.dim() == 3 else X
    if img.dim() != 4 or img.shape[1] != 1:
        raise ValueError(f"resize_images takes [N, H, W] or [N, 1, H, W] images, got {tuple(X.shape)}")
    h, w = (int(s) for s in size)
    if h <= img.shape[-2] and w <= img.shape[-1]:
        out = F.adaptive_avg_pool2d(img, (h, w))
    else:
        out = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
    return out[:, 0]


def sample_image_patches(n: int, size: Sequence[int] = (8, 8), patch: int = 32, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` grayscale patches (``patch x patch`` random crops, then resized to ``size``) of the two photographs
    scikit-learn ships (``load_sample_images``: no download), standardized per pixel: ``[n, h, w]``."""
    from sklearn.datasets import load_sample_images

    imgs = [np.asarray(im, dtype=np.float64).mean(-1) for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        a, b = rng.integers(0, im.shape[0] - patch), rng.integers(0, im.shape[1] - patch)
        crops.append(im[a:a + patch, b:b + patch])
    X = torch.tensor(np.stack(crops), dtype=torch.float64)
    return standardize(resize_images(X, size)).to(dtype)


def digits_images(size: Sequence[int] = (28, 28), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scikit-learn's 1,797 digits as images resized to ``size``, standardized per pixel (no labels):
    ``[1797, h, w]``; a query pool for a teacher of another image set (e.g. Fashion-MNIST)."""
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().images, dtype=torch.float64)
    return standardize(resize_images(X, size)).to(dtype)
