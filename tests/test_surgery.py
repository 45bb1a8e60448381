"""MLP surgery: exact functional equivalence, Bayesian linear regression, plans, bad inputs, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyro_distill import surgery as S
from pyro_distill.cli import main
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, LowRankGaussian
from pyro_distill.nets.mlp import MLP
from pyro_distill.store import load_model, save_model
from pyro_distill.surgery.mlp import neuron_candidates
from pyro_distill.surgery.plan import SELECTORS

F64 = torch.float64


def posterior(net: MLP, kind: str = "dense", seed: int = 0):
    """A random correlated Gaussian over ``net``'s weights (float64)."""
    gen = torch.Generator().manual_seed(seed)
    p = net.num_params
    m = torch.randn(p, generator=gen, dtype=F64)
    if kind == "dense":
        A = torch.randn(p, p, generator=gen, dtype=F64) / math.sqrt(p)
        return DenseGaussian.from_covariance(m, A @ A.T + 0.05 * torch.eye(p, dtype=F64), layout=net.layout)
    if kind == "lowrank":
        W = torch.randn(p, 4, generator=gen, dtype=F64) * 0.3
        return LowRankGaussian(m, W, torch.rand(p, generator=gen, dtype=F64) + 0.05, layout=net.layout)
    return DiagGaussian(m, torch.rand(p, generator=gen, dtype=F64) + 0.05, layout=net.layout)


def assert_equivalent(ops, teacher: MLP, q, n_samples: int = 6):
    """Samples of the conditioned Gaussian: teacher with the fixed coordinates == student, to 1e-10."""
    student, prior = S.apply(ops, teacher, q)
    assert prior.layout == student.layout and prior.dim == student.num_params
    w = prior.sample(n_samples, generator=torch.Generator().manual_seed(1))
    wt = S.embed(ops, teacher, w)
    x = torch.randn(11, teacher.sizes[0], generator=torch.Generator().manual_seed(2), dtype=F64) * 2
    out_t, out_s = teacher(wt, x), student(w, x)
    assert out_s.shape == (n_samples, 11, teacher.sizes[-1])
    assert torch.allclose(out_t, out_s, atol=1e-10, rtol=0)
    I, v, _ = ops[0].removed(teacher)  # the embedded weights hold the first operation's fixed values
    assert torch.equal(wt[..., I], v.expand(n_samples, -1))
    return student, prior


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["dense", "lowrank", "diag"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_remove_neurons_is_exact(bias, kind, activation):
    teacher = MLP([5, 7, 6, 3], activation=activation, bias=bias)
    q = posterior(teacher, kind)
    op = S.remove_neurons(teacher, 1, [0, 4, 6])
    student, prior = assert_equivalent([op], teacher, q)
    assert student.sizes == [5, 4, 6, 3]
    assert type(prior) is type(q)
    # and the prior is the teacher posterior conditioned on exactly those coordinates
    I, v = op.fixed(teacher)
    ref = q.condition(I, v)
    assert torch.allclose(prior.mean, ref.mean) and torch.allclose(prior.covariance(), ref.covariance())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_remove_layer_is_exact(bias, kind):
    teacher = MLP([4, 6, 6, 6, 2], activation="relu", bias=bias)
    q = posterior(teacher, kind)
    student, prior = assert_equivalent([S.remove_layer(teacher, 2)], teacher, q)
    assert student.sizes == [4, 6, 6, 2] and student.layout.names[-1].startswith("layer3")
    I, v = S.RemoveLayer(2).fixed(teacher)
    assert torch.equal(v[:36], torch.eye(6, dtype=F64).reshape(-1))


@pytest.mark.parametrize("layer", [1, 2])
def test_identity_mlp_first_and_last_layers_can_go(layer):
    teacher = MLP([3, 3, 3], activation="identity")
    assert_equivalent([S.remove_layer(teacher, layer)], teacher, posterior(teacher))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("selector", sorted(SELECTORS))
def test_composed_plan_is_exact(bias, selector):
    teacher = MLP([5, 9, 6, 6, 7, 3], bias=bias)
    student_arch = MLP([5, 4, 3, 3], bias=bias)
    q = posterior(teacher, "dense", seed=3)
    pl = S.plan(teacher, student_arch, selector=selector, posterior=q, seed=4)
    kinds = [op.name for op in pl]
    # equalize widths, then remove layers, then neurons
    assert kinds.index("remove_layer") > 0 and kinds[-1] == "remove_neurons"
    student, _ = assert_equivalent(pl, teacher, q)
    assert student.sizes == [5, 4, 3, 3]


def test_design_example_plan():
    teacher = MLP([64, 48, 32, 10])
    pl = S.plan(teacher, MLP([64, 16, 10]), selector="random", seed=0)
    assert [(op.name, op.layer, len(getattr(op, "neurons", ()))) for op in pl] == [
        ("remove_neurons", 1, 16), ("remove_layer", 2, 0), ("remove_neurons", 1, 16)]
    same = S.plan(teacher, MLP([64, 48, 32, 10]), selector="random")
    assert [op.name for op in same] == ["same_family"]
    zero, one = torch.zeros(teacher.num_params, dtype=F64), torch.ones(teacher.num_params, dtype=F64)
    student, prior = S.apply(same, teacher, DiagGaussian(zero, one, layout=teacher.layout))
    assert student.sizes == teacher.sizes and torch.equal(prior.mean, torch.zeros(teacher.num_params, dtype=F64))


def test_plan_serialization_round_trip_and_replay():
    teacher = MLP([5, 8, 6, 6, 2], bias=True)
    q = posterior(teacher, "lowrank")
    pl = S.plan(teacher, MLP([5, 3, 2]), selector="evidence", posterior=q)
    text = json.dumps(pl.to_dict())
    back = S.Plan.from_dict(json.loads(text))
    assert back == pl and back.teacher == pl.teacher and back.selector == "evidence"
    assert str(back) == str(pl) and "remove_layer(layer=" in str(pl)
    a, b = S.apply(pl, teacher, q)[1], S.apply(back, teacher, q)[1]
    assert torch.equal(a.mean, b.mean) and torch.equal(a.cov_factor, b.cov_factor)
    assert a.meta["surgery"] == pl.to_dict()["ops"]


def test_selectors_rank_by_their_scores():
    teacher = MLP([4, 6, 3])
    q = posterior(teacher, "dense", seed=5)
    cands = neuron_candidates(teacher, 1)
    p0 = teacher.default_prior(F64)
    ev = torch.stack([S.savage_dickey(q, p0, c.index) for c in cands])
    assert torch.equal(S.score_candidates(teacher, cands, "evidence", q), ev)
    pl = S.plan(teacher, MLP([4, 4, 3]), selector="evidence", posterior=q)
    assert set(pl[0].neurons) == set(torch.topk(ev, 2).indices.tolist())  # data favour removing these most
    snr = torch.stack([(q.mean[c.index] ** 2 / q.variance[c.index]).mean() for c in cands])
    assert torch.equal(S.score_candidates(teacher, cands, "snr", q), -snr)  # remove-score: low snr goes first
    pl = S.plan(teacher, MLP([4, 4, 3]), selector="snr", posterior=q)
    assert set(pl[0].neurons) == set(torch.topk(-snr, 2).indices.tolist())
    assert S.plan(teacher, MLP([4, 4, 3]), selector="first")[0].neurons == (0, 1)
    assert S.plan(teacher, MLP([4, 4, 3]), selector="last")[0].neurons == (4, 5)
    r1 = S.plan(teacher, MLP([4, 4, 3]), selector="random", seed=7)
    assert r1 == S.plan(teacher, MLP([4, 4, 3]), selector="random", seed=7)


def test_savage_dickey_is_the_log_evidence_change_in_linear_regression():
    """log q(b_j = 0) - log p0(b_j = 0) == log p(y | model without feature j) - log p(y | full model)."""
    gen = torch.Generator().manual_seed(0)
    n, d, sigma, s0 = 30, 4, 0.5, 1.3
    X = torch.randn(n, d, generator=gen, dtype=F64)
    y = X @ torch.tensor([1.0, 0.0, -2.0, 0.3], dtype=F64) + sigma * torch.randn(n, generator=gen, dtype=F64)
    q = _blr_posterior(X, y, sigma, s0)
    p0 = DiagGaussian(torch.zeros(d, dtype=F64), torch.full((d,), s0, dtype=F64))
    for j in range(d):
        zero = torch.zeros(1, dtype=F64)
        sd = q.marginalize([j]).log_prob(zero) - p0.marginalize([j]).log_prob(zero)
        keep = [i for i in range(d) if i != j]
        assert torch.allclose(sd, _log_evidence(X[:, keep], y, sigma, s0) - _log_evidence(X, y, sigma, s0))


def _blr_posterior(X, y, sigma, s0) -> DenseGaussian:
    prec = X.T @ X / sigma**2 + torch.eye(X.shape[1], dtype=F64) / s0**2
    cov = torch.cholesky_inverse(torch.linalg.cholesky(prec))
    return DenseGaussian.from_covariance(cov @ X.T @ y / sigma**2, cov)


def _log_evidence(X, y, sigma, s0):
    cov = sigma**2 * torch.eye(X.shape[0], dtype=F64) + s0**2 * X @ X.T
    return torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)


@pytest.mark.parametrize("kind", ["dense", "lowrank", "diag"])
def test_blr_conditioning_a_coefficient_on_zero_drops_the_feature(kind):
    gen = torch.Generator().manual_seed(1)
    n, d, sigma, s0 = 25, 5, 0.7, 2.0
    X = torch.randn(n, d, generator=gen, dtype=F64)
    y = X @ torch.randn(d, generator=gen, dtype=F64) + sigma * torch.randn(n, generator=gen, dtype=F64)
    if kind == "diag":  # orthogonal features: the exact posterior is diagonal
        X, _ = torch.linalg.qr(X)
    q = _blr_posterior(X, y, sigma, s0)
    if kind == "lowrank":
        C = q.covariance()
        dmin = 0.5 * float(torch.linalg.eigvalsh(C)[0])
        ev, V = torch.linalg.eigh(C - dmin * torch.eye(d, dtype=F64))
        q = LowRankGaussian(q.mean, V * ev.clamp_min(0).sqrt(), torch.full((d,), dmin, dtype=F64))
    elif kind == "diag":
        q = DiagGaussian(q.mean, q.variance.sqrt())
    for j in range(d):
        keep = [i for i in range(d) if i != j]
        got = q.condition([j], 0.0)
        ref = _blr_posterior(X[:, keep], y, sigma, s0)
        assert torch.allclose(got.mean, ref.mean, atol=1e-10) and torch.allclose(
            got.covariance(), ref.covariance(), atol=1e-10)


# ============================================================================ bad inputs
def test_layer_width_mismatch_names_the_fix():
    net = MLP([8, 48, 32, 32, 3])
    with pytest.raises(S.SurgeryError, match=r"cannot remove layer 2: n_2=32 != n_1=48; remove 16 neurons of layer 1"):
        S.remove_layer(net, 2)
    with pytest.raises(S.SurgeryError, match="remove 16 neurons of layer 2 first"):
        S.remove_layer(MLP([8, 32, 48, 3]), 2)


@pytest.mark.parametrize("call, match", [
    (lambda: S.remove_layer(MLP([4, 6, 6, 2], activation="tanh"), 2), "'tanh' is not idempotent"),
    (lambda: S.remove_layer(MLP([4, 4, 6, 2]), 1), "remove a hidden-to-hidden layer"),
    (lambda: S.remove_layer(MLP([4, 6, 6, 6]), 3), "output is not activated"),
    (lambda: S.remove_layer(MLP([4, 4]), 1), "only layer"),
    (lambda: S.remove_layer(MLP([4, 6, 6, 2]), 5), "has layers 1..3"),
    (lambda: S.remove_neurons(MLP([4, 6, 2]), 1, range(6)), "every neuron.*keep at least one"),
    (lambda: S.remove_neurons(MLP([4, 6, 2]), 1, [6]), r"out of range; layer 1 has neurons 0..5"),
    (lambda: S.remove_neurons(MLP([4, 6, 2]), 1, [-1]), "out of range"),
    (lambda: S.remove_neurons(MLP([4, 6, 2]), 1, [2, 2]), r"neurons \[2\] are repeated"),
    (lambda: S.remove_neurons(MLP([4, 6, 2]), 1, []), "at least one"),
    (lambda: S.remove_neurons(MLP([4, 6, 2]), 2, [0]), "output layer.*cannot be removed"),
    (lambda: S.remove_neurons(MLP([4, 6, 2]), 0, [0]), "out of range"),
    (lambda: S.plan(MLP([4, 6, 2]), MLP([4, 8, 2]), selector="random"), "wider than every teacher"),
    (lambda: S.plan(MLP([4, 6, 2]), MLP([5, 6, 2]), selector="random"), "same input and output sizes"),
    (lambda: S.plan(MLP([4, 6, 2]), MLP([4, 3, 3, 2]), selector="random"), "deeper"),
    (lambda: S.plan(MLP([4, 6, 6, 2], activation="tanh"), MLP([4, 6, 2], activation="tanh"), selector="random"),
     "not idempotent"),
    (lambda: S.plan(MLP([4, 6, 2]), MLP([4, 3, 2], bias=False), selector="random"), "bias"),
    (lambda: S.plan(MLP([4, 6, 2]), MLP([4, 3, 2])), "needs|scores neurons on the teacher's posterior"),
    (lambda: S.plan(MLP([4, 6, 2]), MLP([4, 3, 2]), selector="best"), "unknown selector"),
])
def test_bad_inputs_name_the_fix(call, match):
    with pytest.raises((S.SurgeryError, ValueError), match=match):
        call()


def test_incompatible_plan_and_mismatched_posterior():
    teacher = MLP([4, 6, 6, 2])
    pl = S.plan(teacher, MLP([4, 3, 2]), selector="random")
    other = MLP([4, 7, 6, 2])
    with pytest.raises(S.SurgeryError, match="this plan was made for teacher"):
        S.apply(pl, other, posterior(other))
    with pytest.raises(S.SurgeryError, match="belongs to another architecture"):
        S.apply(pl, teacher, posterior(other))
    with pytest.raises(S.SurgeryError, match="belongs to another architecture"):
        S.plan(teacher, MLP([4, 3, 2]), posterior=posterior(other))
    with pytest.raises(S.SurgeryError, match="out of range"):  # a bare op list replayed on the wrong net
        S.apply([S.RemoveNeurons(1, [6])], teacher, posterior(teacher))


# ============================================================================ CLI
def test_cli_plan_prints_and_json(capsys):
    assert main(["plan", "--teacher", "64,32,32,10", "--student", "64,16,10"]) == 0
    out = capsys.readouterr().out
    assert "teacher [64, 32, 32, 10] -> student [64, 16, 10]" in out
    assert "remove_layer(layer=2)" in out and "remove_neurons(layer=1" in out and "plan (random)" in out
    assert main(["plan", "--teacher", "64,32,32,10", "--student", "64,16,10", "--json", "--seed", "3"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert S.Plan.from_dict(d).student["sizes"] == [64, 16, 10]
    assert main(["plan", "--teacher", "64,32,10", "--student", "64,40,10"]) == 1
    assert "wider than every teacher" in capsys.readouterr().err


def test_cli_distill_saves_student_prior_and_refuses_overwrite(tmp_path, capsys):
    teacher = MLP([5, 6, 6, 2])
    q = posterior(teacher, "dense")
    save_model(tmp_path / "teacher", teacher, q, card={"data": {"name": "synthetic"}})
    assert main(["plan", "--posterior", str(tmp_path / "teacher"), "--student", "5,3,2", "--selector", "evidence"]) == 0
    printed = capsys.readouterr().out
    args = ["distill", str(tmp_path / "teacher"), "--student", "5,3,2", "--selector", "evidence",
            "--out", str(tmp_path / "student")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert printed.split("\n", 1)[1] in out  # the same plan as `plan` printed
    assert "idata.nc not written (unknown data set 'synthetic'" in out  # saved all the same, told why
    net, prior, card = load_model(tmp_path / "student")
    assert net.sizes == [5, 3, 2] and prior.dim == net.num_params and card["plan"]["selector"] == "evidence"
    pl = S.Plan.from_dict(card["plan"])
    _, ref = S.apply(pl, teacher, q)
    assert torch.allclose(prior.mean, ref.mean) and (tmp_path / "student" / "prior.pt").exists()
    assert main(args) == 1
    assert "already holds a model" in capsys.readouterr().err
