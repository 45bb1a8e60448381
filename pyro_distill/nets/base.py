"""What every network of the package is: a pure function ``forward(w, x)`` of ONE flat weight vector,
batched over leading dims of ``w``, plus its Pyro model with a single latent site ``"w"``."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from ..gaussian import DiagGaussian, Gaussian
from ..layout import Layout

__all__ = ["BayesianNet", "LIKELIHOODS", "register_net", "net_from_config"]

LIKELIHOODS = ("categorical", "gaussian")
_REGISTRY: dict[str, type[BayesianNet]] = {}


def register_net(cls: type[BayesianNet]) -> type[BayesianNet]:
    """Class decorator: makes ``net_from_config`` able to rebuild this network type."""
    _REGISTRY[cls.__name__] = cls
    return cls


def check_options(activation: str, activations: Any, likelihood: str, prior_scale: float | None) -> None:
    """The constructor options every family shares, each refused with the allowed values."""
    if activation not in activations:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(activations)}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
    if prior_scale is not None and not prior_scale > 0:
        raise ValueError(f"prior_scale must be positive, got {prior_scale}")


def net_from_config(cfg: dict[str, Any]) -> BayesianNet:
    """Rebuild a network from ``net.config()`` (as stored in a model card)."""
    cfg = dict(cfg)
    typ = cfg.pop("type", None)
    if typ not in _REGISTRY:
        raise ValueError(f"unknown network type {typ!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[typ](**cfg)


class BayesianNet(ABC):
    """Base class. Subclasses set ``self.layout``, ``self.likelihood`` and implement ``forward``."""

    layout: Layout
    likelihood: str = "categorical"
    #: known observation noise (std) for a Gaussian likelihood; None = fitted by the inference code
    noise_scale: float | None = 1.0

    # ---------------------------------------------------------------- to implement
    @abstractmethod
    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs (logits, or regression means) ``[..., N, n_out]`` for weights ``w`` of shape ``[..., p]``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Plain data that rebuilds the network with :func:`net_from_config` (includes ``"type"``)."""

    @abstractmethod
    def prior_scales(self) -> torch.Tensor:
        """Per-coordinate standard deviations of the default (independent) prior, shape ``[p]``."""

    def replace(self, **changes: Any) -> BayesianNet:
        """The same network with some configuration entries changed (e.g. ``sizes=[64, 16, 10]``)."""
        return net_from_config(self.config() | changes)

    # ---------------------------------------------------------------- shared
    @property
    def num_params(self) -> int:
        return self.layout.size

    def __call__(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.forward(w, x)

    def same_architecture(self, other: BayesianNet) -> bool:
        return self.config() == other.config()

    def __repr__(self) -> str:
        cfg = self.config()
        typ = cfg.pop("type")
        return f"{typ}({', '.join(f'{k}={v!r}' for k, v in cfg.items())}; p={self.num_params})"

    def default_prior(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Gaussian:
        """The explicit prior: independent zero-mean Normals with :meth:`prior_scales`."""
        s = self.prior_scales().to(dtype=dtype, device=device)
        return DiagGaussian(torch.zeros_like(s), s, layout=self.layout, meta={"source": "default prior"})

    def init_weights(self, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A random starting point: a draw from the default prior (fan-in scaled)."""
        s = self.prior_scales().to(dtype)
        return torch.randn(s.shape, generator=generator, dtype=dtype) * s

    def check_data(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Raise a clear error for shapes or labels that do not fit this network."""
        if y is None:
            return
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"X has {x.shape[0]} rows but y has {y.shape[0]} entries")
        if self.likelihood == "categorical":
            if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"classification labels must be integers, got dtype {y.dtype}")
            n = self.num_outputs
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
                raise ValueError(
                    f"labels must lie in 0..{n - 1} for a network with {n} outputs; "
                    f"got range {int(y.min())}..{int(y.max())} (relabel, or change the output size)"
                )

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    def log_likelihood(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       noise_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Pointwise ``log p(y_n | x_n, w)``, shape ``[..., N]``."""
        out = self.forward(w, x)
        return self.output_dist(out, noise_scale).log_prob(y)

    def log_likelihood_and_grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                noise_scale: torch.Tensor | float | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_n log p(y_n | x_n, w), its gradient)`` for one weight vector ``w`` ``[p]`` (detached).
        By autograd here; a family may override it with a hand-written backward (:class:`MLP` does)."""
        if w.dim() != 1 or w.shape[0] != self.num_params:
            raise ValueError(f"w must be one weight vector [p={self.num_params}], got {tuple(w.shape)}")
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            ll = self.log_likelihood(w, x, y, noise_scale).sum()
            (g,) = torch.autograd.grad(ll, w)
        return ll.detach(), g

    def output_dist(self, out: torch.Tensor, noise_scale: torch.Tensor | float | None = None):
        """The observation distribution given the network's outputs (batch shape ``[..., N]``)."""
        if self.likelihood == "categorical":
            return dist.Categorical(logits=out, validate_args=False)
        s = self.noise_scale if noise_scale is None else noise_scale
        if s is None:
            raise ValueError("this network's noise scale is fitted: pass noise_scale")
        return dist.Normal(out.squeeze(-1), s, validate_args=False) if out.shape[-1] == 1 else dist.Normal(
            out, s, validate_args=False).to_event(1)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None, prior: Gaussian | None = None,
              subsample_size: int | None = None, noise_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """The Pyro model: ``w ~ prior`` (one flat site), ``y_n ~ p(y | x_n, w)`` in a ``"data"`` plate.

        ``w`` from a guide may carry leading particle dims; the plate is the rightmost batch dim.
        """
        if prior is None:
            # token-id inputs are integers: the prior then takes the default float dtype
            prior = self.default_prior(x.dtype if x.is_floating_point() else torch.get_default_dtype(), x.device)
        w = pyro.sample("w", prior.to_pyro())
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as idx:
            out = self.forward(w, x[idx])
            obs = None if y is None else y[idx]
            pyro.sample("y", self.output_dist(out, noise_scale), obs=obs)
        return out


def fan_in_scale(n_in: int) -> float:
    """Standard deviation of the fan-in prior: variance ``1 / n_in``."""
    return 1.0 / math.sqrt(max(n_in, 1))
