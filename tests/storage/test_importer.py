"""Files into and out of the blob store as UnixFS DAGs: vector roots, ranges reading only the
covering leaves, missing blocks, quota, and the v1 registration round trip."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.storage import MemoryKV
from node.storage.blobstore import BlobStore, BlockNotFound, QuotaExceeded
from node.storage.format_v1 import (
    LEAF0_BYTES,
    BadRange,
    convert_to_v1,
    make_proof,
    row_byte_ranges,
    verify_registration,
)
from node.storage.importer import (
    ImportResult,
    export_file,
    export_file_async,
    file_size,
    import_file,
    import_file_async,
    missing_blocks,
    missing_blocks_async,
    verify_cid_block,
)
from node.storage.unixfs import RAW_CODEC, build_chunks, parse_cid, raw_cid
from tests.models.safetensors_files import read_file, safetensors_file

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
FILES: dict[str, dict[str, Any]] = json.loads((VECTORS / "unixfs-cids.json").read_text())["files"]
MiB = 1 << 20


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "unixfs_test_files", VECTORS / "unixfs_test_files.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


class CountingStore(BlobStore):
    """A BlobStore that records which blocks were read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[bytes] = []

    def get(self, cid: bytes) -> bytes | None:
        self.reads.append(cid)
        return super().get(cid)


def make_store(root: Path, quota: int = 1 << 30) -> CountingStore:
    return CountingStore(root, MemoryKV(), verify=verify_cid_block, quota_bytes=quota)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return make_store(tmp_path / "blobs")


def test_verify_cid_block() -> None:
    cid = bytes(raw_cid(b"abc"))
    assert verify_cid_block(cid, b"abc")
    assert not verify_cid_block(cid, b"abd")
    assert not verify_cid_block(b"\x01\x02", b"abc")


@pytest.mark.parametrize("name", ["p0", "p1", "p1m", "p1m1", "p3m5"])
def test_import_reproduces_vector_roots(name: str, tmp_path: Path, store: CountingStore) -> None:
    size = int(FILES[name]["size"])
    path = tmp_path / name
    GEN.write(str(path), size)
    seen: list[int] = []
    with open(path, "rb") as src:
        result = import_file(store, src, progress=seen.append)
    assert str(parse_cid(result.root)) == FILES[name]["cid"]
    assert result.size == size
    leaves = max(1, -(-size // MiB))
    assert result.blocks == (leaves if leaves == 1 else leaves + 1)
    assert seen == sorted(seen) and (seen[-1] if seen else 0) == size
    assert store.is_pinned(result.root)
    assert missing_blocks(store, result.root) == []
    out = io.BytesIO()
    assert export_file(store, result.root, out) == size
    assert out.getvalue() == path.read_bytes()
    assert file_size(store, result.root) == size


def test_pin_protects_every_block(store: CountingStore) -> None:
    data = GEN.stream_bytes(2 * MiB + 10)
    result = import_file(store, io.BytesIO(data))
    root, blocks = build_chunks([data])
    assert result == ImportResult(bytes(root), len(data), len(blocks))
    for block in blocks:
        assert store.refcount(bytes(block.cid)) == 1
    store.gc()
    assert missing_blocks(store, result.root) == []


def test_unpinned_import_can_be_collected(store: CountingStore) -> None:
    result = import_file(store, io.BytesIO(GEN.stream_bytes(MiB + 1)), pin=False)
    assert not store.is_pinned(result.root)
    assert missing_blocks(store, result.root) == []
    store.gc()
    assert missing_blocks(store, result.root) == [result.root]


def test_identical_leaves_are_one_block(store: CountingStore) -> None:
    result = import_file(store, io.BytesIO(bytes(3 * MiB)))
    assert result.blocks == 2  # the zero leaf once, plus the root
    out = io.BytesIO()
    export_file(store, result.root, out)
    assert out.getvalue() == bytes(3 * MiB)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[CountingStore, bytes, bytes]:
    data = GEN.stream_bytes(5 * MiB + 123)
    s = make_store(tmp_path_factory.mktemp("big") / "blobs")
    result = import_file(s, io.BytesIO(data))
    return s, result.root, data


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_export_range_reads_only_covering_leaves(
    big: tuple[CountingStore, bytes, bytes], data: st.DataObject
) -> None:
    store, root, content = big
    start = data.draw(st.integers(0, len(content)))
    end = data.draw(st.integers(start, len(content)))
    store.reads.clear()
    out = io.BytesIO()
    assert export_file(store, root, out, start=start, end=end) == end - start
    assert out.getvalue() == content[start:end]
    leaves_read = [c for c in store.reads if parse_cid(c).codec.code == RAW_CODEC]
    expected = 0 if start == end else (end - 1) // MiB - start // MiB + 1
    assert len(leaves_read) == expected


def test_export_range_refuses_bad_ranges(big: tuple[CountingStore, bytes, bytes]) -> None:
    store, root, content = big
    for start, end in [(5, 4), (-1, 3), (0, len(content) + 1)]:
        with pytest.raises(BadRange):
            export_file(store, root, io.BytesIO(), start=start, end=end)


def test_missing_blocks_and_export_error(tmp_path: Path) -> None:
    data = GEN.stream_bytes(3 * MiB + 5)
    root, blocks = build_chunks([data])
    missing_leaf = bytes(blocks[1].cid)
    partial = make_store(tmp_path / "partial")
    for block in blocks:
        if bytes(block.cid) != missing_leaf:
            partial.put(bytes(block.cid), block.data)
    assert missing_blocks(partial, bytes(root)) == [missing_leaf]
    with pytest.raises(BlockNotFound) as info:
        export_file(partial, bytes(root), io.BytesIO())
    assert info.value.data == {"cid": missing_leaf.hex()}
    assert str(parse_cid(missing_leaf)) in str(info.value)
    # A range that avoids the missing leaf still reads.
    out = io.BytesIO()
    export_file(partial, bytes(root), out, start=0, end=MiB)
    assert out.getvalue() == data[:MiB]
    # Nothing present: the root alone is missing (its children are unknown).
    empty = make_store(tmp_path / "empty")
    assert missing_blocks(empty, bytes(root)) == [bytes(root)]
    with pytest.raises(BlockNotFound):
        export_file(empty, bytes(root), io.BytesIO())
    # Once the leaf arrives, the file is complete.
    partial.put(missing_leaf, blocks[1].data)
    assert missing_blocks(partial, bytes(root)) == []


def test_import_over_quota_leaves_no_pin(tmp_path: Path) -> None:
    small = make_store(tmp_path / "small", quota=3 * MiB)
    with pytest.raises(QuotaExceeded, match="evicted"):
        import_file(small, io.BytesIO(GEN.stream_bytes(5 * MiB)))
    assert small.pins() == []


def test_v1_artifact_round_trip(store: CountingStore) -> None:
    """convert -> import -> proof from the store -> registration verifies -> rows export."""
    src = safetensors_file([("x", "F32", [70_000, 4]), ("y", "I64", [70_000])])
    v1 = io.BytesIO()
    converted = convert_to_v1(io.BytesIO(src), v1)
    v1.seek(0)
    result = import_file(store, v1)
    assert result.size == converted.file_size
    proof = make_proof(lambda cid: store.get(cid) or b"", result.root)
    got = verify_registration(result.root, proof, encrypted=False)
    assert got.header == converted.header
    _, data = read_file(src)
    for r in row_byte_ranges(got.header, 60_000, 70_000):
        out = io.BytesIO()
        export_file(store, result.root, out, start=LEAF0_BYTES + r.begin, end=LEAF0_BYTES + r.end)
        assert out.getvalue() == data[r.begin : r.end]


async def test_async_wrappers(store: CountingStore) -> None:
    data = GEN.stream_bytes(MiB + 77)
    result = await import_file_async(store, io.BytesIO(data))
    assert await missing_blocks_async(store, result.root) == []
    out = io.BytesIO()
    assert await export_file_async(store, result.root, out, start=10, end=MiB + 20) == MiB + 10
    assert out.getvalue() == data[10 : MiB + 20]
