"""Model folders and experiment runs: the InferenceData of a saved model (built once, cached as ``idata.nc``,
rebuilt when stale) and the diagnosis of every model folder of a run, mean +- sd over seeds.

Models are read through :mod:`pyro_distill.store`; data and surgery come from the caller (``diagnostics``
imports neither :mod:`pyro_distill.data` nor :mod:`pyro_distill.surgery`): :func:`diagnose_run` takes
``load_data(spec) -> dataset`` (e.g. :func:`pyro_distill.data.specs.load`) and, for the student-prior rows,
``relate(student, candidates) -> (teacher name, operations, target prior) | None``
(``pyro_distill.commands.diagnose.relate``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..gaussian import Gaussian
from ..nets.base import BayesianNet
from ..store import (
    FINGERPRINT_KEY,
    IDATA_FILE,
    MODEL_FILE,
    ModelFolder,
    fingerprint,
    load_model,
    load_prior,
    model_folders,
    open_model,
    parse_model_folder_name,
)
from .idata import az, data_fingerprint, load_idata, save_idata, to_inference_data
from .quality import diagnose_idata

__all__ = ["diagnose_model_folder", "student_prior_idata", "split_seed", "diagnose_run", "RUN_COLUMNS", "Relate"]

#: ``relate(student, same-seed candidates) -> (teacher name, operations, target prior) | None``: which candidate
#: the student was cut from, by which operations, and the prior its conditioned-teacher row is judged against
Relate = Callable[[ModelFolder, Mapping[str, ModelFolder]], "tuple[str, Sequence, Gaussian] | None"]
#: the per-model numbers aggregated over seeds by :func:`diagnose_run`
RUN_COLUMNS = ("elpd_loo_per_obs", "p_loo", "loo_k_bad_share", "khat_q", "test_lpd", "test_acc")


def split_seed(name: str) -> tuple[str, int]:
    """``"teacher-seed3" -> ("teacher", 3)``: :func:`pyro_distill.store.parse_model_folder_name`."""
    return parse_model_folder_name(name)


def diagnose_model_folder(folder: str | os.PathLike, X: torch.Tensor, y: torch.Tensor, draws: int = 1000,
                          seed: int = 0, prior: Gaussian | None = None, overwrite: bool = False,
                          save: bool = True) -> az.InferenceData:
    """Build (and by default save as ``folder/idata.nc``) the InferenceData of a model folder written by
    :func:`pyro_distill.store.save_model` on its training data ``X, y`` (rebuild them from the card's spec with
    ``pyro_distill.data.specs.load(card["data"])``). ``lp`` is under ``prior``, by default the folder's own
    (:func:`pyro_distill.store.load_prior`; none: the network's fan-in prior).
    A saved file made with the same draws, seed and data is reused; a different one is not silently
    replaced (``overwrite=True`` replaces it). The file records the fingerprints of posterior.pt and of the
    data (attributes ``posterior_sha256``, ``data_sha256``); one made from another posterior or other data
    (or before fingerprints were recorded) is stale: it is rebuilt (and replaced when ``save``), with a
    RuntimeWarning, never reused."""
    if X is None or y is None:
        raise ValueError(f"diagnose_model_folder({folder}) needs the training data X, y: rebuild them from the card "
                         "with pyro_distill.data.specs.load(card[\"data\"]) (CLI: pyro-distill diagnose does this)")
    folder = Path(folder)
    net, q, card = load_model(folder)  # checks posterior.pt against the card's fingerprint
    post_fp = card.get(FINGERPRINT_KEY) or fingerprint(folder / MODEL_FILE)
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
    if prior is not None:
        pr, pr_src = prior, prior.meta.get("source", "given")
    else:
        pr, pr_src = load_prior(folder, net, card)
        pr = pr if pr is not None else net.default_prior()
    idata = to_inference_data(net, q, X, y, draws=draws, seed=seed, prior=pr)
    idata.attrs["model_folder"] = str(folder)
    idata.attrs["prior_path"] = str(pr_src)
    idata.attrs["posterior_sha256"] = post_fp
    idata.attrs["data_sha256"] = data_fp
    if save:
        save_idata(folder, idata, overwrite=overwrite)
    return idata


def student_prior_idata(student: BayesianNet, student_prior: Gaussian, target: Gaussian, X: torch.Tensor,
                        y: torch.Tensor, draws: int = 1000, seed: int = 0, teacher_name: str = "") -> az.InferenceData:
    """The InferenceData of a student's prior (the conditioned teacher, before any training) on ``(X, y)``,
    with ``lp`` under ``target`` (the teacher's prior restricted to the student's coordinates: the exact target
    of conditioning), both in ``X``'s dtype."""
    dt = X.dtype if X.is_floating_point() else torch.float64
    return to_inference_data(student, student_prior.to(dtype=dt), X, y, draws=draws, seed=seed,
                             prior=target.to(dtype=dt),
                             source={"source": "conditioned teacher (student prior)", "teacher": teacher_name})


def diagnose_run(folder: str | os.PathLike, load_data: Callable[[Mapping[str, Any]], Any],
                 relate: Relate | None = None, draws: int = 1000, seed: int = 0, overwrite: bool = False,
                 save: bool = True, progress: bool = False, keep_seed: int | None = None) -> dict[str, Any]:
    """Diagnose every model folder of an experiment run (``models/<experiment>-<timestamp>/<model>-seed<k>``,
    as written by the runner), each on its own data (``load_data(card["data"])``: a student at 10% data is
    judged on its 10% subsample), plus, with ``relate``, for each student whose folder holds its prior and
    whose teacher (same seed) ``relate`` finds in the run, a row for that prior (the conditioned teacher,
    judged against the target ``relate`` returns).

    Returns ``{"rows": [per model and seed], "groups": {group: {column: [values over seeds]}}}``; group =
    folder name without ``-seed<k>`` (``+ " prior"`` for prior rows). Use :func:`format_run_table`. With
    ``keep_seed``, the models of that seed are also returned, for figures, under ``"kept"``: ``{"models":
    {name: {"net", "q", "prior", "idata"}}, "relations": [(student, teacher, ops)]}`` (not JSON).
    """
    folder = Path(folder)
    subs = model_folders(folder)
    if not subs:
        raise FileNotFoundError(f"{folder} holds no model folders (subfolders with card.json); "
                                "diagnose_run takes models/<experiment>-<timestamp>")
    models: dict[str, ModelFolder] = {}
    for d in subs:
        m = open_model(d)
        if m.data_spec is None:
            raise ValueError(f"{d}/card.json has no \"data\" spec; diagnose it with `pyro-distill diagnose {d} "
                             "--data ...`")
        models[d.name] = m
    data_cache: dict[str, Any] = {}

    def data(spec: Mapping[str, Any]):
        key = json.dumps(spec, sort_keys=True)
        if key not in data_cache:
            data_cache[key] = load_data(spec)
        return data_cache[key]

    rows: list[dict[str, Any]] = []
    kept: dict[str, Any] = {"models": {}, "relations": []}
    teacher_groups: set[str] = set()
    for name, m in models.items():
        group, s = split_seed(name)
        if progress:
            print(f"  {name}", flush=True)
        ds = data(m.data_spec)
        prior = m.prior_or_default()
        idata = diagnose_model_folder(m.folder, ds.X, ds.y, draws=draws, seed=seed, prior=prior,
                                      overwrite=overwrite, save=save)
        keep = keep_seed is not None and s == keep_seed
        if keep:
            kept["models"][name] = {"net": m.net, "q": m.posterior, "prior": prior, "idata": idata}
        rows.append({"group": group, "seed": s, "model": name}
                    | diagnose_idata(name, idata, m.net, ds.Xte, ds.yte).to_dict())
        if relate is None or not m.has_prior:
            continue
        same_seed = {n: t for n, t in models.items() if split_seed(n)[1] == s and n != name}
        found = relate(m, same_seed)
        if not found:
            continue
        tname, ops, target = found
        teacher_groups.add(split_seed(tname)[0])
        pid = student_prior_idata(m.net, m.prior, target, ds.X, ds.y, draws=draws, seed=seed, teacher_name=tname)
        rows.append({"group": f"{group} prior", "seed": s, "model": f"{name} prior"}
                    | diagnose_idata(f"{name} prior", pid, m.net, ds.Xte, ds.yte).to_dict())
        if keep:
            kept["models"][f"{name} prior"] = {"net": m.net, "q": m.prior, "prior": target, "idata": pid}
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
