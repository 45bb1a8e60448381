"""PointMass: a point estimate as a member of the Gaussian family (zero covariance, conditioning = indexing, no
density), and where point estimates flow: fit callbacks, predictives, metrics, surgery, save/load, ArviZ."""

from __future__ import annotations

import pytest
import torch

from pyro_distill import metrics
from pyro_distill.data import synthetic_classification
from pyro_distill.gaussian import DiagGaussian, PointMass, as_gaussian, load
from pyro_distill.inference import fit_map, fit_posterior
from pyro_distill.nets import MLP
from pyro_distill.predictions import is_point, predictive

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    ds = synthetic_classification(n_train=60, n_test=30, n_features=4, n_classes=3, seed=0, dtype=F64)
    net = MLP([4, 5, 3])
    w = net.init_weights(torch.Generator().manual_seed(0), F64)
    return net, ds, w


def test_moments_draws_and_no_randomness(problem) -> None:
    net, _, w = problem
    pm = PointMass(w, layout=net.layout)
    p = net.num_params
    assert pm.kind == "point" and pm.dim == p and torch.equal(pm.mean, w) and torch.equal(pm.mode, w)
    assert torch.equal(pm.variance, torch.zeros(p, dtype=F64)) and torch.equal(pm.stddev, torch.zeros(p, dtype=F64))
    assert torch.equal(pm.covariance(), torch.zeros(p, p, dtype=F64))
    state, gen = torch.get_rng_state(), torch.Generator().manual_seed(3)
    gstate = gen.get_state()
    for shape, want in ((5, (5, p)), ((2, 3), (2, 3, p)), ((), (p,))):
        s = pm.sample(shape, generator=gen)
        assert s.shape == want and torch.equal(s, w.expand(want))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(gen.get_state(), gstate)  # nothing drawn
    loc = w.clone().requires_grad_(True)
    PointMass(loc).rsample(4).sum().backward()
    assert torch.equal(loc.grad, torch.full_like(w, 4.0))
    assert pm.tempered(10.0).mean is pm.mean and pm.tempered(10.0).layout == net.layout


def test_no_density_raises_clearly(problem) -> None:
    _, _, w = problem
    pm, g = PointMass(w), DiagGaussian(w, torch.ones_like(w))
    for call in (lambda: pm.log_prob(w), pm.entropy, pm.precision, lambda: pm.kl(g), lambda: g.kl(pm),
                 lambda: torch.distributions.kl_divergence(pm, g), lambda: pm.mahalanobis(w)):
        with pytest.raises(TypeError, match="PointMass has no .*point estimate is not a density"):
            call()
    with pytest.raises(ValueError, match="loc holds 1 NaN/inf"):
        PointMass(torch.tensor([0.0, float("nan")]))


def test_conditioning_is_indexing_and_closed(problem) -> None:
    net, _, w = problem
    pm = PointMass(w, layout=net.layout)
    I, J = torch.tensor([7, 2, 11]), torch.tensor([0, 30])
    K = torch.tensor([i for i in range(net.num_params) if i not in (7, 2, 11)])
    c = pm.condition(I, torch.tensor([1.0, 2.0, 3.0]))
    assert isinstance(c, PointMass) and torch.equal(c.loc, w[K])
    # twice = once on the union (the second index is in the remaining coordinates' numbering)
    twice = c.condition(J, 0.0)
    u = torch.cat([I, K[J]])
    once = pm.condition(u, 0.0)
    assert torch.equal(twice.loc, once.loc)
    m = pm.marginalize(torch.tensor([5, 1]))
    assert isinstance(m, PointMass) and torch.equal(m.loc, w[[5, 1]])


def test_save_load_and_pyro_round_trip(problem, tmp_path) -> None:
    net, _, w = problem
    pm = PointMass(w, layout=net.layout, meta={"source": "map", "steps": 3})
    path = pm.save(tmp_path / "point.pt")
    back = load(path, layout=net.layout)
    assert isinstance(back, PointMass) and torch.equal(back.loc, w) and back.layout == net.layout
    assert back.meta == {"source": "map", "steps": 3}
    d = pm.to_pyro()
    assert type(d).__name__ == "Delta" and torch.equal(d.sample(), w)
    again = as_gaussian(d)
    assert isinstance(again, PointMass) and torch.equal(again.loc, w)
    assert isinstance(pm.to(dtype=torch.float32), PointMass) and pm.to(dtype=torch.float32).dtype == torch.float32


def test_predictive_and_metrics_are_the_networks_own(problem) -> None:
    net, ds, w = problem
    pm = PointMass(w, layout=net.layout)
    assert is_point(pm) and not is_point(DiagGaussian(w, torch.full_like(w, 1e-30)))  # no variance threshold
    probs = predictive(net, pm, ds.Xte, num_samples=7)
    assert torch.equal(probs, torch.softmax(net.forward(w.reshape(1, -1), ds.Xte), -1).sum(0))
    assert torch.equal(probs, predictive(net, w, ds.Xte))
    res = metrics.evaluate(net, pm, ds.Xte, ds.yte, num_samples=7)
    assert res == metrics.evaluate(net, w, ds.Xte, ds.yte, num_samples=7)
    assert not any(k.endswith("_lin") for k in res)  # no linearized predictive of a point


def test_point_fits_hand_callbacks_a_pointmass(problem) -> None:
    net, ds, _ = problem
    seen = []

    def cb(step, q):
        seen.append((step, q))
        return {"acc": metrics.evaluate(net, q, ds.Xte, ds.yte)["accuracy"]}

    w, h = fit_map(net, ds.X, ds.y, steps=6, seed=0, callback=cb, eval_every=3, progress=False)
    assert [s for s, _ in seen] == [3, 6] and all(isinstance(q, PointMass) for _, q in seen)
    assert torch.equal(seen[-1][1].mean, w) and len(h.curves["acc"]) == 2
    seen.clear()
    q, h = fit_posterior(net, ds.X, ds.y, guide="diag", steps=4, map_steps=4, seed=0, callback=cb, eval_every=2,
                         progress=False, elbo_eval_particles=4)
    kinds = [type(g).__name__ for _, g in seen]
    assert kinds == ["PointMass", "PointMass", "DiagGaussian", "DiagGaussian"]
    # a PointMass start is a start for MAP, exactly as its weights
    kw = dict(guide="diag", steps=2, map_steps=3, seed=0, progress=False, elbo_eval_particles=4)
    a, _ = fit_posterior(net, ds.X, ds.y, init=PointMass(w), **kw)
    b, _ = fit_posterior(net, ds.X, ds.y, init=w, **kw)
    assert torch.equal(a.loc, b.loc) and torch.equal(a.scale, b.scale)


def test_pruning_conditions_the_point_by_indexing() -> None:
    """prune_weights keeps the teacher's values of the kept coordinates exactly (a PointMass conditioned)."""
    from pyro_distill import surgery
    from pyro_distill.baselines import prune_weights

    teacher = MLP([4, 6, 6, 3])
    w = teacher.init_weights(torch.Generator().manual_seed(1), F64)
    student = MLP([4, 3, 3])
    ws, ops = prune_weights(teacher, w, student)
    net, g = surgery.apply(ops, teacher, DiagGaussian(w, torch.ones_like(w)))  # diagonal: conditioning = dropping
    assert net.config() == student.config() and torch.equal(ws, g.mean)


def test_inference_data_of_a_point(problem) -> None:
    from pyro_distill.diagnostics import to_inference_data

    net, ds, w = problem
    idata = to_inference_data(net, PointMass(w, layout=net.layout), ds.X, ds.y, draws=8, chains=2)
    flat = torch.cat([torch.as_tensor(idata.posterior[b.name].values).reshape(2, 8, -1) for b in net.layout], -1)
    assert torch.equal(flat, w.expand(2, 8, -1)) and "log_q" not in idata.sample_stats
    assert idata.attrs["gaussian_kind"] == "point"


def test_sequence_metrics_of_a_point_are_the_point_metrics() -> None:
    from pyro_distill.data.sequences import dates
    from pyro_distill.nets import AttentionRNN

    task = dates(n_train=20, n_val=5, n_test=10, seed=1)
    net = AttentionRNN(**task.net_kwargs(), emb=5, hidden=6, attn=4)
    w = net.init_weights(torch.Generator().manual_seed(0), F64)
    a = metrics.evaluate_sequences(net, PointMass(w, layout=net.layout), task.Xte, task.yte, num_samples=4)
    assert a == metrics.evaluate_sequences(net, w, task.Xte, task.yte, num_samples=4)
    assert a["nll_pred_tok"] == a["nll_tok"]
