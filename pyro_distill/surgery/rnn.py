"""Removing additive attention from an :class:`~pyro_distill.nets.AttentionRNN` by conditioning.

``a(h, h') = wᵀ tanh(U h + V h')`` is identically 0 when ``w = 0`` or when ``U = V = 0`` (``tanh 0 = 0``),
so the masked softmax is uniform (``1/T`` over the valid source positions) and the network is the
``uniform_context`` RNN (context = mean of the encoder states). Three variants:

- ``"w"``: condition ``attn.w = 0``; ``U, V`` no longer matter and are marginalized;
- ``"uv"``: condition ``attn.U = attn.V = 0``; ``w`` no longer matters and is marginalized;
- ``"all"``: condition all three on 0.

The Gaussian part is the shared :meth:`Operation.apply` (marginalize, then condition with Cholesky /
Woodbury solves); low-rank posteriors stay low-rank.
"""

from __future__ import annotations

from typing import Any

import torch

from ..gaussian import Gaussian
from ..nets.attention_rnn import ATTENTION_BLOCKS, AttentionRNN
from ..nets.base import BayesianNet
from .base import Operation, SurgeryError, register_operation

__all__ = ["RemoveAttention", "remove_attention", "ATTENTION_VARIANTS"]

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

    def _indices(self, net: BayesianNet, names: tuple[str, ...]) -> torch.Tensor:
        if not names:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([net.layout.indices(n) for n in names]).sort().values

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        I = self._indices(net, ATTENTION_VARIANTS[self.variant][0])
        return I, torch.zeros(I.numel(), dtype=torch.float64)

    def marginalized(self, net: BayesianNet) -> torch.Tensor:
        return self._indices(net, ATTENTION_VARIANTS[self.variant][1])

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "variant": self.variant}


def remove_attention(net: AttentionRNN, gaussian: Gaussian, variant: str = "w") -> tuple[AttentionRNN, Gaussian]:
    """``(student, student Gaussian)``: the teacher's posterior conditioned as ``variant`` says."""
    return RemoveAttention(variant).apply(net, gaussian)
