"""Experiments: TOML configs run by one runner (:mod:`.core`); each kind (``mlp``, ...) registers itself."""

from .core import (
    ConfigError,
    RunError,
    SeedContext,
    kinds,
    latest_run,
    load_config,
    read_rows,
    register_kind,
    run,
    summarize,
)

__all__ = ["ConfigError", "RunError", "SeedContext", "kinds", "latest_run", "load_config", "read_rows",
           "register_kind", "run", "summarize"]
