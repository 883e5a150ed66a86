"""The chain database's key layout, in one place, and its schema version (DESIGN §4, §7).

Every key in the chain DB starts with one prefix byte from the table below; no prefix is a prefix
of another, so each owner can scan its own range. Heights are 8-byte big-endian so that byte
order is numeric order. A change to any layout or stored record bumps ``SCHEMA_VERSION``; a node
refuses to open a database of another version (``check_schema``) rather than misread it.

=====  ================================  =============================  ===============================
byte   what                              key                            value
=====  ================================  =============================  ===============================
m      meta                              m + name                       see META_* below
h      block header by height            h + height                     Header
b      block body by height              b + height                     chain_store.BlockBody
n      block hash → height               n + hash32                     chain_store.HeightRecord
c      seen commit by height             c + height                     Commit
r      receipts by height                r + height                     chain_store.BlockReceipts
x      tx id → location                  x + tx_id32                    chain_store.TxLocationRecord
s      state values (latest)             s + state key                  the raw state value
T      state tree nodes, stale index     owned by storage/smt.py        (smt records)
W      consensus WAL                     reserved                       —
V      validator sign-state              reserved (single key V)        —
A      artifact pins and indexes         reserved                       —
=====  ================================  =============================  ===============================

Meta keys: ``m schema`` (SchemaRecord), ``m genesis`` (chain id and genesis hash),
``m head`` (height and hash of the last committed block). The tree's layout under ``T`` is
documented in ``smt.py``. ``W`` and ``V`` are reserved: the consensus WAL and the sign-state it
carries live in their own synced file today (``node/consensus/wal.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from node.encoding import Record, limit
from node.errors import CorruptDatabase, DecodeError, StorageError
from node.storage.api import KVStore
from node.types import Hash32, Height

# 2: the tx index entry (x + tx id) holds the byte ranges of the transaction and of its receipt
#    inside the stored body and receipts, so a lookup decodes neither (TxLocationRecord).
SCHEMA_VERSION = 2
SCHEMA_KIND = "neuroseed-chain-db"  # tells a chain DB from another LevelDB (e.g. the blob store)

PREFIX_META = b"m"
PREFIX_HEADER = b"h"
PREFIX_BODY = b"b"
PREFIX_BLOCK_HASH = b"n"
PREFIX_COMMIT = b"c"
PREFIX_RECEIPTS = b"r"
PREFIX_TX = b"x"
PREFIX_STATE = b"s"
PREFIX_TREE = b"T"  # reserved for node/storage/smt.py: every key under it is the tree's
PREFIX_WAL = b"W"  # reserved: the WAL is a file today (node/consensus/wal.py)
PREFIX_SIGN_STATE = b"V"  # reserved: the sign-state rides in the WAL file today
PREFIX_ARTIFACT = b"A"  # reserved: pins, reference counts, artifact indexes (DESIGN §7)

META_SCHEMA_KEY = PREFIX_META + b"schema"
META_GENESIS_KEY = PREFIX_META + b"genesis"
META_HEAD_KEY = PREFIX_META + b"head"
SIGN_STATE_KEY = PREFIX_SIGN_STATE

ALL_PREFIXES: dict[str, bytes] = {
    "meta": PREFIX_META,
    "header": PREFIX_HEADER,
    "body": PREFIX_BODY,
    "block_hash": PREFIX_BLOCK_HASH,
    "commit": PREFIX_COMMIT,
    "receipts": PREFIX_RECEIPTS,
    "tx": PREFIX_TX,
    "state": PREFIX_STATE,
    "tree": PREFIX_TREE,
    "wal": PREFIX_WAL,
    "sign_state": PREFIX_SIGN_STATE,
    "artifact": PREFIX_ARTIFACT,
}

# The prefixes ChainStore writes itself; callers' extra writes may not touch them.
CHAIN_STORE_PREFIXES: tuple[bytes, ...] = (
    PREFIX_META,
    PREFIX_HEADER,
    PREFIX_BODY,
    PREFIX_BLOCK_HASH,
    PREFIX_COMMIT,
    PREFIX_RECEIPTS,
    PREFIX_TX,
    PREFIX_STATE,
)

_HEIGHT_BYTES = 8


@dataclass(frozen=True, slots=True)
class SchemaRecord(Record):
    version: int
    kind: str = field(metadata=limit(64))


def encode_height(height: int) -> bytes:
    if not 0 <= height < 1 << 64:
        raise ValueError(f"height {height} out of uint64 range")
    return height.to_bytes(_HEIGHT_BYTES, "big")


def decode_height(raw: bytes) -> Height:
    if len(raw) != _HEIGHT_BYTES:
        raise ValueError("a height key suffix is 8 bytes")
    return Height(int.from_bytes(raw, "big"))


def header_key(height: int) -> bytes:
    return PREFIX_HEADER + encode_height(height)


def body_key(height: int) -> bytes:
    return PREFIX_BODY + encode_height(height)


def block_hash_key(block_hash: Hash32 | bytes) -> bytes:
    if len(block_hash) != 32:
        raise ValueError("a block hash is 32 bytes")
    return PREFIX_BLOCK_HASH + block_hash


def commit_key(height: int) -> bytes:
    return PREFIX_COMMIT + encode_height(height)


def receipts_key(height: int) -> bytes:
    return PREFIX_RECEIPTS + encode_height(height)


def tx_key(tx_id: Hash32 | bytes) -> bytes:
    if len(tx_id) != 32:
        raise ValueError("a transaction id is 32 bytes")
    return PREFIX_TX + tx_id


def state_key(key: bytes) -> bytes:
    """Where the latest value of state key ``key`` (node.consensus.state) is stored."""
    return PREFIX_STATE + key


def wal_key(seq: int) -> bytes:
    """A WAL entry by sequence number, for node/consensus/wal.py if it uses this DB."""
    return PREFIX_WAL + encode_height(seq)


def is_chain_store_key(key: bytes) -> bool:
    return key[:1] in CHAIN_STORE_PREFIXES


def check_schema(kv: KVStore) -> int:
    """Check the schema record at open; write it (synced) on a fresh, empty database.

    Returns the schema version. Raises ``StorageError`` for a database of another kind or
    version and ``CorruptDatabase`` for an unreadable record.
    """
    raw = kv.get(META_SCHEMA_KEY)
    if raw is None:
        if next(iter(kv.iterate()), None) is not None:
            raise StorageError(
                "the database has data but no NeuroSeed schema record, so it is not a NeuroSeed "
                "chain database; check the data directory setting"
            )
        kv.put(META_SCHEMA_KEY, SchemaRecord(SCHEMA_VERSION, SCHEMA_KIND).encode(), sync=True)
        return SCHEMA_VERSION
    try:
        record = SchemaRecord.decode(raw)
    except DecodeError as exc:
        raise CorruptDatabase(
            f"the database's schema record is unreadable ({exc.message}); restore the data "
            "directory from a backup, or remove it and resync from peers"
        ) from exc
    if record.kind != SCHEMA_KIND:
        raise StorageError(
            f"the database is a {record.kind!r} database, not a chain database; "
            "check the data directory setting"
        )
    if record.version > SCHEMA_VERSION:
        raise StorageError(
            f"the chain database has schema version {record.version}, newer than this node's "
            f"{SCHEMA_VERSION}; upgrade the node"
        )
    if record.version < SCHEMA_VERSION:
        raise StorageError(
            f"the chain database has schema version {record.version}, older than this node's "
            f"{SCHEMA_VERSION}, and no migration exists; remove the data directory and resync "
            "from peers"
        )
    return record.version
