"""The benchmarks are scripts, not a package: their folder goes on the import path (as when they
run), and torch uses one thread (two CPU cores are shared with other work)."""

import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

torch.set_num_threads(1)
