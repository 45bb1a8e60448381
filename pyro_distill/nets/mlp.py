"""Multilayer perceptron over one flat weight vector (the paper's network family)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..layout import Layout
from .base import BayesianNet, check_options, fan_in_scale, register_net

__all__ = ["MLP", "ACTIVATIONS", "IDEMPOTENT", "ANALYTIC_GRAD_ACTIVATIONS"]

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
#: the chain rule through each activation, ``(d ll/d h, pre-activation a, h = sigma(a)) -> d ll/d a``, for the
#: hand-written backward of :meth:`MLP.log_likelihood_and_grad`
_BACKWARD = {
    "relu": lambda d, a, h: torch.ops.aten.threshold_backward(d, a, 0),  # one kernel: d where a > 0, else 0
    "identity": lambda d, a, h: d,
    "tanh": lambda d, a, h: d * (1 - h * h),
    "sigmoid": lambda d, a, h: d * h * (1 - h),
}
ANALYTIC_GRAD_ACTIVATIONS = tuple(_BACKWARD)


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
        check_options(activation, ACTIVATIONS, likelihood, prior_scale)
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


    def prior_scales(self) -> torch.Tensor:
        parts = []
        for t in range(1, len(self.sizes)):
            s = self.prior_scale if self.prior_scale is not None else fan_in_scale(self.sizes[t - 1])
            n = self.sizes[t] * self.sizes[t - 1] + (self.sizes[t] if self.bias else 0)
            parts.append(torch.full((n,), s, dtype=torch.float64))
        return torch.cat(parts)

    def kron_index(self) -> list[torch.Tensor]:
        """Each layer's flat indices as a matrix ``[n_t, n_{t-1} (+1)]``: row = neuron, its inputs (then its bias)
        as columns -- KFAC's augmented ``[U_t | b_t]``, the blocks of a Kronecker posterior."""
        from ..gaussian import kron_index

        return [kron_index(self.layout, f"layer{t}.weight", f"layer{t}.bias" if self.bias else None)
                for t in range(1, len(self.sizes))]

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

    def log_likelihood_and_grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                noise_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_n log p(y_n | x_n, w), its gradient in w)`` for ONE weight vector ``w`` ``[p]``, by a
        hand-written backward pass (one matmul per layer and direction, no autograd graph).

        For samplers that need many thousands of gradients of a small net (NUTS), where the cost is
        per-operation overhead, not FLOPs: on an MLP [10, 8, 3] with N = 500 it takes about half the time
        of autograd through :meth:`forward` and a third of autograd through the traced Pyro model
        (``benchmarks/diagnostics.py``). Activations: :data:`ANALYTIC_GRAD_ACTIVATIONS`; others fall back
        to autograd.
        """
        if w.dim() != 1 or w.shape[0] != self.num_params:
            raise ValueError(f"w must be one weight vector [p={self.num_params}], got {tuple(w.shape)}")
        if self.activation not in _BACKWARD:
            return super().log_likelihood_and_grad(w, x, y, noise_scale)
        act_backward = _BACKWARD[self.activation]
        L = self.num_layers
        views = [w[b.offset : b.stop].view(b.shape) for b in self.layout]  # the Layout's offsets, no checks
        Ws, bs = (views[0::2], views[1::2]) if self.bias else (views, [])
        hs, pre = [x], []
        h = x
        for t in range(L):
            a = torch.addmm(bs[t], h, Ws[t].T) if self.bias else h @ Ws[t].T
            h = a if t == L - 1 else self._act(a)
            pre.append(a)
            hs.append(h)
        out = h
        if self.likelihood == "categorical":
            yi = y.unsqueeze(-1) if y.dtype == torch.int64 else y.long().unsqueeze(-1)
            z = out - out.amax(-1, keepdim=True)  # one exp pass gives log Z and the softmax
            e = z.exp()
            s = e.sum(-1, keepdim=True)
            ll = z.gather(-1, yi).sum() - s.log().sum()
            d = e.div_(s).neg_().scatter_add_(-1, yi, torch.ones_like(s))  # one-hot(y) - softmax
        else:
            sd = self.noise_scale if noise_scale is None else noise_scale
            if sd is None:
                raise ValueError("this network's noise scale is fitted: pass noise_scale")
            sd = float(sd)
            r = y.to(out.dtype).reshape(out.shape) - out
            ll = -0.5 * r.square().sum() / sd**2 - out.numel() * (math.log(sd) + 0.5 * math.log(2 * math.pi))
            d = r / sd**2
        grads: list[torch.Tensor] = []  # filled from the last layer back, reversed at the end
        for t in range(L - 1, -1, -1):  # d = d ll / d a_t
            if self.bias:
                grads.append(d.sum(0))
            grads.append((d.T @ hs[t]).view(-1))
            if t > 0:
                d = act_backward(d @ Ws[t], pre[t - 1], hs[t])
        return ll, torch.cat(grads[::-1])
