"""Evidence (DESIGN §5 "Evidence"): equivocation checked against the set of its height, once,
within its age; the offender removed at h+2 and its bond burned; the pool; build_block."""

from __future__ import annotations

from dataclasses import replace

import pytest

from node.consensus.blocks import (
    Block,
    DuplicateVoteEvidence,
    SignedVote,
    VoteType,
    compute_evidence_root,
)
from node.consensus.evidence import (
    EvidencePool,
    evidence_key,
)
from node.consensus.state import (
    NS_EVIDENCE_SEEN,
    Unbonding,
    evidence_seen_key,
    unbonding_key,
    validator_key,
)
from node.consensus.validators import ValidatorSet
from node.errors import (
    DuplicateEvidence,
    EvidenceOfNonValidator,
    EvidenceSignatureError,
    ExpiredEvidence,
    InvalidBlock,
    InvalidEvidence,
    NonConflictingEvidence,
)
from node.storage.memory import MemoryKV
from node.types import Signature
from tests.consensus.authority_chain import (
    AUTH,
    EVIDENCE_MAX_AGE,
    VALIDATORS4,
    AuthorityChain,
    genesis1,
    genesis4,
)
from tests.helpers import (
    CHAIN_ID,
    GENESIS_TIME,
    addr,
    commit_next,
    key,
    make_commit,
    make_evidence,
    make_vote,
    open_chain,
    unbond_tx,
    validator_vote_tx,
)

BOND = genesis4().validators[0].bond


def vset(*indexes: int) -> ValidatorSet:
    return ValidatorSet.of({addr(i): 1 for i in indexes})


def with_evidence(block: Block, evidence: tuple[DuplicateVoteEvidence, ...]) -> Block:
    header = replace(block.header, evidence_root=compute_evidence_root(evidence))
    return Block(header, block.txs, evidence, block.last_commit)


def expect_rejected(c: AuthorityChain, ev: DuplicateVoteEvidence, error: type, match: str) -> None:
    """Left out by build_block, and a block carrying it is invalid, both with ``error``."""
    built = c.build(evidence=[ev])
    assert built.block.evidence == ()
    ((left, exc),) = built.rejected_evidence
    assert left == ev and type(exc) is error, exc
    assert match in exc.message, exc.message
    with pytest.raises(InvalidBlock, match="evidence 0: ") as info:
        c.apply(with_evidence(built.block, (ev,)))
    assert match in info.value.message
    assert isinstance(info.value.data, dict) and info.value.data["code"] == error.code


def chain_at(height: int, **genesis: object) -> AuthorityChain:
    c = AuthorityChain(genesis4(**genesis))
    c.advance_to(height)
    return c


# === accepted ======================================================================================


def test_evidence_slashes_the_bond_and_removes_the_validator_at_h_plus_2() -> None:
    c = chain_at(3)
    ev = make_evidence(7, 2)
    burned = c.supply().burned
    h = c.height
    built = c.step(evidence=[ev])
    assert built.block.evidence == (ev,)
    assert built.block.header.evidence_root == compute_evidence_root((ev,))
    assert c.supply().burned == burned + BOND
    assert validator_key(addr(7)) not in c.state
    assert evidence_seen_key(evidence_key(ev)) in c.state
    c.check_supply()
    c.advance_to(h + 3)
    assert c.headers[h].next_validators_hash == vset(*VALIDATORS4).hash()
    assert c.headers[h + 1].next_validators_hash == vset(0, 5, 6).hash()
    assert c.headers[h + 2].validators_hash == vset(0, 5, 6).hash()


def test_nil_against_a_block_is_equivocation_and_precommits_count() -> None:
    c = chain_at(3)
    ev = make_evidence(5, 1, 2, vote_type=VoteType.PRECOMMIT, hashes=(None, b"\x01" * 32))
    c.step(evidence=[ev])
    assert not c.next_set().is_member(addr(5))


def test_evidence_of_the_current_height_is_accepted() -> None:
    c = chain_at(3)
    c.step(evidence=[make_evidence(6, 3, 1)])  # round 0 of height 3 failed; round 1 commits


def test_evidence_removes_below_the_floor() -> None:
    c = chain_at(2, validator_floor=4)
    c.step(evidence=[make_evidence(7, 1)])
    assert c.next_set() == vset(0, 5, 6)


def test_the_last_validator_stays_but_loses_its_bond() -> None:
    c = AuthorityChain(genesis1())
    c.advance_to(2)
    burned = c.supply().burned
    c.step(evidence=[make_evidence(0, 1)])
    assert c.next_set() == vset(0)  # an empty set could never sign again
    assert c.supply().burned == burned + BOND
    c.step()
    c.check_supply()


def test_evidence_against_an_unbonding_validator_cancels_the_release() -> None:
    c = chain_at(2)
    h = c.height
    c.step([unbond_tx(7, nonce=0)])
    release = Unbonding.decode(c.state[unbonding_key(addr(7))]).release_height
    assert release == h + 2 + AUTH.unbonding_heights
    c.step(evidence=[make_evidence(7, h + 1)])  # it still signed h + 1
    assert unbonding_key(addr(7)) not in c.state and validator_key(addr(7)) not in c.state
    balance = c.balance(7)
    c.advance_to(release + 2)
    assert c.balance(7) == balance
    c.check_supply()


def test_evidence_is_checked_against_the_set_of_its_height() -> None:
    c = chain_at(2)
    h = c.height
    c.step([validator_vote_tx(v, 7, 2, nonce=0) for v in (0, 5, 6)])  # remove 7 at h+2
    c.advance_to(h + 3)
    assert not c.current_set().is_member(addr(7))
    # 7 signed height h+1 as a validator: still punishable (its bond is still locked).
    burned = c.supply().burned
    c.step(evidence=[make_evidence(7, h + 1)])
    assert c.supply().burned == burned + BOND
    # At h+2 it was no validator: its double votes there are no evidence.
    expect_rejected(
        c, make_evidence(7, h + 2), EvidenceOfNonValidator, f"is not a validator of height {h + 2}"
    )


# === rejected ======================================================================================


def test_evidence_is_accepted_once() -> None:
    c = chain_at(3)
    ev = make_evidence(7, 2)
    c.step(evidence=[ev])
    expect_rejected(c, ev, DuplicateEvidence, "was already processed")
    # Another pair for the same offence (validator, height, round, type) is the same offence.
    other = make_evidence(7, 2, hashes=(b"\x0c" * 32, b"\x0d" * 32))
    expect_rejected(c, other, DuplicateEvidence, "was already processed")


def test_the_same_evidence_twice_in_one_block() -> None:
    c = chain_at(3)
    ev = make_evidence(7, 2)
    built = c.build(evidence=[ev, ev])
    assert built.block.evidence == (ev,)
    assert [type(e) for _, e in built.rejected_evidence] == [DuplicateEvidence]
    with pytest.raises(InvalidBlock, match=r"evidence 1: .*already processed"):
        c.apply(with_evidence(built.block, (ev, ev)))


def test_evidence_older_than_the_max_age_is_rejected() -> None:
    c = chain_at(2 + EVIDENCE_MAX_AGE)
    c.step(evidence=[make_evidence(5, 2)])  # exactly evidence_max_age old: accepted
    old = make_evidence(6, 2)
    expect_rejected(c, old, ExpiredEvidence, "evidence_max_age is 4")


def test_processed_keys_age_out_of_state() -> None:
    c = chain_at(3)
    ev = make_evidence(7, 2)
    c.step(evidence=[ev])
    seen = evidence_seen_key(evidence_key(ev))
    c.advance_to(2 + EVIDENCE_MAX_AGE + 1)
    assert seen in c.state  # needed while the evidence could still be offered
    c.step()
    assert not any(k.startswith(NS_EVIDENCE_SEEN) for k in c.state)
    expect_rejected(c, ev, ExpiredEvidence, "heights old")


def test_evidence_from_a_later_height_is_rejected() -> None:
    c = chain_at(3)
    expect_rejected(c, make_evidence(7, 4), InvalidEvidence, "from a later height")


def test_evidence_of_a_non_validator_is_rejected() -> None:
    c = chain_at(3)
    expect_rejected(
        c, make_evidence(1, 2), EvidenceOfNonValidator, "is not a validator of height 2"
    )


def _pair(a: SignedVote, b: SignedVote) -> DuplicateVoteEvidence:
    first, second = sorted((a, b), key=lambda v: v.encode())
    return DuplicateVoteEvidence(first, second)


T = GENESIS_TIME + 1
HA, HB = b"\x0a" * 32, b"\x0b" * 32


@pytest.mark.parametrize(
    ("ev", "match"),
    [
        (
            _pair(make_vote(7, HA, 2, time_ms=T), make_vote(7, HA, 2, time_ms=T + 1)),
            "for the same block",
        ),
        (_pair(make_vote(7, HA, 2, 0, time_ms=T), make_vote(7, HB, 2, 1, time_ms=T)), "rounds"),
        (_pair(make_vote(7, HA, 1, time_ms=T), make_vote(7, HB, 2, time_ms=T)), "heights"),
        (
            _pair(
                make_vote(7, HA, 2, time_ms=T, vote_type=VoteType.PREVOTE),
                make_vote(7, HB, 2, time_ms=T, vote_type=VoteType.PRECOMMIT),
            ),
            "different types",
        ),
        (_pair(make_vote(7, HA, 2, time_ms=T), make_vote(6, HB, 2, time_ms=T)), "validators"),
        (
            _pair(
                make_vote(7, HA, 2, time_ms=T, vote_type=3),
                make_vote(7, HB, 2, time_ms=T, vote_type=3),
            ),
            "neither prevote nor precommit",
        ),
        (
            DuplicateVoteEvidence(make_evidence(7, 2).vote_b, make_evidence(7, 2).vote_a),
            "encoding order",
        ),
    ],
)
def test_non_conflicting_votes_are_no_evidence(ev: DuplicateVoteEvidence, match: str) -> None:
    c = chain_at(3)
    expect_rejected(c, ev, NonConflictingEvidence, match)


def test_badly_signed_evidence_is_rejected() -> None:
    c = chain_at(3)
    good = make_evidence(7, 2)
    # vote_b claims validator 7 but is signed by 6.
    forged_vote = make_vote(
        6, b"\x0f" * 32, 2, time_ms=T, vote_type=VoteType.PREVOTE, validator=addr(7)
    )
    expect_rejected(
        c, _pair(good.vote_a, forged_vote), EvidenceSignatureError, "not signed by its validator"
    )
    garbage = SignedVote(good.vote_b.vote, Signature(b"\x01" * 64 + b"\x05"))
    ev = DuplicateVoteEvidence(good.vote_a, garbage)
    expect_rejected(c, ev, EvidenceSignatureError, "vote_b")
    other_chain = make_evidence(7, 2, chain_id=CHAIN_ID + 1)
    expect_rejected(c, other_chain, EvidenceSignatureError, "not signed by its validator")


def test_more_evidence_than_the_block_cap() -> None:
    c = chain_at(3)
    evs = [make_evidence(5, 2, r) for r in range(AUTH.max_block_evidence + 1)]
    built = c.build(evidence=evs)
    assert built.block.evidence == tuple(evs[: AUTH.max_block_evidence])
    assert built.rejected_evidence == []  # the rest waits for the next block
    with pytest.raises(InvalidBlock, match="5 evidence items exceed max_block_evidence 4"):
        c.apply(with_evidence(built.block, tuple(evs)))


# === the pool and build_block ======================================================================


def test_build_block_includes_pool_evidence_and_the_block_applies() -> None:
    c = chain_at(4)
    pool = EvidencePool(EVIDENCE_MAX_AGE)
    later, earlier = make_evidence(6, 3), make_evidence(7, 2)
    assert pool.add(later, head_height=3) and pool.add(earlier, head_height=3)
    assert not pool.add(earlier, head_height=3)  # de-duplicated
    pending = pool.pending(10, head_height=3)
    assert pending == [earlier, later]  # oldest first
    built = c.step(evidence=pending)
    assert built.block.evidence == (earlier, later)
    pool.update(built.block.evidence, head_height=4)
    assert len(pool) == 0
    assert not pool.add(earlier, head_height=4)  # remembered: gossip does not bring it back
    assert c.next_set() == vset(0, 5)
    c.check_supply()


def test_pool_rejects_malformed_and_old_evidence_and_is_bounded() -> None:
    pool = EvidencePool(max_age=4, max_items=2)
    with pytest.raises(NonConflictingEvidence):
        pool.add(make_evidence(7, 2, hashes=(HA, HA)), head_height=3)
    with pytest.raises(ExpiredEvidence):
        pool.add(make_evidence(7, 2), head_height=6)
    assert pool.add(make_evidence(7, 2), head_height=5)
    assert make_evidence(7, 2) in pool
    assert pool.add(make_evidence(6, 3), head_height=5)
    assert not pool.add(make_evidence(5, 4), head_height=5)  # full
    assert pool.pending(1, head_height=5) == [make_evidence(7, 2)]
    pool.prune(6)  # height 2 can no longer go into block 7
    assert pool.pending(10, head_height=6) == [make_evidence(6, 3)]
    future = make_evidence(5, 8)
    assert pool.add(future, head_height=6)
    assert pool.pending(10, head_height=6) == [make_evidence(6, 3)]  # height 8 waits
    assert pool.pending(10, head_height=7)[-1] == future
    pool.mark_done([future])
    rejected = make_evidence(6, 3)
    pool.mark_done([rejected])
    assert len(pool) == 0 and not pool.add(rejected, head_height=6)
    with pytest.raises(ValueError):
        EvidencePool(max_age=0)


def test_chain_service_checks_builds_and_commits_evidence() -> None:
    g = genesis4()
    chain = open_chain(MemoryKV(), g)
    for _ in range(2):
        commit_next(chain, VALIDATORS4)
    ev = make_evidence(7, 2)
    chain.check_evidence(ev)
    with pytest.raises(EvidenceOfNonValidator):
        chain.check_evidence(make_evidence(1, 2))
    height = chain.head_height + 1
    proposer = chain.validator_set().proposer(height, 0)
    last = chain.store.get_commit(chain.head_height)
    built = chain.build(0, proposer, last, [], [ev])
    assert built.block.evidence == (ev,)
    commit = make_commit(
        built.block.hash(), height, 0, VALIDATORS4, time_ms=built.block.header.time + 1_000
    )
    chain.commit(built.block, commit)
    with pytest.raises(DuplicateEvidence):
        chain.check_evidence(ev)
    assert chain.validator_context(height + 1).next == vset(0, 5, 6)
    commit_next(chain, VALIDATORS4)
    assert chain.validator_set() == vset(0, 5, 6)
    assert chain.validator_context(height + 2).previous == vset(*VALIDATORS4)
    commit_next(chain, (0, 5, 6))
    assert key(7).address not in chain.validator_set().addresses
