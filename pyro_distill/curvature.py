"""Curvature of the negative log-likelihood of any :class:`~pyro_distill.nets.base.BayesianNet`.

The generalized Gauss-Newton matrix (GGN) at weights ``w`` on data ``X``::

    G = sum_n sum_g J_ng^T H_ng J_ng,   J_ng = d f_g(x_n, w) / d w  (C x p),

with ``H = diag(pi) - pi pi^T`` (softmax of the logits) for a categorical likelihood and ``H = I / s^2`` for a
Gaussian one with noise std ``s``; ``g`` runs over output groups (one for an MLP or a Transformer, one per
target position for the :class:`~pyro_distill.nets.attention_rnn.AttentionRNN`, padding positions left out).

* :class:`GGN` -- the matrix as a linear operator (``mv``, ``mm`` by ``torch.func`` jvp then vjp, chunked over
  the data; no p x p matrix), its exact diagonal, the dense matrix on request, top-k eigenpairs (Lanczos with
  full reorthogonalization, or a block LOBPCG, both on the operator) and a scipy ``LinearOperator``.
* :func:`kfac` -- Kronecker factors of the GGN blocks of MLP layers and of the linear maps of families that name
  them (the Transformer: embedding, per-head Q/K/V/O, FFN, classifier; weight sharing over positions by
  KFAC-expand), :func:`kfac_block_dense` and :func:`kfac_indices` to place them in the flat parameter vector.

Every exact computation uses a square-root factor of the output Hessian, ``H = R R^T``: for a softmax
``R = diag(sqrt(pi)) - pi sqrt(pi)^T`` restricted to its C - 1 nonzero directions, for a Gaussian ``R = I / s``
(:func:`output_hessian_sqrt`). Then ``G = sum_n sum_c (J_n^T r_nc)(J_n^T r_nc)^T`` with ``r_nc`` the columns of
``R_n``: the diagonal and the dense matrix are sums over those "sqrt-factor gradients". For an
:class:`~pyro_distill.nets.mlp.MLP` they (and ``mv``/``mm``) are built in closed form (one backward pass of the
columns through the layers, outer products with the layer inputs; the forward pass cached); for other families
by ``vmap`` over ``vjp`` per chunk of a few examples (each cotangent runs through the whole chunk, so the cost
per example grows with the chunk: few examples per chunk is fastest).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from .checks import count
from .layout import Layout
from .nets.base import BayesianNet
from .nets.mlp import MLP

__all__ = ["GGN", "ScaledGGN", "kfac", "kfac_block_dense", "kfac_indices", "label_cotangent", "lanczos",
           "output_hessian_sqrt", "subsampled_ggn"]

#: float entries per working buffer (per-example gradient rows, cotangents): 2^25 = 128 MB in float32
_BUDGET = 2**25


# ============================================================================ output Hessian
def output_hessian_sqrt(out: torch.Tensor, likelihood: str, noise_scale: float | None = None,
                        mask: torch.Tensor | None = None, reduced: bool = True) -> torch.Tensor:
    """A square-root factor ``R`` (``[..., C, K]``, K factor columns) of the Hessian of the negative
    log-likelihood in the outputs ``out`` ``[..., C]``: ``H = R R^T``.

    Softmax: ``R = diag(sqrt(pi)) - pi sqrt(pi)^T`` (then ``R R^T = diag(pi) - pi pi^T`` since
    ``sqrt(pi)^T sqrt(pi) = 1``). ``R sqrt(pi) = 0``, so with ``reduced`` (default) only its ``K = C - 1``
    columns on an orthonormal basis ``Q`` of ``sqrt(pi)^perp`` are kept, ``R Q`` (``Q`` = the Householder
    reflection taking ``sqrt(pi)`` to ``-e_C``, last column dropped): a tenth fewer backward passes for
    ``C = 10``. Gaussian: ``R = I / s`` (``K = C``). ``mask`` (``[...]``, 0/1) zeroes masked groups.
    """
    C = out.shape[-1]
    if likelihood == "categorical":
        pi = torch.softmax(out.detach(), -1)
        sq = pi.sqrt()
        R = torch.diag_embed(sq) - pi.unsqueeze(-1) * sq.unsqueeze(-2)
        if reduced and C > 1:  # R Q = R[:, :-1] - R[:, -1] sq[:-1]^T / (1 + sq[-1])
            R = R[..., :-1] - R[..., -1:] * (sq[..., None, :-1] / (1 + sq[..., -1, None, None]))
    elif likelihood == "gaussian":
        if noise_scale is None:
            raise ValueError("a Gaussian likelihood needs its noise scale: pass noise_scale")
        eye = torch.eye(C, dtype=out.dtype, device=out.device) / float(noise_scale)
        R = eye.expand(*out.shape[:-1], C, C)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose 'categorical' or 'gaussian'")
    if mask is not None:
        R = R * mask[..., None, None].to(R.dtype)
    return R


# ============================================================================ the operator
class GGN:
    """The GGN of the negative log-likelihood of ``net`` at ``w`` on inputs ``X`` as a linear operator.

    ``y`` only matters for sequence outputs with padding (AttentionRNN): target positions with the padding
    label contribute nothing; without ``y`` every position counts. ``noise_scale`` overrides the network's
    Gaussian noise std. ``chunk`` is the number of examples per product pass (default: from a budget).
    Device and dtype follow ``w``; float inputs ``X`` are cast to ``w``'s dtype.

    The sqrt-factor gradients behind :meth:`diagonal` and :meth:`dense` come, by family, from: the MLP's closed
    form; a paired forward pass (when the family's ``forward`` evaluates ``x`` ``[B, 1, ...]`` against ``w``
    ``[B, p]`` example by weight copy: one backward pass per factor column, probed once on two examples); or
    ``vmap`` over ``vjp`` per chunk of a few examples. Where the family reads ``w`` only through
    ``layout.unflatten`` (checked once) gradients are taken per Layout block.

    >>> G = GGN(net, w_map, X)                              # doctest: +SKIP
    >>> G.mv(v); G.mm(V); G.diagonal(); G.dense(); G.eigh_topk(50)   # doctest: +SKIP
    """

    def __init__(self, net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor | None = None,
                 noise_scale: float | None = None, chunk: int | None = None):
        if w.dim() != 1 or w.shape[0] != net.num_params:
            raise ValueError(f"w must be one weight vector [p={net.num_params}], got shape {tuple(w.shape)}")
        if X.shape[0] == 0:
            raise ValueError("the GGN needs at least one input row; X is empty")
        self.net = net
        self.w = w.detach()
        self.p = int(w.shape[0])
        self.dtype, self.device = self.w.dtype, self.w.device
        self.X = X.to(device=self.device, dtype=self.dtype) if X.is_floating_point() else X.to(self.device)
        self.N = int(X.shape[0])
        self.likelihood = net.likelihood
        s = net.noise_scale if noise_scale is None else noise_scale
        if self.likelihood == "gaussian" and s is None:
            raise ValueError("this network's noise scale is fitted: pass noise_scale=<its value> to the GGN")
        self.noise_scale = None if s is None else float(s)
        with torch.no_grad():
            out0 = net.forward(self.w, self.X[:1])
        self.out_shape = tuple(out0.shape[1:])  # per example: (*groups, C)
        self.C = int(self.out_shape[-1])
        self.groups = math.prod(self.out_shape[:-1])
        self.mask = self._group_mask(y)
        per_example = max(1, self.groups * self.C)
        self.chunk = int(chunk) if chunk is not None else max(1, min(self.N, 2**15 // per_example))
        if self.chunk < 1:
            raise ValueError(f"chunk must be a positive number of examples, got {chunk}")

    def _group_mask(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """0/1 weights ``[N, *groups]`` for the output groups (padding positions of sequence labels)."""
        pad = getattr(self.net, "pad", None)
        if y is None or pad is None or len(self.out_shape) < 2:
            return None
        y = y.to(self.device)
        if tuple(y.shape) != (self.N, *self.out_shape[:-1]):
            raise ValueError(f"labels must be [N, *groups] = {(self.N, *self.out_shape[:-1])} to mask padding, "
                             f"got {tuple(y.shape)}")
        return (y != pad).to(self.dtype)

    # ------------------------------------------------------------------ pieces
    @property
    def shape(self) -> tuple[int, int]:
        return (self.p, self.p)

    def _slices(self, chunk: int | None = None) -> Iterator[slice]:
        c = chunk or self.chunk
        for a in range(0, self.N, c):
            yield slice(a, min(a + c, self.N))

    def _f(self, sl: slice) -> Callable[[torch.Tensor], torch.Tensor]:
        xb = self.X[sl]
        return lambda ww: self.net.forward(ww, xb)

    def _mask(self, sl: slice) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[sl]

    def _hmul(self, out: torch.Tensor, U: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``H_n u_n`` for every example/group: ``U`` ``[..., B, *groups, C]`` (leading batch dims allowed)."""
        if self.likelihood == "categorical":
            pi = torch.softmax(out, -1)
            HU = pi * U - pi * (pi * U).sum(-1, keepdim=True)
        else:
            HU = U / self.noise_scale**2
        return HU if mask is None else HU * mask.unsqueeze(-1)

    def _sqrt(self, out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return output_hessian_sqrt(out, self.likelihood, self.noise_scale, mask)

    # ------------------------------------------------------------------ products
    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` for ``v`` ``[p]``: per chunk ``J v`` by jvp, times ``H_n``, then ``J^T`` by vjp."""
        if v.shape != (self.p,):
            raise ValueError(f"mv expects a vector [p={self.p}], got {tuple(v.shape)}")
        return self.mm(v.unsqueeze(-1)).squeeze(-1)

    def mm(self, V: torch.Tensor) -> torch.Tensor:
        """``G V`` for ``V`` ``[p, k]`` (the k columns go through one vmapped jvp and vjp per chunk)."""
        if V.dim() != 2 or V.shape[0] != self.p:
            raise ValueError(f"mm expects a matrix [p={self.p}, k], got {tuple(V.shape)}")
        Vt = V.to(device=self.device, dtype=self.dtype).T.contiguous()  # [k, p]
        if isinstance(self.net, MLP):
            return self._mlp_mm(Vt).T
        res = torch.zeros_like(Vt)
        for sl in self._slices(max(1, self.chunk * 4 // max(4, Vt.shape[0]))):  # activations grow with k
            f = self._f(sl)
            out, vjp_fn = vjp(f, self.w)
            JV = vmap(lambda t, f=f: jvp(f, (self.w,), (t,))[1])(Vt)  # [k, B, *groups, C]
            HJV = self._hmul(out.detach(), JV, self._mask(sl))
            res += vmap(lambda u, vjp_fn=vjp_fn: vjp_fn(u)[0])(HJV)
        return res.T

    def _mlp_cached(self) -> list[tuple[slice, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
        """Per chunk (slice, outputs, layer inputs h_1.. (h_0 = X stays in X), activation derivatives),
        computed once: the MLP's products reuse the forward pass."""
        if getattr(self, "_cache", None) is None:
            cache = []
            for sl in self._slices():
                out, inputs, dacts = _mlp_forward(self.net, self.w, self.X[sl])
                cache.append((sl, out, inputs[1:], dacts))
            self._cache = cache
        return self._cache

    def _mlp_mm(self, Vt: torch.Tensor) -> torch.Tensor:
        """MLP closed form of ``G V`` (``Vt`` = ``V^T`` ``[k, p]``): forward-mode tangents layer by layer
        (``da_t = dU_t h_{t-1} + U_t dh_{t-1} + db_t``, ``dh_t = sigma'(a_t) da_t``), times ``H_n``, then the
        ordinary backward pass with outer products per column; every step is one matrix product."""
        net = self.net
        Ws, bs = _mlp_parts(net, self.w)
        dP = net.layout.unflatten(Vt)
        k, L = Vt.shape[0], net.num_layers
        dWs = [dP[f"layer{t}.weight"] for t in range(1, L + 1)]  # [k, n_t, n_{t-1}]
        dbs = [dP[f"layer{t}.bias"] if net.bias else None for t in range(1, L + 1)]
        res = torch.zeros_like(Vt)
        out_parts = {}
        for sl, out, hs, dacts in self._mlp_cached():
            inputs = [self.X[sl], *hs]
            B = out.shape[0]
            dh = None
            for t in range(L):
                da = (inputs[t] @ dWs[t].reshape(-1, dWs[t].shape[-1]).T).view(B, k, -1)
                if dh is not None:
                    da = da + dh @ Ws[t].T
                if dbs[t] is not None:
                    da = da + dbs[t]
                dh = da * dacts[t].unsqueeze(-2) if t < L - 1 else da
            g = self._hmul(out.unsqueeze(-2), dh, None)  # [B, k, C]
            for t in range(L - 1, -1, -1):
                gk = g.permute(1, 2, 0)  # [k, n_t, B]
                out_parts[t] = (gk @ inputs[t], gk.sum(-1))
                if t > 0:
                    g = (g @ Ws[t]) * dacts[t - 1].unsqueeze(-2)
            pieces = []
            for t in range(L):
                pieces.append(out_parts[t][0].reshape(k, -1))
                if net.bias:
                    pieces.append(out_parts[t][1])
            res += torch.cat(pieces, -1)
        return res

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.mv(V) if V.dim() == 1 else self.mm(V)

    # ------------------------------------------------------------------ sqrt-factor gradients
    def _factor_rows(self, max_rows: int) -> Iterator[torch.Tensor]:
        """Blocks of rows ``(J_n^T r_nc)^T`` (``[rows, p]``), over every example, group and factor column, so
        that ``G = sum over blocks of rows^T rows``. MLP: closed form; other nets: vmap over vjp."""
        if isinstance(self.net, MLP):
            B = max(1, max_rows // self.C)
            for sl in self._slices(B):
                yield _mlp_factor_rows(self.net, self.w, self.X[sl], self._sqrt_mlp(sl))
            return
        K1 = self.groups * self.C  # cotangents per example
        if self._paired_ok():
            B = max(1, min(self.N, max_rows // K1))
            for sl in self._slices(B):
                yield self._paired_rows(sl)
            return
        B = max(1, min(self.chunk, max_rows // K1, _generic_chunk(self.p, K1)))
        for sl in self._slices(B):
            yield self._generic_rows(sl)

    def _paired_forward(self, xb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs ``[B, *groups, C]`` of example ``b`` under its own weight copy (leaves ``[B, *block]`` per Layout
        block, all equal to ``w``): the network's batched ``forward`` with inputs ``[B, 1, ...]``."""
        net2, lay = self._block_net()
        B = xb.shape[0]
        parts = self.net.layout.unflatten(self.w)
        leaves = [parts[n].expand(B, *parts[n].shape).clone().requires_grad_(True) for n in self.net.layout.names]
        lay.parts = dict(zip(self.net.layout.names, leaves))
        try:
            out = net2.forward(self.w, xb.unsqueeze(1))
        finally:
            lay.parts = None
        return out.reshape(B, *self.out_shape), leaves

    def _paired_ok(self) -> bool:
        """Whether the network evaluates paired inputs (example ``b`` with weight copy ``b``: ``w`` ``[B, p]``,
        ``x`` ``[B, 1, ...]``, outputs ``[B, 1, ...]``) and reads ``w`` through its Layout: checked once on two
        examples. Then per-example gradients cost one backward pass per factor column (no waste)."""
        if getattr(self, "_paired_checked", None) is None:
            ok = False
            if self.N >= 2 and self._blocks_ok():
                try:
                    with torch.enable_grad():
                        out, _ = self._paired_forward(self.X[:2])
                    with torch.no_grad():
                        ref = self.net.forward(self.w, self.X[:2])
                    ok = out.shape == ref.shape and bool(torch.allclose(out.detach(), ref, rtol=1e-4, atol=1e-5 * (
                        float(ref.abs().max()) + 1e-30)))
                except Exception:  # noqa: BLE001 - a family without paired inputs: use the other paths
                    ok = False
            self._paired_checked = ok
        return self._paired_checked

    def _paired_grads(self, sl: slice) -> Iterator[tuple[int, int, tuple[torch.Tensor, ...]]]:
        """Per-example sqrt-factor gradients from one paired forward pass and one backward pass per (group g,
        factor column c): yields ``(g, c, per-block gradients [B, *block])``."""
        with torch.enable_grad():
            out, leaves = self._paired_forward(self.X[sl])
            B = out.shape[0]
            R = self._sqrt(out.detach(), self._mask(sl)).reshape(B, self.groups, self.C, -1)
            nc = R.shape[-1]
            out_g = out.reshape(B, self.groups, self.C)
            for g in range(self.groups):
                for c in range(nc):
                    cot = torch.zeros_like(out_g)
                    cot[:, g] = R[:, g, :, c]
                    last = g == self.groups - 1 and c == nc - 1
                    yield g, c, torch.autograd.grad(out_g, leaves, cot, retain_graph=not last)

    def _paired_rows(self, sl: slice) -> torch.Tensor:
        """:meth:`_paired_grads` as rows ``[B * groups * K, p]`` in (example, group, column) order."""
        rows = None
        for g, c, grads in self._paired_grads(sl):
            if rows is None:
                B = grads[0].shape[0]
                nc = self._sqrt(torch.zeros(1, self.C, dtype=self.dtype, device=self.device), None).shape[-1]
                rows = torch.empty(B, self.groups, nc, self.p, dtype=self.dtype, device=self.device)
            torch.cat([t.reshape(t.shape[0], -1) for t in grads], -1, out=rows[:, g, c])
        return rows.reshape(-1, self.p)

    def _sqrt_mlp(self, sl: slice) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda out: self._sqrt(out, None)

    def _block_vjp(self, xb: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``(f(w, xb), u -> J^T u [p])`` with the gradient taken per Layout block: the network reads its weights
        through ``layout.unflatten``, and a copy of it whose layout hands out the block tensors directly spares
        autograd the per-slice scatter of the flat vector (a zero-filled ``[K, p]`` buffer per block and
        cotangent batch, about a third of the time for a transformer). Used after :meth:`_blocks_ok` confirms
        that the network reads ``w`` only that way."""
        net2, lay = self._block_net()
        names = self.net.layout.names
        parts = self.net.layout.unflatten(self.w)

        def f(*blocks: torch.Tensor) -> torch.Tensor:
            lay.parts = dict(zip(names, blocks))
            try:
                return net2.forward(self.w, xb)
            finally:
                lay.parts = None

        out, vjp_fn = vjp(f, *(parts[n] for n in names))
        return out, lambda u: torch.cat([g.reshape(-1) for g in vjp_fn(u)])

    def _block_net(self) -> tuple[BayesianNet, _BlockLayout]:
        if getattr(self, "_bnet", None) is None:
            net2 = copy.copy(self.net)
            net2.layout = _BlockLayout(self.net.layout)
            self._bnet = (net2, net2.layout)
        return self._bnet

    def _blocks_ok(self) -> bool:
        """Whether per-block gradients equal the flat ones (one example, one random cotangent): false for a
        network that reads ``w`` other than through ``layout.unflatten``; then the flat path is used."""
        if getattr(self, "_blocks_checked", None) is None:
            xb = self.X[:1]
            net2, lay = self._block_net()
            names = self.net.layout.names
            try:  # plain autograd here: the first torch.func call of a process costs seconds
                with torch.enable_grad():
                    parts = self.net.layout.unflatten(self.w)
                    leaves = [parts[n].clone().requires_grad_(True) for n in names]
                    lay.parts = dict(zip(names, leaves))
                    try:
                        out = net2.forward(self.w, xb)
                    finally:
                        lay.parts = None
                    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                    u = u.to(dtype=out.dtype, device=out.device)
                    gb = torch.autograd.grad(out, leaves, u, allow_unused=True)
                    gb = torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1)
                                    for g, t in zip(gb, leaves)])
                    wl = self.w.clone().requires_grad_(True)
                    (gf,) = torch.autograd.grad(self.net.forward(wl, xb), wl, u)
                ok = bool(torch.allclose(gb, gf, rtol=1e-4, atol=1e-6 * float(gf.abs().max()) + 1e-30))
            except Exception:  # noqa: BLE001 - any failure of the adapter means: use the flat path
                ok = False
            self._blocks_checked = ok
        return self._blocks_checked

    def _generic_rows(self, sl: slice) -> torch.Tensor:
        """Per (example, group, factor column) gradients ``J_ng^T r_ngc`` of one chunk: ``[B * G * C, p]``."""
        if self._blocks_ok():
            out, g = self._block_vjp(self.X[sl])
            vjp_fn = lambda u: (g(u),)  # noqa: E731
        else:
            out, vjp_fn = vjp(self._f(sl), self.w)
        out = out.detach()
        B = out.shape[0]
        R = self._sqrt(out, self._mask(sl))  # [B, *groups, C, C]
        K, nc = B * self.groups, R.shape[-1]
        R = R.reshape(K, self.C, nc)
        # cotangent (example-group e, column c): R[e, :, c] at position e, zero elsewhere
        cot = torch.zeros(K, nc, K, self.C, dtype=out.dtype, device=out.device)
        idx = torch.arange(K, device=out.device)
        cot[idx, :, idx, :] = R.transpose(-1, -2)
        cot = cot.reshape(K * nc, *out.shape)
        return vmap(lambda u: vjp_fn(u)[0])(cot)

    # ------------------------------------------------------------------ diagonal, dense, trace
    def diagonal(self, estimator: str = "exact", samples: int = 1, seed: int = 0) -> torch.Tensor:
        """The GGN diagonal ``[p]``: ``"exact"``: ``diag(G)_i = sum_n sum_c (J_n^T r_nc)_i^2``; ``"sampled"``: the
        sampled-label Fisher, an unbiased Monte-Carlo estimate (:meth:`sampled_diagonal`, ``samples`` draws per
        example, seeded by ``seed``)."""
        if estimator == "sampled":
            return self.sampled_diagonal(samples, seed)
        if estimator != "exact":
            raise ValueError(f"unknown diagonal estimator {estimator!r}; choose 'exact' or 'sampled'")
        if isinstance(self.net, MLP):
            d = torch.zeros(self.p, dtype=self.dtype, device=self.device)
            B = max(1, min(self.N, _BUDGET // max(1, self.C * max(self.net.sizes))))
            for sl in self._slices(B):
                d += _mlp_diag(self.net, self.w, self.X[sl], lambda out: self._sqrt(out, None))
            return d
        d = torch.zeros(self.p, dtype=self.dtype, device=self.device)
        if self._paired_ok():  # square per block as the gradients come, without a row matrix
            dP = self.net.layout.unflatten(d)  # views into d
            B = max(1, min(self.N, _BUDGET // max(1, self.p)))
            for sl in self._slices(B):
                for _, _, grads in self._paired_grads(sl):
                    for name, t in zip(self.net.layout.names, grads):
                        dP[name] += t.square().sum(0)
            return d
        for rows in self._factor_rows(_BUDGET // self.p):
            d += rows.square().sum(0)
        return d

    def backward_passes(self, estimator: str = "exact", samples: int = 1) -> int:
        """Backward passes per example of :meth:`diagonal`: ``groups * K`` (K factor columns: ``C - 1`` for a
        softmax, ``C`` for a Gaussian) exact, ``samples`` sampled (every group's cotangent in one pass)."""
        if estimator == "sampled":
            return int(samples)
        return self.groups * (self.C - 1 if self.likelihood == "categorical" and self.C > 1 else self.C)

    def sampled_diagonal(self, samples: int = 1, seed: int = 0) -> torch.Tensor:
        """An unbiased Monte-Carlo estimate of the GGN diagonal: the diagonal of the sampled-label Fisher.

        Per example ``n`` and draw ``s``, labels ``y~_ng`` are drawn from the model's predictive at every output
        group ``g`` (every target position of a sequence; padding positions masked out) and ``r_ng = d NLL(y~_ng) /
        d f_ng`` (softmax: ``pi - onehot(y~)``; Gaussian: ``-eps / s``, ``eps ~ N(0, I)``); ``g_ns = sum_g
        J_ng^T r_ng`` is one backward pass for all groups at once, and::

            diag_i = (1/S) sum_s sum_n g_ns,i^2,     E[diag] = diag(sum_n sum_g J_ng^T H_ng J_ng),

        since ``E[r r^T] = H`` (exponential family with canonical link: softmax, Gaussian) and draws at different
        groups are independent with mean zero (no cross terms). Cost: ``samples`` backward passes per example
        instead of ``groups * (C - 1)`` (:meth:`backward_passes`). Seeded by ``seed`` (a ``torch.Generator`` of
        its own: the global RNG is not touched); the draws depend on the chunking.
        """
        if int(samples) < 1:
            raise ValueError(f"samples must be a positive number of label draws per example, got {samples}")
        k = int(samples)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        d = torch.zeros(self.p, dtype=self.dtype, device=self.device)
        if isinstance(self.net, MLP):
            B = max(1, min(self.N, _BUDGET // max(1, k * max(self.net.sizes))))
            for sl in self._slices(B):
                d += _mlp_diag(self.net, self.w, self.X[sl],
                               lambda out: _sampled_cotangents(out, self.likelihood, self.noise_scale, gen, k))
            return d / k
        if self._paired_ok():  # one backward pass per draw gives every example's gradient
            dP = self.net.layout.unflatten(d)
            B = max(1, min(self.N, _BUDGET // max(1, self.p)))
            for sl in self._slices(B):
                with torch.enable_grad():
                    out, leaves = self._paired_forward(self.X[sl])
                    R = _sampled_cotangents(out.detach(), self.likelihood, self.noise_scale, gen, k, self._mask(sl))
                    for s in range(k):
                        grads = torch.autograd.grad(out, leaves, R[..., s], retain_graph=s < k - 1)
                        for name, t in zip(self.net.layout.names, grads):
                            dP[name] += t.square().sum(0)
            return d / k
        B = max(1, min(self.chunk, _BUDGET // max(1, k * self.p), _generic_chunk(self.p, k)))
        for sl in self._slices(B):
            if self._blocks_ok():
                out, gfn = self._block_vjp(self.X[sl])
                vjp_fn = lambda u, gfn=gfn: (gfn(u),)  # noqa: E731
            else:
                out, vjp_fn = vjp(self._f(sl), self.w)
            out = out.detach()
            Bn = out.shape[0]
            R = _sampled_cotangents(out, self.likelihood, self.noise_scale, gen, k, self._mask(sl))
            # cotangent (draw s, example b): R[b, ..., s] at example b, zero elsewhere
            cot = torch.zeros(k, Bn, *out.shape, dtype=out.dtype, device=out.device)
            idx = torch.arange(Bn, device=out.device)
            cot[:, idx, idx] = R.movedim(-1, 0)
            rows = vmap(lambda u, vjp_fn=vjp_fn: vjp_fn(u)[0])(cot.reshape(k * Bn, *out.shape))
            d += rows.square().sum(0)
        return d / k

    def trace(self) -> float:
        """``tr G`` (the sum of the exact diagonal)."""
        return float(self.diagonal().sum())

    def dense(self) -> torch.Tensor:
        """The p x p matrix (one p x p buffer plus one row block): ``G += rows^T rows`` per block of
        sqrt-factor gradients (``syrk`` on CPU, half the flops of a product, then mirrored)."""
        G = torch.zeros(self.p, self.p, dtype=self.dtype, device=self.device)
        acc = _Gram(G)
        for rows in self._factor_rows(max(64, _BUDGET // self.p)):
            acc.add(rows)
        return acc.done()

    # ------------------------------------------------------------------ spectrum
    def eigh_topk(self, k: int, seed: int = 0, method: str = "lanczos", tol: float | None = None,
                  max_iter: int | None = None, restarts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest eigenpairs ``(values [k] descending, vectors [p, k])`` of the operator.

        ``"lanczos"``: Lanczos with full reorthogonalization (one ``mv`` per step, a basis of at most ``max_iter``
        vectors, default ``min(p, max(3k, k + 60))``; ``restarts`` thick restarts when a cycle ends unconverged,
        see :func:`lanczos`); ``"lobpcg"``: block LOBPCG with block ``mm`` products. Both
        start from a seeded random vector/block (reproducible) and stop when the residual norms of the top
        ``k`` Ritz pairs are below ``tol * lambda_max`` (default 1e-10 in float64, 1e-5 in float32).
        """
        if not 1 <= k <= self.p:
            raise ValueError(f"k must lie in 1..p={self.p}, got {k}")
        if tol is None:
            tol = 1e-10 if self.dtype == torch.float64 else 1e-5
        if method == "lanczos":
            vals, vecs, info = _lanczos(self.mv, self.p, k, seed, tol, max_iter, self.dtype, self.device,
                                        restarts=restarts)
        elif method == "lobpcg":
            vals, vecs, info = _lobpcg(self.mm, self.p, k, seed, tol, max_iter, self.dtype, self.device)
        else:
            raise ValueError(f"unknown method {method!r}; choose 'lanczos' or 'lobpcg'")
        #: how the last eigensolve ended: iterations, operator columns applied, the largest residual norm
        #: ``||G v - lambda v|| / lambda_max`` of the k pairs, and whether it is below ``tol``
        self.eig_info = info | {"method": method, "converged": info["residual"] <= tol}
        return vals, vecs

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` over numpy float vectors (for ``eigsh``, ``cg``, ...)."""
        from scipy.sparse.linalg import LinearOperator

        def matvec(v):
            return self.mv(torch.as_tensor(v, dtype=self.dtype, device=self.device).reshape(-1)).cpu().numpy()

        def matmat(V):
            return self.mm(torch.as_tensor(V, dtype=self.dtype, device=self.device)).cpu().numpy()

        dt = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator((self.p, self.p), matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=dt)


class ScaledGGN:
    """``scale`` times a GGN operator, with the operator interface :func:`pyro_distill.inference.laplace` uses
    (``mv``, ``mm``, ``diagonal``, ``dense``, ``eigh_topk``). Made by :func:`subsampled_ggn`: the GGN of ``n`` of
    the ``N`` rows times ``N / n``, an unbiased estimate of the full GGN (a sum over rows) for ``n / N`` of its cost.
    """

    def __init__(self, op: GGN, scale: float):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.op, self.scale = op, float(scale)
        self.p, self.dtype, self.device, self.N = op.p, op.dtype, op.device, op.N  # N: the rows it was built from
        self.eig_info: dict[str, Any] = {}

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale * self.op.mv(v)

    def mm(self, V: torch.Tensor) -> torch.Tensor:
        return self.scale * self.op.mm(V)

    def diagonal(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.scale * self.op.diagonal(*args, **kwargs)

    def dense(self) -> torch.Tensor:
        return self.scale * self.op.dense()

    def eigh_topk(self, k: int, seed: int = 0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        vals, vecs = self.op.eigh_topk(k, seed=seed, **kwargs)
        self.eig_info = self.op.eig_info
        return self.scale * vals, vecs


def subsampled_ggn(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor | None = None,
                   rows: int = 0, seed: int = 0, noise_scale: float | None = None) -> GGN | ScaledGGN:
    """The GGN of ``net`` at ``w`` on ``X``: exact (:class:`GGN`) when ``rows`` is 0 or at least ``len(X)``, else
    the GGN of ``rows`` rows drawn without replacement (seeded by ``seed``) times ``len(X) / rows``
    (:class:`ScaledGGN`, unbiased for the sum over all rows). For a sequence model (the RNN), whose GGN costs a
    product per target position, a few hundred of its thousands of sequences give the Laplace start in minutes."""
    N, rows = int(X.shape[0]), count("rows", rows)
    if rows == 0 or rows >= N:
        return GGN(net, w, X, y, noise_scale=noise_scale)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(int(seed)))[:rows].to(X.device)
    return ScaledGGN(GGN(net, w, X[idx], None if y is None else y[idx], noise_scale=noise_scale), N / rows)


class _BlockLayout(Layout):
    """A network's layout whose ``unflatten`` returns given block tensors while ``parts`` is set."""

    def __init__(self, layout: Layout):
        super().__init__(layout.spec())
        self.parts: dict[str, torch.Tensor] | None = None

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().unflatten(w) if self.parts is None else dict(self.parts)


def _generic_chunk(p: int, K1: int) -> int:
    """Examples per vmap-over-vjp pass: the cost per example grows with the chunk (each cotangent runs a
    backward through the whole chunk), the per-call overhead shrinks: a few examples is the sweet spot."""
    return max(1, min(4, 4096 // max(1, K1)))


class _Gram:
    """Accumulates ``M += rows^T rows`` into a square C-contiguous buffer: BLAS ``syrk`` on CPU (one
    triangle, half the flops of a product; mirrored in :meth:`done`), ``addmm_`` elsewhere."""

    def __init__(self, M: torch.Tensor):
        self.M = M
        self.syrk = _syrk(M.dtype) if M.device.type == "cpu" and M.is_contiguous() else None
        self.Mf = M.numpy().T if self.syrk is not None else None  # Fortran view of the same memory

    def add(self, rows: torch.Tensor) -> None:
        if self.syrk is not None:  # numpy rows.T is [n, K] in Fortran order (no copy): Mf(lower) += rows^T rows
            self.syrk(1.0, rows.detach().contiguous().numpy().T, beta=1.0, c=self.Mf, trans=0, lower=1,
                      overwrite_c=1)
        else:
            self.M.addmm_(rows.T, rows)

    def done(self) -> torch.Tensor:
        M = self.M
        if self.syrk is not None:  # Fortran lower = C upper: mirror the upper triangle down, a row block at a time
            n, bs = M.shape[0], 256
            for a in range(0, n, bs):
                b = min(a + bs, n)
                M[a:b, :a] = M[:a, a:b].T
                blk = M[a:b, a:b]
                blk.copy_(blk.triu() + blk.triu(1).T)
        return M


def _syrk(dtype: torch.dtype):
    if dtype not in (torch.float32, torch.float64):
        return None
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - scipy is a dependency
        return None
    return blas.dsyrk if dtype == torch.float64 else blas.ssyrk


# ============================================================================ MLP closed forms
def _act_derivative(net: MLP, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``sigma'(a)`` of the MLP's elementwise activation (closed forms, autograd otherwise)."""
    name = net.activation
    if name == "relu":
        return (a > 0).to(a.dtype)
    if name == "identity":
        return torch.ones_like(a)
    if name == "tanh":
        return 1 - h * h
    if name == "sigmoid":
        return h * (1 - h)
    with torch.enable_grad():
        aa = a.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(net._act(aa).sum(), aa)
    return d


def _mlp_parts(net: MLP, w: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    P = net.layout.unflatten(w)
    L = net.num_layers
    Ws = [P[f"layer{t}.weight"] for t in range(1, L + 1)]
    bs = [P[f"layer{t}.bias"] if net.bias else None for t in range(1, L + 1)]
    return Ws, bs


def _mlp_forward(net: MLP, w: torch.Tensor, x: torch.Tensor
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(outputs ``[B, C]``, layer inputs ``h_0..h_{L-1}``, activation derivatives ``sigma'(a_1..a_{L-1})``)."""
    Ws, bs = _mlp_parts(net, w)
    L = len(Ws)
    h, inputs, dacts = x, [x], []
    for t in range(L):
        a = h @ Ws[t].T if bs[t] is None else torch.addmm(bs[t], h, Ws[t].T)
        if t == L - 1:
            return a, inputs, dacts
        h = net._act(a)
        dacts.append(_act_derivative(net, a, h))
        inputs.append(h)
    raise AssertionError("unreachable")


def _mlp_backprop(net: MLP, w: torch.Tensor, dacts: list[torch.Tensor], R: torch.Tensor) -> list[torch.Tensor]:
    """Backpropagate output cotangents ``R`` ``[B, C, K]`` (K columns) to every layer's pre-activation:
    ``[g_1, ..., g_L]`` with ``g_t`` ``[B, K, n_t]``."""
    Ws, _ = _mlp_parts(net, w)
    g = R.transpose(-1, -2)
    gs = [g]
    for t in range(len(Ws) - 1, 0, -1):
        g = (g @ Ws[t]) * dacts[t - 1].unsqueeze(-2)
        gs.append(g)
    return gs[::-1]


def _mlp_diag(net: MLP, w: torch.Tensor, x: torch.Tensor, sqrt: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
    """Exact GGN diagonal of one chunk: weight block ``t``: ``sum_n (sum_c g_nc^2) (h_n^2)^T``; bias:
    ``sum_n sum_c g_nc^2``."""
    out, inputs, dacts = _mlp_forward(net, w, x)
    gs = _mlp_backprop(net, w, dacts, sqrt(out))
    parts = []
    for t, g in enumerate(gs):
        S = g.square().sum(-2)  # [B, n_t]
        parts.append((S.T @ inputs[t].square()).reshape(-1))
        if net.bias:
            parts.append(S.sum(0))
    return torch.cat(parts)


def _mlp_factor_rows(net: MLP, w: torch.Tensor, x: torch.Tensor, sqrt: Callable[[torch.Tensor], torch.Tensor]
                     ) -> torch.Tensor:
    """Rows ``(J_n^T r_nc)^T`` of one chunk in flat layout order: ``[B * C, p]`` (weights ``g h^T`` row-major,
    biases ``g``)."""
    out, inputs, dacts = _mlp_forward(net, w, x)
    gs = _mlp_backprop(net, w, dacts, sqrt(out))
    B, K = gs[-1].shape[:2]
    rows = torch.empty(B, K, w.shape[0], dtype=w.dtype, device=w.device)
    for t, g in enumerate(gs, start=1):
        sw = net.layout.slice(f"layer{t}.weight")
        rows[:, :, sw] = (g.unsqueeze(-1) * inputs[t - 1][:, None, None, :]).reshape(B, K, -1)
        if net.bias:
            rows[:, :, net.layout.slice(f"layer{t}.bias")] = g
    return rows.reshape(B * K, -1)


# ============================================================================ eigensolvers
def _orth_against(z: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``z`` minus its projection on the orthonormal columns of ``Q`` (twice: full reorthogonalization)."""
    for _ in range(2):
        z = z - Q @ (Q.T @ z)
    return z


def _lanczos(mv: Callable[[torch.Tensor], torch.Tensor], p: int, k: int, seed: int, tol: float,
             max_iter: int | None, dtype: torch.dtype, device: torch.device, restarts: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Top-k eigenpairs of a symmetric PSD operator by Lanczos with full reorthogonalization, thick-restarted.

    One cycle builds an orthonormal basis ``V`` of at most ``m_max = max_iter`` (default ``max(3k, k + 60)``) columns
    and the projected matrix ``H = V^T A V`` (tridiagonal in the first cycle), stopping early once the residuals
    ``|b s_last,i|`` of the top ``k`` Ritz pairs are below ``tol * |theta_max|``. If a cycle ends unconverged and
    ``restarts`` remain, the thick restart of Wu & Simon (2000) keeps the top ``l = min(m - 1, k + max(k // 2, 10))``
    Ritz vectors ``Y = V S_l`` and the residual direction ``q``: since ``A Y = Y Theta + q c^T`` with
    ``c_i = b s_last,i``, the new basis ``[Y, q]`` has ``H = [[Theta, c], [c^T, .]]`` (an arrowhead) and Lanczos goes on
    from ``q``. With ``restarts = 0`` the result is the plain (single-cycle) Lanczos, bit for bit."""
    m_max = min(p, max_iter if max_iter is not None else max(3 * k, k + 60))
    gen = torch.Generator(device=device).manual_seed(seed)
    V = torch.zeros(p, m_max, dtype=dtype, device=device)
    H = torch.zeros(m_max, m_max, dtype=torch.float64)
    q = torch.randn(p, generator=gen, dtype=dtype, device=device)
    q = q / q.norm()
    start, products, cycles, converged = 0, 0, 0, False
    while True:
        m, b, z = start, 0.0, q
        for j in range(start, m_max):
            V[:, j] = q
            z = mv(q)
            products += 1
            H[j, j] = float(q @ z)
            z = _orth_against(z, V[:, : j + 1])
            b = float(z.norm())
            m = j + 1
            if m >= k and (m == m_max or m % 5 == 0 or b == 0.0):
                theta, S = torch.linalg.eigh(H[:m, :m])
                res = (b * S[-1, -k:]).abs()
                if bool((res <= tol * max(float(theta[-1].abs()), 1e-300)).all()):
                    converged = True
                    break
            if m == m_max:
                break
            scale = max(float(H.diagonal()[: j + 1].abs().max()), 1e-300)
            if b <= 1e-12 * scale:  # invariant subspace: continue from a fresh direction (H splits into blocks)
                z = _orth_against(torch.randn(p, generator=gen, dtype=dtype, device=device), V[:, : j + 1])
                b_next = 0.0
                q = z / z.norm()
            else:
                b_next = b
                q = z / b
            H[j, j + 1] = H[j + 1, j] = b_next
        if converged or cycles >= restarts or m < m_max or b == 0.0:
            break
        # ---- thick restart: keep the top l Ritz pairs, continue from the residual direction
        cycles += 1
        theta, S = torch.linalg.eigh(H[:m, :m])
        l_keep = min(m - 1, k + max(k // 2, 10))
        top = torch.arange(m - 1, m - 1 - l_keep, -1)
        V[:, :l_keep] = V[:, :m] @ S[:, top].to(dtype=dtype, device=device)
        c = b * S[-1, top]
        H.zero_()
        H[:l_keep, :l_keep] = torch.diag(theta[top])
        H[:l_keep, l_keep] = c
        H[l_keep, :l_keep] = c
        q = z / b
        start = l_keep
    theta, S = torch.linalg.eigh(H[:m, :m])
    top = torch.arange(m - 1, m - 1 - k, -1)
    vecs = V[:, :m] @ S[:, top].to(dtype=dtype, device=device)
    resid = float((b * S[-1, top]).abs().max()) / max(float(theta[-1].abs()), 1e-300)
    info = {"iterations": m, "products": products, "residual": resid, "restarts": cycles}
    return theta[top].to(dtype=dtype, device=device), vecs, info


def lanczos(mv: Callable[[torch.Tensor], torch.Tensor], p: int, k: int, seed: int = 0, tol: float | None = None,
            max_iter: int | None = None, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
            restarts: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The ``k`` largest eigenpairs of any symmetric operator ``mv`` (``[p] -> [p]``) by Lanczos with full
    reorthogonalization: ``(values [k] descending, vectors [p, k], info)`` with ``info`` = iterations (the last
    basis size), products (operator applications in all), the largest residual ``|beta_m s_mi| / |theta_max|`` and
    restarts (thick restarts used). Seeded start (reproducible); ``tol`` defaults to 1e-10 (float64) or 1e-5; a
    basis of at most ``max_iter`` vectors (``min(p, max(3k, k + 60))``); when a cycle ends above ``tol``, up to
    ``restarts`` thick restarts (Wu & Simon 2000: the top Ritz vectors kept, the memory stays ``p x max_iter``)
    converge the lower pairs of a large ``k`` that one cycle leaves partly converged."""
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
    if restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {restarts}")
    return _lanczos(mv, p, k, seed, tol, max_iter, dtype, torch.device(device), restarts=restarts)


def _orthonormalize(Z: torch.Tensor, AZ: torch.Tensor | None = None, rtol: float = 1e-6
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal columns spanning ``Z`` (near-dependent directions dropped, by SVD), and ``A`` of them
    from ``AZ = A Z`` by the same column transformation (no new products)."""
    if Z.shape[1] == 0:
        return Z, AZ
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    keep = S > rtol * S[0]
    T = Vh[keep].T / S[keep]
    return U[:, keep], (None if AZ is None else AZ @ T)


def _lobpcg(mm: Callable[[torch.Tensor], torch.Tensor], p: int, k: int, seed: int, tol: float,
            max_iter: int | None, dtype: torch.dtype, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Top-k eigenpairs by block LOBPCG (Knyazev 2001): Rayleigh-Ritz on the orthonormalized basis
    ``[X, residuals, previous step]``, one block product ``mm`` (the non-converged residuals) per iteration.
    Every block is kept orthonormal (SVD with column dropping), so Rayleigh-Ritz is a plain ``eigh``."""
    n_iter = max_iter if max_iter is not None else 300
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    gen = torch.Generator(device=device).manual_seed(seed)
    X, _ = torch.linalg.qr(torch.randn(p, k, generator=gen, dtype=dtype, device=device))
    AX = mm(X)
    theta, S = torch.linalg.eigh(0.5 * (X.T @ AX + AX.T @ X))
    X, AX = X @ S, AX @ S
    P = AP = None
    products, it = k, 0
    while it < n_iter:
        it += 1
        res = AX - X * theta
        lam = max(float(theta.abs().max()), 1e-300)
        rnorm = res.norm(dim=0)
        done = rnorm <= tol * lam
        if bool(done.all()):
            break
        W = res[:, ~done]
        for _r in range(2):  # orthogonalize the residuals against X and P
            W = W - X @ (X.T @ W)
            if P is not None:
                W = W - P @ (P.T @ W)
        W, _ = _orthonormalize(W, None, rtol)
        AW = mm(W) if W.shape[1] else W
        products += W.shape[1]
        Z = torch.cat([X, W] + ([P] if P is not None else []), 1)
        AZ = torch.cat([AX, AW] + ([AP] if AP is not None else []), 1)
        Ain = Z.T @ AZ
        ev, U = torch.linalg.eigh(0.5 * (Ain + Ain.T))
        Cc = U[:, -k:].flip(-1)
        theta = ev[-k:].flip(-1)
        X, AX = Z @ Cc, AZ @ Cc
        # the new search direction: the step's part outside the old X, made orthonormal and orthogonal to X
        Cp = Cc.clone()
        Cp[:k] = 0
        P, AP = Z @ Cp, AZ @ Cp
        proj = X.T @ P
        P, AP = P - X @ proj, AP - AX @ proj
        P, AP = _orthonormalize(P, AP, rtol)
        if P.shape[1] == 0:
            P = AP = None
    order = torch.argsort(theta, descending=True)
    resid = float((AX - X * theta).norm(dim=0).max()) / max(float(theta.abs().max()), 1e-300)
    return theta[order], X[:, order], {"iterations": it, "products": products, "residual": resid}


# ============================================================================ KFAC
def kfac(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor | None = None, sampled: bool = False,
         seed: int = 0, noise_scale: float | None = None, chunk: int | None = None
         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """KFAC factors ``{"layer{t}": (A_t, G_t)}`` of the GGN blocks of an MLP's layers, in one pass over ``X``.

    With ``a_n = [h_{t-1,n}; 1]`` the layer's input augmented by a 1 for the bias (no 1 when ``bias=False``)
    and ``g_nc`` the backpropagated sqrt-factor column ``r_nc`` of the output Hessian at layer ``t``'s
    pre-activation (``H_n = R_n R_n^T``; ``sampled=True``: one column per example, the gradient of the
    negative log-likelihood of a label drawn from the model, seeded by ``seed``; ``E[g g^T] = H``)::

        A_t = (1/N) sum_n a_n a_n^T                 (n_{t-1}+1) x (n_{t-1}+1), input side = columns
        G_t = sum_n sum_c g_nc g_nc^T               n_t x n_t,                 output side = rows
        GGN block of vec([U_t | b_t]) (row-major) ~= G_t ⊗ A_t          (kfac_block_dense(A_t, G_t))

    ``vec([U_t | b_t])`` is row-major over the ``n_t x (n_{t-1}+1)`` matrix (row = neuron, the bias as the last
    column); its flat indices are :func:`kfac_indices`. The approximation is exact for a one-layer model with
    a Gaussian likelihood. ``y`` is unused for an MLP (the output Hessian of the GGN does not depend on it).
    """
    if not isinstance(net, MLP):
        if hasattr(net, "kfac_maps") and hasattr(net, "kfac_forward"):
            return _kfac_maps(net, w, X, sampled, seed, noise_scale, chunk)
        raise NotImplementedError(
            f"KFAC factors are implemented for MLP layers and families with kfac_maps/kfac_forward (Transformer); "
            f"{type(net).__name__} does not expose its linear maps' inputs and output gradients (use "
            "GGN(...).diagonal() or eigh_topk instead)")
    G = GGN(net, w, X, noise_scale=noise_scale, chunk=chunk)
    L, sizes = net.num_layers, net.sizes
    aug = 1 if net.bias else 0
    # input second moments (syrk), input sums (the bias column), output-gradient second moments
    HH = [_Gram(torch.zeros(sizes[t], sizes[t], dtype=G.dtype, device=G.device)) for t in range(L)]
    hs = [torch.zeros(sizes[t], dtype=G.dtype, device=G.device) for t in range(L)]
    GG = [_Gram(torch.zeros(sizes[t + 1], sizes[t + 1], dtype=G.dtype, device=G.device)) for t in range(L)]
    gen = torch.Generator(device=G.device).manual_seed(seed) if sampled else None
    B = chunk or max(1, min(G.N, _BUDGET // max(1, G.C * max(sizes))))
    for sl in G._slices(B):
        x = G.X[sl]
        out, inputs, dacts = _mlp_forward(net, G.w, x)
        if sampled:
            R = _sampled_cotangent(out, G.likelihood, G.noise_scale, gen)
        else:
            R = G._sqrt(out, None)
        gs = _mlp_backprop(net, G.w, dacts, R)
        for t in range(L):
            HH[t].add(inputs[t])
            hs[t] += inputs[t].sum(0)
            GG[t].add(gs[t].reshape(-1, gs[t].shape[-1]))
    res = {}
    for t in range(L):
        n = sizes[t]
        A = torch.empty(n + aug, n + aug, dtype=G.dtype, device=G.device)
        A[:n, :n] = HH[t].done()
        if aug:
            A[:n, n] = A[n, :n] = hs[t]
            A[n, n] = G.N
        res[f"layer{t + 1}"] = (A / G.N, GG[t].done())
    return res


def _kfac_maps(net: BayesianNet, w: torch.Tensor, X: torch.Tensor, sampled: bool, seed: int,
               noise_scale: float | None, chunk: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """KFAC for a family that names its linear maps (``net.kfac_maps()``) and exposes their inputs and output
    gradients (``net.kfac_forward(w, x, taps)``: zero ``taps`` added to each map's output, the inputs recorded).

    A map applied at several positions ``s`` of a sequence shares its weights; its factors are KFAC-expand's
    (Eschenhagen et al., 2023): ``A = mean over valid (n, s) of a a^T`` (bias-augmented),
    ``G = sum over (n, s, c) of g g^T``, so that ``G ⊗ A`` approximates the GGN block as for an MLP layer. Exact
    for one example at one position (the test compares with the dense GGN); padded positions are left out of
    ``A`` (their output gradients are 0). The output gradients ``g`` are the taps' gradients for each
    sqrt-factor column ``r_nc`` of the output Hessian (one ``vjp`` per column, batched by ``vmap``), or for one
    sampled-label cotangent per example (``sampled=True``)."""
    G = GGN(net, w, X, noise_scale=noise_scale, chunk=chunk)
    if G.groups != 1:
        raise NotImplementedError("KFAC over maps needs one output group per example (a classifier or regressor)")
    maps = net.kfac_maps()
    gen = torch.Generator(device=G.device).manual_seed(seed) if sampled else None
    acc: dict[str, list[Any]] = {}  # per block: [Gram of the inputs, Gram of the output gradients, input rows]
    for m in maps:
        r, c = m["index"].shape
        acc[m["name"]] = [_Gram(torch.zeros(c, c, dtype=G.dtype, device=G.device)),
                          _Gram(torch.zeros(r, r, dtype=G.dtype, device=G.device)), 0]
    B = chunk or max(1, min(G.N, 64))
    for sl in G._slices(B):
        x = G.X[sl]
        taps0 = net.kfac_taps(G.w, x)
        out, pull, rec = vjp(lambda t, x=x: net.kfac_forward(G.w, x, t), taps0, has_aux=True)
        R = _sampled_cotangent(out, G.likelihood, G.noise_scale, gen) if sampled else G._sqrt(out, None)
        grads = vmap(pull)(R.movedim(-1, 0))[0]  # {tap: [K, B, ...]}
        for m in maps:
            Asum, Gsum, _ = a_acc = acc[m["name"]]
            a, valid = rec[m["input"]]
            if m["input_head"] is not None:
                a = a[:, m["input_head"]]
            rows = a.detach().reshape(-1, a.shape[-1])[valid.reshape(-1)]
            if m["index"].shape[1] == rows.shape[-1] + 1:  # bias column
                rows = torch.cat([rows, torch.ones_like(rows[:, :1])], 1)
            Asum.add(rows)
            a_acc[2] += rows.shape[0]
            g = grads[m["output"]]
            if m["output_head"] is not None:
                g = g[:, :, m["output_head"]]
            Gsum.add(g.detach().reshape(-1, g.shape[-1]))
    return {name: (Asum.done() / max(n, 1), Gsum.done()) for name, (Asum, Gsum, n) in acc.items()}


def _sampled_cotangent(out: torch.Tensor, likelihood: str, noise_scale: float | None,
                       gen: torch.Generator | None) -> torch.Tensor:
    """One column per example (``[B, C, 1]``): ``pi - onehot(y~)``, ``y~ ~ Cat(pi)`` (softmax), or
    ``eps / s``, ``eps ~ N(0, I)`` (Gaussian) -- the output gradient of the NLL of a sampled label."""
    if likelihood == "categorical":
        pi = torch.softmax(out, -1)
        yt = torch.multinomial(pi, 1, generator=gen)
        return (pi - torch.zeros_like(pi).scatter_(-1, yt, 1.0)).unsqueeze(-1)
    eps = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
    return (eps / float(noise_scale)).unsqueeze(-1)


def label_cotangent(pi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``pi - onehot(labels)``: the gradient of ``-log softmax(f)[label]`` in the logits ``f`` (``pi`` ``[..., C]``,
    ``labels`` ``[...]``). Its mean under ``labels ~ Cat(pi)`` is 0, its second moment ``diag(pi) - pi pi^T``."""
    return pi - torch.zeros_like(pi).scatter_(-1, labels.unsqueeze(-1), 1.0)


def _sampled_cotangents(out: torch.Tensor, likelihood: str, noise_scale: float | None, gen: torch.Generator,
                        samples: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``samples`` output gradients of the NLL of labels drawn from the model, ``[..., C, samples]`` for outputs
    ``out`` ``[..., C]`` (every leading position drawn independently): :func:`label_cotangent` with
    ``y~ ~ Cat(softmax(out))``, or ``-eps / s`` with ``eps ~ N(0, I)`` (Gaussian). ``mask`` ``[...]`` zeroes
    positions (padding)."""
    out = out.detach()
    if likelihood == "categorical":
        pi = torch.softmax(out, -1)
        flat = pi.reshape(-1, pi.shape[-1])
        yt = torch.multinomial(flat, samples, replacement=True, generator=gen)  # [M, samples]
        R = label_cotangent(flat.unsqueeze(0).expand(samples, *flat.shape), yt.T)  # [samples, M, C]
        R = R.movedim(0, -1).reshape(*pi.shape, samples)
    else:
        if noise_scale is None:
            raise ValueError("a Gaussian likelihood needs its noise scale: pass noise_scale")
        eps = torch.randn(*out.shape, samples, generator=gen, dtype=out.dtype, device=out.device)
        R = -eps / float(noise_scale)
    if mask is not None:
        R = R * mask[..., None, None].to(R.dtype)
    return R


def kfac_block_dense(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The dense KFAC block ``G ⊗ A`` over ``vec([U_t | b_t])`` (row-major, bias last column); place it at
    :func:`kfac_indices` of the flat vector: ``M[idx[:, None], idx] = kfac_block_dense(A, G)``."""
    return torch.kron(G, A)


def kfac_indices(net: BayesianNet, layer: int | str) -> torch.Tensor:
    """Flat indices (``[n_t * (n_{t-1}+1)]``, from the Layout) of ``vec([U_t | b_t])`` row-major: neuron ``i``'s
    weights ``U_t[i, :]`` then its bias ``b_t[i]``, neuron after neuron (the flat vector stores all weight
    rows, then the bias block; this is the map between the two orders). ``layer``: ``t`` or ``"layer{t}"``; for
    a family with ``kfac_maps`` (Transformer) the block's name."""
    if not isinstance(net, MLP) and hasattr(net, "kfac_maps"):
        for m in net.kfac_maps():
            if m["name"] == layer:
                return m["index"].reshape(-1)
        raise KeyError(f"no KFAC block {layer!r}; blocks are {[m['name'] for m in net.kfac_maps()]}")
    name = layer if isinstance(layer, str) else f"layer{int(layer)}"
    wname = f"{name}.weight"
    if wname not in net.layout:
        raise KeyError(f"no layer {name!r} in this network; layers are layer1..layer{net.num_layers}")
    n_out, n_in = net.layout.shape(wname)
    W = net.layout.indices(wname).reshape(n_out, n_in)
    if getattr(net, "bias", False):
        W = torch.cat([W, net.layout.indices(f"{name}.bias").reshape(n_out, 1)], 1)
    return W.reshape(-1)
