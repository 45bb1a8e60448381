"""tau by evidence for the attention-free RNN student: the sampled GGN diagonal in ``evidence_temperature`` and the
rnn kind's ``teacher_prior(tau=evidence)`` method through the runner (issue 13)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyro_distill.data.sequences import dates
from pyro_distill.distill import evidence_temperature
from pyro_distill.gaussian import DiagGaussian
from pyro_distill.inference import fit_map
from pyro_distill.nets import MLP, AttentionRNN
from pyro_distill.surgery.rnn import RemoveAttention

D = torch.float64


@pytest.fixture(scope="module")
def case():
    """A tiny dates student (p = 803, 40 sequences) and the conditioned prior of a teacher posterior around a short
    MAP fit."""
    task = dates(n_train=40, n_val=10, n_test=10, seed=1)
    teacher = AttentionRNN(**task.net_kwargs(), emb=4, hidden=5, attn=3)
    p0 = teacher.default_prior(D)
    wm, _ = fit_map(teacher, task.X, task.y, p0, init=teacher.init_weights(torch.Generator().manual_seed(0), D),
                    steps=20, lr=3e-2, seed=0, progress=False)
    q = DiagGaussian(wm, 0.05 * p0.variance.sqrt(), layout=teacher.layout)
    op = RemoveAttention("w")
    student = op.architecture(teacher)
    _, prior = op.apply(teacher, q)
    prior.layout = student.layout
    exact = evidence_temperature(student, prior, task.X, task.y, map_steps=10, structure="diag", curvature="exact")
    return student, prior, task, exact


def test_sampled_curvature_chooses_the_same_tau(case):
    """8 label draws per sequence: the chosen tau within 10% (|log ratio| < 0.1; measured 0.01-0.02 over seeds) and
    the log evidence within 1 nat (of ~ -850) of the exact diagonal's; the draws are seeded."""
    student, prior, task, (tau_e, info_e) = case
    assert info_e["curvature"] == "exact" and info_e["structure"] == "diag" and not info_e["at_bound"]
    for seed in (0, 1):
        tau_s, info_s = evidence_temperature(student, prior, task.X, task.y, map_steps=10, structure="diag",
                                             curvature="sampled", samples=8, seed=seed)
        assert info_s["curvature"] == "sampled"
        assert abs(math.log(tau_s / tau_e)) < 0.1, (tau_s, tau_e)
        assert abs(info_s["log_evidence"] - info_e["log_evidence"]) < 1.0
    again = evidence_temperature(student, prior, task.X, task.y, map_steps=10, structure="diag", curvature="sampled",
                                 samples=8, seed=1)
    assert again[0] == tau_s


def test_auto_samples_for_sequence_models_only(case):
    student, prior, task, _ = case
    # a sequence model on the diagonal path: T x (C - 1) backward passes exact vs 1 sampled -> sampled
    _, info = evidence_temperature(student, prior, task.X[:8], task.y[:8], map_steps=0, structure="diag")
    assert info["curvature"] == "sampled"
    # the dense path stays exact, and refuses a sampled curvature
    _, info = evidence_temperature(student, prior, task.X[:8], task.y[:8], map_steps=0, structure="dense")
    assert info["curvature"] == "exact" and info["structure"] == "dense"
    with pytest.raises(ValueError, match="structure='diag'"):
        evidence_temperature(student, prior, task.X[:8], task.y[:8], structure="dense", curvature="sampled")
    with pytest.raises(ValueError, match="'auto', 'exact' or 'sampled'"):
        evidence_temperature(student, prior, task.X[:8], task.y[:8], curvature="mc")
    # an MLP (closed-form exact diagonal) stays exact on "auto"
    net = MLP([3, 4, 3])
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g, dtype=D), torch.randint(0, 3, (20,), generator=g)
    _, info = evidence_temperature(net, net.default_prior(D), X, y, map_steps=0, structure="diag")
    assert info["curvature"] == "exact"


def test_rnn_kind_runs_teacher_prior_tau_by_evidence(tmp_path):
    """The tiny config through the runner: the method's rows carry the chosen tau (in [1, 1000]), its log evidence
    (>= the one at tau = 1: tau maximizes it), the bound flag and the curvature used (sampled: diagonal path)."""
    from pyro_distill.experiments.core import RunError, run

    toml = tmp_path / "tiny.toml"
    toml.write_text("""
name = "rnn_evidence_tiny"
kind = "rnn"
seeds = 1
workers = 1
tasks = ["dates"]
methods = ["teacher_prior", "teacher_prior(tau=evidence)"]
save_models = false
[data]
n_train = 40
n_val = 10
n_test = 10
[net]
emb = 4
hidden = 5
attn = 3
[teacher]
map_steps = 4
steps = 3
[student]
steps = 4
fractions = [0.5, 1.0]
evidence_map_steps = 5
evidence_structure = "diag"
[eval]
every = 2
samples = 2
""")
    run_dir = run(toml, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    rows = json.loads((run_dir / "metrics.json").read_text())
    ev = [r for r in rows if r["method"] == "teacher_prior(tau=evidence)"]
    assert [r["fraction"] for r in ev] == [0.5, 1.0] and [r["n_train"] for r in ev] == [20, 40]
    for r in ev:
        assert 1.0 <= r["tau_chosen"] <= 1000.0 and r["tau_at_bound"] in (0, 1)
        assert math.isfinite(r["log_evidence"]) and r["log_evidence"] >= r["log_evidence_tau1"] - 1e-6
        assert r["evidence_curvature"] == "sampled" and r["evidence_structure"] == "diag-surrogate"
        assert 0 <= r["exact_match"] <= 1 and r["nll_tok"] > 0
    curves = (run_dir / "curves.csv").read_text()
    for step in (0, 4):
        assert f",teacher_prior(tau=evidence),0,{step},val_nll_tok," in curves
    # the teacher's posterior (sampled and linearized predictive, NLL and ECE per token) beside its own MAP point
    teacher = {r["method"]: r for r in rows if r["method"] in ("teacher", "teacher_map")}
    assert len(teacher) == 2 and {r["setting"] for r in teacher.values()} == {"dates"}
    assert all(0 <= teacher["teacher"][k] <= 1 for k in ("ece_tok", "ece_pred_tok", "ece_lin_tok"))
    assert teacher["teacher_map"]["nll_pred_tok"] == teacher["teacher_map"]["nll_tok"]
    assert "nll_lin_tok" not in teacher["teacher_map"]

    # teacher.cov_init = "laplace": SVI starts from the low-rank GGN Laplace, its curvature from 8 of the 40 sequences
    lap = tmp_path / "laplace.toml"
    text = toml.read_text().replace("steps = 3\n", "steps = 3\ncov_init = \"laplace\"\ncurvature_rows = 8\n"
                                    "start_temperature = 0.01\n", 1)
    lap.write_text(text.replace(', "teacher_prior(tau=evidence)"]', "]"))
    assert 'cov_init = "laplace"' in lap.read_text()
    run_dir = run(lap, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert {r["method"] for r in rows} == {"teacher", "teacher_map", "teacher_prior"}
    log = (run_dir / "seeds" / "seed0" / "log.txt").read_text()
    assert "teacher SVI start: laplace (low-rank GGN Laplace at MAP, curvature from 8 of 40 sequences" in log
    assert "s, covariance x 0.01)" in log
    bad = tmp_path / "bad.toml"
    bad.write_text(lap.read_text().replace('cov_init = "laplace"', 'cov_init = "curvature"'))
    with pytest.raises(RunError, match="teacher.cov_init"):  # refused before any fit
        run(bad, runs_root=tmp_path / "bad_runs", models_root=tmp_path / "models", echo=False)
