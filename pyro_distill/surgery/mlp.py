"""Surgery on multilayer perceptrons (paper sections 3.1 to 3.3).

* :class:`SameFamily`      the architecture is unchanged: the student's prior is the teacher's posterior;
* :class:`RemoveNeurons`   ``phi``: neurons ``J`` of hidden layer ``t`` go; rows ``J`` of ``U_t``, ``b_t[J]`` and
  columns ``J`` of ``U_{t+1}`` are conditioned on 0, so those neurons neither receive nor send anything;
* :class:`RemoveLayer`     ``psi``: layer ``t`` goes; ``U_t = I`` and ``b_t = 0`` are conditioned on, which makes
  the layer the identity map. Exact when ``n_t = n_{t-1}`` and ``s(s(x)) = s(x)`` (ReLU, identity); the layers
  after ``t`` are renumbered.

The coordinates that remain, in their original order, are exactly the student's layout (rows of ``U_t`` are
neurons; columns of ``U_{t+1}`` stay row-major), so ``Operation.apply`` only has to condition.

The MLP family of the planner (:mod:`.planning`): candidates are single neurons of a hidden layer and removable
layers. Schedule (docs/DESIGN.md): remove neurons to equalize the widths of the layers that will merge, then
remove layers (highest index first, so lower indices stay valid), then remove neurons down to the student's
widths; each :class:`RemoveNeurons` takes the ``count`` neurons of one layer with the highest remove-scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from ..nets.base import BayesianNet
from ..nets.mlp import IDEMPOTENT, MLP
from .base import Operation, SurgeryError, register_operation, unit_indices
from .planning import Candidate, Family, Planner, register_family

__all__ = ["SameFamily", "RemoveNeurons", "RemoveLayer", "same_family", "remove_neurons", "remove_layer",
           "neuron_coordinates", "neuron_candidates", "mlp_candidates"]


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
        self.layer = int(layer)
        self.neurons = unit_indices(neurons, f"remove_neurons(layer={layer})", "neuron")

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


# ============================================================================ the MLP family of the planner
def neuron_candidates(net: MLP, layer: int) -> list[Candidate]:
    """One candidate per neuron of hidden ``layer``: :class:`RemoveNeurons` of that neuron alone."""
    return [Candidate.of(RemoveNeurons(layer, [j]), net) for j in range(net.sizes[layer])]


def mlp_candidates(net: BayesianNet) -> list[Candidate]:
    """Every single-neuron removal (hidden layers of width > 1) and every layer removal that ``net`` allows."""
    net = _as_mlp(net, "mlp_candidates")
    out = [c for t in range(1, net.num_layers) if net.sizes[t] > 1 for c in neuron_candidates(net, t)]
    for t in range(1, net.num_layers + 1):
        try:
            RemoveLayer(t).check(net)
        except SurgeryError:
            continue
        out.append(Candidate.of(RemoveLayer(t), net))
    return out


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


def _check_pair(teacher: BayesianNet, student: BayesianNet) -> None:
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
    _groups(teacher, student)


def _schedule(planner: Planner, teacher: MLP, student: MLP) -> None:
    def shrink(layer: int, count: int) -> None:
        if count > 0:
            chosen = planner.choose(neuron_candidates(planner.net, layer), count)
            planner.step(RemoveNeurons(layer, [c.op.neurons[0] for c in chosen]))

    n, groups = teacher.sizes, _groups(teacher, student)
    for a, b in groups:  # 1. equalize the widths inside each group that merges
        w = min(n[a:b + 1])
        for t in range(max(a, 1), min(b, len(n) - 2) + 1):
            shrink(t, n[t] - w)
    for t in sorted((t for a, b in groups for t in range(a + 1, b + 1)), reverse=True):  # 2. layers, highest first
        planner.step(RemoveLayer(t))
    for j in range(1, len(student.sizes) - 1):  # 3. down to the student's widths
        shrink(j, planner.net.sizes[j] - student.sizes[j])
    if not planner.ops:
        planner.ops.append(SameFamily())
    if planner.net.sizes != student.sizes:  # pragma: no cover - guarded by _groups
        raise AssertionError(f"plan reached {planner.net.sizes}, not {student.sizes}")


register_family(Family("mlp", MLP, _check_pair, _schedule, mlp_candidates))
