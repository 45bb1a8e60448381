"""Fashion-MNIST loader: search order (data.dir, $PYRO_DISTILL_DATA, Debian's location), the missing-files
message, the stratified subsample, and the real files when Debian's package is installed."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_distill.data import idx as idx_mod
from pyro_distill.data.idx import (
    IDX_FILES,
    INSTALL_COMMAND,
    fashion_mnist,
    find_idx_dir,
    read_idx,
    stratified_indices,
    write_idx,
)


def _write_tiny(folder: Path, n_train: int = 40, n_test: int = 20, train_labels=None) -> Path:
    g = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / IDX_FILES["train_images"], g.integers(0, 256, (n_train, 4, 4)))
    ytr = np.arange(n_train) % 10 if train_labels is None else train_labels
    write_idx(folder / IDX_FILES["train_labels"], ytr)
    write_idx(folder / IDX_FILES["test_images"], g.integers(0, 256, (n_test, 4, 4)))
    write_idx(folder / IDX_FILES["test_labels"], np.arange(n_test) % 10)
    return folder


def test_search_order(tmp_path, monkeypatch):
    a, b, s = _write_tiny(tmp_path / "a"), _write_tiny(tmp_path / "b" / "fashion-mnist"), _write_tiny(tmp_path / "s")
    monkeypatch.setattr(idx_mod, "SYSTEM_DIRS", (s,))
    monkeypatch.setenv("PYRO_DISTILL_DATA", str(tmp_path / "b"))
    assert find_idx_dir(a) == a                          # 1. data.dir
    assert find_idx_dir(tmp_path / "empty") == b         # 2. $PYRO_DISTILL_DATA (its fashion-mnist/ subfolder)
    assert find_idx_dir(None) == b
    monkeypatch.delenv("PYRO_DISTILL_DATA")
    assert find_idx_dir(tmp_path / "empty") == s         # 3. the system (Debian) location
    assert fashion_mnist(pca=0).X.shape == (40, 16)


def test_missing_message_names_all_three_places_and_the_package(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    monkeypatch.setattr(idx_mod, "SYSTEM_DIRS", (system,))
    monkeypatch.setenv("PYRO_DISTILL_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist(tmp_path / "given")
    msg = str(e.value)
    for place in (tmp_path / "given", tmp_path / "env", system):
        assert str(place) in msg
    assert "data.dir" in msg and "PYRO_DISTILL_DATA" in msg
    assert INSTALL_COMMAND in msg and "dataset-fashion-mnist" in msg and "make data" in msg
    for f in IDX_FILES.values():
        assert f in msg


def test_stratified_subsample_keeps_class_proportions(tmp_path, monkeypatch):
    # 100 training images, classes 0..3 with 50/30/15/5 members; 20 drawn -> exactly 10/6/3/1.
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    np.random.default_rng(1).shuffle(y)
    _write_tiny(tmp_path, n_train=100, train_labels=y)
    monkeypatch.setattr(idx_mod, "SYSTEM_DIRS", ())
    ds = fashion_mnist(tmp_path, pca=0, max_train=20, seed=3)
    assert ds.X.shape == (20, 16)
    assert np.bincount(ds.y.numpy(), minlength=4).tolist() == [10, 6, 3, 1]
    again = fashion_mnist(tmp_path, pca=0, max_train=20, seed=3)
    assert torch.equal(ds.X, again.X)                     # seeded
    other = stratified_indices(y, 20, seed=4)
    assert not np.array_equal(other, stratified_indices(y, 20, seed=3))
    # largest remainders: 7 of 100 -> quotas 3.5/2.1/1.05/0.35, floors 3/2/1/0, the spare row to class 0
    counts = np.bincount(y[stratified_indices(y, 7, seed=0)], minlength=4).tolist()
    assert sum(counts) == 7 and counts == [4, 2, 1, 0]
    with pytest.raises(ValueError, match="max_train"):
        stratified_indices(y, 101)


_REAL = Path("/usr/share/datasets/fashion-mnist")
_HAVE_REAL = all((_REAL / f).exists() for f in IDX_FILES.values())


@pytest.mark.skipif(not _HAVE_REAL, reason=f"Fashion-MNIST not installed in {_REAL} (as root: {INSTALL_COMMAND})")
def test_real_fashion_mnist_files():
    tr, ytr = read_idx(_REAL / IDX_FILES["train_images"]), read_idx(_REAL / IDX_FILES["train_labels"])
    te, yte = read_idx(_REAL / IDX_FILES["test_images"]), read_idx(_REAL / IDX_FILES["test_labels"])
    assert tr.shape == (60000, 28, 28) and te.shape == (10000, 28, 28) and tr.dtype == np.uint8
    assert ytr.shape == (60000,) and yte.shape == (10000,) and ytr.dtype == np.uint8
    assert set(np.unique(ytr)) == set(range(10)) and set(np.unique(yte)) == set(range(10))
    assert np.bincount(ytr).tolist() == [6000] * 10                  # Fashion-MNIST is balanced
    ds = fashion_mnist(_REAL, pca=0)
    assert ds.X.shape == (60000, 784) and ds.Xte.shape == (10000, 784)
    assert ds.X.dtype == torch.float32 and ds.y.dtype == torch.long and ds.num_classes == 10
    assert int(ds.y.min()) == 0 and int(ds.y.max()) == 9


def test_holdout_indices_is_a_seeded_disjoint_stratified_split():
    from pyro_distill.data.subsets import holdout_indices

    y = torch.arange(10).repeat_interleave(20)  # 200 rows, 10 classes of 20
    kept, held = holdout_indices(200, 3, y)
    assert len(held) == 40 and torch.equal(torch.cat([kept, held]).sort().values, torch.arange(200))
    assert torch.equal(torch.bincount(y[held], minlength=10), torch.full((10,), 4))  # 20% of every class
    assert all(torch.equal(a, b) for a, b in zip(holdout_indices(200, 3, y), (kept, held)))  # seeded
    assert not torch.equal(holdout_indices(200, 1003, y)[1], held)
    kept, held = holdout_indices(50, 0, fraction=0.1)  # unstratified
    assert len(held) == 5 and len(set(kept.tolist()) | set(held.tolist())) == 50
