"""The on-disk model folder: ``models/<name>/`` holds ``posterior.pt`` (the Gaussian with its layout),
``card.json`` (network config, data, how it was fitted) and, when diagnostics ran, ``idata.nc``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import gaussian as gmod
from .gaussian import Gaussian
from .nets.base import BayesianNet, net_from_config

__all__ = ["save_model", "load_model", "atomic_write_text", "MODEL_FILE", "CARD_FILE", "IDATA_FILE"]

MODEL_FILE = "posterior.pt"
CARD_FILE = "card.json"
IDATA_FILE = "idata.nc"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_model(folder: str | os.PathLike, net: BayesianNet, q: Gaussian, card: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Save a fitted Gaussian and its model card into ``folder`` (refuses to overwrite unless asked)."""
    folder = Path(folder)
    if (folder / MODEL_FILE).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a model; pass overwrite=True or choose another name")
    if q.dim != net.num_params:
        raise ValueError(f"Gaussian of dimension {q.dim} does not belong to {net!r}")
    folder.mkdir(parents=True, exist_ok=True)
    q.layout = net.layout
    q.save(folder / MODEL_FILE, overwrite=overwrite)
    full = {"net": net.config(), "p": net.num_params, "kind": q.kind} | dict(card or {})
    atomic_write_text(folder / CARD_FILE, json.dumps(full, indent=2, default=str))
    return folder


def load_model(folder: str | os.PathLike) -> tuple[BayesianNet, Gaussian, dict[str, Any]]:
    """``(net, gaussian, card)`` from a model folder; checks that the posterior fits the network."""
    folder = Path(folder)
    if not (folder / CARD_FILE).exists() or not (folder / MODEL_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a model folder (needs {CARD_FILE} and {MODEL_FILE})")
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / CARD_FILE} is corrupt: {exc}") from exc
    net = net_from_config(card["net"])
    q = gmod.load(folder / MODEL_FILE, layout=net.layout)
    return net, q, card
