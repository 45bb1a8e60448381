"""The ``pyro-distill`` command. Each area adds its subcommands in its own ``cli`` function
(``register(subparsers)``), listed in :data:`COMMAND_MODULES`; this file holds no mathematics."""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules that define ``register(subparsers)``; each adds one or more subcommands
COMMAND_MODULES = [
    "pyro_distill.commands.fit",          # fit (teacher posterior), demo
    "pyro_distill.commands.surgery",      # plan, distill
    "pyro_distill.commands.experiments",  # run, figures
    "pyro_distill.commands.diagnose",     # diagnose
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-distill", description="Bayesian distillation of neural networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue  # that area is not installed in this tree
            raise
        m.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"pyro-distill {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
