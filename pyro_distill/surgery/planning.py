"""One planner for every network family: the candidate removals a family lists, scored by one set of selectors.

A plan turns a teacher into a student by removals (docs/DESIGN.md, "Plans"). The planner is the same for every
family; a family only says *what may go* and *in which order it is decided*:

* a :class:`Candidate` is one removal a family offers: an :class:`~pyro_distill.surgery.base.Operation` with the
  flat coordinates ``I`` it conditions and their targets ``v`` (0 for a neuron, a channel, a head's output
  projection, the attention vector ``w``; the identity for a layer), read from ``op.fixed(net)``;
* a *selector* gives every candidate a **remove-score** (higher goes first) from the posterior ``q`` as the
  earlier steps left it, over the candidate's coordinates:

  ==============  ====================================================================================
  ``snr``         ``-mean_i (m_i - v_i)^2 / S_ii``: the closer to its target, relative to its spread
  ``magnitude``   ``-||m_I - v||``: the closer to its target
  ``evidence``    ``log q(u_I = v) - log p0(u_I = v)`` (Savage-Dickey, :func:`~.base.savage_dickey`): the
                  change in log evidence when the reduced model replaces the full one; ``p0`` is the prior
                  ``q`` was fitted under (default: the teacher's default prior), conditioned like ``q``
  ``random``      ``-u``, ``u ~ U(0, 1)`` from the plan's seeded generator, one draw per candidate
  ``first``       ``-position`` (the lowest index goes first); ``last``: ``+position``
  ==============  ====================================================================================

  A candidate that conditions nothing (an already empty transformer block) scores 0 under the posterior
  selectors. A callable ``selector(net, ops, q, p0) -> remove-scores`` is used as given.
* :class:`Planner` holds the :class:`~.base.Reduction` (network, ``q``, ``p0`` conditioned step by step) and
  picks the ``count`` highest remove-scores (ties: the lower position first, a stable sort);
* a :class:`Family` registers ``check(teacher, student)`` (raise :class:`SurgeryError` naming the fix),
  ``schedule(planner, teacher, student)`` (walks the removals: lists candidates, ``planner.choose`` /
  ``planner.step``) and ``candidates(net)`` (every removal of one unit it offers on ``net``).
  :func:`plan` looks the teacher's family up and runs it.

Families today: MLP (neurons, layers; :mod:`.mlp`), CNN (channels, dense neurons; :mod:`.cnn`), transformer
(heads, attention sublayers, FFNs, blocks; :mod:`.transformer`), attention RNN (the three attention-removal
variants; :mod:`.rnn`).

**Adding an operation for a new family** (files to touch):

1. ``pyro_distill/nets/<family>.py``: the network; its layout keeps, in order, exactly the student's coordinates
   once the removed ones are dropped (so the Gaussian part is only conditioning).
2. ``pyro_distill/surgery/<family>.py``: the :class:`~.base.Operation` subclass (``check``, ``architecture``,
   ``fixed``, ``marginalized`` if parameters become unused, ``to_dict``; decorated with
   :func:`~.base.register_operation`), a constructor that checks (``remove_x(net, ...) -> Operation``),
   ``<family>_candidates(net)`` and the schedule, registered with :func:`register_family`.
3. ``pyro_distill/surgery/__init__.py``: import the module (that registers the family) and export its names.
4. ``tests/test_<family>.py``: the removal is exact (teacher with the fixed coordinates == student, float64) for
   every Gaussian structure; the plan reaches the student and replays from ``Plan.to_dict``.
A new *selector* is one entry in :data:`SELECTORS` (a remove-score over candidates) and is then offered to every
family; the CLI's ``SELECTOR_NAMES`` (``commands/surgery.py``) lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from .base import Operation, Plan, Reduction, SurgeryError, check_layout, savage_dickey

__all__ = ["Candidate", "SELECTORS", "Selector", "Planner", "Family", "register_family", "family_of", "plan",
           "candidates", "score_candidates"]


# ============================================================================ candidates
@dataclass(frozen=True, eq=False)
class Candidate:
    """One removal a family offers: the operation, the flat coordinates ``index`` it conditions (in the network
    it applies to) and their targets ``value`` (float64)."""

    op: Operation
    index: torch.Tensor
    value: torch.Tensor

    @classmethod
    def of(cls, op: Operation, net: BayesianNet) -> Candidate:
        index, value = op.fixed(net)
        return cls(op, index, value)


# ============================================================================ selectors (remove-scores)
ScoreFn = Callable[[list[Candidate], Gaussian | None, Gaussian | None, torch.Generator], torch.Tensor]


class Selector(NamedTuple):
    """A selector: ``score(candidates, q, p0, generator) -> remove-scores`` (float64, higher goes first)."""

    score: ScoreFn
    needs_posterior: bool


def _per_candidate(cands: list[Candidate], q: Gaussian, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """``fn(I, v)`` for each candidate (0 where a candidate conditions nothing), as one float64 tensor."""
    zero = torch.zeros((), dtype=torch.float64)
    out = [fn(c.index, c.value).to(torch.float64).cpu() if c.index.numel() else zero for c in cands]
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def _snr(cands: list[Candidate], q: Gaussian, p0: Gaussian | None, gen: torch.Generator) -> torch.Tensor:
    m, var = q.mean, q.variance
    return _per_candidate(cands, q, lambda I, v: -((m[I] - v.to(m)) ** 2 / var[I]).mean())


def _magnitude(cands: list[Candidate], q: Gaussian, p0: Gaussian | None, gen: torch.Generator) -> torch.Tensor:
    m = q.mean
    return _per_candidate(cands, q, lambda I, v: -torch.linalg.vector_norm(m[I] - v.to(m)))


def _evidence(cands: list[Candidate], q: Gaussian, p0: Gaussian, gen: torch.Generator) -> torch.Tensor:
    return _per_candidate(cands, q, lambda I, v: savage_dickey(q, p0, I, v))


def _random(cands: list[Candidate], q: Gaussian | None, p0: Gaussian | None, gen: torch.Generator) -> torch.Tensor:
    return -torch.rand(len(cands), generator=gen, dtype=torch.float64)


def _first(cands: list[Candidate], q: Gaussian | None, p0: Gaussian | None, gen: torch.Generator) -> torch.Tensor:
    return -torch.arange(len(cands), dtype=torch.float64)


def _last(cands: list[Candidate], q: Gaussian | None, p0: Gaussian | None, gen: torch.Generator) -> torch.Tensor:
    return torch.arange(len(cands), dtype=torch.float64)


#: every selector, offered to every family: name -> (remove-score function, needs the posterior)
SELECTORS: dict[str, Selector] = {
    "snr": Selector(_snr, True),
    "magnitude": Selector(_magnitude, True),
    "evidence": Selector(_evidence, True),
    "random": Selector(_random, False),
    "first": Selector(_first, False),
    "last": Selector(_last, False),
}

SelectorArg = str | Callable[..., Any]


def _check_selector(selector: SelectorArg, posterior: Gaussian | None) -> None:
    if callable(selector):
        return
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {sorted(SELECTORS)} or pass a callable "
                         "selector(net, ops, posterior, prior) -> remove-scores")
    if SELECTORS[selector].needs_posterior and posterior is None:
        free = sorted(k for k, s in SELECTORS.items() if not s.needs_posterior)
        raise ValueError(f"selector {selector!r} scores candidates on the teacher's posterior: pass "
                         f"posterior=<Gaussian> (CLI: --posterior models/<name>), or use a selector that needs none "
                         f"({', '.join(free)})")


# ============================================================================ the planner
class Planner(Reduction):
    """The planning state: the :class:`~.base.Reduction` (network, ``q``, ``p0`` after the steps so far), the
    selector and the plan's seeded generator (``random`` draws from it in the order candidates are scored)."""

    def __init__(self, net: BayesianNet, selector: SelectorArg = "snr", posterior: Gaussian | None = None,
                 prior: Gaussian | None = None, seed: int = 0):
        _check_selector(selector, posterior)
        if posterior is not None:
            check_layout(net, posterior)
            if prior is None:
                prior = net.default_prior(torch.float64, posterior.device)
            check_layout(net, prior)
        else:
            prior = None
        super().__init__(net, posterior, prior)
        self.selector = selector
        self.gen = torch.Generator().manual_seed(seed)

    def scores(self, cands: Sequence[Candidate]) -> torch.Tensor:
        """Remove-scores of ``cands`` (candidates of the current network) under the selector."""
        cands = list(cands)
        if callable(self.selector):
            out = self.selector(self.net, [c.op for c in cands], self.q, self.p0)
            return torch.as_tensor(out, dtype=torch.float64).reshape(-1)
        return SELECTORS[self.selector].score(cands, self.q, self.p0, self.gen)

    def choose(self, cands: Sequence[Candidate], count: int = 1) -> list[Candidate]:
        """The ``count`` candidates with the highest remove-scores, highest first (ties: lower position first)."""
        cands = list(cands)
        order = torch.sort(-self.scores(cands), stable=True).indices[:count].tolist()
        return [cands[i] for i in order]


# ============================================================================ families
@dataclass(frozen=True)
class Family:
    """What a network family gives the planner (see the module docstring)."""

    name: str
    net_type: type
    check: Callable[[BayesianNet, BayesianNet], None]
    schedule: Callable[[Planner, BayesianNet, BayesianNet], None]
    candidates: Callable[[BayesianNet], list[Candidate]]


_FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Make :func:`plan` handle teachers of ``family.net_type`` (a later registration of a type replaces it)."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.net_type is not family.net_type] + [family]
    return family


def family_of(net: BayesianNet) -> Family:
    for f in _FAMILIES:
        if isinstance(net, f.net_type):
            return f
    raise SurgeryError(f"no planner for {type(net).__name__} networks; families with one: "
                       f"{[f.net_type.__name__ for f in _FAMILIES]} (add one: see pyro_distill/surgery/planning.py)")


def candidates(net: BayesianNet) -> list[Candidate]:
    """Every removal of one unit the network's family offers on ``net`` (each passes its ``check``)."""
    return family_of(net).candidates(net)


def score_candidates(net: BayesianNet, cands: Sequence[Candidate], selector: SelectorArg = "snr",
                     posterior: Gaussian | None = None, prior: Gaussian | None = None, seed: int = 0) -> torch.Tensor:
    """Remove-scores of ``cands`` (candidates of ``net``) under ``selector``; higher goes first."""
    return Planner(net, selector, posterior, prior, seed).scores(cands)


def plan(teacher_net: BayesianNet, student_net: BayesianNet, selector: SelectorArg = "snr",
         posterior: Gaussian | None = None, seed: int = 0, prior: Gaussian | None = None) -> Plan:
    """The operations that turn ``teacher_net`` into ``student_net``, for any registered family.

    ``posterior`` (the teacher's Gaussian) is needed by every selector but ``random``, ``first`` and ``last``;
    it is conditioned step by step so each choice sees the posterior the previous steps leave. ``seed`` drives
    ``random``. ``prior`` is the prior the posterior was fitted under (``evidence``; default: the teacher's
    default prior, float64).
    """
    family = family_of(teacher_net)
    family.check(teacher_net, student_net)
    planner = Planner(teacher_net, selector, posterior, prior, seed)
    family.schedule(planner, teacher_net, student_net)
    name = selector if isinstance(selector, str) else getattr(selector, "__name__", "callable")
    return Plan(planner.ops, teacher=teacher_net.config(), student=planner.net.config(), selector=name)
