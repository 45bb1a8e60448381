"""The curvature engine: the GGN operator, its exact diagonal, the dense matrix, top-k eigenpairs and KFAC,
against a dense reference built here by ``torch.func.jacrev`` (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacrev

from pyro_distill.curvature import (
    GGN,
    ScaledGGN,
    kfac,
    kfac_block_dense,
    kfac_indices,
    label_cotangent,
    lanczos,
    output_hessian_sqrt,
    subsampled_ggn,
)
from pyro_distill.data.sequences import PAD, dates
from pyro_distill.layout import Layout
from pyro_distill.nets import MLP, AttentionRNN, Transformer
from pyro_distill.nets.base import BayesianNet

D = torch.float64


def _reference(net, w, X, y=None, noise_scale=None):
    """``sum_n sum_g J_ng^T H_ng J_ng`` from the full Jacobian; padding positions (y == pad) left out."""
    out = net.forward(w, X)
    J = jacrev(lambda ww: net.forward(ww, X))(w)
    C, p = out.shape[-1], w.shape[0]
    out, J = out.reshape(-1, C), J.reshape(-1, C, p)
    if net.likelihood == "categorical":
        pi = torch.softmax(out, -1)
        H = torch.diag_embed(pi) - pi.unsqueeze(-1) * pi.unsqueeze(-2)
    else:
        s = net.noise_scale if noise_scale is None else noise_scale
        H = torch.eye(C, dtype=D).expand(out.shape[0], C, C) / s**2
    if y is not None and getattr(net, "pad", None) is not None and out.shape[0] != X.shape[0]:
        H = H * (y.reshape(-1) != net.pad).to(D)[:, None, None]
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def _mlp_case(likelihood="categorical", bias=True, activation="tanh", sizes=(4, 5, 3)):
    g = torch.Generator().manual_seed(0)
    net = MLP(list(sizes), activation=activation, bias=bias, likelihood=likelihood, noise_scale=0.7)
    w = net.init_weights(g, dtype=D) * 2
    X = torch.randn(13, sizes[0], generator=g, dtype=D)
    return net, w, X, None


def _rnn_case():
    task = dates(n_train=8, n_val=2, n_test=2, seed=1)
    net = AttentionRNN(**task.net_kwargs(), emb=3, hidden=3, attn=2)
    w = net.init_weights(torch.Generator().manual_seed(1), dtype=D)
    X, y = task.X[:5], task.y[:5].clone()
    y[0, -3:] = PAD  # padding really occurs among the labels
    assert bool((y == PAD).any())
    return net, w, X, y


def _transformer_case():
    net = Transformer(input_dim=5, n_classes=3, max_len=4, d_model=4, heads=[2], ffn=[True], d_head=2, d_ff=3)
    g = torch.Generator().manual_seed(2)
    w = net.init_weights(g, dtype=D)
    X = torch.randn(6, 4, 5, generator=g, dtype=D)
    X[0, 3:] = float("nan")
    return net, w, X, None


CASES = {
    "mlp": _mlp_case,
    "mlp-gauss-nobias": lambda: _mlp_case("gaussian", bias=False, activation="relu"),
    "mlp-gelu": lambda: _mlp_case(activation="gelu"),
    "rnn": _rnn_case,
    "transformer": _transformer_case,
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    net, w, X, y = CASES[request.param]()
    return net, w, X, y, _reference(net, w, X, y)


def test_sqrt_factor_reproduces_the_output_hessian():
    out = torch.randn(7, 4, dtype=D)
    pi = torch.softmax(out, -1)
    H = torch.diag_embed(pi) - pi[..., :, None] * pi[..., None, :]
    R = output_hessian_sqrt(out, "categorical")
    assert R.shape == (7, 4, 3) and torch.allclose(R @ R.mT, H, atol=1e-14)  # C - 1 columns suffice
    R = output_hessian_sqrt(out, "categorical", reduced=False)
    assert R.shape == (7, 4, 4) and torch.allclose(R @ R.mT, H, atol=1e-14)
    R = output_hessian_sqrt(out, "gaussian", noise_scale=0.5)
    assert torch.allclose(R @ R.mT, 4 * torch.eye(4, dtype=D).expand(7, 4, 4))


def test_operator_products_equal_the_dense_ggn(case):
    net, w, X, y, G = case
    op = GGN(net, w, X, y, chunk=4)  # several chunks
    g = torch.Generator().manual_seed(3)
    v = torch.randn(op.p, generator=g, dtype=D)
    V = torch.randn(op.p, 3, generator=g, dtype=D)
    scale = G.abs().max()
    assert torch.allclose(op.mv(v), G @ v, atol=1e-8 * scale * op.p**0.5, rtol=1e-8)
    assert torch.allclose(op.mm(V), G @ V, atol=1e-8 * scale * op.p**0.5, rtol=1e-8)
    assert torch.allclose(op @ V, G @ V, atol=1e-8 * scale * op.p**0.5, rtol=1e-8)


def test_exact_diagonal_and_dense_equal_the_reference(case):
    net, w, X, y, G = case
    op = GGN(net, w, X, y, chunk=4)
    assert torch.allclose(op.diagonal(), G.diagonal(), atol=1e-10, rtol=1e-10)
    Gd = op.dense()
    assert torch.allclose(Gd, G, atol=1e-10, rtol=1e-10)
    assert torch.equal(Gd, Gd.T)
    assert op.trace() == pytest.approx(float(G.trace()), rel=1e-12)


def test_mask_drops_padding_positions():
    net, w, X, y = _rnn_case()
    masked, full = GGN(net, w, X, y).diagonal(), GGN(net, w, X).diagonal()
    assert bool((full >= masked - 1e-12).all()) and float((full - masked).sum()) > 0
    assert torch.allclose(full, _reference(net, w, X).diagonal(), atol=1e-10)


class _Direct(BayesianNet):
    """A family that reads ``w`` by slicing it directly, not through ``layout.unflatten``."""

    likelihood = "categorical"

    def __init__(self):
        self.layout = Layout([("weight", (2, 3)), ("bias", (2,))])

    @property
    def num_outputs(self) -> int:
        return 2

    def forward(self, w, x):
        W = w[..., :6].reshape(*w.shape[:-1], 2, 3)
        return torch.tanh(torch.matmul(x, W.transpose(-1, -2)) + w[..., 6:].unsqueeze(-2))

    def config(self):
        return {"type": "_Direct"}

    def prior_scales(self):
        return torch.ones(8, dtype=D)


def test_generic_path_per_block_gradients_and_its_flat_fallback():
    net, w, X, _ = _transformer_case()
    op = GGN(net, w, X)
    assert torch.allclose(op.diagonal(), _reference(net, w, X).diagonal(), atol=1e-10)
    assert op._blocks_checked  # the transformer reads w through its Layout: gradients per block
    net = _Direct()
    w = torch.randn(8, generator=torch.Generator().manual_seed(6), dtype=D)
    X = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=D)
    op = GGN(net, w, X)
    G = _reference(net, w, X)
    assert torch.allclose(op.diagonal(), G.diagonal(), atol=1e-12) and torch.allclose(op.dense(), G, atol=1e-12)
    assert op._blocks_checked is False  # detected, and the flat path used


class _Pairable(BayesianNet):
    """A small tanh network over its Layout whose ``forward`` broadcasts inputs ``[B, 1, d]`` against weights
    ``[B, p]`` (paired inputs), with a Gaussian likelihood."""

    likelihood = "gaussian"
    noise_scale = 0.5

    def __init__(self):
        self.layout = Layout([("w1", (4, 3)), ("b1", (4,)), ("w2", (2, 4))])

    @property
    def num_outputs(self) -> int:
        return 2

    def forward(self, w, x):
        P = self.layout.unflatten(w)
        h = torch.tanh(torch.matmul(x, P["w1"].transpose(-1, -2)) + P["b1"].unsqueeze(-2))
        return torch.matmul(h, P["w2"].transpose(-1, -2))

    def config(self):
        return {"type": "_Pairable"}

    def prior_scales(self):
        return torch.ones(self.layout.size, dtype=D)


def test_paired_inputs_give_per_example_gradients_in_one_pass():
    net = _Pairable()
    w = torch.randn(net.layout.size, generator=torch.Generator().manual_seed(8), dtype=D)
    X = torch.randn(7, 3, generator=torch.Generator().manual_seed(9), dtype=D)
    op = GGN(net, w, X)
    G = _reference(net, w, X)
    assert torch.allclose(op.diagonal(), G.diagonal(), atol=1e-12) and torch.allclose(op.dense(), G, atol=1e-12)
    assert op._paired_checked
    tf, wt, Xt, _ = _transformer_case()
    op = GGN(tf, wt, Xt)
    Gt = _reference(tf, wt, Xt)
    assert torch.allclose(op.diagonal(), Gt.diagonal(), atol=1e-12)
    assert op._paired_checked is (tf.embedding == "patch")  # patch inputs pair with weights; token ids do not
    rnn, wr, Xr, yr = _rnn_case()
    op = GGN(rnn, wr, Xr, yr)
    assert torch.allclose(op.diagonal(), _reference(rnn, wr, Xr, yr).diagonal(), atol=1e-12)
    assert op._paired_checked  # packed token inputs [B, 1, L] pair with weight batches [B, p]


def test_float32_follows_w():
    net, w, X, _ = _mlp_case()
    op = GGN(net, w.float(), X)
    assert op.diagonal().dtype == torch.float32 and op.mv(torch.ones(op.p)).dtype == torch.float32
    assert torch.allclose(op.diagonal().double(), GGN(net, w, X).diagonal(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(op.dense().double(), _reference(net, w, X), rtol=1e-4, atol=1e-5)


def test_gaussian_noise_scale_is_required_and_applied():
    net, w, X, _ = _mlp_case("gaussian")
    G = _reference(net, w, X, noise_scale=0.3)
    assert torch.allclose(GGN(net, w, X, noise_scale=0.3).diagonal(), G.diagonal(), atol=1e-10)
    fitted = MLP([4, 5, 3], likelihood="gaussian", noise_scale=None)
    with pytest.raises(ValueError, match="noise_scale"):
        GGN(fitted, w, X)


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_topk_eigenpairs_match_eigh(method, name):
    net, w, X, y = CASES[name]()
    if name == "mlp":
        net, w, X, y = _mlp_case(sizes=(6, 8, 4))
        X = torch.cat([X, X * 0.5 - 1, X.flip(0) + 0.3])  # N C > p: a full-rank spectrum
    G = _reference(net, w, X, y)
    k = 5
    op = GGN(net, w, X, y)
    vals, vecs = op.eigh_topk(k, seed=0, method=method)
    assert op.eig_info["converged"] and op.eig_info["method"] == method
    ev, U = torch.linalg.eigh(G)
    ref = ev.flip(0)[:k]
    assert vals.shape == (k,) and vecs.shape == (op.p, k)
    assert torch.allclose(vals, ref, rtol=1e-6, atol=1e-10 * float(ref[0]))
    # subspace angle between the top-k subspaces: the cosines are the singular values of U_k^T V
    cos = torch.linalg.svdvals(U[:, -k:].T @ vecs)
    assert float(cos.min()) > 1 - 1e-6
    assert torch.allclose(vecs.T @ vecs, torch.eye(k, dtype=D), atol=1e-8)
    vals2, vecs2 = op.eigh_topk(k, seed=0, method=method)
    assert torch.equal(vals, vals2) and torch.equal(vecs, vecs2)  # seeded: reproducible


def test_lanczos_handles_a_rank_deficient_ggn():
    net, w, X, _ = _mlp_case()
    X = X[:2]  # rank <= N (C - 1) = 4 < k
    G = _reference(net, w, X)
    vals, _ = GGN(net, w, X).eigh_topk(6)
    ref = torch.linalg.eigvalsh(G).flip(0)[:6]
    assert torch.allclose(vals, ref, atol=1e-9 * float(ref[0]))


def test_public_lanczos_on_a_plain_matrix():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(30, 30, generator=g, dtype=D)
    A = A @ A.T
    vals, vecs, info = lanczos(lambda v: A @ v, 30, 4, seed=1)
    assert torch.allclose(vals, torch.linalg.eigvalsh(A).flip(0)[:4], rtol=1e-9)
    assert torch.allclose(A @ vecs, vecs * vals, atol=1e-7 * float(vals[0]))
    assert info["residual"] <= 1e-10 and info["iterations"] <= 30


def test_thick_restart_converges_what_one_cycle_cannot():
    """A clustered top of the spectrum (20 eigenvalues in [9, 10] above a bulk in [0, 8.9]) with a 40-vector basis:
    one cycle leaves the top-20 far from converged; thick restarts in the same memory reach eigh's values and
    vectors, the residual estimate equals the true residual, and ``restarts=0`` is the single cycle."""
    g = torch.Generator().manual_seed(0)
    p = 300
    U, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=D))
    ev = torch.cat([torch.linspace(10, 9, 20, dtype=D), torch.rand(p - 20, generator=g, dtype=D) * 8.9])
    A = (U * ev) @ U.T
    ref = torch.linalg.eigvalsh(A).flip(0)[:20]
    _, _, one = lanczos(lambda v: A @ v, p, 20, max_iter=40)
    assert one["restarts"] == 0 and one["products"] == 40 and one["residual"] > 1e-3
    vals, vecs, info = lanczos(lambda v: A @ v, p, 20, max_iter=40, restarts=50)
    assert 0 < info["restarts"] < 50 and info["residual"] <= 1e-10
    torch.testing.assert_close(vals, ref, atol=1e-9, rtol=0)
    true_res = float((A @ vecs - vecs * vals).norm(dim=0).max()) / float(vals[0])
    assert true_res <= 1e-9 and abs(true_res - info["residual"]) <= 1e-9
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(20, dtype=D), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="restarts must be >= 0"):
        lanczos(lambda v: A @ v, p, 2, restarts=-1)


def test_scipy_operator():
    net, w, X, _ = _mlp_case()
    A = GGN(net, w, X).to_scipy()
    v = torch.randn(A.shape[0], dtype=D)
    assert torch.allclose(torch.as_tensor(A @ v.numpy()), _reference(net, w, X) @ v, atol=1e-10)


# ----------------------------------------------------------------------------- KFAC
@pytest.mark.parametrize("bias", [True, False])
def test_kfac_is_exact_for_one_linear_layer_with_gaussian_likelihood(bias):
    net = MLP([4, 3], activation="tanh", bias=bias, likelihood="gaussian", noise_scale=0.6)
    g = torch.Generator().manual_seed(4)
    w = net.init_weights(g, dtype=D)
    X = torch.randn(11, 4, generator=g, dtype=D)
    G = _reference(net, w, X)
    (A, Gf), = kfac(net, w, X).values()
    assert A.shape == ((5, 5) if bias else (4, 4)) and Gf.shape == (3, 3)
    idx = kfac_indices(net, 1)
    assert sorted(idx.tolist()) == list(range(net.num_params))
    assert torch.allclose(kfac_block_dense(A, Gf), G[idx[:, None], idx], atol=1e-12)
    # the documented factors: A = mean of augmented outer products, G = N I / s^2
    a = torch.cat([X, torch.ones(11, 1, dtype=D)], 1) if bias else X
    assert torch.allclose(A, a.T @ a / 11, atol=1e-13)
    assert torch.allclose(Gf, 11 * torch.eye(3, dtype=D) / 0.36, atol=1e-12)


def test_kfac_index_map_orders_each_neuron_weights_then_bias():
    net = MLP([2, 3, 2])
    idx = kfac_indices(net, "layer2").reshape(2, 4)
    assert idx[:, :3].reshape(-1).tolist() == net.layout.indices("layer2.weight").tolist()
    assert idx[:, 3].tolist() == net.layout.indices("layer2.bias").tolist()
    with pytest.raises(KeyError, match="layer1..layer2"):
        kfac_indices(net, 3)


def test_kfac_deep_mlp_shapes_symmetry_and_last_layer():
    net, w, X, _ = _mlp_case(sizes=(4, 6, 5, 3))
    fac = kfac(net, w, X)
    assert list(fac) == ["layer1", "layer2", "layer3"]
    for (A, Gf), (n_in, n_out) in zip(fac.values(), [(4, 6), (6, 5), (5, 3)]):
        assert A.shape == (n_in + 1, n_in + 1) and Gf.shape == (n_out, n_out)
        assert torch.equal(A, A.T) or torch.allclose(A, A.T, atol=1e-14)
        assert torch.allclose(Gf, Gf.T, atol=1e-14)
        assert torch.linalg.eigvalsh(A).min() > -1e-12 and torch.linalg.eigvalsh(Gf).min() > -1e-12
        assert float(A[-1, -1]) == pytest.approx(1.0)
    # the exact GGN block and KFAC have the same trace when G_t = sum_n sum_c g g^T and A_t the mean:
    # no -- they differ (KFAC's independence assumption); but the bias block of the last layer is exact
    G = _reference(net, w, X)
    A3, G3 = fac["layer3"]
    idx = kfac_indices(net, 3).reshape(3, 6)[:, -1]
    assert torch.allclose(G3 * A3[-1, -1], G[idx[:, None], idx], atol=1e-12)


def test_sampled_kfac_is_unbiased_ish():
    net, w, X, _ = _mlp_case(sizes=(3, 4, 3))
    X = X.repeat(40, 1)  # many draws per input: the sampled G averages to the exact one
    A, Gx = kfac(net, w, X)["layer2"]
    As, Gs = kfac(net, w, X, sampled=True, seed=1)["layer2"]
    assert torch.equal(A, As)
    assert float((Gs - Gx).norm() / Gx.norm()) < 0.15
    assert torch.equal(Gs, kfac(net, w, X, sampled=True, seed=1)["layer2"][1])


def test_kfac_refuses_other_families_with_a_clear_error():
    net, w, X, _ = _rnn_case()
    with pytest.raises(NotImplementedError, match="kfac_maps"):
        kfac(net, w, X)


@pytest.mark.parametrize("embedding", ["patch", "token"])
def test_transformer_kfac_is_exact_for_one_example_at_one_position(embedding):
    """Every Kronecker block of the transformer (embedding, per-head Q/K/V/O, FFN, classifier) equals the dense
    GGN block when one example has one position (KFAC-expand is then exact); the blocks are disjoint and the
    indices are the Layout's, weights then the bias column."""
    net = Transformer(input_dim=4, n_classes=3, max_len=1, d_model=4, heads=[2, 1], ffn=[True, False], d_head=2,
                      d_ff=5, embedding=embedding)
    g = torch.Generator().manual_seed(3)
    w = net.init_weights(g, dtype=D) * 2
    X = torch.randn(1, 1, 4, generator=g, dtype=D) if embedding == "patch" else torch.tensor([[2.0]], dtype=D)
    dense = _reference(net, w, X)
    fac = kfac(net, w, X)
    assert list(fac) == [m["name"] for m in net.kfac_maps()]
    assert ("embed" in fac) == (embedding == "patch") and "block0.attn.head1.o" in fac and "block1.ffn.1" not in fac
    nonzero = 0
    for name, (A, G) in fac.items():
        idx = kfac_indices(net, name)
        block = dense[idx[:, None], idx]
        assert torch.allclose(kfac_block_dense(A, G), block, atol=1e-13), name
        nonzero += bool(block.abs().max() > 1e-6)
    assert nonzero >= 8  # V, O, FFN and classifier blocks carry curvature (Q, K do not at one position)
    covered = torch.cat([kfac_indices(net, n) for n in fac])
    assert covered.unique().numel() == covered.numel()
    assert torch.equal(net.layout.indices("out.weight").reshape(3, 4)[1], kfac_indices(net, "out").reshape(3, 5)[1, :4])


def test_transformer_kfac_expand_over_positions_ignores_padding_and_chunks():
    """A map shared over positions: ``A`` averages the valid positions, ``G`` sums over them; a padded position
    adds nothing (the factors of ``[x, pad]`` equal those of ``[x]``), the chunking changes nothing, and the
    sampled factors share ``A`` and are seeded."""
    net, w, X, _ = _transformer_case()  # X[0] is padded after 3 positions
    short = kfac(net, w, X[:1, :3])
    padded = kfac(net, w, X[:1])
    for name in short:
        for a, b in zip(short[name], padded[name]):
            assert torch.allclose(a, b, atol=1e-13), name
    whole, one = kfac(net, w, X), kfac(net, w, X, chunk=1)
    for name in whole:
        assert torch.allclose(whole[name][0], one[name][0], atol=1e-13)
        assert torch.allclose(whole[name][1], one[name][1], atol=1e-13)
    A_q, G_q = whole["block0.attn.head0.q"]
    assert A_q.shape == (4, 4) and G_q.shape == (2, 2) and float(G_q.trace()) > 0  # Q gets curvature here
    torch.testing.assert_close(A_q, whole["block0.attn.head1.v"][0])  # Q, K, V of a block read one input
    sampled = kfac(net, w, X, sampled=True, seed=4)
    assert torch.equal(sampled["out"][0], whole["out"][0])
    assert torch.equal(sampled["out"][1], kfac(net, w, X, sampled=True, seed=4)["out"][1])


# ---------------------------------------------------------------- the sampled (Monte-Carlo) diagonal
def test_label_cotangent_second_moment_is_the_softmax_hessian():
    """Exact in expectation: enumerating the labels, ``sum_y pi_y r(y) r(y)^T = diag(pi) - pi pi^T`` and
    ``sum_y pi_y r(y) = 0`` (float64, to 1e-14): so the sampled diagonal's expectation is the GGN diagonal."""
    pi = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=D), -1)
    H = torch.diag_embed(pi) - pi[..., :, None] * pi[..., None, :]
    EM, Em = torch.zeros_like(H), torch.zeros_like(pi)
    for c in range(5):
        r = label_cotangent(pi, torch.full((6,), c))
        EM += pi[:, c, None, None] * r[..., :, None] * r[..., None, :]
        Em += pi[:, c, None] * r
    assert torch.allclose(EM, H, atol=1e-14) and torch.allclose(Em, torch.zeros_like(Em), atol=1e-14)


def _direct_case():
    w = torch.randn(8, generator=torch.Generator().manual_seed(6), dtype=D)
    return _Direct(), w, torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=D), None


@pytest.mark.parametrize("name", ["mlp", "mlp-gauss-nobias", "rnn", "transformer", "direct"])
def test_sampled_diagonal_is_unbiased(name):
    """Mean over 25 seeds (8 label draws each) of the sampled diagonal = the exact diagonal, every coordinate
    within 5 Monte-Carlo standard errors (sd over the seeds / 5); padding positions masked (rnn); paths: MLP
    closed form, paired inputs (rnn, transformer), vmap over vjp (direct)."""
    net, w, X, y = _direct_case() if name == "direct" else CASES[name]()
    op = GGN(net, w, X, y)
    exact = op.diagonal()
    ds = torch.stack([op.diagonal("sampled", samples=8, seed=s) for s in range(25)])
    mean, se = ds.mean(0), ds.std(0) / 5
    assert bool((ds >= 0).all())
    assert bool(((mean - exact).abs() <= 5 * se + 1e-12 * exact.abs().max()).all()), float(
        ((mean - exact).abs() / se.clamp_min(1e-300)).max())
    assert float(ds.std(0).max()) > 0  # really random


def test_sampled_diagonal_options():
    net, w, X, y = _rnn_case()
    op = GGN(net, w, X, y)
    a = op.diagonal("sampled", samples=3, seed=5)
    assert torch.equal(a, op.sampled_diagonal(3, seed=5))  # seeded: reproducible
    assert not torch.equal(a, op.diagonal("sampled", samples=3, seed=6))
    assert op.backward_passes("exact") == y.shape[1] * (net.num_outputs - 1)
    assert op.backward_passes("sampled", samples=3) == 3
    y_all_pad = torch.full_like(y, PAD)  # every position padding: nothing to count
    assert torch.equal(GGN(net, w, X, y_all_pad).diagonal("sampled"), torch.zeros(op.p, dtype=D))
    with pytest.raises(ValueError, match="'exact' or 'sampled'"):
        op.diagonal("mc")
    with pytest.raises(ValueError, match="positive number"):
        op.diagonal("sampled", samples=0)


def test_subsampled_ggn_is_the_scaled_ggn_of_a_seeded_subset_and_feeds_the_laplace_start():
    """subsampled_ggn(rows=n): N / n times the GGN of n seeded rows (padding masks follow the rows); rows=0 or >= N:
    the exact GGN; fit_posterior(curvature_rows=n) builds its Laplace start from exactly that operator."""
    from pyro_distill.inference import fit_posterior, laplace

    net, w, X, y = _rnn_case()
    assert isinstance(subsampled_ggn(net, w, X, y), GGN) and isinstance(subsampled_ggn(net, w, X, y, rows=5), GGN)
    op = subsampled_ggn(net, w, X, y, rows=3, seed=7)
    assert isinstance(op, ScaledGGN) and op.scale == pytest.approx(5 / 3)
    idx = torch.randperm(5, generator=torch.Generator().manual_seed(7))[:3]
    ref = 5 / 3 * _reference(net, w, X[idx], y[idx])
    V = torch.randn(net.num_params, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    torch.testing.assert_close(op.mm(V), ref @ V, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op.mv(V[:, 0]), ref @ V[:, 0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op.diagonal(), ref.diagonal(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op.dense(), ref, rtol=1e-8, atol=1e-10)
    lam, _ = op.eigh_topk(2, seed=0)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(ref).flip(0)[:2], rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="rows must be >= 0"):
        subsampled_ggn(net, w, X, y, rows=-1)
    # the Laplace start of fit_posterior from 3 of the 5 sequences (no MAP, no SVI: the start itself)
    prior = net.default_prior(D)
    q, hist = fit_posterior(net, X, y, guide="diag", init=w, map_steps=0, steps=0, curvature_rows=3, seed=7,
                            prior=prior, dtype=D, num_particles=1, elbo_eval_particles=1)
    expect = laplace(net, X, w, prior, kind="diag", y=y, ggn_op=op)
    torch.testing.assert_close(q.scale, expect.scale)
    assert hist.info["curvature_rows"] == 3 == op.N  # the rows the start's curvature came from
    with pytest.raises(ValueError, match="kron"):
        fit_posterior(net, X, y, guide="diag", laplace_kind="kron", init=w, map_steps=0, steps=0, curvature_rows=3)
