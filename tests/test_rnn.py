"""Attention RNN, its attention-removal surgery, the sequence tasks and the rnn experiment kind."""

from __future__ import annotations

import json

import pyro.poutine as poutine
import pytest
import torch

from pyro_distill.data.sequences import BOS, EOS, PAD, dates, digit_sum, exact_match, sequence_task, token_accuracy
from pyro_distill.gaussian import DenseGaussian, LowRankGaussian
from pyro_distill.inference import fit_map, fit_posterior
from pyro_distill.nets import AttentionRNN, net_from_config
from pyro_distill.predictions import predictive
from pyro_distill.surgery import RemoveAttention, SurgeryError, operation_from_dict, remove_attention

D = torch.float64
VARIANTS = ["w", "uv", "all"]


@pytest.fixture(scope="module")
def task():
    return dates(n_train=60, n_val=10, n_test=10, seed=1)


@pytest.fixture(scope="module")
def net(task):
    return AttentionRNN(**task.net_kwargs(), emb=5, hidden=6, attn=4)


def _padded_batch(task, n=12):
    """A batch whose source lengths differ (so padding really occurs)."""
    X = task.X[:n]
    lengths = (task.src(X) != PAD).sum(-1)
    assert lengths.min() < task.src_len and lengths.unique().numel() > 1
    return X


# ----------------------------------------------------------------------------- data
def test_task_generator_is_deterministic_and_splits_are_disjoint():
    a, b = dates(50, 10, 10, seed=3), dates(50, 10, 10, seed=3)
    for k in ("X", "y", "Xval", "yval", "Xte", "yte"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert a.pairs == b.pairs
    c = dates(50, 10, 10, seed=4)
    assert a.pairs["train"] != c.pairs["train"]
    src = [s for part in a.pairs.values() for s, _ in part]
    assert len(set(src)) == len(src)
    s1, s2 = digit_sum(30, 5, 5, seed=0), digit_sum(30, 5, 5, seed=0)
    assert torch.equal(s1.X, s2.X) and torch.equal(s1.y, s2.y)


def test_task_packing_and_vocab_round_trip():
    t = sequence_task("dates", n_train=40, n_val=5, n_test=5, seed=0)
    for i, (src, tgt) in enumerate(t.pairs["train"][:10]):
        assert t.src_vocab.decode(t.X[i, : t.src_len].tolist()) == src
        assert t.tgt_vocab.decode(t.y[i].tolist()) == tgt
        n = len(tgt) + 1
        assert t.y[i, n - 1] == EOS and (t.y[i, n:] == PAD).all()
        tin = t.X[i, t.src_len :]
        assert tin[0] == BOS and torch.equal(tin[1:n], t.y[i, : n - 1])
        assert len(tgt) == 10 and tgt[4] == "-" and tgt[7] == "-"
    s = digit_sum(20, 5, 5)
    for src, tgt in s.pairs["train"]:
        assert int(tgt) == sum(int(c) for c in src)
    with pytest.raises(ValueError, match="unknown sequence task"):
        sequence_task("nope")


def test_metrics_on_hand_made_tokens():
    y = torch.tensor([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
    pred = torch.tensor([[5, 6, EOS, 9], [7, 8, EOS, PAD]])  # first right (junk after EOS ignored)
    assert exact_match(pred, y).item() == 0.5
    assert token_accuracy(pred, y).item() == pytest.approx(4 / 5)


# ----------------------------------------------------------------------------- network
def test_layouts_student_is_teacher_without_attention(net):
    stu = net.replace(uniform_context=True)
    assert [n for n in net.layout.names if not n.startswith("attn.")] == stu.layout.names
    assert {"attn.w", "attn.U", "attn.V"} <= set(net.layout.names)
    assert net_from_config(net.config()).layout == net.layout
    assert net.prior_scales().shape == (net.num_params,)


def test_forward_is_vectorized_over_weight_samples(task, net):
    X = _padded_batch(task, 6)
    W = torch.stack([net.init_weights(torch.Generator().manual_seed(s), D) for s in range(3)])
    out = net(W, X)
    assert out.shape == (3, 6, task.tgt_len, task.tgt_vocab.size)
    for s in range(3):
        assert torch.allclose(out[s], net(W[s], X), atol=1e-12)
    toks = net.decode(W, X)
    assert toks.shape == (3, 6, task.tgt_len)
    assert torch.equal(toks[1], net.decode(W[1], X))
    # the first greedy step sees BOS, like teacher forcing
    assert torch.equal(toks[..., 0], out[..., 0, :].argmax(-1))


def test_padding_does_not_change_outputs(task, net):
    """Extra right padding of the source changes nothing (masked attention, gathered last state)."""
    X = _padded_batch(task, 6)
    w = net.init_weights(torch.Generator().manual_seed(0), D)
    wide = net.replace(src_len=task.src_len + 3)
    src, tin = net.split(X)
    Xw = torch.cat([src, torch.zeros(len(X), 3, dtype=torch.long), tin], 1)
    assert torch.allclose(net(w, X), wide(w, Xw), atol=1e-12)


def test_log_likelihood_ignores_padding_and_model_site(task, net):
    X, y = task.X[:5], task.y[:5]
    w = net.init_weights(torch.Generator().manual_seed(1), D)
    ll = net.log_likelihood(w, X, y)
    lp = torch.log_softmax(net(w, X), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ll, (lp * (y != PAD)).sum(-1), atol=1e-12)
    tr = poutine.trace(poutine.condition(net.model, data={"w": w.expand(2, -1)})).get_trace(X, y)
    site = tr.nodes["y"]
    assert site["fn"].batch_shape == (2, 5) and site["fn"].log_prob(site["value"]).shape == (2, 5)
    with pytest.raises(ValueError, match="labels must be"):
        net.check_data(X, y[:, :-1])
    with pytest.raises(ValueError, match="token ids"):
        net.split(X.double())


# ----------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("variant", VARIANTS)
def test_conditioned_teacher_is_the_student(task, net, variant):
    """With the attention coordinates fixed (any values for the marginalized ones) the teacher's
    attention is exactly 1/T_valid and its outputs equal the student's (float64, padded batch)."""
    op = RemoveAttention(variant)
    stu = op.architecture(net)
    X = _padded_batch(task)
    ws = torch.stack([stu.init_weights(torch.Generator().manual_seed(s), D) for s in range(3)])
    fill = torch.randn(net.num_params, dtype=D, generator=torch.Generator().manual_seed(9)) * 3
    wt = op.embed(net, ws, fill=fill)
    m = (task.src(X) != PAD).to(D)
    uniform = m / m.sum(-1, keepdim=True)
    att = net.attention(wt, X)
    assert torch.equal(att, uniform[None, :, None, :].expand_as(att))
    assert torch.equal(stu.attention(ws, X), att)
    assert torch.allclose(net(wt, X), stu(ws, X), rtol=0, atol=1e-12)
    assert torch.equal(net.decode(wt, X), stu.decode(ws, X))


def test_unconditioned_attention_is_not_uniform(task, net):
    w = net.init_weights(torch.Generator().manual_seed(0), D)
    X = _padded_batch(task)
    att = net.attention(w, X)
    assert torch.allclose(att.sum(-1), torch.ones((), dtype=D))
    pad = (task.src(X) == PAD)[:, None, :].expand_as(att)
    assert (att[pad] == 0).all()
    m = (task.src(X) != PAD).to(D)
    assert (att - (m / m.sum(-1, keepdim=True))[:, None, :]).abs().max() > 1e-3


def _lowrank(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = net.num_params
    return LowRankGaussian(torch.randn(p, dtype=D, generator=g), torch.randn(p, 4, dtype=D, generator=g) * 0.3,
                           torch.rand(p, dtype=D, generator=g) + 0.05, layout=net.layout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_give_valid_gaussians_matching_a_dense_reference(variant):
    net = AttentionRNN(src_vocab=6, tgt_vocab=5, src_len=4, emb=3, hidden=4, attn=3)  # p = 369: dense is cheap
    q = _lowrank(net)
    stu, g = remove_attention(net, variant).apply(net, q)
    assert isinstance(g, LowRankGaussian) and g.dim == stu.num_params and g.layout == stu.layout
    assert stu.layout == net.replace(uniform_context=True).layout
    assert bool((g.cov_diag > 0).all()) and torch.isfinite(g.log_prob(g.loc))
    # dense reference: marginalize the unused blocks, condition the fixed ones on 0
    op = RemoveAttention(variant)
    I, _, M = op.removed(net)
    keep = op.keep(net)
    S = q.covariance()
    cov = S[keep][:, keep] - S[keep][:, I] @ torch.linalg.solve(S[I][:, I], S[I][:, keep])
    mean = q.loc[keep] + S[keep][:, I] @ torch.linalg.solve(S[I][:, I], -q.loc[I])
    assert torch.allclose(g.loc, mean, atol=1e-9)
    assert torch.allclose(g.covariance(), cov, atol=1e-9)
    assert torch.linalg.eigvalsh(g.covariance()).min() > 0
    # a dense posterior stays dense
    _, gd = remove_attention(net, variant).apply(net, DenseGaussian.from_covariance(q.loc, S, layout=net.layout))
    assert gd.kind == "dense" and torch.allclose(gd.covariance(), cov, atol=1e-9)


def test_surgery_errors_and_round_trip(net):
    with pytest.raises(SurgeryError, match="variant"):
        RemoveAttention("v")
    with pytest.raises(SurgeryError, match="uniform_context"):
        RemoveAttention().architecture(net.replace(uniform_context=True))
    op = RemoveAttention("uv")
    assert operation_from_dict(op.to_dict()) == op
    _, g = op.apply(net, _lowrank(net))
    assert g.meta["surgery"] == [{"op": "remove_attention", "variant": "uv"}]


# ----------------------------------------------------------------------------- fitting and the experiment
def test_map_and_lowrank_svi_run_on_token_inputs(task, net):
    w, h = fit_map(net, task.X, task.y, steps=15, lr=1e-2, batch_size=16)
    assert w.dtype == torch.float32 and h.map_loss[-1] < h.map_loss[0]
    q, hist = fit_posterior(net, task.X, task.y, guide="lowrank", steps=5, map_steps=5, batch_size=16,
                            cov_init="prior", rank=3, elbo_eval_particles=2)
    assert q.dim == net.num_params and all(torch.isfinite(torch.tensor(hist.elbo)))
    stu, prior = remove_attention(net, "w").apply(net, q)
    q2, _ = fit_posterior(stu, task.X, task.y, guide="lowrank", prior=prior, init=prior, steps=3, batch_size=16,
                          elbo_eval_particles=2)
    assert q2.dim == stu.num_params


def test_rnn_experiment_tiny_run_with_old_kind_and_method_names(tmp_path):
    from pyro_distill.experiments.core import run

    toml = tmp_path / "tiny.toml"
    toml.write_text("""
name = "rnn_tiny"
kind = "rnn_attention"
seeds = 1
workers = 1
tasks = ["digit_sum"]
methods = ["vi_conditioned_prior", "vi_standard_prior", "teacher_init", "deterministic", "kd",
           "teacher_prior_tempered", "vi_marginal_prior", "deterministic_attention"]
idata_draws = 8
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
temperature = 0.5
prior_variance = 4.0
[student]
steps = 4
[kd]
teacher_samples = 2
[eval]
every = 2
samples = 2
""")
    run_dir = run(toml, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    log = (run_dir / "seeds" / "seed0" / "log.txt").read_text()
    assert "teacher posterior covariance scaled by T = 0.5" in log
    assert "teacher prior: the fan-in prior with its variance x 4" in log  # teacher.prior_variance reaches the fit
    rows = json.loads((run_dir / "metrics.json").read_text())
    methods = [r["method"] for r in rows]
    # the old kind name and old method names (vi_conditioned_prior, ...) run; rows carry the canonical names
    assert methods == ["teacher", "teacher_map", "teacher_prior", "standard_prior", "teacher_init", "deterministic",
                       "kd", "teacher_prior_tempered", "marginal_prior", "deterministic_attention"]
    by = {r["method"]: r for r in rows}
    assert by["deterministic_attention"]["p"] == by["teacher"]["p"] > by["kd"]["p"]
    # the copied mean IS the marginal's mean: both start from the same validation loss
    assert by["marginal_prior"]["val_nll_start"] == pytest.approx(by["teacher_init"]["val_nll_start"], rel=1e-5)
    for r in rows:
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["token_acc"] <= 1 and r["nll_tok"] > 0
    curves = (run_dir / "curves.csv").read_text().splitlines()
    assert any(",kd,0,0,val_nll_tok," in c for c in curves) and any(",kd,0,4,val_nll_tok," in c for c in curves)
    # every saved Gaussian has its ArviZ InferenceData beside it (token ids as data, one log-lik per sequence)
    from pyro_distill.diagnostics import load_idata
    from pyro_distill.plots.experiments import make_run

    (models,) = (tmp_path / "models").iterdir()
    saved = {p.name: p for p in models.iterdir()}
    assert {"digit_sum-teacher-seed0", "digit_sum-teacher_prior-seed0", "digit_sum-standard_prior-seed0"} <= set(saved)
    idata = load_idata(saved["digit_sum-teacher_prior-seed0"])
    C, Dr, n = idata.log_likelihood["y"].shape  # 8 independent draws of q, split into chains for ArviZ
    assert C * Dr == 8 and C > 1 and n == 40
    # lp under the prior each was fitted under: the conditioned teacher's, or the default one
    assert idata.attrs["prior_path"] != "default prior"
    assert load_idata(saved["digit_sum-standard_prior-seed0"]).attrs["prior_path"] == "default prior"
    # `pyro-distill figures` finds the kind's figures through the canonical kind (plots/rnn.py)
    pngs = {p.name: p for p in make_run(run_dir, tmp_path / "fig")}
    png = pngs[f"{run_dir.parent.name}_curves.png"]
    assert png.stat().st_size > 1000
    # seeds split over two invocations draw together; the same seed twice is refused
    from pyro_distill.plots.experiments import merged_rows, merged_summary
    from pyro_distill.plots.rnn import make_figures

    toml1 = tmp_path / "tiny1.toml"
    toml1.write_text(toml.read_text().replace("seeds = 1", "seeds = [1]").replace("idata_draws = 8", "idata_draws = 0"))
    run1 = run(toml1, runs_root=tmp_path / "runs", models_root=tmp_path / "models1", echo=False)
    assert {r["seed"] for r in merged_rows([run_dir, run1], "metrics.csv")} == {0, 1}
    assert "| digit_sum | kd | 2 |" in merged_summary([run_dir, run1]).replace("  ", " ")
    assert make_figures([run_dir, run1], tmp_path / "fig2")[0].stat().st_size > 1000
    with pytest.raises(ValueError, match="both hold seed 0"):
        merged_rows([run_dir, run_dir], "metrics.csv")


# ---------------------------------------------------------------- token-level KD and the sequence metrics
def test_token_kd_equals_a_plain_adam_loop_on_its_loss(task, net):
    """baselines.token_kd = Adam on token_kd_loss - log p(w) / N with torch's seeded minibatches, bit for bit;
    token_kd_loss = the per-token kd_loss times (non-pad tokens / sequences)."""
    from pyro_distill.baselines import kd_loss, token_kd, token_kd_loss

    stu = net.replace(uniform_context=True)
    tp = torch.softmax(net.forward(net.init_weights(torch.Generator().manual_seed(0), D), task.X), -1).detach()
    w0 = stu.init_weights(torch.Generator().manual_seed(1), D)
    logits = stu.forward(w0, task.X[:7])
    m = task.y[:7] != PAD
    expect = kd_loss(logits[m], tp[:7][m], task.y[:7][m], 0.3, 2.0) * int(m.sum()) / 7
    assert torch.equal(token_kd_loss(logits, tp[:7], task.y[:7], PAD, 0.3, 2.0), expect)
    prior, N = stu.default_prior(D), len(task.X)
    torch.manual_seed(2)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(6):
        idx = torch.randint(0, N, (16,))
        opt.zero_grad()
        loss = token_kd_loss(stu.forward(w, task.X[idx]), tp[idx], task.y[idx], PAD, 0.5, 2.0) - prior.log_prob(w) / N
        loss.backward()
        opt.step()
    got, hist = token_kd(stu, task.X, task.y, tp, init=w0, steps=6, lr=1e-2, batch_size=16, seed=2)
    assert torch.equal(got, w.detach()) and len(hist.map_loss) == 6
    with pytest.raises(ValueError, match="teacher_probs must be"):
        token_kd(stu, task.X, task.y, tp[:, :2], init=w0, steps=1)


def test_sequence_metrics_by_hand(task, net):
    from pyro_distill import metrics

    w = net.init_weights(torch.Generator().manual_seed(0), D)
    X, y = task.X[:9], task.y[:9]
    logp = torch.log_softmax(net.forward(w, X), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    m = y != PAD
    assert metrics.sequence_nll(net, w, X, y, chunk=4) == pytest.approx(float(-(logp * m).sum() / m.sum()), rel=1e-12)
    pred = net.decode(w, X)
    res = metrics.evaluate_sequences(net, w, X, y)
    assert res["exact_match"] == float(exact_match(pred, y)) and res["token_acc"] == float(token_accuracy(pred, y))
    assert res["nll_pred_tok"] == res["nll_tok"]  # a point: the predictive is the point's
    # the predictive of a Gaussian: softmax averaged over the same seeded draws as pyro_distill.predictions
    q = _lowrank(net)
    W = q.sample(3, generator=torch.Generator().manual_seed(5))
    P = torch.softmax(net.forward(W, X), -1).mean(0)
    torch.testing.assert_close(metrics.sequence_predictive(net, q, X, num_samples=3, seed=5, chunk=4), P)
    lp = P.log().gather(-1, y.unsqueeze(-1)).squeeze(-1)
    got = metrics.evaluate_sequences(net, q, X, y, num_samples=3, seed=5)["nll_pred_tok"]
    assert got == pytest.approx(float(-(lp * m).sum() / m.sum()), rel=1e-9)
    # token ECE over the non-pad targets: of the point, of the sampled and (asked for) of the linearized predictive
    P0 = torch.softmax(net.forward(q.loc, X), -1)
    full = metrics.evaluate_sequences(net, q, X, y, num_samples=3, seed=5, linearized=True)
    assert full["ece_tok"] == pytest.approx(metrics.ece(P0[m], y[m]), rel=1e-12)
    assert full["ece_pred_tok"] == pytest.approx(metrics.ece(P[m], y[m]), rel=1e-9)
    Pl = predictive(net, q, X, method="linearized", num_samples=3, seed=5)
    assert full["nll_lin_tok"] == pytest.approx(metrics.nll(Pl[m], y[m]), rel=1e-9)
    assert full["ece_lin_tok"] == pytest.approx(metrics.ece(Pl[m], y[m]), rel=1e-9)
    assert "nll_lin_tok" not in metrics.evaluate_sequences(net, q, X, y, num_samples=3, seed=5)  # only when asked
    assert res["ece_pred_tok"] == res["ece_tok"]
