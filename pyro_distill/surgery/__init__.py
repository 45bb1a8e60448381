"""Network surgery: removal operations that map an architecture and the Gaussian over its weights."""

from .base import Operation, Plan, SurgeryError, apply, embed, operation_from_dict, register_operation

__all__ = ["Operation", "Plan", "SurgeryError", "apply", "embed", "operation_from_dict", "register_operation"]
