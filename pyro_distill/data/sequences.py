"""Generated sequence-to-sequence tasks for the attention-removal experiments (no download needed).

- ``dates``: a date written in one of many human formats ("25 November 2026", "11/25/26",
  "Wed, Nov 25 2026", ...) -> ISO ``2026-11-25``. Each output character is copied from a different,
  format-dependent place of the input, which is what additive attention is good at.
- ``digit_sum``: a short string of digits ("3819") -> the decimal sum of its digits ("21"). The answer is a
  function of the multiset of digits, i.e. of a summary of the input: attention should matter little.

Tokens are characters. Index 0 is padding, 1 is BOS, 2 is EOS in both vocabularies. A task packs the
network input as ``X = [src | tgt_in]`` (long, ``[N, S + T]``; ``tgt_in`` = BOS + target shifted right)
and the label as ``y = tgt`` (``[N, T]``, target + EOS, right-padded with 0). The split is a fixed-seed
function of ``(seed, sizes)``: the same arguments always give the same tensors.
"""

from __future__ import annotations

import datetime as _dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "PAD", "BOS", "EOS", "Vocab", "SeqTask", "DATE_FORMATS", "dates", "digit_sum", "sequence_task", "TASKS",
    "exact_match", "token_accuracy", "strip_special",
]

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = ("<pad>", "<bos>", "<eos>")


@dataclass(frozen=True)
class Vocab:
    """Character vocabulary: index 0/1/2 = pad/bos/eos, then ``chars`` in the given order."""

    chars: str

    @property
    def size(self) -> int:
        return len(self.chars) + len(_SPECIALS)

    def encode(self, s: str) -> list[int]:
        try:
            return [self.chars.index(c) + len(_SPECIALS) for c in s]
        except ValueError:
            bad = sorted(set(s) - set(self.chars))
            raise ValueError(f"characters {bad} of {s!r} are not in the vocabulary {self.chars!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Characters up to the first EOS (pad and bos are skipped)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(_SPECIALS):
                out.append(self.chars[i - len(_SPECIALS)])
        return "".join(out)


@dataclass
class SeqTask:
    """A generated task: packed train/val/test tensors, vocabularies and the raw strings."""

    name: str
    src_vocab: Vocab
    tgt_vocab: Vocab
    src_len: int
    tgt_len: int
    X: torch.Tensor
    y: torch.Tensor
    Xval: torch.Tensor
    yval: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    description: str = ""

    def __iter__(self):  # ``X, y, Xte, yte = task``
        return iter((self.X, self.y, self.Xte, self.yte))

    def net_kwargs(self) -> dict[str, int]:
        """The sizes an :class:`~pyro_distill.nets.AttentionRNN` needs for this task."""
        return {"src_vocab": self.src_vocab.size, "tgt_vocab": self.tgt_vocab.size, "src_len": self.src_len}

    def src(self, X: torch.Tensor) -> torch.Tensor:
        return X[..., : self.src_len]


# ============================================================================ dates
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _fmt(d: _dt.date, f: str) -> str:
    M, D = _MONTHS[d.month - 1], _DAYS[d.weekday()]
    table = {
        "d": str(d.day), "dd": f"{d.day:02d}", "m": str(d.month), "mm": f"{d.month:02d}", "yy": f"{d.year % 100:02d}",
        "yyyy": str(d.year), "Month": M, "Mon": M[:3], "Day": D, "Dy": D[:3],
    }
    out, tok = [], ""
    for c in f + "\0":
        if c.isalpha():
            tok += c
            continue
        if tok:
            out.append(table[tok] if tok in table else tok)
            tok = ""
        if c != "\0":
            out.append(c)
    return "".join(out)


#: input formats; slashes are always month/day/year (US), dots always day.month.year, so no date is ambiguous
DATE_FORMATS: tuple[str, ...] = (
    "d Month yyyy", "dd Month yyyy", "Month d, yyyy", "Mon d yyyy", "d Mon yyyy", "Dy, Mon d yyyy",
    "Day, Month d, yyyy", "mm/dd/yy", "m/d/yy", "mm/dd/yyyy", "dd.mm.yyyy", "d.m.yy", "yyyy-mm-dd", "Mon dd, yy",
    "Dy d Month yyyy",
)
_DATE_SRC_CHARS = " ,-./0123456789" + "".join(sorted(set("".join(_MONTHS + _DAYS))))
_TGT_CHARS = "-0123456789"


def _date_pairs(n: int, rng: random.Random) -> list[tuple[str, str]]:
    lo, hi = _dt.date(1950, 1, 1).toordinal(), _dt.date(2049, 12, 31).toordinal()
    out = []
    for _ in range(n):
        d = _dt.date.fromordinal(rng.randint(lo, hi))
        # two-digit years are read as 1950..2049, the range the dates are drawn from
        out.append((_fmt(d, rng.choice(DATE_FORMATS)), d.isoformat()))
    return out


def _digit_sum_pairs(n: int, rng: random.Random, min_len: int = 2, max_len: int = 6) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_len, max_len)))
        out.append((s, str(sum(int(c) for c in s))))
    return out


def _pack(pairs: list[tuple[str, str]], sv: Vocab, tv: Vocab, S: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    N = len(pairs)
    src = torch.zeros(N, S, dtype=torch.long)
    tgt = torch.zeros(N, T, dtype=torch.long)
    tin = torch.zeros(N, T, dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        s = sv.encode(a)
        t = tv.encode(b) + [EOS]
        src[i, : len(s)] = torch.tensor(s)
        tgt[i, : len(t)] = torch.tensor(t)
        tin[i, : len(t)] = torch.tensor([BOS] + t[:-1])
    return torch.cat([src, tin], 1), tgt


def _make(name: str, gen: Callable[[int, random.Random], list[tuple[str, str]]], src_chars: str, n_train: int,
          n_val: int, n_test: int, seed: int, description: str) -> SeqTask:
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"split sizes must be positive, got train={n_train}, val={n_val}, test={n_test}")
    rng = random.Random(f"{name}:{seed}")  # string seeds hash deterministically (not via hash())
    # draw until the three splits hold distinct inputs: no test input is ever seen in training
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    need = n_train + n_val + n_test
    tries = 0
    while len(pairs) < need:
        for a, b in gen(need - len(pairs), rng):
            if a not in seen:
                seen.add(a)
                pairs.append((a, b))
        tries += 1
        if tries > 50:
            raise ValueError(f"task {name!r} cannot produce {need} distinct inputs; ask for fewer examples")
    sv, tv = Vocab(src_chars), Vocab(_TGT_CHARS)
    S = max(len(a) for a, _ in pairs)
    T = max(len(b) for _, b in pairs) + 1
    parts = {"train": pairs[:n_train], "val": pairs[n_train : n_train + n_val], "test": pairs[n_train + n_val :]}
    packed = {k: _pack(v, sv, tv, S, T) for k, v in parts.items()}
    return SeqTask(name, sv, tv, S, T, *packed["train"], *packed["val"], *packed["test"], pairs=parts,
                   description=description)


def dates(n_train: int = 4000, n_val: int = 500, n_test: int = 1000, seed: int = 0) -> SeqTask:
    """Date normalization: 15 human formats -> ISO ``yyyy-mm-dd`` (dates 1950..2049, distinct inputs)."""
    return _make("dates", _date_pairs, _DATE_SRC_CHARS, n_train, n_val, n_test, seed,
                 "dates in 15 human formats -> ISO yyyy-mm-dd; attention copies each output digit from its place")


def digit_sum(n_train: int = 4000, n_val: int = 500, n_test: int = 1000, seed: int = 0) -> SeqTask:
    """2-6 digits -> the decimal sum of the digits (a function of a summary of the input)."""
    return _make("digit_sum", _digit_sum_pairs, "0123456789", n_train, n_val, n_test, seed,
                 "2-6 digits -> sum of the digits; solvable from a summary, attention matters little")


TASKS: dict[str, Callable[..., SeqTask]] = {"dates": dates, "digit_sum": digit_sum}


def sequence_task(name: str, **kw) -> SeqTask:
    """A task by name (``"dates"`` or ``"digit_sum"``)."""
    if name not in TASKS:
        raise ValueError(f"unknown sequence task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kw)


# ============================================================================ metrics
def strip_special(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens after the first EOS set to PAD (the EOS itself is kept)."""
    after = (tokens == EOS).long().cumsum(-1) - (tokens == EOS).long()
    return tokens.masked_fill(after > 0, PAD)


def exact_match(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of sequences whose decoded tokens (up to and including EOS) equal the target: ``[...]``."""
    p = strip_special(pred)[..., : y.shape[-1]]
    if p.shape[-1] < y.shape[-1]:
        p = torch.nn.functional.pad(p, (0, y.shape[-1] - p.shape[-1]), value=PAD)
    return (p == y).all(-1).double().mean(-1)


def token_accuracy(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of target positions (non-pad, EOS included) where the decoded token is right: ``[...]``."""
    p = strip_special(pred)[..., : y.shape[-1]]
    if p.shape[-1] < y.shape[-1]:
        p = torch.nn.functional.pad(p, (0, y.shape[-1] - p.shape[-1]), value=PAD)
    m = y != PAD
    return ((p == y) & m).sum((-1, -2)).double() / m.sum()
