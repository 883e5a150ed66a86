"""Roles on chain (DESIGN §10): registration, resignation, bonds, obligations, permissions.

An address may hold several of the whitepaper's roles (``api.Role``); all of them live in one
``RoleSet`` record under ``NS_ROLES + address``, one ``RoleEntry`` per role, sorted by role.

* ``RoleRegister(role, metadata)`` adds a role. DATA_SUPPLIER locks ``supplier_bond`` and
  STORAGE_PROVIDER / COMPUTE_PROVIDER lock ``provider_bond`` from the sender's balance (locked
  NSD is part of the supply but of no balance, like a validator bond); the other roles lock
  nothing.
* ``RoleResign(role)`` removes it and returns the bond, but only when the role has no open
  obligations (a data supplier's purchases awaiting its key or dispute window, a storage
  provider's live deals): the bond is what a dispute or a missed proof is paid from.

Other modules ask ``require_role`` before an action a role permits (dataset registration:
DATA_SUPPLIER; composite: DATA_SUPPLIER or DISTRIBUTOR; purchase: CUSTOMER; storage offers and
deals: STORAGE_PROVIDER), count obligations with ``adjust_obligations`` and take a lost dispute's
penalty with ``slash_role_bond`` (burned). A bonded role whose bond a slash took below the
required amount permits nothing new until its holder resigns and registers again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from node.consensus.receipts import Attribute, Event
from node.consensus.state import Overlay, StateView
from node.economy.api import (
    NS_ROLES,
    EconomyError,
    EconomyKind,
    EconomyParams,
    KindHandler,
    Role,
    burn,
    charge,
    credit,
    economy_params,
    u256,
)
from node.encoding import Record, limit
from node.errors import InvalidBody
from node.types import Address, Amount

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction

MAX_ROLE_METADATA = 1024
"""Bytes of free-form metadata a role registration may carry (contact, endpoints, ...)."""


# --- errors (2200–2209) --------------------------------------------------------------------------


class UnknownRole(InvalidBody):
    code = 2201
    reason = "unknown role"


class RoleAlreadyHeld(EconomyError):
    code = 2202
    reason = "the role is already registered"


class MissingRole(EconomyError):
    """The sender (or the party an action involves) lacks the role the action needs."""

    code = 2203
    reason = "missing role"


class RoleHasObligations(EconomyError):
    code = 2204
    reason = "the role has open obligations"


class RoleBondDepleted(EconomyError):
    """A slash took the role's bond below the required amount: resign and register again."""

    code = 2205
    reason = "the role's bond is below the required amount"


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoleEntry(Record):
    role: int  # api.Role
    since: int  # height of the registration
    bond: Amount  # locked (what is left of it after slashes)
    obligations: int  # open purchases (supplier) or live deals (provider)
    metadata: bytes = field(metadata=limit(MAX_ROLE_METADATA))


@dataclass(frozen=True, slots=True)
class RoleSet(Record):
    """Every role one address holds, sorted by role."""

    entries: tuple[RoleEntry, ...] = field(metadata=limit(len(Role)))


@dataclass(frozen=True, slots=True)
class RoleRegister(Record):
    role: int
    metadata: bytes = field(default=b"", metadata=limit(MAX_ROLE_METADATA))


@dataclass(frozen=True, slots=True)
class RoleResign(Record):
    role: int


# --- reads ---------------------------------------------------------------------------------------


def roles_key(address: Address) -> bytes:
    return NS_ROLES + address


def get_roles(view: StateView, address: Address) -> tuple[RoleEntry, ...]:
    """The roles ``address`` holds (empty if none), sorted by role."""
    raw = view.get(roles_key(address))
    return () if raw is None else RoleSet.decode(raw).entries


def get_role(view: StateView, address: Address, role: int) -> RoleEntry | None:
    for entry in get_roles(view, address):
        if entry.role == role:
            return entry
    return None


def has_role(view: StateView, address: Address, role: int) -> bool:
    return get_role(view, address, role) is not None


def required_bond(params: EconomyParams, role: int) -> Amount:
    """The bond registering ``role`` locks."""
    if role == Role.DATA_SUPPLIER:
        return params.supplier_bond
    if role in (Role.STORAGE_PROVIDER, Role.COMPUTE_PROVIDER):
        return params.provider_bond
    return Amount(0)


def _role_name(role: int) -> str:
    try:
        return Role(role).name
    except ValueError:
        return f"role {role}"


def require_role(view: StateView, address: Address, role: int, what: str) -> RoleEntry:
    """The entry of ``role`` held by ``address``; raises ``MissingRole`` (naming the role and the
    action ``what``) or ``RoleBondDepleted``."""
    entry = get_role(view, address, role)
    if entry is None:
        raise MissingRole(
            f"{what} needs the {_role_name(role)} role; 0x{address.hex()} has not registered it"
        )
    need = required_bond(economy_params(view), role)
    if entry.bond < need:
        raise RoleBondDepleted(
            f"{what}: the {_role_name(role)} bond of 0x{address.hex()} is {entry.bond} after a "
            f"slash, below {need}; resign and register the role again"
        )
    return entry


def require_any_role(
    view: StateView, address: Address, roles: tuple[int, ...], what: str
) -> RoleEntry:
    """``require_role`` for the first of ``roles`` the address holds (MissingRole names all)."""
    for role in roles:
        if has_role(view, address, role):
            return require_role(view, address, role, what)
    names = " or ".join(_role_name(r) for r in roles)
    raise MissingRole(f"{what} needs the {names} role; 0x{address.hex()} has none of them")


# --- writes --------------------------------------------------------------------------------------


def _put_entries(view: Overlay, address: Address, entries: list[RoleEntry]) -> None:
    if entries:
        entries.sort(key=lambda e: e.role)
        view.put(roles_key(address), RoleSet(tuple(entries)).encode())
    else:
        view.delete(roles_key(address))


def _replace_entry(view: Overlay, address: Address, new: RoleEntry) -> None:
    entries = [e for e in get_roles(view, address) if e.role != new.role]
    entries.append(new)
    _put_entries(view, address, entries)


def adjust_obligations(view: Overlay, address: Address, role: int, delta: int) -> None:
    """Open (``delta`` > 0) or close (< 0) obligations of ``address``'s ``role``.

    Opening needs the role (``MissingRole``); closing one of a role that is gone, or below zero,
    cannot happen (resigning needs zero obligations) and is ignored.
    """
    entry = get_role(view, address, role)
    if entry is None:
        if delta > 0:
            raise MissingRole(f"0x{address.hex()} holds no {_role_name(role)} role")
        return
    count = max(0, entry.obligations + delta)
    _replace_entry(
        view, address, RoleEntry(entry.role, entry.since, entry.bond, count, entry.metadata)
    )


def slash_role_bond(view: Overlay, address: Address, role: int, amount: int) -> int:
    """Burn up to ``amount`` of the bond of ``address``'s ``role``; returns what was taken."""
    entry = get_role(view, address, role)
    if entry is None or amount <= 0:
        return 0
    taken = min(entry.bond, amount)
    if taken:
        _replace_entry(
            view,
            address,
            RoleEntry(
                entry.role, entry.since, Amount(entry.bond - taken), entry.obligations,
                entry.metadata,
            ),
        )
        burn(view, taken)
    return taken


# --- transactions --------------------------------------------------------------------------------


_ROLES = frozenset(int(r) for r in Role)


def _check_role_body(body: object) -> None:
    assert isinstance(body, RoleRegister | RoleResign)  # the handler's body type
    if body.role not in _ROLES:
        raise UnknownRole(f"unknown role {body.role} (1–{max(Role)})")


def _role_event(name: str, address: Address, role: int, bond: int) -> Event:
    return Event(
        name,
        (
            Attribute("address", address),
            Attribute("role", _role_name(role).lower().encode()),
            Attribute("bond", u256(bond)),
        ),
    )


def apply_role_register(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, RoleRegister)  # kind dispatch guarantees it
    sender = vtx.sender
    if has_role(view, sender, body.role):
        raise RoleAlreadyHeld(f"0x{sender.hex()} already holds the {_role_name(body.role)} role")
    bond = required_bond(economy_params(view), body.role)
    charge(view, vtx, bond)
    _replace_entry(view, sender, RoleEntry(body.role, ctx.height, bond, 0, body.metadata))
    return (_role_event("role_register", sender, body.role, bond),)


def apply_role_resign(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, RoleResign)  # kind dispatch guarantees it
    sender = vtx.sender
    entry = get_role(view, sender, body.role)
    if entry is None:
        raise MissingRole(f"0x{sender.hex()} holds no {_role_name(body.role)} role to resign")
    if entry.obligations:
        raise RoleHasObligations(
            f"the {_role_name(body.role)} role of 0x{sender.hex()} has {entry.obligations} open "
            "obligation(s); it can resign once they are settled"
        )
    charge(view, vtx)
    _put_entries(view, sender, [e for e in get_roles(view, sender) if e.role != body.role])
    credit(view, sender, entry.bond)
    return (_role_event("role_resign", sender, body.role, entry.bond),)


def _register_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 1  # one role entry


def _no_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 0


def register_spend(view: StateView, body: RoleRegister) -> int:
    """What a registration takes from the balance besides the fee (the bond), for the mempool."""
    return required_bond(economy_params(view), body.role)


HANDLERS: tuple[KindHandler, ...] = (
    KindHandler(
        EconomyKind.ROLE_REGISTER, RoleRegister, apply_role_register, _register_records,
        _check_role_body,
    ),
    KindHandler(
        EconomyKind.ROLE_RESIGN, RoleResign, apply_role_resign, _no_records, _check_role_body
    ),
)

__all__ = [
    "HANDLERS",
    "MissingRole",
    "RoleAlreadyHeld",
    "RoleBondDepleted",
    "RoleEntry",
    "RoleHasObligations",
    "RoleRegister",
    "RoleResign",
    "RoleSet",
    "UnknownRole",
    "adjust_obligations",
    "get_role",
    "get_roles",
    "has_role",
    "require_any_role",
    "require_role",
    "required_bond",
    "slash_role_bond",
]
