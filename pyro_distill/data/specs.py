"""ONE registry of data sets: a *data spec* is a plain JSON dict naming a set and EVERY parameter of its
generator, and :func:`load` rebuilds exactly the same tensors from it (sizes, split, preprocessing included).

A spec is what a model card stores under ``"data"`` (``pyro_distill.store``) and what an experiment's
``[data]`` table becomes (:func:`from_table`), so a saved model is re-diagnosed on the data it was fitted to::

    {"name": "fashion_mnist", "split_seed": 0, "dtype": "float32", "dir": "", "pca": 50, "max_train": 3000,
     "max_test": 0, "validation": 0.0, "validation_seed": 0, "fraction": 0.1, "subsample_seed": 2,
     "subsample": "stratified"}

Every set has its generator's parameters (:func:`defaults` lists them) plus three steps applied in this order:

1. the generator (``split_seed`` fixes its train/test split or its random draws);
2. ``validation`` in (0, 1): a seeded (``validation_seed``), stratified fraction of the training split replaces
   the test split (:func:`validation_split`; 0: none);
3. ``fraction`` in (0, 1]: a seeded (``subsample_seed``) training subsample drawn by ``subsample``
   (:data:`SUBSAMPLE_METHODS`: ``"stratified"`` = :func:`pyro_distill.data.tabular.subsample`, the MLP kind's;
   ``"stratified_permutation"`` = :func:`pyro_distill.data.subsets.stratified_indices`, the transformer kind's;
   ``"permutation"`` = :func:`pyro_distill.data.subsets.random_indices`, the RNN kind's), the test split unchanged.

A partial spec (``{"name": "digits"}`` or just ``"digits"``) is completed with the defaults (:func:`complete`);
an unknown key is refused, naming the allowed ones. Registered sets: tabular ``digits``, ``synthetic_regression``,
``synthetic_classification``, ``fashion_mnist`` (IDX files, searched as :func:`pyro_distill.data.idx.find_idx_dir`
says; ``pca``, stratified ``max_train`` / ``max_test``); the transformer's ``digits_sequences`` and ``match``; the
RNN's sequence-to-sequence tasks ``dates`` and ``digit_sum`` (:class:`~pyro_distill.data.sequences.SeqTask`,
token ids, no ``dtype``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .tabular import Dataset, digits, subsample, synthetic_classification, synthetic_regression

__all__ = ["register", "names", "defaults", "complete", "load", "from_table", "validation_split", "take_fraction",
           "SUBSAMPLE_METHODS", "COMMON"]

#: the steps every set has after its generator (see the module docstring), with their defaults
COMMON: dict[str, Any] = {"validation": 0.0, "validation_seed": 0, "fraction": 1.0, "subsample_seed": 0,
                          "subsample": "stratified"}
SUBSAMPLE_METHODS = ("stratified", "stratified_permutation", "permutation")


@dataclass(frozen=True)
class _Entry:
    defaults: dict[str, Any]
    make: Callable[[dict[str, Any]], Any]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, defaults: Mapping[str, Any], make: Callable[[dict[str, Any]], Any]) -> None:
    """Add a data set: ``defaults`` = every generator parameter with its default (``split_seed`` included),
    ``make(spec)`` builds it from a complete spec (the common keys are applied after it)."""
    clash = set(defaults) & set(COMMON)
    if clash:
        raise ValueError(f"data set {name!r}: parameters {sorted(clash)} are common to every set; rename them")
    _REGISTRY[name] = _Entry(dict(defaults), make)


def names() -> list[str]:
    """The registered data set names."""
    return sorted(_REGISTRY)


def _entry(name: Any) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown data set {name!r}; known: {names()} (set the card's \"data\" spec, the "
                         "experiment's data.name, or pass --data)")
    return _REGISTRY[name]


def defaults(name: str) -> dict[str, Any]:
    """The complete default spec of data set ``name``."""
    return {"name": name} | _entry(name).defaults | COMMON


def _dtype_name(v: Any) -> Any:
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v


def complete(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """``spec`` with every missing parameter set to its default; refuses unknown keys (naming the allowed ones)
    and bad common values. ``"seed"`` is read as ``split_seed`` (old cards)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    base = defaults(spec.get("name"))
    if "seed" in spec and "seed" not in base:
        spec.setdefault("split_seed", spec["seed"])
        del spec["seed"]
    unknown = sorted(set(spec) - set(base))
    if unknown:
        raise ValueError(f"data spec for {spec['name']!r} has unknown keys {unknown}; allowed: "
                         f"{sorted(k for k in base if k != 'name')}")
    out = base | {k: _dtype_name(v) for k, v in spec.items()}
    if out.get("fraction") is None:
        out["fraction"] = 1.0
    if not 0 < float(out["fraction"]) <= 1:
        raise ValueError(f"data spec fraction must lie in (0, 1], got {out['fraction']}")
    if not 0 <= float(out["validation"]) < 1:
        raise ValueError(f"data spec validation must be a fraction in [0, 1) (0: none), got {out['validation']}")
    if out["subsample"] not in SUBSAMPLE_METHODS:
        raise ValueError(f"data spec subsample must be one of {list(SUBSAMPLE_METHODS)}, got {out['subsample']!r}")
    return out


def load(spec: Mapping[str, Any] | str):
    """The data set a spec names (a :class:`~pyro_distill.data.tabular.Dataset`, or a
    :class:`~pyro_distill.data.sequences.SeqTask` for the sequence-to-sequence tasks): the generator, then the
    validation carve-out, then the training subsample. The same spec always gives the same tensors."""
    s = complete(spec)
    ds = _entry(s["name"]).make(s)
    if float(s["validation"]) > 0:
        ds = validation_split(ds, float(s["validation"]), int(s["validation_seed"]))
    if float(s["fraction"]) < 1:
        ds = take_fraction(ds, float(s["fraction"]), int(s["subsample_seed"]), s["subsample"])
    return ds


def from_table(table: Mapping[str, Any], name: str | None = None, **override: Any) -> dict[str, Any]:
    """The complete spec of an experiment's ``[data]`` table (which may carry the parameters of several sets):
    the keys of set ``name`` (default ``table["name"]``) and the common keys taken from the table, then
    ``override``."""
    name = name if name is not None else table["name"]
    allowed = defaults(name)
    picked = {k: v for k, v in table.items() if k in allowed and k != "name"}
    return complete({"name": name} | picked | override)


# ============================================================================ the steps after the generator
def validation_split(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """``ds`` with a seeded, stratified (for classes) ``fraction`` of its training split moved into the place of
    the test split: train on the rest, evaluate on the held-out part; the real test split is dropped."""
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


def take_fraction(ds: Any, fraction: float, seed: int = 0, method: str = "stratified") -> Any:
    """A seeded training subsample of ``ds`` (a Dataset or a SeqTask), the test split unchanged: ``"stratified"``
    is :func:`~pyro_distill.data.tabular.subsample`; ``"stratified_permutation"`` and ``"permutation"`` are
    :func:`~pyro_distill.data.subsets.stratified_indices` and :func:`~pyro_distill.data.subsets.random_indices`."""
    if method not in SUBSAMPLE_METHODS:
        raise ValueError(f"unknown subsample method {method!r}; choose from {list(SUBSAMPLE_METHODS)}")
    if fraction == 1:
        return ds
    if method == "stratified":
        return subsample(ds, fraction, seed=seed)
    from .subsets import random_indices, stratified_indices

    idx = random_indices(len(ds.y), fraction, seed) if method == "permutation" else \
        stratified_indices(ds.y, fraction, seed)
    return dataclasses.replace(ds, X=ds.X[idx], y=ds.y[idx], description=ds.description +
                               f"; training subsample {fraction:g} ({method}, seed {seed}, {len(idx)} rows)")


# ============================================================================ the registered sets
def _dt(s: Mapping[str, Any]) -> torch.dtype:
    name = s["dtype"]
    if name not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"data spec dtype must be a float dtype name like 'float32' or 'float64', got {name!r}")
    return getattr(torch, name)


def _fashion(s: dict[str, Any]) -> Dataset:
    from .idx import fashion_mnist, stratified_indices

    ds = fashion_mnist(s["dir"] or None, pca=int(s["pca"]), max_train=int(s["max_train"]), seed=int(s["split_seed"]),
                       dtype=_dt(s))
    n = int(s["max_test"])
    if n and n < ds.Xte.shape[0]:
        idx = torch.as_tensor(stratified_indices(ds.yte.numpy(), n, int(s["split_seed"])))
        ds = Dataset(ds.X, ds.y, ds.Xte[idx], ds.yte[idx], ds.name, ds.num_classes,
                     ds.description + f"; test subset of {n} (stratified, split seed)")
    return ds


def _digits_sequences(s: dict[str, Any]) -> Dataset:
    from .token_tasks import digits_sequences

    return digits_sequences(test_size=s["test_size"], seed=int(s["split_seed"]), pad_fraction=s["pad_fraction"],
                            min_rows=int(s["min_rows"]), dtype=_dt(s))


def _match(s: dict[str, Any]) -> Dataset:
    from .token_tasks import match_task

    return match_task(n_train=int(s["n_train"]), n_test=int(s["n_test"]), n_symbols=int(s["n_symbols"]),
                      min_len=int(s["min_len"]), max_len=int(s["max_len"]), min_gap=int(s["min_gap"]),
                      seed=int(s["split_seed"]), dtype=_dt(s))


def _seq_task(name: str) -> Callable[[dict[str, Any]], Any]:
    def make(s: dict[str, Any]):
        from .sequences import sequence_task

        return sequence_task(name, n_train=int(s["n_train"]), n_val=int(s["n_val"]), n_test=int(s["n_test"]),
                             seed=int(s["split_seed"]))
    return make


register("digits", {"split_seed": 0, "test_size": 0.2, "dtype": "float32"},
         lambda s: digits(test_size=s["test_size"], seed=int(s["split_seed"]), dtype=_dt(s)))
register("synthetic_regression", {"split_seed": 0, "n_train": 500, "n_test": 1000, "n_features": 10, "noise": 0.5,
                                  "dtype": "float32"},
         lambda s: synthetic_regression(n_train=int(s["n_train"]), n_test=int(s["n_test"]),
                                        n_features=int(s["n_features"]), noise=s["noise"], seed=int(s["split_seed"]),
                                        dtype=_dt(s)))
register("synthetic_classification", {"split_seed": 0, "n_train": 1000, "n_test": 2000, "n_features": 20,
                                      "n_classes": 3, "dtype": "float32"},
         lambda s: synthetic_classification(n_train=int(s["n_train"]), n_test=int(s["n_test"]),
                                            n_features=int(s["n_features"]), n_classes=int(s["n_classes"]),
                                            seed=int(s["split_seed"]), dtype=_dt(s)))
register("fashion_mnist", {"split_seed": 0, "dir": "", "pca": 50, "max_train": 0, "max_test": 0, "dtype": "float32"},
         _fashion)
register("digits_sequences", {"split_seed": 0, "test_size": 0.2, "pad_fraction": 0.0, "min_rows": 5,
                              "dtype": "float32"}, _digits_sequences)
register("match", {"split_seed": 0, "n_train": 2000, "n_test": 2000, "n_symbols": 4, "min_len": 8, "max_len": 12,
                   "min_gap": 4, "dtype": "float32"}, _match)
for _task in ("dates", "digit_sum"):
    register(_task, {"split_seed": 0, "n_train": 4000, "n_val": 500, "n_test": 1000}, _seq_task(_task))
