"""Figures of the ``rnn_attention`` experiment kind (found by the per-kind hook of :mod:`.experiments`)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["figures_for_run"]


def figures_for_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """``rnn_attention_curves.png``: validation NLL and exact match vs step per task (mean ± sd over seeds)."""
    from ..experiments.rnn import make_figures

    return make_figures(run_dir, out_dir)
