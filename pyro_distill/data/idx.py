"""Fashion-MNIST (or MNIST) from the standard IDX ``.gz`` files, read without any download.

The IDX format: a big-endian header ``0x00 0x00 <type> <ndim>``, ``ndim`` int32 sizes, then the data
(type ``0x08`` = unsigned byte). The files are looked up in ``data_dir`` (``data.dir`` in a TOML), then
``$PYRO_DISTILL_DATA`` (each also with a ``fashion_mnist/`` or ``fashion-mnist/`` subfolder), then where
Debian's package ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .tabular import Dataset

__all__ = ["IDX_FILES", "read_idx", "write_idx", "find_idx_dir", "fashion_mnist", "DOWNLOAD_URL", "SYSTEM_DIRS",
           "APT_PACKAGE", "INSTALL_COMMAND", "stratified_indices"]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DOWNLOAD_URL = "https://github.com/zalandoresearch/fashion-mnist#get-the-data"
APT_PACKAGE = "dataset-fashion-mnist"
INSTALL_COMMAND = f"apt-get update && apt-get install -y {APT_PACKAGE}"
# Searched after data_dir and $PYRO_DISTILL_DATA; a tuple so tests can monkeypatch it away.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` or plain)."""
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} is not an IDX file ({exc}); re-download it") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}); re-download it")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header announces {ndim} dimensions ({4 + 4 * ndim} header bytes) "
                         f"but the file has only {len(raw)} bytes; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dt = np.dtype(_TYPES[raw[2]])
    n = int(np.prod(dims)) if dims else 0
    offset = 4 + 4 * ndim
    if len(raw) - offset != n * dt.itemsize:
        raise ValueError(f"{path} is truncated or corrupt: header says {dims} ({n * dt.itemsize} bytes), "
                         f"found {len(raw) - offset} bytes; re-download it")
    return np.frombuffer(raw, dtype=dt, count=n, offset=offset).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an unsigned-byte array as a (gzipped if ``.gz``) IDX file: for tests and tiny fixtures."""
    path = Path(path)
    a = np.ascontiguousarray(array, dtype=np.uint8)
    head = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">i4").tobytes()
    data = head + a.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _missing_message(tried: list[Path]) -> str:
    names = ", ".join(IDX_FILES.values())
    where = "; ".join(str(t) for t in tried)
    system = " or ".join(str(d) for d in SYSTEM_DIRS) or "(no system location)"
    return (f"Fashion-MNIST IDX files not found. Looked in: {where}. The loader searches (1) data.dir in the "
            "experiment TOML (data_dir=...), (2) $PYRO_DISTILL_DATA, (3) " + system + ". Fix: install Debian's "
            f"package as root ({INSTALL_COMMAND}; or `make data`), or download the four files {names} from "
            f"{DOWNLOAD_URL}, put them, still gzipped, in one directory and pass it as data.dir or set "
            "PYRO_DISTILL_DATA=/that/directory.")


def find_idx_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding all four IDX files; a clear error naming them when none does."""
    bases = [Path(data_dir)] if data_dir else []
    if os.environ.get("PYRO_DISTILL_DATA"):
        bases.append(Path(os.environ["PYRO_DISTILL_DATA"]))
    candidates = [d for b in bases for d in (b, b / "fashion_mnist", b / "fashion-mnist")] + list(SYSTEM_DIRS)
    tried = []
    for d in candidates:
        tried.append(d)
        if all((d / f).exists() for f in IDX_FILES.values()):
            return d
    raise FileNotFoundError(_missing_message(tried))


def stratified_indices(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly ``n`` rows drawn without replacement, class proportions kept: class ``c`` gets
    ``floor(n N_c / N)`` rows plus one for the classes with the largest remainders (ties: a seeded shuffle)."""
    y = np.asarray(y)
    if not 0 < n <= len(y):
        raise ValueError(f"cannot draw {n} of {len(y)} rows; pass 0 < max_train <= {len(y)}")
    g = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = n * counts / len(y)
    take = np.floor(quota).astype(np.int64)
    order = g.permutation(len(classes))
    order = order[np.argsort(-(quota - take)[order], kind="stable")]
    take[order[: n - int(take.sum())]] += 1
    idx = [g.choice(np.flatnonzero(y == c), size=int(k), replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(idx))


def fashion_mnist(data_dir: str | os.PathLike | None = None, pca: int = 50, max_train: int = 0, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Dataset:
    """Fashion-MNIST, 10 classes. Pixels scaled to [0, 1]; with ``pca > 0`` projected on the first ``pca``
    principal components of the training images (fitted on the training split only) and standardized;
    with ``pca = 0`` all 784 pixels, standardized. ``max_train > 0`` keeps a class-stratified random subset of
    exactly that many training images (seeded; see ``stratified_indices``), for dense teachers on CPU."""
    d = find_idx_dir(data_dir)
    tr = read_idx(d / IDX_FILES["train_images"])
    Xtr = tr.reshape(tr.shape[0], -1).astype(np.float64) / 255.0
    ytr = read_idx(d / IDX_FILES["train_labels"]).astype(np.int64)
    te = read_idx(d / IDX_FILES["test_images"])
    if te.ndim < 2 or int(np.prod(te.shape[1:])) != Xtr.shape[1]:
        raise ValueError(f"{d / IDX_FILES['test_images']} holds images of shape {tuple(te.shape[1:])} but the training "
                         f"images are {tuple(tr.shape[1:])}; both files must come from the same data set "
                         "(re-download the four files together)")
    Xte = te.reshape(te.shape[0], -1).astype(np.float64) / 255.0
    yte = read_idx(d / IDX_FILES["test_labels"]).astype(np.int64)
    if Xtr.shape[0] != ytr.shape[0] or Xte.shape[0] != yte.shape[0]:
        raise ValueError(f"images and labels disagree in {d}: {Xtr.shape[0]} vs {ytr.shape[0]} (train), "
                         f"{Xte.shape[0]} vs {yte.shape[0]} (test); re-download the files")
    if max_train and max_train < Xtr.shape[0]:
        idx = stratified_indices(ytr, max_train, seed)
        Xtr, ytr = Xtr[idx], ytr[idx]
    desc = f"Fashion-MNIST from {d}, {len(ytr)} train / {len(yte)} test"
    if pca:
        from sklearn.decomposition import PCA

        k = min(pca, Xtr.shape[0], Xtr.shape[1])
        p = PCA(n_components=k, random_state=seed).fit(Xtr)
        Xtr, Xte = p.transform(Xtr), p.transform(Xte)
        desc += f", PCA to {k} dims (fitted on train)"
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd < 1e-8] = 1.0
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    return Dataset(torch.tensor(Xtr, dtype=dtype), torch.tensor(ytr), torch.tensor(Xte, dtype=dtype),
                   torch.tensor(yte), "fashion_mnist", 10, desc + ", standardized")
