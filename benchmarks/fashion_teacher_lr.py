"""The 784-pixel Fashion-MNIST teacher of ``experiments/fashion_mnist_lowrank.toml`` on a validation split: its
low-rank posterior's predictive (sampled and linearized) against its own MAP point, for the SVI learning rate of
the mean. The test split is never read (10% of the training images, stratified, are held out).

    python benchmarks/fashion_teacher_lr.py --lr 1e-3 1e-4 3e-4 --steps 300

Needs the Fashion-MNIST IDX files (``make data``). Each fit: 1,500 MAP steps, the low-rank Laplace start from the
GGN (diagonal + Lanczos, rank 20), then ``--steps`` SVI steps, batch 1,000, 8 particles; about 90 s at 300 steps
on one thread (load ~2).
"""

from __future__ import annotations

import argparse
import time

import torch

from pyro_distill import metrics
from pyro_distill.data.specs import validation_split
from pyro_distill.experiments.mlp import load_data
from pyro_distill.gaussian import PointMass
from pyro_distill.inference import fit_posterior
from pyro_distill.nets import MLP


def _show(name: str, net: MLP, q, X: torch.Tensor, y: torch.Tensor, samples: int) -> None:
    r = metrics.evaluate(net, q, X, y, num_samples=samples, seed=0)
    keys = ("accuracy", "nll", "ece", "accuracy_lin", "nll_lin", "ece_lin")
    print(f"  {name}: " + ", ".join(f"{k} {r[k]:.4f}" for k in keys if k in r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-4])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--validation", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_data({"name": "fashion_mnist", "dir": "", "pca": 0, "max_train": 0, "dtype": "float32"},
                   torch.float32)
    ds = validation_split(ds, args.validation, seed=args.seed)
    print(f"train {ds.X.shape[0]} / validation {ds.Xte.shape[0]} images", flush=True)
    for lr in args.lr:
        net = MLP([784, 64, 64, 10])
        t0 = time.perf_counter()
        q, h = fit_posterior(net, ds.X, ds.y, guide="lowrank", rank=20, map_steps=1500, steps=args.steps, lr=lr,
                             batch_size=1000, seed=args.seed, num_particles=8)
        print(f"lr {lr:g}, {args.steps} SVI steps: fit {time.perf_counter() - t0:.0f} s (Laplace "
              f"{h.laplace_time_s:.0f} s, SVI {h.svi_time_s:.0f} s), ELBO {h.elbo_start:.0f} -> {h.elbo_end:.0f}",
              flush=True)
        _show("MAP point", net, PointMass(h.map_weights), ds.Xte, ds.yte, 1)
        _show("posterior", net, q, ds.Xte, ds.yte, 100)


if __name__ == "__main__":
    main()
