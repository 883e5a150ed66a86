"""Repair of best-effort gossip: the catch-up and pull protocols and the periodic repair loop
(DESIGN §6). No validator may stay stuck at a height because a gossip message was lost.

Handlers (registered on the ``Network`` by ``CatchupService.run``):

* ``/neuroseed/catchup/1``: ``RoundStateMessage`` → this node's round state (height, round, step
  and the validators whose prevotes and precommits it holds in that round; during
  ``timeout_commit`` the decided round with its precommits); ``HasVotes`` → the same bitmap for
  any (height, round, type); ``GetVotes`` → the held votes of the validators asked for (every
  value a validator voted for, so equivocations spread too); ``GetCommit`` → the stored commit;
* ``/neuroseed/pull/1``: ``GetParts`` → held block parts of a part set (own proposals and part
  sets being assembled); ``GetTxs`` → transactions held by the mempool;
* ``/neuroseed/sync/1`` (minimal, until ``node/p2p/sync.py`` takes the protocol over; see
  ``CatchupSettings.serve_sync``): ``GetStatus``, ``GetHeaders`` and ``GetBlocks`` from the
  chain's read view.

The repair loop, every ``interval_s`` with each connected peer (and at once with a peer that
showed traffic for a later height or round — a *poke* from the gossip service, or a round state
request from a peer that is ahead): exchange round states; then

* the peer is at a later height: fetch the commit of our next height with ``GetCommit``; if the
  block is known locally, commit it, else fetch block and commit with ``GetBlocks`` (a few heights
  at a time); each is committed by the consensus service through ``ChainService.commit``, which
  checks the commit against the validator set, and the next height starts at once;
* the peer is at our height: fetch with ``GetVotes`` the votes it holds that we lack in its round
  (its bitmaps), and the prevotes of the POL round of every proposal of our current round.

A pull loop fetches the parts of part sets still incomplete (``pull_delay_s`` after the proposal
arrived, then every ``pull_interval_s``), asking the peers that forwarded the proposal first and
then every other peer in turn, and transactions announced by id (``TxAnnounce``).

Every response is decoded strictly and checked: votes must be the ones asked for and correctly
signed (recovered in a worker thread), parts must prove against their part set, transactions
must be the ones asked for, blocks must commit. A peer that breaks this is penalized.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from node.chain import ChainService, ReadView
from node.consensus.blocks import SignedVote, VoteType
from node.consensus.engine import EMPTY_ROUND, VoteSet
from node.consensus.mempool import Mempool
from node.consensus.signstate import Step
from node.consensus.validators import ValidatorSet
from node.consensus_service import ConsensusService
from node.errors import DecodeError, InvalidBlock, NotFound
from node.p2p.api import (
    PROTOCOL_CATCHUP,
    PROTOCOL_PULL,
    PROTOCOL_SYNC,
    Network,
    P2PError,
    PeerId,
)
from node.p2p.gossip import GossipService, GossipSettings, PartSet, recover_votes
from node.p2p.messages import (
    MAX_PARTS_PER_RESPONSE,
    MAX_PULL_TXS,
    MAX_SYNC_BLOCKS,
    Bitmap,
    BlocksResponse,
    BlockWithCommit,
    CommitResponse,
    GetBlocks,
    GetCommit,
    GetHeaders,
    GetParts,
    GetStatus,
    GetTxs,
    GetVotes,
    HasVotes,
    HeadersResponse,
    HeaderWithCommit,
    PartsResponse,
    RemoteError,
    RoundStateMessage,
    StatusResponse,
    TxsResponse,
    VotesResponse,
    WireMessage,
    decode_request,
    decode_response,
    error_response,
    take_within,
)
from node.types import ZERO_HASH, Hash32, Height, Round

log = logging.getLogger(__name__)

M = TypeVar("M", bound=WireMessage)

_VOTE_TYPES = (int(VoteType.PREVOTE), int(VoteType.PRECOMMIT))
MAX_VALUES_PER_VALIDATOR = 3  # the engine keeps a validator's first vote and 2 conflicting ones


@dataclass(frozen=True, slots=True)
class CatchupSettings:
    interval_s: float = 0.5  # round-state exchange with each peer
    poke_gap_s: float = 0.1  # an extra sync with one peer at most this often
    pull_delay_s: float = 0.1  # before pulling parts: gossip may still bring them
    pull_interval_s: float = 0.25  # repeat pulls while something is missing
    request_timeout_s: float = 2.0
    max_peers_per_interval: int = 8  # peers synced per interval, in turn
    max_vote_requests: int = 4  # GetVotes per sync with one peer
    max_blocks_per_request: int = 8
    max_blocks_per_sync: int = 32  # heights committed from one peer per sync
    max_tx_pull_attempts: int = 4
    serve_sync: bool = True  # answer /neuroseed/sync/1 (until node/p2p/sync.py does)


def vote_bitmap(vals: ValidatorSet, votes: VoteSet) -> Bitmap:
    """The validators (by index in ``vals``) with a vote in ``votes``."""
    indices = (vals.index_of(a) for a in votes.values_of)
    return Bitmap.of(len(vals), sorted(i for i in indices if i is not None))


class CatchupService:
    """The catch-up and pull protocols of one node, and its repair loops."""

    def __init__(
        self,
        network: Network,
        chain: ChainService,
        mempool: Mempool,
        consensus: ConsensusService,
        gossip: GossipService,
        *,
        settings: CatchupSettings | None = None,
    ) -> None:
        self.network = network
        self.chain = chain
        self.mempool = mempool
        self.consensus = consensus
        self.gossip = gossip
        self.settings = settings or CatchupSettings()
        self.chain_id = chain.chain.chain_id
        self._nursery: trio.Nursery | None = None
        self._syncing: set[PeerId] = set()
        self._last_sync: dict[PeerId, float] = {}
        self._turn = 0
        self._wants = trio.Event()
        self._part_attempts: dict[tuple[int, int, Hash32], int] = {}
        self._tx_attempts: dict[Hash32, int] = {}
        self.stats: dict[str, int] = {}
        gossip.on_peer_ahead = self.poke
        gossip.on_wants = self.want

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.network.set_handler(PROTOCOL_CATCHUP, self._handle_catchup)
        self.network.set_handler(PROTOCOL_PULL, self._handle_pull)
        if self.settings.serve_sync:
            self.network.set_handler(PROTOCOL_SYNC, self._handle_sync)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._state_loop)
            nursery.start_soon(self._pull_loop)
            task_status.started()

    def poke(self, peer: PeerId) -> None:
        """Sync with ``peer`` now (it showed traffic for a later height or round)."""
        last = self._last_sync.get(peer)
        if last is not None and trio.current_time() - last < self.settings.poke_gap_s:
            return
        self._count("pokes")
        self._start_sync(peer)

    def want(self) -> None:
        """Something is missing (parts, announced transactions): run the pull loop."""
        self._wants.set()

    # --- round state ---------------------------------------------------------------------------

    def round_state(self) -> RoundStateMessage | None:
        """This node's round state; during ``timeout_commit`` the decided round's."""
        s = self.consensus.state
        vals = s.validators
        if vals is None:
            return None
        if s.decision is not None:
            r, step = int(s.decision.round), int(Step.PRECOMMIT)
        else:
            r, step = int(s.round), int(s.step)
        m = s.rounds.get(r, EMPTY_ROUND)
        return RoundStateMessage(
            s.height, Round(r), step, vote_bitmap(vals, m.prevotes), vote_bitmap(vals, m.precommits)
        )

    def _my_votes(self, height: int, round: int, vote_type: int) -> VoteSet | None:
        s = self.consensus.state
        if height != s.height or s.validators is None:
            return None
        return s.rounds.get(round, EMPTY_ROUND).votes(vote_type)

    # --- the repair loops ----------------------------------------------------------------------

    async def _state_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.interval_s)
            peers = sorted(p.peer_id for p in self.network.peers() if p.connected)
            if not peers:
                continue
            n = min(len(peers), self.settings.max_peers_per_interval)
            start = self._turn % len(peers)
            self._turn += n
            for i in range(n):
                self._start_sync(peers[(start + i) % len(peers)])

    def _start_sync(self, peer: PeerId) -> None:
        if self._nursery is None or peer in self._syncing:
            return
        self._syncing.add(peer)
        self._last_sync[peer] = trio.current_time()
        self._nursery.start_soon(self._sync_guarded, peer)

    async def _sync_guarded(self, peer: PeerId) -> None:
        try:
            await self._sync_with(peer)
        except P2PError as exc:
            log.debug("catch-up with %r failed: %s", peer, exc)
        finally:
            self._syncing.discard(peer)

    async def _sync_with(self, peer: PeerId) -> None:
        mine = self.round_state()
        if mine is None:
            return
        theirs = await self._request(peer, PROTOCOL_CATCHUP, mine, RoundStateMessage)
        if theirs is None:
            return
        self._count("syncs")
        if theirs.height > self.chain.head_height + 1:
            await self._catch_up(peer, theirs.height)
        elif theirs.height == self.consensus.height:
            await self._fetch_votes(peer, theirs)

    async def _catch_up(self, peer: PeerId, their_height: int) -> None:
        """The peer has committed our next height: commit it (and a few more) from the peer."""
        for _ in range(self.settings.max_blocks_per_sync):
            target = self.chain.head_height + 1
            if their_height <= target:
                return
            resp = await self._request(
                peer, PROTOCOL_CATCHUP, GetCommit(Height(target)), CommitResponse
            )
            if resp is None or resp.commit is None:
                return
            commit = resp.commit
            if commit.height != target:
                await self._penalize(peer, "sent the commit of another height")
                return
            block = self.consensus.block(commit.block_hash)
            if block is not None:
                if not await self._commit(peer, [BlockWithCommit(block, commit)]):
                    return
                continue
            count = min(their_height - target, self.settings.max_blocks_per_request)
            blocks = await self._request(
                peer, PROTOCOL_SYNC, GetBlocks(Height(target), count), BlocksResponse
            )
            if blocks is None or not blocks.blocks:
                return
            if blocks.blocks[0].block.header.height != target:
                await self._penalize(peer, "sent blocks from another height")
                return
            if not await self._commit(peer, blocks.blocks):
                return

    async def _commit(self, peer: PeerId, blocks: Sequence[BlockWithCommit]) -> bool:
        for item in blocks:
            try:
                done = await self.consensus.commit_from_peer(item.block, item.commit)
            except InvalidBlock as exc:
                await self._penalize(peer, f"sent a block that does not commit: {exc.message}")
                return False
            if not done:
                return False
            self._count("blocks_caught_up")
        return True

    async def _fetch_votes(self, peer: PeerId, theirs: RoundStateMessage) -> None:
        s = self.consensus.state
        vals = s.validators
        if vals is None or (s.decision is not None and theirs.round != s.decision.round):
            return
        n = len(vals)
        wants: dict[tuple[int, int], list[int]] = {}
        for vote_type, bitmap in zip(
            _VOTE_TYPES, (theirs.prevotes, theirs.precommits), strict=True
        ):
            mine = self._my_votes(s.height, theirs.round, vote_type)
            if bitmap.size != n or mine is None:
                continue
            have = vote_bitmap(vals, mine)
            missing = [i for i in bitmap.indices() if i not in have]
            if missing:
                wants[(int(theirs.round), vote_type)] = missing
        # The prevotes that justify a proposal's POL round (consensus-notes rule 3).
        for signed in s.rounds.get(s.round, EMPTY_ROUND).proposals:
            vr = signed.proposal.pol_round
            mine = self._my_votes(s.height, vr, int(VoteType.PREVOTE)) if vr is not None else None
            if vr is None or mine is None or (vr, int(VoteType.PREVOTE)) in wants:
                continue
            have = vote_bitmap(vals, mine)
            missing = [i for i in range(n) if i not in have]
            if missing:
                wants[(vr, int(VoteType.PREVOTE))] = missing
        for (r, vote_type), missing in list(wants.items())[: self.settings.max_vote_requests]:
            request = GetVotes(s.height, Round(r), vote_type, Bitmap.of(n, missing))
            resp = await self._request(peer, PROTOCOL_CATCHUP, request, VotesResponse)
            if resp is not None and resp.votes:
                await self._accept_votes(peer, request, resp.votes, vals)

    async def _accept_votes(
        self, peer: PeerId, request: GetVotes, votes: Sequence[SignedVote], vals: ValidatorSet
    ) -> None:
        asked = set(request.missing.indices())
        if len(votes) > MAX_VALUES_PER_VALIDATOR * len(asked):
            await self._penalize(peer, "sent more votes than asked for")
            return
        for signed in votes:
            v = signed.vote
            index = vals.index_of(v.validator)
            if (
                v.height != request.height
                or v.round != request.round
                or v.vote_type != request.vote_type
                or index not in asked
            ):
                await self._penalize(peer, "sent votes that were not asked for")
                return
        signers = await trio.to_thread.run_sync(recover_votes, self.chain_id, votes)
        if any(s != v.vote.validator for v, s in zip(votes, signers, strict=True)):
            await self._penalize(peer, "sent a badly signed vote")
            return
        self._count("votes_fetched", len(votes))
        self.consensus.deliver_votes([(v, v.vote.validator) for v in votes])

    async def _pull_loop(self) -> None:
        while True:
            await self._wants.wait()
            self._wants = trio.Event()
            await trio.sleep(self.settings.pull_delay_s)
            while await self._pull_once():
                await trio.sleep(self.settings.pull_interval_s)

    async def _pull_once(self) -> bool:
        """One round of pulls; False when nothing is missing."""
        part_sets = self.gossip.incomplete_part_sets()
        txs = self.gossip.wanted_txs()
        live = {ps.key for ps in part_sets}
        self._part_attempts = {k: v for k, v in self._part_attempts.items() if k in live}
        if not part_sets and not txs:
            return False
        connected = sorted(p.peer_id for p in self.network.peers() if p.connected)
        async with trio.open_nursery() as nursery:
            for ps in part_sets:
                nursery.start_soon(self._pull_parts, ps, connected)
            if txs:
                nursery.start_soon(self._pull_txs, txs, connected)
        return True

    async def _pull_parts(self, ps: PartSet, connected: list[PeerId]) -> None:
        candidates = [p for p in ps.sources if p in connected]
        candidates += [p for p in connected if p not in candidates]
        if not candidates:
            return
        attempt = self._part_attempts.get(ps.key, 0)
        self._part_attempts[ps.key] = attempt + 1
        peer = candidates[attempt % len(candidates)]
        missing = ps.assembler.missing()[:MAX_PARTS_PER_RESPONSE]
        if not missing:
            return
        height, round, root = ps.key
        request = GetParts(Height(height), Round(round), root, tuple(missing))
        resp = await self._request(peer, PROTOCOL_PULL, request, PartsResponse)
        if resp is not None and resp.parts:
            self._count("parts_pulled", len(resp.parts))
            await self.gossip.add_pulled_parts(ps.key, resp.parts, peer)

    async def _pull_txs(self, wanted: dict[Hash32, list[PeerId]], connected: list[PeerId]) -> None:
        by_peer: dict[PeerId, list[Hash32]] = {}
        for tx_id, peers in wanted.items():
            attempt = self._tx_attempts.get(tx_id, 0)
            if attempt >= self.settings.max_tx_pull_attempts:
                self.gossip.forget_wanted_tx(tx_id)
                self._tx_attempts.pop(tx_id, None)
                continue
            self._tx_attempts[tx_id] = attempt + 1
            live = [p for p in peers if p in connected] or connected
            if live:
                by_peer.setdefault(live[attempt % len(live)], []).append(tx_id)
        for peer, ids in by_peer.items():
            ids = ids[:MAX_PULL_TXS]
            resp = await self._request(peer, PROTOCOL_PULL, GetTxs(tuple(ids)), TxsResponse)
            if resp is not None and resp.txs:
                self._count("txs_pulled", len(resp.txs))
                await self.gossip.add_pulled_txs(resp.txs, set(ids), peer)

    # --- requests ------------------------------------------------------------------------------

    async def _request(
        self, peer: PeerId, protocol: str, msg: WireMessage, expected: type[M]
    ) -> M | None:
        try:
            data = await self.network.request(
                peer, protocol, msg.encode(), timeout_s=self.settings.request_timeout_s
            )
        except P2PError as exc:
            log.debug("%s to %r failed: %s", type(msg).__name__, peer, exc)
            return None
        try:
            return decode_response(expected, data)
        except RemoteError as exc:
            log.debug("%r answered %s with an error: %s", peer, type(msg).__name__, exc)
            return None
        except DecodeError as exc:
            await self._penalize(peer, f"sent an undecodable {expected.__name__}: {exc.message}")
            return None

    # --- handlers ------------------------------------------------------------------------------

    async def _decode(self, peer: PeerId, protocol: str, data: bytes) -> WireMessage | bytes:
        """The request, or the encoded error to answer with."""
        try:
            return decode_request(protocol, data)
        except DecodeError as exc:
            await self._penalize(peer, f"sent an undecodable request: {exc.message}")
            return error_response(exc.code, exc.message)

    async def _handle_catchup(self, peer: PeerId, data: bytes) -> bytes:
        req = await self._decode(peer, PROTOCOL_CATCHUP, data)
        if isinstance(req, bytes):
            return req
        s = self.consensus.state
        if isinstance(req, RoundStateMessage):
            if req.height > s.height or (req.height == s.height and req.round > s.round):
                self.poke(peer)  # the requester is ahead: fetch from it
            mine = self.round_state()
            if mine is None:
                return error_response(NotFound.code, "consensus has not started")
            return mine.encode()
        if isinstance(req, HasVotes):
            vals = s.validators
            votes = self._my_votes(req.height, req.round, req.vote_type)
            if vals is None or votes is None:
                return HasVotes(req.height, req.round, req.vote_type, Bitmap.of(0)).encode()
            return HasVotes(req.height, req.round, req.vote_type, vote_bitmap(vals, votes)).encode()
        if isinstance(req, GetVotes):
            found = self._votes_for(req)
            return VotesResponse(take_within(found, VotesResponse.MAX_BYTES)).encode()
        assert isinstance(req, GetCommit)
        return CommitResponse(self.chain.read_view().get_commit(req.height)).encode()

    def _votes_for(self, req: GetVotes) -> list[SignedVote]:
        vals = self.consensus.state.validators
        votes = self._my_votes(req.height, req.round, req.vote_type)
        if vals is None or votes is None or req.missing.size != len(vals):
            return []
        out = []
        for i in req.missing.indices():
            address = vals.validators[i].address
            for value in votes.values_of.get(address, ()):
                out.append(votes.by_value[value][address])
        return out

    async def _handle_pull(self, peer: PeerId, data: bytes) -> bytes:
        req = await self._decode(peer, PROTOCOL_PULL, data)
        if isinstance(req, bytes):
            return req
        if isinstance(req, GetParts):
            parts = self.gossip.parts(req.height, req.round, req.root, req.indices)
            kept = take_within(parts, PartsResponse.MAX_BYTES, max_items=MAX_PARTS_PER_RESPONSE)
            return PartsResponse(kept).encode()
        assert isinstance(req, GetTxs)
        txs: list[bytes] = []
        used = 16
        for tx_id in req.tx_ids:
            vtx = self.mempool.get(tx_id)
            if vtx is None:
                continue
            size = len(vtx.raw) + 8
            if used + size > TxsResponse.MAX_BYTES:
                break
            txs.append(vtx.raw)
            used += size
        return TxsResponse(tuple(txs)).encode()

    async def _handle_sync(self, peer: PeerId, data: bytes) -> bytes:
        req = await self._decode(peer, PROTOCOL_SYNC, data)
        if isinstance(req, bytes):
            return req
        view = self.chain.read_view()
        if isinstance(req, GetStatus):
            head = view.head_height
            head_hash = view.head.hash() if view.head is not None else ZERO_HASH
            return StatusResponse(Height(min(head, 1)), Height(head), head_hash).encode()
        if isinstance(req, GetBlocks):
            return await trio.to_thread.run_sync(_blocks_response, view, req.start, req.count)
        assert isinstance(req, GetHeaders)
        return await trio.to_thread.run_sync(_headers_response, view, req.start, req.count)

    # --- helpers -------------------------------------------------------------------------------

    async def _penalize(self, peer: PeerId, reason: str) -> None:
        log.info("penalizing %r: %s", peer, reason)
        self._count("penalties")
        with contextlib.suppress(P2PError):
            await self.network.penalize(peer, reason)

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n


def _stored(view: ReadView, start: int, count: int) -> Iterator[BlockWithCommit]:
    for h in range(max(start, 1), min(start + count - 1, view.head_height) + 1):
        block, commit = view.get_block(h), view.get_commit(h)
        if block is None or commit is None:
            return
        yield BlockWithCommit(block, commit)


def _blocks_response(view: ReadView, start: int, count: int) -> bytes:
    """Consecutive stored blocks with their commits from ``start``, within the size limit."""
    count = min(count, MAX_SYNC_BLOCKS)
    return BlocksResponse(
        take_within(_stored(view, start, count), BlocksResponse.MAX_BYTES)
    ).encode()


def _headers_response(view: ReadView, start: int, count: int) -> bytes:
    headers: Iterable[HeaderWithCommit] = (
        HeaderWithCommit(b.block.header, b.commit) for b in _stored(view, start, count)
    )
    return HeadersResponse(take_within(headers, HeadersResponse.MAX_BYTES)).encode()


class ConsensusP2P:
    """Gossip and catch-up for one node over one ``Network`` (what ``run_node`` starts).

    Creating it attaches the gossip service to ``consensus`` as its publisher; start ``run``
    before ``consensus.run`` so the topics are subscribed when the first proposal is signed.
    """

    def __init__(
        self,
        network: Network,
        chain: ChainService,
        mempool: Mempool,
        consensus: ConsensusService,
        *,
        gossip_settings: GossipSettings | None = None,
        catchup_settings: CatchupSettings | None = None,
    ) -> None:
        self.gossip = GossipService(network, chain, mempool, consensus, settings=gossip_settings)
        self.catchup = CatchupService(
            network, chain, mempool, consensus, self.gossip, settings=catchup_settings
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gossip.run)
            await nursery.start(self.catchup.run)
            task_status.started()


__all__ = ["CatchupService", "CatchupSettings", "ConsensusP2P", "vote_bitmap"]
