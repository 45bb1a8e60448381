"""Experiment kind ``rnn`` (old name ``rnn_attention``): remove the additive attention of a GRU seq2seq teacher
by conditioning its posterior, then train the attention-free student (uniform context) in several ways.

Per task (``dates``: attention matters; ``digit_sum``: little) and seed: the teacher (MAP, then low-rank SVI from a
shrunk-prior covariance start, or with ``teacher.cov_init = "laplace"`` from the low-rank GGN Laplace at MAP), then
each method with ``student.steps`` optimizer steps: ``teacher_prior`` (SVI under the conditioned teacher posterior,
started there), ``standard_prior`` (SVI, fan-in prior, random start),
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
from ..distill import reduced_posterior
from ..gaussian import Gaussian, PointMass
from ..inference import fit_map, fit_posterior
from ..naming import canonical_methods
from ..nets.attention_rnn import AttentionRNN
from ..surgery.rnn import RemoveAttention
from .core import SeedContext, register_kind
from .protocol import (
    check_choices,
    check_teacher_prior_variance,
    check_teacher_temperature,
    evidence_prior,
    record_sequences,
    sequence_curve,
    subsamples,
    teacher_fit_prior,
    tempered_teacher,
    timed,
)

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
                # temperature: covariance times T; prior_variance: the fan-in prior's variance x this (both chosen on
                # held-out training data)
                "rank": 10, "temperature": 1.0, "prior_variance": 1.0,
                # cov_init: the SVI start, "prior" (the prior shrunk around MAP, the published runs) or "laplace" (the
                # low-rank GGN Laplace at MAP); curvature_rows: its GGN from this many sequences, scaled (0: all);
                # start_temperature: the start's covariance x this before SVI (chosen on held-out training data)
                "cov_init": "prior", "curvature_rows": 0, "start_temperature": 1.0},
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
    cfg["methods"] = canonical_methods(cfg["methods"])
    check_choices(cfg, {"dtype": ("float32", "float64"), "student.tempered_start": ("prior", "conditioned"),
                        "methods": METHODS, "teacher.cov_init": ("prior", "laplace")})
    if any(not 0 < f <= 1 for f in cfg["student"]["fractions"]):
        raise ValueError(f"student.fractions must lie in (0, 1], got {cfg['student']['fractions']}")
    check_teacher_temperature(cfg["teacher"])
    check_teacher_prior_variance(cfg["teacher"])
    for task_name in cfg["tasks"]:
        # the data split is fixed (seed 0) across seeds: seeds vary initialization and minibatches only
        _run_task(cfg, seed, ctx, sequence_task(task_name, seed=0, **cfg["data"]), getattr(torch, cfg["dtype"]))


def _teacher(cfg: dict[str, Any], seed: int, ctx: SeedContext, task: SeqTask, teacher: AttentionRNN,
             student: AttentionRNN, dtype: torch.dtype) -> tuple[Gaussian, torch.Tensor]:
    """Fit, evaluate, record and save the teacher; returns its posterior and its start ``w0``."""
    T, B = cfg["teacher"], int(cfg["batch_size"])
    X, y, Xv, yv = task.X, task.y, task.Xval, task.yval
    w0 = teacher.init_weights(torch.Generator().manual_seed(10_000 + seed), dtype)
    (q_t, hist), t_teacher = timed(fit_posterior, teacher, X, y, prior=teacher_fit_prior(teacher, T, dtype, ctx),
                                   guide="lowrank", steps=T["steps"], lr=T["lr"],
                                   factor_lr=T["factor_lr"], map_steps=T["map_steps"], map_lr=T["map_lr"],
                                   num_particles=T["num_particles"], batch_size=B, init=w0, cov_init=T["cov_init"],
                                   curvature_rows=T["curvature_rows"], start_temperature=T["start_temperature"],
                                   rank=T["rank"], seed=seed, dtype=dtype,
                                   elbo_eval_particles=2)
    how = (f"low-rank GGN Laplace at MAP, curvature from {hist.info.get('curvature_rows')} of {len(X)} sequences, "
           f"{hist.laplace_time_s:.1f} s"
           if T["cov_init"] == "laplace" else "the prior shrunk around MAP")
    scaled = f", covariance x {T['start_temperature']:g}" if T["start_temperature"] != 1 else ""
    ctx.log(f"teacher SVI start: {T['cov_init']} ({how}{scaled})")
    q_t = tempered_teacher(q_t, T, ctx)
    # where each removal variant puts the student: conditional mean vs plain marginal (copied) mean
    starts = {f"val_nll_cond_{v}": metrics.sequence_nll(student, RemoveAttention(v).apply(teacher, q_t)[1].loc, Xv, yv)
              for v in ("w", "uv", "all")}
    starts["val_nll_marginal"] = metrics.sequence_nll(student, q_t.loc[RemoveAttention("w").keep(teacher)], Xv, yv)
    timing = {"val_nll_start": float("nan"), "svi_step_ms": 1e3 * hist.svi_time_s / max(1, T["steps"]),
              "map_step_ms": 1e3 * hist.map_time_s / max(1, T["map_steps"]), "fit_s": t_teacher}
    record_sequences(ctx, teacher, q_t, task.Xte, task.yte, task.name, "teacher", cfg["eval"]["samples"], seed,
                     starts | timing, linearized=True)
    if hist.map_weights is not None:  # the check every posterior owes: its predictive against its own MAP point
        record_sequences(ctx, teacher, PointMass(hist.map_weights), task.Xte, task.yte, task.name, "teacher_map", 1,
                         seed, {"fit_s": hist.map_time_s})
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
    kd_probs = metrics.sequence_predictive(teacher, q_t, X, cfg["kd"]["teacher_samples"], seed) \
        if "kd" in cfg["methods"] else None  # the teacher's token predictive, for token-level KD
    # the students' data: a seeded random fraction (1: the same data)
    for frac, idx, Xs, ys, fsetting in subsamples(X, y, S["fractions"], seed, setting, "permutation"):
        for method in cfg["methods"]:
            net = teacher if method == "deterministic_attention" else student
            cb = sequence_curve(ctx, net, Xv, yv, fsetting, method, every)
            start, pc, extra = starts[method], priors.get(method), {}  # pc: the VI prior (None: the default)
            t0 = time.perf_counter()
            if method == "teacher_prior(tau=evidence)":  # issue 13: tau chosen on the student's own data (Xs, ys)
                pc, extra = evidence_prior(student, prior_c, Xs, ys, ("structure", "curvature"), seed=seed,
                                           batch_size=B, map_lr=S["lr"], map_steps=S["evidence_map_steps"],
                                           **{k: S[f"evidence_{k}"] for k in ("structure", "curvature", "samples")})
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
                q, _ = token_kd(student, Xs, ys, kd_probs if idx is None else kd_probs[idx], init=start,
                                steps=S["steps"], lr=S["lr"], batch_size=B, gamma=cfg["kd"]["gamma"],
                                temperature=cfg["kd"]["temperature"], seed=seed, callback=cb, eval_every=every)
            fit_s = time.perf_counter() - t0
            v0 = metrics.sequence_nll(net, start.loc if isinstance(start, Gaussian) else start, Xv, yv)
            record_sequences(ctx, net, q, task.Xte, task.yte, fsetting, method, cfg["eval"]["samples"], seed,
                             {"val_nll_start": v0, "fit_s": fit_s} | extra, fraction=float(frac), n_train=len(Xs))
            if cfg["save_models"] and isinstance(q, Gaussian):
                ctx.save_model(f"{fsetting.replace(' ', '-')}-{method}", net, q,
                               {"task": setting, "role": method, "surgery": op.to_dict(), "fraction": float(frac),
                                "data": specs.from_table(cfg["data"], setting, fraction=float(frac),
                                                         subsample_seed=seed, subsample="permutation")},
                               data=(Xs, ys), prior=pc, idata_draws=cfg["idata_draws"])


register_kind("rnn", DEFAULTS, run_seed)
register_kind("rnn_attention", DEFAULTS, run_seed)  # the old name (naming.KIND_ALIASES): old configs and runs
