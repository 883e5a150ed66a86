"""The gossip service and the catch-up/pull protocols of one node, driven by a scripted peer.

One validator (member 0 of a 4-validator genesis, the others not running, so it stays at
height 1 going through rounds on its timeouts) runs the real stack on the in-memory network.
A raw ``MemoryHost`` plays the peer: it publishes crafted messages (signed with the other
validators' dev keys, or broken on purpose), answers pulls, and sends requests. The tests
check the topic validators' verdicts (``ACCEPT`` handed to consensus and forwarded, ``IGNORE``
without penalty, ``REJECT`` scored down until the peer is disconnected), part assembly (parts
before their proposal, pulled parts, forged part sets), transaction batches and announces, and
each request handler, and the evidence topic's verdicts. The last tests run single-validator chains: an observer joins late and
catches up with ``GetCommit``/``GetBlocks``, then follows by gossip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from node import crypto
from node.consensus.blocks import (
    Block,
    DuplicateVoteEvidence,
    Proposal,
    SignedVote,
    Vote,
    VoteType,
    sign_proposal,
    sign_vote,
)
from node.consensus.engine import EMPTY_ROUND
from node.consensus.signstate import Step
from node.errors import DecodeError
from node.p2p.api import (
    PROTOCOL_CATCHUP,
    PROTOCOL_PULL,
    PROTOCOL_SYNC,
    GossipMessage,
    PeerId,
    Topic,
    Verdict,
    topic_name,
)
from node.p2p.gossip import GossipSettings
from node.p2p.memory import MemoryHost
from node.p2p.messages import (
    Bitmap,
    BlocksResponse,
    CommitResponse,
    EvidenceMessage,
    GetBlocks,
    GetCommit,
    GetParts,
    GetStatus,
    GetTxs,
    GetVotes,
    HasVotes,
    PartsResponse,
    ProposalMessage,
    RemoteError,
    RoundStateMessage,
    StatusResponse,
    TxAnnounce,
    TxBatch,
    TxsResponse,
    VoteBatch,
    VotesResponse,
    WireMessage,
    decode_gossip,
    decode_request,
    decode_response,
    error_response,
)
from node.p2p.parts import make_part_set
from node.storage import MemoryKV
from node.types import Hash32, Height, Round, TimestampMs
from tests.helpers import CHAIN_ID, GENESIS_TIME, key, open_chain, transfer
from tests.integration.cluster import Cluster, Member, seed_scheduler
from tests.threads import InlineThreads

TXS = topic_name(CHAIN_ID, Topic.TXS)
PROPOSALS = topic_name(CHAIN_ID, Topic.PROPOSALS)
VOTES = topic_name(CHAIN_ID, Topic.VOTES)
EVIDENCE = topic_name(CHAIN_ID, Topic.EVIDENCE)


@pytest.fixture(autouse=True)
def _inline(threads: InlineThreads) -> None:
    seed_scheduler(0)


class Peer:
    """A scripted peer: publishes crafted gossip, records what it receives, serves pulls."""

    def __init__(self, host: MemoryHost) -> None:
        self.host = host
        self.got: list[tuple[str, WireMessage]] = []
        self.parts: dict[tuple[int, int, bytes], dict[int, object]] = {}
        self.pull_requests: list[WireMessage] = []

    async def start(self) -> None:
        async def accept(msg: GossipMessage) -> Verdict:
            topic = Topic(msg.topic.split("/")[3])
            self.got.append((msg.topic, decode_gossip(topic, msg.data)))
            return Verdict.ACCEPT

        for t in (TXS, PROPOSALS, VOTES, EVIDENCE):
            await self.host.subscribe(t, accept)
        self.host.set_handler(PROTOCOL_PULL, self._serve_pull)

    async def _serve_pull(self, peer: PeerId, data: bytes) -> bytes:
        req = decode_request(PROTOCOL_PULL, data)
        self.pull_requests.append(req)
        assert isinstance(req, GetParts)
        held = self.parts.get((req.height, req.round, req.root), {})
        return PartsResponse(tuple(held[i] for i in req.indices if i in held)).encode()  # type: ignore[misc]

    async def publish(self, topic: str, msg: WireMessage | bytes) -> None:
        await self.host.publish(topic, msg if isinstance(msg, bytes) else msg.encode())
        await trio.sleep(0.05)

    async def request(self, target: MemoryHost, protocol: str, msg: WireMessage | bytes) -> bytes:
        data = msg if isinstance(msg, bytes) else msg.encode()
        return await self.host.request(target.peer_id, protocol, data)

    def received(self, kind: type[WireMessage]) -> list[WireMessage]:
        return [m for _, m in self.got if isinstance(m, kind)]


Body = Callable[[Cluster, Member, Peer], Awaitable[None]]


async def run_one(tmp_path: Path, body: Body, **kwargs: object) -> Cluster:
    """Member 0 of a 4-validator cluster alone, plus a scripted peer."""
    cluster = Cluster(tmp_path, **kwargs)  # type: ignore[arg-type]
    peer = Peer(cluster.net.add_host("peer"))

    async def main(c: Cluster) -> None:
        await peer.start()
        await trio.sleep(0.01)
        await body(c, c.members[0], peer)

    await cluster.run(main, start=[0])
    return cluster


def keys_of(cluster: Cluster) -> list[crypto.PrivateKey]:
    """The validators' keys in validator-index order."""
    return [m.key for m in cluster.members if m.key is not None]


def peer_score(member: Member, peer: Peer) -> int:
    return member.host.score(peer.host)


# --- votes ---------------------------------------------------------------------------------------


async def test_valid_votes_are_delivered_and_forwarded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        relay = Peer(c.net.add_host("relay", connect=False))
        c.net.connect(relay.host, m.host)  # reaches the peer only through the member
        await relay.start()
        votes = tuple(vote_of(k[i], 1, 0, VoteType.PREVOTE, None) for i in (1, 2))
        await peer.publish(VOTES, VoteBatch(votes))
        prevotes = m.service.state.rounds[0].prevotes
        assert set(prevotes.values_of) >= {k[1].address, k[2].address}
        assert m.p2p.gossip.stats["votes_accept"] == 1
        assert [b for b in relay.received(VoteBatch) if b.votes == votes]  # type: ignore[attr-defined]
        # The same bytes published again: known, ignored, not held against the peer.
        await peer.publish(VOTES, VoteBatch(votes))
        assert m.p2p.gossip.stats["votes_known_ignore"] == 1
        assert peer_score(m, peer) == 0

    await run_one(tmp_path, body)


def vote_of(
    k: crypto.PrivateKey, height: int, round_: int, vote_type: int, value: bytes | None
) -> SignedVote:
    v = Vote(
        int(vote_type),
        Height(height),
        Round(round_),
        None if value is None else Hash32(value),
        TimestampMs(GENESIS_TIME + 1),
        k.address,
    )
    return sign_vote(k, CHAIN_ID, v)


async def test_stale_unknown_and_far_ahead_votes_are_ignored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        outsider = key(9)  # not a validator
        await peer.publish(VOTES, VoteBatch((vote_of(outsider, 1, 0, VoteType.PREVOTE, None),)))
        assert m.p2p.gossip.stats["votes_unusable_ignore"] == 1
        pokes = m.p2p.catchup.stats.get("pokes", 0)
        await peer.publish(VOTES, VoteBatch((vote_of(k[1], 7, 0, VoteType.PREVOTE, None),)))
        assert m.p2p.gossip.stats["votes_known_ignore"] == 1  # nothing usable in it
        assert m.p2p.catchup.stats.get("pokes", 0) == pokes + 1  # but the peer is ahead
        assert peer_score(m, peer) == 0
        assert k[1].address not in m.service.state.rounds.get(0, EMPTY_ROUND).prevotes.values_of

    await run_one(tmp_path, body)


async def test_bad_data_is_rejected_until_the_peer_is_disconnected(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        # A vote claiming validator 1, signed by validator 2.
        forged = vote_of(k[2], 1, 0, VoteType.PREVOTE, None)
        forged = SignedVote(
            Vote(
                forged.vote.vote_type,
                forged.vote.height,
                forged.vote.round,
                forged.vote.block_hash,
                forged.vote.time,
                k[1].address,
            ),
            forged.signature,
        )
        await peer.publish(VOTES, VoteBatch((forged,)))
        assert m.p2p.gossip.stats["votes_bad_signature_reject"] == 1
        assert peer_score(m, peer) == -1
        await peer.publish(VOTES, b"\x93\x05\x01\x02")  # not a vote batch
        await peer.publish(TXS, b"garbage")
        await peer.publish(PROPOSALS, b"")
        assert peer_score(m, peer) == -4
        assert any(p.connected for p in m.host.peers() if p.peer_id == peer.host.peer_id)
        await peer.publish(VOTES, VoteBatch((forged,)))
        assert not any(p.connected for p in m.host.peers() if p.peer_id == peer.host.peer_id)
        assert k[1].address not in m.service.state.rounds.get(0, EMPTY_ROUND).prevotes.values_of  # type: ignore[attr-defined]

    await run_one(tmp_path, body)


# --- proposals and parts -------------------------------------------------------------------------


def proposal_for(
    c: Cluster,
    height: int,
    round_: int,
    proposer: crypto.PrivateKey,
    *,
    signer: crypto.PrivateKey | None = None,
) -> tuple[Block, object]:
    """A valid block at ``height`` built by ``proposer`` on a copy of the chain, and the signed
    proposal (signed by ``signer``, default the proposer)."""
    chain = open_chain(MemoryKV(), c.genesis)
    built = chain.build(round_, proposer.address, None, [])
    p = Proposal(Height(height), Round(round_), built.block.hash(), None, proposer.address)
    return built.block, sign_proposal(signer or proposer, CHAIN_ID, p)


async def test_a_proposal_assembled_from_parts_in_any_order_is_executed_and_prevoted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        proposer = k[Cluster.proposer_index(1, 0)]
        block, signed = proposal_for(c, 1, 0, proposer)
        header, parts = make_part_set(block.encode(), height=1, round=0, part_size=97)
        assert len(parts) >= 4
        # Half of the parts before the proposal (buffered), the rest after it, reversed.
        for part in parts[::2]:
            await peer.publish(PROPOSALS, part)
        assert m.p2p.gossip.stats["part_early_ignore"] == len(parts[::2])
        await peer.publish(PROPOSALS, ProposalMessage(signed, block.header, header))  # type: ignore[arg-type]
        for part in reversed(parts[1::2]):
            await peer.publish(PROPOSALS, part)
        assert m.p2p.gossip.stats["blocks_assembled"] == 1
        await trio.sleep(0.1)
        state = m.service.state
        assert state.blocks[block.hash()].valid
        assert state.rounds[0].proposals == (signed,)
        # It prevoted the block (and published the prevote).
        own = state.rounds[0].prevotes.values_of[m.key.address]  # type: ignore[union-attr]
        assert own == (block.hash(),)
        published = [v for b in peer.received(VoteBatch) for v in b.votes]  # type: ignore[attr-defined]
        assert any(
            v.vote.validator == m.address and v.vote.block_hash == block.hash() for v in published
        )
        # A duplicate part is ignored without penalty.
        await peer.publish(PROPOSALS, parts[0])
        assert (
            m.p2p.gossip.stats.get("part_stale_ignore", 0)
            + m.p2p.gossip.stats.get("part_duplicate_ignore", 0)
            >= 1
        )
        assert peer_score(m, peer) == 0

    await run_one(tmp_path, body)


async def test_missing_parts_are_pulled_from_the_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        block, signed = proposal_for(c, 1, 0, k[Cluster.proposer_index(1, 0)])
        header, parts = make_part_set(block.encode(), height=1, round=0, part_size=64)
        peer.parts[(1, 0, header.root)] = {p.index: p for p in parts}
        await peer.publish(PROPOSALS, parts[1])
        await peer.publish(PROPOSALS, ProposalMessage(signed, block.header, header))  # type: ignore[arg-type]
        await trio.sleep(1.0)
        assert m.p2p.gossip.stats["blocks_assembled"] == 1
        requests = [r for r in peer.pull_requests if isinstance(r, GetParts)]
        assert requests and 1 not in requests[0].indices  # type: ignore[attr-defined]
        assert m.service.state.blocks[block.hash()].valid

    await run_one(tmp_path, body)


async def test_a_proposal_from_the_wrong_proposer_or_with_a_bad_part_is_rejected(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        wrong = k[Cluster.proposer_index(1, 1)]  # proposer of round 1, not round 0
        block, signed = proposal_for(c, 1, 0, wrong)
        header, parts = make_part_set(block.encode(), height=1, round=0)
        await peer.publish(PROPOSALS, ProposalMessage(signed, block.header, header))  # type: ignore[arg-type]
        assert m.p2p.gossip.stats["proposal_wrong_proposer_reject"] == 1
        # Right proposer, signed by someone else.
        right = k[Cluster.proposer_index(1, 0)]
        block, signed = proposal_for(c, 1, 0, right, signer=k[3])
        await peer.publish(PROPOSALS, ProposalMessage(signed, block.header, header))  # type: ignore[arg-type]
        assert m.p2p.gossip.stats["proposal_bad_signature_reject"] == 1
        # A correct proposal, then a part whose proof does not lead to its root.
        block, signed = proposal_for(c, 1, 0, right)
        header, parts = make_part_set(block.encode(), height=1, round=0, part_size=64)
        await peer.publish(PROPOSALS, ProposalMessage(signed, block.header, header))  # type: ignore[arg-type]
        bad = parts[0]
        bad = type(bad)(bad.height, bad.round, bad.root, bad.index, b"x" + bad.data[1:], bad.proof)
        await peer.publish(PROPOSALS, bad)
        assert m.p2p.gossip.stats["part_invalid_reject"] == 1
        assert peer_score(m, peer) == -3

    await run_one(tmp_path, body)


async def test_a_forged_part_set_is_dropped_and_the_real_one_still_taken(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        block, signed = proposal_for(c, 1, 0, k[Cluster.proposer_index(1, 0)])
        # The signed proposal with the part set of other bytes (the part set is not signed).
        fake_header, fake_parts = make_part_set(b"\x01" * 300, height=1, round=0, part_size=100)
        await peer.publish(PROPOSALS, ProposalMessage(signed, block.header, fake_header))  # type: ignore[arg-type]
        for part in fake_parts:
            await peer.publish(PROPOSALS, part)
        assert m.p2p.gossip.stats["part_set_forged"] == 1
        assert block.hash() not in m.service.state.blocks
        header, parts = make_part_set(block.encode(), height=1, round=0)
        await peer.publish(PROPOSALS, ProposalMessage(signed, block.header, header))  # type: ignore[arg-type]
        for part in parts:
            await peer.publish(PROPOSALS, part)
        await trio.sleep(0.1)
        assert m.service.state.blocks[block.hash()].valid

    await run_one(tmp_path, body)


# --- transactions --------------------------------------------------------------------------------


async def test_transaction_batches_are_verified_admitted_and_forwarded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        good = (transfer(1, 50, 1, nonce=0), transfer(2, 51, 1, nonce=0))
        await peer.publish(TXS, TxBatch(good))
        assert len(m.mempool) == 2
        assert m.p2p.gossip.stats["txs_accept"] == 1
        await peer.publish(TXS, TxBatch(good))
        assert m.p2p.gossip.stats["txs_known_ignore"] == 1
        raw = transfer(3, 52, 1, nonce=0)
        broken = raw[:-65] + crypto.malleate(raw[-65:])  # the high-S twin: never accepted
        await peer.publish(TXS, TxBatch((transfer(3, 53, 1, nonce=1), broken)))
        assert m.p2p.gossip.stats["txs_invalid_reject"] == 1
        assert len(m.mempool) == 2
        # Valid but not admissible (already-used nonce after a replacement rule): not a fault.
        await peer.publish(TXS, TxBatch((transfer(1, 50, 1, nonce=0, fee=20_000 + 1),)))
        assert peer_score(m, peer) == -1

    await run_one(tmp_path, body)


async def test_own_transactions_are_batched(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    txs = [transfer(1 + i % 4, 60 + i, 1, nonce=i // 4) for i in range(20)]

    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        for raw in txs:
            m.submit(raw)
        await trio.sleep(0.2)
        batches = peer.received(TxBatch)
        assert len(batches) == 1
        assert list(batches[0].txs) == txs  # type: ignore[attr-defined]

    await run_one(tmp_path, body)


async def test_transactions_too_large_for_a_batch_are_announced_and_served(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    small = transfer(1, 60, 1, nonce=0)
    large = transfer(2, 70, 1, nonce=0, memo=b"m" * 200)
    assert len(small) < 290 < len(large)

    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        m.submit(small)
        m.submit(large)
        await trio.sleep(0.2)
        assert [tx for b in peer.received(TxBatch) for tx in b.txs] == [small]  # type: ignore[attr-defined]
        announced = [i for a in peer.received(TxAnnounce) for i in a.tx_ids]  # type: ignore[attr-defined]
        assert announced == [crypto.sha256(large)]
        resp = await peer.request(m.host, PROTOCOL_PULL, GetTxs((crypto.sha256(large),)))
        assert decode_response(TxsResponse, resp).txs == (large,)

    await run_one(tmp_path, body, gossip_settings=GossipSettings(tx_batch_bytes=300))


async def test_announced_transactions_are_pulled_and_announced_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    large = transfer(2, 70, 1, nonce=0, memo=b"m" * 200)
    tx_id = crypto.sha256(large)

    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        asked: list[GetTxs] = []

        async def serve(peer_id: PeerId, data: bytes) -> bytes:
            req = decode_request(PROTOCOL_PULL, data)
            assert isinstance(req, GetTxs)
            asked.append(req)
            return TxsResponse((large,)).encode()

        peer.host.set_handler(PROTOCOL_PULL, serve)
        await peer.publish(TXS, TxAnnounce((tx_id,)))
        await trio.sleep(0.5)
        assert asked and asked[0].tx_ids == (tx_id,)
        assert m.mempool.contains(tx_id)
        assert [i for a in peer.received(TxAnnounce) for i in a.tx_ids] == [tx_id]  # type: ignore[attr-defined]

    await run_one(tmp_path, body)


# --- request handlers ----------------------------------------------------------------------------


async def test_catchup_handlers_answer_round_state_and_votes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        await trio.sleep(3.5)  # past timeout_propose: it prevoted nil in round 0
        mine = RoundStateMessage(Height(1), Round(0), 1, Bitmap.of(4), Bitmap.of(4))
        state = decode_response(
            RoundStateMessage, await peer.request(m.host, PROTOCOL_CATCHUP, mine)
        )
        assert (state.height, state.round, state.step) == (1, 0, int(Step.PREVOTE))
        assert state.prevotes.indices() == [0]
        has = HasVotes(Height(1), Round(0), int(VoteType.PREVOTE), Bitmap.of(4))
        got = decode_response(HasVotes, await peer.request(m.host, PROTOCOL_CATCHUP, has))
        assert got.votes.indices() == [0]
        ask = GetVotes(Height(1), Round(0), int(VoteType.PREVOTE), Bitmap.of(4, [0, 1]))
        votes = decode_response(VotesResponse, await peer.request(m.host, PROTOCOL_CATCHUP, ask))
        assert [v.vote.validator for v in votes.votes] == [k[0].address]
        commit = decode_response(
            CommitResponse, await peer.request(m.host, PROTOCOL_CATCHUP, GetCommit(Height(1)))
        )
        assert commit.commit is None
        # An undecodable request is answered with an error and held against the peer.
        with pytest.raises(RemoteError):
            decode_response(
                RoundStateMessage, await peer.request(m.host, PROTOCOL_CATCHUP, b"\x90")
            )
        assert peer_score(m, peer) == -1

    await run_one(tmp_path, body)


async def test_the_member_fetches_votes_a_peer_reports(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer whose round state shows votes the member lacks is asked for them (GetVotes)."""

    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        held = {i: vote_of(k[i], 1, 0, VoteType.PREVOTE, None) for i in (1, 2)}
        asked: list[GetVotes] = []

        async def serve(peer_id: PeerId, data: bytes) -> bytes:
            req = decode_request(PROTOCOL_CATCHUP, data)
            if isinstance(req, RoundStateMessage):
                return RoundStateMessage(
                    Height(1), Round(0), 2, Bitmap.of(4, [1, 2]), Bitmap.of(4)
                ).encode()
            assert isinstance(req, GetVotes)
            asked.append(req)
            return VotesResponse(
                tuple(held[i] for i in req.missing.indices() if i in held)
            ).encode()

        peer.host.set_handler(PROTOCOL_CATCHUP, serve)
        await trio.sleep(1.0)
        assert asked and asked[0].missing.indices() == [1, 2]
        prevotes = m.service.state.rounds[0].prevotes.values_of
        assert {k[1].address, k[2].address} <= set(prevotes)

    await run_one(tmp_path, body)


async def test_a_peer_serving_votes_it_was_not_asked_for_is_penalized(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)

        async def serve(peer_id: PeerId, data: bytes) -> bytes:
            req = decode_request(PROTOCOL_CATCHUP, data)
            if isinstance(req, RoundStateMessage):
                return RoundStateMessage(
                    Height(1), Round(0), 2, Bitmap.of(4, [1]), Bitmap.of(4)
                ).encode()
            return VotesResponse((vote_of(k[3], 1, 0, VoteType.PREVOTE, None),)).encode()

        peer.host.set_handler(PROTOCOL_CATCHUP, serve)
        await trio.sleep(0.5)
        assert peer_score(m, peer) <= -1
        assert k[3].address not in m.service.state.rounds.get(0, EMPTY_ROUND).prevotes.values_of  # type: ignore[attr-defined]

    await run_one(tmp_path, body)


# --- single-validator chains: sync handlers and an observer that catches up ---------------------


async def test_sync_handlers_and_an_observer_that_catches_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cluster = Cluster(tmp_path, n=1)
    observer = Member(cluster, "observer", None, tmp_path / "wal-observer")
    cluster.members.append(observer)
    peer = Peer(cluster.net.add_host("peer"))

    async def body(c: Cluster) -> None:
        validator = c.members[0]
        await peer.start()
        await c.wait_for(5, [0])
        status = decode_response(
            StatusResponse, await peer.request(validator.host, PROTOCOL_SYNC, GetStatus())
        )
        assert status.head >= 5 and status.base == 1
        blocks = decode_response(
            BlocksResponse,
            await peer.request(validator.host, PROTOCOL_SYNC, GetBlocks(Height(2), 3)),
        )
        assert [b.block.header.height for b in blocks.blocks] == [2, 3, 4]
        commit = decode_response(
            CommitResponse,
            await peer.request(validator.host, PROTOCOL_CATCHUP, GetCommit(Height(3))),
        )
        assert (
            commit.commit is not None and commit.commit.block_hash == blocks.blocks[1].block.hash()
        )
        # The observer starts late: it catches up, then follows the chain by gossip.
        await observer.start()
        target = validator.height + 3
        await c.wait_for(target, [0, 1], timeout_s=30)
        assert observer.p2p.catchup.stats.get("blocks_caught_up", 0) >= 5

    await cluster.run(body, start=[0])
    assert cluster.members[1].committed == {
        h: cluster.decisions[h] for h in cluster.members[1].committed
    }


# --- evidence ------------------------------------------------------------------------------------


def evidence_of(
    k: crypto.PrivateKey,
    height: int,
    round_: int = 0,
    vote_type: int = VoteType.PREVOTE,
    *,
    signer: crypto.PrivateKey | None = None,
) -> DuplicateVoteEvidence:
    """``k``'s nil vote and block vote for one (height, round, type), in canonical order; the
    block vote signed by ``signer`` (default ``k``) while still naming ``k``."""
    nil = vote_of(k, height, round_, vote_type, None)
    block = vote_of(signer or k, height, round_, vote_type, b"\x77" * 32)
    if signer is not None:
        block = SignedVote(replace(block.vote, validator=k.address), block.signature)
    first, second = sorted((nil, block), key=lambda v: v.encode())
    return DuplicateVoteEvidence(first, second)


async def test_evidence_verdicts(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Valid new evidence is pooled and forwarded; known, non-validator and early evidence is
    ignored without penalty; of a message with known and new items only the new ones travel on;
    undecodable, non-conflicting, badly ordered or badly signed evidence is rejected."""

    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        k = keys_of(c)
        gossip = m.p2p.gossip
        relay = Peer(c.net.add_host("relay", connect=False))
        c.net.connect(relay.host, m.host)  # reaches the peer only through the member
        await relay.start()

        def relayed() -> list[tuple[DuplicateVoteEvidence, ...]]:
            return [e.evidence for e in relay.received(EvidenceMessage)]  # type: ignore[attr-defined]

        ev1 = evidence_of(k[1], 1)
        await peer.publish(EVIDENCE, EvidenceMessage((ev1,)))
        assert gossip.stats["evidence_accept"] == 1
        assert ev1 in m.service.evidence
        assert relayed() == [(ev1,)]
        # Again (a new message with the same item): known, not held against the peer.
        await peer.publish(EVIDENCE, EvidenceMessage((ev1,)))
        assert gossip.stats["evidence_known_ignore"] == 1
        # An equivocation, validly signed, of a key that is no validator: the consensus service
        # does not pool it.
        outsider = evidence_of(key(9), 1)
        await peer.publish(EVIDENCE, EvidenceMessage((outsider,)))
        assert gossip.stats["evidence_unusable_ignore"] == 1
        assert outsider not in m.service.evidence
        # A height this node cannot check yet.
        await peer.publish(EVIDENCE, EvidenceMessage((evidence_of(k[2], 5),)))
        assert gossip.stats["evidence_early_ignore"] == 1
        # A known item with a new one: the new one travels on as the member's own message.
        ev3 = evidence_of(k[3], 1, 0, VoteType.PRECOMMIT)
        await peer.publish(EVIDENCE, EvidenceMessage((ev1, ev3)))
        assert gossip.stats["evidence_partly_new_ignore"] == 1
        assert ev3 in m.service.evidence
        assert relayed() == [(ev1,), (ev3,)]
        assert peer_score(m, peer) == 0
        assert len(m.service.evidence) == 2

        # Rejected: each costs the peer a point.
        forged = evidence_of(k[2], 1, signer=k[3])
        await peer.publish(EVIDENCE, EvidenceMessage((forged,)))
        assert gossip.stats["evidence_invalid_reject"] == 1
        assert peer_score(m, peer) == -1
        pair = evidence_of(k[2], 1, 1)
        a, b = pair.vote_a, pair.vote_b
        await peer.publish(EVIDENCE, EvidenceMessage((DuplicateVoteEvidence(a, a),)))
        await peer.publish(EVIDENCE, EvidenceMessage((DuplicateVoteEvidence(b, a),)))
        assert gossip.stats["evidence_invalid_reject"] == 3
        await peer.publish(EVIDENCE, b"\x93\x06\x01")
        assert gossip.stats["evidence_undecodable_reject"] == 1
        assert peer_score(m, peer) == -4
        assert len(m.service.evidence) == 2
        assert len(relayed()) == 2

    await run_one(tmp_path, body)


async def test_expired_evidence_is_ignored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def body(c: Cluster, m: Member, peer: Peer) -> None:
        assert m.key is not None
        await c.wait_for(4, [0])
        await peer.publish(EVIDENCE, EvidenceMessage((evidence_of(m.key, 1),)))
        assert m.p2p.gossip.stats["evidence_expired_ignore"] == 1
        assert len(m.service.evidence) == 0
        assert peer_score(m, peer) == 0

    await run_one(tmp_path, body, n=1, evidence_max_age=2)


def test_error_response_helper_is_a_remote_error() -> None:
    with pytest.raises(RemoteError):
        decode_response(VotesResponse, error_response(1, "nope"))
    with pytest.raises(DecodeError):
        decode_response(VotesResponse, b"\xc1")
