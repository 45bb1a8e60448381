"""Test-wide settings: one torch thread per worker (the suite runs with ``-n 2`` on 2 cores; a second
OpenMP thread per worker only oversubscribes the machine and stalls tiny BLAS calls)."""

import torch

torch.set_num_threads(1)
