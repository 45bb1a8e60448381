"""fit_posterior and friends: exactness on Bayesian linear regression, the NaN guard, bad inputs, seeds, guides.

Bayesian linear regression ``y = Phi w + eps``, ``eps ~ N(0, s^2)``, prior ``N(0, diag(v))`` has the exact posterior
``Sigma = (Phi^T Phi / s^2 + diag(1/v))^{-1}``, ``m = Sigma Phi^T y / s^2``; an MLP ``[d, 1]`` with the identity
link and a Gaussian likelihood of known noise is exactly that model (``Phi = [X, 1]`` in the layout's order).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pyro_distill.data import synthetic_classification
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, LowRankGaussian
from pyro_distill.inference import (
    DivergenceError,
    FitHistory,
    GaussianGuide,
    elbo_terms,
    fit_map,
    fit_posterior,
    laplace,
    predictive,
)
from pyro_distill.layout import Layout
from pyro_distill.nets import MLP

F64 = torch.float64


@pytest.fixture(scope="module")
def blr():
    """A linear-Gaussian problem with its exact posterior (m, Sigma)."""
    g = torch.Generator().manual_seed(0)
    d, N, s = 3, 40, 0.5
    net = MLP([d, 1], activation="identity", likelihood="gaussian", noise_scale=s)
    X = torch.randn(N, d, generator=g, dtype=F64)
    w_true = torch.randn(net.num_params, generator=g, dtype=F64)
    y = net.forward(w_true, X).squeeze(-1) + s * torch.randn(N, generator=g, dtype=F64)
    prior = net.default_prior(F64)
    Phi = torch.cat([X, torch.ones(N, 1, dtype=F64)], 1)  # layout: layer1.weight (1 x d), then layer1.bias
    Lam = Phi.T @ Phi / s**2 + torch.diag(1 / prior.variance)
    Sigma = torch.cholesky_inverse(torch.linalg.cholesky(Lam))
    m = Sigma @ Phi.T @ y / s**2
    return net, X, y, prior, m, Sigma


@pytest.fixture(scope="module")
def cls_data():
    ds = synthetic_classification(n_train=120, n_test=10, n_features=4, n_classes=3, seed=0, dtype=F64)
    return MLP([4, 6, 3]), ds.X, ds.y


def exact_kl(q, m, Sigma) -> float:
    return float(q.kl(DenseGaussian.from_covariance(m, Sigma)))


# ------------------------------------------------------------------------------------------------ exactness
def test_laplace_is_exact_for_linear_gaussian(blr) -> None:
    """The GGN is the exact Hessian of a linear-Gaussian model: the Laplace approximation is the posterior."""
    net, X, y, prior, m, Sigma = blr
    q = laplace(net, X, m, prior)
    assert isinstance(q, DenseGaussian) and q.layout == net.layout
    torch.testing.assert_close(q.loc, m, rtol=0, atol=0)
    torch.testing.assert_close(q.covariance(), Sigma, rtol=1e-10, atol=1e-12)
    # the covariance does not depend on where it is taken, and the diagonal variant is the precision's diagonal
    torch.testing.assert_close(laplace(net, X, torch.zeros_like(m), prior).covariance(), Sigma, rtol=1e-10, atol=1e-12)
    qd = laplace(net, X, m, prior, kind="diag")
    torch.testing.assert_close(qd.variance, 1 / torch.linalg.inv(Sigma).diagonal(), rtol=1e-10, atol=0)


def test_map_then_laplace_start_is_exact(blr) -> None:
    """fit_posterior with steps=0: MAP by Adam then Laplace, i.e. the SVI start, is already the posterior."""
    net, X, y, prior, m, Sigma = blr
    q, hist = fit_posterior(net, X, y, guide="mvn", steps=0, map_steps=3000, map_lr=1e-2, seed=0)
    sd = Sigma.diagonal().sqrt()
    assert float(((q.loc - m) / sd).abs().max()) < 1e-3
    torch.testing.assert_close(q.covariance(), Sigma, rtol=1e-10, atol=1e-12)
    assert len(hist.map_loss) == 3000 and hist.elbo == []
    # start_temperature scales the start's covariance (the mean stays the MAP point)
    qt, _ = fit_posterior(net, X, y, guide="mvn", steps=0, map_steps=3000, map_lr=1e-2, seed=0, start_temperature=0.25)
    torch.testing.assert_close(qt.loc, q.loc, rtol=0, atol=0)
    torch.testing.assert_close(qt.covariance(), 0.25 * Sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="start_temperature must be a finite number > 0"):
        fit_posterior(net, X, y, steps=0, map_steps=1, start_temperature=0.0)


def test_dense_svi_recovers_exact_posterior(blr) -> None:
    """Dense-guide SVI from a wrong start (mean 0, covariance 0.09 I) converges to (m, Sigma).

    Tolerance (stated): every mean coordinate within 0.05 posterior sd, every covariance entry within
    0.05 sd_i sd_j, KL(q || exact) < 0.01 nats. Recipe: 500 steps at lr 0.02, then 600 at lr 0.002 with the
    iterates of the last 300 averaged (Polyak), 64 particles, float64.
    """
    net, X, y, prior, m, Sigma = blr
    start = DenseGaussian(torch.zeros(net.num_params, dtype=F64), 0.3 * torch.eye(net.num_params, dtype=F64))
    assert exact_kl(start, m, Sigma) > 10
    q1, h1 = fit_posterior(net, X, y, guide="mvn", init=start, steps=500, lr=0.02, factor_lr=0.02,
                           num_particles=64, seed=0)
    locs, covs = [], []

    def collect(step: int, g) -> None:
        if step > 300:
            locs.append(g.loc.clone())
            covs.append(g.covariance())

    q2, h2 = fit_posterior(net, X, y, guide="mvn", init=q1, steps=600, lr=0.002, factor_lr=0.002,
                           num_particles=64, seed=1, callback=collect, eval_every=1)
    assert len(locs) == 300
    loc, cov = torch.stack(locs).mean(0), torch.stack(covs).mean(0)
    sd = Sigma.diagonal().sqrt()
    assert float(((loc - m) / sd).abs().max()) < 0.05
    assert float(((cov - Sigma) / (sd[:, None] * sd[None])).abs().max()) < 0.05
    assert exact_kl(DenseGaussian.from_covariance(loc, cov), m, Sigma) < 0.01
    # the fitted factor stays lower triangular and the ELBO went up from the start
    assert torch.equal(q2.scale_tril, torch.tril(q2.scale_tril))
    assert h1.elbo_end > h1.elbo_start and len(h1.elbo) == 500 and len(h1.time_s) == 500
    assert q2.layout == net.layout and q2.meta["guide"] == "dense"  # "mvn" is read as its canonical name


def test_fast_dense_step_matches_autograd(blr) -> None:
    """The hand-written backward of the dense draw + KL equals autograd through rsample and Gaussian.kl."""
    net, X, y, prior, m, Sigma = blr
    L0 = torch.linalg.cholesky(Sigma) * 1.3
    grads = []
    for fast in (True, False):
        loc = m.clone().requires_grad_(True)
        L = L0.clone().requires_grad_(True)
        q = DenseGaussian(loc, L)
        torch.manual_seed(3)
        if fast:
            ll, kl = elbo_terms(net, q, prior, X, y, num_particles=5)
        else:
            w = q.rsample(5)
            ll, kl = elbo_terms(net, q, prior, X, y, num_particles=5, w=w)
        (ll - kl).backward()
        grads.append((float(ll), float(kl), loc.grad, L.grad.tril()))
    (ll1, kl1, gl1, gL1), (ll2, kl2, gl2, gL2) = grads
    assert ll1 == pytest.approx(ll2, rel=1e-12) and kl1 == pytest.approx(kl2, rel=1e-12)
    torch.testing.assert_close(gl1, gl2)
    torch.testing.assert_close(gL1, gL2)


def test_elbo_terms_minibatch_scaling(blr) -> None:
    net, X, y, prior, m, Sigma = blr
    q = DenseGaussian(m, torch.linalg.cholesky(Sigma))
    w = q.sample(4)
    ll_full, _ = elbo_terms(net, q, prior, X, y, num_particles=4, w=w)
    torch.testing.assert_close(ll_full, net.log_likelihood(w, X, y).sum(-1).mean())
    # the average of the minibatch estimate over many subsamples is the full-data value
    torch.manual_seed(0)
    est = torch.stack([elbo_terms(net, q, prior, X, y, num_particles=4, subsample_size=10, w=w)[0]
                       for _ in range(400)])
    assert abs(float(est.mean() - ll_full)) < 4 * float(est.std()) / 20


# ------------------------------------------------------------------------------------------------ NaN guard
class InfAfter(MLP):
    """An MLP whose forward returns inf from its ``n``-th call on (a deliberately divergent net)."""

    def __init__(self, *a, n: int, **kw):
        super().__init__(*a, **kw)
        self.n, self.calls = n, 0

    def forward(self, w, x):
        self.calls += 1
        out = super().forward(w, x)
        return out * float("inf") if self.calls >= self.n else out


@pytest.mark.parametrize("guide", ["mvn", "lowrank", "diag"])
def test_nan_guard_stops_with_step_and_last_good_state(blr, guide: str) -> None:
    net, X, y, prior, m, Sigma = blr
    k = 7
    start = DenseGaussian(m.clone(), torch.linalg.cholesky(Sigma))
    bad = InfAfter([3, 1], activation="identity", likelihood="gaussian", noise_scale=0.5, n=k + 2)  # 1 ELBO eval first
    with pytest.raises(DivergenceError, match=f"diverged at step {k}.*lower lr") as info:
        fit_posterior(bad, X, y, guide=guide, init=start, steps=50, lr=0.01, num_particles=4, seed=0)
    err = info.value
    assert err.step == k and isinstance(err.history, FitHistory) and len(err.history.elbo) == k
    # the last good state is exactly what k clean steps give with the same seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 7 steps from the exact posterior may lower the ELBO estimate a little
        ok, _ = fit_posterior(net, X, y, guide=guide, init=start, steps=k, lr=0.01, num_particles=4, seed=0)
    assert type(err.last_good) is type(ok)
    for name, t in ok._tensors().items():
        torch.testing.assert_close(err.last_good._tensors()[name], t, rtol=0, atol=0)
        assert torch.isfinite(t).all()


def _absurd_lr_run(net, X, y) -> DivergenceError:
    with pytest.raises(DivergenceError, match="SVI diverged at step") as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_posterior(net, X.float(), y, guide="diag", steps=2000, lr=1e30, factor_lr=1e30, map_steps=0,
                      cov_init="prior", num_particles=2, seed=0)
    return info.value


def test_nan_guard_on_absurd_step_size(cls_data) -> None:
    """A huge learning rate in float32 blows the parameters up until the ELBO is not finite: a clean stop."""
    err = _absurd_lr_run(*cls_data)
    assert 0 < err.step < 2000 and len(err.history.elbo) == err.step
    assert all(map(lambda v: v == v and abs(v) < float("inf"), err.history.elbo))


def test_nan_guard_last_good_state_is_finite_after_absurd_step(cls_data) -> None:
    """Even when an Adam step leaves non-finite parameters, the state handed back is a finite snapshot."""
    err = _absurd_lr_run(*cls_data)
    assert all(torch.isfinite(t).all() for t in err.last_good._tensors().values())
    assert 0 <= err.last_good.meta["step"] <= err.step


def test_map_divergence() -> None:
    bad = InfAfter([3, 2], n=1)
    X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(DivergenceError, match="MAP diverged at step 0") as info:
        fit_map(bad, X, y, steps=5)
    assert info.value.step == 0 and torch.isfinite(info.value.last_good).all()


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs(cls_data) -> None:
    net, X, y = cls_data
    kw = dict(steps=1, map_steps=1)
    with pytest.raises(ValueError, match="unknown guide 'full'.*choose one of"):
        fit_posterior(net, X, y, guide="full", **kw)
    with pytest.raises(ValueError, match="labels must lie in 0..2.*relabel"):
        fit_posterior(net, X, y + 1, **kw)
    with pytest.raises(ValueError, match="must be integers"):
        fit_posterior(net, X, y.double(), **kw)
    with pytest.raises(ValueError, match="rows but y has"):
        fit_posterior(net, X, y[:-1], **kw)
    with pytest.raises(ValueError, match="features but the MLP expects 4"):
        fit_posterior(net, X[:, :3], y, **kw)
    wrong = MLP([4, 5, 3]).default_prior(F64)
    with pytest.raises(ValueError, match="another architecture"):
        fit_posterior(net, X, y, prior=wrong, **kw)
    with pytest.raises(ValueError, match="unknown init"):
        fit_posterior(net, X, y, init="laplace", **kw)
    with pytest.raises(ValueError, match="init weights have shape"):
        fit_posterior(net, X, y, init=torch.zeros(net.num_params + 1, dtype=F64), **kw)
    with pytest.raises(ValueError, match="the Gaussian has 3 coordinates but .* are needed"):
        fit_posterior(net, X, y, init=DiagGaussian(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)), **kw)
    with pytest.raises(ValueError, match="unknown cov_init"):
        fit_posterior(net, X, y, cov_init="identity", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            fit_posterior(net, X, y, device="cuda", **kw)
    with pytest.raises(ValueError, match="unknown guide"):
        GaussianGuide(DiagGaussian(torch.zeros(3), torch.ones(3)), "full")


def test_prior_with_another_layout_is_refused(cls_data) -> None:
    """Same number of coordinates, other block names: the prior belongs to another architecture."""
    net, X, y = cls_data
    prior = DiagGaussian(torch.zeros(net.num_params, dtype=F64), torch.ones(net.num_params, dtype=F64),
                         layout=Layout([("w", (net.num_params,))]))
    with pytest.raises(ValueError, match="layout .* differs"):
        fit_posterior(net, X, y, prior=prior, steps=1, map_steps=1)


# ------------------------------------------------------------------------------------------------ seeds, guides
def test_seeds_make_runs_repeatable(cls_data) -> None:
    net, X, y = cls_data
    kw = dict(guide="mvn", steps=20, map_steps=30, num_particles=2)
    a, ha = fit_posterior(net, X, y, seed=3, **kw)
    b, hb = fit_posterior(net, X, y, seed=3, **kw)
    c, _ = fit_posterior(net, X, y, seed=4, **kw)
    torch.testing.assert_close(a.loc, b.loc, rtol=0, atol=0)
    torch.testing.assert_close(a.scale_tril, b.scale_tril, rtol=0, atol=0)
    assert ha.elbo == hb.elbo
    assert not torch.equal(a.loc, c.loc)


@pytest.mark.parametrize("guide,cls", [("lowrank", LowRankGaussian), ("diag", DiagGaussian), ("mvn", DenseGaussian)])
def test_guides_run_and_improve_the_elbo(cls_data, guide: str, cls: type) -> None:
    """From a shrunk-prior start at a short MAP, SVI raises the (64-draw, fixed-seed) full-data ELBO."""
    net, X, y = cls_data
    q, h = fit_posterior(net, X, y, guide=guide, steps=150, lr=0.02, factor_lr=0.02, map_steps=100,
                         cov_init="prior", num_particles=4, rank=3, seed=0)
    assert isinstance(q, cls) and q.layout == net.layout and q.dtype == F64
    assert h.elbo_end > h.elbo_start + 1.0, (h.elbo_start, h.elbo_end)
    assert all(map(lambda v: v == v, h.elbo))  # no NaN
    if guide == "lowrank":
        assert q.rank == 3
    probs = predictive(net, q, X, num_samples=20)
    assert probs.shape == (X.shape[0], 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(X.shape[0], dtype=F64))
    assert float((probs.argmax(-1) == y).double().mean()) > 0.5


def test_float32_dtype_option(cls_data) -> None:
    net, X, y = cls_data
    q, _ = fit_posterior(net, X, y, guide="diag", steps=3, map_steps=3, dtype=torch.float32)
    assert q.dtype == torch.float32


# ----------------------------------------------------------------------------------------- one name per structure
def test_mvn_is_an_alias_of_dense_everywhere(cls_data) -> None:
    """Configs and old runs say "mvn": fit_posterior, the guides, laplace and the whitening rule read it as "dense"
    and give exactly the same results (same draws in the same order)."""
    from pyro_distill.gaussian import STRUCTURES, structure_name
    from pyro_distill.inference import GUIDES, guide_name
    from pyro_distill.whitened import WhitenedGuide, resolve_whiten

    net, X, y = cls_data
    assert GUIDES == tuple(STRUCTURES) and "mvn" not in GUIDES and guide_name("mvn") == "dense"
    assert structure_name("dense") == "dense"
    kw = dict(steps=5, map_steps=5, num_particles=2, seed=0, progress=False, elbo_eval_particles=4)
    a, ha = fit_posterior(net, X, y, guide="mvn", **kw)
    b, hb = fit_posterior(net, X, y, guide="dense", **kw)
    assert isinstance(a, DenseGaussian) and torch.equal(a.loc, b.loc) and torch.equal(a.scale_tril, b.scale_tril)
    assert ha.elbo == hb.elbo and ha.info["guide"] == "dense" and a.meta["guide"] == "dense"
    w = b.loc
    la, lb = laplace(net, X, w, net.default_prior(F64), kind="mvn"), laplace(net, X, w, net.default_prior(F64))
    assert torch.equal(la.scale_tril, lb.scale_tril)
    assert GaussianGuide(b, "mvn").kind == GaussianGuide(b).kind == "dense"
    prior = DenseGaussian(torch.zeros(net.num_params, dtype=F64), torch.eye(net.num_params, dtype=F64))
    assert resolve_whiten("auto", "mvn", prior) == resolve_whiten("auto", "dense", prior) is True
    assert WhitenedGuide(b, prior, "mvn").kind == "dense"
    with pytest.raises(ValueError, match=r"unknown guide 'full'; choose one of \('dense'"):
        fit_posterior(net, X, y, guide="full", **kw)
    with pytest.raises(ValueError, match="unknown Laplace structure 'full'"):
        laplace(net, X, w, net.default_prior(F64), kind="full")


def test_each_structure_owns_its_guide_parameters(cls_data) -> None:
    """GaussianGuide holds what the structure's guide_params give and hands back the start (float64 round trip:
    exp(log) is exact to 1 ulp); a start of another structure is converted (low rank: the one random start)."""
    from pyro_distill.gaussian import (
        KronGaussian,
        LowRankPrecisionGaussian,
        StructureError,
        kron_index,
        structure,
    )

    net, _, _ = cls_data
    p, g = net.num_params, torch.Generator().manual_seed(0)
    loc = torch.randn(p, generator=g, dtype=F64)
    A = torch.randn(p, p, generator=g, dtype=F64)
    dense = DenseGaussian.from_covariance(loc, A @ A.T / p + torch.eye(p, dtype=F64))
    blocks = [(kron_index(net.layout, "layer1.weight", "layer1.bias"), torch.eye(6, dtype=F64) * 0.5,
               torch.eye(5, dtype=F64) * 0.3)]
    starts = {"dense": dense, "diag": DiagGaussian(loc, dense.variance.sqrt()),
              "lowrank": LowRankGaussian(loc, torch.randn(p, 2, generator=g, dtype=F64), dense.variance),
              "lowrank_precision": LowRankPrecisionGaussian(loc, torch.randn(p, 2, generator=g, dtype=F64),
                                                            1 / dense.variance),
              "kron": KronGaussian.from_blocks(loc, blocks, remainder_scale=0.2)}
    for kind, start in starts.items():
        guide = GaussianGuide(start, rank=2)
        assert guide.kind == kind and guide.structure is structure(kind) is type(start)
        back = guide.gaussian()
        assert type(back) is type(start)
        for name, t in start._tensors().items():
            torch.testing.assert_close(back._tensors()[name], t, rtol=1e-15, atol=0, msg=f"{kind}.{name}")
    # conversions from a dense start: diagonal and dense keep the variances, low rank adds a small random factor
    for kind in ("diag", "lowrank", "lowrank_precision"):
        q = GaussianGuide(dense, kind, rank=3, seed=1).gaussian()
        assert q.kind == kind and torch.equal(q.loc, dense.loc)
        if kind == "lowrank":  # 0.99 v + 0.01 v chi2_3 / 3 per coordinate
            assert bool((q.variance >= 0.99 * dense.variance * (1 - 1e-12)).all())
            torch.testing.assert_close(q.variance, dense.variance, rtol=0.2, atol=0)
        else:
            torch.testing.assert_close(q.variance, dense.variance, rtol=1e-12, atol=0)
    lr1, lr2 = (GaussianGuide(dense, "lowrank", rank=3, seed=1).gaussian() for _ in range(2))
    assert lr1.rank == 3 and torch.equal(lr1.cov_factor, lr2.cov_factor)  # seeded: the same start every time
    with pytest.raises(StructureError, match="guide 'kron' needs a KronGaussian start, got a dense"):
        GaussianGuide(dense, "kron")


def test_configs_that_say_mvn_still_fit(cls_data, tmp_path) -> None:
    """An experiment TOML (or an old run's config.json) with guide = "mvn" loads and fits the dense guide."""
    from pyro_distill.experiments.core import load_config

    net, X, y = cls_data
    p = tmp_path / "old.toml"
    p.write_text('name = "old"\nkind = "mlp"\n[students]\ns = [4, 3]\n'
                 '[teacher]\nguide = "mvn"\n[student]\nguide = "dense"\n')
    cfg = load_config(p)
    assert cfg["teacher"]["guide"] == "mvn" and cfg["student"]["guide"] == "dense"
    kw = dict(steps=2, map_steps=2, num_particles=2, seed=0, progress=False, elbo_eval_particles=4)
    a, _ = fit_posterior(net, X, y, guide=cfg["teacher"]["guide"], **kw)
    b, _ = fit_posterior(net, X, y, guide=cfg["student"]["guide"], **kw)
    assert isinstance(a, DenseGaussian) and torch.equal(a.scale_tril, b.scale_tril)


def test_laplace_kind_starts_a_dense_guide_from_kfac() -> None:
    """``laplace_kind="kron"``: the dense guide starts at the KFAC Laplace converted exactly (to_dense), and a
    structure without a conversion is refused naming the fix."""
    from pyro_distill.inference import fit_posterior, laplace

    ds = synthetic_classification(n_train=80, n_test=10, n_features=5, n_classes=3, seed=0, dtype=torch.float64)
    net = MLP([5, 6, 3])
    q, hist = fit_posterior(net, ds.X, ds.y, guide="dense", laplace_kind="kron", map_steps=30, steps=0, seed=0,
                            progress=False)
    w, _ = fit_map(net, ds.X, ds.y, net.default_prior(torch.float64), steps=30, seed=0)
    ref = laplace(net, ds.X, w, net.default_prior(torch.float64), kind="kron", y=ds.y).to_dense()
    assert isinstance(q, DenseGaussian)
    torch.testing.assert_close(q.loc, ref.loc, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.covariance_matrix, ref.covariance_matrix, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="laplace_kind=None"):
        fit_posterior(net, ds.X, ds.y, guide="lowrank_precision", laplace_kind="kron", map_steps=5, steps=0, seed=0,
                      progress=False)
