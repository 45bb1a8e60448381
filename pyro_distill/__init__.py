"""pyro-distill: Bayesian distillation of neural networks with Pyro.

A teacher's Gaussian posterior over its weights becomes, by exact Gaussian conditioning, the prior of
a smaller student. See DESIGN.md for the mathematics and README.md for usage.
"""

from . import data, gaussian, metrics, nets, surgery
from .distill import distill
from .gaussian import DenseGaussian, DiagGaussian, Gaussian, LowRankGaussian
from .inference import fit_map, fit_posterior, laplace, predictive
from .layout import Layout
from .surgery import apply, plan

__version__ = "0.1.0"

__all__ = [
    "data", "gaussian", "metrics", "nets", "surgery", "Layout", "Gaussian", "DenseGaussian", "LowRankGaussian",
    "DiagGaussian", "fit_map", "fit_posterior", "laplace", "predictive", "distill", "plan", "apply", "__version__",
]
