"""Figures from saved experiment runs (``runs/NAME/<timestamp>/``); nothing here fits anything.

For each experiment's latest complete run: learning curves per method with a band of ± one sd over
seeds (one figure per setting that has curves), accuracy / NLL (RMSE / NLL for regression) against the
training fraction per student, and the summary table as markdown.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..experiments.core import latest_run, read_rows, run_state
from ..naming import canonical_kind
from ..store import atomic_write_text
from . import style

__all__ = ["learning_curves", "fraction_plot", "figures_for_run", "make_all", "make_run"]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_")


def run_dirs(dirs: str | os.PathLike | list[str | os.PathLike]) -> list[Path]:
    """One run directory, or several runs of the same config that ran disjoint seeds, as a list of paths."""
    return [Path(d) for d in (dirs if isinstance(dirs, list) else [dirs])]


def merged_rows(dirs: list[Path], name: str) -> list[dict[str, Any]]:
    """The rows of ``name`` (``metrics.csv``, ``curves.csv``) of every run in ``dirs``, method names canonical.
    Runs that share a seed are refused: seeds split over several invocations combine, repeats do not."""
    from ..naming import canonical_rows

    rows: list[dict[str, Any]] = []
    seen: dict[Any, Path] = {}
    for d in dirs:
        part = read_rows(d / name) if (d / name).exists() else []
        for seed in {r.get("seed") for r in part}:
            if seed in seen:
                raise ValueError(f"runs {seen[seed]} and {d} both hold seed {seed}; combine only runs with "
                                 "disjoint seeds")
            seen[seed] = d
        rows += part
    return canonical_rows(rows)


def merged_summary(dirs: str | os.PathLike | list[str | os.PathLike], metrics: list[str] | None = None) -> str:
    """The markdown table (mean ± sd over seeds) of one run, or of several runs of the same config that ran
    disjoint seeds (e.g. seeds split over two invocations), through the runner's own summary code."""
    from ..experiments.core import summarize, summary_markdown

    rows = merged_rows(run_dirs(dirs), "metrics.csv")
    return summary_markdown(summarize(rows), seeds=len({r["seed"] for r in rows}), metrics=metrics)


def merged_main(module: str, make_figures: Any, summary: Any) -> None:
    """``python -m <module> OUT_DIR RUN_DIR [RUN_DIR ...]``: a kind's figures and summary table from one run or from
    several runs with disjoint seeds (``make_figures(dirs, out_dir)``, ``summary(dirs)``)."""
    import sys

    if len(sys.argv) < 3:
        sys.exit(f"usage: python -m {module} OUT_DIR RUN_DIR [RUN_DIR ...] (runs with disjoint seeds)")
    for path in make_figures(sys.argv[2:], sys.argv[1]):
        print(path)
    print(summary(sys.argv[2:]))


def runs_label(dirs: list[Path]) -> str:
    """``run 20261202-220105`` or ``runs 20261202-220105 + 20261202-222517`` for a figure title."""
    return ("run " if len(dirs) == 1 else "runs ") + " + ".join(d.name for d in dirs)


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def _taus(methods: list[str]) -> list[str]:
    # a plain "teacher_prior" (the transformer's and RNN's name for tau = 1) holds the first tau colour
    plain = ["1"] if "teacher_prior" in methods and not any("(tau=1)" in m for m in methods) else []
    return plain + [m.split("tau=")[1].rstrip(")") for m in methods if "(tau=" in m]


def _color(method: str, methods: list[str]):
    return style.method_color(method, _taus(methods))


def learning_curves(curves: list[dict[str, Any]], setting: str, out: Path, title: str = "",
                    switch: int | None = None) -> Path | None:
    """Metric vs step for every method of one setting: mean over seeds with a ± sd band; ``switch``: the step
    where the variational methods go from MAP to SVI (a dotted line; the point methods keep running Adam)."""
    rows = [c for c in curves if c["setting"] == setting]
    if not rows:
        return None
    present = list(dict.fromkeys(r["metric"] for r in rows))
    metrics = [m for m in ("accuracy", "rmse", "nll") if m in present] + \
        [m for m in present if m not in ("accuracy", "rmse", "nll")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = style.subplots(1, len(metrics), extra_width=2.2)
    for ax, metric in zip(axes[0], metrics):
        drawn: list[float] = []
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
            ax.plot(steps, m, label=style.display_name(method), color=c, lw=1.4)
            ax.fill_between(steps, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=c,
                            alpha=0.15, lw=0)
            drawn += [a - b for a, b in zip(m, sd)] + [a + b for a, b in zip(m, sd)]
        style.mark_switch(ax, switch)
        _metric_axis(ax, metric, drawn, "optimizer step" + (" (VI methods: MAP, then SVI)" if switch else ""))
    return _finish(fig, axes, title or setting, out)


def _metric_axis(ax: Any, metric: str, drawn: list[float], xlabel: str) -> None:
    """Labels and y-range of a test-metric panel (accuracy in [0, 1], NLL on a log axis)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_", " ") if metric.startswith("test_") else f"test {metric}")
    style.fit_ylim(ax, drawn, log=metric == "nll", lo=0.0 if metric == "accuracy" else None,
                   hi=1.0 if metric == "accuracy" else None)
    if metric == "nll":
        style.log_y(ax)


def _finish(fig, axes, title: str, out: Path) -> Path:
    """Legend outside the panels, title, write the PNG atomically (:func:`style.save`)."""
    fig.suptitle(title)
    style.legend_outside(fig, axes, where="bottom")  # a right-hand legend would run into a long title
    return style.save(fig, out)


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
    fig, axes = style.subplots(1, len(metrics), extra_width=2.2)
    for ax, metric in zip(axes[0], metrics):
        drawn: list[float] = []
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
                ax.errorbar(xs, ms, yerr=sds, label=style.display_name(method), color=_color(method, methods),
                            marker="o", ms=3, lw=1.2, capsize=2)
                drawn += [a - b for a, b in zip(ms, sds)] + [a + b for a, b in zip(ms, sds)]
        ax.set_xscale("log")
        ax.set_xticks(fracs)
        ax.set_xticklabels([f"{f:g}" for f in fracs])
        ax.minorticks_off()
        _metric_axis(ax, metric, drawn, "student's fraction of the training split")
    return _finish(fig, axes, title or student, out)


def map_steps_of(run_dir: str | os.PathLike) -> int | None:
    """The students' MAP steps from a run's ``config.json`` (where their learning curves switch to SVI)."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    v = (cfg.get("student") or {}).get("map_steps") if isinstance(cfg.get("student"), dict) else None
    return int(v) if isinstance(v, int | float) and v > 0 else None


def figures_for_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure of one run directory, written to ``out_dir`` with the experiment's name as prefix."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    name = run_dir.parent.name
    made: list[Path] = []
    curves = read_rows(run_dir / "curves.csv") if (run_dir / "curves.csv").exists() else []
    switch = map_steps_of(run_dir)
    for setting in dict.fromkeys(c["setting"] for c in curves):
        p = learning_curves(curves, setting, out_dir / f"{name}_curves_{_slug(setting)}.png",
                            f"{name}: {setting} (run {run_dir.name})", switch=switch)
        if p:
            made.append(p)
    rows = read_rows(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
    for student in dict.fromkeys(r.get("student") for r in rows if r.get("student") not in (None, "", "teacher")):
        p = fraction_plot(rows, student, out_dir / f"{name}_fraction_{_slug(student)}.png",
                          f"{name}: student {student} (run {run_dir.name})")
        if p:
            made.append(p)
    if (run_dir / "summary.md").exists():
        dst = out_dir / f"{name}_summary.md"
        atomic_write_text(dst, (run_dir / "summary.md").read_text().rstrip("\n") + f"\n\nfrom run `{run_dir}`\n")
        made.append(dst)
    return made


def _kind_figures(run_dir: Path, out_dir: Path) -> list[Path]:
    """Extra figures from ``pyro_distill.plots.<kind>.figures_for_run(run_dir, out_dir)`` when a kind has one."""
    import importlib
    import json

    try:
        kind = canonical_kind(json.loads((run_dir / "config.json").read_text()).get("kind", ""))
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


def _sections(text: str) -> list[tuple[str, str]]:
    """``(experiment name, section text)`` of a figures README, in order (``""`` for the text before them)."""
    out: list[tuple[str, str]] = []
    name, buf = "", []
    for line in text.splitlines():
        if line.startswith("## "):
            out.append((name, "\n".join(buf)))
            name, buf = line[3:].split()[0] if line[3:].split() else "", [line]
        else:
            buf.append(line)
    out.append((name, "\n".join(buf)))
    return out


def _merge_readme(path: Path, new: dict[str, str]) -> str:
    """The figures README with the sections in ``new`` replaced or appended; every other experiment's
    section is kept as it was (a figures call that did not redraw an experiment never drops it)."""
    old = _sections(path.read_text()) if path.exists() else []
    head = old[0][1].strip() if old and old[0][0] == "" else ""
    head = head or ("# Figures\n\nRegenerated by `pyro-distill figures` from the latest complete full (not `--quick`) "
                    "run of each experiment; each section names its run.")
    parts, seen = [head], set()
    for name, text in old:
        if not name:
            continue
        parts.append(new.get(name, text).strip())
        seen.add(name)
    parts += [text.strip() for name, text in new.items() if name not in seen]
    return "\n\n".join(parts) + "\n"


def _section(exp: str, rd: Path, files: list[Path], out_dir: Path) -> str:
    lines = [f"## {exp} (run `{rd}`)", ""]
    for f in files:
        rel = os.path.relpath(f, out_dir)
        lines.append(f"![{f.stem}]({rel})" if f.suffix == ".png" else f"- table: [{f.name}]({rel})")
    return "\n".join(lines)


def make_all(runs_root: str | os.PathLike = "runs", out_dir: str | os.PathLike = "figures",
             include_quick: bool = False, notes: list[str] | None = None) -> list[Path]:
    """Figures for the latest complete full run of every experiment under ``runs_root``, plus ``out_dir/README.md``
    listing them with the run each came from (``out_dir/SOURCES.json``: figure file -> run directory). Every
    run gets the generic figures of this module; a kind may add its own with a module
    ``pyro_distill/plots/<kind>.py`` defining ``figures_for_run(run_dir, out_dir)``.

    Published figures come only from complete full runs: runs still running, failed, interrupted or died
    (:func:`pyro_distill.experiments.core.run_state`) are skipped, and a ``--quick`` run is drawn into its
    own folder ``<run>/figures/`` instead (``include_quick=True`` lets a quick run publish). Sections of
    experiments not redrawn stay in the README. What was skipped or redirected is appended to ``notes``."""
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    if not runs_root.is_dir():
        raise FileNotFoundError(f"no runs in {runs_root}; run an experiment first: "
                                "pyro-distill run experiments/digits.toml")
    notes = notes if notes is not None else []
    made: list[Path] = []
    sections: dict[str, str] = {}
    sources: dict[str, str] = {}
    for exp in sorted(p for p in runs_root.iterdir() if p.is_dir()):
        rd = latest_run(exp.name, runs_root, include_quick=include_quick)
        drew_quick = False
        for newer in sorted((p for p in exp.iterdir() if p.is_dir() and (rd is None or p.name > rd.name)),
                            key=lambda p: p.name, reverse=True):
            st = run_state(newer)
            if st["state"] == "complete" and st.get("quick") and not drew_quick:
                qdir = newer / "figures"
                made += figures_for_run(newer, qdir) + _kind_figures(newer, qdir)
                drew_quick = True
                notes.append(f"{exp.name}: quick run {newer} drawn into {qdir} (not published)")
            elif st["state"] != "unknown":
                why = st.get("died_because") or ("--quick smoke run" if st.get("quick") else "")
                notes.append(f"{exp.name}: skipped run {newer} ({st['state']}{': ' + why if why else ''})")
        if rd is None:
            continue
        files = figures_for_run(rd, out_dir) + _kind_figures(rd, out_dir)
        made += files
        sources.update({os.path.relpath(f, out_dir): str(rd) for f in files})
        sections[exp.name] = _section(exp.name, rd, files, out_dir)
        notes.append(f"{exp.name}: published from {rd}")
    if sections:
        atomic_write_text(out_dir / "README.md", _merge_readme(out_dir / "README.md", sections))
        src_path = out_dir / "SOURCES.json"
        old: dict[str, str] = {}
        if src_path.exists():
            try:
                old = json.loads(src_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
        atomic_write_text(src_path, json.dumps(old | sources, indent=1, sort_keys=True) + "\n")
    return made


def make_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every figure of one run, whatever its state, into ``out_dir`` (default: the run's own ``figures/``
    folder, so that a smoke or unfinished run never touches the published figures)."""
    run_dir = Path(run_dir)
    if not (run_dir / "status.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no status.json); pass runs/NAME/<timestamp>")
    out = Path(out_dir) if out_dir is not None else run_dir / "figures"
    return figures_for_run(run_dir, out) + _kind_figures(run_dir, out)
