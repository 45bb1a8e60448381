"""One name per method and per experiment kind, with the old names kept readable.

The families once named one method differently (the teacher-derived prior + SVI was ``teacher_prior`` in the
MLP kind, ``vi_conditioned_prior`` in the RNN kind, ``vi_conditioned`` in the transformer kind) and the RNN
kind had three names. The canonical names are the MLP's; :data:`METHOD_ALIASES` and :data:`KIND_ALIASES` map
every old name to its canonical one. Config files may still use old names (the kinds canonicalize their method
lists), and :func:`canonical_rows` renames the rows of old run folders when figures and tables read them, so
old runs still plot next to new ones. Imports nothing (figures and the command line use it without torch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["METHOD_ALIASES", "KIND_ALIASES", "canonical_method", "canonical_methods", "canonical_kind",
           "canonical_rows"]

#: old method name -> canonical name
METHOD_ALIASES: dict[str, str] = {
    # the teacher-derived prior (conditioned teacher posterior) + SVI
    "vi_conditioned_prior": "teacher_prior",
    "vi_conditioned": "teacher_prior",
    # the same with the prior's covariance times a temperature (RNN: student.prior_temperature)
    "vi_conditioned_prior_tempered": "teacher_prior_tempered",
    # the same with tau chosen by the student's Laplace evidence (the MLP's row name)
    "vi_conditioned_evidence": "teacher_prior(tau=evidence)",
    # SVI under the fan-in (standard) prior from a random start
    "vi_standard_prior": "standard_prior",
    "vi_standard": "standard_prior",
    # the teacher's plain marginal over the kept coordinates as the prior (no conditioning shift)
    "vi_marginal_prior": "marginal_prior",
}

#: old experiment-kind name -> canonical kind (= the module name in ``pyro_distill.experiments`` and
#: ``pyro_distill.plots``)
KIND_ALIASES: dict[str, str] = {"rnn_attention": "rnn"}


def canonical_method(name: str) -> str:
    """``"vi_conditioned_prior"`` -> ``"teacher_prior"``; canonical and unknown names pass unchanged."""
    return METHOD_ALIASES.get(name, name)


def canonical_methods(names: Iterable[str]) -> list[str]:
    """Canonical names of a method list, order kept, duplicates (two old names of one method) dropped."""
    return list(dict.fromkeys(canonical_method(n) for n in names))


def canonical_kind(name: str) -> str:
    """``"rnn_attention"`` -> ``"rnn"``; canonical and unknown kinds pass unchanged."""
    return KIND_ALIASES.get(name, name)


def canonical_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of metric or curve rows with the ``method`` column canonical (for reading old run folders)."""
    return [r | {"method": canonical_method(r["method"])} if isinstance(r.get("method"), str) else dict(r)
            for r in rows]
