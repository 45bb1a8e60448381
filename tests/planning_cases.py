"""Planner reference cases: (family, teacher, student, selector, seed, Gaussian) -> the plan the pre-unification
planners made (``tests/data/planning_reference.json``, written by the planners of commit 501d236:
``surgery/plan.py``'s ``plan``, ``surgery/cnn.py``'s ``plan_cnn``, ``surgery/transformer.py``'s
``plan_transformer``). ``test_planning.py`` checks that the one planner makes the same plans."""

from __future__ import annotations

import math
from typing import Any

import torch

from pyro_distill.gaussian import DenseGaussian, DiagGaussian, Gaussian, LowRankGaussian
from pyro_distill.nets import CNN, MLP, Transformer
from pyro_distill.nets.base import BayesianNet


def gaussian(net: BayesianNet, kind: str, seed: int, dtype: str) -> Gaussian:
    """A random correlated Gaussian over ``net``'s weights, built in float64 then cast to ``dtype``."""
    F64 = torch.float64
    g = torch.Generator().manual_seed(seed)
    p = net.num_params
    m = torch.randn(p, generator=g, dtype=F64)
    m[torch.rand(p, generator=g, dtype=F64) < 0.3] *= 0.05  # some small means: low snr / magnitude / high evidence
    if kind == "dense":
        A = torch.randn(p, p, generator=g, dtype=F64) / math.sqrt(p)
        q: Gaussian = DenseGaussian.from_covariance(m, A @ A.T + 0.05 * torch.eye(p, dtype=F64), layout=net.layout)
    elif kind == "lowrank":
        q = LowRankGaussian(m, torch.randn(p, 3, generator=g, dtype=F64) * 0.3,
                            torch.rand(p, generator=g, dtype=F64) + 0.05, layout=net.layout)
    else:
        q = DiagGaussian(m, torch.rand(p, generator=g, dtype=F64) + 0.05, layout=net.layout)
    return q.to(dtype=getattr(torch, dtype))


def _tf(heads: list[int], ffn: list[bool]) -> Transformer:
    return Transformer(input_dim=5, n_classes=3, max_len=7, d_model=6, heads=heads, ffn=ffn, d_head=2, d_ff=5)


MLP_SELECTORS = ("snr", "magnitude", "random", "evidence")
TRANSFORMER_SELECTORS = ("evidence", "snr", "magnitude", "random", "first", "last")


def cases() -> list[dict[str, Any]]:
    """Every case as plain data (nets as configs)."""
    out: list[dict[str, Any]] = []
    mlp_pairs = [
        (MLP([5, 9, 6, 6, 7, 3]), MLP([5, 4, 3, 3]), "dense"),
        (MLP([5, 9, 6, 6, 7, 3], bias=False), MLP([5, 4, 3, 3], bias=False), "lowrank"),
        (MLP([6, 8, 8, 3]), MLP([6, 5, 3]), "diag"),
        (MLP([4, 6, 5, 3], activation="identity"), MLP([4, 3, 3], activation="identity"), "dense"),
        (MLP([6, 10, 3], activation="tanh"), MLP([6, 4, 3], activation="tanh"), "lowrank"),
    ]
    for i, (t, s, kind) in enumerate(mlp_pairs):
        for sel in MLP_SELECTORS:
            for dtype in ("float64", "float32"):
                out.append({"family": "mlp", "teacher": t.config(), "student": s.config(), "selector": sel,
                            "seed": i, "kind": kind, "gseed": 10 + i, "dtype": dtype})
    cnn = CNN(image_shape=(8, 8), channels=[3, 4], dense=[5, 10])
    cnn3 = CNN(image_shape=(10, 10), channels=[2, 3, 2], dense=[3, 4, 3], kernel_size=3, padding=1, pool=[2, 1, 2])
    for i, (t, s, kind) in enumerate([(cnn, cnn.replace(channels=[2, 3], dense=[3, 10]), "dense"),
                                      (cnn3, cnn3.replace(channels=[1, 2, 2], dense=[2, 2, 3]), "lowrank")]):
        for sel in MLP_SELECTORS:
            for dtype in ("float64", "float32"):
                out.append({"family": "cnn", "teacher": t.config(), "student": s.config(), "selector": sel,
                            "seed": i, "kind": kind, "gseed": 20 + i, "dtype": dtype})
    t2, t3 = _tf([3, 2], [True, True]), _tf([3, 2, 2], [True, True, True])
    pairs = [(t2, _tf([2], [True])), (t2, _tf([1, 2], [True, True])), (t2, _tf([0, 2], [True, True])),
             (t2, _tf([3, 0], [True, True])), (t2, _tf([3, 2], [False, True])), (t3, _tf([1, 2], [True, False])),
             (t3, _tf([2], [True]))]
    for i, (t, s) in enumerate(pairs):
        for sel in TRANSFORMER_SELECTORS:
            for kind, dtype in (("diag", "float64"), ("lowrank", "float64"), ("lowrank", "float32")):
                out.append({"family": "transformer", "teacher": t.config(), "student": s.config(), "selector": sel,
                            "seed": i, "kind": kind, "gseed": 30 + i, "dtype": dtype})
    return out
