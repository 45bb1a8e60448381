"""Experiment kind ``cnn``: a CNN family, cross-architecture distillation and extraction from an argmax teacher.

Per seed and task (``digits`` 8x8; ``fashion_mnist`` 28x28, skipped when its IDX files are absent), inputs flat
``[N, H W]``: 1. **channel removal** (a CNN teacher posterior; the narrower CNN student by ``teacher_prior`` under
the teacher posterior conditioned by :func:`~pyro_distill.surgery.cnn.plan_cnn`, ``standard_prior``, ``kd``,
``prune_finetune``; ``conditioned_prior``: that prior untrained); 2. **transformer -> cnn** (digits) and **cnn ->
mlp** by ``kd``, ``kd_laplace``, ``labels`` (:mod:`pyro_distill.crossarch`); 3. **extraction** per query budget from
the teacher's top-1 answers on ``gaussian``, ``other`` (other images) or ``active`` queries, against ``labels``.
Rows: accuracy, nll, ece, brier, agreement (with that setting's teacher), params, time_s. No mathematics here.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import metrics
from ..baselines import deterministic
from ..crossarch import CROSS_METHODS, convert, crossarch_methods, teacher_predictive
from ..data import Dataset, specs
from ..extraction import GaussianQueries, PoolQueries, digits_images, extract, sample_image_patches, teacher_oracle
from ..gaussian import PointMass
from ..inference import fit_posterior
from ..nets.cnn import CNN
from ..nets.mlp import MLP
from ..nets.transformer import Transformer
from ..surgery import apply
from ..surgery.cnn import plan_cnn
from .core import SeedContext, register_kind
from .protocol import check_choices, fit_method, record_evaluation, timed, vi_kwargs

__all__ = ["DEFAULTS", "run_seed", "load_task", "SURGERY_METHODS", "CROSS_METHODS", "EXTRACTION_SOURCES"]

TASKS = ("digits", "fashion_mnist")
SURGERY_METHODS = ("conditioned_prior", "teacher_prior", "standard_prior", "kd", "prune_finetune")
EXTRACTION_SOURCES = ("gaussian", "other", "active", "labels")

_FIT = {"guide": "diag", "rank": 10, "map_steps": 1000, "steps": 300, "lr": 5e-3, "map_lr": 1e-2,
        "num_particles": 4, "batch_size": 256, "elbo_eval_particles": 8}

DEFAULTS: dict[str, Any] = {
    "tasks": list(TASKS),
    "data": {"test_size": 0.2, "split_seed": 0, "dtype": "float32",
             "fashion_dir": "", "fashion_max_train": 3000, "fashion_max_test": 1000},
    # per task: conv widths and dense widths of teacher and student (same kernels and pooling)
    "digits": {"teacher": {"channels": [8, 16], "dense": [32, 10]}, "student": {"channels": [4, 8], "dense": [16, 10]},
               "mlp_hidden": [32]},
    "fashion_mnist": {"teacher": {"channels": [8, 16], "dense": [32, 10]},
                      "student": {"channels": [4, 8], "dense": [16, 10]}, "mlp_hidden": [64]},
    "cnn": {"kernel_size": 3, "padding": 1, "pool": 2, "activation": "relu"},
    "teacher": dict(_FIT),
    "student": dict(_FIT, map_steps=600, steps=200, selector="snr"),
    "methods": list(SURGERY_METHODS),
    "transformer": {"enabled": True, "d_model": 16, "heads": [2], "ffn": [True], "d_head": 8, "d_ff": 32,
                    "pooling": "mean"} | dict(_FIT, guide="diag", map_lr=5e-3),
    "crossarch": {"methods": list(CROSS_METHODS), "gamma": 0.5, "temperature": 2.0, "laplace": "lowrank", "rank": 10,
                  "lr": 1e-2},
    "extraction": {"budgets": [250, 1000, 4000], "sources": list(EXTRACTION_SOURCES), "rounds": 4, "pool_factor": 10,
                   "pool_size": 6000, "steps": 800, "lr": 1e-2, "batch_size": 256, "oracle_samples": 10},
    "eval": {"samples": 100},
}


def load_task(task: str, d: dict[str, Any], dtype: torch.dtype, seed: int) -> tuple[Dataset, tuple[int, int]]:
    """The task's data set (inputs flat ``[N, H W]``, standardized per pixel; spec from ``d``) and its image shape."""
    if task == "digits":
        return specs.load(specs.from_table(d, "digits", dtype=dtype)), (8, 8)
    if task == "fashion_mnist":
        return specs.load(specs.from_table(d, "fashion_mnist", dir=d["fashion_dir"], pca=0, dtype=dtype,
                                           max_train=d["fashion_max_train"], max_test=d["fashion_max_test"])), (28, 28)
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    """One seed of every task in ``cfg["tasks"]`` whose data are installed (see the module doc)."""
    check_choices(cfg, {"tasks": TASKS, "methods": SURGERY_METHODS, "crossarch.methods": CROSS_METHODS,
                        "extraction.sources": EXTRACTION_SOURCES})
    if any(b < 1 for b in cfg["extraction"]["budgets"]):
        raise ValueError(f"extraction.budgets must be positive query counts, got {cfg['extraction']['budgets']}")
    torch.manual_seed(seed)
    dtype = getattr(torch, cfg["data"]["dtype"])
    for task in cfg["tasks"]:
        try:
            ds, shape = load_task(task, cfg["data"], dtype, seed)
        except FileNotFoundError as exc:
            ctx.log(f"{task}: skipped, its data are not installed ({str(exc).splitlines()[0][:200]})")
            continue
        _run_task(task, ds, shape, cfg, seed, ctx)


def _run_task(task: str, ds: Dataset, shape: tuple[int, int], cfg: dict[str, Any], seed: int,
              ctx: SeedContext) -> None:
    X, y, Xte, yte = ds
    S, arch, flat = cfg["eval"]["samples"], cfg[task], shape[0] * shape[1]
    tc, sc, cc, xc = cfg["teacher"], cfg["student"], cfg["crossarch"], cfg["extraction"]
    budget, bs = sc["map_steps"] + sc["steps"], sc["batch_size"] or None
    ctx.log(f"{task}: {ds.description}")

    def ev(net, q, setting, method, t_probs, seconds, extra=None):
        record_evaluation(ctx, net, q, Xte, yte, setting, method, seconds, S, seed, t_probs, extra, task=task)

    # ---- CNN teacher
    cnn_kw = dict(image_shape=shape, **cfg["cnn"])
    teacher = CNN(channels=arch["teacher"]["channels"], dense=arch["teacher"]["dense"], **cnn_kw)
    (tq, th), dt = timed(fit_posterior, teacher, X, y, **vi_kwargs(tc, seed))
    tp_test, tp_train = (metrics.predict(teacher, tq, Z, num_samples=S, seed=seed) for Z in (Xte, X))
    ev(teacher, tq, f"{task} teacher", "cnn_teacher", None, dt)
    if th.map_weights is not None:  # the check every posterior owes: its predictive against its own MAP point
        record_evaluation(ctx, teacher, PointMass(th.map_weights), Xte, yte, f"{task} teacher", "cnn_teacher_map",
                          th.map_time_s, 1, seed, task=task)

    # ---- 1. channel removal
    student = CNN(channels=arch["student"]["channels"], dense=arch["student"]["dense"], **cnn_kw)
    plan = plan_cnn(teacher, student, selector=sc["selector"], posterior=tq, seed=seed)
    prior = apply(plan, teacher, tq)[1].to(dtype=X.dtype)
    setting, extra = f"{task} channel_removal", {"plan": [repr(op) for op in plan]}
    ctx.log(f"{task}: plan {extra['plan']}")
    protocol_cfg = {"student": sc, "eval": cfg["eval"],  # fit_method's tables; point fits at crossarch.lr
                    "distill": {"point_lr": cc["lr"], "kd_gamma": cc["gamma"], "kd_temperature": cc["temperature"]}}
    for m in cfg["methods"]:
        if m == "conditioned_prior":
            ev(student, prior, setting, m, tp_test, 0.0, extra)
            continue
        (q, _, _), dt = timed(fit_method, m, 1, teacher, tq, student, prior, ds, protocol_cfg, seed, None, 0, plan)
        ev(student, q, setting, m, tp_test, dt, extra | {"kl_to_prior": float(q.kl(prior))}
           if m == "teacher_prior" else None)

    # ---- 2. cross-architecture
    pairs = []
    if task == "digits" and cfg["transformer"]["enabled"]:
        trc = cfg["transformer"]
        tr = Transformer(input_dim=shape[1], n_classes=ds.num_classes, max_len=shape[0], embedding="patch",
                         d_model=trc["d_model"], heads=list(trc["heads"]), ffn=list(trc["ffn"]), d_head=trc["d_head"],
                         d_ff=trc["d_ff"], pooling=trc["pooling"])
        (trq, _), dt = timed(fit_posterior, tr, convert(X, "flat", "sequence", shape), y, **vi_kwargs(trc, seed))
        tr_test, tr_train = (teacher_predictive(tr, trq, Z, "flat", shape, num_samples=S, seed=seed) for Z in (Xte, X))
        record_evaluation(ctx, tr, trq, convert(Xte, "flat", "sequence", shape), yte, f"{task} teacher",
                          "transformer_teacher", dt, S, seed, task=task)
        pairs.append(("transformer->cnn", tr, trq, student, tr_test, tr_train))
    elif task != "digits":
        ctx.log(f"{task}: transformer -> cnn runs on digits only (8 rows of 8 pixels)")
    mlp = MLP([flat, *arch["mlp_hidden"], ds.num_classes], activation=cfg["cnn"]["activation"])
    pairs.append(("cnn->mlp", teacher, tq, mlp, tp_test, tp_train))
    for name, tnet, tqq, snet, t_test, t_train in pairs:
        for m, fitted, dt in crossarch_methods(tnet, tqq, snet, X, y, cc["methods"], t_train, shape, budget, cc["lr"],
                                               cc["gamma"], cc["temperature"], cc["laplace"], cc["rank"], seed, bs):
            ev(snet, fitted, f"{task} {name}", m, t_test, dt)

    # ---- 3. extraction from the CNN teacher's argmax
    oracle = teacher_oracle(teacher, tq, num_samples=xc["oracle_samples"], seed=seed)
    pool, pool_name = (sample_image_patches(xc["pool_size"], size=shape, seed=seed, dtype=X.dtype),
                       "photo patches (sklearn sample images)") if task == "digits" else \
        (digits_images(shape, dtype=X.dtype), "sklearn digits resized")
    pool = pool.reshape(-1, flat)
    ctx.log(f"{task}: extraction pool = {pool_name}, {pool.shape[0]} inputs")
    fit_x = {"steps": xc["steps"], "lr": xc["lr"], "seed": seed, "batch_size": xc["batch_size"] or None}
    for b in xc["budgets"]:
        setting = f"{task} extraction n={b}"
        for src in xc["sources"]:
            if src == "labels":
                idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))[:min(b, X.shape[0])]
                (w, _), dt = timed(deterministic, student, X[idx], y[idx], **fit_x)
                ev(student, w, setting, src, tp_test, dt, {"queries": len(idx)})
                continue
            source = GaussianQueries((flat,), X.dtype) if src == "gaussian" else PoolQueries(pool, pool_name)
            res, dt = timed(extract, oracle, student, source, b, strategy="entropy" if src == "active" else "random",
                            rounds=xc["rounds"], pool_factor=xc["pool_factor"], dtype=X.dtype, **fit_x)
            ev(student, res.weights, setting, src, tp_test, dt,
               {"queries": res.num_queries, "classes_seen": res.rounds[-1]["classes_seen"]})


register_kind("cnn", DEFAULTS, run_seed)
