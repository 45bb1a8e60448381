"""``pyro-distill demo`` (what ``make run`` runs) and ``pyro-distill fit`` (a teacher posterior on digits)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

#: the demo: digits, teacher [64,32,32,10], student [64,16,10] on 10% of the training split; every method
DEMO_TOML = """
name = "demo"
kind = "mlp"
description = "make run: digits distillation demo, student [64,16,10] on 10% of the training data"
seeds = {seeds}
workers = {workers}

[data]
name = "digits"

[teacher]
sizes = [64, 32, 32, 10]
map_steps = 1500
steps = 1000

[students]
both = [64, 16, 10]

[student]
map_steps = 300
steps = 300

[distill]
taus = [1.0, 10.0]
fractions = [0.1]

[eval]
samples = 100
curve_every = 0

[save]
methods = []
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser("demo", help="digits distillation demo: teacher prior vs baselines at 10%% data")
    d.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    d.add_argument("--runs", default="runs", help="root of run directories (default: runs)")
    d.set_defaults(func=_demo)

    f = subparsers.add_parser("fit", help="fit a teacher posterior on digits and save it as a model folder")
    f.add_argument("--sizes", default="64,32,32,10", help="MLP widths, comma-separated (default 64,32,32,10)")
    f.add_argument("--out", required=True, help="model folder to create, e.g. models/digits-teacher")
    f.add_argument("--guide", default="mvn", choices=["mvn", "lowrank", "diag"])
    f.add_argument("--steps", type=int, default=300, help="SVI steps (default 300)")
    f.add_argument("--map-steps", type=int, default=1000, help="MAP steps before Laplace (default 1000)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--idata-draws", type=int, default=1000,
                   help="draws in the ArviZ idata.nc written beside the model (default 1000; 0: none)")
    f.set_defaults(func=_fit)


def _demo(args: argparse.Namespace) -> int:
    from ..experiments import run

    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "demo.toml"
        cfg.write_text(DEMO_TOML.format(seeds=args.seeds, workers=min(args.seeds, 2)))
        run_dir = run(cfg, runs_root=args.runs, models_root=str(Path(tmp) / "models"), echo=True)
    print()
    print((run_dir / "summary.md").read_text())
    print(f"run directory: {run_dir}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    import torch

    from .. import metrics
    from ..data import digits
    from ..inference import fit_posterior
    from ..nets.mlp import MLP
    from ..store import save_model

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError as exc:
        raise ValueError(f"--sizes must be comma-separated integers like 64,32,32,10, got {args.sizes!r}") from exc
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    ds = digits(seed=0)
    if sizes[0] != ds.num_features or sizes[-1] != ds.num_classes:
        raise ValueError(f"digits needs sizes starting with {ds.num_features} and ending with {ds.num_classes}, "
                         f"got {sizes}")
    torch.manual_seed(args.seed)
    net = MLP(sizes)
    q, hist = fit_posterior(net, ds.X, ds.y, guide=args.guide, steps=args.steps, map_steps=args.map_steps,
                            seed=args.seed, progress=True)
    res = metrics.evaluate(net, q, ds.Xte, ds.yte, seed=args.seed)
    save_model(out, net, q, {"data": {"name": "digits", "split_seed": 0}, "data_description": ds.description,
                             "role": "teacher", "guide": args.guide, "steps": args.steps,
                             "map_steps": args.map_steps, "seed": args.seed, "test": res,
                             "elbo_start": hist.elbo_start, "elbo_end": hist.elbo_end})
    print(f"saved {out}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
    if args.idata_draws > 0:
        from ..diagnostics import diagnose_model_folder

        diagnose_model_folder(out, ds.X, ds.y, draws=args.idata_draws)
        print(f"wrote {out / 'idata.nc'} ({args.idata_draws} draws on the training split; az.from_netcdf opens it)")
    return 0
