"""UnixFS artifact layout (DESIGN §7): root CIDs equal ``ipfs add --cid-version=1 --raw-leaves
--chunker=size-1048576``, checked against vectors from an independent implementation."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from node.errors import DecodeError, NeuroSeedError, StorageError
from node.storage import unixfs
from node.storage.unixfs import (
    CHUNK_SIZE,
    DAG_PB_CODEC,
    MAX_LINKS,
    RAW_CODEC,
    Block,
    BlockMismatch,
    FileNode,
    Link,
    MalformedNode,
    UnixfsBuilder,
    build_chunks,
    children_for_range,
    cid_of_chunks,
    cid_of_file,
    cid_of_file_async,
    dag_pb_cid,
    decode_node,
    encode_file_node,
    leaf_range,
    parse_cid,
    raw_cid,
    verify_block,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
FILES: dict[str, dict[str, Any]] = json.loads((VECTORS / "unixfs-cids.json").read_text())["files"]
MiB = CHUNK_SIZE
_PREFIX = b"neuroseed-unixfs"
_HASHES_PER_PIECE = 32768  # 1 MiB of content per generated piece


def _shared_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "unixfs_test_files", VECTORS / "unixfs_test_files.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def content_pieces(size: int) -> Iterator[bytes]:
    """The deterministic test file of ``size`` bytes, 1 MiB at a time (streaming equivalent of
    the shared generator's ``stream_bytes``)."""
    sha = hashlib.sha256
    k = 0
    left = size
    while left > 0:
        piece = b"".join(
            [sha(_PREFIX + (k + j).to_bytes(8, "big")).digest() for j in range(_HASHES_PER_PIECE)]
        )
        k += _HASHES_PER_PIECE
        yield piece[:left]
        left -= min(left, len(piece))


def content(size: int) -> bytes:
    return b"".join(content_pieces(size))


# --- the generator --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 65535, 65536, 65537, MiB + 7])
def test_streaming_generator_matches_shared(size: int, tmp_path: Path) -> None:
    gen = _shared_generator()
    assert content(size) == gen.stream_bytes(size)
    path = tmp_path / "f"
    gen.write(str(path), size)
    assert path.read_bytes() == content(size)


# --- the vectors ----------------------------------------------------------------------------


class VectorRun:
    """Every vector built in one streaming pass over the largest file (each smaller file is a
    prefix of it). Only non-leaf blocks and leaf CIDs are kept."""

    def __init__(self) -> None:
        self.roots: dict[str, str] = {}
        self.nodes: dict[str, dict[str, bytes]] = {name: {} for name in FILES}
        self.order: dict[str, list[str]] = {name: [] for name in FILES}
        self.leaves: dict[str, list[str]] = {name: [] for name in FILES}
        self.max_pending = 0
        builders = {name: UnixfsBuilder() for name in FILES}
        total = max(int(f["size"]) for f in FILES.values())
        offset = 0
        for piece in content_pieces(total):
            for name, f in FILES.items():
                take = min(int(f["size"]) - offset, len(piece))
                if take > 0:
                    self._keep(name, builders[name].feed(piece[:take]))
                    self.max_pending = max(
                        self.max_pending, *(len(level) for level in builders[name]._levels)
                    )
            offset += len(piece)
        for name, builder in builders.items():
            root, rest = builder.finish_blocks()
            self._keep(name, rest)
            self.roots[name] = str(root)

    def _keep(self, name: str, blocks: list[Block]) -> None:
        for block in blocks:
            cid = str(block.cid)
            self.order[name].append(cid)
            if block.cid.codec.code == RAW_CODEC:
                self.leaves[name].append(cid)
                if len(block.data) <= 1:
                    self.nodes[name][cid] = block.data
            else:
                verify_block(block.cid, block.data)
                self.nodes[name][cid] = block.data


@pytest.fixture(scope="module")
def run() -> VectorRun:
    return VectorRun()


@pytest.mark.parametrize("name", sorted(FILES))
def test_vector_root_cid(run: VectorRun, name: str) -> None:
    assert run.roots[name] == FILES[name]["cid"]


def test_vectors_cover_two_levels() -> None:
    assert FILES["p174m"]["size"] == MAX_LINKS * MiB
    assert FILES["p174m1"]["size"] == MAX_LINKS * MiB + 1


def test_memory_is_bounded(run: VectorRun) -> None:
    assert run.max_pending < MAX_LINKS


def test_small_files_are_one_raw_leaf(run: VectorRun) -> None:
    for name in ("p0", "p1", "p256k", "p1m_1", "p1m"):
        root = parse_cid(run.roots[name])
        assert root.codec.code == RAW_CODEC
        assert root.version == 1
        assert run.order[name] == [run.roots[name]]
    assert parse_cid(run.roots["p0"]) == raw_cid(b"")
    verify_block(parse_cid(run.roots["p0"]), b"")
    assert parse_cid(run.roots["p1"]) == raw_cid(content(1))


def test_one_mib_plus_one(run: VectorRun) -> None:
    root = parse_cid(run.roots["p1m1"])
    assert root.codec.code == DAG_PB_CODEC
    node = decode_node(run.nodes["p1m1"][str(root)])
    assert node.filesize == MiB + 1
    assert node.blocksizes == (MiB, 1)
    assert [link.tsize for link in node.links] == [MiB, 1]
    assert [str(link.cid) for link in node.links] == run.leaves["p1m1"]
    assert all(link.cid.codec.code == RAW_CODEC for link in node.links)
    assert node.links[1].cid == raw_cid(content(MiB + 1)[MiB:])
    assert run.order["p1m1"][-1] == str(root)


def test_174_mib_is_one_full_node(run: VectorRun) -> None:
    root = parse_cid(run.roots["p174m"])
    block = run.nodes["p174m"][str(root)]
    node = decode_node(block)
    assert len(node.links) == MAX_LINKS
    assert node.blocksizes == (MiB,) * MAX_LINKS
    assert node.filesize == MAX_LINKS * MiB
    assert [str(link.cid) for link in node.links] == run.leaves["p174m"]
    assert all(link.tsize == MiB for link in node.links)
    assert len(run.order["p174m"]) == MAX_LINKS + 1
    assert run.order["p174m"][-1] == str(root)


def test_174_mib_plus_one_is_two_levels(run: VectorRun) -> None:
    root = parse_cid(run.roots["p174m1"])
    node = decode_node(run.nodes["p174m1"][str(root)])
    assert node.filesize == MAX_LINKS * MiB + 1
    assert node.blocksizes == (MAX_LINKS * MiB, 1)
    full, tail = node.links
    # The first child is exactly the 174 MiB file's root.
    assert str(full.cid) == run.roots["p174m"]
    full_block = run.nodes["p174m1"][str(full.cid)]
    assert full_block == run.nodes["p174m"][run.roots["p174m"]]
    assert full.tsize == len(full_block) + MAX_LINKS * MiB
    # The second child is a node with one link to a one-byte raw leaf (kubo does not collapse it).
    assert tail.cid.codec.code == DAG_PB_CODEC
    tail_block = run.nodes["p174m1"][str(tail.cid)]
    tail_node = decode_node(tail_block)
    assert tail_node.blocksizes == (1,)
    assert tail_node.links[0].tsize == 1
    assert str(tail_node.links[0].cid) == run.leaves["p174m1"][-1]
    byte = hashlib.sha256(_PREFIX + (MAX_LINKS * MiB // 32).to_bytes(8, "big")).digest()[:1]
    assert run.nodes["p174m1"][run.leaves["p174m1"][-1]] == byte
    assert tail.tsize == len(tail_block) + 1
    assert len(run.leaves["p174m1"]) == MAX_LINKS + 1
    # Children precede parents; the root comes last.
    order = run.order["p174m1"]
    assert order.index(str(full.cid)) < order.index(str(tail.cid)) < order.index(str(root))
    assert order[-1] == str(root)
    assert len(order) == MAX_LINKS + 1 + 3


# --- piece boundaries, streams ---------------------------------------------------------------


def test_piece_boundaries_do_not_matter() -> None:
    data = content(int(FILES["p3m5"]["size"]))
    expected = FILES["p3m5"]["cid"]
    one_byte = UnixfsBuilder()
    for i in range(len(data)):
        one_byte.feed(data[i : i + 1])
    assert str(one_byte.finish()) == expected
    whole = UnixfsBuilder()
    whole.feed(data)
    assert str(whole.finish()) == expected
    rng = random.Random(7)
    cuts = sorted([*rng.sample(range(1, len(data)), 40), MiB - 1, MiB, MiB + 1, 2 * MiB])
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    root, blocks = build_chunks(pieces)
    assert str(root) == expected
    root2, blocks2 = build_chunks([data])
    assert root2 == root
    assert blocks == blocks2
    assert [len(b.data) for b in blocks if b.cid.codec.code == RAW_CODEC] == [MiB] * 3 + [5]


def test_cid_of_file_and_async() -> None:
    data = content(int(FILES["p1m1"]["size"]))
    assert str(cid_of_file(io.BytesIO(data))) == FILES["p1m1"]["cid"]
    assert str(cid_of_file(io.BytesIO(data), read_size=4097)) == FILES["p1m1"]["cid"]
    assert str(asyncio.run(cid_of_file_async(io.BytesIO(data)))) == FILES["p1m1"]["cid"]
    assert str(cid_of_file(io.BytesIO(b""))) == FILES["p0"]["cid"]
    assert str(cid_of_chunks(iter([data[:10], data[10:]]))) == FILES["p1m1"]["cid"]


def test_empty_file_builder() -> None:
    root, blocks = UnixfsBuilder().finish_blocks()
    assert blocks == [Block(root, b"")]
    assert str(root) == FILES["p0"]["cid"]


def test_builder_cannot_be_reused() -> None:
    b = UnixfsBuilder()
    b.feed(b"abc")
    assert b.size == 3
    b.finish()
    with pytest.raises(RuntimeError):
        b.feed(b"x")
    with pytest.raises(RuntimeError):
        b.finish()


# --- layout against a reference of kubo's balanced builder, on a small scale -----------------


def _kubo_balanced(data: bytes, chunk: int, max_links: int) -> str:
    """Transcription of go-unixfs importer/balanced Layout + fillNodeRec."""
    leaves = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    it = iter(leaves)
    done = [False]
    pos = [0]

    def next_leaf() -> tuple[Link, int]:
        leaf = next(it)
        pos[0] += 1
        done[0] = pos[0] == len(leaves)
        return Link(raw_cid(leaf), len(leaf)), len(leaf)

    def commit(children: list[tuple[Link, int]]) -> tuple[Link, int]:
        block = encode_file_node([c[0] for c in children], [c[1] for c in children])
        tsize = len(block) + sum(c[0].tsize for c in children)
        return Link(dag_pb_cid(block), tsize), sum(c[1] for c in children)

    def fill(children: list[tuple[Link, int]], depth: int) -> tuple[Link, int]:
        while len(children) < max_links and not done[0]:
            if depth == 1:
                children.append(next_leaf())
            else:
                children.append(fill([], depth - 1))
        return commit(children)

    root = next_leaf()
    depth = 1
    while not done[0]:
        root = fill([root], depth)
        depth += 1
    return str(root[0].cid)


def test_layout_matches_kubo_balanced_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    chunk, links = 4, 3
    monkeypatch.setattr(unixfs, "CHUNK_SIZE", chunk)
    monkeypatch.setattr(unixfs, "MAX_LINKS", links)
    data = content(chunk * (links**3 + links + 2))
    # Up to four levels: every leaf count through 3**3 + 3 + 2 leaves, with and without a tail.
    for n_leaves in range(links**3 + links + 3):
        for size in {max(0, chunk * n_leaves - 1), chunk * n_leaves}:
            b = UnixfsBuilder()
            blocks: list[Block] = []
            for i in range(0, size, 3):
                blocks.extend(b.feed(data[i : min(size, i + 3)]))
            root, rest = b.finish_blocks()
            blocks.extend(rest)
            assert str(root) == _kubo_balanced(data[:size], chunk, links), size
            assert blocks[-1].cid == root
            for block in blocks:
                verify_block(block.cid, block.data)
                if block.cid.codec.code == DAG_PB_CODEC:
                    assert len(decode_node(block.data).links) <= links


# --- decode_node ----------------------------------------------------------------------------


def _sample_node() -> tuple[bytes, FileNode]:
    a, b = raw_cid(b"a" * 10), raw_cid(b"b")
    links = (Link(a, 10), Link(b, 1))
    block = encode_file_node(links, [10, 1])
    return block, FileNode(links, 11, (10, 1))


def test_decode_node_round_trip() -> None:
    block, expected = _sample_node()
    node = decode_node(block)
    assert node == expected
    assert encode_file_node(node.links, node.blocksizes) == block
    # Links first (field 2), then Data (field 1); each link Hash, empty Name, Tsize.
    assert block[0] == 0x12
    link = bytes([0x0A, 36]) + bytes(expected.links[0].cid) + b"\x12\x00\x18\x0a"
    assert block[2 : 2 + len(link)] == link
    assert block.endswith(b"\x0a\x08\x08\x02\x18\x0b\x20\x0a\x20\x01")


def test_decode_node_of_nested_tree() -> None:
    inner = encode_file_node([Link(raw_cid(b"x" * 300), 300)], [300])
    outer = encode_file_node([Link(dag_pb_cid(inner), len(inner) + 300)], [300])
    node = decode_node(outer)
    assert node.links[0].cid.codec.code == DAG_PB_CODEC
    assert node.filesize == 300
    assert decode_node(inner).blocksizes == (300,)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # truncated
        lambda b: b + b"\x20\x00",  # trailing field
        lambda b: b.replace(b"\x12\x00\x18", b"\x18", 1),  # Name missing
        lambda b: b.replace(b"\x20\x0a\x20\x01", b"\x20\x0a\x20\x02"),  # blocksizes != filesize
        lambda b: b.replace(b"\x08\x02\x18", b"\x08\x01\x18"),  # Type=Directory
        lambda b: b.replace(b"\x20\x0a\x20\x01", b"\x20\x8a\x00\x20\x01"),  # non-minimal varint
        lambda b: b[b.rindex(b"\x0a\x08") :] + b[: b.rindex(b"\x0a\x08")],  # Data before Links
        lambda b: b[b.rindex(b"\x0a\x08") :],  # no links
        lambda b: b"",
    ],
)
def test_decode_node_is_strict(mutate: Any) -> None:
    block, _ = _sample_node()
    bad = mutate(block)
    assert bad != block
    with pytest.raises(MalformedNode) as info:
        decode_node(bad)
    assert isinstance(info.value, DecodeError)


def test_decode_node_rejects_wrong_link_count() -> None:
    block = encode_file_node([Link(raw_cid(b"a"), 1)], [1, 0])
    with pytest.raises(MalformedNode):
        decode_node(block)


# --- verify_block, CIDs ---------------------------------------------------------------------


def test_verify_block() -> None:
    data = b"hello"
    cid = raw_cid(data)
    verify_block(cid, data)
    with pytest.raises(BlockMismatch) as info:
        verify_block(cid, b"hellO")
    assert isinstance(info.value, StorageError)
    assert isinstance(info.value, NeuroSeedError)
    block, _ = _sample_node()
    verify_block(dag_pb_cid(block), block)
    with pytest.raises(BlockMismatch):
        verify_block(dag_pb_cid(block), block + b"\x00")
    # Only CIDv1 sha2-256 raw / dag-pb CIDs are accepted.
    with pytest.raises(BlockMismatch):
        verify_block(parse_cid("QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR"), data)


def test_cid_helpers() -> None:
    cid = raw_cid(b"")
    assert str(cid).startswith("bafkrei")
    assert bytes(cid)[:4] == bytes([0x01, 0x55, 0x12, 0x20])
    assert str(dag_pb_cid(b"")).startswith("bafybei")
    assert parse_cid(str(cid)) == cid
    assert parse_cid(bytes(cid)) == cid
    with pytest.raises(DecodeError):
        parse_cid("not a cid")


# --- ranges ---------------------------------------------------------------------------------


def test_leaf_range() -> None:
    assert list(leaf_range(0, 0)) == []
    assert list(leaf_range(0, 1)) == [0]
    assert list(leaf_range(0, MiB)) == [0]
    assert list(leaf_range(MiB - 1, MiB + 1)) == [0, 1]
    assert list(leaf_range(MiB, 3 * MiB + 5)) == [1, 2, 3]
    with pytest.raises(ValueError):
        leaf_range(5, 4)


def test_children_for_range() -> None:
    sizes = [MAX_LINKS * MiB, 1]
    assert children_for_range(sizes, 0, 1) == [(0, 0)]
    assert children_for_range(sizes, MAX_LINKS * MiB, MAX_LINKS * MiB + 1) == [(1, MAX_LINKS * MiB)]
    assert children_for_range(sizes, MiB, MAX_LINKS * MiB + 1) == [(0, 0), (1, MAX_LINKS * MiB)]
    assert children_for_range([MiB] * 3, MiB, 2 * MiB) == [(1, MiB)]
    assert children_for_range([MiB] * 3, 5, 5) == []
    with pytest.raises(ValueError):
        children_for_range(sizes, 2, 1)
