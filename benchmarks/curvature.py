"""The curvature engine (``pyro_distill.curvature``) against the jacrev GGN it replaces, and against
laplace-torch when installed: time and peak memory, ratios from one run.

Cases (float32, weights drawn from the fan-in prior: the cost does not depend on the values):

* ``diag-mlp``   -- exact GGN diagonal, MLP [784,64,64,10] (p=55k) on ``--n-diag`` random inputs (10,000);
* ``diag-tf``    -- exact GGN diagonal, the transformer teacher of experiments/transformer.toml (p=4,826) on
  its training set (scikit-learn digits as 8 rows of 8 pixels, 1,437 rows);
* ``dense``      -- the full GGN, MLP [64,32,32,10] (p=3,466) on ``--n-dense`` random inputs (10,000);
* ``topk``       -- top-``--k`` (50) eigenpairs of the GGN operator, MLP [784,64,64,10] on ``--n-topk`` inputs
  (10,000), Lanczos (and ``--lobpcg``);
* ``kfac``       -- KFAC factors, MLP [784,64,64,10] on ``--n-kfac`` random inputs (60,000);
* ``kfac-tf``    -- KFAC factors of the transformer teacher's linear maps (KFAC-expand over the 8 positions) on
  its training set, beside its exact GGN diagonal (the curvature a diagonal Laplace of it needs) in the same run.

"old" is the jacrev implementation ``inference.ggn`` (unchanged since before issue 11; kept in ``inference`` as
the reference implementation that tests compare with). It is slow (84.8 s and 673 s for the two diagonals when
the issue was filed), so by default it runs on the first ``--old-n`` rows (``--old-n-tf`` for the transformer)
and its time is scaled linearly to the full data, marked ``~`` (its cost is linear in N over whole chunks, so at
least one of its chunks runs: 414 rows for the transformer, 36 for the p=55k MLP); ``--old-full``
runs it on everything. Peak memory: the resident-set high-water mark (Linux VmHWM, reset before each case via
``/proc/self/clear_refs``) minus the resident set before the case. ``--no-old`` skips the old code and
compares with the issue's measurements instead (other load: indicative only). The load (``uptime``) is
printed before and after: the CPU is shared, so ratios from one run are what to compare.

laplace-torch (``pip install laplace-torch`` into an environment WITHOUT torchvision: its torchmetrics import
fails on the registry's CUDA torchvision) is timed on the same nets and data when importable: KronLaplace,
and at p=3.5k DiagLaplace and FullLaplace ``.fit`` (its DiagLaplace at p=55k only with
``--laplace-diag-wide``). Its classification likelihood needs labels: random ones here (the GGN ignores them).

    python benchmarks/curvature.py --quick      # small sizes: checks that everything runs
    python benchmarks/curvature.py --only diag-mlp kfac
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pyro_distill.curvature import GGN, kfac  # noqa: E402
from pyro_distill.inference import ggn as inference_ggn  # noqa: E402
from pyro_distill.nets import MLP, Transformer  # noqa: E402

CASES = ("diag-mlp", "diag-tf", "dense", "topk", "kfac", "kfac-tf")


# ============================================================================ the old implementation
#: the jacrev GGN of ``inference`` before issue 11, kept there as the reference implementation (full Jacobians)
old_ggn = inference_ggn


# ============================================================================ measuring
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak extra resident MB, result) of one call. Freed heap memory is handed back to the OS first
    (glibc ``malloc_trim``), so that memory the call reuses counts as growth of the resident set."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        hwm = True
    except OSError:
        base, hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    t = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t
    peak = _status_kb("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dt, max(0.0, (peak - base) / 1024), res


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, case: str, method: str, seconds: float | None, mb: float | None, note: str = "") -> None:
        s = "-" if seconds is None else f"{seconds:9.2f}"
        m = "-" if mb is None else f"{mb:8.0f}"
        self.rows.append((case, method, s, m, note))
        print(f"  {case:<10} {method:<34} {s:>10} s {m:>8} MB  {note}", flush=True)

    def show(self) -> None:
        print("\n| case | method | time (s) | peak (MB) | note |\n|---|---|---:|---:|---|")
        for r in self.rows:
            print("| " + " | ".join(x.strip() for x in r) + " |")


# ============================================================================ problems
def mlp_problem(sizes: list[int], n: int, seed: int = 0) -> tuple[MLP, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    net = MLP(sizes)
    w = net.init_weights(g)
    X = torch.randn(n, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return net, w, X, y


def transformer_problem(quick: bool) -> tuple[Transformer, torch.Tensor, torch.Tensor, torch.Tensor]:
    from pyro_distill.data.token_tasks import digits_sequences

    d = digits_sequences(seed=0)
    net = Transformer(input_dim=8, n_classes=10, max_len=8, embedding="patch", d_model=16, heads=[4, 4],
                      ffn=[True, True], d_head=4, d_ff=32, pooling="mean")
    X, y = (d.X[:200], d.y[:200]) if quick else (d.X, d.y)
    return net, net.init_weights(torch.Generator().manual_seed(0)), X, y


def old_timed(net, w, X, n_old: int, full: bool, diag_only: bool, whole_chunk: bool = True
              ) -> tuple[float, float, str]:
    """The old GGN's time (scaled linearly from ``n_old`` rows unless ``full``; at least one of its chunks
    when ``whole_chunk``) and peak memory."""
    chunk = max(1, int(2e7 // max(1, net.num_outputs * net.num_params)))  # its cost per row grows with this
    n = X.shape[0] if full else min(max(n_old, chunk if whole_chunk else 1), X.shape[0])
    dt, mb, _ = measure(lambda: old_ggn(net, w, X[:n], diag_only=diag_only))
    if n == X.shape[0]:
        return dt, mb, f"N={n}"
    note = "" if n >= chunk else " (below one chunk: too fast, --quick only)"
    return dt * X.shape[0] / n, mb, f"~ scaled from {dt:.2f} s on N={n}{note}"


# ============================================================================ laplace-torch
def laplace_available() -> bool:
    try:
        import laplace  # noqa: F401
    except Exception as e:  # ImportError, or torchmetrics failing on a CUDA torchvision
        print(f"\nlaplace-torch: skipped ({type(e).__name__}: {e}).\n  To compare, install it into an environment "
              "without torchvision: pip install laplace-torch (and pip uninstall torchvision).")
        return False
    return True


def to_module(net: MLP, w: torch.Tensor) -> torch.nn.Module:
    """An ``nn.Sequential`` computing the same function as ``net.forward(w, .)`` (for laplace-torch)."""
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "identity": torch.nn.Identity, "sigmoid": torch.nn.Sigmoid,
            "gelu": torch.nn.GELU, "elu": torch.nn.ELU}
    P = net.layout.unflatten(w.detach())
    layers: list[torch.nn.Module] = []
    for t in range(1, net.num_layers + 1):
        W = P[f"layer{t}.weight"]
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=net.bias)
        with torch.no_grad():
            lin.weight.copy_(W)
            if net.bias:
                lin.bias.copy_(P[f"layer{t}.bias"])
        layers.append(lin)
        if t < net.num_layers:
            layers.append(acts[net.activation]())
    return torch.nn.Sequential(*layers)


def laplace_fit(net: MLP, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, structure: str
                ) -> tuple[float, float]:
    """(seconds, peak extra MB) of laplace-torch's ``Laplace(..., hessian_structure=structure).fit`` on (X, y)."""
    dt, mb, _ = measure(lambda: _laplace_fit(net, w, X, y, structure))
    return dt, mb


def _laplace_fit(net: MLP, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, structure: str) -> None:
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    model = to_module(net, w)
    loader = DataLoader(TensorDataset(X, y), batch_size=min(1000, X.shape[0]))
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader)


# ============================================================================ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-diag", type=int, default=10_000)
    ap.add_argument("--n-dense", type=int, default=10_000)
    ap.add_argument("--n-topk", type=int, default=10_000)
    ap.add_argument("--n-kfac", type=int, default=60_000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--wide", default="784,64,64,10", help="the p=55k MLP (diag-mlp, topk, kfac)")
    ap.add_argument("--small", default="64,32,32,10", help="the p=3.5k MLP (dense)")
    ap.add_argument("--old-n", type=int, default=1000, help="rows the old GGN runs on (time scaled to N)")
    ap.add_argument("--old-n-tf", type=int, default=100, help="the same for the transformer")
    ap.add_argument("--old-full", action="store_true", help="run the old GGN on all rows (slow)")
    ap.add_argument("--no-old", action="store_true",
                    help="skip the old GGN; ratios against the issue's measurements (84.8 s, 673 s) instead")
    ap.add_argument("--lobpcg", action="store_true", help="also time top-k by LOBPCG")
    ap.add_argument("--restarts", type=int, nargs="*", default=[],
                    help="also time top-k by Lanczos with these numbers of thick restarts (same basis size)")
    ap.add_argument("--laplace-diag-wide", action="store_true",
                    help="also time laplace-torch's DiagLaplace at p=55k (very slow: 266 s at N=1,000)")
    args = ap.parse_args()
    if args.quick:
        args.n_diag, args.n_dense, args.n_topk, args.n_kfac, args.k = 1000, 1000, 1000, 5000, 10
        args.old_n, args.old_n_tf = 200, 20
    torch.set_num_threads(args.threads)
    wide = [int(s) for s in args.wide.split(",")]
    small = [int(s) for s in args.small.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32")
    print("before:", uptime())
    lap = laplace_available()
    tab = Table()
    ratios: list[str] = []

    if "diag-mlp" in args.only:
        net, w, X, y = mlp_problem(wide, args.n_diag)
        print(f"\ndiag-mlp: MLP {wide} (p={net.num_params}), N={X.shape[0]}")
        t_new, mb, d_new = measure(lambda: GGN(net, w, X).diagonal())
        if args.no_old:
            t_old, mb_old, note = 84.8, None, "issue 11's measurement (N=10,000, load 1-3), not this run"
        else:
            t_old, mb_old, note = old_timed(net, w, X, args.old_n, args.old_full, True)
        tab.add("diag-mlp", "old ggn(diag_only=True)", t_old, mb_old, note)
        tab.add("diag-mlp", "new GGN.diagonal()", t_new, mb)
        d_chk = old_ggn(net, w, X[:200], diag_only=True)
        err = float((GGN(net, w, X[:200]).diagonal() - d_chk).abs().max() / d_chk.abs().max())
        ratios.append(f"diag-mlp: new is {t_old / t_new:.0f}x faster (target >= 20x); max rel. diff vs old "
                      f"{err:.1e} (N=200, float32)")
        if lap:
            for s in ("diag", "kron") if args.laplace_diag_wide else ("kron",):
                tab.add("diag-mlp", f"laplace-torch {s.capitalize()}Laplace.fit", *laplace_fit(net, w, X, y, s))
            if not args.laplace_diag_wide:
                print("  (laplace-torch DiagLaplace at p=55k skipped: 266 s at N=1,000 here; --laplace-diag-wide)")

    if "diag-tf" in args.only:
        net, w, X, y = transformer_problem(args.quick)
        print(f"\ndiag-tf: Transformer (p={net.num_params}), digits training set N={X.shape[0]}")
        t_new, mb, _ = measure(lambda: GGN(net, w, X).diagonal())
        if args.no_old:
            t_old, mb_old, note = 673.0, None, "issue 11's measurement (N=1,437), not this run"
        else:
            t_old, mb_old, note = old_timed(net, w, X, args.old_n_tf, args.old_full, True, not args.quick)
        tab.add("diag-tf", "old ggn(diag_only=True)", t_old, mb_old, note)
        tab.add("diag-tf", "new GGN.diagonal()", t_new, mb)
        ratios.append(f"diag-tf: new is {t_old / t_new:.0f}x faster (target >= 50x)")

    if "dense" in args.only:
        net, w, X, y = mlp_problem(small, args.n_dense)
        print(f"\ndense: MLP {small} (p={net.num_params}), N={X.shape[0]}")
        t_new, mb, G_new = measure(lambda: GGN(net, w, X).dense())
        del G_new
        if not args.no_old:
            t_old, mb_old, note = old_timed(net, w, X, args.n_dense, args.old_full or args.quick, False)
            tab.add("dense", "old ggn()", t_old, mb_old, note)
            ratios.append(f"dense: new is {t_old / t_new:.1f}x faster (target >= 2x)")
        tab.add("dense", "new GGN.dense()", t_new, mb)
        if lap:
            for s in ("diag", "kron", "full"):
                tab.add("dense", f"laplace-torch {s.capitalize()}Laplace.fit", *laplace_fit(net, w, X, y, s))

    if "topk" in args.only:
        net, w, X, y = mlp_problem(wide, args.n_topk)
        print(f"\ntopk: MLP {wide} (p={net.num_params}), N={X.shape[0]}, k={args.k}")
        methods = [("lanczos", 0)] + [("lanczos", r) for r in args.restarts if r] + (
            [("lobpcg", 0)] if args.lobpcg else [])
        for m, r in methods:
            op = GGN(net, w, X)
            t, mb, (vals, vecs) = measure(lambda op=op, m=m, r=r: op.eigh_topk(args.k, seed=0, method=m, restarts=r))
            info = op.eig_info
            note = (f"{info['iterations']} basis vectors, {info['products']} operator columns, "
                    f"{info.get('restarts', 0)} restarts; lambda_1 {float(vals[0]):.3g}, "
                    f"lambda_k {float(vals[-1]):.3g}; max residual/lambda_1 {info['residual']:.1e}")
            tab.add("topk", f"new GGN.eigh_topk({args.k}, {m}" + (f", restarts={r})" if r else ")"), t, mb, note)
        ratios.append("topk: low-rank Laplace (rank 50) at p=55k needs this plus the diagonal (target < 120 s)")

    if "kfac" in args.only:
        net, w, X, y = mlp_problem(wide, args.n_kfac)
        print(f"\nkfac: MLP {wide} (p={net.num_params}), N={X.shape[0]}")
        t, mb, _ = measure(lambda: kfac(net, w, X))
        tab.add("kfac", "new kfac() (exact H, C backprops)", t, mb)
        ts, mbs, _ = measure(lambda: kfac(net, w, X, sampled=True))
        tab.add("kfac", "new kfac(sampled=True)", ts, mbs)
        note = "target < 60 s"
        if lap:
            t_lt, mb_lt = laplace_fit(net, w, X, y, "kron")
            tab.add("kfac", "laplace-torch KronLaplace.fit", t_lt, mb_lt)
            note += f"; {t / t_lt:.2f}x laplace-torch's time (target <= 2x)"
        ratios.append(f"kfac: {t:.1f} s ({note})")

    if "kfac-tf" in args.only:
        net, w, X, y = transformer_problem(args.quick)
        print(f"\nkfac-tf: Transformer (p={net.num_params}), digits training set N={X.shape[0]}")
        t, mb, fac = measure(lambda: kfac(net, w, X))
        covered = sum(int(A.shape[0] * G.shape[0]) for A, G in fac.values())
        tab.add("kfac-tf", "new kfac() (exact H, C backprops)", t, mb,
                f"{len(fac)} blocks covering {covered} of {net.num_params} weights")
        ts, mbs, _ = measure(lambda: kfac(net, w, X, sampled=True))
        tab.add("kfac-tf", "new kfac(sampled=True)", ts, mbs)
        td, mbd, _ = measure(lambda: GGN(net, w, X).diagonal())
        tab.add("kfac-tf", "new GGN.diagonal() (same run)", td, mbd)
        ratios.append(f"kfac-tf: {t:.1f} s, {t / td:.2f}x the exact diagonal's time")

    tab.show()
    print("\n" + "\n".join(ratios))
    print("after:", uptime())


if __name__ == "__main__":
    main()
