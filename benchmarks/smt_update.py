"""Benchmark: one block's state-tree update of 2,000 changed keys over a 100,000-key tree.

The figure is the wall time of ``StateTree.apply`` for the block (the node's per-block cost; the
records are written by the caller's batch, not timed here). A second figure adds
``StateTree.committed`` (the node-cache upkeep after the block's batch is written), the whole
per-block cost of the tree in the chain thread. Their bound, measured in the same run on the same
machine, is the time of 2,000 * depth raw ``hashlib.sha256`` calls over 65-byte inputs, depth =
ceil(log2(100,000)) = 17: the hashing a binary tree update must do at minimum, with no
bookkeeping. ratio = bound / value (1.0 would be pure hashing).

Each block changes 2,000 keys: 95 % existing keys rewritten, 5 % new keys (a block of transfers).
After the tree is built, the heap is ``gc.freeze()``d, as ``tx_apply.py`` does, so that the
collector costs what it would cost a node (not a scan of this script's 600,000-record dict
store). CPU times of the timed thread are printed too: on a shared machine they do not count the
time other processes take.

Run: ``.venv/bin/python benchmarks/smt_update.py [--keys N] [--changes M] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import random
import statistics
import time
from collections.abc import Iterator

from node.storage.smt import StateTree


class _DictKV:
    """Just enough of a KV store for the tree: get, and ordered iterate (used only by prune)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        keys = sorted(self.data, reverse=reverse)
        for k in keys:
            if prefix is not None and not k.startswith(prefix):
                continue
            if start is not None and k < start:
                continue
            if stop is not None and k >= stop:
                continue
            yield k, self.data[k]


def _hash_bound(calls: int) -> float:
    data = [bytes([i & 0xFF]) * 65 for i in range(256)]
    sha = hashlib.sha256
    t0 = time.perf_counter()
    for i in range(calls):
        sha(data[i & 0xFF]).digest()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    rng = random.Random(1234)
    kv = _DictKV()
    tree = StateTree(kv, b"T")
    keys = [b"\x01\x01" + rng.randbytes(20) for _ in range(args.keys)]
    t0 = time.perf_counter()
    update = tree.apply(0, {k: rng.randbytes(40) for k in keys})
    build_s = time.perf_counter() - t0
    kv.data.update(update.puts)
    tree.committed(update)
    print(f"built {args.keys} keys in {build_s * 1e3:.0f} ms ({len(update.nodes)} internal nodes)")
    del update
    gc.collect()
    gc.freeze()

    walls: list[float] = []
    both: list[float] = []
    cpu_apply: list[float] = []
    cpu_committed: list[float] = []
    puts = 0
    for height in range(1, args.repeat + 1):
        # A transfer block: existing accounts updated, a few new ones created.
        changed = rng.sample(keys, args.changes - args.changes // 20)
        changed += [b"\x01\x01" + rng.randbytes(20) for _ in range(args.changes // 20)]
        changes: dict[bytes, bytes | None] = {k: rng.randbytes(40) for k in changed}
        t0 = time.perf_counter()
        c0 = time.thread_time()
        update = tree.apply(height, changes)
        t1 = time.perf_counter()
        c1 = time.thread_time()
        kv.data.update(update.puts)
        t2 = time.perf_counter()
        c2 = time.thread_time()
        tree.committed(update)
        t3 = time.perf_counter()
        c3 = time.thread_time()
        walls.append(t1 - t0)
        both.append(t1 - t0 + t3 - t2)
        cpu_apply.append(c1 - c0)
        cpu_committed.append(c3 - c2)
        puts = len(update.puts)
        keys.extend(changed[-(args.changes // 20) :])
    value_ms = statistics.median(walls) * 1e3
    both_ms = statistics.median(both) * 1e3
    depth = math.ceil(math.log2(args.keys))
    bound_ms = statistics.median(_hash_bound(args.changes * depth) for _ in range(5)) * 1e3
    print(f"apply of {args.changes} changes: " + ", ".join(f"{t * 1e3:.1f}" for t in walls) + " ms")
    print(
        f"CPU of this thread, median: apply {statistics.median(cpu_apply) * 1e3:.1f} ms, "
        f"committed {statistics.median(cpu_committed) * 1e3:.2f} ms; {puts} records per block"
    )
    print(f"bound: {args.changes}x{depth} sha256(65 B) = {bound_ms:.1f} ms")
    print(
        f"RESULT name=smt_update_{args.changes} value={value_ms:.2f} unit=ms "
        f"bound={bound_ms:.2f} ratio={bound_ms / value_ms:.3f} target=none"
    )
    print(
        f"RESULT name=smt_update_committed_{args.changes} value={both_ms:.2f} unit=ms "
        f"bound={bound_ms:.2f} ratio={bound_ms / both_ms:.3f} target=none"
    )


if __name__ == "__main__":
    main()
