"""The consensus validator set of one height: members, voting power, quorums, proposer rotation.

A ``ValidatorSet`` is a canonical record: validators strictly ordered by address, each with a
positive power. Its hash (sha-256 of the encoding) is the header's ``validators_hash`` (DESIGN §5).
Quorums are integer comparisons (consensus-notes "Quorums in integers"): 2f+1 is
``3 * power > 2 * total`` and f+1 is ``3 * power > total``. The proposer of (height, round) is a
pure round-robin over the ordered list by ``height + round`` (equal power in PoA).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from node import crypto
from node.consensus.state import (
    NEXT_VALIDATOR_SET_KEY,
    NS_VALSET_EPOCH,
    NS_VALSET_EPOCH_SET,
    VALIDATOR_SET_KEY,
    VALSET_EPOCHS_KEY,
    StateView,
)
from node.encoding import Record, limit
from node.errors import DecodeError
from node.types import Address, Hash32

MAX_VALIDATORS = 10_000  # same bound as the precommits of one commit (blocks.MAX_COMMIT_VOTES)
MAX_POWER = 2**32  # keeps total power far below 2**64 even with MAX_VALIDATORS members


class InvalidValidatorSet(DecodeError):
    """A validator set that is not canonical: unordered, duplicated, empty, or non-positive power."""

    reason = "invalid validator set"


@dataclass(frozen=True, slots=True)
class Validator(Record):
    address: Address
    power: int


@dataclass(frozen=True, slots=True)
class ValidatorSet(Record):
    """Validators ordered by address (strictly increasing), every power in 1..MAX_POWER."""

    validators: tuple[Validator, ...] = field(metadata=limit(MAX_VALIDATORS))

    def __post_init__(self) -> None:
        if not self.validators:
            raise InvalidValidatorSet("a validator set needs at least one validator")
        previous: bytes | None = None
        for v in self.validators:
            if not 0 < v.power <= MAX_POWER:
                raise InvalidValidatorSet(
                    f"validator 0x{v.address.hex()} has power {v.power}; expected 1..{MAX_POWER}"
                )
            if previous is not None and v.address <= previous:
                raise InvalidValidatorSet(
                    "validators must be strictly ordered by address (sorted, no duplicates)"
                )
            previous = v.address

    @classmethod
    def of(cls, members: dict[Address, int] | list[tuple[Address, int]]) -> ValidatorSet:
        """Build a set from (address, power) pairs in any order (sorted here)."""
        pairs = list(members.items()) if isinstance(members, dict) else list(members)
        return cls(tuple(Validator(a, p) for a, p in sorted(pairs)))

    def __len__(self) -> int:
        return len(self.validators)

    @property
    def total_power(self) -> int:
        return sum(v.power for v in self.validators)

    @property
    def addresses(self) -> tuple[Address, ...]:
        return tuple(v.address for v in self.validators)

    def hash(self) -> Hash32:
        """The header's ``validators_hash`` / ``next_validators_hash``."""
        return crypto.sha256(self.encode())

    def index_of(self, address: Address) -> int | None:
        i = bisect.bisect_left(self.validators, address, key=_address_of)
        if i < len(self.validators) and self.validators[i].address == address:
            return i
        return None

    def power_of(self, address: Address) -> int:
        """Voting power of ``address``; 0 if it is not a member."""
        i = self.index_of(address)
        return 0 if i is None else self.validators[i].power

    def is_member(self, address: Address) -> bool:
        return self.index_of(address) is not None

    def proposer(self, height: int, round: int) -> Address:
        """Round-robin by (height + round) over the ordered list (consensus-notes rule 1)."""
        return self.validators[(height + round) % len(self.validators)].address

    def has_quorum(self, power: int) -> bool:
        """2f+1: strictly more than two thirds of the total power."""
        return 3 * power > 2 * self.total_power

    def has_one_third(self, power: int) -> bool:
        """f+1: strictly more than one third of the total power."""
        return 3 * power > self.total_power

    def has_majority(self, power: int) -> bool:
        """More than half of the total power (validator-set and parameter votes)."""
        return 2 * power > self.total_power

    def with_validator(self, address: Address, power: int = 1) -> ValidatorSet:
        """This set plus ``address`` (kept in address order)."""
        if self.is_member(address):
            raise InvalidValidatorSet(f"0x{address.hex()} is already a validator")
        i = bisect.bisect_left(self.validators, address, key=_address_of)
        vals = self.validators
        return ValidatorSet((*vals[:i], Validator(address, power), *vals[i:]))

    def without_validator(self, address: Address) -> ValidatorSet:
        """This set less ``address``; a set cannot become empty (``InvalidValidatorSet``)."""
        i = self.index_of(address)
        if i is None:
            raise InvalidValidatorSet(f"0x{address.hex()} is not a validator")
        return ValidatorSet(self.validators[:i] + self.validators[i + 1 :])


def _address_of(v: Validator) -> Address:
    return v.address


class StateWriter(StateView, Protocol):
    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...


# --- the validator set of each recent height (kept in state) ------------------------------------
#
# Every change applies at h+2 (DESIGN §5), so after block H the sets of heights up to H+2 are
# known. State keeps them as *epochs*: epoch e holds the set from ``start_height`` until the next
# epoch's start. A block writes a new epoch only when the set of h+2 differs from that of h+1, so
# the history costs one record per change, not per height. Epochs that end before
# ``H + 1 - evidence_max_age`` are pruned (at most two per block): the sets of the last
# ``evidence_max_age`` heights stay available for evidence checks and commit verification.


@dataclass(frozen=True, slots=True)
class EpochRange(Record):
    """The epochs kept in state: ``first`` ..= ``last``."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class ValidatorEpoch(Record):
    start_height: int
    validators_hash: Hash32


def _epoch_key(prefix: bytes, epoch: int) -> bytes:
    return prefix + epoch.to_bytes(8, "big")


def genesis_validator_state(genesis_set: ValidatorSet) -> dict[bytes, bytes]:
    """The set-history records of the genesis state: one epoch from height 1."""
    encoded = genesis_set.encode()
    return {
        VALIDATOR_SET_KEY: encoded,
        NEXT_VALIDATOR_SET_KEY: encoded,
        VALSET_EPOCHS_KEY: EpochRange(0, 0).encode(),
        _epoch_key(NS_VALSET_EPOCH, 0): ValidatorEpoch(1, genesis_set.hash()).encode(),
        _epoch_key(NS_VALSET_EPOCH_SET, 0): encoded,
    }


class ValidatorHistoryError(LookupError):
    """The set of a height is not in state (pruned, or not decided yet)."""


def _epochs(view: StateView) -> EpochRange:
    raw = view.get(VALSET_EPOCHS_KEY)
    if raw is None:
        raise ValidatorHistoryError("the validator set history is missing from state")
    return EpochRange.decode(raw)


def _epoch(view: StateView, e: int) -> ValidatorEpoch:
    raw = view.get(_epoch_key(NS_VALSET_EPOCH, e))
    if raw is None:
        raise ValidatorHistoryError(f"validator epoch {e} is missing from state")
    return ValidatorEpoch.decode(raw)


def epoch_of_height(view: StateView, height: int) -> int:
    """The epoch whose set signs ``height`` (binary search over the epochs kept)."""
    r = _epochs(view)
    lo, hi = r.first, r.last
    if height < _epoch(view, lo).start_height:
        raise ValidatorHistoryError(
            f"the validator set of height {height} is no longer kept in state"
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _epoch(view, mid).start_height <= height:
            lo = mid
        else:
            hi = mid - 1
    return lo


def validator_set_at(view: StateView, height: int) -> ValidatorSet:
    """The set of ``height`` from state, for heights from the oldest kept up to H+2.

    Above H+2 the answer is the latest set decided so far (provisional: blocks not yet applied
    may change it).
    """
    e = epoch_of_height(view, height)
    raw = view.get(_epoch_key(NS_VALSET_EPOCH_SET, e))
    if raw is None:
        raise ValidatorHistoryError(f"the validator set of epoch {e} is missing from state")
    return ValidatorSet.decode(raw)


def oldest_kept_height(view: StateView) -> int:
    """The lowest height whose validator set state still holds."""
    return _epoch(view, _epochs(view).first).start_height


def rotate_validator_sets(view: StateWriter, height: int, evidence_max_age: int) -> bool:
    """End of block ``height``: record set(h+1) as the current set and set(h+2) as an epoch.

    During the block ``NEXT_VALIDATOR_SET_KEY`` was the set being built for h+2 (from set(h+1)
    by the block's votes, exits and evidence). Returns whether the set of h+2 differs from h+1.
    """
    r = _epochs(view)
    last_set_key = _epoch_key(NS_VALSET_EPOCH_SET, r.last)
    set_h1 = view.get(last_set_key)  # the last epoch covers h+1 (it starts at h+1 at most)
    if set_h1 is None:
        raise ValidatorHistoryError(f"the validator set of epoch {r.last} is missing from state")
    if view.get(VALIDATOR_SET_KEY) != set_h1:
        view.put(VALIDATOR_SET_KEY, set_h1)
    set_h2 = view.get(NEXT_VALIDATOR_SET_KEY)
    if set_h2 is None:
        raise ValidatorHistoryError("the next validator set is missing from state")
    changed = set_h2 != set_h1
    first, last = r.first, r.last
    if changed:
        last += 1
        next_hash = crypto.sha256(set_h2)
        view.put(_epoch_key(NS_VALSET_EPOCH, last), ValidatorEpoch(height + 2, next_hash).encode())
        view.put(_epoch_key(NS_VALSET_EPOCH_SET, last), set_h2)
    # Keep every set of heights >= (h + 1) - evidence_max_age, the oldest the next block's
    # evidence may name.
    keep_from = height + 1 - evidence_max_age
    for _ in range(2):
        if first >= last or _epoch(view, first + 1).start_height > keep_from:
            break
        view.delete(_epoch_key(NS_VALSET_EPOCH, first))
        view.delete(_epoch_key(NS_VALSET_EPOCH_SET, first))
        first += 1
    if (first, last) != (r.first, r.last):
        view.put(VALSET_EPOCHS_KEY, EpochRange(first, last).encode())
    return changed
