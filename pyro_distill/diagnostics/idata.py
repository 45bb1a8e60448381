"""ArviZ ``InferenceData`` of a Gaussian posterior over a network's flat weights: draws of q (or any given draws)
with ``posterior`` (one variable per layout block, named dims), ``posterior_predictive``, pointwise
``log_likelihood``, ``observed_data``, ``constant_data`` and ``sample_stats`` (``lp = log p(w, D)``,
``log_prior``, ``log_q``), so LOO, WAIC and the posterior k-hat can all be recomputed from a saved file;
saving and loading ``idata.nc`` atomically, and the data fingerprint it records.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..gaussian import Gaussian, PointMass
from ..nets.base import BayesianNet
from ..store import IDATA_FILE, atomic_write

with warnings.catch_warnings():  # arviz 0.23 announces its 1.0 refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["GROUPS", "block_dims", "chain_split", "loo_reff", "idata_from_draws", "to_inference_data",
           "posterior_only_idata", "weights_from_idata", "save_idata", "load_idata", "data_fingerprint", "az"]

#: ArviZ's group names used here, in the order they are written
GROUPS = ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data", "constant_data")
#: upper bound on floats held at once by one chunk of forward passes
_CHUNK_FLOATS = 2e7


# ============================================================================ naming
def _dim_names_mlp(net) -> dict[str, tuple[str, ...]]:
    sizes = net.sizes
    L = len(sizes) - 1

    def unit(t: int) -> str:
        return "input" if t == 0 else ("output" if t == L else f"layer{t}_neuron")

    out = {}
    for t in range(1, L + 1):
        out[f"layer{t}.weight"] = (unit(t), unit(t - 1))
        out[f"layer{t}.bias"] = (unit(t),)
    return out


def block_dims(net: BayesianNet) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """(dims per block, coords per dim) for the ``posterior`` group.

    An MLP's weight ``layer{t}.weight`` has dims ``(layer{t}_neuron, layer{t-1}_neuron)`` with the first
    layer's inputs called ``input`` and the last layer's neurons ``output``, so the neuron dim of layer
    t is shared by its weight rows, its bias and the next layer's weight columns. Other families may
    define ``net.block_dims() -> {block: dims}``; the fallback is ``<block>_dim<i>``. Coordinates are
    0-based indices.
    """
    custom = getattr(net, "block_dims", None)
    if callable(custom):
        names = dict(custom())
    elif hasattr(net, "sizes") and all(n.startswith("layer") for n in net.layout.names):
        names = _dim_names_mlp(net)
    else:
        names = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}
    for b in net.layout:
        d = list(names.get(b.name) or [f"{b.name.replace('.', '_')}_dim{i}" for i in range(len(b.shape))])
        if len(d) != len(b.shape):
            raise ValueError(f"block {b.name!r} of shape {b.shape} was given dims {d}")
        for name, n in zip(d, b.shape):
            if name in coords and len(coords[name]) != n:
                raise ValueError(f"dim {name!r} has size {len(coords[name])} in one block and {n} in {b.name!r}")
            coords[name] = np.arange(n)
        dims[b.name] = d
    return dims, coords


# ============================================================================ draws -> InferenceData
def chain_split(total: int, chains: int = 4) -> tuple[int, int]:
    """``(chains, draws per chain)`` for ``total`` independent draws of q: ``chains`` equal groups when they
    divide ``total`` (1,000 -> 4 x 250), else 2, else 1. The draws are independent, so the split carries no
    Markov-chain meaning: it only gives ``az.summary`` / ``az.rhat`` the chain dimension they need (their r_hat
    is then 1 up to Monte Carlo noise, by construction)."""
    for c in (chains, 2, 1):
        if c >= 1 and total % c == 0 and (total // c >= 4 or c == 1):
            return c, total // c
    return 1, total


def loo_reff(idata: az.InferenceData) -> float | None:
    """PSIS-LOO's relative efficiency: exactly 1 for independent draws of a Gaussian q (made by
    :func:`to_inference_data`; the chains only split them), ``None`` (ArviZ estimates it) for MCMC draws."""
    return 1.0 if "gaussian_kind" in idata.attrs else None


def _draws(gaussian: Gaussian, draws: int, chains: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=gaussian.device).manual_seed(int(seed))
    return gaussian.sample(draws * chains, generator=gen).reshape(chains, draws, gaussian.dim)


def _chunk_size(net: BayesianNet, N: int) -> int:
    width = max(max(b.shape) if b.shape else 1 for b in net.layout)
    return max(1, int(_CHUNK_FLOATS // max(1, N * width)))


def _sample_y(net: BayesianNet, out: torch.Tensor, gen: torch.Generator, noise_scale) -> torch.Tensor:
    """One replicated label (or value) per datum and draw, from the net's observation model."""
    if net.likelihood == "categorical":
        u = torch.rand(out.shape, generator=gen, dtype=out.dtype, device=out.device).clamp_(1e-12, 1 - 1e-12)
        return torch.argmax(out - torch.log(-torch.log(u)), -1)  # Gumbel-max
    s = net.noise_scale if noise_scale is None else noise_scale
    if s is None:
        raise ValueError("this network's noise scale is fitted: pass noise_scale to draw predictive samples")
    mu = out.squeeze(-1) if out.shape[-1] == 1 else out
    return mu + float(s) * torch.randn(mu.shape, generator=gen, dtype=mu.dtype, device=mu.device)


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def idata_from_draws(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                     prior: Gaussian | None = None, q: Gaussian | None = None, seed: int = 0,
                     attrs: Mapping[str, Any] | None = None, noise_scale: float | None = None,
                     include_x: bool = True) -> az.InferenceData:
    """InferenceData for given weight draws ``w`` of shape ``[chains, draws, p]`` (from q, NUTS, ...).

    ``sample_stats.lp`` is ``log p(w) + sum_n log p(y_n | x_n, w)`` under ``prior`` (default: the net's
    fan-in prior); ``sample_stats.log_q`` is ``log q(w)`` when ``q`` is given.
    """
    if w.dim() != 3 or w.shape[-1] != net.num_params:
        raise ValueError(f"draws must be [chains, draws, p={net.num_params}], got {tuple(w.shape)}")
    net.check_data(X, y)
    if X.shape[0] == 0:
        raise ValueError("no observations: LOO, WAIC and the k-hat need at least one datum")
    dtype = w.dtype
    X = X.to(dtype=dtype if X.is_floating_point() else X.dtype, device=w.device)  # token ids stay integers
    y = y.to(device=w.device, dtype=dtype if y.is_floating_point() else y.dtype)
    prior = (prior if prior is not None else net.default_prior(dtype, w.device)).to(w.device, dtype)
    if prior.dim != net.num_params:
        raise ValueError(f"prior has {prior.dim} coordinates but the network has p={net.num_params}")
    C, D, p = w.shape
    flat = w.reshape(C * D, p)
    N = X.shape[0]
    chunk = _chunk_size(net, N)
    gen = torch.Generator(device=w.device).manual_seed(int(seed) + 1)
    ll_parts, yrep_parts = [], []
    with torch.no_grad():
        for a in range(0, C * D, chunk):
            out = net.forward(flat[a : a + chunk], X)
            ll_parts.append(net.output_dist(out, noise_scale).log_prob(y))
            yrep_parts.append(_sample_y(net, out, gen, noise_scale))
        ll = torch.cat(ll_parts)  # [S, N]
        yrep = torch.cat(yrep_parts)
        log_prior = prior.log_prob(flat)
        lp = log_prior + ll.sum(-1)
        # a PointMass has no density: no log_q (its draws all equal the point)
        log_q = q.to(w.device, dtype).log_prob(flat) if q is not None and not isinstance(q, PointMass) else None

    dims, coords = block_dims(net)
    coords = dict(coords) | {"obs": np.arange(N)}
    post = {b.name: v.reshape(C, D, *b.shape).cpu().numpy() for b, v in
            zip(net.layout, (flat[:, b.offset : b.stop] for b in net.layout))}
    obs_dims = ["obs"] if yrep.dim() == 2 else ["obs", "obs_output"]
    if yrep.dim() == 3:
        coords["obs_output"] = np.arange(yrep.shape[-1])
    # densities in float64 whatever the draws' dtype: ArviZ's PSIS smoothing in float32 returns NaN for
    # observations whose log-likelihood is 0.0 in every draw (seen on broad tempered posteriors)
    stats = {"lp": lp.reshape(C, D).double().cpu().numpy(),
             "log_prior": log_prior.reshape(C, D).double().cpu().numpy()}
    if log_q is not None:
        stats["log_q"] = log_q.reshape(C, D).double().cpu().numpy()
    all_dims = dict(dims) | {"y": obs_dims}
    const = {"X": X.cpu().numpy()} if include_x else None
    if include_x:
        all_dims["X"] = ["obs", "feature"]
        coords["feature"] = np.arange(X.shape[-1])
    base_attrs = {
        "net_config": _json(net.config()),
        "p": int(net.num_params),
        "likelihood": net.likelihood,
        "num_observations": int(N),
        "prior_source": _json(prior.meta.get("source", prior.kind)),
        "seed": int(seed),
        "inference_library": "pyro-distill",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    idata = az.from_dict(
        posterior=post,
        posterior_predictive={"y": yrep.reshape(C, D, *yrep.shape[1:]).cpu().numpy()},
        log_likelihood={"y": ll.reshape(C, D, N).double().cpu().numpy()},
        sample_stats=stats,
        observed_data={"y": y.cpu().numpy()},
        constant_data=const,
        coords=coords,
        dims=all_dims,
        attrs=base_attrs | {k: (v if isinstance(v, int | float | str) else _json(v)) for k, v in (attrs or {}).items()},
    )
    return idata


def to_inference_data(net: BayesianNet, gaussian: Gaussian, X: torch.Tensor, y: torch.Tensor, draws: int = 1000,
                      chains: int | None = None, seed: int = 0, source: str | Mapping[str, Any] | None = None,
                      prior: Gaussian | None = None, noise_scale: float | None = None,
                      include_x: bool = True) -> az.InferenceData:
    """``az.InferenceData`` of ``draws x chains`` draws of ``gaussian`` for ``net`` on data ``(X, y)``.

    Groups: ``posterior`` (one variable per layout block, dims from :func:`block_dims`),
    ``posterior_predictive`` and ``log_likelihood`` (variable ``y``, dims ``chain, draw, obs``; the
    log-likelihood is ``net.log_likelihood`` pointwise), ``observed_data``, ``constant_data`` (``X``),
    ``sample_stats`` (``lp``, ``log_prior``, ``log_q``). Attributes: ``net_config`` (JSON), ``source``
    (``gaussian.meta`` as JSON unless ``source`` is given), ``gaussian_kind``, ``draws``, ``seed``.
    ``prior`` is the prior in ``lp`` (default: the net's fan-in prior); pass a student's own prior.
    Draws are independent, so the "chains" only split them for ArviZ: with ``chains=None`` ``draws`` is the total,
    split by :func:`chain_split` (1,000 -> 4 chains x 250), so that ``az.summary`` gives a finite r_hat.
    """
    if chains is None:
        chains, draws = chain_split(draws)
    if draws < 1 or chains < 1:
        raise ValueError(f"draws and chains must be positive, got draws={draws}, chains={chains}")
    if gaussian.dim != net.num_params:
        raise ValueError(f"the Gaussian has {gaussian.dim} coordinates but {net!r} has p={net.num_params}: "
                         "it belongs to another architecture")
    if gaussian.layout is not None and gaussian.layout != net.layout:
        raise ValueError(f"the Gaussian's layout {gaussian.layout} does not match the network's {net.layout}")
    if X.is_floating_point() and gaussian.dtype != X.dtype:
        gaussian = gaussian.to(dtype=X.dtype)
    w = _draws(gaussian, draws, chains, seed)
    src = gaussian.meta if source is None else source
    attrs = {"source": _json(src), "gaussian_kind": gaussian.kind, "draws": int(draws), "chains": int(chains)}
    return idata_from_draws(net, w, X, y, prior=prior, q=gaussian, seed=seed, attrs=attrs, noise_scale=noise_scale,
                            include_x=include_x)


def posterior_only_idata(net: BayesianNet, w: torch.Tensor, attrs: Mapping[str, Any] | None = None
                         ) -> az.InferenceData:
    """An InferenceData with only the ``posterior`` group, for draws ``w`` ``[chains, draws, p]`` of ``net``
    (e.g. a teacher's draws restricted to the coordinates a student keeps, named as the student's)."""
    if w.dim() != 3 or w.shape[-1] != net.num_params:
        raise ValueError(f"draws must be [chains, draws, p={net.num_params}], got {tuple(w.shape)}")
    dims, coords = block_dims(net)
    C, D, _ = w.shape
    post = {b.name: w[..., b.offset : b.stop].reshape(C, D, *b.shape).cpu().numpy() for b in net.layout}
    return az.from_dict(posterior=post, dims=dims, coords=coords, attrs=dict(attrs or {}))


def weights_from_idata(idata: az.InferenceData, net: BayesianNet) -> torch.Tensor:
    """The flat draws ``[chains, draws, p]`` back from the ``posterior`` group (float64)."""
    post = idata.posterior
    missing = [n for n in net.layout.names if n not in post]
    if missing:
        raise ValueError(f"the posterior group lacks blocks {missing}: was it made for another architecture?")
    parts = {n: torch.as_tensor(post[n].values, dtype=torch.float64) for n in net.layout.names}
    return net.layout.flatten(parts)


# ============================================================================ saving
def save_idata(folder: str | os.PathLike, idata: az.InferenceData, overwrite: bool = False,
               filename: str = IDATA_FILE) -> Path:
    """Write ``folder/idata.nc`` atomically (:func:`pyro_distill.store.atomic_write`); ``az.from_netcdf`` opens it.
    Refuses to replace an existing file unless ``overwrite``."""
    path = Path(folder) / filename
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return atomic_write(path, lambda tmp: idata.to_netcdf(tmp, engine="h5netcdf"))


def load_idata(path: str | os.PathLike) -> az.InferenceData:
    """Open a saved ``idata.nc`` (a model folder or the file) fully into memory."""
    path = Path(path)
    if path.is_dir():
        path = path / IDATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `pyro-distill diagnose {path.parent}` first")
    try:
        idata = az.from_netcdf(path)
        for g in idata.groups():
            getattr(idata, g).load()
    except (OSError, ValueError, KeyError) as exc:  # h5py/netCDF raise OSError for a damaged file
        raise ValueError(f"{path} is corrupt or not a netCDF InferenceData ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it or rerun `pyro-distill diagnose "
                         f"{path.parent} --overwrite` to rebuild it from posterior.pt") from exc
    return idata


def data_fingerprint(X: torch.Tensor, y: torch.Tensor) -> str:
    """``"sha256:<hex>"`` of the data's dtypes, shapes and bytes (what an idata.nc records of its data)."""
    import hashlib

    h = hashlib.sha256()
    for t in (X, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()}"
