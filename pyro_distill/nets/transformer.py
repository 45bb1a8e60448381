"""A small pre-LN transformer encoder classifier over one flat weight vector.

Block ``b`` computes ``h <- h + Attn_b(LN1_b(h))`` then ``h <- h + FFN_b(LN2_b(h))``. Every head has its
own named layout blocks (``block{b}.attn.head{j}.q|k|v|o``; ``o`` is that head's slice of ``W_O``), so a
head, a sublayer or a whole block can be removed by conditioning its output projection on 0 (see
:mod:`pyro_distill.surgery.transformer`): the residual then carries ``h`` through unchanged.

Students are the same class: ``heads[b] = 0`` is a block without attention, ``ffn[b] = False`` a block
without feed-forward sublayer, fewer entries in ``heads`` fewer blocks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..layout import Layout
from .base import BayesianNet, fan_in_scale, register_net

__all__ = ["Transformer", "PAD"]

#: token id that marks a padded position in token inputs (inputs are float tensors of ids)
PAD = -1
EMBEDDINGS = ("patch", "token")
POOLINGS = ("mean", "cls")
FFN_ACTIVATIONS = {"gelu": torch.nn.functional.gelu, "relu": torch.relu}
#: prior std of LayerNorm gain offsets and biases (the gain is ``1 + g`` so a zero-mean prior means "no change")
LN_PRIOR_SCALE = 0.5


@register_net
class Transformer(BayesianNet):
    """Pre-LN transformer encoder classifier ``f(w, x) -> logits [..., N, n_classes]``.

    Inputs ``x``: ``embedding="patch"``: ``[N, T, input_dim]`` real features, a padded position has all
    features NaN; ``embedding="token"``: ``[N, T]`` token ids (float or integer) in ``0..input_dim-1``,
    ``PAD = -1`` marks padding. Positions are learned (``max_len``); pooling is the mean over valid
    positions, or a learned CLS vector prepended at position 0. A LayerNorm gain is stored as an offset
    ``g`` (scale ``1 + g``) so that every default prior is zero-mean.

    Layout, in order: ``embed.weight``/``embed.bias`` (patch) or ``embed.table`` (token), ``cls`` (CLS
    pooling), ``pos``; per block with heads: ``block{b}.ln1.gain|bias``, per head ``block{b}.attn.head{j}.q``,
    ``.k``, ``.v`` (``d_head x d_model``), ``.o`` (``d_model x d_head``), then ``block{b}.attn.o_bias``; per
    block with FFN: ``block{b}.ln2.gain|bias``, ``block{b}.ffn.w1|b1|w2|b2``; then ``ln_f.gain|bias``,
    ``out.weight``, ``out.bias``. Q, K, V have no biases (a key bias cancels in the softmax and a value
    bias is absorbed by ``o_bias``).

    Prior: fan-in ``N(0, 1/n_in)`` per weight matrix and its bias (``n_in = n_heads * d_head`` for ``W_O``),
    ``N(0, 1)`` for token tables, positions and CLS, ``N(0, 0.5^2)`` for LayerNorm offsets; or
    ``N(0, prior_scale^2)`` everywhere.
    """

    def __init__(self, input_dim: int, n_classes: int, max_len: int, d_model: int = 16,
                 heads: int | Sequence[int] = 4, n_blocks: int | None = None, ffn: bool | Sequence[bool] = True,
                 d_head: int | None = None, d_ff: int | None = None, embedding: str = "patch",
                 pooling: str = "mean", activation: str = "gelu", prior_scale: float | None = None,
                 likelihood: str = "categorical", noise_scale: float | None = 1.0, eps: float = 1e-5):
        if likelihood != "categorical":
            raise ValueError("the Transformer is a classifier: likelihood must be 'categorical'")
        if isinstance(heads, int):
            if n_blocks is None:
                raise ValueError("give heads per block as a list (e.g. heads=[4, 4]) or heads=int with n_blocks")
            heads = [heads] * int(n_blocks)
        heads = [int(h) for h in heads]
        if n_blocks is not None and int(n_blocks) != len(heads):
            raise ValueError(f"n_blocks={n_blocks} but heads lists {len(heads)} blocks: {heads}")
        if isinstance(ffn, bool):
            ffn = [ffn] * len(heads)
        ffn = [bool(f) for f in ffn]
        if len(ffn) != len(heads):
            raise ValueError(f"ffn has {len(ffn)} entries but heads has {len(heads)} blocks; give one per block")
        if any(h < 0 for h in heads):
            raise ValueError(f"heads per block must be >= 0 (0 = no attention sublayer), got {heads}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {EMBEDDINGS}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if activation not in FFN_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(FFN_ACTIVATIONS)}")
        if min(input_dim, n_classes, max_len, d_model) < 1:
            raise ValueError("input_dim, n_classes, max_len and d_model must be positive")
        if d_head is None:
            nz = [h for h in heads if h > 0]
            if not nz or d_model % nz[0]:
                raise ValueError(f"give d_head explicitly (d_model={d_model}, heads={heads})")
            d_head = d_model // nz[0]
        if prior_scale is not None and not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale}")
        self.input_dim, self.n_classes, self.max_len = int(input_dim), int(n_classes), int(max_len)
        self.d_model, self.heads, self.ffn = int(d_model), heads, ffn
        self.d_head = int(d_head)
        self.d_ff = int(d_ff) if d_ff is not None else 2 * self.d_model
        self.embedding, self.pooling, self.activation = embedding, pooling, activation
        self.prior_scale, self.likelihood, self.noise_scale, self.eps = prior_scale, likelihood, noise_scale, eps
        self._act = FFN_ACTIVATIONS[activation]
        self.layout, self._scales = self._build()

    # ------------------------------------------------------------------ description
    @property
    def n_blocks(self) -> int:
        return len(self.heads)

    @property
    def num_outputs(self) -> int:
        return self.n_classes

    def config(self) -> dict[str, Any]:
        return {"type": "Transformer", "input_dim": self.input_dim, "n_classes": self.n_classes,
                "max_len": self.max_len, "d_model": self.d_model, "heads": list(self.heads),
                "ffn": list(self.ffn), "d_head": self.d_head, "d_ff": self.d_ff, "embedding": self.embedding,
                "pooling": self.pooling, "activation": self.activation, "prior_scale": self.prior_scale}


    def _build(self) -> tuple[Layout, list[tuple[int, float]]]:
        d, e, f = self.d_model, self.d_head, self.d_ff
        blocks: list[tuple[str, tuple[int, ...]]] = []
        scales: list[tuple[int, float]] = []

        def add(name: str, shape: tuple[int, ...], scale: float) -> None:
            blocks.append((name, shape))
            scales.append((math.prod(shape), self.prior_scale if self.prior_scale is not None else scale))

        if self.embedding == "patch":
            add("embed.weight", (d, self.input_dim), fan_in_scale(self.input_dim))
            add("embed.bias", (d,), fan_in_scale(self.input_dim))
        else:
            add("embed.table", (self.input_dim, d), 1.0)
        if self.pooling == "cls":
            add("cls", (d,), 1.0)
        add("pos", (self.max_len + (self.pooling == "cls"), d), 1.0)
        for b, (H, has_ffn) in enumerate(zip(self.heads, self.ffn)):
            if H:
                add(f"block{b}.ln1.gain", (d,), LN_PRIOR_SCALE)
                add(f"block{b}.ln1.bias", (d,), LN_PRIOR_SCALE)
                for j in range(H):
                    for m in "qkv":
                        add(f"block{b}.attn.head{j}.{m}", (e, d), fan_in_scale(d))
                    add(f"block{b}.attn.head{j}.o", (d, e), fan_in_scale(H * e))
                add(f"block{b}.attn.o_bias", (d,), fan_in_scale(H * e))
            if has_ffn:
                add(f"block{b}.ln2.gain", (d,), LN_PRIOR_SCALE)
                add(f"block{b}.ln2.bias", (d,), LN_PRIOR_SCALE)
                add(f"block{b}.ffn.w1", (f, d), fan_in_scale(d))
                add(f"block{b}.ffn.b1", (f,), fan_in_scale(d))
                add(f"block{b}.ffn.w2", (d, f), fan_in_scale(f))
                add(f"block{b}.ffn.b2", (d,), fan_in_scale(f))
        add("ln_f.gain", (d,), LN_PRIOR_SCALE)
        add("ln_f.bias", (d,), LN_PRIOR_SCALE)
        add("out.weight", (self.n_classes, d), fan_in_scale(d))
        add("out.bias", (self.n_classes,), fan_in_scale(d))
        return Layout(blocks), scales

    def prior_scales(self) -> torch.Tensor:
        return torch.cat([torch.full((n,), s, dtype=torch.float64) for n, s in self._scales])

    # ------------------------------------------------------------------ the function
    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding input, valid-position mask [..., N, T]) with clear errors for wrong shapes.

        Patch inputs may carry leading dims ``[..., N, T, F]`` that broadcast against the weights' (one input
        set per weight vector: the curvature module's per-example products use this)."""
        if self.embedding == "patch":
            if x.dim() < 3 or x.shape[-1] != self.input_dim:
                raise ValueError(f"patch inputs must be [N, T, {self.input_dim}] (NaN rows = padding), "
                                 f"got {tuple(x.shape)}")
            mask = ~torch.isnan(x).any(-1)
            return torch.nan_to_num(x, nan=0.0), mask
        if x.dim() != 2:
            raise ValueError(f"token inputs must be [N, T] ids (PAD={PAD} = padding), got {tuple(x.shape)}")
        ids = x.long()
        mask = ids >= 0
        if bool((ids >= self.input_dim).any()) or bool((ids < PAD).any()):
            raise ValueError(f"token ids must lie in 0..{self.input_dim - 1} or be PAD={PAD}")
        return ids.clamp_min(0), mask

    def _ln(self, h: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        mu = h.mean(-1, keepdim=True)
        var = h.var(-1, unbiased=False, keepdim=True)
        return (h - mu) / torch.sqrt(var + self.eps) * (1 + gain[..., None, None, :]) + bias[..., None, None, :]

    def _run(self, w: torch.Tensor, x: torch.Tensor, collect: bool = False, taps: dict | None = None,
             record: dict | None = None):
        """The forward pass. ``taps`` (KFAC, :meth:`kfac_forward`): tensors added to the outputs of the linear maps
        (zeros: the function is unchanged, their gradients are the output gradients); ``record`` is filled with
        each map's input and its valid-position mask (torch.func needs tensors: all-True where nothing is padded)."""
        P = self.layout.unflatten(w)
        xin, mask = self._inputs(x)
        tap = (lambda name, t: t + taps[name]) if taps is not None else (lambda name, t: t)  # noqa: E731
        rec = record.__setitem__ if record is not None else (lambda name, value: None)  # noqa: E731
        T = mask.shape[-1]
        if T > self.max_len:
            raise ValueError(f"sequences have length {T} but max_len={self.max_len}; rebuild with a larger max_len")
        if self.embedding == "patch":
            h = torch.einsum("...ntf,...df->...ntd", xin.to(w.dtype), P["embed.weight"])
            h = tap("embed", h + P["embed.bias"][..., None, None, :])
            rec("embed", (xin.to(w.dtype), mask))
        else:
            h = P["embed.table"][..., xin, :]
        if self.pooling == "cls":
            cls = P["cls"][..., None, None, :].expand(*h.shape[:-2], 1, self.d_model)
            h = torch.cat([cls, h], -2)
            mask = torch.cat([torch.ones_like(mask[..., :1]), mask], -1)
        if bool((~mask).all(-1).any()):
            raise ValueError("a sequence has no valid position (all padding); drop it or use pooling='cls'")
        h = h + P["pos"][..., None, : h.shape[-2], :]
        keymask = ~mask[..., :, None, None, :]  # [..., N, 1, 1, T]: True = padded key
        attn_maps: list[torch.Tensor | None] = []
        hidden: list[torch.Tensor] = [h]
        for b, (H, has_ffn) in enumerate(zip(self.heads, self.ffn)):
            if H:
                z = self._ln(h, P[f"block{b}.ln1.gain"], P[f"block{b}.ln1.bias"])
                W = {m: torch.stack([P[f"block{b}.attn.head{j}.{m}"] for j in range(H)], -3) for m in "qkvo"}
                rec(f"block{b}.ln1", (z, mask))
                q = tap(f"block{b}.q", torch.einsum("...ntd,...hed->...nhte", z, W["q"]))
                k = tap(f"block{b}.k", torch.einsum("...ntd,...hed->...nhte", z, W["k"]))
                v = tap(f"block{b}.v", torch.einsum("...ntd,...hed->...nhte", z, W["v"]))
                s = torch.einsum("...nhte,...nhse->...nhts", q, k) / math.sqrt(self.d_head)
                a = torch.softmax(s.masked_fill(keymask, float("-inf")), -1)
                o = torch.einsum("...nhts,...nhse->...nhte", a, v)
                rec(f"block{b}.heads", (o, mask))
                # the tap adds to the residual: its gradient is the attention output's (bias included); without
                # taps the arithmetic is the original (h + heads) + bias, bit for bit
                h = h + tap(f"block{b}.o", torch.einsum("...nhte,...hde->...ntd", o, W["o"]))
                h = h + P[f"block{b}.attn.o_bias"][..., None, None, :]
                attn_maps.append(a)
            else:
                attn_maps.append(None)
            if has_ffn:
                z = self._ln(h, P[f"block{b}.ln2.gain"], P[f"block{b}.ln2.bias"])
                rec(f"block{b}.ln2", (z, mask))
                u = self._act(tap(f"block{b}.ffn1", torch.einsum("...ntd,...fd->...ntf", z, P[f"block{b}.ffn.w1"])
                                  + P[f"block{b}.ffn.b1"][..., None, None, :]))
                rec(f"block{b}.ffn", (u, mask))
                h = h + tap(f"block{b}.ffn2", torch.einsum("...ntf,...df->...ntd", u, P[f"block{b}.ffn.w2"])) \
                    + P[f"block{b}.ffn.b2"][..., None, None, :]
            hidden.append(h)
        h = self._ln(h, P["ln_f.gain"], P["ln_f.bias"])
        if self.pooling == "cls":
            pooled = h[..., 0, :]
        else:
            m = mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(-2) / m.sum(-2)
        rec("pooled", (pooled, torch.ones(pooled.shape[:-1], dtype=torch.bool, device=pooled.device)))
        logits = tap("out", torch.einsum("...nd,...cd->...nc", pooled, P["out.weight"]) + P["out.bias"][..., None, :])
        if collect:
            return logits, attn_maps, hidden, mask
        return logits

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., N, n_classes]`` for weights ``w [..., p]``."""
        return self._run(w, x)

    def features(self, w: torch.Tensor, x: torch.Tensor) -> dict[str, Any]:
        """Intermediate quantities for feature-level distillation: ``logits``, ``attn`` (per block
        ``[..., N, H, T, T]`` or None), ``hidden`` (the residual stream after the embedding and after each
        block, ``[..., N, T, d_model]``) and the valid-position ``mask [N, T]``."""
        logits, attn, hidden, mask = self._run(w, x, collect=True)
        return {"logits": logits, "attn": attn, "hidden": hidden, "mask": mask}

    # ------------------------------------------------------------------ Kronecker structure (KFAC)
    def kfac_maps(self) -> list[dict[str, Any]]:
        """The linear maps whose weights form Kronecker blocks, one entry per block: ``name`` (the block),
        ``index`` (flat indices ``[outputs, inputs (+1 bias column)]``, see :func:`~pyro_distill.gaussian.kron_index`),
        ``input`` / ``input_head`` (the recorded input of :meth:`kfac_forward` and, for a head's ``W_O`` slice, its
        head), ``output`` / ``output_head`` (the tap on the map's output and, for ``W_Q/W_K/W_V``, the head).

        Blocks: the patch embedding ``[W | b]``; per head its ``q``, ``k``, ``v`` (``d_head x d_model``) and ``o``
        (``d_model x d_head``) matrices; per FFN ``[W_1 | b_1]`` and ``[W_2 | b_2]``; the classifier ``[W | b]``.
        Outside every block (diagonal in a Kronecker Gaussian): token table, positions, CLS, LayerNorm offsets and
        ``o_bias`` (shared by the heads, so it belongs to no head's block)."""
        from ..gaussian import kron_index

        L = self.layout
        maps: list[dict[str, Any]] = []

        def add(name: str, index: torch.Tensor, inp: str, out: str, input_head: int | None = None,
                output_head: int | None = None) -> None:
            maps.append({"name": name, "index": index, "input": inp, "input_head": input_head, "output": out,
                         "output_head": output_head})

        if self.embedding == "patch":
            add("embed", kron_index(L, "embed.weight", "embed.bias"), "embed", "embed")
        for b, (H, has_ffn) in enumerate(zip(self.heads, self.ffn)):
            for j in range(H):
                for m in "qkv":
                    add(f"block{b}.attn.head{j}.{m}", kron_index(L, f"block{b}.attn.head{j}.{m}"), f"block{b}.ln1",
                        f"block{b}.{m}", output_head=j)
                add(f"block{b}.attn.head{j}.o", kron_index(L, f"block{b}.attn.head{j}.o"), f"block{b}.heads",
                    f"block{b}.o", input_head=j)
            if has_ffn:
                add(f"block{b}.ffn.1", kron_index(L, f"block{b}.ffn.w1", f"block{b}.ffn.b1"), f"block{b}.ln2",
                    f"block{b}.ffn1")
                add(f"block{b}.ffn.2", kron_index(L, f"block{b}.ffn.w2", f"block{b}.ffn.b2"), f"block{b}.ffn",
                    f"block{b}.ffn2")
        add("out", kron_index(L, "out.weight", "out.bias"), "pooled", "out")
        return maps

    def kron_index(self) -> list[torch.Tensor]:
        """The Kronecker blocks' flat-index matrices (:meth:`kfac_maps`), in layout order of their maps. Removing
        a head, an attention sublayer or a block conditions whole blocks (a head's ``o``, the FFN's ``[W_2|b_2]``)
        on 0 and marginalizes whole blocks, so a Kronecker posterior stays Kronecker under transformer surgery."""
        return [m["index"] for m in self.kfac_maps()]

    def kfac_forward(self, w: torch.Tensor, x: torch.Tensor, taps: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """``(logits, record)`` for ONE weight vector ``w [p]``, with ``taps[name]`` added to the output of each
        linear map (:meth:`kfac_taps` gives zeros of the right shapes, so the logits are unchanged and their
        gradients are the maps' output gradients); ``record[input] = (input, its valid-position mask)``."""
        record: dict[str, Any] = {}
        logits = self._run(w, x, taps=taps, record=record)
        return logits, record

    def kfac_taps(self, w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero taps for :meth:`kfac_forward` (one per linear map's output, shaped like it)."""
        N, T = x.shape[0], x.shape[1] + (self.pooling == "cls")
        d, e, f = self.d_model, self.d_head, self.d_ff
        z = functools.partial(torch.zeros, dtype=w.dtype, device=w.device)
        taps = {"out": z(N, self.n_classes)}
        if self.embedding == "patch":
            taps["embed"] = z(N, x.shape[1], d)
        for b, (H, has_ffn) in enumerate(zip(self.heads, self.ffn)):
            if H:
                taps |= {f"block{b}.{m}": z(N, H, T, e) for m in "qkv"} | {f"block{b}.o": z(N, T, d)}
            if has_ffn:
                taps |= {f"block{b}.ffn1": z(N, T, f), f"block{b}.ffn2": z(N, T, d)}
        return taps
