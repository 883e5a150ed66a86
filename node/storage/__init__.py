"""Storage: the key-value interface and its adapters, the chain DB key schema and the chain store.

Other packages import from here only: ``LevelDB`` (plyvel) and ``MemoryKV`` (tests) implement
``KVStore``; ``ChainStore`` writes one synced batch per block; ``ChainReader`` reads the chain
over the live store or a snapshot.
"""

from node.storage.api import KVReader, KVStore, Snapshot, WriteBatch
from node.storage.chain_store import (
    DEFAULT_VERIFY_DEPTH,
    FIRST_BLOCK_PARENT_HASH,
    FIRST_HEIGHT,
    BlockBody,
    BlockReceipts,
    ChainReader,
    ChainSnapshot,
    ChainStore,
    GenesisRecord,
    HeadCheck,
    HeadRecord,
    HeightRecord,
    TxLocationRecord,
)
from node.storage.leveldb import LevelDB
from node.storage.memory import MemoryKV
from node.storage.schema import SCHEMA_VERSION, SchemaRecord, check_schema

__all__ = [
    "DEFAULT_VERIFY_DEPTH",
    "FIRST_BLOCK_PARENT_HASH",
    "FIRST_HEIGHT",
    "SCHEMA_VERSION",
    "BlockBody",
    "BlockReceipts",
    "ChainReader",
    "ChainSnapshot",
    "ChainStore",
    "GenesisRecord",
    "HeadCheck",
    "HeadRecord",
    "HeightRecord",
    "KVReader",
    "KVStore",
    "LevelDB",
    "MemoryKV",
    "SchemaRecord",
    "Snapshot",
    "TxLocationRecord",
    "WriteBatch",
    "check_schema",
]
