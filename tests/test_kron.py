"""KronGaussian (matrix-normal blocks + diagonal remainder) against its own dense covariance, in float64.

References are the dense formulas on ``covariance()``: conditioning ``m_K + S_KI S_II^{-1}(v - m_I)``,
``S_KK - S_KI S_II^{-1} S_IK``; tolerances 1e-10 unless stated.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_distill import surgery
from pyro_distill.gaussian import (
    DiagGaussian,
    KronGaussian,
    LowRankGaussian,
    StructureError,
    kron_index,
    load,
)
from pyro_distill.layout import Layout
from pyro_distill.nets.mlp import MLP

D = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


def rand_tril(n: int, g: torch.Generator, neg: bool = False) -> torch.Tensor:
    L = torch.tril(torch.randn(n, n, generator=g, dtype=D)) * 0.3
    L.diagonal().copy_(0.6 + torch.rand(n, generator=g, dtype=D))
    if neg:  # only |L_ii| matters: a negative diagonal entry is a valid factor
        L[:, 0] = -L[:, 0]
    return L


def make(seed: int = 0) -> KronGaussian:
    """p = 21: a 3x4 block on coordinates 0..11, a 2x3 block on interleaved coordinates, 3 remainder coordinates."""
    g = torch.Generator().manual_seed(seed)
    p = 21
    idx0 = torch.arange(12).reshape(3, 4)
    idx1 = torch.tensor([[13, 20, 15], [17, 12, 19]])  # not contiguous, not row-major: any map is allowed
    loc = torch.randn(p, generator=g, dtype=D)
    rem = 0.5 + torch.rand(3, generator=g, dtype=D)
    return KronGaussian.from_blocks(loc, [(idx0, rand_tril(3, g, neg=True), rand_tril(4, g)),
                                          (idx1, rand_tril(2, g), rand_tril(3, g))], rem)


def dense_condition(m: torch.Tensor, S: torch.Tensor, I: torch.Tensor, v: torch.Tensor):
    K = torch.ones(m.numel(), dtype=torch.bool)
    K[I] = False
    K = K.nonzero().reshape(-1)
    SKI, SII = S[K][:, I], S[I][:, I]
    mean = m[K] + SKI @ torch.linalg.solve(SII, v - m[I])
    return mean, S[K][:, K] - SKI @ torch.linalg.solve(SII, SKI.T)


def assert_same(g, mean: torch.Tensor, cov: torch.Tensor, tol=TOL) -> None:
    torch.testing.assert_close(g.loc, mean, **tol)
    torch.testing.assert_close(g.covariance(), cov, **tol)


# ------------------------------------------------------------------------------------------------ moments
def test_moments_match_dense() -> None:
    q = make()
    S = q.covariance()
    torch.testing.assert_close(S, S.T)
    ref = MultivariateNormal(q.loc, S)
    torch.testing.assert_close(q.variance, S.diagonal(), **TOL)
    torch.testing.assert_close(q.logdet(), torch.logdet(S), **TOL)
    torch.testing.assert_close(q.entropy(), ref.entropy(), **TOL)
    torch.testing.assert_close(q.precision() @ S, torch.eye(q.dim, dtype=D), atol=1e-9, rtol=0)
    x = ref.sample((5,))
    torch.testing.assert_close(q.log_prob(x), ref.log_prob(x), **TOL)
    torch.testing.assert_close(q.to_dense().covariance(), S, **TOL)
    # the convention: block entry (i, j) at index[i, j], Cov(U_ij, U_kl) = A_ik B_jl
    LA, LB = q.row_tril[1], q.col_tril[1]
    A, B = LA @ LA.T, LB @ LB.T
    idx = q.index[1]
    torch.testing.assert_close(S[idx[0, 2], idx[1, 1]], A[0, 1] * B[2, 1], **TOL)
    assert q.batch_shape == () and q.event_shape == (21,)
    assert "blocks=[3x4, 2x3]" in repr(q) and "tensor" not in repr(q)


def test_precision_products_and_diagonal_without_the_dense_matrix() -> None:
    """``precision_mv`` (vectors and matrices) and ``precision_diagonal`` equal the dense precision; the Laplace
    code reads a Kronecker prior through them (a student's Laplace start under a conditioned KFAC teacher)."""
    from pyro_distill.inference import _precision_diagonal, _precision_mv

    q = make()
    P = q.precision()
    g = torch.Generator().manual_seed(1)
    v, V = torch.randn(21, generator=g, dtype=D), torch.randn(21, 4, generator=g, dtype=D)
    torch.testing.assert_close(q.precision_mv(v), P @ v, **TOL)
    torch.testing.assert_close(q.precision_mv(V), P @ V, **TOL)
    torch.testing.assert_close(_precision_mv(q, v), P @ v, **TOL)
    torch.testing.assert_close(q.precision_diagonal(), P.diagonal(), **TOL)
    torch.testing.assert_close(_precision_diagonal(q), P.diagonal(), **TOL)


def test_sample_shapes_and_moments() -> None:
    q = make()
    assert q.sample().shape == (21,) and q.sample((3,)).shape == (3, 21) and q.rsample((2, 3)).shape == (2, 3, 21)
    n = 100_000
    x = q.sample(n, generator=torch.Generator().manual_seed(0))
    S = q.covariance()
    # mean within 5 standard errors; covariance within 0.03 (entries are O(1); MC error ~ 1/sqrt(n) ~ 0.003)
    assert ((x.mean(0) - q.loc).abs() <= 5 * (S.diagonal() / n).sqrt()).all()
    torch.testing.assert_close(torch.cov(x.T), S, atol=0.03, rtol=0)
    # reparameterized: gradients reach the factors
    LA = q.row_tril[0].clone().requires_grad_(True)
    q2 = KronGaussian(q.loc, q.index, [LA, q.row_tril[1]], q.col_tril, q.rem_scale)
    q2.rsample(4).sum().backward()
    assert LA.grad is not None and torch.isfinite(LA.grad).all()


# ------------------------------------------------------------------------------------------------ conditioning
@pytest.mark.parametrize("case", ["rows", "cols", "rows+cols", "block", "remainder", "mixed"])
def test_condition_equals_dense(case: str) -> None:
    q = make()
    i0, i1 = q.index
    I = {
        "rows": i0[[0, 2]].reshape(-1),
        "cols": i0[:, [1, 3]].reshape(-1),
        "rows+cols": torch.cat([i0[[1]].reshape(-1), i0[[0, 2]][:, [2]].reshape(-1)]),  # row 1 and column 2
        "block": i1.reshape(-1),
        "remainder": torch.tensor([14, 18]),
        "mixed": torch.cat([i0[:, [0]].reshape(-1), i1[[1]].reshape(-1), torch.tensor([16])]),
    }[case]
    v = torch.linspace(-1, 1, I.numel(), dtype=D)
    out = q.condition(I, v)
    assert isinstance(out, KronGaussian)
    assert_same(out, *dense_condition(q.loc, q.covariance(), I, v))
    # the same through the dense structure
    assert_same(out, q.to_dense().condition(I, v).loc, q.to_dense().condition(I, v).covariance(), tol=dict(
        atol=1e-9, rtol=1e-9))


def test_structured_requests_and_sequential_equals_joint() -> None:
    q = make()
    i0 = q.index[0]
    V = torch.arange(8, dtype=D).reshape(2, 4) / 10
    a = q.condition_rows(0, [0, 2], V)
    b = q.condition(i0[[0, 2]].reshape(-1), V.reshape(-1))
    assert_same(a, b.loc, b.covariance())
    c = q.condition_cols(0, [3], 0.5)
    d = q.condition(i0[:, 3], torch.full((3,), 0.5, dtype=D))
    assert_same(c, d.loc, d.covariance())
    e = q.condition_block(1, 0.0)
    assert e.num_blocks == 1 and e.dim == 15
    # conditioning on rows then on a column (in the new coordinates) equals both at once
    I1 = i0[[1]].reshape(-1)
    first = q.condition(I1, 0.3)
    col = first.index[0][:, 2]  # column 2 of block 0 after the row went
    both = first.condition(col, -0.2)
    Ij = torch.cat([I1, i0[[0, 2]][:, 2]])
    vj = torch.cat([torch.full((4,), 0.3, dtype=D), torch.full((2,), -0.2, dtype=D)])
    assert_same(both, *dense_condition(q.loc, q.covariance(), Ij, vj))


def test_refused_conditions_name_the_conversion() -> None:
    q = make()
    i0 = q.index[0]
    with pytest.raises(StructureError, match=r"to_dense\(\).*to_lowrank\(k\)"):
        q.condition(i0[0, :2], 0.0)  # half a row
    with pytest.raises(StructureError, match="to_dense"):
        q.condition(torch.cat([i0[0], i0[1, :1]]), 0.0)  # a row plus one entry
    with pytest.raises(StructureError, match="to_dense"):
        q.marginalize(torch.arange(1, 21))  # drops one entry of block 0
    # what it refuses, the dense form does exactly
    I = i0[0, :2]
    out = q.to_dense().condition(I, 0.0)
    assert_same(out, *dense_condition(q.loc, q.covariance(), I, torch.zeros(2, dtype=D)), tol=dict(atol=1e-9,
                                                                                                   rtol=1e-9))


def test_marginalize_rows_cols_blocks() -> None:
    q = make()
    i0, i1 = q.index
    drop = torch.cat([i0[[1]].reshape(-1), i0[:, [0]].reshape(-1), i1.reshape(-1), torch.tensor([14])])
    mask = torch.ones(21, dtype=torch.bool)
    mask[drop] = False
    keep = mask.nonzero().reshape(-1)
    out = q.marginalize(keep)
    assert isinstance(out, KronGaussian) and out.num_blocks == 1 and out.index[0].shape == (2, 3)
    S = q.covariance()
    assert_same(out, q.loc[keep], S[keep][:, keep])
    # any order of the kept coordinates
    perm = keep.flip(0)
    assert_same(q.marginalize(perm), q.loc[perm], S[perm][:, perm])
    assert_same(q.marginalize(torch.arange(21)), q.loc, S)


# ------------------------------------------------------------------------------------------------ KL
def test_kl_closed_forms_equal_dense() -> None:
    q, q2 = make(0), make(1)
    dq = MultivariateNormal(q.loc, q.covariance())
    g = torch.Generator().manual_seed(3)
    prior = DiagGaussian(torch.randn(21, generator=g, dtype=D), 0.5 + torch.rand(21, generator=g, dtype=D))
    ref = kl_divergence(dq, MultivariateNormal(prior.loc, prior.covariance()))
    torch.testing.assert_close(q.kl(prior), ref, **TOL)
    torch.testing.assert_close(kl_divergence(q, prior), ref, **TOL)
    # Kronecker prior with the same blocks: blockwise closed form
    ref2 = kl_divergence(dq, MultivariateNormal(q2.loc, q2.covariance()))
    assert q._kl_special(q2) is not None
    torch.testing.assert_close(q.kl(q2), ref2, **TOL)
    # generic paths: a Kronecker prior under dense / low-rank / diagonal q, and q against a dense prior
    for other in (q2.to_dense(), q2.to_lowrank(3), prior):
        d_other = MultivariateNormal(other.loc, other.covariance())
        torch.testing.assert_close(other.kl(q), kl_divergence(d_other, dq), **TOL)
        torch.testing.assert_close(q.kl(other), kl_divergence(dq, d_other), **TOL)
    torch.testing.assert_close(q.kl(q2.to_dense().to_pyro()), ref2, **TOL)  # a Pyro MVN prior


# ------------------------------------------------------------------------------------------------ conversions
def test_to_lowrank_keeps_variance_and_is_exact_at_full_rank() -> None:
    q = make()
    lr = q.to_lowrank(2)
    assert isinstance(lr, LowRankGaussian) and lr.rank == 4
    torch.testing.assert_close(lr.variance, q.variance, **TOL)
    full = q.to_lowrank(12)
    torch.testing.assert_close(full.covariance(), q.covariance(), atol=1e-9, rtol=0)
    # the top eigenvalue of the covariance is captured exactly
    top = torch.linalg.eigvalsh(q.covariance())[-1]
    W = lr.cov_factor
    assert abs(float(torch.linalg.eigvalsh(W @ W.T)[-1] - top)) < 1e-9


def test_from_precision_factors_and_tempered() -> None:
    g = torch.Generator().manual_seed(5)
    Pr = torch.randn(3, 3, generator=g, dtype=D)
    Pr = Pr @ Pr.T + 3 * torch.eye(3, dtype=D)
    Pc = torch.randn(2, 2, generator=g, dtype=D)
    Pc = Pc @ Pc.T + 2 * torch.eye(2, dtype=D)
    idx = torch.arange(6).reshape(3, 2)
    q = KronGaussian.from_precision_factors(torch.zeros(8, dtype=D), [(idx, Pr, Pc)], remainder_precision=4.0)
    P = q.precision()
    torch.testing.assert_close(P[:6, :6], torch.kron(Pr, Pc), **TOL)  # row-major: P_row ⊗ P_col
    torch.testing.assert_close(P[6:, 6:], 4.0 * torch.eye(2, dtype=D), **TOL)
    torch.testing.assert_close(q.tempered(2.5).covariance(), 2.5 * q.covariance(), **TOL)
    with pytest.raises(ValueError, match="lower triangular"):
        KronGaussian.from_blocks(torch.zeros(6, dtype=D), [(idx, Pr, Pc)])
    with pytest.raises(ValueError, match="remainder_scale"):
        KronGaussian.from_blocks(torch.zeros(8, dtype=D), [(idx, Pr, Pc)], factors="covariance")
    with pytest.raises(ValueError, match="disjoint"):
        KronGaussian.from_blocks(torch.zeros(6, dtype=D), [(idx, Pr, Pc), (idx[:1], Pr[:1, :1], Pc)],
                                 factors="covariance")
    with pytest.raises(ValueError, match="rem_scale must be > 0"):
        KronGaussian.from_blocks(torch.zeros(8, dtype=D), [(idx, Pr, Pc)], -1.0, factors="covariance")


def test_save_load_to_and_pyro(tmp_path) -> None:
    q = make()
    lay = Layout([("w", (21,))])
    q.layout, q.meta = lay, {"source": "kfac"}
    f = q.save(tmp_path / "kron.pt")
    back = load(f, layout=lay)
    assert isinstance(back, KronGaussian) and back.layout == lay and back.meta == {"source": "kfac"}
    assert_same(back, q.loc, q.covariance(), tol=dict(atol=0, rtol=0))
    q32 = q.to(dtype=torch.float32)
    assert q32.dtype == torch.float32 and q32.index[0].dtype == torch.long
    d = q.to_pyro()
    import pyro.distributions as pdist

    assert isinstance(d, pdist.TorchDistribution) and d.event_shape == (21,)
    x = q.sample((4,))
    torch.testing.assert_close(d.log_prob(x), q.log_prob(x), **TOL)
    assert d.sample().shape == (21,) and d.expand([3]).rsample().shape == (3, 21)
    assert d.expand([3]).log_prob(x[:3]).shape == (3,)
    # the Pyro form converts back to the structure itself, takes part in kl_divergence, and pickles
    from pyro_distill.gaussian import Gaussian

    assert Gaussian.from_distribution(d) is q
    q2 = make(1)
    torch.testing.assert_close(kl_divergence(d, q2.to_pyro()), q.kl(q2), **TOL)
    torch.testing.assert_close(kl_divergence(q2.to_dense(), d), q2.to_dense().kl(q), **TOL)
    import pickle

    torch.testing.assert_close(pickle.loads(pickle.dumps(d)).log_prob(x), d.log_prob(x), **TOL)


# ------------------------------------------------------------------------------------------------ surgery
def mlp_kron(net: MLP, seed: int = 0) -> KronGaussian:
    """A Kronecker posterior whose blocks are the MLP's augmented [U_t | b_t]."""
    g = torch.Generator().manual_seed(seed)
    lay = net.layout
    blocks = []
    for t in range(1, net.num_layers + 1):
        idx = kron_index(lay, f"layer{t}.weight", f"layer{t}.bias" if net.bias else None)
        blocks.append((idx, rand_tril(idx.shape[0], g), rand_tril(idx.shape[1], g)))
    loc = torch.randn(lay.size, generator=g, dtype=D)
    return KronGaussian.from_blocks(loc, blocks, layout=lay)


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_surgery_on_kron_equals_surgery_on_dense(bias: bool) -> None:
    net = MLP([4, 5, 5, 3], activation="relu", bias=bias)
    q = mlp_kron(net)
    qd = q.to_dense()
    ops = [surgery.remove_neurons(net, 1, [0, 3])]
    ops.append(surgery.remove_neurons(ops[0].architecture(net), 2, [1, 2]))
    mid = ops[1].architecture(ops[0].architecture(net))
    ops.append(surgery.remove_layer(mid, 2))  # n_2 = n_1 = 3 after the removals
    for k in range(1, len(ops) + 1):
        s_net, s_q = surgery.apply(ops[:k], net, q)
        _, s_qd = surgery.apply(ops[:k], net, qd)
        assert isinstance(s_q, KronGaussian), f"{ops[:k]} left the Kronecker structure"
        assert s_q.layout == s_net.layout and s_q.dim == s_net.num_params
        assert s_q.num_blocks == s_net.num_layers and s_q.rem_index.numel() == 0
        assert_same(s_q, s_qd.loc, s_qd.covariance(), tol=dict(atol=1e-9, rtol=1e-9))
        assert s_q.meta["surgery"] == [op.to_dict() for op in ops[:k]]


def test_mlp_kron_with_bias_in_remainder() -> None:
    """Blocks over the weights only (biases diagonal): neuron removal stays Kronecker."""
    net = MLP([3, 4, 2], activation="tanh")
    lay = net.layout
    g = torch.Generator().manual_seed(2)
    blocks = [(kron_index(lay, f"layer{t}.weight"), rand_tril(lay.shape(f"layer{t}.weight")[0], g),
               rand_tril(lay.shape(f"layer{t}.weight")[1], g)) for t in (1, 2)]
    q = KronGaussian.from_blocks(torch.randn(lay.size, generator=g, dtype=D), blocks, 0.7, layout=lay)
    op = surgery.remove_neurons(net, 1, [2])
    _, s_q = op.apply(net, q)
    _, s_qd = op.apply(net, q.to_dense())
    assert isinstance(s_q, KronGaussian) and s_q.rem_index.numel() == 5
    assert_same(s_q, s_qd.loc, s_qd.covariance(), tol=dict(atol=1e-9, rtol=1e-9))


def test_surgery_the_structure_cannot_do_is_refused() -> None:
    """A block whose rows are not the layer's neurons: neuron removal is not whole rows/columns -> refused."""
    net = MLP([4, 5, 3], activation="relu", bias=False)
    lay = net.layout
    g = torch.Generator().manual_seed(4)
    odd = lay.indices("layer1.weight").reshape(4, 5)  # the 5x4 weight read as 4x5: a neuron is no row or column
    q = KronGaussian.from_blocks(torch.zeros(lay.size, dtype=D), [(odd, rand_tril(4, g), rand_tril(5, g))], 1.0,
                                 layout=lay)
    op = surgery.remove_neurons(net, 1, [1])
    with pytest.raises(surgery.SurgeryError, match=r"remove_neurons.*KronGaussian.*to_dense\(\)"):
        op.apply(net, q)
    s_net, s_q = op.apply(net, q.to_dense())  # the conversion the message names works
    assert s_q.dim == s_net.num_params
