"""Experiment kind ``rnn`` (old name ``rnn_attention``): remove the additive attention of a GRU seq2seq teacher
by conditioning its posterior, then train the attention-free student (uniform context) in several ways.

Per task (``dates``: attention matters; ``digit_sum``: little) and seed: the teacher (MAP, then low-rank SVI from a
shrunk-prior covariance start), then each method with ``student.steps`` optimizer steps: ``teacher_prior`` (SVI under
the conditioned teacher posterior, started there), ``standard_prior`` (SVI, fan-in prior, random start),
``teacher_init`` (the teacher's mean without attention, then MAP), ``deterministic`` (MAP), ``kd`` (token-level KD,
:func:`~pyro_distill.baselines.token_kd`); controls ``teacher_prior_tempered`` (covariance x
``student.prior_temperature``; ``tempered_start = "conditioned"``: started at the untempered prior),
``marginal_prior`` (the teacher's plain marginal), ``deterministic_attention`` (the teacher's architecture, MAP),
``reduced_posterior`` (SVI from the conditioned posterior under the student's own prior),
``teacher_prior(tau=evidence)`` (the conditioned prior's covariance x the tau the student's Laplace evidence picks on
its own sequences, :func:`~pyro_distill.distill.evidence_temperature`; rows carry ``tau_chosen``). Old method names
are read through :data:`pyro_distill.naming.METHOD_ALIASES`. ``student.fractions``: students on a seeded random
fraction of the sequences. Curves: validation token NLL and exact match at the mean every ``eval.every`` steps (step 0
included); test metrics: :func:`~pyro_distill.metrics.evaluate_sequences`; figures: :mod:`pyro_distill.plots.rnn`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import metrics
from ..baselines import token_kd
from ..data import specs
from ..data.sequences import SeqTask, sequence_task
from ..data.subsets import random_indices
from ..distill import evidence_temperature, reduced_posterior
from ..gaussian import Gaussian, PointMass
from ..inference import fit_map, fit_posterior
from ..naming import canonical_methods
from ..nets.attention_rnn import AttentionRNN
from ..surgery.rnn import RemoveAttention
from .core import SeedContext, register_kind

__all__ = ["DEFAULTS", "METHODS", "run_seed"]

METHODS = ("teacher_prior", "standard_prior", "teacher_init", "deterministic", "kd", "teacher_prior_tempered",
           "marginal_prior", "deterministic_attention", "reduced_posterior", "teacher_prior(tau=evidence)")
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
                "prior_temperature": 100.0, "tempered_start": "prior", "fractions": [1.0],
                # teacher_prior(tau=evidence): MAP steps to the expansion point, diagonal-GGN estimator and its draws
                "evidence_map_steps": 300, "evidence_structure": "auto", "evidence_curvature": "auto",
                "evidence_samples": 4},
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


def _teacher(cfg: dict[str, Any], seed: int, ctx: SeedContext, task: SeqTask, teacher: AttentionRNN,
             student: AttentionRNN, dtype: torch.dtype) -> tuple[Gaussian, torch.Tensor]:
    """Fit, evaluate, record and save the teacher; returns its posterior and its start ``w0``."""
    T, B = cfg["teacher"], int(cfg["batch_size"])
    X, y, Xv, yv = task.X, task.y, task.Xval, task.yval
    w0 = teacher.init_weights(torch.Generator().manual_seed(10_000 + seed), dtype)
    t0 = time.perf_counter()
    q_t, hist = fit_posterior(teacher, X, y, guide="lowrank", steps=T["steps"], lr=T["lr"], factor_lr=T["factor_lr"],
                              map_steps=T["map_steps"], map_lr=T["map_lr"], num_particles=T["num_particles"],
                              batch_size=B, init=w0, cov_init="prior", rank=T["rank"], seed=seed, dtype=dtype,
                              elbo_eval_particles=2)
    t_teacher, svi_step = time.perf_counter() - t0, hist.svi_time_s / max(1, T["steps"])
    res = metrics.evaluate_sequences(teacher, q_t, task.Xte, task.yte, cfg["eval"]["samples"], seed)
    # where each removal variant puts the student: conditional mean vs plain marginal (copied) mean
    starts = {f"val_nll_cond_{v}": metrics.sequence_nll(student, RemoveAttention(v).apply(teacher, q_t)[1].loc, Xv, yv)
              for v in ("w", "uv", "all")}
    starts["val_nll_marginal"] = metrics.sequence_nll(student, q_t.loc[RemoveAttention("w").keep(teacher)], Xv, yv)
    ctx.record({"setting": task.name, "method": "teacher", **res, "p": teacher.num_params, **starts,
                "val_nll_start": float("nan"), "svi_step_ms": 1e3 * svi_step,
                "map_step_ms": 1e3 * hist.map_time_s / max(1, T["map_steps"]), "fit_s": t_teacher})
    ctx.log(f"{task.name}: teacher {res} ({t_teacher:.0f} s, SVI step {1e3 * svi_step:.1f} ms)")
    if cfg["save_models"]:
        ctx.save_model(f"{task.name}-teacher", teacher, q_t, {"task": task.name, "role": "teacher",
                                                              "data": specs.from_table(cfg["data"], task.name)},
                       data=(X, y), idata_draws=cfg["idata_draws"])
    return q_t, w0


def _run_task(cfg: dict[str, Any], seed: int, ctx: SeedContext, task: SeqTask, dtype: torch.dtype) -> None:
    S, B, every, setting = cfg["student"], int(cfg["batch_size"]), int(cfg["eval"]["every"]), task.name
    teacher = AttentionRNN(**task.net_kwargs(), **cfg["net"])
    op = RemoveAttention(cfg["variant"])
    student = op.architecture(teacher)
    X, y, Xv, yv = task.X, task.y, task.Xval, task.yval
    ctx.log(f"{setting}: teacher p={teacher.num_params}, student p={student.num_params}, N={len(X)}")
    q_t, w0 = _teacher(cfg, seed, ctx, task, teacher, student, dtype)
    # ---- surgery: the conditioned prior, the plain marginal and the copied weights; each method's start
    _, prior_c = op.apply(teacher, q_t)
    keep = op.keep(teacher)
    priors = {"teacher_prior": prior_c, "teacher_prior_tempered": prior_c.tempered(S["prior_temperature"]),
              "marginal_prior": q_t.marginalize(keep)}
    w_rand = student.init_weights(torch.Generator().manual_seed(20_000 + seed), dtype)
    starts = priors | {"teacher_init": q_t.loc[keep].clone(), "deterministic": w_rand, "deterministic_attention": w0,
                       "standard_prior": w_rand, "kd": w_rand, "reduced_posterior": prior_c,
                       "teacher_prior(tau=evidence)": prior_c}
    if S["tempered_start"] == "conditioned":  # the tempered student starts at the untempered conditional
        starts["teacher_prior_tempered"] = prior_c
    vi = {"guide": "lowrank", "steps": S["steps"], "lr": S["svi_lr"], "factor_lr": S["factor_lr"],
          "num_particles": S["num_particles"], "batch_size": B, "seed": seed, "dtype": dtype, "eval_every": every,
          "elbo_eval_particles": 2}
    kd_probs = None
    for frac in S["fractions"]:
        idx = random_indices(len(X), frac, seed)  # the students' data: a seeded random fraction (1: the same data)
        Xs, ys = (X, y) if idx is None else (X[idx], y[idx])
        fsetting = setting if frac == 1 else f"{setting} frac={frac:g}"
        for method in cfg["methods"]:
            net = teacher if method == "deterministic_attention" else student

            def cb(step: int, w: Gaussian, method: str = method, net: AttentionRNN = net, where: str = fsetting
                   ) -> None:  # w: a Gaussian, or a PointMass (point fits, point starts)
                if step % every and step != 0:
                    return
                wl = w.mean
                ctx.curve(where, method, step, "val_nll_tok", metrics.sequence_nll(net, wl, Xv, yv))
                ctx.curve(where, method, step, "val_exact_match",
                          metrics.sequence_scores(net, wl, Xv, yv)["exact_match"])

            start, pc, extra = starts[method], priors.get(method), {}  # pc: the VI prior (None: the default)
            t0 = time.perf_counter()
            if method == "teacher_prior(tau=evidence)":  # issue 13: tau chosen on the student's own data (Xs, ys)
                pc, extra = _evidence_prior(student, prior_c, Xs, ys, S, B, seed)
                start = pc
            cb(0, start if isinstance(start, Gaussian) else PointMass(start))
            if pc is not None:
                pc.layout = student.layout
                q, _ = fit_posterior(student, Xs, ys, prior=pc, init=start, callback=cb, **vi)
            elif method == "standard_prior":
                q, _ = fit_posterior(student, Xs, ys, init=start, map_steps=0, cov_init="prior", rank=S["rank"],
                                     callback=cb, **vi)
            elif method in POINT_STARTS:
                q, _ = fit_map(net, Xs, ys, init=start, steps=S["steps"], lr=S["lr"], batch_size=B, seed=seed,
                               callback=cb, eval_every=every)
            elif method == "reduced_posterior":  # model reduction: conditioned start, the student's own prior
                red = reduced_posterior(teacher, q_t, student, Xs, ys, ops=[op], callback=cb, **vi)
                q, extra = red.posterior, {"log_evidence_change": red.info["log_evidence_change"]}
            else:  # kd
                if kd_probs is None:
                    kd_probs = metrics.sequence_predictive(teacher, q_t, X, cfg["kd"]["teacher_samples"], seed)
                q, _ = token_kd(student, Xs, ys, kd_probs if idx is None else kd_probs[idx], init=start,
                                steps=S["steps"], lr=S["lr"], batch_size=B, gamma=cfg["kd"]["gamma"],
                                temperature=cfg["kd"]["temperature"], seed=seed, callback=cb, eval_every=every)
            fit_s = time.perf_counter() - t0
            res = metrics.evaluate_sequences(net, q, task.Xte, task.yte, cfg["eval"]["samples"], seed)
            v0 = metrics.sequence_nll(net, start.loc if isinstance(start, Gaussian) else start, Xv, yv)
            ctx.record({"setting": fsetting, "method": method, "fraction": float(frac), "n_train": len(Xs), **res,
                        "p": net.num_params, "val_nll_start": v0, "fit_s": fit_s} | extra)
            ctx.log(f"{fsetting}: {method} {res} start val NLL {v0:.3f} ({fit_s:.0f} s)")
            if cfg["save_models"] and isinstance(q, Gaussian):
                ctx.save_model(f"{fsetting.replace(' ', '-')}-{method}", net, q,
                               {"task": setting, "role": method, "surgery": op.to_dict(), "fraction": float(frac),
                                "data": specs.from_table(cfg["data"], setting, fraction=float(frac),
                                                         subsample_seed=seed, subsample="permutation")},
                               data=(Xs, ys), prior=pc, idata_draws=cfg["idata_draws"])


def _evidence_prior(student: AttentionRNN, prior: Gaussian, X: torch.Tensor, y: torch.Tensor, S: dict[str, Any],
                    B: int, seed: int) -> tuple[Gaussian, dict[str, Any]]:
    """``prior`` tempered by the tau of :func:`~pyro_distill.distill.evidence_temperature` on ``(X, y)``, and the
    row's columns (the chosen tau, its log evidence, at the bound 1, the curvature used)."""
    tau, e = evidence_temperature(student, prior, X, y, map_steps=S["evidence_map_steps"], map_lr=S["lr"], seed=seed,
                                  batch_size=B, structure=S["evidence_structure"], curvature=S["evidence_curvature"],
                                  samples=S["evidence_samples"])
    pt = prior.tempered(tau) if tau != 1 else prior
    pt.layout = student.layout
    return pt, {"tau_chosen": tau, "log_evidence": e["log_evidence"], "log_evidence_tau1": e["log_evidence_tau1"],
                "tau_at_bound": int(e["at_bound"]), "evidence_structure": e["structure"],
                "evidence_curvature": e["curvature"]}


register_kind("rnn", DEFAULTS, run_seed)
register_kind("rnn_attention", DEFAULTS, run_seed)  # the old name (naming.KIND_ALIASES): old configs and runs
