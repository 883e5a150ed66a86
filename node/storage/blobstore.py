"""``BlobStore``: artifact blocks outside the chain DB, with pins, reference counts, GC and a quota.

Layout (ADR 0005): block bytes are files, one per block, in a sharded directory; a small,
separate LevelDB (``index``; ``MemoryKV`` in tests) holds the metadata. Nothing here touches the
chain DB.

    <root>/blocks/<xx>/<yy>/<cid hex>   block bytes; xx, yy = the last four hex digits of the CID
                                        (a CID's leading bytes are its version/codec/hash prefix,
                                        the same for every raw leaf, so they cannot shard)
    <root>/tmp/                         files being written (removed by ``check``)
    <root>/index/                       the metadata LevelDB (``BlobStore.open`` only)

Index keys (their own database, so their own one-byte prefixes):

=====  =========================  ========================================================
key    value                      meaning
=====  =========================  ========================================================
m...   see META_*                 kind marker (refuses to open another database as index)
b+cid  size u64, access u64       the block is stored (its file exists)
r+cid  refcount u64 (> 0)         how many pinned roots name the block (present or not)
g+access u64+cid  empty           GC queue: stored blocks with refcount 0, oldest first
p+root  u16-length-prefixed cids  the distinct blocks one pinned root protects
=====  =========================  ========================================================

Crash safety: a block file is written to ``tmp/``, fsynced, renamed into its shard and the shard
directory fsynced *before* the index learns of it (one synced batch; ``put_many`` does each step
for all its blocks, then one synced index batch for all of them); GC removes index entries
(one synced batch) *before* unlinking files. So after any crash the only possible mismatches are
a file without an index entry (adopted again if ``verify`` accepts it, removed otherwise) or,
after outside damage, an index entry without a file (dropped; its pins stay). ``check()`` finds
and repairs both, clears ``tmp/``, and rebuilds reference counts from the pin records and the GC
queue from the reference counts; it runs on open.

Threads: every method is safe from any thread. Mutations take one lock, except that ``put``
writes and fsyncs its temp files before taking it (``check`` leaves the temp files of puts in
progress alone); ``get``/``open_reader`` read files without it (a file is only ever replaced whole
by rename, and an open file survives its unlink). Under trio, use the ``*_async`` methods:
verification (hashing) and file I/O then run in a worker thread, never on the event loop.
``verified=True`` (``put``, ``put_many``) skips ``verify`` for a caller that has just hashed the
block itself (the chunk fetcher); every other caller keeps the verifying default.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from node.errors import CorruptDatabase, StorageError
from node.storage.api import KVStore, WriteBatch

Buffer = bytes | bytearray | memoryview
"""Block data: ``put`` copies a bytearray or memoryview to bytes only to verify it."""

Verifier = Callable[[bytes, bytes], bool]
"""``verify(cid, data)``: True iff ``data`` is the block ``cid`` names (hash check by the caller)."""

INDEX_KIND = b"neuroseed-blob-index/1"
META_KIND_KEY = b"mkind"
PREFIX_BLOCK = b"b"
PREFIX_REFCOUNT = b"r"
PREFIX_GC = b"g"
PREFIX_PIN = b"p"

DEFAULT_MAX_BLOCK_BYTES = 2 << 20  # 1 MiB raw leaves plus ample room for a dag-pb node
DEFAULT_GC_BATCH = 1024
MAX_CID_BYTES = 128
READ_CHUNK_BYTES = 64 << 10

_U64 = struct.Struct(">Q")
_BLOCK_META = struct.Struct(">QQ")
_U16 = struct.Struct(">H")


# --- errors ------------------------------------------------------------------------------------


class BlobStoreError(StorageError):
    code = 1610
    reason = "blob store error"


class QuotaExceeded(BlobStoreError):
    code = 1611
    reason = "blob store quota exceeded"


class BlockNotFound(BlobStoreError):
    code = 1612
    reason = "block not found"


class BlockVerificationFailed(BlobStoreError):
    code = 1613
    reason = "block does not match its CID"


class BlockTooLarge(BlobStoreError):
    code = 1614
    reason = "block too large"


class InvalidCid(BlobStoreError):
    code = 1615
    reason = "invalid CID"


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    used_bytes: int
    blocks: int
    quota_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.quota_bytes - self.used_bytes)


@dataclass(slots=True)
class CheckReport:
    """What ``check`` found and repaired (CIDs as bytes)."""

    adopted: list[bytes] = field(default_factory=list)  # files without index entry, verified
    removed_bad: list[bytes] = field(default_factory=list)  # files that failed verification
    missing: list[bytes] = field(default_factory=list)  # index entries whose file was gone
    temp_removed: int = 0  # leftover files in tmp/
    foreign: list[str] = field(default_factory=list)  # names under blocks/ that are not blocks
    refcounts_fixed: int = 0
    gc_queue_fixed: int = 0

    @property
    def clean(self) -> bool:
        return not (
            self.adopted
            or self.removed_bad
            or self.missing
            or self.temp_removed
            or self.foreign
            or self.refcounts_fixed
            or self.gc_queue_fixed
        )


# --- the store -----------------------------------------------------------------------------------


class BlobStore:
    """Content-addressed blocks on disk, indexed by a separate key-value store."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        index: KVStore,
        *,
        verify: Verifier,
        quota_bytes: int,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
        gc_batch: int = DEFAULT_GC_BATCH,
        clock: Callable[[], int] = time.time_ns,
        check_on_open: bool = True,
        owns_index: bool = False,
    ) -> None:
        if quota_bytes < 0 or max_block_bytes <= 0 or gc_batch <= 0:
            raise ValueError("quota_bytes >= 0, max_block_bytes > 0 and gc_batch > 0 required")
        self._root = Path(root)
        self._blocks = self._root / "blocks"
        self._tmp = self._root / "tmp"
        self._index = index
        self._verify = verify
        self._quota = quota_bytes
        self._max_block = max_block_bytes
        self._gc_batch = gc_batch
        self._clock = clock
        self._owns_index = owns_index
        self._lock = threading.RLock()
        # Temp files of puts in progress (written outside ``_lock``): ``check`` leaves them.
        self._temps_lock = threading.Lock()
        self._temps: set[str] = set()
        self._used = 0
        self._count = 0
        try:
            self._blocks.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobStoreError(
                f"cannot create the blob store directories ({exc.strerror})"
            ) from exc
        kind = index.get(META_KIND_KEY)
        if kind is None:
            if next(iter(index.iterate()), None) is not None:
                raise CorruptDatabase("the blob index database holds foreign data; choose another")
            index.put(META_KIND_KEY, INDEX_KIND, sync=True)
        elif kind != INDEX_KIND:
            raise CorruptDatabase("the blob index database is not a blob store index (wrong kind)")
        self.open_report: CheckReport | None = None
        if check_on_open:
            self.open_report = self.check()
        else:
            self._recount()

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        verify: Verifier,
        quota_bytes: int,
        **kwargs: object,
    ) -> BlobStore:
        """Open (creating if needed) the store under ``root`` with its LevelDB index at root/index."""
        from node.storage.leveldb import LevelDB

        index = LevelDB(Path(root) / "index")
        try:
            return cls(
                root,
                index,
                verify=verify,
                quota_bytes=quota_bytes,
                owns_index=True,
                **kwargs,  # type: ignore[arg-type]
            )
        except BaseException:
            index.close()
            raise

    def close(self) -> None:
        if self._owns_index:
            self._index.close()

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reads -----------------------------------------------------------------------------------

    def has(self, cid: bytes) -> bool:
        _check_cid(cid)
        return self._index.get(PREFIX_BLOCK + cid) is not None

    def size(self, cid: bytes) -> int | None:
        _check_cid(cid)
        raw = self._index.get(PREFIX_BLOCK + cid)
        return None if raw is None else _BLOCK_META.unpack(raw)[0]

    def get(self, cid: bytes) -> bytes | None:
        """The block's bytes, or None if it is not stored."""
        try:
            with self.open_reader(cid) as reader:
                return reader.read()
        except BlockNotFound:
            return None

    def open_reader(self, cid: bytes) -> BinaryIO:
        """A binary file open on the block, for streaming; raises ``BlockNotFound``.

        The reader stays valid even if GC removes the block meanwhile (POSIX unlink semantics).
        """
        _check_cid(cid)
        if self._index.get(PREFIX_BLOCK + cid) is None:
            raise BlockNotFound(data={"cid": cid.hex()})
        try:
            reader = open(self._path(cid), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError as exc:
            raise BlockNotFound(data={"cid": cid.hex()}) from exc
        except OSError as exc:
            raise BlobStoreError(f"cannot read a block ({exc.strerror})") from exc
        self._touch(cid)
        return reader

    def iter_chunks(self, cid: bytes, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """The block's bytes in pieces of at most ``chunk_bytes``."""
        with self.open_reader(cid) as reader:
            while chunk := reader.read(chunk_bytes):
                yield chunk

    def refcount(self, cid: bytes) -> int:
        _check_cid(cid)
        return self._get_refcount(cid)

    def is_pinned(self, root: bytes) -> bool:
        _check_cid(root)
        return self._index.get(PREFIX_PIN + root) is not None

    def pins(self) -> list[bytes]:
        return [key[1:] for key, _ in self._index.iterate(prefix=PREFIX_PIN)]

    def usage(self) -> Usage:
        with self._lock:
            return Usage(self._used, self._count, self._quota)

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit under the quota without GC."""
        with self._lock:
            return self._used + nbytes <= self._quota

    # --- writes ----------------------------------------------------------------------------------

    def put(self, cid: bytes, data: Buffer, *, verified: bool = False) -> bool:
        """Store a block after ``verify`` accepts it; False if it was already stored.

        ``verified=True``: the caller has just checked ``data`` against ``cid`` itself (the chunk
        fetcher does), so the store does not hash it a second time; the caller vouches for it.
        Over quota it first garbage-collects unpinned blocks, then raises ``QuotaExceeded``.
        """
        return self.put_many([(cid, data)], verified=verified)[0]

    def put_many(
        self, blocks: Iterable[tuple[bytes, Buffer]], *, verified: bool = False
    ) -> list[bool]:
        """Store several blocks at once; per block, False if it was already stored (or named
        twice in ``blocks``).

        All or nothing: every block is checked (CID, size, and ``verify`` unless ``verified``)
        before any file is written, and the batch is stored only if all of it fits the quota
        (after GC), so one bad block or a full store stores none. Cheaper than one ``put`` per
        block: the files are written and fsynced in ``tmp/`` (outside the lock, so concurrent
        batches overlap their fsyncs), renamed into their shards, each touched directory is
        fsynced once, and the index learns of the whole batch in one synced write (ADR 0005).
        Raises like ``put``; on an error nothing of the batch is left behind.
        """
        items = self._checked(blocks, verified)
        fresh = {cid: data for cid, data in items if not self.has(cid)}
        need = sum(len(data) for data in fresh.values())
        if need > self._quota:
            raise QuotaExceeded(
                f"storing {need} bytes exceeds the blob quota of {self._quota}",
                data={"used": self._used, "quota": self._quota, "needed": need},
            )
        temps = dict(zip(fresh, self._write_temps(list(fresh.items())), strict=True))
        try:
            with self._lock:
                return self._commit_locked(items, temps)
        finally:  # those not renamed into place (stored meanwhile, or an error)
            self._drop_temps(list(temps.values()))

    def pin(self, root: bytes, block_cids: Iterable[bytes]) -> None:
        """Pin ``root`` and its blocks (the root itself always included); re-pinning replaces.

        Blocks may be pinned before they are stored: they are then protected on arrival.
        """
        _check_cid(root)
        new = {root}
        for cid in block_cids:
            _check_cid(cid)
            new.add(cid)
        with self._lock:
            raw = self._index.get(PREFIX_PIN + root)
            old = set() if raw is None else set(_decode_cids(raw))
            batch = self._index.batch()
            now = self._clock()
            for cid in sorted(new - old):
                self._adjust_refcount(batch, cid, +1, now)
            for cid in sorted(old - new):
                self._adjust_refcount(batch, cid, -1, now)
            batch.put(PREFIX_PIN + root, _encode_cids(sorted(new)))
            batch.commit(sync=True)

    def unpin(self, root: bytes) -> bool:
        """Drop the pin; blocks no other root references become GC candidates. False if absent."""
        _check_cid(root)
        with self._lock:
            raw = self._index.get(PREFIX_PIN + root)
            if raw is None:
                return False
            batch = self._index.batch()
            now = self._clock()
            for cid in _decode_cids(raw):
                self._adjust_refcount(batch, cid, -1, now)
            batch.delete(PREFIX_PIN + root)
            batch.commit(sync=True)
            return True

    def gc(self, target_bytes: int | None = None) -> int:
        """Remove unreferenced blocks, least recently used first, at most one batch; freed bytes.

        Stops early once ``target_bytes`` are freed. Blocks are only ever deleted here.
        """
        with self._lock:
            return self._gc_locked(target_bytes)[0]

    # --- check and repair ------------------------------------------------------------------------

    def check(self, *, deep: bool = False) -> CheckReport:
        """Reconcile files with the index and repair; ``deep`` re-verifies every stored block."""
        report = CheckReport()
        with self._lock:
            with self._temps_lock:
                for entry in list(os.scandir(self._tmp)):
                    if entry.path in self._temps:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    report.temp_removed += 1
            on_disk = self._scan_files(report)
            batch = self._index.batch()
            indexed: dict[bytes, tuple[int, int]] = {}
            for key, value in self._index.iterate(prefix=PREFIX_BLOCK):
                indexed[key[1:]] = _BLOCK_META.unpack(value)
            now = self._clock()
            for cid, (size, _access) in indexed.items():
                file_size = on_disk.pop(cid, None)
                if file_size is None:
                    report.missing.append(cid)
                    batch.delete(PREFIX_BLOCK + cid)
                elif (deep or file_size != size) and not self._file_verifies(cid):
                    report.removed_bad.append(cid)
                    batch.delete(PREFIX_BLOCK + cid)
                    on_disk[cid] = -1  # remove the file after the batch commits
            adopted: dict[bytes, tuple[int, int]] = {}
            for cid, file_size in list(on_disk.items()):
                if file_size < 0:
                    continue
                if file_size <= self._max_block and self._file_verifies(cid):
                    report.adopted.append(cid)
                    batch.put(PREFIX_BLOCK + cid, _BLOCK_META.pack(file_size, now))
                    adopted[cid] = (file_size, now)
                    del on_disk[cid]
                else:
                    report.removed_bad.append(cid)
            dropped = set(report.missing) | set(report.removed_bad)
            live = {cid: meta for cid, meta in indexed.items() if cid not in dropped}
            live.update(adopted)
            self._rebuild_refs(batch, live, report)
            batch.commit(sync=True)
            for cid in on_disk:  # files that failed verification
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(cid))
            self._used = sum(size for size, _ in live.values())
            self._count = len(live)
        return report

    # --- async (trio) ------------------------------------------------------------------------------

    async def put_async(self, cid: bytes, data: Buffer, *, verified: bool = False) -> bool:
        return await trio.to_thread.run_sync(
            functools.partial(self.put, cid, data, verified=verified)
        )

    async def put_many_async(
        self, blocks: Iterable[tuple[bytes, Buffer]], *, verified: bool = False
    ) -> list[bool]:
        return await trio.to_thread.run_sync(
            functools.partial(self.put_many, list(blocks), verified=verified)
        )

    async def get_async(self, cid: bytes) -> bytes | None:
        return await trio.to_thread.run_sync(self.get, cid)

    async def pin_async(self, root: bytes, block_cids: Iterable[bytes]) -> None:
        await trio.to_thread.run_sync(self.pin, root, list(block_cids))

    async def unpin_async(self, root: bytes) -> bool:
        return await trio.to_thread.run_sync(self.unpin, root)

    async def gc_async(self, target_bytes: int | None = None) -> int:
        return await trio.to_thread.run_sync(self.gc, target_bytes)

    async def check_async(self, *, deep: bool = False) -> CheckReport:
        return await trio.to_thread.run_sync(functools.partial(self.check, deep=deep))

    # --- internals -------------------------------------------------------------------------------

    def _path(self, cid: bytes) -> Path:
        name = cid.hex()
        shard = name[-4:].rjust(4, "0")
        return self._blocks / shard[:2] / shard[2:] / name

    def _checked(
        self, blocks: Iterable[tuple[bytes, Buffer]], verified: bool
    ) -> list[tuple[bytes, Buffer]]:
        """``blocks`` as a list, each checked (CID, type, size, ``verify`` unless ``verified``)."""
        items: list[tuple[bytes, Buffer]] = []
        for cid, data in blocks:
            _check_cid(cid)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError("block data must be bytes")
            if type(data) is not bytes and not verified:
                data = bytes(data)  # the verifier takes bytes
            elif isinstance(data, memoryview):
                data = data.cast("B") if data.format != "B" else data
            if len(data) > self._max_block:
                raise BlockTooLarge(
                    f"block of {len(data)} bytes exceeds the limit of {self._max_block}",
                    data={"cid": cid.hex(), "size": len(data)},
                )
            items.append((cid, data))
        if not verified:
            for cid, data in items:
                assert type(data) is bytes
                if not self._verify(cid, data):
                    raise BlockVerificationFailed(data={"cid": cid.hex()})
        return items

    def _reserve(self, need: int) -> None:
        """Make room for ``need`` more bytes (GC batches), else ``QuotaExceeded`` (locked)."""
        with self._lock:
            while self._used + need > self._quota:
                freed, progressed = self._gc_locked(self._used + need - self._quota)
                if not freed and not progressed:
                    raise QuotaExceeded(
                        f"storing {need} bytes would exceed the blob quota of {self._quota} "
                        f"({self._used} used, all of it pinned); unpin artifacts or raise the quota",
                        data={"used": self._used, "quota": self._quota, "needed": need},
                    )

    def _write_temps(self, items: list[tuple[bytes, Buffer]]) -> list[str]:
        """Write each block to its own file in ``tmp/`` and fsync them all: the temp names, in
        order. On an error none is left behind."""
        names: list[str] = []
        fds: list[int] = []
        try:
            for _, data in items:
                with self._temps_lock:
                    fd, name = tempfile.mkstemp(dir=str(self._tmp), prefix="put-")
                    self._temps.add(name)
                fds.append(fd)
                names.append(name)
                _write_all(fd, data)
            while fds:  # then each fsynced (all written first, so writeback can overlap)
                fd = fds.pop(0)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            self._drop_temps(names)
            if isinstance(exc, OSError):
                raise BlobStoreError(
                    f"cannot write a block ({exc.strerror}); check free disk space and permissions"
                ) from exc
            raise
        return names

    def _drop_temps(self, names: list[str]) -> None:
        """Remove temp files (those still there) and forget them."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        with self._temps_lock:
            self._temps.difference_update(names)

    def _commit_locked(
        self, items: list[tuple[bytes, Buffer]], temps: dict[bytes, str]
    ) -> list[bool]:
        """Rename the written blocks that are still new into place, fsync their shard
        directories, then record them in one synced index batch (the lock is held). ``temps``
        maps CIDs to their written temp files; those renamed are taken out of it."""
        out: list[bool] = []
        new: dict[bytes, int] = {}
        for cid, data in items:
            if cid in new or self._index.get(PREFIX_BLOCK + cid) is not None:
                if cid not in new:
                    self._touch(cid)
                out.append(False)
                continue
            if cid not in temps:  # stored when we looked, collected since: write it now
                temps[cid] = self._write_temps([(cid, data)])[0]
            new[cid] = len(data)
            out.append(True)
        if not new:
            return out
        self._reserve(sum(new.values()))
        renamed: list[bytes] = []
        try:
            dirs: dict[Path, None] = {}  # to fsync once each: shards, and parents of new ones
            for cid in new:
                final = self._path(cid)
                dirs.update(dict.fromkeys(_makedirs(final.parent, self._blocks)))
                os.replace(temps[cid], final)
                with self._temps_lock:
                    self._temps.discard(temps.pop(cid))
                renamed.append(cid)
                dirs[final.parent] = None
            for d in dirs:
                _fsync_dir(d)
        except OSError as exc:
            for cid in renamed:  # never indexed: remove them again (check() would adopt them)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(cid))
            raise BlobStoreError(
                f"cannot write a block ({exc.strerror}); check free disk space and permissions"
            ) from exc
        now = self._clock()
        batch = self._index.batch()
        for cid, size in new.items():
            batch.put(PREFIX_BLOCK + cid, _BLOCK_META.pack(size, now))
            if self._get_refcount(cid) == 0:
                batch.put(_gc_key(now, cid), b"")
        batch.commit(sync=True)
        self._used += sum(new.values())
        self._count += len(new)
        return out

    def _file_verifies(self, cid: bytes) -> bool:
        try:
            with open(self._path(cid), "rb") as f:
                data = f.read(self._max_block + 1)
        except OSError:
            return False
        return len(data) <= self._max_block and bool(self._verify(cid, data))

    def _get_refcount(self, cid: bytes) -> int:
        raw = self._index.get(PREFIX_REFCOUNT + cid)
        return 0 if raw is None else _U64.unpack(raw)[0]

    def _adjust_refcount(self, batch: WriteBatch, cid: bytes, delta: int, now: int) -> None:
        old = self._get_refcount(cid)
        new = max(0, old + delta)
        if new:
            batch.put(PREFIX_REFCOUNT + cid, _U64.pack(new))
        else:
            batch.delete(PREFIX_REFCOUNT + cid)
        meta = self._index.get(PREFIX_BLOCK + cid)
        if meta is None or (old == 0) == (new == 0):
            return
        size, access = _BLOCK_META.unpack(meta)
        if new == 0:  # became unreferenced: enters the GC queue as of now
            batch.put(PREFIX_BLOCK + cid, _BLOCK_META.pack(size, now))
            batch.put(_gc_key(now, cid), b"")
        else:
            batch.delete(_gc_key(access, cid))

    def _touch(self, cid: bytes) -> None:
        """Move an unreferenced block to the back of the GC queue (it was just used)."""
        with self._lock:
            meta = self._index.get(PREFIX_BLOCK + cid)
            if meta is None or self._get_refcount(cid):
                return
            size, access = _BLOCK_META.unpack(meta)
            now = self._clock()
            if now == access:
                return
            batch = self._index.batch()
            batch.delete(_gc_key(access, cid))
            batch.put(_gc_key(now, cid), b"")
            batch.put(PREFIX_BLOCK + cid, _BLOCK_META.pack(size, now))
            batch.commit(sync=False)  # losing a touch in a crash only ages a cache entry

    def _gc_locked(self, target_bytes: int | None) -> tuple[int, bool]:
        """One bounded GC batch: (bytes freed, whether any queue entry was consumed)."""
        victims: list[tuple[bytes, int]] = []
        batch = self._index.batch()
        freed = 0
        consumed = 0
        for key, _ in self._index.iterate(prefix=PREFIX_GC):
            if len(victims) >= self._gc_batch:
                break
            if target_bytes is not None and freed >= target_bytes:
                break
            cid = key[1 + _U64.size :]
            batch.delete(key)
            consumed += 1
            meta = self._index.get(PREFIX_BLOCK + cid)
            if meta is None or self._get_refcount(cid):
                continue  # a stale queue entry (check() would also drop it)
            size = _BLOCK_META.unpack(meta)[0]
            batch.delete(PREFIX_BLOCK + cid)
            victims.append((cid, size))
            freed += size
        if not consumed:
            return 0, False
        batch.commit(sync=True)
        for cid, size in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(cid))
            self._used -= size
            self._count -= 1
        return freed, True

    def _scan_files(self, report: CheckReport) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        for dirpath, _dirs, files in os.walk(self._blocks):
            for name in files:
                full = os.path.join(dirpath, name)
                try:
                    cid = bytes.fromhex(name)
                except ValueError:
                    cid = b""
                if not cid or len(cid) > MAX_CID_BYTES or self._path(cid) != Path(full):
                    report.foreign.append(os.path.relpath(full, self._blocks))
                    continue
                try:
                    found[cid] = os.stat(full).st_size
                except FileNotFoundError:
                    continue
        return found

    def _rebuild_refs(
        self, batch: WriteBatch, live: dict[bytes, tuple[int, int]], report: CheckReport
    ) -> None:
        want: dict[bytes, int] = {}
        for _, value in self._index.iterate(prefix=PREFIX_PIN):
            for cid in _decode_cids(value):
                want[cid] = want.get(cid, 0) + 1
        have = {
            key[1:]: _U64.unpack(v)[0] for key, v in self._index.iterate(prefix=PREFIX_REFCOUNT)
        }
        for cid in have.keys() | want.keys():
            if have.get(cid, 0) != want.get(cid, 0):
                report.refcounts_fixed += 1
                if cid in want:
                    batch.put(PREFIX_REFCOUNT + cid, _U64.pack(want[cid]))
                else:
                    batch.delete(PREFIX_REFCOUNT + cid)
        queue_want = {_gc_key(access, cid) for cid, (_, access) in live.items() if cid not in want}
        queue_have = {key for key, _ in self._index.iterate(prefix=PREFIX_GC)}
        for key in queue_have - queue_want:
            report.gc_queue_fixed += 1
            batch.delete(key)
        adopted = set(report.adopted)
        for key in queue_want - queue_have:
            if key[1 + _U64.size :] not in adopted:
                report.gc_queue_fixed += 1
            batch.put(key, b"")

    def _recount(self) -> None:
        used = count = 0
        for _, value in self._index.iterate(prefix=PREFIX_BLOCK):
            used += _BLOCK_META.unpack(value)[0]
            count += 1
        self._used, self._count = used, count


# --- helpers -------------------------------------------------------------------------------------


def _check_cid(cid: object) -> None:
    if type(cid) is not bytes:
        raise TypeError(f"a CID is bytes, not {type(cid).__name__}")
    if not 0 < len(cid) <= MAX_CID_BYTES:
        raise InvalidCid(f"a CID is 1..{MAX_CID_BYTES} bytes")


def _gc_key(access: int, cid: bytes) -> bytes:
    return PREFIX_GC + _U64.pack(access) + cid


def _encode_cids(cids: Iterable[bytes]) -> bytes:
    return b"".join(_U16.pack(len(c)) + c for c in cids)


def _decode_cids(raw: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 2 > len(raw):
            raise CorruptDatabase("a blob pin record is truncated")
        (n,) = _U16.unpack_from(raw, pos)
        pos += 2
        if pos + n > len(raw):
            raise CorruptDatabase("a blob pin record is truncated")
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _write_all(fd: int, data: Buffer) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: Path, base: Path) -> list[Path]:
    """Create ``path`` (under ``base``); the directories whose entries changed, to be fsynced
    by the caller (the parents of those created, outermost first)."""
    if path.is_dir():
        return []
    missing: list[Path] = []
    p = path
    while not p.is_dir() and p != base:
        missing.append(p)
        p = p.parent
    changed: list[Path] = []
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        changed.append(d.parent)
    return changed
