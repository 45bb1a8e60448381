"""The 784-pixel Fashion-MNIST teacher ``[784,64,64,10]`` on a validation split: its posterior's predictive (sampled
and linearized) against its own MAP point, for the settings the experiment files fix (the MAP step size and
schedule, the posterior structure, the SVI step of the mean, the covariance temperature). The test split is never
read: 10% of the training images (stratified, seeded) are held out as the validation split; with ``--tune f`` a
further fraction ``f`` of the rest is held out to choose the covariance temperature ``T``
(:func:`pyro_distill.evidence.tune_posterior_scale`, sampled predictive, or the linearized one with
``--tune-method linearized``), and the tuned posterior is reported on the validation split too.

    # experiments/fashion_mnist_lowrank.toml (SVI step of the mean)
    python benchmarks/fashion_teacher_lr.py --lr 1e-3 1e-4 3e-4 --steps 300
    # the MAP phase alone: constant step vs cosine decay
    python benchmarks/fashion_teacher_lr.py --map-only --map-schedule constant cosine --map-lr 1e-2 3e-3
    # experiments/fashion_mnist_kron.toml (Kronecker posterior, temperature tuned on a split of the training part)
    python benchmarks/fashion_teacher_lr.py --guide kron --map-schedule cosine --map-lr 3e-3 --lr 1e-4 --tune 0.1

Needs the Fashion-MNIST IDX files (``make data``). Each fit: 1,500 MAP steps, the Laplace start in the guide's
structure (low-rank: GGN diagonal + Lanczos, rank 20; kron: KFAC), then ``--steps`` SVI steps, batch 1,000, 8
particles; about 90-150 s at 300 steps on one thread (load ~2). ``--map-only``: about 25 s per setting.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from pyro_distill import metrics
from pyro_distill.data.specs import validation_split
from pyro_distill.evidence import tune_posterior_scale
from pyro_distill.experiments.mlp import load_data
from pyro_distill.gaussian import PointMass
from pyro_distill.inference import fit_map, fit_posterior, laplace_family
from pyro_distill.nets import MLP
from pyro_distill.training import SCHEDULES


def _show(name: str, net: MLP, q, X: torch.Tensor, y: torch.Tensor, samples: int) -> None:
    r = metrics.evaluate(net, q, X, y, num_samples=samples, seed=0)
    keys = ("accuracy", "nll", "ece", "accuracy_lin", "nll_lin", "ece_lin")
    # the sign of (mean confidence - accuracy) says whether averaging over weights (which softens) can help
    P = metrics.predict(net, q, X, num_samples=samples, seed=0)
    gap = float(P.max(-1).values.mean()) - float((P.argmax(-1) == y).double().mean())
    print(f"  {name}: " + ", ".join(f"{k} {r[k]:.4f}" for k in keys if k in r)
          + f", confidence - accuracy {gap:+.4f}", flush=True)


def _prior(net: MLP, args: argparse.Namespace):
    """The fan-in prior with its variance times ``--prior-scale`` (MAP, Laplace and SVI all use it)."""
    return net.default_prior(torch.float32).tempered(args.prior_scale)


def _fit(args: argparse.Namespace, ds, tune, schedule: str, map_lr: float, lr: float) -> None:
    net = MLP([784, 64, 64, 10])
    t0 = time.perf_counter()
    prior = _prior(net, args)
    q, h = fit_posterior(net, ds.X, ds.y, prior=prior, guide=args.guide, rank=20, map_steps=args.map_steps,
                         steps=args.steps,
                         lr=lr, batch_size=1000, seed=args.seed, num_particles=8, map_lr=map_lr,
                         map_schedule=schedule, factor_lr=args.factor_lr)
    print(f"{args.guide}: prior variance x {args.prior_scale:g}; MAP {schedule} lr {map_lr:g}; "
          f"SVI lr {lr:g} (factor lr {args.factor_lr or lr:g}), {args.steps} steps: fit "
          f"{time.perf_counter() - t0:.0f} s (Laplace {h.laplace_time_s:.0f} s, SVI {h.svi_time_s:.0f} s), "
          f"ELBO {h.elbo_start:.0f} -> {h.elbo_end:.0f}", flush=True)
    _show("MAP point", net, PointMass(h.map_weights), ds.Xte, ds.yte, 1)
    _show("posterior", net, q, ds.Xte, ds.yte, 100)
    if tune is not None:
        target = q
        if args.tune_param != "temperature":  # rebuild the Laplace per prior precision (the curvature once)
            if args.steps:
                raise SystemExit("--tune-param prior_precision/both rebuilds the Laplace start: use --steps 0")
            target = laplace_family(net, ds.X, h.map_weights, prior, kind=args.guide,
                                    rank=20, seed=args.seed, y=ds.y)
        qt, info = tune_posterior_scale(net, target, tune[0], tune[1], param=args.tune_param,
                                        method=args.tune_method, num_samples=50, seed=args.seed)
        print(f"  {args.tune_param} ({args.tune_method}): T = {info['temperature']:.4g}, prior precision x "
              f"{info['prior_precision']:.4g} (tuning NLL {info['nll']:.4f}; start: {info['nll_start']:.4f}; "
              f"MAP: {info['nll_map']:.4f}; at a bound: {info['at_bound']})", flush=True)
        _show(f"posterior, T = {info['temperature']:.3g}, alpha = {info['prior_precision']:.3g}", net, qt,
              ds.Xte, ds.yte, 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guide", default="lowrank", choices=["lowrank", "kron", "diag"])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-4])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--factor-lr", type=float, default=None,
                    help="SVI step of the covariance parameters (default: fit_posterior's, = --lr for these guides)")
    ap.add_argument("--validation", type=float, default=0.1)
    ap.add_argument("--tune", type=float, default=0.0,
                    help="hold out this fraction of the training part to choose the covariance temperature")
    ap.add_argument("--tune-method", default="mc", choices=["mc", "linearized"],
                    help="the predictive whose tuning NLL chooses T (the one the posterior will be used with)")
    ap.add_argument("--tune-param", default="temperature", choices=["temperature", "prior_precision", "both"],
                    help="what --tune chooses: the covariance temperature T, the prior precision scale alpha of the "
                         "Laplace (Lam = G + alpha P0, rebuilt per alpha; needs --steps 0), or both")
    ap.add_argument("--prior-scale", type=float, default=1.0,
                    help="the fan-in prior's variance times this (MAP, Laplace and SVI all use that prior)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--map-lr", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--map-schedule", nargs="+", default=["constant"], choices=SCHEDULES)
    ap.add_argument("--map-steps", type=int, default=1500)
    ap.add_argument("--map-only", action="store_true", help="fit and report the MAP point only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_data({"name": "fashion_mnist", "dir": "", "pca": 0, "max_train": 0, "dtype": "float32"},
                   torch.float32)
    ds = validation_split(ds, args.validation, seed=args.seed)
    tune = None
    if args.tune:
        part = validation_split(ds, args.tune, seed=args.seed + 1)
        tune = (part.Xte, part.yte)
        ds.X, ds.y = part.X, part.y
    print(f"train {ds.X.shape[0]} / validation {ds.Xte.shape[0]} images"
          + (f" / tuning {tune[0].shape[0]}" if tune else ""), flush=True)
    for schedule, map_lr in itertools.product(args.map_schedule, args.map_lr):
        if args.map_only:
            net = MLP([784, 64, 64, 10])
            t0 = time.perf_counter()
            w, _ = fit_map(net, ds.X, ds.y, _prior(net, args),
                           steps=args.map_steps, lr=map_lr, batch_size=1000, seed=args.seed,
                           schedule=schedule)
            print(f"MAP {schedule} lr {map_lr:g}, {args.map_steps} steps: {time.perf_counter() - t0:.0f} s",
                  flush=True)
            _show("MAP point", net, PointMass(w), ds.Xte, ds.yte, 1)
            continue
        for lr in args.lr:
            _fit(args, ds, tune, schedule, map_lr, lr)


if __name__ == "__main__":
    main()
