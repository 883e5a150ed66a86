"""Roles (node/economy/roles.py, DESIGN §10): registration locks the role's bond, resignation
returns it only without open obligations, permissions are enforced by the transition, and the
plumbing (kinds, fee schedules, records counted by the fee table) reaches every economy kind."""

from __future__ import annotations

import pytest

from node.consensus.fees import compute_cost
from node.consensus.state import Overlay
from node.consensus.txs import KNOWN_KINDS, Transfer, TxKind, verify_transaction
from node.economy import registry
from node.economy.api import EconomyKind, Role
from node.economy.roles import (
    MissingRole,
    RoleAlreadyHeld,
    RoleBondDepleted,
    RoleEntry,
    RoleHasObligations,
    RoleRegister,
    RoleResign,
    UnknownRole,
    adjust_obligations,
    get_role,
    get_roles,
    has_role,
    require_any_role,
    require_role,
    slash_role_bond,
)
from node.errors import InsufficientFunds, InvalidBody
from node.genesis import load_genesis
from node.types import Address, Amount
from tests.economy.econ import (
    BUYER,
    FEE,
    NOBODY,
    PROVIDER_BOND,
    SUPPLIER,
    SUPPLIER_BOND,
    EconomyChain,
    addr,
    tx,
)
from tests.helpers import key


def test_every_economy_kind_is_wired() -> None:
    kinds = {int(k) for k in EconomyKind}
    assert set(registry.HANDLERS) == kinds
    assert kinds | {int(k) for k in TxKind} == KNOWN_KINDS
    # The repository's genesis prices every kind.
    genesis = load_genesis("genesis.json")
    assert {f.kind for f in genesis.votable_params.fees} == KNOWN_KINDS


@pytest.mark.parametrize(
    ("role", "bond"),
    [
        (Role.DATA_SUPPLIER, SUPPLIER_BOND),
        (Role.STORAGE_PROVIDER, PROVIDER_BOND),
        (Role.COMPUTE_PROVIDER, PROVIDER_BOND),
        (Role.MODEL_DEVELOPER, 0),
        (Role.ATTESTER, 0),
        (Role.DISTRIBUTOR, 0),
        (Role.CUSTOMER, 0),
    ],
)
def test_register_locks_the_bond_and_resign_returns_it(role: Role, bond: int) -> None:
    c = EconomyChain()
    before = c.balance(SUPPLIER)
    built = c.run(c.tx(SUPPLIER, RoleRegister(int(role), b"https://example.org")))
    receipt = built.result.receipts[0]
    assert c.balance(SUPPLIER) == before - FEE - bond
    entry = get_role(c.view(), addr(SUPPLIER), role)
    assert entry == RoleEntry(int(role), 1, bond, 0, b"https://example.org")  # type: ignore[arg-type]
    assert [e.name for e in receipt.events] == ["role_register", "fee"]
    c.run(c.tx(SUPPLIER, RoleResign(int(role))))
    assert not has_role(c.view(), addr(SUPPLIER), role)
    assert c.balance(SUPPLIER) == before - 2 * FEE
    assert get_roles(c.view(), addr(SUPPLIER)) == ()


def test_several_roles_share_one_record_sorted() -> None:
    c = EconomyChain()
    c.register_roles((SUPPLIER, Role.CUSTOMER), (BUYER, Role.CUSTOMER))
    c.run(c.tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER))))
    assert [e.role for e in get_roles(c.view(), addr(SUPPLIER))] == [
        Role.DATA_SUPPLIER,
        Role.CUSTOMER,
    ]


def test_register_twice_resign_unheld_unknown_role_and_no_funds() -> None:
    c = EconomyChain()
    c.register_roles((SUPPLIER, Role.DATA_SUPPLIER))
    c.reject(c.tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER))), RoleAlreadyHeld)
    c.reject(c.tx(SUPPLIER, RoleResign(int(Role.CUSTOMER))), MissingRole)
    with pytest.raises(UnknownRole):
        verify_transaction(tx(SUPPLIER, RoleRegister(99), nonce=1))
    assert issubclass(UnknownRole, InvalidBody)
    # An account that cannot lock the bond.
    poor = key(40).address
    c.run(c.tx(SUPPLIER, _transfer(poor, FEE + SUPPLIER_BOND - 1)))
    c.reject(tx(40, RoleRegister(int(Role.DATA_SUPPLIER)), nonce=0), InsufficientFunds)


def _transfer(to: Address, amount: int) -> Transfer:
    return Transfer(to, Amount(amount))


def test_obligations_block_resignation() -> None:
    c = EconomyChain()
    c.register_roles((SUPPLIER, Role.DATA_SUPPLIER))
    overlay = Overlay(c.view())
    adjust_obligations(overlay, addr(SUPPLIER), Role.DATA_SUPPLIER, 2)
    c.state.update({k: v for k, v in overlay.changes.items() if v is not None})
    c.reject(c.tx(SUPPLIER, RoleResign(int(Role.DATA_SUPPLIER))), RoleHasObligations)
    overlay = Overlay(c.view())
    adjust_obligations(overlay, addr(SUPPLIER), Role.DATA_SUPPLIER, -2)
    c.state.update({k: v for k, v in overlay.changes.items() if v is not None})
    c.run(c.tx(SUPPLIER, RoleResign(int(Role.DATA_SUPPLIER))))
    with pytest.raises(MissingRole):
        adjust_obligations(Overlay(c.view()), addr(SUPPLIER), Role.DATA_SUPPLIER, 1)


def test_slash_burns_up_to_the_bond_and_depletes_the_role() -> None:
    c = EconomyChain()
    c.register_roles((SUPPLIER, Role.DATA_SUPPLIER))
    overlay = Overlay(c.view())
    assert slash_role_bond(overlay, addr(SUPPLIER), Role.DATA_SUPPLIER, 300) == 300
    assert slash_role_bond(overlay, addr(SUPPLIER), Role.CUSTOMER, 300) == 0  # not held
    with pytest.raises(RoleBondDepleted, match="resign and register"):
        require_role(overlay, addr(SUPPLIER), Role.DATA_SUPPLIER, "registering a dataset")
    assert slash_role_bond(overlay, addr(SUPPLIER), Role.DATA_SUPPLIER, 10**30) == (
        SUPPLIER_BOND - 300
    )
    entry = get_role(overlay, addr(SUPPLIER), Role.DATA_SUPPLIER)
    assert entry is not None and entry.bond == 0


def test_missing_role_names_role_and_action() -> None:
    c = EconomyChain()
    with pytest.raises(MissingRole, match="buying a dataset needs the CUSTOMER role"):
        require_role(c.view(), addr(NOBODY), Role.CUSTOMER, "buying a dataset")
    with pytest.raises(MissingRole, match="DATA_SUPPLIER or DISTRIBUTOR"):
        require_any_role(
            c.view(), addr(NOBODY), (Role.DATA_SUPPLIER, Role.DISTRIBUTOR), "defining a composite"
        )


def test_fee_counts_the_role_record() -> None:
    c = EconomyChain()
    raw = c.tx(SUPPLIER, RoleRegister(int(Role.CUSTOMER)))
    built = c.run(raw)
    cost = compute_cost(c.params, EconomyKind.ROLE_REGISTER, len(raw), new_accounts=1)
    assert built.result.receipts[0].burned == cost


def test_max_spend_for_the_mempool() -> None:
    c = EconomyChain()
    v = verify_transaction(tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER)), nonce=0))
    assert registry.max_spend(c.view(), v) == SUPPLIER_BOND
    v = verify_transaction(tx(SUPPLIER, RoleResign(int(Role.DATA_SUPPLIER)), nonce=0))
    assert registry.max_spend(c.view(), v) == 0
