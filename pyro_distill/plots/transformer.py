"""Figures of the ``transformer`` experiment kind, for ``pyro-distill figures`` (see :mod:`.experiments`)."""

from __future__ import annotations

import os
from pathlib import Path


def figures_for_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """``transformer_metrics.png`` and ``transformer_curves.png`` from one run (seed count in the title)."""
    from ..experiments.transformer import make_figures

    return make_figures(run_dir, out_dir, prefix="transformer")
