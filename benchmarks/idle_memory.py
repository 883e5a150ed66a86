"""Benchmark: resident memory of an idle devnet node, and a check that it never imported torch.

A single-validator devnet node (the repository's genesis.json, dev key 0 as validator,
``timeout_commit`` 200 ms) runs as a subprocess on a free 127.0.0.1 port with a temporary data
directory. Once it has produced a few blocks it is left alone for 5 s (it keeps making empty
blocks; no RPC load), then its ``VmRSS`` is read from ``/proc/<pid>/status``.

torch must never be imported in the node process (DESIGN §1). Two independent checks: the
node's own ``sys.modules``, asked through a side channel (the benchmark's node entry writes a
report on SIGUSR1), and ``/proc/<pid>/maps`` (no ``libtorch``/``torch`` shared object mapped).
The benchmark fails (exit status 1) if either finds torch.

Here the bound IS the target: 200 MB. ratio = RSS ÷ 200 MB, and the target is ratio ≤ 1.0
(``target=1.0`` in the RESULT line means "at most 1.0", unlike the throughput benchmarks whose
targets are minimums).

Run: ``.venv/bin/python benchmarks/idle_memory.py [--quick]`` (``--quick`` idles 2 s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
from _common import devnet_node, make_genesis, result

from rpc.client import Client

BOUND_MB = 200.0
MIN_BLOCKS = 3
WAIT_BLOCKS_S = 60.0


def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/<pid>/status, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


def torch_mappings(pid: int) -> list[str]:
    libs = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and "torch" in parts[5].lower():
            libs.add(parts[5])
    return sorted(libs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="idle 2 s instead of 5 s")
    args = parser.parse_args()
    idle_s = 2.0 if args.quick else 5.0
    print(f"machine: {_common.machine()}")
    genesis = make_genesis([], timeout_commit_ms=200, keep_repo_balances=True)
    with devnet_node(genesis) as node:
        print(f"node pid {node.pid} at {node.url}", flush=True)
        deadline = time.monotonic() + WAIT_BLOCKS_S
        with Client(node.url, timeout=5.0) as client:
            while (height := client.block_number()) < MIN_BLOCKS:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the node made only {height} blocks in {WAIT_BLOCKS_S} s")
                time.sleep(0.1)
        print(f"node at height {height}; idling {idle_s:.0f} s", flush=True)
        time.sleep(idle_s)
        status = proc_status(node.pid)
        report = node.inspect()
        mapped = torch_mappings(node.pid)
        with Client(node.url, timeout=5.0) as client:
            height = client.block_number()
    rss_mb = status["VmRSS"] / 1024
    print(
        f"idle node: VmRSS {rss_mb:.1f} MB (peak VmHWM {status.get('VmHWM', 0) / 1024:.1f} MB, "
        f"VmSize {status.get('VmSize', 0) / 1024:.0f} MB) at height {height}  vs  bound "
        f"{BOUND_MB:.0f} MB (the target)"
    )
    torch_imported = bool(report.get("torch_imported"))
    print(
        f"torch in the node: sys.modules {'YES' if torch_imported else 'no'} "
        f"({report.get('modules')} modules imported); mapped "
        f"{', '.join(mapped) if mapped else 'no torch library'}"
    )
    result("idle_rss", rss_mb, "MB", BOUND_MB, "1.0")
    if torch_imported or mapped:
        raise SystemExit("torch was imported in the node process (DESIGN §1 forbids it)")


if __name__ == "__main__":
    main()
