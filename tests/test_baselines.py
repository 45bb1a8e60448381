"""Baselines and distill(): each runs and learns on tiny data; the KD loss equals a hand computation."""

import math

import pytest
import torch

from pyro_distill import baselines, metrics
from pyro_distill.distill import distill, student_prior
from pyro_distill.inference import fit_posterior
from pyro_distill.nets.mlp import MLP


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()  # 3 classes
    teacher = MLP([4, 8, 8, 3])
    tq, _ = fit_posterior(teacher, X, y, steps=20, map_steps=300, seed=0)
    return X, y, teacher, tq, MLP([4, 4, 3])


def _chance_acc(net, X, y):
    return metrics.evaluate(net, net.init_weights(torch.Generator().manual_seed(0), X.dtype), X, y)["accuracy"]


def test_kd_loss_by_hand_with_T2_and_batchmean():
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=torch.float64)
    pt = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    gamma, T = 0.3, 2.0
    ce = 0.0
    kl = 0.0
    for n in range(2):
        zs = [math.exp(v) for v in z[n].tolist()]
        ce += -math.log(zs[y[n]] / sum(zs)) / 2
        ps = [math.exp(v / T) for v in z[n].tolist()]
        ps = [v / sum(ps) for v in ps]
        pT = [v ** (1 / T) for v in pt[n].tolist()]
        pT = [v / sum(pT) for v in pT]
        kl += sum(a * math.log(a / b) for a, b in zip(pT, ps))  # summed over classes ...
    kl /= 2  # ... averaged over the batch (batchmean), not over the 6 entries
    expected = gamma * ce + (1 - gamma) * T**2 * kl
    assert float(baselines.kd_loss(z, pt, y, gamma, T)) == pytest.approx(expected, rel=1e-12)
    # gamma = 1 is plain cross-entropy; T = 1, gamma = 0 is the plain KL
    assert float(baselines.kd_loss(z, pt, y, 1.0, T)) == pytest.approx(ce, rel=1e-12)
    with pytest.raises(ValueError, match="gamma"):
        baselines.kd_loss(z, pt, y, 1.5, T)


def test_point_baselines_learn(tiny):
    X, y, teacher, tq, student = tiny
    chance = _chance_acc(student, X, y)
    w, h = baselines.deterministic(student, X, y, steps=150)
    assert h.map_loss[-1] < h.map_loss[0]
    assert metrics.evaluate(student, w, X, y)["accuracy"] > chance + 0.3
    tp = metrics.predict(teacher, tq, X, num_samples=50)
    w, h = baselines.knowledge_distillation(student, X, y, tp, gamma=0.5, temperature=2.0, steps=150)
    assert h.map_loss[-1] < h.map_loss[0]
    assert metrics.evaluate(student, w, X, y)["accuracy"] > 0.7
    w, h = baselines.prune_finetune(teacher, tq.mean, student, X, y, steps=150)
    assert w.shape == (student.num_params,) and metrics.evaluate(student, w, X, y)["accuracy"] > 0.7


def test_pruning_keeps_teacher_values_of_the_biggest_neurons(tiny):
    X, y, teacher, tq, student = tiny
    w0, ops = baselines.prune_weights(teacher, tq.mean, student)
    assert w0.shape == (student.num_params,)
    # every kept weight is a teacher weight (a point mass: conditioning drops coordinates)
    assert bool(torch.isin(w0, tq.mean.to(w0.dtype)).all())
    with pytest.raises(ValueError, match="teacher weights"):
        baselines.prune_weights(teacher, tq.mean[:-1], student)


def test_vi_baselines_and_distill_learn(tiny):
    X, y, teacher, tq, student = tiny
    q, h = baselines.standard_prior(student, X, y, steps=15, map_steps=150)
    assert metrics.evaluate(student, q, X, y, num_samples=30)["accuracy"] > 0.75
    _, prior, _ = student_prior(teacher, tq, student)
    q, h = baselines.standard_prior_conditioned_init(student, X, y, start=prior.mean, steps=15, map_steps=150)
    assert metrics.evaluate(student, q, X, y, num_samples=30)["accuracy"] > 0.75
    res = distill(teacher, tq, student, X, y, tau=1.0, steps=15, map_steps=150)
    net, post, hist = res
    assert net.config() == student.config() and post.dim == student.num_params
    assert metrics.evaluate(net, post, X, y, num_samples=30)["accuracy"] > 0.75
    assert hist.elbo_end is not None and math.isfinite(hist.elbo_end)


def test_tempered_prior_scales_covariance(tiny):
    X, y, teacher, tq, student = tiny
    _, p1, ops = student_prior(teacher, tq, student)
    _, p10, _ = student_prior(teacher, tq, student, ops=ops, tau=10.0)
    assert torch.allclose(p10.mean, p1.mean)
    assert torch.allclose(p10.variance, 10 * p1.variance)
    with pytest.raises(ValueError, match="tau must be >= 1"):
        student_prior(teacher, tq, student, tau=0.5)


# ---------------------------------------------------------------- the one point-fitting loop, bit for bit
def _reference_adam(loss, w0, n, steps, lr, batch_size, generator=None):
    """The loops as they were written before the shared loop: Adam, a minibatch of the global (or a given)
    generator, zero_grad, loss, backward, step."""
    w = w0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    losses = []
    for _ in range(steps):
        idx = None if batch_size is None or batch_size >= n else torch.randint(0, n, (batch_size,),
                                                                                 generator=generator)
        opt.zero_grad(set_to_none=True)
        v = loss(w, idx)
        v.backward()
        opt.step()
        losses.append(float(v.detach()))
    return w.detach(), losses


@pytest.mark.parametrize("batch_size", [None, 32])
def test_map_kd_and_finetune_are_bit_identical_to_a_plain_adam_loop(tiny, batch_size):
    """fit_map / deterministic / knowledge_distillation run through training.fit_point; each must equal, with
    torch.equal, a plain Adam loop over the same loss with the same seeded minibatch draws (the MLP experiment's
    metrics stay bit-identical across the refactor)."""
    import pyro

    X, y, teacher, tq, student = tiny
    N = X.shape[0]
    prior = student.default_prior(X.dtype)
    w0 = student.init_weights(torch.Generator().manual_seed(3), X.dtype)

    def nlj(w, idx):
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        ll = student.log_likelihood(w, xb, yb).sum() * (1.0 if idx is None else N / len(idx))
        return -(ll + prior.log_prob(w)) / N

    pyro.set_rng_seed(3)
    w_ref, l_ref = _reference_adam(nlj, w0, N, 25, 1e-2, batch_size)
    w, hist = baselines.deterministic(student, X, y, steps=25, seed=3, init=w0, batch_size=batch_size)
    assert torch.equal(w, w_ref) and hist.map_loss == l_ref

    tp = metrics.predict(teacher, tq, X, num_samples=20)

    def kd(w, idx):
        xb, yb, tb = (X, y, tp) if idx is None else (X[idx], y[idx], tp[idx])
        return baselines.kd_loss(student.forward(w, xb), tb, yb, 0.5, 2.0) - prior.log_prob(w) / N

    torch.manual_seed(4)
    w_ref, l_ref = _reference_adam(kd, w0, N, 25, 1e-2, batch_size)
    w, hist = baselines.knowledge_distillation(student, X, y, tp, steps=25, seed=4, init=w0, batch_size=batch_size)
    assert torch.equal(w, w_ref) and hist.map_loss == l_ref


def test_fit_point_guard_names_the_step_and_keeps_the_last_good_weights():
    from pyro_distill.training import DivergenceError, fit_point

    w0 = torch.zeros(3, dtype=torch.float64)

    def loss(w, idx):  # finite for 4 steps, then NaN
        loss.calls += 1
        return (w - 1).pow(2).sum() + (float("nan") if loss.calls > 4 else 0.0)

    loss.calls = 0
    with pytest.raises(DivergenceError, match="token KD diverged at step 4: loss is nan; lower lr") as err:
        fit_point(loss, w0, n=10, steps=10, lr=0.1, name="token KD")
    assert err.value.step == 4 and len(err.value.history.map_loss) == 4
    assert torch.isfinite(err.value.last_good).all() and not torch.equal(err.value.last_good, w0)
