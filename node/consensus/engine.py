"""The BFT consensus engine: Tendermint's Algorithm 1 as a pure state machine (DESIGN §5).

``step(state, event) -> (state, actions)`` has no I/O, no clock and no randomness: time arrives in
events as ``now_ms``, and everything the engine wants done comes back as actions for the driver.
The algorithm is Buchman, Kwon, Milosevic, "The latest gossip on BFT consensus"
(arXiv:1807.04938), Algorithm 1; comments cite its line numbers, and the rule numbers of
``consensus-notes.md`` ("rule 5") that restate it. After every event every rule is evaluated again
until none applies, not only the rules the event's message could trigger.

Values are block hashes. The driver executes a proposed block on a discardable overlay before it
delivers the proposal, and passes the result as ``ProposalReceived.valid`` (Algorithm 1's
``valid(v)``) together with the block's time. The driver verifies every signature and passes the
recovered signer; the engine checks membership, height, round, proposer and vote times.

The driver loop (see also ``node/consensus/wal.py``):

* ``StartHeight`` starts a height (round 0). Send it at start-up and, after a ``Decide``, once
  ``timeout_commit`` has passed; until then late precommits still join ``commit_votes(state)``.
* ``BuildBlock`` → build a block on the committed head, reply ``BlockBuilt``.
* ``SignProposal`` / ``SignVote`` → sign through the sign-state (``signstate``), append to the
  synced WAL, broadcast, and feed the signed message back as ``ProposalReceived`` /
  ``VoteReceived`` (the engine counts its own messages only when they come back).
* ``ScheduleTimeout`` → after ``duration_ms`` deliver ``TimeoutFired`` with the same fields.
* ``Decide`` → commit the block with its precommits (``commit_votes`` at the end of
  ``timeout_commit`` gives the fuller set), then ``StartHeight`` for the next height.
* ``RecordEvidence`` → hand the duplicate-vote evidence to the evidence pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from node.consensus.blocks import (
    DuplicateVoteEvidence,
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
    VoteType,
)
from node.consensus.params import VotableParams
from node.consensus.signstate import Step
from node.consensus.validators import ValidatorSet
from node.encoding import Record
from node.errors import InvalidCommit
from node.types import Address, Hash32, Height, Round, TimestampMs

__all__ = [
    "Action",
    "BlockBuilt",
    "BlockInfo",
    "BuildBlock",
    "ConsensusState",
    "Decide",
    "Decided",
    "EngineConfig",
    "Event",
    "ProposalReceived",
    "RecordEvidence",
    "RoundMessages",
    "ScheduleTimeout",
    "SignProposal",
    "SignVote",
    "StartHeight",
    "Step",
    "TimeoutFired",
    "Timeouts",
    "VoteReceived",
    "VoteSet",
    "block_time_from_commit",
    "commit_votes",
    "initial_state",
    "replay_into",
    "step",
]


# --- timeouts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeouts(Record):
    """Round timeouts, ``initial + round * delta`` (consensus-notes rule 10), and the commit pause."""

    propose_ms: int
    propose_delta_ms: int
    prevote_ms: int
    prevote_delta_ms: int
    precommit_ms: int
    precommit_delta_ms: int
    commit_ms: int  # the block interval; waited by the driver, never a validity rule

    @classmethod
    def from_params(cls, p: VotableParams) -> Timeouts:
        return cls(
            p.timeout_propose_ms,
            p.timeout_propose_delta_ms,
            p.timeout_prevote_ms,
            p.timeout_prevote_delta_ms,
            p.timeout_precommit_ms,
            p.timeout_precommit_delta_ms,
            p.timeout_commit_ms,
        )

    def duration(self, step: Step, round: int) -> int:
        if step == Step.PROPOSE:
            return self.propose_ms + round * self.propose_delta_ms
        if step == Step.PREVOTE:
            return self.prevote_ms + round * self.prevote_delta_ms
        return self.precommit_ms + round * self.precommit_delta_ms


# --- events (inputs) -----------------------------------------------------------------------------
# Events are records so the driver can append them to the WAL and replay them byte for byte.


@dataclass(frozen=True, slots=True)
class StartHeight(Record):
    """Start ``height`` at round 0 with the validator set that votes at this height."""

    height: Height
    validator_set: ValidatorSet
    last_block_time_ms: int  # the parent's time: a proposal's block time must be greater
    now_ms: int
    timeouts: Timeouts
    # The set that votes at height + 1 (it may differ: set changes apply at h+2); votes for the
    # next height are buffered from its members. None: the same as ``validator_set``.
    next_validator_set: ValidatorSet | None = None


@dataclass(frozen=True, slots=True)
class ProposalReceived(Record):
    """A proposal whose signature recovers ``proposal.proposer``, with its executed block.

    ``block_hash`` is the hash of the delivered block; ``valid`` says whether it applied cleanly
    on a discardable overlay of the parent state with every header field matching.
    Proposals for the next height are kept by the driver (it can execute them only once the
    current block is committed) and delivered after the next ``StartHeight``.
    """

    signed_proposal: SignedProposal
    block_hash: Hash32
    valid: bool
    block_time_ms: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class VoteReceived(Record):
    """A vote whose signature the driver verified; ``signer`` is the recovered address."""

    signed_vote: SignedVote
    signer: Address
    now_ms: int


@dataclass(frozen=True, slots=True)
class TimeoutFired(Record):
    height: Height
    round: Round
    step: int  # a Step
    now_ms: int


@dataclass(frozen=True, slots=True)
class BlockBuilt(Record):
    """The driver's answer to ``BuildBlock``."""

    height: Height
    round: Round
    block_hash: Hash32
    block_time_ms: int
    now_ms: int


Event = StartHeight | ProposalReceived | VoteReceived | TimeoutFired | BlockBuilt


# --- actions (outputs) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildBlock:
    """Build a new block for (height, round) and answer with ``BlockBuilt`` (Alg. 1 getValue())."""

    height: Height
    round: Round


@dataclass(frozen=True, slots=True)
class SignProposal:
    proposal: Proposal


@dataclass(frozen=True, slots=True)
class SignVote:
    vote: Vote


@dataclass(frozen=True, slots=True)
class ScheduleTimeout:
    height: Height
    round: Round
    step: Step
    duration_ms: int


@dataclass(frozen=True, slots=True)
class Decide:
    """Commit ``block_hash`` (decided in ``round``) with the precommits that finalized it."""

    height: Height
    round: Round
    block_hash: Hash32
    commit_votes: tuple[SignedVote, ...]


@dataclass(frozen=True, slots=True)
class RecordEvidence:
    evidence: DuplicateVoteEvidence


Action = BuildBlock | SignProposal | SignVote | ScheduleTimeout | Decide | RecordEvidence


# --- state ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Who this node is (``address`` None: an observer that follows but never signs) and bounds."""

    address: Address | None
    max_proposals_per_round: int = 4  # a double-proposing proposer cannot flood the log
    max_far_rounds_per_validator: int = 2  # rounds above round + 1 one validator may open
    max_next_height_votes_per_validator: int = 16  # buffered votes for height + 1
    max_conflicting_votes: int = 2  # extra values one validator is counted for per round and type


@dataclass(frozen=True, slots=True)
class VoteSet:
    """The votes of one type in one round, tallied per value and overall.

    Each validator counts at most once per value, and once in ``power`` (the "2f+1 for anything"
    tallies of rules 4 and 7), whatever it sent. A validator that votes for two values (an
    equivocation, recorded as evidence) counts once for each: quorums for two different values
    still cannot both form, since two sets of more than 2/3 of the power share more than 1/3, so
    at least one honest validator would have voted for both. Counting it only for its first
    value would instead let a faulty validator keep an honest node from recognising a quorum
    that the others saw (CometBFT likewise counts such a vote for a block a peer claims 2/3 for).
    """

    by_value: Mapping[Hash32 | None, Mapping[Address, SignedVote]]
    values_of: Mapping[Address, tuple[Hash32 | None, ...]]  # first value first
    power_by_value: Mapping[Hash32 | None, int]
    power: int  # each validator that voted, once

    def with_vote(self, signed: SignedVote, power: int) -> VoteSet:
        """Add a vote for a value this validator has not voted for yet in this set."""
        validator, value = signed.vote.validator, signed.vote.block_hash
        previous = self.values_of.get(validator, ())
        return VoteSet(
            {**self.by_value, value: {**self.by_value.get(value, {}), validator: signed}},
            {**self.values_of, validator: (*previous, value)},
            {**self.power_by_value, value: self.power_by_value.get(value, 0) + power},
            self.power + (0 if previous else power),
        )

    def without(self, validator: Address, value: Hash32 | None, power: int) -> VoteSet:
        """Remove the validator's vote for ``value`` (a vote found invalid after the fact)."""
        voters = {a: v for a, v in self.by_value[value].items() if a != validator}
        by_value = {k: v for k, v in self.by_value.items() if k != value}
        if voters:
            by_value[value] = voters
        remaining = tuple(x for x in self.values_of[validator] if x != value)
        values_of = {a: v for a, v in self.values_of.items() if a != validator}
        if remaining:
            values_of[validator] = remaining
        tallies = dict(self.power_by_value)
        tallies[value] -= power
        if not tallies[value]:
            del tallies[value]
        return VoteSet(by_value, values_of, tallies, self.power - (0 if remaining else power))

    def first_vote(self, validator: Address) -> SignedVote | None:
        values = self.values_of.get(validator)
        return None if not values else self.by_value[values[0]][validator]

    def power_for(self, value: Hash32 | None) -> int:
        return self.power_by_value.get(value, 0)

    def votes_for(self, value: Hash32 | None) -> tuple[SignedVote, ...]:
        """The votes for ``value``, ordered by validator address."""
        voters = self.by_value.get(value, {})
        return tuple(voters[a] for a in sorted(voters))


EMPTY_VOTES = VoteSet({}, {}, {}, 0)


@dataclass(frozen=True, slots=True)
class RoundMessages:
    """Everything received for one round of the current height."""

    proposals: tuple[SignedProposal, ...] = ()  # from the round's proposer, in arrival order
    prevotes: VoteSet = EMPTY_VOTES
    precommits: VoteSet = EMPTY_VOTES
    senders: frozenset[Address] = frozenset()  # validators with any message here (rule 9)
    sender_power: int = 0

    def votes(self, vote_type: int) -> VoteSet:
        return self.prevotes if vote_type == VoteType.PREVOTE else self.precommits

    def with_votes(self, vote_type: int, votes: VoteSet) -> RoundMessages:
        if vote_type == VoteType.PREVOTE:
            return replace(self, prevotes=votes)
        return replace(self, precommits=votes)

    def with_sender(self, sender: Address, power: int) -> RoundMessages:
        if sender in self.senders:
            return self
        return replace(
            self, senders=self.senders | {sender}, sender_power=self.sender_power + power
        )


EMPTY_ROUND = RoundMessages()


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What the engine needs of a proposed block: Algorithm 1's valid(v), and its time."""

    valid: bool
    time_ms: int


@dataclass(frozen=True, slots=True)
class Decided:
    round: Round
    block_hash: Hash32


_NO_HEIGHT = Height(0)
_ROUND_ZERO = Round(0)


@dataclass(frozen=True, slots=True)
class ConsensusState:
    """One validator's consensus state (consensus-notes "State per validator").

    ``validators`` is None until the first ``StartHeight``. Containers are never mutated: each
    step builds new ones, so a state can be kept, compared and replayed.
    """

    config: EngineConfig
    height: Height = _NO_HEIGHT
    round: Round = _ROUND_ZERO
    step: Step = Step.PROPOSE
    validators: ValidatorSet | None = None
    total_power: int = 0
    is_validator: bool = False  # config.address is a member of this height's set
    timeouts: Timeouts = Timeouts(0, 0, 0, 0, 0, 0, 0)
    last_block_time_ms: int = 0
    locked_value: Hash32 | None = None
    locked_round: int = -1
    valid_value: Hash32 | None = None
    valid_round: int = -1
    rounds: Mapping[int, RoundMessages] = field(default_factory=dict)
    blocks: Mapping[Hash32, BlockInfo] = field(default_factory=dict)
    prevote_timeout_rounds: frozenset[int] = frozenset()  # rule 4 done ("for the first time")
    valid_value_rounds: frozenset[int] = frozenset()  # rule 5 done
    precommit_timeout_rounds: frozenset[int] = frozenset()  # rule 7 done
    pending_build: int | None = None  # the round whose BuildBlock awaits BlockBuilt
    equivocations: frozenset[tuple[Address, int, int]] = frozenset()  # (validator, round, type)
    decision: Decided | None = None
    next_height_votes: tuple[tuple[SignedVote, Address], ...] = ()  # buffered for height + 1
    next_validators: ValidatorSet | None = None  # who votes at height + 1 (None: the same set)


def initial_state(config: EngineConfig) -> ConsensusState:
    """The state before the first ``StartHeight``: every event but ``StartHeight`` is ignored."""
    return ConsensusState(config)


# --- public functions ----------------------------------------------------------------------------


def step(state: ConsensusState, event: Event) -> tuple[ConsensusState, list[Action]]:
    """Apply one event; return the new state and the actions to perform, in order."""
    out: list[Action] = []
    if isinstance(event, StartHeight):
        new = _on_start_height(state, event, out)
    elif isinstance(event, ProposalReceived):
        new = _on_proposal(state, event, out)
    elif isinstance(event, VoteReceived):
        new = _on_vote(state, event, out)
    elif isinstance(event, TimeoutFired):
        new = _on_timeout(state, event, out)
    else:
        new = _on_block_built(state, event, out)
    return new, out


def commit_votes(state: ConsensusState) -> tuple[SignedVote, ...]:
    """The precommits for the decided block in its round so far, ordered by validator address.

    Late precommits received after ``Decide`` (while the driver waits ``timeout_commit``) are
    included; empty before a decision.
    """
    if state.decision is None:
        return ()
    messages = state.rounds.get(state.decision.round, EMPTY_ROUND)
    return messages.precommits.votes_for(state.decision.block_hash)


def block_time_from_commit(commit_votes: Iterable[SignedVote], validator_set: ValidatorSet) -> int:
    """The next block's time: the power-weighted median of the commit's precommit times.

    Only precommits for a block count (nil precommits are skipped); they must all be for the same
    block, from distinct members of ``validator_set``. The median is the smallest time ``t`` such
    that the precommits at or before ``t`` hold more than half of the counted power; with more
    than two thirds of the power in the commit and less than one third faulty, it lies between
    two honest validators' times, and every honest precommit time exceeds the parent's time
    (DESIGN §5 "Time"), so the result is strictly greater than the parent block's time.
    """
    weighted: list[tuple[int, int]] = []
    seen: set[Address] = set()
    block: Hash32 | None = None
    for signed in commit_votes:
        vote = signed.vote
        if vote.vote_type != VoteType.PRECOMMIT or vote.block_hash is None:
            continue
        if block is None:
            block = vote.block_hash
        elif vote.block_hash != block:
            raise InvalidCommit("commit precommits are for different blocks")
        if vote.validator in seen:
            raise InvalidCommit(f"two precommits of validator 0x{vote.validator.hex()}")
        seen.add(vote.validator)
        power = validator_set.power_of(vote.validator)
        if power == 0:
            raise InvalidCommit(f"0x{vote.validator.hex()} is not a validator of this commit")
        weighted.append((vote.time, power))
    if not weighted:
        raise InvalidCommit("commit has no precommit for a block")
    weighted.sort()
    total = sum(p for _, p in weighted)
    cumulative = 0
    for time, power in weighted:
        cumulative += power
        if 2 * cumulative > total:
            return time
    raise AssertionError("unreachable: the cumulative power reaches the total")


def replay_into(
    state: ConsensusState, events: Iterable[Event]
) -> tuple[ConsensusState, list[Action]]:
    """Rebuild the engine from the events of the WAL's current height (after a restart).

    ``state`` is ``initial_state(config)`` and ``events`` are the engine events the WAL recorded,
    in order, starting with the height's ``StartHeight``. Because ``step`` is pure and the events
    carry their ``now_ms``, this reproduces the state before the crash exactly: locks, valid
    values, own votes, round and step.

    Returns the new state and the actions still outstanding: actions already answered by a later
    recorded event are left out (a ``SignVote``/``SignProposal`` whose signed message came back, a
    ``ScheduleTimeout`` that fired, a ``BuildBlock`` answered by ``BlockBuilt``). The driver
    performs the rest as usual; a ``SignVote`` it persisted but never fed back is re-sent
    unchanged by ``signstate.check_sign``.
    """
    events = list(events)
    actions: list[Action] = []
    for event in events:
        state, out = step(state, event)
        actions.extend(out)
    own = state.config.address
    own_votes = {
        e.signed_vote.vote for e in events if isinstance(e, VoteReceived) and e.signer == own
    }
    own_proposals = {e.signed_proposal.proposal for e in events if isinstance(e, ProposalReceived)}
    fired = {(e.height, e.round, e.step) for e in events if isinstance(e, TimeoutFired)}
    built = {(e.height, e.round) for e in events if isinstance(e, BlockBuilt)}

    def outstanding(action: Action) -> bool:
        if isinstance(action, SignVote):
            return action.vote not in own_votes
        if isinstance(action, SignProposal):
            return action.proposal not in own_proposals
        if isinstance(action, ScheduleTimeout):
            return (action.height, action.round, int(action.step)) not in fired
        if isinstance(action, BuildBlock):
            return (action.height, action.round) not in built
        return True

    return state, [a for a in actions if outstanding(a)]


# --- event handlers ------------------------------------------------------------------------------


def _on_start_height(state: ConsensusState, ev: StartHeight, out: list[Action]) -> ConsensusState:
    carried = state.next_height_votes if ev.height == state.height + 1 else ()
    vals = ev.validator_set
    own = state.config.address
    s = ConsensusState(
        config=state.config,
        height=ev.height,
        validators=vals,
        total_power=vals.total_power,
        is_validator=own is not None and vals.is_member(own),
        timeouts=ev.timeouts,
        last_block_time_ms=ev.last_block_time_ms,
        next_validators=ev.next_validator_set,
    )
    # Buffered messages for this height join the log first; the rules see them below.
    for signed, signer in carried:
        s = _add_vote(s, vals, signed, signer, out)
    s = _start_round(s, vals, 0, out)  # Alg. 1 line 10: StartRound(0)
    return _evaluate(s, vals, ev.now_ms, out)


def _on_proposal(state: ConsensusState, ev: ProposalReceived, out: list[Action]) -> ConsensusState:
    vals = state.validators
    p = ev.signed_proposal.proposal
    if vals is None or p.height != state.height or p.block_hash != ev.block_hash:
        return state
    if p.proposer != vals.proposer(p.height, p.round):  # "from proposer(h_p, round)"
        return state
    if p.pol_round is not None and not 0 <= p.pol_round < p.round:  # Alg. 1 line 28: vr < r
        return state
    if not _may_use_round(state, p.round, p.proposer):
        return state
    messages = state.rounds.get(p.round, EMPTY_ROUND)
    if any(q.proposal == p for q in messages.proposals):
        return state  # a duplicate
    if len(messages.proposals) >= state.config.max_proposals_per_round:
        return state
    messages = replace(messages, proposals=(*messages.proposals, ev.signed_proposal))
    messages = messages.with_sender(p.proposer, vals.power_of(p.proposer))
    s = replace(state, rounds={**state.rounds, p.round: messages})
    if p.block_hash not in s.blocks:
        valid = ev.valid and ev.block_time_ms > s.last_block_time_ms
        s = _learn_block(s, vals, p.block_hash, BlockInfo(valid, ev.block_time_ms))
    return _evaluate(s, vals, ev.now_ms, out)


def _on_vote(state: ConsensusState, ev: VoteReceived, out: list[Action]) -> ConsensusState:
    vals = state.validators
    if vals is None:
        return state
    s = _add_vote(state, vals, ev.signed_vote, ev.signer, out)
    if s is state:
        return state
    return _evaluate(s, vals, ev.now_ms, out)


def _on_timeout(state: ConsensusState, ev: TimeoutFired, out: list[Action]) -> ConsensusState:
    """Rule 10: a timeout acts only if it is still current (Alg. 1 lines 57-67)."""
    vals = state.validators
    if vals is None or state.decision is not None:
        return state
    if ev.height != state.height or ev.round != state.round:
        return state
    if ev.step == Step.PROPOSE and state.step == Step.PROPOSE:
        s = _prevote(state, None, ev.now_ms, out)  # line 57-60: OnTimeoutPropose
    elif ev.step == Step.PREVOTE and state.step == Step.PREVOTE:
        s = _precommit(state, None, ev.now_ms, out)  # line 61-64: OnTimeoutPrevote
    elif ev.step == Step.PRECOMMIT:
        s = _start_round(state, vals, state.round + 1, out)  # line 65-67: OnTimeoutPrecommit
    else:
        return state
    return _evaluate(s, vals, ev.now_ms, out)


def _on_block_built(state: ConsensusState, ev: BlockBuilt, out: list[Action]) -> ConsensusState:
    """Alg. 1 lines 14-19: broadcast <PROPOSAL, h_p, round_p, getValue(), -1>."""
    own = state.config.address
    if (
        own is None
        or state.decision is not None
        or state.pending_build is None
        or state.step != Step.PROPOSE
        or ev.height != state.height
        or ev.round != state.round
        or state.pending_build != state.round
    ):
        return state
    out.append(SignProposal(Proposal(state.height, state.round, ev.block_hash, None, own)))
    return replace(state, pending_build=None)


# --- message log ---------------------------------------------------------------------------------


def _may_use_round(state: ConsensusState, round: int, sender: Address) -> bool:
    """Bound the log: each validator may hold messages in only a few rounds above round + 1."""
    if round <= state.round + 1:
        return True
    far = sum(
        1
        for r, m in state.rounds.items()
        if r > state.round + 1 and r != round and sender in m.senders
    )
    return far < state.config.max_far_rounds_per_validator


def _add_vote(
    state: ConsensusState,
    vals: ValidatorSet,
    signed: SignedVote,
    signer: Address,
    out: list[Action],
) -> ConsensusState:
    """Store a vote; returns ``state`` itself if it is ignored.

    A validator's first vote per (round, type) is its vote; one for another value is an
    equivocation: evidence once, and counted for that value only (see ``VoteSet``), up to
    ``max_conflicting_votes`` values.
    """
    vote = signed.vote
    if signer != vote.validator or vote.vote_type not in (VoteType.PREVOTE, VoteType.PRECOMMIT):
        return state
    if vote.height == state.height + 1:
        return _buffer_next_height(state, vals, signed, signer)
    power = vals.power_of(signer)
    if vote.height != state.height or power == 0:
        return state  # another height, or not a validator of this height
    if vote.vote_type == VoteType.PRECOMMIT and vote.block_hash is not None:
        block = state.blocks.get(vote.block_hash)
        if block is not None and vote.time <= block.time_ms:
            return state  # DESIGN §5: a precommit for B carries time >= B.time + 1
    if not _may_use_round(state, vote.round, signer):
        return state
    messages = state.rounds.get(vote.round, EMPTY_ROUND)
    votes = messages.votes(vote.vote_type)
    values = votes.values_of.get(signer, ())
    if vote.block_hash in values:
        return state  # the same value again (re-sent, or re-signed with another time)
    s = state
    if values:
        # Equivocation (consensus-notes): record the pair with the first vote, once.
        first = votes.first_vote(signer)
        key = (signer, int(vote.round), int(vote.vote_type))
        if first is not None and key not in s.equivocations:
            a, b = sorted((first, signed), key=lambda v: v.encode())
            out.append(RecordEvidence(DuplicateVoteEvidence(a, b)))
            s = replace(s, equivocations=s.equivocations | {key})
        if len(values) > s.config.max_conflicting_votes:
            return s
    messages = messages.with_votes(vote.vote_type, votes.with_vote(signed, power))
    messages = messages.with_sender(signer, power)
    return replace(s, rounds={**s.rounds, vote.round: messages})


def _buffer_next_height(
    state: ConsensusState, vals: ValidatorSet, signed: SignedVote, signer: Address
) -> ConsensusState:
    """Keep a bounded number of votes for height + 1 per validator of that height
    (consensus-notes: "Buffer, don't drop"); they are counted once ``StartHeight(height + 1)``
    arrives. A validator joining at height + 1 is a member of ``next_validators``, not ``vals``."""
    voters = state.next_validators if state.next_validators is not None else vals
    if not voters.is_member(signer) or (signed, signer) in state.next_height_votes:
        return state
    mine = sum(1 for _, s in state.next_height_votes if s == signer)
    if mine >= state.config.max_next_height_votes_per_validator:
        return state
    return replace(state, next_height_votes=(*state.next_height_votes, (signed, signer)))


def _learn_block(
    state: ConsensusState, vals: ValidatorSet, block_hash: Hash32, info: BlockInfo
) -> ConsensusState:
    """Record a proposed block; drop precommits for it received earlier whose time is too early."""
    rounds = dict(state.rounds)
    for r, messages in state.rounds.items():
        precommits = messages.precommits
        for signed in precommits.votes_for(block_hash):
            if signed.vote.time <= info.time_ms:
                validator = signed.vote.validator
                precommits = precommits.without(validator, block_hash, vals.power_of(validator))
        if precommits is not messages.precommits:
            rounds[r] = replace(messages, precommits=precommits)
    return replace(state, blocks={**state.blocks, block_hash: info}, rounds=rounds)


# --- transitions ---------------------------------------------------------------------------------


def _start_round(
    state: ConsensusState, vals: ValidatorSet, round: int, out: list[Action]
) -> ConsensusState:
    """Rule 1 — Alg. 1 lines 11-21: StartRound(round)."""
    h = state.height
    r = Round(round)
    s = replace(state, round=r, step=Step.PROPOSE, pending_build=None)
    own = s.config.address
    if own is not None and vals.proposer(h, r) == own:
        if s.valid_value is not None:  # lines 15-16: propose validValue with validRound
            out.append(SignProposal(Proposal(h, r, s.valid_value, s.valid_round, own)))
        else:  # line 18: getValue()
            out.append(BuildBlock(h, r))
            s = replace(s, pending_build=r)
    # Line 21 schedules timeout_propose for non-proposers; the proposer schedules it too (as
    # CometBFT does), so a proposer whose block never comes still leaves the propose step.
    out.append(ScheduleTimeout(h, r, Step.PROPOSE, s.timeouts.duration(Step.PROPOSE, r)))
    return s


def _prevote(
    state: ConsensusState, value: Hash32 | None, now_ms: int, out: list[Action]
) -> ConsensusState:
    own = state.config.address
    if state.is_validator and own is not None:
        out.append(
            SignVote(
                Vote(
                    int(VoteType.PREVOTE),
                    state.height,
                    state.round,
                    value,
                    TimestampMs(now_ms),
                    own,
                )
            )
        )
    return replace(state, step=Step.PREVOTE)


def _precommit(
    state: ConsensusState, value: Hash32 | None, now_ms: int, out: list[Action]
) -> ConsensusState:
    own = state.config.address
    if state.is_validator and own is not None:
        time = now_ms
        if value is not None:  # DESIGN §5: time = max(local clock, B.time + 1 ms)
            time = max(now_ms, state.blocks[value].time_ms + 1)
        out.append(
            SignVote(
                Vote(
                    int(VoteType.PRECOMMIT),
                    state.height,
                    state.round,
                    value,
                    TimestampMs(time),
                    own,
                )
            )
        )
    return replace(state, step=Step.PRECOMMIT)


# --- rules ---------------------------------------------------------------------------------------


def _evaluate(
    state: ConsensusState, vals: ValidatorSet, now_ms: int, out: list[Action]
) -> ConsensusState:
    """Apply rules until none applies (every rule after every event, consensus-notes).

    Each rule either changes the step or round, decides, or fires once per round, so this ends.
    """
    s = state
    while s.decision is None:
        new = (
            _rule_decide(s, out)
            or _rule_prevote_proposal(s, now_ms, out)
            or _rule_prevote_pol_proposal(s, now_ms, out)
            or _rule_lock(s, now_ms, out)
            or _rule_precommit_nil(s, now_ms, out)
            or _rule_prevote_timeout(s, out)
            or _rule_precommit_timeout(s, out)
            or _rule_round_skip(s, vals, out)
        )
        if new is None:
            break
        s = new
    return s


def _quorum(state: ConsensusState, power: int) -> bool:
    return 3 * power > 2 * state.total_power  # 2f+1


def _one_third(state: ConsensusState, power: int) -> bool:
    return 3 * power > state.total_power  # f+1


def _current(state: ConsensusState) -> RoundMessages:
    return state.rounds.get(state.round, EMPTY_ROUND)


def _rule_prevote_proposal(
    s: ConsensusState, now_ms: int, out: list[Action]
) -> ConsensusState | None:
    """Rule 2 — Alg. 1 lines 22-27: <PROPOSAL, h, round, v, -1> while step = propose."""
    if s.step != Step.PROPOSE:
        return None
    for signed in _current(s).proposals:
        p = signed.proposal
        if p.pol_round is not None:
            continue
        v = p.block_hash
        if s.blocks[v].valid and (s.locked_round == -1 or s.locked_value == v):
            return _prevote(s, v, now_ms, out)
        return _prevote(s, None, now_ms, out)
    return None


def _rule_prevote_pol_proposal(
    s: ConsensusState, now_ms: int, out: list[Action]
) -> ConsensusState | None:
    """Rule 3 — Alg. 1 lines 28-33: <PROPOSAL, h, round, v, vr> and 2f+1 <PREVOTE, h, vr, v>,
    vr < round, while step = propose."""
    if s.step != Step.PROPOSE:
        return None
    for signed in _current(s).proposals:
        p = signed.proposal
        vr = p.pol_round
        if vr is None or vr >= s.round:
            continue
        v = p.block_hash
        if not _quorum(s, s.rounds.get(vr, EMPTY_ROUND).prevotes.power_for(v)):
            continue
        if s.blocks[v].valid and (s.locked_round <= vr or s.locked_value == v):
            return _prevote(s, v, now_ms, out)
        return _prevote(s, None, now_ms, out)
    return None


def _rule_lock(s: ConsensusState, now_ms: int, out: list[Action]) -> ConsensusState | None:
    """Rule 5 — Alg. 1 lines 36-43: <PROPOSAL, h, round, v, *> and 2f+1 <PREVOTE, h, round, v>,
    valid(v), step ≥ prevote, for the first time."""
    if s.step == Step.PROPOSE or s.round in s.valid_value_rounds:
        return None
    messages = _current(s)
    for signed in messages.proposals:
        v = signed.proposal.block_hash
        if not s.blocks[v].valid or not _quorum(s, messages.prevotes.power_for(v)):
            continue
        new = replace(
            s,
            valid_value=v,  # lines 42-43
            valid_round=s.round,
            valid_value_rounds=s.valid_value_rounds | {s.round},
        )
        if s.step == Step.PREVOTE:  # lines 37-41: lock and precommit v
            new = replace(new, locked_value=v, locked_round=s.round)
            new = _precommit(new, v, now_ms, out)
        return new
    return None


def _rule_precommit_nil(s: ConsensusState, now_ms: int, out: list[Action]) -> ConsensusState | None:
    """Rule 6 — Alg. 1 lines 44-46: 2f+1 <PREVOTE, h, round, nil> while step = prevote."""
    if s.step != Step.PREVOTE or not _quorum(s, _current(s).prevotes.power_for(None)):
        return None
    return _precommit(s, None, now_ms, out)


def _rule_prevote_timeout(s: ConsensusState, out: list[Action]) -> ConsensusState | None:
    """Rule 4 — Alg. 1 lines 34-35: 2f+1 <PREVOTE, h, round, *> while step = prevote, first time."""
    if (
        s.step != Step.PREVOTE
        or s.round in s.prevote_timeout_rounds
        or not _quorum(s, _current(s).prevotes.power)
    ):
        return None
    out.append(
        ScheduleTimeout(s.height, s.round, Step.PREVOTE, s.timeouts.duration(Step.PREVOTE, s.round))
    )
    return replace(s, prevote_timeout_rounds=s.prevote_timeout_rounds | {s.round})


def _rule_precommit_timeout(s: ConsensusState, out: list[Action]) -> ConsensusState | None:
    """Rule 7 — Alg. 1 lines 47-48: 2f+1 <PRECOMMIT, h, round, *>, for the first time."""
    if s.round in s.precommit_timeout_rounds or not _quorum(s, _current(s).precommits.power):
        return None
    duration = s.timeouts.duration(Step.PRECOMMIT, s.round)
    out.append(ScheduleTimeout(s.height, s.round, Step.PRECOMMIT, duration))
    return replace(s, precommit_timeout_rounds=s.precommit_timeout_rounds | {s.round})


def _rule_decide(s: ConsensusState, out: list[Action]) -> ConsensusState | None:
    """Rule 8 — Alg. 1 lines 49-54: <PROPOSAL, h, r, v, *> and 2f+1 <PRECOMMIT, h, r, id(v)> for
    ANY round r, valid(v), no decision yet → decide v.

    The block v may be known from the proposal of any round of this height: a value is its hash,
    and the 2f+1 precommits are what finalize it (CometBFT commits any block matching the
    commit's hash the same way), so a validator that saw v only when it was re-proposed still
    decides.
    """
    for r in sorted(s.rounds):
        precommits = s.rounds[r].precommits
        for v, power in precommits.power_by_value.items():
            if v is None or not _quorum(s, power):
                continue
            block = s.blocks.get(v)
            if block is None or not block.valid:
                continue
            out.append(Decide(s.height, Round(r), v, precommits.votes_for(v)))
            return replace(s, decision=Decided(Round(r), v))
    return None


def _rule_round_skip(
    s: ConsensusState, vals: ValidatorSet, out: list[Action]
) -> ConsensusState | None:
    """Rule 9 — Alg. 1 lines 55-56: f+1 <*, h, r, *, *> with r > round → StartRound(r)."""
    ahead = [r for r, m in s.rounds.items() if r > s.round and _one_third(s, m.sender_power)]
    if not ahead:
        return None
    return _start_round(s, vals, max(ahead), out)
