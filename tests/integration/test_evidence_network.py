"""Evidence end to end: four validators over the in-memory network on trio's mock clock
(``tests/integration/cluster.py``), one of them double-signing at height 2.

Only one honest validator (the witness) takes in the conflicting votes: it records the evidence,
checks it against the committed state, pools it and gossips it. The others learn it from the
evidence topic only, so the proposer that puts it into a block got it by gossip. Executing that
block removes the double signer from the validator set two heights later (committed by the
headers' ``next_validators_hash`` / ``validators_hash``) and burns its whole bond; the three
others keep finalizing without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node.consensus.blocks import Block, DuplicateVoteEvidence, SignedVote
from node.consensus.evidence import evidence_key
from node.consensus.state import SUPPLY_KEY, Supply, ValidatorBond, validator_key
from node.types import Address
from tests.helpers import DEFAULT_BOND
from tests.integration.cluster import (
    Cluster,
    Member,
    SignatureLedger,
    double_signer,
    seed_scheduler,
)
from tests.threads import InlineThreads

BYZ = 2  # the double signer's member (= validator) index
AT = 2  # the height it double-signs at
WITNESS = 1  # the only member whose engine takes in the conflicting votes


@pytest.fixture(autouse=True)
def ledger(threads: InlineThreads, monkeypatch: pytest.MonkeyPatch) -> SignatureLedger:
    seed_scheduler(0)
    book = SignatureLedger()
    book.install(monkeypatch)
    return book


def blocks_of(member: Member) -> list[Block]:
    view = member.chain.read_view()
    out = []
    for h in range(1, view.head_height + 1):
        block = view.get_block(h)
        assert block is not None
        out.append(block)
    return out


def evidence_in(member: Member) -> list[tuple[int, DuplicateVoteEvidence]]:
    """(block height, evidence) for every evidence item in ``member``'s chain."""
    return [(b.header.height, ev) for b in blocks_of(member) for ev in b.evidence]


def supply_at(member: Member, height: int) -> Supply:
    proof = member.chain.read_view().get_proof(SUPPLY_KEY, height)
    assert proof.value is not None
    return Supply.decode(proof.value)


def bond_of(member: Member, who: Address) -> int:
    raw = member.chain.read_view().get_state(validator_key(who))
    return 0 if raw is None else int(ValidatorBond.decode(raw).amount)


async def test_a_double_signer_is_caught_removed_and_slashed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cluster = Cluster(
        tmp_path, seed=41, delay_ms=(1, 20), service_classes={BYZ: double_signer({AT})}
    )
    honest = [i for i in range(4) if i != BYZ]
    byz = cluster.members[BYZ]
    assert byz.address is not None
    conflicting: list[SignedVote] = byz.service.double_signed  # type: ignore[attr-defined]
    found: dict[str, int] = {}

    async def body(c: Cluster) -> None:
        # Every other honest member drops the conflicting votes (from gossip and catch-up alike)
        # before its engine sees them: it can only learn the evidence from the evidence topic.
        for i in honest:
            if i == WITNESS:
                continue
            service = c.members[i].service
            real = service.deliver_votes

            def filtered(votes: Sequence[tuple[SignedVote, Any]], real: Any = real) -> bool:
                return bool(real([(v, s) for v, s in votes if v not in conflicting]))

            service.deliver_votes = filtered  # type: ignore[method-assign]
        with trio.fail_after(60):
            while not any(evidence_in(c.members[i]) for i in honest):
                await trio.sleep(0.1)
        included = min(h for i in honest for h, _ in evidence_in(c.members[i]))
        found["included"] = included
        # The set without it signs from included + 2 on; the three keep finalizing.
        await c.wait_for(included + 6, honest, timeout_s=90)

    await cluster.run(body)
    included = found["included"]
    assert included > AT
    assert conflicting

    # Every honest member holds the same chain, finalized by the stored commits.
    heads = [cluster.members[i].height for i in honest]
    low = min(heads)
    for i in honest:
        m = cluster.members[i]
        for h in range(1, low + 1):
            assert m.committed[h] == cluster.decisions[h]
    m = cluster.members[honest[0]]

    # The block at `included` carries the evidence: the double signer's votes at height AT.
    items = evidence_in(m)
    assert items and all(h >= included for h, _ in items)
    for _, ev in items:
        a, b = ev.vote_a.vote, ev.vote_b.vote
        assert a.validator == b.validator == byz.address
        assert (a.height, a.round, a.vote_type) == (b.height, b.round, b.vote_type)
        assert a.height == AT and a.block_hash != b.block_hash
    assert len({evidence_key(ev) for _, ev in items}) == len(items)  # one item per offence

    # Removed at included + 2: the headers commit it, and the chain's sets say so.
    blocks: dict[int, Block] = {int(b.header.height): b for b in blocks_of(m)}
    chain = m.chain
    before, after = chain.validator_set_at(included + 1), chain.validator_set_at(included + 2)
    assert before.is_member(byz.address) and len(before.addresses) == 4
    assert not after.is_member(byz.address) and len(after.addresses) == 3
    assert blocks[included + 1].header.validators_hash == before.hash()
    assert blocks[included + 1].header.next_validators_hash == after.hash()
    assert blocks[included + 2].header.validators_hash == after.hash()
    for h in range(included + 2, low + 1):
        assert blocks[h].header.validators_hash == after.hash()
        assert blocks[h].header.proposer != byz.address
    # Its precommits finalize nothing any more.
    for h in range(included + 3, low + 1):
        last = blocks[h].last_commit
        assert last is not None
        assert all(v.vote.validator != byz.address for v in last.precommits)

    # Slashed: the whole bond burned in the block that carried the evidence.
    assert bond_of(m, byz.address) == 0
    burned = int(supply_at(m, included).burned) - int(supply_at(m, included - 1).burned)
    assert burned == DEFAULT_BOND
    assert low >= included + 6

    # The witness found and published it; the proposer that included it took it from gossip.
    witness = cluster.members[WITNESS].p2p.gossip.stats
    assert witness.get("published_evidence", 0) >= 1
    proposer = blocks[included].header.proposer
    assert proposer != cluster.members[WITNESS].address
    by_proposer = next(cluster.members[i] for i in honest if cluster.members[i].address == proposer)
    assert by_proposer.p2p.gossip.stats.get("evidence_pooled", 0) >= 1
    for i in honest:
        if i != WITNESS:
            assert cluster.members[i].p2p.gossip.stats.get("published_evidence", 0) == 0
