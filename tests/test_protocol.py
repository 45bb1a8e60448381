"""The experiment protocol (pyro_distill.experiments.protocol): the cell grid, and cells that compute the same rows
whatever ran before them, in this process or another (each fit, subsample and evaluation reseeds), so the runner may
schedule them in any order, in parallel, or retry them."""

import pickle

import pytest
import torch

from pyro_distill.experiments.core import SeedContext, load_config
from pyro_distill.experiments.mlp import PROTOCOL
from pyro_distill.experiments.protocol import (
    METHODS,
    NEEDS_TEACHER_POSTERIOR,
    Cell,
    fit_method,
    method_label,
    plan_cells,
)

TOML = """
name = "proto"
kind = "mlp"
seeds = 1
[data]
name = "synthetic_classification"
n_train = 60
n_test = 40
n_features = 4
n_classes = 3
[teacher]
sizes = [4, 6, 6, 3]
map_steps = 30
steps = 2
num_particles = 2
[students]
both = [4, 3, 3]
wide = [4, 5, 3]
[student]
map_steps = 8
steps = 2
num_particles = 2
[distill]
taus = [1.0, 10.0, "evidence"]
fractions = [0.5, 1.0]
student_fractions = { wide = [0.5], both = [1.0] }
methods = ["teacher_prior", "reduced_posterior", "divided_prior", "standard_prior", "standard_prior_cond_init",
           "deterministic", "kd", "prune_finetune"]
baseline_students = ["both"]
[eval]
samples = 6
curve_every = 4
curve_samples = 3
curve_fractions = [0.5]
[save]
methods = []
idata_draws = 0
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "proto.toml"
    p.write_text(TOML)
    return load_config(p)


def test_vocabulary_and_labels():
    assert METHODS == ("teacher_prior", "reduced_posterior", "standard_prior", "standard_prior_cond_init",
                       "deterministic", "kd", "prune_finetune", "divided_prior")
    assert method_label("teacher_prior", 1.0) == "teacher_prior(tau=1)"
    assert method_label("teacher_prior", "evidence") == "teacher_prior(tau=evidence)"
    assert method_label("kd") == "kd"


def test_cells_follow_the_grid_in_row_order(cfg):
    cells = plan_cells(cfg, seed=3, regression=False)
    assert [c.index for c in cells] == list(range(1, len(cells) + 1)) and {c.seed for c in cells} == {3}
    both = [c for c in cells if c.student == "both"]
    wide = [c for c in cells if c.student == "wide"]
    # both: fraction 1 x (3 taus + 2 ours + 5 baselines); wide (no baselines): fraction 0.5 x (3 taus + 2 ours)
    assert len(both) == 10 and len(wide) == 5 and cells[:10] == both
    assert [c.name for c in both[:4]] == ["both frac=1 teacher_prior(tau=1)", "both frac=1 teacher_prior(tau=10)",
                                          "both frac=1 teacher_prior(tau=evidence)", "both frac=1 reduced_posterior"]
    assert [c.curves for c in cells] == [c.fraction == 0.5 for c in cells]
    assert "kd" not in {c.method for c in plan_cells(cfg, 0, regression=True)}
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from"):
        fit_method("nope", None, None, None, None, None, None, cfg, 0, None, 0, None)


def _ctx(tmp_path, name, seed=0):
    return SeedContext(seed, {"name": "proto"}, tmp_path / name / "runs", tmp_path / name / "models", echo=False)


def test_cells_are_independent_of_what_ran_before_and_of_the_process(cfg, tmp_path):
    """The seed run sequentially (teacher, then every cell in order: the old run_seed) and the same cells run in
    reverse order after a teacher result that went through pickle (as to a worker process), each cell given only its
    own student (and the teacher posterior only when its method reads it): every row and curve is equal exactly
    (float32, no tolerance), time_s aside."""
    seq = _ctx(tmp_path, "seq")
    PROTOCOL.run_seed(cfg, 0, seq)
    units = _ctx(tmp_path, "units")
    tr, cells = PROTOCOL.teacher(cfg, 0, units)
    assert len(cells) == 15 and set(tr.students) == {"both", "wide"}
    torch.manual_seed(12345)  # a different global RNG state before the cells: they must not depend on it
    for c in reversed(cells):
        part = pickle.loads(pickle.dumps(tr.part(c)))
        assert set(part.students) == {c.student}
        assert (part.posterior is None) == (c.method not in NEEDS_TEACHER_POSTERIOR)  # the others never read it
        PROTOCOL.cell(cfg, c, part, units)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    by_method = {(r["setting"], r["method"]): r for r in strip(units.rows)}
    assert strip(seq.rows) == [by_method[(r["setting"], r["method"])] for r in strip(seq.rows)]
    assert len(seq.rows) == 2 + 15 and [r["method"] for r in seq.rows[:2]] == ["teacher", "teacher_map"]
    # the teacher's MAP point is evaluated on the same split: the check of the posterior against its own start
    assert seq.rows[1]["setting"] == "teacher" and 0.0 <= seq.rows[1]["accuracy"] <= 1.0 and seq.rows[1]["nll"] > 0
    key = lambda c: (c["setting"], c["method"], c["step"], c["metric"])  # noqa: E731
    assert sorted(seq.curves, key=key) == sorted(units.curves, key=key) and len(seq.curves) > 0
    assert Cell(0, 1, "both", 0.25, "kd").setting == "both frac=0.25"


def test_teacher_temperature_and_map_schedule(tmp_path):
    """``teacher.temperature`` scales the fitted posterior's covariance by T (the students' prior and every teacher
    row see the scaled one; the MAP point is untouched), ``teacher.map_schedule`` reaches the MAP phase; bad values
    are refused with the key's name before anything is fitted."""
    from pyro_distill.experiments.mlp import MLPFamily

    base = TOML.replace("steps = 2\nnum_particles = 2\n[students]", "steps = 2\nnum_particles = 2\n"
                        "map_schedule = \"cosine\"\n[students]", 1)
    assert base != TOML
    out = {}
    for T in (1.0, 0.25):
        p = tmp_path / f"t{T}.toml"
        p.write_text(base.replace("[students]", f"temperature = {T}\n[students]", 1))
        c = load_config(p)
        ctx = _ctx(tmp_path, f"t{T}")
        tr, _ = PROTOCOL.teacher(c, 0, ctx)
        out[T] = (tr.posterior, ctx.rows)
    q1, q2 = out[1.0][0], out[0.25][0]
    torch.testing.assert_close(q2.mean, q1.mean)
    torch.testing.assert_close(q2.variance, 0.25 * q1.variance)
    assert out[1.0][1][1] == out[0.25][1][1] | {"time_s": out[1.0][1][1]["time_s"]}  # the same MAP point row
    for key, bad, msg in (("temperature", "0.0", "teacher.temperature must be a number > 0"),
                          ("map_schedule", '"linear"', "teacher.map_schedule must be one of")):
        p = tmp_path / f"bad_{key}.toml"
        p.write_text(TOML.replace("[students]", f"{key} = {bad}\n[students]", 1))
        with pytest.raises(ValueError, match=msg):
            MLPFamily().check(load_config(p))


def test_teacher_prior_variance_reaches_map_and_laplace(tmp_path):
    """``teacher.prior_variance`` fits the teacher (MAP and its Laplace) under the fan-in prior with its variance
    scaled: with no SVI steps the posterior mean is the MAP of ``fit_map`` under that prior, and its covariance is
    the Laplace under it; the default (1) is the fan-in prior; a bad value is refused with the key's name."""
    from pyro_distill.experiments.mlp import MLPFamily
    from pyro_distill.inference import fit_map, laplace

    base = TOML.replace("steps = 2\nnum_particles = 2\n[students]", "steps = 0\nnum_particles = 2\n[students]", 1)
    out = {}
    for pv in (1.0, 10.0):
        p = tmp_path / f"pv{pv}.toml"
        p.write_text(base.replace("[students]", f"prior_variance = {pv}\n[students]", 1))
        c = load_config(p)
        tr, _ = PROTOCOL.teacher(c, 0, _ctx(tmp_path, f"pv{pv}"))
        ds, _ = PROTOCOL.dataset(c)
        prior = tr.teacher.default_prior(ds.X.dtype).tempered(pv)
        w, _ = fit_map(tr.teacher, ds.X, ds.y, prior, steps=30, lr=1e-2, seed=0)
        torch.testing.assert_close(tr.posterior.mean, w)
        lap = laplace(tr.teacher, ds.X, w, prior, kind="dense")
        torch.testing.assert_close(tr.posterior.variance, lap.variance, rtol=1e-4, atol=1e-6)
        out[pv] = tr.posterior
    assert float(out[10.0].mean.norm()) > float(out[1.0].mean.norm())  # a weaker prior: larger weights
    p = tmp_path / "bad_pv.toml"
    p.write_text(TOML.replace("[students]", "prior_variance = -1\n[students]", 1))
    with pytest.raises(ValueError, match="teacher.prior_variance must be a number > 0"):
        MLPFamily().check(load_config(p))
