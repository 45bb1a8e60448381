"""One style for every figure: size, resolution, fonts, method names and colours, legends outside the data.

Every figure function in :mod:`pyro_distill.plots` (and the per-kind ``make_figures`` it calls) draws through
:func:`subplots` and writes through :func:`save`, so that all PNGs share ``DPI`` (>= 150), panel sizes that
stay legible (no strip of 1761 x 233 px: panels wrap into rows of at most :data:`MAX_COLS`), font sizes,
display names (``kd`` -> "Hinton KD") and one colour per method across figures. Helpers: a figure legend
outside the axes (:func:`legend_outside`), a MAP -> SVI switch marker for learning curves
(:func:`mark_switch`), and y limits fitted to the data so that differences are not hidden (:func:`fit_ylim`).
Bars are only used for quantities that start at 0; a zoomed metric (accuracy 0.90-0.96) is drawn as points
with error bars (:func:`dot_groups`), never as bars cut at an arbitrary baseline.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..naming import canonical_method

__all__ = ["DPI", "PANEL", "MAX_COLS", "FONT", "DISPLAY_NAMES", "display_name", "method_color", "pyplot",
           "subplots", "grid", "legend_outside", "mark_switch", "fit_ylim", "log_y", "dot_groups", "save"]

#: resolution of every PNG (the issue's floor is 150)
DPI = 160
#: one panel's (width, height) in inches
PANEL = (4.0, 3.0)
#: panels per row before wrapping
MAX_COLS = 3
#: font sizes (points)
FONT = {"base": 9, "small": 8, "title": 10, "suptitle": 11}

#: canonical code names of methods -> what a reader sees (old names are read through naming.METHOD_ALIASES)
DISPLAY_NAMES = {
    "teacher": "Teacher",
    "teacher_map": "Teacher, MAP point",
    "teacher_prior": "VI, teacher prior",
    "standard_prior": "VI, standard prior",
    "standard_prior_cond_init": "VI, standard prior, teacher-mean start",
    "deterministic": "MAP (point)",
    "deterministic_attention": "MAP, with attention",
    "kd": "Hinton KD",
    "prune_finetune": "Prune + fine-tune",
    "conditioned_prior": "Teacher prior, untrained",
    "teacher_prior_tempered": "VI, tempered teacher prior",
    "marginal_prior": "VI, marginal teacher prior",
    "teacher_init": "Teacher-mean start + MAP",
    "tinybert": "TinyBERT-style KD",
    "reduced_posterior": "VI, reduced posterior (BMR start)",
    "divided_prior": "VI, divided prior",
}

#: a fixed colour per method (tab10 indices), so that a method looks the same in every figure
_COLORS = {
    "teacher_prior": 0, "conditioned_prior": 7, "standard_prior": 3, "standard_prior_cond_init": 4,
    "deterministic": 5, "kd": 6, "prune_finetune": 8, "tinybert": 9, "teacher_init": 4,
    "deterministic_attention": 8,
    # outside tab10, so that they never share a colour with the methods above or the tau colours (tau = evidence is
    # the second tau colour, the orange the tempered prior had)
    "reduced_posterior": "#393b79", "divided_prior": "#637939", "teacher_prior_tempered": "#843c39",
    "marginal_prior": "#7b4173",
}
#: teacher_prior(tau=...) curves: blues and greens by tau
_TAU_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#bcbd22"]
_TAU = re.compile(r"^(?P<base>[a-z_]+)\(tau=(?P<tau>[^)]+)\)$")


def display_name(method: str) -> str:
    """``"kd"`` -> ``"Hinton KD"``; ``"teacher_prior(tau=10)"`` -> ``"VI, teacher prior, τ=10"``; unknown names pass."""
    method = canonical_method(method)
    m = _TAU.match(method)
    if m:
        return f"{DISPLAY_NAMES.get(m['base'], m['base'])}, τ={m['tau']}"
    return DISPLAY_NAMES.get(method, method)


def method_color(method: str, taus: Sequence[str] = ()) -> Any:
    """The method's colour; ``teacher_prior(tau=t)`` gets the t-th of a fixed list (``taus``: all taus drawn)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    method = canonical_method(method)
    m = _TAU.match(method)
    if m:
        ts = list(taus) or [m["tau"]]
        i = ts.index(m["tau"]) if m["tau"] in ts else 0
        return _TAU_COLORS[i % len(_TAU_COLORS)]
    if method in _COLORS:
        c = _COLORS[method]
        return c if isinstance(c, str) else cmap(c)
    return cmap(sum(map(ord, method)) % 10)  # stable for names not listed


def _rc() -> dict[str, Any]:
    return {
        "figure.dpi": DPI, "savefig.dpi": DPI, "font.size": FONT["base"], "axes.titlesize": FONT["title"],
        "axes.labelsize": FONT["base"], "xtick.labelsize": FONT["small"], "ytick.labelsize": FONT["small"],
        "legend.fontsize": FONT["small"], "figure.titlesize": FONT["suptitle"], "axes.grid": True,
        "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
    }


def pyplot():
    """matplotlib.pyplot on the Agg backend with this module's rc settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(_rc())
    return plt


def grid(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    """``(rows, cols)`` for ``n`` panels, at most ``max_cols`` per row."""
    cols = max(1, min(n, max_cols))
    return math.ceil(max(1, n) / cols), cols


def subplots(nrows: int = 1, ncols: int = 1, panel: tuple[float, float] = PANEL, extra_width: float = 0.0,
             **kwargs: Any):
    """``(fig, axes[nrows][ncols])`` with constrained layout (titles, suptitle and outside legends never
    overlap); ``extra_width`` inches are added on the right for a legend."""
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols + extra_width, panel[1] * nrows),
                             squeeze=False, layout="constrained", **kwargs)
    return fig, axes


def legend_outside(fig, axes: Iterable[Any], where: str = "right", ncol: int | None = None, title: str | None = None):
    """One legend for the whole figure, outside every axes (``where``: ``"right"`` or ``"bottom"``); entries
    of all axes, each label once. Needs constrained layout (:func:`subplots`)."""
    seen: dict[str, Any] = {}
    for ax in (a for row in axes for a in (row if hasattr(row, "__iter__") else [row])):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_") and lab not in seen:
                seen[lab] = h
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if not seen:
        return None
    if where == "bottom":
        return fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                          ncol=ncol or min(4, len(seen)), title=title)
    return fig.legend(list(seen.values()), list(seen), loc="outside right upper", ncol=ncol or 1, title=title)


def mark_switch(ax, step: float | None, label: str = "MAP → SVI") -> None:
    """A dotted vertical line at the step where MAP hands over to SVI, labelled at the top of the panel."""
    if step is None or step <= 0:
        return
    ax.axvline(step, color="0.35", ls=":", lw=1.0, zorder=0)
    ax.annotate(label, xy=(step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                textcoords="offset points", ha="left", va="top", fontsize=FONT["small"] - 1, color="0.3")


def fit_ylim(ax, values: Iterable[float], pad: float = 0.08, lo: float | None = None, hi: float | None = None,
             log: bool = False) -> None:
    """y limits from the finite ``values`` plus ``pad`` of their range (clipped to ``[lo, hi]``), so that
    differences between methods fill the panel instead of hiding near an arbitrary baseline."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x)) and (not log or float(x) > 0)]
    if not v:
        return
    a, b = min(v), max(v)
    if log:
        la, lb = math.log10(a), math.log10(b)
        span = max(lb - la, 0.05)
        ax.set_ylim(10 ** (la - pad * span), 10 ** (lb + pad * span))
        return
    span = b - a if b > a else max(abs(a) * 0.05, 1e-3)
    y0, y1 = a - pad * span, b + pad * span
    if lo is not None:
        y0 = max(lo, y0)
    if hi is not None:
        y1 = min(hi, y1)
    ax.set_ylim(y0, y1)


def log_y(ax) -> None:
    """Log-scale y axis labelled with plain numbers (0.4, 0.6, 1, 2) instead of powers of ten."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 4.0, 6.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))


def dot_groups(ax, groups: Sequence[str], series: dict[str, tuple[Sequence[float], Sequence[float]]],
               colors: dict[str, Any] | None = None) -> list[float]:
    """Grouped points with ± sd error bars: ``series[name] = (means per group, sds per group)``; returns every
    drawn end point (for :func:`fit_ylim`). For metrics whose interesting range does not include 0."""
    n = max(1, len(series))
    width = 0.7 / n
    ends: list[float] = []
    for k, (name, (means, sds)) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ax.errorbar(xs, means, yerr=sds, fmt="o", ms=4, capsize=2, lw=1.1, label=name,
                    color=(colors or {}).get(name))
        ends += [m - s for m, s in zip(means, sds)] + [m + s for m, s in zip(means, sds)]
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.grid(axis="x", visible=False)
    return ends


def save(fig, path: str | os.PathLike) -> Path:
    """Write the PNG atomically (temporary file + rename, mode from the umask) at :data:`DPI`; closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.pd-{os.getpid()}-fig.tmp")
    try:
        fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or "png", bbox_inches="tight", pad_inches=0.05)
        from ..store import file_mode

        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
