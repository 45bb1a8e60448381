"""Diagnostic figures (ArviZ + matplotlib): blocks before vs after conditioning, a layer's correlation
before and after removal, posterior predictive checks, and Pareto k-hat plots. Small PNGs."""

from __future__ import annotations

import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..diagnostics import az, khat_from_idata, loo_reff  # noqa: E402
from . import style  # noqa: E402

__all__ = ["plot_forest_compare", "plot_correlation_before_after", "plot_ppc", "plot_khat", "correlation"]

DPI = style.DPI
#: the PSIS-LOO Pareto k plot's ceiling (larger values are drawn at it and counted)
K_CLIP = 3.0


def _save(fig, path: str | os.PathLike) -> Path:
    return style.save(fig, path)


def _panels(n: int, panel: tuple[float, float] = style.PANEL):
    """``(fig, flat axes)`` for ``n`` panels wrapped into rows of at most ``style.MAX_COLS``; spare axes hidden."""
    rows, cols = style.grid(n)
    fig, axes = style.subplots(rows, cols, panel=panel)
    flat = [a for row in axes for a in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_forest_compare(idatas: Mapping[str, az.InferenceData], var_names: Sequence[str], path: str | os.PathLike,
                        coords: Mapping[str, Sequence[int]] | None = None, title: str = "") -> Path:
    """Forest plot (94% HDI, quartiles) of the same blocks in several InferenceData, e.g. the teacher's
    coordinates (mapped to the student's names), the conditioned teacher (student prior) and the student."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_rows = 0
        first = next(iter(idatas.values()))
        for v in var_names:
            da = first.posterior[v]
            if coords:
                da = da.sel({k: list(c) for k, c in coords.items() if k in da.dims})
            n_rows += int(np.prod([da.sizes[d] for d in da.dims if d not in ("chain", "draw")]))
        style.pyplot()
        axes = az.plot_forest(list(idatas.values()), model_names=list(idatas), var_names=list(var_names),
                              coords=dict(coords) if coords else None, combined=True,
                              figsize=(6.5, 1.0 + 0.3 * n_rows * max(1, len(idatas)) ** 0.5),
                              textsize=style.FONT["small"])
    fig = axes.ravel()[0].figure
    ax = axes.ravel()[0]
    leg = ax.get_legend()
    if leg is not None:  # ArviZ puts the model legend over the rows: move it below the plot
        handles, labels = leg.legend_handles, [t.get_text() for t in leg.get_texts()]
        leg.remove()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
                   fontsize=style.FONT["small"], frameon=False)
    # one title (ArviZ's "94.0% HDI" would sit on top of a second one): ours, with what the bars are
    ax.set_title(f"{textwrap.fill(title or 'before vs after conditioning', 70)}\n"
                 "(94% HDI, thick: interquartile range, circle: mean)", fontsize=style.FONT["title"])
    return _save(fig, path)


def correlation(cov: torch.Tensor | np.ndarray) -> np.ndarray:
    """Correlation matrix of a covariance."""
    c = np.asarray(cov, dtype=np.float64)
    s = np.sqrt(np.clip(np.diag(c), 1e-300, None))
    return c / s[:, None] / s[None, :]


def plot_correlation_before_after(covs: Mapping[str, torch.Tensor | np.ndarray], path: str | os.PathLike,
                                  title: str = "", labels: Sequence[str] | None = None) -> Path:
    """Heatmaps of the correlation of the same coordinates (one layer) under several Gaussians, side by
    side: e.g. the teacher posterior (before removal), the conditioned teacher, the student posterior."""
    n = len(covs)
    fig, axes = style.subplots(1, n, panel=(3.4, 3.6), extra_width=0.6)
    im = None
    for ax, (name, cov) in zip(axes[0], covs.items()):
        r = correlation(cov)
        im = ax.imshow(r, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
        off = r[~np.eye(len(r), dtype=bool)]
        ax.set_title(f"{textwrap.fill(name, 30)}\nmean |corr| off-diag {np.abs(off).mean():.3f}",
                     fontsize=style.FONT["small"])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.spines[:].set_visible(True)
    if labels:
        axes[0][0].set_ylabel(", ".join(labels), fontsize=style.FONT["small"])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="correlation")
    if title:
        fig.suptitle(textwrap.fill(title, 90))
    return _save(fig, path)


def plot_ppc(idatas: Mapping[str, az.InferenceData], path: str | os.PathLike, title: str = "") -> Path:
    """Posterior predictive checks. Classification: observed class counts against the replicated counts
    (mean and 90% interval over draws), and the histogram of each observation's predictive probability
    of its observed label. Regression: ArviZ's density overlay."""
    n = len(idatas)
    first = next(iter(idatas.values()))
    discrete = np.issubdtype(first.observed_data["y"].dtype, np.integer)
    # one row of models per grid row; a classification model takes two panels (counts above, p(obs) below)
    rows, cols = style.grid(n)
    fig, grid = style.subplots(rows * (2 if discrete else 1), cols)
    axes = [[grid[(r // cols) * (2 if discrete else 1) + k][r % cols] for r in range(n)]
            for k in range(2 if discrete else 1)]
    for r in range(n, rows * cols):
        for k in range(2 if discrete else 1):
            grid[(r // cols) * (2 if discrete else 1) + k][r % cols].set_visible(False)
    for j, (name, idata) in enumerate(idatas.items()):
        if not discrete:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n_pp = int(idata.posterior_predictive.sizes["chain"] * idata.posterior_predictive.sizes["draw"])
                az.plot_ppc(idata, ax=axes[0][j], num_pp_samples=min(50, n_pp), legend=j == 0,
                            textsize=style.FONT["small"])
            axes[0][j].set_title(textwrap.fill(name, 34), fontsize=style.FONT["small"])
            continue
        yobs = idata.observed_data["y"].values
        yrep = idata.posterior_predictive["y"].values.reshape(-1, yobs.shape[0])
        K = int(max(yobs.max(), yrep.max())) + 1
        obs_counts = np.bincount(yobs, minlength=K)
        rep_counts = np.stack([np.bincount(r, minlength=K) for r in yrep])
        lo, mid, hi = np.percentile(rep_counts, [5, 50, 95], axis=0)
        ax = axes[0][j]
        ax.bar(np.arange(K), obs_counts, color="0.8", label="observed count")
        ax.errorbar(np.arange(K), mid, yerr=[mid - lo, hi - mid], fmt="o", ms=3, color="C0",
                    label="replicated (median, 90%)")
        ax.set_title(textwrap.fill(name, 34), fontsize=style.FONT["small"])
        ax.set_xlabel("class")
        ax.set_ylabel("count")
        ll = idata.log_likelihood["y"].values.reshape(-1, yobs.shape[0])
        p_obs = np.exp(ll).mean(0)
        ax = axes[1][j]
        ax.hist(p_obs, bins=np.linspace(0, 1, 21), color="C1")
        ax.set_xlabel("predictive p(observed label)")
        ax.set_ylabel("observations")
        ax.set_title(f"mean p(observed) {p_obs.mean():.3f}", fontsize=style.FONT["small"])
        ax.set_yscale("log")
    if discrete:
        style.legend_outside(fig, [axes[0][:1]], where="bottom")
    fig.suptitle(title or "posterior predictive check")
    return _save(fig, path)


def plot_khat(idatas: Mapping[str, az.InferenceData], path: str | os.PathLike, title: str = "") -> Path:
    """Pointwise PSIS-LOO Pareto k per observation for each model, with the posterior k-hat of
    ``log p(w, D) - log q(w)`` and its reading in the panel title; lines at 0.5 and 0.7."""
    n = len(idatas)
    fig, flat = _panels(n)
    for ax, (name, idata) in zip(flat, idatas.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loo = az.loo(idata, pointwise=True, reff=loo_reff(idata))
        k = np.asarray(loo.pareto_k).reshape(-1)
        kc = np.minimum(k, K_CLIP)  # a few huge k (broad posteriors) would flatten every other panel
        ax.scatter(np.arange(k.size), kc, s=4, c=np.where(k > 0.7, "C3", np.where(k > 0.5, "C1", "C0")))
        if (k > K_CLIP).any():
            ax.text(0.02, K_CLIP * 1.08, f"{(k > K_CLIP).sum()} points with k > {K_CLIP:g} drawn at {K_CLIP:g}",
                    transform=ax.get_yaxis_transform(), fontsize=style.FONT["small"] - 1, va="bottom")
        for h, c in ((0.5, "C1"), (0.7, "C3")):
            ax.axhline(h, color=c, lw=0.8, ls="--")
        try:
            kq = khat_from_idata(idata)
            sub = f"q k-hat {kq.k:.2f} ({kq.reading.split(' ')[0]})"
        except ValueError:
            sub = "no q (MCMC draws)"
        ax.set_title(f"{textwrap.fill(name, 34)}\nLOO k>0.7: {(k > 0.7).sum()}/{k.size}; {sub}",
                     fontsize=style.FONT["small"])
        ax.set_xlabel("observation")
        ax.set_ylabel("PSIS-LOO Pareto k")
        ax.set_ylim(min(-0.05, float(np.nanmin(kc)) - 0.05), K_CLIP * 1.2)  # room above the clip line for the note
    fig.suptitle(title or "Pareto k diagnostics")
    return _save(fig, path)
