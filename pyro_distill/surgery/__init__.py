"""Network surgery: removal operations that map an architecture and the Gaussian over its weights, and the one
planner (:mod:`.planning`) that chooses them for every family."""

from .base import (
    Operation,
    Plan,
    Reduction,
    SurgeryError,
    apply,
    embed,
    operation_from_dict,
    register_operation,
    savage_dickey,
)
from .cnn import RemoveChannels, RemoveDenseNeurons, plan_cnn, remove_channels
from .mlp import RemoveLayer, RemoveNeurons, SameFamily, remove_layer, remove_neurons, same_family

# the compatibility module `plan` is imported here so that `surgery.plan` stays the function after it
from .plan import plan
from .planning import SELECTORS, Candidate, Family, Planner, candidates, register_family, score_candidates
from .rnn import ATTENTION_VARIANTS, RemoveAttention, remove_attention
from .transformer import RemoveAttentionSublayer, RemoveBlock, RemoveFFN, RemoveHead, plan_transformer

__all__ = ["Operation", "Plan", "SurgeryError", "apply", "embed", "operation_from_dict", "register_operation",
           "savage_dickey", "Reduction"]
__all__ += ["plan", "SELECTORS", "Candidate", "Family", "Planner", "candidates", "register_family",
            "score_candidates"]
__all__ += ["SameFamily", "RemoveNeurons", "RemoveLayer", "same_family", "remove_neurons", "remove_layer"]
__all__ += ["RemoveHead", "RemoveAttentionSublayer", "RemoveFFN", "RemoveBlock", "plan_transformer"]
__all__ += ["RemoveChannels", "RemoveDenseNeurons", "plan_cnn", "remove_channels"]
__all__ += ["RemoveAttention", "remove_attention", "ATTENTION_VARIANTS"]
