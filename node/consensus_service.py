"""The consensus service: drives the pure engine with the WAL, the sign-state, timers and the chain.

One trio task owns the engine state and handles one event at a time from its queue (DESIGN §1,
consensus-notes "How to drive it"). For each action the engine returns it does the I/O:

* ``BuildBlock`` → take transactions from the mempool, build on the committed head (worker thread),
  log the block to the WAL, answer ``BlockBuilt``;
* ``SignProposal`` / ``SignVote`` → sign through the sign-state guard, append to the synced WAL
  **before** the message leaves the process, publish it, and feed it back to the engine;
* ``ScheduleTimeout`` → a timer task that feeds ``TimeoutFired``;
* ``Decide`` → commit the block with its precommits in one synced batch, wait ``timeout_commit``
  (late precommits still join the next block's last commit), then ``StartHeight`` the next height.

After a crash the WAL of the height in progress is replayed into a fresh engine, so locks and own
votes are restored and the sign-state refuses anything conflicting (``node/consensus/wal.py``).

**The network** (``node/p2p/gossip.py``, ``node/p2p/catchup.py``) talks to the service through:

* a ``ConsensusPublisher`` (the gossip service): own signed proposals (with their block) and votes
  are handed to it right after the synced WAL append, and still fed back to the engine locally;
* ``deliver_proposal`` / ``deliver_votes``: messages from peers whose signatures the caller has
  already recovered (in a worker thread). They join the same queue as every other event, so chain
  work stays single-threaded: a proposal's block is executed with ``ChainService.validate`` (in a
  worker thread) by this task and delivered as ``ProposalReceived(valid=...)``. Proposals for the
  next height wait (bounded) until that height starts; votes for it are buffered by the engine.
  Stale, duplicate and far-ahead messages are dropped before they reach the WAL;
* ``deliver_evidence``: duplicate-vote evidence from the evidence topic (form and signatures
  checked by the caller). It joins the queue too; this task checks it against the committed state
  (``ChainService.check_evidence``, worker thread) and adds it to its ``EvidencePool``, and the
  caller relays only what the pool newly accepted;
* ``commit_from_peer``: the minimal catch-up. A block at the next height with a commit from a
  peer is committed with ``ChainService.commit`` (which checks the commit against the validator
  set) and the next height starts at once;
* read-only views for the catch-up protocol: ``state``, ``validators_for``, ``block``,
  ``own_proposals``.

**Evidence** (DESIGN §5): the engine's ``RecordEvidence`` is checked the same way, pooled and
published (``ConsensusPublisher.publish_evidence``); a proposer puts ``EvidencePool.pending`` into
its block (and drops what the build rejected); after every commit the pool forgets what the block
included and what aged out, and the mempool re-checks its transactions if the votable parameters
changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from node import crypto
from node.chain import ChainService
from node.consensus import engine as eng
from node.consensus.blocks import Block, Commit, DuplicateVoteEvidence, SignedProposal, SignedVote
from node.consensus.evidence import EvidencePool
from node.consensus.mempool import Mempool
from node.consensus.signstate import SignState, sign_proposal_guarded, sign_vote_guarded
from node.consensus.transition import BlockResult
from node.consensus.validators import ValidatorSet
from node.consensus.wal import (
    BlockEntry,
    ConsensusWAL,
    SignedProposalEntry,
    SignedVoteEntry,
    blocks_of,
    events_of,
    height_of,
)
from node.errors import InvalidBlock, InvalidEvidence, NeuroSeedError
from node.types import Address, Hash32, Height, Round

log = logging.getLogger(__name__)

EVENT_QUEUE = 4096
# Input from peers is refused (dropped: gossip is best-effort, catch-up repairs) once the queue is
# this full, so the service's own events (own votes fed back, timers) always find room.
PEER_INPUT_LIMIT = EVENT_QUEUE // 2
MAX_NEXT_HEIGHT_PROPOSALS = 16  # proposals (with blocks) kept for height + 1


class ConsensusPublisher(Protocol):
    """Where the service sends what it signs, and the evidence it found (the gossip service).
    The calls must return at once (queue the work): they run inside the consensus loop."""

    def publish_proposal(self, signed: SignedProposal, block: Block) -> None: ...

    def publish_vote(self, signed: SignedVote) -> None: ...

    def publish_evidence(self, evidence: DuplicateVoteEvidence) -> None: ...


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class _CommitDue:
    """Internal event: ``timeout_commit`` after deciding ``height`` has passed."""

    height: int


@dataclass(frozen=True, slots=True)
class _PeerProposal:
    """A proposal from a peer (signature checked by the caller) with its assembled block."""

    signed: SignedProposal
    block: Block


@dataclass(frozen=True, slots=True)
class _PeerVotes:
    """Votes from peers with their recovered signers."""

    votes: tuple[tuple[SignedVote, Address], ...]


@dataclass(slots=True)
class _PeerEvidence:
    """Evidence from peers (form and signatures checked by the caller); ``accepted`` is what
    the pool newly took, set before ``done``."""

    evidence: tuple[DuplicateVoteEvidence, ...]
    done: trio.Event = field(default_factory=trio.Event)
    accepted: list[DuplicateVoteEvidence] = field(default_factory=list)


@dataclass(slots=True)
class _PeerCommit:
    """Catch-up: a block at the next height with the commit a peer stored for it."""

    block: Block
    commit: Commit
    done: trio.Event = field(default_factory=trio.Event)
    committed: bool = False
    error: InvalidBlock | None = None


@dataclass(frozen=True, slots=True)
class ConsensusStatus:
    height: int
    round: int
    step: str
    last_commit_round: int | None


class ConsensusService:
    """Runs the engine for one node; with a key it validates, without one it only follows."""

    def __init__(
        self,
        chain: ChainService,
        mempool: Mempool,
        key: crypto.PrivateKey | None,
        wal_path: Path,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
        on_commit: Callable[[Block], None] | None = None,
        publisher: ConsensusPublisher | None = None,
    ) -> None:
        self.chain = chain
        self.mempool = mempool
        self.key = key
        self.wal_path = wal_path
        self.clock_ms = clock_ms
        self.on_commit = on_commit
        self.config = eng.EngineConfig(key.address if key is not None else None)
        self.state = eng.initial_state(self.config)
        self._blocks: dict[Hash32, Block] = {}
        self._sign_state: SignState | None = None
        self._last_commit: Commit | None = None
        self._send, self._recv = trio.open_memory_channel[object](EVENT_QUEUE)
        self._nursery: trio.Nursery | None = None
        self._wal: ConsensusWAL | None = None
        self._height_waiters: list[tuple[int, trio.Event]] = []
        self.publisher = publisher
        self._next_proposals: dict[bytes, _PeerProposal] = {}
        self._next_validators: tuple[int, ValidatorSet] | None = None
        # Evidence waiting for a block (DESIGN §5); owned by this task.
        self.evidence = EvidencePool(chain.chain.evidence_max_age)
        self._params = chain.params  # to notice votable parameter changes after a commit

    # --- public ------------------------------------------------------------------------------

    def status(self) -> ConsensusStatus:
        s = self.state
        return ConsensusStatus(
            s.height, s.round, eng.Step(s.step).name.lower(),
            None if self._last_commit is None else self._last_commit.round,
        )

    async def wait_for_height(self, height: int) -> None:
        """Return once the chain head is at least ``height``."""
        if self.chain.head_height >= height:
            return
        event = trio.Event()
        self._height_waiters.append((height, event))
        await event.wait()

    def after_external_commit(self, block: Block, result: BlockResult) -> None:
        """A block another caller committed with ``ChainService.commit`` while this service was
        not running yet (the sync service's initial sync, ``node/p2p/sync.py``): update the
        pool, call ``on_commit`` and wake ``wait_for_height`` waiters, as after own commits."""
        self._after_commit(block, result)

    def attach_publisher(self, publisher: ConsensusPublisher) -> None:
        """Send own proposals and votes to ``publisher`` from now on (the gossip service)."""
        self.publisher = publisher

    # --- input from peers (see the module docstring) ---------------------------------------------

    def deliver_proposal(self, signed: SignedProposal, block: Block) -> bool:
        """Queue a peer's proposal whose signature recovers its proposer, with its block (whose
        hash the caller checked against the proposal). False if dropped at once."""
        height = signed.proposal.height
        if height not in (self.state.height, self.state.height + 1):
            return False
        if block.hash() != signed.proposal.block_hash:
            return False
        return self._offer(_PeerProposal(signed, block))

    def deliver_votes(self, votes: Sequence[tuple[SignedVote, Address]]) -> bool:
        """Queue votes from peers, each with the signer its signature recovers."""
        fresh = tuple((v, signer) for v, signer in votes if not self.knows_vote(v, signer))
        return bool(fresh) and self._offer(_PeerVotes(fresh))

    async def deliver_evidence(
        self, items: Sequence[DuplicateVoteEvidence]
    ) -> list[DuplicateVoteEvidence] | None:
        """Queue evidence from peers (form and signatures checked by the caller) and wait until
        this task has checked it against the committed state and offered it to the pool: the
        items the pool newly accepted (the ones to relay), [] if none; None if it was dropped
        unchecked (the queue is full)."""
        fresh = tuple(ev for ev in items if ev not in self.evidence)
        if not fresh:
            return []
        item = _PeerEvidence(fresh)
        if not self._offer(item):
            return None
        await item.done.wait()
        return item.accepted

    async def commit_from_peer(self, block: Block, commit: Commit) -> bool:
        """Commit ``block`` (the next height) with ``commit`` received from a peer and start the
        following height. True if it was committed; False if it is not the next height (any
        more), or the queue is full. Raises ``InvalidBlock`` (``InvalidCommit``) for bad data."""
        if block.header.height != self.chain.head_height + 1:
            return False
        item = _PeerCommit(block, commit)
        if not self._offer(item):
            return False
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.committed

    def _offer(self, item: object) -> bool:
        if self._send.statistics().current_buffer_used >= PEER_INPUT_LIMIT:
            log.debug("consensus queue full: dropping %s from a peer", type(item).__name__)
            return False
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    # --- read-only views for the network -------------------------------------------------------

    @property
    def height(self) -> int:
        """The height in progress (still the decided one during ``timeout_commit``)."""
        return int(self.state.height)

    def validators_for(self, height: int) -> ValidatorSet | None:
        """The validator set that votes at ``height`` (this height or the next), else None."""
        s = self.state
        if s.validators is None:
            return None
        if height == s.height:
            return s.validators
        if height == s.height + 1:
            cached = self._next_validators
            if cached is None or cached[0] != height:
                cached = (height, self.chain.validator_context(height).current)
                self._next_validators = cached
            return cached[1]
        return None

    def knows_vote(self, signed: SignedVote, signer: Address) -> bool:
        """True if the engine has this vote (or one for the same value) or cannot use it."""
        s = self.state
        vote = signed.vote
        if vote.height == s.height + 1:
            return (signed, signer) in s.next_height_votes
        if vote.height != s.height or s.validators is None:
            return True
        messages = s.rounds.get(vote.round)
        if messages is None:
            return False
        return vote.block_hash in messages.votes(vote.vote_type).values_of.get(signer, ())

    def block(self, block_hash: Hash32) -> Block | None:
        """A block of the height in progress this node built or received."""
        return self._blocks.get(block_hash)

    def own_proposals(self) -> list[tuple[SignedProposal, Block]]:
        """This validator's proposals at the undecided height in progress, latest round first."""
        s = self.state
        own = self.config.address
        if own is None or s.decision is not None:
            return []
        out = []
        for r in sorted(s.rounds, reverse=True):
            for signed in s.rounds[r].proposals:
                block = self._blocks.get(signed.proposal.block_hash)
                if signed.proposal.proposer == own and block is not None:
                    out.append((signed, block))
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._wal = ConsensusWAL.open(self.wal_path)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._recover()
                task_status.started()
                async for event in self._recv:
                    await self._handle(event)
        finally:
            self._wal.close()

    # --- start-up ----------------------------------------------------------------------------

    async def _recover(self) -> None:
        assert self._wal is not None
        entries = self._wal.replay()
        self._sign_state = self._wal.last_sign_state
        head = self.chain.head_height
        if head > 0:
            self._last_commit = self.chain.store.get_commit(head)
        next_height = head + 1
        events = events_of(entries)
        started = any(isinstance(e, eng.StartHeight) for e in events)
        if height_of(entries) == next_height and started:
            for block_hash, raw in blocks_of(entries).items():
                self._blocks[block_hash] = Block.decode(raw)
            self.state, actions = eng.replay_into(eng.initial_state(self.config), events)
            log.info(
                "replayed the consensus WAL at height %d: round %d, locked round %d",
                next_height, self.state.round, self.state.locked_round,
            )
            for action in actions:
                await self._perform(action)
        else:
            await self._start_height(next_height)

    async def _start_height(self, height: int) -> None:
        assert self._wal is not None
        await trio.to_thread.run_sync(self._wal.start_height, height)
        self._blocks.clear()
        parent = self.chain.head
        last_time = (self.chain.chain.genesis_time - 1) if parent is None else parent.time
        sets = self.chain.validator_context(height)
        event = eng.StartHeight(
            Height(height),
            sets.current,
            last_time,
            self.clock_ms(),
            eng.Timeouts.from_params(self.chain.params),
            sets.next,
        )
        await self._deliver(event)
        waiting, self._next_proposals = self._next_proposals, {}
        for item in waiting.values():
            if item.signed.proposal.height == height:
                await self._on_peer_proposal(item)

    # --- the loop ----------------------------------------------------------------------------

    async def _handle(self, event: object) -> None:
        if isinstance(event, _CommitDue):
            if event.height == self.state.height and self.chain.head_height == event.height:
                votes = eng.commit_votes(self.state)
                decision = self.state.decision
                if decision is not None and votes:
                    self._last_commit = Commit(
                        Height(event.height), decision.round, decision.block_hash, votes
                    )
                await self._start_height(event.height + 1)
            return
        if isinstance(event, _PeerVotes):
            for signed, signer in event.votes:
                if not self.knows_vote(signed, signer):
                    await self._deliver(eng.VoteReceived(signed, signer, self.clock_ms()))
            return
        if isinstance(event, _PeerProposal):
            await self._on_peer_proposal(event)
            return
        if isinstance(event, _PeerCommit):
            await self._on_peer_commit(event)
            return
        if isinstance(event, _PeerEvidence):
            try:
                event.accepted = await self._add_evidence(event.evidence)
            finally:
                event.done.set()
            return
        await self._deliver(event)  # type: ignore[arg-type]

    async def _on_peer_proposal(self, item: _PeerProposal) -> None:
        assert self._wal is not None
        signed, block = item.signed, item.block
        p = signed.proposal
        s = self.state
        if p.height == s.height + 1:
            key = signed.encode()
            if key not in self._next_proposals and (
                len(self._next_proposals) < MAX_NEXT_HEIGHT_PROPOSALS
            ):
                self._next_proposals[key] = item
            return
        if p.height != s.height or s.decision is not None or s.validators is None:
            return
        messages = s.rounds.get(p.round)
        if messages is not None and any(q.proposal == p for q in messages.proposals):
            return  # a duplicate
        block_hash = p.block_hash
        info = s.blocks.get(block_hash)
        if info is not None:  # executed already (an earlier round's proposal of the same block)
            valid = info.valid
        else:
            if block_hash not in self._blocks:
                self._blocks[block_hash] = block
                # Kept so a restart can still commit or re-propose it.
                self._wal.append(BlockEntry(block_hash, block.encode()), sync=False)
            valid = await self._validate(block)
        await self._deliver(
            eng.ProposalReceived(signed, block_hash, valid, block.header.time, self.clock_ms())
        )

    async def _on_peer_commit(self, item: _PeerCommit) -> None:
        block, commit = item.block, item.commit
        height = int(block.header.height)
        try:
            if height != self.chain.head_height + 1:
                return
            try:
                result = await trio.to_thread.run_sync(self.chain.commit, block, commit)
            except InvalidBlock as exc:
                log.warning("a peer's block %d did not commit: %s", height, exc.message)
                item.error = exc
                return
            item.committed = True
        finally:
            item.done.set()
        self._last_commit = commit
        self._after_commit(block, result)
        log.info(
            "caught up: committed block %d (%s) from a peer",
            height, block.hash().hex()[:16],
        )
        await self._start_height(height + 1)

    async def _deliver(self, event: eng.Event) -> None:
        assert self._wal is not None
        self._wal.append(event, sync=False)
        self.state, actions = eng.step(self.state, event)
        for action in actions:
            await self._perform(action)

    async def _perform(self, action: eng.Action) -> None:
        if isinstance(action, eng.BuildBlock):
            await self._build(action)
        elif isinstance(action, eng.SignProposal):
            await self._sign_proposal(action)
        elif isinstance(action, eng.SignVote):
            await self._sign_vote(action)
        elif isinstance(action, eng.ScheduleTimeout):
            assert self._nursery is not None
            self._nursery.start_soon(self._timer, action)
        elif isinstance(action, eng.Decide):
            await self._decide(action)
        elif isinstance(action, eng.RecordEvidence):
            vote = action.evidence.vote_a.vote
            log.warning(
                "duplicate vote evidence: validator 0x%s, height %d, round %d, type %d",
                vote.validator.hex(), vote.height, vote.round, vote.vote_type,
            )
            for ev in await self._add_evidence((action.evidence,)):
                if self.publisher is not None:
                    self.publisher.publish_evidence(ev)

    async def _add_evidence(
        self, items: Sequence[DuplicateVoteEvidence]
    ) -> list[DuplicateVoteEvidence]:
        """Check ``items`` against the committed state (worker thread) and pool the valid ones:
        those the pool newly accepted."""
        todo = [ev for ev in items if ev not in self.evidence]
        if not todo:
            return []
        errors = await trio.to_thread.run_sync(_check_evidence, self.chain, todo)
        accepted = []
        head = self.chain.head_height
        for ev, error in zip(todo, errors, strict=True):
            if error is None:
                try:
                    if self.evidence.add(ev, head_height=head):
                        accepted.append(ev)
                except InvalidEvidence as exc:
                    error = exc
            if error is not None:
                log.info("evidence not kept: %s", error.message)
        return accepted

    async def _timer(self, action: eng.ScheduleTimeout) -> None:
        await trio.sleep(action.duration_ms / 1000)
        event = eng.TimeoutFired(action.height, action.round, int(action.step), self.clock_ms())
        await self._send.send(event)

    async def _build(self, action: eng.BuildBlock) -> None:
        assert self._wal is not None and self.key is not None
        params = self.chain.params
        candidates = self.mempool.select(params.max_block_txs, params.max_block_bytes)
        evidence = self.evidence.pending(
            self.chain.authority.max_block_evidence, head_height=self.chain.head_height
        )
        built = await trio.to_thread.run_sync(
            self.chain.build,
            int(action.round),
            self.key.address,
            self._last_commit,
            candidates,
            evidence,
        )
        for raw, exc in built.rejected:
            log.debug("left out of the block: %s", exc.message)
            self.mempool.remove(crypto.sha256(raw))
        if built.rejected_evidence:
            for _, error in built.rejected_evidence:
                log.info("evidence left out of the block: %s", error.message)
            self.evidence.mark_done([e for e, _ in built.rejected_evidence])
        block = built.block
        block_hash = block.hash()
        self._blocks[block_hash] = block
        self._wal.append(BlockEntry(block_hash, block.encode()), sync=False)
        await self._send.send(
            eng.BlockBuilt(
                action.height, action.round, block_hash, block.header.time, self.clock_ms()
            )
        )

    async def _sign_proposal(self, action: eng.SignProposal) -> None:
        assert self._wal is not None and self.key is not None
        signed, sign_state = sign_proposal_guarded(
            self.key, self.chain.chain.chain_id, self._sign_state, action.proposal
        )
        await self._append_synced(SignedProposalEntry(signed, sign_state))
        self._sign_state = sign_state
        block = self._blocks.get(signed.proposal.block_hash)
        if self.publisher is not None and block is not None:
            self.publisher.publish_proposal(signed, block)
        await self._on_own_proposal(signed)

    async def _append_synced(self, entry: SignedProposalEntry | SignedVoteEntry) -> None:
        """Persist before speaking: the entry is on disk before the message leaves the process.

        The fsync runs in a worker thread so the event loop keeps serving meanwhile.
        """
        assert self._wal is not None
        await trio.to_thread.run_sync(self._wal.append, entry, True)

    async def _on_own_proposal(self, signed: SignedProposal) -> None:
        block = self._blocks.get(signed.proposal.block_hash)
        if block is None:  # pragma: no cover - the engine proposes only built or valid blocks
            log.error("signed a proposal for an unknown block")
            return
        valid = await self._validate(block)
        await self._send.send(
            eng.ProposalReceived(
                signed, block.hash(), valid, block.header.time, self.clock_ms()
            )
        )

    async def _validate(self, block: Block) -> bool:
        try:
            await trio.to_thread.run_sync(self.chain.validate, block)
        except InvalidBlock as exc:
            log.warning("invalid block at height %d: %s", block.header.height, exc.message)
            return False
        return True

    async def _sign_vote(self, action: eng.SignVote) -> None:
        assert self._wal is not None and self.key is not None
        signed, sign_state = sign_vote_guarded(
            self.key, self.chain.chain.chain_id, self._sign_state, action.vote
        )
        await self._append_synced(SignedVoteEntry(signed, sign_state))
        self._sign_state = sign_state
        if self.publisher is not None:
            self.publisher.publish_vote(signed)
        await self._on_own_vote(signed)

    async def _on_own_vote(self, signed: SignedVote) -> None:
        assert self.key is not None
        await self._send.send(eng.VoteReceived(signed, self.key.address, self.clock_ms()))

    async def _decide(self, action: eng.Decide) -> None:
        height = int(action.height)
        if self.chain.head_height >= height:
            # Already committed before a restart; only the pause before the next height remains.
            self._schedule_commit_due(height)
            return
        block = self._blocks.get(action.block_hash)
        if block is None:
            raise NeuroSeedError(f"decided block at height {height} is not known")
        commit = Commit(Height(height), Round(action.round), action.block_hash, action.commit_votes)
        result = await trio.to_thread.run_sync(self.chain.commit, block, commit)
        self._last_commit = commit
        self._after_commit(block, result)
        log.info(
            "finalized block %d (%s) with %d transactions",
            height, action.block_hash.hex()[:16], len(block.txs),
        )
        self._schedule_commit_due(height)

    def _after_commit(self, block: Block, result: BlockResult) -> None:
        """The pool, the commit callback and ``wait_for_height`` after a block is written."""
        tx_ids = [r.tx_id for r in result.receipts]
        # Senders of every included tx, so the pool also retires same-nonce txs it holds that
        # lost to a competitor it never saw.
        senders = [
            Address(attr.value)
            for r in result.receipts
            for ev in r.events
            if ev.name == "fee"
            for attr in ev.attributes
            if attr.key == "payer"
        ]
        self.mempool.on_block_committed(tx_ids, self.chain.state_view(), senders=senders)
        # A held transaction its kind's rules now refuse would block its sender's nonce forever.
        refused = self.mempool.drop_refused_heads(self.chain.check_admission)
        if refused:
            log.debug("dropped %d held transactions the new state refuses", len(refused))
        self.evidence.update(block.evidence, self.chain.head_height)
        params = self.chain.params
        if params != self._params:
            self._params = params
            dropped = self.mempool.on_params_changed(self.chain.state_view(), params)
            log.info(
                "votable parameters changed at height %d; %d transactions dropped",
                self.chain.head_height, len(dropped),
            )
        if self.on_commit is not None:
            self.on_commit(block)
        self._wake_waiters()

    def _schedule_commit_due(self, height: int) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._commit_due, height, self.chain.params.timeout_commit_ms)

    async def _commit_due(self, height: int, delay_ms: int) -> None:
        await trio.sleep(delay_ms / 1000)
        await self._send.send(_CommitDue(height))

    def _wake_waiters(self) -> None:
        head = self.chain.head_height
        keep = []
        for height, event in self._height_waiters:
            if head >= height:
                event.set()
            else:
                keep.append((height, event))
        self._height_waiters = keep


def _check_evidence(
    chain: ChainService, items: Sequence[DuplicateVoteEvidence]
) -> list[InvalidEvidence | None]:
    """``ChainService.check_evidence`` of each item (worker thread): None where it is valid."""
    out: list[InvalidEvidence | None] = []
    for ev in items:
        try:
            chain.check_evidence(ev)
        except InvalidEvidence as exc:
            out.append(exc)
        else:
            out.append(None)
    return out
