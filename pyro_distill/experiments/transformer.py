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
from ..data.subsets import stratified_indices
from ..distill import evidence_temperature, reduced_posterior
from ..inference import fit_posterior
from ..naming import canonical_methods
from ..nets.transformer import Transformer
from ..surgery import apply
from ..surgery.transformer import RemoveBlock, plan_transformer
from .core import SeedContext, register_kind

__all__ = ["run_seed", "DEFAULTS", "METHODS"]

METHODS = ("conditioned_prior", "teacher_prior", "standard_prior", "deterministic", "kd", "tinybert",
           "teacher_prior(tau=evidence)", "reduced_posterior")
#: the order methods run in (each fit seeds itself; the order only orders the rows)
RUN_ORDER = ("conditioned_prior", "teacher_prior", "teacher_prior(tau=evidence)", "reduced_posterior",
             "standard_prior", "deterministic", "kd", "tinybert")

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
    "teacher": {"map_steps": 1000, "steps": 400, "lr": 5e-3, "map_lr": 1e-2},
    "student": {"map_steps": 600, "steps": 400, "lr": 5e-3, "map_lr": 1e-2, "fractions": [1.0]},
    "kd": {"gamma": 0.5, "temperature": 2.0},
    "tinybert": {"beta_hidden": 1.0, "beta_attn": 1.0},
    "eval_samples": 100,
    "curve_points": 5,
    "save_models": False,
    "idata_draws": 200,             # draws in each saved model's ArviZ idata.nc (0: none)
}


def _spec(cfg: dict[str, Any], seed: int, **more: Any) -> dict[str, Any]:
    """The task's data spec (:mod:`pyro_distill.data.specs`; the split seed is the experiment seed)."""
    if cfg["task"] == "digits":
        return specs.complete({"name": "digits_sequences", "split_seed": seed, "pad_fraction": cfg["pad_fraction"]}
                              | more)
    if cfg["task"] == "match":
        return specs.complete({"name": "match", "n_train": cfg["n_train"], "n_test": cfg["n_test"], "split_seed": seed}
                              | more)
    raise ValueError(f"unknown task {cfg['task']!r}; use 'digits' or 'match'")


def _data(cfg: dict[str, Any], seed: int):
    d = specs.load(_spec(cfg, seed))
    if cfg["task"] == "digits":
        return d, {"input_dim": 8, "n_classes": 10, "max_len": 8, "embedding": "patch"}
    return d, {"input_dim": 8, "n_classes": 2, "max_len": d.X.shape[1], "embedding": "token"}


def _teacher_block_map(plan) -> list[int]:
    """Which teacher block each student block came from (block removals renumber the later ones)."""
    blocks = list(range(len(plan.teacher["heads"])))
    for op in plan:
        if isinstance(op, RemoveBlock):
            blocks.pop(op.block)
    return blocks


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    """One seed: the teacher, then per student x fraction every method of ``cfg["methods"]`` (module doc)."""
    methods = canonical_methods(cfg["methods"])
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    torch.manual_seed(seed)
    d, shape = _data(cfg, seed)
    X, y, Xte, yte = d.X, d.y, d.Xte, d.yte
    teacher = Transformer(**shape, **dict(cfg["net"]))
    fit_kw = {"guide": cfg["guide"], "rank": cfg["rank"], "batch_size": cfg["batch_size"],
              "num_particles": cfg["num_particles"], "cov_init": "prior", "elbo_eval_particles": 8}
    S, npts, B = cfg["eval_samples"], max(1, cfg["curve_points"]), cfg["batch_size"]

    def ev(net, q, setting, method, extra=None):
        r = metrics.evaluate(net, q, Xte, yte, num_samples=S, seed=seed, teacher_probs=tp_test)
        ctx.record({"setting": setting, "method": method} | r | (extra or {}))
        ctx.log(f"{setting:>12s} {method:>18s}: acc {r['accuracy']:.3f} nll {r['nll']:.3f} p={r['params']}")

    def curve_cb(net, setting, method):
        def cb(step, q):
            w = q.mean  # every fit hands its callback a Gaussian (a PointMass for the point fits)
            acc = metrics.accuracy(metrics.predict(net, w, Xte), yte)
            ctx.curve(setting, method, step, "test_accuracy_at_mean", acc)
        return cb

    # ---- teacher
    tc = cfg["teacher"]
    q_t, hist = fit_posterior(teacher, X, y, prior=None, steps=tc["steps"], lr=tc["lr"], map_steps=tc["map_steps"],
                              map_lr=tc["map_lr"], seed=seed, callback=curve_cb(teacher, "teacher", "vi"),
                              eval_every=max(1, (tc["map_steps"] + tc["steps"]) // npts), **fit_kw)
    tp_test = metrics.predict(teacher, q_t, Xte, num_samples=S, seed=seed)
    tp_train = metrics.predict(teacher, q_t, X, num_samples=S, seed=seed)
    r = metrics.evaluate(teacher, q_t, Xte, yte, num_samples=S, seed=seed)
    ctx.record({"setting": "teacher", "method": "vi"} | r | {"fit_s": hist.map_time_s + hist.svi_time_s})
    ctx.log(f"teacher {teacher!r}: acc {r['accuracy']:.3f} nll {r['nll']:.3f}")
    if cfg["save_models"]:
        ctx.save_model("transformer-teacher", teacher, q_t, {"task": cfg["task"], "data": _spec(cfg, seed)},
                       data=(X, y), idata_draws=cfg["idata_draws"])
    tfeat = tinybert_targets(teacher, q_t.mean, X)

    sc = cfg["student"]
    budget = sc["map_steps"] + sc["steps"]
    every = max(1, budget // npts)
    vi = {"steps": sc["steps"], "lr": sc["lr"], "map_steps": sc["map_steps"], "map_lr": sc["map_lr"], "seed": seed,
          "eval_every": every}
    point = {"steps": budget, "lr": sc["map_lr"], "seed": seed, "batch_size": B, "eval_every": every}
    for name, arch in cfg["students"].items():
        student = teacher.replace(heads=list(arch["heads"]), ffn=list(arch.get("ffn", [True] * len(arch["heads"]))))
        plan = plan_transformer(teacher, student, selector=cfg["selector"], posterior=q_t, seed=seed)
        ctx.log(f"{name}: {plan}".replace("\n", " "))
        prior = apply(plan, teacher, q_t)[1].to(dtype=X.dtype)
        for frac in sc["fractions"]:
            # the students' training data: a seeded stratified fraction of the teacher's (1: the same data)
            idx = stratified_indices(y, frac, seed)
            Xs, ys = (X, y) if idx is None else (X[idx], y[idx])
            sname = name if frac == 1 else f"{name} frac={frac:g}"
            fx = {"fraction": float(frac), "n_train": len(Xs)}
            extra = {"plan": [repr(op) for op in plan]} | fx
            for method in sorted(methods, key=RUN_ORDER.index):
                cb = curve_cb(student, sname, method)
                if method == "conditioned_prior":
                    ev(student, prior.loc, sname, method, extra)
                elif method in ("teacher_prior", "teacher_prior(tau=evidence)"):
                    pt, info = prior, {}
                    if method != "teacher_prior":  # tau chosen by the student's evidence on (Xs, ys)
                        tau, e = evidence_temperature(student, prior, Xs, ys, map_steps=sc["map_steps"],
                                                      map_lr=sc["map_lr"], seed=seed, batch_size=B)
                        pt = prior.tempered(tau) if tau != 1 else prior
                        info = {"tau_chosen": tau, "log_evidence": e["log_evidence"],
                                "log_evidence_tau1": e["log_evidence_tau1"], "tau_at_bound": int(e["at_bound"]),
                                "evidence_structure": e["structure"]}
                    q, _ = fit_posterior(student, Xs, ys, prior=pt, init="prior", callback=cb, **vi, **fit_kw)
                    ev(student, q, sname, method, extra | {"kl_to_prior": float(q.kl(pt))} | info)
                    if cfg["save_models"] and method == "teacher_prior":
                        spec = _spec(cfg, seed, fraction=float(frac), subsample_seed=seed,
                                     subsample="stratified_permutation")
                        ctx.save_model(f"transformer-{sname.replace(' ', '-')}", student, q,
                                       {"plan": plan.to_dict(), "data": spec},
                                       data=(Xs, ys), prior=prior, idata_draws=cfg["idata_draws"])
                elif method == "reduced_posterior":  # conditioned posterior as the start, own fan-in prior
                    red = reduced_posterior(teacher, q_t, student, Xs, ys, ops=plan, guide=cfg["guide"],
                                            steps=budget, lr=sc["lr"], seed=seed, callback=cb, eval_every=every,
                                            **{k: v for k, v in fit_kw.items() if k not in ("guide", "cov_init")})
                    ev(student, red.posterior, sname, method,
                       extra | {"log_evidence_change": red.info["log_evidence_change"]})
                elif method == "standard_prior":
                    ev(student, standard_prior(student, Xs, ys, callback=cb, **vi, **fit_kw)[0], sname, method, fx)
                elif method == "deterministic":
                    ev(student, deterministic(student, Xs, ys, callback=cb, **point)[0], sname, method, fx)
                elif method == "kd":
                    w, _ = knowledge_distillation(student, Xs, ys, tp_train if idx is None else tp_train[idx],
                                                  gamma=cfg["kd"]["gamma"], temperature=cfg["kd"]["temperature"],
                                                  callback=cb, **point)
                    ev(student, w, sname, method, fx)
                else:  # tinybert
                    tf = tfeat if idx is None else {k: [None if v is None else v[idx] for v in vs]
                                                    for k, vs in tfeat.items()}
                    w, _ = tinybert(student, Xs, ys, tf, _teacher_block_map(plan), callback=cb,
                                    beta_hidden=cfg["tinybert"]["beta_hidden"], beta_attn=cfg["tinybert"]["beta_attn"],
                                    **point)
                    ev(student, w, sname, method, fx)


register_kind("transformer", DEFAULTS, run_seed)
