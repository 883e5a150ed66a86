"""``MemoryKV``: the in-memory ``KVStore`` with LevelDB's semantics, for tests (DESIGN §1).

Same contract as ``leveldb.LevelDB``: keys iterate in unsigned byte order, an iterator is a
point-in-time view taken when ``iterate`` is called, write batches are atomic (all or none), a
snapshot never sees later writes, one writer thread may run next to any number of snapshot readers
in other threads, and closing the store closes its snapshots.

How: the data live in a ``_Version`` (a dict plus a sorted key list). A snapshot or an iterator
pins the current version; a writer never mutates a pinned version but copies it first
(copy-on-write), so readers need no lock at all. A batch is applied with an undo log, so a failure
halfway through (``fail_next_commit``, which tests use to play a crash inside a write) rolls it
back and the store still holds exactly the last committed state; ``crash_copy`` then gives what a
restarted process would find.

``resolve_range`` is the one definition of prefix/range bounds; ``leveldb`` uses it too.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from types import TracebackType

from node.errors import StorageError


def resolve_range(
    prefix: bytes | None, start: bytes | None, stop: bytes | None
) -> tuple[bytes | None, bytes | None]:
    """The half-open key range [start, stop) selected by ``prefix`` or by ``start``/``stop``.

    ``None`` is unbounded. A prefix ending in 0xff bytes has no successor in that byte position,
    so those bytes are dropped before incrementing (``b"a\\xff"`` → stop ``b"b"``); a prefix of
    only 0xff bytes (or the empty prefix) runs to the end of the key space.
    """
    if prefix is None:
        return start, stop
    if start is not None or stop is not None:
        raise ValueError("iterate takes either prefix or start/stop, not both")
    if type(prefix) is not bytes:
        raise TypeError("prefix must be bytes")
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return (prefix or None), None
    return prefix, trimmed[:-1] + bytes([trimmed[-1] + 1])


def _check_bytes(key: object, value: object = b"") -> None:
    # Same rule as plyvel: only real ``bytes`` (a bytearray could change after being stored).
    if type(key) is not bytes:
        raise TypeError(f"keys must be bytes, not {type(key).__name__}")
    if type(value) is not bytes:
        raise TypeError(f"values must be bytes, not {type(value).__name__}")


class _Version:
    """One generation of the data. Immutable while ``readers`` > 0."""

    __slots__ = ("data", "keys", "readers")

    def __init__(self, data: dict[bytes, bytes], keys: list[bytes]) -> None:
        self.data = data
        self.keys = keys  # sorted; bytes compare as unsigned bytes, like LevelDB's comparator
        self.readers = 0

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def items(
        self, start: bytes | None, stop: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
        keys, data = self.keys, self.data
        lo = 0 if start is None else bisect.bisect_left(keys, start)
        hi = len(keys) if stop is None else bisect.bisect_left(keys, stop)
        indexes = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        for i in indexes:
            key = keys[i]
            yield key, data[key]


class MemoryKV:
    """An ordered in-memory key-value store with atomic batches and isolated snapshots."""

    def __init__(self, items: dict[bytes, bytes] | None = None) -> None:
        data = dict(items) if items else {}
        for k, v in data.items():
            _check_bytes(k, v)
        # RLock: a generator's cleanup (unpinning its version) may run from the GC while this
        # thread already holds the lock.
        self._lock = threading.RLock()
        self._version = _Version(data, sorted(data))
        self._closed = False
        self._snapshots: set[MemorySnapshot] = set()
        self._fail_after: int | None = None
        self._writes = 0

    # --- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        _check_bytes(key)
        with self._lock:
            self._check_open()
            return self._version.get(key)

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        lo, hi = resolve_range(prefix, start, stop)
        with self._lock:
            self._check_open()
            version = self._pin()
        # Pinned now, not at the first next(): the view is the store as of this call, as with a
        # LevelDB iterator (which holds an implicit snapshot from its creation).
        return self._iterate_pinned(version, lo, hi, reverse)

    def _iterate_pinned(
        self, version: _Version, lo: bytes | None, hi: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
        try:
            for item in version.items(lo, hi, reverse):
                if self._closed:
                    raise StorageError("the database is closed")
                yield item
        finally:
            self._unpin(version)

    # --- writes --------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, *, sync: bool = False) -> None:
        _check_bytes(key, value)
        self._apply({key: value})

    def delete(self, key: bytes, *, sync: bool = False) -> None:
        _check_bytes(key)
        self._apply({key: None})

    def batch(self) -> MemoryBatch:
        with self._lock:
            self._check_open()
        return MemoryBatch(self)

    def snapshot(self) -> MemorySnapshot:
        with self._lock:
            self._check_open()
            snap = MemorySnapshot(self, self._pin())
            self._snapshots.add(snap)
            return snap

    def close(self) -> None:
        """Close the store and every snapshot still open; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for snap in list(self._snapshots):
                snap.close()

    # --- test hooks ----------------------------------------------------------------------------

    def fail_next_commit(self, after_ops: int) -> None:
        """Make the next write fail after applying ``after_ops`` of its operations.

        The failure raises ``StorageError`` from inside the apply loop, like a crash or an I/O
        error in the middle of writing; the undo log must then leave the store as it was.
        """
        if after_ops < 0:
            raise ValueError("after_ops must be >= 0")
        with self._lock:
            self._fail_after = after_ops

    def crash_copy(self) -> MemoryKV:
        """A new, independent store holding what a restarted process would find.

        Every write is atomic and takes effect only when it returns, so that is the current data.
        """
        with self._lock:
            return MemoryKV(self._version.data)

    @property
    def write_count(self) -> int:
        """Successful write calls so far (each put, delete and batch commit counts once)."""
        return self._writes

    # --- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the database is closed")

    def _pin(self) -> _Version:
        version = self._version
        version.readers += 1
        return version

    def _unpin(self, version: _Version) -> None:
        with self._lock:
            version.readers -= 1

    def _apply(self, ops: dict[bytes, bytes | None]) -> None:
        with self._lock:
            self._check_open()
            version = self._version
            if version.readers:
                # Copy-on-write: readers keep the pinned generation untouched.
                version = _Version(dict(version.data), list(version.keys))
                self._version = version
            fail_after, self._fail_after = self._fail_after, None
            undo: list[tuple[bytes, bytes | None]] = []
            try:
                for key, value in ops.items():
                    if fail_after is not None and len(undo) == fail_after:
                        raise StorageError("injected write failure (test)")
                    undo.append((key, version.data.get(key)))
                    _set(version, key, value)
                if fail_after is not None:
                    raise StorageError("injected write failure (test)")
            except BaseException:
                for key, old in reversed(undo):
                    _set(version, key, old)
                raise
            self._writes += 1


def _set(version: _Version, key: bytes, value: bytes | None) -> None:
    data, keys = version.data, version.keys
    if value is None:
        if data.pop(key, None) is not None:
            del keys[bisect.bisect_left(keys, key)]
        return
    if key not in data:
        bisect.insort(keys, key)
    data[key] = value


class MemoryBatch:
    """Buffered puts and deletes; the last operation on a key wins, as in a LevelDB WriteBatch."""

    __slots__ = ("_done", "_ops", "_store")

    def __init__(self, store: MemoryKV) -> None:
        self._store = store
        self._ops: dict[bytes, bytes | None] = {}
        self._done = False

    def put(self, key: bytes, value: bytes) -> None:
        _check_bytes(key, value)
        self._check_usable()
        self._ops.pop(key, None)  # re-insert so apply order follows the last write
        self._ops[key] = value

    def delete(self, key: bytes) -> None:
        _check_bytes(key)
        self._check_usable()
        self._ops.pop(key, None)
        self._ops[key] = None

    def commit(self, *, sync: bool = True) -> None:
        self._check_usable()
        self._done = True
        self._store._apply(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    def _check_usable(self) -> None:
        if self._done:
            raise StorageError("this write batch was already committed; start a new one")


class MemorySnapshot:
    """A read-only view of one pinned version; safe to read from any thread."""

    __slots__ = ("_closed", "_store", "_version")

    def __init__(self, store: MemoryKV, version: _Version) -> None:
        self._store = store
        self._version = version
        self._closed = False

    def get(self, key: bytes) -> bytes | None:
        _check_bytes(key)
        self._check_open()
        return self._version.get(key)

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        lo, hi = resolve_range(prefix, start, stop)
        self._check_open()
        return self._iterate(lo, hi, reverse)

    def _iterate(
        self, lo: bytes | None, hi: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
        for item in self._version.items(lo, hi, reverse):
            self._check_open()
            yield item

    def close(self) -> None:
        with self._store._lock:
            if self._closed:
                return
            self._closed = True
            self._store._snapshots.discard(self)
            self._version.readers -= 1

    def __enter__(self) -> MemorySnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the snapshot is closed")
