"""The one planner (surgery/planning.py): the same plans as the per-family planners it replaced, shared selectors,
candidates per family, the RNN family, and the shared Savage-Dickey / conditioning loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from planning_cases import cases, gaussian

from pyro_distill import surgery as S
from pyro_distill.distill import model_reduction
from pyro_distill.gaussian import DenseGaussian, DiagGaussian
from pyro_distill.nets import CNN, MLP, AttentionRNN, Transformer, net_from_config
from pyro_distill.surgery.planning import Planner, family_of

F64 = torch.float64
REFERENCE = json.loads((Path(__file__).parent / "data" / "planning_reference.json").read_text())


CASES = cases()


def _case_ids() -> list[str]:
    return [r["case"] for r in REFERENCE]


@pytest.mark.parametrize("i", range(len(REFERENCE)), ids=_case_ids())
def test_plans_equal_the_pre_unification_planners(i):
    """Same units in the same order as the old MLP / CNN / transformer planners, float64 and float32 Gaussians.

    Exception, by design: ``random`` on a transformer. The shared ``random`` selector removes the lowest draws
    (the MLP and CNN convention, kept so their plans stay identical); the old transformer planner removed the
    highest. Those plans must still reach the student and repeat for a seed."""
    c, ref = CASES[i], REFERENCE[i]
    assert ref["case"] == f"{c['family']}/{c['seed']}/{c['selector']}/{c['kind']}/{c['dtype']}"
    teacher, student = net_from_config(c["teacher"]), net_from_config(c["student"])
    q = gaussian(teacher, c["kind"], c["gseed"], c["dtype"])
    pl = S.plan(teacher, student, selector=c["selector"], posterior=q, seed=c["seed"])
    if c["family"] == "transformer" and c["selector"] == "random":
        assert pl.student == student.config()
        assert pl == S.plan(teacher, student, selector="random", seed=c["seed"])
        return
    assert [op.to_dict() for op in pl] == ref["ops"] and pl.student == student.config()


def test_the_old_entry_points_are_the_planner():
    teacher = CNN(image_shape=(8, 8), channels=[3, 4], dense=[5, 10])
    st = teacher.replace(channels=[2, 3])
    q = gaussian(teacher, "diag", 1, "float64")
    assert S.plan_cnn(teacher, st, "evidence", q, 3) == S.plan(teacher, st, "evidence", q, 3)
    tf = Transformer(input_dim=5, n_classes=3, max_len=7, d_model=6, heads=[3, 2], ffn=[True, True], d_head=2, d_ff=5)
    qt = gaussian(tf, "diag", 2, "float64")
    assert S.plan_transformer(tf, tf.replace(heads=[1, 2]), posterior=qt) == S.plan(
        tf, tf.replace(heads=[1, 2]), "evidence", qt)
    from pyro_distill.surgery.plan import SELECTORS, plan

    assert plan is S.plan and SELECTORS is S.SELECTORS


def test_selectors_are_shared_remove_scores():
    """One definition per selector, on any family's candidates; higher goes first."""
    net = MLP([3, 4, 4, 2])
    m = torch.tensor([0.0] * net.num_params, dtype=F64)
    lay = net.layout
    m[lay.rows("layer1.weight", [2])] = 3.0  # neuron 2 of layer 1: far from 0, so it is kept longest
    m[lay.indices("layer2.weight")] = torch.eye(4, dtype=F64).reshape(-1) + 0.01  # layer 2 is nearly the identity
    q = DiagGaussian(m, torch.full((net.num_params,), 0.5, dtype=F64), layout=lay)
    cands = S.candidates(net)
    names = [repr(c.op) for c in cands]
    assert names[:4] == [f"remove_neurons(layer=1, neurons=[{j}])" for j in range(4)]
    assert "remove_layer(layer=2)" in names and "remove_layer(layer=1)" not in names  # only what check allows
    for sel in ("snr", "magnitude", "evidence"):
        s = S.score_candidates(net, cands, sel, q)
        assert s.dtype == F64 and s.shape == (len(cands),)
        assert int(torch.argmin(s[:4])) == 2
    # targets are part of a candidate: layer 2 is scored against U_2 = I, not against 0
    layer2 = cands[names.index("remove_layer(layer=2)")]
    assert torch.equal(layer2.value[:16], torch.eye(4, dtype=F64).reshape(-1))
    snr = S.score_candidates(net, [layer2], "snr", q)
    ref = -((m[layer2.index] - layer2.value) ** 2 / 0.25).mean()
    torch.testing.assert_close(snr, ref.reshape(1), rtol=0, atol=1e-15)
    ev = S.score_candidates(net, [layer2], "evidence", q)
    assert torch.equal(ev, S.savage_dickey(q, net.default_prior(F64), layer2.index, layer2.value).reshape(1))
    assert S.score_candidates(net, cands, "first").tolist() == [-float(i) for i in range(len(cands))]
    r = S.score_candidates(net, cands, "random", seed=5)
    assert torch.equal(r, -torch.rand(len(cands), generator=torch.Generator().manual_seed(5), dtype=F64))
    custom = S.score_candidates(net, cands, lambda n, ops, q0, p0: [float(len(ops) - i) for i in range(len(ops))])
    assert int(torch.argmax(custom)) == 0
    with pytest.raises(ValueError, match="unknown selector 'best'"):
        S.score_candidates(net, cands, "best", q)
    with pytest.raises(ValueError, match="pass posterior=<Gaussian>.*first, last, random"):
        S.score_candidates(net, cands, "evidence")


def test_every_family_lists_its_candidates():
    cnn = CNN(image_shape=(8, 8), channels=[1, 4], dense=[3, 10])
    assert {c.op.name for c in S.candidates(cnn)} == {"remove_channels", "remove_dense_neurons"}
    assert len(S.candidates(cnn)) == 4 + 3  # conv layer 1 has one channel: not removable
    tf = Transformer(input_dim=5, n_classes=3, max_len=7, d_model=6, heads=[2, 1], ffn=[True, False], d_head=2,
                     d_ff=5)
    got = sorted(repr(c.op) for c in S.candidates(tf))
    assert got == sorted(["remove_head(block=0, head=0)", "remove_head(block=0, head=1)",
                          "remove_attention_sublayer(block=0)", "remove_attention_sublayer(block=1)",
                          "remove_ffn(block=0)", "remove_block(block=0)", "remove_block(block=1)"])
    rnn = AttentionRNN(src_vocab=6, tgt_vocab=5, src_len=4, emb=3, hidden=4, attn=3)
    assert [c.op.variant for c in S.candidates(rnn)] == list(S.ATTENTION_VARIANTS)
    assert S.candidates(rnn.replace(uniform_context=True)) == []
    for net in (cnn, tf, rnn, MLP([2, 3, 2])):  # a candidate's coordinates are the ones its operation fixes
        for c in S.candidates(net):
            I, v = c.op.fixed(net)
            assert torch.equal(c.index, I) and torch.equal(c.value, v)
    assert family_of(rnn).name == "rnn" and family_of(cnn).name == "cnn"


def test_rnn_family_picks_a_variant_and_remove_attention_is_an_operation():
    net = AttentionRNN(src_vocab=6, tgt_vocab=5, src_len=4, emb=3, hidden=4, attn=3)
    p = net.num_params
    loc = torch.full((p,), 1.0, dtype=F64)
    loc[net.layout.indices("attn.w")] = 0.0  # w sits at 0: removing it by w = 0 is what the data support
    q = DiagGaussian(loc, torch.full((p,), 0.1, dtype=F64), layout=net.layout)
    student = net.replace(uniform_context=True)
    for sel in ("evidence", "snr", "magnitude", "first"):
        assert list(S.plan(net, student, sel, q)) == [S.RemoveAttention("w")], sel
    assert list(S.plan(net, student, "last")) == [S.RemoveAttention("all")]
    assert list(S.plan(net, net, "random")) == [S.SameFamily()]
    op = S.remove_attention(net, "uv")
    assert isinstance(op, S.Operation) and op == S.RemoveAttention("uv")
    s, g = op.apply(net, q)
    assert s.config() == student.config() and g.dim == student.num_params
    with pytest.raises(S.SurgeryError, match="uniform_context"):
        S.remove_attention(student, "w")
    with pytest.raises(S.SurgeryError, match="differ in"):
        S.plan(net, student.replace(hidden=5), "random")


def test_model_reduction_and_the_planner_share_one_conditioning_loop():
    """Savage-Dickey summed over a plan equals the joint ratio of all its coordinates (chain rule), and the
    conditioned posterior equals surgery.apply's, whether walked by Reduction, the planner or model_reduction."""
    teacher, student = MLP([4, 6, 6, 2]), MLP([4, 3, 2])
    gen = torch.Generator().manual_seed(0)
    p = teacher.num_params
    A = torch.randn(p, p, generator=gen, dtype=F64) / p**0.5
    q = DenseGaussian.from_covariance(torch.randn(p, generator=gen, dtype=F64), A @ A.T + 0.1 * torch.eye(p, dtype=F64),
                                      layout=teacher.layout)
    pl = S.plan(teacher, student, "evidence", q)
    net, qr, delta = model_reduction(pl, teacher, q)
    _, qa = S.apply(pl, teacher, q)
    assert net.config() == student.config() and torch.equal(qr.mean, qa.mean)
    state = S.Reduction(teacher, q, teacher.default_prior(F64))
    for op in pl:
        state.step(op)
    assert torch.equal(state.q.mean, qa.mean) and state.ops == list(pl)
    planner = Planner(teacher, "evidence", q)
    assert planner.p0.dtype == F64 and planner.p0.dim == p  # default prior: the teacher's, float64
    assert isinstance(delta, float) and delta == delta


def test_unknown_family_names_the_fix():
    class Other(MLP):
        pass

    assert family_of(Other([2, 3, 2])).name == "mlp"  # subclasses use their parent's family
    with pytest.raises(S.SurgeryError, match="MLP into an MLP"):
        S.plan(MLP([2, 3, 2]), CNN(image_shape=(4, 4), channels=[2], dense=[2]), "random")
