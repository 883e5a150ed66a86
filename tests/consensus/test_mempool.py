"""Mempool admission, ordering, eviction and block-commit handling (DESIGN §4).

Transactions are real signed transfers (``make_transaction`` + ``verify_transaction``); the
property test runs random add / commit / remove sequences and checks that every ``select`` applies
cleanly with the block-level ``apply_transaction``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.consensus.mempool import (
    AddStatus,
    Mempool,
    MempoolLimits,
    compute_max_spend,
)
from node.consensus.params import ChainParams, FeeSchedule, VotableParams
from node.consensus.state import (
    Account,
    DictView,
    Overlay,
    StateView,
    account_key,
    get_account,
)
from node.consensus.transition import BlockContext, apply_transaction, settle_fees
from node.consensus.txs import Transfer, VerifiedTransaction, make_transaction, verify_transaction
from node.crypto import PrivateKey
from node.errors import (
    AlreadyKnown,
    ConfigError,
    FeeTooLow,
    FutureQueueFull,
    InsufficientFunds,
    MempoolFull,
    NonceTooLow,
    ReplacementUnderpriced,
    TransactionTooLarge,
    UnknownKind,
    WrongChain,
)
from node.types import NSD, Address, Amount, ChainId, Hash32, Nonce, TimestampMs

CHAIN_ID = 77
KEYS = [PrivateKey(hashlib.sha256(b"mempool-test-key-%d" % i).digest()) for i in range(6)]
A, B, C, D, E, F = KEYS
SINK = Address(b"\x5a" * 20)  # a recipient that is never a sender
PROPOSER = Address(b"\x99" * 20)

BASE_FEE = 1_000
PER_BYTE = 10
# A transfer is ~170 bytes, so its cost is ~2_700 units; fees below are chosen well above it.
FEE = 10_000


def make_params(
    *, max_tx_bytes: int = 4_096, per_new_account: int = 0, kind: int = 1
) -> VotableParams:
    return VotableParams(
        timeout_propose_ms=1_000,
        timeout_propose_delta_ms=500,
        timeout_prevote_ms=1_000,
        timeout_prevote_delta_ms=500,
        timeout_precommit_ms=1_000,
        timeout_precommit_delta_ms=500,
        timeout_commit_ms=1_000,
        max_block_bytes=1 << 20,
        max_block_txs=1_000,
        max_tx_bytes=max_tx_bytes,
        fees=(
            FeeSchedule(
                kind=kind,
                base=Amount(BASE_FEE),
                per_byte=Amount(PER_BYTE),
                per_signature=Amount(0),
                per_new_account=Amount(per_new_account),
            ),
        ),
    )


PARAMS = make_params()
CHAIN = ChainParams(
    chain_id=ChainId(CHAIN_ID),
    genesis_time=TimestampMs(1_700_000_000_000),
    state_history_blocks=100,
    evidence_max_age=100,
    validator_floor=1,
)


def state_of(accounts: dict[Address, tuple[int, int]]) -> dict[bytes, bytes]:
    return {account_key(a): Account(Nonce(n), Amount(b)).encode() for a, (n, b) in accounts.items()}


def funded(*keys: PrivateKey, balance: int = NSD, nonce: int = 0) -> DictView:
    return DictView(state_of({k.address: (nonce, balance) for k in keys}))


def transfer(
    key: PrivateKey,
    nonce: int,
    fee: int = FEE,
    *,
    amount: int = 1,
    to: Address = SINK,
    memo: bytes = b"",
    chain_id: int = CHAIN_ID,
) -> VerifiedTransaction:
    signed = make_transaction(key, chain_id, nonce, fee, Transfer(to, Amount(amount), memo))
    return verify_transaction(signed.encode())


def rejected(pool: Mempool, reason: str) -> int:
    return pool.stats()["rejected_" + reason]


def ids(txs: Sequence[VerifiedTransaction]) -> list[Hash32]:
    return [t.tx_id for t in txs]


# --- limits --------------------------------------------------------------------------------------


def test_limits_defaults_and_validation() -> None:
    limits = MempoolLimits()
    assert (limits.max_txs, limits.max_bytes) == (10_000, 64 << 20)
    assert (limits.max_future_per_sender, limits.replace_bump_percent) == (64, 10)
    with pytest.raises(ConfigError):
        MempoolLimits(max_txs=0)
    with pytest.raises(ConfigError):
        MempoolLimits(max_future_per_sender=-1)
    with pytest.raises(ConfigError):
        MempoolLimits(replace_bump_percent=-1)


# --- every rejection reason ---------------------------------------------------------------------


def test_accepts_executable_transaction() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A)
    vtx = transfer(A, 0)
    result = pool.add(vtx, view, PARAMS)
    assert result.status is AddStatus.PENDING
    assert result.tx_id == vtx.tx_id
    assert (result.replaced, result.promoted, result.evicted, result.dropped) == (None, (), (), ())
    assert len(pool) == 1 and pool.size_bytes == vtx.size
    assert pool.contains(vtx.tx_id) and vtx.tx_id in pool
    assert pool.get(vtx.tx_id) is vtx
    assert pool.is_pending(vtx.tx_id)
    assert pool.pending_nonce(A.address, view) == 1
    assert pool.pending_nonce(B.address, view) == 0
    assert pool.stats()["added"] == 1


def test_rejects_wrong_chain() -> None:
    pool = Mempool(CHAIN_ID)
    with pytest.raises(WrongChain, match="chain 78"):
        pool.add(transfer(A, 0, chain_id=CHAIN_ID + 1), funded(A), PARAMS)
    assert rejected(pool, "wrong_chain") == 1
    assert len(pool) == 0


def test_rejects_too_large() -> None:
    pool = Mempool(CHAIN_ID)
    big = transfer(A, 0, fee=10**9, memo=b"x" * 200)
    with pytest.raises(TransactionTooLarge, match="max_tx_bytes 300"):
        pool.add(big, funded(A), make_params(max_tx_bytes=300))
    # Larger than the whole pool's byte budget: it could never fit.
    small_pool = Mempool(CHAIN_ID, MempoolLimits(max_bytes=200))
    with pytest.raises(TransactionTooLarge, match="mempool"):
        small_pool.add(big, funded(A), PARAMS)
    assert rejected(pool, "transaction_too_large") == 1


def test_rejects_already_known() -> None:
    pool = Mempool(CHAIN_ID)
    vtx = transfer(A, 0)
    pool.add(vtx, funded(A), PARAMS)
    with pytest.raises(AlreadyKnown):
        pool.add(vtx, funded(A), PARAMS)
    assert rejected(pool, "already_known") == 1
    assert len(pool) == 1


def test_rejects_nonce_below_account_nonce() -> None:
    pool = Mempool(CHAIN_ID)
    with pytest.raises(NonceTooLow, match="below the account nonce 5"):
        pool.add(transfer(A, 4), funded(A, nonce=5), PARAMS)
    assert rejected(pool, "nonce_too_low") == 1


def test_rejects_fee_below_cost() -> None:
    pool = Mempool(CHAIN_ID)
    with pytest.raises(FeeTooLow, match="below the cost"):
        pool.add(transfer(A, 0, fee=BASE_FEE), funded(A), PARAMS)
    assert rejected(pool, "fee_too_low") == 1


def test_fee_counts_new_accounts_against_the_view() -> None:
    params = make_params(per_new_account=50_000)
    pool = Mempool(CHAIN_ID)
    view = funded(A, B)
    # SINK does not exist yet: the transfer creates it and must pay for that.
    with pytest.raises(FeeTooLow):
        pool.add(transfer(A, 0, fee=FEE), view, params)
    # To an existing account it is cheap.
    pool.add(transfer(A, 0, fee=FEE, to=B.address), view, params)


def test_rejects_kind_without_fee_schedule() -> None:
    pool = Mempool(CHAIN_ID)
    with pytest.raises(UnknownKind):
        pool.add(transfer(A, 0), funded(A), make_params(kind=9))
    assert rejected(pool, "unknown_kind") == 1


def test_rejects_insufficient_funds_for_fee_plus_amount() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, balance=FEE + 100)
    with pytest.raises(InsufficientFunds):
        pool.add(transfer(A, 0, amount=101), view, PARAMS)
    pool.add(transfer(A, 0, amount=100), view, PARAMS)
    assert rejected(pool, "insufficient_funds") == 1


def test_rejects_insufficient_funds_on_top_of_pending() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, balance=3 * FEE)
    pool.add(transfer(A, 0, amount=FEE), view, PARAMS)  # spends 2 * FEE
    with pytest.raises(InsufficientFunds, match="earlier transactions"):
        pool.add(transfer(A, 1, amount=1), view, PARAMS)
    pool.add(transfer(A, 1, amount=0), view, PARAMS)  # exactly the rest
    # A queued one also counts what is held before it.
    with pytest.raises(InsufficientFunds):
        pool.add(transfer(A, 5, amount=0), view, PARAMS)


def test_rejects_future_queue_full() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(max_future_per_sender=2))
    view = funded(A)
    pool.add(transfer(A, 3), view, PARAMS)
    pool.add(transfer(A, 5), view, PARAMS)
    with pytest.raises(FutureQueueFull, match="send nonce 0 first"):
        pool.add(transfer(A, 4), view, PARAMS)
    assert rejected(pool, "future_queue_full") == 1
    # The executable nonce is still welcome, and filling the gap is not limited by the queue.
    pool.add(transfer(A, 0), view, PARAMS)
    # Replacing a queued one is not a new queue slot.
    pool.add(transfer(A, 5, fee=2 * FEE), view, PARAMS)


def test_rejects_when_full_and_not_better_paying() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(max_txs=2))
    view = funded(A, B, C)
    pool.add(transfer(A, 0, fee=2 * FEE), view, PARAMS)
    pool.add(transfer(B, 0, fee=2 * FEE), view, PARAMS)
    with pytest.raises(MempoolFull, match="raise the fee"):
        pool.add(transfer(C, 0, fee=2 * FEE), view, PARAMS)  # equal is not better
    assert rejected(pool, "mempool_full") == 1
    assert len(pool) == 2


# --- replacement ----------------------------------------------------------------------------------


def test_replacement_needs_the_bump() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A)
    first = transfer(A, 0, fee=10_000)
    pool.add(first, view, PARAMS)
    with pytest.raises(ReplacementUnderpriced, match="at least 11000"):
        pool.add(transfer(A, 0, fee=10_999), view, PARAMS)
    assert rejected(pool, "replacement_underpriced") == 1
    better = transfer(A, 0, fee=11_000)
    result = pool.add(better, view, PARAMS)
    assert result.replaced == first.tx_id and result.status is AddStatus.PENDING
    assert first.tx_id not in pool and better.tx_id in pool
    assert len(pool) == 1 and pool.size_bytes == better.size
    assert pool.select(10, 1 << 20) == [better]
    assert pool.stats()["replaced"] == 1


def test_replacement_of_queued_transaction() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A)
    old = transfer(A, 3, fee=FEE)
    pool.add(old, view, PARAMS)
    new = transfer(A, 3, fee=2 * FEE)
    result = pool.add(new, view, PARAMS)
    assert result.status is AddStatus.QUEUED and result.replaced == old.tx_id
    assert old.tx_id not in pool


def test_replacement_with_zero_bump_still_needs_a_higher_fee() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(replace_bump_percent=0))
    view = funded(A)
    pool.add(transfer(A, 0, fee=FEE), view, PARAMS)
    with pytest.raises(ReplacementUnderpriced):
        pool.add(transfer(A, 0, fee=FEE, amount=2), view, PARAMS)
    pool.add(transfer(A, 0, fee=FEE + 1), view, PARAMS)


def test_replacement_that_spends_more_drops_unfundable_successors() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, balance=10 * FEE)
    txs = [transfer(A, n, amount=FEE) for n in range(4)]  # each spends 2 * FEE: 8 of 10
    for vtx in txs:
        pool.add(vtx, view, PARAMS)
    # Nonce 1 now spends 5 * FEE: 0 and 1 take 7, so nonce 2 (2 more) still fits, nonce 3 not.
    bigger = transfer(A, 1, fee=2 * FEE, amount=3 * FEE)
    result = pool.add(bigger, view, PARAMS)
    assert result.dropped == (txs[3].tx_id,)
    assert pool.select(10, 1 << 20) == [txs[0], bigger, txs[2]]
    with pytest.raises(InsufficientFunds):
        pool.add(transfer(A, 1, fee=3 * FEE, amount=10 * FEE), view, PARAMS)
    pool.check_invariants()


# --- gaps -----------------------------------------------------------------------------------------


def test_gap_is_queued_then_promoted_when_filled() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A)
    t0, t1, t2 = (transfer(A, n) for n in range(3))
    assert pool.add(t2, view, PARAMS).status is AddStatus.QUEUED
    assert pool.add(t1, view, PARAMS).status is AddStatus.QUEUED
    assert not pool.is_pending(t1.tx_id)
    assert pool.select(10, 1 << 20) == []
    assert pool.pending_nonce(A.address, view) == 0
    result = pool.add(t0, view, PARAMS)
    assert result.status is AddStatus.PENDING
    assert result.promoted == (t1.tx_id, t2.tx_id)
    assert pool.is_pending(t2.tx_id)
    assert pool.select(10, 1 << 20) == [t0, t1, t2]
    assert pool.pending_nonce(A.address, view) == 3
    stats = pool.stats()
    assert (stats["pending"], stats["queued"], stats["promoted"]) == (3, 0, 2)
    pool.check_invariants()


def test_promotion_drops_a_queued_transaction_the_gap_made_unfundable() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, balance=5 * FEE)
    pool.add(transfer(A, 0), view, PARAMS)
    t2 = transfer(A, 2, amount=2 * FEE)  # 1 + 3 = 4 of 5: fits while nonce 1 is unknown
    pool.add(t2, view, PARAMS)
    t1 = transfer(A, 1, amount=FEE)  # 1 + 2 = 3: fits, but then nonce 2 needs 3 more
    result = pool.add(t1, view, PARAMS)
    assert result.status is AddStatus.PENDING
    assert result.dropped == (t2.tx_id,)
    assert t2.tx_id not in pool
    assert pool.stats()["dropped_unfunded"] == 1
    pool.check_invariants()


# --- selection ------------------------------------------------------------------------------------


def test_select_orders_by_fee_per_byte_keeping_nonce_order() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, B, C)
    a0 = transfer(A, 0, fee=10_000)
    a1 = transfer(A, 1, fee=90_000)  # pays most, but must wait for a0
    b0 = transfer(B, 0, fee=50_000)
    c0 = transfer(C, 0, fee=30_000)
    c1 = transfer(C, 1, fee=20_000)
    for vtx in (a1, c1, a0, b0, c0):
        pool.add(vtx, view, PARAMS)
    assert pool.select(10, 1 << 20) == [b0, c0, c1, a0, a1]
    assert pool.select(2, 1 << 20) == [b0, c0]
    assert len(pool) == 5  # select does not remove anything


def test_select_fee_per_byte_not_fee() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, B)
    big = transfer(A, 0, fee=40_000, memo=b"m" * 250)  # higher fee, lower fee per byte
    small = transfer(B, 0, fee=30_000)
    pool.add(big, view, PARAMS)
    pool.add(small, view, PARAMS)
    assert big.tx.fee / big.size < small.tx.fee / small.size
    assert pool.select(10, 1 << 20) == [small, big]


def test_select_skips_what_does_not_fit_and_the_rest_of_that_sender() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, B)
    a0 = transfer(A, 0, fee=900_000, memo=b"m" * 200)
    a1 = transfer(A, 1, fee=900_000)
    b0 = transfer(B, 0, fee=20_000)
    b1 = transfer(B, 1, fee=20_000)
    for vtx in (a0, a1, b0, b1):
        pool.add(vtx, view, PARAMS)
    budget = b0.size + b1.size + 10  # a0 is too big; a1 cannot go without it
    assert pool.select(10, budget) == [b0, b1]
    assert pool.select(10, 0) == []
    assert pool.select(0, 1 << 20) == []


def block_apply(
    state: dict[bytes, bytes], txs: Sequence[VerifiedTransaction], params: VotableParams
) -> None:
    """Apply ``txs`` in order with the block-level rules and commit the result into ``state``."""
    overlay = Overlay(DictView(dict(state)))
    ctx = BlockContext(CHAIN, params, 1, CHAIN.genesis_time, PROPOSER)
    for vtx in txs:
        apply_transaction(overlay, vtx, ctx)  # raises if the mempool let through a bad order
    settle_fees(overlay, ctx)
    for key, value in overlay.changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


def test_selection_applies_cleanly_with_the_state_transition() -> None:
    params = make_params(per_new_account=5_000)
    state = state_of({A.address: (0, 20 * FEE), B.address: (0, 20 * FEE), C.address: (0, 0)})
    pool = Mempool(CHAIN_ID)
    view = DictView(state)
    # A pays B, B pays a new account (costlier), C has nothing and gets nothing admitted.
    a = [transfer(A, n, fee=FEE + 1_000 * n, amount=FEE, to=B.address) for n in range(4)]
    b = [transfer(B, n, fee=FEE + 9_000 - 1_000 * n, amount=FEE, to=SINK) for n in range(4)]
    for vtx in [*reversed(a), *b]:
        pool.add(vtx, view, params)
    with pytest.raises(InsufficientFunds):
        pool.add(transfer(C, 0), view, params)
    selected = pool.select(100, 1 << 20)
    assert len(selected) == 8
    block_apply(state, selected, params)
    assert get_account(DictView(state), A.address).nonce == 4
    result = pool.on_block_committed(ids(selected), DictView(state))
    assert result.included == 8 and len(pool) == 0


# --- eviction -------------------------------------------------------------------------------------


def test_full_pool_evicts_lowest_fee_per_byte_tail() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(max_txs=3))
    view = funded(A, B, C, D)
    a0 = transfer(A, 0, fee=10_000)  # cheapest, but not a tail: evicting it would strand a1
    a1 = transfer(A, 1, fee=50_000)
    b0 = transfer(B, 0, fee=20_000)
    for vtx in (a0, a1, b0):
        pool.add(vtx, view, PARAMS)
    c0 = transfer(C, 0, fee=30_000)
    result = pool.add(c0, view, PARAMS)
    assert result.evicted == (b0.tx_id,)
    assert a0.tx_id in pool and b0.tx_id not in pool
    d0 = transfer(D, 0, fee=40_000)
    assert pool.add(d0, view, PARAMS).evicted == (c0.tx_id,)
    assert pool.select(10, 1 << 20) == [d0, a0, a1]
    assert pool.stats()["evicted"] == 2
    pool.check_invariants()


def test_eviction_walks_down_a_senders_tail_for_bytes() -> None:
    a = [transfer(A, n, fee=10_000 + n) for n in range(3)]
    size = a[0].size
    pool = Mempool(CHAIN_ID, MempoolLimits(max_bytes=3 * size + 20))
    view = funded(A, B)
    for vtx in a:
        pool.add(vtx, view, PARAMS)
    big = transfer(B, 0, fee=900_000, memo=b"m" * (size + 10))  # needs two slots' bytes
    result = pool.add(big, view, PARAMS)
    assert result.evicted == (a[2].tx_id, a[1].tx_id)
    assert pool.select(10, 1 << 20) == [big, a[0]]
    pool.check_invariants()


def test_eviction_never_takes_the_newcomers_own_predecessors() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(max_txs=2))
    view = funded(A, B)
    pool.add(transfer(A, 0, fee=10_000), view, PARAMS)
    b0 = transfer(B, 0, fee=90_000)
    pool.add(b0, view, PARAMS)
    # A's nonce 0 is the cheapest tail, but A's nonce 1 needs it.
    with pytest.raises(MempoolFull):
        pool.add(transfer(A, 1, fee=80_000), view, PARAMS)
    assert len(pool) == 2
    pool.check_invariants()
    # The newcomer may displace its own sender's higher, cheaper queued nonces.
    pool2 = Mempool(CHAIN_ID, MempoolLimits(max_txs=2))
    pool2.add(transfer(A, 5, fee=10_000), view, PARAMS)
    pool2.add(b0, view, PARAMS)
    result = pool2.add(transfer(A, 0, fee=80_000), view, PARAMS)
    assert len(result.evicted) == 1
    pool2.check_invariants()


def test_queued_newcomer_does_not_evict_executable_transactions() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(max_txs=2))
    view = funded(A, B, C)
    pool.add(transfer(A, 0, fee=10_000), view, PARAMS)
    pool.add(transfer(B, 0, fee=10_000), view, PARAMS)
    with pytest.raises(MempoolFull):
        pool.add(transfer(C, 1, fee=900_000), view, PARAMS)
    # ... but it may evict a cheaper queued one.
    pool2 = Mempool(CHAIN_ID, MempoolLimits(max_txs=2))
    pool2.add(transfer(A, 0, fee=10_000), view, PARAMS)
    queued_b = transfer(B, 3, fee=10_000)
    pool2.add(queued_b, view, PARAMS)
    result = pool2.add(transfer(C, 1, fee=20_000), view, PARAMS)
    assert result.status is AddStatus.QUEUED and result.evicted == (queued_b.tx_id,)


def test_failed_eviction_plan_leaves_pool_intact_for_later_evictions() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(max_txs=2))
    view = funded(A, B, C, D)
    a0 = transfer(A, 0, fee=10_000)
    pool.add(a0, view, PARAMS)
    pool.add(transfer(B, 0, fee=20_000), view, PARAMS)
    with pytest.raises(MempoolFull):
        pool.add(transfer(C, 0, fee=5_000), view, PARAMS)
    # The tails popped while planning were put back: a better newcomer still finds a0.
    assert pool.add(transfer(D, 0, fee=15_000), view, PARAMS).evicted == (a0.tx_id,)
    pool.check_invariants()


# --- block commits --------------------------------------------------------------------------------


def test_commit_removes_included_and_promotes_queued() -> None:
    state = state_of({A.address: (0, NSD), B.address: (0, NSD)})
    pool = Mempool(CHAIN_ID)
    view = DictView(state)
    a = [transfer(A, n) for n in range(4)]
    for vtx in (a[0], a[1], a[3]):
        pool.add(vtx, view, PARAMS)
    b0 = transfer(B, 0)
    pool.add(b0, view, PARAMS)
    # Another proposer's block holds A's nonce 2 (never seen here) along with A's 0 and 1.
    block_apply(state, [a[0], a[1], a[2]], PARAMS)
    result = pool.on_block_committed(ids([a[0], a[1], a[2]]), DictView(state))
    assert result.included == 2
    assert result.promoted == (a[3].tx_id,)
    assert set(pool.select(10, 1 << 20)) == {b0, a[3]}
    assert len(pool) == 2
    assert pool.pending_nonce(A.address, DictView(state)) == 4
    pool.check_invariants()


def test_commit_with_senders_retires_same_nonce_competitors() -> None:
    state = state_of({A.address: (0, NSD)})
    pool = Mempool(CHAIN_ID)
    ours = transfer(A, 0, fee=FEE)
    pool.add(ours, DictView(state), PARAMS)
    theirs = transfer(A, 0, fee=FEE + 1)  # the same nonce, included by another node
    block_apply(state, [theirs], PARAMS)
    result = pool.on_block_committed([theirs.tx_id], DictView(state), senders=[A.address])
    assert result.included == 0 and result.dropped == (ours.tx_id,)
    assert len(pool) == 0 and pool.stats()["dropped_stale"] == 1
    pool.check_invariants()


def test_commit_rechecks_balance_of_touched_senders() -> None:
    state = state_of({A.address: (0, 10 * FEE)})
    pool = Mempool(CHAIN_ID)
    view = DictView(state)
    a = [transfer(A, n, amount=FEE) for n in range(4)]  # 2 * FEE each
    for vtx in a:
        pool.add(vtx, view, PARAMS)
    # A spent more elsewhere: a competing nonce 0 that moved 6 * FEE.
    block_apply(state, [transfer(A, 0, amount=6 * FEE)], PARAMS)  # balance now 3 * FEE
    result = pool.on_block_committed([], DictView(state), senders=[A.address])
    # Nonce 0 is stale; nonce 1 fits (2 of 3); nonce 2 cannot be paid; nonce 3 waits behind it.
    assert result.dropped == (a[0].tx_id, a[2].tx_id)
    assert pool.select(10, 1 << 20) == [a[1]]
    assert not pool.is_pending(a[3].tx_id) and a[3].tx_id in pool
    pool.check_invariants()


def test_commit_with_an_older_view_still_removes_included() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A)
    vtx = transfer(A, 0)
    pool.add(vtx, view, PARAMS)
    assert pool.on_block_committed([vtx.tx_id], view).included == 1
    assert len(pool) == 0
    pool.check_invariants()


def test_add_catches_up_with_a_newer_view() -> None:
    pool = Mempool(CHAIN_ID)
    pool.add(transfer(A, 0), funded(A), PARAMS)
    pool.add(transfer(A, 1), funded(A), PARAMS)
    # A block we were not told about moved A to nonce 2; the stale ones go on the next add.
    result = pool.add(transfer(A, 2), funded(A, nonce=2), PARAMS)
    assert result.status is AddStatus.PENDING and len(result.dropped) == 2
    assert len(pool) == 1
    # And a rejected add after catching up leaves a consistent, empty pool.
    pool2 = Mempool(CHAIN_ID)
    pool2.add(transfer(A, 0), funded(A), PARAMS)
    with pytest.raises(NonceTooLow):
        pool2.add(transfer(A, 0, fee=2 * FEE), funded(A, nonce=1), PARAMS)
    assert len(pool2) == 0 and pool2.stats()["senders"] == 0
    pool2.check_invariants()


def test_remove_queues_the_rest_of_the_run() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A)
    a = [transfer(A, n) for n in range(3)]
    for vtx in a:
        pool.add(vtx, view, PARAMS)
    assert pool.remove(a[1].tx_id)
    assert not pool.remove(a[1].tx_id)
    assert pool.select(10, 1 << 20) == [a[0]]
    assert not pool.is_pending(a[2].tx_id)
    assert pool.pending_nonce(A.address, view) == 1
    # Refilling the gap promotes nonce 2 again.
    refill = transfer(A, 1, fee=FEE + 1)
    assert pool.add(refill, view, PARAMS).promoted == (a[2].tx_id,)
    pool.check_invariants()


def test_params_change_drops_what_became_invalid() -> None:
    pool = Mempool(CHAIN_ID)
    view = funded(A, B)
    cheap = transfer(A, 0, fee=3_500)
    rich = transfer(B, 0, fee=900_000)
    pool.add(cheap, view, PARAMS)
    pool.add(transfer(A, 1, fee=900_000), view, PARAMS)
    pool.add(rich, view, PARAMS)
    dropped = pool.on_params_changed(view, make_params(per_new_account=10_000))
    assert dropped == (cheap.tx_id,)
    assert pool.select(10, 1 << 20) == [rich]  # A's nonce 1 waits for a new nonce 0
    assert pool.stats()["dropped_invalid"] == 1
    pool.check_invariants()


def test_compute_max_spend() -> None:
    vtx = transfer(A, 0, fee=FEE, amount=12_345)
    assert compute_max_spend(vtx) == FEE + 12_345


def test_stats_keys_are_stable() -> None:
    stats = Mempool(CHAIN_ID).stats()
    for key in (
        "txs",
        "bytes",
        "pending",
        "queued",
        "senders",
        "evicted",
        "rejected_wrong_chain",
        "rejected_transaction_too_large",
        "rejected_already_known",
        "rejected_nonce_too_low",
        "rejected_replacement_underpriced",
        "rejected_fee_too_low",
        "rejected_insufficient_funds",
        "rejected_future_queue_full",
        "rejected_mempool_full",
    ):
        assert stats[key] == 0


# --- property: random sequences -------------------------------------------------------------------

PROP_KEYS = KEYS[:4]
# Signing is the slow part: sign each (sender, nonce, fee step, memo, amount) once per session.
_SIGNED: dict[tuple[int, int, int, int, int], VerifiedTransaction] = {}


def prop_tx(sender: int, nonce: int, fee_step: int, memo: int, amount: int) -> VerifiedTransaction:
    key = (sender, nonce, fee_step, memo, amount)
    if key not in _SIGNED:
        to = PROP_KEYS[(sender + 1) % len(PROP_KEYS)].address if amount % 2 else SINK
        _SIGNED[key] = transfer(
            PROP_KEYS[sender],
            nonce,
            fee=4_000 + 3_000 * fee_step,
            amount=amount * 1_000,
            to=to,
            memo=b"m" * memo,
        )
    return _SIGNED[key]


Op = tuple[str, tuple[int, ...]]

add_op = st.tuples(
    st.just("add"),
    st.tuples(
        st.integers(0, len(PROP_KEYS) - 1),  # sender
        st.integers(0, 4),  # nonce offset from the account nonce
        st.integers(0, 5),  # fee step
        st.sampled_from([0, 40, 120]),  # memo bytes
        st.integers(0, 3),  # amount in thousands (odd: to another sender)
    ),
)
commit_op = st.tuples(st.just("commit"), st.tuples(st.integers(1, 5), st.integers(150, 2_000)))
remove_op = st.tuples(st.just("remove"), st.tuples(st.integers(0, 50)))
# A block from another proposer with a transaction this pool never saw (same nonce, other id).
foreign_op = st.tuples(st.just("foreign"), st.tuples(st.integers(0, len(PROP_KEYS) - 1)))


@given(
    ops=st.lists(
        st.one_of(add_op, add_op, add_op, commit_op, remove_op, foreign_op), min_size=5, max_size=40
    ),
    max_txs=st.integers(1, 12),
    max_kib=st.sampled_from([1, 2, 100]),
    max_future=st.integers(0, 3),
    balances=st.lists(
        st.one_of(st.just(10**9), st.integers(0, 200_000)),
        min_size=len(PROP_KEYS),
        max_size=len(PROP_KEYS),
    ),
)
def test_random_sequences_keep_order_limits_and_apply_cleanly(
    ops: list[Op],
    max_txs: int,
    max_kib: int,
    max_future: int,
    balances: list[int],
) -> None:
    params = make_params(per_new_account=2_000)
    limits = MempoolLimits(
        max_txs=max_txs, max_bytes=max_kib * 1024, max_future_per_sender=max_future
    )
    pool = Mempool(CHAIN_ID, limits)
    state = state_of({k.address: (0, b) for k, b in zip(PROP_KEYS, balances, strict=True)})
    for kind, args in ops:
        view: StateView = DictView(state)
        if kind == "add":
            sender, offset, fee_step, memo, amount = args
            nonce = get_account(view, PROP_KEYS[sender].address).nonce + offset
            vtx = prop_tx(sender, nonce, fee_step, memo, amount)
            try:
                pool.add(vtx, view, params)
            except (
                AlreadyKnown,
                ReplacementUnderpriced,
                FeeTooLow,
                InsufficientFunds,
                FutureQueueFull,
                MempoolFull,
            ):
                pass  # each reason has its own test; here only the invariants matter
            else:
                assert vtx.tx_id in pool
        elif kind == "commit":
            count, budget = args
            selected = pool.select(count, budget)
            assert len(selected) <= count and sum(v.size for v in selected) <= budget
            block_apply(state, selected, params)  # raises if the order or funds are wrong
            result = pool.on_block_committed(ids(selected), DictView(state))
            assert result.included == len(selected)
        elif kind == "foreign":
            (sender,) = args
            address = PROP_KEYS[sender].address
            account = get_account(view, address)
            other = prop_tx(sender, account.nonce, 2, 0, 7)
            if account.balance < compute_max_spend(other):
                continue
            block_apply(state, [other], params)
            result = pool.on_block_committed([other.tx_id], DictView(state), senders=[address])
            assert result.included == 0
        else:
            held = sorted(t.tx_id for t in pool.select(10**6, 10**9))
            if held:
                assert pool.remove(held[args[0] % len(held)])
        pool.check_invariants()
        assert len(pool) <= max_txs and pool.size_bytes <= max_kib * 1024
        # The whole executable set: per-sender nonces consecutive from the account nonce.
        everything = pool.select(10**6, 10**9)
        after = DictView(state)
        next_nonce = {k.address: int(get_account(after, k.address).nonce) for k in PROP_KEYS}
        for vtx in everything:
            assert vtx.tx.nonce == next_nonce[vtx.sender]
            next_nonce[vtx.sender] += 1
        for k in PROP_KEYS:
            assert pool.pending_nonce(k.address, after) == next_nonce[k.address]
        block_apply(dict(state), everything, params)


def test_remove_that_overfills_the_queue_drops_the_highest_nonces() -> None:
    pool = Mempool(CHAIN_ID, MempoolLimits(max_future_per_sender=2))
    view = funded(A)
    a = [transfer(A, n) for n in range(6)]
    for vtx in a:
        pool.add(vtx, view, PARAMS)
    pool.remove(a[1].tx_id)  # 2..5 would queue behind the gap, but only 2 may
    assert [a[n].tx_id in pool for n in range(6)] == [True, False, True, True, False, False]
    assert pool.stats()["dropped_future_cap"] == 2
    pool.check_invariants()


def test_many_tail_changes_keep_eviction_exact() -> None:
    # Enough adds to make the lazy tails heaps compact themselves more than once.
    pool = Mempool(CHAIN_ID, MempoolLimits(max_txs=150))
    view = funded(A, B, C)
    for n in range(150):
        pool.add(transfer(A, n, fee=20_000 + n), view, PARAMS)
    b0 = transfer(B, 0, fee=30_000)
    assert pool.add(b0, view, PARAMS).evicted == (transfer(A, 149, fee=20_149).tx_id,)
    c0 = transfer(C, 0, fee=25_000)
    # A's tail is now nonce 148 (20_148 per ~170 bytes), the cheapest evictable one.
    assert pool.add(c0, view, PARAMS).evicted == (transfer(A, 148, fee=20_148).tx_id,)
    assert len(pool) == 150
    pool.check_invariants()


def test_drop_refused_heads_frees_the_nonce_a_refused_transaction_holds() -> None:
    from dataclasses import replace

    from node.economy.api import EconomyKind, Role
    from node.economy.roles import MissingRole, RoleResign

    resign_fees = replace(PARAMS.fees[0], kind=int(EconomyKind.ROLE_RESIGN))
    params = replace(PARAMS, fees=(PARAMS.fees[0], resign_fees))

    def resign(key: PrivateKey, nonce: int) -> VerifiedTransaction:
        body = RoleResign(int(Role.DATA_SUPPLIER))
        return verify_transaction(make_transaction(key, CHAIN_ID, nonce, FEE, body).encode())

    view = funded(A, B, C)
    pool = Mempool(CHAIN_ID)
    a_resign, a_next = resign(A, 0), transfer(A, 1)
    c_resign = resign(C, 0)
    for vtx in (a_resign, a_next, transfer(B, 0), c_resign):
        pool.add(vtx, view, params)
    checked: list[Address] = []

    def check(vtx: VerifiedTransaction) -> None:
        checked.append(vtx.sender)
        if vtx.sender == A.address:
            raise MissingRole("A holds no data supplier role")

    assert pool.drop_refused_heads(check) == [a_resign.tx_id]
    # Transfers are never checked; the refused head is gone and A's next one waits for nonce 0.
    assert sorted(checked) == sorted([A.address, C.address])
    assert a_resign.tx_id not in pool and c_resign.tx_id in pool
    assert a_next.tx_id in pool and not pool.is_pending(a_next.tx_id)
    assert pool.pending_nonce(A.address, view) == 0
    # The work per call is bounded.
    checked.clear()
    assert pool.drop_refused_heads(check, limit=0) == [] and checked == []
