"""A cluster of validators on one in-memory network under trio's mock clock (test harness).

Each ``Member`` runs the real stack: ``ChainService`` over a ``MemoryKV``, a ``Mempool``, the
``ConsensusService`` with its WAL file, and ``ConsensusP2P`` (gossip + catch-up) over a
``MemoryHost`` of one ``MemoryNetwork``. A member can crash (its tasks are cancelled mid-flight,
its host stops) and restart over the same database and WAL file.

Invariants checked as they happen:

* **agreement** — ``Cluster.decisions`` keeps the first block committed at each height and every
  later commit at that height must be the same block;
* **no double signing by honest members** — ``SignatureLedger`` watches every sign-state guarded
  signature of the consensus service: one message per (validator, height, round, step).

``double_signer(heights)`` makes a byzantine member: at those heights it signs (bypassing its
sign-state guard) and publishes a second, conflicting vote for every vote it signs.

Tests must use the ``threads`` fixture (worker-thread work inline: deterministic on the mock
clock) and ``autojump_clock``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio

import node.consensus_service as cs
from node import crypto
from node.chain import ChainService
from node.consensus import engine as eng
from node.consensus.blocks import Block, Proposal, SignedProposal, SignedVote, Vote, sign_vote
from node.consensus.mempool import Mempool
from node.consensus.signstate import SignState, Step, step_of_vote
from node.consensus_service import ConsensusService
from node.genesis import Genesis
from node.p2p.catchup import CatchupSettings, ConsensusP2P
from node.p2p.gossip import GossipSettings
from node.p2p.memory import MemoryHost, MemoryNetwork
from node.storage import MemoryKV
from node.types import Address, Hash32
from tests.helpers import GENESIS_TIME, make_genesis, open_chain, validator_keys, verified

Slot = tuple[Address, int, int, int]  # (validator, height, round, step)


def clock_ms() -> int:
    """Vote and block times follow the mock clock; mock time 0 is the genesis time."""
    return GENESIS_TIME + round(trio.current_time() * 1000)


def seed_scheduler(seed: int) -> None:
    """Make trio's own scheduling choices (it reverses batches of runnable tasks at random)
    repeatable, so a failing run can be replayed."""
    rng = getattr(getattr(trio, "_core", None), "_run", None)
    r = getattr(rng, "_r", None)
    if r is not None:
        r.seed(seed)


@dataclass
class SignatureLedger:
    """Every guarded signature of every honest member: one message per slot, ever."""

    by_slot: dict[Slot, bytes] = field(default_factory=dict)
    # Called right after a signature (before the WAL append): a test can crash the member here.
    on_sign: Callable[[Slot, Vote | Proposal], None] | None = None

    def record(self, slot: Slot, encoded: bytes, what: Vote | Proposal) -> None:
        digest = crypto.sha256(encoded)
        first = self.by_slot.setdefault(slot, digest)
        assert first == digest, f"two different signed messages for {slot}"
        if self.on_sign is not None:
            self.on_sign(slot, what)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_vote = cs.sign_vote_guarded
        real_proposal = cs.sign_proposal_guarded

        def sign_vote(
            k: crypto.PrivateKey, chain_id: int, previous: SignState | None, vote: Vote
        ) -> tuple[SignedVote, SignState]:
            signed, state = real_vote(k, chain_id, previous, vote)
            slot = (k.address, vote.height, vote.round, int(step_of_vote(vote)))
            self.record(slot, vote.encode(), vote)
            return signed, state

        def sign_proposal(
            k: crypto.PrivateKey, chain_id: int, previous: SignState | None, proposal: Proposal
        ) -> tuple[SignedProposal, SignState]:
            signed, state = real_proposal(k, chain_id, previous, proposal)
            slot = (k.address, proposal.height, proposal.round, int(Step.PROPOSE))
            self.record(slot, proposal.encode(), proposal)
            return signed, state

        monkeypatch.setattr(cs, "sign_vote_guarded", sign_vote)
        monkeypatch.setattr(cs, "sign_proposal_guarded", sign_proposal)


def double_signer(heights: Collection[int]) -> type[ConsensusService]:
    """A consensus service that equivocates at ``heights``: for every prevote and precommit it
    signs there, it also signs (with no sign-state guard) and publishes one for the other value
    of the same (height, round) — nil for a block, a made-up block hash for nil. The conflicting
    votes are kept in ``double_signed``."""
    chosen = frozenset(heights)

    class DoubleSigner(ConsensusService):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.double_signed: list[SignedVote] = []

        async def _sign_vote(self, action: eng.SignVote) -> None:
            await super()._sign_vote(action)
            vote = action.vote
            if vote.height not in chosen:
                return
            assert self.key is not None and self.publisher is not None
            value = None if vote.block_hash is not None else Hash32(b"\x66" * 32)
            other = sign_vote(self.key, self.chain.chain.chain_id, replace(vote, block_hash=value))
            self.double_signed.append(other)
            self.publisher.publish_vote(other)

    return DoubleSigner


# Fast repair for tests: mock time is free, and shorter loops keep the runs short.
GOSSIP = GossipSettings(republish_interval_s=0.5)
CATCHUP = CatchupSettings(interval_s=0.3, pull_delay_s=0.05, pull_interval_s=0.15)


class Member:
    """One validator (or observer) of the cluster; restartable over the same KV and WAL."""

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        key: crypto.PrivateKey | None,
        wal_path: Path,
        service_cls: type[ConsensusService] = ConsensusService,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.key = key
        self.wal_path = wal_path
        self.service_cls = service_cls
        self.kv = MemoryKV()
        self.host: MemoryHost = cluster.net.add_host(name)
        self.committed: dict[int, Hash32] = {}
        self.commit_times: dict[int, float] = {}
        self.scope: trio.CancelScope | None = None
        self.running = False
        self.restarts = 0
        self._build()

    @property
    def address(self) -> Address | None:
        return None if self.key is None else self.key.address

    def _build(self) -> None:
        self.chain: ChainService = open_chain(self.kv, self.cluster.genesis)
        self.mempool = Mempool(self.cluster.genesis.chain_id)
        self.service = self.service_cls(
            self.chain,
            self.mempool,
            self.key,
            self.wal_path,
            clock_ms=clock_ms,
            on_commit=self._on_commit,
        )
        self.p2p = ConsensusP2P(
            self.host,
            self.chain,
            self.mempool,
            self.service,
            gossip_settings=self.cluster.gossip_settings,
            catchup_settings=self.cluster.catchup_settings,
        )

    def _on_commit(self, block: Block) -> None:
        height = block.header.height
        assert height not in self.committed, f"{self.name} committed height {height} twice"
        self.committed[height] = block.hash()
        self.commit_times[height] = trio.current_time()
        self.cluster.record_commit(self, height, block.hash())

    @property
    def height(self) -> int:
        return self.chain.head_height

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self.scope = scope
            self.running = True
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.p2p.run)
                    await nursery.start(self.service.run)
                    task_status.started()
            finally:
                self.running = False

    async def start(self) -> None:
        assert self.cluster.nursery is not None
        await self.cluster.nursery.start(self._run)

    def crash(self) -> None:
        """Cancel every task of the member now and stop its host (messages to it are lost)."""
        assert self.scope is not None
        self.scope.cancel()
        self.cluster.net.stop(self.host)
        self.chain.close()

    async def restart(self) -> None:
        """Start again over the same database and WAL file (a fresh process)."""
        while self.running:  # the crashed tasks unwind (the WAL file is closed)
            await trio.sleep(0)
        self.cluster.net.start(self.host)
        self.restarts += 1
        self._build()
        await self.start()

    def submit(self, raw: bytes) -> None:
        """A client submitting a transaction to this member (admitted, then gossiped)."""
        self.mempool.add(verified(raw), self.chain.state_view(), self.chain.params)
        self.p2p.gossip.broadcast_transaction(raw)


class Cluster:
    """``n`` validators (dev keys 0..n-1) and optional observers on one ``MemoryNetwork``."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        n: int = 4,
        seed: int = 1,
        genesis: Genesis | None = None,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay_ms: tuple[float, float] = (1.0, 10.0),
        service_classes: dict[int, type[ConsensusService]] | None = None,
        gossip_settings: GossipSettings = GOSSIP,
        catchup_settings: CatchupSettings = CATCHUP,
        **genesis_overrides: Any,
    ) -> None:
        self.genesis = genesis or make_genesis(
            funded=4, validators=tuple(range(n)), **genesis_overrides
        )
        self.net = MemoryNetwork(seed, drop=drop, duplicate=duplicate, delay_ms=delay_ms)
        self.gossip_settings = gossip_settings
        self.catchup_settings = catchup_settings
        self.decisions: dict[int, Hash32] = {}
        self.nursery: trio.Nursery | None = None
        # Ordered by address, as the validator set is: member i is validator index i.
        keys = sorted(validator_keys(self.genesis), key=lambda k: k.address)
        classes = service_classes or {}
        self.members = [
            Member(self, f"v{i}", k, tmp_path / f"wal-{i}", classes.get(i, ConsensusService))
            for i, k in enumerate(keys)
        ]
        assert [m.address for m in self.members] == list(self.genesis.validator_set().addresses)

    def record_commit(self, member: Member, height: int, block_hash: Hash32) -> None:
        first = self.decisions.setdefault(height, block_hash)
        assert first == block_hash, (
            f"disagreement at height {height}: {member.name} committed {block_hash.hex()[:16]}, "
            f"another member {first.hex()[:16]}"
        )

    @staticmethod
    def proposer_index(height: int, round_: int = 0, n: int = 4) -> int:
        """The member index of the proposer of (height, round): round-robin by height + round
        over the validators ordered by address (``ValidatorSet.proposer``)."""
        return (height + round_) % n

    async def run(self, body: Callable[[Cluster], Any], *, start: list[int] | None = None) -> None:
        """Start the network and the members (all, or those in ``start``), run ``body``, then
        cancel everything."""
        async with self.net, trio.open_nursery() as nursery:
            self.nursery = nursery
            for i, m in enumerate(self.members):
                if start is None or i in start:
                    await m.start()
            await body(self)
            nursery.cancel_scope.cancel()

    async def wait_for(
        self, height: int, members: list[int] | None = None, *, timeout_s: float = 60.0
    ) -> None:
        """Until every listed member (default: all running) has committed ``height``."""
        chosen = [self.members[i] for i in members] if members is not None else self.members
        with trio.fail_after(timeout_s):
            while not all(m.height >= height for m in chosen if members or m.running):
                await trio.sleep(0.05)

    def heights(self) -> list[int]:
        return [m.height for m in self.members]
