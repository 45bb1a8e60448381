"""Compatibility: the planner lives in :mod:`pyro_distill.surgery.planning` (one planner, every family).

``from pyro_distill.surgery.plan import plan, SELECTORS`` keeps working (the CLI and older scripts import it so).
"""

from __future__ import annotations

from .planning import SELECTORS, plan

__all__ = ["plan", "SELECTORS"]
