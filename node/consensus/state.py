"""State keys, state records and the in-memory overlay the pure transition writes into (DESIGN §4).

State is a key-value map. Keys are ``namespace byte || version byte || id``; the state tree
authenticates ``sha256(key) -> sha256(value)``. A block's transactions write into an ``Overlay``
over a read-only base view; only a committed block's overlay is written to the database.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from node.consensus.params import VotableParams
from node.encoding import Record, limit, pack
from node.types import UINT64_MAX, UINT256_MAX, Address, Amount, Hash32, Nonce

# Versioned key prefixes of the state map. "H" below is the height of the state (the last block
# applied; 0 at genesis).
NS_ACCOUNT = b"\x01\x01"  # + address -> Account
PARAMS_KEY = b"\x02\x01"  # -> VotableParams in force for block H+1
NS_VALIDATOR = b"\x03\x01"  # + address -> ValidatorBond (locked: candidate, validator, unbonding)
VALIDATOR_SET_KEY = b"\x04\x01"  # -> ValidatorSet of height H+1
SUPPLY_KEY = b"\x05\x01"  # -> Supply
AUTHORITY_PARAMS_KEY = b"\x06\x01"  # -> AuthorityParams (fixed at genesis)
# -> ValidatorSet of height H+2; while block H+1 executes, the set being built for H+3.
NEXT_VALIDATOR_SET_KEY = b"\x07\x01"
# The validator sets of recent heights, one epoch per change (node/consensus/validators.py).
VALSET_EPOCHS_KEY = b"\x08\x01"  # -> EpochRange(first, last) kept
NS_VALSET_EPOCH = b"\x09\x01"  # + epoch (8 bytes BE) -> ValidatorEpoch(start_height, hash)
NS_VALSET_EPOCH_SET = b"\x0a\x01"  # + epoch (8 bytes BE) -> ValidatorSet
NS_UNBONDING = b"\x0b\x01"  # + address -> Unbonding(release_height)
NS_VALIDATOR_TALLY = b"\x0c\x01"  # + subject + action (1 byte) -> VoteTally
NS_PARAM_TALLY = b"\x0d\x01"  # + params hash -> ParamTally
NS_PARAMS_AT = b"\x0e\x01"  # + height (8 bytes BE) -> VotableParams that take effect there
NS_EVIDENCE_SEEN = b"\x0f\x01"  # + evidence key -> EvidenceSeen(vote height)
# Height-indexed queues (``HeightQueue``) of the work the chain does by itself (DESIGN §4).
QUEUE_UNBONDING = b"\x10\x01"  # entries: address whose bond is released at that height
QUEUE_VOTE_EXPIRY = b"\x11\x01"  # entries: tally key whose votes expire at that height
QUEUE_EVIDENCE_EXPIRY = b"\x12\x01"  # entries: evidence key that ages out at that height


def account_key(address: Address) -> bytes:
    return NS_ACCOUNT + address


def validator_key(address: Address) -> bytes:
    return NS_VALIDATOR + address


def unbonding_key(address: Address) -> bytes:
    return NS_UNBONDING + address


def validator_tally_key(subject: Address, action: int) -> bytes:
    return NS_VALIDATOR_TALLY + subject + bytes([action])


def param_tally_key(params_hash: Hash32) -> bytes:
    return NS_PARAM_TALLY + params_hash


def params_at_key(height: int) -> bytes:
    return NS_PARAMS_AT + height.to_bytes(8, "big")


def evidence_seen_key(evidence_key: Hash32) -> bytes:
    return NS_EVIDENCE_SEEN + evidence_key


@dataclass(frozen=True, slots=True)
class Account(Record):
    nonce: Nonce
    balance: Amount


@dataclass(frozen=True, slots=True)
class Supply(Record):
    """Total NSD issued at genesis and burned since; circulating = issued − burned."""

    issued: Amount
    burned: Amount


@dataclass(frozen=True, slots=True)
class ValidatorBond(Record):
    """The bond an address has locked, kept under ``validator_key(address)``.

    Locked NSD is part of the issued supply but of no account's balance. It stays here while its
    owner is a candidate, a validator or unbonding; it leaves by release (back to the balance,
    after the unbonding period) or by a slash (burned) (DESIGN §5).
    """

    amount: Amount


@dataclass(frozen=True, slots=True)
class Unbonding(Record):
    """The bond under ``validator_key`` is on its way out: released at ``release_height``."""

    release_height: int


@dataclass(frozen=True, slots=True)
class VoterEntry(Record):
    voter: Address
    expires_at: int  # the vote counts in blocks below this height


MAX_TALLY_VOTERS = 10_000  # validators.MAX_VALIDATORS


@dataclass(frozen=True, slots=True)
class VoteTally(Record):
    """Open votes for one (subject, action), in voting order."""

    voters: tuple[VoterEntry, ...] = field(metadata=limit(MAX_TALLY_VOTERS))


@dataclass(frozen=True, slots=True)
class ParamTally(Record):
    """Open votes for one parameter proposal, with the proposal itself."""

    params: VotableParams
    voters: tuple[VoterEntry, ...] = field(metadata=limit(MAX_TALLY_VOTERS))


@dataclass(frozen=True, slots=True)
class EvidenceSeen(Record):
    """Evidence for a vote of ``height`` was processed (kept until it ages out)."""

    height: int


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


# --- height-indexed queues (DESIGN §4 "Bounded protocol work") -----------------------------------


@dataclass(frozen=True, slots=True)
class QueueCursor(Record):
    """Where a ``HeightQueue`` resumes: the next (height, index) and the entries still queued."""

    height: int
    index: int
    pending: int


@dataclass(frozen=True, slots=True)
class QueueCount(Record):
    count: int


_NO_CURSOR = QueueCursor(0, 0, 0)


class HeightQueue:
    """Entries due at a height, taken in (height, push order) with a per-block cap on the work.

    Keys under the queue's ``prefix``: ``+ 0x00`` the ``QueueCursor``; ``+ 0x01 + height`` the
    number of entries pushed for that height; ``+ 0x02 + height + index`` (8 + 4 bytes, big
    endian) one entry. Entries are pushed only for heights above the block being executed, and
    ``pop_due`` runs once per block at its end, so the cursor never passes a height that can still
    grow (a push below a cursor that waits above the block moves it back).
    ``pop_due`` counts both an entry taken and an empty height stepped over as one unit of work,
    so a block's queue work is at most ``max_work`` whatever the queue holds; what is left over
    is taken by the next blocks. With nothing queued it reads one key and writes nothing.
    """

    __slots__ = ("_count_prefix", "_cursor_key", "_entry_prefix")

    def __init__(self, prefix: bytes) -> None:
        self._cursor_key = prefix + b"\x00"
        self._count_prefix = prefix + b"\x01"
        self._entry_prefix = prefix + b"\x02"

    def _cursor(self, view: StateView) -> QueueCursor:
        raw = view.get(self._cursor_key)
        return _NO_CURSOR if raw is None else QueueCursor.decode(raw)

    def _count(self, view: StateView, height: int) -> int:
        raw = view.get(self._count_prefix + height.to_bytes(8, "big"))
        return 0 if raw is None else QueueCount.decode(raw).count

    def _entry_key(self, height: int, index: int) -> bytes:
        return self._entry_prefix + height.to_bytes(8, "big") + index.to_bytes(4, "big")

    def pending(self, view: StateView) -> int:
        return self._cursor(view).pending

    def push(self, view: Overlay, height: int, entry: bytes) -> None:
        """Queue ``entry`` for ``height`` (above the height of the block being executed)."""
        cursor = self._cursor(view)
        count = self._count(view, height)
        view.put(self._entry_key(height, count), entry)
        view.put(self._count_prefix + height.to_bytes(8, "big"), QueueCount(count + 1).encode())
        if cursor.pending == 0 or height < cursor.height:
            # Below the cursor only when the cursor waits at a height above the block being
            # executed (an earlier push of this block): nothing was taken there yet (index 0).
            cursor = QueueCursor(height, 0, cursor.pending + 1)
        else:
            cursor = QueueCursor(cursor.height, cursor.index, cursor.pending + 1)
        view.put(self._cursor_key, cursor.encode())

    def pop_due(self, view: Overlay, now: int, max_work: int) -> list[tuple[int, bytes]]:
        """Take (and delete) entries due at heights ≤ ``now``, oldest first, within ``max_work``.

        Returns (height the entry was queued for, entry).
        """
        cursor = self._cursor(view)
        if cursor.pending == 0 or cursor.height > now:
            return []
        h, i, pending = cursor.height, cursor.index, cursor.pending
        out: list[tuple[int, bytes]] = []
        work = 0
        count = self._count(view, h)
        while pending and h <= now and work < max_work:
            work += 1
            if i < count:
                key = self._entry_key(h, i)
                entry = view.get(key)
                if entry is None:  # pragma: no cover - a queue is only written here and in push
                    raise ValueError(f"height queue entry {h}/{i} is missing")
                view.delete(key)
                out.append((h, entry))
                i += 1
                pending -= 1
            else:
                if count:
                    view.delete(self._count_prefix + h.to_bytes(8, "big"))
                h, i = h + 1, 0
                count = self._count(view, h)
        if i and i == count:
            # The height is done (always so once nothing is pending): forget its counter.
            view.delete(self._count_prefix + h.to_bytes(8, "big"))
            h, i = h + 1, 0
        new = QueueCursor(h, i, pending)
        if new != cursor:
            view.put(self._cursor_key, new.encode())
        return out


UNBONDING_QUEUE = HeightQueue(QUEUE_UNBONDING)
VOTE_EXPIRY_QUEUE = HeightQueue(QUEUE_VOTE_EXPIRY)
EVIDENCE_EXPIRY_QUEUE = HeightQueue(QUEUE_EVIDENCE_EXPIRY)
