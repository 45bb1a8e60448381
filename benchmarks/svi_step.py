"""Time per SVI step and peak memory of pyro-distill's guides against Pyro's autoguides and plain torch.

Three ways to take one step of the same ELBO ``E_q[log p(y | X, w)] - KL(q || p)`` (8 reparameterized draws,
Adam), for the dense (``mvn``), low-rank + diagonal (``lowrank``, rank 20) and diagonal (``diag``) Gaussians:

* ``ours``  -- ``pyro_distill.inference.fit_posterior`` (its SVI loop, NaN guard included; the per-step time is
  read from ``FitHistory.time_s``; the start Gaussian is given, so no MAP and no Laplace are timed);
* ``pyro``  -- (a) Pyro's plain ``AutoMultivariateNormal`` / ``AutoLowRankMultivariateNormal`` /
  ``AutoDiagonalNormal`` + ``Trace_ELBO(num_particles=8, vectorize_particles=True)`` + ``pyro.optim.Adam``
  on the same network's Pyro model (the KL is then a Monte Carlo estimate);
* ``torch`` -- (b) the same ELBO written in plain torch, no Pyro: draw, forward, log-likelihood, closed-form KL,
  autograd backward, ``torch.optim.Adam``.

Sizes: digits (1,437 training rows, full batch) with MLP [64,16,16,10] (p=1,482), [64,32,32,10] (p=3,466),
[64,256,10] (p=19,210); random digits-like data (1,797 rows of 784 features, minibatch 128) with [784,120,10]
(p=95,410). The dense guide at p=19k is left out by default (its factor is 1.5 GB in float32 and Adam keeps
two more copies; pass ``--dense20k`` on a machine with room).

Measurements are interleaved (for each size, round after round, every method in turn, in a rotating order)
and the ratios are medians of per-round ratios, because the CPU is shared. Peak memory is the resident set
high-water mark (Linux VmHWM, reset after imports and data loading) of a fresh subprocess per (size, guide,
method) that builds the method and takes 3 steps; "+" is that peak minus the resident set before building it.

Students under a dense prior (issue 18): the digits students [64,16,10] (p=1,210) and [64,32,10] (p=2,410),
dense guide, ``ours`` only, three ways in one interleaved run: under the fan-in (diagonal) prior; under a dense
prior with the whitened step (``whiten="auto"``, O(p^2)); under the same dense prior on the old path
(``whiten=False``: the KL's O(p^3) triangular solve every step). The dense prior is synthetic but shaped like a
teacher-derived one (fan-in standard deviations times the Cholesky factor of a correlation matrix with a rank-32
part): the step's cost depends only on the prior's structure, not its values. Target: dense whitened within
1.5x of the diagonal-prior step. ``--only s1.2k s2.4k`` runs just these.

Stability: ``ours`` (the default recipe: MAP, Laplace, SVI) for ``--stability-steps`` steps in float32 at
p=3,466, and plain (a) in float32 from Pyro's default start, stopped at the first non-finite loss.

    python benchmarks/svi_step.py            # full run
    python benchmarks/svi_step.py --quick    # a smoke run (fewer rounds and steps; targets still printed)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pyro  # noqa: E402
import pyro.optim  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import (  # noqa: E402
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    init_to_value,
)

from pyro_distill import data  # noqa: E402
from pyro_distill.gaussian import DenseGaussian, DiagGaussian, Gaussian, LowRankGaussian  # noqa: E402
from pyro_distill.inference import DivergenceError, fit_posterior  # noqa: E402
from pyro_distill.nets import MLP  # noqa: E402

PARTICLES = 8
RANK = 20
LR = 1e-3
METHODS = ("ours", "pyro", "torch")


@dataclass
class Config:
    name: str
    sizes: list[int]
    guides: tuple[str, ...]
    batch_size: int | None
    steps: int  # timed steps per measurement
    random_data: bool = False


def configs(args) -> list[Config]:
    q = args.quick
    out = [
        Config("p1.4k", [64, 16, 16, 10], ("mvn", "lowrank", "diag"), None, 5 if q else 20),
        Config("p3.4k", [64, 32, 32, 10], ("mvn", "lowrank", "diag"), None, 3 if q else 10),
        Config("p20k", [64, 256, 10], (("mvn",) if args.dense20k else ()) + ("lowrank", "diag"), None,
               3 if q else 8),
        Config("p100k", [784, 120, 10], ("lowrank", "diag"), 128, 5 if q else 20, random_data=True),
    ]
    return [c for c in out if not args.only or c.name in args.only]


# ------------------------------------------------------------------------------------------------ problem
def problem(cfg: Config, dtype=torch.float32):
    """(net, X, y, prior, start Gaussians per guide): the same starting point for every method."""
    if cfg.random_data:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(1797, cfg.sizes[0], generator=g, dtype=dtype)
        y = torch.randint(0, cfg.sizes[-1], (1797,), generator=g)
    else:
        ds = data.digits(dtype=dtype)
        X, y = ds.X, ds.y
    net = MLP(cfg.sizes)
    prior = net.default_prior(dtype)
    return net, X, y, prior


def start_gaussian(net, prior: Gaussian, guide: str) -> Gaussian:
    """A draw from the prior as the mean, the prior's scale shrunk by 10 as the covariance."""
    g = torch.Generator().manual_seed(1)
    w0 = net.init_weights(g, prior.dtype)
    s = 0.1 * prior.variance.sqrt()
    if guide == "mvn":
        return DenseGaussian(w0, torch.diag(s), layout=net.layout)
    if guide == "diag":
        return DiagGaussian(w0, s, layout=net.layout)
    W = torch.randn(net.num_params, RANK, generator=g, dtype=prior.dtype) * (0.1 * s.unsqueeze(-1) / math.sqrt(RANK))
    return LowRankGaussian(w0, W, s**2, layout=net.layout)


# ------------------------------------------------------------------------------------------------ steppers
# Each maker returns ``run(n) -> seconds per step`` over n steps after a few warm-up steps, built fresh.
WARM = 2


def make_ours(net, X, y, prior, start, guide, batch_size, whiten: bool | str = "auto") -> Callable[[int], float]:
    def run(n: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, h = fit_posterior(net, X, y, guide=guide, prior=prior, init=start, steps=WARM + n, lr=LR,
                                 num_particles=PARTICLES, batch_size=batch_size, rank=RANK, seed=0,
                                 elbo_eval_particles=1, whiten=whiten)
        return (h.time_s[-1] - h.time_s[WARM - 1]) / n

    return run


def pyro_svi(net, X, y, prior, guide, batch_size, w0=None, lr: float = LR):
    pyro.clear_param_store()
    N = X.shape[0]
    sub = batch_size if batch_size and batch_size < N else None

    def model(X, y):
        return net.model(X, y, prior, sub)

    kw = {} if w0 is None else {"init_loc_fn": init_to_value(values={"w": w0})}
    if guide == "mvn":
        ag = AutoMultivariateNormal(model, **kw)
    elif guide == "lowrank":
        ag = AutoLowRankMultivariateNormal(model, rank=RANK, **kw)
    else:
        ag = AutoDiagonalNormal(model, **kw)
    elbo = Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1)
    return SVI(model, ag, pyro.optim.Adam({"lr": lr}), elbo), ag


def make_pyro(net, X, y, prior, start, guide, batch_size) -> Callable[[int], float]:
    def run(n: int) -> float:
        pyro.set_rng_seed(0)
        svi, _ = pyro_svi(net, X, y, prior, guide, batch_size, w0=start.loc)
        for _ in range(WARM):
            svi.step(X, y)
        t0 = time.perf_counter()
        for _ in range(n):
            svi.step(X, y)
        return (time.perf_counter() - t0) / n

    return run


def make_torch(net, X, y, prior, start, guide, batch_size) -> Callable[[int], float]:
    """(b): the ELBO by hand. Dense: ``w = m + z tril(L)^T``; low rank: ``w = m + z W^T + e sqrt(d)``; diag."""
    N, p = X.shape[0], net.num_params
    mu, var = prior.loc, prior.variance
    logvar_sum = var.log().sum()

    def kl_to_prior(loc, rownorm2, diag_var, logdet):
        # KL(N(loc, S) || N(mu, diag(var))) = 1/2 [tr(S / var) + |mu - loc|^2_var - p + log|diag var| - log|S|]
        tr = (rownorm2 / var).sum() + (0.0 if diag_var is None else (diag_var / var).sum())
        return 0.5 * (tr + ((mu - loc) ** 2 / var).sum() - p + logvar_sum - logdet)

    def run(n: int) -> float:
        torch.manual_seed(0)
        loc = start.loc.clone().requires_grad_(True)
        if guide == "mvn":
            L = start.scale_tril.clone().requires_grad_(True)
            params = [loc, L]
        elif guide == "lowrank":
            W = start.cov_factor.clone().requires_grad_(True)
            logd = start.cov_diag.log().clone().requires_grad_(True)
            params = [loc, W, logd]
        else:
            logs = start.scale.log().clone().requires_grad_(True)
            params = [loc, logs]
        opt = torch.optim.Adam(params, lr=LR)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            if guide == "mvn":
                Lt = torch.tril(L)
                w = loc + torch.randn(PARTICLES, p) @ Lt.T
                kl = kl_to_prior(loc, (Lt**2).sum(-1), None, 2 * Lt.diagonal().abs().log().sum())
            elif guide == "lowrank":
                d = logd.exp()
                w = loc + torch.randn(PARTICLES, RANK) @ W.T + torch.randn(PARTICLES, p) * d.sqrt()
                cap = torch.eye(RANK) + W.T @ (W / d.unsqueeze(-1))
                logdet = logd.sum() + 2 * torch.linalg.cholesky(cap).diagonal().log().sum()
                kl = kl_to_prior(loc, (W**2).sum(-1), d, logdet)
            else:
                s = logs.exp()
                w = loc + torch.randn(PARTICLES, p) * s
                kl = kl_to_prior(loc, torch.zeros(()), s**2, 2 * logs.sum())
            if batch_size and batch_size < N:
                idx = torch.randint(0, N, (batch_size,))
                xb, yb, scale = X[idx], y[idx], N / batch_size
            else:
                xb, yb, scale = X, y, 1.0
            logits = net.forward(w, xb)  # [S, B, C]
            ll = torch.log_softmax(logits, -1).gather(-1, yb.expand(PARTICLES, -1).unsqueeze(-1)).sum()
            loss = kl - ll * (scale / PARTICLES)
            loss.backward()
            opt.step()
            return loss.item()

        for _ in range(WARM):
            step()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t0) / n

    return run


MAKERS = {"ours": make_ours, "pyro": make_pyro, "torch": make_torch}


# ------------------------------------------------------------------------------------------------ timing
def time_config(cfg: Config, rounds: int) -> dict:
    net, X, y, prior = problem(cfg)
    res: dict = {}
    for guide in cfg.guides:
        start = start_gaussian(net, prior, guide)
        runs = {m: MAKERS[m](net, X, y, prior, start, guide, cfg.batch_size) for m in METHODS}
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for r in range(rounds):
            order = METHODS[r % 3:] + METHODS[: r % 3]  # rotate who goes first
            for m in order:
                times[m].append(runs[m](cfg.steps))
        res[guide] = times
        med = {m: statistics.median(v) for m, v in times.items()}
        r_a = statistics.median(a / b for a, b in zip(times["pyro"], times["ours"]))
        r_b = statistics.median(a / b for a, b in zip(times["ours"], times["torch"]))
        print(f"  {cfg.name:6s} p={net.num_params:6d} {guide:8s} ms/step: ours {1e3 * med['ours']:8.1f}  "
              f"(a) pyro {1e3 * med['pyro']:8.1f}  (b) torch {1e3 * med['torch']:8.1f}   "
              f"(a)/ours {r_a:5.2f}x  ours/(b) {r_b:5.2f}x", flush=True)
        res[guide] = {"times_s": times, "median_s": med, "pyro_over_ours": r_a, "ours_over_torch": r_b,
                      "p": net.num_params}
    return res


# ------------------------------------------------------------------------------------------------ dense prior
STUDENTS = {"s1.2k": [64, 16, 10], "s2.4k": [64, 32, 10]}
PRIOR_CASES = ("diag prior", "dense whitened", "dense old")


def dense_student_prior(net, dtype=torch.float32, rank: int = 32, device=None) -> DenseGaussian:
    """A dense prior shaped like a teacher-derived one: ``diag(sd) chol(0.5 U U^T / r + 0.5 I)`` with fan-in ``sd``."""
    g = torch.Generator(device=device).manual_seed(2)
    p = net.num_params
    fan = net.default_prior(torch.float64, device)
    U = torch.randn(p, rank, generator=g, dtype=torch.float64, device=device)
    C = 0.5 * (U @ U.T) / rank
    C.diagonal().add_(0.5)
    L = fan.scale.unsqueeze(-1) * torch.linalg.cholesky(C)
    return DenseGaussian(fan.loc.clone(), L, layout=net.layout).to(dtype=dtype)


def time_students(names: list[str], rounds: int, quick: bool) -> dict:
    """ms per SVI step of the dense guide under the diagonal prior, the dense prior whitened, the dense prior old."""
    ds = data.digits(dtype=torch.float32)
    out: dict = {}
    for name in names:
        net = MLP(STUDENTS[name])
        diag, dense = net.default_prior(torch.float32), dense_student_prior(net)
        start = start_gaussian(net, diag, "mvn")
        steps = 3 if quick else (20 if net.num_params < 2000 else 10)
        runs = {"diag prior": make_ours(net, ds.X, ds.y, diag, start, "mvn", None),
                "dense whitened": make_ours(net, ds.X, ds.y, dense, start, "mvn", None, whiten="auto"),
                "dense old": make_ours(net, ds.X, ds.y, dense, start, "mvn", None, whiten=False)}
        times: dict[str, list[float]] = {m: [] for m in PRIOR_CASES}
        for r in range(rounds):
            for m in PRIOR_CASES[r % 3:] + PRIOR_CASES[: r % 3]:
                times[m].append(runs[m](steps))
        med = {m: statistics.median(v) for m, v in times.items()}
        r_w = statistics.median(a / b for a, b in zip(times["dense whitened"], times["diag prior"]))
        r_o = statistics.median(a / b for a, b in zip(times["dense old"], times["diag prior"]))
        print(f"  {name:6s} {str(STUDENTS[name]):13s} p={net.num_params:5d} ms/step: diag prior "
              f"{1e3 * med['diag prior']:7.1f}  dense whitened {1e3 * med['dense whitened']:7.1f} ({r_w:4.2f}x)  "
              f"dense old {1e3 * med['dense old']:7.1f} ({r_o:5.2f}x)   [{steps} steps x {rounds} rounds]", flush=True)
        out[name] = {"p": net.num_params, "times_s": times, "median_s": med, "whitened_over_diag": r_w,
                     "old_over_diag": r_o}
    return out


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {os.getloadavg()}"


# ------------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_probe(cfg_name: str, guide: str, method: str, args) -> None:
    """Run in a subprocess: the resident-set high-water mark while building the method and taking 3 steps.

    Linux: the high-water mark (VmHWM) is reset after imports and data loading (``/proc/self/clear_refs``),
    so import-time transients do not mask the run; elsewhere ``ru_maxrss`` (which includes them) is used.
    """
    cfg = {c.name: c for c in configs(argparse.Namespace(quick=True, dense20k=True, only=None))}[cfg_name]
    net, X, y, prior = problem(cfg)
    start = start_gaussian(net, prior, guide)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, how = _status_kb("VmRSS"), "VmHWM"
    except OSError:
        base, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    MAKERS[method](net, X, y, prior, start, guide, cfg.batch_size)(3 - WARM)
    peak = _status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024, "how": how}))


def measure_memory(cfgs: list[Config], threads: int) -> dict:
    out: dict = {}
    jobs = [(c.name, g, m) for c in cfgs for g in c.guides for m in METHODS]
    procs: list = []

    def drain(block: bool) -> None:
        for job, proc in list(procs):
            if block or proc.poll() is not None:
                so, se = proc.communicate()
                procs.remove((job, proc))
                try:
                    out[job] = json.loads(so.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    out[job] = {"error": (se or so).strip().splitlines()[-1:]}

    for job in jobs:  # two at a time: most of a probe's time is importing torch and pyro
        while len(procs) >= 2:
            time.sleep(0.2)
            drain(False)
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", *job, "--threads", str(threads)]
        procs.append((job, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    while procs:
        drain(True)
    for c in cfgs:
        for g in c.guides:
            cells = []
            for m in METHODS:
                r = out.get((c.name, g, m), {})
                cells.append(f"{m} {r['peak_mb']:7.0f} MB (+{r['peak_mb'] - r['base_mb']:6.0f})" if "peak_mb" in r
                             else f"{m} failed: {r.get('error')}")
            print(f"  {c.name:6s} {g:8s} peak RSS: " + "   ".join(cells), flush=True)
    return {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ stability
def stability(steps_ours: int, steps_pyro: int, pyro_lr: float = LR) -> dict:
    cfg = Config("p3.4k", [64, 32, 32, 10], ("mvn",), None, 0)
    net, X, y, prior = problem(cfg)
    ds = data.digits()
    out: dict = {}
    # ours: the default recipe (MAP -> Laplace -> SVI), float32
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, h = fit_posterior(net, X, y, guide="mvn", steps=steps_ours, seed=0, dtype=torch.float32)
        from pyro_distill.inference import predictive

        acc = float((predictive(net, q, ds.Xte, num_samples=100).argmax(-1) == ds.yte).float().mean())
        finite = all(math.isfinite(v) for v in h.elbo) and bool(torch.isfinite(q.loc).all())
        out["ours"] = {"steps": steps_ours, "nan": not finite, "elbo_start": h.elbo_start, "elbo_end": h.elbo_end,
                       "test_acc": acc, "svi_s": h.svi_time_s, "total_s": time.perf_counter() - t0}
        print(f"  ours  (mvn, float32, default recipe): {steps_ours} steps, NaN: {not finite}, ELBO "
              f"{h.elbo_start:.1f} -> {h.elbo_end:.1f}, test accuracy {acc:.3f}, SVI {h.svi_time_s:.0f} s", flush=True)
    except DivergenceError as e:
        out["ours"] = {"steps": steps_ours, "nan": True, "diverged_at": e.step}
        print(f"  ours  (mvn, float32): DIVERGED at step {e.step}", flush=True)
    if steps_pyro <= 0:
        return out
    # (a) plain: Pyro's defaults (init_to_median, init_scale 0.1), Adam lr 1e-3, 8 vectorized particles
    pyro.set_rng_seed(0)
    svi, ag = pyro_svi(net, X, y, prior, "mvn", None, lr=pyro_lr)
    first_big = first_nan = None
    worst = 0.0
    t0 = time.perf_counter()
    for step in range(steps_pyro):
        loss = svi.step(X, y)
        worst = max(worst, abs(loss)) if math.isfinite(loss) else worst
        if first_big is None and (not math.isfinite(loss) or abs(loss) > 1e10):
            first_big = step
        loc = pyro.get_param_store()["AutoMultivariateNormal.loc"]
        if not math.isfinite(loss) or not bool(torch.isfinite(loc).all()):
            first_nan = step
            break
    acc_a = None
    if first_nan is None:
        with torch.no_grad():
            w = ag.get_posterior().sample((100,))
            acc_a = float((torch.softmax(net.forward(w, ds.Xte), -1).mean(0).argmax(-1) == ds.yte).float().mean())
    out["pyro"] = {"lr": pyro_lr, "steps_run": step + 1, "first_abs_loss_over_1e10": first_big,
                   "first_nan": first_nan, "largest_finite_abs_loss": worst, "test_acc": acc_a,
                   "time_s": time.perf_counter() - t0}
    print(f"  (a) plain AutoMultivariateNormal float32, Adam lr {pyro_lr:g}: ran {step + 1} steps; "
          f"|loss| > 1e10 first at step {first_big}; non-finite loss or mean first at step {first_nan}; "
          f"largest finite |loss| {worst:.3g}"
          + (f"; test accuracy {acc_a:.3f}" if acc_a is not None else ""), flush=True)
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, few steps, short stability runs")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per configuration (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the CPU is shared)")
    ap.add_argument("--only", nargs="*", help="configurations to time: p1.4k p3.4k p20k p100k s1.2k s2.4k")
    ap.add_argument("--dense20k", action="store_true", help="also time the dense guide at p=19k (~8 GB)")
    ap.add_argument("--stability-steps", type=int, default=None, help="SVI steps of ours in the NaN check (5000)")
    ap.add_argument("--pyro-steps", type=int, default=None, help="max steps of plain (a) in the NaN check (600)")
    ap.add_argument("--pyro-lr", type=float, default=LR, help="Adam step of plain (a) in the NaN check (1e-3)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-stability", action="store_true")
    ap.add_argument("--json", help="also write all figures to this JSON file")
    ap.add_argument("--memory-probe", nargs=3, metavar=("CONFIG", "GUIDE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(*args.memory_probe, args)
        return
    rounds = args.rounds or (1 if args.quick else 3)
    stab_ours = args.stability_steps if args.stability_steps is not None else (50 if args.quick else 5000)
    stab_pyro = args.pyro_steps if args.pyro_steps is not None else (20 if args.quick else 600)
    cfgs = configs(args)
    t_all = time.perf_counter()
    print(f"svi_step benchmark: torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} thread(s), "
          f"{PARTICLES} particles, rank {RANK}, float32, {rounds} interleaved round(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    report: dict = {"threads": args.threads, "rounds": rounds, "timing": {}, "memory": {}, "stability": {},
                    "students": {}}
    print(f"uptime: {_uptime()}")
    print("time per step (median over rounds; ratios: median of per-round ratios)")
    for c in cfgs:
        report["timing"][c.name] = time_config(c, rounds)
    students = [n for n in STUDENTS if not args.only or n in args.only]
    if students:
        print("students under a dense prior (dense guide, ours; ratios to the diagonal-prior step, per-round medians)")
        report["students"] = time_students(students, rounds, args.quick)
        print(f"uptime: {_uptime()}")
    if not args.no_memory:
        print("peak memory (resident-set high-water mark of a fresh process per cell, reset after imports and data; "
              "'+' = above the resident set before the method was built)")
        report["memory"] = measure_memory(cfgs, args.threads)
    if not args.no_stability:
        print("stability at p=3,466 (digits [64,32,32,10]), float32")
        report["stability"] = stability(stab_ours, stab_pyro, args.pyro_lr)

    print("targets")
    tm = report["timing"]
    checks = []
    if "mvn" in tm.get("p3.4k", {}):
        r = tm["p3.4k"]["mvn"]["pyro_over_ours"]
        checks.append((f"dense p=3.4k at least 2x faster than (a): {r:.2f}x", r >= 2.0))
        r = tm["p3.4k"]["mvn"]["ours_over_torch"]
        checks.append((f"dense p=3.4k within 1.3x of (b): ours/(b) = {r:.2f}x", r <= 1.3))
    if "lowrank" in tm.get("p100k", {}):
        r = tm["p100k"]["lowrank"]["ours_over_torch"]
        checks.append((f"low-rank p=95k within 1.3x of (b): ours/(b) = {r:.2f}x", r <= 1.3))
        ms = 1e3 * tm["p100k"]["lowrank"]["median_s"]["ours"]
        checks.append((f"low-rank p=95k under 50 ms per step: {ms:.1f} ms ({args.threads} thread(s))", ms < 50))
    for name, r in report["students"].items():
        checks.append((f"student {name} (p={r['p']}) under a dense prior within 1.5x of the diagonal-prior step: "
                       f"{r['whitened_over_diag']:.2f}x (old path {r['old_over_diag']:.2f}x)",
                       r["whitened_over_diag"] <= 1.5))
    st = report["stability"]
    if "ours" in st:
        checks.append((f"no NaN in {st['ours']['steps']} float32 steps of ours (dense, p=3.4k)", not st["ours"]["nan"]))
    if "pyro" in st:
        a = st["pyro"]
        checks.append((f"(observation) plain (a) float32 diverged within {a['steps_run']} steps: first non-finite at "
                       f"step {a['first_nan']}", a["first_nan"] is not None))
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
