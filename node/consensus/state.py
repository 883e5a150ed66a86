"""State keys, state records and the in-memory overlay the pure transition writes into (DESIGN §4).

State is a key-value map. Keys are ``namespace byte || version byte || id``; the state tree
authenticates ``sha256(key) -> sha256(value)``. A block's transactions write into an ``Overlay``
over a read-only base view; only a committed block's overlay is written to the database.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from node.encoding import Record
from node.types import Address, Amount, Nonce

# Versioned key prefixes of the state map.
NS_ACCOUNT = b"\x01\x01"
PARAMS_KEY = b"\x02\x01"
NS_VALIDATOR = b"\x03\x01"
VALIDATOR_SET_KEY = b"\x04\x01"
SUPPLY_KEY = b"\x05\x01"


def account_key(address: Address) -> bytes:
    return NS_ACCOUNT + address


def validator_key(address: Address) -> bytes:
    return NS_VALIDATOR + address


@dataclass(frozen=True, slots=True)
class Account(Record):
    nonce: Nonce
    balance: Amount


@dataclass(frozen=True, slots=True)
class Supply(Record):
    """Total NSD issued at genesis and burned since; circulating = issued − burned."""

    issued: Amount
    burned: Amount


EMPTY_ACCOUNT = Account(Nonce(0), Amount(0))


class StateView(Protocol):
    """Read access to the state at one height."""

    def get(self, key: bytes) -> bytes | None: ...


class EmptyView:
    def get(self, key: bytes) -> bytes | None:
        return None


class DictView:
    """A plain mapping as a state view (genesis building, tests)."""

    def __init__(self, data: Mapping[bytes, bytes]) -> None:
        self._data = data

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)


class Overlay:
    """Writes buffered over a base view; ``None`` marks a deletion. Discard by dropping it."""

    __slots__ = ("_base", "_changes")

    def __init__(self, base: StateView) -> None:
        self._base = base
        self._changes: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        if key in self._changes:
            return self._changes[key]
        return self._base.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._changes[key] = value

    def delete(self, key: bytes) -> None:
        self._changes[key] = None

    def child(self) -> Overlay:
        """A nested overlay (one transaction) that can be merged into this one or dropped."""
        return Overlay(self)

    def merge_into_parent(self) -> None:
        if not isinstance(self._base, Overlay):
            raise TypeError("merge_into_parent needs an Overlay base")
        self._base._changes.update(self._changes)

    @property
    def changes(self) -> Mapping[bytes, bytes | None]:
        return self._changes

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._changes)


def get_account(view: StateView, address: Address) -> Account:
    raw = view.get(account_key(address))
    return EMPTY_ACCOUNT if raw is None else Account.decode(raw)


def put_account(overlay: Overlay, address: Address, account: Account) -> None:
    overlay.put(account_key(address), account.encode())
