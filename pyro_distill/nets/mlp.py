"""Multilayer perceptron over one flat weight vector (the paper's network family)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layout import Layout
from .base import LIKELIHOODS, BayesianNet, fan_in_scale, register_net

__all__ = ["MLP", "ACTIVATIONS", "IDEMPOTENT"]

ACTIVATIONS = {
    "relu": torch.relu,
    "identity": lambda h: h,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": torch.nn.functional.elu,
    "gelu": torch.nn.functional.gelu,
}
#: activations with sigma(sigma(x)) = sigma(x): a layer with U = I, b = 0 between them is a no-op
IDEMPOTENT = ("relu", "identity")


@register_net
class MLP(BayesianNet):
    """``f(x) = U_L s(... s(U_1 x + b_1) ...) + b_L``; sizes ``[n_0, n_1, ..., n_L]``.

    Layout: ``layer{t}.weight`` (``n_t x n_{t-1}``, row = neuron) then ``layer{t}.bias`` for t = 1..L.
    Prior: independent ``N(0, 1/n_{t-1})`` (fan-in) per weight of layer t, or ``N(0, prior_scale^2)``.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", bias: bool = True,
                 likelihood: str = "categorical", prior_scale: float | None = None,
                 noise_scale: float | None = 1.0):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"MLP sizes must be at least [n_in, n_out] with positive widths, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
        if prior_scale is not None and not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale}")
        self.sizes = sizes
        self.activation = activation
        self.bias = bool(bias)
        self.likelihood = likelihood
        self.prior_scale = prior_scale
        self.noise_scale = noise_scale
        blocks: list[tuple[str, tuple[int, ...]]] = []
        for t in range(1, len(sizes)):
            blocks.append((f"layer{t}.weight", (sizes[t], sizes[t - 1])))
            if self.bias:
                blocks.append((f"layer{t}.bias", (sizes[t],)))
        self.layout = Layout(blocks)
        self._act = ACTIVATIONS[activation]

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def num_outputs(self) -> int:
        return self.sizes[-1]

    def config(self) -> dict[str, Any]:
        return {"type": "MLP", "sizes": list(self.sizes), "activation": self.activation, "bias": self.bias,
                "likelihood": self.likelihood, "prior_scale": self.prior_scale, "noise_scale": self.noise_scale}

    def replace(self, **changes: Any) -> MLP:
        cfg = self.config() | changes
        cfg.pop("type")
        return MLP(**cfg)

    def prior_scales(self) -> torch.Tensor:
        parts = []
        for t in range(1, len(self.sizes)):
            s = self.prior_scale if self.prior_scale is not None else fan_in_scale(self.sizes[t - 1])
            n = self.sizes[t] * self.sizes[t - 1] + (self.sizes[t] if self.bias else 0)
            parts.append(torch.full((n,), s, dtype=torch.float64))
        return torch.cat(parts)

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.sizes[0]:
            raise ValueError(f"inputs have {x.shape[-1]} features but the MLP expects {self.sizes[0]}")
        parts = self.layout.unflatten(w)
        h = x
        for t in range(1, len(self.sizes)):
            h = torch.matmul(h, parts[f"layer{t}.weight"].transpose(-1, -2))
            if self.bias:
                h = h + parts[f"layer{t}.bias"].unsqueeze(-2)
            if t < len(self.sizes) - 1:
                h = self._act(h)
        return h

    def hidden(self, w: torch.Tensor, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Activations after hidden layer ``layer`` (1-based)."""
        parts = self.layout.unflatten(w)
        h = x
        for t in range(1, layer + 1):
            h = torch.matmul(h, parts[f"layer{t}.weight"].transpose(-1, -2))
            if self.bias:
                h = h + parts[f"layer{t}.bias"].unsqueeze(-2)
            h = self._act(h)
        return h
