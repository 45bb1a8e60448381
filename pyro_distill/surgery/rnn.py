"""Removing additive attention from an :class:`~pyro_distill.nets.AttentionRNN` by conditioning.

``a(h, h') = wᵀ tanh(U h + V h')`` is identically 0 when ``w = 0`` or when ``U = V = 0`` (``tanh 0 = 0``),
so the masked softmax is uniform (``1/T`` over the valid source positions) and the network is the
``uniform_context`` RNN (context = mean of the encoder states). Three variants:

- ``"w"``: condition ``attn.w = 0``; ``U, V`` no longer matter and are marginalized;
- ``"uv"``: condition ``attn.U = attn.V = 0``; ``w`` no longer matters and is marginalized;
- ``"all"``: condition all three on 0.

The Gaussian part is the shared :meth:`Operation.apply` (marginalize, then condition with Cholesky /
Woodbury solves); low-rank posteriors stay low-rank. The RNN family of the planner (:mod:`.planning`): its
candidates are the three variants, and :func:`~pyro_distill.surgery.plan` picks one with the shared selectors.
"""

from __future__ import annotations

from typing import Any

import torch

from ..nets.attention_rnn import ATTENTION_BLOCKS, AttentionRNN
from ..nets.base import BayesianNet
from .base import Operation, SurgeryError, named_indices, register_operation
from .mlp import SameFamily
from .planning import Candidate, Family, Planner, register_family

__all__ = ["RemoveAttention", "remove_attention", "ATTENTION_VARIANTS", "rnn_candidates"]

ATTENTION_VARIANTS = {"w": (("attn.w",), ("attn.U", "attn.V")),
                      "uv": (("attn.U", "attn.V"), ("attn.w",)),
                      "all": (ATTENTION_BLOCKS, ())}


@register_operation
class RemoveAttention(Operation):
    """Attention -> uniform average of the encoder states (``variant`` = which blocks are set to 0)."""

    name = "remove_attention"

    def __init__(self, variant: str = "w"):
        if variant not in ATTENTION_VARIANTS:
            raise SurgeryError(f"unknown attention-removal variant {variant!r}; choose one of "
                               f"{sorted(ATTENTION_VARIANTS)} (w = 0, U = V = 0, or all three = 0)")
        self.variant = variant

    def check(self, net: BayesianNet) -> None:
        if not isinstance(net, AttentionRNN):
            raise SurgeryError(f"remove_attention applies to an AttentionRNN, not {type(net).__name__}")
        if net.uniform_context:
            raise SurgeryError("this AttentionRNN has no attention left (uniform_context=True); "
                               "remove_attention applies to the teacher")

    def architecture(self, net: BayesianNet) -> AttentionRNN:
        self.check(net)
        return net.replace(uniform_context=True)

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        I = named_indices(net, ATTENTION_VARIANTS[self.variant][0])
        return I, torch.zeros(I.numel(), dtype=torch.float64)

    def marginalized(self, net: BayesianNet) -> torch.Tensor:
        return named_indices(net, ATTENTION_VARIANTS[self.variant][1])

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "variant": self.variant}


def remove_attention(net: BayesianNet, variant: str = "w") -> RemoveAttention:
    """The operation removing the attention of ``net`` as ``variant`` says (checked now, errors name the fix);
    ``op.apply(net, gaussian)`` gives ``(student, student Gaussian)``."""
    op = RemoveAttention(variant)
    op.check(net)
    return op


# ============================================================================ the RNN family of the planner
def rnn_candidates(net: BayesianNet) -> list[Candidate]:
    """The three ways to remove the attention (``w``, ``uv``, ``all``), or none once it is gone."""
    if isinstance(net, AttentionRNN) and net.uniform_context:
        return []
    return [Candidate.of(remove_attention(net, v), net) for v in ATTENTION_VARIANTS]


def _check_pair(teacher: BayesianNet, student: BayesianNet) -> None:
    if not isinstance(teacher, AttentionRNN) or not isinstance(student, AttentionRNN):
        raise SurgeryError(f"the RNN planner turns an AttentionRNN into an AttentionRNN; got {teacher!r} -> "
                           f"{student!r}")
    tc, sc = teacher.config(), student.config()
    diff = [k for k in tc if k != "uniform_context" and tc[k] != sc.get(k)]
    if diff:
        raise SurgeryError(f"teacher and student differ in {diff}; attention removal keeps everything else: make the "
                           f"student with teacher.replace(uniform_context=True)")
    if teacher.uniform_context and not student.uniform_context:
        raise SurgeryError("the student has attention but the teacher has none; surgery only removes")


def _schedule(planner: Planner, teacher: AttentionRNN, student: AttentionRNN) -> None:
    """The one choice: which variant removes the attention (the highest remove-score of the three)."""
    if student.uniform_context and not teacher.uniform_context:
        planner.step(planner.choose(rnn_candidates(teacher), 1)[0].op)
    else:
        planner.ops.append(SameFamily())


register_family(Family("rnn", AttentionRNN, _check_pair, _schedule, rnn_candidates))
