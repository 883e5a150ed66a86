"""State keys, state records and the in-memory overlay the pure transition writes into (DESIGN §4).

State is a key-value map. Keys are ``namespace byte || version byte || id``; the state tree
authenticates ``sha256(key) -> sha256(value)``. A block's transactions write into an ``Overlay``
over a read-only base view; only a committed block's overlay is written to the database.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from node.encoding import Record, pack
from node.types import UINT64_MAX, UINT256_MAX, Address, Amount, Nonce

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


_MISSING = object()


class Overlay:
    """Writes buffered over a base view; ``None`` marks a deletion. Discard by dropping it.

    Reads of the base are remembered (a block reads each touched account several times), so
    the base must not change while the overlay is in use: it is a committed state, or the
    parent overlay while this child (one transaction) is applied.
    """

    __slots__ = ("_base", "_changes", "_reads")

    def __init__(self, base: StateView) -> None:
        self._base = base
        self._changes: dict[bytes, bytes | None] = {}
        self._reads: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        value = self._changes.get(key, _MISSING)
        if value is _MISSING:
            value = self._reads.get(key, _MISSING)
            if value is _MISSING:
                value = self._reads[key] = self._base.get(key)
        return value  # type: ignore[return-value]

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
    return EMPTY_ACCOUNT if raw is None else decode_account(raw)


def put_account(overlay: Overlay, address: Address, account: Account) -> None:
    overlay.put(account_key(address), encode_account(account.nonce, account.balance))


# Fast paths for the hottest record. An encoded Account is the 2-item array header 0x92, the nonce
# as a minimal msgpack uint (1, 2, 3, 5 or 9 bytes), and the balance as bin 8 of 32 bytes.
_UINT_FORMS: dict[int, tuple[int, int]] = {  # encoded length -> (format byte, smallest value)
    37: (0xCC, 1 << 7),
    38: (0xCD, 1 << 8),
    40: (0xCE, 1 << 16),
    44: (0xCF, 1 << 32),
}


def account_fields(raw: bytes) -> tuple[int, int]:
    """(nonce, balance) of an encoded account; ``Account.decode``'s result and errors."""
    n = len(raw) if type(raw) is bytes else 0
    if n >= 36 and raw[0] == 0x92 and raw[n - 34 : n - 32] == b"\xc4\x20":
        if n == 36:
            if raw[1] < 0x80:
                return raw[1], int.from_bytes(raw[4:], "big")
        else:
            form = _UINT_FORMS.get(n)
            if form is not None and raw[1] == form[0]:
                nonce = int.from_bytes(raw[2 : n - 34], "big")
                if nonce >= form[1]:
                    return nonce, int.from_bytes(raw[n - 32 :], "big")
    # Anything else (non-canonical, malformed) gets the strict decoder and its error.
    account = Account.decode(raw)
    return account.nonce, account.balance


def decode_account(raw: bytes) -> Account:
    """``Account.decode(raw)``, faster for the canonical forms."""
    nonce, balance = account_fields(raw)
    return Account(Nonce(nonce), Amount(balance))


def encode_account(nonce: int, balance: int) -> bytes:
    """``Account(nonce, balance).encode()``, faster."""
    if type(nonce) is not int or type(balance) is not int:
        return Account(Nonce(nonce), Amount(balance)).encode()
    if not 0 <= nonce <= UINT64_MAX or not 0 <= balance <= UINT256_MAX:
        return Account(Nonce(nonce), Amount(balance)).encode()  # raises its EncodeError
    return pack((nonce, balance.to_bytes(32, "big")))
