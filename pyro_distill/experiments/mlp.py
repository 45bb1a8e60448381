"""Experiment kind ``mlp``: MLP teacher -> students under the teacher-derived prior vs the baselines.

One seed: fit the teacher (``fit_posterior``) on the full training split; for every student
architecture make one plan from the teacher's posterior; for every training fraction (a stratified
subsample of the training split, seeded by the seed) fit the student under the teacher-derived prior
at every temperature ``tau`` (numbers >= 1, or ``"evidence"``: chosen per seed and fraction by the student's
Laplace evidence on its own training data, :func:`~pyro_distill.distill.evidence_temperature`, recorded as
``tau_chosen``), by ``reduced_posterior`` (Bayesian model reduction: the conditioned teacher posterior as the SVI
start under the student's own fan-in prior, ``map_steps + steps`` SVI steps, no MAP; its Savage-Dickey log
evidence change recorded as ``log_evidence_change``), by ``divided_prior`` (optional, issue 13: the student's own
data divided out of the conditioned teacher posterior, precision clipped to stay positive definite; not in the
default method list) and every baseline, with the same budget of optimizer steps
(``map_steps + steps``), and evaluate all on the test split. Fraction 1 is the paper's setting
(teacher and student on the same data). The test split is only used for reporting, never for choices.

``data.validation = f`` (0 < f < 1) carves a seeded (``data.validation_seed``), stratified fraction ``f`` out of the
training split before anything is fitted; teacher and students train on the rest and every metric is computed on
that validation part (rows carry ``eval_split = "validation"``); the test split is not touched. This is how
methods are chosen (experiments/README.md, the protocol).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import baselines, metrics
from ..data import digits, subsample, synthetic_classification, synthetic_regression
from ..data.tabular import Dataset
from ..distill import divided_prior, evidence_temperature, reduced_posterior, student_prior
from ..inference import fit_posterior
from ..nets.mlp import MLP
from .core import SeedContext, register_kind

__all__ = ["DEFAULTS", "run_seed", "load_data"]

VI_METHODS = ("teacher_prior", "reduced_posterior", "divided_prior", "standard_prior", "standard_prior_cond_init")
ALL_METHODS = ("teacher_prior", "reduced_posterior") + baselines.METHODS + ("divided_prior",)
#: the Bayesian distillation methods: run for every student and fraction (the baselines only where asked)
OURS = ("teacher_prior", "reduced_posterior", "divided_prior")

DEFAULTS: dict[str, Any] = {
    "data": {
        "name": "digits",           # digits | synthetic_regression | synthetic_classification | fashion_mnist
        "test_size": 0.2,           # digits
        "split_seed": 0,            # the train/test split (and synthetic generator) seed, fixed across seeds
        "n_train": 1000, "n_test": 2000, "n_features": 20, "n_classes": 3, "noise": 0.5,   # synthetic
        "dir": "", "pca": 50, "max_train": 0,                                               # fashion_mnist
        "dtype": "float32",
        "validation": 0.0,          # > 0: carve this stratified fraction out of the training split, report on it
        "validation_seed": 0,
    },
    "teacher": {
        "sizes": [64, 32, 32, 10], "activation": "relu", "guide": "mvn", "steps": 300, "map_steps": 1000,
        "lr": 1e-3, "map_lr": 1e-2, "num_particles": 8, "rank": 20, "batch_size": 0, "noise_scale": 0.5,
    },
    "students": {},                 # name -> sizes, e.g. both = [64, 16, 10]
    "student": {
        "guide": "mvn", "steps": 200, "map_steps": 400, "lr": 1e-3, "map_lr": 1e-2, "num_particles": 8,
        "rank": 20, "batch_size": 0, "selector": "snr",
    },
    "distill": {
        "taus": [1.0, 10.0, 100.0],
        "fractions": [0.05, 0.1, 0.25, 1.0],
        "methods": list(ALL_METHODS[:-1]),
        "baseline_students": [],     # students that get the baselines (empty: all)
        "baseline_fractions": [],    # fractions at which the baselines run (empty: all)
        "student_fractions": {},     # student name -> its fractions (default: all of distill.fractions)
        "kd_gamma": 0.5, "kd_temperature": 2.0, "point_lr": 1e-2,
    },
    "eval": {"samples": 200, "curve_every": 50, "curve_samples": 16, "curve_fractions": []},
    # which fitted Gaussians go to models/, each with its ArviZ idata.nc (idata_draws draws on its own
    # training data; 0: none, `pyro-distill diagnose` writes it later)
    "save": {"methods": ["teacher"], "fractions": [], "idata_draws": 1000},
}


def load_data(d: dict[str, Any], dtype: torch.dtype):
    """The dataset a config's ``[data]`` table names (generators: :mod:`pyro_distill.data.tabular`)."""
    name = d["name"]
    if name == "digits":
        return digits(test_size=d["test_size"], seed=d["split_seed"], dtype=dtype)
    if name == "synthetic_regression":
        return synthetic_regression(n_train=d["n_train"], n_test=d["n_test"], n_features=d["n_features"],
                                    noise=d["noise"], seed=d["split_seed"], dtype=dtype)
    if name == "synthetic_classification":
        return synthetic_classification(n_train=d["n_train"], n_test=d["n_test"], n_features=d["n_features"],
                                        n_classes=d["n_classes"], seed=d["split_seed"], dtype=dtype)
    if name == "fashion_mnist":
        from ..data.idx import fashion_mnist

        return fashion_mnist(d["dir"] or None, pca=d["pca"], max_train=d["max_train"], seed=d["split_seed"],
                             dtype=dtype)
    raise ValueError(f"unknown data.name {name!r}; choose digits, synthetic_regression, synthetic_classification "
                     "or fashion_mnist")


def _check(cfg: dict[str, Any]) -> None:
    if not cfg["students"]:
        raise ValueError("the config has no [students] table: add e.g. students = { both = [64, 16, 10] }")
    for name, sizes in cfg["students"].items():
        if not isinstance(sizes, list) or not all(isinstance(s, int) for s in sizes):
            raise ValueError(f"students.{name} must be a list of layer widths, got {sizes!r}")
    bad = [m for m in cfg["distill"]["methods"] if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad} in distill.methods; choose from {list(ALL_METHODS)}")
    if any(t != "evidence" and (isinstance(t, str) or not t >= 1) for t in cfg["distill"]["taus"]):
        raise ValueError(f"distill.taus must be numbers >= 1 or \"evidence\", got {cfg['distill']['taus']}")
    v = cfg["data"]["validation"]
    if not (isinstance(v, (int, float)) and 0 <= v < 1):
        raise ValueError(f"data.validation must be a fraction in [0, 1) (0: no validation split), got {v!r}")
    if any(not 0 < f <= 1 for f in cfg["distill"]["fractions"]):
        raise ValueError(f"distill.fractions must lie in (0, 1], got {cfg['distill']['fractions']}")


def _in(x: Any, allowed: list) -> bool:
    return not allowed or x in allowed


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    _check(cfg)
    dtype = getattr(torch, cfg["data"]["dtype"])
    ds = load_data(cfg["data"], dtype)
    split = "test"
    if cfg["data"]["validation"] > 0:
        ds = validation_split(ds, cfg["data"]["validation"], cfg["data"]["validation_seed"])
        split = "validation"
    Xte, yte = ds.Xte, ds.yte
    reg = ds.num_classes is None
    tc, sc, dc, ec = cfg["teacher"], cfg["student"], cfg["distill"], cfg["eval"]
    lik = "gaussian" if reg else "categorical"
    ns = float(tc["noise_scale"]) if reg else 1.0
    sizes = list(tc["sizes"])
    if sizes[0] != ds.num_features:
        raise ValueError(f"teacher.sizes starts with {sizes[0]} inputs but the data have {ds.num_features} features")
    teacher = MLP(sizes, activation=tc["activation"], likelihood=lik, noise_scale=ns)
    bs = lambda b: b or None  # noqa: E731

    ctx.log(f"data: {ds.description}; teacher {teacher!r}")
    t0 = time.perf_counter()
    tq, th = fit_posterior(teacher, ds.X, ds.y, guide=tc["guide"], steps=tc["steps"], map_steps=tc["map_steps"],
                           lr=tc["lr"], map_lr=tc["map_lr"], num_particles=tc["num_particles"], rank=tc["rank"],
                           batch_size=bs(tc["batch_size"]), seed=seed)
    t_teacher = time.perf_counter() - t0
    tres = metrics.evaluate(teacher, tq, Xte, yte, num_samples=ec["samples"], seed=seed)
    ctx.record({"setting": "teacher", "method": "teacher", "student": "teacher", "fraction": 1.0,
                "n_train": ds.X.shape[0], "eval_split": split, "time_s": t_teacher, "elbo": th.elbo_end} | tres)
    ctx.log(f"teacher fitted in {t_teacher:.0f}s: {_short(tres)}")
    if "teacher" in cfg["save"]["methods"]:
        ctx.save_model("teacher", teacher, tq, {"data": {"name": cfg["data"]["name"],
                                                         "split_seed": cfg["data"]["split_seed"]},
                                                "data_description": ds.description, "role": "teacher",
                                                "seed": seed},
                       data=(ds.X, ds.y), idata_draws=cfg["save"]["idata_draws"])
    teacher_test = None if reg else metrics.predict(teacher, tq, Xte, num_samples=ec["samples"], seed=seed)
    tq64 = tq.to(dtype=torch.float64)

    for sname, ssizes in cfg["students"].items():
        student = MLP(ssizes, activation=tc["activation"], likelihood=lik, noise_scale=ns)
        _, prior1, ops = student_prior(teacher, tq64, student, selector=sc["selector"], tau=1.0, seed=seed)
        ctx.log(f"student {sname} {ssizes} (p={student.num_params}): {' ; '.join(repr(o) for o in ops)}")
        for frac in dc["student_fractions"].get(sname, dc["fractions"]):
            sub = subsample(ds, frac, seed=seed)
            setting = f"{sname} frac={frac:g}"
            base = {"setting": setting, "student": sname, "sizes": "-".join(map(str, ssizes)),
                    "fraction": float(frac), "n_train": sub.X.shape[0], "eval_split": split}
            with_curves = ec["curve_every"] > 0 and _in(frac, ec["curve_fractions"])
            run_baselines = _in(sname, dc["baseline_students"]) and _in(frac, dc["baseline_fractions"])
            for method in dc["methods"]:
                if method not in OURS and not run_baselines:
                    continue
                if method == "kd" and reg:
                    continue  # KD matches class probabilities; not defined here for regression
                taus = dc["taus"] if method == "teacher_prior" else [None]
                for tau in taus:
                    label = f"teacher_prior(tau={_tau_str(tau)})" if tau is not None else method
                    cb = _callback(ctx, student, Xte, yte, setting, label, ec, seed) if with_curves else None
                    t0 = time.perf_counter()
                    fitted, hist, extra = _fit(method, tau, teacher, tq, student, prior1, sub, cfg, seed, cb,
                                               ec["curve_every"] if with_curves else 0, ops)
                    dt = time.perf_counter() - t0
                    res = metrics.evaluate(student, fitted, Xte, yte, num_samples=ec["samples"], seed=seed,
                                           teacher_probs=teacher_test)
                    row = base | {"method": label, "tau": tau if tau is not None else "", "time_s": dt} | extra | res
                    if method in VI_METHODS:
                        row["elbo"] = hist.elbo_end
                    ctx.record(row)
                    ctx.log(f"{setting} {label}: {_short(res)} ({dt:.0f}s)")
                    # (divided_prior is not saved: its prior is rebuilt from the data, not stored here)
                    if method in VI_METHODS and method != "divided_prior" and \
                            _in(method, cfg["save"]["methods"]) and _in(frac, cfg["save"]["fractions"]):
                        # the card carries a data spec, the plan and (as prior.pt) the prior, so that
                        # `pyro-distill diagnose` can rebuild the data and add the student-prior row
                        spec = {"name": cfg["data"]["name"], "split_seed": cfg["data"]["split_seed"],
                                "fraction": float(frac), "subsample_seed": seed}
                        pr = None
                        if method == "teacher_prior":  # the other VI methods ran under the fan-in prior
                            t = extra["tau_chosen"]
                            pr = prior1.tempered(float(t)) if t != 1 else prior1
                            pr.layout = student.layout
                        folder = ctx.save_model(
                            f"{sname}-f{frac:g}-{label.replace('(', '-').replace(')', '')}", student, fitted,
                            {"data": spec, "data_description": sub.description, "setting": setting,
                             "method": label, "plan": ops.to_dict(), "tau": tau},
                            data=(sub.X, sub.y), prior=pr, idata_draws=cfg["save"]["idata_draws"])
                        if pr is not None:
                            pr.save(folder / "prior.pt")


def validation_split(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """``ds`` with a seeded, stratified (for classes) ``fraction`` of its training split moved into the place of
    the test split: train on the rest, evaluate on the held-out part; the real test split is dropped."""
    import numpy as np

    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    g = np.random.default_rng(seed)
    n = ds.X.shape[0]
    if ds.num_classes:
        y = ds.y.numpy()
        parts = []
        for c in range(ds.num_classes):
            members = np.flatnonzero(y == c)
            k = min(len(members) - 1, max(1, int(round(fraction * len(members))))) if len(members) > 1 else 0
            parts.append(g.choice(members, size=k, replace=False))
        val = np.sort(np.concatenate(parts))
    else:
        val = np.sort(g.choice(n, size=max(1, int(round(fraction * n))), replace=False))
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    tr, va = torch.as_tensor(np.flatnonzero(mask)), torch.as_tensor(val)
    return Dataset(ds.X[tr], ds.y[tr], ds.X[va], ds.y[va], ds.name, ds.num_classes,
                   ds.description + f"; validation split {fraction:g} of the training split (seed {seed}, "
                   f"{len(va)} rows held out, metrics on them; test split unused)")


def _tau_str(tau: float | str) -> str:
    return tau if isinstance(tau, str) else f"{tau:g}"


def _short(res: dict[str, Any]) -> str:
    keys = ("accuracy", "nll", "ece") if "accuracy" in res else ("rmse", "nll")
    return ", ".join(f"{k} {res[k]:.3f}" for k in keys)


def _callback(ctx: SeedContext, net: MLP, Xte, yte, setting: str, method: str, ec: dict[str, Any], seed: int):
    def cb(step: int, q) -> dict[str, float]:
        res = metrics.evaluate(net, q, Xte, yte, num_samples=ec["curve_samples"], seed=seed)
        for k in ("accuracy", "nll", "rmse"):
            if k in res:
                ctx.curve(setting, method, step, k, res[k])
        return {}
    return cb


def _fit(method: str, tau: float | str | None, teacher: MLP, tq, student: MLP, prior1, sub, cfg: dict[str, Any],
         seed: int, cb, every: int, ops) -> tuple[Any, Any, dict[str, Any]]:
    """``(fitted posterior or weights, history, extra row columns)`` of one method."""
    sc, dc = cfg["student"], cfg["distill"]
    X, y = sub.X, sub.y
    bs = sc["batch_size"] or None
    vi = {"guide": sc["guide"], "steps": sc["steps"], "map_steps": sc["map_steps"], "lr": sc["lr"],
          "map_lr": sc["map_lr"], "num_particles": sc["num_particles"], "rank": sc["rank"], "batch_size": bs,
          "seed": seed, "callback": cb, "eval_every": every}
    budget = sc["map_steps"] + sc["steps"]
    point = {"steps": budget, "lr": dc["point_lr"], "seed": seed, "batch_size": bs, "callback": cb,
             "eval_every": every}
    if method == "teacher_prior":
        extra: dict[str, Any] = {"tau_chosen": tau}
        if tau == "evidence":  # chosen on the student's own training data (sub), never on evaluation data
            tau, info = evidence_temperature(student, prior1, X, y, map_steps=sc["map_steps"], map_lr=sc["map_lr"],
                                             seed=seed, batch_size=bs)
            extra = {"tau_chosen": tau, "log_evidence": info["log_evidence"],
                     "log_evidence_tau1": info["log_evidence_tau1"], "tau_at_bound": int(info["at_bound"])}
        prior = (prior1.tempered(float(tau)) if tau != 1 else prior1).to(X.device, X.dtype)
        return (*fit_posterior(student, X, y, prior=prior, init="prior", **vi), extra)
    if method == "divided_prior":  # the student's own data divided out of the conditioned teacher posterior
        prior, info = divided_prior(student, prior1, X, y)
        return (*fit_posterior(student, X, y, prior=prior.to(X.device, X.dtype), init="prior", **vi),
                {"clipped_eigenvalues": info["clipped"]})
    if method == "reduced_posterior":
        kw = {k: v for k, v in vi.items() if k not in ("map_steps", "map_lr", "steps")}
        res = reduced_posterior(teacher, tq.to(dtype=torch.float64), student, X, y, ops=ops, steps=budget, **kw)
        return res.posterior, res.history, {"log_evidence_change": res.info["log_evidence_change"]}
    if method == "standard_prior":
        return (*baselines.standard_prior(student, X, y, **vi), {})
    if method == "standard_prior_cond_init":
        return (*baselines.standard_prior_conditioned_init(student, X, y, start=prior1.mean.to(X.dtype), **vi), {})
    if method == "deterministic":
        return (*baselines.deterministic(student, X, y, **point), {})
    if method == "kd":
        tp = metrics.predict(teacher, tq, X, num_samples=cfg["eval"]["samples"], seed=seed)
        return (*baselines.knowledge_distillation(student, X, y, tp, gamma=dc["kd_gamma"],
                                                  temperature=dc["kd_temperature"], **point), {})
    if method == "prune_finetune":
        return (*baselines.prune_finetune(teacher, tq.mean, student, X, y, **point), {})
    raise ValueError(f"unknown method {method!r}")


register_kind("mlp", DEFAULTS, run_seed)
