"""Sequence tasks for the transformer: digits read row by row, and a marked-token matching task.

Both follow :class:`~pyro_distill.nets.transformer.Transformer`'s input conventions: patch sequences are
``[N, T, F]`` floats with padded positions all NaN; token sequences are ``[N, T]`` float ids with
``PAD = -1`` for padding. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..nets.transformer import PAD
from .tabular import Dataset

__all__ = ["digits_sequences", "match_task", "PAD"]


def digits_sequences(test_size: float = 0.2, seed: int = 0, pad_fraction: float = 0.0, min_rows: int = 5,
                     dtype: torch.dtype = torch.float32) -> Dataset:
    """scikit-learn digits as sequences of 8 rows of 8 pixels (``X [N, 8, 8]``), split as in
    :func:`~pyro_distill.data.tabular.digits` (same ``seed``, so the same images), standardized per pixel
    with the training statistics.

    ``pad_fraction > 0`` pads that fraction of the images (train and test) by hiding their last rows
    (keeping at least ``min_rows``), marking the hidden rows NaN: a ready test of padding masks.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 <= pad_fraction <= 1.0:
        raise ValueError(f"pad_fraction must lie in [0, 1], got {pad_fraction}")
    if not 1 <= min_rows <= 8:
        raise ValueError(f"min_rows must lie in 1..8, got {min_rows}")
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd < 1e-8] = 1.0
    Xtr, Xte = ((Xtr - mu) / sd).reshape(-1, 8, 8), ((Xte - mu) / sd).reshape(-1, 8, 8)
    rng = np.random.default_rng(seed)
    for A in (Xtr, Xte):
        if pad_fraction > 0:
            rows = rng.random(len(A)) < pad_fraction
            lengths = rng.integers(min_rows, 8, size=len(A))
            for i in np.nonzero(rows)[0]:
                A[i, lengths[i]:] = np.nan
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return Dataset(t(Xtr), torch.tensor(ytr, dtype=torch.long), t(Xte), torch.tensor(yte, dtype=torch.long),
                   "digits_sequences", 10,
                   f"scikit-learn digits as 8 rows x 8 pixels, {len(ytr)} train / {len(yte)} test, standardized, "
                   f"split seed {seed}, {pad_fraction:.0%} padded")


def match_task(n_train: int = 2000, n_test: int = 2000, n_symbols: int = 4, min_len: int = 8, max_len: int = 12,
               min_gap: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """Do the two marked tokens carry the same symbol? A task that needs attention.

    A sequence has a random length in ``min_len..max_len`` (the rest is ``PAD``); every position holds a
    symbol ``s`` in ``0..n_symbols-1`` as token ``s`` (unmarked) except two positions at distance
    ``>= min_gap`` that hold marked tokens ``n_symbols + s``. Label 1 if the two marked symbols are equal
    (half the sequences), else 0. Vocabulary size ``2 * n_symbols``. Without attention each position is
    processed alone and mean pooling sums per-position features, and equality of two symbols is not a sum
    of per-symbol terms, so an attention-free network stays near chance.
    """
    if n_symbols < 2:
        raise ValueError(f"n_symbols must be >= 2, got {n_symbols}")
    if not 2 <= min_len <= max_len or min_gap < 1 or min_gap >= min_len:
        raise ValueError(f"need 2 <= min_len <= max_len and 1 <= min_gap < min_len; got min_len={min_len}, "
                         f"max_len={max_len}, min_gap={min_gap}")
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        X = np.full((n, max_len), PAD, dtype=np.int64)
        y = (np.arange(n) % 2).astype(np.int64)
        rng.shuffle(y)
        for i in range(n):
            L = int(rng.integers(min_len, max_len + 1))
            X[i, :L] = rng.integers(0, n_symbols, size=L)
            a = int(rng.integers(0, L - min_gap))
            b = int(rng.integers(a + min_gap, L))
            sa = int(rng.integers(0, n_symbols))
            sb = sa if y[i] else int((sa + rng.integers(1, n_symbols)) % n_symbols)
            X[i, a], X[i, b] = n_symbols + sa, n_symbols + sb
        return X, y

    X, y = make(n_train)
    Xte, yte = make(n_test)
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return Dataset(t(X), torch.tensor(y), t(Xte), torch.tensor(yte), "match", 2,
                   f"marked-token matching: {n_symbols} symbols, lengths {min_len}..{max_len} (PAD={PAD}), marks "
                   f">= {min_gap} apart, {n_train} train / {n_test} test, seed {seed}; vocabulary {2 * n_symbols}")
