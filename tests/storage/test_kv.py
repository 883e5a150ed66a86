"""The KVStore contract, run against both implementations (LevelDB and MemoryKV).

Plus what only one of them has: LevelDB persistence, locking and error translation; MemoryKV's
failure injection and crash copy.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import CorruptDatabase, StorageError
from node.storage import KVStore, LevelDB, MemoryKV, Snapshot
from node.storage.memory import resolve_range

Factory = Callable[[], KVStore]


@pytest.fixture(params=["memory", "leveldb"])
def make_kv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """A factory so a test can open several stores; all are closed afterwards."""
    opened: list[KVStore] = []

    def make() -> KVStore:
        kv: KVStore = (
            MemoryKV() if request.param == "memory" else LevelDB(tmp_path / f"db{len(opened)}")
        )
        opened.append(kv)
        return kv

    yield make
    for kv in opened:
        kv.close()


@pytest.fixture
def kv(make_kv: Factory) -> KVStore:
    return make_kv()


def fill(kv: KVStore, keys: list[bytes]) -> None:
    b = kv.batch()
    for k in keys:
        b.put(k, b"v" + k)
    b.commit()


def keys_of(items: Iterator[tuple[bytes, bytes]]) -> list[bytes]:
    return [k for k, _ in items]


# --- basic reads and writes ------------------------------------------------------------------


def test_put_get_delete(kv: KVStore) -> None:
    assert kv.get(b"a") is None
    kv.put(b"a", b"1")
    kv.put(b"b", b"", sync=True)
    assert kv.get(b"a") == b"1"
    assert kv.get(b"b") == b""  # an empty value is a value, not absence
    kv.put(b"a", b"2")
    assert kv.get(b"a") == b"2"
    kv.delete(b"a")
    kv.delete(b"never-there")
    assert kv.get(b"a") is None
    assert list(kv.iterate()) == [(b"b", b"")]


def test_only_bytes_accepted(kv: KVStore) -> None:
    with pytest.raises(TypeError):
        kv.put("a", b"1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kv.put(b"a", bytearray(b"1"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kv.get(1)  # type: ignore[arg-type]
    b = kv.batch()
    with pytest.raises(TypeError):
        b.put(b"a", "x")  # type: ignore[arg-type]


# --- ordering and iteration --------------------------------------------------------------------

KEYS = [b"", b"\x00", b"a", b"a\x00", b"a\xff", b"a\xff\xff", b"ab", b"b", b"\xff", b"\xff\xff"]


def test_iterates_in_unsigned_byte_order(kv: KVStore) -> None:
    fill(kv, list(reversed(KEYS)))
    assert keys_of(kv.iterate()) == sorted(KEYS)
    assert keys_of(kv.iterate(reverse=True)) == sorted(KEYS, reverse=True)
    assert dict(kv.iterate()) == {k: b"v" + k for k in KEYS}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"a", [b"a", b"a\x00", b"ab", b"a\xff", b"a\xff\xff"]),
        (b"a\xff", [b"a\xff", b"a\xff\xff"]),
        (b"\xff", [b"\xff", b"\xff\xff"]),
        (b"", sorted(KEYS)),
        (b"c", []),
    ],
)
def test_prefix_iteration(kv: KVStore, prefix: bytes, expected: list[bytes]) -> None:
    fill(kv, KEYS)
    assert keys_of(kv.iterate(prefix=prefix)) == expected
    assert keys_of(kv.iterate(prefix=prefix, reverse=True)) == expected[::-1]


@pytest.mark.parametrize(
    ("start", "stop"),
    [(b"a", b"b"), (None, b"a\xff"), (b"a\x00", None), (None, None), (b"b", b"a"), (b"a", b"a")],
)
def test_range_iteration_is_half_open(kv: KVStore, start: bytes | None, stop: bytes | None) -> None:
    fill(kv, KEYS)
    expected = [
        k for k in sorted(KEYS) if (start is None or k >= start) and (stop is None or k < stop)
    ]
    assert keys_of(kv.iterate(start=start, stop=stop)) == expected
    assert keys_of(kv.iterate(start=start, stop=stop, reverse=True)) == expected[::-1]


def test_prefix_and_range_are_exclusive(kv: KVStore) -> None:
    with pytest.raises(ValueError):
        kv.iterate(prefix=b"a", start=b"a")


def test_iterator_is_a_point_in_time_view(kv: KVStore) -> None:
    fill(kv, [b"k1", b"k2", b"k3"])
    it = kv.iterate()
    kv.put(b"k0", b"new")
    kv.delete(b"k2")
    kv.put(b"k3", b"changed")
    assert list(it) == [(b"k1", b"vk1"), (b"k2", b"vk2"), (b"k3", b"vk3")]
    assert keys_of(kv.iterate()) == [b"k0", b"k1", b"k3"]


def test_delete_while_iterating(kv: KVStore) -> None:
    fill(kv, [bytes([i]) for i in range(50)])
    for key, _ in kv.iterate():
        if key[0] % 2:
            kv.delete(key)
    assert keys_of(kv.iterate()) == [bytes([i]) for i in range(0, 50, 2)]


def test_resolve_range_prefix_successor() -> None:
    assert resolve_range(b"ab", None, None) == (b"ab", b"ac")
    assert resolve_range(b"a\xff\xff", None, None) == (b"a\xff\xff", b"b")
    assert resolve_range(b"\xff", None, None) == (b"\xff", None)
    assert resolve_range(b"", None, None) == (None, None)
    assert resolve_range(None, b"x", None) == (b"x", None)


# --- batches -----------------------------------------------------------------------------------


def test_batch_applies_all_at_commit(kv: KVStore) -> None:
    fill(kv, [b"old"])
    b = kv.batch()
    b.put(b"k1", b"1")
    b.put(b"k2", b"2")
    b.delete(b"old")
    assert kv.get(b"k1") is None and kv.get(b"old") == b"vold"
    b.commit(sync=True)
    assert dict(kv.iterate()) == {b"k1": b"1", b"k2": b"2"}


def test_batch_last_operation_on_a_key_wins(kv: KVStore) -> None:
    fill(kv, [b"x"])
    b = kv.batch()
    b.put(b"a", b"1")
    b.delete(b"a")
    b.delete(b"x")
    b.put(b"x", b"2")
    b.put(b"y", b"1")
    b.put(b"y", b"3")
    b.commit()
    assert dict(kv.iterate()) == {b"x": b"2", b"y": b"3"}


def test_uncommitted_batch_writes_nothing(kv: KVStore) -> None:
    b = kv.batch()
    b.put(b"a", b"1")
    del b
    assert list(kv.iterate()) == []


def test_committed_batch_cannot_be_reused(kv: KVStore) -> None:
    b = kv.batch()
    b.put(b"a", b"1")
    b.commit()
    with pytest.raises(StorageError):
        b.put(b"b", b"2")
    with pytest.raises(StorageError):
        b.commit()
    assert kv.get(b"b") is None


# --- snapshots ---------------------------------------------------------------------------------


def test_snapshot_is_isolated_from_later_writes(kv: KVStore) -> None:
    fill(kv, [b"a", b"b", b"c"])
    snap = kv.snapshot()
    kv.put(b"a", b"changed")
    kv.delete(b"b")
    b = kv.batch()
    b.put(b"d", b"new")
    b.delete(b"c")
    b.commit()
    assert snap.get(b"a") == b"va" and snap.get(b"b") == b"vb" and snap.get(b"d") is None
    assert dict(snap.iterate()) == {b"a": b"va", b"b": b"vb", b"c": b"vc"}
    assert keys_of(snap.iterate(prefix=b"b")) == [b"b"]
    assert keys_of(snap.iterate(start=b"b", reverse=True)) == [b"c", b"b"]
    assert dict(kv.iterate()) == {b"a": b"changed", b"d": b"new"}
    snap.close()


def test_snapshot_close_is_final_and_idempotent(kv: KVStore) -> None:
    fill(kv, [b"a"])
    snap = kv.snapshot()
    it = snap.iterate()
    assert next(it) == (b"a", b"va")
    snap.close()
    snap.close()
    with pytest.raises(StorageError):
        snap.get(b"a")
    with pytest.raises(StorageError):
        snap.iterate()
    assert kv.get(b"a") == b"va"


def test_snapshot_read_in_another_thread_while_writing(kv: KVStore) -> None:
    """The chain thread writes blocks and publishes a snapshot after each; the RPC thread reads
    them. Every snapshot must show exactly one committed generation, never a mix."""
    n_keys, rounds = 20, 60
    published: queue.Queue[tuple[int, Snapshot] | None] = queue.Queue()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while (item := published.get()) is not None:
                gen, snap = item
                values = {v for _, v in snap.iterate()}
                assert values == {str(gen).encode()}, (gen, values)
                assert snap.get(b"k00") == str(gen).encode()
                snap.close()
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for gen in range(rounds):
            b = kv.batch()
            for i in range(n_keys):
                b.put(b"k%02d" % i, str(gen).encode())
            b.commit(sync=False)
            published.put((gen, kv.snapshot()))
            # Overwrite again right away, racing the reader.
            b = kv.batch()
            for i in range(n_keys):
                b.put(b"k%02d" % i, b"in-between")
            b.commit(sync=False)
    finally:
        published.put(None)
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert not errors, errors


def test_snapshot_iterated_slowly_while_writer_runs(kv: KVStore) -> None:
    fill(kv, [b"%04d" % i for i in range(300)])
    snap = kv.snapshot()
    seen: list[bytes] = []
    ready = threading.Event()

    def reader() -> None:
        for i, (k, v) in enumerate(snap.iterate()):
            if i == 10:
                ready.set()
            assert v == b"v" + k
            seen.append(k)

    thread = threading.Thread(target=reader)
    thread.start()
    ready.wait(timeout=10)
    for i in range(300):
        kv.put(b"%04d" % i, b"overwritten")
        kv.delete(b"%04d" % ((i * 7) % 300))
    thread.join(timeout=30)
    assert seen == [b"%04d" % i for i in range(300)]
    snap.close()


# --- closing -----------------------------------------------------------------------------------


def test_close_with_open_snapshots(kv: KVStore) -> None:
    fill(kv, [b"a", b"b"])
    snap = kv.snapshot()
    it = snap.iterate()
    assert next(it)[0] == b"a"
    live = kv.iterate()
    assert next(live)[0] == b"a"
    kv.close()
    kv.close()
    with pytest.raises(StorageError):
        snap.get(b"a")
    with pytest.raises(StorageError):
        next(it)
    with pytest.raises(StorageError):
        next(live)
    snap.close()  # after the store: a no-op, not a crash
    for op in (
        lambda: kv.get(b"a"),
        lambda: kv.put(b"a", b"1"),
        lambda: kv.delete(b"a"),
        lambda: kv.batch(),
        lambda: kv.snapshot(),
        lambda: kv.iterate(),
    ):
        with pytest.raises(StorageError, match="closed"):
            op()


def test_close_while_another_thread_reads_a_snapshot(kv: KVStore) -> None:
    fill(kv, [b"%04d" % i for i in range(200)])
    snap = kv.snapshot()
    started = threading.Event()
    outcome: list[BaseException | None] = []

    def reader() -> None:
        try:
            while True:
                for _ in snap.iterate():
                    started.set()
                snap.get(b"0001")
        except StorageError as exc:
            outcome.append(exc)
        except BaseException as exc:
            outcome.append(exc)
            raise

    thread = threading.Thread(target=reader)
    thread.start()
    assert started.wait(timeout=10)
    kv.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], StorageError)


# --- a model check -----------------------------------------------------------------------------

_key = st.binary(min_size=0, max_size=3).map(lambda b: b.replace(b"\x01", b"\xff"))
_op = st.tuples(_key, st.one_of(st.none(), st.binary(max_size=4)))


@pytest.mark.parametrize("impl", ["memory", "leveldb"])
@given(
    batches=st.lists(st.lists(_op, max_size=12), max_size=6),
    prefix=_key,
    bounds=st.tuples(st.one_of(st.none(), _key), st.one_of(st.none(), _key)),
    reverse=st.booleans(),
)
def test_matches_a_sorted_dict(
    impl: str,
    batches: list[list[tuple[bytes, bytes | None]]],
    prefix: bytes,
    bounds: tuple[bytes | None, bytes | None],
    reverse: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        kv: KVStore = MemoryKV() if impl == "memory" else LevelDB(Path(tmp) / "db")
        try:
            model: dict[bytes, bytes] = {}
            for ops in batches:
                b = kv.batch()
                for k, v in ops:
                    if v is None:
                        b.delete(k)
                        model.pop(k, None)
                    else:
                        b.put(k, v)
                        model[k] = v
                b.commit(sync=False)
            ordered = sorted(model.items(), reverse=reverse)
            assert list(kv.iterate(reverse=reverse)) == ordered
            assert list(kv.iterate(prefix=prefix, reverse=reverse)) == [
                kv_ for kv_ in ordered if kv_[0].startswith(prefix)
            ]
            lo, hi = bounds
            assert list(kv.iterate(start=lo, stop=hi, reverse=reverse)) == [
                kv_
                for kv_ in ordered
                if (lo is None or kv_[0] >= lo) and (hi is None or kv_[0] < hi)
            ]
        finally:
            kv.close()


# --- LevelDB only ------------------------------------------------------------------------------


def test_leveldb_persists_across_reopen(tmp_path: Path) -> None:
    db = LevelDB(tmp_path / "db")
    b = db.batch()
    b.put(b"a", b"1")
    b.put(b"b", b"2")
    b.commit(sync=True)
    db.put(b"c", b"3")
    db.delete(b"b")
    db.close()
    with LevelDB(tmp_path / "db", create=False) as again:
        assert dict(again.iterate()) == {b"a": b"1", b"c": b"3"}


def test_leveldb_creates_missing_parent_directories(tmp_path: Path) -> None:
    with LevelDB(tmp_path / "deep" / "er" / "db") as db:
        db.put(b"a", b"1")
    assert (tmp_path / "deep" / "er" / "db").is_dir()


def test_leveldb_second_open_in_this_process_is_refused(tmp_path: Path) -> None:
    with LevelDB(tmp_path / "db"):
        with pytest.raises(StorageError, match="in use by another process") as info:
            LevelDB(tmp_path / "db")
        assert str(tmp_path) not in str(info.value)


def test_leveldb_open_locked_by_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with LevelDB(path):
        script = (
            "import sys\n"
            "from node.errors import StorageError\n"
            "from node.storage.leveldb import LevelDB\n"
            "try:\n"
            "    LevelDB(sys.argv[1])\n"
            "except StorageError as exc:\n"
            "    print(exc.message)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    assert "data directory is in use by another process" in out.stdout


def test_leveldb_missing_database_without_create(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no database exists") as info:
        LevelDB(tmp_path / "nothing", create=False)
    assert str(tmp_path) not in info.value.message


def test_leveldb_corruption_is_translated(tmp_path: Path) -> None:
    LevelDB(tmp_path / "db").close()
    (tmp_path / "db" / "CURRENT").write_bytes(b"garbage")
    with pytest.raises(CorruptDatabase, match="corrupt") as info:
        LevelDB(tmp_path / "db")
    assert "resync" in info.value.message
    assert str(tmp_path) not in info.value.message


# --- MemoryKV only -----------------------------------------------------------------------------


@pytest.mark.parametrize("after_ops", [0, 1, 2, 3, 10])
def test_memory_injected_failure_rolls_back_the_whole_batch(after_ops: int) -> None:
    kv = MemoryKV({b"a": b"1", b"b": b"2"})
    kv.fail_next_commit(after_ops)
    b = kv.batch()
    b.put(b"a", b"changed")
    b.delete(b"b")
    b.put(b"c", b"3")
    with pytest.raises(StorageError, match="injected"):
        b.commit()
    assert dict(kv.iterate()) == {b"a": b"1", b"b": b"2"}
    assert dict(kv.crash_copy().iterate()) == {b"a": b"1", b"b": b"2"}
    assert kv.write_count == 0
    kv.put(b"d", b"4")  # the failure is one-shot
    assert kv.get(b"d") == b"4"
    assert kv.write_count == 1


def test_memory_injected_failure_invisible_to_snapshots() -> None:
    kv = MemoryKV({b"a": b"1"})
    snap = kv.snapshot()
    kv.fail_next_commit(1)
    b = kv.batch()
    b.put(b"a", b"2")
    b.put(b"b", b"2")
    with pytest.raises(StorageError):
        b.commit()
    assert dict(snap.iterate()) == {b"a": b"1"}
    assert dict(kv.iterate()) == {b"a": b"1"}


def test_memory_crash_copy_is_independent() -> None:
    kv = MemoryKV()
    kv.put(b"a", b"1")
    copy = kv.crash_copy()
    kv.put(b"a", b"2")
    copy.put(b"b", b"3")
    assert dict(copy.iterate()) == {b"a": b"1", b"b": b"3"}
    assert dict(kv.iterate()) == {b"a": b"2"}
    kv.close()
    assert copy.get(b"a") == b"1"
