"""Bayesian model reduction (``reduced_posterior``) and the temperature chosen by evidence (``tau="evidence"``).

Reference model: Bayesian linear regression with known noise, ``MLP([d, 1], likelihood="gaussian")`` (linear in
its weights: the layout is the weight row, then the bias), where posteriors and evidences are exact in float64.
"""

import math

import pytest
import torch
from scipy.optimize import minimize_scalar

from pyro_distill import surgery
from pyro_distill.distill import (
    distill,
    evidence_temperature,
    model_reduction,
    reduced_posterior,
    savage_dickey,
    student_prior,
)
from pyro_distill.evidence import log_evidence, quadratic_model
from pyro_distill.gaussian import DenseGaussian, DiagGaussian
from pyro_distill.nets import MLP

D = torch.float64
S_NOISE = 0.6
N, DIM = 40, 6


@pytest.fixture(scope="module")
def blr():
    g = torch.Generator().manual_seed(0)
    net = MLP([DIM, 1], likelihood="gaussian", noise_scale=S_NOISE)
    X = torch.randn(N, DIM, generator=g, dtype=D)
    w_true = torch.randn(net.num_params, generator=g, dtype=D)
    y = net.forward(w_true, X).squeeze(-1) + S_NOISE * torch.randn(N, generator=g, dtype=D)
    Phi = torch.cat([X, torch.ones(N, 1, dtype=D)], 1)
    return net, X, y, Phi


def _posterior(Phi: torch.Tensor, y: torch.Tensor, prior: DiagGaussian) -> DenseGaussian:
    """Exact posterior of y = Phi w + noise, w ~ prior (independent)."""
    P0 = torch.diag(1 / prior.variance)
    P = Phi.T @ Phi / S_NOISE**2 + P0
    cov = torch.linalg.inv(P)
    return DenseGaussian.from_covariance(cov @ (Phi.T @ y / S_NOISE**2 + P0 @ prior.loc), 0.5 * (cov + cov.T))


def _log_evidence(Phi: torch.Tensor, y: torch.Tensor, prior) -> float:
    cov = S_NOISE**2 * torch.eye(len(y), dtype=D) + Phi @ prior.covariance() @ Phi.T
    return float(torch.distributions.MultivariateNormal(Phi @ prior.loc, cov).log_prob(y))


def _prior(p: int, seed: int = 1) -> DiagGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagGaussian(0.3 * torch.randn(p, generator=g, dtype=D), 0.5 + torch.rand(p, generator=g, dtype=D))


@pytest.mark.parametrize("value", [0.0, 0.4])
def test_conditioned_posterior_is_the_reduced_regression_posterior(blr, value) -> None:
    net, X, y, Phi = blr
    p0 = _prior(net.num_params)
    q = _posterior(Phi, y, p0)
    I = torch.tensor([1, 4])  # two input columns fixed to `value` (0: removed)
    K = torch.tensor([i for i in range(net.num_params) if i not in (1, 4)])
    reduced = q.condition(I, value)
    # the reduced regression: columns I moved into the offset (value * Phi_I), prior restricted to K
    y_red = y - Phi[:, I] @ torch.full((2,), value, dtype=D)
    ref = _posterior(Phi[:, K], y_red, p0.marginalize(K))
    torch.testing.assert_close(reduced.loc, ref.loc, atol=1e-10, rtol=0)
    torch.testing.assert_close(reduced.covariance(), ref.covariance(), atol=1e-10, rtol=0)
    # Savage-Dickey: the log evidence change equals the exact difference of the two models' log evidences
    delta = float(savage_dickey(q, p0, I, value))
    exact = _log_evidence(Phi[:, K], y_red, p0.marginalize(K)) - _log_evidence(Phi, y, p0)
    assert delta == pytest.approx(exact, abs=1e-8)


def test_model_reduction_of_a_plan_sums_the_per_operation_ratios() -> None:
    """A two-operation plan (layer removal + neuron removal) on a dense posterior: the summed per-operation
    Savage-Dickey ratios equal the joint ratio over every removed coordinate, and the conditioned posterior
    equals conditioning on them all at once."""
    torch.manual_seed(0)
    teacher, student = MLP([5, 6, 6, 3]), MLP([5, 4, 3])
    p = teacher.num_params
    A = torch.randn(p, p, dtype=D) / p**0.5
    q = DenseGaussian.from_covariance(0.3 * torch.randn(p, dtype=D), A @ A.T * 0.05 + 0.02 * torch.eye(p, dtype=D),
                                      layout=teacher.layout)
    ops = surgery.plan(teacher, student, selector="snr", posterior=q)
    net, reduced, delta = model_reduction(ops, teacher, q)
    assert net.config() == student.config()
    # the same removal as one set of coordinates fixed in the teacher's space
    probe = torch.arange(student.num_params, dtype=D) + 1.0
    w_teacher = surgery.embed(ops, teacher, probe)
    # fixed coordinates: those whose embedded value does not depend on the student's weights
    mask = surgery.embed(ops, teacher, probe * 2.0) != w_teacher
    I = (~mask).nonzero().reshape(-1)
    v = w_teacher[I]
    joint = float(savage_dickey(q, teacher.default_prior(D), I, v))
    assert delta == pytest.approx(joint, abs=1e-8)
    at_once = q.condition(I, v)
    order = w_teacher[mask].argsort()  # student coordinate k sits where the embedded value is k + 1
    torch.testing.assert_close(reduced.loc, at_once.loc[order], atol=1e-10, rtol=0)
    torch.testing.assert_close(reduced.covariance(), at_once.covariance()[order][:, order], atol=1e-10, rtol=0)


def test_reduced_posterior_starts_at_the_conditioned_gaussian_under_the_students_own_prior() -> None:
    g = torch.Generator().manual_seed(3)
    teacher, student = MLP([4, 6, 3]), MLP([4, 3, 3])
    X = torch.randn(30, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (30,), generator=g)
    q = DiagGaussian(0.3 * torch.randn(teacher.num_params, generator=g, dtype=D),
                     torch.full((teacher.num_params,), 0.1, dtype=D), layout=teacher.layout)
    q = DenseGaussian.from_covariance(q.loc, q.covariance(), layout=teacher.layout)
    res = reduced_posterior(teacher, q, student, X, y, selector="magnitude", steps=0, num_particles=1)
    _, cond, delta = model_reduction(res.plan, teacher, q)
    torch.testing.assert_close(res.posterior.loc, cond.loc)
    torch.testing.assert_close(res.posterior.covariance(), cond.covariance())
    ref = student.default_prior(D)
    torch.testing.assert_close(res.prior.variance, ref.variance)
    assert res.info["log_evidence_change"] == pytest.approx(delta) and math.isfinite(delta)
    moved = reduced_posterior(teacher, q, student, X, y, selector="magnitude", steps=5, num_particles=1, lr=1e-2)
    assert not torch.equal(moved.posterior.loc, cond.loc)


@pytest.mark.parametrize("bounds", [(1e-2, 1e3), (1.0, 1e3)])
def test_evidence_tau_is_the_analytic_maximizer_for_a_conjugate_model(blr, bounds) -> None:
    net, X, y, Phi = blr
    p = net.num_params
    g = torch.Generator().manual_seed(5)
    A = torch.randn(p, p, generator=g, dtype=D) / p**0.5
    teacher_q = DenseGaussian.from_covariance(torch.randn(p, generator=g, dtype=D),
                                              0.02 * (A @ A.T + 0.3 * torch.eye(p, dtype=D)), layout=net.layout)
    # the same network: an empty plan, prior = the given dense Gaussian N(mu, S); the prior is tempered N(mu, tau S)
    _, prior, _ = student_prior(net, teacher_q, net, ops=[], tau="evidence", X=X, y=y,
                                evidence={"bounds": bounds, "map_steps": 0})

    def neg(lt: float) -> float:
        return -_log_evidence(Phi, y, teacher_q.tempered(math.exp(lt)))

    ref = minimize_scalar(neg, bounds=tuple(math.log(b) for b in bounds), method="bounded", options={"xatol": 1e-10})
    tau = prior.meta["tau"]
    assert prior.meta["tau_rule"] == "evidence"
    assert math.log(tau) == pytest.approx(ref.x, abs=1e-5)
    assert prior.meta["log_evidence"] == pytest.approx(-ref.fun, abs=1e-8)
    torch.testing.assert_close(prior.covariance(), tau * teacher_q.covariance(), atol=1e-12, rtol=1e-10)
    if bounds[0] == 1.0:
        assert prior.meta["log_evidence"] >= prior.meta["log_evidence_tau1"] - 1e-12


def test_evidence_tau_at_a_map_point_and_through_distill(blr) -> None:
    """The expansion point does not matter for a linear model (MAP by Adam vs the prior mean); distill records
    the chosen tau."""
    net, X, y, _ = blr
    p = net.num_params
    teacher_q = DenseGaussian.from_covariance(torch.zeros(p, dtype=D), 0.01 * torch.eye(p, dtype=D),
                                              layout=net.layout)
    t0, i0 = evidence_temperature(net, teacher_q, X, y, map_steps=0)
    t1, i1 = evidence_temperature(net, teacher_q, X, y, map_steps=200)
    assert i0["structure"] == "dense" and not i0["at_bound"]
    assert t1 == pytest.approx(t0, rel=1e-5)
    # the diagonal-GGN path scores MacKay's form: its tau maximizes evidence.log_evidence(mode="laplace")
    td, idd = evidence_temperature(net, teacher_q, X, y, map_steps=0, structure="diag", bounds=(1e-2, 1e3))
    quad = quadratic_model(net, teacher_q.loc, X, y, "diag")
    diag_q = DiagGaussian(teacher_q.loc, teacher_q.variance.sqrt())
    ref = minimize_scalar(lambda lt: -float(log_evidence(quad, diag_q.tempered(math.exp(lt)), mode="laplace")),
                          bounds=(math.log(1e-2), math.log(1e3)), method="bounded", options={"xatol": 1e-10})
    assert idd["structure"] == "diag-surrogate" and idd["mode"] == "laplace"
    assert math.log(td) == pytest.approx(ref.x, abs=1e-5)
    assert idd["log_evidence"] == pytest.approx(-ref.fun, abs=1e-8)
    res = distill(net, teacher_q, net, X, y, ops=[], tau="evidence", steps=2, map_steps=5, num_particles=1)
    assert res.info["tau_rule"] == "evidence" and res.info["tau"] == pytest.approx(t0, rel=1e-5)
    with pytest.raises(ValueError, match="pass X and y"):
        student_prior(net, teacher_q, net, ops=[], tau="evidence")
    with pytest.raises(ValueError, match="'evidence'"):
        student_prior(net, teacher_q, net, ops=[], tau=0.5)


def test_mlp_runner_records_evidence_tau_and_reduction_on_a_validation_split(tmp_path) -> None:
    """The runner: tau = "evidence" and reduced_posterior per seed, metrics on a held-out validation part of the
    training split (data.validation), the test split untouched."""
    from pyro_distill.experiments import run
    from pyro_distill.experiments.core import read_rows

    toml = tmp_path / "tiny.toml"
    toml.write_text("""
name = "tiny"
kind = "mlp"
seeds = 1
workers = 1
[data]
name = "synthetic_classification"
n_train = 100
n_test = 60
n_features = 4
n_classes = 3
validation = 0.2
[teacher]
sizes = [4, 6, 6, 3]
map_steps = 60
steps = 3
[students]
both = [4, 3, 3]
[student]
map_steps = 15
steps = 3
[distill]
taus = [1.0, "evidence"]
fractions = [1.0]
methods = ["teacher_prior", "reduced_posterior", "divided_prior", "deterministic"]
[eval]
samples = 10
curve_every = 0
[save]
methods = []
""")
    d = run(toml, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    rows = {r["method"]: r for r in read_rows(d / "metrics.csv")}
    assert set(rows) == {"teacher", "teacher_map", "teacher_prior(tau=1)", "teacher_prior(tau=evidence)",
                         "reduced_posterior", "divided_prior", "deterministic"}
    assert all(r["eval_split"] == "validation" for r in rows.values())
    assert rows["teacher"]["n_train"] == 80  # 20 of the 100 training rows held out (stratified, rounded per class)
    ev = rows["teacher_prior(tau=evidence)"]
    assert ev["tau"] == "evidence" and 1 <= ev["tau_chosen"] <= 1e3 and ev["log_evidence"] >= ev["log_evidence_tau1"]
    assert rows["teacher_prior(tau=1)"]["tau_chosen"] == 1
    assert math.isfinite(rows["reduced_posterior"]["log_evidence_change"])
    assert rows["divided_prior"]["clipped_eigenvalues"] >= 0 and math.isfinite(rows["divided_prior"]["nll"])


def test_divided_prior_recovers_the_prior_of_a_conjugate_posterior(blr) -> None:
    """Dividing the data's likelihood out of the exact posterior gives back the prior (mean and covariance);
    dividing out data the posterior never saw (twice the data) clips the precision and stays positive definite."""
    from pyro_distill.distill import divided_prior

    net, X, y, Phi = blr
    p = net.num_params
    g = torch.Generator().manual_seed(7)
    A = torch.randn(p, p, generator=g, dtype=D) / p**0.5
    p0 = DenseGaussian.from_covariance(torch.randn(p, generator=g, dtype=D), A @ A.T + 0.5 * torch.eye(p, dtype=D))
    P0 = p0.precision()
    P = Phi.T @ Phi / S_NOISE**2 + P0
    cov = torch.linalg.inv(P)
    q = DenseGaussian.from_covariance(cov @ (Phi.T @ y / S_NOISE**2 + P0 @ p0.loc), 0.5 * (cov + cov.T),
                                      layout=net.layout)
    out, info = divided_prior(net, q, X, y, floor=1e-12)
    assert info["clipped"] == 0
    torch.testing.assert_close(out.loc, p0.loc, atol=1e-8, rtol=0)
    torch.testing.assert_close(out.covariance(), p0.covariance(), atol=1e-8, rtol=0)
    X2, y2 = torch.cat([X, X, X]), torch.cat([y, y, y])
    over, info2 = divided_prior(net, q, X2, y2)
    assert info2["clipped"] > 0 and bool((torch.linalg.eigvalsh(over.precision()) >= info2["floor"] * 0.999).all())
