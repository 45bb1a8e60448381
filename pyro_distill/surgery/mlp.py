"""Surgery on multilayer perceptrons (paper sections 3.1 to 3.3).

* :class:`SameFamily`      the architecture is unchanged: the student's prior is the teacher's posterior;
* :class:`RemoveNeurons`   ``phi``: neurons ``J`` of hidden layer ``t`` go; rows ``J`` of ``U_t``, ``b_t[J]`` and
  columns ``J`` of ``U_{t+1}`` are conditioned on 0, so those neurons neither receive nor send anything;
* :class:`RemoveLayer`     ``psi``: layer ``t`` goes; ``U_t = I`` and ``b_t = 0`` are conditioned on, which makes
  the layer the identity map. Exact when ``n_t = n_{t-1}`` and ``s(s(x)) = s(x)`` (ReLU, identity); the layers
  after ``t`` are renumbered.

The coordinates that remain, in their original order, are exactly the student's layout (rows of ``U_t`` are
neurons; columns of ``U_{t+1}`` stay row-major), so ``Operation.apply`` only has to condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..nets.base import BayesianNet
from ..nets.mlp import IDEMPOTENT, MLP
from .base import Operation, SurgeryError, register_operation

__all__ = ["SameFamily", "RemoveNeurons", "RemoveLayer", "same_family", "remove_neurons", "remove_layer",
           "neuron_coordinates"]


def _as_mlp(net: BayesianNet, what: str) -> MLP:
    if not isinstance(net, MLP):
        raise SurgeryError(f"{what} applies to an MLP, got {net!r}; use the operations of that network family")
    return net


def _check_hidden_layer(net: MLP, layer: int, what: str) -> None:
    L = net.num_layers
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise SurgeryError(f"{what}: layer must be an integer, got {layer!r}")
    if layer == L:
        raise SurgeryError(
            f"{what}: layer {layer} is the output layer of {net.sizes}; its neurons are the outputs and cannot be "
            f"removed (choose a hidden layer 1..{L - 1})"
        )
    if not 1 <= layer < L:
        hint = f"choose a hidden layer 1..{L - 1}" if L > 1 else "this MLP has no hidden layer"
        raise SurgeryError(f"{what}: layer {layer} is out of range for an MLP with sizes {net.sizes}; {hint}")


def neuron_coordinates(net: MLP, layer: int, neurons: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Flat indices that carry neurons ``neurons`` of hidden layer ``layer``: rows of ``U_t``, ``b_t[J]``,
    columns of ``U_{t+1}`` (sorted)."""
    lay = net.layout
    parts = [lay.rows(f"layer{layer}.weight", neurons)]
    if net.bias:
        parts.append(lay.entries(f"layer{layer}.bias", neurons))
    parts.append(lay.cols(f"layer{layer + 1}.weight", neurons))
    return torch.cat(parts).sort().values


# ============================================================================ same family
@register_operation
class SameFamily(Operation):
    """Same architecture (paper section 3.1): the student's prior is the teacher's posterior, unchanged."""

    name = "same_family"

    def check(self, net: BayesianNet) -> None:
        return None

    def architecture(self, net: BayesianNet) -> BayesianNet:
        return net

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name}


# ============================================================================ neurons
@register_operation
class RemoveNeurons(Operation):
    """Remove neurons ``J`` of hidden layer ``t``: condition rows ``J`` of ``U_t``, ``b_t[J]`` and columns ``J``
    of ``U_{t+1}`` on 0 (paper section 3.2). Exact for any activation: the removed neurons send nothing."""

    name = "remove_neurons"

    def __init__(self, layer: int, neurons: Sequence[int] | torch.Tensor):
        if isinstance(neurons, torch.Tensor):
            neurons = neurons.reshape(-1).tolist()
        bad = [j for j in neurons if isinstance(j, bool) or not float(j).is_integer()]
        if bad:
            raise SurgeryError(f"remove_neurons(layer={layer}): neuron indices must be integers, got {bad}; "
                               "pass whole neuron numbers like [0, 3]")
        neurons = [int(j) for j in neurons]
        if not neurons:
            raise SurgeryError(f"remove_neurons(layer={layer}): no neurons given; pass at least one neuron index")
        if len(set(neurons)) != len(neurons):
            rep = sorted({j for j in neurons if neurons.count(j) > 1})
            raise SurgeryError(f"remove_neurons(layer={layer}): neurons {rep} are repeated; list each neuron once")
        self.layer = int(layer)
        self.neurons = tuple(sorted(neurons))

    def check(self, net: BayesianNet) -> None:
        net = _as_mlp(net, "remove_neurons")
        what = f"cannot remove neurons {list(self.neurons)} of layer {self.layer}"
        _check_hidden_layer(net, self.layer, what)
        n = net.sizes[self.layer]
        bad = [j for j in self.neurons if not 0 <= j < n]
        if bad:
            raise SurgeryError(f"{what}: neurons {bad} are out of range; layer {self.layer} has neurons 0..{n - 1}")
        if len(self.neurons) >= n:
            hint = (f"keep at least one, or remove layer {self.layer} with remove_layer"
                    if net.num_layers > 1 else "keep at least one")
            raise SurgeryError(f"{what}: that is every neuron of the layer (n_{self.layer}={n}); {hint}")

    def architecture(self, net: BayesianNet) -> MLP:
        net = _as_mlp(net, "remove_neurons")
        sizes = list(net.sizes)
        sizes[self.layer] -= len(self.neurons)
        return net.replace(sizes=sizes)

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        idx = neuron_coordinates(_as_mlp(net, "remove_neurons"), self.layer, self.neurons)
        return idx, torch.zeros(idx.numel(), dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "layer": self.layer, "neurons": list(self.neurons)}


# ============================================================================ layers
@register_operation
class RemoveLayer(Operation):
    """Remove layer ``t``: condition ``U_t = I`` and ``b_t = 0`` (paper section 3.3); later layers are renumbered.

    Exact because then ``h_t = s(h_{t-1}) = s(s(z_{t-1})) = h_{t-1}``: it needs ``n_t = n_{t-1}`` and an
    idempotent activation. The first and the last layer border the (unactivated) input / output, so they can
    be removed only from an identity-activation MLP.
    """

    name = "remove_layer"

    def __init__(self, layer: int):
        self.layer = int(layer)

    def check(self, net: BayesianNet) -> None:
        net = _as_mlp(net, "remove_layer")
        t, L, n = self.layer, net.num_layers, net.sizes
        what = f"cannot remove layer {t}"
        if not 1 <= t <= L:
            raise SurgeryError(f"{what}: an MLP with sizes {n} has layers 1..{L}")
        if L == 1:
            raise SurgeryError(f"{what}: it is the only layer of {n}; nothing would map inputs to outputs")
        if net.activation not in IDEMPOTENT:
            raise SurgeryError(
                f"{what}: activation {net.activation!r} is not idempotent (s(s(x)) != s(x)), so U_{t} = I does not "
                f"make the layer vanish; only {list(IDEMPOTENT)} MLPs allow layer removal (remove neurons instead)"
            )
        if net.activation != "identity" and t in (1, L):
            side = "the input x is not activated, so U_1 = I computes s(x) != x" if t == 1 else (
                "the output is not activated, so U_L = I computes s(z) != z")
            raise SurgeryError(
                f"{what} of a {net.activation} MLP: {side}; remove a hidden-to-hidden layer 2..{L - 1} instead"
                if L > 2 else f"{what} of a {net.activation} MLP: {side}; a 2-layer {net.activation} MLP has no "
                "removable layer (only neurons can go)"
            )
        if n[t] != n[t - 1]:
            if n[t] > n[t - 1] and t < L:
                fix = f"remove {n[t] - n[t - 1]} neurons of layer {t} first"
            elif n[t] < n[t - 1] and t - 1 >= 1:
                fix = f"remove {n[t - 1] - n[t]} neurons of layer {t - 1} first"
            else:
                fix = "the input and output sizes cannot change, so this layer cannot be removed"
            raise SurgeryError(f"{what}: n_{t}={n[t]} != n_{t - 1}={n[t - 1]}; {fix}")

    def architecture(self, net: BayesianNet) -> MLP:
        net = _as_mlp(net, "remove_layer")
        sizes = list(net.sizes)
        del sizes[self.layer]
        return net.replace(sizes=sizes)

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        net = _as_mlp(net, "remove_layer")
        lay, t = net.layout, self.layer
        n = net.sizes[t]
        idx = [lay.indices(f"layer{t}.weight")]
        val = [torch.eye(n, dtype=torch.float64).reshape(-1)]
        if net.bias:
            idx.append(lay.indices(f"layer{t}.bias"))
            val.append(torch.zeros(n, dtype=torch.float64))
        return torch.cat(idx), torch.cat(val)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "layer": self.layer}


# ============================================================================ constructors
def same_family() -> SameFamily:
    """The identity operation: student = teacher architecture, prior = posterior."""
    return SameFamily()


def remove_neurons(net: BayesianNet, layer: int, neurons: Sequence[int] | torch.Tensor) -> RemoveNeurons:
    """The operation removing ``neurons`` of hidden layer ``layer`` of ``net`` (checked now, errors name the fix)."""
    op = RemoveNeurons(layer, neurons)
    op.check(net)
    return op


def remove_layer(net: BayesianNet, layer: int) -> RemoveLayer:
    """The operation removing layer ``layer`` of ``net`` (checked now, errors name the fix)."""
    op = RemoveLayer(layer)
    op.check(net)
    return op
