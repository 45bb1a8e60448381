"""Does the Laplace start predict as well as its MAP point? Digits MLP, every structure, both predictives.

The training split of digits is split again (80/20, stratified, seeded) into a fit part and a validation part;
the test split is never read. For each seed: MAP by Adam on the fit part; Laplace in every structure at that MAP
under (a) the fan-in prior and (b) per-layer prior precisions tuned by the Laplace evidence
(:func:`pyro_distill.evidence.optimize_prior`, on the fit part only); validation NLL / accuracy / ECE of the MAP
point, the sampled predictive and the linearized predictive; the time of each Laplace fit.

    python benchmarks/laplace_quality.py [--seeds 3] [--sizes 64,32,32,10] [--map-steps 1500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from sklearn.model_selection import train_test_split

from pyro_distill import metrics
from pyro_distill.data import digits
from pyro_distill.evidence import optimize_prior
from pyro_distill.inference import fit_map, laplace
from pyro_distill.nets import MLP

STRUCTURES = ("dense", "diag", "lowrank", "lowrank_precision", "kron")


def _split(seed: int):
    d = digits(seed=0, dtype=torch.float64)
    idx = torch.arange(d.X.shape[0])
    fit, val = train_test_split(idx.numpy(), test_size=0.2, random_state=seed, stratify=d.y.numpy())
    return d.X[fit], d.y[fit], d.X[val], d.y[val]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default="64,32,32,10")
    ap.add_argument("--map-steps", type=int, default=1500)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--samples", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"digits MLP {sizes}, {a.seeds} seeds, validation split carved from train (test split unused); "
          f"load {os.getloadavg()[0]:.2f} (1 min), one torch thread")
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for seed in range(a.seeds):
        X, y, Xv, yv = _split(seed)
        net = MLP(sizes)
        w, _ = fit_map(net, X, y, steps=a.map_steps, lr=1e-2, seed=seed)
        rows.setdefault(("MAP", "-", "point"), []).append(metrics.evaluate(net, w, Xv, yv) | {"time": 0.0})
        priors = {"fan-in": net.default_prior(torch.float64)}
        t0 = time.perf_counter()
        priors["evidence"], info = optimize_prior(net, X, y, w, structure="kron" if net.bias else "diag")
        t_ev = time.perf_counter() - t0
        print(f"seed {seed}: evidence-tuned precisions {[round(p, 2) for p in info['precisions']]} "
              f"(log evidence {info['log_evidence_start']:.1f} -> {info['log_evidence']:.1f}, {t_ev:.1f}s)")
        for pname, prior in priors.items():
            for kind in STRUCTURES:
                t0 = time.perf_counter()
                q = laplace(net, X, w, prior, kind=kind, rank=a.rank, seed=seed)
                dt = time.perf_counter() - t0
                res = metrics.evaluate(net, q, Xv, yv, num_samples=a.samples, seed=seed)
                rows.setdefault((kind, pname, "sampled"), []).append(
                    {k: res[k] for k in ("nll", "accuracy", "ece")} | {"time": dt})
                rows.setdefault((kind, pname, "linearized"), []).append(
                    {k: res[k + "_lin"] for k in ("nll", "accuracy", "ece")} | {"time": dt})
    print()
    print("| structure | prior | predictive | val NLL | val accuracy | val ECE | Laplace time (s) |")
    print("|---|---|---|---|---|---|---|")
    for (kind, pname, pred), rs in rows.items():
        def ms(k: str, rs=rs) -> str:
            v = [r[k] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.3f} ± {sd:.3f}"
        print(f"| {kind} | {pname} | {pred} | {ms('nll')} | {ms('accuracy')} | {ms('ece')} | "
              f"{statistics.mean(r['time'] for r in rs):.2f} |")
    print(f"\nload after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
