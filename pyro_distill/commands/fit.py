"""``pyro-distill demo`` (what ``make run`` runs) and ``pyro-distill fit``.

* ``pyro-distill fit --data NAME --out models/<name>`` fits a teacher posterior (MAP -> Laplace -> SVI) on a
  shipped or installed data set (the names ``pyro_distill.data.specs`` registers: digits,
  synthetic_classification, synthetic_regression, fashion_mnist when its files are installed);
* ``pyro-distill fit --data NAME --prior models/<student-prior> --out models/<name>`` fits the student whose
  architecture and prior a ``pyro-distill distill`` folder holds, started at the prior mean (as
  ``pyro_distill.distill`` does), optionally tempered (``--tau``).

Either way the result is a model folder (``store.save_model``: posterior.pt + card.json with the data spec,
plus idata.nc; a student also gets prior.pt and the plan, so that ``pyro-distill diagnose`` adds the prior row).
"""

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
methods = ["teacher"]
idata_draws = 1000
"""


DATA_NAMES = ("digits", "synthetic_classification", "synthetic_regression", "fashion_mnist")


def register(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser("demo", help="digits distillation demo: teacher prior vs baselines at 10%% data")
    d.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    d.add_argument("--runs", default="runs", help="root of run directories (default: runs)")
    d.add_argument("--models", default="models",
                   help="root of saved models: the teacher goes to <models>/demo-<timestamp>/teacher-seed0 "
                        "(default: models)")
    d.set_defaults(func=_demo)

    f = subparsers.add_parser(
        "fit", help="fit a teacher, or (--prior) a student under a distilled prior, and save it as a model folder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--data", default="digits", metavar="NAME",
                   help=f"data set: {', '.join(DATA_NAMES)} (default digits)")
    f.add_argument("--split-seed", type=int, default=0, help="train/test split (and generator) seed (default 0)")
    f.add_argument("--fraction", type=float, default=1.0,
                   help="fit on this stratified fraction of the training split (default 1; subsample seed = --seed)")
    f.add_argument("--max-train", type=int, default=0, help="fashion_mnist: keep this many training images (0: all)")
    f.add_argument("--prior", default=None, metavar="FOLDER",
                   help="a folder written by `pyro-distill distill`: fit its student under its prior")
    f.add_argument("--tau", type=float, default=1.0, help="with --prior: temper the prior's covariance by tau >= 1")
    f.add_argument("--sizes", default=None,
                   help="teacher MLP widths, comma-separated (default: <features>,32,32,<classes or 1>); "
                        "with --prior the prior's network is used")
    f.add_argument("--out", required=True, help="model folder to create, e.g. models/digits-teacher")
    f.add_argument("--overwrite", action="store_true", help="replace the model in an existing --out folder")
    f.add_argument("--guide", default="dense", choices=["dense", "mvn", "lowrank", "diag"])  # mvn = dense
    f.add_argument("--steps", type=int, default=300, help="SVI steps (default 300)")
    f.add_argument("--map-steps", type=int, default=1000, help="MAP steps before Laplace (default 1000)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--idata-draws", type=int, default=1000,
                   help="draws in the ArviZ idata.nc written beside the model (default 1000 = 4 chains x 250; "
                        "0: none)")
    f.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only when stderr is a terminal and $CI is unset)")
    f.set_defaults(func=_fit)


def _demo(args: argparse.Namespace) -> int:
    from ..experiments import run

    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "demo.toml"
        cfg.write_text(DEMO_TOML.format(seeds=args.seeds, workers=min(args.seeds, 2)))
        run_dir = run(cfg, runs_root=args.runs, models_root=args.models, echo=True)
    print()
    print((run_dir / "summary.md").read_text())
    print(f"run directory: {run_dir}")
    teachers = sorted(Path(args.models).glob(f"demo-{run_dir.name}/teacher-seed*"))
    for t in teachers:
        print(f"teacher model folder (posterior.pt, card.json, idata.nc): {t}")
    return 0


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError as exc:
        raise ValueError(f"--sizes must be comma-separated integers like 64,32,32,10, got {text!r}") from exc
    if len(sizes) < 2:
        raise ValueError(f"--sizes needs at least the input and output widths, got {text!r}")
    return sizes


def _fit(args: argparse.Namespace) -> int:
    from .. import metrics
    from ..data import subsample
    from ..data.specs import load as load_data_spec
    from ..inference import fit_posterior
    from ..nets.mlp import MLP
    from ..store import check_writable, save_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # refused before any fitting
        raise FileExistsError(f"{out} exists and is not empty; choose another --out, or pass --overwrite to replace "
                              "the model in it")
    check_writable(out.parent, what="--out folder")
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must lie in (0, 1], got {args.fraction}")
    spec: dict = {"name": args.data, "split_seed": args.split_seed}
    if args.max_train:
        spec["max_train"] = args.max_train
    ds = load_data_spec(spec)
    if args.fraction < 1:
        ds = subsample(ds, args.fraction, seed=args.seed)
        spec |= {"fraction": args.fraction, "subsample_seed": args.seed}
    reg = ds.num_classes is None
    n_out = 1 if reg else ds.num_classes
    card: dict = {"data": spec, "data_description": ds.description, "guide": args.guide, "steps": args.steps,
                  "map_steps": args.map_steps, "seed": args.seed}
    prior = None
    if args.prior is not None:
        net, prior, pcard = _student_prior(Path(args.prior), args.tau)
        if args.sizes is not None and _parse_sizes(args.sizes) != list(getattr(net, "sizes", [])):
            raise ValueError(f"--sizes {args.sizes} differs from the prior's network {net!r}; drop --sizes")
        card |= {"role": "student (fitted under a distilled prior)", "prior_folder": str(args.prior),
                 "tau": args.tau}
        for key in ("teacher", "plan"):
            if key in pcard:
                card[key] = pcard[key]
        init = "prior"
    else:
        sizes = _parse_sizes(args.sizes) if args.sizes else [ds.num_features, 32, 32, n_out]
        net = MLP(sizes, likelihood="gaussian" if reg else "categorical", noise_scale=0.5 if reg else 1.0)
        card["role"] = "teacher"
        init = "map"
    sizes = list(getattr(net, "sizes", []))
    if sizes and (sizes[0] != ds.num_features or sizes[-1] != n_out):
        raise ValueError(f"{args.data} needs a network from {ds.num_features} inputs to {n_out} outputs, got "
                         f"{sizes}" + (" (the prior's network)" if prior is not None else ""))
    p, size = net.num_params, ds.X.element_size() if ds.X.is_floating_point() else 4
    need = size * (p * p if args.guide in ("dense", "mvn") else p * 22 if args.guide == "lowrank" else 2 * p)
    check_writable(out.parent, need * (2 if prior is not None else 1), what="--out folder")  # before the fit
    q, hist = fit_posterior(net, ds.X, ds.y, guide=args.guide, prior=prior, steps=args.steps,
                            map_steps=args.map_steps, init=init, seed=args.seed, progress=args.progress)
    res = metrics.evaluate(net, q, ds.Xte, ds.yte, seed=args.seed)
    save_model(out, net, q, card | {"test": res, "elbo_start": hist.elbo_start, "elbo_end": hist.elbo_end},
               overwrite=args.overwrite, prior=prior)
    print(f"saved {out} ({card['role']}, {net!r}): " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
    if args.idata_draws > 0:
        from ..diagnostics import diagnose_model_folder

        diagnose_model_folder(out, ds.X, ds.y, draws=args.idata_draws, prior=prior)
        print(f"wrote {out / 'idata.nc'} ({args.idata_draws} draws on the training split; az.from_netcdf opens it)")
    return 0


def _student_prior(folder: Path, tau: float):
    """``(student net, prior, card)`` from a ``pyro-distill distill`` folder (prior.pt, else posterior.pt)."""
    from ..store import open_model

    m = open_model(folder)
    net, card = m.net, m.card
    prior = m.prior if m.prior is not None else m.posterior
    if not tau >= 1:
        raise ValueError(f"--tau must be >= 1 (1 = the distilled prior as it is, larger = weaker), got {tau}")
    if tau != 1:
        prior = prior.tempered(float(tau))
    prior.layout = net.layout
    return net, prior, card
