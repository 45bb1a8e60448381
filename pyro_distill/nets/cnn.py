"""A LeNet-style convolutional network over one flat weight vector: conv -> activation -> pool blocks, then
dense layers.

Many posterior draws run in one call by grouped convolution: the draw dimension is folded into the channel
dimension (``S`` draws of ``c`` channels = ``S * c`` channels in ``S`` groups), so one ``conv2d`` call per
layer serves every draw. On digits (1,437 images of 8x8, channels [6, 16], S = 50 draws, one CPU thread) it
took 1.2-1.3x less time than ``torch.func.vmap`` over the draws, for the forward and for forward + backward
(``benchmarks/cnn_batching.py``); a one-off check of the conv blocks alone found im2col (``unfold``) + batched
matmul 1.6x slower than grouped. Memory: the conv activations of all draws at once, ``N x S c_t x h x w`` per layer
(chunk the inputs for large ``N S``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..layout import Layout
from .base import BayesianNet, check_options, fan_in_scale, register_net
from .mlp import ACTIVATIONS

__all__ = ["CNN", "POOLS"]

POOLS = ("max", "avg")


def _per_layer(value: int | Sequence[int], n: int, what: str) -> list[int]:
    """An int for every conv layer, or one per layer."""
    vals = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(vals) != n:
        raise ValueError(f"{what} has {len(vals)} entries but there are {n} conv layers; give one per layer or an int")
    return vals


@register_net
class CNN(BayesianNet):
    """``f(x)``: for each conv layer ``t = 1..T``: ``h <- pool_t(s(conv_t(h) + b_t))``; then the features are
    flattened channel-major (``[C, h, w]`` row-major, as ``torch.flatten``) and pass an MLP head
    ``dense1 .. denseL`` (activation between dense layers, none after the last).

    Inputs: images ``[N, H, W]`` (one input channel), ``[N, C_in, H, W]``, or flat ``[N, C_in*H*W]``;
    ``image_shape`` is ``(H, W)`` or ``(C_in, H, W)``. ``channels`` are the conv widths, ``dense`` the widths of
    the dense layers (the last is the number of outputs). ``kernel_size``, ``padding``, ``stride`` and ``pool``
    (a ``pool x pool`` window with stride ``pool``; 1 = no pooling) are ints or one per conv layer.

    Layout, in order: ``conv{t}.weight`` ``(c_t, c_{t-1}, k_t, k_t)`` (row = output channel = filter),
    ``conv{t}.bias`` ``(c_t,)``, then ``dense{t}.weight`` ``(d_t, d_{t-1})`` (row = neuron) and
    ``dense{t}.bias`` as in the MLP; ``d_0 = c_T h_T w_T``, so channel ``c`` of the last conv layer owns the
    contiguous columns ``c h_T w_T .. (c+1) h_T w_T - 1`` of ``dense1.weight``.

    Prior: fan-in ``N(0, 1/n_in)`` per weight and bias, ``n_in = c_{t-1} k_t^2`` for conv layer ``t`` and
    ``d_{t-1}`` for dense layer ``t``; or ``N(0, prior_scale^2)`` everywhere.
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], dense: Sequence[int],
                 kernel_size: int | Sequence[int] = 3, padding: int | Sequence[int] = 1,
                 stride: int | Sequence[int] = 1, pool: int | Sequence[int] = 2, pool_type: str = "max",
                 activation: str = "relu", bias: bool = True, likelihood: str = "categorical",
                 prior_scale: float | None = None, noise_scale: float | None = 1.0):
        shape = [int(s) for s in image_shape]
        if len(shape) == 2:
            shape = [1, *shape]
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (H, W) or (C_in, H, W) with positive sizes, got {image_shape}")
        channels, dense = [int(c) for c in channels], [int(d) for d in dense]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must list at least one positive conv width, got {channels}")
        if not dense or min(dense) < 1:
            raise ValueError(f"dense must list the dense widths ending in the number of outputs, got {dense}")
        T = len(channels)
        kernel_size, padding = _per_layer(kernel_size, T, "kernel_size"), _per_layer(padding, T, "padding")
        stride, pool = _per_layer(stride, T, "stride"), _per_layer(pool, T, "pool")
        if min(kernel_size) < 1 or min(stride) < 1 or min(pool) < 1 or min(padding) < 0:
            raise ValueError(f"kernel_size, stride, pool must be >= 1 and padding >= 0; got kernel_size={kernel_size}, "
                             f"stride={stride}, pool={pool}, padding={padding}")
        if pool_type not in POOLS:
            raise ValueError(f"unknown pool_type {pool_type!r}; choose one of {POOLS}")
        check_options(activation, ACTIVATIONS, likelihood, prior_scale)
        self.image_shape = tuple(shape)
        self.channels, self.dense = channels, dense
        self.kernel_size, self.padding, self.stride, self.pool = kernel_size, padding, stride, pool
        self.pool_type, self.activation, self.bias = pool_type, activation, bool(bias)
        self.likelihood, self.prior_scale, self.noise_scale = likelihood, prior_scale, noise_scale
        self._act = ACTIVATIONS[activation]
        self.feature_maps = self._spatial()
        self.layout, self._scales = self._build()

    # ------------------------------------------------------------------ description
    def _spatial(self) -> list[tuple[int, int]]:
        """``(h_t, w_t)`` after each conv block (conv then pool), with an error naming the layer that empties."""
        return [pooled for _, pooled in self._conv_sizes()]

    def _conv_sizes(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per conv layer ``((h, w) of its conv output, (h, w) after its pooling)``, with an error naming the layer
        that empties."""
        h, w = self.image_shape[1:]
        out = []
        for t in range(self.num_conv):
            k, p, s, q = self.kernel_size[t], self.padding[t], self.stride[t], self.pool[t]
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            if min(h, w) < 1:
                raise ValueError(f"conv layer {t + 1} (kernel {k}, padding {p}) is larger than its {h}x{w} input; "
                                 "use a smaller kernel, more padding, or fewer pooling steps")
            conv = (h, w)
            h, w = h // q, w // q
            if min(h, w) < 1:
                raise ValueError(f"pooling {q}x{q} after conv layer {t + 1} leaves no pixels; use pool=1 there")
            out.append((conv, (h, w)))
        return out

    @property
    def num_conv(self) -> int:
        return len(self.channels)

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    @property
    def num_outputs(self) -> int:
        return self.dense[-1]

    @property
    def num_features(self) -> int:
        """Inputs of the first dense layer: ``c_T h_T w_T``."""
        h, w = self.feature_maps[-1]
        return self.channels[-1] * h * w

    @property
    def pixels_per_channel(self) -> int:
        """``h_T w_T``: the columns of ``dense1.weight`` that one channel of the last conv layer owns."""
        h, w = self.feature_maps[-1]
        return h * w

    def config(self) -> dict[str, Any]:
        return {"type": "CNN", "image_shape": list(self.image_shape), "channels": list(self.channels),
                "dense": list(self.dense), "kernel_size": list(self.kernel_size), "padding": list(self.padding),
                "stride": list(self.stride), "pool": list(self.pool), "pool_type": self.pool_type,
                "activation": self.activation, "bias": self.bias, "likelihood": self.likelihood,
                "prior_scale": self.prior_scale, "noise_scale": self.noise_scale}


    def _build(self) -> tuple[Layout, list[tuple[int, float]]]:
        blocks: list[tuple[str, tuple[int, ...]]] = []
        scales: list[tuple[int, float]] = []

        def add(name: str, shape: tuple[int, ...], fan_in: int) -> None:
            blocks.append((name, shape))
            scales.append((math.prod(shape), self.prior_scale if self.prior_scale is not None else
                           fan_in_scale(fan_in)))

        c_in = self.image_shape[0]
        for t, (c, k) in enumerate(zip(self.channels, self.kernel_size), start=1):
            add(f"conv{t}.weight", (c, c_in, k, k), c_in * k * k)
            if self.bias:
                add(f"conv{t}.bias", (c,), c_in * k * k)
            c_in = c
        d_in = self.num_features
        for t, d in enumerate(self.dense, start=1):
            add(f"dense{t}.weight", (d, d_in), d_in)
            if self.bias:
                add(f"dense{t}.bias", (d,), d_in)
            d_in = d
        return Layout(blocks), scales

    def prior_scales(self) -> torch.Tensor:
        return torch.cat([torch.full((n,), s, dtype=torch.float64) for n, s in self._scales])

    def kron_index(self) -> list[torch.Tensor]:
        """Each layer's flat indices as a matrix, one row per filter / neuron, its inputs (then its bias) as
        columns: conv ``[c_t, c_{t-1} k_t^2 (+1)]``, dense ``[d_t, d_{t-1} (+1)]``. These are the blocks of a
        Kronecker (KFAC-style) posterior; channel and neuron removal condition whole rows and columns of them."""
        out = []
        for kind, n in (("conv", self.num_conv), ("dense", self.num_dense)):
            for t in range(1, n + 1):
                rows = self.layout.shape(f"{kind}{t}.weight")[0]
                idx = self.layout.indices(f"{kind}{t}.weight").reshape(rows, -1)
                if self.bias:
                    idx = torch.cat([idx, self.layout.indices(f"{kind}{t}.bias").reshape(rows, 1)], 1)
                out.append(idx)
        return out

    # ------------------------------------------------------------------ the function
    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as ``[N, C_in, H, W]`` (from ``[N, H, W]``, ``[N, C_in, H, W]`` or flat ``[N, C_in*H*W]``)."""
        C, H, W = self.image_shape
        if x.dim() == 2 and x.shape[1] == C * H * W:
            return x.reshape(x.shape[0], C, H, W)
        if x.dim() == 3 and C == 1 and tuple(x.shape[1:]) == (H, W):
            return x.unsqueeze(1)
        if x.dim() == 4 and tuple(x.shape[1:]) == (C, H, W):
            return x
        flat = f"[N, {C * H * W}]"
        raise ValueError(f"inputs of shape {tuple(x.shape)} do not fit image_shape {self.image_shape}: give "
                         f"[N, {C}, {H}, {W}]" + (f", [N, {H}, {W}]" if C == 1 else "") + f" or flat {flat}")

    def check_data(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.images(x)
        super().check_data(x, y)

    def _pool(self, h: torch.Tensor, q: int) -> torch.Tensor:
        if q == 1:
            return h
        return F.max_pool2d(h, q) if self.pool_type == "max" else F.avg_pool2d(h, q)

    def features(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The flattened output of the conv blocks, ``[..., N, c_T h_T w_T]`` (channel-major)."""
        lead = w.shape[:-1]
        S = math.prod(lead)
        P = self.layout.unflatten(w.reshape(S, w.shape[-1]))
        h = self.images(x).to(w.dtype)
        N = h.shape[0]
        for t in range(1, self.num_conv + 1):
            Wt = P[f"conv{t}.weight"]  # [S, c_out, c_in, k, k]
            # draw s, channel c -> channel s * c_out + c; the first layer shares its input, later ones are grouped
            weight = Wt.reshape(S * Wt.shape[1], *Wt.shape[2:])
            b = P[f"conv{t}.bias"].reshape(-1) if self.bias else None
            h = F.conv2d(h, weight, b, stride=self.stride[t - 1], padding=self.padding[t - 1],
                         groups=1 if t == 1 else S)
            h = self._pool(self._act(h), self.pool[t - 1])
        h = h.reshape(N, S, self.num_features).transpose(0, 1)  # [S, N, c h w]
        return h.reshape(*lead, N, self.num_features)

    # ------------------------------------------------------------------ Kronecker structure (KFAC)
    def kfac_maps(self) -> list[dict[str, Any]]:
        """One Kronecker block per layer (:meth:`kron_index`): conv ``t`` as a linear map of its input patches
        (``c_{t-1} k_t^2`` columns in the weight's ``(c_in, k, k)`` order, then the bias) applied at every output
        location (KFC, Grosse & Martens 2016: weight sharing over locations, as KFAC-expand), dense ``t`` as in the
        MLP. Entries as :meth:`pyro_distill.nets.transformer.Transformer.kfac_maps`."""
        names = [f"conv{t}" for t in range(1, self.num_conv + 1)] + [f"dense{t}" for t in range(1, self.num_dense + 1)]
        return [{"name": n, "index": idx, "input": n, "input_head": None, "output": n, "output_head": None}
                for n, idx in zip(names, self.kron_index())]

    def kfac_forward(self, w: torch.Tensor, x: torch.Tensor, taps: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """``(logits [N, C], record)`` for ONE weight vector ``w [p]`` with ``taps[layer]`` (zeros from
        :meth:`kfac_taps`; a conv tap channel-last) added to each layer's pre-activation output;
        ``record[layer] = (inputs, all-True mask)``: a conv layer's input patches ``[N, locations, c_in k^2]``
        (``unfold``), a dense layer's input ``[N, d]``."""
        P = self.layout.unflatten(w)
        h = self.images(x).to(w.dtype)
        N, record = h.shape[0], {}
        for t in range(1, self.num_conv + 1):
            k, pad, st = self.kernel_size[t - 1], self.padding[t - 1], self.stride[t - 1]
            patches = F.unfold(h, k, padding=pad, stride=st).transpose(1, 2)  # [N, L, c_in k k]
            record[f"conv{t}"] = (patches, torch.ones(patches.shape[:2], dtype=torch.bool, device=h.device))
            h = F.conv2d(h, P[f"conv{t}.weight"], P[f"conv{t}.bias"] if self.bias else None, stride=st, padding=pad)
            h = self._pool(self._act(h + taps[f"conv{t}"].permute(0, 3, 1, 2)), self.pool[t - 1])
        h = h.reshape(N, self.num_features)
        for t in range(1, self.num_dense + 1):
            record[f"dense{t}"] = (h, torch.ones(N, dtype=torch.bool, device=h.device))
            h = h @ P[f"dense{t}.weight"].T + (P[f"dense{t}.bias"] if self.bias else 0) + taps[f"dense{t}"]
            if t < self.num_dense:
                h = self._act(h)
        return h, record

    def kfac_taps(self, w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero taps for :meth:`kfac_forward`: conv ``t`` channel-last ``[N, H_t, W_t, c_t]`` (its conv output before
        pooling; the output side of the block is the last axis), dense ``[N, d_t]``."""
        N = self.images(x).shape[0]
        z = {"dtype": w.dtype, "device": w.device}
        taps = {f"conv{t}": torch.zeros(N, h, wd, c, **z)
                for t, (((h, wd), _), c) in enumerate(zip(self._conv_sizes(), self.channels), 1)}
        for t in range(1, self.num_dense + 1):
            taps[f"dense{t}"] = torch.zeros(N, self.dense[t - 1], **z)
        return taps

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lead = w.shape[:-1]
        S = math.prod(lead)
        h = self.features(w, x).reshape(S, -1, self.num_features)
        P = self.layout.unflatten(w.reshape(S, w.shape[-1]))
        for t in range(1, self.num_dense + 1):
            h = torch.matmul(h, P[f"dense{t}.weight"].transpose(-1, -2))
            if self.bias:
                h = h + P[f"dense{t}.bias"].unsqueeze(-2)
            if t < self.num_dense:
                h = self._act(h)
        return h.reshape(*lead, h.shape[-2], self.num_outputs)
