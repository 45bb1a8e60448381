"""Figures from saved experiment runs (``runs/NAME/<timestamp>/``); nothing here fits anything.

For each experiment's latest complete run: learning curves per method with a band of ± one sd over
seeds (one figure per setting that has curves), accuracy / NLL (RMSE / NLL for regression) against the
training fraction per student, and the summary table as markdown.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..experiments.core import latest_run, read_rows
from ..store import atomic_write_text

__all__ = ["learning_curves", "fraction_plot", "figures_for_run", "make_all"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_")


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def _color(method: str, methods: list[str]):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return cmap(methods.index(method) % 10)


def learning_curves(curves: list[dict[str, Any]], setting: str, out: Path, title: str = "") -> Path | None:
    """Metric vs step for every method of one setting: mean over seeds with a ± sd band."""
    rows = [c for c in curves if c["setting"] == setting]
    if not rows:
        return None
    present = list(dict.fromkeys(r["metric"] for r in rows))
    metrics = [m for m in ("accuracy", "rmse", "nll") if m in present] + \
        [m for m in present if m not in ("accuracy", "rmse", "nll")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in methods:
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                if r["method"] == method and r["metric"] == metric and math.isfinite(r["value"]):
                    by_step[int(r["step"])].append(float(r["value"]))
            if not by_step:
                continue
            steps = sorted(by_step)
            ms = [_mean_sd(by_step[s]) for s in steps]
            m = [a for a, _ in ms]
            sd = [b for _, b in ms]
            c = _color(method, methods)
            ax.plot(steps, m, label=method, color=c, lw=1.4)
            ax.fill_between(steps, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=c,
                            alpha=0.15, lw=0)
        ax.set_xlabel("optimizer step (MAP, then SVI)")
        ax.set_ylabel(f"test {metric}")
        if metric == "nll":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    return _finish(plt, fig, axes, title or setting, out)


def _finish(plt, fig, axes, title: str, out: Path) -> Path:
    """Legend, title, layout; write the PNG (creating its folder) and close the figure."""
    axes[0][0].legend(fontsize=6.5, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def fraction_plot(rows: list[dict[str, Any]], student: str, out: Path, title: str = "") -> Path | None:
    """Test metrics against the student's training fraction, one line per method (mean ± sd over seeds)."""
    rs = [r for r in rows if r.get("student") == student and r.get("fraction") not in (None, "")]
    fracs = sorted({float(r["fraction"]) for r in rs})
    if len(fracs) < 2:
        return None
    metrics = [m for m in ("accuracy", "rmse", "nll") if any(isinstance(r.get(m), (int, float)) for r in rs)]
    if not metrics:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rs))
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in methods:
            xs, ms, sds = [], [], []
            for f in fracs:
                vals = [float(r[metric]) for r in rs if r["method"] == method and float(r["fraction"]) == f
                        and isinstance(r.get(metric), (int, float))]
                if vals:
                    m, sd = _mean_sd(vals)
                    xs.append(f)
                    ms.append(m)
                    sds.append(sd)
            if xs:
                ax.errorbar(xs, ms, yerr=sds, label=method, color=_color(method, methods), marker="o", ms=3,
                            lw=1.2, capsize=2)
        ax.set_xscale("log")
        ax.set_xticks(fracs)
        ax.set_xticklabels([f"{f:g}" for f in fracs])
        ax.set_xlabel("student's fraction of the training split")
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    return _finish(plt, fig, axes, title or student, out)


def figures_for_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure of one run directory, written to ``out_dir`` with the experiment's name as prefix."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    name = run_dir.parent.name
    made: list[Path] = []
    curves = read_rows(run_dir / "curves.csv") if (run_dir / "curves.csv").exists() else []
    for setting in dict.fromkeys(c["setting"] for c in curves):
        p = learning_curves(curves, setting, out_dir / f"{name}_curves_{_slug(setting)}.png",
                            f"{name}: {setting} (run {run_dir.name})")
        if p:
            made.append(p)
    rows = read_rows(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
    for student in dict.fromkeys(r.get("student") for r in rows if r.get("student") not in (None, "", "teacher")):
        p = fraction_plot(rows, student, out_dir / f"{name}_fraction_{_slug(student)}.png",
                          f"{name}: student {student} (run {run_dir.name})")
        if p:
            made.append(p)
    if (run_dir / "summary.md").exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        dst = out_dir / f"{name}_summary.md"
        shutil.copyfile(run_dir / "summary.md", dst)
        made.append(dst)
    return made


def _kind_figures(run_dir: Path, out_dir: Path) -> list[Path]:
    """Extra figures from ``pyro_distill.plots.<kind>.figures_for_run(run_dir, out_dir)`` when a kind has one."""
    import importlib
    import json

    try:
        kind = json.loads((run_dir / "config.json").read_text()).get("kind", "")
    except (OSError, json.JSONDecodeError):
        return []
    if not kind or kind == "experiments":
        return []
    try:
        mod = importlib.import_module(f"{__package__}.{kind}")
    except ModuleNotFoundError:
        return []
    fn = getattr(mod, "figures_for_run", None)
    return [Path(p) for p in fn(run_dir, out_dir)] if callable(fn) else []


def make_all(runs_root: str | os.PathLike = "runs", out_dir: str | os.PathLike = "figures") -> list[Path]:
    """Figures for the latest complete run of every experiment under ``runs_root``, plus ``out_dir/README.md``
    listing them with the run each came from. Every run gets the generic figures of this module; a kind
    may add its own with a module ``pyro_distill/plots/<kind>.py`` defining ``figures_for_run(run_dir, out_dir)``."""
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    if not runs_root.is_dir():
        raise FileNotFoundError(f"no runs in {runs_root}; run an experiment first: "
                                "pyro-distill run experiments/digits.toml")
    made: list[Path] = []
    index = ["# Figures", "",
             "Regenerated by `pyro-distill figures` from the latest complete run of each experiment.", ""]
    for exp in sorted(p for p in runs_root.iterdir() if p.is_dir()):
        rd = latest_run(exp.name, runs_root)
        if rd is None:
            continue
        files = figures_for_run(rd, out_dir) + _kind_figures(rd, out_dir)
        made += files
        index += [f"## {exp.name} (run `{rd}`)", ""]
        index += [f"![{f.stem}]({f.name})" if f.suffix == ".png" else f"- table: [{f.name}]({f.name})" for f in files]
        index.append("")
    if made:
        atomic_write_text(out_dir / "README.md", "\n".join(index) + "\n")
    return made
