"""Fashion-MNIST (or MNIST) from the standard IDX ``.gz`` files, read without any download.

The IDX format: a big-endian header ``0x00 0x00 <type> <ndim>``, ``ndim`` int32 sizes, then the data
(type ``0x08`` = unsigned byte). The files are looked up in ``data_dir``, else ``$PYRO_DISTILL_DATA``,
also in a ``fashion_mnist/`` subfolder of either.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .tabular import Dataset

__all__ = ["IDX_FILES", "read_idx", "write_idx", "find_idx_dir", "fashion_mnist", "DOWNLOAD_URL"]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DOWNLOAD_URL = "https://github.com/zalandoresearch/fashion-mnist#get-the-data"
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
    where = "; ".join(str(t) for t in tried) or "(no directory given and $PYRO_DISTILL_DATA is not set)"
    return (f"Fashion-MNIST IDX files not found. Looked in: {where}. Download the four files {names} from "
            f"{DOWNLOAD_URL} and put them, still gzipped, in one directory; then pass it as data.dir in the "
            "experiment TOML (or data_dir=...) or set PYRO_DISTILL_DATA=/that/directory.")


def find_idx_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding all four IDX files; a clear error naming them when none does."""
    bases = [Path(data_dir)] if data_dir else []
    if os.environ.get("PYRO_DISTILL_DATA"):
        bases.append(Path(os.environ["PYRO_DISTILL_DATA"]))
    tried = []
    for b in bases:
        for d in (b, b / "fashion_mnist", b / "fashion-mnist"):
            tried.append(d)
            if all((d / f).exists() for f in IDX_FILES.values()):
                return d
    raise FileNotFoundError(_missing_message(tried))


def fashion_mnist(data_dir: str | os.PathLike | None = None, pca: int = 50, max_train: int = 0, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Dataset:
    """Fashion-MNIST, 10 classes. Pixels scaled to [0, 1]; with ``pca > 0`` projected on the first ``pca``
    principal components of the training images (fitted on the training split only) and standardized;
    with ``pca = 0`` all 784 pixels, standardized. ``max_train > 0`` keeps a stratified random subset of
    that many training images (seeded), for dense teachers on CPU."""
    d = find_idx_dir(data_dir)
    tr = read_idx(d / IDX_FILES["train_images"])
    Xtr = tr.reshape(tr.shape[0], -1).astype(np.float64) / 255.0
    ytr = read_idx(d / IDX_FILES["train_labels"]).astype(np.int64)
    Xte = read_idx(d / IDX_FILES["test_images"]).reshape(-1, Xtr.shape[1]).astype(np.float64) / 255.0
    yte = read_idx(d / IDX_FILES["test_labels"]).astype(np.int64)
    if Xtr.shape[0] != ytr.shape[0] or Xte.shape[0] != yte.shape[0]:
        raise ValueError(f"images and labels disagree in {d}: {Xtr.shape[0]} vs {ytr.shape[0]} (train), "
                         f"{Xte.shape[0]} vs {yte.shape[0]} (test); re-download the files")
    if max_train and max_train < Xtr.shape[0]:
        g = np.random.default_rng(seed)
        idx = np.sort(g.choice(Xtr.shape[0], size=max_train, replace=False))
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
