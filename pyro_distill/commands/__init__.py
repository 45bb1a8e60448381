"""Subcommands of ``pyro-distill``, one module per area."""
