"""Plans: the list of MLP operations that turns a teacher architecture into a student architecture.

Order (docs/DESIGN.md): remove neurons to equalize the widths of the layers that will merge, then remove layers
(highest index first, so lower indices stay valid), then remove neurons down to the student's widths.
Which neurons go is a *selector*'s choice, scored on the posterior as it stands after the previous steps
(each step conditions it, exactly as :func:`~pyro_distill.surgery.apply` will):

* ``snr``       posterior signal-to-noise ``mean_i m_i^2 / S_ii`` over the neuron's coordinates (default);
* ``magnitude`` norm of the posterior mean over the neuron's coordinates;
* ``random``    a seeded permutation (no posterior needed);
* ``evidence``  Savage-Dickey density ratio ``log q(u_I = 0) - log p0(u_I = 0)`` of the neuron's coordinates
  ``I``: the change in log evidence when the reduced model (``u_I = 0``) replaces the full one, with ``p0``
  the network's default prior conditioned like the posterior. Neurons the data support removing go first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from ..nets.mlp import IDEMPOTENT, MLP
from .base import Operation, Plan, SurgeryError, check_layout
from .mlp import RemoveLayer, RemoveNeurons, SameFamily, neuron_coordinates

__all__ = ["plan", "SELECTORS", "neuron_scores"]


# ============================================================================ selectors
def _neuron_groups(net: MLP, layer: int) -> list[torch.Tensor]:
    return [neuron_coordinates(net, layer, [j]) for j in range(net.sizes[layer])]


def _snr(net: MLP, layer: int, q: Gaussian, p0: Gaussian, gen: torch.Generator) -> torch.Tensor:
    m, var = q.mean, q.variance
    return torch.stack([(m[i] ** 2 / var[i]).mean() for i in _neuron_groups(net, layer)])


def _magnitude(net: MLP, layer: int, q: Gaussian, p0: Gaussian, gen: torch.Generator) -> torch.Tensor:
    m = q.mean
    return torch.stack([torch.linalg.vector_norm(m[i]) for i in _neuron_groups(net, layer)])


def _random(net: MLP, layer: int, q: Gaussian | None, p0: Gaussian | None, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(net.sizes[layer], generator=gen, dtype=torch.float64)


def _evidence(net: MLP, layer: int, q: Gaussian, p0: Gaussian, gen: torch.Generator) -> torch.Tensor:
    return -removal_log_evidence(net, layer, q, p0)


def removal_log_evidence(net: MLP, layer: int, q: Gaussian, p0: Gaussian) -> torch.Tensor:
    """Per neuron ``j`` of ``layer``: ``log q(u_{I_j} = 0) - log p0(u_{I_j} = 0)`` (Savage-Dickey), the change in
    log marginal likelihood when neuron ``j`` is removed. Positive: the data favour the smaller model."""
    out = []
    for i in _neuron_groups(net, layer):
        zero = torch.zeros(i.numel(), dtype=q.dtype, device=q.device)
        out.append(q.marginalize(i).log_prob(zero) - p0.marginalize(i).log_prob(zero.to(p0.dtype)))
    return torch.stack(out).to(torch.float64)


#: name -> (keep-score function: higher means keep, needs a posterior)
SELECTORS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "snr": (_snr, True),
    "magnitude": (_magnitude, True),
    "random": (_random, False),
    "evidence": (_evidence, True),
}


def neuron_scores(net: MLP, layer: int, selector: str = "snr", posterior: Gaussian | None = None,
                  prior: Gaussian | None = None, seed: int = 0) -> torch.Tensor:
    """Keep-scores of the neurons of hidden ``layer`` (the lowest are removed first)."""
    fn, needs = _selector(selector, posterior)
    if prior is None and posterior is not None:
        prior = net.default_prior(posterior.dtype, posterior.device)
    gen = torch.Generator().manual_seed(seed)
    return fn(net, layer, posterior, prior, gen)


def _selector(selector: str, posterior: Gaussian | None) -> tuple[Callable[..., torch.Tensor], bool]:
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {sorted(SELECTORS)}")
    fn, needs = SELECTORS[selector]
    if needs and posterior is None:
        raise ValueError(
            f"selector {selector!r} scores neurons on the teacher's posterior: pass posterior=<Gaussian> "
            "(CLI: --posterior models/<name>), or use selector='random'"
        )
    return fn, needs


# ============================================================================ the plan
def _groups(teacher: MLP, student: MLP) -> list[tuple[int, int]]:
    """Consecutive groups ``[a, b]`` of teacher layer indices 0..L, one per student layer index 0..M, that merge
    into one: feasible when ``min(n_a..n_b) >= m_j``; the fewest neurons removed to equalize widths wins."""
    n, m = teacher.sizes, student.sizes
    L, M = len(n) - 1, len(m) - 1
    free_ends = teacher.activation == "identity"
    best: tuple[int, list[tuple[int, int]]] | None = None
    for cuts in itertools.combinations(range(L), M):  # cut after teacher index c
        bounds = [0, *[c + 1 for c in cuts], L + 1]
        groups = [(bounds[j], bounds[j + 1] - 1) for j in range(M + 1)]
        if not free_ends and (groups[0] != (0, 0) or groups[-1] != (L, L)):
            continue
        if any(min(n[a:b + 1]) < m[j] for j, (a, b) in enumerate(groups)):
            continue
        cost = sum(sum(n[a:b + 1]) - (b - a + 1) * min(n[a:b + 1]) for a, b in groups)
        if best is None or cost < best[0]:
            best = (cost, groups)
    if best is None:
        if max(m[1:-1], default=0) > max(n[1:-1], default=0):
            raise SurgeryError(f"no plan turns {n} into {m}: the student's widest hidden layer "
                               f"({max(m[1:-1])}) is wider than every teacher hidden layer; surgery only removes")
        raise SurgeryError(
            f"no plan turns {n} into {m}: every student layer needs a run of consecutive teacher layers at least "
            "as wide (widths can only shrink"
            + (", and the input/output layers cannot merge with hidden ones in a "
               f"{teacher.activation} MLP)" if not free_ends else ")")
        )
    return best[1]


def _check_pair(teacher: BayesianNet, student: BayesianNet) -> tuple[MLP, MLP]:
    if not isinstance(teacher, MLP) or not isinstance(student, MLP):
        raise SurgeryError(f"plan() turns an MLP into an MLP; got {teacher!r} -> {student!r}")
    for key in ("activation", "bias", "likelihood"):
        if getattr(teacher, key) != getattr(student, key):
            raise SurgeryError(
                f"teacher and student differ in {key} ({getattr(teacher, key)!r} vs {getattr(student, key)!r}); "
                f"surgery keeps the {key}: make the student with {key}={getattr(teacher, key)!r}"
            )
    n, m = teacher.sizes, student.sizes
    if n[0] != m[0] or n[-1] != m[-1]:
        raise SurgeryError(f"teacher {n} and student {m} must have the same input and output sizes")
    if len(m) > len(n):
        raise SurgeryError(f"student {m} is deeper than teacher {n}: surgery only removes layers")
    if len(m) < len(n) and teacher.activation not in IDEMPOTENT:
        raise SurgeryError(
            f"student {m} has fewer layers than teacher {n}, but activation {teacher.activation!r} is not idempotent "
            f"so no layer can be removed exactly; use a student of depth {len(n) - 1} or a {list(IDEMPOTENT)} teacher"
        )
    return teacher, student


def plan(teacher_net: BayesianNet, student_net: BayesianNet, selector: str = "snr",
         posterior: Gaussian | None = None, seed: int = 0, prior: Gaussian | None = None) -> Plan:
    """The operations that turn ``teacher_net`` into ``student_net`` (same input/output sizes, no wider layer).

    ``posterior`` (the teacher's Gaussian) is needed by every selector but ``random``; it is conditioned step
    by step so each choice sees the posterior the previous steps leave. ``seed`` drives ``random``. ``prior`` is
    the prior the posterior was fitted under (``evidence`` only; default: the teacher's default prior).
    """
    from ..nets.cnn import CNN
    from .cnn import plan_cnn

    if isinstance(teacher_net, CNN):  # a CNN narrows by channel and dense-neuron removal: its own planner
        return plan_cnn(teacher_net, student_net, selector=selector, posterior=posterior, seed=seed, prior=prior)
    teacher, student = _check_pair(teacher_net, student_net)
    _selector(selector, posterior)
    if posterior is not None:
        check_layout(teacher, posterior)
    if prior is not None:
        check_layout(teacher, prior)
    groups = _groups(teacher, student)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {"net": teacher, "q": posterior,
                             "p0": None if posterior is None else (
                                 prior if prior is not None else teacher.default_prior(torch.float64))}
    ops: list[Operation] = []

    def do(op: Operation) -> None:
        net = state["net"]
        if state["q"] is not None:
            _, state["q"] = op.apply(net, state["q"])
            _, state["p0"] = op.apply(net, state["p0"])
        state["net"] = op.architecture(net)
        ops.append(op)

    def shrink(layer: int, count: int) -> None:
        if count <= 0:
            return
        net = state["net"]
        fn, _ = SELECTORS[selector]
        score = fn(net, layer, state["q"], state["p0"], gen)
        order = torch.sort(score, stable=True).indices
        do(RemoveNeurons(layer, order[:count].tolist()))

    n = teacher.sizes
    # 1. equalize the widths inside each group that merges
    for a, b in groups:
        w = min(n[a:b + 1])
        for t in range(max(a, 1), min(b, len(n) - 2) + 1):
            shrink(t, n[t] - w)
    # 2. remove layers a+1..b of every group, highest first
    for t in sorted((t for a, b in groups for t in range(a + 1, b + 1)), reverse=True):
        do(RemoveLayer(t))
    # 3. shrink to the student's widths
    for j in range(1, len(student.sizes) - 1):
        shrink(j, state["net"].sizes[j] - student.sizes[j])
    if not ops:
        ops.append(SameFamily())
    result = state["net"]
    if result.sizes != student.sizes:  # pragma: no cover - guarded by _groups
        raise AssertionError(f"plan reached {result.sizes}, not {student.sizes}")
    return Plan(ops, teacher=teacher.config(), student=result.config(), selector=selector)

