"""The validator set by vote (DESIGN §5 "Authority"): bonds, add/remove votes with expiry and the
floor, exits with the unbonding period, and every change landing at h+2 in the headers."""

from __future__ import annotations

import pytest

from node.consensus.fees import compute_cost
from node.consensus.state import (
    UNBONDING_QUEUE,
    VALSET_EPOCHS_KEY,
    DictView,
    Overlay,
    Unbonding,
    ValidatorBond,
    unbonding_key,
    validator_key,
    validator_tally_key,
)
from node.consensus.transition import (
    BlockContext,
    ValidatorContext,
    apply_transaction,
    build_block,
)
from node.consensus.txs import (
    TxKind,
    ValidatorVote,
    VoteAction,
    verify_transaction,
)
from node.consensus.validators import (
    EpochRange,
    ValidatorHistoryError,
    ValidatorSet,
    oldest_kept_height,
    validator_set_at,
)
from node.errors import (
    BelowValidatorFloor,
    BondTooSmall,
    BondUnbonding,
    DuplicateValidatorVote,
    InsufficientFunds,
    InvalidBlock,
    InvalidBody,
    InvalidVoteSubject,
    NotAValidator,
    NotBonded,
)
from node.genesis import Genesis, build_genesis_state
from node.storage.memory import MemoryKV
from node.types import Address, Amount
from tests.consensus.authority_chain import (
    AUTH,
    CANDIDATE,
    EVIDENCE_MAX_AGE,
    MIN_BOND,
    VALIDATORS4,
    AuthorityChain,
    fund,
    genesis1,
    genesis4,
)
from tests.helpers import (
    DEFAULT_FEE,
    GENESIS_TIME,
    addr,
    bond_tx,
    commit_next,
    make_authority,
    open_chain,
    sign_raw_tx,
    unbond_tx,
    validator_vote_tx,
)

ADD, REMOVE = VoteAction.ADD, VoteAction.REMOVE


def ctx_for(genesis: Genesis, height: int = 1) -> BlockContext:
    return BlockContext(genesis.chain_params, genesis.votable_params, height, GENESIS_TIME, addr(0))


def overlay_of(genesis: Genesis) -> Overlay:
    return Overlay(DictView(build_genesis_state(genesis)))


def vset(*indexes: int) -> ValidatorSet:
    return ValidatorSet.of({addr(i): 1 for i in indexes})


# === BOND ==========================================================================================


def test_bond_locks_the_amount_and_charges_a_new_record() -> None:
    c = AuthorityChain(genesis4())
    before = c.balance(CANDIDATE)
    raw = bond_tx(CANDIDATE, MIN_BOND, nonce=0)
    built = c.step([raw])
    receipt = built.result.receipts[0]
    assert receipt.burned == compute_cost(c.params, TxKind.BOND, len(raw), new_accounts=1)
    assert c.balance(CANDIDATE) == before - MIN_BOND - DEFAULT_FEE
    assert ValidatorBond.decode(c.state[validator_key(addr(CANDIDATE))]).amount == MIN_BOND
    assert [e.name for e in receipt.events] == ["bond", "fee"]
    # A top-up adds to the bond and creates no record.
    top = bond_tx(CANDIDATE, 5, nonce=1)
    built = c.step([top])
    assert built.result.receipts[0].burned == compute_cost(c.params, TxKind.BOND, len(top))
    assert ValidatorBond.decode(c.state[validator_key(addr(CANDIDATE))]).amount == MIN_BOND + 5
    assert not c.next_set().is_member(addr(CANDIDATE))  # a candidate, not a validator
    c.check_supply()


def test_bond_below_the_minimum_is_rejected() -> None:
    g = genesis4()
    with pytest.raises(BondTooSmall, match=f"below min_validator_bond {MIN_BOND}"):
        apply_transaction(
            overlay_of(g),
            verify_transaction(bond_tx(CANDIDATE, MIN_BOND - 1, nonce=0)),
            ctx_for(g),
        )


def test_bond_of_zero_is_an_invalid_body() -> None:
    with pytest.raises(InvalidBody, match="amount must be positive"):
        verify_transaction(bond_tx(CANDIDATE, 0, nonce=0))


def test_bond_beyond_the_balance_is_rejected() -> None:
    g = genesis4(balances={**fund(10**21), CANDIDATE: MIN_BOND})
    with pytest.raises(InsufficientFunds, match="cannot pay bond"):
        apply_transaction(
            overlay_of(g), verify_transaction(bond_tx(CANDIDATE, MIN_BOND, nonce=0)), ctx_for(g)
        )


def test_bond_while_unbonding_is_rejected() -> None:
    c = AuthorityChain(genesis4())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    c.step([unbond_tx(CANDIDATE, nonce=1)])
    built = c.build([bond_tx(CANDIDATE, MIN_BOND, nonce=2)])
    ((_, error),) = built.rejected
    assert isinstance(error, BondUnbonding)
    assert "unbonding until height" in error.message


# === votes: add ===================================================================================


def test_add_passes_with_more_than_half_and_lands_at_h_plus_2() -> None:
    c = AuthorityChain(genesis4())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    old = vset(*VALIDATORS4)
    new = vset(*VALIDATORS4, CANDIDATE)
    # Two of four is not more than half.
    c.step([validator_vote_tx(0, CANDIDATE, nonce=0), validator_vote_tx(5, CANDIDATE, nonce=0)])
    assert c.next_set() == old
    h = c.height
    built = c.step([validator_vote_tx(6, CANDIDATE, nonce=0)])  # three of four: passes in h
    events = [e.name for e in built.result.receipts[0].events]
    assert events == ["validator_vote", "validator_set_change", "fee"]
    assert validator_tally_key(addr(CANDIDATE), ADD) not in c.state
    hdr_h = c.headers[h]
    assert hdr_h.validators_hash == old.hash() and hdr_h.next_validators_hash == old.hash()
    c.step()
    hdr_h1 = c.headers[h + 1]
    assert hdr_h1.validators_hash == old.hash()
    assert hdr_h1.next_validators_hash == new.hash()  # committed one block ahead
    c.step()  # block h+2 is signed (its last commit and proposer) with the new set in force
    hdr_h2 = c.headers[h + 2]
    assert hdr_h2.validators_hash == new.hash() and hdr_h2.next_validators_hash == new.hash()
    c.step()  # the new validator's precommit counts in the last commit of h+3
    assert c.last_commit is not None
    assert len(c.last_commit.precommits) == 5
    # The history answers for every height.
    view = c.view()
    assert validator_set_at(view, h + 1) == old and validator_set_at(view, h + 2) == new
    c.check_supply()


def test_a_single_validator_adds_alone() -> None:
    c = AuthorityChain(genesis1())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    h = c.height
    c.step([validator_vote_tx(0, CANDIDATE, nonce=0)])
    c.advance_to(h + 3)
    assert c.headers[h + 2].validators_hash == vset(0, CANDIDATE).hash()


def test_votes_expire_after_vote_expiry_heights() -> None:
    c = AuthorityChain(genesis4())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    h = c.height
    c.step([validator_vote_tx(0, CANDIDATE, nonce=0), validator_vote_tx(5, CANDIDATE, nonce=0)])
    key = validator_tally_key(addr(CANDIDATE), ADD)
    assert key in c.state
    # The votes count in blocks below h + 3; at h + 3 the queue drops them and the tally goes.
    c.advance_to(h + 3)
    assert key in c.state
    c.step()
    assert key not in c.state
    # A third vote alone now does not pass; the expired voters may vote again.
    c.step([validator_vote_tx(6, CANDIDATE, nonce=0)])
    assert not c.next_set().is_member(addr(CANDIDATE))
    c.step([validator_vote_tx(0, CANDIDATE, nonce=1)])
    assert not c.next_set().is_member(addr(CANDIDATE))
    c.step([validator_vote_tx(5, CANDIDATE, nonce=1)])
    assert c.next_set().is_member(addr(CANDIDATE))


def test_an_expired_vote_does_not_count_even_before_the_queue_runs() -> None:
    c = AuthorityChain(genesis4())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    h = c.height
    c.step([validator_vote_tx(0, CANDIDATE, nonce=0)])
    c.advance_to(h + 2)
    c.step([validator_vote_tx(5, CANDIDATE, nonce=0)])  # at h+2: 0's vote still counts
    c.step([validator_vote_tx(6, CANDIDATE, nonce=0)])  # at h+3: 0's vote has expired
    assert not c.next_set().is_member(addr(CANDIDATE))


def test_one_vote_per_voter_subject_and_action() -> None:
    c = AuthorityChain(genesis4())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0), validator_vote_tx(0, CANDIDATE, nonce=0)])
    built = c.build([validator_vote_tx(0, CANDIDATE, nonce=1)])
    ((_, error),) = built.rejected
    assert isinstance(error, DuplicateValidatorVote)
    assert "already voted to add" in error.message


def test_a_vote_from_outside_the_set_is_rejected() -> None:
    g = genesis4()
    with pytest.raises(NotAValidator, match="is not a validator of height 1"):
        apply_transaction(
            overlay_of(g),
            verify_transaction(validator_vote_tx(1, 5, REMOVE, nonce=0)),
            ctx_for(g),
        )


@pytest.mark.parametrize(
    ("subject", "action", "message"),
    [
        (CANDIDATE, ADD, "has no bond"),
        (5, ADD, "is already a validator"),
        (CANDIDATE, REMOVE, "is not a validator"),
    ],
)
def test_a_vote_on_a_wrong_subject_is_rejected(subject: int, action: int, message: str) -> None:
    g = genesis4()
    with pytest.raises(InvalidVoteSubject, match=message):
        apply_transaction(
            overlay_of(g),
            verify_transaction(validator_vote_tx(0, subject, action, nonce=0)),
            ctx_for(g),
        )


def test_an_unknown_action_is_an_invalid_body() -> None:
    raw = sign_raw_tx(
        0, kind=TxKind.VALIDATOR_VOTE, body=ValidatorVote(Address(addr(5)), 3), nonce=0
    )
    with pytest.raises(InvalidBody, match="unknown action 3"):
        verify_transaction(raw)


def test_adding_an_unbonding_or_under_bonded_candidate_is_rejected() -> None:
    # Validator 0 holds a genesis bond below the minimum: once removed it cannot be voted back.
    g = genesis4(bond=10, validators=(0,))
    c = AuthorityChain(g)
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0), validator_vote_tx(0, CANDIDATE, nonce=0)])
    c.advance_to(c.height + 2)
    # Both vote 0 out (the set of 2 may shrink to the floor of 1).
    c.step(
        [
            validator_vote_tx(0, 0, REMOVE, nonce=1),
            validator_vote_tx(CANDIDATE, 0, REMOVE, nonce=1),
        ]
    )
    c.advance_to(c.height + 2)
    assert c.current_set() == vset(CANDIDATE)
    built = c.build([validator_vote_tx(CANDIDATE, 0, ADD, nonce=2)])
    ((_, error),) = built.rejected
    assert isinstance(error, InvalidVoteSubject) and "below min_validator_bond" in error.message
    # An unbonding candidate cannot be added either.
    c.step([bond_tx(1, MIN_BOND, nonce=0)])
    c.step([unbond_tx(1, nonce=1)])
    built = c.build([validator_vote_tx(CANDIDATE, 1, ADD, nonce=2)])
    ((_, error),) = built.rejected
    assert isinstance(error, InvalidVoteSubject) and "is unbonding" in error.message


# === votes: remove, the floor =====================================================================


def test_remove_by_vote_keeps_the_bond_locked() -> None:
    c = AuthorityChain(genesis4())
    h = c.height
    c.step([validator_vote_tx(v, 7, REMOVE, nonce=0) for v in (0, 5, 6)])
    c.advance_to(h + 3)
    assert c.headers[h + 1].next_validators_hash == vset(0, 5, 6).hash()
    assert c.headers[h + 2].validators_hash == vset(0, 5, 6).hash()
    assert validator_key(addr(7)) in c.state  # a candidate again, bond still locked
    c.check_supply()


def test_removal_below_the_floor_is_rejected() -> None:
    g = genesis4(validator_floor=4)
    with pytest.raises(BelowValidatorFloor, match="below the floor of 4"):
        apply_transaction(
            overlay_of(g),
            verify_transaction(validator_vote_tx(0, 7, REMOVE, nonce=0)),
            ctx_for(g),
        )


def test_the_floor_counts_removals_already_decided() -> None:
    c = AuthorityChain(genesis4(validator_floor=3))
    c.step([validator_vote_tx(v, 7, REMOVE, nonce=0) for v in (0, 5, 6)])
    built = c.build([validator_vote_tx(0, 6, REMOVE, nonce=1), unbond_tx(5, nonce=1)])
    assert [type(e) for _, e in built.rejected] == [BelowValidatorFloor, BelowValidatorFloor]


# === UNBOND =======================================================================================


def test_a_validator_exit_leaves_at_h_plus_2_and_the_bond_returns_after_the_period() -> None:
    g = genesis4()
    c = AuthorityChain(g)
    bond = g.validators[0].bond
    h = c.height
    c.step([unbond_tx(7, nonce=0)])
    release = h + 2 + AUTH.unbonding_heights
    assert Unbonding.decode(c.state[unbonding_key(addr(7))]).release_height == release
    assert c.headers[h].next_validators_hash == vset(*VALIDATORS4).hash()
    c.step()
    assert c.headers[h + 1].next_validators_hash == vset(0, 5, 6).hash()
    c.advance_to(release)  # block release - 1 is committed: not yet
    balance = c.balance(7)
    assert validator_key(addr(7)) in c.state
    c.step()  # block `release` returns it
    assert c.balance(7) == balance + bond
    assert validator_key(addr(7)) not in c.state and unbonding_key(addr(7)) not in c.state
    assert UNBONDING_QUEUE.pending(c.view()) == 0
    c.check_supply()
    # Released: it may bond again.
    c.step([bond_tx(7, MIN_BOND, nonce=1)])


def test_a_candidate_exit_returns_the_bond() -> None:
    c = AuthorityChain(genesis4())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    h = c.height
    built = c.step([unbond_tx(CANDIDATE, nonce=1)])
    assert [e.name for e in built.result.receipts[0].events] == ["unbond", "fee"]
    before = c.balance(CANDIDATE)
    c.advance_to(h + 2 + AUTH.unbonding_heights + 1)
    assert c.balance(CANDIDATE) == before + MIN_BOND


def test_unbond_without_a_bond_or_twice_is_rejected() -> None:
    g = genesis4()
    with pytest.raises(NotBonded, match="has no bond"):
        apply_transaction(
            overlay_of(g), verify_transaction(unbond_tx(CANDIDATE, nonce=0)), ctx_for(g)
        )
    c = AuthorityChain(g)
    c.step([unbond_tx(7, nonce=0)])
    built = c.build([unbond_tx(7, nonce=1)])
    ((_, error),) = built.rejected
    assert isinstance(error, BondUnbonding) and "already unbonding" in error.message


def test_exit_below_the_floor_is_rejected() -> None:
    g = genesis1()
    with pytest.raises(BelowValidatorFloor, match="leaving would take the validator set to 0"):
        apply_transaction(overlay_of(g), verify_transaction(unbond_tx(0, nonce=0)), ctx_for(g))


def test_releases_follow_the_per_block_cap() -> None:
    auth = make_authority(
        min_validator_bond=Amount(MIN_BOND),
        vote_expiry_heights=3,
        unbonding_heights=6,
        max_queue_work_per_block=2,
        max_block_evidence=4,
    )
    g = genesis4(authority=auth, funded=6)
    c = AuthorityChain(g)
    stakers = (1, 2, 3, 4, CANDIDATE)
    c.step([bond_tx(s, MIN_BOND, nonce=0) for s in stakers])
    h = c.height
    c.step([unbond_tx(s, nonce=1) for s in stakers])
    release = h + 2 + auth.unbonding_heights
    c.advance_to(release)
    before = {s: c.balance(s) for s in stakers}
    released = []
    for _ in range(3):
        c.step()
        released.append(sum(1 for s in stakers if c.balance(s) > before[s]))
    assert released == [2, 4, 5]  # two per block, in exit order, none before the release height
    c.check_supply()


# === the chain service: validator_context per height =============================================


def test_chain_service_validator_context_follows_the_changes() -> None:
    g = genesis1()
    chain = open_chain(MemoryKV(), g)
    commit_next(chain, [0], [verify_transaction(bond_tx(CANDIDATE, MIN_BOND, nonce=0))])
    h = chain.head_height + 1
    commit_next(chain, [0], [verify_transaction(validator_vote_tx(0, CANDIDATE, nonce=0))])
    old, new = vset(0), vset(0, CANDIDATE)
    ctx = chain.validator_context(h + 1)
    assert (ctx.current, ctx.next, ctx.previous) == (old, new, old)
    commit_next(chain, [0])
    ctx = chain.validator_context(h + 2)
    assert (ctx.current, ctx.next, ctx.previous) == (new, new, old)
    assert chain.validator_set() == new  # the set of the next block
    # Block h+2 needs precommits of both for its commit.
    commit_next(chain, [0, CANDIDATE])
    assert chain.validator_set_at(h) == old and chain.validator_set_at(h + 3) == new
    assert chain.oldest_validator_height() == 1


# === the headers must carry the sets of the state ================================================


def test_a_block_that_ignores_a_decided_change_is_invalid() -> None:
    c = AuthorityChain(genesis1())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    c.step([validator_vote_tx(0, CANDIDATE, nonce=0)])
    stale = ValidatorContext(vset(0), vset(0), vset(0))
    built = build_block(
        c.view(), c.chain, c.params, c.head, 0, addr(0), c.last_commit, stale, [], c.root_fn
    )
    with pytest.raises(InvalidBlock, match="next validators hash does not match"):
        c.apply(built.block)


def test_old_sets_are_pruned_after_the_evidence_window() -> None:
    c = AuthorityChain(genesis1())
    c.step([bond_tx(CANDIDATE, MIN_BOND, nonce=0)])
    c.step([validator_vote_tx(0, CANDIDATE, nonce=0)])  # epoch 1 from height 4
    c.advance_to(5)
    c.step(
        [
            validator_vote_tx(0, CANDIDATE, REMOVE, nonce=1),
            validator_vote_tx(CANDIDATE, CANDIDATE, REMOVE, nonce=1),
        ]
    )
    c.advance_to(20)
    view = c.view()
    epochs = EpochRange.decode(c.state[VALSET_EPOCHS_KEY])
    assert epochs == EpochRange(2, 2)  # only the set in force since height 7 is needed
    assert oldest_kept_height(view) == 7 <= c.height - EVIDENCE_MAX_AGE
    with pytest.raises(ValidatorHistoryError, match="no longer kept"):
        validator_set_at(view, 6)
    assert validator_set_at(view, 7) == vset(0)
