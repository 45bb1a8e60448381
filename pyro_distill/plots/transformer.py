"""Figures and the summary table of the ``transformer`` experiment kind, for ``pyro-distill figures`` (see
:mod:`.experiments`). ``python -m pyro_distill.plots.transformer OUT RUN_DIR [RUN_DIR ...]`` draws several runs
with disjoint seeds together."""

from __future__ import annotations

import os
from pathlib import Path

from ..experiments.transformer import METHODS
from . import style

# _color: a plain "teacher_prior" is tau = 1, tau = evidence gets the next tau colour
from .experiments import _color, _mean_sd, map_steps_of, merged_main, merged_rows, merged_summary
from .experiments import run_dirs as run_dirs_of

__all__ = ["figures_for_run", "make_figures", "summary_table"]


def summary_table(run_dirs: str | os.PathLike | list[str | os.PathLike]) -> str:
    """The markdown table (mean ± sd over seeds) of one run, or of several runs of the same config that
    ran disjoint seeds (e.g. seeds split over two invocations), through the runner's own summary code."""
    return merged_summary(run_dirs, ["accuracy", "nll", "ece", "brier", "agreement", "params"])


def _tick(setting: str) -> str:
    """``"fewer_heads frac=0.1"`` -> ``"fewer_heads\n10% data"`` (two lines: six groups side by side stay legible)."""
    name, _, frac = setting.partition(" frac=")
    return f"{name}\n{float(frac or 1):.0%} data"


def make_figures(run_dir: str | os.PathLike | list[str | os.PathLike], out: str | os.PathLike = "figures",
                 prefix: str = "transformer") -> list[Path]:
    """``{prefix}_metrics.png`` (test accuracy and NLL, mean ± sd over seeds, per student x method) and
    ``{prefix}_curves.png`` (test accuracy at the posterior mean / point estimate vs step) from a run
    (or several runs with disjoint seeds). Old method names are read canonical."""
    dirs = run_dirs_of(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = merged_rows(dirs, "metrics.csv")
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != "teacher"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    teacher = [r for r in rows if r["setting"] == "teacher" and r["method"] == "vi"]  # not its MAP-point row
    made = []
    # points with ± sd bars, not bars: accuracies of 0.74-0.96 drawn as bars from an arbitrary baseline
    # would exaggerate (or, from 0, hide) the differences; the y range follows the data
    fig, axes = style.subplots(1, 2, panel=(6.4, 3.4), extra_width=2.4)
    for ax, metric in zip(axes[0], ("accuracy", "nll")):
        series = {}
        for m in methods:
            stats = [_mean_sd(v) if v else (float("nan"), 0.0) for v in
                     ([r[metric] for r in rows if r["setting"] == s and r["method"] == m] for s in settings)]
            series[style.display_name(m)] = ([a for a, _ in stats], [b for _, b in stats])
        ends = style.dot_groups(ax, [_tick(s) for s in settings], series,
                                {style.display_name(m): _color(m, methods) for m in methods})
        if teacher:
            tv = sum(r[metric] for r in teacher) / len(teacher)
            ax.axhline(tv, color="k", ls="--", lw=1, label="Teacher")
            ends.append(tv)
        ax.set_ylabel(f"test {metric}")
        style.fit_ylim(ax, ends, lo=0.0, hi=1.0 if metric == "accuracy" else None)
    style.legend_outside(fig, axes)
    fig.suptitle(f"transformer head/sublayer/block removal ({len({r['seed'] for r in rows})} seeds, mean ± sd)")
    made.append(style.save(fig, out / f"{prefix}_metrics.png"))

    curves = merged_rows(dirs, "curves.csv")
    if curves:
        # one row per data fraction, one column per student
        students = list(dict.fromkeys(s.partition(" frac=")[0] for s in settings))
        fracs = list(dict.fromkeys(s.partition(" frac=")[2] for s in settings))
        fig, axes = style.subplots(len(fracs), len(students), panel=(3.6, 2.8), extra_width=2.4, sharey=True)
        grid = [(axes[fracs.index(s.partition(" frac=")[2])][students.index(s.partition(" frac=")[0])], s)
                for s in settings]
        for ax, s in grid:
            for m in methods:
                pts = [c for c in curves if c["setting"] == s and c["method"] == m]
                steps = sorted({c["step"] for c in pts})
                if not steps:
                    continue
                mean = [sum(c["value"] for c in pts if c["step"] == t) / sum(1 for c in pts if c["step"] == t)
                        for t in steps]
                ax.plot(steps, mean, marker=".", label=style.display_name(m), color=_color(m, methods))
            ax.set_title(_tick(s).replace("\n", ", "))
            ax.set_xlabel("optimizer step")
            style.mark_switch(ax, map_steps_of(dirs[0]))
        for row in axes:
            row[0].set_ylabel("test accuracy (mean weights)")
        style.legend_outside(fig, axes)
        made.append(style.save(fig, out / f"{prefix}_curves.png"))
    return made


def figures_for_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """``transformer_metrics.png`` and ``transformer_curves.png`` from one run (seed count in the title)."""
    return make_figures(run_dir, out_dir, prefix="transformer")


if __name__ == "__main__":  # python -m pyro_distill.plots.transformer OUT_DIR RUN_DIR [RUN_DIR ...]
    merged_main("pyro_distill.plots.transformer", make_figures, summary_table)
