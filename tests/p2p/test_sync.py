"""Block sync (``node/p2p/sync.py``) over the in-memory network on trio's mock clock.

A chain of 200 blocks (one transfer each, four validators, commits signed by three of them) is
built once; peers serve copies of it. Scenarios: the handlers (status, ranges, limits, typed
errors); a fresh node syncing from three peers with windows spread over all of them in parallel;
peers serving a tampered body, a bad commit signature or a chain that does not link (penalized,
dropped, the sync still completes from the others); a peer that stops or goes silent mid-sync;
a committed block that breaks this node's rules (the sync stops before it, no peer is blamed);
a node whose consensus already runs (blocks go through ``ConsensusService.commit_from_peer``); and
a fresh validator that syncs from three running validators, then joins consensus.

Worker-thread work runs inline (``threads``), the network's faults are hashes of its seed, and
trio's scheduler is seeded, so every run is the same.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from node import crypto
from node.chain import ChainService
from node.consensus.blocks import Block, Commit, Header, compute_tx_root
from node.consensus.mempool import Mempool
from node.consensus_service import ConsensusService
from node.errors import DecodeError
from node.genesis import Genesis
from node.p2p.api import PROTOCOL_SYNC, PeerId
from node.p2p.catchup import ConsensusP2P
from node.p2p.memory import MemoryHost, MemoryNetwork
from node.p2p.messages import (
    BlocksResponse,
    BlockWithCommit,
    GetBlocks,
    GetHeaders,
    GetStatus,
    HeadersResponse,
    RemoteError,
    StatusResponse,
    decode_request,
    decode_response,
)
from node.p2p.sync import (
    BadSyncData,
    RangeUnavailable,
    SyncBusy,
    SyncService,
    SyncSettings,
    verify_window,
)
from node.storage import MemoryKV
from node.types import Hash32, Height
from tests.helpers import commit_next, key, make_commit, make_genesis, open_chain, vtransfer
from tests.integration.cluster import CATCHUP, GOSSIP, clock_ms, seed_scheduler
from tests.threads import InlineThreads

BLOCKS = 200
SIGNERS = (0, 1, 2)  # three of the four validators sign every commit: a quorum
FAST = SyncSettings(
    status_interval_s=0.5,
    status_timeout_s=0.5,
    request_timeout_s=1.0,
    window=16,
    max_in_flight=6,
    retry_backoff_s=0.2,
)
SERVE_ONLY = replace(FAST, initial_sync=False, follow=False)


@functools.cache
def genesis() -> Genesis:
    return make_genesis(funded=4, validators=(0, 1, 2, 3))


@functools.cache
def source_kv() -> MemoryKV:
    """The 200-block chain (built once per test session; tests take copies)."""
    kv = MemoryKV()
    chain = open_chain(kv, genesis())
    for h in range(1, BLOCKS + 1):
        sender = 1 + h % 4
        tx = vtransfer(sender, 1 + (h + 1) % 4, 1_000 + h, nonce=(h - 1) // 4)
        commit_next(chain, SIGNERS, [tx])
    chain.close()
    return kv


@pytest.fixture(autouse=True)
def _deterministic(threads: InlineThreads) -> None:
    seed_scheduler(0)


class Node:
    """One node's chain, pool, consensus service (run or not) and sync service on a host."""

    def __init__(
        self,
        net: MemoryNetwork,
        name: str,
        tmp_path: Path,
        *,
        kv: MemoryKV | None = None,
        validator_key: crypto.PrivateKey | None = None,
        settings: SyncSettings = FAST,
    ) -> None:
        self.host: MemoryHost = net.add_host(name)
        self.kv = kv if kv is not None else MemoryKV()
        self.chain: ChainService = open_chain(self.kv, genesis())
        self.mempool = Mempool(genesis().chain_id)
        self.committed: dict[int, Hash32] = {}
        self.consensus = ConsensusService(
            self.chain,
            self.mempool,
            validator_key,
            tmp_path / f"wal-{name}",
            clock_ms=clock_ms,
            on_commit=self._on_commit,
        )
        self.sync = SyncService(self.host, self.chain, self.consensus, settings)

    def _on_commit(self, block: Block) -> None:
        assert block.header.height not in self.committed
        self.committed[block.header.height] = block.hash()

    @property
    def height(self) -> int:
        return self.chain.head_height

    @property
    def peer_id(self) -> PeerId:
        return self.host.peer_id


def source_hashes() -> list[Hash32]:
    view = open_chain(source_kv().crash_copy(), genesis()).read_view()
    out = []
    for h in range(1, BLOCKS + 1):
        block = view.get_block(h)
        assert block is not None
        out.append(block.hash())
    return out


def assert_same_chain(node: Node, upto: int = BLOCKS) -> None:
    view = node.chain.read_view()
    expected = source_hashes()
    for h in range(1, upto + 1):
        block, commit = view.get_block(h), view.get_commit(h)
        assert block is not None and commit is not None
        assert block.hash() == expected[h - 1] == commit.block_hash


async def start_peers(nursery: trio.Nursery, peers: list[Node]) -> None:
    for p in peers:
        await nursery.start(p.sync.run)


# --- serving -------------------------------------------------------------------------------------


async def test_the_handlers_answer_status_ranges_and_typed_errors(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(1)
    server = Node(net, "server", tmp_path, kv=source_kv().crash_copy(), settings=SERVE_ONLY)
    client = net.add_host("client")

    async def ask(payload: bytes) -> bytes:
        return await client.request(server.peer_id, PROTOCOL_SYNC, payload)

    async with net, trio.open_nursery() as nursery:
        await nursery.start(server.sync.run)
        status = decode_response(StatusResponse, await ask(GetStatus().encode()))
        assert (status.base, status.head) == (1, BLOCKS)
        assert status.head_hash == source_hashes()[-1]

        blocks = decode_response(BlocksResponse, await ask(GetBlocks(Height(190), 50).encode()))
        assert [b.block.header.height for b in blocks.blocks] == list(range(190, 201))
        headers = decode_response(HeadersResponse, await ask(GetHeaders(Height(1), 1000).encode()))
        assert len(headers.headers) == BLOCKS
        assert headers.headers[-1].header.hash() == source_hashes()[-1]

        for start in (BLOCKS + 1, 10_000):
            with pytest.raises(RemoteError) as err:
                decode_response(BlocksResponse, await ask(GetBlocks(Height(start), 4).encode()))
            assert err.value.remote_code == RangeUnavailable.code

        # Undecodable: the typed decode error comes back and the sender is penalized.
        with pytest.raises(RemoteError) as err:
            decode_response(BlocksResponse, await ask(b"\x93\x01\x02"))
        assert err.value.remote_code >= DecodeError.code
        assert server.host.score(client) == -1

        # The byte bound: a small limit gives fewer blocks (the requester asks again).
        server.sync.settings = replace(SERVE_ONLY, max_response_bytes=4_000)
        blocks = decode_response(BlocksResponse, await ask(GetBlocks(Height(1), 64).encode()))
        assert 1 <= len(blocks.blocks) < 10
        assert len(blocks.encode()) <= 4_000

        server.sync.settings = replace(SERVE_ONLY, max_serving=0)
        with pytest.raises(RemoteError) as err:
            decode_response(BlocksResponse, await ask(GetBlocks(Height(1), 4).encode()))
        assert err.value.remote_code == SyncBusy.code
        nursery.cancel_scope.cancel()


def test_verify_window_refuses_bad_bodies_commits_and_links() -> None:
    chain = open_chain(source_kv().crash_copy(), genesis())
    view = chain.read_view()
    items = []
    for h in range(1, 9):
        block, commit = view.get_block(h), view.get_commit(h)
        assert block is not None and commit is not None
        items.append(BlockWithCommit(block, commit))
    sets = {chain.validator_set().hash(): chain.validator_set()}
    chain_id = genesis().chain_id
    ok = verify_window(chain_id, 1, 8, items, sets, recover_txs=True)
    assert ok.end == 8 and ok.deferred == 0 and ok.verified is not None
    assert [v.raw for v in ok.verified[3]] == list(items[3].block.txs)
    # An unknown validator set defers the commit check to the apply.
    assert verify_window(chain_id, 1, 8, items, {}, recover_txs=False).deferred == 8

    bad_body = list(items)
    bad_body[4] = BlockWithCommit(replace(items[4].block, txs=()), items[4].commit)
    bad_commit = list(items)
    bad_commit[2] = BlockWithCommit(items[2].block, corrupt_commit(items[2].commit))
    unlinked = list(items)
    unlinked[5] = relink(items[5], Hash32(b"\x07" * 32))
    cases: list[tuple[list[BlockWithCommit], int, int, str]] = [
        (bad_body, 1, 8, "tx root"),
        (bad_commit, 1, 8, "signature"),
        (unlinked, 1, 8, "does not link"),
        (items, 2, 8, "asked 2"),
        (items, 1, 4, "asked"),
    ]
    for window, start, asked, why in cases:
        with pytest.raises(BadSyncData, match=why):
            verify_window(chain_id, start, asked, window, sets, recover_txs=False)
    chain.close()


# --- tampering helpers ---------------------------------------------------------------------------


def corrupt_commit(commit: Commit) -> Commit:
    first = commit.precommits[0]
    other = commit.precommits[1]
    # A real signature, but over another validator's vote: it recovers someone else.
    forged = replace(first, signature=other.signature)
    return replace(commit, precommits=(forged, *commit.precommits[1:]))


def relink(item: BlockWithCommit, parent: Hash32) -> BlockWithCommit:
    """The block with another parent hash, its commit re-signed by the validators: a validly
    committed header that does not link."""
    header: Header = replace(item.block.header, parent_hash=parent)
    block = replace(item.block, header=header)
    commit = make_commit(
        header.hash(), header.height, item.commit.round, SIGNERS, time_ms=header.time + 1_000
    )
    return BlockWithCommit(block, commit)


@functools.cache
def forked_chain() -> dict[int, BlockWithCommit]:
    """Heights 2..200 re-signed on top of a made-up block 1 hash: every commit valid, every
    block linked to the previous one of the fork, none to the real chain."""
    view = open_chain(source_kv().crash_copy(), genesis()).read_view()
    out: dict[int, BlockWithCommit] = {}
    parent = Hash32(b"\x05" * 32)
    for h in range(2, BLOCKS + 1):
        block, commit = view.get_block(h), view.get_commit(h)
        assert block is not None and commit is not None
        item = relink(BlockWithCommit(block, commit), parent)
        out[h] = item
        parent = item.block.hash()
    return out


Tamper = Callable[[BlockWithCommit], BlockWithCommit]

TAMPERS: dict[str, Tamper] = {
    "bad_tx_root": lambda i: BlockWithCommit(replace(i.block, txs=()), i.commit),
    "bad_commit_signature": lambda i: BlockWithCommit(i.block, corrupt_commit(i.commit)),
    "wrong_linkage": lambda i: forked_chain().get(i.block.header.height, i),
}


def tampering(node: Node, tamper: Tamper) -> Callable[[PeerId, bytes], Awaitable[bytes]]:
    async def handler(peer: PeerId, data: bytes) -> bytes:
        answer = await node.sync.handle_request(peer, data)
        if not isinstance(decode_request(PROTOCOL_SYNC, data), GetBlocks):
            return answer
        resp = decode_response(BlocksResponse, answer)
        return BlocksResponse(tuple(tamper(i) for i in resp.blocks)).encode()

    return handler


# --- syncing a fresh node ------------------------------------------------------------------------


async def test_a_fresh_node_syncs_from_three_peers_in_parallel(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(2, delay_ms=(5, 20))
    peers = [
        Node(net, f"p{i}", tmp_path, kv=source_kv().crash_copy(), settings=SERVE_ONLY)
        for i in range(3)
    ]
    fresh = Node(net, "fresh", tmp_path)
    async with net, trio.open_nursery() as nursery:
        await start_peers(nursery, peers)
        assert fresh.sync.status().syncing is False
        await nursery.start(fresh.sync.run)  # returns once the initial sync is done
        assert fresh.height == BLOCKS
        nursery.cancel_scope.cancel()
    assert_same_chain(fresh)
    assert fresh.committed == dict(enumerate(source_hashes(), start=1))  # on_commit per block
    status = fresh.sync.status()
    assert not status.syncing and status.target_height == BLOCKS
    assert status.blocks_applied == BLOCKS and status.dropped == ()
    # 13 windows of 16 blocks, spread over all three peers, several in flight at once.
    counts = fresh.sync.requests_by_peer
    assert sorted(counts) == sorted(p.peer_id for p in peers)
    assert sum(counts.values()) == 13
    assert min(counts.values()) >= 3
    assert fresh.sync.max_in_flight_seen >= 3
    assert set(status.peers) == {p.peer_id for p in peers}
    served = [p.sync.stats["served_blocks_requests"] for p in peers]
    assert served == [counts[p.peer_id] for p in peers]
    assert all(fresh.host.score(p.host) == 0 for p in peers)


@pytest.mark.parametrize("how", sorted(TAMPERS))
async def test_a_peer_serving_tampered_blocks_is_dropped_and_the_sync_completes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    net = MemoryNetwork(3, delay_ms=(5, 20))
    peers = [
        Node(net, f"p{i}", tmp_path, kv=source_kv().crash_copy(), settings=SERVE_ONLY)
        for i in range(3)
    ]
    bad = peers[1]
    bad.sync = SyncService(bad.host, bad.chain, bad.consensus, replace(SERVE_ONLY, serve=False))
    bad.host.set_handler(PROTOCOL_SYNC, tampering(bad, TAMPERS[how]))
    fresh = Node(net, "fresh", tmp_path)
    async with net, trio.open_nursery() as nursery:
        await start_peers(nursery, peers)
        await nursery.start(fresh.sync.run)
        assert fresh.height == BLOCKS
        nursery.cancel_scope.cancel()
    assert_same_chain(fresh)
    status = fresh.sync.status()
    assert status.dropped == (bad.peer_id,)
    # Penalized once (answers that were in flight with the bad one do not count again), and
    # not asked again: a fork that links within itself is caught only when applied, so a few
    # of its windows may have been fetched by then.
    assert fresh.host.score(bad.host) == -1
    assert fresh.sync.requests_by_peer[bad.peer_id] <= 4
    assert fresh.sync.stats["peers_dropped"] == 1
    assert all(fresh.host.score(p.host) == 0 for p in peers if p is not bad)
    assert bad.peer_id not in status.peers


async def test_commits_of_sets_not_known_yet_are_checked_when_applied(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As across validator-set changes the client has not applied yet: no set is known when the
    windows arrive, every commit is checked on apply, and a bad one is still the peer's fault."""
    monkeypatch.setattr(SyncService, "_refresh_sets", lambda self: None)
    net = MemoryNetwork(8, delay_ms=(5, 20))
    peers = [
        Node(net, f"p{i}", tmp_path, kv=source_kv().crash_copy(), settings=SERVE_ONLY)
        for i in range(3)
    ]
    bad = peers[0]
    bad.sync = SyncService(bad.host, bad.chain, bad.consensus, replace(SERVE_ONLY, serve=False))
    bad.host.set_handler(PROTOCOL_SYNC, tampering(bad, TAMPERS["bad_commit_signature"]))
    fresh = Node(net, "fresh", tmp_path)
    async with net, trio.open_nursery() as nursery:
        await start_peers(nursery, peers)
        await nursery.start(fresh.sync.run)
        assert fresh.height == BLOCKS
        nursery.cancel_scope.cancel()
    assert_same_chain(fresh)
    assert fresh.sync.status().dropped == (bad.peer_id,)
    assert fresh.host.score(bad.host) == -1


async def test_a_committed_block_that_is_invalid_here_stops_the_sync_without_blame(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Every peer serves a block 100 whose transaction signature is broken, correctly rooted and
    committed by the validators: the peers are not at fault, the sync stops before it."""
    view = open_chain(source_kv().crash_copy(), genesis()).read_view()
    block, commit = view.get_block(100), view.get_commit(100)
    assert block is not None and commit is not None
    raw = block.txs[0]
    broken = raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:]
    header = replace(block.header, tx_root=compute_tx_root((broken,)))
    invalid = BlockWithCommit(
        replace(block, header=header, txs=(broken,)),
        make_commit(header.hash(), 100, commit.round, SIGNERS, time_ms=header.time + 1_000),
    )

    def serving_up_to_100(node: Node) -> Callable[[PeerId, bytes], Awaitable[bytes]]:
        async def handler(peer: PeerId, data: bytes) -> bytes:
            req = decode_request(PROTOCOL_SYNC, data)
            if isinstance(req, GetStatus):
                return StatusResponse(Height(1), Height(100), invalid.block.hash()).encode()
            answer = await node.sync.handle_request(peer, data)
            if not isinstance(req, GetBlocks):
                return answer
            items = decode_response(BlocksResponse, answer).blocks
            kept = [invalid if i.block.header.height == 100 else i for i in items]
            return BlocksResponse(tuple(i for i in kept if i.block.header.height <= 100)).encode()

        return handler

    net = MemoryNetwork(7, delay_ms=(5, 20))
    peers = [
        Node(net, f"p{i}", tmp_path, kv=source_kv().crash_copy(), settings=SERVE_ONLY)
        for i in range(3)
    ]
    fresh = Node(net, "fresh", tmp_path)
    async with net, trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.sync.run)
            p.host.set_handler(PROTOCOL_SYNC, serving_up_to_100(p))
        await nursery.start(fresh.sync.run)
        assert fresh.height == 99
        requests = sum(fresh.sync.requests_by_peer.values())
        await trio.sleep(10 * FAST.status_interval_s)  # following: no new attempt at 100
        assert sum(fresh.sync.requests_by_peer.values()) == requests
        nursery.cancel_scope.cancel()
    assert_same_chain(fresh, 99)
    assert fresh.sync.status().dropped == ()
    assert all(fresh.host.score(p.host) == 0 for p in peers)
    assert "invalid under this node's rules" in caplog.text


@pytest.mark.parametrize("how", ["stop", "partition"])
async def test_a_peer_that_stops_mid_sync(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    net = MemoryNetwork(4, delay_ms=(5, 20))
    peers = [
        Node(net, f"p{i}", tmp_path, kv=source_kv().crash_copy(), settings=SERVE_ONLY)
        for i in range(3)
    ]
    quitter = peers[2]
    fresh = Node(net, "fresh", tmp_path)
    served = 0

    async def handler(peer: PeerId, data: bytes) -> bytes:
        nonlocal served
        if isinstance(decode_request(PROTOCOL_SYNC, data), GetBlocks):
            served += 1
            if served == 2:  # gone with this request in flight
                if how == "stop":
                    net.stop(quitter.host)
                else:
                    net.partition([[fresh.host, peers[0].host, peers[1].host], [quitter.host]])
        return await quitter.sync.handle_request(peer, data)

    async with net, trio.open_nursery() as nursery:
        await start_peers(nursery, peers)
        quitter.host.set_handler(PROTOCOL_SYNC, handler)
        await nursery.start(fresh.sync.run)
        assert fresh.height == BLOCKS
        nursery.cancel_scope.cancel()
    assert_same_chain(fresh)
    assert served >= 2
    assert fresh.sync.stats["fetch_failures"] >= 1
    assert fresh.sync.status().dropped == ()  # not bad data: not penalized
    assert fresh.host.score(quitter.host) == 0
    if how == "partition":  # the requests to it timed out
        assert trio.current_time() >= FAST.request_timeout_s


async def test_a_node_whose_consensus_runs_commits_through_the_consensus_service(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(5, delay_ms=(5, 20))
    peers = [
        Node(net, f"p{i}", tmp_path, kv=source_kv().crash_copy(), settings=SERVE_ONLY)
        for i in range(3)
    ]
    lagging = Node(net, "lagging", tmp_path, kv=MemoryKV())
    real_commit = lagging.consensus.commit_from_peer
    calls = 0

    async def counting(block: Block, commit: Commit) -> bool:
        nonlocal calls
        calls += 1
        return await real_commit(block, commit)

    lagging.consensus.commit_from_peer = counting  # type: ignore[method-assign]
    async with net, trio.open_nursery() as nursery:
        await start_peers(nursery, peers)
        await nursery.start(lagging.consensus.run)  # consensus first: cooperative mode
        await nursery.start(lagging.sync.run)
        assert lagging.height == BLOCKS
        assert lagging.consensus.height == BLOCKS + 1
        nursery.cancel_scope.cancel()
    assert_same_chain(lagging)
    assert calls == BLOCKS


# --- a fresh validator joins a running network ---------------------------------------------------


class Validator(Node):
    """A node with the full stack: gossip and catch-up, sync, consensus."""

    def __init__(self, net: MemoryNetwork, index: int, tmp_path: Path, kv: MemoryKV) -> None:
        keys = sorted((key(i) for i in range(4)), key=lambda k: k.address)
        super().__init__(net, f"v{index}", tmp_path, kv=kv, validator_key=keys[index])
        self.p2p = ConsensusP2P(
            self.host,
            self.chain,
            self.mempool,
            self.consensus,
            gossip_settings=GOSSIP,
            catchup_settings=replace(CATCHUP, serve_sync=False),
        )

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.p2p.run)
        await nursery.start(self.sync.run)
        await nursery.start(self.consensus.run)


async def test_a_fresh_validator_syncs_then_follows_consensus(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(6, delay_ms=(1, 10))
    # Validators 0..2 hold the 200 blocks; validator 3 (never signed any of them) is fresh.
    members = [Validator(net, i, tmp_path, source_kv().crash_copy()) for i in range(3)]
    fresh = Validator(net, 3, tmp_path, MemoryKV())
    assert fresh.consensus.key is not None
    me = fresh.consensus.key.address

    async with net, trio.open_nursery() as nursery:
        for m in members:
            await m.start(nursery)
        with trio.fail_after(60):
            while min(m.height for m in members) < BLOCKS + 3:
                await trio.sleep(0.1)
        await fresh.start(nursery)
        synced_to = fresh.height
        assert synced_to >= BLOCKS + 2
        assert not fresh.sync.status().syncing
        with trio.fail_after(120):
            while fresh.height < synced_to + 8:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    # Every node holds the same blocks; the fresh one synced, then followed consensus.
    low = min(n.height for n in [*members, fresh])
    for n in members:
        for h in range(1, low + 1):
            assert n.chain.store.get_block_hash(h) == fresh.chain.store.get_block_hash(h)
    assert_same_chain(fresh)
    assert fresh.sync.stats["blocks_applied"] >= synced_to
    # It votes: its precommits are in the last commits of blocks after it joined.
    view = fresh.chain.read_view()
    signed = [
        h
        for h in range(synced_to + 2, fresh.height + 1)
        if (b := view.get_block(h)) is not None
        and b.last_commit is not None
        and any(v.vote.validator == me for v in b.last_commit.precommits)
    ]
    assert signed, "the fresh validator never precommitted"
