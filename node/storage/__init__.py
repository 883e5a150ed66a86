"""Storage: the key-value interface and its adapters, the chain DB key schema and the chain store.

Other packages import from here only: ``LevelDB`` (plyvel) and ``MemoryKV`` (tests) implement
``KVStore``; ``ChainStore`` writes one synced batch per block; ``ChainReader`` reads the chain
over the live store or a snapshot.

The names are loaded on first use (PEP 562), so importing a pure submodule of this package —
``node.storage.unixfs`` (CIDs), ``format_v1``, ``encryption`` — does not load the chain store,
its crypto or plyvel: a compute worker's child process computes checkpoint CIDs with the first
alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "node.storage.api": ("KVReader", "KVStore", "Snapshot", "WriteBatch"),
    "node.storage.chain_store": (
        "DEFAULT_VERIFY_DEPTH",
        "FIRST_BLOCK_PARENT_HASH",
        "FIRST_HEIGHT",
        "BlockBody",
        "BlockReceipts",
        "ChainReader",
        "ChainSnapshot",
        "ChainStore",
        "GenesisRecord",
        "HeadCheck",
        "HeadRecord",
        "HeightRecord",
        "TxLocationRecord",
    ),
    "node.storage.leveldb": ("LevelDB",),
    "node.storage.memory": ("MemoryKV",),
    "node.storage.schema": ("SCHEMA_VERSION", "SchemaRecord", "check_schema"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [  # the names of _HOMES (tests/test_storage_imports.py keeps the two equal)
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


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
