"""The CNN family: forward against torch.nn layers, channel and dense-neuron removal by conditioning (exact to
1e-10 in float64), Gaussians through surgery.apply, the planner, and a short posterior fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyro_distill import surgery as S
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, KronGaussian, LowRankGaussian
from pyro_distill.inference import fit_posterior
from pyro_distill.nets import CNN, net_from_config
from pyro_distill.surgery.cnn import (
    RemoveChannels,
    RemoveDenseNeurons,
    channel_candidates,
    channel_coordinates,
    plan_cnn,
    remove_dense_neurons,
)

F64 = torch.float64


def torch_reference(net: CNN, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same network from torch.nn layers loaded with the blocks of one weight vector ``w`` [p]."""
    P = net.layout.unflatten(w)
    act = {"relu": nn.ReLU(), "tanh": nn.Tanh()}[net.activation]
    layers: list[nn.Module] = []
    c_in = net.image_shape[0]
    for t, c in enumerate(net.channels, start=1):
        conv = nn.Conv2d(c_in, c, net.kernel_size[t - 1], stride=net.stride[t - 1], padding=net.padding[t - 1],
                         bias=net.bias).double()
        conv.weight.data.copy_(P[f"conv{t}.weight"])
        if net.bias:
            conv.bias.data.copy_(P[f"conv{t}.bias"])
        q = net.pool[t - 1]
        pool = (nn.MaxPool2d(q) if net.pool_type == "max" else nn.AvgPool2d(q)) if q > 1 else nn.Identity()
        layers += [conv, act, pool]
        c_in = c
    layers.append(nn.Flatten())
    d_in = net.num_features
    for t, d in enumerate(net.dense, start=1):
        lin = nn.Linear(d_in, d, bias=net.bias).double()
        lin.weight.data.copy_(P[f"dense{t}.weight"])
        if net.bias:
            lin.bias.data.copy_(P[f"dense{t}.bias"])
        layers.append(lin)
        if t < len(net.dense):
            layers.append(act)
        d_in = d
    with torch.no_grad():
        return nn.Sequential(*layers)(net.images(x).double())


def draws(net: CNN, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, net.num_params, generator=g, dtype=F64) * net.prior_scales() * 2


def images(net: CNN, n: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *net.image_shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


NETS = {
    "digits": dict(image_shape=(8, 8), channels=[3, 4], dense=[5, 10]),
    "rgb-avg-stride": dict(image_shape=(2, 9, 9), channels=[3, 2], dense=[4], kernel_size=[3, 2], padding=[0, 1],
                           stride=[2, 1], pool=[1, 2], pool_type="avg", activation="tanh"),
    "three-conv": dict(image_shape=(10, 10), channels=[2, 3, 2], dense=[3, 4, 3], kernel_size=3, padding=1,
                       pool=[2, 1, 2]),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(NETS))
def test_forward_equals_torch_nn(name, bias):
    net = CNN(**NETS[name], bias=bias)
    x = images(net)
    W = draws(net, 3)
    out = net(W, x)
    assert out.shape == (3, 7, net.num_outputs) and out.dtype == F64
    for s in range(3):
        ref = torch_reference(net, W[s], x)
        assert torch.allclose(out[s], ref, atol=1e-12, rtol=0)
        assert torch.allclose(net(W[s], x), ref, atol=1e-12, rtol=0)  # one draw, no leading dim
    W4 = draws(net, 4).reshape(2, 2, -1)                                 # several leading dims
    out4 = net(W4, x)
    assert out4.shape == (2, 2, 7, net.num_outputs)
    assert torch.allclose(out4[1, 0], torch_reference(net, W4[1, 0], x), atol=1e-12, rtol=0)


def test_input_formats_layout_and_prior():
    net = CNN((8, 8), channels=[3, 4], dense=[5, 10])
    x = images(net)                              # [N, 1, 8, 8]
    w = draws(net, 1)[0]
    out = net(w, x)
    assert torch.equal(out, net(w, x[:, 0])) and torch.equal(out, net(w, x.reshape(7, 64)))
    with pytest.raises(ValueError, match="do not fit image_shape"):
        net(w, torch.zeros(7, 9, 9, dtype=F64))
    with pytest.raises(ValueError, match="do not fit image_shape"):
        net.check_data(torch.zeros(7, 63), torch.zeros(7, dtype=torch.long))
    # 8x8 -conv 3, pad 1-> 8x8 -pool-> 4x4 -> 4x4 -> 2x2: 4 channels x 4 pixels = 16 features
    assert net.feature_maps == [(4, 4), (2, 2)] and net.num_features == 16 and net.pixels_per_channel == 4
    assert net.layout.spec() == [("conv1.weight", (3, 1, 3, 3)), ("conv1.bias", (3,)), ("conv2.weight", (4, 3, 3, 3)),
                                 ("conv2.bias", (4,)), ("dense1.weight", (5, 16)), ("dense1.bias", (5,)),
                                 ("dense2.weight", (10, 5)), ("dense2.bias", (10,))]
    s = net.prior_scales()
    lay = net.layout
    assert torch.allclose(s[lay.slice("conv1.weight")], torch.tensor(1 / 3.0, dtype=F64))    # fan-in 1*3*3
    assert torch.allclose(s[lay.slice("conv2.bias")], torch.tensor(1 / math.sqrt(27), dtype=F64))
    assert torch.allclose(s[lay.slice("dense1.weight")], torch.tensor(0.25, dtype=F64))        # fan-in 16
    assert net_from_config(net.config()).config() == net.config()
    assert CNN((8, 8), [3], [10], prior_scale=0.5).prior_scales().eq(0.5).all()
    with pytest.raises(ValueError, match="leaves no pixels"):
        CNN((4, 4), channels=[2, 2, 2], dense=[3], pool=2)
    with pytest.raises(ValueError, match="one per layer"):
        CNN((8, 8), channels=[2, 2], dense=[3], kernel_size=[3])


def gaussian(net: CNN, kind: str, seed: int = 0):
    """A random correlated Gaussian over the net's weights (float64)."""
    g = torch.Generator().manual_seed(seed)
    p = net.num_params
    m = torch.randn(p, generator=g, dtype=F64) * net.prior_scales()
    if kind == "dense":
        A = torch.randn(p, p, generator=g, dtype=F64) / math.sqrt(p)
        return DenseGaussian.from_covariance(m, A @ A.T + 0.05 * torch.eye(p, dtype=F64), layout=net.layout)
    if kind == "lowrank":
        return LowRankGaussian(m, torch.randn(p, 3, generator=g, dtype=F64) * 0.2,
                               torch.rand(p, generator=g, dtype=F64) + 0.05, layout=net.layout)
    return DiagGaussian(m, torch.rand(p, generator=g, dtype=F64) + 0.05, layout=net.layout)


def assert_exact(ops, teacher: CNN, q, n: int = 4):
    """Draws of the conditioned Gaussian: teacher with the fixed coordinates == student, to 1e-10."""
    student, prior = S.apply(ops, teacher, q)
    assert prior.layout == student.layout and prior.dim == student.num_params
    w = prior.sample(n, generator=torch.Generator().manual_seed(3))
    wt = S.embed(ops, teacher, w)
    x = images(teacher, 9, seed=4) * 2
    out_s = student(w, x)
    assert out_s.shape == (n, 9, teacher.num_outputs)
    assert torch.allclose(teacher(wt, x), out_s, atol=1e-10, rtol=0)
    I, v, _ = ops[0].removed(teacher)
    assert torch.equal(wt[..., I], v.expand(n, -1)) and bool((v == 0).all())
    return student, prior


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layer,channels", [(1, [0, 2]), (2, [1]), (2, [0, 3])])
def test_remove_channels_is_exact(layer, channels, bias):
    teacher = CNN(**NETS["digits"], bias=bias)
    q = gaussian(teacher, "dense")
    op = S.remove_channels(teacher, layer, channels)
    student, prior = assert_exact([op], teacher, q)
    want = [3, 4]
    want[layer - 1] -= len(channels)
    assert student.channels == want and student.dense == teacher.dense
    # the conditioned Gaussian is the teacher's conditioned on exactly those coordinates, over the student layout
    I = channel_coordinates(teacher, layer, channels)
    direct = q.condition(I, torch.zeros(I.numel(), dtype=F64))
    assert isinstance(prior, DenseGaussian)
    assert torch.allclose(prior.mean, direct.mean, atol=1e-12) and torch.allclose(prior.covariance(),
                                                                                   direct.covariance(), atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_kept_coordinates_are_the_student_layout(bias):
    """Slicing the teacher's blocks with torch (filters, input channels, dense1 column blocks) gives the same
    vector as keeping the op's remaining coordinates in flat order."""
    teacher = CNN(**NETS["three-conv"], bias=bias)
    w = draws(teacher, 1)[0]
    P = teacher.layout.unflatten(w)
    for layer, J in [(1, [1]), (3, [0])]:
        op = RemoveChannels(layer, J)
        student = op.architecture(teacher)
        keep_c = [c for c in range(teacher.channels[layer - 1]) if c not in J]
        parts = dict(P)
        parts[f"conv{layer}.weight"] = P[f"conv{layer}.weight"][keep_c]
        if bias:
            parts[f"conv{layer}.bias"] = P[f"conv{layer}.bias"][keep_c]
        if layer < teacher.num_conv:
            parts[f"conv{layer + 1}.weight"] = P[f"conv{layer + 1}.weight"][:, keep_c]
        else:
            hw = teacher.pixels_per_channel
            d1 = P["dense1.weight"].reshape(teacher.dense[0], teacher.channels[-1], hw)
            parts["dense1.weight"] = d1[:, keep_c].reshape(teacher.dense[0], -1)
        assert torch.equal(w[op.keep(teacher)], student.layout.flatten(parts))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["dense", "lowrank", "diag"])
def test_channels_composed_with_dense_neurons(kind, bias):
    teacher = CNN(**NETS["three-conv"], bias=bias)
    q = gaussian(teacher, kind)
    ops = [S.remove_channels(teacher, 3, [1])]
    mid = ops[0].architecture(teacher)
    ops.append(S.remove_channels(mid, 2, [0, 2]))
    mid = ops[1].architecture(mid)
    ops.append(remove_dense_neurons(mid, 1, [2]))
    mid = ops[2].architecture(mid)
    ops.append(RemoveDenseNeurons(2, [0, 3]))
    student, prior = assert_exact(ops, teacher, q)
    assert student.channels == [2, 1, 1] and student.dense == [2, 2, 3]
    assert type(prior) is type(q)
    # step by step == conditioning the teacher's Gaussian on the union of the removed coordinates at once
    keep, net = torch.arange(teacher.num_params), teacher
    for op in ops:
        keep, net = keep[op.keep(net)], op.architecture(net)
    I = teacher.layout.complement(keep)
    once = q.condition(I, torch.zeros(I.numel(), dtype=F64))
    assert torch.allclose(prior.mean, once.mean, atol=1e-10) and torch.allclose(prior.variance, once.variance,
                                                                                atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_kronecker_posterior_stays_kronecker(bias):
    """Blocks = each layer's [filters | bias] (conv) or [U | b] (dense): removing channels conditions whole rows of
    conv_t and whole columns of conv_{t+1} / dense1, so the result is Kronecker and equals the dense path."""
    teacher = CNN(**NETS["digits"], bias=bias)
    g = torch.Generator().manual_seed(7)

    def tril(n):
        return torch.randn(n, n, generator=g, dtype=F64).tril(-1) * 0.3 + torch.diag(torch.rand(n, generator=g,
                                                                                              dtype=F64) + 0.5)

    blocks = [(idx, tril(idx.shape[0]), tril(idx.shape[1])) for idx in teacher.kron_index()]
    assert sorted(torch.cat([i.reshape(-1) for i, _, _ in blocks]).tolist()) == list(range(teacher.num_params))
    q = KronGaussian.from_blocks(torch.randn(teacher.num_params, generator=g, dtype=F64), blocks,
                                 layout=teacher.layout)
    ops = [S.remove_channels(teacher, 1, [1])]
    mid = ops[0].architecture(teacher)
    ops.append(S.remove_channels(mid, 2, [0, 2]))
    ops.append(RemoveDenseNeurons(1, [4]))
    student, prior = assert_exact(ops, teacher, q)
    _, dense_path = S.apply(ops, teacher, q.to_dense())
    assert isinstance(prior, KronGaussian) and prior.num_blocks == 4 and prior.rem_index.numel() == 0
    assert [i.shape for i in student.kron_index()] == [i.shape for i in prior.index]
    assert torch.allclose(prior.mean, dense_path.mean, atol=1e-9)
    assert torch.allclose(prior.covariance(), dense_path.covariance(), atol=1e-9)


def test_dense_gaussian_through_apply_and_plan():
    teacher = CNN(**NETS["digits"])
    q = gaussian(teacher, "dense", seed=5)
    student_arch = teacher.replace(channels=[2, 3], dense=[3, 10])
    for selector in ("snr", "magnitude", "random", "evidence"):
        plan = plan_cnn(teacher, student_arch, selector=selector, posterior=q)
        assert [op.name for op in plan] == ["remove_channels", "remove_channels", "remove_dense_neurons"]
        student, prior = assert_exact(plan, teacher, q)
        assert student.config() == student_arch.config() and plan.student == student_arch.config()
        assert isinstance(prior, DenseGaussian) and prior.layout == student_arch.layout
        again = S.Plan.from_dict(plan.to_dict())
        assert again == plan and str(plan).startswith(f"plan ({selector})")
    # the snr selector drops the lowest signal-to-noise channels of conv layer 1
    scores = S.score_candidates(teacher, channel_candidates(teacher, 1), "snr", q)  # remove-scores
    assert plan_cnn(teacher, student_arch, "snr", q)[0].channels == (int(torch.argmax(scores)),)
    assert [type(op) for op in plan_cnn(teacher, teacher, "random")] == [S.SameFamily]
    assert S.plan(teacher, student_arch, "evidence", posterior=q) == plan_cnn(teacher, student_arch, "evidence", q)
    with pytest.raises(S.SurgeryError, match="only removes"):
        plan_cnn(teacher, teacher.replace(channels=[4, 4]), "random")
    with pytest.raises(S.SurgeryError, match="differ in kernel_size"):
        plan_cnn(teacher, teacher.replace(kernel_size=[5, 5], padding=[2, 2]), "random")
    with pytest.raises(ValueError, match="posterior"):
        plan_cnn(teacher, student_arch, "snr")


def test_bad_removals_name_the_fix():
    net = CNN(**NETS["digits"])
    with pytest.raises(S.SurgeryError, match="every channel"):
        S.remove_channels(net, 1, [0, 1, 2])
    with pytest.raises(S.SurgeryError, match="out of range"):
        S.remove_channels(net, 2, [4])
    with pytest.raises(S.SurgeryError, match="conv layers 1..2"):
        S.remove_channels(net, 3, [0])
    with pytest.raises(S.SurgeryError, match="output layer"):
        remove_dense_neurons(net, 2, [0])
    with pytest.raises(S.SurgeryError, match="repeated"):
        RemoveChannels(1, [1, 1])
    with pytest.raises(S.SurgeryError, match="applies to a CNN"):
        from pyro_distill.nets import MLP

        S.remove_channels(MLP([4, 3, 2]), 1, [0])
    op = RemoveChannels(2, [3, 1])
    assert S.operation_from_dict(op.to_dict()) == op and op.channels == (1, 3)


def test_fit_posterior_smoke_diag():
    g = torch.Generator().manual_seed(0)
    net = CNN((6, 6), channels=[2], dense=[3], kernel_size=3, padding=1, pool=2)
    X = torch.randn(40, 6, 6, generator=g)
    y = (X[:, :3].sum((1, 2)) > 0).long() + (X[:, 3:].sum((1, 2)) > 0).long()
    post, hist = fit_posterior(net, X, y, guide="diag", steps=5, map_steps=20, num_particles=2, progress=False)
    assert post.dim == net.num_params and post.layout == net.layout
    assert len(hist.elbo) == 5 and all(math.isfinite(e) for e in hist.elbo)
    assert math.isfinite(hist.elbo_end) and torch.isfinite(post.mean).all()


@pytest.mark.parametrize("bias", [True, False])
def test_conv_kfac_is_exact_at_one_location_and_builds_a_kronecker_laplace(bias):
    """KFAC over the CNN's layers (conv as a map of its input patches, shared over locations): every block equals
    the dense GGN block when one image has one location per layer (1x1 image, 1x1 kernels); on real images the
    factors do not depend on the chunking, and the KFAC Laplace is a KronGaussian over ``kron_index``."""
    from torch.func import jacrev

    from pyro_distill.curvature import kfac, kfac_block_dense, kfac_indices
    from pyro_distill.inference import kron_laplace

    net = CNN(image_shape=(2, 1, 1), channels=[3, 2], dense=[4, 3], kernel_size=1, padding=0, pool=1, bias=bias)
    g = torch.Generator().manual_seed(0)
    w = net.init_weights(g, dtype=F64) * 2
    X = torch.randn(1, 2, 1, 1, generator=g, dtype=F64)
    J = jacrev(lambda v: net.forward(v, X))(w)[0]  # [C, p]
    pi = torch.softmax(net.forward(w, X)[0], -1)
    dense = J.T @ (torch.diag(pi) - pi[:, None] * pi[None, :]) @ J
    fac = kfac(net, w, X)
    assert list(fac) == ["conv1", "conv2", "dense1", "dense2"]
    for name, (A, G) in fac.items():
        idx = kfac_indices(net, name)
        assert torch.allclose(kfac_block_dense(A, G), dense[idx[:, None], idx], atol=1e-13), name
    big = CNN(**NETS["digits"], bias=bias)
    wb = big.init_weights(g, dtype=F64)
    Xb = torch.randn(5, 8, 8, generator=g, dtype=F64)
    whole, chunked = kfac(big, wb, Xb), kfac(big, wb, Xb, chunk=2)
    for name in whole:
        for a, b in zip(whole[name], chunked[name]):
            assert torch.allclose(a, b, atol=1e-12), name
    c_in, k = 1, big.kernel_size[0]
    assert whole["conv1"][0].shape == (c_in * k * k + bias,) * 2 and whole["conv1"][1].shape == (big.channels[0],) * 2
    q = kron_laplace(big, Xb, wb, big.default_prior(F64))
    assert isinstance(q, KronGaussian) and q.num_blocks == len(big.kron_index()) and q.rem_index.numel() == 0


def test_cnn_figures_are_named_after_the_experiment(tmp_path):
    """The kind's two figures carry the run's experiment name, so the digits and Fashion-MNIST runs of the kind
    publish side by side instead of overwriting each other."""
    import csv

    from pyro_distill.plots.cnn import figures_for_run

    run = tmp_path / "runs" / "cnn_fashion" / "20260101-000000"
    run.mkdir(parents=True)
    rows = []
    for seed in (0, 1):
        rows.append({"setting": "fashion_mnist teacher", "method": "cnn_teacher", "seed": seed, "accuracy": 0.8,
                     "agreement": ""})
        for m, a in (("teacher_prior", 0.81), ("standard_prior", 0.8 + 0.01 * seed)):
            rows.append({"setting": "fashion_mnist channel_removal", "method": m, "seed": seed, "accuracy": a,
                         "agreement": 0.9})
        for n in (250, 1000):
            for src in ("gaussian", "labels"):
                rows.append({"setting": f"fashion_mnist extraction n={n}", "method": src, "seed": seed,
                             "accuracy": 0.3 + n / 5000, "agreement": 0.4 + n / 5000})
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    made = figures_for_run(run, tmp_path / "figures")
    assert sorted(p.name for p in made) == ["cnn_fashion_extraction.png", "cnn_fashion_methods.png"]
    assert all(p.stat().st_size > 1000 for p in made)


def test_kron_guide_for_a_cnn_from_conv_kfac_through_the_planner():
    """``fit_posterior(cnn, guide="kron")`` starts from the conv-KFAC Laplace and refines it in the Kronecker
    structure; the planner's channel and neuron removals keep it Kronecker, with the student's own blocks."""
    from pyro_distill.surgery.cnn import plan_cnn

    torch.manual_seed(0)
    net = CNN(image_shape=(8, 8), channels=[4, 6], dense=[8, 10])
    X, y = torch.randn(40, 8, 8), torch.arange(40) % 10
    q, _ = fit_posterior(net, X, y, guide="kron", steps=3, map_steps=5, num_particles=2, elbo_eval_particles=2)
    assert isinstance(q, KronGaussian) and q.num_blocks == 4 and q.rem_index.numel() == 0
    student = net.replace(channels=[3, 5], dense=[6, 10])
    plan = plan_cnn(net, student, selector="snr", posterior=q)
    s, prior = S.apply(plan, net, q)
    assert isinstance(prior, KronGaussian) and s.config() == student.config()
    assert sorted(i.shape for i in prior.index) == sorted(i.shape for i in student.kron_index())


def test_cnn_kind_tiny_run_end_to_end(tmp_path):
    """The ``cnn`` experiment kind on digits at tiny budgets: the teacher and its MAP point, channel removal with
    every surgery method, transformer -> CNN and CNN -> MLP, extraction at two budgets from every source; rows,
    summary and the kind's figures (named after the experiment)."""
    import json

    from pyro_distill.experiments import run
    from pyro_distill.plots.experiments import make_run

    toml = tmp_path / "cnn_tiny.toml"
    toml.write_text("""
name = "cnn_tiny"
kind = "cnn"
seeds = 1
workers = 1
tasks = ["digits"]
methods = ["conditioned_prior", "teacher_prior", "standard_prior", "kd", "prune_finetune"]
[digits]
teacher = { channels = [3, 4], dense = [8, 10] }
student = { channels = [2, 3], dense = [6, 10] }
mlp_hidden = [8]
[teacher]
map_steps = 6
steps = 2
num_particles = 1
[student]
map_steps = 4
steps = 2
num_particles = 1
[transformer]
d_model = 4
heads = [1]
d_head = 4
d_ff = 4
map_steps = 4
steps = 2
num_particles = 1
[crossarch]
laplace = "diag"
[extraction]
budgets = [20, 40]
steps = 5
pool_size = 200
[eval]
samples = 3
""")
    run_dir = run(toml, runs_root=tmp_path / "runs", models_root=tmp_path / "models", echo=False)
    rows = json.loads((run_dir / "metrics.json").read_text())
    by = {(r["setting"], r["method"]) for r in rows}
    assert {("digits teacher", "cnn_teacher"), ("digits teacher", "cnn_teacher_map"),
            ("digits teacher", "transformer_teacher")} <= by
    assert {m for s, m in by if s == "digits channel_removal"} == {"conditioned_prior", "teacher_prior",
                                                                   "standard_prior", "kd", "prune_finetune"}
    assert {m for s, m in by if s == "digits transformer->cnn"} == {"kd", "kd_laplace", "labels"}
    assert {m for s, m in by if s == "digits extraction n=40"} == {"gaussian", "other", "active", "labels"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    names = {p.name for p in make_run(run_dir, tmp_path / "fig")}
    assert {"cnn_tiny_methods.png", "cnn_tiny_extraction.png"} <= names
