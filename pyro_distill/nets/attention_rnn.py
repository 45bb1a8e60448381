"""GRU encoder-decoder with additive (Bahdanau) attention over one flat weight vector.

Scores ``e_tj = wᵀ tanh(U s_{t-1} + V h_j)`` (decoder state ``s``, encoder states ``h_j``), attention
``α_t = softmax_j(e_tj)`` over the valid (non-pad) source positions, context ``c_t = Σ_j α_tj h_j``.
With ``uniform_context=True`` (the student) there are no attention blocks and ``c_t = mean_j h_j`` over
the valid positions, the same function as the teacher with ``w = 0`` (or ``U = V = 0``): every score is
0 and the masked softmax is ``1/T_valid``. The student's layout is the teacher's minus the ``attn.*``
blocks, in the same order, so conditioning the teacher's Gaussian gives the student's coordinates.

Input ``x`` is the packed long tensor ``[N, S + T]`` = source tokens (right-padded with 0) followed by the
teacher-forcing decoder input (BOS + target shifted right); labels ``y`` ``[N, T]`` (0 = padding).
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import TorchDistribution, constraints

from ..layout import Layout
from .base import BayesianNet, fan_in_scale, register_net

__all__ = ["AttentionRNN", "MaskedSequenceCategorical", "ATTENTION_BLOCKS"]

ATTENTION_BLOCKS = ("attn.U", "attn.V", "attn.w")


class MaskedSequenceCategorical(TorchDistribution):
    """Independent categoricals over ``T`` positions (event), padding positions (label ``pad``) ignored.

    ``log_prob(y) = Σ_t [y_t != pad] log softmax(logits_t)[y_t]``; batch shape ``logits.shape[:-2]``.
    """

    arg_constraints = {"logits": constraints.real}
    has_enumerate_support = False

    def __init__(self, logits: torch.Tensor, pad: int = 0, validate_args: bool | None = None):
        self.logits = logits
        self.pad = pad
        super().__init__(logits.shape[:-2], logits.shape[-2:-1], validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.logits.shape[-1] - 1), 1)

    def expand(self, batch_shape, _instance=None):
        bs = torch.Size(batch_shape)
        return MaskedSequenceCategorical(self.logits.expand(bs + self.logits.shape[-2:]), self.pad)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(self.logits, -1)
        value = value.long()
        shape = torch.broadcast_shapes(lp.shape[:-1], value.shape)
        tok = lp.expand(*shape, lp.shape[-1]).gather(-1, value.expand(shape).unsqueeze(-1)).squeeze(-1)
        return (tok * (value != self.pad)).sum(-1)

    def sample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        """Independent draws per position (padding positions are drawn too; the mask applies to labels)."""
        with torch.no_grad():
            probs = torch.softmax(self.logits, -1)
            flat = probs.reshape(-1, probs.shape[-1])
            s = torch.multinomial(flat, 1).reshape(probs.shape[:-1])
            return s.expand(torch.Size(sample_shape) + s.shape).clone() if sample_shape else s


@register_net
class AttentionRNN(BayesianNet):
    """Seq2seq GRU with additive attention (teacher) or uniform-average context (student).

    Layout (``uniform_context`` drops the three ``attn.*`` blocks):
    ``src_emb [Vs, E]``, ``tgt_emb [Vt, E]``, ``enc.W_ih [3H, E]``, ``enc.W_hh [3H, H]``, ``enc.b_ih [3H]``,
    ``enc.b_hh [3H]``, ``attn.U [A, H]`` (decoder state), ``attn.V [A, H]`` (encoder states), ``attn.w [A]``,
    ``dec.W_ie [3H, E]``, ``dec.W_ic [3H, H]`` (context), ``dec.W_hh [3H, H]``, ``dec.b_ih [3H]``, ``dec.b_hh [3H]``,
    ``out.weight [Vt, 2H]`` (on ``[s_t; c_t]``), ``out.bias [Vt]``. GRU gates are ordered r, z, n (as torch).
    Prior: independent ``N(0, 1)`` on embeddings, fan-in ``N(0, 1/n_in)`` elsewhere (``1/H`` for
    ``attn.w`` is replaced by ``1/A``), or ``N(0, prior_scale^2)`` everywhere.
    """

    likelihood = "categorical"

    def __init__(self, src_vocab: int, tgt_vocab: int, src_len: int, emb: int = 16, hidden: int = 32,
                 attn: int = 16, uniform_context: bool = False, pad: int = 0, bos: int = 1, eos: int = 2,
                 prior_scale: float | None = None):
        sizes = {"src_vocab": src_vocab, "tgt_vocab": tgt_vocab, "src_len": src_len, "emb": emb, "hidden": hidden,
                 "attn": attn}
        bad = {k: v for k, v in sizes.items() if int(v) < 1}
        if bad:
            raise ValueError(f"AttentionRNN sizes must be positive, got {bad}")
        if tgt_vocab <= max(pad, bos, eos):
            raise ValueError(f"tgt_vocab={tgt_vocab} must exceed the special indices pad/bos/eos={pad}/{bos}/{eos}")
        if prior_scale is not None and not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale}")
        self.src_vocab, self.tgt_vocab, self.src_len = int(src_vocab), int(tgt_vocab), int(src_len)
        self.emb, self.hidden, self.attn = int(emb), int(hidden), int(attn)
        self.uniform_context = bool(uniform_context)
        self.pad, self.bos, self.eos = int(pad), int(bos), int(eos)
        self.prior_scale = prior_scale
        E, H, A = self.emb, self.hidden, self.attn
        blocks: list[tuple[str, tuple[int, ...], float]] = [
            ("src_emb", (self.src_vocab, E), 1.0),
            ("tgt_emb", (self.tgt_vocab, E), 1.0),
            ("enc.W_ih", (3 * H, E), fan_in_scale(E)),
            ("enc.W_hh", (3 * H, H), fan_in_scale(H)),
            ("enc.b_ih", (3 * H,), fan_in_scale(E)),
            ("enc.b_hh", (3 * H,), fan_in_scale(H)),
        ]
        if not self.uniform_context:
            blocks += [("attn.U", (A, H), fan_in_scale(H)), ("attn.V", (A, H), fan_in_scale(H)),
                       ("attn.w", (A,), fan_in_scale(A))]
        blocks += [
            ("dec.W_ie", (3 * H, E), fan_in_scale(E + H)),
            ("dec.W_ic", (3 * H, H), fan_in_scale(E + H)),
            ("dec.W_hh", (3 * H, H), fan_in_scale(H)),
            ("dec.b_ih", (3 * H,), fan_in_scale(E + H)),
            ("dec.b_hh", (3 * H,), fan_in_scale(H)),
            ("out.weight", (self.tgt_vocab, 2 * H), fan_in_scale(2 * H)),
            ("out.bias", (self.tgt_vocab,), fan_in_scale(2 * H)),
        ]
        self.layout = Layout((n, s) for n, s, _ in blocks)
        self._scales = [(s, sc) for _, s, sc in blocks]

    # ------------------------------------------------------------------ description
    @property
    def num_outputs(self) -> int:
        return self.tgt_vocab

    def config(self) -> dict[str, Any]:
        return {"type": "AttentionRNN", "src_vocab": self.src_vocab, "tgt_vocab": self.tgt_vocab,
                "src_len": self.src_len, "emb": self.emb, "hidden": self.hidden, "attn": self.attn,
                "uniform_context": self.uniform_context, "pad": self.pad, "bos": self.bos, "eos": self.eos,
                "prior_scale": self.prior_scale}


    def prior_scales(self) -> torch.Tensor:
        parts = []
        for shape, sc in self._scales:
            n = 1
            for s in shape:
                n *= s
            parts.append(torch.full((n,), self.prior_scale if self.prior_scale is not None else sc,
                                    dtype=torch.float64))
        return torch.cat(parts)

    # ------------------------------------------------------------------ pieces
    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(source tokens ``[N, S]``, decoder input tokens ``[N, T]``) from the packed input.

        Leading dims ``[..., N, L]`` broadcast against the weights' (one input set per weight vector: the curvature
        module's per-example products use this)."""
        if x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"AttentionRNN inputs are token ids (long), got dtype {x.dtype}; "
                             "build them with pyro_distill.data.sequences")
        if x.dim() < 2 or x.shape[-1] <= self.src_len:
            raise ValueError(f"packed input must be [N, src_len + T] with src_len={self.src_len} and T >= 1, "
                             f"got shape {tuple(x.shape)}")
        return x[..., : self.src_len], x[..., self.src_len :]

    @staticmethod
    def _gru(gi: torch.Tensor, h: torch.Tensor, W_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        """One GRU step given the input projection ``gi = W_ih x + b_ih`` ``[..., N, 3H]``."""
        gh = torch.matmul(h, W_hh.transpose(-1, -2)) + b_hh.unsqueeze(-2)
        ir, iz, in_ = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return n + z * (h - n)

    @staticmethod
    def _embed(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``table [..., V, E]`` at ``tokens [N, L]`` -> ``[..., N, L, E]`` (tokens with leading dims are paired
        with the table's: ``[B, N, L]`` against ``[B, V, E]``)."""
        if tokens.dim() == 2:
            N, L = tokens.shape
            return table[..., tokens.reshape(-1), :].reshape(*table.shape[:-2], N, L, table.shape[-1])
        batch = torch.broadcast_shapes(table.shape[:-2], tokens.shape[:-2])
        N, L, E = tokens.shape[-2], tokens.shape[-1], table.shape[-1]
        idx = tokens.expand(*batch, N, L).reshape(*batch, N * L, 1).expand(*batch, N * L, E)
        return table.expand(*batch, *table.shape[-2:]).gather(-2, idx).reshape(*batch, N, L, E)

    def encode(self, parts: dict[str, torch.Tensor], src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """(encoder states ``[..., N, S, H]``, valid mask ``[N, S]``, last valid state ``[..., N, H]``)."""
        mask = src != self.pad
        lengths = mask.sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError("a source sequence is empty (all padding); every input needs at least one token")
        xe = self._embed(parts["src_emb"], src)
        gi = torch.matmul(xe, parts["enc.W_ih"].transpose(-1, -2).unsqueeze(-3)) + parts["enc.b_ih"][..., None, None, :]
        batch = gi.shape[:-3]
        h = gi.new_zeros(*batch, src.shape[-2], self.hidden)
        states = []
        for j in range(src.shape[-1]):
            h = self._gru(gi[..., j, :], h, parts["enc.W_hh"], parts["enc.b_hh"])
            states.append(h)
        Hs = torch.stack(states, -2)
        idx = (lengths - 1)[..., None, None].expand(*lengths.shape, 1, self.hidden)
        last = Hs.gather(-2, idx.expand(*batch, *idx.shape[-3:])).squeeze(-2)
        return Hs, mask, last

    def _weights(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked softmax over source positions: ``scores [..., N, S]`` -> attention ``[..., N, S]``."""
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)

    def _uniform(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``1/T_valid`` over valid positions, 0 at padding: ``[N, S]``."""
        m = mask.to(dtype)
        return m / m.sum(-1, keepdim=True)

    def _decode(self, w: torch.Tensor, src: torch.Tensor, tgt_in: torch.Tensor | None, steps: int,
                return_attention: bool = False):
        parts = self.layout.unflatten(w)
        Hs, mask, s = self.encode(parts, src)
        batch = Hs.shape[:-3]
        if self.uniform_context:
            alpha_u = self._uniform(mask, Hs.dtype)
            ctx_fixed = (alpha_u.unsqueeze(-1) * Hs).sum(-2)
            gc_fixed = torch.matmul(ctx_fixed, parts["dec.W_ic"].transpose(-1, -2))
        else:
            VH = torch.matmul(Hs, parts["attn.V"].transpose(-1, -2).unsqueeze(-3))  # [..., N, S, A]
        W_ie_T = parts["dec.W_ie"].transpose(-1, -2)
        if tgt_in is not None:
            ge_all = torch.matmul(self._embed(parts["tgt_emb"], tgt_in), W_ie_T.unsqueeze(-3))
        b_ih = parts["dec.b_ih"].unsqueeze(-2)
        W_o = parts["out.weight"].transpose(-1, -2)
        b_o = parts["out.bias"].unsqueeze(-2)
        logits, attns, tokens = [], [], []
        tok = torch.full(src.shape[:-1], self.bos, dtype=torch.long, device=src.device)
        for t in range(steps):
            if self.uniform_context:
                ctx, gc = ctx_fixed, gc_fixed
                if return_attention:
                    attns.append(alpha_u.expand(*batch, *alpha_u.shape))
            else:
                q = torch.matmul(s, parts["attn.U"].transpose(-1, -2))  # [..., N, A]
                e = (torch.tanh(q.unsqueeze(-2) + VH) * parts["attn.w"][..., None, None, :]).sum(-1)
                alpha = self._weights(e, mask)
                ctx = (alpha.unsqueeze(-1) * Hs).sum(-2)
                gc = torch.matmul(ctx, parts["dec.W_ic"].transpose(-1, -2))
                if return_attention:
                    attns.append(alpha)
            if tgt_in is not None:
                ge = ge_all[..., t, :]
            else:
                emb = parts["tgt_emb"][..., tok, :] if tok.dim() == 1 else self._embed_tok(parts["tgt_emb"], tok)
                ge = torch.matmul(emb, W_ie_T)
            s = self._gru(ge + gc + b_ih, s, parts["dec.W_hh"], parts["dec.b_hh"])
            out = torch.matmul(torch.cat([s, ctx], -1), W_o) + b_o
            logits.append(out)
            if tgt_in is None:
                tok = out.argmax(-1)
                tokens.append(tok)
        res = torch.stack(logits, -2)
        if return_attention:
            return res, torch.stack(attns, -2)
        if tgt_in is None:
            return res, torch.stack(tokens, -1)
        return res

    @staticmethod
    def _embed_tok(table: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """``table [..., V, E]`` at per-sample tokens ``tok [..., N]`` -> ``[..., N, E]``."""
        idx = tok.unsqueeze(-1).expand(*tok.shape, table.shape[-1])
        return table.expand(*tok.shape[:-1], *table.shape[-2:]).gather(-2, idx)

    # ------------------------------------------------------------------ the BayesianNet interface
    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[..., N, T, Vt]`` for weights ``w [..., p]`` and packed input ``x``."""
        src, tgt_in = self.split(x)
        return self._decode(w, src, tgt_in, tgt_in.shape[-1])

    def attention(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forced attention weights ``[..., N, T, S]`` (uniform ``1/T_valid`` for the student)."""
        src, tgt_in = self.split(x)
        return self._decode(w, src, tgt_in, tgt_in.shape[1], return_attention=True)[1]

    def decode(self, w: torch.Tensor, x: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding: tokens ``[..., N, L]`` (L = ``max_len``, default the packed target length);
        positions after the first EOS are set to padding."""
        src, tgt_in = self.split(x)
        L = int(max_len or tgt_in.shape[1])
        with torch.no_grad():
            toks = self._decode(w, src, None, L)[1]
        after = (toks == self.eos).long().cumsum(-1) - (toks == self.eos).long()
        return toks.masked_fill(after > 0, self.pad)

    def output_dist(self, out: torch.Tensor, noise_scale: torch.Tensor | float | None = None):
        """Per-sequence observation distribution: batch ``[..., N]``, event ``[T]``, padding labels ignored."""
        return MaskedSequenceCategorical(out, pad=self.pad)

    def check_data(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        src, tgt_in = self.split(x)
        if int(src.max()) >= self.src_vocab or int(tgt_in.max()) >= self.tgt_vocab or int(x.min()) < 0:
            raise ValueError(f"token ids out of range: source vocabulary {self.src_vocab}, target {self.tgt_vocab}")
        if y is not None and y.shape != tgt_in.shape:
            raise ValueError(f"labels must be [N, T] = {tuple(tgt_in.shape)} (packed target length), "
                             f"got {tuple(y.shape)}")
        super().check_data(x, y)
