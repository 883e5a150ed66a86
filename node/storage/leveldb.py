"""``LevelDB``: the ``KVStore`` over LevelDB via plyvel, the only module that imports plyvel.

Semantics match ``memory.MemoryKV`` (the test double): unsigned byte order, point-in-time
iterators, atomic write batches, isolated snapshots, and errors translated into
``node.errors.StorageError`` / ``CorruptDatabase`` whose messages say what to do and carry no
file system paths (they may reach RPC clients; the path and LevelDB's own text go to the log).

Threads: the chain service writes from its thread while the RPC server reads snapshots from its
own (DESIGN §1). LevelDB allows that, but plyvel releases the GIL inside LevelDB calls, so freeing
the database while another thread is inside a read would be a use-after-free. Every call into
plyvel therefore registers itself in a small in-flight counter; ``close()`` marks the store closed,
waits for the calls in flight (single LevelDB operations, never a whole iteration), releases the
snapshots still open and only then closes the database. Later calls raise ``StorageError``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import plyvel

from node.errors import CorruptDatabase, StorageError
from node.storage.memory import resolve_range

log = logging.getLogger(__name__)

DEFAULT_BLOCK_CACHE_BYTES = 64 << 20
DEFAULT_WRITE_BUFFER_BYTES = 16 << 20
# 10 bits per key gives ~1 % false positives: most lookups of absent keys (unknown tx ids,
# missing state keys) then skip the disk.
BLOOM_FILTER_BITS = 10

_MSG_LOCKED = (
    "the data directory is in use by another process (is another node running on it?); "
    "stop that process or choose another data directory"
)
_MSG_MISSING = (
    "no database exists in the data directory; initialise the node first (`neuroseed init`) "
    "or check the configured data directory"
)
_MSG_CLOSED = "the database is closed"


class LevelDB:
    """A LevelDB database directory opened for reading and writing by this process."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        block_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
        write_buffer_bytes: int = DEFAULT_WRITE_BUFFER_BYTES,
    ) -> None:
        self._path = os.fspath(path)
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._snapshots: set[LevelDBSnapshot] = set()
        if create:
            try:
                os.makedirs(self._path, exist_ok=True)
            except OSError as exc:
                log.error("cannot create database directory %s: %s", self._path, exc)
                raise StorageError(
                    f"cannot create the database directory ({exc.strerror}); "
                    "check the data directory setting and its permissions"
                ) from exc
        try:
            # paranoid_checks stays off on purpose: with it LevelDB refuses to open when the last
            # log record is torn by a crash, instead of dropping that incomplete batch — which is
            # exactly the all-or-nothing recovery the one-batch-per-block commit relies on.
            self._db: Any = plyvel.DB(
                self._path,
                create_if_missing=create,
                lru_cache_size=block_cache_bytes,
                write_buffer_size=write_buffer_bytes,
                bloom_filter_bits=BLOOM_FILTER_BITS,
            )
        except plyvel.Error as exc:
            raise self._translate(exc, "open") from exc

    # --- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        _check_key(key)
        self._enter()
        try:
            value: bytes | None = self._db.get(key)
            return value
        except plyvel.Error as exc:
            raise self._translate(exc, "read") from exc
        finally:
            self._exit()

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        lo, hi = resolve_range(prefix, start, stop)
        return self._iterate(self._db, None, lo, hi, reverse)

    # --- writes --------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, *, sync: bool = False) -> None:
        _check_key(key)
        _check_value(value)
        self._enter()
        try:
            self._db.put(key, value, sync=sync)
        except plyvel.Error as exc:
            raise self._translate(exc, "write") from exc
        finally:
            self._exit()

    def delete(self, key: bytes, *, sync: bool = False) -> None:
        _check_key(key)
        self._enter()
        try:
            self._db.delete(key, sync=sync)
        except plyvel.Error as exc:
            raise self._translate(exc, "write") from exc
        finally:
            self._exit()

    def batch(self) -> LevelDBBatch:
        with self._cond:
            self._check_open()
        return LevelDBBatch(self)

    def snapshot(self) -> LevelDBSnapshot:
        with self._cond:
            self._check_open()
            try:
                snap = LevelDBSnapshot(self, self._db.snapshot())
            except plyvel.Error as exc:
                raise self._translate(exc, "snapshot") from exc
            self._snapshots.add(snap)
            return snap

    def close(self) -> None:
        """Close the database and every snapshot still open; idempotent, safe from any thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.wait_for(lambda: self._in_flight == 0)
            for snap in self._snapshots:
                snap._release()
            self._snapshots.clear()
            self._db.close()

    def __enter__(self) -> LevelDB:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(_MSG_CLOSED)

    def _enter(self, snap: LevelDBSnapshot | None = None) -> None:
        with self._cond:
            self._check_open()
            if snap is not None:
                snap._check_open()
                snap._in_flight += 1
            self._in_flight += 1

    def _exit(self, snap: LevelDBSnapshot | None = None) -> None:
        with self._cond:
            self._in_flight -= 1
            if snap is not None:
                snap._in_flight -= 1
            self._cond.notify_all()

    def _iterate(
        self,
        source: Any,
        snap: LevelDBSnapshot | None,
        lo: bytes | None,
        hi: bytes | None,
        reverse: bool,
    ) -> Iterator[tuple[bytes, bytes]]:
        # The LevelDB iterator is created and positioned here, not at the first next(): it reads
        # an implicit snapshot taken at its creation, so the view is the store as of this call.
        # plyvel's bounded reverse iterator (start, stop, reverse=True) skips keys in this
        # version (keys a, b: range [a, b) reversed yields nothing), so we walk a raw iterator
        # and apply the bounds ourselves.
        self._enter(snap)
        try:
            it = source.raw_iterator()
            if not reverse:
                if lo is None:
                    it.seek_to_first()
                else:
                    it.seek(lo)
            elif hi is None:
                it.seek_to_last()
            else:
                it.seek(hi)  # the first key >= hi; the range ends just before it
                if it.valid():
                    it.prev()
                else:
                    it.seek_to_last()
        except plyvel.Error as exc:
            raise self._translate(exc, "read") from exc
        finally:
            self._exit(snap)
        return self._iter_steps(it, snap, lo, hi, reverse)

    def _iter_steps(
        self,
        it: Any,
        snap: LevelDBSnapshot | None,
        lo: bytes | None,
        hi: bytes | None,
        reverse: bool,
    ) -> Iterator[tuple[bytes, bytes]]:
        try:
            while True:
                # One guarded step at a time: holding the guard across a yield would let a
                # paused consumer block close() forever.
                self._enter(snap)
                try:
                    if not it.valid():
                        return
                    item: tuple[bytes, bytes] = it.item()
                    if reverse:
                        it.prev()
                    else:
                        it.next()
                except plyvel.Error as exc:
                    raise self._translate(exc, "read") from exc
                finally:
                    self._exit(snap)
                key = item[0]
                if (hi is not None and key >= hi) or (lo is not None and key < lo):
                    return
                yield item
        finally:
            with self._cond:
                # After close() the database has already closed its iterators.
                if not self._closed:
                    it.close()

    def _translate(self, exc: BaseException, operation: str) -> StorageError:
        raw = exc.args[0] if exc.args else ""
        detail = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        log.error("LevelDB %s failed for %s: %s", operation, self._path, detail)
        detail = detail.replace(self._path, "<db>")
        if isinstance(exc, plyvel.CorruptionError):
            return CorruptDatabase(
                f"the database is corrupt ({detail}); restore the data directory from a backup, "
                "or remove it and resync from peers"
            )
        if isinstance(exc, plyvel.IOError) and "lock" in detail.lower():
            return StorageError(_MSG_LOCKED)
        if "does not exist" in detail and "create_if_missing" in detail:
            return StorageError(_MSG_MISSING)
        if isinstance(exc, plyvel.IOError):
            return StorageError(
                f"storage I/O error during {operation} ({detail}); "
                "check free disk space and the permissions of the data directory"
            )
        return StorageError(f"storage engine error during {operation} ({detail})")


def _check_key(key: object) -> None:
    if type(key) is not bytes:
        raise TypeError(f"keys must be bytes, not {type(key).__name__}")


def _check_value(value: object) -> None:
    if type(value) is not bytes:
        raise TypeError(f"values must be bytes, not {type(value).__name__}")


class LevelDBBatch:
    """Puts and deletes buffered here and written as one LevelDB WriteBatch on ``commit``.

    Buffered in Python rather than in a plyvel WriteBatch because plyvel fixes ``sync`` when the
    batch is created, while our protocol chooses it at commit. The last operation on a key wins,
    as in LevelDB.
    """

    __slots__ = ("_db", "_done", "_ops")

    def __init__(self, db: LevelDB) -> None:
        self._db = db
        self._ops: dict[bytes, bytes | None] = {}
        self._done = False

    def put(self, key: bytes, value: bytes) -> None:
        _check_key(key)
        _check_value(value)
        self._check_usable()
        self._ops.pop(key, None)
        self._ops[key] = value

    def delete(self, key: bytes) -> None:
        _check_key(key)
        self._check_usable()
        self._ops.pop(key, None)
        self._ops[key] = None

    def commit(self, *, sync: bool = True) -> None:
        """Write every operation atomically; with sync=True, fsync the log before returning."""
        self._check_usable()
        self._done = True
        db = self._db
        db._enter()
        try:
            wb = db._db.write_batch(sync=sync)
            for key, value in self._ops.items():
                if value is None:
                    wb.delete(key)
                else:
                    wb.put(key, value)
            wb.write()
        except plyvel.Error as exc:
            raise db._translate(exc, "write") from exc
        finally:
            db._exit()

    def __len__(self) -> int:
        return len(self._ops)

    def _check_usable(self) -> None:
        if self._done:
            raise StorageError("this write batch was already committed; start a new one")


class LevelDBSnapshot:
    """A LevelDB snapshot; readable from any thread, closed explicitly or with its database."""

    __slots__ = ("_closed", "_db", "_in_flight", "_snap")

    def __init__(self, db: LevelDB, snap: Any) -> None:
        self._db = db
        self._snap: Any = snap
        self._closed = False
        self._in_flight = 0  # guarded by db._cond

    def get(self, key: bytes) -> bytes | None:
        _check_key(key)
        db = self._db
        db._enter(self)
        try:
            value: bytes | None = self._snap.get(key)
            return value
        except plyvel.Error as exc:
            raise db._translate(exc, "read") from exc
        finally:
            db._exit(self)

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        lo, hi = resolve_range(prefix, start, stop)
        return self._db._iterate(self._snap, self, lo, hi, reverse)

    def close(self) -> None:
        """Release the snapshot; idempotent, and a no-op after the database was closed."""
        db = self._db
        with db._cond:
            if self._closed:
                return
            self._closed = True
            db._cond.wait_for(lambda: self._in_flight == 0)
            if not db._closed:
                self._release()
                db._snapshots.discard(self)

    def __enter__(self) -> LevelDBSnapshot:
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

    def _release(self) -> None:
        # Called with db._cond held and nothing in flight on this snapshot.
        self._closed = True
        if self._snap is not None:
            self._snap.close()
            self._snap = None
