"""The baselines a teacher-derived prior is compared with; all train the SAME student architecture.

Budget: every method gets the same number of optimizer steps. The variational methods spend
``map_steps`` on MAP and ``steps`` on SVI (the :func:`~pyro_distill.inference.fit_posterior` recipe, the
same as the teacher's and the distilled student's); the point-estimate methods spend ``map_steps + steps``
Adam steps.

1. :func:`standard_prior` - VI under the standard prior ``N(0, s^2 I)`` (the network's fan-in prior,
   or a fixed ``prior_scale``) from a random start: the paper's comparison.
2. :func:`standard_prior_conditioned_init` - the same prior, started at the teacher-derived prior's
   mean: separates "a better start" from "a better prior".
3. :func:`deterministic` - MAP by Adam: cross-entropy plus the standard prior's ``-log p(w)`` (i.e.
   weight decay ``1 / (2 N s^2)`` per weight).
4. :func:`knowledge_distillation` - Hinton et al. (2015) from the teacher's posterior predictive:
   ``gamma * CE(y) + (1 - gamma) * T^2 * KL(p_T^T || p_S^T)`` (:func:`kd_loss`).
5. :func:`prune_finetune` - structured magnitude pruning of the teacher's point estimate down to the
   student architecture, then fine-tuning (see the function for the exact mapping).
6. :func:`token_kd` - Hinton KD on every non-pad target token of a sequence-to-sequence student
   (:func:`token_kd_loss`).
7. :func:`tinybert` - feature-level KD in the style of TinyBERT for transformers (:func:`tinybert_loss`).

Every point estimate is fitted by the one loop :func:`pyro_distill.training.fit_point` (Adam over the flat
weights, minibatches, NaN guard), the same loop as :func:`~pyro_distill.inference.fit_map`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .arrays import as_data, as_tensor
from .gaussian import DiagGaussian, Gaussian, PointMass
from .inference import FitHistory, fit_map, fit_posterior
from .nets.base import BayesianNet
from .training import fit_point

__all__ = [
    "standard_prior",
    "standard_prior_conditioned_init",
    "deterministic",
    "kd_loss",
    "knowledge_distillation",
    "prune_weights",
    "prune_finetune",
    "token_kd_loss",
    "token_kd",
    "tinybert_targets",
    "tinybert_loss",
    "tinybert",
    "METHODS",
]

#: the baseline methods by name (the experiment runner's vocabulary)
METHODS = ("standard_prior", "standard_prior_cond_init", "deterministic", "kd", "prune_finetune")


def _std_prior(net: BayesianNet, X: torch.Tensor, prior_scale: float | None) -> Gaussian:
    dtype = X.dtype if X.is_floating_point() else torch.float32
    if prior_scale is None:
        return net.default_prior(dtype, X.device)
    s = torch.full((net.num_params,), float(prior_scale), dtype=dtype, device=X.device)
    return DiagGaussian(torch.zeros_like(s), s, layout=net.layout, meta={"source": f"N(0, {prior_scale}^2 I)"})


def standard_prior(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, guide: str = "dense", steps: int = 500,
                   map_steps: int = 100, prior_scale: float | None = None, seed: int = 0,
                   **fit_kwargs: Any) -> tuple[Gaussian, FitHistory]:
    """Baseline 1: VI under ``N(0, s^2 I)`` from a random start (fan-in ``s`` unless ``prior_scale``)."""
    X, y = as_data(X, y)
    prior = _std_prior(net, X, prior_scale)
    return fit_posterior(net, X, y, guide=guide, prior=prior, steps=steps, map_steps=map_steps, init="map",
                         seed=seed, **fit_kwargs)


def standard_prior_conditioned_init(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
                                    guide: str = "dense", steps: int = 500, map_steps: int = 100,
                                    prior_scale: float | None = None, seed: int = 0,
                                    **fit_kwargs: Any) -> tuple[Gaussian, FitHistory]:
    """Baseline 2: VI under the standard prior, started at ``start`` (the teacher-derived prior's mean)."""
    X, y = as_data(X, y)
    start = as_tensor(start, "start")
    if start.shape != (net.num_params,):
        raise ValueError(f"start has shape {tuple(start.shape)}, the student needs [{net.num_params}]")
    prior = _std_prior(net, X, prior_scale)
    return fit_posterior(net, X, y, guide=guide, prior=prior, steps=steps, map_steps=map_steps,
                         init=start.to(prior.loc), seed=seed, **fit_kwargs)


def deterministic(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, steps: int = 600, lr: float = 1e-2,
                  prior_scale: float | None = None, seed: int = 0, init: torch.Tensor | None = None,
                  batch_size: int | None = None, callback: Callable[[int, PointMass], Any] | None = None,
                  eval_every: int = 0) -> tuple[torch.Tensor, FitHistory]:
    """Baseline 3: MAP weights by Adam on ``-log p(y | X, w) - log p(w)`` (cross-entropy + weight decay)."""
    X, y = as_data(X, y)
    return fit_map(net, X, y, prior=_std_prior(net, X, prior_scale), init=init, steps=steps, lr=lr,
                   batch_size=batch_size, seed=seed, callback=callback, eval_every=eval_every)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, y: torch.Tensor, gamma: float = 0.5,
            temperature: float = 2.0) -> torch.Tensor:
    """Hinton's distillation loss ``gamma * CE(y) + (1 - gamma) * T^2 * KL(p_T^T || p_S^T)``.

    ``teacher_probs`` ``[B, C]`` is the teacher's posterior predictive; its tempered version is
    ``p_T^T = softmax(log p_T / T)`` (the predictive's log-probabilities play the teacher's logits), the
    student's is ``softmax(z_S / T)``. The KL is summed over classes and averaged over the batch
    (``batchmean``: per-example KL, not per-element), and multiplied by ``T^2`` so that its gradients keep
    their scale as ``T`` grows. The cross-entropy is the batch mean at temperature 1.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} must have the same shape")
    T = float(temperature)
    ce = F.cross_entropy(student_logits, y)
    log_pt = torch.log_softmax(teacher_probs.clamp_min(1e-12).log() / T, -1)
    log_ps = torch.log_softmax(student_logits / T, -1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return gamma * ce + (1 - gamma) * T**2 * kl


def knowledge_distillation(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, teacher_probs: torch.Tensor,
                           gamma: float = 0.5, temperature: float = 2.0, steps: int = 600, lr: float = 1e-2,
                           prior_scale: float | None = None, seed: int = 0, init: torch.Tensor | None = None,
                           batch_size: int | None = None, callback: Callable[[int, PointMass], Any] | None = None,
                           eval_every: int = 0) -> tuple[torch.Tensor, FitHistory]:
    """Baseline 4: a point student trained by Adam on :func:`kd_loss` plus the same ``-log p(w) / N``
    regularizer as :func:`deterministic`. ``teacher_probs`` ``[N, C]``: the teacher's posterior predictive
    on the rows of ``X``. Returns the weights ``[p]`` and a history (``map_loss`` = the loss per step)."""
    X, y = as_data(X, y)
    teacher_probs = as_tensor(teacher_probs, "teacher_probs")
    net.check_data(X, y)
    if teacher_probs.shape != (X.shape[0], net.num_outputs):
        raise ValueError(f"teacher_probs must be [N={X.shape[0]}, C={net.num_outputs}] (the teacher's predictive "
                         f"on the student's training inputs), got {tuple(teacher_probs.shape)}")
    torch.manual_seed(seed)
    prior = _std_prior(net, X, prior_scale)
    if init is None:
        init = net.init_weights(torch.Generator().manual_seed(seed), X.dtype)
    tp = teacher_probs.to(X)
    N = X.shape[0]

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        xb, yb, tb = (X, y, tp) if idx is None else (X[idx], y[idx], tp[idx])
        return kd_loss(net.forward(w, xb), tb, yb, gamma, temperature) - prior.log_prob(w) / N

    return fit_point(loss, init.to(X), N, steps, lr, batch_size, callback=callback, eval_every=eval_every, name="KD")


def prune_weights(teacher_net: BayesianNet, teacher_weights: torch.Tensor, student_net: BayesianNet,
                  seed: int = 0) -> tuple[torch.Tensor, Any]:
    """Structured magnitude pruning of the teacher's weights into the student architecture.

    The mapping: the surgery plan with ``selector="magnitude"`` (neurons ranked by the norm of their
    weights) applied to the point estimate. Removing a neuron drops its row, its bias and its column in
    the next layer; removing a layer (needs equal widths) drops it as if it were the identity. The kept
    weights keep their teacher values (a point mass: conditioning = dropping coordinates). This gives
    EXACTLY the student's architecture and parameter count, so the comparison with the other methods is
    on one architecture; unstructured masking in the teacher's architecture would not. Returns the
    student weights ``[p_student]`` and the plan.
    """
    from . import surgery

    w = torch.as_tensor(teacher_weights).detach()
    if w.shape != (teacher_net.num_params,):
        raise ValueError(f"teacher weights have shape {tuple(w.shape)}, the teacher needs [{teacher_net.num_params}]")
    point = PointMass(w.double(), layout=teacher_net.layout)
    ops = surgery.plan(teacher_net, student_net, selector="magnitude", posterior=point, seed=seed)
    net, g = surgery.apply(ops, teacher_net, point)
    if net.config() != student_net.config():
        raise ValueError(f"pruning produced {net!r}, not the requested student {student_net!r}")
    return g.mean.to(w.dtype), ops


def prune_finetune(teacher_net: BayesianNet, teacher_weights: torch.Tensor, student_net: BayesianNet,
                   X: torch.Tensor, y: torch.Tensor, steps: int = 600, lr: float = 1e-2,
                   prior_scale: float | None = None, seed: int = 0, batch_size: int | None = None,
                   callback: Callable[[int, PointMass], Any] | None = None,
                   eval_every: int = 0) -> tuple[torch.Tensor, FitHistory]:
    """Baseline 5: :func:`prune_weights`, then fine-tuning by the same MAP objective as :func:`deterministic`."""
    X, y = as_data(X, y)
    w0, ops = prune_weights(teacher_net, teacher_weights, student_net, seed=seed)
    w, hist = deterministic(student_net, X, y, steps=steps, lr=lr, prior_scale=prior_scale, seed=seed,
                            init=w0.to(X), batch_size=batch_size, callback=callback, eval_every=eval_every)
    hist.info["plan"] = [op.to_dict() for op in ops]
    return w, hist


# ============================================================================ sequence and feature-level KD
def token_kd_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, y: torch.Tensor, pad: int = 0,
                  gamma: float = 0.5, temperature: float = 2.0) -> torch.Tensor:
    """Token-level Hinton KD of a batch of ``B`` sequences: ``kd_loss`` over the ``M`` non-pad target tokens
    (``y != pad``) times ``M / B``, i.e. the summed per-token loss per sequence.

    ``logits`` and ``teacher_probs``: ``[B, T, V]`` (the student's logits and the teacher's teacher-forced
    posterior predictive), ``y``: ``[B, T]``."""
    m = y != pad
    return kd_loss(logits[m], teacher_probs[m], y[m], gamma, temperature) * (int(m.sum()) / y.shape[0])


def token_kd(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, teacher_probs: torch.Tensor,
             init: torch.Tensor | None = None, steps: int = 600, lr: float = 1e-2, batch_size: int | None = None,
             gamma: float = 0.5, temperature: float = 2.0, seed: int = 0,
             callback: Callable[[int, PointMass], Any] | None = None,
             eval_every: int = 0) -> tuple[torch.Tensor, FitHistory]:
    """A point sequence-to-sequence student (e.g. :class:`~pyro_distill.nets.AttentionRNN`) trained by Adam on
    :func:`token_kd_loss` plus the fan-in prior's ``-log p(w) / N`` (the MAP students' regularizer).
    ``teacher_probs`` ``[N, T, V]``: the teacher's predictive on ``X`` (``metrics.sequence_predictive``);
    padding is the net's ``pad`` label. Returns the weights ``[p]`` and the history."""
    if teacher_probs.shape[:2] != y.shape:
        raise ValueError(f"teacher_probs must be [N, T, V] with [N, T] = {tuple(y.shape)} (the teacher's predictive "
                         f"on the student's training sequences), got {tuple(teacher_probs.shape)}")
    torch.manual_seed(seed)
    if init is None:
        init = net.init_weights(torch.Generator().manual_seed(seed))
    prior = net.default_prior(init.dtype)
    N, pad = X.shape[0], int(getattr(net, "pad", 0))

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        xb, yb, tb = (X, y, teacher_probs) if idx is None else (X[idx], y[idx], teacher_probs[idx])
        return token_kd_loss(net.forward(w, xb), tb, yb, pad, gamma, temperature) - prior.log_prob(w) / N

    return fit_point(loss, init, N, steps, lr, batch_size, callback=callback, eval_every=eval_every,
                     name="token KD", hint="lower the student's lr")


def tinybert_targets(teacher: BayesianNet, w: torch.Tensor, X: torch.Tensor) -> dict[str, list[Any]]:
    """The teacher's features that :func:`tinybert_loss` matches, at weights ``w`` (its posterior mean):
    ``hidden`` (the residual stream after the embedding and after each block, ``[N, T, d]``) and ``attn``
    (per block the attention maps averaged over heads ``[N, T, T]``, ``None`` for a block without attention)."""
    with torch.no_grad():
        f = teacher.features(w.to(X.dtype) if X.is_floating_point() else w, X)
    return {"hidden": list(f["hidden"]), "attn": [None if a is None else a.mean(-3) for a in f["attn"]]}


def tinybert_loss(feats: dict[str, Any], targets: dict[str, list[Any]], y: torch.Tensor, block_map: list[int],
                  beta_hidden: float = 1.0, beta_attn: float = 1.0) -> torch.Tensor:
    """``CE + beta_h * sum_l MSE(h_l^S, h_{m(l)}^T) + beta_a * sum_l MSE(A_l^S, A_{m(l)}^T)`` on one batch.

    ``feats``: the student's ``features`` (``logits``, ``hidden``, ``attn`` per head, ``mask [B, T]``);
    ``targets``: :func:`tinybert_targets` on the same rows; ``m = block_map`` maps student block ``l`` to its
    teacher block (the embedding output is matched to the embedding output). Attention maps are averaged over
    heads (the student may have fewer) and compared on valid query/key positions; each MSE is the mean over
    the feature (or key) axis summed over valid positions, divided by the number of valid positions.
    TinyBERT (Jiao et al. 2020) matches per head; averaging lets fewer heads be matched."""
    m = feats["mask"].to(feats["hidden"][0].dtype)  # [B, T]
    loss = torch.nn.functional.cross_entropy(feats["logits"], y)
    for s, t in [(0, 0)] + [(s + 1, t + 1) for s, t in enumerate(block_map)]:
        d2 = ((feats["hidden"][s] - targets["hidden"][t]) ** 2).mean(-1)
        loss = loss + beta_hidden * (d2 * m).sum() / m.sum()
    for s, t in enumerate(block_map):
        if feats["attn"][s] is None or targets["attn"][t] is None:
            continue
        mm = m[:, :, None] * m[:, None, :]
        d2 = (feats["attn"][s].mean(-3) - targets["attn"][t]) ** 2
        loss = loss + beta_attn * (d2 * mm).sum() / m.sum()
    return loss


def tinybert(student: BayesianNet, X: torch.Tensor, y: torch.Tensor, targets: dict[str, list[Any]],
             block_map: list[int], steps: int = 600, lr: float = 1e-2, beta_hidden: float = 1.0,
             beta_attn: float = 1.0, batch_size: int | None = None, seed: int = 0,
             callback: Callable[[int, PointMass], Any] | None = None,
             eval_every: int = 0) -> tuple[torch.Tensor, FitHistory]:
    """A point transformer student trained by Adam on :func:`tinybert_loss` (``targets``: the teacher's
    :func:`tinybert_targets` on the rows of ``X``) plus the fan-in prior's ``-log p(w) / N``, from a random
    start; minibatches are drawn from the same seeded generator as the start. Returns weights and history."""
    if len(targets["hidden"]) < 1 + (max(block_map) + 1 if block_map else 0):
        raise ValueError(f"block_map {block_map} names teacher blocks beyond the {len(targets['hidden']) - 1} in "
                         "targets; pass tinybert_targets(teacher, ...) of the teacher the plan started from")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prior = student.default_prior(X.dtype)
    init = student.init_weights(gen, X.dtype)
    N = X.shape[0]

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return tinybert_loss(student.features(w, X), targets, y, block_map, beta_hidden, beta_attn) \
                - prior.log_prob(w) / N
        sub = {k: [None if v is None else v[idx] for v in targets[k]] for k in ("hidden", "attn")}
        return tinybert_loss(student.features(w, X[idx]), sub, y[idx], block_map, beta_hidden, beta_attn) \
            - prior.log_prob(w) / N

    return fit_point(loss, init, N, steps, lr, batch_size, generator=gen, callback=callback, eval_every=eval_every,
                     name="TinyBERT-style KD")
