"""MLP over one flat weight vector: equals torch.nn, fan-in prior, the Pyro model, bad inputs, config round trip."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_distill.gaussian import DenseGaussian, DiagGaussian
from pyro_distill.nets import ACTIVATIONS, MLP, net_from_config

TORCH_ACT = {"relu": nn.ReLU(), "identity": nn.Identity(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
             "elu": nn.ELU(), "gelu": nn.GELU()}


def torch_mlp(net: MLP, w: torch.Tensor) -> nn.Sequential:
    """The same network written with torch.nn, its weights copied from the flat vector via the layout."""
    mods: list[nn.Module] = []
    parts = net.layout.unflatten(w)
    for t in range(1, len(net.sizes)):
        lin = nn.Linear(net.sizes[t - 1], net.sizes[t], bias=net.bias, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(parts[f"layer{t}.weight"])
            if net.bias:
                lin.bias.copy_(parts[f"layer{t}.bias"])
        mods.append(lin)
        if t < len(net.sizes) - 1:
            mods.append(TORCH_ACT[net.activation])
    return nn.Sequential(*mods)


def test_all_activations_have_a_reference() -> None:
    assert set(TORCH_ACT) == set(ACTIVATIONS)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_torch_nn(activation: str, bias: bool) -> None:
    net = MLP([5, 7, 4, 3], activation=activation, bias=bias)
    expected_p = 5 * 7 + 7 * 4 + 4 * 3 + ((7 + 4 + 3) if bias else 0)
    assert net.num_params == expected_p
    assert any("bias" in n for n in net.layout.names) == bias
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)
    W = torch.randn(6, net.num_params, generator=g, dtype=torch.float64)  # [S, p]
    out = net.forward(W, x)
    assert out.shape == (6, 11, 3)
    for s in range(6):
        ref = torch_mlp(net, W[s])(x)
        torch.testing.assert_close(out[s], ref)
        torch.testing.assert_close(net(W[s], x), ref)  # unbatched w: [N, out]
    # two leading sample dims
    out2 = net.forward(W.reshape(2, 3, -1), x)
    torch.testing.assert_close(out2.reshape(6, 11, 3), out)


def test_forward_no_hidden_layer_and_hidden() -> None:
    net = MLP([4, 2], activation="identity", likelihood="gaussian")
    w = torch.randn(net.num_params, dtype=torch.float64)
    x = torch.randn(9, 4, dtype=torch.float64)
    Wm, b = net.layout.view(w, "layer1.weight"), net.layout.view(w, "layer1.bias")
    torch.testing.assert_close(net.forward(w, x), x @ Wm.T + b)
    deep = MLP([4, 6, 5, 2], activation="tanh")
    wd = torch.randn(3, deep.num_params, dtype=torch.float64)
    seq = torch_mlp(deep, wd[1])
    torch.testing.assert_close(deep.hidden(wd, x, 2)[1], seq[:4](x))


def test_gradients_flow_to_w() -> None:
    net = MLP([3, 4, 2])
    w = torch.randn(2, net.num_params, requires_grad=True)
    net.log_likelihood(w, torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])).sum().backward()
    assert w.grad.shape == w.shape and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ prior
def test_prior_scales_fan_in() -> None:
    net = MLP([16, 4, 3])
    s = net.prior_scales()
    lay = net.layout
    assert s.shape == (net.num_params,)
    assert torch.all(s[lay.indices("layer1.weight")] == 1 / math.sqrt(16))
    assert torch.all(s[lay.indices("layer1.bias")] == 1 / math.sqrt(16))
    assert torch.all(s[lay.indices("layer2.weight")] == 1 / math.sqrt(4))
    assert torch.all(s[lay.indices("layer2.bias")] == 1 / math.sqrt(4))
    fixed = MLP([16, 4, 3], prior_scale=0.3).prior_scales()
    assert torch.all(fixed == 0.3)
    prior = net.default_prior(torch.float64)
    assert isinstance(prior, DiagGaussian) and prior.layout == lay and prior.dtype == torch.float64
    assert torch.all(prior.loc == 0)
    torch.testing.assert_close(prior.variance, s.double() ** 2)
    w0 = net.init_weights(torch.Generator().manual_seed(0))
    assert w0.shape == (net.num_params,) and w0.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ Pyro model
def test_model_trace_shapes_full_batch() -> None:
    net = MLP([4, 5, 3])
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    pyro.set_rng_seed(0)
    tr = poutine.trace(net.model).get_trace(x, y)
    sample_sites = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    assert sample_sites == ["w", "y"]  # ONE latent site plus the observations
    assert tr.nodes["w"]["value"].shape == (net.num_params,)
    assert not tr.nodes["w"]["is_observed"] and tr.nodes["y"]["is_observed"]
    assert tr.nodes["y"]["value"].shape == (12,)
    assert tr.nodes["y"]["scale"] == 1.0
    tr.compute_log_prob()
    w = tr.nodes["w"]["value"]
    torch.testing.assert_close(tr.nodes["y"]["log_prob_sum"], net.log_likelihood(w, x, y).sum())
    torch.testing.assert_close(tr.nodes["w"]["log_prob_sum"], net.default_prior().log_prob(w))


def test_model_plate_subsampling_scale() -> None:
    net = MLP([4, 5, 3])
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    W = torch.randn(3, net.num_params)  # particles as a leading batch dim
    tr = poutine.trace(poutine.condition(net.model, data={"w": W})).get_trace(x, y, None, 8)
    site = tr.nodes["y"]
    assert site["scale"] == pytest.approx(40 / 8)
    assert site["value"].shape == (8,)
    assert site["fn"].batch_shape == (3, 8)
    frame = [f for f in site["cond_indep_stack"] if f.name == "data"][0]
    assert frame.full_size == 40 and frame.size == 8 and frame.dim == -1
    # the subsample indices pick the matching rows
    idx = tr.nodes["data"]["value"]
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), net.log_likelihood(W, x[idx], y[idx]))


def test_model_with_gaussian_prior_and_likelihood() -> None:
    net = MLP([3, 1], activation="identity", likelihood="gaussian", noise_scale=0.5)
    p = net.num_params
    prior = DenseGaussian(torch.zeros(p, dtype=torch.float64), 2 * torch.eye(p, dtype=torch.float64))
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    tr = poutine.trace(net.model).get_trace(x, y, prior)
    tr.compute_log_prob()
    w = tr.nodes["w"]["value"]
    torch.testing.assert_close(tr.nodes["w"]["log_prob_sum"], prior.log_prob(w))
    mean = net.forward(w, x).squeeze(-1)
    ref = torch.distributions.Normal(mean, 0.5).log_prob(y).sum()
    torch.testing.assert_close(tr.nodes["y"]["log_prob_sum"], ref)
    # a noise scale passed explicitly overrides the net's
    ll = net.log_likelihood(w, x, y, noise_scale=2.0)
    torch.testing.assert_close(ll, torch.distributions.Normal(mean, 2.0).log_prob(y))


def test_categorical_log_likelihood() -> None:
    net = MLP([3, 4, 5])
    w, x, y = torch.randn(2, net.num_params), torch.randn(7, 3), torch.randint(0, 5, (7,))
    ll = net.log_likelihood(w, x, y)
    assert ll.shape == (2, 7)
    ref = torch.log_softmax(net.forward(w, x), -1).gather(-1, y.expand(2, 7).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ll, ref)


def test_multi_output_gaussian_likelihood() -> None:
    net = MLP([3, 2], likelihood="gaussian", noise_scale=0.3)
    w, x, y = torch.randn(net.num_params), torch.randn(5, 3), torch.randn(5, 2)
    ll = net.log_likelihood(w, x, y)
    assert ll.shape == (5,)
    torch.testing.assert_close(ll, torch.distributions.Normal(net.forward(w, x), 0.3).log_prob(y).sum(-1))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("likelihood,n_out", [("categorical", 4), ("gaussian", 1), ("gaussian", 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_log_likelihood_and_grad_equals_autograd(activation: str, likelihood: str, n_out: int, bias: bool) -> None:
    """The hand-written backward (and the autograd fallback for elu/gelu) gives autograd's value and
    gradient of the summed log-likelihood, for every activation, both likelihoods, with and without biases,
    and for a net with no hidden layer."""
    g = torch.Generator().manual_seed(3)
    for sizes in ([3, 5, 6, n_out], [3, n_out]):
        net = MLP(sizes, activation=activation, likelihood=likelihood, bias=bias, noise_scale=0.7)
        x = torch.randn(11, 3, generator=g, dtype=torch.float64)
        y = (torch.randint(0, n_out, (11,), generator=g) if likelihood == "categorical"
             else torch.randn(11, n_out, generator=g, dtype=torch.float64).squeeze(-1))
        w = torch.randn(net.num_params, generator=g, dtype=torch.float64).requires_grad_()
        ll = net.log_likelihood(w, x, y).sum()
        (grad,) = torch.autograd.grad(ll, w)
        ll2, grad2 = net.log_likelihood_and_grad(w.detach(), x, y)
        torch.testing.assert_close(ll2, ll.detach())
        torch.testing.assert_close(grad2, grad)
    with pytest.raises(ValueError, match="one weight vector"):
        net.log_likelihood_and_grad(torch.zeros(2, net.num_params, dtype=torch.float64), x, y)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        MLP([3, 2], activation="swish")
    with pytest.raises(ValueError, match="choose one of"):
        MLP([3, 2], likelihood="poisson")
    with pytest.raises(ValueError, match="at least"):
        MLP([3])
    with pytest.raises(ValueError, match="positive widths"):
        MLP([3, 0, 2])
    with pytest.raises(ValueError, match="prior_scale must be positive"):
        MLP([3, 2], prior_scale=0.0)


def test_bad_data() -> None:
    net = MLP([4, 3])
    w = torch.zeros(net.num_params)
    with pytest.raises(ValueError, match="expects 4"):
        net.forward(w, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="another architecture"):
        net.forward(torch.zeros(net.num_params + 1), torch.zeros(5, 4))
    x = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"0\.\.2.*relabel"):
        net.check_data(x, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="0..2"):
        net.check_data(x, torch.tensor([0, -1, 2, 1, 0]))
    with pytest.raises(ValueError, match="must be integers"):
        net.check_data(x, torch.zeros(5))
    with pytest.raises(ValueError, match="5 rows but y has 4"):
        net.check_data(x, torch.zeros(4, dtype=torch.long))
    net.check_data(x, torch.tensor([0, 1, 2, 2, 0]))  # fine
    net.check_data(x, None)
    reg = MLP([4, 1], likelihood="gaussian", noise_scale=None)
    with pytest.raises(ValueError, match="pass noise_scale"):
        reg.log_likelihood(torch.zeros(reg.num_params), x, torch.zeros(5))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw", [{}, {"activation": "tanh", "bias": False},
                                {"likelihood": "gaussian", "noise_scale": 0.2, "prior_scale": 1.5}])
def test_net_from_config_round_trip(kw: dict) -> None:
    net = MLP([6, 5, 2], **kw)
    cfg = net.config()
    assert cfg["type"] == "MLP"
    back = net_from_config(cfg)
    assert isinstance(back, MLP) and back.config() == cfg and back.layout == net.layout
    assert back.same_architecture(net)
    assert cfg == net.config()  # net_from_config does not mutate its argument
    w, x = torch.randn(net.num_params), torch.randn(3, 6)
    torch.testing.assert_close(back.forward(w, x), net.forward(w, x))
    torch.testing.assert_close(back.prior_scales(), net.prior_scales())
    assert "p=" in repr(net)
    r = net.replace(sizes=[6, 3, 2])
    assert r.sizes == [6, 3, 2] and r.activation == net.activation


def test_net_from_config_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown network type"):
        net_from_config({"type": "Nope", "sizes": [2, 2]})
