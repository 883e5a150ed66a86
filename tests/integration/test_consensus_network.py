"""Four validators (f = 1) running the real stack over one in-memory network on trio's mock clock:
chain service over ``MemoryKV``, mempool, consensus service with its WAL, gossip and catch-up
(``tests/integration/cluster.py``).

Scripted schedules: a fair network; drops, duplicates and delays; the proposer down; votes
delayed past the timeouts; a byzantine proposer sending two proposals; an equivocating
validator; a validator crashing while locked and restarting from its WAL; a validator stopped for
several heights and restarted (it catches up through the commit fetch); a 2+2 partition that
halts and resumes after the heal; transactions submitted at one node and finalized by all,
including ones too large for a gossip batch (announced and pulled); a parameter change voted in
by the validators, after which every pool drops what no longer pays. A hypothesis property test
draws seeds, fault rates and a silent faulty validator.

Every run checks **agreement** as it goes (``Cluster.record_commit``: never two different blocks
at one height) and that no honest validator ever signs two different messages for one (height,
round, step) (``SignatureLedger``). Determinism: worker-thread work runs inline (``threads``), the
network's faults are hashes of the seed, trio's scheduler is seeded.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from node import crypto
from node.consensus import engine as eng
from node.consensus.blocks import Block, Proposal, SignedProposal, Vote, sign_proposal, sign_vote
from node.consensus.signstate import Step
from node.consensus.wal import ConsensusWAL
from node.consensus_service import ConsensusService
from node.p2p.gossip import GossipSettings
from node.types import Amount, Hash32
from tests.helpers import (
    ALL_FEES,
    CHAIN_ID,
    addr,
    make_genesis,
    param_vote_tx,
    transfer,
    verified,
)
from tests.integration.cluster import Cluster, SignatureLedger, seed_scheduler
from tests.threads import InlineThreads

INTERVAL = 1.0  # timeout_commit of tests.helpers.make_params, in mock seconds


@pytest.fixture(autouse=True)
def ledger(threads: InlineThreads, monkeypatch: pytest.MonkeyPatch) -> SignatureLedger:
    seed_scheduler(0)
    book = SignatureLedger()
    book.install(monkeypatch)
    return book


def check_chains(cluster: Cluster, members: list[int] | None = None) -> None:
    """Each member's stored chain links up, every block is finalized by its stored commit, and
    all members hold the same blocks up to the lowest head."""
    chosen = [cluster.members[i] for i in members] if members is not None else cluster.members
    low = min(m.height for m in chosen)
    for m in chosen:
        view = m.chain.read_view()
        parent = None
        for h in range(1, view.head_height + 1):
            block, commit = view.get_block(h), view.get_commit(h)
            assert block is not None and commit is not None
            assert commit.block_hash == block.hash() == cluster.decisions[h]
            if parent is not None:
                assert block.header.parent_hash == parent.hash()
                assert block.header.time > parent.header.time
            parent = block
    assert low >= 1


# --- fair and lossy networks --------------------------------------------------------------------


async def test_four_validators_finalize_the_same_blocks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cluster = Cluster(tmp_path)

    async def body(c: Cluster) -> None:
        await c.wait_for(6, timeout_s=30)

    await cluster.run(body)
    check_chains(cluster)
    # Every height decided in round 0, one block interval apart, by the rotating proposer.
    for m in cluster.members:
        view = m.chain.read_view()
        for h in range(1, 7):
            block = view.get_block(h)
            assert block is not None and block.header.round == 0
            assert block.header.proposer == cluster.genesis.validator_set().proposer(h, 0)
        # Late precommits were collected: every block after the first carries a last commit
        # with all four precommits of its parent (the network is fast and lossless).
        last = view.get_block(6)
        assert last is not None and last.last_commit is not None
        assert len(last.last_commit.precommits) == 4
    assert trio.current_time() < 6 * INTERVAL + 1


async def test_drops_duplicates_and_delays(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cluster = Cluster(tmp_path, seed=7, drop=0.25, duplicate=0.2, delay_ms=(5, 150))

    async def body(c: Cluster) -> None:
        await c.wait_for(6, timeout_s=120)

    await cluster.run(body)
    check_chains(cluster)
    stats = cluster.net.stats
    assert stats["gossip_dropped"] > 0 and stats["gossip_duplicated"] > 0
    # The repair protocols did their part.
    fetched = sum(m.p2p.catchup.stats.get("votes_fetched", 0) for m in cluster.members)
    pulled = sum(m.p2p.catchup.stats.get("parts_pulled", 0) for m in cluster.members)
    caught_up = sum(m.p2p.catchup.stats.get("blocks_caught_up", 0) for m in cluster.members)
    assert fetched + pulled + caught_up > 0


async def test_votes_delayed_past_the_timeouts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Every message takes 2-4 s (longer than the prevote and precommit timeouts) for a while:
    rounds time out and grow; once the delays shrink every validator finalizes again."""
    cluster = Cluster(tmp_path, seed=3)

    async def body(c: Cluster) -> None:
        await c.wait_for(2)
        c.net.set_faults(delay_ms=(2_000, 4_000))
        await trio.sleep(20)
        slow_heights = c.heights()
        c.net.set_faults(delay_ms=(1, 10))
        await c.wait_for(max(slow_heights) + 3, timeout_s=60)

    await cluster.run(body)
    check_chains(cluster)
    rounds = [
        b.header.round
        for h in range(1, cluster.members[0].height + 1)
        if (b := cluster.members[0].chain.read_view().get_block(h)) is not None
    ]
    assert max(rounds) >= 1  # some height needed more than one round


def test_the_same_seed_gives_the_same_run(tmp_path: Path, threads: InlineThreads) -> None:
    """Determinism: with worker-thread work inline, faults hashed from the seed and trio's
    scheduler seeded, two runs deliver the same messages at the same mock times."""

    def run_once(where: Path) -> tuple[list[object], dict[int, Hash32]]:
        where.mkdir()
        seed_scheduler(0)
        cluster = Cluster(where, seed=7, drop=0.25, duplicate=0.2, delay_ms=(5, 150))

        async def body(c: Cluster) -> None:
            await c.wait_for(4, timeout_s=60)

        async def main() -> None:
            await cluster.run(body)

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        return list(cluster.net.trace), dict(cluster.decisions)

    first, second = run_once(tmp_path / "a"), run_once(tmp_path / "b")
    assert first == second
    assert len(first[0]) > 100


# --- faulty validators --------------------------------------------------------------------------


async def test_the_proposer_down(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The proposer of height 3 round 0 is crashed: height 3 is decided in round 1 by the
    other three, and they keep going without it (three of four is a quorum)."""
    cluster = Cluster(tmp_path, seed=5)
    down = cluster.proposer_index(3, 0)
    others = [i for i in range(4) if i != down]

    async def body(c: Cluster) -> None:
        await c.wait_for(2)
        c.members[down].crash()
        await c.wait_for(6, others, timeout_s=60)

    await cluster.run(body)
    check_chains(cluster, others)
    view = cluster.members[others[0]].chain.read_view()
    block3 = view.get_block(3)
    assert block3 is not None and block3.header.round >= 1
    assert block3.header.proposer != cluster.members[down].address


class DoubleProposer(ConsensusService):
    """Byzantine: with every proposal it signs, it signs a second one for another valid block
    (the same height and round, with one more transaction) and publishes both."""

    async def _sign_proposal(self, action: eng.SignProposal) -> None:
        await super()._sign_proposal(action)
        assert self.key is not None and self.publisher is not None
        p = action.proposal
        sender = 4  # a funded dev key no test sends from
        nonce = self.chain.read_view().get_account(addr(sender)).nonce
        extra = verified(transfer(sender, 90, 1, nonce=nonce))
        candidates = [*self.mempool.select(100, 1 << 20), extra]
        other = self.chain.build(int(p.round), self.key.address, self._last_commit, candidates)
        assert other.block.hash() != p.block_hash
        signed = sign_proposal(self.key, CHAIN_ID, replace(p, block_hash=other.block.hash()))
        self.publisher.publish_proposal(signed, other.block)


async def test_a_byzantine_proposer_sending_two_proposals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    byz = Cluster.proposer_index(2, 0)
    cluster = Cluster(tmp_path, seed=11, delay_ms=(1, 40), service_classes={byz: DoubleProposer})
    honest = [i for i in range(4) if i != byz]
    seen: dict[tuple[int, int], set[bytes]] = {}

    async def body(c: Cluster) -> None:
        for i in honest:
            service = c.members[i].service
            real = service.deliver_proposal

            def spy(signed: SignedProposal, block: Block, real: Any = real) -> bool:
                p = signed.proposal
                if p.proposer == c.members[byz].address:
                    seen.setdefault((p.height, p.round), set()).add(p.block_hash)
                return bool(real(signed, block))

            service.deliver_proposal = spy  # type: ignore[method-assign]
        await c.wait_for(7, honest, timeout_s=90)

    await cluster.run(body)
    check_chains(cluster, honest)
    # Honest validators received both blocks of the byzantine proposer's rounds, and still
    # agreed on one block per height.
    assert any(len(hashes) == 2 for hashes in seen.values())


class Equivocator(ConsensusService):
    """Byzantine: for every vote it signs, also signs and publishes a conflicting one."""

    async def _sign_vote(self, action: eng.SignVote) -> None:
        await super()._sign_vote(action)
        assert self.key is not None and self.publisher is not None
        vote = action.vote
        value = None if vote.block_hash is not None else Hash32(b"\x66" * 32)
        other = sign_vote(self.key, CHAIN_ID, replace(vote, block_hash=value))
        self.publisher.publish_vote(other)


async def test_an_equivocating_validator(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    byz = 2
    cluster = Cluster(tmp_path, seed=13, delay_ms=(1, 30), service_classes={byz: Equivocator})
    honest = [i for i in range(4) if i != byz]
    evidence: list[object] = []

    async def body(c: Cluster) -> None:
        for i in honest:
            service = c.members[i].service
            real = service._perform

            async def perform(action: eng.Action, real: object = real) -> None:
                if isinstance(action, eng.RecordEvidence):
                    evidence.append(action.evidence)
                await real(action)  # type: ignore[operator]

            service._perform = perform  # type: ignore[method-assign]
        await c.wait_for(5, honest, timeout_s=60)

    await cluster.run(body)
    check_chains(cluster, honest)
    assert evidence, "the honest validators saw the double votes"
    for ev in evidence:
        a, b = ev.vote_a.vote, ev.vote_b.vote  # type: ignore[attr-defined]
        assert a.validator == b.validator == cluster.members[byz].address
        assert (a.height, a.round, a.vote_type) == (b.height, b.round, b.vote_type)


async def test_a_validator_crashing_while_locked_restarts_from_its_wal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, ledger: SignatureLedger
) -> None:
    """At height 3 one validator is already down, so the other three need each other. One of
    them (the victim) crashes right after signing its precommit for a block (it has locked
    it), before the precommit is written or sent: the other two are stuck. Restarted over the
    same database and WAL, the victim replays its lock, signs the identical precommit again
    and the three decide the block it was locked on."""
    cluster = Cluster(tmp_path, seed=17)
    silent = cluster.proposer_index(3, 1)  # so round 0's proposer is live
    victim = next(i for i in range(4) if i not in (silent, cluster.proposer_index(3, 0)))
    live = [i for i in range(4) if i != silent]
    locked: list[Vote] = []

    def on_sign(slot: tuple[bytes, int, int, int], what: Vote | Proposal) -> None:
        who, height, _, step = slot
        if (
            who == cluster.members[victim].address
            and height == 3
            and step == int(Step.PRECOMMIT)
            and isinstance(what, Vote)
            and what.block_hash is not None
            and not locked
        ):
            locked.append(what)
            cluster.members[victim].crash()

    async def body(c: Cluster) -> None:
        await c.wait_for(2)
        c.members[silent].crash()
        ledger.on_sign = on_sign
        with trio.fail_after(30):
            while not locked:
                await trio.sleep(0.01)
        ledger.on_sign = None
        await trio.sleep(8)  # the two others cannot decide alone
        assert all(c.members[i].height == 2 for i in live)
        wal = ConsensusWAL.open(c.members[victim].wal_path)
        wal.close()
        await c.members[victim].restart()
        state = c.members[victim].service.state
        assert state.height == 3 and state.locked_value == locked[0].block_hash
        await c.wait_for(5, live, timeout_s=60)

    await cluster.run(body)
    check_chains(cluster, live)
    assert cluster.decisions[3] == locked[0].block_hash
    assert cluster.members[victim].restarts == 1


async def test_a_stopped_validator_restarts_and_catches_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Stopped for several heights, restarted over the same database and WAL file: it fetches
    the commits and blocks it missed from its peers and takes part again."""
    cluster = Cluster(tmp_path, seed=19, delay_ms=(1, 20))
    late = 1
    others = [i for i in range(4) if i != late]

    async def body(c: Cluster) -> None:
        await c.wait_for(2)
        c.members[late].crash()
        stopped_at = c.members[late].height
        await c.wait_for(stopped_at + 5, others, timeout_s=60)
        await c.members[late].restart()
        target = max(c.heights()) + 2
        await c.wait_for(target, timeout_s=60)

    await cluster.run(body)
    check_chains(cluster)
    assert cluster.members[late].p2p.catchup.stats.get("blocks_caught_up", 0) >= 4


async def test_a_two_two_partition_halts_and_resumes_after_the_heal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cluster = Cluster(tmp_path, seed=23)

    async def body(c: Cluster) -> None:
        await c.wait_for(2)
        hosts = [m.host for m in c.members]
        c.net.partition([hosts[:2], hosts[2:]])
        await trio.sleep(2 * INTERVAL)  # a height in flight may still finish on one side
        frozen = dict(c.decisions)
        heights = c.heights()
        await trio.sleep(25)
        assert c.heights() == heights, "no side has a quorum"
        assert c.decisions == frozen
        c.net.heal()
        await c.wait_for(max(heights) + 3, timeout_s=60)

    await cluster.run(body)
    check_chains(cluster)


# --- transactions -------------------------------------------------------------------------------


async def test_a_transaction_submitted_at_one_node_is_finalized_by_all(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cluster = Cluster(tmp_path, seed=29, drop=0.1, delay_ms=(1, 30))
    txs = [transfer(1, 60, 10, nonce=0), transfer(1, 61, 11, nonce=1), transfer(2, 62, 12, nonce=0)]

    async def body(c: Cluster) -> None:
        await c.wait_for(1)
        c.members[3].submit(txs[0])
        c.members[3].submit(txs[1])
        c.members[0].submit(txs[2])
        with trio.fail_after(30):
            while not all(
                m.chain.read_view().get_account(addr(60 + k)).balance == 10 + k
                for m in c.members
                for k in range(3)
            ):
                await trio.sleep(0.1)
        await c.wait_for(max(c.heights()) + 1)

    await cluster.run(body)
    check_chains(cluster)
    for m in cluster.members:
        assert len(m.mempool) == 0  # every pool let them go once they were final


async def test_transactions_too_large_for_a_batch_are_announced_and_pulled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cluster = Cluster(tmp_path, seed=31, gossip_settings=GossipSettings(tx_batch_bytes=64))
    raw = transfer(3, 70, 5, nonce=0)
    assert len(raw) > 64

    async def body(c: Cluster) -> None:
        await c.wait_for(1)
        c.members[0].submit(raw)
        with trio.fail_after(30):
            while not all(
                m.chain.read_view().get_account(addr(70)).balance == 5 for m in c.members
            ):
                await trio.sleep(0.1)

    await cluster.run(body)
    pulled = sum(m.p2p.catchup.stats.get("txs_pulled", 0) for m in cluster.members)
    assert pulled >= 1


async def test_a_block_larger_than_one_part_travels_in_parts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """2,000 transfers (about 340 KB of transactions) submitted at one validator: they travel
    in transaction batches, the block that holds them in two parts (with drops, so parts are
    pulled too), and every validator finalizes it."""
    senders = 40
    per_sender = 50
    cluster = Cluster(
        tmp_path,
        seed=37,
        drop=0.15,
        delay_ms=(1, 30),
        genesis=make_genesis(funded=senders, validators=(0, 1, 2, 3), max_block_txs=5_000),
    )
    txs = [
        transfer(1 + s, 1_000 + s, 1, nonce=n) for n in range(per_sender) for s in range(senders)
    ]

    async def body(c: Cluster) -> None:
        await c.wait_for(1)
        for raw in txs:
            c.members[1].submit(raw)
        with trio.fail_after(60):
            while not all(
                m.chain.read_view().get_account(addr(1 + s)).nonce == per_sender
                for m in c.members
                for s in range(senders)
            ):
                await trio.sleep(0.2)

    await cluster.run(body)
    check_chains(cluster)
    view = cluster.members[0].chain.read_view()
    sizes = [
        len(b.encode())
        for h in range(1, view.head_height + 1)
        if (b := view.get_block(h)) is not None
    ]
    assert max(sizes) > 256 << 10  # at least one block took more than one part
    assert sum(m.p2p.gossip.stats.get("blocks_assembled", 0) for m in cluster.members) >= 3


async def test_a_parameter_change_drops_what_no_longer_pays_from_every_pool(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Three of four validators vote a transfer base fee 100x higher; once it is in force,
    every member's pool drops a queued transfer whose fee covered only the old cost."""
    # A parameter proposal carries the whole fee table (one schedule per kind): room for it.
    genesis = make_genesis(
        funded=4, validators=(0, 1, 2, 3), balances={0: 10**21}, fees=ALL_FEES, max_tx_bytes=8_192
    )
    old = genesis.votable_params
    dearer = replace(old.fees[0], base=Amount(old.fees[0].base * 100))
    new = replace(old, fees=(dearer, *old.fees[1:]))
    cluster = Cluster(tmp_path, seed=43, genesis=genesis)
    # A transfer with a nonce gap: it waits in the pools (queued), never goes into a block.
    stuck = transfer(4, 80, 1, nonce=3)
    stuck_id = crypto.sha256(stuck)

    async def body(c: Cluster) -> None:
        await c.wait_for(1)
        c.members[0].submit(stuck)
        with trio.fail_after(10):
            while not all(stuck_id in m.mempool for m in c.members):
                await trio.sleep(0.1)
        for i in (0, 1, 2):
            m = c.members[i]
            assert m.key is not None
            voter = m.key
            nonce = m.chain.read_view().get_account(voter.address).nonce
            m.submit(param_vote_tx(voter, new, nonce=nonce))
        with trio.fail_after(30):
            while not all(m.chain.params == new for m in c.members):
                await trio.sleep(0.1)
        await c.wait_for(max(c.heights()) + 1)

    await cluster.run(body)
    check_chains(cluster)
    for m in cluster.members:
        assert stuck_id not in m.mempool


# --- property test ------------------------------------------------------------------------------


FAULTS: dict[str, type[ConsensusService] | None] = {
    "none": None,
    "silent": None,  # never started
    "equivocate": Equivocator,
    "double-propose": DoubleProposer,
}


@hsettings(
    max_examples=int(os.environ.get("CONSENSUS_NET_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**16),
    drop=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    duplicate=st.sampled_from([0.0, 0.2]),
    max_delay=st.sampled_from([10, 200, 1_500, 4_000]),
    fault=st.sampled_from(sorted(FAULTS)),
    faulty=st.integers(0, 3),
    split=st.sampled_from([None, (0, 1), (0, 2), (1,)]),
    faulty_s=st.sampled_from([5.0, 15.0]),
)
def test_agreement_always_and_termination_after_the_heal(
    tmp_path_factory: pytest.TempPathFactory,
    ledger: SignatureLedger,
    seed: int,
    drop: float,
    duplicate: float,
    max_delay: int,
    fault: str,
    faulty: int,
    split: tuple[int, ...] | None,
    faulty_s: float,
) -> None:
    """Up to f = 1 faulty validator of 3f + 1 (silent, equivocating or double-proposing) and a
    network that drops, duplicates, delays and reorders messages (and may be partitioned) for
    ``faulty_s`` seconds: never two different blocks at one height; once the network is fair
    and whole again, every honest validator finalizes new blocks."""
    tmp = tmp_path_factory.mktemp("prop")
    ledger.by_slot.clear()
    seed_scheduler(seed)
    byzantine = FAULTS[fault]
    cluster = Cluster(
        tmp,
        seed=seed,
        drop=drop,
        duplicate=duplicate,
        delay_ms=(1, max_delay),
        service_classes={faulty: byzantine} if byzantine is not None else None,
    )
    honest = [i for i in range(4) if fault == "none" or i != faulty]
    started = [i for i in range(4) if fault != "silent" or i != faulty]

    async def body(c: Cluster) -> None:
        if split is not None:
            hosts = [m.host for m in c.members]
            c.net.partition(
                [[hosts[i] for i in split], [h for i, h in enumerate(hosts) if i not in split]]
            )
        await trio.sleep(faulty_s)
        c.net.heal()
        c.net.set_faults(drop=0.0, duplicate=0.0, delay_ms=(1, 10))
        reached = max(c.members[i].height for i in honest)
        await c.wait_for(reached + 2, honest, timeout_s=90)

    async def main() -> None:
        await cluster.run(body, start=started)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    check_chains(cluster, honest)
