"""The experiment protocol: teacher -> plan -> prior -> methods -> evaluate -> save, as task units.

One seed of a distillation experiment is split into units the runner (:mod:`.core`) schedules on its engine:

1. **the teacher task** (:meth:`Protocol.teacher`, once per seed): load the data, fit the teacher posterior, evaluate
   and save it, make one plan and its conditioned prior (tau = 1) per student, and list the seed's cells. It returns
   a :class:`TeacherResult` (the teacher net and posterior, its test predictions, every student's net, plan and
   prior: everything a cell needs) and the :class:`Cell` list; the runner passes the result to the cells (in
   memory, pickled to a worker process, or through Ray's object store), so the teacher is fitted once and reused.
2. **one cell** (:meth:`Protocol.cell`): one student x training fraction x method (x tau) -- fit the method on the
   seeded, stratified subsample, evaluate on the evaluation split, record its row (and learning curve), save the
   model when ``[save]`` asks.

Every fit, subsample and evaluation takes the seed explicitly (``fit_posterior`` and the baselines call
``pyro.set_rng_seed(seed)`` first; predictives draw from their own seeded generator), so a cell computes the same
numbers whichever process runs it and whatever ran before it: cells may run in any order, in parallel, or be
retried. Rows of a seed are written in cell order (:attr:`Cell.index`), the order of the old sequential loop.

ONE methods vocabulary, :data:`METHODS`: ``teacher_prior`` (VI under the teacher-derived prior, one row per
``tau``, labelled ``teacher_prior(tau=...)``; ``tau = "evidence"`` chooses it on the student's own training data),
``reduced_posterior`` (Bayesian model reduction: the conditioned teacher posterior as the SVI start under the
student's own fan-in prior), ``divided_prior`` (the student's own data divided out of the conditioned teacher
posterior), the baselines ``standard_prior``, ``standard_prior_cond_init``, ``deterministic``, ``kd``,
``prune_finetune``. :func:`fit_method` dispatches one method to the library (:mod:`pyro_distill.distill`,
:mod:`pyro_distill.baselines`, :mod:`pyro_distill.inference`); nothing here is mathematics.

A network family plugs in through a :class:`Family` adapter (data, teacher and student nets, planner); the config
tables it reads are ``data``, ``teacher``, ``students``, ``student``, ``distill``, ``eval``, ``save`` (see
``experiments/mlp.py`` ``DEFAULTS``). Register a kind with ``register_kind(name, DEFAULTS, units=Protocol(family))``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import baselines, metrics
from ..data import subsample
from ..data.specs import from_table, validation_split
from ..data.subsets import random_indices, stratified_indices
from ..data.tabular import Dataset
from ..distill import divided_prior, evidence_temperature, reduced_posterior
from ..gaussian import PointMass
from ..inference import fit_posterior

__all__ = ["METHODS", "VI_METHODS", "OURS", "BASELINES", "NEEDS_TEACHER_POSTERIOR", "Cell", "TeacherResult", "Family",
           "Protocol", "fit_method", "method_label", "plan_cells", "timed", "record_evaluation", "check_choices",
           "vi_kwargs", "evidence_prior", "accuracy_curve", "sequence_curve", "record_sequences", "subsamples",
           "check_teacher_temperature", "check_teacher_prior_variance", "teacher_fit_prior", "tempered_teacher"]

#: the baselines (pyro_distill.baselines), run only for ``distill.baseline_students`` x ``baseline_fractions``
BASELINES: tuple[str, ...] = tuple(baselines.METHODS)
#: every method a cell may run, in the default row order
METHODS: tuple[str, ...] = ("teacher_prior", "reduced_posterior") + BASELINES + ("divided_prior",)
#: methods whose result is a Gaussian fitted by VI (their rows carry ``elbo``; they may be saved)
VI_METHODS = ("teacher_prior", "reduced_posterior", "divided_prior", "standard_prior", "standard_prior_cond_init")
#: the Bayesian distillation methods: run for every student and fraction
OURS = ("teacher_prior", "reduced_posterior", "divided_prior")
#: methods that read the teacher's posterior itself (the others need only the student's conditioned prior)
NEEDS_TEACHER_POSTERIOR = ("reduced_posterior", "kd", "prune_finetune")


def method_label(method: str, tau: float | str | None = None) -> str:
    """The row's ``method``: ``teacher_prior(tau=1)``, ``teacher_prior(tau=evidence)``, or the method name."""
    if tau is None:
        return method
    return f"{method}(tau={tau if isinstance(tau, str) else f'{tau:g}'})"


@dataclass(frozen=True)
class Cell:
    """One student x fraction x method (x tau) unit of a seed; ``index`` orders its rows within the seed (the
    teacher is 0). ``curves``: record learning curves."""

    seed: int
    index: int
    student: str
    fraction: float
    method: str
    tau: float | str | None = None
    curves: bool = False

    @property
    def label(self) -> str:
        return method_label(self.method, self.tau)

    @property
    def setting(self) -> str:
        return f"{self.student} frac={self.fraction:g}"

    @property
    def name(self) -> str:
        """``"<student> frac=<f> <method label>"``: how logs, errors and status name the cell."""
        return f"{self.setting} {self.label}"


@dataclass
class TeacherResult:
    """What the teacher task hands its cells: the teacher net and posterior, its predictive probabilities on the
    evaluation inputs (None for regression), and per student ``(net, conditioned prior at tau = 1, plan)``."""

    seed: int
    teacher: Any
    posterior: Any
    teacher_test: torch.Tensor | None
    students: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)

    def part(self, cell: Cell) -> TeacherResult:
        """The part one cell needs: its own student only, and the teacher posterior only for the methods that read
        it (:data:`NEEDS_TEACHER_POSTERIOR`); less to send to a worker (a dense teacher posterior is O(p^2))."""
        post = self.posterior if cell.method in NEEDS_TEACHER_POSTERIOR else None
        return replace(self, posterior=post, students={cell.student: self.students[cell.student]})


class Family:
    """A network family's adapter to the protocol: data, nets and planner wiring (no mathematics)."""

    def check(self, cfg: dict[str, Any]) -> None:
        """Refuse a config this family cannot run (a ValueError naming the key and the fix)."""

    def data(self, cfg: dict[str, Any]) -> Dataset:
        """The data set of ``cfg["data"]`` (before any validation split)."""
        raise NotImplementedError

    def data_card(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The data spec written into model cards (every generator parameter, :mod:`pyro_distill.data.specs`), so
        ``pyro-distill diagnose`` rebuilds exactly the data."""
        return from_table(cfg["data"])

    def teacher_net(self, cfg: dict[str, Any], ds: Dataset) -> Any:
        raise NotImplementedError

    def student_net(self, cfg: dict[str, Any], sizes: Any, ds: Dataset) -> Any:
        raise NotImplementedError

    def plan(self, cfg: dict[str, Any], teacher: Any, posterior64: Any, student: Any, seed: int) -> tuple[Any, Any]:
        """``(conditioned prior at tau = 1, plan)`` of ``student`` from the teacher's float64 posterior."""
        raise NotImplementedError


_DATA: dict[str, tuple[Dataset, str]] = {}


def _in(x: Any, allowed: list) -> bool:
    return not allowed or x in allowed


def plan_cells(cfg: dict[str, Any], seed: int, regression: bool) -> list[Cell]:
    """Every cell of one seed, in row order: students x their fractions x methods x taus; the baselines only for
    ``distill.baseline_students`` x ``baseline_fractions``; ``kd`` not for regression."""
    dc, ec = cfg["distill"], cfg["eval"]
    cells: list[Cell] = []
    for sname in cfg["students"]:
        for frac in dc["student_fractions"].get(sname, dc["fractions"]):
            run_baselines = _in(sname, dc["baseline_students"]) and _in(frac, dc["baseline_fractions"])
            curves = ec["curve_every"] > 0 and _in(frac, ec["curve_fractions"])
            for method in dc["methods"]:
                if (method not in OURS and not run_baselines) or (method == "kd" and regression):
                    continue  # KD matches class probabilities; not defined here for regression
                for tau in (dc["taus"] if method == "teacher_prior" else [None]):
                    cells.append(Cell(seed, len(cells) + 1, sname, float(frac), method, tau, curves))
    return cells


class Protocol:
    """The task units of a distillation kind over one :class:`Family` (see the module docstring)."""

    def __init__(self, family: Family):
        self.family = family

    def dataset(self, cfg: dict[str, Any]) -> tuple[Dataset, str]:
        """``(data set, evaluation split name)``: the validation split applied when ``data.validation > 0``;
        kept per process, so cells on one worker load it once."""
        key = json.dumps(cfg["data"], sort_keys=True)
        if key not in _DATA:
            ds, split = self.family.data(cfg), "test"
            if cfg["data"].get("validation", 0) > 0:
                ds, split = validation_split(ds, cfg["data"]["validation"], cfg["data"]["validation_seed"]), \
                    "validation"
            _DATA.clear()
            _DATA[key] = (ds, split)
        return _DATA[key]

    def teacher(self, cfg: dict[str, Any], seed: int, ctx: Any) -> tuple[TeacherResult, list[Cell]]:
        """Fit, evaluate and (when asked) save the teacher; plan every student; list the seed's cells."""
        self.family.check(cfg)
        ds, split = self.dataset(cfg)
        tc, ec = cfg["teacher"], cfg["eval"]
        reg = ds.num_classes is None
        teacher = self.family.teacher_net(cfg, ds)
        ctx.log(f"data: {ds.description}; teacher {teacher!r}")
        t0 = time.perf_counter()
        t_prior = teacher_fit_prior(teacher, tc, ds.X.dtype, ctx)
        tq, th = fit_posterior(teacher, ds.X, ds.y, prior=t_prior, guide=tc["guide"], steps=tc["steps"],
                               map_steps=tc["map_steps"],
                               lr=tc["lr"], map_lr=tc["map_lr"], num_particles=tc["num_particles"], rank=tc["rank"],
                               batch_size=tc["batch_size"] or None, seed=seed,
                               laplace_kind=tc.get("laplace") or None,
                               map_schedule=tc.get("map_schedule", "constant"))
        tq = tempered_teacher(tq, tc, ctx)
        t_teacher = time.perf_counter() - t0
        tres = metrics.evaluate(teacher, tq, ds.Xte, ds.yte, num_samples=ec["samples"], seed=seed)
        ctx.record({"setting": "teacher", "method": "teacher", "student": "teacher", "fraction": 1.0,
                    "n_train": ds.X.shape[0], "eval_split": split, "time_s": t_teacher, "elbo": th.elbo_end} | tres)
        ctx.log(f"teacher fitted in {t_teacher:.0f}s: {_short(tres)}")
        if th.map_weights is not None:  # the check every posterior owes: its predictive against its own MAP point
            mres = metrics.evaluate(teacher, PointMass(th.map_weights), ds.Xte, ds.yte, num_samples=1, seed=seed)
            ctx.record({"setting": "teacher", "method": "teacher_map", "student": "teacher", "fraction": 1.0,
                        "n_train": ds.X.shape[0], "eval_split": split, "time_s": th.map_time_s} | mres)
            ctx.log(f"teacher MAP point: {_short(mres)}")
        if "teacher" in cfg["save"]["methods"]:
            ctx.save_model("teacher", teacher, tq, {"data": self.family.data_card(cfg),
                                                    "data_description": ds.description, "role": "teacher",
                                                    "seed": seed},
                           data=(ds.X, ds.y), idata_draws=cfg["save"]["idata_draws"])
        teacher_test = None if reg else metrics.predict(teacher, tq, ds.Xte, num_samples=ec["samples"], seed=seed)
        result = TeacherResult(seed, teacher, tq, teacher_test)
        tq64 = tq.to(dtype=torch.float64)
        for sname, ssizes in cfg["students"].items():
            student = self.family.student_net(cfg, ssizes, ds)
            prior1, ops = self.family.plan(cfg, teacher, tq64, student, seed)
            result.students[sname] = (student, prior1, ops)
            ctx.log(f"student {sname} {ssizes} (p={student.num_params}): {' ; '.join(repr(o) for o in ops)}")
        return result, plan_cells(cfg, seed, reg)

    def cell(self, cfg: dict[str, Any], cell: Cell, tr: TeacherResult, ctx: Any) -> None:
        """Fit one method on the cell's subsample, evaluate it, record its row (and curve), save it when asked."""
        ds, split = self.dataset(cfg)
        seed, ec = cell.seed, cfg["eval"]
        student, prior1, ops = tr.students[cell.student]
        sub = subsample(ds, cell.fraction, seed=seed)
        ssizes = cfg["students"][cell.student]
        base = {"setting": cell.setting, "student": cell.student, "sizes": "-".join(map(str, ssizes)),
                "fraction": cell.fraction, "n_train": sub.X.shape[0], "eval_split": split}
        every = ec["curve_every"] if cell.curves else 0
        cb = _curve_callback(ctx, student, ds.Xte, ds.yte, cell, ec, seed) if cell.curves else None
        t0 = time.perf_counter()
        fitted, hist, extra = fit_method(cell.method, cell.tau, tr.teacher, tr.posterior, student, prior1, sub, cfg,
                                         seed, cb, every, ops)
        dt = time.perf_counter() - t0
        res = metrics.evaluate(student, fitted, ds.Xte, ds.yte, num_samples=ec["samples"], seed=seed,
                               teacher_probs=tr.teacher_test)
        row = base | {"method": cell.label, "tau": cell.tau if cell.tau is not None else "", "time_s": dt} | extra | res
        if cell.method in VI_METHODS:
            row["elbo"] = hist.elbo_end
        ctx.record(row)
        ctx.log(f"{cell.name}: {_short(res)} ({dt:.0f}s)")
        # (divided_prior is not saved: its prior is rebuilt from the data, not stored here)
        if cell.method in VI_METHODS and cell.method != "divided_prior" and \
                _in(cell.method, cfg["save"]["methods"]) and _in(cell.fraction, cfg["save"]["fractions"]):
            self._save(cfg, cell, student, prior1, ops, fitted, sub, extra, ctx)

    def _save(self, cfg: dict[str, Any], cell: Cell, student: Any, prior1: Any, ops: Any, fitted: Any, sub: Dataset,
              extra: dict[str, Any], ctx: Any) -> None:
        """The student's model folder; its card carries a data spec, the plan and (as prior.pt) the prior, so that
        ``pyro-distill diagnose`` can rebuild the data and add the student-prior row."""
        spec = self.family.data_card(cfg) | {"fraction": cell.fraction, "subsample_seed": cell.seed}
        pr = None
        if cell.method == "teacher_prior":  # the other VI methods ran under the fan-in prior
            t = extra["tau_chosen"]
            pr = prior1.tempered(float(t)) if t != 1 else prior1
            pr.layout = student.layout
        ctx.save_model(
            f"{cell.student}-f{cell.fraction:g}-{cell.label.replace('(', '-').replace(')', '')}", student, fitted,
            {"data": spec, "data_description": sub.description, "setting": cell.setting, "method": cell.label,
             "plan": ops.to_dict(), "tau": cell.tau},
            data=(sub.X, sub.y), prior=pr, idata_draws=cfg["save"]["idata_draws"])

    def run_seed(self, cfg: dict[str, Any], seed: int, ctx: Any) -> None:
        """The whole seed in this process: the teacher task, then its cells one after another."""
        tr, cells = self.teacher(cfg, seed, ctx)
        for c in cells:
            self.cell(cfg, c, tr, ctx)


def fit_method(method: str, tau: float | str | None, teacher: Any, tq: Any, student: Any, prior1: Any, sub: Dataset,
               cfg: dict[str, Any], seed: int, cb: Any, every: int, ops: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(fitted posterior or weights, history, extra row columns)`` of one method of :data:`METHODS` on ``sub``,
    with the same optimizer-step budget (``student.map_steps + student.steps``) for every method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    sc, dc = cfg["student"], cfg["distill"]
    X, y = sub.X, sub.y
    bs = sc["batch_size"] or None
    vi = vi_kwargs(sc, seed) | {"callback": cb, "eval_every": every}
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
    return (*baselines.prune_finetune(teacher, tq.mean, student, X, y, **point), {})  # prune_finetune


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds it took)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def record_evaluation(ctx: Any, net: Any, q: Any, X: torch.Tensor, y: torch.Tensor, setting: str, method: str,
                      seconds: float | None, samples: int, seed: int, teacher_probs: torch.Tensor | None = None,
                      extra: dict[str, Any] | None = None, **columns: Any) -> dict[str, Any]:
    """Evaluate ``q`` (a Gaussian or point weights) of ``net`` on ``(X, y)`` (:func:`pyro_distill.metrics.evaluate`),
    record the row ``setting, method, **columns, time_s, metrics, **extra`` and log it; returns the metrics.
    ``seconds=None``: the row has no ``time_s`` (kinds whose rows never had one)."""
    r = metrics.evaluate(net, q, X, y, num_samples=samples, seed=seed, teacher_probs=teacher_probs)
    timing = {} if seconds is None else {"time_s": seconds}
    ctx.record({"setting": setting, "method": method} | columns | timing | r | (extra or {}))
    agree = f", agreement {r['agreement']:.3f}" if "agreement" in r else ""
    took = "" if seconds is None else f" ({seconds:.0f}s)"
    ctx.log(f"{setting} {method}: {_short(r)}{agree}, p={r.get('params', '?')}{took}")
    return r


def record_sequences(ctx: Any, net: Any, q: Any, X: torch.Tensor, y: torch.Tensor, setting: str, method: str,
                     samples: int, seed: int, extra: dict[str, Any], linearized: bool = False,
                     **columns: Any) -> dict[str, float]:
    """:func:`record_evaluation` for a sequence model: :func:`pyro_distill.metrics.evaluate_sequences` of ``q`` on
    ``(X, y)`` (``linearized``: the linearized predictive's columns too), the row ``setting, method, **columns,
    metrics, p, **extra`` (``extra["fit_s"]``: seconds, logged)."""
    r = metrics.evaluate_sequences(net, q, X, y, samples, seed, linearized=linearized)
    ctx.record({"setting": setting, "method": method} | columns | r | {"p": net.num_params} | extra)
    ctx.log(f"{setting}: {method} {r} ({extra.get('fit_s', float('nan')):.0f} s)")
    return r


def vi_kwargs(fc: dict[str, Any], seed: int) -> dict[str, Any]:
    """``fit_posterior`` keywords from a fit-settings table (guide, rank, steps, map_steps, lr, map_lr,
    num_particles, batch_size: 0 = full batch, and ``elbo_eval_particles`` when the table has it)."""
    out = {"guide": fc["guide"], "rank": fc["rank"], "steps": fc["steps"], "map_steps": fc["map_steps"],
           "lr": fc["lr"], "map_lr": fc["map_lr"], "num_particles": fc["num_particles"],
           "batch_size": fc["batch_size"] or None, "seed": seed}
    return out | ({"elbo_eval_particles": fc["elbo_eval_particles"]} if "elbo_eval_particles" in fc else {})


def check_teacher_temperature(tc: dict[str, Any]) -> float:
    """``teacher.temperature`` (default 1) as a float > 0, else a ValueError naming the key (checked before any fit)."""
    t = tc.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"teacher.temperature must be a number > 0 (1: the fitted posterior as it is), got {t!r}")
    return float(t)


def check_teacher_prior_variance(tc: dict[str, Any]) -> float:
    """``teacher.prior_variance`` (default 1) as a float > 0, else a ValueError naming the key."""
    v = tc.get("prior_variance", 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"teacher.prior_variance must be a number > 0 (1: the fan-in prior), got {v!r}")
    return float(v)


def teacher_fit_prior(net: Any, tc: dict[str, Any], dtype: torch.dtype, ctx: Any = None) -> Any:
    """The teacher's prior for its fit: ``None`` (the network's fan-in prior) when ``teacher.prior_variance`` is 1,
    else the fan-in prior with its variance times that value (every runner calls this; the students' standard prior
    stays the fan-in prior). A value != 1 is a setting chosen on held-out training data, like ``temperature``: a
    temperature can only shrink a Gaussian towards its MAP point, so when the MAP under the fan-in prior is already
    under-confident (``benchmarks/fashion_teacher_lr.py``, ``benchmarks/teacher_quality.py`` print the sign), the
    prior is what to change."""
    v = check_teacher_prior_variance(tc)
    if v == 1.0:
        return None
    if ctx is not None:
        ctx.log(f"teacher prior: the fan-in prior with its variance x {v:g} (teacher.prior_variance)")
    return net.default_prior(dtype).tempered(v)


def tempered_teacher(q: Any, tc: dict[str, Any], ctx: Any = None) -> Any:
    """The teacher posterior with its covariance times ``teacher.temperature`` (every family's runner calls this
    right after the teacher's fit, so its rows, saved model and the students' priors all see the same Gaussian).

    ``T`` is a setting chosen *before* the run on held-out data carved from the training split, never the test
    split: e.g. :func:`pyro_distill.evidence.tune_posterior_scale` on a tuning split
    (``benchmarks/fashion_teacher_lr.py --tune``, ``benchmarks/teacher_quality.py --tune validation``). ``T < 1``
    narrows an under-confident Laplace / VI posterior; ``T = 1`` returns ``q`` itself."""
    T = check_teacher_temperature(tc)
    if T == 1.0:
        return q
    if ctx is not None:
        ctx.log(f"teacher posterior covariance scaled by T = {T:g} (teacher.temperature)")
    return q.tempered(T)


def check_choices(cfg: dict[str, Any], choices: dict[str, tuple[str, ...]]) -> None:
    """Each dotted config key of ``choices`` (``"methods"``, ``"crossarch.methods"``) lists only allowed names (a
    string value, like ``"dtype"``, is one name)."""
    for key, allowed in choices.items():
        value = cfg
        for part in key.split("."):
            value = value[part]
        bad = [m for m in ([value] if isinstance(value, str) else value) if m not in allowed]
        if bad:
            raise ValueError(f"unknown {key} {bad}; choose from {list(allowed)}")


def subsamples(X: torch.Tensor, y: torch.Tensor, fractions: list[float], seed: int, setting: str,
               method: str) -> Iterator[tuple[float, torch.Tensor | None, torch.Tensor, torch.Tensor, str]]:
    """Per training fraction ``f``: ``(float(f), row indices (None: all rows), X rows, y rows, setting name)``,
    the rows a seeded subsample drawn by ``method``, the data spec's ``subsample`` (``"permutation"``:
    :func:`~pyro_distill.data.subsets.random_indices`; ``"stratified_permutation"``:
    :func:`~pyro_distill.data.subsets.stratified_indices`), the setting ``"<setting> frac=<f>"`` (f < 1)."""
    if method not in ("permutation", "stratified_permutation"):
        raise ValueError(f"subsample method must be 'permutation' or 'stratified_permutation', got {method!r}")
    for frac in fractions:
        idx = random_indices(len(X), frac, seed) if method == "permutation" else stratified_indices(y, frac, seed)
        Xs, ys = (X, y) if idx is None else (X[idx], y[idx])
        yield float(frac), idx, Xs, ys, setting if frac == 1 else f"{setting} frac={frac:g}"


def evidence_prior(student: Any, prior: Any, X: torch.Tensor, y: torch.Tensor, more: tuple[str, ...] = (),
                   **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``prior`` with its covariance times the tau :func:`~pyro_distill.distill.evidence_temperature` (``kwargs``)
    chooses on ``(X, y)`` -- the student's own training data, never evaluation data -- in ``student``'s layout, and
    the row's columns: ``tau_chosen``, ``log_evidence``, ``log_evidence_tau1``, ``tau_at_bound`` and
    ``evidence_<k>`` for each ``k`` of ``more`` (``"structure"``, ``"curvature"``)."""
    tau, e = evidence_temperature(student, prior, X, y, **kwargs)
    pt = prior.tempered(tau) if tau != 1 else prior
    pt.layout = student.layout
    return pt, {"tau_chosen": tau, "log_evidence": e["log_evidence"], "log_evidence_tau1": e["log_evidence_tau1"],
                "tau_at_bound": int(e["at_bound"])} | {f"evidence_{k}": e[k] for k in more}


def accuracy_curve(ctx: Any, net: Any, X: torch.Tensor, y: torch.Tensor, setting: str, method: str) -> Any:
    """A fit callback recording ``test_accuracy_at_mean``: the accuracy on ``(X, y)`` at the fit's mean weights
    (every fit hands its callback a Gaussian, a PointMass for the point fits)."""
    def cb(step: int, q: Any) -> None:
        ctx.curve(setting, method, step, "test_accuracy_at_mean", metrics.accuracy(metrics.predict(net, q.mean, X), y))
    return cb


def sequence_curve(ctx: Any, net: Any, X: torch.Tensor, y: torch.Tensor, setting: str, method: str,
                   every: int) -> Any:
    """A fit callback recording ``val_nll_tok`` and ``val_exact_match`` (:mod:`pyro_distill.metrics` sequence
    metrics) on ``(X, y)`` at the fit's mean, at the steps that are multiples of ``every`` (step 0 included)."""
    def cb(step: int, q: Any) -> None:  # q: a Gaussian, or a PointMass (point fits, point starts)
        if step % every == 0:
            w = q.mean
            ctx.curve(setting, method, step, "val_nll_tok", metrics.sequence_nll(net, w, X, y))
            ctx.curve(setting, method, step, "val_exact_match", metrics.sequence_scores(net, w, X, y)["exact_match"])
    return cb


def _short(res: dict[str, Any]) -> str:
    keys = ("accuracy", "nll", "ece") if "accuracy" in res else ("rmse", "nll")
    return ", ".join(f"{k} {res[k]:.3f}" for k in keys)


def _curve_callback(ctx: Any, net: Any, Xte: torch.Tensor, yte: torch.Tensor, cell: Cell, ec: dict[str, Any],
                    seed: int) -> Any:
    """A fit callback recording test accuracy / NLL / RMSE every ``eval.curve_every`` steps."""
    def cb(step: int, q: Any) -> dict[str, float]:
        res = metrics.evaluate(net, q, Xte, yte, num_samples=ec["curve_samples"], seed=seed)
        for k in ("accuracy", "nll", "rmse"):
            if k in res:
                ctx.curve(cell.setting, cell.label, step, k, res[k])
        return {}
    return cb
