"""Cost of the ArviZ diagnostics (one run, CPU, times printed).

1. A p ~ 3.4k model (MLP [64, 32, 32, 10], dense Gaussian from MAP + Laplace on the digits training split):
   InferenceData with 1,000 draws, PSIS-LOO, WAIC, the q k-hat and the netCDF write, on the digits test
   split (N=360; target < 30 s) and, for reference, on the training split (N=1,437).
2. The NUTS reference for a small net (p <= 200): MLP [10, 8, 3] (p = 115) on a synthetic 3-class set
   (500 training rows), 4 chains x (1,000 warmup + 3,000 draws) in one worker process per core, started at
   draws of the SVI dense Gaussian; the cost of one gradient of the potential against tracing the Pyro model
   and against autograd through the forward; R-hat, ESS (target < 5 minutes), and how far the Gaussians
   (MAP + GGN Laplace, SVI after 300 and 10,000 steps) are from NUTS: per-block mean and variance error,
   elpd_loo, predictive agreement, q k-hat. Run it with --activation relu (the default) and tanh.

    .venv/bin/python benchmarks/diagnostics.py [--skip-nuts] [--skip-large] \
        [--samples 3000 --warmup 1000 --processes 2 --activation relu]
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


def gradient_cost(net: MLP, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, reps: int = 2000) -> None:
    """One gradient of -log p(w, D), one thread, as NUTS takes it: autograd through the traced Pyro model
    (what NUTS(model) does), autograd through the network's forward, and the potential used here."""
    import pyro.poutine as poutine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prior = net.default_prior(torch.float64)
    pot = D.LogJointPotential(net, X, y, prior)

    def traced(z):
        return -poutine.trace(poutine.condition(net.model, {"w": z})).get_trace(X, y, prior).log_prob_sum()

    def plain(z):
        return -(net.log_likelihood(z, X, y).sum() + prior.log_prob(z))

    times = {}
    for name, f in (("Pyro model trace + autograd", traced), ("forward + autograd", plain),
                    ("LogJointPotential (hand-written MLP backward)", lambda z: pot({"w": z}))):
        z = w.detach().clone().requires_grad_(True)
        for _ in range(50):
            torch.autograd.grad(f(z), z)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.autograd.grad(f(z), z)
        times[name] = (time.perf_counter() - t0) / reps * 1e6
    torch.set_num_threads(threads)
    ours = times["LogJointPotential (hand-written MLP backward)"]
    print(f"[gradient of -log p(w, D), p={net.num_params}, N={X.shape[0]}, 1 thread] "
          + "; ".join(f"{k} {v:.0f} us ({v / ours:.2f}x)" for k, v in times.items()))


def nuts(samples: int, warmup: int, chains: int, tree_depth: int, processes: int | None, activation: str,
         svi_steps: list[int], target_accept: float = 0.8) -> None:
    ds = synthetic_classification(n_train=500, n_test=1000, n_features=10, n_classes=3, seed=0).to(torch.float64)
    net = MLP([10, 8, 3], activation=activation)
    gaussians = {}
    t0 = time.perf_counter()
    w_map, _ = fit_map(net, ds.X, ds.y, steps=1000, lr=1e-2)
    gaussians["MAP + GGN Laplace"] = laplace(net, ds.X, w_map, net.default_prior(torch.float64))
    for steps in svi_steps:
        t0 = time.perf_counter()
        q, h = fit_posterior(net, ds.X, ds.y, guide="mvn", steps=steps, map_steps=1000, seed=0)
        gaussians[f"SVI dense, {steps} steps"] = q.to(dtype=torch.float64)
        print(f"[setup] SVI dense ({steps} steps) for {net!r}: {time.perf_counter() - t0:.1f} s, "
              f"ELBO {h.elbo_start:.1f} -> {h.elbo_end:.1f}")
    q_init = gaussians[f"SVI dense, {max(svi_steps)} steps"]
    gradient_cost(net, ds.X, ds.y, q_init.mean)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # convergence is printed below
        ref = D.nuts_reference(net, ds.X, ds.y, num_chains=chains, num_samples=samples, warmup_steps=warmup,
                               init=q_init, seed=0, max_tree_depth=tree_depth, processes=processes,
                               target_accept_prob=target_accept)
    t_nuts = time.perf_counter() - t0
    summ = D.reference_summary(ref)
    rhat = D.az.rhat(ref)
    share = float(sum(int((rhat[v] < 1.01).sum()) for v in rhat.data_vars)) / net.num_params
    at = ref.attrs
    print(f"[NUTS p={net.num_params}, N={ds.X.shape[0]}, {chains} chains x ({warmup} warmup + {samples} draws), "
          f"max tree depth {tree_depth}, target acceptance {target_accept}, {at['processes']} processes, "
          "started at draws of the longest SVI fit] "
          f"{t_nuts:.1f} s wall (target < 300 s: {'PASS' if t_nuts < 300 else 'FAIL'}); "
          f"max R-hat {at['rhat_max']:.3f}, {share:.0%} of coordinates < 1.01; min bulk ESS {at['ess_bulk_min']:.0f}; "
          f"leapfrog steps per iteration {at['leapfrog_per_iter_per_chain']}; step sizes {at['step_size_per_chain']}; "
          f"divergences per chain {at['divergences_per_chain']}")
    print("  " + ", ".join(f"{b}: R-hat {v['rhat_max']:.3f}, ESS {v['ess_bulk_min']:.0f}" for b, v in summ.items()))
    blocks = [b.name for b in net.layout]
    print("\n| Gaussian | " + " | ".join(f"{b} mean err / var ratio" for b in blocks)
          + " | elpd_loo (NUTS) | test class agreement | test mean TV | q k-hat |")
    print("|---" * (len(blocks) + 5) + "|")
    for name, q in gaussians.items():
        cmp = D.compare_to_reference(net, q, ref, ds.X, ds.y, draws=1000, Xte=ds.Xte)
        cells = [f"{cmp['blocks'][b]['mean_err_sd']:.2f} / {cmp['blocks'][b]['var_ratio_median']:.2f}" for b in blocks]
        k = D.posterior_khat(net, q, ds.X, ds.y, draws=1000)
        print(f"| {name} | " + " | ".join(cells) + f" | {cmp['elpd_loo_q']:.1f} ({cmp['elpd_loo_ref']:.1f}) | "
              f"{cmp['predictive']['class_agreement']:.3f} | {cmp['predictive']['mean_tv']:.4f} | {k.k:.2f} |")
    print("mean err = mean |m_q - m_NUTS| / sd_NUTS; var ratio = median var_q / var_NUTS over the block's coordinates")


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
                                                 "steps": student_steps}, prior=prior)
    print(f"[digits] saved {root}/teacher and {root}/student (+ prior.pt)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--tree-depth", type=int, default=8)
    ap.add_argument("--target-accept", type=float, default=0.8, help="NUTS target acceptance probability")
    ap.add_argument("--processes", type=int, default=None, help="NUTS worker processes (default: one per core)")
    ap.add_argument("--activation", default="relu", help="activation of the NUTS net (relu, tanh, ...)")
    ap.add_argument("--svi-steps", type=int, nargs="+", default=[300, 10000],
                    help="SVI steps of the Gaussians compared with NUTS (NUTS starts at the longest)")
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
        nuts(a.samples, a.warmup, a.chains, a.tree_depth, a.processes, a.activation, a.svi_steps, a.target_accept)


if __name__ == "__main__":
    main()
