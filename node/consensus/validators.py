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

from node import crypto
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


def _address_of(v: Validator) -> Address:
    return v.address
