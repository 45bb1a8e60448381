"""The ``pyro-distill`` command. Each area adds its subcommands in its own ``cli`` function
(``register(subparsers)``), listed in :data:`COMMAND_MODULES`; this file holds no mathematics.

Imports stay lazy: no command module imports torch or Pyro at module level or in ``register``, so
``pyro-distill --help`` and every ``pyro-distill COMMAND --help`` answer without loading them.

Thread policy: torch's intra-op threads, one per process unless the user sets a number
(``--threads N``, else ``$PYRO_DISTILL_THREADS``, else ``$OMP_NUM_THREADS``). The networks here are small
(p up to ~100k): a second thread saves little when the machine is idle and, when the cores are
shared, makes each step many times slower (see README, "Threads").
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

__all__ = ["COMMAND_MODULES", "build_parser", "main", "thread_count", "apply_thread_policy"]

#: modules that define ``register(subparsers)``; each adds one or more subcommands
COMMAND_MODULES = [
    "pyro_distill.commands.fit",          # fit (teacher, or student under a distilled prior), demo
    "pyro_distill.commands.surgery",      # plan, distill
    "pyro_distill.commands.experiments",  # run, figures
    "pyro_distill.commands.diagnose",     # diagnose
]

THREADS_ENV = "PYRO_DISTILL_THREADS"


def _threads_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be a positive integer, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-distill", description="Bayesian distillation of neural networks.")
    threads_help = (f"torch threads for this process (default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else 1: "
                    "one thread per process suits these small networks)")
    parser.add_argument("--threads", type=_threads_arg, default=None, metavar="N", help=threads_help)
    parser.add_argument("-v", "--verbose", action="store_true", default=None,
                        help="log one line per fitting phase (MAP, Laplace, SVI with ELBO start -> end); "
                             "always on for fit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue  # that area is not installed in this tree
            raise
        m.register(sub)
    for sp in sub.choices.values():  # the same options after the command name (SUPPRESS: keep the global one)
        sp.add_argument("--threads", type=_threads_arg, default=argparse.SUPPRESS, metavar="N", help=threads_help)
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log one line per fitting phase")
    return parser


def thread_count(threads: int | None = None, environ: dict[str, str] | None = None) -> tuple[int, str]:
    """``(n, where it came from)``: ``threads``, else ``$PYRO_DISTILL_THREADS``, else ``$OMP_NUM_THREADS``, else 1."""
    env = os.environ if environ is None else environ
    if threads is not None:
        return int(threads), "--threads"
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        if env.get(name, "").strip():
            try:
                n = int(env[name])
            except ValueError:
                raise ValueError(f"${name}={env[name]!r} is not a thread count; set a positive integer") from None
            if n < 1:
                raise ValueError(f"${name}={env[name]!r}: set a positive integer")
            return n, f"${name}"
    return 1, "default (one thread per process)"


def apply_thread_policy(threads: int | None = None) -> int:
    """Set torch's intra-op thread count by :func:`thread_count`; returns it."""
    import torch

    n, _ = thread_count(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if threads is not None:  # experiment workers (other processes) follow an explicit --threads too
        os.environ[THREADS_ENV] = str(n)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.verbose or args.command == "fit":  # fit: one line per phase by default (run/demo print their own)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        lg = logging.getLogger("pyro_distill")  # ours only (arviz and others stay at their level)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        apply_thread_policy(args.threads)
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as exc:  # OSError: store.StorageError (full disk, read-only folder)
        print(f"pyro-distill {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
