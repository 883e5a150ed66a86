"""Scripted tests of the pure consensus engine: one test per rule of consensus-notes.md.

Each test drives ``engine.step`` with a list of events and asserts the exact actions. Four
validators (f = 1) unless stated; "me" is ``KEYS[0]``. The proposer of (height 1, round r) is
``KEYS[(1 + r) % 4]``: rounds 0, 1, 2, 3 → KEYS[1], KEYS[2], KEYS[3], KEYS[0] (me).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.consensus.blocks import (
    DuplicateVoteEvidence,
    Proposal,
    SignedVote,
    Vote,
    VoteType,
    sign_vote,
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
    Step,
    TimeoutFired,
    Timeouts,
    VoteReceived,
    block_time_from_commit,
    commit_votes,
    initial_state,
    step,
)
from node.consensus.params import VotableParams
from node.consensus.validators import InvalidValidatorSet, Validator, ValidatorSet
from node.crypto import PrivateKey
from node.errors import InvalidCommit
from node.types import Hash32, Height, Round, TimestampMs
from tests.consensus.sim import (
    CHAIN_ID,
    TIMEOUTS,
    make_keys,
    signed_proposal,
    signed_vote,
    validator_set,
)

KEYS = make_keys(4)
VALS = validator_set(KEYS)
ME = KEYS[0]
LAST_TIME = 999_000  # the parent block's time
BLOCK_TIME = 1_000_000  # the proposed blocks' time
NOW = 1_000_500
A = Hash32(b"\xaa" * 32)
B = Hash32(b"\xbb" * 32)
C = Hash32(b"\xcc" * 32)

PREVOTE = int(VoteType.PREVOTE)
PRECOMMIT = int(VoteType.PRECOMMIT)


def proposer_key(height: int, round: int, keys: list[PrivateKey] = KEYS) -> PrivateKey:
    address = validator_set(keys).proposer(height, round)
    return next(k for k in keys if k.address == address)


def start(height: int = 1, key: PrivateKey | None = ME) -> tuple[ConsensusState, list[Action]]:
    state = initial_state(EngineConfig(None if key is None else key.address))
    return step(state, StartHeight(Height(height), VALS, LAST_TIME, NOW, TIMEOUTS))


def proposal(
    round: int,
    value: Hash32,
    pol: int | None = None,
    *,
    valid: bool = True,
    height: int = 1,
    block_time: int = BLOCK_TIME,
    key: PrivateKey | None = None,
) -> ProposalReceived:
    signer = key or proposer_key(height, round)
    sp = signed_proposal(signer, height, round, value, pol)
    return ProposalReceived(sp, value, valid, block_time, NOW)


def vote(
    i: int,
    vote_type: int,
    round: int,
    value: Hash32 | None,
    *,
    height: int = 1,
    time: int = BLOCK_TIME + 1,
) -> VoteReceived:
    return VoteReceived(
        signed_vote(KEYS[i], vote_type, height, round, value, time), KEYS[i].address, NOW
    )


def run(state: ConsensusState, *events: Event) -> tuple[ConsensusState, list[Action]]:
    actions: list[Action] = []
    for event in events:
        state, out = step(state, event)
        actions.extend(out)
    return state, actions


def my_vote(vote_type: int, round: int, value: Hash32 | None, time: int = NOW) -> SignVote:
    return SignVote(Vote(vote_type, Height(1), Round(round), value, TimestampMs(time), ME.address))


def timeout(step_: Step, round: int, height: int = 1) -> ScheduleTimeout:
    return ScheduleTimeout(Height(height), Round(round), step_, TIMEOUTS.duration(step_, round))


def fired(step_: Step, round: int, height: int = 1) -> TimeoutFired:
    return TimeoutFired(Height(height), Round(round), int(step_), NOW)


def votes(actions: list[Action]) -> list[Vote]:
    return [a.vote for a in actions if isinstance(a, SignVote)]


def lock_on(value: Hash32) -> tuple[ConsensusState, list[Action]]:
    """Me locked on ``value`` in round 0 (proposal + 2f+1 prevotes), precommitted it."""
    return run(start()[0], proposal(0, value), *(vote(i, PREVOTE, 0, value) for i in (1, 2, 3)))


# --- validator set -------------------------------------------------------------------------------


def test_validator_set_is_canonical() -> None:
    a, b = sorted(k.address for k in KEYS[:2])
    with pytest.raises(InvalidValidatorSet):
        ValidatorSet((Validator(b, 1), Validator(a, 1)))
    with pytest.raises(InvalidValidatorSet):
        ValidatorSet((Validator(a, 1), Validator(a, 1)))
    with pytest.raises(InvalidValidatorSet):
        ValidatorSet((Validator(a, 0),))
    with pytest.raises(InvalidValidatorSet):
        ValidatorSet(())
    assert ValidatorSet.decode(VALS.encode()) == VALS
    assert VALS.hash() == ValidatorSet.of([(k.address, 1) for k in reversed(KEYS)]).hash()


def test_validator_set_decode_rejects_unsorted() -> None:
    a, b = sorted(k.address for k in KEYS[:2])
    good = ValidatorSet((Validator(a, 1), Validator(b, 1))).encode()
    swapped = good.replace(a, b"\x00" * 20).replace(b, a).replace(b"\x00" * 20, b)
    with pytest.raises(InvalidValidatorSet):
        ValidatorSet.decode(swapped)


def test_validator_set_power_quorum_and_proposer() -> None:
    vals = ValidatorSet.of({KEYS[0].address: 1, KEYS[1].address: 2, KEYS[2].address: 3})
    assert vals.total_power == 6
    assert vals.power_of(KEYS[1].address) == 2
    assert vals.power_of(KEYS[3].address) == 0
    assert not vals.is_member(KEYS[3].address)
    assert vals.has_quorum(5) and not vals.has_quorum(4)  # 3p > 2*6
    assert vals.has_one_third(3) and not vals.has_one_third(2)  # 3p > 6
    order = vals.addresses
    assert [vals.proposer(7, r) for r in range(4)] == [order[(7 + r) % 3] for r in range(4)]
    assert VALS.has_quorum(3) and not VALS.has_quorum(2)
    assert VALS.has_one_third(2) and not VALS.has_one_third(1)


# --- one validator -------------------------------------------------------------------------------


def test_single_validator_decides_alone_at_every_height() -> None:
    key = make_keys(1)[0]
    vals = validator_set([key])
    me = key.address
    state = initial_state(EngineConfig(me))
    last_time = LAST_TIME
    for h in (1, 2, 3):
        height, r0 = Height(h), Round(0)
        block = Hash32(bytes([h]) * 32)
        block_time = last_time + 1
        now = last_time + 1_000
        state, actions = step(state, StartHeight(height, vals, last_time, now, TIMEOUTS))
        assert actions == [
            BuildBlock(height, r0),
            ScheduleTimeout(height, r0, Step.PROPOSE, TIMEOUTS.propose_ms),
        ]
        state, actions = step(state, BlockBuilt(height, r0, block, block_time, now))
        assert actions == [SignProposal(Proposal(height, r0, block, None, me))]
        sp = signed_proposal(key, h, 0, block)
        state, actions = step(state, ProposalReceived(sp, block, True, block_time, now))
        prevote = Vote(PREVOTE, height, r0, block, TimestampMs(now), me)
        assert actions == [SignVote(prevote)]
        state, actions = step(state, VoteReceived(sign_vote(key, CHAIN_ID, prevote), me, now))
        precommit = Vote(PRECOMMIT, height, r0, block, TimestampMs(now), me)
        assert actions == [SignVote(precommit)]
        signed = sign_vote(key, CHAIN_ID, precommit)
        state, actions = step(state, VoteReceived(signed, me, now))
        assert actions == [Decide(height, r0, block, (signed,))]
        assert commit_votes(state) == (signed,)
        assert state.locked_value == block and state.locked_round == 0
        last_time = block_time_from_commit(commit_votes(state), vals)
        assert last_time == now > block_time


# --- rules 1-3: proposals and prevotes -----------------------------------------------------------


def test_start_round_schedules_propose_timeout_for_non_proposer() -> None:
    state, actions = start()
    assert actions == [timeout(Step.PROPOSE, 0)]
    assert (state.height, state.round, state.step) == (1, 0, Step.PROPOSE)


def test_proposer_builds_a_block_and_proposes_it() -> None:
    state, actions = start(key=KEYS[1])
    assert actions == [BuildBlock(Height(1), Round(0)), timeout(Step.PROPOSE, 0)]
    state, actions = step(state, BlockBuilt(Height(1), Round(0), A, BLOCK_TIME, NOW))
    assert actions == [SignProposal(Proposal(Height(1), Round(0), A, None, KEYS[1].address))]
    # a second answer, or one for another round, is ignored
    assert step(state, BlockBuilt(Height(1), Round(0), B, BLOCK_TIME, NOW))[1] == []


def test_stale_block_built_is_ignored() -> None:
    state, _ = start(key=KEYS[1])
    state, _ = run(state, fired(Step.PROPOSE, 0))  # gave up on its own block: prevoted nil
    assert step(state, BlockBuilt(Height(1), Round(0), A, BLOCK_TIME, NOW))[1] == []


def test_prevote_for_a_valid_proposal() -> None:
    state, actions = run(start()[0], proposal(0, A))
    assert actions == [my_vote(PREVOTE, 0, A)]
    assert state.step == Step.PREVOTE


def test_prevote_nil_for_an_invalid_proposal() -> None:
    _, actions = run(start()[0], proposal(0, A, valid=False))
    assert actions == [my_vote(PREVOTE, 0, None)]


def test_prevote_nil_for_a_block_not_after_its_parent() -> None:
    _, actions = run(start()[0], proposal(0, A, block_time=LAST_TIME))
    assert actions == [my_vote(PREVOTE, 0, None)]


def test_proposal_from_the_wrong_proposer_is_ignored() -> None:
    _, actions = run(start()[0], proposal(0, A, key=KEYS[2]))
    assert actions == []


def test_proposal_with_pol_round_not_below_its_round_is_ignored() -> None:
    state, _ = run(start()[0], *(vote(i, PRECOMMIT, 0, None) for i in (1, 2, 3)))
    state, _ = run(state, fired(Step.PRECOMMIT, 0))
    _, actions = run(state, proposal(1, A, pol=1))
    assert actions == []


def test_timeout_propose_prevotes_nil() -> None:
    state, actions = run(start()[0], fired(Step.PROPOSE, 0))
    assert actions == [my_vote(PREVOTE, 0, None)]
    # stale: a second firing, another round, another height
    for event in (fired(Step.PROPOSE, 0), fired(Step.PROPOSE, 1), fired(Step.PROPOSE, 0, 2)):
        assert step(state, event)[1] == []


def test_only_the_first_proposal_of_a_round_gets_the_prevote() -> None:
    state, actions = run(start()[0], proposal(0, A), proposal(0, B))
    assert actions == [my_vote(PREVOTE, 0, A)]
    assert len(state.rounds[0].proposals) == 2


# --- rules 4-7: quorums in a round ----------------------------------------------------------------


def test_lock_and_precommit_on_a_prevote_quorum() -> None:
    state, actions = lock_on(A)
    assert actions == [my_vote(PREVOTE, 0, A), my_vote(PRECOMMIT, 0, A)]
    assert (state.locked_value, state.locked_round) == (A, 0)
    assert (state.valid_value, state.valid_round) == (A, 0)
    assert state.step == Step.PRECOMMIT


def test_no_lock_without_the_proposal() -> None:
    state, _ = run(start()[0], fired(Step.PROPOSE, 0))
    state, actions = run(state, *(vote(i, PREVOTE, 0, A) for i in (1, 2, 3)))
    assert actions == [timeout(Step.PREVOTE, 0)]  # 2f+1 for anything, but no proposal for A
    assert state.locked_round == -1
    state, actions = run(state, proposal(0, A))  # the proposal arrives late: rule 5 now
    assert actions == [my_vote(PRECOMMIT, 0, A)]
    assert (state.locked_value, state.locked_round) == (A, 0)


def test_valid_value_updates_after_precommitting_nil() -> None:
    """Rule 5 with step = precommit: valid value and round change, the lock does not."""
    state, _ = run(start()[0], fired(Step.PROPOSE, 0))
    state, actions = run(
        state, vote(0, PREVOTE, 0, None), vote(1, PREVOTE, 0, A), vote(2, PREVOTE, 0, A)
    )
    assert actions == [timeout(Step.PREVOTE, 0)]
    state, actions = run(state, fired(Step.PREVOTE, 0))
    assert actions == [my_vote(PRECOMMIT, 0, None)]
    state, actions = run(state, vote(3, PREVOTE, 0, A), proposal(0, A))
    assert actions == []
    assert (state.valid_value, state.valid_round) == (A, 0)
    assert (state.locked_value, state.locked_round) == (None, -1)


def test_prevote_timeout_then_precommit_nil() -> None:
    state, _ = run(start()[0], proposal(0, A))
    state, actions = run(
        state, vote(1, PREVOTE, 0, A), vote(2, PREVOTE, 0, None), vote(3, PREVOTE, 0, B)
    )
    assert actions == [timeout(Step.PREVOTE, 0)]
    state, actions = run(state, vote(0, PREVOTE, 0, A))  # my own prevote comes back
    assert actions == []  # scheduled once only
    state, actions = run(state, fired(Step.PREVOTE, 0))
    assert actions == [my_vote(PRECOMMIT, 0, None)]
    assert step(state, fired(Step.PREVOTE, 0))[1] == []


def test_precommit_nil_on_a_nil_prevote_quorum() -> None:
    state, _ = run(start()[0], proposal(0, A))
    _, actions = run(state, *(vote(i, PREVOTE, 0, None) for i in (1, 2, 3)))
    assert actions == [my_vote(PRECOMMIT, 0, None)]


def test_precommit_timeout_starts_the_next_round_with_longer_timeouts() -> None:
    state, _ = run(start()[0], fired(Step.PROPOSE, 0))
    state, actions = run(
        state,
        vote(1, PRECOMMIT, 0, None),
        vote(2, PRECOMMIT, 0, A),
        vote(3, PRECOMMIT, 0, None),
    )
    assert actions == [timeout(Step.PRECOMMIT, 0)]
    state, actions = run(state, fired(Step.PRECOMMIT, 0))
    assert actions == [timeout(Step.PROPOSE, 1)]
    assert (state.round, state.step) == (1, Step.PROPOSE)
    assert TIMEOUTS.duration(Step.PROPOSE, 1) == TIMEOUTS.propose_ms + TIMEOUTS.propose_delta_ms
    assert TIMEOUTS.duration(Step.PREVOTE, 3) == TIMEOUTS.prevote_ms + 3 * TIMEOUTS.prevote_delta_ms
    assert step(state, fired(Step.PRECOMMIT, 0))[1] == []  # stale


def test_timeouts_from_votable_params() -> None:
    params = VotableParams(3000, 500, 1000, 250, 1000, 250, 5000, 1 << 20, 1000, 1 << 16, ())
    t = Timeouts.from_params(params)
    assert t == Timeouts(3000, 500, 1000, 250, 1000, 250, 5000)
    assert t.duration(Step.PRECOMMIT, 2) == 1500


# --- locking ---------------------------------------------------------------------------------------


def _to_round(state: ConsensusState, round: int) -> ConsensusState:
    """Advance by precommit timeouts (2f+1 nil precommits in each round) to ``round``."""
    while state.round < round:
        r = state.round
        state, _ = run(state, *(vote(i, PRECOMMIT, r, None) for i in (1, 2, 3)))
        state, _ = run(state, fired(Step.PRECOMMIT, r))
    return state


def test_locked_validator_prevotes_nil_for_another_value_without_pol() -> None:
    state, _ = lock_on(A)
    state = _to_round(state, 1)
    _, actions = run(state, proposal(1, B))
    assert actions == [my_vote(PREVOTE, 1, None)]


def test_locked_validator_prevotes_its_locked_value() -> None:
    state, _ = lock_on(A)
    state = _to_round(state, 1)
    _, actions = run(state, proposal(1, A))
    assert actions == [my_vote(PREVOTE, 1, A)]


def test_relock_on_a_newer_pol() -> None:
    state, _ = lock_on(A)
    state = _to_round(state, 1)
    # round 1: B gets a POL (2f+1 prevotes) that I see only now
    state, _ = run(state, fired(Step.PROPOSE, 1))
    state, _ = run(state, *(vote(i, PREVOTE, 1, B) for i in (1, 2, 3)))
    state = _to_round(state, 2)
    state, actions = run(state, proposal(2, B, pol=1))  # rule 3: locked_round 0 <= vr 1
    assert actions == [my_vote(PREVOTE, 2, B)]
    state, actions = run(state, *(vote(i, PREVOTE, 2, B) for i in (1, 2, 3)))
    assert actions == [my_vote(PRECOMMIT, 2, B)]
    assert (state.locked_value, state.locked_round) == (B, 2)


def test_pol_proposal_waits_for_its_pol() -> None:
    state, _ = lock_on(A)
    state = _to_round(state, 2)
    state, actions = run(state, proposal(2, B, pol=1))
    assert actions == []  # no 2f+1 prevotes for B in round 1 yet: rule 3 does not apply
    state, actions = run(state, *(vote(i, PREVOTE, 1, B) for i in (1, 2, 3)))
    assert actions == [my_vote(PREVOTE, 2, B)]


def test_pol_older_than_the_lock_prevotes_nil() -> None:
    state, _ = start()
    # round 0: B has a POL, which I miss at the time (I prevote nil on timeout)
    state, _ = run(state, fired(Step.PROPOSE, 0))
    state, _ = run(state, *(vote(i, PREVOTE, 0, B) for i in (1, 2, 3)))
    state = _to_round(state, 1)
    state, _ = run(state, proposal(1, A), *(vote(i, PREVOTE, 1, A) for i in (1, 2, 3)))
    assert (state.locked_value, state.locked_round) == (A, 1)
    state = _to_round(state, 2)
    _, actions = run(state, proposal(2, B, pol=0))  # POL round 0 < locked round 1
    assert actions == [my_vote(PREVOTE, 2, None)]


def test_invalid_pol_proposal_prevotes_nil() -> None:
    state, _ = start()
    state, _ = run(state, fired(Step.PROPOSE, 0))
    state, _ = run(state, *(vote(i, PREVOTE, 0, B) for i in (1, 2, 3)))
    state = _to_round(state, 1)
    _, actions = run(state, proposal(1, B, pol=0, valid=False))
    assert actions == [my_vote(PREVOTE, 1, None)]


def test_proposer_reproposes_its_valid_value_with_its_pol_round() -> None:
    state, _ = lock_on(A)
    state, _ = run(state, *(vote(i, PRECOMMIT, 0, None) for i in (1, 2, 3)))
    state, _ = run(state, fired(Step.PRECOMMIT, 0))
    state, _ = run(state, fired(Step.PROPOSE, 1), *(vote(i, PREVOTE, 1, None) for i in (1, 2, 3)))
    state, _ = run(state, *(vote(i, PRECOMMIT, 1, None) for i in (1, 2, 3)))
    state, _ = run(state, fired(Step.PRECOMMIT, 1))
    state, _ = run(state, *(vote(i, PRECOMMIT, 2, None) for i in (1, 2, 3)))
    state, actions = run(state, fired(Step.PRECOMMIT, 2))
    assert state.round == 3  # my round to propose
    assert actions == [
        SignProposal(Proposal(Height(1), Round(3), A, 0, ME.address)),
        timeout(Step.PROPOSE, 3),
    ]


# --- rule 8: decide ----------------------------------------------------------------------------


def test_decide_on_a_precommit_quorum() -> None:
    state, _ = lock_on(A)
    state, actions = run(state, vote(1, PRECOMMIT, 0, A), vote(2, PRECOMMIT, 0, A))
    assert actions == []
    mine = vote(0, PRECOMMIT, 0, A)
    state, actions = run(state, mine)
    expected = tuple(
        sorted(
            (v.signed_vote for v in (vote(1, PRECOMMIT, 0, A), vote(2, PRECOMMIT, 0, A), mine)),
            key=lambda s: s.vote.validator,
        )
    )
    assert actions == [Decide(Height(1), Round(0), A, expected)]
    assert state.decision is not None and state.decision.block_hash == A
    # after the decision the engine waits for StartHeight: timeouts and proposals do nothing
    assert step(state, fired(Step.PRECOMMIT, 0))[1] == []
    assert step(state, proposal(1, B))[1] == []


def test_decide_from_an_earlier_round() -> None:
    state, _ = start()
    state, _ = run(state, vote(1, PREVOTE, 2, None), vote(2, PREVOTE, 2, None))  # rule 9
    assert state.round == 2
    state, actions = run(state, proposal(0, A), *(vote(i, PRECOMMIT, 0, A) for i in (1, 2)))
    assert not any(isinstance(a, Decide) for a in actions)
    state, actions = run(state, vote(3, PRECOMMIT, 0, A, time=BLOCK_TIME + 5))
    assert isinstance(actions[-1], Decide)
    assert (actions[-1].round, actions[-1].block_hash) == (0, A)
    assert state.round == 2


def test_decide_with_the_block_known_from_another_round() -> None:
    state, _ = run(start()[0], proposal(1, A), vote(1, PREVOTE, 1, A))  # A proposed in round 1
    assert state.round == 1
    _, actions = run(state, *(vote(i, PRECOMMIT, 0, A) for i in (1, 2, 3)))  # committed in 0
    assert next(a for a in actions if isinstance(a, Decide)).round == 0


def test_no_decision_for_an_invalid_block() -> None:
    state, _ = start()
    state, _ = run(state, proposal(0, A, valid=False))
    _, actions = run(state, *(vote(i, PRECOMMIT, 0, A) for i in (1, 2, 3)))
    assert not any(isinstance(a, Decide) for a in actions)


def test_late_precommits_join_the_commit_until_the_next_height() -> None:
    state, _ = lock_on(A)
    state, _ = run(state, *(vote(i, PRECOMMIT, 0, A) for i in (0, 1, 2)))
    assert len(commit_votes(state)) == 3
    state, _ = run(state, vote(3, PRECOMMIT, 0, A, time=BLOCK_TIME + 7))
    got = commit_votes(state)
    assert [v.vote.validator for v in got] == sorted(k.address for k in KEYS)
    state, _ = step(state, StartHeight(Height(2), VALS, BLOCK_TIME, NOW + 10, TIMEOUTS))
    assert commit_votes(state) == ()


# --- rule 9: round skip --------------------------------------------------------------------------


def test_round_skip_on_f_plus_one_messages_of_a_higher_round() -> None:
    state, _ = run(start()[0], vote(1, PREVOTE, 3, None))
    assert state.round == 0  # f messages are not enough
    state, actions = run(state, vote(2, PRECOMMIT, 3, None))
    assert state.round == 3
    # round 3 is mine to propose
    assert actions == [BuildBlock(Height(1), Round(3)), timeout(Step.PROPOSE, 3)]


def test_round_skip_counts_a_proposal_as_a_message() -> None:
    state, actions = run(start()[0], proposal(2, A), vote(1, PREVOTE, 2, A))
    assert state.round == 2
    assert actions == [timeout(Step.PROPOSE, 2), my_vote(PREVOTE, 2, A)]


# --- buffering -----------------------------------------------------------------------------------


def test_messages_for_a_later_round_are_kept_and_counted_there() -> None:
    state, _ = start()
    # one sender (KEYS[2], proposer of round 1) in round 1: kept, no round skip
    state, actions = run(state, proposal(1, A), vote(2, PREVOTE, 1, A))
    assert state.round == 0 and actions == []
    state = _to_round(state, 1)
    assert state.step == Step.PREVOTE  # the kept proposal got my prevote on entering round 1
    state, actions = run(state, vote(0, PREVOTE, 1, A), vote(3, PREVOTE, 1, A))
    assert actions == [my_vote(PRECOMMIT, 1, A)]  # the kept prevote of KEYS[2] counted


def test_entering_a_round_acts_on_its_buffered_proposal() -> None:
    state, _ = run(start()[0], fired(Step.PROPOSE, 0))
    state, _ = run(state, proposal(1, A))
    state, _ = run(state, *(vote(i, PRECOMMIT, 0, None) for i in (1, 2, 3)))
    state, actions = run(state, fired(Step.PRECOMMIT, 0))
    assert actions == [timeout(Step.PROPOSE, 1), my_vote(PREVOTE, 1, A)]


def test_next_height_votes_are_buffered_and_counted_after_start_height() -> None:
    state, _ = lock_on(A)
    state, _ = run(state, *(vote(i, PRECOMMIT, 0, A) for i in (0, 1, 2)))
    assert state.decision is not None
    early = [vote(i, PREVOTE, 0, None, height=2) for i in (1, 2, 3)]
    state, actions = run(state, *early)
    assert actions == []
    assert len(state.next_height_votes) == 3
    state, actions = step(state, StartHeight(Height(2), VALS, BLOCK_TIME, NOW, TIMEOUTS))
    # proposer of (2, 0) is KEYS[2]; the buffered nil prevotes count at once
    assert state.height == 2
    assert state.rounds[0].prevotes.power_for(None) == 3
    state, actions = run(state, fired(Step.PROPOSE, 0, height=2))
    assert votes(actions) == [
        Vote(PREVOTE, Height(2), Round(0), None, TimestampMs(NOW), ME.address),
        Vote(PRECOMMIT, Height(2), Round(0), None, TimestampMs(NOW), ME.address),
    ]


def test_next_height_votes_of_a_joining_validator_are_buffered() -> None:
    # Set changes apply at h+2: a validator joining at height 2 votes there before the others
    # have started it. Its early votes are kept when StartHeight names it in the next set.
    newcomer = PrivateKey(bytes([99]) * 32)
    with_newcomer = ValidatorSet.of({**{k.address: 1 for k in KEYS}, newcomer.address: 1})
    state = initial_state(EngineConfig(ME.address))
    state, _ = step(
        state, StartHeight(Height(1), VALS, LAST_TIME, NOW, TIMEOUTS, with_newcomer)
    )
    early = VoteReceived(
        signed_vote(newcomer, PREVOTE, 2, 0, None, BLOCK_TIME + 1), newcomer.address, NOW
    )
    state, _ = step(state, early)
    assert [s for _, s in state.next_height_votes] == [newcomer.address]
    # Without a next set (or with one that lacks it) such a vote is dropped.
    plain, _ = start()
    plain, _ = step(plain, early)
    assert plain.next_height_votes == ()
    # Once height 2 starts with the new set, the buffered vote counts.
    state, _ = step(state, StartHeight(Height(2), with_newcomer, BLOCK_TIME, NOW, TIMEOUTS))
    assert state.rounds[0].prevotes.power_for(None) == 1


def test_next_height_buffer_is_bounded_per_validator() -> None:
    state, _ = start()
    config = state.config
    for r in range(config.max_next_height_votes_per_validator + 5):
        state, _ = run(state, vote(1, PREVOTE, r, None, height=2))
    assert len(state.next_height_votes) == config.max_next_height_votes_per_validator


def test_far_future_rounds_are_bounded_per_validator() -> None:
    state, _ = start()
    limit = state.config.max_far_rounds_per_validator
    state, _ = run(state, *(vote(1, PREVOTE, 10 + r, None) for r in range(limit + 3)))
    assert sorted(state.rounds) == [10 + r for r in range(limit)]
    state, _ = run(state, vote(1, PREVOTE, 1, None))  # round + 1 is always accepted
    assert 1 in state.rounds


# --- votes: who, which height, equivocation, time ---------------------------------------------------


def test_votes_from_non_validators_other_heights_or_wrong_signer_are_ignored() -> None:
    state, _ = start()
    outsider = PrivateKey(b"\x77" * 32)
    bad = [
        VoteReceived(signed_vote(outsider, PREVOTE, 1, 0, None), outsider.address, NOW),
        vote(1, PREVOTE, 0, None, height=5),
        vote(1, PREVOTE, 0, None, height=0),
        VoteReceived(vote(1, PREVOTE, 0, None).signed_vote, KEYS[2].address, NOW),
    ]
    new, actions = run(state, *bad)
    assert actions == [] and new.rounds == state.rounds
    unknown = SignedVote(
        Vote(9, Height(1), Round(0), None, TimestampMs(NOW), KEYS[1].address),
        vote(1, PREVOTE, 0, None).signed_vote.signature,
    )
    assert step(state, VoteReceived(unknown, KEYS[1].address, NOW))[0] is state


def test_duplicate_votes_are_counted_once() -> None:
    state, _ = run(start()[0], proposal(0, A))
    state, actions = run(state, *[vote(1, PREVOTE, 0, A)] * 5, vote(2, PREVOTE, 0, A))
    assert actions == []
    assert state.rounds[0].prevotes.power_for(A) == 2


def test_equivocation_becomes_evidence_and_is_not_double_counted() -> None:
    state, _ = run(start()[0], proposal(0, A))
    first = vote(1, PREVOTE, 0, A)
    second = vote(1, PREVOTE, 0, None)
    state, actions = run(state, first, second, vote(1, PREVOTE, 0, B))
    pair = sorted((first.signed_vote, second.signed_vote), key=lambda v: v.encode())
    assert actions == [RecordEvidence(DuplicateVoteEvidence(pair[0], pair[1]))]  # once
    prevotes = state.rounds[0].prevotes
    assert prevotes.power == 1  # one validator, whatever it sent
    assert prevotes.power_for(A) == 1 and prevotes.power_for(None) == 1
    # with my own prevote that is 2 validators: no "2f+1 for anything" yet
    state, actions = run(state, vote(0, PREVOTE, 0, A))
    assert actions == []
    state, actions = run(state, vote(2, PREVOTE, 0, A))
    assert actions == [my_vote(PRECOMMIT, 0, A)]  # A: KEYS[0], [1], [2]


def test_an_equivocator_is_counted_at_most_for_a_few_values() -> None:
    state, _ = start()
    values = [Hash32(bytes([i]) * 32) for i in range(10)]
    state, actions = run(state, *(vote(1, PREVOTE, 0, v) for v in values))
    assert len(actions) == 1  # evidence once
    assert len(state.rounds[0].prevotes.values_of[KEYS[1].address]) == (
        1 + state.config.max_conflicting_votes
    )


def test_my_precommit_time_is_after_the_block_time() -> None:
    late_block = NOW + 5_000  # a block time ahead of my clock
    state, _ = start()
    state, actions = run(
        state,
        proposal(0, A, block_time=late_block),
        *(vote(i, PREVOTE, 0, A) for i in (1, 2, 3)),
    )
    assert actions == [my_vote(PREVOTE, 0, A), my_vote(PRECOMMIT, 0, A, time=late_block + 1)]


def test_precommit_not_after_the_block_time_is_rejected() -> None:
    state, _ = run(start()[0], proposal(0, A))
    state, _ = run(state, vote(1, PRECOMMIT, 0, A, time=BLOCK_TIME))  # must be > block time
    assert state.rounds[0].precommits.power_for(A) == 0
    state, _ = run(state, vote(1, PRECOMMIT, 0, A, time=BLOCK_TIME + 1))
    assert state.rounds[0].precommits.power_for(A) == 1


def test_early_precommits_seen_before_the_block_are_dropped_when_it_arrives() -> None:
    state, _ = run(start()[0], fired(Step.PROPOSE, 0))
    state, _ = run(
        state,
        vote(1, PRECOMMIT, 0, A, time=BLOCK_TIME - 10),
        vote(2, PRECOMMIT, 0, A),
        vote(3, PRECOMMIT, 0, A),
    )
    assert state.rounds[0].precommits.power_for(A) == 3
    state, actions = run(state, proposal(0, A))
    assert state.rounds[0].precommits.power_for(A) == 2
    assert not any(isinstance(a, Decide) for a in actions)


def test_observer_follows_but_never_signs() -> None:
    state, actions = start(key=None)
    assert actions == [timeout(Step.PROPOSE, 0)]
    state, actions = run(
        state,
        proposal(0, A),
        *(vote(i, PREVOTE, 0, A) for i in (0, 1, 2)),
        *(vote(i, PRECOMMIT, 0, A) for i in (0, 1, 2)),
    )
    assert [type(a) for a in actions] == [Decide]


def test_events_before_the_first_start_height_are_ignored() -> None:
    state = initial_state(EngineConfig(ME.address))
    for event in (proposal(0, A), vote(1, PREVOTE, 0, A), fired(Step.PROPOSE, 0)):
        assert step(state, event) == (state, [])


def test_events_are_records_that_round_trip() -> None:
    events: list[Event] = [
        StartHeight(Height(1), VALS, LAST_TIME, NOW, TIMEOUTS),
        proposal(0, A, pol=None),
        vote(1, PRECOMMIT, 0, None),
        fired(Step.PREVOTE, 0),
        BlockBuilt(Height(1), Round(0), A, BLOCK_TIME, NOW),
    ]
    for event in events:
        assert type(event).decode(event.encode()) == event


# --- BFT time ------------------------------------------------------------------------------------


def _precommit_at(key: PrivateKey, time: int, value: Hash32 = A) -> SignedVote:
    return signed_vote(key, PRECOMMIT, 1, 0, value, time)


def test_block_time_is_the_weighted_median() -> None:
    times = [1_000, 1_010, 5_000, 1_005]
    commit = [_precommit_at(k, t) for k, t in zip(KEYS, times, strict=True)]
    assert block_time_from_commit(commit, VALS) == 1_010  # 2 of 4 is not more than half: 3rd
    assert block_time_from_commit(commit[:3], VALS) == 1_010
    weighted = ValidatorSet.of({KEYS[0].address: 5, KEYS[1].address: 1, KEYS[2].address: 1})
    assert block_time_from_commit(commit[:3], weighted) == 1_000
    nil = signed_vote(KEYS[3], PRECOMMIT, 1, 0, None, 9_999)
    assert block_time_from_commit([*commit[:3], nil], VALS) == 1_010  # nil precommits skipped


def test_block_time_rejects_bad_commits() -> None:
    with pytest.raises(InvalidCommit):
        block_time_from_commit([], VALS)
    with pytest.raises(InvalidCommit):
        block_time_from_commit([_precommit_at(KEYS[0], 1), _precommit_at(KEYS[0], 2)], VALS)
    with pytest.raises(InvalidCommit):
        block_time_from_commit([_precommit_at(KEYS[0], 1), _precommit_at(KEYS[1], 2, B)], VALS)
    outsider = PrivateKey(b"\x77" * 32)
    with pytest.raises(InvalidCommit):
        block_time_from_commit([_precommit_at(outsider, 1)], VALS)


@given(
    honest=st.lists(st.integers(1, 10**6), min_size=3, max_size=3),
    faulty=st.integers(0, 2**40),
)
def test_block_time_lies_within_the_honest_times(honest: list[int], faulty: int) -> None:
    """One faulty validator of four cannot move the time outside the honest precommits."""
    times = [*honest, faulty]
    commit = [_precommit_at(k, t) for k, t in zip(KEYS, times, strict=True)]
    result = block_time_from_commit(commit, VALS)
    assert min(honest) <= result <= max(honest)
