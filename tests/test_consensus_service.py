"""The consensus driver (``node.consensus_service``) over a real chain service, mempool and WAL,
on trio's mock clock: block production at the ``timeout_commit`` interval, transactions from the
mempool finalized, ``wait_for_height``, restarts between heights and in the middle of a height
without ever signing two different messages for one (height, round, step), and observers.

Determinism: the service runs chain work in ``trio.to_thread.run_sync``; with an autojumping mock
clock a real worker thread races the clock (the clock jumps to the next timeout while the thread
runs). The ``threads`` fixture (``tests/conftest.py``, ``tests/threads.py``) therefore runs that
work inline, after ``delay`` seconds of mock time, so a test can also place a cancellation (a
crash) exactly inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import node.consensus_service as cs
from node import crypto
from node.chain import ChainService
from node.consensus.blocks import (
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
    proposal_signer,
    sign_proposal,
    vote_signer,
)
from node.consensus.mempool import Mempool
from node.consensus.signstate import SignState, Step, step_of_vote
from node.consensus.state import Account, DictView, account_key
from node.consensus.wal import (
    ConsensusWAL,
    SignedProposalEntry,
    SignedVoteEntry,
)
from node.consensus_service import ConsensusService
from node.errors import ConflictingSignature, InvalidCommit, NonceTooLow
from node.genesis import Genesis
from node.storage import MemoryKV
from node.types import Amount, Hash32, Nonce
from tests.helpers import (
    DEFAULT_BALANCE,
    DEFAULT_FEE,
    GENESIS_TIME,
    addr,
    key,
    make_commit,
    make_genesis,
    make_vote,
    open_chain,
    vtransfer,
)
from tests.threads import InlineThreads

GEN = make_genesis(funded=4, validators=(0,))
INTERVAL = GEN.votable_params.timeout_commit_ms / 1000  # seconds of mock time

Slot = tuple[int, int, int]  # (height, round, step)


# --- fixtures ------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every signature the services make, checked as they happen: one message per slot."""

    by_slot: dict[Slot, tuple[Hash32, bytes]] = field(default_factory=dict)
    calls: list[tuple[Slot, Hash32, bytes]] = field(default_factory=list)
    on_sign: Callable[[Slot], None] | None = None  # right after signing, before the WAL
    on_persist: Callable[[Slot], None] | None = None  # right after the synced WAL append

    def record(self, slot: Slot, encoded: bytes, signature: bytes) -> None:
        entry = (crypto.sha256(encoded), signature)
        first = self.by_slot.setdefault(slot, entry)
        assert first == entry, f"two different signed messages for {slot}"
        self.calls.append((slot, *entry))
        if self.on_sign is not None:
            self.on_sign(slot)

    def slots(self) -> list[Slot]:
        return [slot for slot, _, _ in self.calls]


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """Spy on the sign-state guarded signing functions the service uses."""
    book = Ledger()
    real_vote = cs.sign_vote_guarded
    real_proposal = cs.sign_proposal_guarded

    def sign_vote(
        k: crypto.PrivateKey, chain_id: int, previous: SignState | None, vote: Vote
    ) -> tuple[SignedVote, SignState]:
        signed, state = real_vote(k, chain_id, previous, vote)
        assert vote_signer(chain_id, signed) == k.address
        book.record(
            (vote.height, vote.round, int(step_of_vote(vote))), vote.encode(), signed.signature
        )
        return signed, state

    def sign_proposal(
        k: crypto.PrivateKey, chain_id: int, previous: SignState | None, proposal: Proposal
    ) -> tuple[SignedProposal, SignState]:
        signed, state = real_proposal(k, chain_id, previous, proposal)
        assert proposal_signer(chain_id, signed) == k.address
        slot = (proposal.height, proposal.round, int(Step.PROPOSE))
        book.record(slot, proposal.encode(), signed.signature)
        return signed, state

    real_append = ConsensusWAL.append

    def append(wal: ConsensusWAL, entry: Any, sync: bool = True) -> None:
        real_append(wal, entry, sync)
        if isinstance(entry, SignedVoteEntry | SignedProposalEntry) and book.on_persist:
            st = entry.sign_state
            book.on_persist((st.height, st.round, st.step))

    monkeypatch.setattr(cs, "sign_vote_guarded", sign_vote)
    monkeypatch.setattr(cs, "sign_proposal_guarded", sign_proposal)
    monkeypatch.setattr(ConsensusWAL, "append", append)
    return book


def clock_ms() -> int:
    """Vote times follow the mock clock; mock time 0 is the genesis time."""
    return GENESIS_TIME + round(trio.current_time() * 1000)


@dataclass
class Node:
    """A chain service, mempool and consensus service that can be restarted over the same
    database and WAL file."""

    genesis: Genesis
    wal_path: Path
    key: crypto.PrivateKey | None
    kv: MemoryKV = field(default_factory=MemoryKV)
    chain: ChainService = field(init=False)
    mempool: Mempool = field(init=False)
    service: ConsensusService = field(init=False)
    committed: list[int] = field(default_factory=list)
    commit_times: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        """(Re)build the chain service over the same database and a new consensus service."""
        self.chain = open_chain(self.kv, self.genesis)
        self.mempool = Mempool(self.genesis.chain_id)
        self.service = ConsensusService(
            self.chain,
            self.mempool,
            self.key,
            self.wal_path,
            clock_ms=clock_ms,
            on_commit=self._on_commit,
        )

    def restart(self) -> None:
        self.chain.close()
        self.start()

    def _on_commit(self, block: Any) -> None:
        self.committed.append(block.header.height)
        self.commit_times[block.header.height] = trio.current_time()

    def submit(self, *txs: Any) -> None:
        for vtx in txs:
            self.mempool.add(vtx, self.chain.state_view(), self.chain.params)

    async def run_until_height(self, height: int) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.service.run)
            await self.service.wait_for_height(height)
            nursery.cancel_scope.cancel()

    async def run_until_time(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self.service.run()

    def wal_entries(self) -> list[Any]:
        with ConsensusWAL.open(self.wal_path) as wal:
            return wal.replay()


@pytest.fixture
def node(tmp_path: Path, threads: InlineThreads, ledger: Ledger) -> Iterator[Node]:
    n = Node(GEN, tmp_path / "wal", key(0))
    yield n
    n.chain.close()


def check_chain(node: Node) -> None:
    """Every stored block links to its parent and is finalized by a commit our ledger signed."""
    view = node.chain.read_view()
    parent = None
    for h in range(1, view.head_height + 1):
        block = view.get_block(h)
        commit = view.get_commit(h)
        assert block is not None and commit is not None
        assert commit.block_hash == block.hash() and commit.height == h
        if parent is not None:
            assert block.header.parent_hash == parent.hash()
            assert block.header.time > parent.header.time
            assert block.last_commit == view.get_commit(h - 1)
        parent = block


# --- block production ----------------------------------------------------------------------------


async def test_single_validator_produces_blocks_at_the_commit_interval(
    node: Node, autojump_clock: trio.testing.MockClock, ledger: Ledger
) -> None:
    await node.run_until_height(5)
    # Height 1 at once; then one block per timeout_commit, every one in round 0.
    assert trio.current_time() == pytest.approx(4 * INTERVAL)
    assert node.committed == [1, 2, 3, 4, 5]
    assert node.commit_times == pytest.approx({h: (h - 1) * INTERVAL for h in range(1, 6)})
    view = node.chain.read_view()
    times = []
    for h in range(1, 6):
        block = view.get_block(h)
        assert block is not None
        assert block.header.round == 0 and block.header.proposer == addr(0)
        times.append(block.header.time - GENESIS_TIME)
    # BFT time: block 2 follows block 1's commit (genesis time + 1 ms), then one interval apart.
    assert times == [0, 1, 1_000, 2_000, 3_000]
    check_chain(node)
    # One proposal, one prevote and one precommit per height, each signed once.
    assert ledger.slots() == [
        (h, 0, int(step))
        for h in range(1, 6)
        for step in (Step.PROPOSE, Step.PREVOTE, Step.PRECOMMIT)
    ]


async def test_the_interval_follows_timeout_commit(
    tmp_path: Path, threads: InlineThreads, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    n = Node(make_genesis(timeout_commit_ms=250), tmp_path / "wal", key(0))
    await n.run_until_height(9)
    assert trio.current_time() == pytest.approx(8 * 0.25)
    assert n.commit_times == pytest.approx({h: (h - 1) * 0.25 for h in range(1, 10)})
    n.chain.close()


async def test_submitted_transactions_are_included_and_finalized(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    first = [
        vtransfer(1, 2, 10, nonce=0),
        vtransfer(1, 3, 20, nonce=1),
        vtransfer(2, 60, 5, nonce=0),
    ]
    node.submit(*first)
    later = vtransfer(3, 1, 7, nonce=0)

    async with trio.open_nursery() as nursery:
        await nursery.start(node.service.run)
        await node.service.wait_for_height(1)
        assert len(node.mempool) == 0  # block 1 took them and the pool let them go
        await trio.sleep(INTERVAL / 2)  # between blocks
        node.submit(later)
        await node.service.wait_for_height(2)
        assert trio.current_time() == pytest.approx(INTERVAL)
        nursery.cancel_scope.cancel()

    view = node.chain.read_view()
    block1, block2 = view.get_block(1), view.get_block(2)
    assert block1 is not None and block2 is not None
    assert set(block1.txs) == {v.raw for v in first}
    assert block2.txs == (later.raw,)
    for vtx, height in [*((v, 1) for v in first), (later, 2)]:
        loc = view.get_transaction(vtx.tx_id)
        assert loc is not None and loc.height == height
        assert loc.receipt.fee_paid == DEFAULT_FEE
    assert view.get_account(addr(1)).balance == DEFAULT_BALANCE - 30 - 2 * DEFAULT_FEE + 7
    assert view.get_account(addr(60)).balance == 5
    assert len(node.mempool) == 0


async def test_an_invalid_mempool_transaction_is_left_out_and_dropped(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    good = vtransfer(1, 2, 10, nonce=0)
    node.submit(good)
    # Admitted against a state in which dev key 8 is rich (a stale or wrong view); in the real
    # state it has nothing, so the proposer leaves it out and the pool drops it.
    rich = DictView({account_key(addr(8)): Account(Nonce(0), Amount(10**30)).encode()})
    unfunded = vtransfer(8, 2, 10, nonce=0)
    node.mempool.add(unfunded, rich, node.chain.params)
    assert unfunded.tx_id in node.mempool
    await node.run_until_height(2)
    view = node.chain.read_view()
    assert view.get_transaction(good.tx_id) is not None
    assert view.get_transaction(unfunded.tx_id) is None
    assert unfunded.tx_id not in node.mempool
    check_chain(node)


async def test_wait_for_height(node: Node, autojump_clock: trio.testing.MockClock) -> None:
    done: dict[int, float] = {}

    async def waiter(height: int) -> None:
        await node.service.wait_for_height(height)
        done[height] = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(node.service.run)
        for h in (3, 1, 3, 2):
            nursery.start_soon(waiter, h)
        await node.service.wait_for_height(3)
        # Already reached: returns without waiting.
        before = trio.current_time()
        await node.service.wait_for_height(2)
        assert trio.current_time() == before
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert done == pytest.approx({1: 0.0, 2: INTERVAL, 3: 2 * INTERVAL})


async def test_status_reports_the_height_in_progress(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(node.service.run)
        await node.service.wait_for_height(2)
        status = node.service.status()
        # Decided 2, waiting timeout_commit before height 3.
        assert (status.height, status.round) == (2, 0)
        assert status.last_commit_round == 0
        await trio.sleep(INTERVAL * 0.5)
        assert node.service.status().height == 2
        await trio.sleep(INTERVAL * 0.6)
        assert node.service.status().height >= 3
        nursery.cancel_scope.cancel()


# --- restarts ------------------------------------------------------------------------------------


async def test_restart_between_heights_continues_from_the_head(
    node: Node, autojump_clock: trio.testing.MockClock, ledger: Ledger
) -> None:
    await node.run_until_time(2.5 * INTERVAL)  # height 3 decided at 2.0, paused for 4
    assert node.chain.head_height == 3
    with ConsensusWAL.open(node.wal_path) as wal:
        assert wal.height == 3
        last = wal.last_sign_state
        assert last is not None
        assert (last.height, last.round, last.step) == (3, 0, int(Step.PRECOMMIT))
    head = node.chain.head
    node.submit(vtransfer(1, 2, 1, nonce=0))  # this mempool is lost with the restart
    node.restart()
    assert node.chain.head == head
    signed_before = len(ledger.calls)
    node.submit(vtransfer(1, 2, 1, nonce=0))
    await node.run_until_height(6)
    assert node.committed == [1, 2, 3, 4, 5, 6]
    # It starts height 4 at once (the pause was spent before the crash) and goes on.
    assert node.commit_times[4] == pytest.approx(2.5 * INTERVAL)
    assert node.commit_times[6] == pytest.approx(4.5 * INTERVAL)
    view = node.chain.read_view()
    block4 = view.get_block(4)
    assert block4 is not None and head is not None
    assert block4.header.parent_hash == head.hash()
    assert len(block4.txs) == 1
    check_chain(node)
    # Nothing signed again for heights 1..3; heights 4..6 signed once each.
    assert all(slot[0] >= 4 for slot in ledger.slots()[signed_before:])
    assert len(ledger.by_slot) == len(ledger.calls) == 18


@pytest.mark.parametrize(
    ("offset", "finish", "what"),
    [
        (0.05, False, "building the block"),
        (0.15, False, "validating the signed proposal"),
        (0.25, False, "writing the decided block (votes signed, block not written)"),
        (0.25, True, "writing the decided block (block written, pause not started)"),
    ],
)
async def test_restart_in_the_middle_of_a_height(
    node: Node,
    threads: InlineThreads,
    ledger: Ledger,
    autojump_clock: trio.testing.MockClock,
    offset: float,
    finish: bool,
    what: str,
) -> None:
    """Each chain call takes 0.1 s of mock time: height 2 starts at 1.3, builds until 1.4,
    validates until 1.5, signs both votes at 1.5 and writes the block until 1.6. A crash at
    1.3 + ``offset`` lands inside one of them."""
    threads.delays = {"build": 0.1, "validate": 0.1, "commit": 0.1}
    threads.finish_on_cancel = finish
    start2 = 0.3 + INTERVAL
    tx = vtransfer(1, 2, 10, nonce=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run_until_time, start2 + offset)
        await trio.sleep(start2 - 0.1)  # before height 2 is built
        node.submit(tx)
    assert node.chain.head_height == (2 if finish else 1), what
    signed_at_crash = {slot for slot in ledger.slots() if slot[0] == 2}
    if offset > 0.2:
        assert signed_at_crash == {(2, 0, 1), (2, 0, 2), (2, 0, 3)}
    elif offset > 0.1:
        assert signed_at_crash == {(2, 0, 1)}
    else:
        assert signed_at_crash == set()

    node.restart()
    # The client sends it again to the restarted node (refused if it is already final).
    if finish:
        with pytest.raises(NonceTooLow):
            node.submit(tx)
    else:
        node.submit(tx)
    await node.run_until_height(4)
    check_chain(node)
    assert node.committed == [1, 2, 3, 4]  # each height written once across the crash
    # Whatever was signed before the crash was not signed again differently (the ledger checks
    # every signature), and everything after it follows round 0 without a new round.
    view = node.chain.read_view()
    for h in (2, 3, 4):
        block = view.get_block(h)
        assert block is not None and block.header.round == 0
    # The transaction is in the chain exactly once and has left the pool.
    loc = view.get_transaction(tx.tx_id)
    assert loc is not None and loc.height == 2
    assert view.get_account(addr(1)).nonce == 1
    assert tx.tx_id not in node.mempool
    # The votes that finalized height 2 are the ones signed before the crash, if any were.
    if offset > 0.2:
        commit = view.get_commit(2)
        assert commit is not None
        (precommit,) = commit.precommits
        assert ledger.by_slot[(2, 0, 3)][1] == precommit.signature


@pytest.mark.parametrize("step", [Step.PROPOSE, Step.PREVOTE, Step.PRECOMMIT])
@pytest.mark.parametrize("crash", ["signed", "persisted"])
async def test_restart_right_after_signing(
    node: Node, ledger: Ledger, autojump_clock: trio.testing.MockClock, step: Step, crash: str
) -> None:
    """A crash right after signing at height 2, before the signature reached the WAL
    ("signed") or after it did but before the engine saw the message ("persisted"). After the
    restart the replay asks for the same message again: the sign-state re-sends the persisted
    signature, or (never persisted, so never sent) it is signed again — identically."""
    target: Slot = (2, 0, int(step))
    with trio.CancelScope() as scope:

        def crash_at(slot: Slot) -> None:
            if slot == target:
                scope.cancel()

        if crash == "signed":
            ledger.on_sign = crash_at
        else:
            ledger.on_persist = crash_at
        await node.service.run()
    ledger.on_sign = ledger.on_persist = None
    assert scope.cancelled_caught
    assert node.chain.head_height == 1
    with ConsensusWAL.open(node.wal_path) as wal:
        last = wal.last_sign_state
    assert last is not None
    previous = (2, 0, int(step) - 1) if step != Step.PROPOSE else (1, 0, int(Step.PRECOMMIT))
    assert (last.height, last.round, last.step) == (target if crash == "persisted" else previous)

    node.restart()
    await node.run_until_height(3)
    check_chain(node)
    # The slot was signed twice, with the identical message and signature.
    again = [(d, s) for slot, d, s in ledger.calls if slot == target]
    assert len(again) == 2 and again[0] == again[1]
    block2 = node.chain.read_view().get_block(2)
    assert block2 is not None and block2.header.round == 0


async def test_restarts_at_every_step_never_conflict(
    node: Node, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    """Crash before and after persisting each signature in turn for several heights; the chain
    still grows and every (height, round, step) is signed with one message only."""
    crashes = 0
    for target_height in (2, 3, 4):
        for step in (Step.PROPOSE, Step.PREVOTE, Step.PRECOMMIT):
            target: Slot = (target_height, 0, int(step))
            for hook in ("on_sign", "on_persist"):
                with trio.CancelScope() as scope:

                    def crash_at(
                        slot: Slot, t: Slot = target, sc: trio.CancelScope = scope
                    ) -> None:
                        if slot == t:
                            sc.cancel()

                    setattr(ledger, hook, crash_at)
                    await node.service.run()
                setattr(ledger, hook, None)
                crashes += scope.cancelled_caught
                node.restart()
    await node.run_until_height(5)
    assert crashes == 18
    check_chain(node)
    assert node.committed == [1, 2, 3, 4, 5]


async def test_a_wal_ahead_of_a_lost_database_refuses_to_sign_again(
    node: Node, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    """The sign-state outlives the chain database: with the database lost (a fresh one) but the
    WAL kept, the validator refuses to sign height 1 again rather than equivocate."""
    await node.run_until_height(3)
    signed = list(ledger.calls)
    node.chain.close()
    fresh = Node(GEN, node.wal_path, key(0))
    with pytest.raises(ExceptionGroup) as info:
        await fresh.service.run()
    assert info.group_contains(ConflictingSignature, match="already signed height 3")
    assert ledger.calls == signed  # nothing new was signed
    assert fresh.chain.head_height == 0
    fresh.chain.close()


# --- observers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["observer", "non-validator"])
async def test_an_observer_never_signs(
    tmp_path: Path,
    threads: InlineThreads,
    ledger: Ledger,
    autojump_clock: trio.testing.MockClock,
    who: str,
) -> None:
    n = Node(GEN, tmp_path / "wal", None if who == "observer" else key(9))
    await n.run_until_time(30.0)
    assert ledger.calls == []
    assert n.chain.head_height == 0
    entries = n.wal_entries()
    assert not [
        e for e in entries if isinstance(e, SignedVoteEntry | SignedProposalEntry | SignState)
    ]
    # It followed the height's steps: the propose timeout moved it on without a vote.
    status = n.service.status()
    assert (status.height, status.round, status.step) == (1, 0, "prevote")
    # A restart of the observer changes nothing.
    n.restart()
    await n.run_until_time(40.0)
    assert ledger.calls == [] and n.chain.head_height == 0
    n.chain.close()


# --- input from peers (the network side: node/p2p/gossip.py, node/p2p/catchup.py) --------------

GEN4 = make_genesis(funded=4, validators=(0, 1, 2, 3))


class Publisher:
    """Records what the service hands to the network."""

    def __init__(self) -> None:
        self.proposals: list[tuple[Any, Any]] = []
        self.evidence: list[Any] = []
        self.votes: list[Any] = []

    def publish_proposal(self, signed: Any, block: Any) -> None:
        self.proposals.append((signed, block))

    def publish_vote(self, signed: Any) -> None:
        self.votes.append(signed)

    def publish_evidence(self, evidence: Any) -> None:
        self.evidence.append(evidence)


def peer_block(chain: ChainService, height: int) -> tuple[Any, Any]:
    """The next block on ``chain`` (a peer's copy) by the proposer of (height, 0), signed."""
    vals = chain.validator_set()
    proposer = vals.proposer(height, 0)
    last = None if chain.head is None else chain.store.get_commit(chain.head_height)
    block = chain.build(0, proposer, last, []).block
    signer = next(key(i) for i in range(4) if addr(i) == proposer)
    proposal = Proposal(block.header.height, block.header.round, block.hash(), None, proposer)
    return block, sign_proposal(signer, GEN4.chain_id, proposal)


async def test_peer_proposals_votes_and_commits(
    tmp_path: Path, threads: InlineThreads, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    """Only validator 0 of four runs: a peer's proposal is executed and prevoted, its votes
    counted; a proposal for the next height waits; a commit from a peer with too few
    precommits is refused, a good one is committed and the next height starts at once with
    the waiting proposal."""
    vals = GEN4.validator_set()
    # A validator that proposes neither (1, 0) nor (2, 0); the others are dev keys `others`.
    mine = next(i for i in range(4) if vals.index_of(addr(i)) not in (1, 2))
    others = [i for i in range(4) if i != mine]
    me = Node(GEN4, tmp_path / "wal", key(mine))
    publisher = Publisher()
    me.service.attach_publisher(publisher)
    other = open_chain(MemoryKV(), GEN4)  # the peers' chain
    block1, proposal1 = peer_block(other, 1)

    async with trio.open_nursery() as nursery:
        await nursery.start(me.service.run)
        assert me.service.deliver_proposal(proposal1, block1)
        await trio.testing.wait_all_tasks_blocked()
        state = me.service.state
        assert state.blocks[block1.hash()].valid
        assert [v.vote.block_hash for v in publisher.votes] == [block1.hash()]  # prevoted
        # Prevotes of two more validators: a quorum; it locks and precommits.
        votes = [
            make_vote(i, block1.hash(), 1, 0, time_ms=GENESIS_TIME + 5, vote_type=1)
            for i in others[:2]
        ]
        assert me.service.deliver_votes([(v, v.vote.validator) for v in votes])
        await trio.testing.wait_all_tasks_blocked()
        assert not me.service.deliver_votes([(votes[0], votes[0].vote.validator)])  # known
        assert me.service.state.locked_value == block1.hash()
        assert len(publisher.votes) == 2 and publisher.votes[1].vote.vote_type == 2

        # The peers decided without us; their commit and the next height's proposal arrive.
        good = make_commit(block1.hash(), 1, 0, others, time_ms=block1.header.time + 10)
        other.commit(block1, good)
        block2, proposal2 = peer_block(other, 2)
        assert me.service.deliver_proposal(proposal2, block2)  # waits for height 2
        await trio.testing.wait_all_tasks_blocked()
        assert me.service.height == 1
        short = make_commit(block1.hash(), 1, 0, others[:2], time_ms=block1.header.time + 10)
        with pytest.raises(InvalidCommit):
            await me.service.commit_from_peer(block1, short)
        assert me.chain.head_height == 0
        assert await me.service.commit_from_peer(block1, good)
        assert me.chain.head_height == 1 and me.committed == [1]
        await trio.testing.wait_all_tasks_blocked()
        assert me.service.height == 2
        assert me.service.state.rounds[0].proposals == (proposal2,)
        assert me.service.state.blocks[block2.hash()].valid
        # Not the next height any more: nothing to do.
        assert not await me.service.commit_from_peer(block1, good)
        nursery.cancel_scope.cancel()
    me.chain.close()
    other.close()
