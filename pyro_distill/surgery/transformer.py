"""Removing heads, sublayers and blocks of a pre-LN transformer by conditioning.

In a pre-LN block ``h + Attn(LN1(h))`` then ``h + FFN(LN2(h))`` a sublayer whose output projection is
zero adds nothing to the residual stream, so:

| operation | conditioned on 0 | marginalized (unused afterwards) |
|---|---|---|
| ``remove_head(b, j)`` | ``block{b}.attn.head{j}.o`` | that head's ``q, k, v`` |
| ``remove_attention_sublayer(b)`` | every head's ``o`` and ``o_bias`` | every head's ``q, k, v``; ``ln1`` |
| ``remove_ffn(b)`` | ``ffn.w2``, ``ffn.b2`` | ``ffn.w1``, ``ffn.b1``; ``ln2`` |
| ``remove_block(b)`` | both of the above | both of the above |

The teacher with the conditioned coordinates fixed computes exactly the student's function (tests
hold this). The transformer family of the planner (:mod:`.planning`): candidates are heads, attention
sublayers, FFNs and blocks; :func:`~pyro_distill.surgery.plan` turns a teacher into a student with the shared
selectors (``"evidence"``: the Savage-Dickey log Bayes factor ``log q(u_I = 0) - log p0(u_I = 0)`` of the
conditioned coordinates ``I``); :func:`plan_transformer` is the same call with ``evidence`` by default.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from ..nets.transformer import Transformer
from .base import Operation, Plan, SurgeryError, named_indices, register_operation
from .planning import Candidate, Family, Planner, plan, register_family

__all__ = ["RemoveHead", "RemoveAttentionSublayer", "RemoveFFN", "RemoveBlock", "plan_transformer",
           "head_candidates", "block_candidates", "transformer_candidates", "teacher_block_map"]


def _net(net: BayesianNet, op: str) -> Transformer:
    if not isinstance(net, Transformer):
        raise SurgeryError(f"{op} applies to a Transformer, not to {type(net).__name__}")
    return net


def _check_block(net: Transformer, block: int, op: str) -> None:
    if not 0 <= block < net.n_blocks:
        raise SurgeryError(f"cannot {op}: block {block} is out of range, the network has blocks "
                           f"0..{net.n_blocks - 1} (heads={net.heads}); use a block index in that range")


def _attn_names(b: int, H: int) -> tuple[list[str], list[str]]:
    fixed = [f"block{b}.attn.head{j}.o" for j in range(H)] + [f"block{b}.attn.o_bias"]
    marg = [f"block{b}.ln1.gain", f"block{b}.ln1.bias"]
    marg += [f"block{b}.attn.head{j}.{m}" for j in range(H) for m in "qkv"]
    return fixed, marg


def _ffn_names(b: int) -> tuple[list[str], list[str]]:
    return ([f"block{b}.ffn.w2", f"block{b}.ffn.b2"],
            [f"block{b}.ln2.gain", f"block{b}.ln2.bias", f"block{b}.ffn.w1", f"block{b}.ffn.b1"])


class _TransformerOp(Operation):
    """Shared: fixed coordinates are all set to 0; subclasses list block names."""

    block: int

    def _names(self, net: Transformer) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def fixed(self, net: BayesianNet) -> tuple[torch.Tensor, torch.Tensor]:
        I = named_indices(_net(net, self.name), self._names(net)[0])
        return I, torch.zeros(I.numel(), dtype=torch.float64)

    def marginalized(self, net: BayesianNet) -> torch.Tensor:
        return named_indices(_net(net, self.name), self._names(net)[1])


@register_operation
class RemoveHead(_TransformerOp):
    """Remove head ``head`` of block ``block``: condition its ``W_O`` slice on 0, marginalize its Q, K, V.
    The remaining heads are renumbered ``0..H-2`` in order."""

    name = "remove_head"

    def __init__(self, block: int, head: int):
        self.block, self.head = int(block), int(head)

    def check(self, net: BayesianNet) -> None:
        net = _net(net, self.name)
        _check_block(net, self.block, f"remove head {self.head} of block {self.block}")
        H = net.heads[self.block]
        if H == 0:
            raise SurgeryError(f"cannot remove head {self.head} of block {self.block}: the block has no attention "
                               "sublayer any more (it was removed)")
        if H == 1:
            raise SurgeryError(f"cannot remove the last head of block {self.block}: the output bias would remain; "
                               f"use remove_attention_sublayer({self.block}) to remove the whole sublayer")
        if not 0 <= self.head < H:
            raise SurgeryError(f"cannot remove head {self.head} of block {self.block}: it has heads 0..{H - 1} "
                               "(heads are renumbered after each removal)")

    def architecture(self, net: BayesianNet) -> Transformer:
        self.check(net)
        heads = list(net.heads)
        heads[self.block] -= 1
        return net.replace(heads=heads)

    def _names(self, net: Transformer) -> tuple[list[str], list[str]]:
        p = f"block{self.block}.attn.head{self.head}"
        return [f"{p}.o"], [f"{p}.{m}" for m in "qkv"]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "block": self.block, "head": self.head}


@register_operation
class RemoveAttentionSublayer(_TransformerOp):
    """Remove the attention sublayer of block ``block``: condition ``W_O`` (every head) and its bias on 0,
    marginalize Q, K, V and the LayerNorm before it. (Named so to stay apart from the RNN ``RemoveAttention``.)"""

    name = "remove_attention_sublayer"

    def __init__(self, block: int):
        self.block = int(block)

    def check(self, net: BayesianNet) -> None:
        net = _net(net, self.name)
        _check_block(net, self.block, f"remove the attention sublayer of block {self.block}")
        if net.heads[self.block] == 0:
            raise SurgeryError(f"block {self.block} has no attention sublayer to remove (heads={net.heads})")

    def architecture(self, net: BayesianNet) -> Transformer:
        self.check(net)
        heads = list(net.heads)
        heads[self.block] = 0
        return net.replace(heads=heads)

    def _names(self, net: Transformer) -> tuple[list[str], list[str]]:
        return _attn_names(self.block, net.heads[self.block])

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "block": self.block}


@register_operation
class RemoveFFN(_TransformerOp):
    """Remove the feed-forward sublayer of block ``block``: condition ``W_2, b_2`` on 0, marginalize
    ``W_1, b_1`` and the LayerNorm before it."""

    name = "remove_ffn"

    def __init__(self, block: int):
        self.block = int(block)

    def check(self, net: BayesianNet) -> None:
        net = _net(net, self.name)
        _check_block(net, self.block, f"remove the FFN of block {self.block}")
        if not net.ffn[self.block]:
            raise SurgeryError(f"block {self.block} has no FFN sublayer to remove (ffn={net.ffn})")

    def architecture(self, net: BayesianNet) -> Transformer:
        self.check(net)
        ffn = list(net.ffn)
        ffn[self.block] = False
        return net.replace(ffn=ffn)

    def _names(self, net: Transformer) -> tuple[list[str], list[str]]:
        return _ffn_names(self.block)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "block": self.block}


@register_operation
class RemoveBlock(_TransformerOp):
    """Remove block ``block`` whole (both sublayers, whatever remains of them); later blocks are renumbered."""

    name = "remove_block"

    def __init__(self, block: int):
        self.block = int(block)

    def check(self, net: BayesianNet) -> None:
        net = _net(net, self.name)
        _check_block(net, self.block, f"remove block {self.block}")

    def architecture(self, net: BayesianNet) -> Transformer:
        self.check(net)
        keep = [b for b in range(net.n_blocks) if b != self.block]
        return net.replace(heads=[net.heads[b] for b in keep], ffn=[net.ffn[b] for b in keep])

    def _names(self, net: Transformer) -> tuple[list[str], list[str]]:
        fixed: list[str] = []
        marg: list[str] = []
        if net.heads[self.block]:
            f, m = _attn_names(self.block, net.heads[self.block])
            fixed += f
            marg += m
        if net.ffn[self.block]:
            f, m = _ffn_names(self.block)
            fixed += f
            marg += m
        return fixed, marg

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "block": self.block}


# ============================================================================ the transformer family of the planner
def head_candidates(net: Transformer, block: int) -> list[Candidate]:
    """One candidate per head of ``block``: :class:`RemoveHead`."""
    return [Candidate.of(RemoveHead(block, j), net) for j in range(net.heads[block])]


def block_candidates(net: Transformer) -> list[Candidate]:
    """One candidate per block: :class:`RemoveBlock`."""
    return [Candidate.of(RemoveBlock(b), net) for b in range(net.n_blocks)]


def transformer_candidates(net: BayesianNet) -> list[Candidate]:
    """Every head, attention sublayer, FFN and block removal ``net`` allows (each passes its ``check``)."""
    net = _net(net, "transformer_candidates")
    ops: list[Operation] = []
    for b in range(net.n_blocks):
        ops += [RemoveHead(b, j) for j in range(net.heads[b])] + [RemoveAttentionSublayer(b), RemoveFFN(b)]
    ops += [RemoveBlock(b) for b in range(net.n_blocks)]
    out = []
    for op in ops:
        try:
            op.check(net)
        except SurgeryError:
            continue
        out.append(Candidate.of(op, net))
    return out


def _structure_check(teacher: BayesianNet, student: BayesianNet) -> None:
    teacher, student = _net(teacher, "plan_transformer"), _net(student, "plan_transformer")
    same = ("input_dim", "n_classes", "max_len", "d_model", "d_head", "d_ff", "embedding", "pooling", "activation",
            "prior_scale")
    tc, sc = teacher.config(), student.config()
    diff = [k for k in same if tc[k] != sc[k]]
    if diff:
        raise SurgeryError(f"teacher and student differ in {diff} ({[tc[k] for k in diff]} vs {[sc[k] for k in diff]});"
                           " removals only drop heads, sublayers and blocks: keep these equal")
    if student.n_blocks > teacher.n_blocks:
        raise SurgeryError(f"the student has {student.n_blocks} blocks, more than the teacher's {teacher.n_blocks}")


def _fits(t_heads: int, t_ffn: bool, s_heads: int, s_ffn: bool) -> bool:
    return s_heads <= t_heads and (t_ffn or not s_ffn)


def _schedule(planner: Planner, teacher: Transformer, student: Transformer) -> None:
    """Teacher blocks map in order to student blocks; the blocks that go are the feasible choice with the highest
    total remove-score (every kept teacher block needs at least the student's heads, and an FFN if the student's
    block has one). Block removals first (highest index first), then per kept block the attention sublayer or
    heads one at a time (each choice scored on the Gaussian the previous ones left), then FFNs."""
    nt, ns = teacher.n_blocks, student.n_blocks
    best, best_score = None, None
    block_scores = None
    for kept in itertools.combinations(range(nt), ns):
        if not all(_fits(teacher.heads[t], teacher.ffn[t], student.heads[s], student.ffn[s])
                   for s, t in enumerate(kept)):
            continue
        if block_scores is None:
            block_scores = planner.scores(block_candidates(teacher))
        dropped = [b for b in range(nt) if b not in kept]
        score = float(block_scores[dropped].sum()) if dropped else 0.0
        if best_score is None or score > best_score:
            best, best_score = kept, score
    if best is None:
        raise SurgeryError(f"no way to map teacher heads={teacher.heads}, ffn={teacher.ffn} onto student "
                           f"heads={student.heads}, ffn={student.ffn}: each student block needs a teacher block with "
                           "at least as many heads (and an FFN if the student's block has one)")
    for b in sorted(set(range(nt)) - set(best), reverse=True):
        planner.step(RemoveBlock(b))
    for b in range(ns):  # inside each kept block (indices are now the student's)
        target = student.heads[b]
        if target == 0 and planner.net.heads[b] > 0:
            planner.step(RemoveAttentionSublayer(b))
        while planner.net.heads[b] > target:
            planner.step(planner.choose(head_candidates(planner.net, b), 1)[0].op)
        if planner.net.ffn[b] and not student.ffn[b]:
            planner.step(RemoveFFN(b))
    if planner.net.config() != student.config():  # pragma: no cover - guarded by the feasibility check
        raise AssertionError(f"plan ended at {planner.net.config()}, not at {student.config()}")


register_family(Family("transformer", Transformer, _structure_check, _schedule, transformer_candidates))


def plan_transformer(teacher: Transformer, student: Transformer, selector: str | Callable[..., Any] = "evidence",
                     posterior: Gaussian | None = None, prior: Gaussian | None = None, seed: int = 0) -> Plan:
    """:func:`~pyro_distill.surgery.planning.plan` for a transformer teacher with the evidence selector by default
    (kept for its callers; note the argument order ``posterior, prior, seed``)."""
    _net(teacher, "plan_transformer")
    return plan(teacher, student, selector=selector, posterior=posterior, seed=seed, prior=prior)


def teacher_block_map(ops: Plan) -> list[int]:
    """Which teacher block each student block of a transformer plan came from (a :class:`RemoveBlock` renumbers
    the later blocks), e.g. for TinyBERT-style targets."""
    blocks = list(range(len(ops.teacher["heads"])))
    for op in ops:
        if isinstance(op, RemoveBlock):
            blocks.pop(op.block)
    return blocks
