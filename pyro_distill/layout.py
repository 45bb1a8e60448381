"""Named blocks of a flat parameter vector.

A network's weights are ONE flat vector ``u``. A :class:`Layout` lists its named blocks in order
(``"layer1.weight"`` of shape ``(n_1, n_0)`` row by row, then ``"layer1.bias"``, ...) and is the only
place that computes flat offsets: every other module asks it for indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Block", "Layout"]


@dataclass(frozen=True)
class Block:
    """One named block: its shape and where it starts in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.numel


class Layout:
    """Ordered named blocks <-> flat indices.

    >>> lay = Layout([("layer1.weight", (3, 2)), ("layer1.bias", (3,))])
    >>> lay.size
    9
    >>> lay.rows("layer1.weight", [1]).tolist()
    [2, 3]
    """

    def __init__(self, blocks: Iterable[tuple[str, Sequence[int]]]):
        self._blocks: dict[str, Block] = {}
        offset = 0
        for name, shape in blocks:
            shape = tuple(int(s) for s in shape)
            if name in self._blocks:
                raise ValueError(f"duplicate block name {name!r} in layout")
            if any(s < 0 for s in shape):
                raise ValueError(f"block {name!r} has a negative dimension: {shape}")
            blk = Block(name, shape, offset)
            self._blocks[name] = blk
            offset += blk.numel
        self.size = offset

    # ------------------------------------------------------------------ description
    @property
    def names(self) -> list[str]:
        return list(self._blocks)

    @property
    def blocks(self) -> list[Block]:
        return list(self._blocks.values())

    def __contains__(self, name: str) -> bool:
        return name in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self):
        return iter(self._blocks.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(self.spec()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{b.name}{list(b.shape)}" for b in self)
        return f"Layout(p={self.size}: {inner})"

    def spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """A plain description (name, shape) that rebuilds the layout: ``Layout(lay.spec())``."""
        return [(b.name, b.shape) for b in self]

    def to_dict(self) -> list[list]:
        return [[b.name, list(b.shape)] for b in self]

    @classmethod
    def from_dict(cls, d: Sequence[Sequence]) -> Layout:
        return cls((name, tuple(shape)) for name, shape in d)

    def block(self, name: str) -> Block:
        try:
            return self._blocks[name]
        except KeyError:
            raise KeyError(f"no block {name!r} in layout; blocks are {self.names}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.block(name).shape

    def slice(self, name: str) -> slice:
        b = self.block(name)
        return slice(b.offset, b.stop)

    # ------------------------------------------------------------------ flat <-> blocks
    def _check_flat(self, w: torch.Tensor) -> None:
        if w.shape[-1] != self.size:
            raise ValueError(
                f"flat parameter vector has {w.shape[-1]} entries but the layout has p={self.size}; "
                "was this vector made for another architecture?"
            )

    def view(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """The block ``name`` of a flat vector ``w`` of shape ``[..., p]`` as ``[..., *shape]`` (a view)."""
        self._check_flat(w)
        b = self.block(name)
        return w[..., b.offset : b.stop].reshape(*w.shape[:-1], *b.shape)

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """All blocks of ``w`` (``[..., p]``) as a dict of views ``[..., *shape]``."""
        self._check_flat(w)
        return {b.name: w[..., b.offset : b.stop].reshape(*w.shape[:-1], *b.shape) for b in self}

    def flatten(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`; every block must be present with matching trailing shape."""
        missing = [n for n in self.names if n not in parts]
        extra = [n for n in parts if n not in self._blocks]
        if missing or extra:
            raise ValueError(f"flatten: missing blocks {missing}, unknown blocks {extra}")
        flat = []
        batch = None
        for b in self:
            t = parts[b.name]
            nd = len(b.shape)
            if tuple(t.shape[t.dim() - nd :]) != b.shape:
                raise ValueError(f"block {b.name!r} should end in shape {b.shape}, got {tuple(t.shape)}")
            lead = tuple(t.shape[: t.dim() - nd])
            batch = lead if batch is None else torch.broadcast_shapes(batch, lead)
            flat.append(t)
        batch = batch or ()
        return torch.cat([t.expand(*batch, *b.shape).reshape(*batch, b.numel) for t, b in zip(flat, self)], -1)

    # ------------------------------------------------------------------ index helpers
    def indices(self, name: str) -> torch.Tensor:
        """Flat indices of a whole block."""
        b = self.block(name)
        return torch.arange(b.offset, b.stop)

    def _grid(self, name: str) -> torch.Tensor:
        b = self.block(name)
        return torch.arange(b.offset, b.stop).reshape(b.shape)

    def _check_idx(self, name: str, dim: int, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        b = self.block(name)
        if dim >= len(b.shape):
            raise ValueError(f"block {name!r} of shape {b.shape} has no dimension {dim}")
        t = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        n = b.shape[dim]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise IndexError(f"indices {t.tolist()} out of range for dimension {dim} of {name!r} (size {n})")
        if t.unique().numel() != t.numel():
            raise ValueError(f"repeated indices {t.tolist()} for {name!r}")
        return t

    def rows(self, name: str, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Flat indices of rows ``rows`` of a 2-D block (row = neuron), in flat order."""
        r = self._check_idx(name, 0, rows)
        return self._grid(name)[r].reshape(-1).sort().values

    def cols(self, name: str, cols: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Flat indices of columns ``cols`` of a 2-D block (column = input neuron), in flat order."""
        c = self._check_idx(name, 1, cols)
        return self._grid(name)[:, c].reshape(-1).sort().values

    def entries(self, name: str, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Flat indices of entries ``idx`` along the first dimension of a block (e.g. bias entries)."""
        return self.rows(name, idx)

    def sub(self, name: str, index: tuple) -> torch.Tensor:
        """Flat indices of any sub-block selected by ordinary tensor indexing, e.g. ``(slice(0, 4), 2)``."""
        return self._grid(name)[index].reshape(-1).sort().values

    def complement(self, index: torch.Tensor) -> torch.Tensor:
        """All flat indices not in ``index``, in order."""
        mask = torch.ones(self.size, dtype=torch.bool)
        mask[torch.as_tensor(index, dtype=torch.long)] = False
        return mask.nonzero().reshape(-1)

    def block_of(self, i: int) -> tuple[str, tuple[int, ...]]:
        """Which block and which entry a flat index belongs to."""
        for b in self:
            if b.offset <= i < b.stop:
                return b.name, tuple(int(v) for v in torch.unravel_index(torch.tensor(i - b.offset), b.shape))
        raise IndexError(f"flat index {i} out of range for p={self.size}")
