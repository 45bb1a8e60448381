"""Tabular data that ships: scikit-learn digits and the synthetic sets (no network access needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Dataset", "digits", "synthetic_regression", "synthetic_classification", "subsample"]


@dataclass
class Dataset:
    """Train / test tensors plus a description. ``X`` float, ``y`` long (classes) or float (regression)."""

    X: torch.Tensor
    y: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor
    name: str = ""
    num_classes: int | None = None
    description: str = ""

    def __iter__(self):  # allows ``X, y, Xte, yte = pd.data.digits()``
        return iter((self.X, self.y, self.Xte, self.yte))

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, X {tuple(self.X.shape)} {self.X.dtype}, Xte {tuple(self.Xte.shape)}, "
                f"classes={self.num_classes})")

    @property
    def num_features(self) -> int:
        return self.X.shape[-1]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Dataset:
        fx = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        fy = (lambda t: t.to(device=device)) if self.num_classes else fx
        return Dataset(fx(self.X), fy(self.y), fx(self.Xte), fy(self.yte), self.name, self.num_classes,
                       self.description)


def _standardize(Xtr: np.ndarray, Xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = Xtr.mean(0)
    sd = Xtr.std(0)
    sd[sd < 1e-8] = 1.0
    return (Xtr - mu) / sd, (Xte - mu) / sd


def digits(test_size: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 64 features, 10 classes), stratified split, standardized
    with the training split's statistics. The split depends only on ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    Xtr, Xte = _standardize(Xtr.astype(np.float64), Xte.astype(np.float64))
    return Dataset(torch.tensor(Xtr, dtype=dtype), torch.tensor(ytr, dtype=torch.long),
                   torch.tensor(Xte, dtype=dtype), torch.tensor(yte, dtype=torch.long), "digits", 10,
                   f"scikit-learn digits, {len(ytr)} train / {len(yte)} test, standardized, split seed {seed}")


def synthetic_regression(n_train: int = 500, n_test: int = 1000, n_features: int = 10, noise: float = 0.5,
                         seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """The paper's synthetic regression setting (its text states a linear-Gaussian design):
    ``x ~ N(0, I_n)``, ``y = x^T beta + 0.5 * sin(2 x_1) + eps``, ``beta ~ N(0, I)``, ``eps ~ N(0, noise^2)``.
    The mild nonlinearity gives hidden layers something to do."""
    g = np.random.default_rng(seed)
    beta = g.normal(size=n_features)
    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        X = g.normal(size=(n, n_features))
        return X, X @ beta + 0.5 * np.sin(2 * X[:, 0]) + noise * g.normal(size=n)
    X, y = make(n_train)
    Xte, yte = make(n_test)
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return Dataset(t(X), t(y), t(Xte), t(yte), "synthetic_regression", None,
                   f"x~N(0,I_{n_features}), y = x.beta + 0.5 sin(2 x_1) + N(0,{noise}^2), beta~N(0,I), seed {seed}")


def synthetic_classification(n_train: int = 1000, n_test: int = 2000, n_features: int = 20,
                             n_classes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """Synthetic classification: ``x ~ N(0, I)``, labels ``argmax(x^T B + 0.5 tanh(x^T C))`` with Gaussian
    ``B, C`` and 5% of labels flipped at random. Standardized with training statistics."""
    g = np.random.default_rng(seed)
    B = g.normal(size=(n_features, n_classes))
    C = g.normal(size=(n_features, n_classes))
    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        X = g.normal(size=(n, n_features))
        y = np.argmax(X @ B + 0.5 * np.tanh(X @ C) * np.sqrt(n_features), axis=1)
        flip = g.random(n) < 0.05
        y[flip] = g.integers(0, n_classes, flip.sum())
        return X, y
    X, y = make(n_train)
    Xte, yte = make(n_test)
    X, Xte = _standardize(X, Xte)
    return Dataset(torch.tensor(X, dtype=dtype), torch.tensor(y), torch.tensor(Xte, dtype=dtype), torch.tensor(yte),
                   "synthetic_classification", n_classes,
                   f"x~N(0,I_{n_features}), y = argmax(x B + 0.5 sqrt(n) tanh(x C)), 5% label noise, seed {seed}")


def subsample(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """A stratified (for classes) random ``fraction`` of the training split; the test split is unchanged."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return ds
    n = ds.X.shape[0]
    g = np.random.default_rng(seed)
    if ds.num_classes:
        y = ds.y.numpy()
        idx = []
        for c in range(ds.num_classes):
            members = np.flatnonzero(y == c)
            k = max(1, int(round(fraction * len(members))))
            idx.append(g.choice(members, size=min(k, len(members)), replace=False))
        idx = np.sort(np.concatenate(idx))
    else:
        idx = np.sort(g.choice(n, size=max(2, int(round(fraction * n))), replace=False))
    it = torch.as_tensor(idx)
    return Dataset(ds.X[it], ds.y[it], ds.Xte, ds.yte, ds.name, ds.num_classes,
                   ds.description + f"; training subsample {fraction:g} (seed {seed}, {len(idx)} rows)")
