"""Thread policy measurement: 300 MAP steps of the digits teacher [64, 32, 32, 10] with 1 and 2 torch threads.

Each setting runs in a fresh process (torch fixes its thread pool early). Prints the wall time per setting
and the load average before and after, since the answer depends on how busy the cores are:
``python benchmarks/threads.py [--steps 300] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from pyro_distill.data import digits
from pyro_distill.inference import fit_map
from pyro_distill.nets.mlp import MLP
ds = digits(seed=0)
net = MLP([64, 32, 32, 10])
fit_map(net, ds.X, ds.y, steps=5, progress=False)  # warm-up
t = time.perf_counter()
fit_map(net, ds.X, ds.y, steps=int(sys.argv[2]), progress=False)
print(json.dumps({"threads": torch.get_num_threads(), "seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min), {os.cpu_count()} cores")
    for threads in (1, 2):
        times = []
        for _ in range(args.repeats):
            res = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(args.steps)], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"the {threads}-thread run failed:\n{res.stderr}")
            out = res.stdout
            times.append(json.loads(out.strip().splitlines()[-1])["seconds"])
        print(f"{threads} thread(s): {args.steps} MAP steps in " + ", ".join(f"{t:.2f}" for t in times)
              + f" s (min {min(times):.2f} s)")
    print(f"load after: {os.getloadavg()[0]:.2f} (1-min)")


if __name__ == "__main__":
    main()
