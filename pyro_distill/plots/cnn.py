"""Figures of the ``cnn`` experiment kind (found by the per-kind hook of :mod:`.experiments`).

``<experiment>_methods.png`` (e.g. ``cnn_digits_methods.png``): test accuracy (mean ± sd over seeds) per method
for channel removal and the two cross-architecture pairs, one panel per task x setting;
``<experiment>_extraction.png``: agreement with the teacher and test accuracy vs the query budget per query source
(the ``labels`` student on as many true labels for reference). ``<experiment>`` is the run's experiment folder, so
the digits and Fashion-MNIST runs of the kind never overwrite each other's figures.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from .style import display_name, dot_groups, fit_ylim, legend_outside, method_color, save, subplots

__all__ = ["figures_for_run"]

_BUDGET = re.compile(r"^(?P<task>\S+) extraction n=(?P<n>\d+)$")
#: this kind's own method / query-source names: display name and tab10 colour (others: the shared style)
_OWN = {"kd_laplace": ("KD-Laplace (Bayesian)", 1), "labels": ("MAP on true labels", 5),
        "gaussian": ("Gaussian queries", 0), "other": ("other-image queries", 2),
        "active": ("max-entropy queries", 3)}


def _name(m: str) -> str:
    return _OWN[m][0] if m in _OWN else display_name(m)


def _color(m: str) -> Any:
    if m in _OWN:
        import matplotlib

        return matplotlib.colormaps["tab10"](_OWN[m][1])
    return method_color(m)


def _mean_sd(v: list[float]) -> tuple[float, float]:
    if not v:
        return float("nan"), 0.0
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def _vals(rows: list[dict[str, Any]], setting: str, method: str, metric: str) -> list[float]:
    return [float(r[metric]) for r in rows if r["setting"] == setting and r["method"] == method
            and isinstance(r.get(metric), (int, float))]


def figures_for_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Draw both figures of one run into ``out_dir``; returns the files written."""
    from ..experiments.core import read_rows

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    name = run_dir.parent.name
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    rows = read_rows(path)
    seeds = len({r["seed"] for r in rows})
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []

    settings = [s for s in dict.fromkeys(r["setting"] for r in rows)
                if not _BUDGET.match(s) and not s.endswith(" teacher")]
    if settings:
        nr, nc = math.ceil(len(settings) / 3), min(3, len(settings))
        fig, axes = subplots(nr, nc, extra_width=1.8)
        flat = [a for row in axes for a in row]
        for ax, s in zip(flat, settings):
            methods = list(dict.fromkeys(r["method"] for r in rows if r["setting"] == s))
            series = {_name(m): tuple([x] for x in _mean_sd(_vals(rows, s, m, "accuracy"))) for m in methods}
            ends = dot_groups(ax, [""], series, {_name(m): _color(m) for m in methods})
            task = s.split(" ", 1)[0]
            tv = [float(r["accuracy"]) for r in rows if r["setting"] == f"{task} teacher"
                  and r["method"] == ("transformer_teacher" if "transformer" in s else "cnn_teacher")]
            if tv:
                ax.axhline(sum(tv) / len(tv), color="k", ls="--", lw=1, label="teacher")
                ends.append(sum(tv) / len(tv))
            fit_ylim(ax, ends, lo=0.0, hi=1.0)
            ax.set_title(s)
            ax.set_ylabel("test accuracy")
        for ax in flat[len(settings):]:
            ax.set_visible(False)
        legend_outside(fig, axes)
        fig.suptitle(f"CNN family: channel removal and cross-architecture KD ({seeds} seed{'s' * (seeds > 1)})")
        made.append(save(fig, out_dir / f"{name}_methods.png"))

    by_task: dict[str, list[tuple[int, str]]] = {}
    for s in dict.fromkeys(r["setting"] for r in rows):
        m = _BUDGET.match(s)
        if m:
            by_task.setdefault(m["task"], []).append((int(m["n"]), s))
    if by_task:
        fig, axes = subplots(len(by_task), 2, extra_width=1.8)
        for row, (task, budgets) in zip(axes, by_task.items()):
            budgets.sort()
            sources = list(dict.fromkeys(r["method"] for r in rows if r["setting"] in {s for _, s in budgets}))
            for ax, metric in zip(row, ("agreement", "accuracy")):
                ends = []
                for src in sources:
                    ms = [_mean_sd(_vals(rows, s, src, metric)) for _, s in budgets]
                    xs = [n for n, _ in budgets]
                    ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], marker="o", capsize=2,
                                label=_name(src), color=_color(src))
                    ends += [m for m, _ in ms]
                ax.set_xscale("log")
                ax.set_xticks(xs, [str(n) for n in xs])
                ax.minorticks_off()
                ax.set_xlabel("queries (labels for 'labels')")
                ax.set_ylabel(f"test {metric}" + (" with teacher" if metric == "agreement" else ""))
                ax.set_title(f"{task}: {metric}")
                fit_ylim(ax, ends, lo=0.0, hi=1.0)
        legend_outside(fig, axes, title="query source")
        fig.suptitle(f"extraction from an argmax-only CNN teacher ({seeds} seed{'s' * (seeds > 1)})")
        made.append(save(fig, out_dir / f"{name}_extraction.png"))
    return made
