"""The surgery contract: an operation maps an architecture AND the Gaussian over its weights.

An :class:`Operation` says, for a given network, which flat coordinates it fixes (and to what values),
which it marginalizes (parameters that no longer influence the output), and what the resulting
network is. The Gaussian part is then always the same: condition on the fixed coordinates, keep the
rest minus the marginalized ones. The coordinates that remain, in their original order, are exactly
the student's layout (every network family arranges its layout so that this holds).

The fixed and marginalized sets are handed over as flat indices; a structure that conditions exactly only on
whole rows / columns / blocks (:class:`~pyro_distill.gaussian.KronGaussian`) recognizes them in the flat set
(neuron removal fixes whole rows of ``[U_t | b_t]`` and whole columns of ``U_{t+1}``; layer removal a whole
block), and what it cannot do exactly it refuses with a :class:`SurgeryError` naming the structure to convert to.

Every family (MLP, attention RNN, transformer) adds its operations in its own module of this package.
``layout`` and ``gaussian`` know nothing of this; this package knows no data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from ..gaussian import Gaussian, StructureError
from ..nets.base import BayesianNet

__all__ = ["Operation", "SurgeryError", "apply", "embed", "register_operation", "operation_from_dict", "Plan",
           "savage_dickey", "Reduction", "unit_indices", "named_indices"]

_OPS: dict[str, type[Operation]] = {}


class SurgeryError(ValueError):
    """An impossible or ill-posed removal; the message names the fix."""


def register_operation(cls: type[Operation]) -> type[Operation]:
    _OPS[cls.name] = cls
    return cls


def operation_from_dict(d: dict[str, Any]) -> Operation:
    d = dict(d)
    op = d.pop("op", None)
    if op not in _OPS:
        raise ValueError(f"unknown surgery operation {op!r}; known: {sorted(_OPS)}")
    return _OPS[op](**d)


def unit_indices(values: Sequence[int] | torch.Tensor, what: str, unit: str) -> tuple[int, ...]:
    """The sorted unit numbers (neurons, channels) an operation removes; refuses non-integers, none, repeats."""
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


def named_indices(net: BayesianNet, names: Sequence[str]) -> torch.Tensor:
    """Sorted flat indices of the named layout blocks of ``net`` (empty when ``names`` is)."""
    if not names:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([net.layout.indices(n) for n in names]).sort().values


class Operation(ABC):
    """One removal. Subclasses set ``name`` and implement the three structural methods."""

    name: str = ""

    @abstractmethod
    def check(self, net: BayesianNet) -> None:
        """Raise :class:`SurgeryError` (naming the fix) if this operation cannot apply to ``net``."""

    @abstractmethod
    def architecture(self, net: BayesianNet) -> BayesianNet:
        """The network after the removal."""

    @abstractmethod
    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices of ``net`` to condition on, their values) — sorted indices, float64 values."""

    def marginalized(self, net: BayesianNet) -> torch.Tensor:
        """Flat indices of ``net`` that become unused and are integrated out (default: none)."""
        return torch.zeros(0, dtype=torch.long)

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Plain data with ``"op"``: rebuilds the operation with :func:`operation_from_dict`."""

    # ----------------------------------------------------------------- shared machinery
    def removed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fixed indices, fixed values, marginalized indices), checked for overlap."""
        self.check(net)
        I, v = self.fixed(net)
        M = self.marginalized(net)
        if I.numel() and M.numel() and bool(torch.isin(I, M).any()):
            raise AssertionError(f"{self}: a coordinate is both fixed and marginalized")
        return I, v, M

    def keep(self, net: BayesianNet) -> torch.Tensor:
        I, _, M = self.removed(net)
        mask = torch.ones(net.num_params, dtype=torch.bool)
        mask[I] = False
        mask[M] = False
        return mask.nonzero().reshape(-1)

    def apply(self, net: BayesianNet, gaussian: Gaussian) -> tuple[BayesianNet, Gaussian]:
        """(student network, Gaussian over its weights): marginalize the unused coordinates, then condition."""
        check_layout(net, gaussian)
        I, v, M = self.removed(net)
        student = self.architecture(net)
        try:
            out = self._apply_gaussian(net, gaussian, I, v, M)
        except StructureError as exc:
            raise SurgeryError(f"{self} on a {type(gaussian).__name__}: {exc}") from exc
        if out.dim != student.num_params:
            raise AssertionError(f"{self}: {out.dim} coordinates remain but the student has p={student.num_params}")
        out.layout = student.layout
        out.meta = dict(gaussian.meta) | {"surgery": list(gaussian.meta.get("surgery", [])) + [self.to_dict()]}
        return student, out

    @staticmethod
    def _apply_gaussian(net: BayesianNet, gaussian: Gaussian, I: torch.Tensor, v: torch.Tensor,
                        M: torch.Tensor) -> Gaussian:
        g = gaussian
        if M.numel():
            # marginalizing first shrinks the problem; conditioning commutes with it
            keep_IK = torch.ones(net.num_params, dtype=torch.bool)
            keep_IK[M] = False
            kept = keep_IK.nonzero().reshape(-1)
            g = g.marginalize(kept)
            pos = torch.full((net.num_params,), -1, dtype=torch.long)
            pos[kept] = torch.arange(kept.numel())
            I = pos[I]
        return g.condition(I, v.to(g.dtype), layout=None) if I.numel() else g.marginalize(torch.arange(g.dim))

    def embed(self, net: BayesianNet, w_student: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Teacher-space weights ``[..., p_teacher]`` for student weights ``[..., p_student]``: fixed
        coordinates take their values, marginalized ones ``fill`` (they do not affect the output)."""
        I, v, M = self.removed(net)
        keep = self.keep(net)
        if w_student.shape[-1] != keep.numel():
            raise ValueError(f"student weights have {w_student.shape[-1]} entries, expected {keep.numel()}")
        out = torch.empty(*w_student.shape[:-1], net.num_params, dtype=w_student.dtype, device=w_student.device)
        out[..., keep] = w_student
        out[..., I] = v.to(out)
        if M.numel():
            f = torch.as_tensor(fill, dtype=out.dtype, device=out.device)
            out[..., M] = f if f.dim() == 0 else f[..., M]
        return out

    def __repr__(self) -> str:
        d = self.to_dict()
        op = d.pop("op")
        return f"{op}({', '.join(f'{k}={v!r}' for k, v in d.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Operation) and self.to_dict() == other.to_dict()


def check_layout(net: BayesianNet, gaussian: Gaussian) -> None:
    """A posterior must belong to the network it is operated on."""
    if gaussian.dim != net.num_params:
        raise SurgeryError(
            f"the Gaussian has {gaussian.dim} coordinates but {net!r} has p={net.num_params}: "
            "this posterior belongs to another architecture"
        )
    if gaussian.layout is not None and gaussian.layout != net.layout:
        raise SurgeryError(f"the Gaussian's layout {gaussian.layout} does not match the network's {net.layout}")


class Plan(list):
    """An ordered list of operations: printable, serializable (``to_dict``/``from_dict``), replayable."""

    def __init__(self, ops: Sequence[Operation] = (), teacher: dict | None = None, student: dict | None = None,
                 selector: str | None = None):
        super().__init__(ops)
        self.teacher = teacher
        self.student = student
        self.selector = selector

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "student": self.student, "selector": self.selector,
                "ops": [op.to_dict() for op in self]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls([operation_from_dict(o) for o in d["ops"]], d.get("teacher"), d.get("student"), d.get("selector"))

    def __str__(self) -> str:
        head = f"plan ({self.selector or 'given'}):" if self.selector else "plan:"
        return "\n".join([head] + [f"  {i + 1}. {op!r}" for i, op in enumerate(self)]) if self else head + " (empty)"


def apply(ops: Sequence[Operation], net: BayesianNet, gaussian: Gaussian) -> tuple[BayesianNet, Gaussian]:
    """Apply operations in order: ``(student_net, student_prior)``."""
    if isinstance(ops, Plan) and ops.teacher is not None and ops.teacher != net.config():
        raise SurgeryError(f"this plan was made for teacher {ops.teacher}, not for {net.config()}; make a new plan")
    check_layout(net, gaussian)
    for op in ops:
        net, gaussian = op.apply(net, gaussian)
    return net, gaussian


def savage_dickey(q: Gaussian, prior: Gaussian, index: Sequence[int] | torch.Tensor,
                  value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``log q(u_I = v) - log p0(u_I = v)`` (float64): the Savage-Dickey log density ratio, i.e. the change in log
    evidence when the model with ``u_I`` fixed to ``v`` replaces the full one (exact when ``q`` is the exact
    posterior under ``p0`` and ``p0(u_K | u_I = v) = p0(u_K)``, e.g. an independent prior). The planner's
    ``evidence`` selector and :func:`~pyro_distill.distill.model_reduction` both call this one."""
    I = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    v = torch.as_tensor(value, dtype=torch.float64)
    v = v.expand(I.shape) if v.dim() == 0 else v.reshape(-1)
    if I.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    qI = q.marginalize(I).to(dtype=torch.float64)
    pI = prior.marginalize(I).to(dtype=torch.float64)
    return qI.log_prob(v.to(qI.device)) - pI.log_prob(v.to(pI.device)).to(qI.device)


class Reduction:
    """The teacher as the operations so far leave it: the network, its posterior ``q`` and the prior ``p0`` that
    ``q`` was fitted under, each conditioned by every operation in turn (exactly as :func:`apply` does).

    The one conditioning loop: the planner walks it while choosing (each choice sees the posterior the earlier
    steps leave), :func:`~pyro_distill.distill.model_reduction` while summing Savage-Dickey ratios. ``q`` and
    ``p0`` may be None (a plan that needs no posterior).
    """

    def __init__(self, net: BayesianNet, posterior: Gaussian | None = None, prior: Gaussian | None = None):
        self.net, self.q, self.p0 = net, posterior, prior
        self.ops: list[Operation] = []

    def step(self, op: Operation) -> None:
        """Apply ``op``: condition ``q`` and ``p0``, move to the smaller network, record the operation."""
        if self.q is not None:
            _, self.q = op.apply(self.net, self.q)
        if self.p0 is not None:
            _, self.p0 = op.apply(self.net, self.p0)
        self.net = op.architecture(self.net)
        self.ops.append(op)


def embed(ops: Sequence[Operation], net: BayesianNet, w_student: torch.Tensor) -> torch.Tensor:
    """Student weights mapped back through every operation into the teacher's space."""
    nets = [net]
    for op in ops:
        nets.append(op.architecture(nets[-1]))
    w = w_student
    for op, n in zip(reversed(list(ops)), reversed(nets[:-1])):
        w = op.embed(n, w)
    return w
