"""Benchmark: weighted linear merge of two ~100M-parameter models on the byte-reproducible
float64 path (DESIGN §8 "Merging"), in memory and file to file.

Parents: two float32 models of ``--params`` parameters (default 100M: ``--tensors`` tensors of
4096 × k plus a bias each), seeded ``torch.randn``. The merge is ``node.merge.methods`` at its
production settings — float64, parent order, separate mul/add, one cast to float32 — with
coefficients 0.5 / 0.5.

* **in memory** (target ratio 0.2): ``weighted_into`` into preallocated float32 outputs, GB/s of
  *input* (both parents' bytes); bound, same run: ``dst.copy_(src)`` of the same tensors into
  preallocated memory, GB/s of the bytes copied.
* **file to file** (target ratio 0.5): ``merge_files`` from two safetensors files (read through
  ``safe_open``) to a format-v1 file, fsynced, GB/s of input file bytes; bound, same run:
  copying the same two files (1 MiB reads and writes, fsynced), GB/s of bytes copied. Files sit
  in a temporary directory and are read from the page cache after one untimed read.

Each figure is the best of ``--repeat`` alternating runs. If the machine lacks the memory for
the requested size it scales the models down and says so. The merged bytes of the in-memory
and file paths are compared (they must be identical). GB = 10**9 bytes.

Run: ``.venv/bin/python benchmarks/merge_throughput.py [--params N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common
import torch
from _common import result

from node.merge.methods import merge_files, weighted_into
from node.merge.recipe import MergeRecipe
from node.merge.safetensors_writer import LEAF0_BYTES, write_state_dict

IN_MEMORY_TARGET = 0.2
FILE_TARGET = 0.5
ROWS = 4096
COPY_BYTES = 1 << 20
WEIGHTS = (0.5, 0.5)


def make_parent(seed: int, tensors: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(tensors):
        state[f"layers.{i:02d}.weight"] = torch.randn(ROWS, cols, generator=g)
        state[f"layers.{i:02d}.bias"] = torch.randn(ROWS, generator=g)
    return state


def best_of(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Alternate the functions ``repeat`` times; wall seconds of each run."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as f, open(dst, "wb") as out:
        while piece := f.read(COPY_BYTES):
            out.write(piece)
        out.flush()
        os.fsync(out.fileno())


def available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--tensors", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {_common.machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    params = args.params
    # parents + merge outputs + copy targets in memory (4 bytes each: 2 + 1 + 2), plus the page
    # cache of two parent files and an output: keep a third of the free memory spare
    need = params * 4 * (5 + 3)
    if need > available_bytes() * 2 // 3:
        scaled = max(1_000_000, int(available_bytes() * 2 // 3 / (4 * 8)))
        print(f"scaled down: {params} parameters need ~{need / 1e9:.1f} GB; using {scaled}")
        params = scaled
    cols = max(1, params // (args.tensors * ROWS))
    t0 = time.perf_counter()
    parents = [make_parent(seed, args.tensors, cols) for seed in (1, 2)]
    names = sorted(parents[0])
    n_params = sum(t.numel() for t in parents[0].values())
    input_bytes = 2 * n_params * 4
    print(
        f"two parents of {n_params / 1e6:.1f}M float32 parameters ({args.tensors} tensors of "
        f"{ROWS}x{cols} + biases) made in {time.perf_counter() - t0:.1f} s"
    )

    merged = {k: torch.empty_like(v) for k, v in parents[0].items()}
    copies = [{k: torch.empty_like(v) for k, v in p.items()} for p in parents]

    def merge_in_memory() -> None:
        for k in names:
            weighted_into(merged[k], [parents[0][k], parents[1][k]], WEIGHTS)

    def copy_in_memory() -> None:
        for k in names:
            copies[0][k].copy_(parents[0][k])
            copies[1][k].copy_(parents[1][k])

    merge_in_memory()  # touch every output page once
    copy_in_memory()
    times = best_of({"merge": merge_in_memory, "copy": copy_in_memory}, args.repeat)
    mem_value = input_bytes / 1e9 / min(times["merge"])
    mem_bound = input_bytes / 1e9 / min(times["copy"])
    memory_digest = hashlib.sha256()
    for k in names:
        memory_digest.update(merged[k].numpy().tobytes())
    print("in memory: merge s " + ", ".join(f"{t:.3f}" for t in times["merge"]))
    print("           copy_ s " + ", ".join(f"{t:.3f}" for t in times["copy"]))
    print(
        f"bound: dst.copy_(src) of the same tensors into preallocated memory = {mem_bound:.2f} GB/s"
    )
    copies.clear()  # free the copy targets before the file part

    recipe = MergeRecipe.create("linear", [b"parent-1", b"parent-2"], coefficients=WEIGHTS)
    with tempfile.TemporaryDirectory(prefix="neuroseed-bench-merge-") as tmp:
        d = Path(tmp)
        paths = [d / "p1.safetensors", d / "p2.safetensors"]
        for p, state in zip(paths, parents, strict=True):
            write_state_dict(p, state)
        file_bytes = sum(p.stat().st_size for p in paths)
        for p in paths:  # into the page cache
            with open(p, "rb") as f:
                while f.read(COPY_BYTES):
                    pass
        out = d / "child.safetensors"

        def merge_file() -> None:
            merge_files(recipe, paths, out)

        def copy_files() -> None:
            for i, p in enumerate(paths):
                copy_file(p, d / f"copy{i}.bin")

        ftimes = best_of({"merge": merge_file, "copy": copy_files}, args.repeat)
        file_digest = hashlib.sha256()
        with open(out, "rb") as f:
            f.seek(LEAF0_BYTES)
            # the child's data in sorted-name order, the same order as the in-memory digest
            while piece := f.read(COPY_BYTES):
                file_digest.update(piece)
    file_value = file_bytes / 1e9 / min(ftimes["merge"])
    file_bound = file_bytes / 1e9 / min(ftimes["copy"])
    print("file to file: merge_files s " + ", ".join(f"{t:.3f}" for t in ftimes["merge"]))
    print("              copy s        " + ", ".join(f"{t:.3f}" for t in ftimes["copy"]))
    print(
        f"bound: copying the same {file_bytes / 1e9:.2f} GB file to file, fsynced = {file_bound:.2f} GB/s"
    )
    same = memory_digest.digest() == file_digest.digest()
    print(f"in-memory and file merges byte-identical: {same}")
    if not same:
        raise SystemExit("the two merge paths disagree")
    result("merge_linear_in_memory", mem_value, "GB/s", mem_bound, IN_MEMORY_TARGET)
    result("merge_linear_file", file_value, "GB/s", file_bound, FILE_TARGET)


if __name__ == "__main__":
    main()
