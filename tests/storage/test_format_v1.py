"""Artifact format v1 (DESIGN §8): leaf 0, conversion, registration proofs, dataset ranges and
composite datasets. Safetensors files are written by hand (tests/models/safetensors_files.py)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multiformats import CID, multihash

from node.errors import DecodeError, EncodeError, NeuroSeedError, ProofError, TooLarge
from node.models import (
    MAX_HEADER_BYTES,
    BadOffsets,
    HeaderTooLarge,
    MalformedHeader,
    NotSafetensors,
    SafetensorsHeader,
    TensorInfo,
    encode_header,
    parse_header,
)
from node.storage import format_v1 as v1
from node.storage.format_v1 import (
    LEAF0_BYTES,
    PLAIN_CHUNK_BYTES,
    ArtifactProof,
    BadRange,
    BadTensorSelection,
    CompositeMismatch,
    CompositePart,
    FileLengthMismatch,
    FileSizeMismatch,
    HeaderMismatch,
    InvalidDataset,
    LayoutMismatch,
    NotFormatV1,
    PathMismatch,
    RowCountMismatch,
    TensorRange,
    TruncatedArtifact,
    composite_header,
    convert_file_to_v1,
    convert_to_v1,
    dataset_rows,
    leaves_for_data_range,
    make_leaf0,
    make_proof,
    row_byte_ranges,
    split_leaf0,
    stored_data_size,
    verify_registration,
    write_composite,
)
from node.storage.unixfs import (
    CHUNK_SIZE,
    BlockMismatch,
    Link,
    UnixfsBuilder,
    dag_pb_cid,
    encode_file_node,
    raw_cid,
)
from tests.models.safetensors_files import SIZES, header_dict, read_file, safetensors_file

MiB = 1 << 20


def u8_header(n: int, name: str = "x") -> bytes:
    return json.dumps({name: {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()


def build(pieces: Iterable[bytes]) -> tuple[bytes, dict[bytes, bytes]]:
    """Root CID and the distinct blocks of a file (identical leaves stored once)."""
    b = UnixfsBuilder()
    blocks: dict[bytes, bytes] = {}
    for piece in pieces:
        for block in b.feed(piece):
            blocks[bytes(block.cid)] = block.data
    root, rest = b.finish_blocks()
    for block in rest:
        blocks[bytes(block.cid)] = block.data
    return bytes(root), blocks


def v1_file(header: bytes, stored: int, fill: bytes = b"\x00") -> Iterator[bytes]:
    """A v1 file: leaf 0 for ``header`` then ``stored`` bytes of ``fill``, 1 MiB at a time."""
    yield make_leaf0(header)
    piece = fill * MiB
    while stored > 0:
        yield piece[: min(stored, MiB)]
        stored -= MiB


def proved(header: bytes, stored: int) -> tuple[bytes, ArtifactProof, dict[bytes, bytes]]:
    root, blocks = build(v1_file(header, stored))
    return root, make_proof(blocks.__getitem__, root), blocks


# --- sizes and leaf 0 ---------------------------------------------------------------------------


def test_constants() -> None:
    assert LEAF0_BYTES == CHUNK_SIZE == MiB
    assert MiB - 16 == PLAIN_CHUNK_BYTES
    assert MAX_HEADER_BYTES == LEAF0_BYTES - 8


@pytest.mark.parametrize(
    ("data", "encrypted", "stored"),
    [
        (0, False, 0),
        (0, True, 0),
        (1, False, 1),
        (1, True, 17),
        (PLAIN_CHUNK_BYTES, True, MiB),
        (PLAIN_CHUNK_BYTES + 1, True, MiB + 17),
        (3 * PLAIN_CHUNK_BYTES, True, 3 * MiB),
        (5 * MiB, False, 5 * MiB),
    ],
)
def test_stored_data_size(data: int, encrypted: bool, stored: int) -> None:
    assert stored_data_size(data, encrypted) == stored
    assert v1.v1_file_size(data, encrypted) == LEAF0_BYTES + stored


def test_stored_data_size_refuses_negative() -> None:
    with pytest.raises(BadRange):
        stored_data_size(-1, False)


def test_leaf0_layout_and_roundtrip() -> None:
    header = u8_header(10)
    leaf0 = make_leaf0(header)
    assert len(leaf0) == LEAF0_BYTES
    assert struct.unpack_from("<Q", leaf0) == (LEAF0_BYTES - 8,)
    assert leaf0[8 : 8 + len(header)] == header
    assert set(leaf0[8 + len(header) :]) == {0x20}
    assert split_leaf0(leaf0) == header
    # An ordinary safetensors reader sees the same header (trailing spaces are JSON whitespace).
    tree, data = read_file(leaf0 + bytes(10))
    assert tree == json.loads(header) and data == bytes(10)


def test_leaf0_of_a_header_of_exactly_the_cap() -> None:
    body = u8_header(1)
    header = body[:-1] + b" " * (MAX_HEADER_BYTES - len(body)) + b"}"
    leaf0 = make_leaf0(header)
    assert split_leaf0(leaf0) == header
    assert parse_header(header).data_size == 1


def test_make_leaf0_refuses() -> None:
    with pytest.raises(HeaderTooLarge):
        make_leaf0(b"{" + b"\n" * MAX_HEADER_BYTES + b"}")
    with pytest.raises(NotSafetensors):
        make_leaf0(b"[]")
    with pytest.raises(NotFormatV1):
        make_leaf0(b"{} ")


def test_split_leaf0_refuses() -> None:
    leaf0 = make_leaf0(b"{}")
    with pytest.raises(NotFormatV1):
        split_leaf0(leaf0[:-1])
    with pytest.raises(NotFormatV1):
        split_leaf0(leaf0 + b" ")
    with pytest.raises(NotFormatV1):
        split_leaf0(struct.pack("<Q", 2) + leaf0[8:])
    with pytest.raises(NotFormatV1):
        split_leaf0(leaf0[:8] + b" " * (LEAF0_BYTES - 8))
    with pytest.raises(NotFormatV1):
        split_leaf0(leaf0[:8] + b"x" + leaf0[9:])


# --- conversion ----------------------------------------------------------------------------------


TENSORS = [("embed", "F32", [5, 3]), ("ids", "I64", [5]), ("mask", "BOOL", [5, 2])]


class Pipe(io.RawIOBase):
    """A non-seekable stream over bytes, returning at most ``step`` bytes a read."""

    def __init__(self, data: bytes, step: int = 100_000) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self._step
        return self._data.read(min(n, self._step))


@pytest.mark.parametrize("seekable", [True, False])
def test_convert_ordinary_file(seekable: bool) -> None:
    src_bytes = safetensors_file(TENSORS, {"format": "pt"})
    _, data = read_file(src_bytes)
    src = io.BytesIO(src_bytes) if seekable else Pipe(src_bytes)
    out = io.BytesIO()
    result = convert_to_v1(cast(BinaryIO, src), out)
    converted = out.getvalue()
    assert len(converted) == LEAF0_BYTES + len(data) == result.file_size
    assert converted[LEAF0_BYTES:] == data
    assert result.data_size == len(data) and not result.already_v1
    assert converted[:LEAF0_BYTES] == make_leaf0(result.header_json)
    assert result.header_json == src_bytes[8 : 8 + struct.unpack_from("<Q", src_bytes)[0]].rstrip()
    assert result.header == parse_header(result.header_json)
    assert result.header.metadata == {"format": "pt"}
    # An independent reader sees the same tensors and bytes.
    tree_in, data_in = read_file(src_bytes)
    tree_out, data_out = read_file(converted)
    assert tree_in == tree_out and data_in == data_out
    # Converting a v1 file copies it unchanged.
    again = io.BytesIO()
    second = convert_to_v1(io.BytesIO(converted), again)
    assert again.getvalue() == converted and second.already_v1
    assert second.header == result.header


def test_convert_large_data_streams_in_pieces() -> None:
    n = 3 * MiB + 5
    src_bytes = safetensors_file([("big", "U8", [n])])
    out = io.BytesIO()
    result = convert_to_v1(cast(BinaryIO, Pipe(src_bytes, step=300_000)), out)
    assert result.file_size == LEAF0_BYTES + n
    assert out.getvalue()[LEAF0_BYTES:] == read_file(src_bytes)[1]


def test_convert_starts_at_the_stream_position() -> None:
    src_bytes = safetensors_file(TENSORS)
    src = io.BytesIO(b"junk" + src_bytes)
    src.seek(4)
    out = io.BytesIO()
    assert convert_to_v1(src, out).data_size == len(read_file(src_bytes)[1])


@pytest.mark.parametrize("seekable", [True, False])
def test_convert_refuses_truncated_and_long_files(seekable: bool) -> None:
    good = safetensors_file(TENSORS)

    def run(data: bytes) -> io.BytesIO:
        out = io.BytesIO()
        src = io.BytesIO(data) if seekable else Pipe(data)
        convert_to_v1(cast(BinaryIO, src), out)
        return out

    for bad, error in [
        (good[:-1], TruncatedArtifact),
        (good[:20], TruncatedArtifact),  # ends inside the header
        (good + b"\x00", FileLengthMismatch),
        (good[:5], NotSafetensors),
        (b"", NotSafetensors),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", HeaderTooLarge),
        (struct.pack("<Q", 2) + b"[]", NotSafetensors),
        (struct.pack("<Q", 8) + b'{"a":1} ', MalformedHeader),
    ]:
        out = io.BytesIO()
        src = io.BytesIO(bad) if seekable else Pipe(bad)
        with pytest.raises(error):
            convert_to_v1(cast(BinaryIO, src), out)
        if seekable:  # checked before anything is written
            assert out.getvalue() == b""
    assert isinstance(TruncatedArtifact(), FileLengthMismatch)
    assert run(good).getvalue()


def test_convert_file_leaves_nothing_on_error(tmp_path: Path) -> None:
    good = safetensors_file(TENSORS)
    (tmp_path / "good.safetensors").write_bytes(good)
    (tmp_path / "bad.safetensors").write_bytes(good[:-3])
    result = convert_file_to_v1(tmp_path / "good.safetensors", tmp_path / "good.v1")
    assert (tmp_path / "good.v1").stat().st_size == result.file_size
    with pytest.raises(TruncatedArtifact):
        convert_file_to_v1(tmp_path / "bad.safetensors", tmp_path / "bad.v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.safetensors",
        "good.safetensors",
        "good.v1",
    ]


# --- registration proofs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "encrypted", "depth"),
    [
        (0, False, 0),
        (0, True, 0),
        (1000, False, 1),
        (1000, True, 1),
        (PLAIN_CHUNK_BYTES + 1, True, 1),
        (173 * MiB, False, 1),  # 174 leaves: one full node
    ],
)
def test_verify_registration(n: int, encrypted: bool, depth: int) -> None:
    header = u8_header(n)
    root, proof, blocks = proved(header, stored_data_size(n, encrypted))
    assert proof.header == header and len(proof.path) == depth
    got = verify_registration(root, proof, encrypted=encrypted)
    assert got.header == parse_header(header)
    assert got.data_size == n
    assert got.file_size == LEAF0_BYTES + stored_data_size(n, encrypted)
    assert got.leaf0_cid == bytes(raw_cid(make_leaf0(header)))
    assert got.leaf0_cid in blocks
    if depth == 0:
        assert root == got.leaf0_cid
    # The proof survives its wire encoding.
    assert ArtifactProof.decode(proof.encode()) == proof
    # The wrong encryption flag changes the file size the header implies.
    if n:
        with pytest.raises(FileSizeMismatch):
            verify_registration(root, proof, encrypted=not encrypted)


@pytest.fixture(scope="module")
def two_levels() -> tuple[bytes, ArtifactProof]:
    """A 175 MiB file (174 MiB of data): root -> full 174-leaf node -> leaf 0."""
    root, proof, _ = proved(u8_header(174 * MiB), 174 * MiB)
    return root, proof


def test_verify_registration_two_levels(two_levels: tuple[bytes, ArtifactProof]) -> None:
    root, proof = two_levels
    assert len(proof.path) == 2
    got = verify_registration(root, proof, encrypted=False)
    assert got.file_size == 175 * MiB
    with pytest.raises(PathMismatch, match="stops above leaf 0"):
        # Only the root: its first link is the next node, not leaf 0.
        verify_registration(root, ArtifactProof(proof.header, proof.path[:1]), encrypted=False)
    with pytest.raises(PathMismatch):
        verify_registration(root, ArtifactProof(proof.header, proof.path[1:]), encrypted=False)


def test_fake_two_level_tree_with_short_first_child() -> None:
    """A root of the right size and depth whose first child does not span 174 MiB."""
    header = u8_header(174 * MiB)
    leaf0 = raw_cid(make_leaf0(header))
    other = raw_cid(b"other")
    inner = encode_file_node([Link(leaf0, MiB), Link(other, MiB)], [MiB, MiB])
    rest = 175 * MiB - 2 * MiB
    root_node = encode_file_node(
        [Link(dag_pb_cid(inner), len(inner) + 2 * MiB), Link(other, rest)], [2 * MiB, rest]
    )
    proof = ArtifactProof(header, (root_node, inner))
    with pytest.raises(LayoutMismatch, match="first child"):
        verify_registration(bytes(dag_pb_cid(root_node)), proof, encrypted=False)


def test_unbalanced_tree_is_refused() -> None:
    """3 MiB under a two-level tree (balanced would be one node of three leaves)."""
    header = u8_header(2 * MiB)
    leaf0 = raw_cid(make_leaf0(header))
    leaf = raw_cid(bytes(MiB))
    inner = encode_file_node([Link(leaf0, MiB), Link(leaf, MiB)], [MiB, MiB])
    root_node = encode_file_node(
        [Link(dag_pb_cid(inner), len(inner) + 2 * MiB), Link(leaf, MiB)], [2 * MiB, MiB]
    )
    proof = ArtifactProof(header, (root_node, inner))
    with pytest.raises(LayoutMismatch, match="levels deep"):
        verify_registration(bytes(dag_pb_cid(root_node)), proof, encrypted=False)


def test_sizes_recorded_on_links_must_match() -> None:
    header = u8_header(MiB)
    leaf0 = raw_cid(make_leaf0(header))
    leaf = raw_cid(bytes(MiB))
    good = encode_file_node([Link(leaf0, MiB), Link(leaf, MiB)], [MiB, MiB])
    assert verify_registration(
        bytes(dag_pb_cid(good)), ArtifactProof(header, (good,)), encrypted=False
    )
    bad_tsize = encode_file_node([Link(leaf0, MiB + 1), Link(leaf, MiB)], [MiB, MiB])
    with pytest.raises(LayoutMismatch, match="leaf 0"):
        verify_registration(
            bytes(dag_pb_cid(bad_tsize)), ArtifactProof(header, (bad_tsize,)), encrypted=False
        )
    # Two-level with an inner node whose recorded Tsize is off by one.
    big = u8_header(174 * MiB)
    leaf0 = raw_cid(make_leaf0(big))
    inner = encode_file_node([Link(leaf0, MiB)] + [Link(leaf, MiB)] * 173, [MiB] * 174)
    tail = 175 * MiB - 174 * MiB
    for delta, error in [(0, None), (1, LayoutMismatch)]:
        root_node = encode_file_node(
            [Link(dag_pb_cid(inner), len(inner) + 174 * MiB + delta), Link(leaf, tail)],
            [174 * MiB, tail],
        )
        proof = ArtifactProof(big, (root_node, inner))
        if error is None:
            verify_registration(bytes(dag_pb_cid(root_node)), proof, encrypted=False)
        else:
            with pytest.raises(error, match="size its parent records"):
                verify_registration(bytes(dag_pb_cid(root_node)), proof, encrypted=False)


def test_registration_refuses_wrong_header() -> None:
    root, proof, _ = proved(u8_header(1000), 1000)
    for header in (u8_header(1000, name="y"), u8_header(1000) + b"\n"):
        with pytest.raises(HeaderMismatch):
            verify_registration(root, ArtifactProof(header, proof.path), encrypted=False)
    with pytest.raises(NotFormatV1):
        verify_registration(root, ArtifactProof(proof.header + b" ", proof.path), encrypted=False)
    with pytest.raises(MalformedHeader):
        verify_registration(root, ArtifactProof(b'{"x":1}', proof.path), encrypted=False)
    # A single-leaf file: the header must be that leaf.
    root0, _, _ = proved(u8_header(0), 0)
    with pytest.raises(HeaderMismatch):
        verify_registration(root0, ArtifactProof(u8_header(0, "y"), ()), encrypted=False)


def test_registration_refuses_truncated_or_padded_uploads() -> None:
    header = u8_header(2 * MiB)
    for stored in (MiB, 2 * MiB - 1, 2 * MiB + 1, 0):
        root, proof, _ = proved(header, stored)
        with pytest.raises(FileSizeMismatch):
            verify_registration(root, proof, encrypted=False)


def test_registration_refuses_bad_paths() -> None:
    root, proof, _ = proved(u8_header(1000), 1000)
    node = proof.path[0]
    flipped = node[:-1] + bytes([node[-1] ^ 1])
    with pytest.raises(PathMismatch, match="does not hash"):
        verify_registration(root, ArtifactProof(proof.header, (flipped,)), encrypted=False)
    with pytest.raises(PathMismatch, match="no path"):
        verify_registration(root, ArtifactProof(proof.header, ()), encrypted=False)
    with pytest.raises(PathMismatch, match="too long"):
        verify_registration(root, ArtifactProof(proof.header, (node, node)), encrypted=False)
    with pytest.raises(PathMismatch):
        verify_registration(root, ArtifactProof(proof.header, (node,) * 5), encrypted=False)
    with pytest.raises(PathMismatch):
        verify_registration(root, ArtifactProof(proof.header, (bytes(65 << 10),)), encrypted=False)
    root0, proof0, _ = proved(u8_header(0), 0)
    with pytest.raises(PathMismatch, match="raw leaf"):
        verify_registration(root0, ArtifactProof(proof0.header, (node,)), encrypted=False)


def test_registration_refuses_bad_root_cids() -> None:
    _, proof, _ = proved(u8_header(1000), 1000)
    with pytest.raises(DecodeError):
        verify_registration(b"\x01\x02", proof, encrypted=False)
    digest = multihash.digest(proof.path[0], "sha2-256")
    v0 = CID("base58btc", 0, "dag-pb", digest)
    with pytest.raises(PathMismatch, match="CIDv1"):
        verify_registration(bytes(v0), proof, encrypted=False)
    other = CID("base32", 1, "dag-cbor", digest)
    with pytest.raises(PathMismatch, match="neither raw nor dag-pb"):
        verify_registration(bytes(other), proof, encrypted=False)
    blake = CID("base32", 1, "dag-pb", multihash.digest(proof.path[0], "blake2b-256"))
    with pytest.raises(PathMismatch):
        verify_registration(bytes(blake), proof, encrypted=False)
    with pytest.raises(TypeError):
        verify_registration(str(v0), proof, encrypted=False)  # type: ignore[arg-type]


def test_proof_record_limits() -> None:
    with pytest.raises(EncodeError):
        ArtifactProof(b"{}", (b"x",) * 5).encode()
    raw = ArtifactProof(b"{}", (b"x",) * 4).encode()
    assert raw[5] == 0x94  # [header, [4 nodes]]
    forged = raw[:5] + b"\x95" + raw[6:] + b"\xc4\x01x"
    with pytest.raises(TooLarge):
        ArtifactProof.decode(forged)


def test_make_proof_errors() -> None:
    root, blocks = build([safetensors_file(TENSORS)])  # an ordinary file, not v1
    with pytest.raises(NotFormatV1):
        make_proof(blocks.__getitem__, root)
    root, _, blocks = proved(u8_header(1000), 1000)
    with pytest.raises(KeyError):
        make_proof({root: blocks[root]}.__getitem__, root)
    with pytest.raises(BlockMismatch):
        make_proof(lambda cid: blocks[cid] + b"x", root)


def test_error_classes() -> None:
    for proof_error in (HeaderMismatch, PathMismatch, FileSizeMismatch, LayoutMismatch):
        assert issubclass(proof_error, v1.ArtifactProofError) and issubclass(
            proof_error, ProofError
        )
    for dataset_error in (RowCountMismatch, BadTensorSelection, CompositeMismatch):
        assert issubclass(dataset_error, InvalidDataset)
    assert issubclass(BadRange, ValueError)
    codes = [
        c.code
        for c in vars(v1).values()
        if isinstance(c, type) and issubclass(c, NeuroSeedError) and c.__module__ == v1.__name__
    ]
    assert len(codes) == len(set(codes)) == 13
    assert all(1630 <= c <= 1649 for c in codes)


# --- datasets and ranges -------------------------------------------------------------------------


def header_of(tensors: Sequence[tuple[str, str, Sequence[int]]]) -> SafetensorsHeader:
    tree, _ = header_dict(tensors)
    return parse_header(json.dumps(tree).encode())


def test_dataset_rows() -> None:
    assert dataset_rows(header_of(TENSORS)) == 5
    assert dataset_rows(header_of([("a", "U8", [0, 3])])) == 0
    with pytest.raises(InvalidDataset, match="at least one"):
        dataset_rows(header_of([]))
    with pytest.raises(InvalidDataset, match="scalar"):
        dataset_rows(header_of([("a", "U8", [3]), ("s", "F32", [])]))
    with pytest.raises(RowCountMismatch):
        dataset_rows(header_of([("a", "U8", [3]), ("b", "U8", [4, 1])]))


def test_row_byte_ranges_example() -> None:
    h = header_of(TENSORS)  # embed F32 [5,3] at 0..60, ids I64 [5] at 60..100, mask at 100..110
    assert row_byte_ranges(h, 1, 3) == [
        TensorRange("embed", 12, 36),
        TensorRange("ids", 68, 84),
        TensorRange("mask", 102, 106),
    ]
    assert row_byte_ranges(h, 4, 5, ["mask", "embed"]) == [
        TensorRange("mask", 108, 110),
        TensorRange("embed", 48, 60),
    ]


@pytest.mark.parametrize(
    ("start", "end", "tensors", "error"),
    [
        (2, 2, None, BadRange),
        (3, 2, None, BadRange),
        (-1, 2, None, BadRange),
        (0, 6, None, BadRange),
        (0, 1, ["nope"], BadTensorSelection),
        (0, 1, ["ids", "ids"], BadTensorSelection),
        (0, 1, [], BadTensorSelection),
        (0, 1, "ids", BadTensorSelection),
    ],
)
def test_row_byte_ranges_refuses(
    start: int, end: int, tensors: Sequence[str] | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        row_byte_ranges(header_of(TENSORS), start, end, tensors)


def test_leaves_for_data_range_examples() -> None:
    assert leaves_for_data_range(0, 0, encrypted=False) == range(0)
    assert leaves_for_data_range(0, 1, encrypted=False) == range(1, 2)
    assert leaves_for_data_range(0, MiB, encrypted=False) == range(1, 2)
    assert leaves_for_data_range(MiB - 1, MiB + 1, encrypted=False) == range(1, 3)
    assert leaves_for_data_range(0, MiB, encrypted=True) == range(1, 3)
    assert leaves_for_data_range(PLAIN_CHUNK_BYTES, MiB, encrypted=True) == range(2, 3)
    for begin, end in [(-1, 2), (5, 4)]:
        with pytest.raises(BadRange):
            leaves_for_data_range(begin, end, encrypted=False)


def row_content(name: str, row: int, nbytes: int) -> bytes:
    return (hashlib.sha256(f"{name}:{row}".encode()).digest() * (nbytes // 32 + 1))[:nbytes]


@st.composite
def datasets(draw: st.DrawFn) -> tuple[list[tuple[str, str, list[int]]], int]:
    rows = draw(st.integers(1, 7))
    names = draw(st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=4, unique=True))
    specs = [
        (name, draw(st.sampled_from(sorted(SIZES))), [rows, *draw(st.lists(st.integers(0, 3), max_size=2))])
        for name in names
    ]  # fmt: skip
    return specs, rows


@given(data=st.data(), dataset=datasets())
def test_row_byte_ranges_match_a_brute_force_model(
    data: st.DataObject, dataset: tuple[list[tuple[str, str, list[int]]], int]
) -> None:
    specs, rows = dataset
    # The data blob, built row by row with distinct content per (tensor, row).
    per_row = {}
    blob = b""
    for name, dtype, shape in specs:
        nbytes = SIZES[dtype]
        for d in shape[1:]:
            nbytes *= d
        per_row[name] = nbytes
        blob += b"".join(row_content(name, r, nbytes) for r in range(rows))
    h = header_of(specs)
    assert h.data_size == len(blob)
    start = data.draw(st.integers(0, rows - 1))
    end = data.draw(st.integers(start + 1, rows))
    subset = data.draw(st.none() | st.permutations([s[0] for s in specs]).flatmap(
        lambda p: st.integers(1, len(p)).map(lambda k: p[:k])
    ))  # fmt: skip
    ranges = row_byte_ranges(h, start, end, subset)
    tree, _ = header_dict(specs)
    by_offset = sorted((tree[n]["data_offsets"], n) for n, _, _ in specs)  # type: ignore[index]
    names = [n for _, n in by_offset] if subset is None else list(subset)
    assert [r.name for r in ranges] == names
    for r in ranges:
        want = b"".join(row_content(r.name, k, per_row[r.name]) for k in range(start, end))
        assert blob[r.begin : r.end] == want


@given(
    begin=st.integers(0, 5 * MiB),
    length=st.integers(0, 3 * MiB),
    encrypted=st.booleans(),
)
def test_leaves_match_a_brute_force_model(begin: int, length: int, encrypted: bool) -> None:
    end = begin + length
    chunk = MiB - 16 if encrypted else MiB
    # Leaf i >= 1 holds data bytes [(i - 1) * chunk, i * chunk): keep those meeting [begin, end).
    model = [
        i for i in range(1, end // chunk + 3) if max(begin, (i - 1) * chunk) < min(end, i * chunk)
    ]
    assert list(leaves_for_data_range(begin, end, encrypted=encrypted)) == model


def test_leaves_cover_the_file_bytes() -> None:
    """Unencrypted: the leaves named for a data range hold exactly those file bytes."""
    data = bytes(range(256)) * (3 * MiB // 256) + b"tail"
    header = u8_header(len(data))
    file_bytes = make_leaf0(header) + data
    leaves = [file_bytes[i : i + MiB] for i in range(0, len(file_bytes), MiB)]
    for begin, end in [(0, 1), (5, MiB + 7), (MiB - 1, MiB), (2 * MiB, len(data))]:
        idx = leaves_for_data_range(begin, end, encrypted=False)
        covered = b"".join(leaves[i] for i in idx)
        offset = (idx[0] * MiB) - LEAF0_BYTES
        assert covered[begin - offset : end - offset] == data[begin:end]


# --- composite datasets --------------------------------------------------------------------------

A_SPECS = [("x", "F32", [4, 2]), ("y", "U8", [4])]
B_SPECS = [("y", "U8", [3]), ("w", "I64", [3]), ("x", "F32", [3, 2])]


def source(specs: list[tuple[str, str, list[int]]]) -> tuple[SafetensorsHeader, bytes]:
    raw = safetensors_file(specs)
    tree, data = read_file(raw)
    return parse_header(json.dumps(tree).encode()), data


def reader(datas: list[bytes], step: int = 3) -> Callable[[int, int, int], Iterator[bytes]]:
    def read_data(i: int, begin: int, end: int) -> Iterator[bytes]:
        for pos in range(begin, end, step):
            yield datas[i][pos : min(pos + step, end)]

    return read_data


def rows_of(header: SafetensorsHeader, data: bytes, name: str, start: int, end: int) -> bytes:
    t = header.by_name(name)
    rb = t.nbytes // t.shape[0]
    return data[t.begin + start * rb : t.begin + end * rb]


def test_composite_is_rows_concatenated_per_tensor() -> None:
    (ha, da), (hb, db) = source(A_SPECS), source(B_SPECS)
    parts = [CompositePart(ha, 1, 3), CompositePart(hb, 0, 3, ("y", "x"))]
    out = io.BytesIO()
    written = write_composite(out, parts, reader([da, db]), metadata={"kind": "composite"})
    raw = out.getvalue()
    assert written == len(raw)
    head = composite_header(parts, metadata={"kind": "composite"})
    assert raw[:LEAF0_BYTES] == make_leaf0(encode_header(head.tensors, head.metadata))
    tree, data = read_file(raw)
    assert len(raw) == LEAF0_BYTES + head.data_size
    assert tree == {
        "__metadata__": {"kind": "composite"},
        "x": {"dtype": "F32", "shape": [5, 2], "data_offsets": [0, 40]},
        "y": {"dtype": "U8", "shape": [5], "data_offsets": [40, 45]},
    }
    assert data[0:40] == rows_of(ha, da, "x", 1, 3) + rows_of(hb, db, "x", 0, 3)
    assert data[40:45] == rows_of(ha, da, "y", 1, 3) + rows_of(hb, db, "y", 0, 3)
    # The output is itself a v1 dataset, usable as a source (composites nest).
    converted = io.BytesIO()
    assert convert_to_v1(io.BytesIO(raw), converted).already_v1
    assert converted.getvalue() == raw
    assert dataset_rows(head) == 5
    assert composite_header([CompositePart(head, 0, 5)], metadata={"kind": "composite"}) == head


def test_composite_order_follows_the_first_part() -> None:
    (ha, _), (hb, _) = source(A_SPECS), source(B_SPECS)
    head = composite_header([CompositePart(hb, 0, 1, ("y", "x")), CompositePart(ha, 0, 4)])
    assert [(t.name, t.shape, t.begin, t.end) for t in head.tensors] == [
        ("y", (5,), 0, 5),
        ("x", (5, 2), 5, 45),
    ]


def test_composite_refuses_mismatched_parts() -> None:
    (ha, _), (hb, _) = source(A_SPECS), source(B_SPECS)
    hc, _ = source([("x", "I32", [2, 2]), ("y", "U8", [2])])
    hd, _ = source([("x", "F32", [2, 3]), ("y", "U8", [2])])
    cases: list[tuple[list[CompositePart], type[Exception]]] = [
        ([], CompositeMismatch),
        ([CompositePart(ha, 0, 4), CompositePart(hb, 0, 3)], CompositeMismatch),  # w extra
        ([CompositePart(ha, 0, 4), CompositePart(hb, 0, 3, ("x",))], CompositeMismatch),
        ([CompositePart(ha, 0, 4), CompositePart(hc, 0, 2)], CompositeMismatch),  # dtype
        ([CompositePart(ha, 0, 4), CompositePart(hd, 0, 2)], CompositeMismatch),  # per-row shape
        ([CompositePart(ha, 0, 5)], BadRange),
        ([CompositePart(ha, 0, 4, ("z",))], BadTensorSelection),
    ]
    for parts, error in cases:
        with pytest.raises(error):
            composite_header(parts)


def test_write_composite_checks_what_the_sources_give() -> None:
    (ha, da), (hb, db) = source(A_SPECS), source(B_SPECS)
    parts = [CompositePart(ha, 0, 2), CompositePart(hb, 0, 1, ("x", "y"))]

    def short(i: int, begin: int, end: int) -> Iterator[bytes]:
        yield [da, db][i][begin : end - 1]

    def long(i: int, begin: int, end: int) -> Iterator[bytes]:
        yield [da, db][i][begin:end] + b"!"

    with pytest.raises(TruncatedArtifact):
        write_composite(io.BytesIO(), parts, short)
    with pytest.raises(FileLengthMismatch):
        write_composite(io.BytesIO(), parts, long)


def test_composite_header_too_large() -> None:
    (ha, _) = source(A_SPECS)
    with pytest.raises(HeaderTooLarge):
        composite_header([CompositePart(ha, 0, 1)], metadata={"k": "v" * MAX_HEADER_BYTES})
    with pytest.raises(BadOffsets):
        encode_header([TensorInfo("a", "U8", (1,), 0, 2)], None)
