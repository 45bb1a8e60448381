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
hold this). :func:`plan_transformer` turns a teacher configuration into a student one, choosing which
heads and blocks go with a selector; ``"evidence"`` is the Savage-Dickey log Bayes factor of the
reduced model, ``log q(u_I = 0) - log p0(u_I = 0)`` for the conditioned coordinates ``I``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from ..nets.transformer import Transformer
from .base import Operation, Plan, SurgeryError, register_operation

__all__ = ["RemoveHead", "RemoveAttentionSublayer", "RemoveFFN", "RemoveBlock", "plan_transformer",
           "transformer_scores", "TRANSFORMER_SELECTORS"]

TRANSFORMER_SELECTORS = ("evidence", "snr", "magnitude", "random", "first", "last")


def _net(net: BayesianNet, op: str) -> Transformer:
    if not isinstance(net, Transformer):
        raise SurgeryError(f"{op} applies to a Transformer, not to {type(net).__name__}")
    return net


def _check_block(net: Transformer, block: int, op: str) -> None:
    if not 0 <= block < net.n_blocks:
        raise SurgeryError(f"cannot {op}: block {block} is out of range, the network has blocks "
                           f"0..{net.n_blocks - 1} (heads={net.heads}); use a block index in that range")


def _idx(net: Transformer, names: list[str]) -> torch.Tensor:
    if not names:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([net.layout.indices(n) for n in names]).sort().values


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
        I = _idx(_net(net, self.name), self._names(net)[0])
        return I, torch.zeros(I.numel(), dtype=torch.float64)

    def marginalized(self, net: BayesianNet) -> torch.Tensor:
        return _idx(_net(net, self.name), self._names(net)[1])


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


# ============================================================================ selectors and plans
Selector = str | Callable[[Transformer, list[Operation], Gaussian | None, Gaussian | None], torch.Tensor]


def _marginal_log_density_at_zero(g: Gaussian, I: torch.Tensor) -> torch.Tensor:
    m = g.marginalize(I)
    return m.log_prob(torch.zeros(I.numel(), dtype=m.dtype, device=m.device))


def transformer_scores(net: Transformer, candidates: list[Operation], selector: Selector = "evidence",
                       posterior: Gaussian | None = None, prior: Gaussian | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One score per candidate operation; the plan removes the highest-scoring candidates.

    ``evidence``: Savage-Dickey ``log q(u_I = 0) - log p0(u_I = 0)`` over the coordinates ``I`` the
    operation conditions on 0 (the log Bayes factor of the reduced model, exact for a Gaussian ``q``
    when the marginalized coordinates are unidentified afterwards); ``snr``: ``-||m_I / s_I||^2 / |I|``
    (small posterior signal-to-noise goes first); ``magnitude``: ``-||m_I||^2 / |I|``; ``random``;
    ``first``/``last``: structural (lowest / highest index first; need no posterior).
    A callable ``selector(net, candidates, posterior, prior) -> scores`` is used as given.
    """
    if callable(selector):
        return torch.as_tensor(selector(net, candidates, posterior, prior), dtype=torch.float64)
    n = len(candidates)
    if selector == "first":
        return -torch.arange(n, dtype=torch.float64)
    if selector == "last":
        return torch.arange(n, dtype=torch.float64)
    if selector == "random":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    if selector not in TRANSFORMER_SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {TRANSFORMER_SELECTORS} or pass a callable")
    if posterior is None:
        raise ValueError(f"selector {selector!r} needs the teacher's posterior: pass posterior=...")
    if selector == "evidence" and prior is None:
        prior = net.default_prior(posterior.dtype, posterior.device)
    out = []
    for op in candidates:
        I, _ = op.fixed(net)
        if I.numel() == 0:  # nothing to condition (an already empty block): removing it changes nothing
            out.append(0.0)
            continue
        if selector == "evidence":
            s = _marginal_log_density_at_zero(posterior, I) - _marginal_log_density_at_zero(prior, I)
        elif selector == "snr":
            s = -(posterior.loc[I] ** 2 / posterior.variance[I]).mean()
        else:
            s = -(posterior.loc[I] ** 2).mean()
        out.append(float(s))
    return torch.tensor(out, dtype=torch.float64)


def _structure_check(teacher: Transformer, student: Transformer) -> None:
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


def plan_transformer(teacher: Transformer, student: Transformer, selector: Selector = "evidence",
                     posterior: Gaussian | None = None, prior: Gaussian | None = None, seed: int = 0) -> Plan:
    """Operations that turn ``teacher`` into ``student`` (fewer blocks, fewer heads, sublayers dropped).

    Teacher blocks map in order to student blocks; the blocks that go are the feasible choice with the
    highest total score (every kept teacher block must have at least the student's heads, and an FFN if
    the student's block has one). Block removals come first (highest index first), then per kept block
    the attention sublayer or heads one at a time (greedy: each choice scored on the Gaussian conditioned
    by the previous ones), then FFNs. ``prior`` is the prior ``posterior`` was fitted under (default:
    the teacher's default prior); it is carried through the same operations for the evidence selector.
    """
    _net(teacher, "plan_transformer")
    _net(student, "plan_transformer")
    _structure_check(teacher, student)
    gen = torch.Generator().manual_seed(seed)
    sel_name = selector if isinstance(selector, str) else getattr(selector, "__name__", "callable")
    if isinstance(selector, str) and selector not in ("first", "last", "random") and posterior is None:
        raise ValueError(f"selector {selector!r} needs the teacher's posterior: pass posterior=...")
    if posterior is not None and prior is None:
        prior = teacher.default_prior(posterior.dtype, posterior.device)

    net, q, p0 = teacher, posterior, prior
    ops: list[Operation] = []

    def do(op: Operation) -> None:
        nonlocal net, q, p0
        ops.append(op)
        if q is not None:
            _, q = op.apply(net, q)
            _, p0 = op.apply(net, p0)
        net = op.architecture(net)

    # ---- which teacher blocks go
    nt, ns = teacher.n_blocks, student.n_blocks
    best, best_score = None, None
    block_scores = None
    for kept in itertools.combinations(range(nt), ns):
        if not all(_fits(teacher.heads[t], teacher.ffn[t], student.heads[s], student.ffn[s])
                   for s, t in enumerate(kept)):
            continue
        if block_scores is None:
            block_scores = transformer_scores(teacher, [RemoveBlock(b) for b in range(nt)], selector, q, p0, gen)
        dropped = [b for b in range(nt) if b not in kept]
        score = float(block_scores[dropped].sum()) if dropped else 0.0
        if best_score is None or score > best_score:
            best, best_score = kept, score
    if best is None:
        raise SurgeryError(f"no way to map teacher heads={teacher.heads}, ffn={teacher.ffn} onto student "
                           f"heads={student.heads}, ffn={student.ffn}: each student block needs a teacher block with "
                           "at least as many heads (and an FFN if the student's block has one)")
    for b in sorted(set(range(nt)) - set(best), reverse=True):
        do(RemoveBlock(b))
    # ---- inside each kept block (indices are now the student's)
    for b in range(ns):
        target = student.heads[b]
        if target == 0 and net.heads[b] > 0:
            do(RemoveAttentionSublayer(b))
        while net.heads[b] > target:
            cands: list[Operation] = [RemoveHead(b, j) for j in range(net.heads[b])]
            scores = transformer_scores(net, cands, selector, q, p0, gen)
            do(cands[int(torch.argmax(scores))])
        if net.ffn[b] and not student.ffn[b]:
            do(RemoveFFN(b))
    if net.config() != student.config():  # pragma: no cover - guarded by the feasibility check
        raise AssertionError(f"plan ended at {net.config()}, not at {student.config()}")
    return Plan(ops, teacher=teacher.config(), student=student.config(), selector=sel_name)
