"""The consensus WAL, the sign-state guard, and crash recovery of a locked validator."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest

from node.consensus.blocks import Proposal, SignedVote, Vote, VoteType
from node.consensus.engine import (
    Action,
    BlockBuilt,
    EngineConfig,
    Event,
    ProposalReceived,
    SignProposal,
    SignVote,
    StartHeight,
    Step,
    TimeoutFired,
    VoteReceived,
    initial_state,
    replay_into,
    step,
)
from node.consensus.signstate import (
    SignState,
    check_sign,
    compute_sign_state,
    sign_proposal_guarded,
    sign_vote_guarded,
)
from node.consensus.wal import (
    BlockEntry,
    ConsensusWAL,
    HeightMarker,
    SignedProposalEntry,
    SignedVoteEntry,
    WALEntry,
    blocks_of,
    encode_entry,
    events_of,
    height_of,
    last_sign_state,
)
from node.crypto import sha256
from node.errors import ConflictingSignature, CorruptDatabase, StorageError
from node.types import Height, Round, Signature, TimestampMs
from tests.consensus.sim import CHAIN_ID, TIMEOUTS, signed_proposal, signed_vote
from tests.consensus.test_engine import (
    BLOCK_TIME,
    KEYS,
    LAST_TIME,
    ME,
    NOW,
    VALS,
    A,
    B,
    proposal,
    vote,
)

PREVOTE = int(VoteType.PREVOTE)
PRECOMMIT = int(VoteType.PRECOMMIT)
SIG = Signature(b"\x01" * 65)


def sample_entries() -> list[WALEntry]:
    sv = signed_vote(KEYS[1], PREVOTE, 1, 0, A)
    sp = signed_proposal(KEYS[1], 1, 0, A)
    state = compute_sign_state(1, 0, Step.PREVOTE, sv.vote.encode(), sv.signature)
    return [
        HeightMarker(Height(1)),
        StartHeight(Height(1), VALS, LAST_TIME, NOW, TIMEOUTS),
        BlockEntry(A, b"block bytes"),
        ProposalReceived(sp, A, True, BLOCK_TIME, NOW),
        VoteReceived(sv, KEYS[1].address, NOW),
        TimeoutFired(Height(1), Round(0), int(Step.PROPOSE), NOW),
        BlockBuilt(Height(1), Round(0), A, BLOCK_TIME, NOW),
        SignedVoteEntry(sv, state),
        SignedProposalEntry(sp, state),
        state,
    ]


# --- the file ------------------------------------------------------------------------------------


def test_append_and_replay_every_entry_kind(tmp_path: Path) -> None:
    entries = sample_entries()
    with ConsensusWAL.open(tmp_path / "wal") as wal:
        assert wal.replay() == [] and wal.height is None and wal.last_sign_state is None
        for i, entry in enumerate(entries):
            wal.append(entry, sync=i % 2 == 0)
        assert wal.replay() == entries
    with ConsensusWAL.open(tmp_path / "wal") as wal:
        assert wal.replay() == entries
        assert wal.height == 1
        assert wal.last_sign_state == entries[-1]
    assert height_of(entries) == 1
    assert blocks_of(entries) == {A: b"block bytes"}
    assert [type(e) for e in events_of(entries)] == [
        StartHeight,
        ProposalReceived,
        VoteReceived,
        TimeoutFired,
        BlockBuilt,
    ]
    assert last_sign_state(entries) == entries[-1]
    assert (tmp_path / "wal").stat().st_mode & 0o777 == 0o600


def test_a_torn_last_record_is_dropped_wherever_it_is_cut(tmp_path: Path) -> None:
    entries = sample_entries()[:5]
    path = tmp_path / "wal"
    with ConsensusWAL.open(path) as wal:
        for entry in entries:
            wal.append(entry)
    whole = path.read_bytes()
    last = len(encode_entry(entries[-1]))
    intact = len(whole) - last
    for cut in sorted({1, 3, 4, 5, 35, 36, 37, last - 1, *range(2, last, 17)}):
        path.write_bytes(whole[: intact + cut])
        with ConsensusWAL.open(path) as wal:
            assert wal.replay() == entries[:-1]
            assert path.stat().st_size == intact  # cut back to the last whole record
            wal.append(entries[-1])
            assert wal.replay() == entries


def test_a_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    entries = sample_entries()[:3]
    with ConsensusWAL.open(path) as wal:
        for entry in entries:
            wal.append(entry)
    with path.open("ab") as f:
        f.write(b"\x00" * 300)
    with ConsensusWAL.open(path) as wal:
        assert wal.replay() == entries


def test_a_corrupt_record_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    entries = sample_entries()[:4]
    with ConsensusWAL.open(path) as wal:
        for entry in entries:
            wal.append(entry)
    data = bytearray(path.read_bytes())
    data[len(encode_entry(entries[0])) + 40] ^= 0xFF  # inside the second record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDatabase):
        ConsensusWAL.open(path)


def test_start_height_keeps_only_the_marker_and_the_sign_state(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    entries = sample_entries()
    with ConsensusWAL.open(path) as wal:
        wal.start_height(1)
        for entry in entries[1:]:
            wal.append(entry)
        wal.start_height(2)
        assert wal.height == 2
        assert wal.replay() == [HeightMarker(Height(2)), entries[-1]]
        wal.append(entries[4])
    with ConsensusWAL.open(path) as wal:
        assert wal.replay() == [HeightMarker(Height(2)), entries[-1], entries[4]]
        assert wal.last_sign_state == entries[-1]
    assert not (tmp_path / "wal.tmp").exists()


def test_a_closed_wal_refuses_work(tmp_path: Path) -> None:
    wal = ConsensusWAL.open(tmp_path / "wal")
    wal.close()
    wal.close()  # idempotent
    with pytest.raises(StorageError):
        wal.append(HeightMarker(Height(1)))
    with pytest.raises(StorageError):
        wal.replay()


def test_opening_an_unusable_path_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        ConsensusWAL.open(tmp_path / "missing-dir" / "wal")


# --- the sign-state guard ------------------------------------------------------------------------


def _state(h: int, r: int, s: Step, data: bytes = b"x") -> SignState:
    return compute_sign_state(h, r, s, data, SIG)


def test_check_sign_order_and_resend() -> None:
    assert check_sign(None, 1, 0, Step.PROPOSE, b"x").resend_signature is None
    last = _state(5, 2, Step.PREVOTE)
    for higher in ((5, 2, Step.PRECOMMIT), (5, 3, Step.PROPOSE), (6, 0, Step.PROPOSE)):
        assert not check_sign(last, *higher, b"y").is_resend
    same = check_sign(last, 5, 2, Step.PREVOTE, b"x")
    assert same.is_resend and same.resend_signature == SIG
    with pytest.raises(ConflictingSignature):
        check_sign(last, 5, 2, Step.PREVOTE, b"different")
    for lower in ((5, 2, Step.PROPOSE), (5, 1, Step.PRECOMMIT), (4, 9, Step.PRECOMMIT)):
        with pytest.raises(ConflictingSignature):
            check_sign(last, *lower, b"x")


def test_guarded_signing_resends_identical_and_refuses_conflicts() -> None:
    v = Vote(PREVOTE, Height(3), Round(1), A, TimestampMs(NOW), ME.address)
    signed, state = sign_vote_guarded(ME, CHAIN_ID, None, v)
    again, state2 = sign_vote_guarded(ME, CHAIN_ID, state, v)
    assert again == signed and state2 == state
    with pytest.raises(ConflictingSignature):
        sign_vote_guarded(
            ME, CHAIN_ID, state, Vote(PREVOTE, Height(3), Round(1), B, v.time, v.validator)
        )
    p = Proposal(Height(3), Round(2), A, 1, ME.address)
    sp, state3 = sign_proposal_guarded(ME, CHAIN_ID, state, p)
    assert state3.step == Step.PROPOSE and state3.signed_bytes_hash == sha256(p.encode())
    with pytest.raises(ConflictingSignature):  # a prevote of round 1 after the round 2 proposal
        sign_vote_guarded(ME, CHAIN_ID, state3, v)
    assert sign_proposal_guarded(ME, CHAIN_ID, state3, p)[0] == sp


# --- crash and replay ------------------------------------------------------------------------------


class _Crash(Exception):
    """Raised by the test driver to stop dead, as a killed process would."""


class Driver:
    """The WAL discipline of the consensus service, without the network."""

    def __init__(self, path: Path) -> None:
        self.wal = ConsensusWAL.open(path)
        self.state = initial_state(EngineConfig(ME.address))
        self.sign_state = self.wal.last_sign_state
        self.signed: list[SignedVote] = []
        self.crash_after_signing = False

    def start(self, height: int) -> list[Action]:
        self.wal.start_height(height)
        return self.deliver(StartHeight(Height(height), VALS, LAST_TIME, NOW, TIMEOUTS))

    def deliver(self, *events: Event) -> list[Action]:
        queue: deque[Event] = deque(events)
        performed: list[Action] = []
        while queue:
            event = queue.popleft()
            self.wal.append(event, sync=False)  # recorded before it changes the state
            self.state, actions = step(self.state, event)
            for action in actions:
                performed.append(action)
                self.perform(action, queue)
        return performed

    def perform(self, action: Action, queue: deque[Event]) -> None:
        if isinstance(action, SignVote):
            signed, self.sign_state = sign_vote_guarded(ME, CHAIN_ID, self.sign_state, action.vote)
            self.wal.append(SignedVoteEntry(signed, self.sign_state), sync=True)
            if self.crash_after_signing:
                raise _Crash
            self.signed.append(signed)
            queue.append(VoteReceived(signed, ME.address, NOW))
        elif isinstance(action, SignProposal):  # pragma: no cover - me never proposes here
            raise AssertionError("unexpected proposal")

    @classmethod
    def recover(cls, path: Path) -> tuple[Driver, list[Action]]:
        driver = cls(path)
        entries = driver.wal.replay()
        assert height_of(entries) == 1
        driver.state, outstanding = replay_into(
            initial_state(EngineConfig(ME.address)), events_of(entries)
        )
        assert driver.sign_state == last_sign_state(entries)
        return driver, outstanding

    def close(self) -> None:
        self.wal.close()


def _lock_on_a(driver: Driver) -> None:
    driver.start(1)
    driver.deliver(proposal(0, A), *(vote(i, PREVOTE, 0, A) for i in (1, 2, 3)))


def test_a_locked_validator_keeps_its_lock_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    driver = Driver(path)
    _lock_on_a(driver)
    assert (driver.state.locked_value, driver.state.locked_round) == (A, 0)
    precommit = driver.signed[-1]
    assert precommit.vote.vote_type == PRECOMMIT and precommit.vote.block_hash == A
    before = driver.state
    driver.close()  # killed: the state in memory is gone

    driver, outstanding = Driver.recover(path)
    assert driver.state == before  # locks, valid value, own votes, round and step
    assert not any(isinstance(a, SignVote) for a in outstanding)  # all own votes came back

    # The sign-state refuses a different precommit for (1, 0) and re-sends the identical one.
    nil = Vote(PRECOMMIT, Height(1), Round(0), None, precommit.vote.time, ME.address)
    with pytest.raises(ConflictingSignature):
        sign_vote_guarded(ME, CHAIN_ID, driver.sign_state, nil)
    assert sign_vote_guarded(ME, CHAIN_ID, driver.sign_state, precommit.vote)[0] == precommit

    # Round 1 proposes B without a POL: the lock holds, the prevote is nil.
    driver.deliver(*(vote(i, PRECOMMIT, 0, None) for i in (1, 2, 3)))
    actions = driver.deliver(TimeoutFired(Height(1), Round(0), int(Step.PRECOMMIT), NOW))
    assert driver.state.round == 1
    actions = driver.deliver(proposal(1, B))
    assert [a.vote.block_hash for a in actions if isinstance(a, SignVote)] == [None]

    # Round 2 re-proposes B with a POL from round 1 (newer than the lock): now B gets the prevote.
    driver.deliver(*(vote(i, PREVOTE, 1, B) for i in (1, 2, 3)))
    driver.deliver(*(vote(i, PRECOMMIT, 1, None) for i in (1, 2, 3)))
    driver.deliver(TimeoutFired(Height(1), Round(1), int(Step.PRECOMMIT), NOW))
    actions = driver.deliver(proposal(2, B, pol=1))
    assert [a.vote.block_hash for a in actions if isinstance(a, SignVote)] == [B]
    driver.close()


def test_a_vote_signed_but_never_fed_back_is_resent_identically(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    driver = Driver(path)
    driver.start(1)
    driver.crash_after_signing = True
    with pytest.raises(_Crash):
        driver.deliver(proposal(0, A))  # the prevote is signed and logged, then the crash
    logged = [e for e in driver.wal.replay() if isinstance(e, SignedVoteEntry)]
    driver.close()

    driver, outstanding = Driver.recover(path)
    assert driver.state.step == Step.PREVOTE
    votes = [a for a in outstanding if isinstance(a, SignVote)]
    assert [v.vote for v in votes] == [logged[-1].signed_vote.vote]  # the same vote, same time
    resent, _ = sign_vote_guarded(ME, CHAIN_ID, driver.sign_state, votes[0].vote)
    assert resent == logged[-1].signed_vote
    driver.close()


def test_replay_survives_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    driver = Driver(path)
    _lock_on_a(driver)
    locked = driver.state
    driver.deliver(vote(1, PRECOMMIT, 0, A))
    driver.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - 7)  # the last record (the precommit of KEYS[1]) is torn
        os.fsync(f.fileno())
    driver, _ = Driver.recover(path)
    assert driver.state == locked
    driver.close()


def test_sign_state_survives_height_rotation(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    driver = Driver(path)
    _lock_on_a(driver)
    last = driver.sign_state
    driver.wal.start_height(2)
    driver.close()
    with ConsensusWAL.open(path) as wal:
        assert wal.last_sign_state == last
        assert last is not None
        precommit_nil = Vote(PRECOMMIT, Height(1), Round(0), None, TimestampMs(NOW), ME.address)
        with pytest.raises(ConflictingSignature):
            sign_vote_guarded(ME, CHAIN_ID, wal.last_sign_state, precommit_nil)


def test_a_bad_length_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    entries = sample_entries()[:3]
    with ConsensusWAL.open(path) as wal:
        for entry in entries:
            wal.append(entry)
    data = bytearray(path.read_bytes())
    data[len(encode_entry(entries[0])) : len(encode_entry(entries[0])) + 4] = b"\xff" * 4
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDatabase):
        ConsensusWAL.open(path)


def test_a_garbled_last_record_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    entries = sample_entries()[:3]
    with ConsensusWAL.open(path) as wal:
        for entry in entries:
            wal.append(entry)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))
    with ConsensusWAL.open(path) as wal:
        assert wal.replay() == entries[:-1]
