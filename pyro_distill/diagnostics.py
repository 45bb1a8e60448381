"""ArviZ diagnostics of a Gaussian posterior over a network's flat weights, before and after removal.

* :func:`to_inference_data` turns ``(net, q, X, y)`` into an ``az.InferenceData``: ``posterior`` (one
  variable per layout block, with named dims), ``posterior_predictive``, pointwise ``log_likelihood``,
  ``observed_data``, ``constant_data`` and ``sample_stats`` (``lp = log p(w, D)``, ``log_q``), so LOO,
  WAIC and the posterior k-hat can all be recomputed from a saved file.
* :func:`posterior_khat`: the Pareto k-hat of the importance ratios ``log p(w, D) - log q(w)`` over draws
  of ``q`` (Yao et al. 2018, "Yes, but did it work?"): k < 0.5 good, 0.5-0.7 usable, > 0.7 unreliable.
* :func:`diagnose`: PSIS-LOO, WAIC, ``az.compare`` and the k-hat of several models (teacher, the
  conditioned teacher = the student prior, students) on the same data, as one table.
* :func:`nuts_reference` / :func:`compare_to_reference`: Pyro NUTS on the network's own Pyro model as
  the reference posterior of a small net, and how far the SVI Gaussian is from it.

LOO, WAIC and k-hat are computed on the data the posterior was fitted to (the training split): that
is what they estimate. The test split enters only as a held-out log predictive density.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .gaussian import Gaussian
from .nets.base import BayesianNet

with warnings.catch_warnings():  # arviz 0.23 announces its 1.0 refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "to_inference_data",
    "idata_from_draws",
    "weights_from_idata",
    "posterior_only_idata",
    "block_dims",
    "save_idata",
    "load_idata",
    "diagnose_model_folder",
    "KhatResult",
    "posterior_khat",
    "khat_from_idata",
    "khat_reading",
    "ModelDiagnosis",
    "diagnose_idata",
    "diagnose",
    "format_table",
    "nuts_reference",
    "LogJointPotential",
    "reference_summary",
    "compare_to_reference",
    "load_data_spec",
    "restricted_prior",
    "student_to_teacher_index",
    "student_prior_idata",
    "surgery_of",
    "find_teacher",
    "diagnose_run",
    "split_seed",
    "format_run_table",
]

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
        log_q = q.to(w.device, dtype).log_prob(flat) if q is not None else None

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
               filename: str = "idata.nc") -> Path:
    """Write ``folder/idata.nc`` atomically (temporary file + rename); ``az.from_netcdf`` opens it.
    Refuses to replace an existing file unless ``overwrite``."""
    folder = Path(folder)
    path = folder / filename
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    from .store import file_mode, storage_error

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{filename}.pd-{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    try:
        idata.to_netcdf(tmp, engine="h5netcdf")
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the file follows the umask like any other
        os.replace(tmp, path)
    except OSError as exc:
        err = storage_error(exc, path)
        if err is None:
            raise
        raise err from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_idata(path: str | os.PathLike) -> az.InferenceData:
    """Open a saved ``idata.nc`` (a model folder or the file) fully into memory."""
    path = Path(path)
    if path.is_dir():
        path = path / "idata.nc"
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


def load_data_spec(spec: Mapping[str, Any] | str):
    """A :class:`pyro_distill.data.Dataset` from a data spec: ``{"name": "digits", "split_seed": 0}`` (or the
    name alone). Optional ``"fraction"`` (+ ``"subsample_seed"``) takes a training subsample."""
    from . import data as dmod

    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.get("name")
    makers = {"digits": dmod.digits, "synthetic_regression": dmod.synthetic_regression,
              "synthetic_classification": dmod.synthetic_classification, "fashion_mnist": _fashion_mnist_spec(spec)}
    if name not in makers:
        raise ValueError(f"unknown data set {name!r} in the data spec; known: {sorted(makers)} "
                         "(set card.json's \"data\" or pass --data)")
    seed = int(spec.get("split_seed", spec.get("seed", 0)))
    ds = makers[name](seed=seed)
    if spec.get("fraction") not in (None, 1, 1.0):
        ds = dmod.subsample(ds, float(spec["fraction"]), seed=int(spec.get("subsample_seed", 0)))
    return ds


def _fashion_mnist_spec(spec: Mapping[str, Any]):
    """Fashion-MNIST as a spec names it (``dir``, ``pca`` = 50, ``max_train`` = 0: the experiment defaults)."""

    def make(seed: int = 0):
        from .data.idx import fashion_mnist

        return fashion_mnist(spec.get("dir") or None, pca=int(spec.get("pca", 50)),
                             max_train=int(spec.get("max_train", 0)), seed=seed)

    return make


def _resolve_prior(folder: Path, net: BayesianNet, card: Mapping[str, Any]) -> tuple[Gaussian, str]:
    """The prior a model was fitted under: ``prior.pt`` in its folder, ``card["prior_path"]``, else the
    net's default (fan-in) prior."""
    from . import gaussian as gmod

    for cand in (folder / "prior.pt", card.get("prior_path")):
        if cand and Path(cand).exists():
            return gmod.load(cand, layout=net.layout), str(cand)
    return net.default_prior(), "default prior"


def diagnose_model_folder(folder: str | os.PathLike, X: torch.Tensor | None = None, y: torch.Tensor | None = None,
                          draws: int = 1000, seed: int = 0, prior: Gaussian | None = None, overwrite: bool = False,
                          save: bool = True) -> az.InferenceData:
    """Build (and by default save as ``folder/idata.nc``) the InferenceData of a model folder written by
    :func:`pyro_distill.store.save_model`. ``X, y`` default to the training split of the card's data spec.
    A saved file made with the same draws, seed and data is reused; a different one is not silently
    replaced (``overwrite=True`` replaces it). The file records the fingerprints of posterior.pt and of the
    data (attributes ``posterior_sha256``, ``data_sha256``); one made from another posterior or other data
    (or before fingerprints were recorded) is stale: it is rebuilt (and replaced when ``save``), with a
    RuntimeWarning, never reused."""
    from .store import FINGERPRINT_KEY, IDATA_FILE, MODEL_FILE, fingerprint, load_model

    folder = Path(folder)
    net, q, card = load_model(folder)  # checks posterior.pt against the card's fingerprint
    post_fp = card.get(FINGERPRINT_KEY) or fingerprint(folder / MODEL_FILE)
    if X is None or y is None:
        if not isinstance(card.get("data"), dict):
            raise ValueError(f"{folder}/card.json has no \"data\" spec (a dict like {{\"name\": \"digits\", "
                             "\"split_seed\": 0}): pass X, y (CLI: --data digits)")
        ds = load_data_spec(card["data"])
        X, y = ds.X, ds.y
    path = folder / IDATA_FILE
    data_fp = data_fingerprint(X, y)
    if path.exists() and not overwrite:
        old = load_idata(path)
        a = old.attrs
        if a.get("posterior_sha256") != post_fp or a.get("data_sha256") != data_fp:
            what = "posterior.pt" if a.get("posterior_sha256") != post_fp else "data"
            warnings.warn(f"{path} was made from another {what} than the current one (fingerprint "
                          f"{str(a.get('posterior_sha256' if what == 'posterior.pt' else 'data_sha256'))[:19]}); "
                          "it is stale and is rebuilt", RuntimeWarning, stacklevel=2)
            overwrite = True
        elif (int(a.get("draws", 0)) * int(a.get("chains", 1)) == draws and a.get("seed") == seed
              and a.get("num_observations") == X.shape[0]):
            return old
        elif save:
            raise FileExistsError(f"{path} was made with draws={a.get('draws')}, seed={a.get('seed')}, "
                                  f"N={a.get('num_observations')}; pass overwrite=True (--overwrite) to replace it")
    pr, pr_src = (prior, prior.meta.get("source", "given")) if prior is not None else _resolve_prior(folder, net, card)
    idata = to_inference_data(net, q, X, y, draws=draws, seed=seed, prior=pr)
    idata.attrs["model_folder"] = str(folder)
    idata.attrs["prior_path"] = str(pr_src)
    idata.attrs["posterior_sha256"] = post_fp
    idata.attrs["data_sha256"] = data_fp
    if save:
        save_idata(folder, idata, overwrite=overwrite)
    return idata


# ============================================================================ k-hat of q
def khat_reading(k: float) -> str:
    """Yao et al. (2018): k < 0.5 good, 0.5-0.7 usable, > 0.7 unreliable."""
    if not math.isfinite(k) and k < 0:
        return "good (constant ratios: q equals the target)"
    if k < 0.5:
        return "good"
    if k <= 0.7:
        return "usable"
    return "unreliable"


@dataclass
class KhatResult:
    """Pareto k-hat of ``log p(w, D) - log q(w)`` over ``n`` draws of q, its reading, and the PSIS
    effective sample size of the normalized smoothed weights."""

    k: float
    reading: str
    n: int
    ess: float

    def __str__(self) -> str:
        return f"k-hat = {self.k:.2f} ({self.reading}; PSIS ESS {self.ess:.0f} of {self.n})"


def _khat(log_ratio: np.ndarray) -> KhatResult:
    lw = np.asarray(log_ratio, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(lw)):
        raise ValueError("log p(w, D) - log q(w) is not finite for some draws; check the prior and the data")
    n = lw.size
    spread = float(lw.max() - lw.min())
    if spread <= 1e-9 * max(1.0, float(np.abs(lw).max())):
        return KhatResult(float("-inf"), khat_reading(float("-inf")), n, float(n))
    with np.errstate(over="ignore"), warnings.catch_warnings():  # k = inf for a hopeless q: reported as such
        warnings.simplefilter("ignore", RuntimeWarning)
        slw, k = az.psislw(lw - lw.max(), reff=1.0)
    w = np.exp(slw - slw.max())
    w /= w.sum()
    k = float(k)
    return KhatResult(k, khat_reading(k), n, float(1.0 / np.sum(w**2)))


def khat_from_idata(idata: az.InferenceData) -> KhatResult:
    """The posterior k-hat from a saved InferenceData (needs ``sample_stats.lp`` and ``log_q``)."""
    ss = idata.get("sample_stats")
    if ss is None or "lp" not in ss or "log_q" not in ss:
        raise ValueError("this InferenceData has no sample_stats.lp / log_q (it was not made from a Gaussian q)")
    return _khat((ss["lp"] - ss["log_q"]).values)


def posterior_khat(net: BayesianNet, q: Gaussian, X: torch.Tensor, y: torch.Tensor, prior: Gaussian | None = None,
                   draws: int = 1000, seed: int = 0) -> KhatResult:
    """Pareto k-hat of ``log p(w, D) - log q(w)``, ``w ~ q`` (``p(w, D)`` = ``prior`` times the likelihood
    of ``(X, y)``), via ArviZ's PSIS. Measures how well q approximates ``p(w | D)`` as a whole."""
    X = X.to(q.dtype) if X.is_floating_point() else X
    w = _draws(q, draws, 1, seed).reshape(draws, -1)
    prior = (prior if prior is not None else net.default_prior(q.dtype, q.device)).to(q.device, q.dtype)
    with torch.no_grad():
        chunk = _chunk_size(net, X.shape[0])
        ll = torch.cat([net.log_likelihood(w[a : a + chunk], X, y).sum(-1) for a in range(0, draws, chunk)])
        lr = prior.log_prob(w) + ll - q.log_prob(w)
    return _khat(lr.cpu().numpy())


# ============================================================================ before / after table
@dataclass
class ModelDiagnosis:
    """One row of the diagnose table."""

    name: str
    p: int
    n_obs: int
    elpd_loo: float
    se_loo: float
    p_loo: float
    loo_k_max: float
    loo_k_bad: int  # observations with pointwise k > 0.7
    elpd_waic: float
    se_waic: float
    p_waic: float
    khat_q: float
    khat_reading: str
    khat_ess: float
    test_lpd: float | None = None  # mean held-out log predictive density per datum
    test_acc: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _test_metrics(idata_like: tuple[BayesianNet, torch.Tensor], Xte: torch.Tensor, yte: torch.Tensor) -> tuple:
    net, w = idata_like
    flat = w.reshape(-1, w.shape[-1])
    Xte = Xte.to(flat.dtype) if Xte.is_floating_point() else Xte  # token ids stay integers
    chunk = _chunk_size(net, Xte.shape[0])
    with torch.no_grad():
        ll = torch.cat([net.log_likelihood(flat[a : a + chunk], Xte, yte) for a in range(0, flat.shape[0], chunk)])
        lpd = float((torch.logsumexp(ll, 0) - math.log(ll.shape[0])).mean())
        acc = None
        if net.likelihood == "categorical" and yte.dim() == 1:  # one label per datum (not a token sequence)
            probs = sum(torch.softmax(net.forward(flat[a : a + chunk], Xte), -1).sum(0)
                        for a in range(0, flat.shape[0], chunk)) / flat.shape[0]
            acc = float((probs.argmax(-1) == yte).double().mean())
    return lpd, acc


def diagnose_idata(name: str, idata: az.InferenceData, net: BayesianNet | None = None,
                   Xte: torch.Tensor | None = None, yte: torch.Tensor | None = None) -> ModelDiagnosis:
    """LOO, WAIC and the q k-hat of one InferenceData (plus held-out metrics when ``net, Xte, yte``)."""
    msgs: list[str] = []
    ll = idata.log_likelihood["y"]
    if ll.dtype != np.float64:  # a file written in float32 before densities were kept in float64
        idata.log_likelihood["y"] = ll.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same facts are reported below as table warnings
        loo = az.loo(idata, pointwise=True, reff=loo_reff(idata))
        waic = az.waic(idata)
    if loo.warning:
        msgs.append("LOO: some pointwise Pareto k > 0.7 (PSIS-LOO unreliable for those observations)")
    if waic.warning:
        msgs.append("WAIC: posterior variance of log p(y_i | w) > 0.4 for some observations (prefer LOO)")
    kq = khat_from_idata(idata)
    pk = np.asarray(loo.pareto_k)
    lpd = acc = None
    if net is not None and Xte is not None and yte is not None:
        w_dtype = idata.posterior[net.layout.names[0]].dtype  # the draws' own precision
        lpd, acc = _test_metrics((net, weights_from_idata(idata, net).to(
            torch.float32 if w_dtype == np.float32 else torch.float64)), Xte, yte)
    if kq.k > 0.7:
        msgs.append("q k-hat > 0.7: the Gaussian is far from this model's exact posterior")
    return ModelDiagnosis(
        name=name, p=int(idata.attrs.get("p", -1)), n_obs=int(pk.size), elpd_loo=float(loo.elpd_loo),
        se_loo=float(loo.se), p_loo=float(loo.p_loo), loo_k_max=float(pk.max()), loo_k_bad=int((pk > 0.7).sum()),
        elpd_waic=float(waic.elpd_waic), se_waic=float(waic.se), p_waic=float(waic.p_waic), khat_q=kq.k,
        khat_reading=kq.reading, khat_ess=kq.ess, test_lpd=lpd, test_acc=acc, warnings=msgs)


def diagnose(models: Mapping[str, tuple[BayesianNet, Gaussian, Gaussian | None]], X: torch.Tensor, y: torch.Tensor,
             Xte: torch.Tensor | None = None, yte: torch.Tensor | None = None, draws: int = 1000, seed: int = 0,
             idatas: Mapping[str, az.InferenceData] | None = None):
    """The before/after table: for each ``name -> (net, q, prior)`` (prior = what ``p(w, D)`` uses; None =
    fan-in) on the SAME training data ``(X, y)``: PSIS-LOO, WAIC, the q k-hat; held-out lpd and accuracy
    when ``Xte, yte``; and ``az.compare`` across them. Precomputed InferenceData may be passed in ``idatas``.

    Returns ``(rows, idatas, compare_df)`` (``compare_df`` is None with fewer than two models).
    """
    out_idata: dict[str, az.InferenceData] = {}
    rows = []
    for name, (net, q, prior) in models.items():
        idata = (idatas or {}).get(name) or to_inference_data(net, q, X, y, draws=draws, seed=seed, prior=prior)
        out_idata[name] = idata
        rows.append(diagnose_idata(name, idata, net, Xte, yte))
    cmp = None
    if len(out_idata) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmp = az.compare(dict(out_idata), ic="loo")
    return rows, out_idata, cmp


def format_table(rows: Sequence[ModelDiagnosis], compare=None) -> str:
    """A plain-text table: elpd_loo (se), p_loo, pointwise LOO k, WAIC, q k-hat with its reading, test
    metrics, and ``az.compare``'s elpd difference and weight when given; warnings listed underneath."""
    nw = max([22] + [len(r.name) for r in rows])
    head = (f"{'model':<{nw}} {'p':>6} {'elpd_loo':>10} {'se':>7} {'p_loo':>7} {'LOO k>0.7':>9} {'elpd_waic':>10} "
            f"{'q k-hat':>8}  {'reading':<11} {'test lpd/N':>10} {'test acc':>8}")
    if compare is not None:
        head += f" {'d_elpd':>8} {'dse':>6} {'weight':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t_lpd = f"{r.test_lpd:10.4f}" if r.test_lpd is not None else f"{'-':>10}"
        t_acc = f"{r.test_acc:8.4f}" if r.test_acc is not None else f"{'-':>8}"
        line = (f"{r.name:<{nw}} {r.p:>6} {r.elpd_loo:10.1f} {r.se_loo:7.1f} {r.p_loo:7.1f} "
                f"{r.loo_k_bad:>4}/{r.n_obs:<4} {r.elpd_waic:10.1f} {r.khat_q:8.2f}  "
                f"{r.khat_reading.split(' ')[0]:<11} "
                f"{t_lpd} {t_acc}")
        if compare is not None and r.name in compare.index:
            c = compare.loc[r.name]
            line += f" {c['elpd_diff']:8.1f} {c['dse']:6.1f} {c['weight']:6.2f}"
        lines.append(line)
    lines.append("q k-hat: Pareto k of log p(w, D) - log q(w) over draws of q (Yao et al. 2018): "
                 "< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable.")
    for r in rows:
        for m in r.warnings:
            lines.append(f"warning [{r.name}]: {m}")
    return "\n".join(lines)


# ============================================================================ surgery helpers
def student_to_teacher_index(ops: Sequence, teacher: BayesianNet) -> torch.Tensor:
    """For each student flat coordinate, the teacher flat coordinate it came from (operations replayed)."""
    net = teacher
    idx = torch.arange(teacher.num_params)
    for op in ops:
        idx = idx[op.keep(net)]
        net = op.architecture(net)
    return idx


def restricted_prior(teacher: BayesianNet, ops: Sequence, prior: Gaussian | None = None) -> Gaussian:
    """The teacher's prior on the coordinates the student keeps. For an independent teacher prior, the
    exact teacher posterior conditioned on the removed coordinates IS the student's posterior under this
    prior, so it is the target against which the conditioned teacher (student prior) is judged."""
    prior = prior if prior is not None else teacher.default_prior(torch.float64)
    g = prior.marginalize(student_to_teacher_index(ops, teacher))
    g.meta = {"source": "teacher prior restricted to the student's coordinates"}
    return g


def student_prior_idata(student: BayesianNet, student_prior: Gaussian, teacher: BayesianNet,
                        teacher_prior: Gaussian, ops: Sequence, X: torch.Tensor, y: torch.Tensor,
                        draws: int = 1000, seed: int = 0, teacher_name: str = "") -> tuple[az.InferenceData, Gaussian]:
    """The InferenceData of a student's prior (the conditioned teacher, before any training) on ``(X, y)``,
    with ``lp`` under the teacher's prior restricted to the student's coordinates (its exact target, see
    :func:`restricted_prior`); returns ``(idata, that target)`` in ``X``'s dtype."""
    target = restricted_prior(teacher, ops, teacher_prior.to(dtype=torch.float64)).to(dtype=X.dtype)
    idata = to_inference_data(student, student_prior.to(dtype=X.dtype), X, y, draws=draws, seed=seed, prior=target,
                              source={"source": "conditioned teacher (student prior)", "teacher": teacher_name})
    return idata, target


def surgery_of(card: Mapping[str, Any], prior: Gaussian | None = None) -> list[dict] | None:
    """The surgery (a list of operation dicts) that made a student: from its prior's metadata, else the
    card's ``plan`` / ``surgery`` entry; None for a model made without surgery."""
    if prior is not None and prior.meta.get("surgery"):
        return list(prior.meta["surgery"])
    for key in ("plan", "surgery"):
        v = card.get(key)
        if isinstance(v, dict) and "ops" in v:
            return list(v["ops"])
        if isinstance(v, list):
            return v
    return None


def find_teacher(ops_d: Sequence[Mapping[str, Any]], student: BayesianNet,
                 candidates: Mapping[str, BayesianNet]) -> tuple[str, list] | None:
    """The first of ``candidates`` (name -> net) that ``ops_d`` turns into ``student``'s architecture,
    with the rebuilt operations; None when none does."""
    from .surgery import operation_from_dict

    ops = [operation_from_dict(d) for d in ops_d]
    for name, net in candidates.items():
        t = net
        try:
            for op in ops:
                t = op.architecture(t)
        except Exception:  # noqa: BLE001 - not this model's plan
            continue
        if t.config() == student.config() and net.config() != student.config():
            return name, ops
    return None


# ============================================================================ a run's model folders
_SEED_RE = re.compile(r"^(?P<group>.+)-seed(?P<seed>\d+)$")


def split_seed(name: str) -> tuple[str, int]:
    """``"teacher-seed3" -> ("teacher", 3)``: a runner's model folder name as (group, seed); seed 0 without
    the suffix."""
    m = _SEED_RE.match(name)
    return (m["group"], int(m["seed"])) if m else (name, 0)

#: the per-model numbers aggregated over seeds by :func:`diagnose_run`
RUN_COLUMNS = ("elpd_loo_per_obs", "p_loo", "loo_k_bad_share", "khat_q", "test_lpd", "test_acc")


def diagnose_run(folder: str | os.PathLike, draws: int = 1000, seed: int = 0, overwrite: bool = False,
                 save: bool = True, prior_rows: bool = True, progress: bool = False,
                 keep_seed: int | None = None) -> dict[str, Any]:
    """Diagnose every model folder of an experiment run (``models/<experiment>-<timestamp>/<model>-seed<k>``,
    as written by the runner), each on its own data (its card's data spec: a student at 10% data is judged
    on its 10% subsample), plus, for each student whose folder holds its prior and whose teacher (same
    seed) is in the run, a row for that prior: the conditioned teacher, judged against the teacher's
    prior restricted to the student's coordinates.

    Returns ``{"rows": [per model and seed], "groups": {group: {column: [values over seeds]}}}``; group =
    folder name without ``-seed<k>`` (``+ " prior"`` for prior rows). Use :func:`format_run_table`. With
    ``keep_seed``, the models of that seed are also returned, for figures, under ``"kept"``: ``{"models":
    {name: {"net", "q", "prior", "idata"}}, "relations": [(student, teacher, ops)]}`` (not JSON).
    """
    from .store import load_model

    folder = Path(folder)
    subs = sorted(d for d in folder.iterdir() if (d / "card.json").exists()) if folder.is_dir() else []
    if not subs:
        raise FileNotFoundError(f"{folder} holds no model folders (subfolders with card.json); "
                                "diagnose_run takes models/<experiment>-<timestamp>")
    entries: dict[str, dict[str, Any]] = {}
    for d in subs:
        group, s = split_seed(d.name)
        net, q, card = load_model(d)
        prior, src = _resolve_prior(d, net, card)
        if not isinstance(card.get("data"), dict):
            raise ValueError(f"{d}/card.json has no \"data\" spec; diagnose it with `pyro-distill diagnose {d} "
                             "--data ...`")
        entries[d.name] = {"folder": d, "group": group, "seed": s, "net": net, "q": q, "card": card,
                           "prior": prior, "has_prior": src != "default prior"}
    data_cache: dict[str, Any] = {}

    def data(spec: Mapping[str, Any]):
        key = json.dumps(spec, sort_keys=True)
        if key not in data_cache:
            data_cache[key] = load_data_spec(spec)
        return data_cache[key]

    rows: list[dict[str, Any]] = []
    kept: dict[str, Any] = {"models": {}, "relations": []}
    teacher_groups: set[str] = set()
    for name, e in entries.items():
        if progress:
            print(f"  {name}", flush=True)
        ds = data(e["card"]["data"])
        idata = diagnose_model_folder(e["folder"], ds.X, ds.y, draws=draws, seed=seed, prior=e["prior"],
                                      overwrite=overwrite, save=save)
        keep = keep_seed is not None and e["seed"] == keep_seed
        if keep:
            kept["models"][name] = {"net": e["net"], "q": e["q"], "prior": e["prior"], "idata": idata}
        rows.append({"group": e["group"], "seed": e["seed"], "model": name}
                    | diagnose_idata(name, idata, e["net"], ds.Xte, ds.yte).to_dict())
        ops_d = surgery_of(e["card"], e["prior"] if e["has_prior"] else None)
        if not (prior_rows and e["has_prior"] and ops_d):
            continue
        same_seed = {n: t["net"] for n, t in entries.items() if t["seed"] == e["seed"] and n != name}
        found = find_teacher(ops_d, e["net"], same_seed)
        if not found:
            continue
        tname, ops = found
        teacher = entries[tname]
        teacher_groups.add(teacher["group"])
        pid, target = student_prior_idata(e["net"], e["prior"], teacher["net"], teacher["prior"], ops, ds.X, ds.y,
                                          draws=draws, seed=seed, teacher_name=tname)
        rows.append({"group": f"{e['group']} prior", "seed": e["seed"], "model": f"{name} prior"}
                    | diagnose_idata(f"{name} prior", pid, e["net"], ds.Xte, ds.yte).to_dict())
        if keep:
            kept["models"][f"{name} prior"] = {"net": e["net"], "q": e["prior"], "prior": target, "idata": pid}
            kept["relations"].append((name, tname, ops))
    groups: dict[str, dict[str, list]] = {}
    for r in rows:
        g = groups.setdefault(r["group"], {"p": [], "n_obs": [], "seeds": []} | {c: [] for c in RUN_COLUMNS})
        g["p"].append(r["p"])
        g["n_obs"].append(r["n_obs"])
        g["seeds"].append(r["seed"])
        g["elpd_loo_per_obs"].append(r["elpd_loo"] / r["n_obs"])
        g["p_loo"].append(r["p_loo"])
        g["loo_k_bad_share"].append(r["loo_k_bad"] / r["n_obs"])
        g["khat_q"].append(r["khat_q"])
        g["test_lpd"].append(r["test_lpd"])
        g["test_acc"].append(r["test_acc"])
    out = {"folder": str(folder), "draws": draws, "seed": seed, "rows": rows, "groups": groups,
           "teachers": sorted(teacher_groups)}
    if keep_seed is not None:
        out["kept"] = kept
    return out


def format_run_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`diagnose_run`'s groups: mean +- sd over seeds (the q k-hat as median and
    range, with its reading); teachers first, then each student's prior (the conditioned teacher) just
    above the student."""
    def ms(v: Sequence[float | None], fmt: str) -> str:
        v = [x for x in v if x is not None]
        if not v:
            return "-"
        a = np.asarray(v, dtype=float)
        fin = a[np.isfinite(a)]
        if fin.size == 0:
            return "n/a"
        cell = f"{fin.mean():{fmt}} ± {fin.std(ddof=1):{fmt}}" if fin.size > 1 else f"{fin[0]:{fmt}}"
        return cell if fin.size == a.size else f"{cell} ({fin.size} of {a.size} finite)"

    groups = result["groups"]
    teachers = [g for g in result.get("teachers", []) if g in groups]
    order = list(teachers)
    for g in sorted(n for n in groups if n not in teachers and not n.endswith(" prior")):
        order += [n for n in (f"{g} prior", g) if n in groups]
    order += [n for n in groups if n not in order]
    lines = ["| model | seeds | p | N | elpd_loo / N | p_loo | LOO k > 0.7 | q k-hat (median, range) | "
             "test lpd / N | test acc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        g = groups[name]
        k = np.asarray(g["khat_q"], dtype=float)
        kcell = f"{np.median(k):.2f} [{k.min():.2f}, {k.max():.2f}] {khat_reading(float(np.median(k))).split(' ')[0]}"
        lines.append(f"| {name} | {len(g['seeds'])} | {g['p'][0]} | {g['n_obs'][0]} | "
                     f"{ms(g['elpd_loo_per_obs'], '.3f')} | {ms(g['p_loo'], '.0f')} | "
                     f"{ms([100 * x for x in g['loo_k_bad_share']], '.0f')}% | {kcell} | "
                     f"{ms(g['test_lpd'], '.3f')} | {ms(g['test_acc'], '.3f')} |")
    lines.append("")
    lines.append("mean ± sd over seeds. LOO, WAIC and the q k-hat on each model's own training data (N), test metrics "
                 "on the test split. q k-hat: Pareto k of log p(w, D) - log q(w) over draws of q (Yao et al. 2018): "
                 "< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable.")
    return "\n".join(lines)


# ============================================================================ NUTS reference
class _ValueWithGrad(torch.autograd.Function):
    """A scalar ``f(w)`` whose gradient was computed with it (``fn(w) -> (value, grad)``): autograd only
    multiplies the stored gradient, so a sampler's ``autograd.grad`` call costs one hand-written pass."""

    @staticmethod
    def forward(ctx, w, fn):
        value, grad = fn(w.detach())
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, g_out):
        (grad,) = ctx.saved_tensors
        return g_out * grad, None


class LogJointPotential:
    """``-log p(w, D)`` of ``net.model`` as a Pyro ``potential_fn`` over ``{"w": w}``: the same density
    (checked against the traced model in the tests) without tracing the model at every leapfrog step.
    The likelihood's gradient comes from ``net.log_likelihood_and_grad`` (a hand-written backward for an
    MLP: about 4x cheaper than autograd at p = 115, N = 500) and, for an independent prior, the prior's in
    closed form. Counts its calls (``calls``), so the mean number of leapfrog steps per NUTS iteration can
    be reported. Plain data: picklable for worker processes."""

    def __init__(self, net: BayesianNet, X: torch.Tensor, y: torch.Tensor, prior: Gaussian,
                 noise_scale: float | None = None):
        self.net, self.X, self.y, self.prior, self.noise_scale = net, X, y, prior, noise_scale
        self._prior_d = None
        self.calls = 0

    def __getstate__(self) -> dict[str, Any]:  # the net travels as its config (activations may be lambdas)
        keep = ("X", "y", "prior", "noise_scale", "calls")
        return {k: self.__dict__[k] for k in keep} | {"_prior_d": None, "net_config": self.net.config()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .nets.base import net_from_config

        state = dict(state)
        state["net"] = net_from_config(state.pop("net_config"))
        self.__dict__.update(state)

    def _setup(self) -> None:
        self._prior_d = self.prior.to_pyro()
        self._diag = self.prior.kind == "diag"
        if self._diag:  # log N(w; m, diag(v)) = const - 0.5 (w - m)^2 / v, gradient -(w - m) / v
            v = self.prior.variance
            self._m, self._prec = self.prior.mean, 1 / v
            self._const = -0.5 * (v.log().sum() + v.numel() * math.log(2 * math.pi))

    def _log_joint_and_grad(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ll, g = self.net.log_likelihood_and_grad(w, self.X, self.y, self.noise_scale)
        if self._diag:
            r = w - self._m
            return ll + self._const - 0.5 * (r.square() * self._prec).sum(), g - r * self._prec
        return ll, g

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self._prior_d is None:
            self._setup()
        self.calls += 1
        w = params["w"]
        lj = _ValueWithGrad.apply(w, self._log_joint_and_grad)
        return -lj if self._diag else -(lj + self._prior_d.log_prob(w))


def _nuts_chain(job: Mapping[str, Any]) -> dict[str, Any]:
    """One NUTS chain (module level, so that a spawned worker process can run it)."""
    import pyro
    from pyro.infer import MCMC, NUTS

    class _NUTS(NUTS):
        """NUTS whose warmup starts from a given inverse mass matrix instead of the identity (then finds a
        step size for it, as Pyro does after each adaptation window)."""

        def _initialize_adapter(self):
            super()._initialize_adapter()
            if job["inverse_mass"] is not None:
                m = job["inverse_mass"].to(self._potential_energy_last.dtype)
                self._adapter.mass_matrix_adapter.inverse_mass_matrix = {("w",): m}
                if self._adapter.adapt_step_size:
                    self._adapter.reset_step_size_adaptation(self._initial_params)

    if job["worker"]:
        torch.set_num_threads(1)  # one chain per core; the net is far too small for intra-op threads
    pot: LogJointPotential = job["potential"]
    pyro.set_rng_seed(job["rng_seed"])
    kernel = _NUTS(potential_fn=pot, max_tree_depth=job["max_tree_depth"],
                   target_accept_prob=job["target_accept_prob"], full_mass=job["full_mass"],
                   adapt_mass_matrix=job["adapt_mass"])
    mcmc = MCMC(kernel, num_samples=job["num_samples"], warmup_steps=job["warmup_steps"],
                initial_params={"w": job["start"]}, disable_progbar=not job["progress"])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mcmc.run()
    diag = mcmc.diagnostics()
    return {"w": mcmc.get_samples()["w"].detach(), "wall_s": time.perf_counter() - t0,
            "divergences": int(sum(len(v) for v in diag.get("divergences", {}).values())),
            "step_size": float(kernel.step_size),
            "grads_per_iter": pot.calls / (job["num_samples"] + job["warmup_steps"])}


def nuts_reference(net: BayesianNet, X: torch.Tensor, y: torch.Tensor, prior: Gaussian | None = None,
                   num_chains: int = 4, num_samples: int = 1000, warmup_steps: int = 500,
                   init: Gaussian | torch.Tensor | None = None, seed: int = 0, max_tree_depth: int = 8,
                   target_accept_prob: float = 0.8, full_mass: bool = False, mass_from_init: bool = False,
                   adapt_mass: bool = True, processes: int | None = None, noise_scale: float | None = None,
                   rhat_warn: float = 1.01, progress: bool = False) -> az.InferenceData:
    """Reference posterior of a small net by Pyro NUTS on the density of ``net.model`` (one site ``"w"``).

    Chains start at draws of ``init``: a Gaussian (e.g. the SVI fit: a network posterior has many
    symmetric modes, and chains started in different ones never mix; starting them near q compares q
    with the mode it sits in), given ``[chains, p]`` weights, or (``None``) draws of the prior. Chains run
    in ``processes`` spawned worker processes, one thread each (default: one per core, at most one per
    chain; ``1`` runs them one after another in this process). The mass matrix is diagonal, or dense with
    ``full_mass``; warmup adapts it starting from the identity, or, with ``mass_from_init`` and a Gaussian
    ``init``, from that Gaussian's (co)variance (``adapt_mass=False`` keeps it fixed: NUTS preconditioned
    by q).

    Returns InferenceData (as :func:`idata_from_draws`) whose ``attrs`` carry the wall time, divergences,
    step size and leapfrog steps per iteration of each chain, and the max R-hat / min bulk ESS; R-hat and
    ESS per block via :func:`reference_summary`. Warns when the max R-hat exceeds ``rhat_warn``.
    """
    dtype = X.dtype if X.is_floating_point() else torch.float64
    if num_chains < 1 or num_samples < 1 or warmup_steps < 0:
        raise ValueError(f"need num_chains >= 1, num_samples >= 1, warmup_steps >= 0; got {num_chains}, "
                         f"{num_samples}, {warmup_steps}")
    net.check_data(X, y)
    prior = (prior if prior is not None else net.default_prior(dtype, X.device)).to(X.device, dtype)
    if prior.dim != net.num_params:
        raise ValueError(f"prior has {prior.dim} coordinates but the network has p={net.num_params}")
    g = torch.Generator().manual_seed(seed)
    if init is None:
        starts = prior.sample(num_chains, generator=g)
    elif isinstance(init, Gaussian):
        if init.dim != net.num_params:
            raise ValueError(f"init has {init.dim} coordinates but the network has p={net.num_params}")
        starts = init.to(X.device, dtype).sample(num_chains, generator=g)
    else:
        init = torch.as_tensor(init, dtype=dtype)
        if init.numel() != num_chains * net.num_params:
            raise ValueError(f"init weights must be [num_chains={num_chains}, p={net.num_params}], "
                             f"got {tuple(init.shape)}")
        starts = init.reshape(num_chains, net.num_params)
    if processes is None:
        processes = min(num_chains, os.cpu_count() or 1)
    processes = max(1, min(int(processes), num_chains))
    inverse_mass = None
    if mass_from_init:
        if not isinstance(init, Gaussian):
            raise ValueError("mass_from_init needs a Gaussian init (e.g. the SVI fit) to take the mass matrix from")
        q0 = init.to(X.device, dtype)
        inverse_mass = q0.covariance() if full_mass else q0.variance
    elif not adapt_mass:
        raise ValueError("adapt_mass=False keeps the starting mass matrix: give one with mass_from_init=True")
    potential = LogJointPotential(net, X, y, prior, noise_scale)
    jobs = [{"potential": potential, "start": starts[c].detach().clone(), "rng_seed": seed * 1000 + c,
             "max_tree_depth": max_tree_depth, "target_accept_prob": target_accept_prob, "full_mass": full_mass,
             "inverse_mass": inverse_mass, "adapt_mass": adapt_mass,
             "num_samples": num_samples, "warmup_steps": warmup_steps, "worker": processes > 1,
             "progress": progress and processes == 1} for c in range(num_chains)]
    t0 = time.perf_counter()
    if processes == 1:
        results = []
        for job in jobs:
            potential.calls = 0
            results.append(_nuts_chain(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_nuts_chain, jobs))
    wall = time.perf_counter() - t0
    w = torch.stack([r["w"] for r in results]).to(dtype)
    info = {"nuts_wall_s": float(wall), "processes": processes,
            "divergences_per_chain": _json([r["divergences"] for r in results]),
            "step_size_per_chain": _json([round(r["step_size"], 5) for r in results]),
            "leapfrog_per_iter_per_chain": _json([round(r["grads_per_iter"], 1) for r in results])}
    idata = idata_from_draws(net, w, X, y, prior=prior, seed=seed, noise_scale=noise_scale,
                             attrs={"source": _json({"source": "nuts", "num_chains": num_chains,
                                                      "num_samples": num_samples, "warmup_steps": warmup_steps,
                                                      "max_tree_depth": max_tree_depth, "full_mass": full_mass,
                                                      "mass_from_init": mass_from_init, "adapt_mass": adapt_mass,
                                                      "init": "prior" if init is None else
                                                      ("gaussian" if isinstance(init, Gaussian) else "given")})}
                             | info)
    if num_chains > 1 and num_samples >= 4:
        summ = reference_summary(idata)
        rhat = max(s["rhat_max"] for s in summ.values())
        idata.attrs["rhat_max"] = rhat
        idata.attrs["ess_bulk_min"] = min(s["ess_bulk_min"] for s in summ.values())
        if rhat > rhat_warn:
            warnings.warn(f"NUTS reference not converged: max R-hat {rhat:.3f} > {rhat_warn} (min bulk ESS "
                          f"{idata.attrs['ess_bulk_min']:.0f}); run longer chains (num_samples, warmup_steps) "
                          "before trusting comparisons with it", RuntimeWarning, stacklevel=2)
    return idata


def reference_summary(idata: az.InferenceData) -> dict[str, dict[str, float]]:
    """Per block: max R-hat (rank-normalized, split) and min bulk / tail ESS over its coordinates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(idata)
        ess_b = az.ess(idata, method="bulk")
        ess_t = az.ess(idata, method="tail")
    return {v: {"rhat_max": float(rhat[v].max()), "ess_bulk_min": float(ess_b[v].min()),
                "ess_tail_min": float(ess_t[v].min())} for v in idata.posterior.data_vars}


def compare_to_reference(net: BayesianNet, q: Gaussian, ref: az.InferenceData, X: torch.Tensor, y: torch.Tensor,
                         prior: Gaussian | None = None, draws: int = 1000, seed: int = 0,
                         Xte: torch.Tensor | None = None) -> dict[str, Any]:
    """How far the Gaussian q is from the NUTS reference.

    Per block: mean error ``mean |m_q - m_ref| / sd_ref`` and the marginal-variance ratio
    ``exp(mean |log var_q / var_ref|)`` (1 = equal); predictive agreement on ``Xte`` (or ``X``): the share
    of inputs where the posterior-mean class agrees, and the mean total-variation distance between
    predictive distributions; and ``elpd_loo(q) - elpd_loo(ref)`` on ``(X, y)``.
    """
    wr = weights_from_idata(ref, net).to(q.dtype)
    flat_r = wr.reshape(-1, net.num_params)
    m_r, v_r = flat_r.mean(0), flat_r.var(0)
    blocks = {}
    for b in net.layout:
        s = slice(b.offset, b.stop)
        blocks[b.name] = {
            "mean_err_sd": float(((q.mean[s] - m_r[s]).abs() / v_r[s].sqrt()).mean()),
            "var_ratio_geo": float((q.variance[s] / v_r[s]).log().abs().mean().exp()),
            "var_ratio_median": float((q.variance[s] / v_r[s]).median()),
        }
    idq = to_inference_data(net, q, X, y, draws=draws, seed=seed, prior=prior)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lq, lr = az.loo(idq, reff=loo_reff(idq)), az.loo(ref)
    Xe = (Xte if Xte is not None else X).to(q.dtype)
    wq = weights_from_idata(idq, net).to(q.dtype).reshape(-1, net.num_params)
    with torch.no_grad():
        if net.likelihood == "categorical":
            pq = torch.softmax(net.forward(wq, Xe), -1).mean(0)
            pr = torch.softmax(net.forward(flat_r, Xe), -1).mean(0)
            agree = float((pq.argmax(-1) == pr.argmax(-1)).double().mean())
            tv = float(0.5 * (pq - pr).abs().sum(-1).mean())
            pred = {"class_agreement": agree, "mean_tv": tv}
        else:
            fq, fr = net.forward(wq, Xe), net.forward(flat_r, Xe)
            pred = {"mean_abs_diff_of_means": float((fq.mean(0) - fr.mean(0)).abs().mean()),
                    "sd_ratio": float((fq.std(0) / fr.std(0)).mean())}
    return {"blocks": blocks, "predictive": pred, "elpd_loo_q": float(lq.elpd_loo),
            "elpd_loo_ref": float(lr.elpd_loo), "elpd_loo_diff": float(lq.elpd_loo - lr.elpd_loo),
            "se_loo_ref": float(lr.se)}
