"""How good a Gaussian posterior is, from its InferenceData: the Pareto k-hat of ``log p(w, D) - log q(w)``
over draws of q (Yao et al. 2018, "Yes, but did it work?": k < 0.5 good, 0.5-0.7 usable, > 0.7 unreliable),
PSIS-LOO, WAIC and ``az.compare`` of several models on the same data, and the tables that print them.

LOO, WAIC and k-hat are computed on the data the posterior was fitted to (the training split): that is what
they estimate. The test split enters only as a held-out log predictive density (and accuracy).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from .idata import _chunk_size, _draws, az, loo_reff, to_inference_data, weights_from_idata

__all__ = ["KhatResult", "khat_reading", "khat_from_idata", "posterior_khat", "ModelDiagnosis", "diagnose_idata",
           "diagnose", "format_table", "format_run_table"]


# ============================================================================ k-hat of q
def khat_reading(k: float) -> str:
    """Yao et al. (2018): k < 0.5 good, 0.5-0.7 usable, > 0.7 unreliable."""
    if not math.isfinite(k) and k < 0:
        return "good (constant ratios: q equals the target)"
    if k < 0.5:
        return "good"
    if k <= 0.7:
        return "usable"
    return "unreliable"


@dataclass
class KhatResult:
    """Pareto k-hat of ``log p(w, D) - log q(w)`` over ``n`` draws of q, its reading, and the PSIS
    effective sample size of the normalized smoothed weights."""

    k: float
    reading: str
    n: int
    ess: float

    def __str__(self) -> str:
        return f"k-hat = {self.k:.2f} ({self.reading}; PSIS ESS {self.ess:.0f} of {self.n})"


def _khat(log_ratio: np.ndarray) -> KhatResult:
    lw = np.asarray(log_ratio, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(lw)):
        raise ValueError("log p(w, D) - log q(w) is not finite for some draws; check the prior and the data")
    n = lw.size
    spread = float(lw.max() - lw.min())
    if spread <= 1e-9 * max(1.0, float(np.abs(lw).max())):
        return KhatResult(float("-inf"), khat_reading(float("-inf")), n, float(n))
    with np.errstate(over="ignore"), warnings.catch_warnings():  # k = inf for a hopeless q: reported as such
        warnings.simplefilter("ignore", RuntimeWarning)
        slw, k = az.psislw(lw - lw.max(), reff=1.0)
    w = np.exp(slw - slw.max())
    w /= w.sum()
    k = float(k)
    return KhatResult(k, khat_reading(k), n, float(1.0 / np.sum(w**2)))


def khat_from_idata(idata: az.InferenceData) -> KhatResult:
    """The posterior k-hat from a saved InferenceData (needs ``sample_stats.lp`` and ``log_q``)."""
    ss = idata.get("sample_stats")
    if ss is None or "lp" not in ss or "log_q" not in ss:
        raise ValueError("this InferenceData has no sample_stats.lp / log_q (it was not made from a Gaussian q)")
    return _khat((ss["lp"] - ss["log_q"]).values)


def posterior_khat(net: BayesianNet, q: Gaussian, X: torch.Tensor, y: torch.Tensor, prior: Gaussian | None = None,
                   draws: int = 1000, seed: int = 0) -> KhatResult:
    """Pareto k-hat of ``log p(w, D) - log q(w)``, ``w ~ q`` (``p(w, D)`` = ``prior`` times the likelihood
    of ``(X, y)``), via ArviZ's PSIS. Measures how well q approximates ``p(w | D)`` as a whole."""
    X = X.to(q.dtype) if X.is_floating_point() else X
    w = _draws(q, draws, 1, seed).reshape(draws, -1)
    prior = (prior if prior is not None else net.default_prior(q.dtype, q.device)).to(q.device, q.dtype)
    with torch.no_grad():
        chunk = _chunk_size(net, X.shape[0])
        ll = torch.cat([net.log_likelihood(w[a : a + chunk], X, y).sum(-1) for a in range(0, draws, chunk)])
        lr = prior.log_prob(w) + ll - q.log_prob(w)
    return _khat(lr.cpu().numpy())


# ============================================================================ before / after table
@dataclass
class ModelDiagnosis:
    """One row of the diagnose table."""

    name: str
    p: int
    n_obs: int
    elpd_loo: float
    se_loo: float
    p_loo: float
    loo_k_max: float
    loo_k_bad: int  # observations with pointwise k > 0.7
    elpd_waic: float
    se_waic: float
    p_waic: float
    khat_q: float
    khat_reading: str
    khat_ess: float
    test_lpd: float | None = None  # mean held-out log predictive density per datum
    test_acc: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _test_metrics(idata_like: tuple[BayesianNet, torch.Tensor], Xte: torch.Tensor, yte: torch.Tensor) -> tuple:
    net, w = idata_like
    flat = w.reshape(-1, w.shape[-1])
    Xte = Xte.to(flat.dtype) if Xte.is_floating_point() else Xte  # token ids stay integers
    chunk = _chunk_size(net, Xte.shape[0])
    with torch.no_grad():
        ll = torch.cat([net.log_likelihood(flat[a : a + chunk], Xte, yte) for a in range(0, flat.shape[0], chunk)])
        lpd = float((torch.logsumexp(ll, 0) - math.log(ll.shape[0])).mean())
        acc = None
        if net.likelihood == "categorical" and yte.dim() == 1:  # one label per datum (not a token sequence)
            probs = sum(torch.softmax(net.forward(flat[a : a + chunk], Xte), -1).sum(0)
                        for a in range(0, flat.shape[0], chunk)) / flat.shape[0]
            acc = float((probs.argmax(-1) == yte).double().mean())
    return lpd, acc


def diagnose_idata(name: str, idata: az.InferenceData, net: BayesianNet | None = None,
                   Xte: torch.Tensor | None = None, yte: torch.Tensor | None = None) -> ModelDiagnosis:
    """LOO, WAIC and the q k-hat of one InferenceData (plus held-out metrics when ``net, Xte, yte``)."""
    msgs: list[str] = []
    ll = idata.log_likelihood["y"]
    if ll.dtype != np.float64:  # a file written in float32 before densities were kept in float64
        idata.log_likelihood["y"] = ll.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same facts are reported below as table warnings
        loo = az.loo(idata, pointwise=True, reff=loo_reff(idata))
        waic = az.waic(idata)
    if loo.warning:
        msgs.append("LOO: some pointwise Pareto k > 0.7 (PSIS-LOO unreliable for those observations)")
    if waic.warning:
        msgs.append("WAIC: posterior variance of log p(y_i | w) > 0.4 for some observations (prefer LOO)")
    kq = khat_from_idata(idata)
    pk = np.asarray(loo.pareto_k)
    lpd = acc = None
    if net is not None and Xte is not None and yte is not None:
        w_dtype = idata.posterior[net.layout.names[0]].dtype  # the draws' own precision
        lpd, acc = _test_metrics((net, weights_from_idata(idata, net).to(
            torch.float32 if w_dtype == np.float32 else torch.float64)), Xte, yte)
    if kq.k > 0.7:
        msgs.append("q k-hat > 0.7: the Gaussian is far from this model's exact posterior")
    return ModelDiagnosis(
        name=name, p=int(idata.attrs.get("p", -1)), n_obs=int(pk.size), elpd_loo=float(loo.elpd_loo),
        se_loo=float(loo.se), p_loo=float(loo.p_loo), loo_k_max=float(pk.max()), loo_k_bad=int((pk > 0.7).sum()),
        elpd_waic=float(waic.elpd_waic), se_waic=float(waic.se), p_waic=float(waic.p_waic), khat_q=kq.k,
        khat_reading=kq.reading, khat_ess=kq.ess, test_lpd=lpd, test_acc=acc, warnings=msgs)


def diagnose(models: Mapping[str, tuple[BayesianNet, Gaussian, Gaussian | None]], X: torch.Tensor, y: torch.Tensor,
             Xte: torch.Tensor | None = None, yte: torch.Tensor | None = None, draws: int = 1000, seed: int = 0,
             idatas: Mapping[str, az.InferenceData] | None = None):
    """The before/after table: for each ``name -> (net, q, prior)`` (prior = what ``p(w, D)`` uses; None =
    fan-in) on the SAME training data ``(X, y)``: PSIS-LOO, WAIC, the q k-hat; held-out lpd and accuracy
    when ``Xte, yte``; and ``az.compare`` across them. Precomputed InferenceData may be passed in ``idatas``.

    Returns ``(rows, idatas, compare_df)`` (``compare_df`` is None with fewer than two models).
    """
    out_idata: dict[str, az.InferenceData] = {}
    rows = []
    for name, (net, q, prior) in models.items():
        idata = (idatas or {}).get(name) or to_inference_data(net, q, X, y, draws=draws, seed=seed, prior=prior)
        out_idata[name] = idata
        rows.append(diagnose_idata(name, idata, net, Xte, yte))
    cmp = None
    if len(out_idata) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmp = az.compare(dict(out_idata), ic="loo")
    return rows, out_idata, cmp


def format_table(rows: Sequence[ModelDiagnosis], compare=None) -> str:
    """A plain-text table: elpd_loo (se), p_loo, pointwise LOO k, WAIC, q k-hat with its reading, test
    metrics, and ``az.compare``'s elpd difference and weight when given; warnings listed underneath."""
    nw = max([22] + [len(r.name) for r in rows])
    head = (f"{'model':<{nw}} {'p':>6} {'elpd_loo':>10} {'se':>7} {'p_loo':>7} {'LOO k>0.7':>9} {'elpd_waic':>10} "
            f"{'q k-hat':>8}  {'reading':<11} {'test lpd/N':>10} {'test acc':>8}")
    if compare is not None:
        head += f" {'d_elpd':>8} {'dse':>6} {'weight':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t_lpd = f"{r.test_lpd:10.4f}" if r.test_lpd is not None else f"{'-':>10}"
        t_acc = f"{r.test_acc:8.4f}" if r.test_acc is not None else f"{'-':>8}"
        line = (f"{r.name:<{nw}} {r.p:>6} {r.elpd_loo:10.1f} {r.se_loo:7.1f} {r.p_loo:7.1f} "
                f"{r.loo_k_bad:>4}/{r.n_obs:<4} {r.elpd_waic:10.1f} {r.khat_q:8.2f}  "
                f"{r.khat_reading.split(' ')[0]:<11} "
                f"{t_lpd} {t_acc}")
        if compare is not None and r.name in compare.index:
            c = compare.loc[r.name]
            line += f" {c['elpd_diff']:8.1f} {c['dse']:6.1f} {c['weight']:6.2f}"
        lines.append(line)
    lines.append("q k-hat: Pareto k of log p(w, D) - log q(w) over draws of q (Yao et al. 2018): "
                 "< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable.")
    for r in rows:
        for m in r.warnings:
            lines.append(f"warning [{r.name}]: {m}")
    return "\n".join(lines)


# ============================================================================ a run's table
def format_run_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`diagnose_run`'s groups: mean +- sd over seeds (the q k-hat as median and
    range, with its reading); teachers first, then each student's prior (the conditioned teacher) just
    above the student."""
    def ms(v: Sequence[float | None], fmt: str) -> str:
        v = [x for x in v if x is not None]
        if not v:
            return "-"
        a = np.asarray(v, dtype=float)
        fin = a[np.isfinite(a)]
        if fin.size == 0:
            return "n/a"
        cell = f"{fin.mean():{fmt}} ± {fin.std(ddof=1):{fmt}}" if fin.size > 1 else f"{fin[0]:{fmt}}"
        return cell if fin.size == a.size else f"{cell} ({fin.size} of {a.size} finite)"

    groups = result["groups"]
    teachers = [g for g in result.get("teachers", []) if g in groups]
    order = list(teachers)
    for g in sorted(n for n in groups if n not in teachers and not n.endswith(" prior")):
        order += [n for n in (f"{g} prior", g) if n in groups]
    order += [n for n in groups if n not in order]
    lines = ["| model | seeds | p | N | elpd_loo / N | p_loo | LOO k > 0.7 | q k-hat (median, range) | "
             "test lpd / N | test acc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        g = groups[name]
        k = np.asarray(g["khat_q"], dtype=float)
        kcell = f"{np.median(k):.2f} [{k.min():.2f}, {k.max():.2f}] {khat_reading(float(np.median(k))).split(' ')[0]}"
        lines.append(f"| {name} | {len(g['seeds'])} | {g['p'][0]} | {g['n_obs'][0]} | "
                     f"{ms(g['elpd_loo_per_obs'], '.3f')} | {ms(g['p_loo'], '.0f')} | "
                     f"{ms([100 * x for x in g['loo_k_bad_share']], '.0f')}% | {kcell} | "
                     f"{ms(g['test_lpd'], '.3f')} | {ms(g['test_acc'], '.3f')} |")
    lines.append("")
    lines.append("mean ± sd over seeds. LOO, WAIC and the q k-hat on each model's own training data (N), test metrics "
                 "on the test split. q k-hat: Pareto k of log p(w, D) - log q(w) over draws of q (Yao et al. 2018): "
                 "< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable.")
    return "\n".join(lines)
