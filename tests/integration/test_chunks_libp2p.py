"""Artifact block exchange over real py-libp2p hosts on 127.0.0.1 (``node.p2p.chunks``).

1. Three hosts in this process: two providers announce the artifact in the DHT, the third finds
   them there (``find_providers``) and fetches from both; one serves corrupted leaves: it is
   detected, penalized and replaced, and the result is byte-identical.
2. A provider in its own process (this file run as a script: ``serve``) is SIGKILLed in the
   middle of a transfer; the fetch ends with ``BlockUnavailable`` keeping what it stored; the
   provider is restarted with the same key, port and blob store, and a second fetch takes only
   the rest.

Real clock (libp2p does not run under trio's MockClock), ephemeral or fixed free ports on
loopback, every wait bounded. Skipped where the ``p2p`` extra (``libp2p``) is not installed.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script (the provider process)
    sys.path.insert(0, str(REPO))

from node.p2p.chunks import (  # noqa: E402
    BlockUnavailable,
    ChunkFetcher,
    ChunkServer,
    FetchProgress,
    FetchSettings,
    OpenPolicy,
    store_verifier,
)
from node.p2p.identity import generate_secret  # noqa: E402
from node.storage import unixfs  # noqa: E402
from node.storage.blobstore import BlobStore  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MIB = 1 << 20
QUOTA = 1 << 34


def _libp2p_host() -> Any:
    pytest.importorskip("libp2p", reason="the p2p extra (libp2p) is not installed")
    from node.p2p import libp2p_host

    return libp2p_host


def settings(**overrides: Any) -> Any:
    from node.p2p.libp2p_host import Libp2pSettings

    base: dict[str, Any] = {
        "heartbeat_s": 0.2,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.4,
        "discovery_interval_s": 0.5,
        "ping_interval_s": 2.0,
        "ping_timeout_s": 3.0,
        "dial_timeout_s": 2.0,
        "handler_timeout_s": 10.0,
        "reprovide_check_s": 0.3,
        "provide_interval_s": 0.01,
        "provide_timeout_s": 5.0,
        "find_providers_timeout_s": 5.0,
    }
    base.update(overrides)
    return Libp2pSettings(**base)


def file_piece(seed: int, i: int) -> bytes:
    """Leaf ``i`` of a deterministic artifact: 1 MiB, distinct per leaf, cheap to make."""
    block = hashlib.sha256(b"%d" % seed).digest() * (MIB // 32)
    return i.to_bytes(8, "big") + block[8:]


def build_artifact(store: BlobStore, leaves: int, seed: int, *, corrupt: bool = False) -> bytes:
    """Import a ``leaves`` MiB artifact into ``store``; with ``corrupt`` its leaves are stored
    with one bit flipped (the store must accept anything). Returns the root CID."""
    builder = unixfs.UnixfsBuilder()
    blocks: list[unixfs.Block] = []
    for i in range(leaves):
        blocks.extend(builder.feed(file_piece(seed, i)))
        for b in blocks:
            data = b.data
            if corrupt and b.cid.codec.code == unixfs.RAW_CODEC:
                data = data[:-1] + bytes([data[-1] ^ 1])
            store.put(bytes(b.cid), data)
        blocks.clear()
    root, rest = builder.finish_blocks()
    for b in rest:
        store.put(bytes(b.cid), b.data)
    return bytes(root)


def read_file(store: BlobStore, root: bytes) -> bytes:
    """The artifact's bytes from ``store`` (small artifacts only)."""

    def walk(cid: bytes) -> bytes:
        data = store.get(cid)
        assert data is not None, cid
        if cid[1] == unixfs.RAW_CODEC:
            return data
        node = unixfs.decode_node(data)
        return b"".join(walk(bytes(link.cid)) for link in node.links)

    return walk(root)


def open_store(path: Path, **kwargs: Any) -> BlobStore:
    kwargs.setdefault("verify", store_verifier)
    return BlobStore.open(path, quota_bytes=QUOTA, **kwargs)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hosts:
    """Libp2p hosts in this process, each under its own cancel scope."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def start(self, bootstrap: tuple[str, ...] = (), **overrides: Any) -> Any:
        lh = _libp2p_host()
        host = lh.Libp2pHost(
            generate_secret(), ["/ip4/127.0.0.1/tcp/0"], bootstrap, settings(**overrides)
        )
        await self._nursery.start(host.run)
        return host


@asynccontextmanager
async def hosts(limit_s: float) -> AsyncIterator[Hosts]:
    _libp2p_host()
    with trio.fail_after(limit_s):
        async with trio.open_nursery() as nursery:
            yield Hosts(nursery)
            nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout_s} s: {what}")


async def test_dht_providers_and_a_corrupt_provider(tmp_path: Path) -> None:
    leaves = 24
    good_store = open_store(tmp_path / "good")
    bad_store = open_store(tmp_path / "bad", verify=lambda cid, data: True)
    fetch_store = open_store(tmp_path / "fetcher")
    try:
        root = build_artifact(good_store, leaves, seed=1)
        # The liar holds the same DAG, with every leaf's last bit flipped.
        assert build_artifact(bad_store, leaves, seed=1, corrupt=True) == root
        async with hosts(60.0) as net:
            good = await net.start()
            bad = await net.start(bootstrap=good.listen_addrs)
            fetcher = await net.start(bootstrap=good.listen_addrs)
            ChunkServer(good_store, good, OpenPolicy()).install()
            ChunkServer(bad_store, bad, OpenPolicy()).install()
            await eventually(
                lambda: fetcher.is_connected(good.peer_id) and bad.is_connected(good.peer_id),
                "bootstrap connections",
            )
            await good.provide(root)
            await bad.provide(root)
            await eventually(lambda: good.announced(root) and bad.announced(root), "announced")

            found: list[Any] = []
            with trio.fail_after(20):
                while len(found) < 2:
                    found = await fetcher.find_providers(root)
                    await trio.sleep(0.1)
            assert set(found) == {good.peer_id, bad.peer_id}
            assert fetcher.peer_id not in found

            start = time.monotonic()
            # The liar first, so that it certainly gets some leaves to corrupt.
            providers = sorted(found, key=lambda p: p != bad.peer_id)
            report = await ChunkFetcher(fetch_store, fetcher).fetch(root, providers)
            took = time.monotonic() - start
            assert report.bad_peers == (bad.peer_id,)
            assert fetcher.misbehaviour(bad.peer_id) > 0
            assert fetcher.misbehaviour(good.peer_id) == 0
        assert report.complete and fetch_store.is_pinned(root)
        assert report.blocks_by_peer.get(good.peer_id, 0) >= leaves
        assert read_file(fetch_store, root) == read_file(good_store, root)
        assert (
            hashlib.sha256(read_file(fetch_store, root)).digest()
            == hashlib.sha256(b"".join(file_piece(1, i) for i in range(leaves))).digest()
        )
        print(f"fetched {leaves} MiB in {took:.2f} s ({leaves / took:.0f} MiB/s) over libp2p")
    finally:
        for s in (good_store, bad_store, fetch_store):
            s.close()


def _all_cids(store: BlobStore, root: bytes) -> list[bytes]:
    out = [root]
    if root[1] == unixfs.RAW_CODEC:
        return out
    data = store.get(root)
    assert data is not None
    for link in unixfs.decode_node(data).links:
        out.extend(_all_cids(store, bytes(link.cid)))
    return out


async def test_resume_after_the_sender_process_is_killed(tmp_path: Path) -> None:
    from tests.integration.procs import Procs

    leaves = 64
    store_dir = tmp_path / "provider"
    with open_store(store_dir) as seed_store:
        root = build_artifact(seed_store, leaves, seed=2)
        total = len(_all_cids(seed_store, root))
    key = generate_secret()
    port = free_port()
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "serve",
        key.hex(),
        str(port),
        str(store_dir),
        "40",  # ms per request: slow enough to be killed mid-transfer
    ]
    fetch_store = open_store(tmp_path / "fetcher")
    (tmp_path / "logs").mkdir()
    try:
        with Procs(tmp_path / "logs") as procs:
            sender = procs.start("sender", argv)
            line = await trio.to_thread.run_sync(
                lambda: sender.wait_for_line(lambda s: s.startswith("READY "), 60, "READY")
            )
            addr = line.split()[1]
            async with hosts(75.0) as net:
                fetcher = await net.start()
                peer = await fetcher.connect(addr)
                fast_give_up = FetchSettings(
                    request_timeout_s=5.0,
                    max_provider_failures=2,
                    backoff_initial_s=0.1,
                    requests_per_provider=2,
                )
                client = ChunkFetcher(fetch_store, fetcher, fast_give_up)
                killed_at: list[int] = []

                def kill_midway(p: FetchProgress) -> None:
                    if p.blocks_fetched >= 16 and not killed_at:
                        killed_at.append(p.blocks_fetched)
                        sender.signal(signal.SIGKILL)

                with pytest.raises(BlockUnavailable) as info:
                    await client.fetch(root, [peer], progress=kill_midway)
                first = info.value.report
                assert first is not None and killed_at
                assert 16 <= first.blocks_fetched < total
                assert first.bad_peers == ()
                have = sum(1 for c in _all_cids_known(fetch_store, root) if fetch_store.has(c))
                assert have == first.blocks_fetched

                # The same node comes back: same key, port and blob store (repaired on open).
                await trio.to_thread.run_sync(sender.close)
                again = procs.start("sender-2", argv)
                await trio.to_thread.run_sync(
                    lambda: again.wait_for_line(lambda s: s.startswith("READY "), 60, "READY")
                )
                second = await ChunkFetcher(fetch_store, fetcher).fetch(root, [peer])
        assert second.complete
        assert second.blocks_present == first.blocks_fetched
        assert second.blocks_fetched == total - first.blocks_fetched
        expected = b"".join(file_piece(2, i) for i in range(leaves))
        assert read_file(fetch_store, root) == expected
    finally:
        fetch_store.close()


def _all_cids_known(store: BlobStore, root: bytes) -> list[bytes]:
    """The CIDs named by the nodes ``store`` holds (a partial walk)."""
    out = [root]
    data = store.get(root)
    if data is None or root[1] == unixfs.RAW_CODEC:
        return out
    for link in unixfs.decode_node(data).links:
        out.extend(_all_cids_known(store, bytes(link.cid)))
    return out


async def test_request_streams_are_reused_and_replaced_once_closed() -> None:
    """Request/response keeps idle streams for the next exchange; one the server closed
    meanwhile (idle too long, or an older peer that answers once) is replaced transparently."""

    async def echo(peer: Any, payload: bytes) -> bytes:
        await trio.sleep(0.05)
        return payload

    async with hosts(30.0) as net:
        b = await net.start(serve_idle_stream_s=0.5)
        a = await net.start()
        b.set_handler("/test/echo/1", echo)
        await a.connect(b.listen_addrs[0])
        opened: list[str] = []
        open_stream = a._open_stream

        async def counting(pid: Any, protocol: str) -> Any:
            opened.append(protocol)
            return await open_stream(pid, protocol)

        a._open_stream = counting
        for i in range(3):
            assert await a.request(b.peer_id, "/test/echo/1", b"%d" % i) == b"%d" % i
        assert len(opened) == 1

        async def ask(i: int) -> None:
            assert await a.request(b.peer_id, "/test/echo/1", b"c%d" % i) == b"c%d" % i

        for _ in range(2):  # four at once: four streams the first time, none new after
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(ask, i)
        assert len(opened) == 4

        await trio.sleep(1.0)  # b ends its idle streams
        assert await a.request(b.peer_id, "/test/echo/1", b"late") == b"late"
        assert len(opened) == 5


# --- the provider process -----------------------------------------------------------------------


class _SlowPolicy(OpenPolicy):
    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s

    async def authorize(self, peer: Any, root: bytes, block_cid: bytes, *a: Any, **k: Any) -> bool:
        await trio.sleep(self._delay_s / 8)  # ~delay per request of 8 blocks
        return True


async def _serve(key_hex: str, port: str, store_dir: str, delay_ms: str) -> None:
    from node.p2p.libp2p_host import Libp2pHost

    host = Libp2pHost(bytes.fromhex(key_hex), [f"/ip4/127.0.0.1/tcp/{port}"], (), settings())
    with open_store(Path(store_dir)) as store:
        ChunkServer(store, host, _SlowPolicy(int(delay_ms) / 1000)).install()
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(host.run)
            print("READY", addrs[0], flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        key_hex, port, store_dir, delay_ms = sys.argv[2:6]
        trio.run(_serve, key_hex, port, store_dir, delay_ms)
    else:
        print("usage: test_chunks_libp2p.py serve KEY_HEX PORT STORE_DIR DELAY_MS")
