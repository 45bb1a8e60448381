"""Experiment kind ``transformer``: remove heads, an attention sublayer or a block of a pre-LN transformer teacher
(low-rank posterior by MAP then SVI; digits read as 8 rows of 8 pixels, or the ``match`` task) by conditioning its
posterior along a surgery plan, then train the student by ``teacher_prior`` (VI under the conditioned posterior),
``standard_prior``, ``deterministic`` (MAP), ``kd``, ``tinybert`` (:func:`pyro_distill.baselines.tinybert`),
``teacher_prior(tau=evidence)`` (the prior's covariance times the ``tau`` the student's Laplace evidence chooses on
its training data) and ``reduced_posterior`` (SVI from the conditioned posterior under the student's own prior);
``conditioned_prior`` evaluates the prior itself, untrained. Every method gets ``map_steps + steps`` optimizer steps;
``student.fractions``: students on a seeded, stratified fraction of the training split. Old method names
(``vi_conditioned``, ...) are read through :data:`pyro_distill.naming.METHOD_ALIASES`. Figures and the summary
table: :mod:`pyro_distill.plots.transformer`.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import metrics
from ..baselines import deterministic, knowledge_distillation, standard_prior, tinybert, tinybert_targets
from ..data import specs
from ..distill import reduced_posterior
from ..gaussian import PointMass
from ..inference import fit_posterior
from ..naming import canonical_methods
from ..nets.transformer import Transformer
from ..surgery import apply
from ..surgery.transformer import plan_transformer, teacher_block_map
from .core import SeedContext, register_kind
from .protocol import (
    accuracy_curve,
    check_choices,
    check_teacher_prior_variance,
    check_teacher_temperature,
    evidence_prior,
    record_evaluation,
    subsamples,
    teacher_fit_prior,
    tempered_teacher,
)

__all__ = ["run_seed", "DEFAULTS", "METHODS"]

METHODS = ("conditioned_prior", "teacher_prior", "standard_prior", "deterministic", "kd", "tinybert",
           "teacher_prior(tau=evidence)", "reduced_posterior")
#: the order methods run in (each fit seeds itself; the order only orders the rows)
RUN_ORDER = ("conditioned_prior", "teacher_prior", "teacher_prior(tau=evidence)", "reduced_posterior",
             "standard_prior", "deterministic", "kd", "tinybert")
#: the teacher-derived methods (their rows carry the plan)
OURS = RUN_ORDER[:4]

DEFAULTS: dict[str, Any] = {
    "task": "digits",           # "digits" (8 rows x 8 pixels) or "match" (marked-token matching)
    "pad_fraction": 0.0,        # digits: fraction of images with hidden last rows (padding)
    "n_train": 2000,            # match task sizes
    "n_test": 2000,
    "net": {"d_model": 16, "heads": [4, 4], "ffn": [True, True], "d_head": 4, "d_ff": 32, "pooling": "mean"},
    # student name -> {"heads": [...], "ffn": [...]}
    "students": {},
    "selector": "evidence",
    "methods": list(METHODS[:6]),
    "guide": "lowrank",
    "rank": 10,
    "batch_size": 128,
    "num_particles": 4,
    # temperature: the fitted posterior's covariance times T (chosen beforehand on held-out training data)
    # guide: the teacher's posterior structure (None: the top-level guide; "kron": KFAC over the linear maps);
    # cov_init: the SVI start, "prior" (the prior shrunk around MAP, the published runs) or "laplace" (from curvature)
    "teacher": {"map_steps": 1000, "steps": 400, "lr": 5e-3, "map_lr": 1e-2, "temperature": 1.0, "guide": None,
                "cov_init": "prior", "prior_variance": 1.0},  # prior_variance: the fan-in prior's variance x this
    "student": {"map_steps": 600, "steps": 400, "lr": 5e-3, "map_lr": 1e-2, "fractions": [1.0]},
    "kd": {"gamma": 0.5, "temperature": 2.0},
    "tinybert": {"beta_hidden": 1.0, "beta_attn": 1.0},
    "eval_samples": 100,
    "curve_points": 5,
    "save_models": False,
    "idata_draws": 200,             # draws in each saved model's ArviZ idata.nc (0: none)
}


#: per task: its data set (:mod:`pyro_distill.data.specs`; its parameters, like ``pad_fraction`` or ``n_train``, read
#: from the config's top level) and the teacher's input wiring (``max_len``: the data's sequence length)
TASKS = {"digits": ("digits_sequences", {"input_dim": 8, "n_classes": 10, "embedding": "patch"}),
         "match": ("match", {"input_dim": 8, "n_classes": 2, "embedding": "token"})}


def _spec(cfg: dict[str, Any], seed: int, **more: Any) -> dict[str, Any]:
    """The task's data spec (the split seed is the experiment seed)."""
    check_choices(cfg, {"task": tuple(TASKS)})
    return specs.from_table(cfg, TASKS[cfg["task"]][0], split_seed=seed, **more)


def _data(cfg: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    """The task's data set and the teacher's input keywords (also read by ``benchmarks/teacher_quality.py``)."""
    d = specs.load(_spec(cfg, seed))
    return d, TASKS[cfg["task"]][1] | {"max_len": d.X.shape[1]}


def _fit_kw(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"guide": cfg["guide"], "rank": cfg["rank"], "batch_size": cfg["batch_size"],
            "num_particles": cfg["num_particles"], "cov_init": "prior", "elbo_eval_particles": 8}


def fit_teacher(cfg: dict[str, Any], seed: int, ctx: SeedContext | None = None,
                curve: Any = None, data: Any = None) -> tuple[Transformer, Any, Any, Any]:
    """The seed's teacher exactly as :func:`run_seed` fits it: ``(net, q, history, data)`` with ``q`` the fitted
    posterior times ``teacher.temperature`` and ``history.map_weights`` its MAP point (``data``: ``X, y, Xte,
    yte``). ``curve(net, Xte, yte)``: a fit callback factory (the runner's test-accuracy curve); ``ctx`` logs.
    ``data``: other splits of the seed's task (an object with ``X, y, Xte, yte``, e.g. a validation split carved
    from the training rows) fitted by the same code. ``benchmarks/teacher_calibration.py`` calls this to re-derive
    a published run's teachers."""
    check_teacher_temperature(cfg["teacher"])
    check_teacher_prior_variance(cfg["teacher"])
    torch.manual_seed(seed)
    d, shape = _data(cfg, seed)
    if data is not None:
        if tuple(data.X.shape[1:]) != tuple(d.X.shape[1:]):
            raise ValueError(f"data rows have shape {tuple(data.X.shape[1:])}, the task's {tuple(d.X.shape[1:])}: "
                             "pass splits of the seed's own task")
        d = data
    teacher = Transformer(**shape, **dict(cfg["net"]))
    tc, npts = cfg["teacher"], max(1, cfg["curve_points"])
    teacher_kw = _fit_kw(cfg) | {"guide": tc["guide"] or cfg["guide"], "cov_init": tc["cov_init"]}
    q_t, hist = fit_posterior(teacher, d.X, d.y, prior=teacher_fit_prior(teacher, tc, d.X.dtype, ctx),
                              steps=tc["steps"], lr=tc["lr"], map_steps=tc["map_steps"], map_lr=tc["map_lr"],
                              seed=seed, callback=None if curve is None else curve(teacher, d.Xte, d.yte),
                              eval_every=max(1, (tc["map_steps"] + tc["steps"]) // npts), **teacher_kw)
    return teacher, tempered_teacher(q_t, tc, ctx), hist, d


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    """One seed: the teacher, then per student x fraction every method of ``cfg["methods"]`` (module doc)."""
    methods = canonical_methods(cfg["methods"])
    check_choices({"methods": methods}, {"methods": METHODS})
    fit_kw = _fit_kw(cfg)
    S = cfg["eval_samples"]
    # ---- teacher (its rows and the students' carry no time_s: the teacher's fit_s is its MAP + SVI time)
    teacher, q_t, hist, d = fit_teacher(cfg, seed, ctx, curve=lambda net, Z, t: accuracy_curve(ctx, net, Z, t,
                                                                                               "teacher", "vi"))
    X, y, Xte, yte = d.X, d.y, d.Xte, d.yte
    tp_test, tp_train = (metrics.predict(teacher, q_t, Z, num_samples=S, seed=seed) for Z in (Xte, X))
    ctx.log(f"teacher {teacher!r}")
    record_evaluation(ctx, teacher, q_t, Xte, yte, "teacher", "vi", None, S, seed,
                      extra={"fit_s": hist.map_time_s + hist.svi_time_s})
    if hist.map_weights is not None:  # the check every posterior owes: its predictive against its own MAP point
        record_evaluation(ctx, teacher, PointMass(hist.map_weights), Xte, yte, "teacher", "teacher_map", None, 1, seed,
                          extra={"fit_s": hist.map_time_s})
    if cfg["save_models"]:
        ctx.save_model("transformer-teacher", teacher, q_t, {"task": cfg["task"], "data": _spec(cfg, seed)},
                       data=(X, y), idata_draws=cfg["idata_draws"])
    tfeat = tinybert_targets(teacher, q_t.mean, X)

    for name, arch in cfg["students"].items():
        student = teacher.replace(heads=list(arch["heads"]), ffn=list(arch.get("ffn", [True] * len(arch["heads"]))))
        plan = plan_transformer(teacher, student, selector=cfg["selector"], posterior=q_t, seed=seed)
        ctx.log(f"{name}: {plan}".replace("\n", " "))
        prior = apply(plan, teacher, q_t)[1].to(dtype=X.dtype)
        plan_col = {"plan": [repr(op) for op in plan]}
        # the students' data: a seeded stratified fraction (1: all)
        for frac, idx, Xs, ys, sname in subsamples(X, y, cfg["student"]["fractions"], seed, name,
                                                   "stratified_permutation"):
            tp = tp_train if idx is None else tp_train[idx]
            tf = tfeat if idx is None else {k: [None if v is None else v[idx] for v in vs] for k, vs in tfeat.items()}
            for method in sorted(methods, key=RUN_ORDER.index):
                q, more = _fit(method, cfg, seed, teacher, q_t, student, plan, prior, Xs, ys, tp, tf, fit_kw,
                               accuracy_curve(ctx, student, Xte, yte, sname, method))
                record_evaluation(ctx, student, q, Xte, yte, sname, method, None, S, seed, tp_test,
                                  (plan_col if method in OURS else {}) | {"fraction": frac, "n_train": len(Xs)} | more)
                if cfg["save_models"] and method == "teacher_prior":
                    spec = _spec(cfg, seed, fraction=frac, subsample_seed=seed, subsample="stratified_permutation")
                    ctx.save_model(f"transformer-{sname.replace(' ', '-')}", student, q,
                                   {"plan": plan.to_dict(), "data": spec},
                                   data=(Xs, ys), prior=prior, idata_draws=cfg["idata_draws"])


def _fit(method: str, cfg: dict[str, Any], seed: int, teacher: Transformer, q_t: Any, student: Transformer, plan: Any,
         prior: Any, X: torch.Tensor, y: torch.Tensor, tp: torch.Tensor, tf: dict[str, Any], fit_kw: dict[str, Any],
         cb: Any) -> tuple[Any, dict[str, Any]]:
    """One method on the student's data ``(X, y)`` (``tp``, ``tf``: the teacher's predictive and TinyBERT targets
    on those rows): the fitted Gaussian or weights and the row's extra columns. Budget: ``map_steps + steps``."""
    sc, B = cfg["student"], cfg["batch_size"]
    budget = sc["map_steps"] + sc["steps"]
    every = max(1, budget // max(1, cfg["curve_points"]))
    vi = {"steps": sc["steps"], "lr": sc["lr"], "map_steps": sc["map_steps"], "map_lr": sc["map_lr"], "seed": seed,
          "callback": cb, "eval_every": every} | fit_kw
    point = {"steps": budget, "lr": sc["map_lr"], "seed": seed, "batch_size": B, "callback": cb, "eval_every": every}
    if method == "conditioned_prior":
        return prior.loc, {}
    if method == "teacher_prior":
        q, _ = fit_posterior(student, X, y, prior=prior, init="prior", **vi)
        return q, {"kl_to_prior": float(q.kl(prior))}
    if method == "teacher_prior(tau=evidence)":  # tau chosen by the student's evidence on its own data
        pt, cols = evidence_prior(student, prior, X, y, ("structure",), map_steps=sc["map_steps"], map_lr=sc["map_lr"],
                                  seed=seed, batch_size=B)
        q, _ = fit_posterior(student, X, y, prior=pt, init="prior", **vi)
        return q, {"kl_to_prior": float(q.kl(pt))} | cols
    if method == "reduced_posterior":  # the conditioned posterior as the start, the student's own fan-in prior
        red = reduced_posterior(teacher, q_t, student, X, y, ops=plan, guide=cfg["guide"], steps=budget, lr=sc["lr"],
                                seed=seed, callback=cb, eval_every=every,
                                **{k: v for k, v in fit_kw.items() if k not in ("guide", "cov_init")})
        return red.posterior, {"log_evidence_change": red.info["log_evidence_change"]}
    if method == "standard_prior":
        return standard_prior(student, X, y, **vi)[0], {}
    if method == "deterministic":
        return deterministic(student, X, y, **point)[0], {}
    if method == "kd":
        return knowledge_distillation(student, X, y, tp, gamma=cfg["kd"]["gamma"],
                                      temperature=cfg["kd"]["temperature"], **point)[0], {}
    return tinybert(student, X, y, tf, teacher_block_map(plan), beta_hidden=cfg["tinybert"]["beta_hidden"],
                    beta_attn=cfg["tinybert"]["beta_attn"], **point)[0], {}

register_kind("transformer", DEFAULTS, run_seed)
