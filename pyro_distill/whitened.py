"""SVI in the prior's whitened coordinates: the KL to a dense, low-rank or Kronecker prior in O(p^2) per step.

Under a prior ``N(mu, S_p)`` with a square root ``S_p = B B^T``, the dense guide is parameterized as
``w = mu + B v``, ``v ~ N(a, M M^T)`` (``M`` lower triangular), so that

    KL(q || p) = KL(N(a, M M^T) || N(0, I)) = 1/2 [ ||M||_F^2 + ||a||^2 - p - 2 sum_i log|M_ii| ]

costs O(p^2), where the KL against ``S_p`` in the original coordinates needs an O(p^3) triangular solve
``L_p^{-1} L`` every step. A draw costs two products ``v = a + z M^T``, ``w = mu + v B^T``.

Square roots ``B``: a dense prior uses its Cholesky factor ``L_p`` (the fitted factor is ``L = L_p M``, lower
triangular); a low-rank + diagonal prior ``W W^T + diag(d)`` uses the closed symmetric root
``B = D^{1/2} (I + Q diag(c) Q^T)`` with ``D^{-1/2} W = Q diag(sig) R^T`` (thin SVD), ``c = sqrt(1 + sig^2) - 1``
(``B`` applied to a vector is O(p k)); a Kronecker prior (per block ``MN(mean, A, B)``, diagonal remainder) uses
``L_A Z L_B^T`` per block (``Z`` the block's whitened coordinates) and the remainder's standard deviations. For
these two ``B M`` is not triangular in the flat order, so its lower-triangular factor is recovered by one QR
when the Gaussian is handed back (O(p^3) once, not per step; the start is mapped the same way). A diagonal
prior uses ``diag(sqrt(var))`` (only on request: the ordinary step is already O(p^2) there).

Step sizes keep their meaning: the parameters are the whitened ones times ``s``, the RMS of the prior's
standard deviations (``s^2 = mean(diag S_p)``), i.e. ``w = mu + (B / s) a_s`` with ``a_s = s a``,
``M_s = s M``. For an isotropic diagonal prior this is exactly the old parameterization (``M_s = L``), and in
general ``M_s`` has the scale of ``L`` (a start ``L = L_p`` gives ``M_s = s I``), so Adam's ``lr`` (on
``a_s``) and ``factor_lr`` (on ``M_s``) move the parameters by the same amounts, in the same units, as
before. The prior in these coordinates is ``N(0, s^2 I)``.

The diagonal and low-rank guides are not reparameterized: whitening by a non-diagonal root would not keep
``q`` diagonal or low-rank + diagonal in the original coordinates (``B diag(e) B^T`` is dense). Under a dense
prior they keep their parameters and their KL uses the prior's Cholesky factor and precision diagonal,
computed once: ``tr(S_p^{-1} (A A^T + diag(e))) = ||L_p^{-1} A||_F^2 + sum_j e_j (S_p^{-1})_jj``, O(p^2 k) per
step instead of O(p^3). Under a low-rank prior their KL is already O(p k^2) (Woodbury) and nothing changes.
"""

from __future__ import annotations

import pyro
import torch
from pyro.nn import PyroModule, PyroParam

from .gaussian import DenseGaussian, DiagGaussian, Gaussian, KronGaussian, LowRankGaussian, structure, structure_name

__all__ = ["WhitenedGuide", "resolve_whiten", "tril_matmul", "tril_rows", "tril_rows_t", "register_structure_params",
           "structure_params", "mask_tril_grads"]


# ============================================================================ a structure's guide parameters
def register_structure_params(module: torch.nn.Module, cls: type[Gaussian], start: Gaussian, rank: int = 20,
                              seed: int = 0) -> list[str]:
    """Register ``cls.guide_params(start, rank, seed)`` on ``module`` (the one place both guides do it): a
    parameter kept lower triangular is a plain ``nn.Parameter`` (no constraint lookup per access), a list of them
    an ``nn.ParameterList``, any other float tensor a ``PyroParam``, integer tensors plain attributes (fixed
    structure). Returns the names, in order, for :func:`structure_params`."""
    names = []
    for name, v in cls.guide_params(start, rank, seed).items():
        if isinstance(v, list):
            floating = bool(v) and v[0].is_floating_point()
            setattr(module, name, torch.nn.ParameterList([torch.nn.Parameter(t) for t in v]) if floating else v)
        elif not v.is_floating_point():
            setattr(module, name, v)
        else:
            setattr(module, name, torch.nn.Parameter(v) if name in cls.guide_tril else PyroParam(v))
        names.append(name)
    return names


def structure_params(module: torch.nn.Module, names: list[str]) -> dict[str, object]:
    """The current values of the parameters :func:`register_structure_params` registered."""
    return {n: getattr(module, n) for n in names}


def mask_tril_grads(module: torch.nn.Module, cls: type[Gaussian]) -> None:
    """Zero the upper triangle of the gradients of ``cls.guide_tril``: keeps those factors triangular under Adam."""
    for name in cls.guide_tril:
        v = getattr(module, name)
        for P in v if isinstance(v, torch.nn.ParameterList) else [v]:
            if P.grad is not None:
                P.grad.tril_()

#: block size of the blocked triangular products (handing back L = B M)
_TRI_BLOCK = 256


def resolve_whiten(whiten: bool | str, guide: str, prior: Gaussian) -> bool:
    """Whether the SVI phase uses :class:`WhitenedGuide` (``"auto"``: when the prior is not diagonal and the
    guide gains from it -- the dense guide under a dense, low-rank or Kronecker prior, any guide under a dense
    prior)."""
    guide = structure_name(guide, "guide")
    if whiten == "auto":
        if guide == "dense":
            return isinstance(prior, (DenseGaussian, LowRankGaussian, KronGaussian))
        return guide in ("diag", "lowrank") and isinstance(prior, DenseGaussian)
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten must be True, False or 'auto', got {whiten!r}")
    if whiten and guide not in ("dense", "diag", "lowrank"):
        raise ValueError(f"whiten=True with guide {guide!r}: only the dense (mvn), diag and lowrank guides have a "
                         "whitened step; use whiten='auto' or False")
    if whiten and not isinstance(prior, (DenseGaussian, LowRankGaussian, KronGaussian, DiagGaussian)):
        raise ValueError(f"whiten=True under a {type(prior).__name__} prior: no square root of it is implemented; "
                         "use whiten=False")
    if whiten and guide != "dense" and not isinstance(prior, DenseGaussian):
        raise ValueError(
            f"whiten=True with guide {guide!r} under a {prior.kind} prior: whitening would not keep the guide's "
            "structure and its KL is already O(p k^2) there; use whiten='auto' or False (or guide='dense')")
    return whiten


def tril_matmul(A: torch.Tensor, B: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``A @ B`` for lower-triangular ``A``, ``B`` by blocks that skip the zero blocks (p^3/3 flops, not 2 p^3).

    Block ``(i, j)`` of the product only sums over ``k`` in ``[j, i]``.
    """
    p, block = A.shape[-1], block or _TRI_BLOCK
    out = torch.zeros(p, p, dtype=torch.result_type(A, B), device=A.device)  # slice writes stay differentiable
    for j0 in range(0, p, block):
        j1 = min(j0 + block, p)
        for i0 in range(j0, p, block):
            i1 = min(i0 + block, p)
            out[i0:i1, j0:j1] = A[i0:i1, j0:i1] @ B[j0:i1, j0:j1]
    return out.tril_()


def _blocks(p: int) -> list[tuple[int, int]]:
    return [(i0, min(i0 + _TRI_BLOCK, p)) for i0 in range(0, p, _TRI_BLOCK)]


def tril_rows(v: torch.Tensor, T: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``bias + v T^T`` for rows ``v`` ``[n, p]`` and lower-triangular ``T``, reading only ``T``'s lower blocks.

    The products are memory bound at a few particles: skipping the zero upper blocks halves the traffic.
    """
    out = torch.empty(v.shape[0], T.shape[0], dtype=v.dtype, device=v.device)
    for i0, i1 in _blocks(T.shape[0]):
        blk = T[i0:i1, :i1].mT
        out[:, i0:i1] = v[:, :i1] @ blk if bias is None else torch.addmm(bias[i0:i1], v[:, :i1], blk)
    return out


def tril_rows_t(g: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``g T`` for rows ``g`` ``[n, p]`` and lower-triangular ``T`` (the adjoint of :func:`tril_rows`)."""
    out = torch.zeros(g.shape[0], T.shape[1], dtype=g.dtype, device=g.device)
    for i0, i1 in _blocks(T.shape[0]):
        out[:, :i1].addmm_(g[:, i0:i1], T[i0:i1, :i1])
    return out


def _tril_sq_norm(T: torch.Tensor) -> torch.Tensor:
    """``||tril(T)||_F^2`` reading the lower blocks only."""
    return sum(torch.linalg.vector_norm(T[i0:i1, :i1]) ** 2 for i0, i1 in _blocks(T.shape[0]))


def _lower_factor(F: torch.Tensor) -> torch.Tensor:
    """The lower-triangular ``L`` with positive diagonal and ``L L^T = F F^T``, by a QR of ``F^T`` (no squaring)."""
    grad = F.requires_grad and torch.is_grad_enabled()  # mode "r" (no Q) has no derivative
    R = torch.linalg.qr(F.mT, mode="reduced" if grad else "r")[1]
    sign = torch.where(R.diagonal() < 0, -1.0, 1.0).to(R.dtype)
    return (R.mT * sign).tril()


# ============================================================================ square roots of the prior
class _Root:
    """A square root ``B`` of the prior covariance divided by ``s`` (see the module docstring)."""

    triangular = True

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """``v B^T`` for rows ``v`` ``[n, p]``."""
        raise NotImplementedError

    def rows_t(self, g: torch.Tensor) -> torch.Tensor:
        """``g B`` (the adjoint of :meth:`rows`)."""
        raise NotImplementedError

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``B^{-1} x`` for columns ``x`` ``[p, m]``."""
        raise NotImplementedError

    def to_original(self, M: torch.Tensor) -> torch.Tensor:
        """A lower-triangular factor of ``B M M^T B^T`` (generic: a QR of ``(B M)^T``, O(p^3))."""
        return _lower_factor(self.rows(M.mT).mT)

    def to_whitened(self, L: torch.Tensor) -> torch.Tensor:
        """A lower-triangular factor of ``B^{-1} L L^T B^{-T}`` (generic: a QR, O(p^3))."""
        return _lower_factor(self.solve(L))


class _TriRoot(_Root):
    def __init__(self, B: torch.Tensor):
        self.B = B

    def rows(self, v):
        return tril_rows(v, self.B)

    def rows_t(self, g):
        return tril_rows_t(g, self.B)

    def solve(self, x):
        return torch.linalg.solve_triangular(self.B, x, upper=False)

    def to_original(self, M):
        return tril_matmul(self.B, M)

    def to_whitened(self, L):
        return torch.linalg.solve_triangular(self.B, L, upper=False).tril()


class _DiagRoot(_Root):
    def __init__(self, sd: torch.Tensor):
        self.sd = sd

    def rows(self, v):
        return v * self.sd

    def rows_t(self, g):
        return g * self.sd

    def solve(self, x):
        return x / self.sd.unsqueeze(-1)

    def to_original(self, M):
        return M * self.sd.unsqueeze(-1)

    def to_whitened(self, L):
        return L / self.sd.unsqueeze(-1)


class _LowRankRoot(_Root):
    """``B = diag(sd) (I + Q diag(c) Q^T)``, symmetric inner factor; ``B^{-1} = (I + Q diag(ci) Q^T) diag(1/sd)``."""

    triangular = False

    def __init__(self, sd: torch.Tensor, Q: torch.Tensor, c: torch.Tensor, ci: torch.Tensor):
        self.sd, self.Q, self.c, self.ci = sd, Q, c, ci

    def _inner(self, v, c):  # v (I + Q diag(c) Q^T) for rows v
        return v + ((v @ self.Q) * c) @ self.Q.mT

    def rows(self, v):
        return self._inner(v, self.c) * self.sd

    def rows_t(self, g):
        return self._inner(g * self.sd, self.c)

    def solve(self, x):
        return self._inner((x / self.sd.unsqueeze(-1)).mT, self.ci).mT


class _KronRoot(_Root):
    """Per block ``U = L_A Z L_B^T`` (``Z`` = the block's whitened coordinates ``[r, c]``); the remainder scaled."""

    triangular = False

    def __init__(self, index: list[torch.Tensor], LA: list[torch.Tensor], LB: list[torch.Tensor],
                 rem: torch.Tensor, rem_sd: torch.Tensor):
        self.index, self.LA, self.LB, self.rem, self.rem_sd = index, LA, LB, rem, rem_sd

    def _apply(self, v, fa, fb, fr):  # rows v [n, p]: block (fa(A) V fb(B)), remainder fr(v_rem)
        out = torch.empty_like(v)
        for idx, A, B in zip(self.index, self.LA, self.LB):
            out[:, idx] = fa(A) @ v[:, idx] @ fb(B)
        out[:, self.rem] = fr(v[:, self.rem])
        return out

    def rows(self, v):
        return self._apply(v, lambda A: A, lambda B: B.mT, lambda x: x * self.rem_sd)

    def rows_t(self, g):
        return self._apply(g, lambda A: A.mT, lambda B: B, lambda x: x * self.rem_sd)

    def solve(self, x):
        xt = x.mT
        out = torch.empty_like(xt)
        for idx, A, B in zip(self.index, self.LA, self.LB):
            Y = torch.linalg.solve_triangular(A, xt[:, idx], upper=False)
            out[:, idx] = torch.linalg.solve_triangular(B.mT, Y, upper=True, left=False)
        out[:, self.rem] = xt[:, self.rem] / self.rem_sd
        return out.mT


def _root_buffers(prior: Gaussian, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of the prior's square root divided by ``s`` (kept as module buffers so ``.to`` moves them)."""
    if isinstance(prior, DenseGaussian):
        return {"root_B": torch.tril(prior.scale_tril.detach()) / s}  # the products read whole diagonal blocks
    if isinstance(prior, DiagGaussian):
        return {"root_sd": prior.scale.detach().abs() / s}
    if isinstance(prior, KronGaussian):
        out = {"root_rem": prior.rem_index, "root_rem_sd": prior.rem_scale.detach() / s}
        for b, (idx, LA, LB) in enumerate(zip(prior.index, prior.row_tril, prior.col_tril)):
            out |= {f"root_idx{b}": idx, f"root_A{b}": LA.detach() / s, f"root_B{b}": LB.detach()}
        return out
    if isinstance(prior, LowRankGaussian):
        sd = prior.cov_diag.detach().sqrt()
        U = prior.cov_factor.detach() / sd.unsqueeze(-1)
        Q, sig, _ = torch.linalg.svd(U, full_matrices=False)
        r = torch.sqrt(1 + sig**2)
        return {"root_sd": sd / s, "root_Q": Q, "root_c": r - 1, "root_ci": 1 / r - 1}
    raise TypeError(f"cannot whiten under a {type(prior).__name__} prior; use whiten=False")


# ============================================================================ the step
class _WhitenedSampleKL(torch.autograd.Function):
    """Draws ``w = mu + (a + z M^T) B^T`` and ``KL(N(a, M M^T) || N(0, s2 I))`` with a hand-written backward.

    ``gM = tril(g_v^T z) + gkl (M / s2 - diag(1 / M_ii))`` is built once, in place, block row by block row, and
    only its lower blocks are computed (autograd would build three full p x p buffers and sum them). Every
    product with the triangular ``M`` (and ``B``) reads its lower blocks only. No host-device synchronization.
    """

    @staticmethod
    def forward(ctx, a, M, z, mu, s2, root):
        v = tril_rows(z, M, a)
        w = root.rows(v) + mu
        p = a.numel()
        kl = 0.5 * ((_tril_sq_norm(M) + a.dot(a)) / s2 - p + p * torch.log(s2) - 2 * M.diagonal().abs().log().sum())
        ctx.root = root
        ctx.save_for_backward(a, M, z, s2)
        return w, kl

    @staticmethod
    def backward(ctx, gw, gkl):
        a, M, z, s2 = ctx.saved_tensors
        gv = ctx.root.rows_t(gw)
        c = (gkl / s2).reshape(1, 1)
        p = a.numel()
        gM = torch.empty(p, p, dtype=M.dtype, device=M.device)
        gvT = gv.mT
        for i0, i1 in _blocks(p):
            blk = gM[i0:i1, :i1]
            blk.addmm_(gvT[i0:i1], z[:, :i1], beta=0)  # beta=0: the uninitialized buffer is never read
            blk.addcmul_(M[i0:i1, :i1], c)
            gM[i0:i1, i0:i1].tril_()
            gM[i0:i1, i1:].zero_()
        gM.diagonal().sub_(gkl / M.diagonal())
        ga = gv.sum(0) + c.reshape(()) * a
        return ga, gM, None, None, None, None


class WhitenedGuide(PyroModule):
    """A guide over the single site ``"w"`` fitted in the prior's whitened coordinates (module docstring).

    ``dense`` (alias ``mvn``): parameters ``loc`` = ``a_s`` and ``scale_tril`` = ``M_s`` (whitened, times ``s``);
    :meth:`gaussian` hands back ``N(mu + B a, (B M)(B M)^T)`` as a :class:`DenseGaussian` in the original
    coordinates. ``diag`` / ``lowrank`` (dense prior only): the structure's own guide parameters
    (:meth:`~pyro_distill.gaussian.Gaussian.guide_params`) in the original coordinates; only the KL uses the prior's
    factors computed once. The interface is the one the SVI loop uses: ``loc``, :meth:`scale_params`,
    :meth:`mask_grad`, :meth:`gaussian`, :meth:`sample_kl`. ``rank``/``seed``: a low-rank start's random factor
    when ``init`` is of another structure.
    """

    def __init__(self, init: Gaussian, prior: Gaussian, kind: str = "dense", rank: int = 20, seed: int = 0):
        super().__init__()
        if init.dim != prior.dim:
            raise ValueError(f"start Gaussian has {init.dim} coordinates, the prior {prior.dim}")
        kind = structure_name(kind, "guide")
        self.kind = kind
        self.layout = init.layout
        dt = dict(dtype=prior.dtype, device=prior.device)
        if kind == "dense":
            # the start is mapped in float64 (once; a float32 prior factor may be ill-conditioned)
            p64 = prior.detach().to(dtype=torch.float64)
            s = p64.variance.mean().sqrt()
            self.register_buffer("prior_loc", prior.loc.detach().clone())
            self.register_buffer("s2", (s**2).to(prior.dtype))
            self.root_kind = type(prior).__name__
            bufs = _root_buffers(p64, s)
            for k, v in bufs.items():
                self.register_buffer(k, v.to(prior.dtype) if v.is_floating_point() else v.clone())
            root = self._root(bufs)
            with torch.no_grad():
                L0 = init.scale_tril if isinstance(init, DenseGaussian) else torch.diag(init.variance.sqrt())
                a0 = root.solve((init.loc.detach().to(p64.loc) - p64.loc).unsqueeze(-1)).squeeze(-1)
                M0 = root.to_whitened(L0.detach().to(p64.loc))
            del p64, bufs, root
            self.loc = PyroParam(a0.to(**dt))
            self.scale_tril = torch.nn.Parameter(M0.to(**dt))
        elif kind in ("diag", "lowrank"):
            if not isinstance(prior, DenseGaussian):
                raise ValueError(f"the {kind} guide is only whitened (cached-KL) under a dense prior")
            Lp = prior.scale_tril.detach()
            eye = torch.eye(prior.dim, **dt)
            self.register_buffer("prior_loc", prior.loc.detach().clone())
            self.register_buffer("prior_tril", Lp.clone())
            self.register_buffer("prior_prec_diag", (torch.linalg.solve_triangular(Lp, eye, upper=False) ** 2).sum(0))
            self.register_buffer("prior_logdet", 2 * Lp.diagonal().abs().log().sum())
            self.loc = PyroParam(init.loc.detach().clone())
            self._names = register_structure_params(self, structure(kind), init, rank, seed)
        else:
            raise ValueError(f"guide {kind!r} has no whitened step; choose one of ('dense', 'lowrank', 'diag')")

    # ------------------------------------------------------------------ structure
    def _root(self, bufs: dict[str, torch.Tensor] | None = None) -> _Root:
        """The prior's square root / s from the buffers (or from ``bufs``, e.g. a float64 copy)."""
        b = bufs if bufs is not None else dict(self.named_buffers())
        if self.root_kind == "DenseGaussian":
            return _TriRoot(b["root_B"])
        if self.root_kind == "DiagGaussian":
            return _DiagRoot(b["root_sd"])
        if self.root_kind == "KronGaussian":
            nb = sum(1 for k in b if k.startswith("root_idx"))
            return _KronRoot([b[f"root_idx{i}"] for i in range(nb)], [b[f"root_A{i}"] for i in range(nb)],
                             [b[f"root_B{i}"] for i in range(nb)], b["root_rem"], b["root_rem_sd"])
        return _LowRankRoot(b["root_sd"], b["root_Q"], b["root_c"], b["root_ci"])

    def scale_params(self) -> list[torch.nn.Parameter]:
        """Parameters of the covariance (they get ``factor_lr``; ``M_s`` has the scale of ``L``)."""
        return [p for n, p in self.named_parameters() if not n.startswith("loc")]

    def mask_grad(self) -> None:
        """Nothing to do: the step's hand-written backward already returns a lower-triangular gradient for
        ``M_s`` (so Adam keeps its upper triangle exactly zero), and no other term differentiates ``M_s``."""

    def gaussian(self) -> Gaussian:
        """The current q in the original coordinates (dense: ``m = mu + B a``, ``L = B M``; O(p^3))."""
        if self.kind == "dense":
            root = self._root()
            loc = root.rows(self.loc.unsqueeze(0)).squeeze(0) + self.prior_loc
            return DenseGaussian(loc, root.to_original(self.scale_tril), layout=self.layout)
        return structure(self.kind).from_guide_params(self.loc, structure_params(self, self._names), self.layout)

    def finite(self) -> bool:
        """The represented Gaussian is finite: for ``dense`` its whitened parameters are (``B`` is finite, so the
        hand-back is too, barring overflow; no O(p^3) hand-back needed); otherwise the Gaussian's tensors."""
        with torch.no_grad():
            ts = [self.loc, self.scale_tril] if self.kind == "dense" else list(self.gaussian()._tensors().values())
            return all(bool(torch.isfinite(t.sum())) for t in ts)

    # ------------------------------------------------------------------ the step
    def sample_kl(self, num_particles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_particles`` reparameterized draws ``[n, p]`` in the original coordinates and ``KL(q || prior)``."""
        if self.kind == "dense":
            z = torch.randn(num_particles, self.loc.numel(), dtype=self.loc.dtype, device=self.loc.device)
            return _WhitenedSampleKL.apply(self.loc, self.scale_tril, z, self.prior_loc, self.s2, self._root())
        q = self.gaussian()
        return q.rsample(num_particles), self._cached_kl(q)

    def _cached_kl(self, q: Gaussian) -> torch.Tensor:
        """``KL(q || N(mu, L_p L_p^T))`` with ``L_p`` and ``diag(S_p^{-1})`` computed once (O(p^2 k) per call)."""
        A, e = q._factor_form()
        tr = (e * self.prior_prec_diag).sum()
        if A is not None:
            tr = tr + (torch.linalg.solve_triangular(self.prior_tril, A, upper=False) ** 2).sum()
        r = torch.linalg.solve_triangular(self.prior_tril, (q.loc - self.prior_loc).unsqueeze(-1), upper=False)
        return 0.5 * (tr + (r**2).sum() - q.dim + self.prior_logdet - q.logdet())

    def forward(self, *args, num_particles: int = 1, **kwargs) -> torch.Tensor:
        d = self.gaussian().to_pyro()
        return pyro.sample("w", d.expand([num_particles]) if num_particles > 1 else d)
