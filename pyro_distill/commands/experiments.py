"""``pyro-distill run experiments/NAME.toml [--quick]`` and ``pyro-distill figures``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run an experiment TOML (seeds in parallel) into runs/NAME/<timestamp>/")
    p.add_argument("config", help="experiment file, e.g. experiments/digits.toml")
    p.add_argument("--quick", action="store_true", help="apply the file's [quick] overrides (a smoke run)")
    p.add_argument("--runs", default="runs", help="root of run directories (default: runs)")
    p.add_argument("--models", default="models", help="root of saved models (default: models)")
    p.add_argument("--workers", type=int, default=None, help="parallel seed processes (default: from the file)")
    p.set_defaults(func=_run)

    f = subparsers.add_parser("figures", help="regenerate every figure from the latest complete run of each experiment")
    f.add_argument("--runs", default="runs", help="root of run directories (default: runs)")
    f.add_argument("--out", default="figures", help="output folder (default: figures)")
    f.set_defaults(func=_figures)


def _run(args: argparse.Namespace) -> int:
    from ..experiments import RunError, run

    try:
        run_dir = run(args.config, quick=args.quick, runs_root=args.runs, models_root=args.models,
                      workers=args.workers)
    except RunError as exc:
        print(f"pyro-distill run: {exc}", file=sys.stderr)
        return 1
    print((run_dir / "summary.md").read_text())
    print(f"run directory: {run_dir}")
    return 0


def _figures(args: argparse.Namespace) -> int:
    from ..plots.experiments import make_all

    made = make_all(args.runs, args.out)
    if not made:
        print(f"no complete runs under {args.runs}: run an experiment first (pyro-distill run experiments/digits.toml)",
              file=sys.stderr)
        return 1
    for p in made:
        print(p)
    return 0
