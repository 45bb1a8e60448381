"""Figures of the ``rnn`` experiment kind (old name ``rnn_attention``), found by the per-kind hook of
:mod:`.experiments` (``pyro-distill figures``)."""

from __future__ import annotations

import os
from pathlib import Path

from . import style
from .experiments import _mean_sd, merged_main, merged_rows, merged_summary, run_dirs, runs_label

__all__ = ["figures_for_run", "make_figures"]


def make_figures(run_dir: str | os.PathLike | list[str | os.PathLike],
                 out_dir: str | os.PathLike = "figures") -> list[Path]:
    """``<experiment>_curves.png``: validation token NLL (top) and exact match (bottom) vs step, mean ± sd over
    seeds, one column per task; the teacher's test value as a dashed line. ``run_dir``: one run, or several runs of
    the same experiment with disjoint seeds (drawn together). Old method names are read canonical."""
    dirs, out_dir = run_dirs(run_dir), Path(out_dir)
    curves = merged_rows(dirs, "curves.csv")
    if not any(r["metric"] == "val_nll_tok" for r in curves):
        raise FileNotFoundError(f"{dirs[0]}/curves.csv has no val_nll_tok curves; is this an rnn run?")
    rows = merged_rows(dirs, "metrics.csv")
    settings = list(dict.fromkeys(r["setting"] for r in curves))
    # "teacher_prior" is tau = 1: a tau chosen by evidence gets the next colour, not the same one
    taus = ["1"] + sorted({m.split("tau=", 1)[1].rstrip(")") for m in (r["method"] for r in curves) if "tau=" in m})
    panels = [("val_nll_tok", "nll_tok", "validation NLL per token", True),
              ("val_exact_match", "exact_match", "validation exact match", False)]
    fig, axes = style.subplots(2, len(settings), extra_width=2.4)
    for col, setting in enumerate(settings):
        for row, (metric, tkey, label, log) in enumerate(panels):
            ax = axes[row][col]
            sel = [r for r in curves if r["setting"] == setting and r["metric"] == metric]
            for method in dict.fromkeys(r["method"] for r in sel):
                pts: dict[int, list[float]] = {}
                for r in sel:
                    if r["method"] == method:
                        pts.setdefault(int(r["step"]), []).append(float(r["value"]))
                steps = sorted(pts)
                m, sd = zip(*(_mean_sd(pts[s]) for s in steps))
                lo, hi = [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)]
                c = style.method_color(method, taus)
                ax.plot(steps, m, label=style.display_name(method), lw=1.3, color=c)
                ax.fill_between(steps, lo, hi, alpha=0.2, color=c, lw=0)
            tv = [r[tkey] for r in rows if r["setting"] == setting and r["method"] == "teacher"]
            if tv:
                ax.axhline(sum(tv) / len(tv), color="k", ls="--", lw=1, label="teacher (test)")
            if log:
                style.log_y(ax)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(label)
            ax.set_title(setting)
    style.legend_outside(fig, axes)
    name = dirs[0].parent.name
    fig.suptitle(f"{name}: students without attention\n({runs_label(dirs)}, {len({r['seed'] for r in rows})} seeds)")
    # one file per experiment name, so a variant run (e.g. rnn_attention_tempered_start) never
    # overwrites the main experiment's figure
    return [style.save(fig, out_dir / f"{name}_curves.png")]


def figures_for_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """``<experiment>_curves.png``: validation NLL and exact match vs step per task (mean ± sd over seeds)."""
    return make_figures(run_dir, out_dir)


if __name__ == "__main__":  # python -m pyro_distill.plots.rnn OUT_DIR RUN_DIR [RUN_DIR ...]
    merged_main("pyro_distill.plots.rnn", make_figures, merged_summary)
