"""Cross-architecture KD (pyro_distill.crossarch): format conversion, KD through converted inputs, the exact GGN
of the KD objective and the KD-Laplace student (float64 references)."""

from __future__ import annotations

import pytest
import torch

from pyro_distill.baselines import kd_loss, knowledge_distillation
from pyro_distill.crossarch import KDGGN, convert, crossarch_kd, input_format, kd_laplace, teacher_predictive
from pyro_distill.gaussian import DiagGaussian
from pyro_distill.nets import CNN, MLP
from pyro_distill.nets.transformer import Transformer
from pyro_distill.predictions import predictive

F64 = torch.float64


def _data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 16, generator=g, dtype=F64)  # flat 4x4 images
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def _w(net, seed: int = 1, scale: float = 1.0):
    return net.init_weights(torch.Generator().manual_seed(seed), F64) * scale


def test_convert_is_a_reshape_both_ways():
    X, _ = _data()
    seq = convert(X, "flat", "sequence", (4, 4))
    img = convert(seq, "sequence", "image", (1, 4, 4))
    assert seq.shape == (12, 4, 4) and img.shape == (12, 1, 4, 4)
    assert torch.equal(seq[:, 2, 3], X[:, 2 * 4 + 3])  # row-major: pixel (r, c) = flat r * W + c
    assert torch.equal(convert(img, "image", "flat", (4, 4)), X)
    with pytest.raises(ValueError, match="format 'image'"):
        convert(X, "image", "flat", (4, 4))
    bad = seq.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="padded"):
        convert(bad, "sequence", "flat", (4, 4))


def test_input_formats():
    assert input_format(CNN((4, 4), [2], [3])) == "image"
    assert input_format(MLP([16, 3])) == "flat"
    assert input_format(Transformer(input_dim=4, n_classes=3, max_len=4, d_model=4, heads=[1], d_head=4,
                                    d_ff=4)) == "sequence"


def test_crossarch_kd_equals_kd_on_converted_inputs():
    """Transformer teacher (sequences) -> CNN student (images) from flat inputs equals the plain KD baseline
    given the teacher's predictive on the sequences and the student's inputs as images."""
    X, y = _data()
    teacher = Transformer(input_dim=4, n_classes=3, max_len=4, d_model=4, heads=[1], d_head=4, d_ff=4)
    tw = _w(teacher)
    student = CNN((4, 4), [2], [3], pool=2)
    tp = teacher_predictive(teacher, tw, X, "flat", (4, 4))
    assert torch.allclose(tp, predictive(teacher, tw, X.reshape(12, 4, 4)), atol=0, rtol=0)
    w1, h = crossarch_kd(teacher, tw, student, X, y, fmt="flat", steps=5, lr=1e-2, seed=3)
    w2, _ = knowledge_distillation(student, X.reshape(12, 1, 4, 4), y, tp, steps=5, lr=1e-2, seed=3)
    assert torch.allclose(w1, w2, atol=1e-12, rtol=0)
    assert h.info["teacher_format"] == "sequence" and h.info["student_format"] == "image"


@pytest.mark.parametrize("gamma,T", [(0.5, 2.0), (0.0, 3.0), (1.0, 2.0), (0.3, 1.0)])
def test_kd_ggn_is_the_hessian_of_the_linearized_kd_objective(gamma, T):
    """``KDGGN`` equals the Hessian (autograd) of ``N L_KD`` with the student replaced by its linearization at
    ``w0`` (the definition of a GGN), teacher probabilities fixed: checks the ``T^2`` and ``1/T`` factors."""
    X, y = _data(8)
    net = CNN((4, 4), [2], [3], pool=2)
    w0 = _w(net, 2, 2.0)
    tp = torch.softmax(torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=F64), -1)
    J = torch.func.jacrev(lambda w: net.forward(w, X))(w0)  # [N, C, p]
    f0 = net.forward(w0, X)

    def loss(w):
        return X.shape[0] * kd_loss(f0 + J @ (w - w0), tp, y, gamma, T)

    H = torch.autograd.functional.hessian(loss, w0)
    op = KDGGN(net, w0, X, gamma=gamma, temperature=T)
    G = op.dense()
    assert torch.allclose(G, H, atol=1e-10, rtol=0)
    v = torch.randn(net.num_params, generator=torch.Generator().manual_seed(6), dtype=F64)
    assert torch.allclose(op.mv(v), H @ v, atol=1e-10, rtol=0)
    assert torch.allclose(op.diagonal(), H.diagonal(), atol=1e-10, rtol=0)


def test_kd_laplace_diag_is_the_exact_diagonal_precision():
    X, y = _data()
    teacher = CNN((4, 4), [2], [3], pool=2)
    student = MLP([16, 4, 3])
    w_kd = _w(student, 4)
    q, hist = kd_laplace(teacher, _w(teacher), student, X, y, kind="diag", w_kd=w_kd, gamma=0.4, temperature=2.5)
    assert isinstance(q, DiagGaussian) and torch.equal(q.mean, w_kd)
    prec = KDGGN(student, w_kd, X, gamma=0.4, temperature=2.5).dense().diagonal() + 1 / student.prior_scales() ** 2
    assert torch.allclose(q.variance, 1 / prec, atol=1e-12, rtol=1e-10)
    assert hist.info["laplace"]["kind"] == "diag"


def test_kd_laplace_fits_the_kd_point_then_covers_it():
    """Without ``w_kd`` the mean is the KD point of ``crossarch_kd`` (same seed, same steps)."""
    X, y = _data()
    teacher = CNN((4, 4), [2], [3], pool=2)
    student = MLP([16, 4, 3])
    w, _ = crossarch_kd(teacher, _w(teacher), student, X, y, image_shape=(4, 4), steps=4, seed=1)
    q, _ = kd_laplace(teacher, _w(teacher), student, X, y, kind="diag", image_shape=(4, 4), steps=4, seed=1)
    assert torch.allclose(q.mean, w, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="image_shape"):
        crossarch_kd(MLP([16, 3]), _w(MLP([16, 3])), student, X, y, steps=1)
    with pytest.raises(ValueError, match="'diag' or 'lowrank'"):
        kd_laplace(teacher, _w(teacher), student, X, y, kind="kron", w_kd=w)


def test_kd_laplace_lowrank_adds_directions_to_the_diagonal_one():
    """Low-rank + diagonal: the diagonal part is the diagonal Laplace's variance, the factor only adds variance."""
    X, y = _data()
    teacher = CNN((4, 4), [2], [3], pool=2)
    student = MLP([16, 4, 3])
    w_kd = _w(student, 4)
    qd, _ = kd_laplace(teacher, _w(teacher), student, X, y, kind="diag", w_kd=w_kd)
    ql, _ = kd_laplace(teacher, _w(teacher), student, X, y, kind="lowrank", rank=5, w_kd=w_kd)
    assert torch.equal(ql.mean, w_kd) and ql.cov_factor.shape == (student.num_params, 5)
    assert torch.allclose(ql.cov_diag, qd.variance, atol=0, rtol=1e-12)
    assert bool((ql.variance >= qd.variance - 1e-15).all())
