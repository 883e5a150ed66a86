"""Artifact format v1: safetensors with the header as leaf 0 (DESIGN §8).

A v1 file is an ordinary safetensors file whose header is padded with spaces so the data starts
exactly at ``LEAF0_BYTES`` (1 MiB, one UnixFS chunk): leaf 0 is the 8-byte little-endian length
``LEAF0_BYTES - 8``, the header JSON and spaces, and it is always public. The rest of the file is
the tensor data or, for a priced artifact, its per-chunk AES-GCM ciphertext (``PLAIN_CHUNK_BYTES``
of plaintext plus a 16-byte tag per 1 MiB leaf; ``node/storage/encryption.py`` does the crypto).

This module is pure: the consensus state transition calls :func:`verify_registration`, which checks
a registration's header and dag-pb path against its root CID with no I/O. It also holds the
dataset rules (rows shared by every tensor), the row-range → byte-range → leaf mapping, and the
streaming writer of composite datasets.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from multiformats import CID

from node.encoding import Record, limit
from node.errors import ProofError, StorageError
from node.models.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    ArtifactFormatError,
    HeaderTooLarge,
    NotSafetensors,
    SafetensorsHeader,
    TensorInfo,
    encode_header,
    parse_header,
)
from node.storage.unixfs import (
    CHUNK_SIZE,
    DAG_PB_CODEC,
    MAX_LINKS,
    RAW_CODEC,
    SHA2_256,
    dag_pb_cid,
    decode_node,
    parse_cid,
    raw_cid,
    verify_block,
)

LEAF0_BYTES = CHUNK_SIZE
"""Leaf 0: length prefix + header + space padding; the data starts here."""
TAG_BYTES = 16
"""AES-GCM tag appended to each encrypted chunk."""
PLAIN_CHUNK_BYTES = CHUNK_SIZE - TAG_BYTES
"""Plaintext bytes per encrypted leaf, so ciphertext chunk i is exactly leaf i + 1."""
MAX_PATH_NODES = 4
"""Most dag-pb nodes on the path to leaf 0 (174**4 MiB: far beyond any artifact)."""
MAX_PATH_NODE_BYTES = 64 << 10
"""Largest dag-pb node accepted in a proof (a full 174-link node is about 8 KiB)."""
COPY_BYTES = 1 << 20

_LENGTH = struct.Struct("<Q")


# --- errors ------------------------------------------------------------------------------------


class FileLengthMismatch(ArtifactFormatError):
    """A file (or a stream of data) longer or shorter than its header says."""

    code = 1637
    reason = "the file length does not match its header"


class TruncatedArtifact(FileLengthMismatch):
    code = 1638
    reason = "the file is shorter than its header says"


class ArtifactProofError(ProofError):
    """A registration's header and path that do not prove leaf 0 of the root CID."""

    code = 1639
    reason = "invalid artifact registration proof"


class HeaderMismatch(ArtifactProofError):
    code = 1640
    reason = "the header does not match the root CID"


class PathMismatch(ArtifactProofError):
    code = 1641
    reason = "the proof path does not lead from the root CID to leaf 0"


class FileSizeMismatch(ArtifactProofError):
    code = 1642
    reason = "the file size under the root CID does not match the header"


class LayoutMismatch(ArtifactProofError):
    """Sizes or depth along the path that are not the balanced UnixFS layout of the file size."""

    code = 1643
    reason = "the DAG is not the balanced layout of its file size"


class InvalidDataset(ArtifactFormatError):
    code = 1644
    reason = "not a valid dataset"


class RowCountMismatch(InvalidDataset):
    code = 1645
    reason = "the tensors of a dataset must share their first dimension"


class BadRange(StorageError, ValueError):
    """A row or byte range that is empty, reversed, or beyond the data."""

    code = 1646
    reason = "invalid row or byte range"


class BadTensorSelection(InvalidDataset):
    code = 1647
    reason = "invalid tensor selection"


class CompositeMismatch(InvalidDataset):
    code = 1648
    reason = "the parts of a composite dataset do not fit together"


class NotFormatV1(ArtifactFormatError):
    code = 1649
    reason = "not an artifact format v1 leaf 0"


# --- sizes and leaf 0 --------------------------------------------------------------------------


def stored_data_size(data_size: int, encrypted: bool) -> int:
    """Bytes after leaf 0: the data, or its per-chunk ciphertext (16 more bytes per chunk)."""
    if data_size < 0:
        raise BadRange("a data size is not negative")
    if not encrypted:
        return data_size
    return data_size + TAG_BYTES * -(-data_size // PLAIN_CHUNK_BYTES)


def v1_file_size(data_size: int, encrypted: bool) -> int:
    """Size of the whole v1 file: leaf 0 plus the stored data."""
    return LEAF0_BYTES + stored_data_size(data_size, encrypted)


def make_leaf0(header_json: bytes) -> bytes:
    """Leaf 0 for an unpadded header: length ``LEAF0_BYTES - 8``, the header, then spaces.

    The header must be given without trailing spaces so that a leaf 0 has exactly one header.
    """
    header = bytes(header_json)
    if len(header) > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"a header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    if not header.startswith(b"{"):
        raise NotSafetensors("the header must be a JSON object starting with '{'")
    if header.endswith(b" "):
        raise NotFormatV1("give the header unpadded (without trailing spaces)")
    return _LENGTH.pack(MAX_HEADER_BYTES) + header + b" " * (MAX_HEADER_BYTES - len(header))


def split_leaf0(leaf0: bytes) -> bytes:
    """The unpadded header of a v1 leaf 0 (not parsed; see ``parse_header``)."""
    if len(leaf0) != LEAF0_BYTES:
        raise NotFormatV1(f"leaf 0 is {LEAF0_BYTES} bytes, not {len(leaf0)}")
    (n,) = _LENGTH.unpack_from(leaf0)
    if n != MAX_HEADER_BYTES:
        raise NotFormatV1(f"leaf 0 must declare a header of {MAX_HEADER_BYTES} bytes, not {n}")
    header = bytes(leaf0[_LENGTH.size :]).rstrip(b" ")
    if not header.startswith(b"{"):
        raise NotFormatV1("the header in leaf 0 must be a JSON object starting with '{'")
    return header


# --- conversion --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConvertResult:
    header: SafetensorsHeader
    header_json: bytes
    """Unpadded header, as a registration carries it."""
    data_size: int
    file_size: int
    already_v1: bool


def _read_exact(src: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left > 0:
        piece = src.read(min(left, COPY_BYTES))
        if not piece:
            break
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def convert_to_v1(src: BinaryIO, dst: BinaryIO) -> ConvertResult:
    """Stream a safetensors file from ``src`` into ``dst`` in format v1 (a v1 file is copied as is).

    The header and the file length are checked before anything is written when ``src`` is
    seekable; otherwise a length error can surface after part of the data was written, and the
    caller discards ``dst`` (:func:`convert_file_to_v1` does that with a temporary file).
    """
    start = src.tell() if src.seekable() else None
    prefix = _read_exact(src, _LENGTH.size)
    if len(prefix) != _LENGTH.size:
        raise NotSafetensors("the file is shorter than the 8-byte header length")
    (n,) = _LENGTH.unpack(prefix)
    if n > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"a header of {n} bytes exceeds {MAX_HEADER_BYTES}")
    raw = _read_exact(src, n)
    if len(raw) != n:
        raise TruncatedArtifact(f"the file ends inside its {n}-byte header")
    header_json = raw.rstrip(b" ")
    header = parse_header(header_json)
    data_size = header.data_size
    if start is not None:
        here = src.tell()
        total = src.seek(0, os.SEEK_END)
        src.seek(here)
        _check_length(total - here, data_size)
    dst.write(make_leaf0(header_json))
    left = data_size
    while left > 0:
        piece = src.read(min(left, COPY_BYTES))
        if not piece:
            _check_length(data_size - left, data_size)
        dst.write(piece)
        left -= len(piece)
    if src.read(1):
        raise FileLengthMismatch(f"the file has bytes after its {data_size} bytes of data")
    return ConvertResult(
        header, header_json, data_size, LEAF0_BYTES + data_size, n == MAX_HEADER_BYTES
    )


def _check_length(have: int, want: int) -> None:
    if have < want:
        raise TruncatedArtifact(f"the header implies {want} bytes of data, the file has {have}")
    if have > want:
        raise FileLengthMismatch(f"the header implies {want} bytes of data, the file has {have}")


def convert_file_to_v1(
    src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]
) -> ConvertResult:
    """:func:`convert_to_v1` between paths: written to a temporary file, fsynced, renamed; on
    any error nothing is left at ``dst_path``."""
    dst = Path(dst_path)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as out:
            result = convert_to_v1(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return result


# --- registration proof ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArtifactProof(Record):
    """What a registration carries to prove its header: the unpadded header and the dag-pb nodes
    from the root down to the node whose first link is leaf 0 (empty when the file is leaf 0)."""

    header: bytes = field(metadata=limit(MAX_HEADER_BYTES))
    path: tuple[bytes, ...] = field(metadata=limit(MAX_PATH_NODES))


@dataclass(frozen=True, slots=True)
class VerifiedArtifact:
    header: SafetensorsHeader
    file_size: int
    data_size: int
    leaf0_cid: bytes


def _parse_root(root_cid: bytes) -> CID:
    if type(root_cid) is not bytes:
        raise TypeError("a root CID is binary (bytes)")
    cid = parse_cid(root_cid)
    if bytes(cid) != root_cid:
        raise PathMismatch("the root is not a canonical binary CID")
    if cid.version != 1 or cid.hashfun.code != SHA2_256:
        raise PathMismatch("the root is not a CIDv1 with sha2-256")
    if cid.codec.code not in (RAW_CODEC, DAG_PB_CODEC):
        raise PathMismatch("the root is neither raw nor dag-pb")
    return cid


def tree_depth(file_size: int) -> int:
    """Levels of dag-pb nodes above the leaves in the balanced layout (0: a single raw leaf)."""
    leaves = -(-file_size // CHUNK_SIZE)
    depth = 0
    span = 1
    while leaves > span:
        span *= MAX_LINKS
        depth += 1
    return depth


def make_proof(get_block: Callable[[bytes], bytes], root_cid: bytes) -> ArtifactProof:
    """Build the registration proof of a stored v1 artifact by walking first links to leaf 0.

    ``get_block(cid)`` returns a block's bytes (and raises if it is missing); blocks are verified.
    """
    cid = _parse_root(root_cid)
    path: list[bytes] = []
    while cid.codec.code == DAG_PB_CODEC:
        if len(path) == MAX_PATH_NODES:
            raise LayoutMismatch(f"leaf 0 is deeper than {MAX_PATH_NODES} nodes")
        block = get_block(bytes(cid))
        verify_block(cid, block)
        path.append(block)
        cid = decode_node(block).links[0].cid
    leaf0 = get_block(bytes(cid))
    verify_block(cid, leaf0)
    return ArtifactProof(split_leaf0(leaf0), tuple(path))


def verify_registration(
    root_cid: bytes, proof: ArtifactProof, *, encrypted: bool
) -> VerifiedArtifact:
    """Check, with no I/O, that ``proof`` shows leaf 0 of the v1 file under ``root_cid``.

    Rebuilds leaf 0 from the header and follows the path: each node must hash to its parent's
    first link (the root CID for the first), the last node's first link must be leaf 0's raw
    CID, the root's UnixFS file size must be ``LEAF0_BYTES`` + the stored data size the header
    implies (so a truncated or padded upload fails), and depth, first blocksizes and Tsizes must be
    those of the balanced layout.
    """
    if len(proof.path) > MAX_PATH_NODES:
        raise PathMismatch(f"a path has at most {MAX_PATH_NODES} nodes")
    for node_bytes in proof.path:
        if len(node_bytes) > MAX_PATH_NODE_BYTES:
            raise PathMismatch(f"a path node exceeds {MAX_PATH_NODE_BYTES} bytes")
    header = parse_header(proof.header)
    leaf0_cid = raw_cid(make_leaf0(proof.header))
    file_size = v1_file_size(header.data_size, encrypted)
    root = _parse_root(root_cid)
    if not proof.path:
        if root.codec.code != RAW_CODEC:
            raise PathMismatch("the root is a dag-pb node but the proof has no path")
        if root != leaf0_cid:
            raise HeaderMismatch("leaf 0 rebuilt from the header is not the root")
        if file_size != LEAF0_BYTES:
            raise FileSizeMismatch(
                f"the file is leaf 0 alone but the header implies {file_size} bytes"
            )
        return VerifiedArtifact(header, file_size, header.data_size, bytes(leaf0_cid))
    if root.codec.code != DAG_PB_CODEC:
        raise PathMismatch("the root is a raw leaf: the path must be empty")
    depth = len(proof.path)
    expected = root
    parent_first: tuple[int, int] | None = None  # the parent's first (blocksize, Tsize)
    for i, node_bytes in enumerate(proof.path):
        if dag_pb_cid(node_bytes) != expected:
            raise PathMismatch(f"path node {i} does not hash to {expected}")
        node = decode_node(node_bytes)
        if i == 0 and node.filesize != file_size:
            raise FileSizeMismatch(
                f"the root holds {node.filesize} bytes; the header implies {file_size}"
            )
        if parent_first is not None:
            tsize = len(node_bytes) + sum(link.tsize for link in node.links)
            if parent_first != (node.filesize, tsize):
                raise LayoutMismatch(f"path node {i} does not have the size its parent records")
        first = node.links[0]
        want_codec = RAW_CODEC if i == depth - 1 else DAG_PB_CODEC
        if first.cid.codec.code != want_codec:
            raise PathMismatch(
                "the path stops above leaf 0" if want_codec == RAW_CODEC else "the path is too long"
            )
        parent_first = (node.blocksizes[0], first.tsize)
        expected = first.cid
    if expected != leaf0_cid:
        raise HeaderMismatch("leaf 0 rebuilt from the header is not the first leaf of the root")
    if depth != tree_depth(file_size):
        raise LayoutMismatch(f"a file of {file_size} bytes is not {depth} levels deep")
    for i, node_bytes in enumerate(proof.path):
        span = CHUNK_SIZE * MAX_LINKS ** (depth - 1 - i)
        if decode_node(node_bytes).blocksizes[0] != span:
            raise LayoutMismatch(f"the first child of path node {i} does not hold {span} bytes")
    if parent_first != (LEAF0_BYTES, LEAF0_BYTES):
        raise LayoutMismatch("the link to leaf 0 does not record its size")
    return VerifiedArtifact(header, file_size, header.data_size, bytes(leaf0_cid))


# --- datasets and ranges -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorRange:
    """Plaintext data bytes ``[begin, end)`` of one tensor, relative to the data start."""

    name: str
    begin: int
    end: int


def dataset_rows(header: SafetensorsHeader) -> int:
    """The row count of a dataset: every tensor has a first dimension, the same for all."""
    if not header.tensors:
        raise InvalidDataset("a dataset has at least one tensor")
    for t in header.tensors:
        if not t.shape:
            raise InvalidDataset(f"tensor {t.name!r} is a scalar: dataset tensors have rows")
    first = header.tensors[0]
    rows = first.shape[0]
    for t in header.tensors:
        if t.shape[0] != rows:
            raise RowCountMismatch(
                f"tensor {t.name!r} has {t.shape[0]} rows, {first.name!r} has {rows}"
            )
    return rows


def row_bytes(tensor: TensorInfo) -> int:
    """Bytes of one row of a dataset tensor: prod(shape[1:]) * dtype size."""
    n = DTYPE_SIZES[tensor.dtype]
    for d in tensor.shape[1:]:
        n *= d
    return n


def select_tensors(header: SafetensorsHeader, tensors: Sequence[str] | None) -> tuple[str, ...]:
    """The names a selection means: all tensors in offset order, or the given ones in order."""
    if tensors is None:
        return header.names
    if isinstance(tensors, str):
        raise BadTensorSelection("a tensor selection is a sequence of names, not one string")
    chosen = tuple(tensors)
    if not chosen:
        raise BadTensorSelection("a tensor selection names at least one tensor")
    if len(set(chosen)) != len(chosen):
        raise BadTensorSelection("a tensor selection names a tensor twice")
    known = set(header.names)
    for name in chosen:
        if name not in known:
            raise BadTensorSelection(f"the dataset has no tensor {name!r}")
    return chosen


def row_byte_ranges(
    header: SafetensorsHeader, start: int, end: int, tensors: Sequence[str] | None = None
) -> list[TensorRange]:
    """One plaintext data range per selected tensor for rows ``[start, end)``."""
    rows = dataset_rows(header)
    if not 0 <= start < end <= rows:
        raise BadRange(f"rows [{start}, {end}) are not a non-empty range within {rows} rows")
    out: list[TensorRange] = []
    for name in select_tensors(header, tensors):
        t = header.by_name(name)
        rb = row_bytes(t)
        out.append(TensorRange(name, t.begin + start * rb, t.begin + end * rb))
    return out


def leaves_for_data_range(begin: int, end: int, *, encrypted: bool) -> range:
    """UnixFS leaf indexes holding data bytes ``[begin, end)`` (leaf i >= 1 holds chunk i - 1)."""
    if begin < 0 or end < begin:
        raise BadRange(f"[{begin}, {end}) is not a byte range")
    if begin == end:
        return range(0)
    chunk = PLAIN_CHUNK_BYTES if encrypted else CHUNK_SIZE
    return range(begin // chunk + 1, (end - 1) // chunk + 2)


# --- composite datasets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompositePart:
    """Rows ``[start, end)`` of one source dataset, optionally a subset of its tensors."""

    header: SafetensorsHeader
    start: int
    end: int
    tensors: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class _Plan:
    header: SafetensorsHeader
    header_json: bytes
    names: tuple[str, ...]
    ranges: tuple[dict[str, TensorRange], ...]


def _plan(parts: Sequence[CompositePart], metadata: Mapping[str, str] | None) -> _Plan:
    if not parts:
        raise CompositeMismatch("a composite dataset has at least one part")
    names: tuple[str, ...] = ()
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges: list[dict[str, TensorRange]] = []
    rows = 0
    for i, part in enumerate(parts):
        selected = row_byte_ranges(part.header, part.start, part.end, part.tensors)
        if i == 0:
            names = tuple(r.name for r in selected)
            for name in names:
                t = part.header.by_name(name)
                layout[name] = (t.dtype, t.shape[1:])
        elif {r.name for r in selected} != set(names):
            raise CompositeMismatch(f"part {i} selects other tensors than part 0")
        for r in selected:
            t = part.header.by_name(r.name)
            if (t.dtype, t.shape[1:]) != layout[r.name]:
                raise CompositeMismatch(
                    f"part {i}: tensor {r.name!r} is {t.dtype} {list(t.shape[1:])} per row, "
                    f"part 0 has {layout[r.name][0]} {list(layout[r.name][1])}"
                )
        ranges.append({r.name: r for r in selected})
        rows += part.end - part.start
    tensors: list[TensorInfo] = []
    pos = 0
    for name in names:
        dtype, trailing = layout[name]
        size = sum(r[name].end - r[name].begin for r in ranges)
        tensors.append(TensorInfo(name, dtype, (rows, *trailing), pos, pos + size))
        pos += size
    header_json = encode_header(tensors, metadata)
    return _Plan(parse_header(header_json), header_json, names, tuple(ranges))


def composite_header(
    parts: Sequence[CompositePart], *, metadata: Mapping[str, str] | None = None
) -> SafetensorsHeader:
    """The header of a composite: the first part's selected tensors, each the rows of every part
    concatenated in part order; every part must select the same names with the same dtype and
    per-row shape."""
    return _plan(parts, metadata).header


def write_composite(
    out: BinaryIO,
    parts: Sequence[CompositePart],
    read_data: Callable[[int, int, int], Iterator[bytes]],
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream a composite dataset into ``out`` as a v1 file; returns the bytes written.

    ``read_data(part_index, begin, end)`` yields the plaintext bytes of that part's source data
    range; the output is written tensor by tensor, part by part, never held whole.
    """
    plan = _plan(parts, metadata)
    out.write(make_leaf0(plan.header_json))
    written = LEAF0_BYTES
    for name in plan.names:
        for i, ranges in enumerate(plan.ranges):
            r = ranges[name]
            want = r.end - r.begin
            got = 0
            for piece in read_data(i, r.begin, r.end):
                got += len(piece)
                if got > want:
                    raise FileLengthMismatch(f"part {i} gave more than {want} bytes of {name!r}")
                out.write(piece)
            if got != want:
                raise TruncatedArtifact(f"part {i} gave {got} of {want} bytes of {name!r}")
            written += got
    return written
