"""pyro-distill: Bayesian distillation of neural networks with Pyro.

A teacher's Gaussian posterior over its weights becomes, by exact Gaussian conditioning, the prior of
a smaller student. See docs/DESIGN.md for the mathematics and README.md for usage.

The names below load on first use (PEP 562), so that ``pyro-distill --help`` does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

#: submodules reachable as attributes (``pd.data``, ``pd.metrics``, ...)
_SUBMODULES = ("data", "gaussian", "metrics", "nets", "surgery", "diagnostics", "baselines", "inference", "store",
               "predictions", "curvature", "evidence", "crossarch", "extraction")
#: public name -> the module that defines it
_NAMES = {
    "DenseGaussian": ".gaussian", "DiagGaussian": ".gaussian", "Gaussian": ".gaussian",
    "LowRankGaussian": ".gaussian", "KronGaussian": ".gaussian", "LowRankPrecisionGaussian": ".gaussian",
    "PointMass": ".gaussian",
    "GGN": ".curvature", "reduced_posterior": ".distill",
    "fit_map": ".inference", "fit_posterior": ".inference", "laplace": ".inference", "predictive": ".predictions",
    "Layout": ".layout",
    "apply": ".surgery", "plan": ".surgery",
}

__all__ = [
    "data", "gaussian", "metrics", "nets", "surgery", "Layout", "Gaussian", "DenseGaussian", "LowRankGaussian",
    "DiagGaussian", "fit_map", "fit_posterior", "laplace", "predictive", "distill", "plan", "apply", "__version__",
    "KronGaussian", "LowRankPrecisionGaussian", "GGN", "reduced_posterior", "curvature", "evidence", "predictions",
    "PointMass",
]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'pyro_distill' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES) | set(_SUBMODULES) | {"distill"})


class _Package(types.ModuleType):
    """``pd.distill`` is the function even after the submodule ``pyro_distill.distill`` was imported (the
    import system then binds the submodule as the package attribute; this setter leaves the name alone)."""

    @property
    def distill(self) -> Any:
        return importlib.import_module(".distill", __name__).distill

    @distill.setter
    def distill(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package
