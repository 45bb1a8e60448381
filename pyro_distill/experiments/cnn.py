"""Experiment kind ``cnn``: a CNN family, cross-architecture distillation and extraction from an argmax teacher.

Per seed and per task (``digits``: 8x8; ``fashion_mnist``: 28x28, skipped with a logged note when its IDX files
are absent), inputs kept flat ``[N, H W]`` (every family reads them through :func:`pyro_distill.crossarch.convert`):

1. **channel removal** -- a CNN teacher (Gaussian posterior by MAP, Laplace, SVI); the narrower CNN student by
   ``teacher_prior`` (VI under the teacher posterior conditioned by :func:`~pyro_distill.surgery.cnn.plan_cnn`),
   ``standard_prior`` (VI under the fan-in prior), ``kd`` (Hinton KD, point) and ``prune_finetune``;
   ``conditioned_prior`` evaluates the conditioned prior untrained;
2. **transformer -> cnn** (digits only: the transformer reads the image as 8 rows of 8 pixels) and
   **cnn -> mlp**: ``kd`` (:func:`~pyro_distill.crossarch.crossarch_kd`), ``kd_laplace`` (the Bayesian variant,
   :func:`~pyro_distill.crossarch.kd_laplace`), and ``labels`` (the same student by MAP on the labels alone);
3. **extraction** at each query budget: the CNN student fitted to the CNN teacher's top-1 answers on
   ``gaussian`` queries, ``other`` (a shipped data set of other images: photo patches for digits, digits resized
   to 28x28 for Fashion-MNIST), ``active`` (max-entropy rounds over that pool), against ``labels`` (the same
   student by MAP on ``budget`` true training labels).

Every row: accuracy, nll, ece, brier, agreement (with that setting's teacher on the test inputs), params,
time_s. The test split is only for reporting. No mathematics here: methods live in :mod:`pyro_distill.crossarch`,
:mod:`pyro_distill.extraction`, :mod:`pyro_distill.baselines`, :mod:`pyro_distill.inference`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import metrics
from ..baselines import deterministic, knowledge_distillation, prune_finetune, standard_prior
from ..crossarch import convert, crossarch_kd, kd_laplace, teacher_predictive
from ..data import Dataset, specs
from ..extraction import GaussianQueries, PoolQueries, digits_images, extract, sample_image_patches, teacher_oracle
from ..inference import fit_posterior
from ..nets.cnn import CNN
from ..nets.mlp import MLP
from ..nets.transformer import Transformer
from ..surgery import apply
from ..surgery.cnn import plan_cnn
from .core import SeedContext, register_kind

__all__ = ["DEFAULTS", "run_seed", "load_task", "SURGERY_METHODS", "CROSS_METHODS", "EXTRACTION_SOURCES"]

TASKS = ("digits", "fashion_mnist")
SURGERY_METHODS = ("conditioned_prior", "teacher_prior", "standard_prior", "kd", "prune_finetune")
CROSS_METHODS = ("kd", "kd_laplace", "labels")
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
    """The task's data set (inputs flat ``[N, H W]``, standardized per pixel) and its image shape."""
    common = {"split_seed": d["split_seed"], "dtype": dtype}
    if task == "digits":
        return specs.load({"name": "digits", "test_size": d["test_size"]} | common), (8, 8)
    if task == "fashion_mnist":
        return specs.load({"name": "fashion_mnist", "dir": d["fashion_dir"], "pca": 0,
                           "max_train": d["fashion_max_train"], "max_test": d["fashion_max_test"]} | common), (28, 28)
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")


def _check(cfg: dict[str, Any]) -> None:
    for key, allowed in (("tasks", TASKS), ("methods", SURGERY_METHODS)):
        bad = [m for m in cfg[key] if m not in allowed]
        if bad:
            raise ValueError(f"unknown {key} {bad}; choose from {list(allowed)}")
    for key, allowed in ((("crossarch", "methods"), CROSS_METHODS), (("extraction", "sources"), EXTRACTION_SOURCES)):
        bad = [m for m in cfg[key[0]][key[1]] if m not in allowed]
        if bad:
            raise ValueError(f"unknown {'.'.join(key)} {bad}; choose from {list(allowed)}")
    if any(b < 1 for b in cfg["extraction"]["budgets"]):
        raise ValueError(f"extraction.budgets must be positive query counts, got {cfg['extraction']['budgets']}")


def _vi(fc: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"guide": fc["guide"], "rank": fc["rank"], "steps": fc["steps"], "map_steps": fc["map_steps"],
            "lr": fc["lr"], "map_lr": fc["map_lr"], "num_particles": fc["num_particles"],
            "batch_size": fc["batch_size"] or None, "seed": seed, "elbo_eval_particles": fc["elbo_eval_particles"]}


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    _check(cfg)
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
    dtype, flat = X.dtype, shape[0] * shape[1]
    S = cfg["eval"]["samples"]
    tc, sc, cc, xc = cfg["teacher"], cfg["student"], cfg["crossarch"], cfg["extraction"]
    arch = cfg[task]
    budget = sc["map_steps"] + sc["steps"]
    bs = sc["batch_size"] or None
    ctx.log(f"{task}: {ds.description}")

    def ev(net, q, setting, method, t_probs, seconds, extra=None):
        r = metrics.evaluate(net, q, Xte, yte, num_samples=S, seed=seed, teacher_probs=t_probs)
        ctx.record({"setting": setting, "method": method, "task": task, "time_s": seconds} | r | (extra or {}))
        ctx.log(f"{setting:>28s} {method:>18s}: acc {r['accuracy']:.3f} nll {r['nll']:.3f} "
                f"agree {r.get('agreement', float('nan')):.3f}"
                + (f" | linearized acc {r['accuracy_lin']:.3f} nll {r['nll_lin']:.3f}" if "nll_lin" in r else "")
                + f" p={r['params']} ({seconds:.0f}s)")

    def timed(fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        return out, time.perf_counter() - t0

    # ---- CNN teacher
    cnn_kw = dict(image_shape=shape, **cfg["cnn"])
    teacher = CNN(channels=arch["teacher"]["channels"], dense=arch["teacher"]["dense"], **cnn_kw)
    (tq, _), dt = timed(fit_posterior, teacher, X, y, **_vi(tc, seed))
    tp_test = metrics.predict(teacher, tq, Xte, num_samples=S, seed=seed)
    tp_train = metrics.predict(teacher, tq, X, num_samples=S, seed=seed)
    ev(teacher, tq, f"{task} teacher", "cnn_teacher", None, dt)

    # ---- 1. channel removal
    student = CNN(channels=arch["student"]["channels"], dense=arch["student"]["dense"], **cnn_kw)
    plan = plan_cnn(teacher, student, selector=sc["selector"], posterior=tq, seed=seed)
    _, prior = apply(plan, teacher, tq)
    prior = prior.to(dtype=X.dtype)
    setting = f"{task} channel_removal"
    extra = {"plan": [repr(op) for op in plan]}
    ctx.log(f"{task}: plan {extra['plan']}")
    for m in cfg["methods"]:
        if m == "conditioned_prior":
            ev(student, prior, setting, m, tp_test, 0.0, extra)
        elif m == "teacher_prior":
            (q, _), dt = timed(fit_posterior, student, X, y, prior=prior, init="prior", **_vi(sc, seed))
            ev(student, q, setting, m, tp_test, dt, extra | {"kl_to_prior": float(q.kl(prior))})
        elif m == "standard_prior":
            (q, _), dt = timed(standard_prior, student, X, y, **_vi(sc, seed))
            ev(student, q, setting, m, tp_test, dt)
        elif m == "kd":
            (w, _), dt = timed(knowledge_distillation, student, X, y, tp_train, gamma=cc["gamma"],
                               temperature=cc["temperature"], steps=budget, lr=cc["lr"], seed=seed, batch_size=bs)
            ev(student, w, setting, m, tp_test, dt)
        elif m == "prune_finetune":
            (w, _), dt = timed(prune_finetune, teacher, tq.mean, student, X, y, steps=budget, lr=cc["lr"],
                               seed=seed, batch_size=bs)
            ev(student, w, setting, m, tp_test, dt)

    # ---- 2. cross-architecture
    pairs = []
    if task == "digits" and cfg["transformer"]["enabled"]:
        trc = cfg["transformer"]
        tr = Transformer(input_dim=shape[1], n_classes=ds.num_classes, max_len=shape[0], embedding="patch",
                         d_model=trc["d_model"], heads=list(trc["heads"]), ffn=list(trc["ffn"]), d_head=trc["d_head"],
                         d_ff=trc["d_ff"], pooling=trc["pooling"])
        Xseq = convert(X, "flat", "sequence", shape)
        (trq, _), dt = timed(fit_posterior, tr, Xseq, y, **_vi(trc, seed))
        trp_test = teacher_predictive(tr, trq, Xte, "flat", shape, num_samples=S, seed=seed)
        r = metrics.evaluate(tr, trq, convert(Xte, "flat", "sequence", shape), yte, num_samples=S, seed=seed)
        ctx.record({"setting": f"{task} teacher", "method": "transformer_teacher", "task": task, "time_s": dt} | r)
        ctx.log(f"{task}: transformer teacher acc {r['accuracy']:.3f} nll {r['nll']:.3f} p={r['params']}")
        pairs.append(("transformer->cnn", tr, trq, student, trp_test))
    elif task != "digits":
        ctx.log(f"{task}: transformer -> cnn runs on digits only (8 rows of 8 pixels)")
    mlp = MLP([shape[0] * shape[1], *arch["mlp_hidden"], ds.num_classes], activation=cfg["cnn"]["activation"])
    pairs.append(("cnn->mlp", teacher, tq, mlp, tp_test))
    for name, tnet, tqq, snet, t_test in pairs:
        setting = f"{task} {name}"
        t_train = tp_train if tnet is teacher else teacher_predictive(tnet, tqq, X, "flat", shape, num_samples=S,
                                                                        seed=seed)
        kd_kw = {"gamma": cc["gamma"], "temperature": cc["temperature"], "image_shape": shape, "fmt": "flat",
                 "teacher_probs": t_train, "steps": budget, "lr": cc["lr"], "seed": seed, "batch_size": bs}
        w_kd = None
        for m in cc["methods"]:
            if m == "kd" or (m == "kd_laplace" and w_kd is None):
                (w_kd, _), dt_kd = timed(crossarch_kd, tnet, tqq, snet, X, y, **kd_kw)
                if m == "kd":
                    ev(snet, w_kd, setting, m, t_test, dt_kd)
            if m == "kd_laplace":
                (q, _), dt = timed(kd_laplace, tnet, tqq, snet, X, y, kind=cc["laplace"], rank=cc["rank"], w_kd=w_kd,
                                   **{k: v for k, v in kd_kw.items() if k not in ("steps", "lr", "batch_size")})
                ev(snet, q, setting, m, t_test, dt + dt_kd)
            elif m == "labels":
                (w, _), dt = timed(deterministic, snet, X, y, steps=budget, lr=cc["lr"], seed=seed, batch_size=bs)
                ev(snet, w, setting, m, t_test, dt)

    # ---- 3. extraction from the CNN teacher's argmax
    oracle = teacher_oracle(teacher, tq, num_samples=xc["oracle_samples"], seed=seed)
    if task == "digits":
        pool = sample_image_patches(xc["pool_size"], size=shape, seed=seed, dtype=dtype).reshape(-1, flat)
        pool_name = "photo patches (sklearn sample images)"
    else:
        pool = digits_images(shape, dtype=dtype).reshape(-1, flat)
        pool_name = "sklearn digits resized"
    ctx.log(f"{task}: extraction pool = {pool_name}, {pool.shape[0]} inputs")
    for b in xc["budgets"]:
        setting = f"{task} extraction n={b}"
        for src in xc["sources"]:
            if src == "labels":
                n = min(b, X.shape[0])
                idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
                (w, _), dt = timed(deterministic, student, X[idx], y[idx], steps=xc["steps"], lr=xc["lr"], seed=seed,
                                   batch_size=xc["batch_size"] or None)
                ev(student, w, setting, src, tp_test, dt, {"queries": n})
                continue
            source = GaussianQueries((flat,), dtype) if src == "gaussian" else \
                PoolQueries(pool, pool_name)
            (res, dt) = timed(extract, oracle, student, source, b, strategy="entropy" if src == "active" else "random",
                              rounds=xc["rounds"], pool_factor=xc["pool_factor"], steps=xc["steps"], lr=xc["lr"],
                              seed=seed, batch_size=xc["batch_size"] or None, dtype=dtype)
            ev(student, res.weights, setting, src, tp_test, dt,
               {"queries": res.num_queries, "classes_seen": res.rounds[-1]["classes_seen"]})


register_kind("cnn", DEFAULTS, run_seed)
