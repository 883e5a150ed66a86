"""The gossip service: connects a ``Network`` to the consensus service and the mempool (DESIGN §6).

Topics per chain id (``api.topic_name``): transactions, proposals (a header plus block parts),
votes and evidence. Every message is size-limited and decoded strictly (``messages.decode_gossip``), then
validated **before** it is delivered or re-gossiped, by the topic validators here:

* ``REJECT`` (the network scores the forwarder down and drops it past a threshold): undecodable
  data, a signature that does not recover the claimed signer, a proposal not signed by the
  proposer of its (height, round), a block part whose proof fails, a transaction that does not
  decode or verify, evidence that is no equivocation or whose votes do not recover their
  validator;
* ``IGNORE``: stale heights, duplicates, messages for heights this node cannot check yet,
  anything already known, expired evidence;
* ``ACCEPT``: the message told this node something new; it was handed on (and is forwarded).

Signatures are recovered in worker threads (``trio.to_thread.run_sync``), one call per message.

Evidence (DESIGN §5): an ``EvidenceMessage`` whose items are well formed and signed (worker
thread) goes to the consensus service (``deliver_evidence``), which checks the rest against the
committed state (validator of its height, not processed) and pools it. The message is forwarded
only if the pool newly accepted every item; if it took some, those are published again by this
node instead. Evidence this node's engine found is published through ``publish_evidence``.

Outgoing: the consensus service hands over what it signs (``ConsensusPublisher``). A proposal is
cut into parts of ≤ 256 KiB (``parts.make_part_set``) and published as a ``ProposalMessage`` and
``BlockPart`` messages; own proposals of the undecided height are re-published every
``republish_interval_s`` (gossip is best-effort; the parts are pulled by whoever misses them).
Votes are batched for ``vote_batch_delay_s``; transactions are batched every
``tx_batch_interval_s`` into ``TxBatch`` messages of ≤ 256 KiB, and a transaction too large for a
batch is announced by id (``TxAnnounce``) for peers to pull.

Incoming proposals: parts are assembled per part set (``parts.PartSetAssembler``); parts that
arrive before their proposal wait in a bounded buffer. A complete block is decoded and checked
against the signed header, then handed to the consensus service, which executes it. The part set
header is not signed, so a part set that does not carry the header's block is dropped without
blaming its forwarders (an honest relay cannot tell); the real one is still taken when it comes.
Missing parts and announced transactions are pulled by the catch-up service
(``node/p2p/catchup.py``) through ``incomplete_part_sets``/``add_pulled_parts`` and
``wanted_txs``/``add_pulled_txs``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from node import crypto
from node.chain import ChainService
from node.consensus.blocks import (
    Block,
    DuplicateVoteEvidence,
    Header,
    SignedProposal,
    SignedVote,
    proposal_signer,
)
from node.consensus.blocks import vote_signer as _vote_signer
from node.consensus.evidence import (
    check_evidence_form,
    check_evidence_signatures,
    evidence_height,
    evidence_key,
)
from node.consensus.mempool import Mempool
from node.consensus.txs import MAX_TX_BYTES_HARD, VerifiedTransaction, verify_transaction
from node.consensus_service import ConsensusService
from node.errors import (
    DecodeError,
    InvalidEvidence,
    InvalidSignature,
    InvalidTransaction,
    NeuroSeedError,
)
from node.p2p.api import (
    GossipMessage,
    HostStopped,
    Network,
    P2PError,
    PeerId,
    Topic,
    Verdict,
    topic_name,
)
from node.p2p.messages import (
    MAX_ANNOUNCE_IDS,
    MAX_EVIDENCE_BATCH,
    MAX_TX_BATCH_BYTES,
    MAX_VOTE_BATCH,
    BlockPart,
    EvidenceMessage,
    PartSetHeader,
    ProposalMessage,
    TxAnnounce,
    TxBatch,
    VoteBatch,
    decode_gossip,
    pack_tx_batches,
)
from node.p2p.parts import (
    DuplicatePart,
    InvalidPart,
    PartSetAssembler,
    make_part_set,
)
from node.types import Address, Hash32, Height, Round

log = logging.getLogger(__name__)

PartSetKey = tuple[int, int, Hash32]  # (height, round, part set root)


@dataclass(frozen=True, slots=True)
class GossipSettings:
    tx_batch_interval_s: float = 0.075  # DESIGN §6: every ~50-100 ms
    tx_batch_bytes: int = MAX_TX_BATCH_BYTES  # larger transactions are announced and pulled
    vote_batch_delay_s: float = 0.005  # collect the votes one event signs into one batch
    republish_interval_s: float = 1.0  # own proposals of the undecided height
    max_pending_txs: int = 20_000  # local transactions waiting for the next batch
    max_part_sets_per_round: int = 8  # distinct (proposal, part set) pairs per (height, round)
    max_early_parts_bytes: int = 32 << 20  # parts that arrived before their proposal
    max_wanted_txs: int = 4_096  # announced transactions waiting to be pulled
    seen_txs: int = 100_000  # ids remembered to skip re-verifying gossiped transactions
    seen_votes_per_height: int = 50_000
    seen_evidence: int = 10_000  # offences remembered to skip re-checking gossiped evidence
    max_pending_evidence: int = 1_000  # own evidence waiting to be published
    # How long an evidence validator waits for the consensus service to check and pool it.
    evidence_wait_s: float = 10.0


@dataclass(slots=True)
class PartSet:
    """One part set of a proposal at (height, round): what it assembles or serves."""

    key: PartSetKey
    header: Header  # the signed header the block must match
    assembler: PartSetAssembler
    proposals: list[SignedProposal] = field(default_factory=list)
    sources: list[PeerId] = field(default_factory=list)  # who forwarded its proposal (pull first)
    block: Block | None = None
    completing: bool = False
    failed: bool = False

    @property
    def height(self) -> int:
        return self.key[0]


def recover_votes(chain_id: int, votes: Sequence[SignedVote]) -> list[Address | None]:
    """The signer of each vote (None for a signature that recovers nothing); worker thread."""
    out: list[Address | None] = []
    for v in votes:
        try:
            out.append(_vote_signer(chain_id, v))
        except InvalidSignature:
            out.append(None)
    return out


def _recover_proposal(chain_id: int, signed: SignedProposal) -> Address | None:
    try:
        return proposal_signer(chain_id, signed)
    except InvalidSignature:
        return None


def check_evidence_items(
    chain_id: int, items: Sequence[DuplicateVoteEvidence]
) -> InvalidEvidence | None:
    """Form and signatures of each item (worker thread): the first problem, None if none."""
    for ev in items:
        try:
            check_evidence_form(ev)
            check_evidence_signatures(chain_id, ev)
        except InvalidEvidence as exc:
            return exc
    return None


def verify_txs(raws: Sequence[bytes]) -> list[VerifiedTransaction] | None:
    """Verify transactions (worker thread); None if any of them fails to decode or verify."""
    out = []
    for raw in raws:
        try:
            out.append(verify_transaction(raw, MAX_TX_BYTES_HARD))
        except (InvalidTransaction, DecodeError, InvalidSignature):
            return None
    return out


def _decode_block(data: bytes) -> Block | None:
    try:
        return Block.decode(data, max_size=max(len(data), 1))
    except DecodeError:
        return None


class GossipService:
    """Gossip for one node: topic validators, batching, proposals and part assembly."""

    def __init__(
        self,
        network: Network,
        chain: ChainService,
        mempool: Mempool,
        consensus: ConsensusService,
        *,
        settings: GossipSettings | None = None,
    ) -> None:
        self.network = network
        self.chain = chain
        self.mempool = mempool
        self.consensus = consensus
        self.settings = settings or GossipSettings()
        self.chain_id = chain.chain.chain_id
        self.topics = {t: topic_name(self.chain_id, t) for t in Topic}
        # Called with a peer that showed traffic for a later height or round (the catch-up
        # service syncs with it at once).
        self.on_peer_ahead: Callable[[PeerId], None] | None = None
        # Called when parts or transactions are wanted (the catch-up service pulls them).
        self.on_wants: Callable[[], None] | None = None
        self._proposals_send, self._proposals_recv = trio.open_memory_channel[
            tuple[SignedProposal, Block]
        ](64)
        self._votes_pending: list[SignedVote] = []
        self._votes_ready = trio.Event()
        self._txs_pending: list[bytes] = []
        self._part_sets: dict[PartSetKey, PartSet] = {}
        self._early_parts: dict[PartSetKey, dict[int, BlockPart]] = {}
        self._early_bytes = 0
        self._seen_votes: dict[int, set[bytes]] = {}
        self._seen_txs: OrderedDict[Hash32, None] = OrderedDict()
        self._wanted_txs: dict[Hash32, list[PeerId]] = {}
        self._evidence_pending: list[DuplicateVoteEvidence] = []
        self._evidence_ready = trio.Event()
        self._seen_evidence: OrderedDict[Hash32, None] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self.stats: dict[str, int] = {}
        consensus.attach_publisher(self)

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe the topics and run the publishers until cancelled."""
        await self.network.subscribe(self.topics[Topic.TXS], self._validate_txs)
        await self.network.subscribe(self.topics[Topic.PROPOSALS], self._validate_proposals)
        await self.network.subscribe(self.topics[Topic.VOTES], self._validate_votes)
        await self.network.subscribe(self.topics[Topic.EVIDENCE], self._validate_evidence)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._drain)
            nursery.start_soon(self._proposal_publisher)
            nursery.start_soon(self._vote_publisher)
            nursery.start_soon(self._tx_publisher)
            nursery.start_soon(self._evidence_publisher)
            nursery.start_soon(self._republisher)
            task_status.started()

    # --- ConsensusPublisher ------------------------------------------------------------------

    def publish_proposal(self, signed: SignedProposal, block: Block) -> None:
        try:
            self._proposals_send.send_nowait((signed, block))
        except trio.WouldBlock:
            self._count("own_proposals_dropped")

    def publish_vote(self, signed: SignedVote) -> None:
        self._votes_pending.append(signed)
        self._votes_ready.set()

    def publish_evidence(self, evidence: DuplicateVoteEvidence) -> None:
        if len(self._evidence_pending) >= self.settings.max_pending_evidence:
            self._count("own_evidence_dropped")
            return
        self._remember_evidence(evidence_key(evidence))
        self._evidence_pending.append(evidence)
        self._evidence_ready.set()

    # --- transactions from this node -----------------------------------------------------------

    def broadcast_transaction(self, raw: bytes) -> None:
        """Gossip a transaction this node admitted to its mempool (in the next batch)."""
        if len(self._txs_pending) >= self.settings.max_pending_txs:
            self._count("own_txs_dropped")
            return
        self._txs_pending.append(raw)
        self._remember_tx(crypto.sha256(raw))

    async def submit_transaction(self, raw: bytes) -> Hash32:
        """Verify (worker thread), admit to the mempool and gossip; raises why not admitted."""
        params = self.chain.params
        vtx = await trio.to_thread.run_sync(verify_transaction, raw, params.max_tx_bytes)
        self.mempool.add(vtx, self.chain.state_view(), params)
        self.broadcast_transaction(raw)
        return vtx.tx_id

    # --- publishing ----------------------------------------------------------------------------

    async def _publish(self, topic: Topic, data: bytes) -> bool:
        try:
            await self.network.publish(self.topics[topic], data)
        except P2PError as exc:
            log.debug("publish on %s failed: %s", topic.value, exc)
            return False
        self._count(f"published_{topic.value}")
        return True

    async def _proposal_publisher(self) -> None:
        async for signed, block in self._proposals_recv:
            part_set = await self._own_part_set(signed, block)
            await self._publish_proposal(signed, part_set, parts=True)

    async def _own_part_set(self, signed: SignedProposal, block: Block) -> PartSet:
        """The part set this node serves for its own proposal (made once per (h, r, block))."""
        p = signed.proposal
        for ps in self._part_sets.values():
            if (
                ps.key[:2] == (p.height, p.round)
                and ps.block is not None
                and ps.header.hash() == p.block_hash
            ):
                if signed not in ps.proposals:
                    ps.proposals.append(signed)
                return ps
        header, parts = await trio.to_thread.run_sync(_cut_block, block, p.height, p.round)
        assembler = PartSetAssembler(header, height=p.height, round=p.round)
        for part in parts:
            assembler.add(part)
        key: PartSetKey = (int(p.height), int(p.round), header.root)
        ps = PartSet(key, block.header, assembler, [signed], block=block)
        self._part_sets[key] = ps
        return ps

    async def _publish_proposal(self, signed: SignedProposal, ps: PartSet, *, parts: bool) -> None:
        msg = ProposalMessage(signed, ps.header, ps.assembler.header)
        await self._publish(Topic.PROPOSALS, msg.encode())
        if parts:
            for i in range(ps.assembler.total):
                part = ps.assembler.get(i)
                if part is not None:
                    await self._publish(Topic.PROPOSALS, part.encode())

    async def _republisher(self) -> None:
        """Re-publish own proposals of the undecided height (their parts are pulled)."""
        while True:
            await trio.sleep(self.settings.republish_interval_s)
            for signed, block in self.consensus.own_proposals()[:2]:
                ps = await self._own_part_set(signed, block)
                await self._publish_proposal(signed, ps, parts=False)

    async def _vote_publisher(self) -> None:
        while True:
            await self._votes_ready.wait()
            await trio.sleep(self.settings.vote_batch_delay_s)
            self._votes_ready = trio.Event()
            pending, self._votes_pending = self._votes_pending, []
            for i in range(0, len(pending), MAX_VOTE_BATCH):
                await self._publish(
                    Topic.VOTES, VoteBatch(tuple(pending[i : i + MAX_VOTE_BATCH])).encode()
                )

    async def _tx_publisher(self) -> None:
        while True:
            await trio.sleep(self.settings.tx_batch_interval_s)
            if not self._txs_pending:
                continue
            pending, self._txs_pending = self._txs_pending, []
            batches, announces = pack_tx_batches(pending, max_bytes=self.settings.tx_batch_bytes)
            for batch in batches:
                await self._publish(Topic.TXS, batch.encode())
            for announce in announces:
                await self._publish(Topic.TXS, announce.encode())

    async def _evidence_publisher(self) -> None:
        while True:
            await self._evidence_ready.wait()
            self._evidence_ready = trio.Event()
            pending, self._evidence_pending = self._evidence_pending, []
            for i in range(0, len(pending), MAX_EVIDENCE_BATCH):
                batch = EvidenceMessage(tuple(pending[i : i + MAX_EVIDENCE_BATCH]))
                await self._publish(Topic.EVIDENCE, batch.encode())

    async def _drain(self) -> None:
        """Accepted messages were handled by the validators; empty the delivery queue."""
        try:
            while True:
                await self.network.next_message()
        except HostStopped:
            log.info("the network host stopped; gossip delivery ends")

    # --- validators ----------------------------------------------------------------------------

    async def _validate_votes(self, msg: GossipMessage) -> Verdict:
        try:
            batch = decode_gossip(Topic.VOTES, msg.data)
        except DecodeError:
            return self._verdict(Verdict.REJECT, "votes_undecodable")
        assert isinstance(batch, VoteBatch)
        state = self.consensus.state
        h = int(state.height)
        if state.validators is None:
            return Verdict.IGNORE
        fresh: list[SignedVote] = []
        keys: list[bytes] = []
        ahead = False
        for signed in batch.votes:
            vote = signed.vote
            if self._is_ahead(vote.height, vote.round):
                ahead = True
            if vote.height not in (h, h + 1):
                continue
            key = signed.encode()
            if key in self._seen_votes.get(vote.height, ()) or key in keys:
                continue
            fresh.append(signed)
            keys.append(key)
        if ahead and self.on_peer_ahead is not None:
            self.on_peer_ahead(msg.sender)
        if not fresh:
            return self._verdict(Verdict.IGNORE, "votes_known")
        signers = await trio.to_thread.run_sync(recover_votes, self.chain_id, fresh)
        if any(s is None or s != v.vote.validator for v, s in zip(fresh, signers, strict=True)):
            return self._verdict(Verdict.REJECT, "votes_bad_signature")
        self._prune(self.consensus.height)
        deliver: list[tuple[SignedVote, Address]] = []
        for signed, key in zip(fresh, keys, strict=True):
            vote = signed.vote
            vals = self.consensus.validators_for(vote.height)
            if vals is None or not vals.is_member(vote.validator):
                continue  # not a validator here, or a height that passed meanwhile
            seen = self._seen_votes.setdefault(vote.height, set())
            if len(seen) < self.settings.seen_votes_per_height:
                seen.add(key)
            deliver.append((signed, vote.validator))
        if not deliver:
            return self._verdict(Verdict.IGNORE, "votes_unusable")
        self.consensus.deliver_votes(deliver)
        return self._verdict(Verdict.ACCEPT, "votes")

    async def _validate_proposals(self, msg: GossipMessage) -> Verdict:
        try:
            m = decode_gossip(Topic.PROPOSALS, msg.data)
        except DecodeError:
            return self._verdict(Verdict.REJECT, "proposals_undecodable")
        if isinstance(m, ProposalMessage):
            return await self._on_proposal_message(m, msg.sender)
        assert isinstance(m, BlockPart)
        return self._on_part(m, msg.sender)

    async def _on_proposal_message(self, m: ProposalMessage, sender: PeerId) -> Verdict:
        signed = m.signed_proposal
        p = signed.proposal
        h = self.consensus.height
        if self.consensus.state.validators is None or p.height < h:
            return self._verdict(Verdict.IGNORE, "proposal_stale")
        if self._is_ahead(p.height, p.round) and self.on_peer_ahead is not None:
            self.on_peer_ahead(sender)
        if p.height > h + 1:
            return self._verdict(Verdict.IGNORE, "proposal_far_ahead")
        key: PartSetKey = (int(p.height), int(p.round), m.part_set.root)
        known = self._part_sets.get(key)
        if known is not None and signed in known.proposals:
            if sender not in known.sources:
                known.sources.append(sender)
            return self._verdict(Verdict.IGNORE, "proposal_known")
        in_round = [ps for ps in self._part_sets.values() if ps.key[:2] == key[:2]]
        if known is None and len(in_round) >= self.settings.max_part_sets_per_round:
            return self._verdict(Verdict.IGNORE, "proposal_too_many")
        signer = await trio.to_thread.run_sync(_recover_proposal, self.chain_id, signed)
        if signer is None or signer != p.proposer:
            return self._verdict(Verdict.REJECT, "proposal_bad_signature")
        vals = self.consensus.validators_for(p.height)
        if vals is None:
            return self._verdict(Verdict.IGNORE, "proposal_stale")
        if vals.proposer(p.height, p.round) != p.proposer:
            return self._verdict(Verdict.REJECT, "proposal_wrong_proposer")
        # The block may be known already (a re-proposal of an earlier round, a re-publish).
        block = self._known_block(p.block_hash)
        if block is not None:
            self.consensus.deliver_proposal(signed, block)
            self._attach(key, m, signed, sender, block)
            return self._verdict(Verdict.ACCEPT, "proposal")
        ps = self._attach(key, m, signed, sender, None)
        if ps is None:
            return self._verdict(Verdict.IGNORE, "proposal_stale")
        if ps.block is not None:
            self.consensus.deliver_proposal(signed, ps.block)
        else:
            self._adopt_early_parts(ps)
            if ps.assembler.is_complete():
                self._start_completion(ps)
            elif self.on_wants is not None:
                self.on_wants()
        return self._verdict(Verdict.ACCEPT, "proposal")

    def _attach(
        self,
        key: PartSetKey,
        m: ProposalMessage,
        signed: SignedProposal,
        sender: PeerId,
        block: Block | None,
    ) -> PartSet | None:
        """Record the proposal against its part set (created if new); None if now stale."""
        if key[0] < self.consensus.height:
            return None
        ps = self._part_sets.get(key)
        if ps is None:
            try:
                assembler = PartSetAssembler(m.part_set, height=key[0], round=key[1])
            except InvalidPart:
                return None
            ps = PartSet(key, m.header, assembler)
            self._part_sets[key] = ps
        if block is not None and ps.block is None:
            ps.block = block
        if signed not in ps.proposals:
            ps.proposals.append(signed)
        if sender not in ps.sources:
            ps.sources.append(sender)
        return ps

    def _known_block(self, block_hash: Hash32) -> Block | None:
        block = self.consensus.block(block_hash)
        if block is not None:
            return block
        for ps in self._part_sets.values():
            if ps.block is not None and ps.header.hash() == block_hash:
                return ps.block
        return None

    def _on_part(self, part: BlockPart, sender: PeerId) -> Verdict:
        h = self.consensus.height
        if part.height < h or part.height > h + 1:
            return self._verdict(Verdict.IGNORE, "part_stale")
        key: PartSetKey = (int(part.height), int(part.round), part.root)
        ps = self._part_sets.get(key)
        if ps is None:
            self._buffer_early(key, part)
            return self._verdict(Verdict.IGNORE, "part_early")
        verdict = self._add_part(ps, part)
        if verdict is Verdict.ACCEPT and ps.assembler.is_complete():
            self._start_completion(ps)
        return verdict

    def _add_part(self, ps: PartSet, part: BlockPart) -> Verdict:
        if ps.failed:
            return Verdict.IGNORE
        try:
            ps.assembler.add(part)
        except DuplicatePart:
            return self._verdict(Verdict.IGNORE, "part_duplicate")
        except InvalidPart:
            return self._verdict(Verdict.REJECT, "part_invalid")
        return self._verdict(Verdict.ACCEPT, "part")

    def _buffer_early(self, key: PartSetKey, part: BlockPart) -> None:
        held = self._early_parts.setdefault(key, {})
        size = len(part.data)
        if part.index in held or self._early_bytes + size > self.settings.max_early_parts_bytes:
            return
        held[part.index] = part
        self._early_bytes += size

    def _adopt_early_parts(self, ps: PartSet) -> None:
        held = self._early_parts.pop(ps.key, {})
        for part in held.values():
            self._early_bytes -= len(part.data)
            if not ps.assembler.has(part.index):
                try:
                    ps.assembler.add(part)
                except InvalidPart:
                    continue  # sent by someone we cannot name any more; just drop it

    def _start_completion(self, ps: PartSet) -> None:
        if ps.completing or ps.block is not None or ps.failed:
            return
        ps.completing = True
        assert self._nursery is not None
        self._nursery.start_soon(self._complete, ps)

    async def _complete(self, ps: PartSet) -> None:
        """Decode the assembled block (worker thread), check it against the signed header and
        hand it to the consensus service with every proposal that names it."""
        data = ps.assembler.block_bytes()
        block = await trio.to_thread.run_sync(_decode_block, data)
        if block is None or block.header != ps.header:
            # The part set header is not signed, so an honest relay forwards a forged one as
            # readily as the real one: drop the part set (the proposal's real part set is
            # still accepted when it comes) without blaming the forwarders.
            ps.failed = True
            self._part_sets.pop(ps.key, None)
            self._count("part_set_forged")
            log.info("a part set of the proposal at %s does not carry its block", ps.key[:2])
            return
        ps.block = block
        ps.completing = False
        self._count("blocks_assembled")
        for signed in ps.proposals:
            self.consensus.deliver_proposal(signed, block)

    # --- evidence --------------------------------------------------------------------------------

    async def _validate_evidence(self, msg: GossipMessage) -> Verdict:
        try:
            m = decode_gossip(Topic.EVIDENCE, msg.data)
        except DecodeError:
            return self._verdict(Verdict.REJECT, "evidence_undecodable")
        assert isinstance(m, EvidenceMessage)
        fresh: list[DuplicateVoteEvidence] = []
        keys: list[Hash32] = []
        for ev in m.evidence:
            key = evidence_key(ev)
            if key in self._seen_evidence or key in keys or ev in self.consensus.evidence:
                continue
            fresh.append(ev)
            keys.append(key)
        if not fresh:
            return self._verdict(Verdict.IGNORE, "evidence_known")
        error = await trio.to_thread.run_sync(check_evidence_items, self.chain_id, fresh)
        if error is not None:
            log.debug("invalid evidence from %s: %s", msg.sender, error.message)
            return self._verdict(Verdict.REJECT, "evidence_invalid")
        # Evidence that can no longer go into the next block is not the sender's fault (it may
        # lag behind); evidence of a later height cannot be checked against its set yet.
        next_height = self.chain.head_height + 1
        max_age = self.chain.chain.evidence_max_age
        due = [ev for ev in fresh if 0 <= next_height - evidence_height(ev) <= max_age]
        if not due:
            early = any(evidence_height(ev) > next_height for ev in fresh)
            return self._verdict(Verdict.IGNORE, "evidence_early" if early else "evidence_expired")
        accepted: list[DuplicateVoteEvidence] | None = None
        with trio.move_on_after(self.settings.evidence_wait_s):
            accepted = await self.consensus.deliver_evidence(due)
        if accepted is None:  # dropped unchecked (a busy consensus service): may come again
            return self._verdict(Verdict.IGNORE, "evidence_dropped")
        for ev in due:
            self._remember_evidence(evidence_key(ev))
        if not accepted:
            return self._verdict(Verdict.IGNORE, "evidence_unusable")
        self._count("evidence_pooled", len(accepted))
        if len(accepted) == len(m.evidence):
            return self._verdict(Verdict.ACCEPT, "evidence")
        # Only what the pool newly took travels on: as this node's own message.
        for ev in accepted:
            self.publish_evidence(ev)
        return self._verdict(Verdict.IGNORE, "evidence_partly_new")

    def _remember_evidence(self, key: Hash32) -> None:
        self._seen_evidence[key] = None
        self._seen_evidence.move_to_end(key)
        while len(self._seen_evidence) > self.settings.seen_evidence:
            self._seen_evidence.popitem(last=False)

    # --- transactions ----------------------------------------------------------------------------

    async def _validate_txs(self, msg: GossipMessage) -> Verdict:
        try:
            m = decode_gossip(Topic.TXS, msg.data)
        except DecodeError:
            return self._verdict(Verdict.REJECT, "txs_undecodable")
        if isinstance(m, TxAnnounce):
            return self._on_announce(m, msg.sender)
        assert isinstance(m, TxBatch)
        fresh: list[bytes] = []
        ids: list[Hash32] = []
        for raw in m.txs:
            tx_id = crypto.sha256(raw)
            if tx_id in self._seen_txs or tx_id in self.mempool or tx_id in ids:
                continue
            fresh.append(raw)
            ids.append(tx_id)
        if not fresh:
            return self._verdict(Verdict.IGNORE, "txs_known")
        verified = await trio.to_thread.run_sync(verify_txs, fresh)
        if verified is None:
            return self._verdict(Verdict.REJECT, "txs_invalid")
        admitted = self._admit(verified)
        return self._verdict(Verdict.ACCEPT if admitted else Verdict.IGNORE, "txs")

    def _admit(self, verified: Sequence[VerifiedTransaction]) -> list[VerifiedTransaction]:
        """Add verified transactions to the mempool; the ones admitted."""
        admitted = []
        view, params = self.chain.state_view(), self.chain.params
        for vtx in verified:
            self._remember_tx(vtx.tx_id)
            self._wanted_txs.pop(vtx.tx_id, None)
            try:
                self.mempool.add(vtx, view, params)
            except NeuroSeedError as exc:
                log.debug("gossiped transaction not admitted: %s", exc)
                continue
            admitted.append(vtx)
        self._count("txs_admitted", len(admitted))
        return admitted

    def _on_announce(self, m: TxAnnounce, sender: PeerId) -> Verdict:
        new = False
        for tx_id in m.tx_ids:
            if tx_id in self._seen_txs or tx_id in self.mempool:
                continue
            peers = self._wanted_txs.get(tx_id)
            if peers is None:
                if len(self._wanted_txs) >= self.settings.max_wanted_txs:
                    continue
                peers = self._wanted_txs[tx_id] = []
            if sender not in peers:
                peers.append(sender)
                new = True
        if new and self.on_wants is not None:
            self.on_wants()
        # Not forwarded: this node announces the transactions itself once it holds them.
        return self._verdict(Verdict.IGNORE, "announce")

    def _remember_tx(self, tx_id: Hash32) -> None:
        self._seen_txs[tx_id] = None
        self._seen_txs.move_to_end(tx_id)
        while len(self._seen_txs) > self.settings.seen_txs:
            self._seen_txs.popitem(last=False)

    # --- the pull side (used by the catch-up service) ------------------------------------------

    def incomplete_part_sets(self) -> list[PartSet]:
        """Part sets of the current and next height still missing parts."""
        self._prune(self.consensus.height)
        return [
            ps
            for ps in self._part_sets.values()
            if ps.block is None and not ps.failed and not ps.assembler.is_complete()
        ]

    def parts(
        self, height: int, round: int, root: Hash32, indices: Sequence[int]
    ) -> list[BlockPart]:
        """Held parts of a part set (to answer ``GetParts``)."""
        ps = self._part_sets.get((height, round, root))
        if ps is None:
            return []
        out = []
        for i in indices:
            part = ps.assembler.get(i)
            if part is not None:
                out.append(part)
        return out

    async def add_pulled_parts(
        self, key: PartSetKey, parts: Sequence[BlockPart], peer: PeerId
    ) -> None:
        """Parts a peer sent for ``key``; a part that does not belong is the peer's fault."""
        ps = self._part_sets.get(key)
        if ps is None or ps.block is not None:
            return
        bad = False
        for part in parts:
            if not ps.assembler.matches(part):
                bad = True
                continue
            if self._add_part(ps, part) is Verdict.REJECT:
                bad = True
        if bad:
            await self._penalize(peer, "sent invalid block parts")
        if ps.assembler.is_complete():
            self._start_completion(ps)

    def wanted_txs(self) -> dict[Hash32, list[PeerId]]:
        """Announced transactions not held yet, with the peers that announced them."""
        for tx_id in [t for t in self._wanted_txs if t in self.mempool or t in self._seen_txs]:
            del self._wanted_txs[tx_id]
        return dict(self._wanted_txs)

    def forget_wanted_tx(self, tx_id: Hash32) -> None:
        self._wanted_txs.pop(tx_id, None)

    async def add_pulled_txs(
        self, raws: Sequence[bytes], requested: set[Hash32], peer: PeerId
    ) -> None:
        """Transactions a peer sent for ``GetTxs``; announce the ones admitted to our peers."""
        fresh = []
        for raw in raws:
            tx_id = crypto.sha256(raw)
            if tx_id not in requested:
                await self._penalize(peer, "sent a transaction that was not requested")
                return
            if tx_id in self._seen_txs or tx_id in self.mempool:
                continue
            fresh.append(raw)
        if not fresh:
            return
        verified = await trio.to_thread.run_sync(verify_txs, fresh)
        if verified is None:
            await self._penalize(peer, "sent an invalid transaction")
            return
        admitted = self._admit(verified)
        ids = [v.tx_id for v in admitted]
        for i in range(0, len(ids), MAX_ANNOUNCE_IDS):
            await self._publish(
                Topic.TXS, TxAnnounce(tuple(ids[i : i + MAX_ANNOUNCE_IDS])).encode()
            )

    # --- helpers ---------------------------------------------------------------------------------

    def _is_ahead(self, height: int, round: int) -> bool:
        """Whether a message shows its sender at a later height or round than this node: a
        later height than the next, the next while this one is undecided, or a later round."""
        s = self.consensus.state
        if height > s.height + 1:
            return True
        if height == s.height + 1:
            return s.decision is None
        return height == s.height and s.decision is None and round > s.round

    def _prune(self, height: int) -> None:
        """Forget what belongs to heights below ``height``."""
        for key in [k for k in self._part_sets if k[0] < height]:
            del self._part_sets[key]
        for key in [k for k in self._early_parts if k[0] < height]:
            for part in self._early_parts.pop(key).values():
                self._early_bytes -= len(part.data)
        for h in [h for h in self._seen_votes if h < height]:
            del self._seen_votes[h]

    async def _penalize(self, peer: PeerId, reason: str) -> None:
        self._count("penalties")
        with contextlib.suppress(P2PError):
            await self.network.penalize(peer, reason)

    def _verdict(self, verdict: Verdict, what: str) -> Verdict:
        self._count(f"{what}_{verdict.value}")
        return verdict

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n


def _cut_block(block: Block, height: int, round: int) -> tuple[PartSetHeader, list[BlockPart]]:
    """Encode a block and cut it into parts (worker thread: hashing megabytes)."""
    return make_part_set(block.encode(), height=Height(height), round=Round(round))
