"""BlobStore: blocks as sharded files, a separate metadata index, pins, GC, quota, repair."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from node.errors import CorruptDatabase, StorageError
from node.storage import MemoryKV
from node.storage.blobstore import (
    BlobStore,
    BlockNotFound,
    BlockTooLarge,
    BlockVerificationFailed,
    InvalidCid,
    QuotaExceeded,
)

CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])  # CIDv1, raw, sha2-256, 32 bytes


def cid_of(data: bytes) -> bytes:
    return CID_PREFIX + hashlib.sha256(data).digest()


def verify(cid: bytes, data: bytes) -> bool:
    return cid == cid_of(data)


def block(n: int, size: int = 100) -> tuple[bytes, bytes]:
    data = (n.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return cid_of(data), data


class Clock:
    def __init__(self) -> None:
        self._t = itertools.count(1)

    def __call__(self) -> int:
        return next(self._t)


Make = Callable[..., BlobStore]


@pytest.fixture
def make(tmp_path: Path) -> Make:
    """A store on tmp_path/blobs with a MemoryKV index (or the one given) and a counter clock."""

    def make(index: MemoryKV | None = None, **kwargs: object) -> BlobStore:
        kwargs.setdefault("quota_bytes", 1 << 20)
        kwargs.setdefault("max_block_bytes", 4096)
        return BlobStore(
            tmp_path / "blobs",
            index if index is not None else MemoryKV(),
            verify=verify,
            clock=Clock(),
            **kwargs,  # type: ignore[arg-type]
        )

    return make


def block_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blocks").rglob("*") if p.is_file())


# --- basics -----------------------------------------------------------------------------------


def test_put_get_has_round_trip(make: Make, tmp_path: Path) -> None:
    store = make()
    cid, data = block(1, 1000)
    assert not store.has(cid)
    assert store.get(cid) is None
    assert store.put(cid, data) is True
    assert store.has(cid)
    assert store.size(cid) == 1000
    assert store.get(cid) == data
    with store.open_reader(cid) as reader:
        assert reader.read(10) == data[:10]
        assert reader.read() == data[10:]
    assert b"".join(store.iter_chunks(cid, 300)) == data
    assert [len(c) for c in store.iter_chunks(cid, 300)] == [300, 300, 300, 100]
    assert store.usage().used_bytes == 1000
    assert store.usage().blocks == 1
    # Sharded by the CID's tail: the shared CID prefix would put every block in one directory.
    (path,) = block_files(tmp_path / "blobs")
    assert path.name == cid.hex()
    assert path.parent.name == cid.hex()[-2:]
    assert path.parent.parent.name == cid.hex()[-4:-2]


def test_missing_block_reader_raises(make: Make) -> None:
    store = make()
    with pytest.raises(BlockNotFound):
        store.open_reader(block(1)[0])


def test_put_is_idempotent(make: Make, tmp_path: Path) -> None:
    store = make()
    cid, data = block(1)
    assert store.put(cid, data)
    assert store.put(cid, data) is False
    assert store.usage().used_bytes == 100
    assert store.usage().blocks == 1
    assert len(block_files(tmp_path / "blobs")) == 1


def test_verifier_rejects_before_anything_is_written(make: Make, tmp_path: Path) -> None:
    store = make()
    cid, _ = block(1)
    with pytest.raises(BlockVerificationFailed) as info:
        store.put(cid, b"not the block")
    assert isinstance(info.value, StorageError)
    assert not store.has(cid)
    assert block_files(tmp_path / "blobs") == []
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert store.usage().used_bytes == 0


def test_limits_on_cids_and_block_size(make: Make) -> None:
    store = make(max_block_bytes=50)
    cid, data = block(1, 51)
    with pytest.raises(BlockTooLarge):
        store.put(cid, data)
    with pytest.raises(InvalidCid):
        store.has(b"")
    with pytest.raises(TypeError):
        store.has("abc")  # type: ignore[arg-type]


# --- pins, reference counts, gc ----------------------------------------------------------------


def test_shared_block_survives_one_unpin(make: Make) -> None:
    store = make()
    (a, da), (b, db), (c, dc) = block(1), block(2), block(3)
    for cid, data in ((a, da), (b, db), (c, dc)):
        store.put(cid, data)
    store.pin(a, [b])  # root a with block b
    store.pin(c, [b])  # root c shares b
    assert (store.refcount(a), store.refcount(b), store.refcount(c)) == (1, 2, 1)
    assert store.gc() == 0
    assert store.unpin(a)
    assert not store.unpin(a)
    assert (store.refcount(a), store.refcount(b)) == (0, 1)
    assert store.gc() == 100
    assert not store.has(a)
    assert store.get(b) == db and store.get(c) == dc
    store.unpin(c)
    assert store.gc() == 200
    assert store.usage().used_bytes == 0
    assert store.usage().blocks == 0


def test_repin_replaces_the_block_set(make: Make) -> None:
    store = make()
    (r, dr), (x, dx), (y, dy) = block(1), block(2), block(3)
    for cid, data in ((r, dr), (x, dx), (y, dy)):
        store.put(cid, data)
    store.pin(r, [x, x])  # duplicates count once
    assert store.refcount(x) == 1
    store.pin(r, [y])
    assert (store.refcount(r), store.refcount(x), store.refcount(y)) == (1, 0, 1)
    assert store.pins() == [r]
    assert store.gc() == 100
    assert not store.has(x)


def test_pin_before_arrival_protects_the_block(make: Make) -> None:
    store = make()
    cid, data = block(1)
    store.pin(cid, [])
    store.put(cid, data)
    assert store.gc() == 0
    assert store.has(cid)


def test_gc_removes_oldest_first_in_bounded_batches(make: Make) -> None:
    store = make(gc_batch=2)
    blocks = [block(i) for i in range(4)]
    for cid, data in blocks:
        store.put(cid, data)
    store.get(blocks[0][0])  # a read makes block 0 the most recently used
    assert store.gc() == 200  # one batch of two: blocks 1 and 2
    assert [store.has(c) for c, _ in blocks] == [True, False, False, True]
    assert store.gc(target_bytes=1) == 100  # stops once the target is met: block 3
    assert [store.has(c) for c, _ in blocks] == [True, False, False, False]
    assert store.gc() == 100
    assert store.gc() == 0


def test_quota_collects_garbage_before_refusing(make: Make) -> None:
    store = make(quota_bytes=300)
    (a, da), (b, db), (c, dc), (d, dd) = (block(i) for i in range(4))
    store.put(a, da)
    store.put(b, db)
    store.pin(b, [])
    store.put(c, dc)
    assert store.usage().free_bytes == 0
    assert store.put(d, dd)  # GC frees a, the oldest unpinned block
    assert not store.has(a)
    assert store.has(b) and store.has(c) and store.has(d)
    store.pin(c, [d])
    e, de = block(5)
    with pytest.raises(QuotaExceeded) as info:
        store.put(e, de)
    assert info.value.data == {"used": 300, "quota": 300, "needed": 100}
    assert not store.has(e)
    assert store.usage().used_bytes == 300


# --- persistence and repair ---------------------------------------------------------------------


def test_reopen_with_leveldb_keeps_blocks_pins_and_usage(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    (a, da), (b, db) = block(1), block(2, 300)
    with BlobStore.open(root, verify=verify, quota_bytes=10_000) as store:
        store.put(a, da)
        store.put(b, db)
        store.pin(a, [b])
    with BlobStore.open(root, verify=verify, quota_bytes=10_000) as store:
        assert store.open_report is not None and store.open_report.clean
        assert store.get(a) == da and store.get(b) == db
        assert store.pins() == [a]
        assert store.refcount(b) == 1
        assert store.usage().used_bytes == 400
        assert store.usage().blocks == 2
        store.unpin(a)
    with BlobStore.open(root, verify=verify, quota_bytes=10_000) as store:
        assert store.gc() == 400
        assert store.check().clean


def test_index_refuses_a_foreign_database() -> None:
    foreign = MemoryKV()
    foreign.put(b"mschema", b"chain")
    with pytest.raises(CorruptDatabase):
        BlobStore("/nonexistent-unused", foreign, verify=verify, quota_bytes=1)


def test_crash_after_file_write_before_index_update(make: Make, tmp_path: Path) -> None:
    index = MemoryKV()
    store = make(index)
    (a, da), (b, db) = block(1), block(2)
    store.put(a, da)
    store.pin(b, [])
    before = index.crash_copy()  # the index as it was before b's put committed
    store.put(b, db)
    # Also: a temp file from an interrupted write, and a damaged file the index never knew.
    (tmp_path / "blobs" / "tmp" / "put-x").write_bytes(b"half")
    bad, _ = block(9)
    bad_path = store._path(bad)
    bad_path.parent.mkdir(parents=True, exist_ok=True)
    bad_path.write_bytes(b"garbage")

    reopened = make(before)
    report = reopened.open_report
    assert report is not None
    assert report.adopted == [b]
    assert report.removed_bad == [bad]
    assert report.temp_removed == 1
    assert not bad_path.exists()
    assert reopened.get(b) == db
    assert reopened.refcount(b) == 1  # the pin recorded before the crash protects it
    assert reopened.usage().used_bytes == 200
    assert reopened.gc() == 100  # only a is unpinned
    assert reopened.has(b)
    assert reopened.check().clean


def test_index_entry_without_file_is_dropped_and_pins_kept(make: Make) -> None:
    index = MemoryKV()
    store = make(index)
    (a, da), (b, db) = block(1), block(2)
    store.put(a, da)
    store.put(b, db)
    store.pin(a, [])
    os.unlink(store._path(a))
    os.unlink(store._path(b))
    assert store.get(a) is None  # readers see a missing file as a missing block

    reopened = make(index)
    report = reopened.open_report
    assert report is not None
    assert sorted(report.missing) == sorted([a, b])
    assert not reopened.has(a) and not reopened.has(b)
    assert reopened.usage().used_bytes == 0
    assert reopened.is_pinned(a) and reopened.refcount(a) == 1
    assert reopened.put(a, da)  # fetched again, still pinned
    assert reopened.gc() == 0
    assert reopened.check().clean


def test_check_repairs_truncated_files_and_stale_metadata(make: Make) -> None:
    index = MemoryKV()
    store = make(index)
    (a, da), (b, db) = block(1), block(2)
    store.put(a, da)
    store.put(b, db)
    store._path(a).write_bytes(da[:10])  # outside damage: wrong size
    index.put(b"r" + b, (7).to_bytes(8, "big"))  # a refcount no pin explains
    report = store.check()
    assert report.removed_bad == [a]
    assert report.refcounts_fixed == 1
    assert report.gc_queue_fixed == 1  # the removed block's GC queue entry
    assert not store.has(a)
    assert store.refcount(b) == 0
    assert store.gc() == 100
    assert store.check().clean


def test_deep_check_reverifies_contents(make: Make) -> None:
    store = make()
    cid, data = block(1)
    store.put(cid, data)
    store._path(cid).write_bytes(bytes(len(data)))  # same size, wrong bytes
    assert store.check().clean
    assert store.check(deep=True).removed_bad == [cid]
    assert not store.has(cid)


# --- concurrency -------------------------------------------------------------------------------


def test_concurrent_readers_while_writing_and_collecting(tmp_path: Path) -> None:
    store = BlobStore.open(tmp_path / "blobs", verify=verify, quota_bytes=20_000, gc_batch=8)
    pinned = [block(i, 500) for i in range(10)]
    for cid, data in pinned:
        store.put(cid, data)
        store.pin(cid, [])
    errors: list[BaseException] = []
    stop = threading.Event()

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return run

    def reader() -> None:
        while not stop.is_set():
            for cid, data in pinned:
                assert store.get(cid) == data
                assert b"".join(store.iter_chunks(cid, 128)) == data

    def writer() -> None:
        # 200 unpinned blocks of 500 bytes through a 20 kB quota: puts must trigger GC.
        for i in range(100, 300):
            cid, data = block(i, 500)
            store.put(cid, data)
            got = store.get(cid)
            assert got is None or got == data
        stop.set()

    threads = [threading.Thread(target=guard(reader)) for _ in range(4)]
    threads.append(threading.Thread(target=guard(writer)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    store_usage = store.usage()
    report = store.check()
    store.close()
    assert not errors, errors
    assert store_usage.used_bytes <= 20_000
    assert report.clean


async def test_async_methods_run_off_the_event_loop(make: Make) -> None:
    store = make()
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def watching(cid: bytes, data: bytes) -> bool:
        seen.append(threading.get_ident())
        return verify(cid, data)

    store._verify = watching
    cid, data = block(1)
    assert await store.put_async(cid, data)
    assert seen and loop_thread not in seen
    assert await store.get_async(cid) == data
    await store.pin_async(cid, [])
    assert await store.gc_async() == 0
    assert await store.unpin_async(cid)
    assert (await store.check_async()).clean
    assert await store.gc_async() == 100
    await trio.lowlevel.checkpoint()


# --- batched and pre-verified puts ----------------------------------------------------------------


class CountingVerify:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cid: bytes, data: bytes) -> bool:
        self.calls += 1
        return verify(cid, data)


def tmp_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "blobs" / "tmp").iterdir())


def test_put_many_stores_a_batch_with_one_index_write(make: Make, tmp_path: Path) -> None:
    index = MemoryKV()
    store = make(index)
    blocks = [block(i, 100 + i) for i in range(6)]
    assert store.put(*blocks[0])
    writes = index.write_count
    # Already stored, new, new, named twice, new: one flag per entry, in order.
    batch = [blocks[0], blocks[1], blocks[2], blocks[1], (blocks[3][0], bytearray(blocks[3][1]))]
    assert store.put_many(batch) == [False, True, True, False, True]
    # One synced batch for the three new blocks, one unsynced touch (LRU) for the old one.
    assert index.write_count == writes + 2
    writes = index.write_count
    assert store.put_many(blocks[4:]) == [True, True]
    assert index.write_count == writes + 1
    for cid, data in blocks:
        assert store.get(cid) == data
        assert store.size(cid) == len(data)
    assert store.usage().blocks == 6
    assert store.usage().used_bytes == sum(len(d) for _, d in blocks)
    assert len(block_files(tmp_path / "blobs")) == 6
    assert tmp_files(tmp_path) == []
    assert store.put_many([]) == []
    assert store.check().clean


def test_put_many_syncs_everything_before_the_index_learns(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = MemoryKV()
    store = make(index)
    blocks = [block(i) for i in range(5)]
    paths = [store._path(cid) for cid, _ in blocks]
    synced: list[int] = []  # the index's write count at each fsync
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(index.write_count)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    before = index.write_count
    assert store.put_many(blocks) == [True] * 5
    # Every block file once, then each directory whose entries changed once: the shards, the
    # new shard directories' parents and blocks/ itself (a fresh store creates them all).
    dirs = (
        {p.parent for p in paths}
        | {p.parent.parent for p in paths}
        | {tmp_path / "blobs" / "blocks"}
    )
    assert len(synced) == len(blocks) + len(dirs)
    assert synced == [before] * len(synced)  # all of them before the one index write
    assert index.write_count == before + 1
    # Five single puts: a synced index write each.
    for cid, data in [block(i) for i in range(10, 15)]:
        store.put(cid, data)
    assert index.write_count == before + 1 + 5


def test_verified_puts_skip_the_verifier_and_default_puts_do_not(
    make: Make, tmp_path: Path
) -> None:
    counting = CountingVerify()
    store = make()
    store._verify = counting
    (a, da), (b, db), (c, dc) = block(1), block(2), block(3)
    assert store.put_many([(a, da), (b, memoryview(db))], verified=True) == [True, True]
    assert store.put(c, dc, verified=True)
    assert counting.calls == 0  # the caller vouched for them: no second hash
    assert store.get(b) == db and store.get(c) == dc
    d, dd = block(4)
    assert store.put(d, dd)
    assert store.put_many([block(5), block(6)]) == [True, True]
    assert counting.calls == 3  # the default path still verifies every block
    assert store.check(deep=True).clean


def test_one_bad_block_stores_none_of_the_batch(make: Make, tmp_path: Path) -> None:
    index = MemoryKV()
    store = make(index, max_block_bytes=200)
    good = [block(i) for i in range(3)]
    writes = index.write_count
    with pytest.raises(BlockVerificationFailed):
        store.put_many([*good, (block(9)[0], b"not the block")])
    with pytest.raises(BlockTooLarge):
        store.put_many([*good, block(9, 201)], verified=True)  # size is checked even so
    with pytest.raises(TypeError):
        store.put_many([(good[0][0], "text")])  # type: ignore[list-item]
    with pytest.raises(InvalidCid):
        store.put_many([*good, (b"", b"x")], verified=True)
    assert index.write_count == writes
    assert block_files(tmp_path / "blobs") == [] and tmp_files(tmp_path) == []
    assert store.usage().used_bytes == 0
    assert store.put_many(good) == [True] * 3


def test_put_many_quota_is_all_or_nothing(make: Make, tmp_path: Path) -> None:
    store = make(quota_bytes=500)
    old = [block(i) for i in range(3)]
    store.put_many(old)
    store.pin(old[0][0], [])
    with pytest.raises(QuotaExceeded):
        store.put_many([block(i) for i in range(10, 16)])  # 600 bytes: never fits, no GC
    assert all(store.has(c) for c, _ in old)
    new = [block(i) for i in range(10, 14)]  # 400 bytes: fits once the two unpinned go
    assert store.put_many(new) == [True] * 4
    assert not store.has(old[1][0]) and not store.has(old[2][0]) and store.has(old[0][0])
    store.pin(new[0][0], [c for c, _ in new])
    with pytest.raises(QuotaExceeded) as info:
        store.put_many([block(20), block(21)])  # everything stored is pinned now
    assert info.value.data == {"used": 500, "quota": 500, "needed": 200}
    assert not store.has(block(20)[0]) and not store.has(block(21)[0])
    assert tmp_files(tmp_path) == []
    assert store.usage().used_bytes == 500
    assert store.check().clean


def test_failed_rename_leaves_nothing_behind(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = MemoryKV()
    store = make(index)
    blocks = [block(i) for i in range(4)]
    real_replace = os.replace
    calls = 0

    def replace(src: str, dst: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StorageError, match="No space left"):
        store.put_many(blocks)
    monkeypatch.setattr(os, "replace", real_replace)
    assert block_files(tmp_path / "blobs") == [] and tmp_files(tmp_path) == []
    assert store.usage().used_bytes == 0 and not any(store.has(c) for c, _ in blocks)
    assert store.put_many(blocks) == [True] * 4
    assert store.check().clean


def test_crash_before_the_batch_index_write_is_repaired(make: Make, tmp_path: Path) -> None:
    index = MemoryKV()
    store = make(index)
    (a, da), (b, db), (c, dc) = block(1), block(2), block(3)
    store.put(a, da)
    store.pin(b, [])
    liar, _ = block(8)  # a caller vouched for bytes that are not the block
    index.fail_next_commit(0)  # the process dies inside the batch's index write
    with pytest.raises(StorageError):
        store.put_many([(b, db), (c, dc), (liar, b"garbage")], verified=True)
    (tmp_path / "blobs" / "tmp" / "put-dead").write_bytes(b"half")  # a write the crash cut off

    reopened = make(index.crash_copy())
    report = reopened.open_report
    assert report is not None
    assert sorted(report.adopted) == sorted([b, c])  # files without index entries, verified
    assert report.removed_bad == [liar]
    assert report.temp_removed == 1
    assert not reopened.has(liar) and not reopened._path(liar).exists()
    assert reopened.get(b) == db and reopened.get(c) == dc
    assert reopened.refcount(b) == 1  # pinned before the crash: protected
    assert reopened.usage().used_bytes == 300
    assert reopened.gc() == 200  # a and c are unpinned
    assert reopened.check().clean


def test_index_entry_without_file_after_a_batch(make: Make, tmp_path: Path) -> None:
    index = MemoryKV()
    store = make(index)
    blocks = [block(i) for i in range(4)]
    store.put_many(blocks, verified=True)
    root = blocks[0][0]
    store.pin(root, [c for c, _ in blocks])
    os.unlink(store._path(blocks[1][0]))  # outside damage

    reopened = make(index)
    report = reopened.open_report
    assert report is not None
    assert report.missing == [blocks[1][0]]
    assert not reopened.has(blocks[1][0])
    assert reopened.refcount(blocks[1][0]) == 1  # still pinned: protected when fetched again
    assert reopened.usage().blocks == 3
    assert reopened.put_many(blocks, verified=True) == [False, True, False, False]
    assert reopened.gc() == 0
    assert reopened.check().clean


def test_a_block_collected_after_the_first_look_is_written_under_the_lock(
    make: Make, tmp_path: Path
) -> None:
    store = make()
    cid, data = block(1)
    store.has = lambda c: True  # type: ignore[method-assign]  # "already stored" when first seen
    assert store.put_many([(cid, data)]) == [True]
    del store.has
    assert store.get(cid) == data
    assert tmp_files(tmp_path) == []
    assert store.check().clean


def test_concurrent_batches_and_checks(tmp_path: Path) -> None:
    store = BlobStore.open(tmp_path / "blobs", verify=verify, quota_bytes=1 << 20)
    blocks = [block(i, 300) for i in range(64)]
    errors: list[BaseException] = []
    stored: list[list[bool]] = []

    def writer(offset: int) -> None:
        try:
            for start in range(offset, 64, 8):  # overlapping batches from two threads
                stored.append(store.put_many(blocks[start : start + 8], verified=True))
        except BaseException as exc:
            errors.append(exc)

    def checker() -> None:
        try:
            for _ in range(20):
                report = store.check()
                assert not report.missing and not report.removed_bad
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(o,)) for o in (0, 4)]
    threads.append(threading.Thread(target=checker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert sum(flag for flags in stored for flag in flags) == 64  # each block stored once
    assert store.usage() == store.usage().__class__(64 * 300, 64, 1 << 20)
    assert all(store.get(c) == d for c, d in blocks)
    assert not list((tmp_path / "blobs" / "tmp").iterdir())
    assert store.check().clean
    store.close()


async def test_put_many_async_runs_off_the_event_loop(make: Make) -> None:
    store = make()
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def watching(cid: bytes, data: bytes) -> bool:
        seen.append(threading.get_ident())
        return verify(cid, data)

    store._verify = watching
    blocks = [block(1), block(2)]
    assert await store.put_many_async(iter(blocks)) == [True, True]
    assert seen and loop_thread not in seen
    assert await store.put_async(*block(3), verified=True)
    assert len(seen) == 2
