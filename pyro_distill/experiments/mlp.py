"""Experiment kind ``mlp``: MLP teacher -> students under the teacher-derived prior vs the baselines.

The family adapter of the protocol (:mod:`.protocol`: the teacher task, then one cell per student x fraction x
method x tau, with the one methods vocabulary): the defaults, the data (:mod:`pyro_distill.data.specs`), MLP
teacher and students, and the planner (:func:`pyro_distill.distill.student_prior`, ``student.selector``). The teacher
trains on the full training split; each student on a stratified fraction of it seeded by the seed (fraction 1 is
the paper's setting: teacher and student on the same data), every method with the same budget of optimizer steps
(``map_steps + steps``); ``tau`` is a number >= 1 or ``"evidence"`` (chosen on the student's own training data,
recorded as ``tau_chosen``); ``divided_prior`` is not in the default method list. The test split only reports.

``data.validation = f`` (0 < f < 1) carves a seeded (``data.validation_seed``), stratified fraction ``f`` out of the
training split before anything is fitted; teacher and students train on the rest and every metric is computed on
that validation part (rows carry ``eval_split = "validation"``); the test split is not touched. This is how
methods are chosen (experiments/README.md, the protocol).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import specs
from ..data.tabular import Dataset
from ..distill import student_prior
from ..nets.mlp import MLP
from ..training import SCHEDULES
from .core import register_kind
from .protocol import METHODS, Family, Protocol, check_teacher_prior_variance, check_teacher_temperature

__all__ = ["DEFAULTS", "MLPFamily", "PROTOCOL", "run_seed", "load_data"]

#: the methods a config may list (the one vocabulary of :mod:`.protocol`)
ALL_METHODS = METHODS

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
        "sizes": [64, 32, 32, 10], "activation": "relu", "guide": "dense", "steps": 300, "map_steps": 1000,
        "lr": 1e-3, "map_lr": 1e-2, "num_particles": 8, "rank": 20, "batch_size": 0, "noise_scale": 0.5,
        "laplace": "",  # the Laplace start's structure if not the guide's ("kron": KFAC, for a dense guide on big data)
        "map_schedule": "constant",  # or "cosine": the MAP step size decays to 0 (minibatch fits end at the mode)
        "temperature": 1.0,  # the fitted posterior's covariance times T (T chosen on a validation split, never test)
        # the teacher's prior: the fan-in prior with its variance times this (chosen on a validation split; the
        # students' standard prior stays the fan-in prior)
        "prior_variance": 1.0,
    },
    "students": {},                 # name -> sizes, e.g. both = [64, 16, 10]
    "student": {
        "guide": "dense", "steps": 200, "map_steps": 400, "lr": 1e-3, "map_lr": 1e-2, "num_particles": 8,
        "rank": 20, "batch_size": 0, "selector": "snr",
    },
    "distill": {
        "taus": [1.0, 10.0, 100.0],
        "fractions": [0.05, 0.1, 0.25, 1.0],
        "methods": list(METHODS[:-1]),   # every method but divided_prior
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
    """The dataset a config's ``[data]`` table names, before any validation split (:mod:`pyro_distill.data.specs`)."""
    return specs.load(specs.from_table(d, dtype=dtype, validation=0.0, fraction=1.0))


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
    check_teacher_temperature(cfg["teacher"])
    check_teacher_prior_variance(cfg["teacher"])
    sched = cfg["teacher"]["map_schedule"]
    if sched not in SCHEDULES:
        raise ValueError(f"teacher.map_schedule must be one of {list(SCHEDULES)}, got {sched!r}")
    v = cfg["data"]["validation"]
    if not (isinstance(v, (int, float)) and 0 <= v < 1):
        raise ValueError(f"data.validation must be a fraction in [0, 1) (0: no validation split), got {v!r}")
    if any(not 0 < f <= 1 for f in cfg["distill"]["fractions"]):
        raise ValueError(f"distill.fractions must lie in (0, 1], got {cfg['distill']['fractions']}")


class MLPFamily(Family):
    """MLP teacher and students (sizes from ``teacher.sizes`` / ``students``), planned by
    :func:`pyro_distill.distill.student_prior` (``student.selector``)."""

    def check(self, cfg: dict[str, Any]) -> None:
        _check(cfg)

    def data(self, cfg: dict[str, Any]) -> Dataset:
        return load_data(cfg["data"], getattr(torch, cfg["data"]["dtype"]))

    def _net(self, cfg: dict[str, Any], sizes: list[int], ds: Dataset) -> MLP:
        reg, tc = ds.num_classes is None, cfg["teacher"]
        return MLP(list(sizes), activation=tc["activation"], likelihood="gaussian" if reg else "categorical",
                   noise_scale=float(tc["noise_scale"]) if reg else 1.0)

    def teacher_net(self, cfg: dict[str, Any], ds: Dataset) -> MLP:
        sizes = list(cfg["teacher"]["sizes"])
        if sizes[0] != ds.num_features:
            raise ValueError(f"teacher.sizes starts with {sizes[0]} inputs but the data have {ds.num_features} "
                             "features")
        return self._net(cfg, sizes, ds)

    def student_net(self, cfg: dict[str, Any], sizes: list[int], ds: Dataset) -> MLP:
        return self._net(cfg, sizes, ds)

    def plan(self, cfg: dict[str, Any], teacher: MLP, posterior64: Any, student: MLP, seed: int) -> tuple[Any, Any]:
        _, prior1, ops = student_prior(teacher, posterior64, student, selector=cfg["student"]["selector"], tau=1.0,
                                       seed=seed)
        return prior1, ops


PROTOCOL = Protocol(MLPFamily())


def run_seed(cfg: dict[str, Any], seed: int, ctx: Any) -> None:
    """One whole seed in this process (teacher, then every cell): what the runner's task units compute."""
    PROTOCOL.run_seed(cfg, seed, ctx)


register_kind("mlp", DEFAULTS, run_seed, units=PROTOCOL)
