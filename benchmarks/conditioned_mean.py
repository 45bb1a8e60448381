"""How far does the surgery move the function? For each saved teacher of an MLP run: the test accuracy and NLL of
the teacher's posterior mean, and of the conditioned student prior's mean used as the student's weights (the
function the teacher-derived prior is centred on), with the median posterior / prior standard deviations.

    python benchmarks/conditioned_mean.py runs/fashion_mnist/<timestamp> models/fashion_mnist-<timestamp> --seeds 0 1

The plan is rebuilt exactly as the run built it (same config, same seed, the saved float32 posterior in float64).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyro_distill import metrics
from pyro_distill.experiments.mlp import PROTOCOL
from pyro_distill.gaussian import PointMass
from pyro_distill.store import open_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the run directory (its config.json is used)")
    ap.add_argument("models", type=Path, help="the run's model folder root, holding teacher-seed<k>/")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="default: every saved teacher")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = json.loads((args.run / "config.json").read_text())
    fam = PROTOCOL.family
    ds, split = PROTOCOL.dataset(cfg)
    folders = sorted(args.models.glob("teacher-seed*"))
    if not folders:
        raise SystemExit(f"no teacher-seed<k> folders in {args.models}; pass the run's models/<name>-<timestamp>")
    for folder in folders:
        seed = int(folder.name.rsplit("seed", 1)[1])
        if args.seeds is not None and seed not in args.seeds:
            continue
        m = open_model(folder)
        t = metrics.evaluate(m.net, PointMass(m.posterior.mean), ds.Xte, ds.yte, num_samples=1, seed=seed)
        for name, sizes in cfg["students"].items():
            student = fam.student_net(cfg, sizes, ds)
            prior, _ = fam.plan(cfg, m.net, m.posterior.to(dtype=torch.float64), student, seed)
            s = metrics.evaluate(student, PointMass(prior.mean.float()), ds.Xte, ds.yte, num_samples=1, seed=seed)
            print(f"seed {seed} student {name} ({split}): teacher mean accuracy {t['accuracy']:.3f} NLL {t['nll']:.3f}"
                  f" | conditioned prior mean accuracy {s['accuracy']:.3f} NLL {s['nll']:.3f}"
                  f" | median sd teacher {m.posterior.stddev.median():.4f} prior {prior.stddev.median():.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
