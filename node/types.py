"""Domain types: NewTypes over int and bytes, so signatures say what a value means."""

from __future__ import annotations

from typing import NewType

Address = NewType("Address", bytes)  # 20 bytes: last 20 of keccak-256(X || Y)
Hash32 = NewType("Hash32", bytes)  # 32 bytes, sha-256 unless stated
Height = NewType("Height", int)  # uint64
Round = NewType("Round", int)  # uint32 in practice, encoded uint64
Nonce = NewType("Nonce", int)  # uint64 per-account transaction counter
ChainId = NewType("ChainId", int)  # uint64
Amount = NewType("Amount", int)  # uint256 in base units (1 NSD = 10**18)
TimestampMs = NewType("TimestampMs", int)  # uint64, milliseconds since the Unix epoch
Signature = NewType("Signature", bytes)  # 65 bytes r || s || recovery id

NSD = 10**18
UINT64_MAX = 2**64 - 1
UINT256_MAX = 2**256 - 1
ZERO_HASH = Hash32(b"\x00" * 32)
ZERO_ADDRESS = Address(b"\x00" * 20)
