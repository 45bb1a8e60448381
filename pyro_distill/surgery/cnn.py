"""Surgery on convolutional networks (:class:`~pyro_distill.nets.cnn.CNN`): the convolutional ``phi``.

* :class:`RemoveChannels`      channels ``J`` of conv layer ``t`` go: filters ``J`` of ``conv_t`` (weights and
  bias) and the input-channel slices ``J`` of ``conv_{t+1}`` -- or, after the last conv layer, the columns of
  ``dense1.weight`` that the flattened channels ``J`` feed -- are conditioned on 0. Exact for any activation
  and pooling: a removed channel may still compute ``pool(s(0))`` but everything it feeds is multiplied by 0.
* :class:`RemoveDenseNeurons`  neurons ``J`` of hidden dense layer ``t`` go, as the MLP's ``phi``: rows ``J``
  of ``dense_t.weight``, ``dense_t.bias[J]`` and columns ``J`` of ``dense_{t+1}.weight``.

The coordinates that remain, in their original order, are exactly the smaller CNN's layout (filters are rows;
input channels are the second axis of a conv weight; the flattened features are channel-major), so
``Operation.apply`` only conditions. The CNN family of the planner (:mod:`.planning`): candidates are single
channels and single dense neurons; :func:`~pyro_distill.surgery.plan` narrows a teacher CNN to a student CNN
(same depth, kernels, pooling, image shape and outputs) with the shared selectors; :func:`plan_cnn` is the same
call kept for its callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from ..nets.cnn import CNN
from .base import Operation, Plan, SurgeryError, register_operation, unit_indices
from .mlp import SameFamily
from .planning import Candidate, Family, Planner, plan, register_family

__all__ = ["RemoveChannels", "RemoveDenseNeurons", "remove_channels", "remove_dense_neurons",
           "channel_coordinates", "dense_neuron_coordinates", "channel_candidates", "dense_neuron_candidates",
           "cnn_candidates", "plan_cnn"]


def _as_cnn(net: BayesianNet, what: str) -> CNN:
    if not isinstance(net, CNN):
        raise SurgeryError(f"{what} applies to a CNN, got {net!r}; use the operations of that network family")
    return net


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
        self.channels = unit_indices(channels, f"remove_channels(layer={layer})", "channel")

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
        self.neurons = unit_indices(neurons, f"remove_dense_neurons(layer={layer})", "neuron")

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


# ============================================================================ the CNN family of the planner
def channel_candidates(net: CNN, layer: int) -> list[Candidate]:
    """One candidate per channel of conv ``layer``: :class:`RemoveChannels` of that channel alone."""
    return [Candidate.of(RemoveChannels(layer, [c]), net) for c in range(net.channels[layer - 1])]


def dense_neuron_candidates(net: CNN, layer: int) -> list[Candidate]:
    """One candidate per neuron of hidden dense ``layer``: :class:`RemoveDenseNeurons` of that neuron alone."""
    return [Candidate.of(RemoveDenseNeurons(layer, [j]), net) for j in range(net.dense[layer - 1])]


def cnn_candidates(net: BayesianNet) -> list[Candidate]:
    """Every single-channel and single-dense-neuron removal ``net`` allows (layers of width > 1)."""
    net = _as_cnn(net, "cnn_candidates")
    out = [c for t, n in enumerate(net.channels, start=1) if n > 1 for c in channel_candidates(net, t)]
    return out + [c for t, n in enumerate(net.dense[:-1], start=1) if n > 1 for c in dense_neuron_candidates(net, t)]


def _check_pair(teacher: BayesianNet, student: BayesianNet) -> None:
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


def _schedule(planner: Planner, teacher: CNN, student: CNN) -> None:
    """Per conv layer in order one :class:`RemoveChannels`, then per hidden dense layer one
    :class:`RemoveDenseNeurons`, each taking the highest remove-scores on the posterior as the earlier steps left it."""
    for i, (a, b) in enumerate(zip(teacher.channels, student.channels), start=1):
        if a > b:
            chosen = planner.choose(channel_candidates(planner.net, i), a - b)
            planner.step(RemoveChannels(i, [c.op.channels[0] for c in chosen]))
    for i, (a, b) in enumerate(zip(teacher.dense[:-1], student.dense[:-1]), start=1):
        if a > b:
            chosen = planner.choose(dense_neuron_candidates(planner.net, i), a - b)
            planner.step(RemoveDenseNeurons(i, [c.op.neurons[0] for c in chosen]))
    if not planner.ops:
        planner.ops.append(SameFamily())


register_family(Family("cnn", CNN, _check_pair, _schedule, cnn_candidates))


def plan_cnn(teacher: BayesianNet, student: BayesianNet, selector: str = "snr", posterior: Gaussian | None = None,
             seed: int = 0, prior: Gaussian | None = None) -> Plan:
    """:func:`~pyro_distill.surgery.planning.plan` for a CNN teacher (kept for its callers; same arguments)."""
    _as_cnn(teacher, "plan_cnn")
    return plan(teacher, student, selector=selector, posterior=posterior, seed=seed, prior=prior)
