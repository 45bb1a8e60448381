"""Network surgery: removal operations that map an architecture and the Gaussian over its weights."""

from .base import Operation, Plan, SurgeryError, apply, embed, operation_from_dict, register_operation
from .mlp import RemoveLayer, RemoveNeurons, SameFamily, remove_layer, remove_neurons, same_family
from .plan import SELECTORS, plan

__all__ = ["Operation", "Plan", "SurgeryError", "apply", "embed", "operation_from_dict", "register_operation"]
__all__ += ["SameFamily", "RemoveNeurons", "RemoveLayer", "same_family", "remove_neurons", "remove_layer",
            "plan", "SELECTORS"]
from .transformer import RemoveAttentionSublayer, RemoveBlock, RemoveFFN, RemoveHead  # noqa: E402, I001
from .transformer import plan_transformer, transformer_scores  # noqa: E402, I001

__all__ += ["RemoveHead", "RemoveAttentionSublayer", "RemoveFFN", "RemoveBlock", "plan_transformer",
            "transformer_scores"]
from .cnn import RemoveChannels, RemoveDenseNeurons, plan_cnn, remove_channels  # noqa: E402,F401
from .rnn import ATTENTION_VARIANTS, RemoveAttention, remove_attention  # noqa: E402,F401
