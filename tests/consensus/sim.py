"""Test helpers for the consensus engine: keys, signed messages, and a network simulator.

The simulator runs N engines (``node.consensus.engine``) with a minimal driver each, over an
in-memory network driven by a seeded random scheduler: messages are delayed, dropped, duplicated
and reordered until the global stabilization time (GST), after which nothing is dropped and delays
are bounded. Everything is deterministic for a given seed: one ``random.Random``, a discrete clock,
no threads and no I/O.

Each simulated driver does what the real one must do: verify signatures, execute proposed blocks
(a small validity function over real ``Block`` records: parent, height, tx root, last commit and
its BFT time), sign through the sign-state guard, feed its own messages back, schedule timeouts,
commit after ``timeout_commit`` with the collected precommits, keep next-height proposals until
the next height starts, re-gossip its own messages of the current height, and answer a peer
that lags behind with the commit of the peer's height (catch-up).

Byzantine behaviours: ``silent`` (never sends), ``equivocate`` (double proposals and double
votes, each version to a different part of the network and both to one peer), ``invalid``
(proposes blocks that fail execution, votes honestly).
"""

from __future__ import annotations

import functools
import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from node.consensus.blocks import (
    Block,
    Commit,
    Header,
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
    VoteType,
    compute_evidence_root,
    compute_last_commit_hash,
    compute_tx_root,
    proposal_signer,
    sign_proposal,
    sign_vote,
    vote_signer,
)
from node.consensus.engine import (
    Action,
    BlockBuilt,
    BuildBlock,
    ConsensusState,
    Decide,
    EngineConfig,
    Event,
    ProposalReceived,
    RecordEvidence,
    ScheduleTimeout,
    SignProposal,
    SignVote,
    StartHeight,
    TimeoutFired,
    Timeouts,
    VoteReceived,
    block_time_from_commit,
    commit_votes,
    initial_state,
    step,
)
from node.consensus.signstate import SignState, sign_proposal_guarded, sign_vote_guarded
from node.consensus.validators import ValidatorSet
from node.crypto import PrivateKey
from node.types import ZERO_HASH, Address, ChainId, Hash32, Height, Round, TimestampMs

CHAIN_ID = ChainId(7)
GENESIS_TIME = 1_000_000
TIMEOUTS = Timeouts(
    propose_ms=1000,
    propose_delta_ms=500,
    prevote_ms=500,
    prevote_delta_ms=250,
    precommit_ms=500,
    precommit_delta_ms=250,
    commit_ms=300,
)
GOSSIP_MS = 400


def make_keys(n: int) -> list[PrivateKey]:
    """``n`` fixed keys ordered by address (the validator-set order)."""
    return sorted((PrivateKey(bytes([i + 1]) * 32) for i in range(n)), key=lambda k: k.address)


def validator_set(keys: list[PrivateKey]) -> ValidatorSet:
    return ValidatorSet.of({k.address: 1 for k in keys})


def signed_vote(
    key: PrivateKey,
    vote_type: int,
    height: int,
    round: int,
    value: Hash32 | None,
    time: int = GENESIS_TIME + 1,
) -> SignedVote:
    vote = Vote(int(vote_type), Height(height), Round(round), value, TimestampMs(time), key.address)
    return sign_vote(key, CHAIN_ID, vote)


def signed_proposal(
    key: PrivateKey, height: int, round: int, value: Hash32, pol_round: int | None = None
) -> SignedProposal:
    proposal = Proposal(Height(height), Round(round), value, pol_round, key.address)
    return sign_proposal(key, CHAIN_ID, proposal)


# --- the simulator -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProposalMsg:
    signed: SignedProposal
    block: Block


@dataclass(frozen=True, slots=True)
class VoteMsg:
    signed: SignedVote


@dataclass(frozen=True, slots=True)
class CommitMsg:
    """Catch-up: a decided block, a proposal that carried it, and its precommits."""

    proposal: ProposalMsg
    precommits: tuple[SignedVote, ...]


Msg = ProposalMsg | VoteMsg | CommitMsg


@dataclass(slots=True)
class NetworkConfig:
    gst_ms: int = 6_000  # global stabilization time, relative to the start
    drop: float = 0.15  # before GST
    duplicate: float = 0.1
    max_delay_ms: int = 1_500  # before GST
    max_delay_after_gst_ms: int = 150


class SimNode:
    """One validator: an engine plus the minimal driver around it."""

    def __init__(self, sim: Simulation, index: int, key: PrivateKey, behaviour: str) -> None:
        self.sim = sim
        self.index = index
        self.key = key
        self.behaviour = behaviour
        self.skew_ms = sim.rng.randint(0, 40)  # local clocks differ a little
        self.state: ConsensusState = initial_state(EngineConfig(key.address))
        self.sign_state: SignState | None = None
        self.head_hash: Hash32 = ZERO_HASH
        self.head_time = GENESIS_TIME - 1
        self.last_commit: Commit | None = None
        self.decided: dict[int, Hash32] = {}
        self.blocks: dict[Hash32, Block] = {}
        self.valid_cache: dict[Hash32, bool] = {}
        self.next_proposals: list[ProposalMsg] = []
        self.own_messages: list[Msg] = []
        self.commits: dict[int, CommitMsg] = {}
        self.evidence: list[RecordEvidence] = []
        self.catchup_sent: dict[tuple[int, int], int] = {}
        self.inbox: deque[Event] = deque()

    @property
    def honest(self) -> bool:
        return self.behaviour in ("honest", "invalid")

    def now(self) -> int:
        return self.sim.time + self.skew_ms

    # --- inputs ---

    def start(self) -> None:
        if self.behaviour == "silent":
            return
        self.process(
            StartHeight(Height(1), self.sim.validators, self.head_time, self.now(), TIMEOUTS)
        )
        self.sim.schedule(self.sim.time + GOSSIP_MS, self.gossip)

    def receive(self, sender: int, msg: Msg) -> None:
        if self.behaviour == "silent":
            return
        h = self.state.height
        if isinstance(msg, VoteMsg):
            vote = msg.signed.vote
            signer = self.sim.vote_signer(msg.signed)
            if signer != vote.validator:
                return
            if vote.height < h:
                self.catch_up(sender, vote.height)
            self.process(VoteReceived(msg.signed, signer, self.now()))
        elif isinstance(msg, ProposalMsg):
            p = msg.signed.proposal
            if self.sim.proposal_signer(msg.signed) != p.proposer:
                return
            if p.height < h:
                self.catch_up(sender, p.height)
            elif p.height == h + 1 and len(self.next_proposals) < 16:
                self.next_proposals.append(msg)  # executed once height + 1 starts
            elif p.height == h:
                self.deliver_proposal(msg)
        else:
            if msg.proposal.signed.proposal.height != h:
                return
            self.receive(sender, msg.proposal)
            for signed in msg.precommits:
                self.receive(sender, VoteMsg(signed))

    def deliver_proposal(self, msg: ProposalMsg) -> None:
        block_hash = msg.block.hash()
        self.blocks.setdefault(block_hash, msg.block)
        valid = self.execute(msg.block)
        self.process(
            ProposalReceived(msg.signed, block_hash, valid, msg.block.header.time, self.now())
        )

    def process(self, event: Event) -> None:
        """The driver loop: step the engine, perform the actions, feed own messages back."""
        self.inbox.append(event)
        while self.inbox:
            self.state, actions = step(self.state, self.inbox.popleft())
            for action in actions:
                self.perform(action)

    # --- actions ---

    def perform(self, action: Action) -> None:
        if isinstance(action, BuildBlock):
            block = self.build_block(action.height, action.round)
            self.blocks[block.hash()] = block
            self.inbox.append(
                BlockBuilt(action.height, action.round, block.hash(), block.header.time, self.now())
            )
        elif isinstance(action, SignProposal):
            self.sign_and_send_proposal(action)
        elif isinstance(action, SignVote):
            self.sign_and_send_vote(action)
        elif isinstance(action, ScheduleTimeout):
            h, r, st = action.height, action.round, int(action.step)
            self.sim.schedule(
                self.sim.time + action.duration_ms,
                lambda: self.process(TimeoutFired(h, r, st, self.now())),
            )
        elif isinstance(action, Decide):
            self.sim.record_decision(self, action)
            self.decided[action.height] = action.block_hash
            h = action.height
            self.sim.schedule(self.sim.time + TIMEOUTS.commit_ms, lambda: self.commit(h))
        else:
            self.evidence.append(action)

    def sign_and_send_proposal(self, action: SignProposal) -> None:
        block = self.blocks[action.proposal.block_hash]
        if self.behaviour == "equivocate":
            signed = sign_proposal(self.key, CHAIN_ID, action.proposal)
            other_block = self.build_block(
                action.proposal.height, action.proposal.round, salt=b"evil"
            )
            self.blocks[other_block.hash()] = other_block
            other = sign_proposal(
                self.key,
                CHAIN_ID,
                Proposal(
                    action.proposal.height,
                    action.proposal.round,
                    other_block.hash(),
                    action.proposal.pol_round,
                    self.key.address,
                ),
            )
            self.split_send(ProposalMsg(signed, block), ProposalMsg(other, other_block))
        else:
            signed, self.sign_state = sign_proposal_guarded(
                self.key, CHAIN_ID, self.sign_state, action.proposal
            )
            msg = ProposalMsg(signed, block)
            self.own_messages.append(msg)
            self.sim.broadcast(self.index, msg)
        self.inbox.append(
            ProposalReceived(
                signed, block.hash(), self.execute(block), block.header.time, self.now()
            )
        )

    def sign_and_send_vote(self, action: SignVote) -> None:
        vote = action.vote
        if self.behaviour == "equivocate":
            signed = sign_vote(self.key, CHAIN_ID, vote)
            flipped = Hash32(bytes([self.sim.rng.randrange(256)]) * 32)
            other_value = flipped if vote.block_hash is None else None
            other = sign_vote(
                self.key,
                CHAIN_ID,
                Vote(
                    vote.vote_type, vote.height, vote.round, other_value, vote.time, vote.validator
                ),
            )
            self.split_send(VoteMsg(signed), VoteMsg(other))
        else:
            signed, self.sign_state = sign_vote_guarded(self.key, CHAIN_ID, self.sign_state, vote)
            self.own_messages.append(VoteMsg(signed))
            self.sim.broadcast(self.index, VoteMsg(signed))
        self.inbox.append(VoteReceived(signed, self.key.address, self.now()))

    def split_send(self, a: Msg, b: Msg) -> None:
        """Byzantine: version a to even peers, b to odd ones, and both to one random peer."""
        peers = [n.index for n in self.sim.nodes if n.index != self.index]
        both = self.sim.rng.choice(peers)
        for peer in peers:
            self.sim.send(self.index, peer, a if peer % 2 == 0 else b)
        self.sim.send(self.index, both, b if both % 2 == 0 else a)
        self.own_messages.extend((a, b))

    def commit(self, height: int) -> None:
        """End of timeout_commit: store the block with the collected precommits, next height."""
        decision = self.state.decision
        if self.state.height != height or decision is None:
            return
        votes = commit_votes(self.state)
        block = self.blocks[decision.block_hash]
        proposal = next(
            p
            for m in self.state.rounds.values()
            for p in m.proposals
            if p.proposal.block_hash == decision.block_hash
        )
        self.commits[height] = CommitMsg(ProposalMsg(proposal, block), votes)
        self.last_commit = Commit(Height(height), decision.round, decision.block_hash, votes)
        self.head_hash = decision.block_hash
        self.head_time = block.header.time
        self.own_messages = []
        self.process(
            StartHeight(
                Height(height + 1), self.sim.validators, self.head_time, self.now(), TIMEOUTS
            )
        )
        pending, self.next_proposals = self.next_proposals, []
        for msg in pending:
            if msg.signed.proposal.height == self.state.height:
                self.deliver_proposal(msg)

    def gossip(self) -> None:
        """Re-send this height's own messages (gossip is best-effort; this repairs losses)."""
        for msg in self.own_messages:
            if isinstance(msg, VoteMsg | ProposalMsg):
                self.sim.broadcast(self.index, msg)
        self.sim.schedule(self.sim.time + GOSSIP_MS, self.gossip)

    def catch_up(self, peer: int, height: int) -> None:
        """A peer is behind: send it the commit of its height (rate-limited per peer and height)."""
        commit = self.commits.get(height)
        last = self.catchup_sent.get((peer, height))
        if commit is None or (last is not None and self.sim.time - last < GOSSIP_MS):
            return
        self.catchup_sent[(peer, height)] = self.sim.time
        self.sim.send(self.index, peer, commit)

    # --- blocks ---

    def build_block(self, height: int, round: int, salt: bytes = b"") -> Block:
        txs = (b"tx/%d/%d/%d" % (self.index, height, round) + salt,)
        time = GENESIS_TIME
        if self.last_commit is not None:
            time = block_time_from_commit(self.last_commit.precommits, self.sim.validators)
        if self.behaviour == "invalid":
            time += 12_345  # fails execution: the time is not the last commit's median
        header = Header(
            chain_id=CHAIN_ID,
            height=Height(height),
            round=Round(round),
            parent_hash=self.head_hash,
            time=TimestampMs(time),
            proposer=self.key.address,
            tx_root=compute_tx_root(txs),
            receipts_root=ZERO_HASH,
            state_root=ZERO_HASH,
            validators_hash=self.sim.validators.hash(),
            next_validators_hash=self.sim.validators.hash(),
            last_commit_hash=compute_last_commit_hash(self.last_commit),
            evidence_root=compute_evidence_root(()),
        )
        return Block(header, txs, (), self.last_commit)

    def execute(self, block: Block) -> bool:
        """The validity the real driver gets by executing on an overlay; cached per block."""
        block_hash = block.hash()
        if block_hash not in self.valid_cache:
            self.valid_cache[block_hash] = self._check(block)
        return self.valid_cache[block_hash]

    def _check(self, block: Block) -> bool:
        hd = block.header
        vals = self.sim.validators
        h = self.state.height
        if (
            hd.chain_id != CHAIN_ID
            or hd.height != h
            or hd.parent_hash != self.head_hash
            or hd.tx_root != compute_tx_root(block.txs)
            or hd.validators_hash != vals.hash()
            or hd.last_commit_hash != compute_last_commit_hash(block.last_commit)
            or not vals.is_member(hd.proposer)
        ):
            return False
        lc = block.last_commit
        if h == 1:
            return lc is None and hd.time == GENESIS_TIME
        if lc is None or lc.height != h - 1 or lc.block_hash != self.head_hash:
            return False
        power = 0
        seen: list[Address] = []
        for signed in lc.precommits:
            v = signed.vote
            if (
                v.vote_type != VoteType.PRECOMMIT
                or v.height != lc.height
                or v.round != lc.round
                or v.block_hash != lc.block_hash
                or self.sim.vote_signer(signed) != v.validator
                or v.validator in seen
                or v.time <= self.head_time
            ):
                return False
            seen.append(v.validator)
            power += vals.power_of(v.validator)
        if not vals.has_quorum(power):
            return False
        return hd.time == block_time_from_commit(lc.precommits, vals)


@dataclass(order=True, slots=True)
class _Scheduled:
    at: int
    seq: int
    run: Callable[[], None] = field(compare=False)


class Simulation:
    def __init__(
        self,
        seed: int,
        n: int = 4,
        byzantine: dict[int, str] | None = None,
        network: NetworkConfig | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.net = network or NetworkConfig()
        self.keys = make_keys(n)
        self.validators = validator_set(self.keys)
        self.time = GENESIS_TIME + 1_000
        self.start_time = self.time
        self._queue: list[_Scheduled] = []
        self._seq = 0
        self._signers: dict[bytes, Address] = {}
        self.decisions: dict[int, dict[int, Hash32]] = {}  # height -> node -> block
        byzantine = byzantine or {}
        self.nodes = [
            SimNode(self, i, k, byzantine.get(i, "honest")) for i, k in enumerate(self.keys)
        ]

    @property
    def honest(self) -> list[SimNode]:
        return [n for n in self.nodes if n.honest]

    def vote_signer(self, signed: SignedVote) -> Address:
        key = signed.signature + signed.vote.encode()
        if key not in self._signers:
            self._signers[key] = vote_signer(CHAIN_ID, signed)
        return self._signers[key]

    def proposal_signer(self, signed: SignedProposal) -> Address:
        key = signed.signature + signed.proposal.encode()
        if key not in self._signers:
            self._signers[key] = proposal_signer(CHAIN_ID, signed)
        return self._signers[key]

    def schedule(self, at: int, run: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Scheduled(at, self._seq, run))

    def send(self, src: int, dst: int, msg: Msg) -> None:
        before_gst = self.time < self.start_time + self.net.gst_ms
        copies = 1 + (self.rng.random() < self.net.duplicate)
        for _ in range(copies):
            if before_gst and self.rng.random() < self.net.drop:
                continue
            limit = self.net.max_delay_ms if before_gst else self.net.max_delay_after_gst_ms
            deliver = functools.partial(self.nodes[dst].receive, src, msg)
            self.schedule(self.time + self.rng.randint(1, limit), deliver)

    def broadcast(self, src: int, msg: Msg) -> None:
        for node in self.nodes:
            if node.index != src:
                self.send(src, node.index, msg)

    def record_decision(self, node: SimNode, decide: Decide) -> None:
        at_height = self.decisions.setdefault(decide.height, {})
        assert node.index not in at_height, "an engine decided twice at one height"
        at_height[node.index] = decide.block_hash
        self.check_agreement()  # fail at the first disagreement, not at the end

    def run(self, heights: int, max_ms: int = 120_000) -> None:
        """Run until every honest node has decided ``heights`` heights, or ``max_ms`` passed."""
        for node in self.nodes:
            node.start()
        while self._queue:
            if all(len(n.decided) >= heights for n in self.honest):
                return
            item = heapq.heappop(self._queue)
            if item.at > self.start_time + max_ms:
                return
            self.time = max(self.time, item.at)
            item.run()

    def check_agreement(self) -> None:
        """No two honest nodes ever decided different blocks at one height."""
        for height, by_node in self.decisions.items():
            honest = {by_node[n.index] for n in self.honest if n.index in by_node}
            assert len(honest) <= 1, f"disagreement at height {height}: {honest}"

    def check_termination(self, heights: int) -> None:
        for node in self.honest:
            missing = [h for h in range(1, heights + 1) if h not in node.decided]
            assert not missing, f"node {node.index} did not decide heights {missing}"
