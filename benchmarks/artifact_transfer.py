"""Benchmark: artifact transfer between two libp2p nodes on loopback (``/neuroseed/chunks/1``),
vs a bare libp2p stream between the same two hosts, in the same run.

* Node A is a child process (this file run with ``serve``): a ``Libp2pHost`` and a
  ``BlobStore`` in a temporary directory, into which it imports a deterministic artifact of
  ``--size-mib`` MiB (default 1 GiB: 1 MiB leaves, each distinct, built with ``UnixfsBuilder``;
  the import is not timed); it serves the artifact with ``ChunkServer`` (``OpenPolicy``) and a
  raw protocol that writes N bytes on a bare stream.
* Node B is this process: its own ``Libp2pHost`` and an empty ``BlobStore`` (the node's
  verifier; the fetcher hashes each block once itself and stores each response's blocks with one
  ``put_many(..., verified=True)``, as the node does).

Figures (MB = 10**6 bytes):

* ``artifact_transfer``: the artifact's bytes ÷ the time of ``ChunkFetcher.fetch`` from A into
  B's blob store — requests, responses, decoding, verification of every block against its CID,
  the blob store's writes (a temp file and an fsync per block, one synced index write per
  response) and the final pin included. The result is then
  checked: the root CID recomputed from B's store must be the artifact's.
* the bound: the same number of bytes on one bare libp2p stream (Noise + Yamux) from A to B,
  read and discarded; measured before and after the fetch, the better run counts.
* context: the same fetch into a store that drops each leaf once the fetcher verified it (the
  protocol's cost without the blob store's), run first; raw loopback TCP (trio sockets, one
  process, 1 MiB writes); node A's import rate (``UnixfsBuilder`` + ``BlobStore.put``); and the
  CPU seconds each process spent (from ``/proc``): the transfer is CPU-bound in py-libp2p.

``--profile FILE`` writes a cProfile of node B's trio thread during the fetch into the blob
store (``python -m pstats FILE``); worker-thread work (hashing, file writes) shows there only as
the wait for it, so profile those with ``perf`` (``perf record -g -p <pid>``).

RESULT lines: ``artifact_transfer`` (bound: the bare libp2p stream; target ratio 0.8) and
``libp2p_stream`` (bound: raw loopback TCP; no target).

Run: ``.venv/bin/python benchmarks/artifact_transfer.py [--size-mib N]``; 1 GiB takes about a
minute on 2 cores.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import trio
from _common import LOOPBACK, free_port, result

from node.p2p.chunks import ChunkFetcher, ChunkServer, FetchSettings, OpenPolicy, store_verifier
from node.p2p.identity import generate_secret
from node.storage import unixfs
from node.storage.blobstore import BlobStore

RAW_PROTOCOL = "/neuroseed-bench/raw/1"
TARGET = 0.8
MIB = 1 << 20
QUOTA = 1 << 40
WRITE = 1 << 20
_TICKS = os.sysconf("SC_CLK_TCK")


def leaf(i: int, base: bytes) -> bytes:
    """Leaf ``i`` of the artifact: 1 MiB, distinct per leaf (so no block is deduplicated)."""
    return i.to_bytes(8, "big") + base[8:]


def leaf_base() -> bytes:
    return hashlib.shake_256(b"neuroseed-bench-artifact").digest(MIB)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


# --- context: raw loopback TCP -----------------------------------------------------------------


async def tcp_loopback(size: int) -> float:
    """MB/s of ``size`` bytes over one loopback TCP connection (trio sockets, one process)."""
    buf = b"\x00" * WRITE
    done = trio.Event()
    got = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal got
        while data := await stream.receive_some(WRITE):
            got += len(data)
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host=LOOPBACK))
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        t0 = time.perf_counter()
        sent = 0
        while sent < size:
            await stream.send_all(buf)
            sent += WRITE
        await stream.aclose()
        await done.wait()
        took = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    assert got == sent
    return size / took / 1e6


# --- node A: the serving process -----------------------------------------------------------------


def import_artifact(store: BlobStore, size: int) -> bytes:
    base = leaf_base()
    builder = unixfs.UnixfsBuilder()
    for i in range(size // MIB):
        for block in builder.feed(leaf(i, base)):
            store.put(bytes(block.cid), block.data)
    root, rest = builder.finish_blocks()
    for block in rest:
        store.put(bytes(block.cid), block.data)
    return bytes(root)


async def _serve(store_dir: str, size_mib: str, key_hex: str, port: str) -> None:
    from node.p2p.libp2p_host import Libp2pHost, RawStream

    size = int(size_mib) * MIB
    with BlobStore.open(store_dir, verify=store_verifier, quota_bytes=QUOTA) as store:
        t0 = time.perf_counter()
        root = import_artifact(store, size)
        imported = time.perf_counter() - t0
        host = Libp2pHost(bytes.fromhex(key_hex), [f"/ip4/{LOOPBACK}/tcp/{port}"])
        ChunkServer(store, host, OpenPolicy()).install()
        payload = b"\x00" * WRITE

        async def raw(peer: Any, stream: RawStream) -> None:
            header = b""
            while len(header) < 8:
                piece = await stream.receive_some(8 - len(header))
                if not piece:
                    return
                header += piece
            left = int.from_bytes(header, "big")
            while left > 0:
                n = min(left, WRITE)
                await stream.send_all(payload if n == WRITE else payload[:n])
                left -= n

        host.set_raw_handler(RAW_PROTOCOL, raw)
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(host.run)
            print(f"READY {addrs[0]} {root.hex()} {imported:.2f}", flush=True)


# --- node B: this process ------------------------------------------------------------------------


async def raw_stream(host: Any, peer: Any, size: int, server_pid: int) -> float:
    """MB/s of ``size`` bytes from A on one bare libp2p stream (prints the CPU seconds)."""
    c0, s0 = time.process_time(), cpu_seconds(server_pid)
    t0 = time.perf_counter()
    stream = await host.open_raw_stream(peer, RAW_PROTOCOL)
    await stream.send_all(size.to_bytes(8, "big"))
    got = 0
    while data := await stream.receive_some(WRITE):
        got += len(data)
    await stream.close()
    took = time.perf_counter() - t0
    if got != size:
        raise SystemExit(f"raw stream: {got} of {size} bytes")
    rate = size / took / 1e6
    client_cpu, server_cpu = time.process_time() - c0, cpu_seconds(server_pid) - s0
    print(
        f"bare libp2p stream: {size / MIB:.0f} MiB in {took:.2f} s = {rate:.1f} MB/s "
        f"(CPU s: receiver {client_cpu:.2f}, sender {server_cpu:.2f})",
        flush=True,
    )
    return rate


def root_of_store(store: BlobStore, root: bytes) -> bytes:
    """The root CID rebuilt from the leaves ``store`` holds under ``root`` (streaming)."""
    builder = unixfs.UnixfsBuilder()

    def walk(cid: bytes) -> None:
        data = store.get(cid)
        if data is None:
            raise SystemExit(f"block {cid.hex()} missing after the fetch")
        if cid[1] == unixfs.RAW_CODEC:
            builder.feed(data)
            return
        for link in unixfs.decode_node(data).links:
            walk(bytes(link.cid))

    walk(root)
    return bytes(builder.finish())


class DiscardingStore:
    """Stands in for B's ``BlobStore`` to show the protocol's own cost: keeps the dag-pb nodes
    (the walk needs them), drops every leaf after the fetcher verified it."""

    def __init__(self) -> None:
        self._nodes: dict[bytes, bytes] = {}
        self._leaves: dict[bytes, int] = {}

    def has(self, cid: bytes) -> bool:
        return cid in self._nodes or cid in self._leaves

    def size(self, cid: bytes) -> int | None:
        return self._leaves.get(cid)

    def get(self, cid: bytes) -> bytes | None:
        return self._nodes.get(cid)

    def put(self, cid: bytes, data: bytes, *, verified: bool = False) -> bool:
        if cid[1] == unixfs.RAW_CODEC:
            self._leaves[cid] = len(data)
        else:
            self._nodes[cid] = bytes(data)
        return True

    def put_many(self, blocks: Any, *, verified: bool = False) -> list[bool]:
        return [self.put(cid, data) for cid, data in blocks]

    async def pin_async(self, root: bytes, cids: Any) -> None:
        return None


async def timed_fetch(
    what: str,
    store: Any,
    host: Any,
    peer: Any,
    root: bytes,
    settings: FetchSettings,
    server_pid: int,
    profile: str | None = None,
) -> tuple[float, Any]:
    profiler = cProfile.Profile() if profile else None
    c0, s0 = time.process_time(), cpu_seconds(server_pid)
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    report = await ChunkFetcher(store, host, settings).fetch(root, [peer])
    took = time.perf_counter() - t0
    if profiler is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    rate = report.bytes_fetched / took / 1e6
    print(
        f"{what}: {report.blocks_fetched} blocks, {report.bytes_fetched / MIB:.0f} MiB in "
        f"{took:.2f} s = {rate:.1f} MB/s ({report.requests} requests; CPU s: fetcher "
        f"{time.process_time() - c0:.2f}, server {cpu_seconds(server_pid) - s0:.2f})",
        flush=True,
    )
    return rate, report


async def client(
    addr: str,
    root: bytes,
    size: int,
    store_dir: Path,
    server_pid: int,
    settings: FetchSettings,
    profile: str | None,
) -> dict[str, float]:
    from node.p2p.libp2p_host import Libp2pHost

    out: dict[str, float] = {}
    host = Libp2pHost(generate_secret(), [f"/ip4/{LOOPBACK}/tcp/0"])
    with BlobStore.open(store_dir, verify=store_verifier, quota_bytes=QUOTA) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            peer = await host.connect(addr)
            await raw_stream(host, peer, 64 * MIB, server_pid)  # warm-up (windows, buffers)
            out["bound_before"] = await raw_stream(host, peer, size, server_pid)
            discard = DiscardingStore()
            out["protocol"], _ = await timed_fetch(
                "fetch, blocks verified then discarded",
                discard,
                host,
                peer,
                root,
                settings,
                server_pid,
            )
            out["fetch"], report = await timed_fetch(
                "fetch into the blob store", store, host, peer, root, settings, server_pid, profile
            )
            out["bound_after"] = await raw_stream(host, peer, size, server_pid)
            nursery.cancel_scope.cancel()
        if not report.complete or report.bytes_fetched < size:
            raise SystemExit(f"incomplete fetch: {report}")
        rebuilt = await trio.to_thread.run_sync(root_of_store, store, root)
        if rebuilt != root:
            raise SystemExit("the fetched artifact does not rebuild its root CID")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--blocks-per-request", type=int, default=FetchSettings().blocks_per_request
    )
    parser.add_argument(
        "--requests-per-provider", type=int, default=FetchSettings().requests_per_provider
    )
    parser.add_argument("--profile", metavar="FILE", help="cProfile node B's fetch into the store")
    args = parser.parse_args()
    size = args.size_mib * MIB
    settings = FetchSettings(
        blocks_per_request=args.blocks_per_request,
        requests_per_provider=args.requests_per_provider,
    )
    print(f"machine: {_common.machine()}")
    print(
        f"artifact_transfer: {args.size_mib} MiB artifact, 1 MiB leaves; "
        f"{settings.blocks_per_request} blocks per request, "
        f"{settings.requests_per_provider} requests in flight",
        flush=True,
    )
    tcp = trio.run(tcp_loopback, size)
    print(f"context: raw loopback TCP (trio sockets, one process): {tcp:.0f} MB/s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="neuroseed-bench-transfer-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "serve",
            str(tmp / "a"),
            str(args.size_mib),
            generate_secret().hex(),
            str(free_port()),
        ]
        log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        if not line or line[0] != "READY":
            log.close()
            raise SystemExit(f"node A did not start:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        addr, root, imported = line[1], bytes.fromhex(line[2]), float(line[3])
        print(
            f"node A imported the artifact in {imported:.1f} s ({size / imported / 1e6:.0f} MB/s: "
            f"UnixfsBuilder + BlobStore.put); root {root.hex()[:24]}..."
        )
        out = trio.run(client, addr, root, size, tmp / "b", proc.pid, settings, args.profile)
        log.close()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    bound = max(out["bound_before"], out["bound_after"])
    print(
        f"artifact_transfer: {out['fetch']:.1f} MB/s into the blob store (verified) vs a bare "
        f"libp2p stream {bound:.1f} MB/s (ratio {out['fetch'] / bound:.3f}); verified but "
        f"discarded {out['protocol']:.1f} MB/s (ratio {out['protocol'] / bound:.3f}); raw TCP "
        f"{tcp:.0f} MB/s"
    )
    result("artifact_transfer", out["fetch"], "MB/s", bound, TARGET)
    result("libp2p_stream", bound, "MB/s", tcp, None)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        store_dir, size_mib, key_hex, port = sys.argv[2:6]
        trio.run(_serve, store_dir, size_mib, key_hex, port)
    else:
        main()
