"""Surgery on convolutional networks (:class:`~pyro_distill.nets.cnn.CNN`): the convolutional ``phi``.

* :class:`RemoveChannels`      channels ``J`` of conv layer ``t`` go: filters ``J`` of ``conv_t`` (weights and
  bias) and the input-channel slices ``J`` of ``conv_{t+1}`` -- or, after the last conv layer, the columns of
  ``dense1.weight`` that the flattened channels ``J`` feed -- are conditioned on 0. Exact for any activation
  and pooling: a removed channel may still compute ``pool(s(0))`` but everything it feeds is multiplied by 0.
* :class:`RemoveDenseNeurons`  neurons ``J`` of hidden dense layer ``t`` go, as the MLP's ``phi``: rows ``J``
  of ``dense_t.weight``, ``dense_t.bias[J]`` and columns ``J`` of ``dense_{t+1}.weight``.

The coordinates that remain, in their original order, are exactly the smaller CNN's layout (filters are rows;
input channels are the second axis of a conv weight; the flattened features are channel-major), so
``Operation.apply`` only conditions. :func:`plan_cnn` turns a teacher CNN into a narrower student CNN,
choosing what goes with the same selectors as the MLP planner, applied to channel / neuron coordinate groups;
:func:`~pyro_distill.surgery.plan` hands a CNN teacher to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from ..nets.cnn import CNN
from .base import Operation, Plan, SurgeryError, check_layout, register_operation
from .mlp import SameFamily

__all__ = ["RemoveChannels", "RemoveDenseNeurons", "remove_channels", "remove_dense_neurons",
           "channel_coordinates", "dense_neuron_coordinates", "cnn_scores", "plan_cnn", "CNN_SELECTORS"]


def _as_cnn(net: BayesianNet, what: str) -> CNN:
    if not isinstance(net, CNN):
        raise SurgeryError(f"{what} applies to a CNN, got {net!r}; use the operations of that network family")
    return net


def _clean_indices(values: Sequence[int] | torch.Tensor, what: str, unit: str) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    bad = [j for j in values if isinstance(j, bool) or not float(j).is_integer()]
    if bad:
        raise SurgeryError(f"{what}: {unit} indices must be integers, got {bad}; pass whole numbers like [0, 3]")
    vals = [int(j) for j in values]
    if not vals:
        raise SurgeryError(f"{what}: no {unit}s given; pass at least one {unit} index")
    if len(set(vals)) != len(vals):
        rep = sorted({j for j in vals if vals.count(j) > 1})
        raise SurgeryError(f"{what}: {unit}s {rep} are repeated; list each {unit} once")
    return tuple(sorted(vals))


def _check_range(layer: int, n_layers: int, kind: str, what: str) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SurgeryError(f"{what}: layer must be an integer, got {layer!r}")
    if not 1 <= layer <= n_layers:
        raise SurgeryError(f"{what}: this CNN has {kind} layers 1..{n_layers}" if n_layers else
                           f"{what}: this CNN has no {kind} layer")


def channel_coordinates(net: CNN, layer: int, channels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Flat indices that carry channels ``channels`` of conv layer ``layer``: their filters in ``conv_t.weight``
    and ``conv_t.bias``, and what they feed: ``conv_{t+1}.weight[:, J]`` or the columns ``c h w .. (c+1) h w - 1``
    of ``dense1.weight`` for each ``c`` in ``J`` (sorted)."""
    lay = net.layout
    J = torch.as_tensor(list(channels), dtype=torch.long)
    parts = [lay.rows(f"conv{layer}.weight", J)]
    if net.bias:
        parts.append(lay.entries(f"conv{layer}.bias", J))
    if layer < net.num_conv:
        parts.append(lay.cols(f"conv{layer + 1}.weight", J))
    else:
        hw = net.pixels_per_channel
        cols = (J.unsqueeze(-1) * hw + torch.arange(hw)).reshape(-1)
        parts.append(lay.cols("dense1.weight", cols))
    return torch.cat(parts).sort().values


def dense_neuron_coordinates(net: CNN, layer: int, neurons: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Flat indices that carry neurons ``neurons`` of hidden dense layer ``layer``: rows of ``dense_t.weight``,
    ``dense_t.bias[J]``, columns of ``dense_{t+1}.weight`` (sorted)."""
    lay = net.layout
    parts = [lay.rows(f"dense{layer}.weight", neurons)]
    if net.bias:
        parts.append(lay.entries(f"dense{layer}.bias", neurons))
    parts.append(lay.cols(f"dense{layer + 1}.weight", neurons))
    return torch.cat(parts).sort().values


# ============================================================================ channels
@register_operation
class RemoveChannels(Operation):
    """Remove channels ``J`` of conv layer ``t``: condition filters ``J`` of ``conv_t`` (weights, bias) and the
    input-channel slice ``J`` of ``conv_{t+1}`` (or the matching ``dense1`` columns) on 0."""

    name = "remove_channels"

    def __init__(self, layer: int, channels: Sequence[int] | torch.Tensor):
        self.layer = int(layer)
        self.channels = _clean_indices(channels, f"remove_channels(layer={layer})", "channel")

    def check(self, net: BayesianNet) -> None:
        net = _as_cnn(net, "remove_channels")
        what = f"cannot remove channels {list(self.channels)} of conv layer {self.layer}"
        _check_range(self.layer, net.num_conv, "conv", what)
        n = net.channels[self.layer - 1]
        bad = [j for j in self.channels if not 0 <= j < n]
        if bad:
            raise SurgeryError(f"{what}: channels {bad} are out of range; conv layer {self.layer} has channels "
                               f"0..{n - 1}")
        if len(self.channels) >= n:
            raise SurgeryError(f"{what}: that is every channel of the layer (c_{self.layer}={n}); keep at least one")

    def architecture(self, net: BayesianNet) -> CNN:
        net = _as_cnn(net, "remove_channels")
        channels = list(net.channels)
        channels[self.layer - 1] -= len(self.channels)
        return net.replace(channels=channels)

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        idx = channel_coordinates(_as_cnn(net, "remove_channels"), self.layer, self.channels)
        return idx, torch.zeros(idx.numel(), dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "layer": self.layer, "channels": list(self.channels)}


# ============================================================================ dense head neurons
@register_operation
class RemoveDenseNeurons(Operation):
    """Remove neurons ``J`` of hidden dense layer ``t`` of a CNN's head: condition rows ``J`` of
    ``dense_t.weight``, ``dense_t.bias[J]`` and columns ``J`` of ``dense_{t+1}.weight`` on 0 (the MLP's phi)."""

    name = "remove_dense_neurons"

    def __init__(self, layer: int, neurons: Sequence[int] | torch.Tensor):
        self.layer = int(layer)
        self.neurons = _clean_indices(neurons, f"remove_dense_neurons(layer={layer})", "neuron")

    def check(self, net: BayesianNet) -> None:
        net = _as_cnn(net, "remove_dense_neurons")
        what = f"cannot remove neurons {list(self.neurons)} of dense layer {self.layer}"
        L = net.num_dense
        if self.layer == L:
            raise SurgeryError(f"{what}: it is the output layer (dense={net.dense}); its neurons are the outputs "
                               + (f"(choose a hidden dense layer 1..{L - 1})" if L > 1 else
                                  "and this CNN has no hidden dense layer"))
        _check_range(self.layer, L - 1, "hidden dense", what)
        n = net.dense[self.layer - 1]
        bad = [j for j in self.neurons if not 0 <= j < n]
        if bad:
            raise SurgeryError(f"{what}: neurons {bad} are out of range; dense layer {self.layer} has neurons "
                               f"0..{n - 1}")
        if len(self.neurons) >= n:
            raise SurgeryError(f"{what}: that is every neuron of the layer (d_{self.layer}={n}); keep at least one")

    def architecture(self, net: BayesianNet) -> CNN:
        net = _as_cnn(net, "remove_dense_neurons")
        dense = list(net.dense)
        dense[self.layer - 1] -= len(self.neurons)
        return net.replace(dense=dense)

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        idx = dense_neuron_coordinates(_as_cnn(net, "remove_dense_neurons"), self.layer, self.neurons)
        return idx, torch.zeros(idx.numel(), dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "layer": self.layer, "neurons": list(self.neurons)}


def remove_channels(net: BayesianNet, layer: int, channels: Sequence[int] | torch.Tensor) -> RemoveChannels:
    """The operation removing ``channels`` of conv layer ``layer`` of ``net`` (checked now, errors name the fix)."""
    op = RemoveChannels(layer, channels)
    op.check(net)
    return op


def remove_dense_neurons(net: BayesianNet, layer: int, neurons: Sequence[int] | torch.Tensor) -> RemoveDenseNeurons:
    """The operation removing ``neurons`` of hidden dense layer ``layer`` of a CNN (checked now)."""
    op = RemoveDenseNeurons(layer, neurons)
    op.check(net)
    return op


# ============================================================================ selectors and the plan
def _snr(groups: list[torch.Tensor], q: Gaussian, p0: Gaussian, gen: torch.Generator) -> torch.Tensor:
    m, var = q.mean, q.variance
    return torch.stack([(m[i] ** 2 / var[i]).mean() for i in groups]).to(torch.float64)


def _magnitude(groups: list[torch.Tensor], q: Gaussian, p0: Gaussian, gen: torch.Generator) -> torch.Tensor:
    m = q.mean
    return torch.stack([torch.linalg.vector_norm(m[i]) for i in groups]).to(torch.float64)


def _random(groups: list[torch.Tensor], q: Gaussian | None, p0: Gaussian | None, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(len(groups), generator=gen, dtype=torch.float64)


def _evidence(groups: list[torch.Tensor], q: Gaussian, p0: Gaussian, gen: torch.Generator) -> torch.Tensor:
    """Keep-score ``-(log q(u_I = 0) - log p0(u_I = 0))``: minus the Savage-Dickey change in log evidence."""
    out = []
    for i in groups:
        zero = torch.zeros(i.numel(), dtype=q.dtype, device=q.device)
        out.append(q.marginalize(i).log_prob(zero) - p0.marginalize(i).log_prob(zero.to(p0.dtype)))
    return -torch.stack(out).to(torch.float64)


#: name -> (keep-score over coordinate groups: higher means keep, needs a posterior); as the MLP planner's
CNN_SELECTORS = {"snr": (_snr, True), "magnitude": (_magnitude, True), "random": (_random, False),
                 "evidence": (_evidence, True)}


def _groups(net: CNN, kind: str, layer: int) -> list[torch.Tensor]:
    if kind == "conv":
        return [channel_coordinates(net, layer, [c]) for c in range(net.channels[layer - 1])]
    return [dense_neuron_coordinates(net, layer, [j]) for j in range(net.dense[layer - 1])]


def cnn_scores(net: CNN, kind: str, layer: int, selector: str = "snr", posterior: Gaussian | None = None,
               prior: Gaussian | None = None, seed: int = 0) -> torch.Tensor:
    """Keep-scores of the channels of conv layer ``layer`` (``kind="conv"``) or the neurons of hidden dense
    layer ``layer`` (``kind="dense"``); the lowest are removed first."""
    fn = _selector(selector, posterior)
    if kind not in ("conv", "dense"):
        raise ValueError(f"kind must be 'conv' or 'dense', got {kind!r}")
    if prior is None and posterior is not None:
        prior = net.default_prior(posterior.dtype, posterior.device)
    return fn(_groups(net, kind, layer), posterior, prior, torch.Generator().manual_seed(seed))


def _selector(selector: str, posterior: Gaussian | None):
    if selector not in CNN_SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {sorted(CNN_SELECTORS)}")
    fn, needs = CNN_SELECTORS[selector]
    if needs and posterior is None:
        raise ValueError(f"selector {selector!r} scores channels on the teacher's posterior: pass posterior=<Gaussian>,"
                         " or use selector='random'")
    return fn


def plan_cnn(teacher: BayesianNet, student: BayesianNet, selector: str = "snr", posterior: Gaussian | None = None,
             seed: int = 0, prior: Gaussian | None = None) -> Plan:
    """The operations that turn CNN ``teacher`` into the narrower CNN ``student`` (same depth, kernels, pooling,
    image shape and outputs; no wider layer): per conv layer in order one :class:`RemoveChannels`, then per hidden
    dense layer one :class:`RemoveDenseNeurons`, each choosing the lowest keep-scores on the posterior as the
    previous steps conditioned it. ``prior``: the prior ``posterior`` was fitted under (``evidence`` only)."""
    t, s = _as_cnn(teacher, "plan_cnn"), _as_cnn(student, "plan_cnn")
    ct, cs = t.config(), s.config()
    differ = [k for k in ct if k not in ("channels", "dense") and ct[k] != cs[k]]
    if differ:
        k = differ[0]
        raise SurgeryError(f"teacher and student CNNs differ in {k} ({ct[k]!r} vs {cs[k]!r}); channel surgery keeps "
                           f"everything but the widths: make the student with {k}={ct[k]!r}")
    if len(t.channels) != len(s.channels) or len(t.dense) != len(s.dense):
        raise SurgeryError(f"teacher (channels={t.channels}, dense={t.dense}) and student (channels={s.channels}, "
                           f"dense={s.dense}) differ in depth; plan_cnn only narrows layers (same number of conv and "
                           "dense layers)")
    if t.dense[-1] != s.dense[-1]:
        raise SurgeryError(f"teacher has {t.dense[-1]} outputs and student {s.dense[-1]}; they must agree")
    wider = [(k, i + 1) for k, a, b in (("conv", t.channels, s.channels), ("dense", t.dense, s.dense))
             for i, (x, y) in enumerate(zip(a, b)) if y > x]
    if wider:
        raise SurgeryError(f"the student is wider than the teacher at {wider} (teacher channels={t.channels}, "
                           f"dense={t.dense}; student channels={s.channels}, dense={s.dense}); surgery only removes")
    fn = _selector(selector, posterior)
    if posterior is not None:
        check_layout(t, posterior)
        p0 = prior if prior is not None else t.default_prior(posterior.dtype, posterior.device)
        check_layout(t, p0)
    else:
        p0 = None
    gen = torch.Generator().manual_seed(seed)
    net, q = t, posterior
    ops: list[Operation] = []

    def shrink(kind: str, layer: int, count: int) -> None:
        nonlocal net, q, p0
        if count <= 0:
            return
        score = fn(_groups(net, kind, layer), q, p0, gen)
        drop = torch.sort(score, stable=True).indices[:count].tolist()
        op = RemoveChannels(layer, drop) if kind == "conv" else RemoveDenseNeurons(layer, drop)
        if q is not None:
            _, q = op.apply(net, q)
            _, p0 = op.apply(net, p0)
        net = op.architecture(net)
        ops.append(op)

    for i, (a, b) in enumerate(zip(t.channels, s.channels), start=1):
        shrink("conv", i, a - b)
    for i, (a, b) in enumerate(zip(t.dense[:-1], s.dense[:-1]), start=1):
        shrink("dense", i, a - b)
    if not ops:
        ops.append(SameFamily())
    return Plan(ops, teacher=t.config(), student=net.config(), selector=selector)
