"""Artifact block exchange (``node.p2p.chunks``) on the in-memory network and trio's MockClock.

Most tests shrink the UnixFS layout (1 KiB leaves, 4 links per node) so that small files make
deep trees; one test keeps the real 1 MiB leaves to check the ~8 MiB response bound. Worker-thread
work runs inline (the ``threads`` fixture), so every run is deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio
import trio.testing
from multiformats import CID

from node import crypto
from node.encoding import pack
from node.p2p import chunks
from node.p2p.api import (
    PROTOCOL_CHUNKS,
    InvalidContentKey,
    PeerId,
    RequestFailed,
)
from node.p2p.chunks import (
    AccessExpired,
    AccessLifetimeTooLong,
    AccessPeerMismatch,
    AccessRequest,
    AccessSignatureInvalid,
    AccessTerms,
    AccessWrongChain,
    BlockEntry,
    BlockStatus,
    BlockUnavailable,
    ChunkFetcher,
    ChunkMessageTooLarge,
    ChunkRequest,
    ChunkResponse,
    ChunkResponseHeader,
    ChunksBusy,
    ChunkServer,
    FetchProgress,
    FetchSettings,
    InvalidBlockCid,
    InvalidChunkRequest,
    LeafOutOfRange,
    MalformedArtifact,
    MalformedChunkMessage,
    OpenPolicy,
    ServeSettings,
    VerifiedAccess,
    build_dag_index,
    decode_chunk_request,
    decode_chunk_response,
    sign_access,
    store_verifier,
    verify_access,
)
from node.p2p.memory import MemoryHost, MemoryNetwork
from node.storage import MemoryKV, unixfs
from node.storage.blobstore import BlobStore
from node.types import Address, ChainId, Hash32, Signature, TimestampMs
from tests.threads import InlineThreads

CHAIN = 7
NOW_MS = 1_700_000_000_000
SMALL_CHUNK = 1024
SMALL_LINKS = 4


@pytest.fixture
def small_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 KiB leaves and 4 links per node: 40 leaves make a three-level tree."""
    monkeypatch.setattr(unixfs, "CHUNK_SIZE", SMALL_CHUNK)
    monkeypatch.setattr(unixfs, "MAX_LINKS", SMALL_LINKS)


# --- helpers -------------------------------------------------------------------------------------


def file_bytes(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating data (every leaf distinct)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d-%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


@dataclass
class Artifact:
    root: bytes
    data: bytes
    blocks: dict[bytes, bytes]  # cid -> bytes

    @property
    def leaves(self) -> list[bytes]:
        """Leaf CIDs in file order."""
        return self.leaf_cids(self.root)

    def leaf_cids(self, cid: bytes) -> list[bytes]:
        if CID.decode(cid).codec.name == "raw":
            return [cid]
        node = unixfs.decode_node(self.blocks[cid])
        return [leaf for link in node.links for leaf in self.leaf_cids(bytes(link.cid))]


def make_artifact(size: int, seed: int = 1) -> Artifact:
    data = file_bytes(size, seed)
    chunk = unixfs.CHUNK_SIZE
    root, blocks = unixfs.build_chunks(data[i : i + chunk] for i in range(0, len(data), chunk))
    return Artifact(bytes(root), data, {bytes(b.cid): b.data for b in blocks})


def covering(art: Artifact, leaves: Iterable[int]) -> set[bytes]:
    """Oracle: the blocks on the paths from the root to ``leaves`` (leaf i starts at i·chunk)."""
    starts = [i * unixfs.CHUNK_SIZE for i in leaves]
    out: set[bytes] = set()

    def walk(cid: bytes, offset: int) -> None:
        out.add(cid)
        if CID.decode(cid).codec.name == "raw":
            return
        node = unixfs.decode_node(art.blocks[cid])
        pos = offset
        for link, size in zip(node.links, node.blocksizes, strict=True):
            if any(pos <= s < pos + size for s in starts):
                walk(bytes(link.cid), pos)
            pos += size

    walk(art.root, 0)
    return out


def flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def stored(store: BlobStore, cids: Iterable[bytes]) -> set[bytes]:
    return {c for c in cids if store.has(c)}


def reassemble(store: BlobStore, art: Artifact) -> bytes:
    out = bytearray()
    for cid in art.leaves:
        data = store.get(cid)
        assert data is not None
        out += data
    return bytes(out)


@dataclass
class Node:
    host: MemoryHost
    store: BlobStore
    server: ChunkServer
    fetcher: ChunkFetcher

    @property
    def peer(self) -> PeerId:
        return self.host.peer_id


def make_node(
    net: MemoryNetwork,
    name: str,
    tmp_path: Path,
    *,
    policy: chunks.AccessPolicy | None = None,
    verify: Callable[[bytes, bytes], bool] = store_verifier,
    fetch: FetchSettings | None = None,
    serve: ServeSettings | None = None,
) -> Node:
    host = net.add_host(name)
    store = BlobStore(
        tmp_path / name, MemoryKV(), verify=verify, quota_bytes=1 << 30, max_block_bytes=2 << 20
    )
    server = ChunkServer(
        store,
        host,
        policy or OpenPolicy(),
        chain_id=CHAIN,
        settings=serve,
        clock_ms=lambda: NOW_MS,
    )
    server.install()
    fetcher = ChunkFetcher(
        store,
        host,
        fetch or FetchSettings(request_timeout_s=5.0),
        clock_ms=lambda: NOW_MS,
    )
    return Node(host, store, server, fetcher)


def seed(node: Node, art: Artifact, *, corrupt_leaves: bool = False) -> None:
    leaves = set(art.leaves)
    for cid, data in art.blocks.items():
        node.store.put(cid, flip(data) if corrupt_leaves and cid in leaves else data)


def wrap_handler(
    node: Node, around: Callable[[PeerId, bytes, Callable[[], Awaitable[bytes]]], Awaitable[bytes]]
) -> None:
    """Install ``around(peer, payload, serve)`` in front of the node's chunk server."""

    async def handler(peer: PeerId, payload: bytes) -> bytes:
        return await around(peer, payload, lambda: node.server.handle_request(peer, payload))

    node.host.set_handler(PROTOCOL_CHUNKS, handler)


def terms(key: crypto.PrivateKey, peer: PeerId, root: bytes, **overrides: object) -> AccessTerms:
    base = AccessTerms(
        chain_id=ChainId(CHAIN),
        root=root,
        address=key.address,
        peer_id=bytes(peer),
        grant_id=Hash32(b"\x11" * 32),
        expires_ms=TimestampMs(NOW_MS + 60_000),
        nonce=1,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


BUYER = crypto.PrivateKey(hashlib.sha256(b"chunks-buyer").digest())
STRANGER = crypto.PrivateKey(hashlib.sha256(b"chunks-stranger").digest())
GRANT = Hash32(b"\x11" * 32)


class GrantPolicy:
    """DESIGN §8 in small: dag-pb nodes and leaf 0 are public; other blocks need an access
    request whose grant this (fake) chain assigns to its signer."""

    def __init__(self, grants: dict[Hash32, Address]) -> None:
        self.grants = grants
        self.asked: list[tuple[bytes, int | None, VerifiedAccess | None]] = []

    async def authorize(
        self,
        peer: PeerId,
        root: bytes,
        block_cid: bytes,
        access: VerifiedAccess | None,
        *,
        leaf_index: int | None,
    ) -> bool:
        self.asked.append((block_cid, leaf_index, access))
        if leaf_index is None or leaf_index == 0:
            return True
        return (
            access is not None
            and access.chain_id == CHAIN
            and self.grants.get(access.grant_id) == access.address
        )


# --- wire format ---------------------------------------------------------------------------------


def test_request_round_trip_and_strict_decoding(small_layout: None) -> None:
    art = make_artifact(10 * SMALL_CHUNK)
    cids = tuple(art.leaves[:3])
    req = ChunkRequest(art.root, cids, None)
    assert decode_chunk_request(req.encode()) == req

    with pytest.raises(ChunkMessageTooLarge):
        decode_chunk_request(b"\x93" + b"\x00" * chunks.MAX_CHUNK_REQUEST_BYTES)
    with pytest.raises(MalformedChunkMessage):
        decode_chunk_request(b"not msgpack at all")
    with pytest.raises(MalformedChunkMessage):  # trailing bytes: not the canonical form
        decode_chunk_request(req.encode() + b"\x00")
    with pytest.raises(InvalidChunkRequest, match="no block"):
        decode_chunk_request(ChunkRequest(art.root, (), None).encode())
    with pytest.raises(InvalidChunkRequest, match="twice"):
        decode_chunk_request(ChunkRequest(art.root, (cids[0], cids[0]), None).encode())
    nine = tuple(bytes(unixfs.raw_cid(b"%d" % i)) for i in range(9))
    with pytest.raises(MalformedChunkMessage, match="limit"):
        decode_chunk_request(pack((art.root, nine, None)))
    sha1_cid = bytes(CID("base32", 1, "raw", ("sha1", hashlib.sha1(b"x").digest())))
    cbor_cid = bytes(CID("base32", 1, "dag-cbor", ("sha2-256", hashlib.sha256(b"x").digest())))
    v0 = bytes(CID("base58btc", 0, "dag-pb", ("sha2-256", hashlib.sha256(b"x").digest())))
    for bad in (sha1_cid, cbor_cid, v0, b"\x01\x55", b""):
        with pytest.raises(InvalidBlockCid):
            decode_chunk_request(ChunkRequest(art.root, (bad,), None).encode())
    with pytest.raises(InvalidBlockCid):
        decode_chunk_request(ChunkRequest(sha1_cid, cids, None).encode())


def test_response_decoding_is_strict() -> None:
    ok = ChunkResponse((BlockEntry(0, b"abc"), BlockEntry(1, b""), BlockEntry(0, b"de")))
    wire = ok.encode()
    assert decode_chunk_response(wire, 3) == ok
    header = ChunkResponseHeader((0, 1, 0), (3, 0, 2)).encode()
    assert wire == len(header).to_bytes(4, "big") + header + b"abcde"  # one byte form
    with pytest.raises(MalformedChunkMessage, match="for 4 blocks"):
        decode_chunk_response(wire, 4)
    for bad in (wire + b"x", wire[:-1]):  # a byte more or less than the sizes say
        with pytest.raises(MalformedChunkMessage, match="add up"):
            decode_chunk_response(bad, 3)
    with pytest.raises(MalformedChunkMessage, match="status"):
        decode_chunk_response(ChunkResponse((BlockEntry(9, b""),)).encode(), 1)
    with pytest.raises(MalformedChunkMessage, match="data with"):
        decode_chunk_response(ChunkResponse((BlockEntry(2, b"x"),)).encode(), 1)
    with pytest.raises(ChunkMessageTooLarge):
        decode_chunk_response(b"\x00" * (chunks.MAX_CHUNK_RESPONSE_BYTES + 1), 1)
    for garbage in (b"", b"\xc1", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff" + b"\x92" * 8):
        with pytest.raises(MalformedChunkMessage, match="header length"):
            decode_chunk_response(garbage, 1)
    non_canonical = b"\x92\x91\x00\x91\xcc\x01"  # size 1 as uint8: not the minimal form
    with pytest.raises(MalformedChunkMessage, match="undecodable"):
        decode_chunk_response(len(non_canonical).to_bytes(4, "big") + non_canonical + b"x", 1)
    big = ChunkResponseHeader((0,), (chunks.MAX_BLOCK_BYTES + 1,)).encode()
    oversized = len(big).to_bytes(4, "big") + big + b"\x00" * (chunks.MAX_BLOCK_BYTES + 1)
    with pytest.raises(MalformedChunkMessage, match="exceeds"):
        decode_chunk_response(oversized, 1)


# --- access requests -----------------------------------------------------------------------------


def test_access_request_checks() -> None:
    peer = PeerId(b"buyer-node")
    root = bytes(unixfs.raw_cid(b"root"))
    req = sign_access(BUYER, terms(BUYER, peer, root))
    assert AccessRequest.decode(req.encode()) == req
    assert verify_access(req, peer, NOW_MS, chain_id=CHAIN) == BUYER.address

    with pytest.raises(AccessPeerMismatch):  # replayed by another peer
        verify_access(req, PeerId(b"someone-else"), NOW_MS)
    with pytest.raises(AccessExpired):
        verify_access(req, peer, NOW_MS + 60_000)
    with pytest.raises(AccessWrongChain):
        verify_access(req, peer, NOW_MS, chain_id=CHAIN + 1)
    long = sign_access(BUYER, terms(BUYER, peer, root, expires_ms=NOW_MS + 2 * 86_400_000))
    with pytest.raises(AccessLifetimeTooLong):
        verify_access(long, peer, NOW_MS)
    tampered = AccessRequest(replace(req.terms, grant_id=Hash32(b"\x22" * 32)), req.signature)
    with pytest.raises(AccessSignatureInvalid, match="not signed by"):
        verify_access(tampered, peer, NOW_MS)
    # Someone else's key signing terms that name the buyer's address.
    forged = AccessRequest(
        req.terms,
        STRANGER.sign(chunks.TAG_ACCESS, CHAIN, req.terms.encode()),
    )
    with pytest.raises(AccessSignatureInvalid):
        verify_access(forged, peer, NOW_MS)
    high_s = AccessRequest(req.terms, Signature(crypto.malleate(req.signature)))
    with pytest.raises(AccessSignatureInvalid):
        verify_access(high_s, peer, NOW_MS)
    # Signed under another domain tag (a transaction's): not an access request.
    other_tag = AccessRequest(req.terms, BUYER.sign(crypto.TAG_TX, CHAIN, req.terms.encode()))
    with pytest.raises(AccessSignatureInvalid):
        verify_access(other_tag, peer, NOW_MS)
    with pytest.raises(ValueError):
        sign_access(STRANGER, terms(BUYER, peer, root))


# --- the DAG index -------------------------------------------------------------------------------


def test_dag_index_places_every_block(small_layout: None, tmp_path: Path) -> None:
    art = make_artifact(40 * SMALL_CHUNK)
    store = BlobStore(tmp_path / "s", MemoryKV(), verify=store_verifier, quota_bytes=1 << 30)
    for cid, data in art.blocks.items():
        store.put(cid, data)
    index, complete = build_dag_index(store, art.root)
    assert complete
    assert set(index) == set(art.blocks)
    assert [index[c] for c in art.leaves] == list(range(40))
    assert all(index[c] is None for c in set(art.blocks) - set(art.leaves))
    # Without one dag-pb node the index is partial: the leaves below it cannot be placed.
    node_cid = next(c for c in art.blocks if c != art.root and CID.decode(c).codec.name != "raw")
    partial = BlobStore(tmp_path / "p", MemoryKV(), verify=store_verifier, quota_bytes=1 << 30)
    for cid, data in art.blocks.items():
        if cid != node_cid:
            partial.put(cid, data)
    index, complete = build_dag_index(partial, art.root)
    assert not complete
    below = set(Artifact(node_cid, b"", art.blocks).leaf_cids(node_cid))
    assert below and not (below & set(index))


# --- fetching ------------------------------------------------------------------------------------


async def test_corrupt_provider_is_detected_penalized_and_replaced(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(64 * SMALL_CHUNK + 100)
    net = MemoryNetwork(seed=3)
    a = make_node(net, "a", tmp_path)
    honest = make_node(net, "b", tmp_path)
    liar = make_node(net, "c", tmp_path, verify=lambda cid, data: True)
    seed(honest, art)
    seed(liar, art, corrupt_leaves=True)
    progress: list[FetchProgress] = []
    async with net:
        report = await a.fetcher.fetch(art.root, [liar.peer, honest.peer], progress=progress.append)
    assert report.bad_peers == (liar.peer,)
    assert a.host.score(liar.host) < 0  # penalized through the network
    assert a.host.score(honest.host) == 0
    assert report.complete and report.file_size == len(art.data)
    assert report.blocks_fetched == len(art.blocks)
    assert sum(report.blocks_by_peer.values()) == len(art.blocks)
    assert report.blocks_by_peer[honest.peer] >= len(art.leaves)  # every leaf came from b
    assert reassemble(a.store, art) == art.data
    assert stored(a.store, art.blocks) == set(art.blocks)
    assert a.store.is_pinned(art.root)
    assert progress[-1].blocks_fetched == len(art.blocks)
    assert liar.server.stats["blocks_served"] > 0  # it did serve (bad) leaves


async def test_partial_fetch_takes_exactly_the_covering_blocks(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(40 * SMALL_CHUNK)
    net = MemoryNetwork(seed=4)
    a = make_node(net, "a", tmp_path)
    b = make_node(net, "b", tmp_path)
    seed(b, art)
    wanted = [0, 17, 39]
    expected = covering(art, wanted)
    # 40 leaves, 4 links: root -> 3 nodes -> 10 nodes -> leaves; one node per level per leaf.
    assert len(expected) == 10
    async with net:
        report = await a.fetcher.fetch(art.root, [b.peer], leaves=wanted)
        assert report.blocks_fetched == 10 and report.blocks_present == 0
        assert not report.complete and not a.store.is_pinned(art.root)
        assert stored(a.store, art.blocks) == expected
        for i in wanted:
            assert a.store.get(art.leaves[i]) == art.data[i * SMALL_CHUNK : (i + 1) * SMALL_CHUNK]
        for bad in ([40], [-1], ["1"], [True]):
            with pytest.raises(LeafOutOfRange):
                await a.fetcher.fetch(art.root, [b.peer], leaves=bad)  # type: ignore[arg-type]
        # The whole file afterwards fetches only the rest.
        full = await a.fetcher.fetch(art.root, [b.peer])
    assert full.blocks_present == 10
    assert full.blocks_fetched == len(art.blocks) - 10
    assert full.complete and a.store.is_pinned(art.root)
    assert reassemble(a.store, art) == art.data


async def test_resume_after_the_only_provider_disappears(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(48 * SMALL_CHUNK)
    net = MemoryNetwork(seed=5)
    a = make_node(
        net,
        "a",
        tmp_path,
        fetch=FetchSettings(blocks_per_request=4, requests_per_provider=2, request_timeout_s=5.0),
    )
    b = make_node(net, "b", tmp_path)
    c = make_node(net, "c", tmp_path)
    seed(b, art)
    seed(c, art)

    def stop_b_midway(p: FetchProgress) -> None:
        if p.blocks_fetched >= 20 and b.host.running:
            net.stop(b.host)

    async with net:
        with pytest.raises(BlockUnavailable) as info:
            await a.fetcher.fetch(art.root, [b.peer], progress=stop_b_midway)
        first = info.value.report
        assert first is not None
        assert 20 <= first.blocks_fetched < len(art.blocks)
        assert first.failed_requests >= FetchSettings().max_provider_failures
        assert len(first.missing) == len(art.blocks) - first.blocks_fetched
        assert stored(a.store, art.blocks) == set(art.blocks) - set(first.missing)
        assert not a.store.is_pinned(art.root)

        # Another provider appears: only the rest comes from it (b, still down, is left out).
        second = await a.fetcher.fetch(art.root, [b.peer, c.peer])
        assert second.blocks_fetched == len(first.missing)
        assert second.blocks_by_peer == {c.peer: len(first.missing)}
        assert second.complete and reassemble(a.store, art) == art.data

        # b comes back (a restart: the node installs its handler again) and serves a third
        # node, which already holds half of the artifact.
        net.start(b.host)
        b.server.install()
        d = make_node(net, "d", tmp_path)
        half = covering(art, range(24))
        for cid in half:
            d.store.put(cid, art.blocks[cid])
        third = await d.fetcher.fetch(art.root, [b.peer])
    assert third.blocks_present == len(half)
    assert third.blocks_fetched == len(art.blocks) - len(half)
    assert reassemble(d.store, art) == art.data


async def test_provider_back_within_the_retries_completes_one_fetch(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(24 * SMALL_CHUNK)
    net = MemoryNetwork(seed=6)
    a = make_node(net, "a", tmp_path)
    b = make_node(net, "b", tmp_path)
    seed(b, art)
    restarted_at: list[float] = []

    async def restart_soon() -> None:
        await trio.sleep(1.2)
        net.start(b.host)
        b.server.install()
        restarted_at.append(trio.current_time())

    def stop_b(p: FetchProgress) -> None:
        if p.blocks_fetched >= 8 and b.host.running and not restarted_at:
            net.stop(b.host)
            nursery.start_soon(restart_soon)

    async with net, trio.open_nursery() as nursery:
        report = await a.fetcher.fetch(art.root, [b.peer], progress=stop_b)
    assert restarted_at
    assert report.complete and report.failed_requests >= 1
    assert report.blocks_fetched == len(art.blocks)
    assert reassemble(a.store, art) == art.data


async def test_timeouts_are_retried_with_backoff_elsewhere(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(32 * SMALL_CHUNK)
    net = MemoryNetwork(seed=7)
    a = make_node(
        net, "a", tmp_path, fetch=FetchSettings(request_timeout_s=2.0, max_provider_failures=3)
    )
    slow = make_node(net, "b", tmp_path)
    flaky = make_node(net, "c", tmp_path)
    seed(slow, art)
    seed(flaky, art)
    calls = {"flaky": 0}
    times: list[float] = []

    async def hang(peer: PeerId, payload: bytes, serve: Callable[[], Awaitable[bytes]]) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def first_two_hang(
        peer: PeerId, payload: bytes, serve: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        calls["flaky"] += 1
        times.append(trio.current_time())
        if calls["flaky"] <= 2:
            await trio.sleep(60)
        return await serve()

    wrap_handler(slow, hang)
    wrap_handler(flaky, first_two_hang)
    async with net:
        report = await a.fetcher.fetch(art.root, [slow.peer, flaky.peer])
    assert report.complete
    assert report.blocks_by_peer == {flaky.peer: len(art.blocks)}
    assert report.failed_requests >= 2 + 1  # the flaky twice, the hanging one at least once
    assert report.bad_peers == ()  # slowness is not misbehaviour
    assert a.host.score(slow.host) == 0
    # After its two timeouts the flaky provider was asked again only after a backoff.
    assert times[2] - times[0] >= 2.0 + FetchSettings().backoff_initial_s
    assert reassemble(a.store, art) == art.data


async def test_policy_denies_priced_blocks_without_a_valid_access_request(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(12 * SMALL_CHUNK)
    net = MemoryNetwork(seed=8)
    policy = GrantPolicy({GRANT: BUYER.address})
    owner = make_node(net, "owner", tmp_path, policy=policy)
    a = make_node(net, "a", tmp_path)
    seed(owner, art)
    async with net:
        # Leaf 0 (the header) and the nodes are public.
        head = await a.fetcher.fetch(art.root, [owner.peer], leaves=[0])
        assert head.blocks_fetched == len(covering(art, [0]))
        # The rest is denied without an access request...
        with pytest.raises(BlockUnavailable, match="DENIED") as info:
            await a.fetcher.fetch(art.root, [owner.peer])
        report = info.value.report
        assert report is not None and set(report.missing) == set(art.leaves[1:])
        assert owner.server.stats["denied"] >= len(art.leaves) - 1
        # ... and with one signed by somebody who holds no grant.
        stranger = sign_access(STRANGER, terms(STRANGER, a.peer, art.root))
        with pytest.raises(BlockUnavailable):
            await a.fetcher.fetch(art.root, [owner.peer], access=stranger)
        # A request made for another peer is refused before anything is sent.
        for_b = sign_access(BUYER, terms(BUYER, PeerId(b"b"), art.root))
        with pytest.raises(AccessPeerMismatch):
            await a.fetcher.fetch(art.root, [owner.peer], access=for_b)
        # The buyer's request opens the rest.
        good = sign_access(BUYER, terms(BUYER, a.peer, art.root))
        full = await a.fetcher.fetch(art.root, [owner.peer], access=good)
    assert full.complete
    assert full.blocks_fetched == len(art.leaves) - 1
    assert reassemble(a.store, art) == art.data
    seen = [acc for cid, leaf, acc in policy.asked if leaf not in (None, 0)]
    assert seen[-1] == VerifiedAccess(BUYER.address, GRANT, CHAIN, art.root, NOW_MS + 60_000)


async def test_a_block_of_another_root_is_not_found(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    free = make_artifact(3 * SMALL_CHUNK, seed=1)
    priced = make_artifact(3 * SMALL_CHUNK, seed=2)
    net = MemoryNetwork(seed=9)
    owner = make_node(net, "owner", tmp_path)
    a = make_node(net, "a", tmp_path)
    seed(owner, free)
    seed(owner, priced)
    req = ChunkRequest(free.root, (priced.leaves[1], free.leaves[1]), None)
    async with net:
        data = await a.host.request(owner.peer, PROTOCOL_CHUNKS, req.encode())
        # No provider has the block: the fetch names it.
        missing_root = bytes(unixfs.raw_cid(b"nobody has this"))
        with pytest.raises(
            BlockUnavailable, match=str(CID.decode(missing_root).set(base="base32"))
        ):
            await a.fetcher.fetch(missing_root, [owner.peer])
    resp = decode_chunk_response(data, 2)
    assert [e.status for e in resp.blocks] == [BlockStatus.NOT_FOUND, BlockStatus.OK]
    assert resp.blocks[1].data == free.blocks[free.leaves[1]]


async def test_bad_requests_are_refused_and_penalized(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(3 * SMALL_CHUNK)
    net = MemoryNetwork(seed=10)
    owner = make_node(net, "owner", tmp_path)
    a = make_node(net, "a", tmp_path)
    seed(owner, art)
    async with net:
        with pytest.raises(RequestFailed, match=r"malformed|undecodable"):
            await a.host.request(owner.peer, PROTOCOL_CHUNKS, b"\xc1garbage")
        with pytest.raises(ChunkMessageTooLarge):
            await owner.server.handle_request(a.peer, b"\x93" + b"\x00" * 5000)
        with pytest.raises(InvalidBlockCid):
            await owner.server.handle_request(
                a.peer, ChunkRequest(art.root, (b"\x01\x71\x12\x20" + b"\x00" * 32,), None).encode()
            )
    assert owner.server.stats["bad_requests"] == 3
    assert owner.host.score(a.host) == -3


async def test_concurrent_requests_per_peer_are_bounded(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(3 * SMALL_CHUNK)
    net = MemoryNetwork(seed=11)
    release = trio.Event()

    class Slow(OpenPolicy):
        async def authorize(self, *args: object, **kwargs: object) -> bool:
            await release.wait()
            return True

    owner = make_node(net, "owner", tmp_path, policy=Slow(), serve=ServeSettings(max_per_peer=2))
    seed(owner, art)
    req = ChunkRequest(art.root, (art.leaves[0],), None).encode()
    results: list[bytes] = []
    async with net, trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(
                lambda: _collect(owner.server.handle_request(PeerId(b"x"), req), results)
            )
        await trio.sleep(1)
        with pytest.raises(ChunksBusy):
            await owner.server.handle_request(PeerId(b"x"), req)
        # Another peer is not held back by x's requests.
        nursery.start_soon(
            lambda: _collect(owner.server.handle_request(PeerId(b"y"), req), results)
        )
        await trio.sleep(1)
        release.set()
    assert len(results) == 3
    assert owner.server.stats["busy"] == 1


async def _collect(aw: Awaitable[bytes], out: list[bytes]) -> None:
    out.append(await aw)


async def test_malformed_artifact_ends_the_fetch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads: InlineThreads
) -> None:
    junk = b"this is not a dag-pb node"
    root = bytes(unixfs.dag_pb_cid(junk))
    net = MemoryNetwork(seed=12)
    owner = make_node(net, "owner", tmp_path)
    a = make_node(net, "a", tmp_path)
    owner.store.put(root, junk)
    async with net:
        # The root matches its CID (nobody is to blame) but is no UnixFS node: nothing stored.
        with pytest.raises(MalformedArtifact, match="PBNode"):
            await a.fetcher.fetch(root, [owner.peer])
        assert not a.store.has(root)
        assert a.host.score(owner.host) == 0
        # A fetcher that already holds the bad root refuses it without asking anybody.
        a.store.put(root, junk)
        with pytest.raises(MalformedArtifact):
            await a.fetcher.fetch(root, [])
    assert owner.server.stats["requests"] == 1


async def test_real_leaves_keep_responses_near_8_mib(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads: InlineThreads
) -> None:
    art = make_artifact(20 * unixfs.CHUNK_SIZE + 12345)
    net = MemoryNetwork(seed=13)
    a = make_node(net, "a", tmp_path, fetch=FetchSettings(requests_per_provider=3))
    b = make_node(net, "b", tmp_path)
    seed(b, art)
    sizes: list[int] = []
    active = [0, 0]

    async def measure(peer: PeerId, payload: bytes, serve: Callable[[], Awaitable[bytes]]) -> bytes:
        active[0] += 1
        active[1] = max(active[1], active[0])
        try:
            out = await serve()
        finally:
            active[0] -= 1
        sizes.append(len(out))
        return out

    wrap_handler(b, measure)
    async with net:
        report = await a.fetcher.fetch(art.root, [b.peer])
    assert report.complete and report.bytes_fetched == sum(len(d) for d in art.blocks.values())
    assert max(sizes) <= chunks.MAX_CHUNK_RESPONSE_BYTES
    assert max(sizes) > 7 * unixfs.CHUNK_SIZE  # full batches of leaves
    assert active[1] <= 3
    assert reassemble(a.store, art) == art.data


async def test_each_response_is_stored_with_one_verified_put_many(
    small_layout: None,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    threads: InlineThreads,
) -> None:
    art = make_artifact(40 * SMALL_CHUNK)
    net = MemoryNetwork(seed=21)
    a = make_node(net, "a", tmp_path)
    honest = make_node(net, "b", tmp_path)
    liar = make_node(net, "c", tmp_path, verify=lambda cid, data: True)
    seed(honest, art)
    bad_leaf = art.leaves[5]
    for cid, data in art.blocks.items():
        liar.store.put(cid, flip(data) if cid == bad_leaf else data)
    store_hashes = 0

    def counting(cid: bytes, data: bytes) -> bool:
        nonlocal store_hashes
        store_hashes += 1
        return store_verifier(cid, data)

    a.store._verify = counting
    batches: list[tuple[list[tuple[bytes, bytes | memoryview]], bool]] = []
    real_put_many = a.store.put_many

    def spy(
        blocks: Iterable[tuple[bytes, bytes | memoryview]], *, verified: bool = False
    ) -> list[bool]:
        blocks = list(blocks)
        batches.append((blocks, verified))
        return real_put_many(blocks, verified=verified)

    a.store.put_many = spy  # type: ignore[method-assign]
    asked: list[tuple[bytes, ...]] = []

    async def record(peer: PeerId, payload: bytes, serve: Callable[[], Awaitable[bytes]]) -> bytes:
        asked.append(decode_chunk_request(payload).cids)
        return await serve()

    wrap_handler(liar, record)
    async with net:
        with pytest.raises(BlockUnavailable) as info:
            await a.fetcher.fetch(art.root, [liar.peer])
        first = info.value.report
        assert first is not None and liar.peer in first.bad_peers
        # One put_many per response, of the blocks that matched their CIDs, taken as views of
        # the response (no copy) and not hashed again by the store.
        assert len(batches) == first.requests == threads.calls.count("_verify_and_store")
        assert all(verified for _, verified in batches)
        assert all(isinstance(data, memoryview) for blocks, _ in batches for _, data in blocks)
        assert store_hashes == 0
        put = [cid for blocks, _ in batches for cid, _ in blocks]
        assert bad_leaf not in put and not a.store.has(bad_leaf)
        assert len(put) == first.blocks_fetched
        assert any(len(blocks) > 1 for blocks, _ in batches)  # responses of several blocks
        assert stored(a.store, art.blocks) == set(put)
        # The good blocks of the response with the bad leaf were kept all the same; the honest
        # provider is asked only for the rest.
        (with_bad,) = [cids for cids in asked if bad_leaf in cids]
        assert len(with_bad) > 1 and set(with_bad) - {bad_leaf} <= set(put)
        second = await a.fetcher.fetch(art.root, [honest.peer])
    assert second.complete and second.blocks_present == len(put)
    assert second.blocks_fetched == len(art.blocks) - len(put)
    assert reassemble(a.store, art) == art.data
    assert store_hashes == 0
    assert a.store.check(deep=True).clean  # what the fetcher vouched for does verify


# --- provider records (MemoryNetwork) ------------------------------------------------------------


async def test_memory_provider_records(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=14)
    a, b, c = net.add_host("a"), net.add_host("b"), net.add_host("c")
    key = bytes(unixfs.raw_cid(b"artifact"))
    async with net:
        assert await b.find_providers(key) == []
        await c.provide(key)
        await a.provide(key)
        await a.provide(key)
        assert await b.find_providers(key) == [c.peer_id, a.peer_id]
        assert await b.find_providers(key, 1) == [c.peer_id]
        assert await a.find_providers(key) == [c.peer_id]  # never itself
        net.stop(c)
        net.start(c)
        assert await b.find_providers(key) == [c.peer_id, a.peer_id]  # records outlive a crash
        for bad in (b"", b"\x00" * 10, b"\x01" * 200):
            with pytest.raises(InvalidContentKey):
                await a.provide(bad)
        with pytest.raises(InvalidContentKey):
            await a.find_providers("text")  # type: ignore[arg-type]
