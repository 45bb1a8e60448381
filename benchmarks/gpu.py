"""GPU figures in one short run (< 8 minutes): SVI steps of pyro-distill against Pyro's autoguides, dense conditioning.

On the CUDA device it finds (exits 0 with a message when there is none), float32 unless stated, 8 particles:

* dense guide (``mvn``), digits data, under the fan-in prior: MLP [64,32,32,10] (p = 3,466), [64,256,10]
  (p = 19,210), then growing hidden widths until the device runs out of memory (the largest p that fits), ours
  (``fit_posterior(device="cuda")``, its own NaN guard included) against Pyro's ``AutoMultivariateNormal`` +
  ``Trace_ELBO(vectorize_particles=True)`` on the same Pyro model;
* dense guide under a dense (teacher-like) prior, whitened (``whiten="auto"``) and on the old path
  (``whiten=False``), at p = 3,466 and 19,210;
* low-rank + diagonal guide (rank 20) at p ~ 10^6 (MLP [784,1270,10], 10,000 random rows, minibatch 256), ours
  against ``AutoLowRankMultivariateNormal``;
* dense conditioning at p = 20,000 in float64 (fix 5,000 random coordinates): ``DenseGaussian.condition`` against
  the textbook Schur complement on the full covariance.

Times are per step after warm-up steps, with the device synchronized around them; the peak is
``torch.cuda.max_memory_allocated`` for the case. A case that runs out of memory prints OOM and the run goes on;
a global deadline (``--budget-s``, default 450 s) skips what would start after it.

    python benchmarks/gpu.py [--json out.json] [--budget-s 450]
    python benchmarks/gpu.py --smoke     # every case at tiny sizes on the CPU: checks the script, no figures
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for d in (ROOT, os.path.join(ROOT, "benchmarks")):
    if d not in sys.path:
        sys.path.insert(0, d)

PARTICLES = 8
RANK = 20
WARM = 2
T0 = time.perf_counter()
#: sizes of the full run and of the CPU smoke run
SIZES = {
    "full": {"dense": [([64, 32, 32, 10], 20), ([64, 256, 10], 10)],
             "widths": (400, 530, 660, 800, 930, 1060, 1330, 1600, 2000, 2400),
             "dense_prior": [([64, 32, 32, 10], 20), ([64, 256, 10], 5)],
             "lowrank": ([784, 1270, 10], 10_000, 20), "condition": (20_000, 5_000)},
    "smoke": {"dense": [([64, 8, 10], 2)], "widths": (8, 12), "dense_prior": [([64, 8, 10], 2)],
              "lowrank": ([784, 20, 10], 1_000, 2), "condition": (300, 50)},
}


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _free() -> None:
    import pyro

    pyro.clear_param_store()
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if _cuda() else float("nan")


def _start(net, prior, guide: str, dev):
    """A prior draw as the mean, the prior's scale / 10 as the covariance, built on the device."""
    from pyro_distill.gaussian import DenseGaussian, DiagGaussian, LowRankGaussian

    w0 = net.init_weights(torch.Generator().manual_seed(1), torch.float32).to(dev)
    s = 0.1 * prior.variance.sqrt().to(dev, torch.float32)
    if guide == "mvn":
        return DenseGaussian(w0, torch.diag(s), layout=net.layout)
    if guide == "diag":
        return DiagGaussian(w0, s, layout=net.layout)
    g = torch.Generator(device=dev).manual_seed(1)
    W = torch.randn(net.num_params, RANK, generator=g, device=dev) * (0.1 * s.unsqueeze(-1) / math.sqrt(RANK))
    return LowRankGaussian(w0, W, s**2, layout=net.layout)


def ours(net, X, y, prior, guide: str, steps: int, batch_size=None, whiten="auto") -> dict:
    from pyro_distill.inference import fit_posterior

    _free()
    start = _start(net, prior, guide, X.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync()
        _, h = fit_posterior(net, X, y, guide=guide, prior=prior, init=start, steps=WARM + steps, lr=1e-3,
                             num_particles=PARTICLES, batch_size=batch_size, rank=RANK, seed=0,
                             elbo_eval_particles=1, device=X.device, whiten=whiten, progress=False)
    # time_s is read after each step's NaN guard, which synchronizes with the device
    return {"ms": 1e3 * (h.time_s[-1] - h.time_s[WARM - 1]) / steps, "peak_gb": _peak_gb(),
            "whiten": h.info.get("whiten")}


def pyro_autoguide(net, X, y, prior, guide: str, steps: int, batch_size=None) -> dict:
    from svi_step import pyro_svi

    _free()
    w0 = net.init_weights(torch.Generator().manual_seed(1), torch.float32).to(X.device)
    svi, _ = pyro_svi(net, X, y, prior, guide, batch_size, w0=w0)
    for _ in range(WARM):
        svi.step(X, y)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        svi.step(X, y)
    _sync()
    return {"ms": 1e3 * (time.perf_counter() - t0) / steps, "peak_gb": _peak_gb()}


def attempt(fn, *a, **kw) -> dict:
    try:
        return fn(*a, **kw)
    except torch.cuda.OutOfMemoryError:  # a CUDA out-of-memory error is this subclass of RuntimeError
        return {"oom": True}
    except Exception as exc:  # noqa: BLE001 -- one failing case must not cost the rest of the run
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    finally:
        _free()


def fmt(r: dict) -> str:
    if r.get("oom"):
        return "OOM"
    if r.get("error"):
        return f"failed: {r['error']}"
    if r.get("skipped"):
        return "skipped (deadline)"
    return f"{r['ms']:9.1f} ms/step, peak {r['peak_gb']:6.1f} GB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip cases that would start after this (450 s)")
    ap.add_argument("--max-dense-p", type=int, default=200_000, help="stop the largest-p search here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    args = ap.parse_args()
    sz = SIZES["smoke" if args.smoke else "full"]
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device is available (torch.cuda.is_available() is False); nothing to "
              "measure. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
        return 0

    import pyro
    from svi_step import dense_student_prior

    from pyro_distill import data
    from pyro_distill.gaussian import DenseGaussian
    from pyro_distill.nets import MLP

    if args.smoke:
        dev, name, mem = torch.device("cpu"), "CPU smoke run (tiny sizes, figures meaningless)", float("nan")
    else:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        name, mem = props.name, props.total_memory / 2**30
    print(f"gpu benchmark: {name}, {mem:.0f} GiB, torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{PARTICLES} particles, float32", flush=True)
    report: dict = {"device": name, "memory_gib": mem, "cases": {}}

    def late() -> bool:
        return time.perf_counter() - T0 > args.budget_s

    def record(name: str, r: dict) -> dict:
        report["cases"][name] = r
        print(f"  {name:48s} {fmt(r)}", flush=True)
        return r

    ds = data.digits(dtype=torch.float32)
    X, y = ds.X.to(dev), ds.y.to(dev)

    print("dense guide, digits, fan-in prior: ours vs Pyro AutoMultivariateNormal", flush=True)
    for sizes, steps in sz["dense"]:
        net = MLP(sizes)
        prior = net.default_prior(torch.float32, dev)
        for who, fn in (("ours", ours), ("pyro", pyro_autoguide)):
            record(f"mvn p={net.num_params} {who}", {"skipped": True} if late() else
                   attempt(fn, net, X, y, prior, "mvn", steps))

    print("largest dense p that fits (hidden width grows; 3 steps each)", flush=True)
    for who, fn in (("ours", ours), ("pyro", pyro_autoguide)):
        best = None
        for h in sz["widths"]:
            net = MLP([64, h, 10])
            if net.num_params > args.max_dense_p or late():
                break
            r = record(f"mvn p={net.num_params} {who}", attempt(fn, net, X, y, net.default_prior(torch.float32, dev),
                                                                "mvn", 3))
            if r.get("oom") or r.get("error"):
                break
            best = net.num_params
        report["cases"][f"largest dense p {who}"] = best
        print(f"  largest dense p that fits, {who}: {best}", flush=True)

    print("dense guide under a dense (teacher-like) prior: whitened vs old path", flush=True)
    for sizes, steps in sz["dense_prior"]:
        net = MLP(sizes)
        if late():
            break
        prior = dense_student_prior(net, device=dev)
        for wh in ("auto", False):
            record(f"mvn dense prior p={net.num_params} whiten={wh}",
                   {"skipped": True} if late() else attempt(ours, net, X, y, prior, "mvn", steps, whiten=wh))
        del prior

    lsizes, nrows, lsteps = sz["lowrank"]
    print(f"low-rank guide (rank {RANK}), p = {MLP(lsizes).num_params:,}, {nrows:,} random rows, minibatch 256",
          flush=True)
    if not late():
        g = torch.Generator(device=dev).manual_seed(0)
        Xr = torch.randn(nrows, lsizes[0], generator=g, device=dev)
        yr = torch.randint(0, lsizes[-1], (nrows,), generator=g, device=dev)
        net = MLP(lsizes)
        prior = net.default_prior(torch.float32, dev)
        for who, fn in (("ours", ours), ("pyro", pyro_autoguide)):
            record(f"lowrank p={net.num_params} {who}", {"skipped": True} if late() else
                   attempt(fn, net, Xr, yr, prior, "lowrank", lsteps, batch_size=256))
        del Xr, yr, prior

    print(f"dense conditioning, p = {sz['condition'][0]:,}, float64, {sz['condition'][1]:,} coordinates fixed",
          flush=True)
    if not late():
        def conditioning() -> dict:
            p, k = sz["condition"]
            g = torch.Generator(device=dev).manual_seed(0)
            L = torch.randn(p, p, generator=g, device=dev, dtype=torch.float64).tril_().mul_(0.3 / math.sqrt(p))
            L.diagonal().add_(1.0)
            q = DenseGaussian(torch.zeros(p, device=dev, dtype=torch.float64), L)
            idx = torch.randperm(p, generator=g, device=dev)[:k]
            q.condition(idx[:100], 0.0)  # warm-up (kernels, workspace)
            _sync()
            t0 = time.perf_counter()
            out = q.condition(idx, 0.0)
            _sync()
            ours_s = time.perf_counter() - t0
            del out
            _free()
            keep = torch.ones(p, dtype=torch.bool, device=dev)
            keep[idx] = False
            K = keep.nonzero().squeeze(-1)
            _sync()
            t0 = time.perf_counter()
            S = L @ L.T
            C = torch.linalg.cholesky(S[idx][:, idx])
            X_ = torch.cholesky_solve(S[idx][:, K], C)
            torch.linalg.cholesky(S[K][:, K] - S[K][:, idx] @ X_)
            _sync()
            return {"ms": 1e3 * ours_s, "textbook_ms": 1e3 * (time.perf_counter() - t0), "peak_gb": _peak_gb()}

        r = attempt(conditioning)
        report["cases"][f"condition dense p={sz['condition'][0]}"] = r
        print(f"  condition dense p={sz['condition'][0]}: " + (fmt(r) if "ms" not in r else
              f"ours {r['ms']:.0f} ms, textbook Schur complement {r['textbook_ms']:.0f} ms, "
              f"peak {r['peak_gb']:.1f} GB"), flush=True)

    total = time.perf_counter() - T0
    report["total_s"] = total
    print(f"total wall time {total:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
