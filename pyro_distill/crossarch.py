"""Cross-architecture distillation: a teacher of one family teaches a student of another.

Across families (a transformer reading an image as 8 rows of 8 pixels, a CNN reading it as ``[1, 8, 8]``, an
MLP reading 64 numbers) there is no correspondence between parameters, so the teacher's weight posterior
cannot be conditioned into the student's prior. The teacher enters only through its **posterior predictive**
``p_T(y | x) = E_{q_T}[softmax f_T(x, w)]`` on the student's training inputs. Two methods:

* :func:`crossarch_kd` -- Hinton KD (:func:`pyro_distill.baselines.knowledge_distillation`) on that predictive,
  the inputs converted between the families' formats by :func:`convert` (sequence ``[N, H, W]`` <-> image
  ``[N, 1, H, W]`` <-> flat ``[N, H W]``: a reshape, the pixels and their order unchanged).
* :func:`kd_laplace` -- the Bayesian variant: a generalized (Gibbs) posterior whose likelihood is the KD
  objective, ``q(w) ∝ exp(-N L_KD(w)) p(w)`` with ``p`` the student's fan-in prior and
  ``L_KD = gamma CE(y) + (1 - gamma) T^2 KL(p_T^T || softmax(f_S / T))`` averaged over the data;
  its mode is the KD point (the same objective as :func:`crossarch_kd`) and its covariance the Laplace
  approximation there, precision ``Lam = gamma G_1 + (1 - gamma) T^2 G_T + P_0`` with ``G_1 = sum_n J_n^T H(pi_n)
  J_n`` (the cross-entropy's GGN) and ``G_T = sum_n (J_n / T)^T H(pi_n^T) (J_n / T)`` (the GGN of the
  tempered logits ``f_S / T``), ``H(pi) = diag(pi) - pi pi^T``: the exact GGN of ``N L_KD``, because the
  logit Hessian of ``T^2 KL(p_T^T || softmax(z / T))`` is ``H(softmax(z / T))`` whatever the teacher's
  probabilities. Stored diagonal or low-rank + diagonal (from the same matrix-free GGN products as
  :func:`pyro_distill.inference.laplace`). Its predictive is the linearized one.

What "Bayesian" means here (and what it does not) is in the README: the student's uncertainty is a posterior
under a likelihood that *is* the distillation objective; the teacher's weight uncertainty reaches it only
through the averaged predictive ``p_T``, never as a prior over the student's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .arrays import as_data, as_tensor
from .baselines import knowledge_distillation
from .gaussian import Gaussian
from .inference import FitHistory, laplace
from .nets.base import BayesianNet
from .predictions import predictive

__all__ = ["FORMATS", "input_format", "convert", "teacher_predictive", "crossarch_kd", "KDGGN", "image_shape_of",
           "kd_laplace", "crossarch_methods", "CROSS_METHODS"]

#: the cross-architecture methods :func:`crossarch_methods` runs
CROSS_METHODS = ("kd", "kd_laplace", "labels")

#: input formats of image data: rows as a sequence ``[N, H, W]``, an image ``[N, 1, H, W]``, flat ``[N, H W]``
FORMATS = ("sequence", "image", "flat")


def input_format(net: BayesianNet) -> str:
    """The input format a network reads: Transformer (patch embedding) -> ``sequence``, CNN -> ``image``,
    MLP -> ``flat``."""
    name = type(net).__name__
    if name == "Transformer":
        if getattr(net, "embedding", "patch") != "patch":
            raise ValueError("a token-embedding Transformer reads token ids, not images; cross-architecture KD on "
                             "images needs embedding='patch'")
        return "sequence"
    if name == "CNN":
        return "image"
    if name == "MLP":
        return "flat"
    raise ValueError(f"no image input format known for {name}; cross-architecture KD supports Transformer "
                     "(patch), CNN and MLP")


def convert(X: torch.Tensor, src: str, dst: str, image_shape: Sequence[int]) -> torch.Tensor:
    """Inputs ``X`` in format ``src`` as format ``dst`` (see :data:`FORMATS`) for single-channel images of
    ``image_shape = (H, W)`` (or ``(1, H, W)``): reshapes only, so every pixel keeps its value and row-major
    position. Padded (NaN) sequences are refused: an image has no padding."""
    for f in (src, dst):
        if f not in FORMATS:
            raise ValueError(f"unknown input format {f!r}; choose one of {FORMATS}")
    shape = [int(s) for s in image_shape]
    if len(shape) == 3:
        if shape[0] != 1:
            raise ValueError(f"cross-format conversion needs one input channel, got image_shape {tuple(shape)}")
        shape = shape[1:]
    if len(shape) != 2:
        raise ValueError(f"image_shape must be (H, W) or (1, H, W), got {tuple(image_shape)}")
    H, W = shape
    want = {"sequence": (H, W), "image": (1, H, W), "flat": (H * W,)}
    if tuple(X.shape[1:]) != want[src]:
        dims = ", ".join(map(str, want[src]))
        raise ValueError(f"inputs of shape {tuple(X.shape)} are not in format {src!r} ([N, {dims}])")
    if src == "sequence" and X.is_floating_point() and bool(torch.isnan(X).any()):
        raise ValueError("the sequences contain padded (NaN) rows; an image has no padding: use unpadded data "
                         "(pad_fraction=0)")
    return X.reshape(X.shape[0], *want[dst])


def image_shape_of(*nets: BayesianNet, given: Sequence[int] | None = None) -> tuple[int, int]:
    """``(H, W)``: ``given``, else the first network that knows it (a CNN's ``image_shape``, a patch
    Transformer's ``(max_len, input_dim)``); an MLP does not know it."""
    if given is not None:
        s = tuple(int(v) for v in given)
        return s[-2], s[-1]
    for net in nets:
        if hasattr(net, "image_shape"):
            s = tuple(net.image_shape)
            return s[-2], s[-1]
        if type(net).__name__ == "Transformer":
            return int(net.max_len), int(net.input_dim)
    raise ValueError(f"none of {[type(n).__name__ for n in nets]} knows the image shape: pass image_shape=(H, W)")


def teacher_predictive(teacher: BayesianNet, q: Gaussian | torch.Tensor, X: torch.Tensor, fmt: str,
                       image_shape: Sequence[int], method: str = "mc", num_samples: int = 100,
                       seed: int = 0) -> torch.Tensor:
    """The teacher's posterior predictive ``[N, C]`` on inputs ``X`` given in format ``fmt`` (converted to the
    teacher's own format first)."""
    Xt = convert(X, fmt, input_format(teacher), image_shape)
    return predictive(teacher, q, Xt, method=method, num_samples=num_samples, seed=seed)


def crossarch_kd(teacher: BayesianNet, teacher_q: Gaussian | torch.Tensor, student: BayesianNet, X: torch.Tensor,
                 y: torch.Tensor, image_shape: Sequence[int] | None = None, fmt: str | None = None,
                 teacher_probs: torch.Tensor | None = None, gamma: float = 0.5, temperature: float = 2.0,
                 num_samples: int = 100, predictive_method: str = "mc", **kd_kwargs: Any
                 ) -> tuple[torch.Tensor, FitHistory]:
    """Hinton KD from a teacher of another family: the student (point estimate) minimizes
    ``gamma CE(y) + (1 - gamma) T^2 KL(p_T^T || p_S^T) - log p(w) / N`` on ``X``.

    ``X`` is in format ``fmt`` (default: the student's); it is converted for each network. ``teacher_probs``
    (``[N, C]``, the teacher's predictive on these rows) skips recomputing it. ``kd_kwargs`` go to
    :func:`pyro_distill.baselines.knowledge_distillation` (``steps``, ``lr``, ``batch_size``, ``seed``, ...).
    Returns the student's weights ``[p]`` and the history (``info["teacher_format"]``, ``info["student_format"]``).
    """
    X, y = as_data(X, y)
    shape = image_shape_of(student, teacher, given=image_shape)
    fmt = fmt or input_format(student)
    if teacher_probs is None:
        teacher_probs = teacher_predictive(teacher, teacher_q, X, fmt, shape, method=predictive_method,
                                           num_samples=num_samples, seed=int(kd_kwargs.get("seed", 0)))
    Xs = convert(X, fmt, input_format(student), shape)
    w, hist = knowledge_distillation(student, Xs, y, teacher_probs.to(Xs), gamma=gamma, temperature=temperature,
                                     **kd_kwargs)
    hist.info.update(teacher_format=input_format(teacher), student_format=input_format(student),
                     gamma=gamma, temperature=temperature)
    return w, hist


class _Tempered(BayesianNet):
    """``f(w, x) / T``: the logits the KD term's softmax sees (only for the GGN)."""

    likelihood = "categorical"

    def __init__(self, net: BayesianNet, temperature: float):
        self.net, self.T = net, float(temperature)
        self.layout = net.layout

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward(w, x) / self.T

    def config(self) -> dict[str, Any]:
        return {"type": "_Tempered", "net": self.net.config(), "temperature": self.T}

    def prior_scales(self) -> torch.Tensor:
        return self.net.prior_scales()


class KDGGN:
    """The GGN of ``N L_KD`` (see the module docstring) at ``w`` on inputs ``X``, as an operator with ``mv``,
    ``mm``, ``diagonal``, ``dense``: ``gamma G_1 + (1 - gamma) T^2 G_T``, each term a
    :class:`pyro_distill.curvature.GGN` (at ``T = 1`` the two coincide and one is computed)."""

    def __init__(self, net: BayesianNet, w: torch.Tensor, X: torch.Tensor, gamma: float = 0.5,
                 temperature: float = 2.0):
        from .curvature import GGN

        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if net.likelihood != "categorical":
            raise ValueError("KD needs a classifier (likelihood='categorical')")
        T = float(temperature)
        self.p = net.num_params
        self.terms: list[tuple[float, Any]] = []
        if T == 1.0:
            self.terms.append((1.0, GGN(net, w, X)))
        else:
            if gamma > 0:
                self.terms.append((float(gamma), GGN(net, w, X)))
            if gamma < 1:
                self.terms.append(((1 - float(gamma)) * T**2, GGN(_Tempered(net, T), w, X)))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.p, self.p)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return sum(c * op.mv(v) for c, op in self.terms)

    def mm(self, V: torch.Tensor) -> torch.Tensor:
        return sum(c * op.mm(V) for c, op in self.terms)

    def diagonal(self) -> torch.Tensor:
        return sum(c * op.diagonal() for c, op in self.terms)

    def dense(self) -> torch.Tensor:
        return sum(c * op.dense() for c, op in self.terms)


def kd_laplace(teacher: BayesianNet, teacher_q: Gaussian | torch.Tensor, student: BayesianNet, X: torch.Tensor,
               y: torch.Tensor, kind: str = "lowrank", rank: int = 10, image_shape: Sequence[int] | None = None,
               fmt: str | None = None, teacher_probs: torch.Tensor | None = None, gamma: float = 0.5,
               temperature: float = 2.0, num_samples: int = 100, prior: Gaussian | None = None,
               w_kd: torch.Tensor | None = None, **kd_kwargs: Any) -> tuple[Gaussian, FitHistory]:
    """The Bayesian cross-architecture student: ``q(w) = N(w_KD, Lam^{-1})`` approximating the Gibbs posterior
    ``exp(-N L_KD(w)) p(w)`` (module docstring). ``w_KD`` from :func:`crossarch_kd` (or given as ``w_kd``);
    ``Lam = KDGGN + P_0`` with ``P_0`` the prior precision (default: the student's fan-in prior, the one the KD
    point was fitted under); ``kind``: ``"diag"`` (exact diagonal of ``Lam``) or ``"lowrank"`` (that diagonal
    plus the ``rank`` directions where it underestimates the covariance most, as
    :func:`pyro_distill.inference.laplace`). Returns the Gaussian and the KD history (``info["laplace"]``)."""
    if kind not in ("diag", "lowrank"):
        raise ValueError(f"kd_laplace stores a 'diag' or 'lowrank' Gaussian, got {kind!r} (a dense or Kronecker "
                         "one would need the full GGN; use kind='lowrank' with a larger rank)")
    X, y = as_data(X, y)
    shape = image_shape_of(student, teacher, given=image_shape)
    fmt = fmt or input_format(student)
    if w_kd is None:
        w_kd, hist = crossarch_kd(teacher, teacher_q, student, X, y, image_shape=shape, fmt=fmt,
                                  teacher_probs=teacher_probs, gamma=gamma, temperature=temperature,
                                  num_samples=num_samples, **kd_kwargs)
    else:
        w_kd = as_tensor(w_kd, "w_kd").detach()
        hist = FitHistory()
    Xs = convert(X, fmt, input_format(student), shape)
    dtype = Xs.dtype
    w = w_kd.to(dtype)
    pr = (prior if prior is not None else student.default_prior(dtype, Xs.device)).to(Xs.device, dtype)
    op = KDGGN(student, w, Xs, gamma=gamma, temperature=temperature)
    q = laplace(student, Xs, w, pr, kind=kind, rank=rank, seed=int(kd_kwargs.get("seed", 0)), ggn_op=op)
    q.meta = dict(getattr(q, "meta", None) or {}) | {"source": f"kd-laplace-{kind}", "gamma": gamma,
                                                      "temperature": temperature}
    hist.info["laplace"] = {"kind": kind, "rank": rank if kind == "lowrank" else 0}  # through inference.laplace
    return q, hist


def crossarch_methods(teacher: BayesianNet, teacher_q: Gaussian | torch.Tensor, student: BayesianNet,
                      X: torch.Tensor, y: torch.Tensor, methods: Sequence[str], teacher_probs: torch.Tensor,
                      image_shape: Sequence[int], steps: int, lr: float, gamma: float = 0.5, temperature: float = 2.0,
                      kind: str = "lowrank", rank: int = 10, seed: int = 0, batch_size: int | None = None) -> Any:
    """Yield ``(method, fitted, seconds)`` for each of ``methods`` (:data:`CROSS_METHODS`) in order, inputs flat:
    ``kd`` (:func:`crossarch_kd`, point weights), ``kd_laplace`` (:func:`kd_laplace` around the last KD weights,
    fitted first when ``kd`` has not run; its seconds include that KD fit), ``labels`` (the same student by MAP on
    the labels alone, :func:`pyro_distill.baselines.deterministic`); every fit ``steps`` optimizer steps."""
    import time

    from .baselines import deterministic

    kd_kw = {"gamma": gamma, "temperature": temperature, "image_shape": image_shape, "fmt": "flat",
             "teacher_probs": teacher_probs, "steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size}
    w_kd, dt_kd = None, 0.0
    for m in methods:
        if m == "kd" or (m == "kd_laplace" and w_kd is None):
            t0 = time.perf_counter()
            w_kd, _ = crossarch_kd(teacher, teacher_q, student, X, y, **kd_kw)
            dt_kd = time.perf_counter() - t0
            if m == "kd":
                yield m, w_kd, dt_kd
        t0 = time.perf_counter()
        if m == "kd_laplace":
            q, _ = kd_laplace(teacher, teacher_q, student, X, y, kind=kind, rank=rank, w_kd=w_kd,
                              **{k: v for k, v in kd_kw.items() if k not in ("steps", "lr", "batch_size")})
            yield m, q, time.perf_counter() - t0 + dt_kd
        elif m == "labels":
            w, _ = deterministic(student, X, y, steps=steps, lr=lr, seed=seed, batch_size=batch_size)
            yield m, w, time.perf_counter() - t0
        elif m not in CROSS_METHODS:
            raise ValueError(f"unknown cross-architecture method {m!r}; choose from {list(CROSS_METHODS)}")
