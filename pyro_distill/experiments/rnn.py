"""Experiment kind ``rnn_attention``: remove additive attention from a GRU seq2seq teacher by conditioning.

Per task (``dates``: attention matters; ``digit_sum``: it matters little) and seed:

- teacher: :class:`~pyro_distill.nets.AttentionRNN` with attention, MAP (``teacher.map_steps``) then
  low-rank SVI (``teacher.steps``) from a shrunk-prior covariance start (``cov_init="prior"``);
- five students, the same architecture without attention (uniform context), each ``student.steps``
  optimizer steps with the same minibatch size:
  1. ``vi_conditioned_prior``: SVI under the teacher posterior conditioned on ``w = 0`` (``variant``),
     started at that prior (q = p at step 0);
  2. ``vi_standard_prior``: SVI under the fan-in prior from a random start;
  3. ``teacher_init``: the teacher's posterior mean without the attention blocks, then MAP training
     (the published follow-up's baseline: weights copied, then trained);
  4. ``deterministic``: MAP from a random start;
  5. ``kd``: token-level Hinton KD (:func:`pyro_distill.baselines.kd_loss` on every non-pad target
     token) from the teacher's posterior predictive, random start;
Optional controls: ``vi_conditioned_prior_tempered`` (as 1, the prior's covariance multiplied by
``student.prior_temperature``), ``vi_marginal_prior`` (as 1 with the teacher's plain marginal over the
kept coordinates: no conditioning shift, the copied mean) and ``deterministic_attention`` (the teacher's
architecture trained like 4: the same-budget answer to "does attention matter on this task?") and
``reduced_posterior`` (issue 13, Bayesian model reduction: SVI from the conditioned teacher posterior, mean and
covariance, under the student's own fan-in prior; the Savage-Dickey log evidence change of removing the attention
is the row's ``log_evidence_change``).

``student.fractions`` (default ``[1.0]``): the students train on a seeded random fraction of the teacher's
training sequences (1 = the same data, the setting name is the task's; otherwise ``"<task> frac=<f>"``); the
teacher always sees all of them.

Curves: validation token NLL and exact match at the mean weights every ``eval.every`` steps, step 0
included (does the conditioned / copied student start lower?). Final metrics on the test split:
exact match and token accuracy of greedy decoding at the mean, token NLL at the mean and of the
posterior predictive (Bayesian methods; = the point NLL for point methods).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ..data.sequences import PAD, SeqTask, exact_match, sequence_task, token_accuracy
from ..distill import reduced_posterior
from ..gaussian import Gaussian
from ..inference import fit_map, fit_posterior
from ..nets.attention_rnn import AttentionRNN
from ..surgery.rnn import RemoveAttention
from .core import SeedContext, register_kind

__all__ = ["DEFAULTS", "METHODS", "run_seed", "evaluate_seq", "make_figures"]

METHODS = ("vi_conditioned_prior", "vi_standard_prior", "teacher_init", "deterministic", "kd",
           "vi_conditioned_prior_tempered", "vi_marginal_prior", "deterministic_attention", "reduced_posterior")

DEFAULTS: dict[str, Any] = {
    "tasks": ["dates", "digit_sum"],
    "methods": list(METHODS[:5]),
    "variant": "w",
    "batch_size": 64,
    "dtype": "float32",
    "save_models": True,
    "idata_draws": 200,             # draws in each saved model's ArviZ idata.nc (0: none)
    "data": {"n_train": 4000, "n_val": 500, "n_test": 1000},
    "net": {"emb": 16, "hidden": 32, "attn": 16},
    "teacher": {"map_steps": 800, "steps": 400, "lr": 1e-3, "factor_lr": 1e-4, "map_lr": 1e-2, "num_particles": 1,
                "rank": 10},
    "student": {"steps": 800, "lr": 1e-2, "svi_lr": 1e-2, "factor_lr": 1e-3, "num_particles": 1, "rank": 10,
                "prior_temperature": 100.0, "tempered_start": "prior", "fractions": [1.0]},
    "kd": {"gamma": 0.5, "temperature": 2.0, "teacher_samples": 8},
    "eval": {"every": 100, "samples": 8},
}


# ============================================================================ evaluation
def _token_count(y: torch.Tensor) -> int:
    return int((y != PAD).sum())


@torch.no_grad()
def _point_nll(net: AttentionRNN, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    tot = sum(float(net.log_likelihood(w, X[a : a + chunk], y[a : a + chunk]).sum()) for a in range(0, len(X), chunk))
    return -tot / _token_count(y)


@torch.no_grad()
def _predictive_probs(net: AttentionRNN, q: Gaussian, X: torch.Tensor, samples: int, seed: int,
                      chunk: int = 500) -> torch.Tensor:
    """Teacher-forced posterior predictive ``[N, T, V]``: softmax averaged over ``samples`` draws."""
    gen = torch.Generator().manual_seed(seed)
    W = q.sample(samples, generator=gen)
    out = []
    for a in range(0, len(X), chunk):
        out.append(torch.softmax(net.forward(W, X[a : a + chunk]), -1).mean(0))
    return torch.cat(out)


@torch.no_grad()
def evaluate_seq(net: AttentionRNN, q: Gaussian | torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                 samples: int = 8, seed: int = 0) -> dict[str, float]:
    """Exact match / token accuracy of greedy decoding at the mean, token NLL at the mean and of the
    posterior predictive (``samples`` draws; the point NLL again for a point estimate)."""
    w = q.loc if isinstance(q, Gaussian) else q
    pred = torch.cat([net.decode(w, X[a : a + 1000]) for a in range(0, len(X), 1000)])
    res = {"exact_match": float(exact_match(pred, y)), "token_acc": float(token_accuracy(pred, y)),
           "nll_tok": _point_nll(net, w, X, y)}
    if isinstance(q, Gaussian) and samples > 0:
        P = _predictive_probs(net, q, X, samples, seed)
        lp = P.clamp_min(1e-12).log().gather(-1, y.unsqueeze(-1)).squeeze(-1)
        res["nll_pred_tok"] = float(-(lp * (y != PAD)).sum() / _token_count(y))
    else:
        res["nll_pred_tok"] = res["nll_tok"]
    return res


# ============================================================================ one seed
def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}")
    return getattr(torch, name)


def _kd_fit(net: AttentionRNN, X: torch.Tensor, y: torch.Tensor, teacher_probs: torch.Tensor, init: torch.Tensor,
            steps: int, lr: float, batch_size: int, gamma: float, temperature: float, seed: int,
            callback) -> torch.Tensor:
    """Token-level KD: ``kd_loss`` over the non-pad target tokens of a minibatch, rescaled to a per-sequence
    sum, plus ``-log p(w) / N`` (the same regularizer as the MAP students)."""
    from ..baselines import kd_loss

    torch.manual_seed(seed)
    prior = net.default_prior(init.dtype)
    w = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    N = X.shape[0]
    for step in range(steps):
        idx = torch.randint(0, N, (batch_size,))
        xb, yb, tb = X[idx], y[idx], teacher_probs[idx]
        m = yb != PAD
        logits = net.forward(w, xb)
        loss = kd_loss(logits[m], tb[m], yb[m], gamma, temperature) * (int(m.sum()) / batch_size) \
            - prior.log_prob(w) / N
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"KD diverged at step {step}; lower student.lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step + 1, w.detach())
    return w.detach()


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    """One seed of every task in ``cfg["tasks"]``: teacher, surgery, five students (see module doc)."""
    dtype = _dtype(cfg["dtype"])
    if cfg["student"]["tempered_start"] not in ("prior", "conditioned"):
        raise ValueError(f"student.tempered_start must be 'prior' or 'conditioned', got "
                         f"{cfg['student']['tempered_start']!r}")
    unknown = sorted(set(cfg["methods"]) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    for task_name in cfg["tasks"]:
        # the data split is fixed (seed 0) across seeds: seeds vary initialization and minibatches only
        task = sequence_task(task_name, seed=0, **cfg["data"])
        _run_task(cfg, seed, ctx, task, dtype)


def _run_task(cfg: dict[str, Any], seed: int, ctx: SeedContext, task: SeqTask, dtype: torch.dtype) -> None:
    T, S, E = cfg["teacher"], cfg["student"], cfg["eval"]
    B = int(cfg["batch_size"])
    every = int(E["every"])
    setting = task.name
    teacher = AttentionRNN(**task.net_kwargs(), **cfg["net"])
    student = RemoveAttention(cfg["variant"]).architecture(teacher)
    X, y, Xv, yv, Xte, yte = task.X, task.y, task.Xval, task.yval, task.Xte, task.yte
    ctx.log(f"{setting}: teacher p={teacher.num_params}, student p={student.num_params}, N={len(X)}")

    # ---- teacher
    g = torch.Generator().manual_seed(10_000 + seed)
    w0 = teacher.init_weights(g, dtype)
    t0 = time.perf_counter()
    q_t, hist = fit_posterior(teacher, X, y, guide="lowrank", steps=T["steps"], lr=T["lr"], factor_lr=T["factor_lr"],
                              map_steps=T["map_steps"],
                              map_lr=T["map_lr"], num_particles=T["num_particles"], batch_size=B, init=w0,
                              cov_init="prior", rank=T["rank"], seed=seed, dtype=dtype, elbo_eval_particles=2)
    t_teacher = time.perf_counter() - t0
    svi_step = hist.svi_time_s / max(1, T["steps"])
    res = evaluate_seq(teacher, q_t, Xte, yte, E["samples"], seed)
    # where each removal variant puts the student: conditional mean vs plain marginal (copied) mean
    starts = {}
    for v in ("w", "uv", "all"):
        o = RemoveAttention(v)
        starts[f"val_nll_cond_{v}"] = _point_nll(student, o.apply(teacher, q_t)[1].loc, Xv, yv)
    starts["val_nll_marginal"] = _point_nll(student, q_t.loc[RemoveAttention("w").keep(teacher)], Xv, yv)
    ctx.record({"setting": setting, "method": "teacher", **res, "p": teacher.num_params, **starts,
                "val_nll_start": float("nan"), "svi_step_ms": 1e3 * svi_step,
                "map_step_ms": 1e3 * hist.map_time_s / max(1, T["map_steps"]), "fit_s": t_teacher})
    ctx.log(f"{setting}: teacher {res} ({t_teacher:.0f} s, SVI step {1e3 * svi_step:.1f} ms)")
    if cfg["save_models"]:
        ctx.save_model(f"{setting}-teacher", teacher, q_t, {"task": setting, "role": "teacher"},
                       data=(X, y), idata_draws=cfg["idata_draws"])

    # ---- surgery: the conditioned prior and the copied weights
    op = RemoveAttention(cfg["variant"])
    _, prior_c = op.apply(teacher, q_t)
    keep = op.keep(teacher)
    w_copy = q_t.loc[keep].clone()

    def curve_cb(method: str, net: AttentionRNN, where: str = setting):
        def cb(step: int, w: torch.Tensor) -> None:
            if step % every and step != 0:
                return
            wl = w.loc if isinstance(w, Gaussian) else w
            ctx.curve(where, method, step, "val_nll_tok", _point_nll(net, wl, Xv, yv))
            ctx.curve(where, method, step, "val_exact_match", float(exact_match(net.decode(wl, Xv), yv)))
        return cb

    gs = torch.Generator().manual_seed(20_000 + seed)
    w_rand = student.init_weights(gs, dtype)
    kd_probs = None
    fractions = S["fractions"]
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"student.fractions must lie in (0, 1], got {fractions}")
    for frac in fractions:
        # the students' training data: a seeded random fraction of the teacher's (1: the same data)
        idx = None if frac == 1 else torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[
            : max(1, round(frac * len(X)))].sort().values
        Xs, ys = (X, y) if idx is None else (X[idx], y[idx])
        fsetting = setting if frac == 1 else f"{setting} frac={frac:g}"
        for method in cfg["methods"]:
            net = teacher if method == "deterministic_attention" else student
            cb = curve_cb(method, net, fsetting)
            t0 = time.perf_counter()
            pc = None  # the prior a VI student is fitted under (None: the default)
            extra: dict[str, Any] = {}
            if method in ("vi_conditioned_prior", "vi_conditioned_prior_tempered", "vi_marginal_prior"):
                pc = {"vi_conditioned_prior": prior_c,
                      "vi_conditioned_prior_tempered": prior_c.tempered(S["prior_temperature"]),
                      "vi_marginal_prior": q_t.marginalize(keep)}[method]
                pc.layout = student.layout
                # q starts at its prior; with tempered_start = "conditioned" the tempered student starts at the
                # untempered conditional instead (the teacher's own, much smaller, covariance)
                start = prior_c if (method == "vi_conditioned_prior_tempered"
                                    and S["tempered_start"] == "conditioned") else pc
                cb(0, start.loc)
                q, _ = fit_posterior(student, Xs, ys, guide="lowrank", prior=pc, init=start, steps=S["steps"],
                                     lr=S["svi_lr"], factor_lr=S["factor_lr"], num_particles=S["num_particles"],
                                     batch_size=B, seed=seed,
                                     dtype=dtype, callback=lambda s, qq, cb=cb: cb(s, qq), eval_every=every,
                                     elbo_eval_particles=2)
            elif method == "vi_standard_prior":
                start = w_rand
                cb(0, start)
                q, _ = fit_posterior(student, Xs, ys, guide="lowrank", init=w_rand, map_steps=0, cov_init="prior",
                                     rank=S["rank"], steps=S["steps"], lr=S["svi_lr"], factor_lr=S["factor_lr"],
                                     num_particles=S["num_particles"],
                                     batch_size=B, seed=seed, dtype=dtype, callback=lambda s, qq, cb=cb: cb(s, qq),
                                     eval_every=every, elbo_eval_particles=2)
            elif method in ("teacher_init", "deterministic", "deterministic_attention"):
                start = {"teacher_init": w_copy, "deterministic": w_rand, "deterministic_attention": w0}[method]
                cb(0, start)
                q, _ = fit_map(net, Xs, ys, init=start, steps=S["steps"], lr=S["lr"], batch_size=B, seed=seed,
                               callback=cb, eval_every=every)
            elif method == "reduced_posterior":
                # Bayesian model reduction: the conditioned teacher posterior as the start, the student's own
                # fan-in prior as the prior (pc stays None)
                start = prior_c
                cb(0, start.loc)
                red = reduced_posterior(teacher, q_t, student, Xs, ys, ops=[op], guide="lowrank", steps=S["steps"],
                                        lr=S["svi_lr"], factor_lr=S["factor_lr"], num_particles=S["num_particles"],
                                        batch_size=B, seed=seed, dtype=dtype,
                                        callback=lambda s, qq, cb=cb: cb(s, qq), eval_every=every,
                                        elbo_eval_particles=2)
                q = red.posterior
                extra = {"log_evidence_change": red.info["log_evidence_change"]}
            else:  # kd
                if kd_probs is None:
                    kd_probs = _predictive_probs(teacher, q_t, X, cfg["kd"]["teacher_samples"], seed)
                kd_sub = kd_probs if idx is None else kd_probs[idx]
                cb(0, w_rand)
                q = _kd_fit(student, Xs, ys, kd_sub, w_rand, S["steps"], S["lr"], B, cfg["kd"]["gamma"],
                            cfg["kd"]["temperature"], seed, cb)
            fit_s = time.perf_counter() - t0
            res = evaluate_seq(net, q, Xte, yte, E["samples"], seed)
            v0 = _point_nll(net, start.loc if isinstance(start, Gaussian) else start, Xv, yv)
            ctx.record({"setting": fsetting, "method": method, "fraction": float(frac), "n_train": len(Xs), **res,
                        "p": net.num_params, "val_nll_start": v0, "fit_s": fit_s} | extra)
            ctx.log(f"{fsetting}: {method} {res} start val NLL {v0:.3f} ({fit_s:.0f} s)")
            if cfg["save_models"] and isinstance(q, Gaussian):
                ctx.save_model(f"{fsetting.replace(' ', '-')}-{method}", net, q,
                               {"task": setting, "role": method, "surgery": op.to_dict(), "fraction": float(frac)},
                               data=(Xs, ys), prior=pc, idata_draws=cfg["idata_draws"])


register_kind("rnn_attention", DEFAULTS, run_seed)


# ============================================================================ figure
def make_figures(run_dir: str | Path, out_dir: str | Path = "figures") -> list[Path]:
    """``figures/<experiment>_curves.png``: validation token NLL (top) and exact match (bottom) vs step,
    mean ± sd over seeds, one column per task; the teacher's test value as a dashed line."""
    from ..plots import style
    from .core import read_rows

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    curves = read_rows(run_dir / "curves.csv")
    if not any(r["metric"] == "val_nll_tok" for r in curves):
        raise FileNotFoundError(f"{run_dir}/curves.csv has no val_nll_tok curves; is this an rnn_attention run?")
    rows = read_rows(run_dir / "metrics.csv")
    settings = list(dict.fromkeys(r["setting"] for r in curves))
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
                vals = [torch.tensor(pts[s], dtype=torch.float64) for s in steps]
                m = torch.stack([v.mean() for v in vals])
                sd = torch.stack([v.std() if len(v) > 1 else torch.zeros((), dtype=torch.float64) for v in vals])
                c = style.method_color(method)
                ax.plot(steps, m, label=style.display_name(method), lw=1.3, color=c)
                ax.fill_between(steps, m - sd, m + sd, alpha=0.2, color=c, lw=0)
            tv = [r[tkey] for r in rows if r["setting"] == setting and r["method"] == "teacher"]
            if tv:
                ax.axhline(sum(tv) / len(tv), color="k", ls="--", lw=1, label="teacher (test)")
            if log:
                style.log_y(ax)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(label)
            ax.set_title(setting)
    style.legend_outside(fig, axes)
    fig.suptitle(f"{run_dir.parent.name}: students without attention (run {run_dir.name})")
    # one file per experiment name, so a variant run (e.g. rnn_attention_tempered_start) never
    # overwrites the main experiment's figure
    return [style.save(fig, out_dir / f"{run_dir.parent.name}_curves.png")]
