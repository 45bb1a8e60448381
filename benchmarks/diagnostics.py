"""Cost of the ArviZ diagnostics (one run, CPU, times printed).

1. A p ~ 3.4k model (MLP [64, 32, 32, 10], dense Gaussian from MAP + Laplace on the digits training split):
   InferenceData with 1,000 draws, PSIS-LOO, WAIC, the q k-hat and the netCDF write, on the digits test
   split (N=360; target < 30 s) and, for reference, on the training split (N=1,437).
2. The NUTS reference for a small net (p <= 200): MLP [10, 8, 3] (p = 115) on a synthetic 3-class set
   (500 training rows), 4 chains x (warmup + samples) started at draws of the SVI dense Gaussian; R-hat,
   ESS, and the Gaussian vs NUTS comparison (target < 5 minutes).

    .venv/bin/python benchmarks/diagnostics.py [--skip-nuts] [--skip-large] [--samples 200 --warmup 200 --tree-depth 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

from pyro_distill import diagnostics as D
from pyro_distill.data import digits, synthetic_classification
from pyro_distill.inference import fit_map, fit_posterior, laplace
from pyro_distill.nets import MLP


def large(draws: int) -> None:
    ds = digits(seed=0)
    net = MLP([64, 32, 32, 10])
    t0 = time.perf_counter()
    w, _ = fit_map(net, ds.X, ds.y, steps=500, lr=1e-2)
    q = laplace(net, ds.X, w, net.default_prior())
    print(f"[setup] MAP + Laplace for {net!r}: {time.perf_counter() - t0:.1f} s (not part of the diagnostics)")
    for split, (X, y) in (("test", (ds.Xte, ds.yte)), ("train", (ds.X, ds.y))):
        times = {}
        t, c = time.perf_counter(), time.process_time()
        idata = D.to_inference_data(net, q, X, y, draws=draws, seed=0)
        times["to_inference_data"] = time.perf_counter() - t
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loo = D.az.loo(idata, pointwise=True)
            D.az.waic(idata)
        times["loo+waic"] = time.perf_counter() - t
        t = time.perf_counter()
        k = D.khat_from_idata(idata)
        times["khat"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            path = D.save_idata(tmp, idata)
            times["netcdf write"] = time.perf_counter() - t
            size = path.stat().st_size / 2**20
        total, cpu = sum(times.values()), time.process_time() - c
        detail = ", ".join(f"{a} {b:.2f} s" for a, b in times.items())
        print(f"[p={net.num_params}, {draws} draws, {split} N={X.shape[0]}] total {total:.1f} s wall, "
              f"{cpu:.1f} s CPU ({detail}); "
              f"idata.nc {size:.1f} MiB; elpd_loo {loo.elpd_loo:.1f}; q {k}")


def nuts(samples: int, warmup: int, chains: int, tree_depth: int) -> None:
    ds = synthetic_classification(n_train=500, n_test=1000, n_features=10, n_classes=3, seed=0).to(torch.float64)
    net = MLP([10, 8, 3])
    t0 = time.perf_counter()
    q, _ = fit_posterior(net, ds.X, ds.y, guide="mvn", steps=300, map_steps=1000, seed=0)
    print(f"[setup] SVI dense for {net!r}: {time.perf_counter() - t0:.1f} s")
    t0, c0 = time.perf_counter(), time.process_time()
    ref = D.nuts_reference(net, ds.X, ds.y, num_chains=chains, num_samples=samples, warmup_steps=warmup, init=q,
                           seed=0, max_tree_depth=tree_depth)
    t_nuts, c_nuts = time.perf_counter() - t0, time.process_time() - c0
    summ = D.reference_summary(ref)
    rhat = max(s["rhat_max"] for s in summ.values())
    ess = min(s["ess_bulk_min"] for s in summ.values())
    print(f"[NUTS p={net.num_params}, N={ds.X.shape[0]}, {chains} chains x ({warmup} warmup + {samples} draws), "
          f"max tree depth {tree_depth}] {t_nuts:.1f} s wall, {c_nuts:.1f} s CPU; "
          f"max R-hat {rhat:.3f}, min bulk ESS {ess:.0f}; "
          f"divergences per chain {ref.attrs['divergences_per_chain']}")
    cmp = D.compare_to_reference(net, q, ref, ds.X, ds.y, draws=1000, Xte=ds.Xte)
    for b, v in cmp["blocks"].items():
        print(f"  {b:<14} mean error {v['mean_err_sd']:.3f} sd_ref; var ratio q/ref geo {v['var_ratio_geo']:.2f}, "
              f"median {v['var_ratio_median']:.2f}; R-hat {summ[b]['rhat_max']:.3f}, ESS {summ[b]['ess_bulk_min']:.0f}")
    print(f"  predictive on test: {cmp['predictive']}; elpd_loo q {cmp['elpd_loo_q']:.1f} vs NUTS "
          f"{cmp['elpd_loo_ref']:.1f} (diff {cmp['elpd_loo_diff']:.1f}, se_ref {cmp['se_loo_ref']:.1f})")
    print(f"  q {D.posterior_khat(net, q, ds.X, ds.y, draws=1000)}")


def digits_run(folder: str, teacher_steps: int, student_steps: int) -> None:
    """Teacher [64,32,32,10] (dense SVI) -> plan -> student prior for [64,16,10] -> student SVI under it, saved
    as model folders (with the student's prior.pt and the plan in its card) for `pyro-distill diagnose`."""
    from pathlib import Path

    from pyro_distill import surgery
    from pyro_distill.store import save_model

    ds = digits(seed=0)
    spec = {"name": "digits", "split_seed": 0}
    teacher, student = MLP([64, 32, 32, 10]), MLP([64, 16, 10])
    t0 = time.perf_counter()
    qt, ht = fit_posterior(teacher, ds.X, ds.y, guide="mvn", steps=teacher_steps, map_steps=1000, seed=0)
    print(f"[digits] teacher fit {time.perf_counter() - t0:.0f} s, ELBO {ht.elbo_start:.1f} -> {ht.elbo_end:.1f}")
    ops = surgery.plan(teacher, student, selector="snr", posterior=qt)
    print(ops)
    snet, prior = surgery.apply(ops, teacher, qt)
    t0 = time.perf_counter()
    qs, hs = fit_posterior(snet, ds.X, ds.y, guide="mvn", prior=prior, init="prior", steps=student_steps,
                           map_steps=400, seed=0)
    print(f"[digits] student fit {time.perf_counter() - t0:.0f} s, ELBO {hs.elbo_start:.1f} -> {hs.elbo_end:.1f}")
    root = Path(folder)
    save_model(root / "teacher", teacher, qt, card={"data": spec, "role": "teacher", "steps": teacher_steps})
    save_model(root / "student", snet, qs, card={"data": spec, "role": "student", "plan": ops.to_dict(),
                                                 "steps": student_steps, "prior_path": str(root / "student" /
                                                                                           "prior.pt")})
    prior.save(root / "student" / "prior.pt")
    print(f"[digits] saved {root}/teacher and {root}/student (+ prior.pt)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--tree-depth", type=int, default=6)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-nuts", action="store_true")
    ap.add_argument("--digits-run", default=None, metavar="FOLDER",
                    help="instead: fit teacher and student on digits and save them under FOLDER")
    ap.add_argument("--teacher-steps", type=int, default=150)
    ap.add_argument("--student-steps", type=int, default=100)
    a = ap.parse_args()
    if a.digits_run:
        digits_run(a.digits_run, a.teacher_steps, a.student_steps)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not a.skip_large:
        large(a.draws)
    if not a.skip_nuts:
        nuts(a.samples, a.warmup, a.chains, a.tree_depth)


if __name__ == "__main__":
    main()
