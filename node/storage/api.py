"""The storage interface: an ordered byte key-value store with atomic batches and snapshots.

Two implementations: ``leveldb.LevelDB`` (plyvel, the only plyvel importer) and
``memory.MemoryKV`` (same semantics, for tests). Errors from the engine are translated to
``node.errors.StorageError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class KVReader(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Items in key order; ``prefix`` or the half-open range [start, stop)."""
        ...


class WriteBatch(Protocol):
    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def commit(self, *, sync: bool = True) -> None:
        """Apply every put and delete atomically (all or none); sync=True fsyncs before returning."""
        ...


class Snapshot(KVReader, Protocol):
    """A consistent read-only view as of its creation; later writes are invisible to it."""

    def close(self) -> None: ...


class KVStore(KVReader, Protocol):
    def put(self, key: bytes, value: bytes, *, sync: bool = False) -> None: ...

    def delete(self, key: bytes, *, sync: bool = False) -> None: ...

    def batch(self) -> WriteBatch: ...

    def snapshot(self) -> Snapshot: ...

    def close(self) -> None: ...
