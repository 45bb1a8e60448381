"""Experiment kind ``rnn`` (old name ``rnn_attention``): remove the additive attention of a GRU seq2seq teacher
by conditioning its posterior, then train the attention-free student in several ways.

Per task (``dates``: attention matters; ``digit_sum``: it matters little) and seed: the teacher
(:class:`~pyro_distill.nets.AttentionRNN`, MAP then low-rank SVI from a shrunk-prior covariance start); the
student is the same net with a uniform context, each method ``student.steps`` optimizer steps, one minibatch size:
``teacher_prior`` (SVI under the teacher posterior conditioned as ``variant`` says, started at that prior),
``standard_prior`` (SVI under the fan-in prior, random start), ``teacher_init`` (the teacher's mean without the
attention blocks, then MAP), ``deterministic`` (MAP, random start), ``kd`` (token-level Hinton KD,
:func:`~pyro_distill.baselines.token_kd`); controls: ``teacher_prior_tempered`` (the prior's covariance times
``student.prior_temperature``; ``tempered_start = "conditioned"`` starts it at the untempered prior),
``marginal_prior`` (the teacher's plain marginal over the kept coordinates), ``deterministic_attention`` (the
teacher's architecture trained like ``deterministic``) and ``reduced_posterior`` (SVI from the conditioned teacher
posterior under the student's own prior; the Savage-Dickey ``log_evidence_change`` in the row). Old method names
(``vi_conditioned_prior``, ...) are read through :data:`pyro_distill.naming.METHOD_ALIASES`.
``student.fractions``: the students train on a seeded random fraction of the teacher's sequences (setting
``"<task> frac=<f>"`` below 1). Curves: validation token NLL and exact match at the mean every ``eval.every``
steps, step 0 included. Metrics on the test split: :func:`pyro_distill.metrics.evaluate_sequences`.
Figures: :mod:`pyro_distill.plots.rnn`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import metrics
from ..baselines import token_kd
from ..data.sequences import SeqTask, sequence_task
from ..data.subsets import random_indices
from ..distill import reduced_posterior
from ..gaussian import Gaussian
from ..inference import fit_map, fit_posterior
from ..naming import canonical_methods
from ..nets.attention_rnn import AttentionRNN
from ..surgery.rnn import RemoveAttention
from .core import SeedContext, register_kind

__all__ = ["DEFAULTS", "METHODS", "run_seed"]

METHODS = ("teacher_prior", "standard_prior", "teacher_init", "deterministic", "kd", "teacher_prior_tempered",
           "marginal_prior", "deterministic_attention", "reduced_posterior")
VI_PRIORS = ("teacher_prior", "teacher_prior_tempered", "marginal_prior")
POINT_STARTS = ("teacher_init", "deterministic", "deterministic_attention")

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


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    """One seed of every task in ``cfg["tasks"]``: teacher, surgery, the students (see the module doc)."""
    if cfg["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {cfg['dtype']!r}")
    if cfg["student"]["tempered_start"] not in ("prior", "conditioned"):
        raise ValueError(f"student.tempered_start must be 'prior' or 'conditioned', got "
                         f"{cfg['student']['tempered_start']!r}")
    if any(not 0 < f <= 1 for f in cfg["student"]["fractions"]):
        raise ValueError(f"student.fractions must lie in (0, 1], got {cfg['student']['fractions']}")
    cfg["methods"] = canonical_methods(cfg["methods"])
    unknown = sorted(set(cfg["methods"]) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    for task_name in cfg["tasks"]:
        # the data split is fixed (seed 0) across seeds: seeds vary initialization and minibatches only
        _run_task(cfg, seed, ctx, sequence_task(task_name, seed=0, **cfg["data"]), getattr(torch, cfg["dtype"]))


def _run_task(cfg: dict[str, Any], seed: int, ctx: SeedContext, task: SeqTask, dtype: torch.dtype) -> None:
    T, S, E = cfg["teacher"], cfg["student"], cfg["eval"]
    B, every, setting = int(cfg["batch_size"]), int(E["every"]), task.name
    teacher = AttentionRNN(**task.net_kwargs(), **cfg["net"])
    op = RemoveAttention(cfg["variant"])
    student = op.architecture(teacher)
    X, y, Xv, yv, Xte, yte = task.X, task.y, task.Xval, task.yval, task.Xte, task.yte
    ctx.log(f"{setting}: teacher p={teacher.num_params}, student p={student.num_params}, N={len(X)}")

    # ---- teacher
    w0 = teacher.init_weights(torch.Generator().manual_seed(10_000 + seed), dtype)
    t0 = time.perf_counter()
    q_t, hist = fit_posterior(teacher, X, y, guide="lowrank", steps=T["steps"], lr=T["lr"], factor_lr=T["factor_lr"],
                              map_steps=T["map_steps"], map_lr=T["map_lr"], num_particles=T["num_particles"],
                              batch_size=B, init=w0, cov_init="prior", rank=T["rank"], seed=seed, dtype=dtype,
                              elbo_eval_particles=2)
    t_teacher, svi_step = time.perf_counter() - t0, hist.svi_time_s / max(1, T["steps"])
    res = metrics.evaluate_sequences(teacher, q_t, Xte, yte, E["samples"], seed)
    # where each removal variant puts the student: conditional mean vs plain marginal (copied) mean
    starts = {f"val_nll_cond_{v}": metrics.sequence_nll(student, RemoveAttention(v).apply(teacher, q_t)[1].loc, Xv, yv)
              for v in ("w", "uv", "all")}
    starts["val_nll_marginal"] = metrics.sequence_nll(student, q_t.loc[RemoveAttention("w").keep(teacher)], Xv, yv)
    ctx.record({"setting": setting, "method": "teacher", **res, "p": teacher.num_params, **starts,
                "val_nll_start": float("nan"), "svi_step_ms": 1e3 * svi_step,
                "map_step_ms": 1e3 * hist.map_time_s / max(1, T["map_steps"]), "fit_s": t_teacher})
    ctx.log(f"{setting}: teacher {res} ({t_teacher:.0f} s, SVI step {1e3 * svi_step:.1f} ms)")
    if cfg["save_models"]:
        ctx.save_model(f"{setting}-teacher", teacher, q_t, {"task": setting, "role": "teacher"},
                       data=(X, y), idata_draws=cfg["idata_draws"])

    # ---- surgery: the conditioned prior, the plain marginal and the copied weights
    _, prior_c = op.apply(teacher, q_t)
    keep = op.keep(teacher)
    priors = {"teacher_prior": prior_c, "teacher_prior_tempered": prior_c.tempered(S["prior_temperature"]),
              "marginal_prior": q_t.marginalize(keep)}
    w_rand = student.init_weights(torch.Generator().manual_seed(20_000 + seed), dtype)
    inits = {"teacher_init": q_t.loc[keep].clone(), "deterministic": w_rand, "deterministic_attention": w0}
    vi = {"guide": "lowrank", "steps": S["steps"], "lr": S["svi_lr"], "factor_lr": S["factor_lr"],
          "num_particles": S["num_particles"], "batch_size": B, "seed": seed, "dtype": dtype, "eval_every": every,
          "elbo_eval_particles": 2}
    kd_probs = None
    for frac in S["fractions"]:
        # the students' training data: a seeded random fraction of the teacher's (1: the same data)
        idx = random_indices(len(X), frac, seed)
        Xs, ys = (X, y) if idx is None else (X[idx], y[idx])
        fsetting = setting if frac == 1 else f"{setting} frac={frac:g}"
        for method in cfg["methods"]:
            net = teacher if method == "deterministic_attention" else student

            def cb(step: int, w: Any, method: str = method, net: AttentionRNN = net, where: str = fsetting) -> None:
                if step % every and step != 0:
                    return
                wl = w.loc if isinstance(w, Gaussian) else w
                ctx.curve(where, method, step, "val_nll_tok", metrics.sequence_nll(net, wl, Xv, yv))
                ctx.curve(where, method, step, "val_exact_match",
                          metrics.sequence_scores(net, wl, Xv, yv)["exact_match"])

            t0, pc, extra = time.perf_counter(), None, {}  # pc: the prior a VI student is fitted under (None: default)
            if method in VI_PRIORS:
                pc = priors[method]
                pc.layout = student.layout
                # q starts at its prior; the tempered one with tempered_start = "conditioned" at the untempered prior
                start = prior_c if method == "teacher_prior_tempered" and S["tempered_start"] == "conditioned" else pc
                cb(0, start.loc)
                q, _ = fit_posterior(student, Xs, ys, prior=pc, init=start, callback=cb, **vi)
            elif method == "standard_prior":
                start = w_rand
                cb(0, start)
                q, _ = fit_posterior(student, Xs, ys, init=w_rand, map_steps=0, cov_init="prior", rank=S["rank"],
                                     callback=cb, **vi)
            elif method in POINT_STARTS:
                start = inits[method]
                cb(0, start)
                q, _ = fit_map(net, Xs, ys, init=start, steps=S["steps"], lr=S["lr"], batch_size=B, seed=seed,
                               callback=cb, eval_every=every)
            elif method == "reduced_posterior":  # model reduction: conditioned start, the student's own prior
                start = prior_c
                cb(0, start.loc)
                red = reduced_posterior(teacher, q_t, student, Xs, ys, ops=[op], callback=cb, **vi)
                q, extra = red.posterior, {"log_evidence_change": red.info["log_evidence_change"]}
            else:  # kd
                if kd_probs is None:
                    kd_probs = metrics.sequence_predictive(teacher, q_t, X, cfg["kd"]["teacher_samples"], seed)
                start = w_rand
                cb(0, w_rand)
                q, _ = token_kd(student, Xs, ys, kd_probs if idx is None else kd_probs[idx], init=w_rand,
                                steps=S["steps"], lr=S["lr"], batch_size=B, gamma=cfg["kd"]["gamma"],
                                temperature=cfg["kd"]["temperature"], seed=seed, callback=cb, eval_every=every)
            fit_s = time.perf_counter() - t0
            res = metrics.evaluate_sequences(net, q, Xte, yte, E["samples"], seed)
            v0 = metrics.sequence_nll(net, start.loc if isinstance(start, Gaussian) else start, Xv, yv)
            ctx.record({"setting": fsetting, "method": method, "fraction": float(frac), "n_train": len(Xs), **res,
                        "p": net.num_params, "val_nll_start": v0, "fit_s": fit_s} | extra)
            ctx.log(f"{fsetting}: {method} {res} start val NLL {v0:.3f} ({fit_s:.0f} s)")
            if cfg["save_models"] and isinstance(q, Gaussian):
                ctx.save_model(f"{fsetting.replace(' ', '-')}-{method}", net, q,
                               {"task": setting, "role": method, "surgery": op.to_dict(), "fraction": float(frac)},
                               data=(Xs, ys), prior=pc, idata_draws=cfg["idata_draws"])


register_kind("rnn", DEFAULTS, run_seed)
register_kind("rnn_attention", DEFAULTS, run_seed)  # the old name (naming.KIND_ALIASES): old configs and runs
