"""Networks as Pyro models over one flat latent site ``"w"``."""

from .base import LIKELIHOODS, BayesianNet, net_from_config, register_net
from .mlp import ACTIVATIONS, IDEMPOTENT, MLP

__all__ = ["BayesianNet", "MLP", "ACTIVATIONS", "IDEMPOTENT", "LIKELIHOODS", "net_from_config", "register_net"]
from .attention_rnn import AttentionRNN  # noqa: E402,F401
from .cnn import CNN  # noqa: E402,F401
from .transformer import Transformer  # noqa: E402,F401
