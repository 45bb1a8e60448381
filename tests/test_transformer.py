"""Transformer surgery: removing a head, an attention sublayer, an FFN or a block by conditioning is exact."""

import pytest
import torch

from pyro_distill.data.token_tasks import digits_sequences, match_task
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, LowRankGaussian
from pyro_distill.nets import Transformer, net_from_config
from pyro_distill.surgery import (
    Plan,
    RemoveAttentionSublayer,
    RemoveBlock,
    RemoveFFN,
    RemoveHead,
    SurgeryError,
    apply,
    plan_transformer,
)

D = torch.float64


def _teacher(embedding="patch", pooling="mean", heads=(3, 2), ffn=(True, True)):
    return Transformer(input_dim=5 if embedding == "patch" else 6, n_classes=3, max_len=7, d_model=6,
                       heads=list(heads), ffn=list(ffn), d_head=2, d_ff=5, embedding=embedding, pooling=pooling)


def _inputs(net, N=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = net.max_len
    if net.embedding == "patch":
        x = torch.randn(N, T, net.input_dim, generator=g, dtype=D)
        x[0, 4:] = float("nan")
        x[1, 2:] = float("nan")
    else:
        x = torch.randint(0, net.input_dim, (N, T), generator=g).to(D)
        x[0, 4:] = -1
        x[1, 1:] = -1
    return x


def _dense(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = net.num_params
    A = torch.randn(p, p, generator=g, dtype=D) / p**0.5
    cov = A @ A.T + 0.05 * torch.eye(p, dtype=D)
    return DenseGaussian.from_covariance(torch.randn(p, generator=g, dtype=D), cov, layout=net.layout)


def _lowrank(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = net.num_params
    return LowRankGaussian(torch.randn(p, generator=g, dtype=D), 0.3 * torch.randn(p, 4, generator=g, dtype=D),
                           0.1 + torch.rand(p, generator=g, dtype=D), layout=net.layout)


OPS = [RemoveHead(0, 1), RemoveHead(1, 0), RemoveAttentionSublayer(0), RemoveAttentionSublayer(1), RemoveFFN(0),
       RemoveFFN(1), RemoveBlock(0), RemoveBlock(1)]


@pytest.mark.parametrize("embedding,pooling", [("patch", "mean"), ("token", "cls")])
@pytest.mark.parametrize("op", OPS, ids=repr)
def test_removal_is_exact(op, embedding, pooling):
    """Teacher with the conditioned coordinates fixed (the rest drawn from the conditioned Gaussian,
    marginalized ones arbitrary) computes exactly the student's function, padding included."""
    teacher = _teacher(embedding, pooling)
    q = _dense(teacher)
    student, prior = op.apply(teacher, q)
    assert student.layout == prior.layout and prior.dim == student.num_params
    assert student.config() == op.architecture(teacher).config()
    w_s = prior.sample(5, generator=torch.Generator().manual_seed(1))
    fill = torch.randn(teacher.num_params, dtype=D) * 3
    w_t = op.embed(teacher, w_s, fill=fill)
    x = _inputs(teacher)
    out_t, out_s = teacher(w_t, x), student(w_s, x)
    assert torch.isfinite(out_s).all()
    torch.testing.assert_close(out_t, out_s, rtol=1e-10, atol=1e-10)
    # the removal really changes the function when the coordinates are not fixed
    w_t2 = w_t.clone()
    I, _ = op.fixed(teacher)
    w_t2[..., I] = torch.randn(I.numel(), dtype=D)
    assert not torch.allclose(teacher(w_t2, x), out_s)


def test_marginalized_blocks_vanish_and_heads_are_renumbered():
    teacher = _teacher()
    q = DiagGaussian(torch.randn(teacher.num_params, dtype=D), torch.rand(teacher.num_params, dtype=D) + 0.1,
                     layout=teacher.layout)
    student, prior = RemoveHead(0, 1).apply(teacher, q)
    assert student.heads == [2, 2]
    names = student.layout.names
    assert "block0.attn.head2.q" not in names and "block0.attn.head1.q" in names
    # diagonal: conditioning = dropping coordinates, so the student's head 1 is the teacher's head 2
    for m in "qkvo":
        torch.testing.assert_close(prior.loc[student.layout.slice(f"block0.attn.head1.{m}")],
                                   q.loc[teacher.layout.slice(f"block0.attn.head2.{m}")])
    s2, _ = RemoveAttentionSublayer(1).apply(teacher, q)
    assert not any(n.startswith("block1.ln1") or n.startswith("block1.attn") for n in s2.layout.names)
    s3, _ = RemoveFFN(0).apply(teacher, q)
    assert not any(n.startswith("block0.ln2") or n.startswith("block0.ffn") for n in s3.layout.names)
    s4, p4 = RemoveBlock(0).apply(teacher, q)
    assert s4.heads == [2] and not any(n.startswith("block1") for n in s4.layout.names)
    torch.testing.assert_close(p4.loc[s4.layout.slice("block0.ffn.w1")], q.loc[teacher.layout.slice("block1.ffn.w1")])


@pytest.mark.parametrize("make", [_dense, _lowrank])
def test_composition_equals_joint_condition(make):
    teacher = _teacher()
    q = make(teacher)
    ops = [RemoveHead(0, 0), RemoveFFN(1), RemoveAttentionSublayer(1), RemoveHead(0, 1)]
    student, seq = apply(ops, teacher, q)
    assert type(seq) is type(q)
    # the same coordinates in the teacher's space, conditioned and marginalized at once
    net, pos = teacher, torch.arange(teacher.num_params)
    fixed, marg = [], []
    for op in ops:
        I, _, M = op.removed(net)
        fixed.append(pos[I])
        marg.append(pos[M])
        pos = pos[op.keep(net)]
        net = op.architecture(net)
    I_all, M_all = torch.cat(fixed).sort().values, torch.cat(marg)
    joint = q.condition(I_all, torch.zeros(I_all.numel(), dtype=D))
    rest = teacher.layout.complement(I_all)
    keep = (~torch.isin(rest, M_all)).nonzero().reshape(-1)
    joint = joint.marginalize(keep)
    assert torch.equal(rest[keep], pos)
    torch.testing.assert_close(seq.loc, joint.loc, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(seq.variance, joint.variance, rtol=1e-8, atol=1e-10)
    if make is _dense:
        torch.testing.assert_close(seq.covariance(), joint.covariance(), rtol=1e-8, atol=1e-10)
    assert student.heads == [1, 0] and student.ffn == [True, False]


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_kfac_laplace_posterior_stays_kronecker_under_surgery(op):
    """The KFAC Laplace of a transformer is a KronGaussian over its linear maps (embedding, per-head Q/K/V/O, FFN,
    classifier; the rest diagonal). Every removal conditions or marginalizes whole blocks, so the student's prior
    stays Kronecker, its blocks are the student's own, and it equals surgery on the dense form (float64)."""
    from pyro_distill.gaussian import KronGaussian
    from pyro_distill.inference import kron_laplace

    teacher = _teacher()
    x = _inputs(teacher)
    w = teacher.init_weights(torch.Generator().manual_seed(0), dtype=D)
    q = kron_laplace(teacher, x, w, teacher.default_prior(D))
    assert isinstance(q, KronGaussian) and q.num_blocks == len(teacher.kron_index()) == 1 + (3 + 2) * 4 + 2 * 2 + 1
    student, prior = op.apply(teacher, q)
    _, dense = op.apply(teacher, q.to_dense())
    assert isinstance(prior, KronGaussian)
    assert sorted(i.shape for i in prior.index) == sorted(i.shape for i in student.kron_index())
    torch.testing.assert_close(prior.mean, dense.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(prior.covariance(), dense.covariance(), rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    teacher = _teacher(heads=(2, 1))
    q = _dense(teacher)
    s1, q1 = RemoveHead(0, 0).apply(teacher, q)
    with pytest.raises(SurgeryError, match="last head.*remove_attention_sublayer"):
        RemoveHead(0, 0).apply(s1, q1)
    with pytest.raises(SurgeryError, match="block 5 is out of range"):
        RemoveBlock(5).apply(teacher, q)
    with pytest.raises(SurgeryError, match="heads 0..1"):
        RemoveHead(0, 2).check(teacher)
    s2, q2 = RemoveFFN(0).apply(teacher, q)
    with pytest.raises(SurgeryError, match="no FFN"):
        RemoveFFN(0).apply(s2, q2)
    s3, _ = RemoveAttentionSublayer(1).apply(teacher, q)
    with pytest.raises(SurgeryError, match="no attention"):
        RemoveAttentionSublayer(1).check(s3)
    with pytest.raises(SurgeryError, match="another architecture"):
        RemoveHead(0, 0).apply(teacher, q1)
    with pytest.raises(SurgeryError, match="at least as many heads"):
        plan_transformer(teacher, teacher.replace(heads=[3, 1]), selector="first")
    with pytest.raises(ValueError, match="n_blocks"):
        Transformer(5, 3, 7, d_model=6, heads=2)
    with pytest.raises(ValueError, match="PAD"):
        teacher(q.loc, torch.full((2, 3), 7.0)) if teacher.embedding == "token" else _teacher("token")(
            _teacher("token").default_prior(D).loc, torch.full((2, 3), 7.0))


def test_plan_reaches_the_student_and_evidence_picks_the_dead_head():
    teacher = _teacher(heads=(3, 2))
    p = teacher.num_params
    loc = torch.full((p,), 2.0, dtype=D)
    sd = torch.full((p,), 0.05, dtype=D)
    dead = teacher.layout.indices("block0.attn.head2.o")
    loc[dead] = 0.0
    blk1 = torch.cat([teacher.layout.indices(n) for n in ("block1.attn.head0.o", "block1.attn.head1.o",
                                                           "block1.attn.o_bias", "block1.ffn.w2", "block1.ffn.b2")])
    loc[blk1] = 0.0
    q = DiagGaussian(loc, sd, layout=teacher.layout)
    student = teacher.replace(heads=[2], ffn=[True])
    plan = plan_transformer(teacher, student, selector="evidence", posterior=q)
    assert plan[0] == RemoveBlock(1) and RemoveHead(0, 2) in plan
    s, prior = apply(plan, teacher, q)
    assert s.config() == student.config() and prior.layout == student.layout
    again = Plan.from_dict(plan.to_dict())
    assert list(again) == list(plan)
    # other structures: fewer heads, a block without attention, a block without FFN
    for target in ([1, 2], [0, 2], [3, 0]):
        st = teacher.replace(heads=target)
        s, _ = apply(plan_transformer(teacher, st, selector="snr", posterior=q), teacher, q)
        assert s.config() == st.config()
    st = teacher.replace(ffn=[False, True])
    assert plan_transformer(teacher, st, selector="last") == [RemoveFFN(0)]
    assert net_from_config(student.config()).config() == student.config()


def test_forward_batched_and_padding_invariant():
    net = _teacher()
    w = net.default_prior(D).sample(3, generator=torch.Generator().manual_seed(0))
    x = _inputs(net)
    out = net(w, x)
    assert out.shape == (3, 9, 3)
    torch.testing.assert_close(out[1], net(w[1], x))
    # what sits under padding does not matter
    x2 = x.clone()
    x2[0, 4:] = 0.0
    x2 = torch.where(torch.isnan(x), x, x2)
    torch.testing.assert_close(net(w, x2), out)
    short = net(w, x[:1, :4])
    torch.testing.assert_close(short, out[:, :1])


def test_tasks_are_deterministic_and_padded():
    a, b = match_task(n_train=40, n_test=20, seed=3), match_task(n_train=40, n_test=20, seed=3)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    assert (a.X == -1).any() and a.X.shape == (40, 12) and 15 <= int(a.y.sum()) <= 25
    marked = (a.X >= 4).sum(1)
    assert (marked == 2).all()
    d = digits_sequences(seed=0, pad_fraction=0.3)
    assert d.X.shape[1:] == (8, 8) and torch.isnan(d.X).any() and d.num_classes == 10
    assert not torch.isnan(d.X[:, :5]).any()


def test_fit_posterior_and_experiment_config():
    from pyro_distill.experiments.core import load_config
    from pyro_distill.inference import fit_posterior
    from pyro_distill.surgery.transformer import teacher_block_map

    net = _teacher(heads=(2, 1))
    x = _inputs(net, N=12).float()
    y = torch.arange(12) % 3
    q, _ = fit_posterior(net, x, y, guide="lowrank", rank=2, steps=3, map_steps=3, cov_init="prior",
                         num_particles=2, elbo_eval_particles=2)
    assert q.layout == net.layout and torch.isfinite(q.loc).all()
    qk, _ = fit_posterior(net, x, y, guide="kron", steps=3, map_steps=3, num_particles=2, elbo_eval_particles=2)
    assert qk.kind == "kron" and qk.num_blocks == len(net.kron_index()) and torch.isfinite(qk.loc).all()
    cfg = load_config("experiments/transformer.toml", quick=True)
    assert cfg["kind"] == "transformer" and set(cfg["students"]) == {"fewer_heads", "one_block", "no_attn_b1"}
    teacher = _teacher(heads=(3, 2, 2), ffn=(True, True, True))
    plan = plan_transformer(teacher, teacher.replace(heads=[2], ffn=[True]), selector="first")
    assert teacher_block_map(plan) == [2] and list(plan) == [RemoveBlock(1), RemoveBlock(0)]


# ---------------------------------------------------------------- TinyBERT-style KD and the transformer kind
def test_tinybert_loss_by_hand_and_its_loop_is_a_plain_adam_loop():
    """tinybert_loss = CE + beta_h * sum of masked hidden MSEs + beta_a * sum of masked head-averaged attention
    MSEs (written out here for one batch); tinybert = Adam on it + the fan-in prior, minibatches from the seeded
    generator that drew the start, bit for bit."""
    from pyro_distill.baselines import tinybert, tinybert_loss, tinybert_targets

    teacher = _teacher(heads=(2, 2))
    student = teacher.replace(heads=[1], ffn=[True])
    x = _inputs(teacher, N=10)
    y = torch.arange(10) % 3
    tgt = tinybert_targets(teacher, teacher.init_weights(torch.Generator().manual_seed(0), D), x)
    ws = student.init_weights(torch.Generator().manual_seed(1), D)
    f = student.features(ws, x)
    m = f["mask"].to(D)
    expect = torch.nn.functional.cross_entropy(f["logits"], y)
    for s, t in [(0, 0), (1, 2)]:  # the student's block 0 came from teacher block 1
        expect = expect + 0.7 * (((f["hidden"][s] - tgt["hidden"][t]) ** 2).mean(-1) * m).sum() / m.sum()
    a2 = (f["attn"][0].mean(-3) - tgt["attn"][1]) ** 2
    expect = expect + 0.3 * (a2 * m[:, :, None] * m[:, None, :]).sum() / m.sum()
    torch.testing.assert_close(tinybert_loss(f, tgt, y, [1], 0.7, 0.3), expect, rtol=1e-12, atol=0)

    gen = torch.Generator().manual_seed(4)
    w = student.init_weights(gen, D).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    prior = student.default_prior(D)
    for _ in range(4):
        idx = torch.randint(0, 10, (4,), generator=gen)
        sub = {k: [None if v is None else v[idx] for v in tgt[k]] for k in ("hidden", "attn")}
        opt.zero_grad()
        loss = tinybert_loss(student.features(w, x[idx]), sub, y[idx], [1]) - prior.log_prob(w) / 10
        loss.backward()
        opt.step()
    got, hist = tinybert(student, x, y, tgt, [1], steps=4, lr=1e-2, batch_size=4, seed=4)
    assert torch.equal(got, w.detach()) and len(hist.map_loss) == 4


TINY_TOML = """
name = "tf_tiny"
kind = "transformer"
seeds = 1
workers = 1
methods = ["vi_conditioned", "deterministic", "tinybert", "vi_standard"]
eval_samples = 4
curve_points = 2
num_particles = 1
batch_size = 32
[net]
d_model = 4
heads = [1, 1]
ffn = [true, true]
d_head = 4
d_ff = 4
[students]
one_block = { heads = [1] }
[teacher]
map_steps = 3
steps = 2
temperature = 0.5
prior_variance = 4.0
[student]
map_steps = 2
steps = 2
"""


def test_transformer_kind_reads_old_method_names_and_draws_its_figures(tmp_path):
    from pyro_distill.experiments.core import run
    from pyro_distill.plots.experiments import make_run
    from pyro_distill.plots.transformer import summary_table

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML)
    bad = tmp_path / "bad.toml"
    bad.write_text(toml.read_text().replace("temperature = 0.5", "temperature = -1"))
    from pyro_distill.experiments.core import RunError

    with pytest.raises(RunError, match="teacher.temperature must be a number > 0"):  # refused before any fit
        run(bad, runs_root=tmp_path / "bad_runs", models_root=tmp_path / "bad_models", echo=False)
    run_dir = run(toml, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    # the teacher's covariance scaled by teacher.temperature before its rows and the students' priors
    log = (run_dir / "seeds" / "seed0" / "log.txt").read_text()
    assert "teacher posterior covariance scaled by T = 0.5" in log
    assert "teacher prior: the fan-in prior with its variance x 4" in log  # teacher.prior_variance reaches the fit
    # the teacher's posterior and its own MAP point, evaluated on the same test split
    assert [r["method"] for r in read_rows_json(run_dir) if r["setting"] == "teacher"] == ["vi", "teacher_map"]
    rows = [r for r in read_rows_json(run_dir) if r["setting"] == "one_block"]
    # old names in the config; canonical names in the rows, run in the kind's fixed order
    assert [r["method"] for r in rows] == ["teacher_prior", "standard_prior", "deterministic", "tinybert"]
    names = {p.name for p in make_run(run_dir, tmp_path / "fig")}
    assert {"transformer_metrics.png", "transformer_curves.png"} <= names
    assert "| one_block | teacher_prior |" in summary_table(run_dir).replace("  ", " ")
    # a run folder written before the rename (old method names in its tables) still plots and summarizes canonical
    for name in ("metrics.csv", "curves.csv"):
        text = (run_dir / name).read_text()
        (run_dir / name).write_text(text.replace(",teacher_prior,", ",vi_conditioned,").replace(
            ",standard_prior,", ",vi_standard,"))
    assert ",vi_conditioned," in (run_dir / "metrics.csv").read_text()
    table = summary_table(run_dir).replace("  ", " ")
    assert "| one_block | teacher_prior |" in table and "vi_conditioned" not in table
    from pyro_distill.plots.transformer import make_figures

    assert len(make_figures(run_dir, tmp_path / "fig_old")) == 2


def read_rows_json(run_dir):
    import json

    return json.loads((run_dir / "metrics.json").read_text())


def test_fit_teacher_rederives_a_runs_teacher_and_the_calibration_benchmark_compares_it(tmp_path, capsys,
                                                                                        monkeypatch):
    """benchmarks/teacher_calibration.py re-derives a finished run's teachers through fit_teacher (the runner's own
    code path), refuses when they differ from the run's rows, and prints the paired comparison with its MAP."""
    import importlib.util
    import json
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from pyro_distill import metrics
    from pyro_distill.experiments.core import run
    from pyro_distill.experiments.transformer import fit_teacher

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML)
    run_dir = run(toml, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    cfg = json.loads((run_dir / "config.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runner's worker thread policy
    try:
        net, q, hist, d = fit_teacher(cfg, 0)
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in read_rows_json(run_dir) if r["setting"] == "teacher"}
    P_map = metrics.predict(net, hist.map_weights, d.Xte)
    assert metrics.nll(P_map, d.yte) == pytest.approx(rows["teacher_map"]["nll"], abs=1e-12)
    P = metrics.predict(net, q, d.Xte, num_samples=cfg["eval_samples"], seed=0)
    assert metrics.ece(P, d.yte) == pytest.approx(rows["vi"]["ece"], abs=1e-12)

    spec = importlib.util.spec_from_file_location(
        "teacher_calibration", Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_calibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cal.json"
    monkeypatch.setattr(sys, "argv", ["x", "--run", str(run_dir), "--boot", "20", "--floor-draws", "3",
                                      "--json", str(out), "--threads", "1"])
    bench.main()
    text = capsys.readouterr().out
    assert "| 0 | mc |" in text and "| pooled (" in text and "equal the run's rows to 0.0e+00" in text
    res = json.loads(out.read_text())
    diff = res["seeds"]["0"]["mc"]["ece_diff"]
    assert diff["lo"] <= diff["hi"] and diff["n"] == P.shape[0] and diff["n_boot"] == 20
    assert res["seeds"]["0"]["mc"]["ece"] == pytest.approx(rows["vi"]["ece"], abs=1e-12)
    with pytest.raises(SystemExit, match="exists"):  # never overwrites a result
        bench.main()
    # held-out validation rows instead: the run's settings fitted without the tuning and report rows
    monkeypatch.setattr(sys, "argv", ["x", "--run", str(run_dir), "--split", "validation", "--boot", "5",
                                      "--floor-draws", "1", "--threads", "1", "--json", str(tmp_path / "val.json")])
    bench.main()
    val = json.loads((tmp_path / "val.json").read_text())
    n_report = val["seeds"]["0"]["mc"]["ece_diff"]["n"]
    assert val["split"] == "validation" and 0 < n_report < len(d.X) and "scored on" in capsys.readouterr().out
    with pytest.raises(ValueError, match="splits of the seed's own task"):
        fit_teacher(cfg, 0, data=SimpleNamespace(X=d.X[:, :3], y=d.y, Xte=d.Xte, yte=d.yte))
    # a run whose rows no longer match (here: edited) is refused, not described
    text = (run_dir / "metrics.csv").read_text()
    monkeypatch.setattr(sys, "argv", ["x", "--run", str(run_dir), "--boot", "5", "--floor-draws", "1",
                                      "--threads", "1", "--seeds", "0"])
    import csv
    import io

    table = list(csv.DictReader(io.StringIO(text)))
    for r in table:
        if r["setting"] == "teacher" and r["method"] == "teacher_map":
            r["nll"] = str(float(r["nll"]) + 0.5)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
    (run_dir / "metrics.csv").write_text(buf.getvalue())
    with pytest.raises(SystemExit, match="differs from the run's rows"):
        bench.main()
