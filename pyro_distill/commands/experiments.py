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
    p.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes (task units: teacher fits, then per-cell student fits; whole "
                        "seeds for kinds without units); with --engine ray and no --address, the CPUs of the local Ray "
                        "instance (default: from the file)")
    p.add_argument("--engine", choices=["local", "ray"], default=None,
                   help="where the tasks run: local (a process pool, the default) or ray (Ray tasks; needs "
                        "pip install -e '.[ray]') (default: the file's engine, else local)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: the cluster to join, 'auto' (this machine ran `ray start`) or "
                        "ray://HOST:10001; default: the file's address, else a local Ray instance")
    p.add_argument("--overwrite", action="store_true",
                   help="let seeds replace model folders that already exist under <models>/NAME-<timestamp>/")
    p.set_defaults(func=_run)

    f = subparsers.add_parser("figures", help="regenerate every figure from the latest complete full run of each "
                                              "experiment (quick, unfinished and died runs are skipped)")
    f.add_argument("--runs", default="runs", help="root of run directories (default: runs)")
    f.add_argument("--out", default=None, help="output folder (default: figures; with --run: <run>/figures)")
    f.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="draw one run (any state, e.g. a --quick smoke run) instead; default output <run>/figures")
    f.add_argument("--include-quick", action="store_true",
                   help="let a complete --quick run publish into --out when it is the newest (not recommended)")
    f.set_defaults(func=_figures)


def _run(args: argparse.Namespace) -> int:
    from ..experiments import RunError, run
    from ..store import StorageError

    try:
        run_dir = run(args.config, quick=args.quick, runs_root=args.runs, models_root=args.models,
                      workers=args.workers, overwrite=args.overwrite, engine=args.engine, address=args.address)
    except (RunError, StorageError) as exc:
        print(f"pyro-distill run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"pyro-distill run: {exc or 'interrupted'} (status.json says interrupted; finished seeds are kept)",
              file=sys.stderr)
        return 130
    print((run_dir / "summary.md").read_text())
    print(f"run directory: {run_dir}")
    return 0


def _figures(args: argparse.Namespace) -> int:
    from ..plots.experiments import make_all, make_run

    if args.run:
        made = make_run(args.run, args.out)
        for p in made:
            print(p)
        return 0 if made else 1
    notes: list[str] = []
    made = make_all(args.runs, args.out or "figures", include_quick=args.include_quick, notes=notes)
    for n in notes:
        print(n, file=sys.stderr)
    if not made:
        print(f"no complete full runs under {args.runs}: run an experiment first "
              "(pyro-distill run experiments/digits.toml)", file=sys.stderr)
        return 1
    for p in made:
        print(p)
    return 0
