"""The on-disk model folder: ONE owner of its format (files, card keys, folder names, reading and writing).

A model folder ``models/<name>/`` (an experiment run writes ``models/<experiment>-<timestamp>/<model>-seed<k>/``,
the name from :func:`model_folder_name`, read back by :func:`parse_model_folder_name`) holds:

* ``posterior.pt`` -- the fitted Gaussian (``Gaussian.save``: ``{"format", "version", "kind", "tensors",
  "layout", "meta"}``; :func:`pyro_distill.gaussian.load` reads it);
* ``card.json`` -- plain JSON (:func:`plain_json`), written last, describing the folder:
    - ``net``: the network's config (``net_from_config`` rebuilds it), ``p``: its parameter count,
      ``kind``: the Gaussian's structure;
    - ``posterior_sha256``: :func:`fingerprint` of posterior.pt (checked at load); ``prior_sha256``: that of
      prior.pt when the folder has one (checked at load);
    - ``data``: the data spec (:mod:`pyro_distill.data.specs`: a dict with ``name`` and EVERY generator
      parameter, ``pyro_distill.data.specs.load(card["data"])`` rebuilds the exact training/test data, including
      any validation carve-out and training subsample the model was fitted on); ``data_description``: free text;
    - optional: ``plan`` (a surgery plan's ``to_dict()``, for a student), ``surgery`` (one operation's dict),
      ``prior_path`` (a prior file outside the folder), and whatever the writer adds (``experiment``, ``seed``,
      ``run_dir``, ``quick``, ``role``, ``method``, ``tau``, ``test`` metrics, ...);
* ``prior.pt`` -- optional: the prior the posterior was fitted under, same format as posterior.pt (a
  ``distill`` folder: the conditioned teacher, the same Gaussian as posterior.pt; a student: its teacher-derived
  prior). Written only by :func:`save_model` (``prior=``), read only by :func:`load_prior`; without it a model was
  fitted under its network's default (fan-in) prior;
* ``idata.nc`` -- optional: ArviZ InferenceData of draws of q on the training data (written by
  ``pyro_distill.diagnostics``; its attributes record ``posterior_sha256`` and ``data_sha256``).

:func:`open_model` loads all of it at once (:class:`ModelFolder`: net, posterior, card, prior, data spec).

Every file is written through a temporary ``.<name>.pd-<pid>-*.tmp`` beside it and a rename, so a reader
never sees a half-written file; temporaries are removed on every exit path, and those of a killed writer
(its pid gone) are removed at the next save into the folder. Files get the permissions the umask gives
(``0o666 & ~umask``), not ``mkstemp``'s 0600. A full disk or a read-only folder is one
:class:`StorageError` line naming the folder and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gaussian as gmod
from .gaussian import Gaussian, pid_alive, plain_json
from .nets.base import BayesianNet, net_from_config

__all__ = ["save_model", "load_model", "load_prior", "open_model", "ModelFolder", "data_spec", "model_folder_name",
           "parse_model_folder_name", "is_model_folder", "model_folders", "atomic_write", "atomic_write_text",
           "fingerprint",
           "check_writable", "clean_stale_temps", "plain_json", "file_mode", "StorageError", "MODEL_FILE",
           "CARD_FILE", "IDATA_FILE", "PRIOR_FILE", "FINGERPRINT_KEY", "PRIOR_FINGERPRINT_KEY", "DATA_KEY"]

MODEL_FILE = "posterior.pt"
CARD_FILE = "card.json"
IDATA_FILE = "idata.nc"
PRIOR_FILE = "prior.pt"
#: card.json key holding :func:`fingerprint` of posterior.pt
FINGERPRINT_KEY = "posterior_sha256"
#: card.json key holding :func:`fingerprint` of prior.pt
PRIOR_FINGERPRINT_KEY = "prior_sha256"
#: card.json key holding the data spec (:mod:`pyro_distill.data.specs`)
DATA_KEY = "data"
#: ``<name>-seed<k>``: the suffix an experiment run gives each model folder (:func:`model_folder_name`)
_SEED_RE = re.compile(r"^(?P<name>.+)-seed(?P<seed>\d+)$")
#: free space demanded beyond the estimated size of what is written (filesystem blocks, card, idata)
SPACE_MARGIN = 16 * 2**20

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
#: a writer's temporary: ``.<name>.pd-<pid>-<random>.tmp`` (the pid tells a live writer from a killed one)
_TMP_RE = re.compile(r"^\..+\.pd-(?P<pid>\d+)-[^/]*\.tmp$")


class StorageError(OSError):
    """A file could not be written: full disk, read-only or unwritable folder. One line, with the fix."""


# ============================================================================ files
def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions a new file gets under the current umask: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.pd-{os.getpid()}-"


def storage_error(exc: BaseException, path: str | os.PathLike) -> StorageError | None:
    """A :class:`StorageError` for a failed write of ``path`` when ``exc`` means a full disk or a read-only /
    unwritable folder (also torch's ``RuntimeError`` from a short write); ``None`` for anything else."""
    if isinstance(exc, StorageError):
        return exc
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    code = getattr(exc, "errno", None)
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("unexpected pos", "PytorchStreamWriter",
                                                                      "enforce fail", "No space")):
        code = errno.ENOSPC if _free_bytes(folder) < SPACE_MARGIN else None
    if code in _NO_SPACE:
        return StorageError(errno.ENOSPC, f"no space left on the device holding {folder} (writing {path.name}, "
                                          f"{_free_bytes(folder) / 2**20:.0f} MiB free); free some space or choose "
                                          "another output folder (--models / --runs / --out)")
    if code in _READ_ONLY:
        return StorageError(code, f"cannot write into {folder}: the folder is read-only or not writable; fix its "
                                  "permissions or choose another output folder (--models / --runs / --out)")
    return None


def _free_bytes(folder: Path) -> int:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file); the
    file's mode follows the umask. A full disk or read-only folder raises :class:`StorageError`."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Make ``path`` by ``write(tmp)`` into a temporary ``.<name>.pd-<pid>-*.tmp`` beside it, then a rename (never
    a half-written file; the temporary is removed on every exit path); the file's mode follows the umask. A full
    disk or read-only folder raises :class:`StorageError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the file follows the umask like any other
        os.replace(tmp, path)
    except OSError as exc:
        err = storage_error(exc, path)
        if err is not None:
            raise err from exc
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (``.<name>.pd-<pid>-*.tmp``) in ``folder`` whose writer process is gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP_RE.match(e.name)
        if not m or not e.is_file(follow_symlinks=False) or pid_alive(int(m["pid"])):
            continue
        try:
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def fingerprint(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes: what a derived file (idata.nc, a card) records of its source."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, what: str = "output folder") -> Path:
    """Check, before any expensive work, that ``folder`` (or, while it does not exist, its nearest existing
    ancestor, where it would be created) accepts a new file and has ``need_bytes`` (+ a margin) free; a
    :class:`StorageError` line otherwise. Creates nothing."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is a file, not a folder")
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-check.pd-", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        err = storage_error(exc, folder)
        if err is None:
            raise StorageError(getattr(exc, "errno", None) or errno.EIO,
                               f"cannot write into the {what} {folder} ({exc}); choose another folder") from exc
        raise StorageError(err.errno, f"{what}: {err.strerror}") from exc
    free = _free_bytes(folder)
    if need_bytes and free < need_bytes + SPACE_MARGIN:
        raise StorageError(errno.ENOSPC, f"{what} {folder}: only {free / 2**20:.0f} MiB free, about "
                                         f"{(need_bytes + SPACE_MARGIN) / 2**20:.0f} MiB needed; free some space "
                                         "or choose another folder")
    return folder


def gaussian_bytes(q: Gaussian | None) -> int:
    """The size of ``q``'s tensors in bytes (about the size of its saved file)."""
    if q is None:
        return 0
    return sum(t.numel() * t.element_size() for t in q._tensors().values())


# ============================================================================ model folders
def save_model(folder: str | os.PathLike, net: BayesianNet, q: Gaussian, card: dict[str, Any] | None = None,
               overwrite: bool = False, prior: Gaussian | None = None) -> Path:
    """Save a fitted Gaussian (and, if given, the ``prior`` it was fitted under, as prior.pt) with its model
    card into ``folder``; refuses to overwrite unless asked.

    The card is converted to plain JSON first (refused, naming the key, before anything is written), free
    space is checked against the size of the Gaussians, the card records the fingerprints of the files
    it describes, and the whole folder is read back (:func:`load_model`) before returning. A failed save
    into a new folder removes the folder (no empty or half model folders are left)."""
    folder = Path(folder)
    if (folder / MODEL_FILE).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a model; pass overwrite=True (CLI: --overwrite) or choose "
                              "another name")
    if q.dim != net.num_params:
        raise ValueError(f"Gaussian of dimension {q.dim} does not belong to {net!r}")
    if prior is not None and prior.dim != net.num_params:
        raise ValueError(f"prior of dimension {prior.dim} does not belong to {net!r}")
    extra = plain_json(dict(card or {}), "card")
    created = not folder.exists()
    try:
        check_writable(folder, gaussian_bytes(q) + gaussian_bytes(prior), what="model folder")
        clean_stale_temps(folder)
        q.layout = net.layout
        q.save(folder / MODEL_FILE, overwrite=overwrite)
        full = {"net": net.config(), "p": net.num_params, "kind": q.kind} | extra
        full[FINGERPRINT_KEY] = fingerprint(folder / MODEL_FILE)
        if prior is not None:
            prior.layout = net.layout
            prior.save(folder / PRIOR_FILE, overwrite=overwrite)
            full[PRIOR_FINGERPRINT_KEY] = fingerprint(folder / PRIOR_FILE)
        elif overwrite and (folder / PRIOR_FILE).exists():  # the replaced model's prior: not this model's
            (folder / PRIOR_FILE).unlink()
        atomic_write_text(folder / CARD_FILE, json.dumps(full, indent=2))
        _, q2, card2 = load_model(folder)  # read back what a reader will see
        same_card = json.dumps(card2, sort_keys=True) == json.dumps(full, sort_keys=True)
        if q2.kind != q.kind or q2.dim != q.dim or not same_card:
            raise RuntimeError(f"{folder}: the saved model does not read back as written; save it again")
    except BaseException as exc:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        err = storage_error(exc, folder / MODEL_FILE) if isinstance(exc, (OSError, RuntimeError)) else None
        if err is not None and err is not exc:
            raise err from exc
        raise
    return folder


def load_model(folder: str | os.PathLike, verify: bool = True) -> tuple[BayesianNet, Gaussian, dict[str, Any]]:
    """``(net, gaussian, card)`` from a model folder; checks that the posterior fits the network and, with
    ``verify``, that posterior.pt is the file the card describes (its fingerprint)."""
    folder = Path(folder)
    if not (folder / CARD_FILE).exists() or not (folder / MODEL_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a model folder (needs {CARD_FILE} and {MODEL_FILE})")
    card = _read_card(folder)
    if not isinstance(card.get("net"), dict):
        got = type(card.get("net")).__name__
        raise ValueError(f"{folder / CARD_FILE} is corrupt: \"net\" must be the network's config (a JSON object "
                         f"like {{\"type\": \"MLP\", \"sizes\": [...]}}), got {got}; re-save the model")
    want = card.get(FINGERPRINT_KEY)
    if verify and want is not None:
        have = fingerprint(folder / MODEL_FILE)
        if have != want:
            raise ValueError(f"{folder / MODEL_FILE} is not the file {CARD_FILE} describes (fingerprint {have[:19]}, "
                             f"card says {str(want)[:19]}): it was replaced or damaged after the save; re-save the "
                             "model with store.save_model(..., overwrite=True)")
    try:
        net = net_from_config(card["net"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{folder / CARD_FILE}: cannot build the network from \"net\" ({type(exc).__name__}: "
                         f"{exc}); re-save the model") from exc
    q = gmod.load(folder / MODEL_FILE, layout=net.layout)
    _check_finite(q, folder / MODEL_FILE)
    return net, q, card


def _check_finite(q: Gaussian, path: Path) -> None:
    bad = [k for k, t in q._tensors().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ValueError(f"{path} holds NaN or inf in {bad}; the file is corrupt: re-fit or restore the model")


def posterior_fingerprint(folder: str | os.PathLike) -> str:
    """:func:`fingerprint` of ``folder/posterior.pt`` (what idata.nc records of its source)."""
    return fingerprint(Path(folder) / MODEL_FILE)



def load_prior(folder: str | os.PathLike, net: BayesianNet, card: dict[str, Any] | None = None,
               verify: bool = True) -> tuple[Gaussian | None, str]:
    """``(prior, source)``: the prior a model was fitted under -- ``prior.pt`` in ``folder`` (checked, with
    ``verify``, against the card's ``prior_sha256`` when recorded), else the card's ``prior_path``, else
    ``(None, "default prior")`` (the network's default fan-in prior). The one reader of prior.pt."""
    folder = Path(folder)
    card = card if card is not None else _read_card(folder)
    path = folder / PRIOR_FILE
    if path.exists():
        want = card.get(PRIOR_FINGERPRINT_KEY)
        if verify and want is not None and fingerprint(path) != want:
            raise ValueError(f"{path} is not the file {CARD_FILE} describes (its fingerprint differs from "
                             f"{PRIOR_FINGERPRINT_KEY}): it was replaced or damaged after the save; re-save the model")
    elif card.get("prior_path") and Path(card["prior_path"]).exists():
        path = Path(card["prior_path"])
    else:
        return None, "default prior"
    prior = gmod.load(path, layout=net.layout)
    if prior.dim != net.num_params:
        raise ValueError(f"{path} holds a Gaussian of dimension {prior.dim}, but the folder's network has "
                         f"p={net.num_params}; it is another model's prior: remove it or re-save the model")
    _check_finite(prior, path)
    return prior, str(path)


def _read_card(folder: Path) -> dict[str, Any]:
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a model folder (needs {CARD_FILE} and {MODEL_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{folder / CARD_FILE} is corrupt: {exc}; re-save the model") from exc
    if not isinstance(card, dict):
        raise ValueError(f"{folder / CARD_FILE} is corrupt: a {type(card).__name__}, not a JSON object; re-save the "
                         "model")
    return card


def data_spec(card: dict[str, Any]) -> dict[str, Any] | None:
    """The card's data spec (a dict with ``name``; :func:`pyro_distill.data.specs.load` rebuilds the data), or
    None when the card has none (a free-text ``data`` is only a description)."""
    spec = card.get(DATA_KEY)
    return dict(spec) if isinstance(spec, dict) and "name" in spec else None


@dataclass
class ModelFolder:
    """Everything a model folder holds: the network, its posterior, the card, the prior it was fitted under
    (``None``: the network's default fan-in prior; ``prior_source`` says which file) and the data spec."""

    folder: Path
    net: BayesianNet
    posterior: Gaussian
    card: dict[str, Any]
    prior: Gaussian | None
    prior_source: str

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def data_spec(self) -> dict[str, Any] | None:
        return data_spec(self.card)

    @property
    def has_prior(self) -> bool:
        """True when the folder names its own prior (prior.pt or ``prior_path``)."""
        return self.prior is not None

    def prior_or_default(self) -> Gaussian:
        """The prior, or the network's default (fan-in) prior when the folder has none."""
        return self.prior if self.prior is not None else self.net.default_prior()


def open_model(folder: str | os.PathLike, verify: bool = True) -> ModelFolder:
    """Load a whole model folder (:func:`load_model` plus :func:`load_prior`)."""
    folder = Path(folder)
    net, q, card = load_model(folder, verify=verify)
    prior, src = load_prior(folder, net, card, verify=verify)
    return ModelFolder(folder, net, q, card, prior, src)


# ============================================================================ folder names
def model_folder_name(name: str, seed: int) -> str:
    """``"teacher", 3 -> "teacher-seed3"``: the folder an experiment run saves model ``name`` of ``seed`` in."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain folder name (no slashes, not starting with '.')")
    return f"{name}-seed{int(seed)}"


def parse_model_folder_name(folder_name: str) -> tuple[str, int]:
    """``"teacher-seed3" -> ("teacher", 3)``: the inverse of :func:`model_folder_name`; a name without the
    suffix (a folder saved by hand) is seed 0."""
    m = _SEED_RE.match(folder_name)
    return (m["name"], int(m["seed"])) if m else (folder_name, 0)


def is_model_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a card.json (a model folder, perhaps damaged)."""
    return (Path(folder) / CARD_FILE).is_file()


def model_folders(run_folder: str | os.PathLike) -> list[Path]:
    """The model folders of a run's folder (``models/<experiment>-<timestamp>``), sorted by name."""
    run_folder = Path(run_folder)
    return sorted(d for d in run_folder.iterdir() if is_model_folder(d)) if run_folder.is_dir() else []
