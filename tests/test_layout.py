"""Layout: named blocks <-> flat indices (round trips, batched views, index helpers, errors)."""

from __future__ import annotations

import pytest
import torch

from pyro_distill.layout import Layout


@pytest.fixture
def lay() -> Layout:
    # an MLP [3, 4, 2] with biases: p = 12 + 4 + 8 + 2 = 26
    return Layout([("layer1.weight", (4, 3)), ("layer1.bias", (4,)), ("layer2.weight", (2, 4)), ("layer2.bias", (2,))])


def test_offsets_and_size(lay: Layout) -> None:
    assert lay.size == 26
    assert lay.names == ["layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"]
    assert [b.offset for b in lay] == [0, 12, 16, 24]
    assert lay.slice("layer2.weight") == slice(16, 24)
    assert lay.shape("layer1.weight") == (4, 3)
    assert len(lay) == 4 and "layer1.bias" in lay and "layer3.bias" not in lay


def test_flatten_unflatten_round_trip(lay: Layout) -> None:
    w = torch.randn(lay.size)
    parts = lay.unflatten(w)
    assert parts["layer1.weight"].shape == (4, 3)
    # row-major: the first row of layer1.weight is the first 3 entries (row = neuron)
    torch.testing.assert_close(parts["layer1.weight"][0], w[:3])
    torch.testing.assert_close(parts["layer1.bias"], w[12:16])
    torch.testing.assert_close(lay.flatten(parts), w)


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_batched_round_trip(lay: Layout, lead: tuple[int, ...]) -> None:
    w = torch.randn(*lead, lay.size)
    parts = lay.unflatten(w)
    assert parts["layer2.weight"].shape == (*lead, 2, 4)
    torch.testing.assert_close(lay.view(w, "layer2.bias"), w[..., 24:26])
    back = lay.flatten(parts)
    assert back.shape == w.shape
    torch.testing.assert_close(back, w)
    # each batch element is the unbatched round trip
    if lead:
        one = lay.unflatten(w.reshape(-1, lay.size)[0])
        torch.testing.assert_close(one["layer1.weight"], parts["layer1.weight"].reshape(-1, 4, 3)[0])


def test_flatten_broadcasts_leading_dims(lay: Layout) -> None:
    parts = {n: torch.randn(*lay.shape(n)) for n in lay.names}
    parts["layer1.weight"] = torch.randn(7, 4, 3)  # only one block is batched
    out = lay.flatten(parts)
    assert out.shape == (7, lay.size)
    torch.testing.assert_close(out[3, 12:16], parts["layer1.bias"])


def test_unflatten_returns_views(lay: Layout) -> None:
    w = torch.zeros(lay.size)
    lay.view(w, "layer1.bias")[1] = 5.0
    assert w[13] == 5.0


def test_spec_and_dict_round_trip(lay: Layout) -> None:
    assert Layout(lay.spec()) == lay
    assert Layout.from_dict(lay.to_dict()) == lay
    assert hash(Layout.from_dict(lay.to_dict())) == hash(lay)
    assert lay != Layout([("layer1.weight", (4, 3))])
    assert "p=26" in repr(lay)


def test_rows_cols_entries(lay: Layout) -> None:
    # rows 1 and 3 of layer1.weight (4 x 3) -> flat 3..5 and 9..11
    assert lay.rows("layer1.weight", [3, 1]).tolist() == [3, 4, 5, 9, 10, 11]
    # column 2 of layer2.weight (2 x 4, offset 16) -> 16+2, 16+6
    assert lay.cols("layer2.weight", [2]).tolist() == [18, 22]
    assert lay.cols("layer2.weight", torch.tensor([0, 3])).tolist() == [16, 19, 20, 23]
    assert lay.entries("layer1.bias", [0, 2]).tolist() == [12, 14]
    assert lay.indices("layer2.bias").tolist() == [24, 25]
    assert lay.rows("layer1.weight", []).numel() == 0


def test_helpers_agree_with_views(lay: Layout) -> None:
    """Values at the returned flat indices are exactly the selected sub-block of the view."""
    w = torch.arange(lay.size, dtype=torch.float64)
    W2 = lay.view(w, "layer2.weight")
    torch.testing.assert_close(w[lay.cols("layer2.weight", [1, 3])], W2[:, [1, 3]].reshape(-1))
    torch.testing.assert_close(w[lay.rows("layer2.weight", [1])], W2[1])
    torch.testing.assert_close(w[lay.sub("layer1.weight", (slice(0, 2), 2))], lay.view(w, "layer1.weight")[0:2, 2])


def test_sub_and_complement_and_block_of(lay: Layout) -> None:
    idx = lay.sub("layer1.weight", (slice(1, 3), slice(0, 2)))
    assert idx.tolist() == [3, 4, 6, 7]
    comp = lay.complement(idx)
    assert comp.numel() == lay.size - 4
    assert sorted(set(comp.tolist()) | set(idx.tolist())) == list(range(lay.size))
    assert not set(comp.tolist()) & set(idx.tolist())
    assert lay.block_of(0) == ("layer1.weight", (0, 0))
    assert lay.block_of(7) == ("layer1.weight", (2, 1))
    assert lay.block_of(13) == ("layer1.bias", (1,))
    assert lay.block_of(25) == ("layer2.bias", (1,))
    # block_of inverts every helper
    for i in lay.cols("layer2.weight", [3]).tolist():
        name, (r, c) = lay.block_of(i)
        assert name == "layer2.weight" and c == 3


def test_errors(lay: Layout) -> None:
    with pytest.raises(IndexError, match="out of range"):
        lay.rows("layer1.weight", [4])
    with pytest.raises(IndexError, match="out of range"):
        lay.cols("layer1.weight", [-1])
    with pytest.raises(ValueError, match="repeated"):
        lay.rows("layer1.weight", [1, 1])
    with pytest.raises(ValueError, match="no dimension 1"):
        lay.cols("layer1.bias", [0])
    with pytest.raises(KeyError, match="blocks are"):
        lay.rows("layer9.weight", [0])
    with pytest.raises(IndexError, match="out of range"):
        lay.block_of(26)
    with pytest.raises(ValueError, match="another architecture"):
        lay.unflatten(torch.zeros(25))
    with pytest.raises(ValueError, match="another architecture"):
        lay.view(torch.zeros(3, 27), "layer1.bias")
    parts = lay.unflatten(torch.zeros(lay.size))
    with pytest.raises(ValueError, match="should end in shape"):
        lay.flatten(parts | {"layer1.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="missing blocks"):
        lay.flatten({k: v for k, v in parts.items() if k != "layer2.bias"})
    with pytest.raises(ValueError, match="unknown blocks"):
        lay.flatten(parts | {"extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="duplicate"):
        Layout([("a", (2,)), ("a", (3,))])
    with pytest.raises(ValueError, match="negative"):
        Layout([("a", (2, -1))])
