"""The consensus fee table (DESIGN §4): cost arithmetic, unknown kinds and the burn/tip split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.consensus.fees import FeeSplit, compute_cost, cost_of, count_new_accounts, split_fee
from node.consensus.params import FeeSchedule
from node.consensus.state import Account, DictView, account_key
from node.consensus.txs import TxKind
from node.errors import UnknownKind
from node.types import UINT256_MAX, Amount, Nonce
from tests.helpers import FEES, addr, genesis_view, make_genesis, make_params, vtransfer

TRANSFER = int(TxKind.TRANSFER)


def test_compute_cost_adds_every_part() -> None:
    params = make_params()
    # base + per_byte * size + per_signature * signatures + per_new_account * accounts
    assert compute_cost(params, TRANSFER, 0, signatures=0) == 1_000
    assert compute_cost(params, TRANSFER, 169) == 1_000 + 10 * 169 + 100
    assert compute_cost(params, TRANSFER, 169, new_accounts=1) == 1_000 + 1_690 + 100 + 5_000
    assert compute_cost(params, TRANSFER, 200, signatures=3, new_accounts=2) == (
        1_000 + 2_000 + 300 + 10_000
    )


def test_each_schedule_field_is_its_own_coefficient() -> None:
    # Distinct primes per field: a swapped coefficient would change the result.
    schedule = FeeSchedule(TRANSFER, Amount(2), Amount(3), Amount(5), Amount(7))
    params = make_params(fees=(schedule,))
    assert compute_cost(params, TRANSFER, 11, signatures=13, new_accounts=17) == (
        2 + 3 * 11 + 5 * 13 + 7 * 17
    )


def test_zero_schedule_costs_nothing() -> None:
    zero = FeeSchedule(TRANSFER, Amount(0), Amount(0), Amount(0), Amount(0))
    assert compute_cost(make_params(fees=(zero,)), TRANSFER, 10_000, new_accounts=5) == 0


def test_cost_is_exact_for_uint256_sized_coefficients() -> None:
    # Integer arithmetic: no float rounding even far above 2**64.
    big = FeeSchedule(TRANSFER, Amount(10**40), Amount(10**30), Amount(1), Amount(0))
    cost = compute_cost(make_params(fees=(big,)), TRANSFER, 3)
    assert cost == 10**40 + 3 * 10**30 + 1


@given(
    size=st.integers(0, 1 << 20),
    sigs=st.integers(0, 16),
    new=st.integers(0, 16),
)
def test_cost_is_linear_in_every_count(size: int, sigs: int, new: int) -> None:
    params = make_params()
    expected = FEES.base + FEES.per_byte * size + FEES.per_signature * sigs
    expected += FEES.per_new_account * new
    assert compute_cost(params, TRANSFER, size, signatures=sigs, new_accounts=new) == expected


def test_unknown_kind_has_no_schedule() -> None:
    with pytest.raises(UnknownKind, match="no fee schedule for transaction kind 99"):
        compute_cost(make_params(), 99, 100)
    # A known kind whose schedule is missing from the parameters is rejected the same way.
    with pytest.raises(UnknownKind, match="kind 1"):
        compute_cost(make_params(fees=()), TRANSFER, 100)


def test_cost_of_charges_a_new_account_only_for_an_absent_recipient() -> None:
    genesis = make_genesis(funded=2)
    view = genesis_view(genesis)
    params = genesis.votable_params
    to_existing = vtransfer(1, 2, 5, nonce=0)
    to_new = vtransfer(1, 77, 5, nonce=0)
    assert count_new_accounts(view, to_existing) == 0
    assert count_new_accounts(view, to_new) == 1
    assert cost_of(params, view, to_existing) == compute_cost(params, TRANSFER, to_existing.size)
    assert cost_of(params, view, to_new) == compute_cost(
        params, TRANSFER, to_new.size, new_accounts=1
    )
    # Once the recipient exists (even with a zero balance), no new-account part.
    created = DictView({account_key(addr(77)): Account(Nonce(0), Amount(0)).encode()})
    assert count_new_accounts(created, to_new) == 0


def test_split_fee_burns_the_cost_and_tips_the_rest() -> None:
    assert split_fee(10_000, 2_790) == FeeSplit(Amount(2_790), Amount(7_210))
    assert split_fee(2_790, 2_790) == FeeSplit(Amount(2_790), Amount(0))
    assert split_fee(0, 0) == FeeSplit(Amount(0), Amount(0))
    assert split_fee(UINT256_MAX, 1) == FeeSplit(Amount(1), Amount(UINT256_MAX - 1))


def test_split_fee_refuses_a_fee_below_cost() -> None:
    with pytest.raises(ValueError, match="fee below cost"):
        split_fee(2_789, 2_790)


@given(cost=st.integers(0, 2**128), extra=st.integers(0, 2**128))
def test_split_fee_parts_sum_to_the_fee(cost: int, extra: int) -> None:
    split = split_fee(cost + extra, cost)
    assert split.cost + split.tip == cost + extra
    assert split.cost == cost
