"""Receipts and events: what each transaction did (DESIGN §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from node.encoding import Record, limit
from node.types import Amount, Hash32


class ReceiptStatus(IntEnum):
    SUCCESS = 0
    FAILED = 1  # executed, fee charged, effects reverted (later kinds; transfers never fail so)


@dataclass(frozen=True, slots=True)
class Attribute(Record):
    key: str = field(metadata=limit(64))
    value: bytes = field(metadata=limit(4096))


@dataclass(frozen=True, slots=True)
class Event(Record):
    name: str = field(metadata=limit(64))
    attributes: tuple[Attribute, ...] = field(metadata=limit(64))


@dataclass(frozen=True, slots=True)
class Receipt(Record):
    tx_id: Hash32
    status: int
    fee_paid: Amount  # the whole fee taken from the sender
    burned: Amount  # the consensus cost part, burned
    events: tuple[Event, ...] = field(metadata=limit(1024))
    error: str = field(default="", metadata=limit(256))
