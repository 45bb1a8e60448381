"""Metrics of a network under a Gaussian over its weights (or under one weight vector).

Classification, from predictive probabilities ``p[n, c]`` (the posterior predictive
``p(c | x_n) = E_q[softmax f(x_n; w)_c]`` estimated by draws, or a point network's softmax):

* accuracy ``mean_n [argmax_c p_nc = y_n]``;
* NLL ``-mean_n log p_{n, y_n}``;
* ECE with 15 equal-width confidence bins: ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` where the
  confidence of a row is ``max_c p_nc`` (``binning="mass"``: 15 bins of equal row counts instead, the estimator
  with less bias when confidences crowd near 1 -- Nixon et al. 2019, Roelofs et al. 2022);
* Brier ``mean_n sum_c (p_nc - [c = y_n])^2`` (the multi-class Brier score, in [0, 2]);
* agreement with the teacher ``mean_n [argmax p_n = argmax p^T_n]``;
* :func:`paired_bootstrap`: the difference of any of these between two predictives on the same rows, with a
  bootstrap interval over the rows (is "worse" more than the test set can resolve?).

Regression, from draws of the network's mean ``f_s(x_n)`` (``s = 1..S``) and Gaussian noise ``sigma``:

* RMSE of the predictive mean ``sqrt(mean_n (mean_s f_s(x_n) - y_n)^2)``;
* NLL of the predictive mixture ``-mean_n log (1/S) sum_s N(y_n | f_s(x_n), sigma^2)``.

Sequences (a sequence-to-sequence net such as :class:`~pyro_distill.nets.AttentionRNN`; labels ``y [N, T]``,
padding = the net's ``pad`` label, ``M`` = the number of non-pad target tokens):

* exact match and token accuracy of greedy decoding (``net.decode``) at one weight vector;
* token NLL at one weight vector ``-(1/M) sum_{n,t: y_nt != pad} log softmax f(x_n; w)_{t, y_nt}`` (teacher forcing);
* token NLL of the posterior predictive, the same with ``mean_s softmax f(x_n; w_s)`` (:func:`sequence_predictive`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .arrays import as_data, as_tensor
from .gaussian import Gaussian
from .nets.base import BayesianNet
from .predictions import is_point, predictive

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "brier",
    "paired_bootstrap",
    "agreement",
    "rmse",
    "regression_nll",
    "num_params",
    "predict",
    "evaluate",
    "sequence_nll",
    "sequence_predictive",
    "sequence_scores",
    "evaluate_sequences",
]

_EPS = 1e-12


def _check_probs(probs: torch.Tensor, y: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probabilities must have shape [N, C], got {tuple(probs.shape)}")
    if y.shape != probs.shape[:1]:
        raise ValueError(f"labels have shape {tuple(y.shape)}, expected [{probs.shape[0]}] to match the probabilities")


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose most probable class is the label."""
    _check_probs(probs, y)
    return float((probs.argmax(-1) == y).double().mean())


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log predictive probability of the labels (probabilities clamped at 1e-12)."""
    _check_probs(probs, y)
    return float(-probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1).clamp_min(_EPS).log().double().mean())


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15, binning: str = "width") -> float:
    """Expected calibration error over ``n_bins`` confidence bins, ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``.

    ``binning="width"`` (the default, the number every table reports): equal-width bins, bin b = (b/B, (b+1)/B],
    the first bin also holds confidence 0. ``binning="mass"``: the rows sorted by confidence and cut into
    ``n_bins`` groups of equal size (sizes differ by at most one; ties are cut by the sort order) -- every bin has
    about ``N / B`` rows, so a predictive whose confidences spread out is not charged the noise of nearly empty
    bins that the equal-width estimator adds."""
    _check_probs(probs, y)
    if binning not in ("width", "mass"):
        raise ValueError(f"unknown binning {binning!r}: choose 'width' (equal-width bins) or 'mass' (equal counts)")
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    conf, pred = probs.double().max(-1)
    correct = (pred == y).double()
    n = conf.numel()
    if binning == "mass":
        order = conf.argsort(stable=True)
        groups = [g for g in torch.tensor_split(order, min(n_bins, n)) if g.numel()]
        return sum(g.numel() / n * abs(float(correct[g].mean()) - float(conf[g].mean())) for g in groups)
    b = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    total = 0.0
    for k in range(n_bins):
        m = b == k
        if bool(m.any()):
            total += float(m.sum()) / n * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return total


def paired_bootstrap(metric: Any, probs_a: torch.Tensor, probs_b: torch.Tensor, y: torch.Tensor,
                     n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """``metric(probs_a, y) - metric(probs_b, y)`` with a paired bootstrap over the rows.

    Both predictives are scored on the SAME resampled rows (``n_boot`` resamples of the N rows with replacement,
    seeded), so the row-to-row noise they share cancels. ``metric`` is any ``(probs, y) -> float`` of this module
    (``ece``, ``nll``, ``lambda P, t: ece(P, t, binning="mass")``). Returns ``{"diff"`` (on all rows), ``"lo"``,
    ``"hi"`` (the percentile interval at ``level``), ``"se"`` (the bootstrap standard deviation), ``"p_greater"``
    (the fraction of resamples with ``a`` above ``b``), ``"n"``, ``"n_boot"}``. An interval that contains 0 says
    the rows cannot tell the two apart."""
    _check_probs(probs_a, y)
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"the two predictives must score the same rows: shapes {tuple(probs_a.shape)} and "
                         f"{tuple(probs_b.shape)} differ")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = y.shape[0]
    gen = torch.Generator().manual_seed(seed)
    diffs = torch.empty(n_boot, dtype=torch.float64)
    for i in range(n_boot):
        idx = torch.randint(n, (n,), generator=gen)
        diffs[i] = metric(probs_a[idx], y[idx]) - metric(probs_b[idx], y[idx])
    tail = (1 - level) / 2
    lo, hi = torch.quantile(diffs, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"diff": float(metric(probs_a, y) - metric(probs_b, y)), "lo": lo, "hi": hi,
            "se": float(diffs.std()), "p_greater": float((diffs > 0).double().mean()), "n": int(n),
            "n_boot": int(n_boot)}


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot label."""
    _check_probs(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[-1]).to(torch.float64)
    return float(((probs.double() - onehot) ** 2).sum(-1).mean())


def agreement(probs: torch.Tensor, teacher_probs: torch.Tensor) -> float:
    """Fraction of rows where the student's and the teacher's most probable classes coincide."""
    if probs.shape != teacher_probs.shape:
        raise ValueError(f"student probabilities {tuple(probs.shape)} and teacher's {tuple(teacher_probs.shape)} "
                         "must have the same shape (same inputs, same classes)")
    return float((probs.argmax(-1) == teacher_probs.argmax(-1)).double().mean())


def rmse(draws: torch.Tensor, y: torch.Tensor) -> float:
    """RMSE of the predictive mean; ``draws`` is ``[S, N]`` (or ``[N]`` for a point prediction)."""
    mean = draws.double().mean(0) if draws.dim() == 2 else draws.double()
    if mean.shape != y.shape:
        raise ValueError(f"predictions {tuple(mean.shape)} do not match targets {tuple(y.shape)}")
    return float(((mean - y.double()) ** 2).mean().sqrt())


def regression_nll(draws: torch.Tensor, y: torch.Tensor, noise_scale: float) -> float:
    """NLL of the predictive mixture of ``N(f_s(x), sigma^2)`` over draws ``[S, N]`` (or ``[N]``)."""
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale}")
    d = draws.double() if draws.dim() == 2 else draws.double().unsqueeze(0)
    if d.shape[-1] != y.shape[-1]:
        raise ValueError(f"predictions {tuple(d.shape)} do not match targets {tuple(y.shape)}")
    s = float(noise_scale)
    lp = -0.5 * ((y.double() - d) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    return float(-(torch.logsumexp(lp, 0) - math.log(d.shape[0])).mean())


def num_params(net: BayesianNet) -> int:
    """Number of weights of the network (the length of its flat vector)."""
    return int(net.num_params)


def predict(net: BayesianNet, q: Gaussian | torch.Tensor, X: torch.Tensor, num_samples: int = 200,
            seed: int = 0, chunk: int = 50, method: str = "mc") -> torch.Tensor:
    """Predictive quantities: class probabilities ``[N, C]`` (classification) or output draws ``[S, N]``
    (regression). ``q`` is a Gaussian (draws; a point mass uses its mean) or one weight vector ``[p]``;
    ``method`` ``"mc"`` (sampled) or ``"linearized"`` (see :func:`pyro_distill.predictions.predictive`)."""
    X = as_tensor(X, "X")
    return predictive(net, q, X, method=method, num_samples=num_samples, seed=seed, chunk=chunk)


def evaluate(net: BayesianNet, q: Gaussian | torch.Tensor, X: torch.Tensor, y: torch.Tensor,
             num_samples: int = 200, seed: int = 0, teacher_probs: torch.Tensor | None = None,
             noise_scale: float | None = None, linearized: bool = True) -> dict[str, Any]:
    """All metrics of ``net`` under ``q`` (a Gaussian, or one weight vector) on ``(X, y)``.

    Classification: ``accuracy, nll, ece, brier, params`` (+ ``agreement`` with ``teacher_probs``).
    Regression: ``rmse, nll, params`` with noise ``noise_scale`` (default: the network's).
    The plain names are the sampled predictive's; with ``linearized`` (and a ``q`` that is not a point) the
    linearized predictive's values follow with the suffix ``_lin`` (``nll_lin``, ``accuracy_lin``, ...).
    """
    X, y = as_data(X, y)
    if teacher_probs is not None:
        teacher_probs = as_tensor(teacher_probs, "teacher_probs")
    net.check_data(X, y)
    s = noise_scale if noise_scale is not None else net.noise_scale
    if net.likelihood != "categorical" and s is None:
        raise ValueError("this network's noise scale is fitted: pass noise_scale to evaluate")
    methods = ["mc"]
    if linearized and isinstance(q, Gaussian) and not is_point(q):
        methods.append("linearized")
    res: dict[str, Any] = {}
    for method in methods:
        out = predict(net, q, X, num_samples=num_samples, seed=seed, method=method)
        sfx = "" if method == "mc" else "_lin"
        if net.likelihood == "categorical":
            part = {"accuracy": accuracy(out, y), "nll": nll(out, y), "ece": ece(out, y), "brier": brier(out, y)}
            if teacher_probs is not None:
                part["agreement"] = agreement(out, teacher_probs)
        else:
            part = {"rmse": rmse(out, y), "nll": regression_nll(out, y, float(s))}
        res.update({k + sfx: v for k, v in part.items()})
        if method == "mc":
            res["params"] = num_params(net)
    return res


# ============================================================================ sequences
def _tokens(net: BayesianNet, y: torch.Tensor) -> torch.Tensor:
    """The non-pad target positions ``[N, T]`` (padding is the net's ``pad`` label, 0 by default)."""
    return y != int(getattr(net, "pad", 0))


@torch.no_grad()
def sequence_nll(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Teacher-forced token NLL at one weight vector ``w``: minus the log-likelihood summed over sequences
    (padding ignored by the net's likelihood) divided by the number of non-pad target tokens."""
    tot = sum(float(net.log_likelihood(w, X[a : a + chunk], y[a : a + chunk]).sum()) for a in range(0, len(X), chunk))
    return -tot / int(_tokens(net, y).sum())


def sequence_predictive(net: BayesianNet, q: Gaussian | torch.Tensor, X: torch.Tensor, num_samples: int = 8,
                        seed: int = 0, chunk: int = 500, method: str = "mc") -> torch.Tensor:
    """Teacher-forced posterior predictive ``[N, T, V]``: the softmax averaged over ``num_samples`` seeded draws
    of ``q`` (:func:`pyro_distill.predictions.predictive`, ``method`` ``"mc"`` or ``"linearized"``), ``chunk``
    sequences at a time."""
    return torch.cat([predictive(net, q, X[a : a + chunk], method=method, num_samples=num_samples, seed=seed,
                                 chunk=num_samples) for a in range(0, len(X), chunk)])


@torch.no_grad()
def sequence_scores(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                    chunk: int = 1000) -> dict[str, float]:
    """``exact_match`` (share of sequences decoded exactly, up to and including EOS) and ``token_acc`` (share of
    non-pad target tokens right) of greedy decoding at ``w``."""
    from .data.sequences import exact_match, token_accuracy

    pred = torch.cat([net.decode(w, X[a : a + chunk]) for a in range(0, len(X), chunk)])
    return {"exact_match": float(exact_match(pred, y)), "token_acc": float(token_accuracy(pred, y))}


def evaluate_sequences(net: BayesianNet, q: Gaussian | torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                       num_samples: int = 8, seed: int = 0, linearized: bool = False) -> dict[str, float]:
    """``exact_match``, ``token_acc``, ``nll_tok``, ``ece_tok`` (all at the mean / the point), ``nll_pred_tok`` and
    ``ece_pred_tok`` (the posterior predictive's token NLL and ECE from ``num_samples`` draws; the point's again for
    a point estimate) and, with ``linearized`` and a Gaussian ``q``, ``nll_lin_tok`` and ``ece_lin_tok`` (the
    linearized predictive, :func:`pyro_distill.predictions.predictive`). Token metrics are over the non-pad targets.
    """
    w = q.loc if isinstance(q, Gaussian) else q
    m = _tokens(net, y)
    res = sequence_scores(net, w, X, y) | {"nll_tok": sequence_nll(net, w, X, y),
                                           "ece_tok": ece(sequence_predictive(net, w, X)[m], y[m])}
    if isinstance(q, Gaussian) and not is_point(q) and num_samples > 0:
        for method, suffix in (("mc", "pred"), ("linearized", "lin"))[: 1 + bool(linearized)]:
            P = sequence_predictive(net, q, X, num_samples, seed, method=method)
            res[f"nll_{suffix}_tok"], res[f"ece_{suffix}_tok"] = nll(P[m], y[m]), ece(P[m], y[m])
    else:
        res["nll_pred_tok"], res["ece_pred_tok"] = res["nll_tok"], res["ece_tok"]
    return res
