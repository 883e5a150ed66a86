"""IPFS-compatible UnixFS file layout for artifacts (DESIGN §7).

The root CID equals ``ipfs add --cid-version=1 --raw-leaves --chunker=size-1048576``:

- data is cut into 1 MiB leaves, each a raw block (CIDv1, codec raw 0x55, sha2-256);
- a file of one chunk or less (the empty file included) is its single raw leaf;
- otherwise a balanced tree of dag-pb (0x70) nodes with at most 174 links each, built like
  kubo's balanced builder: every level groups the nodes below it 174 at a time, and a level
  that would hold a single node is the root. Each node is a PBNode whose Links (field 2) are
  serialized before its Data (field 1); each PBLink has Hash, an empty Name and Tsize (the
  cumulative size of the encoded blocks of the linked subtree; a raw leaf's Tsize is its
  length). Data is a UnixFS ``Data{Type=File, filesize, blocksizes}`` message.

The module is pure: it reads only from a stream or chunks handed to it and returns blocks for
the caller to store. Memory is bounded: one pending leaf plus up to 174 pending links per level.
Hashing is CPU-bound; async callers use :func:`cid_of_file_async` (or ``asyncio.to_thread``) so
it runs off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from multiformats import CID, multibase, multicodec, multihash

from node.errors import DecodeError, StorageError

CHUNK_SIZE = 1 << 20
"""Leaf size: ``--chunker=size-1048576``."""
MAX_LINKS = 174
"""Most links per dag-pb node (kubo's balanced builder default)."""

RAW_CODEC = 0x55
DAG_PB_CODEC = 0x70
SHA2_256 = 0x12

UNIXFS_FILE = 2
"""UnixFS ``Data.DataType.File``."""

_MULTIHASH_PREFIX = bytes((SHA2_256, 32))
_READ_SIZE = CHUNK_SIZE


class BlockMismatch(StorageError):
    """Block bytes that do not hash to the CID they were fetched or stored under."""

    code = 1620
    reason = "block does not match its CID"


class MalformedNode(DecodeError):
    """A dag-pb / UnixFS block that is not the canonical encoding of a UnixFS file node."""

    code = 1621
    reason = "malformed UnixFS node"


@dataclass(frozen=True, slots=True)
class Link:
    """One PBLink of a file node: the child's CID and the Tsize of its subtree."""

    cid: CID
    tsize: int


@dataclass(frozen=True, slots=True)
class Block:
    """A block to store: its CID and its encoded bytes."""

    cid: CID
    data: bytes


@dataclass(frozen=True, slots=True)
class FileNode:
    """A decoded dag-pb UnixFS file node."""

    links: tuple[Link, ...]
    filesize: int
    blocksizes: tuple[int, ...]


# --- CIDs -----------------------------------------------------------------------------------


_CODECS = {RAW_CODEC: multicodec.get("raw"), DAG_PB_CODEC: multicodec.get("dag-pb")}
_BASE32 = multibase.get("base32")
_SHA2_256 = multihash.get("sha2-256")
_NEW_INSTANCE = getattr(CID, "_new_instance", None)


def make_cid(codec: int, data: bytes) -> CID:
    """The CIDv1 (sha2-256, base32) of ``data`` under ``codec`` (raw or dag-pb)."""
    resolved = _CODECS.get(codec)
    if resolved is None:
        raise ValueError(f"unsupported codec 0x{codec:x}")
    digest = _MULTIHASH_PREFIX + hashlib.sha256(data).digest()
    # ``CID(...)`` re-validates its base, codec and multihash by name on every call (about a
    # sixth of the time of hashing a 1 MiB leaf); the arguments here are pre-resolved and valid,
    # so build the (interned) instance directly when the library offers it.
    if _NEW_INSTANCE is not None:
        return _NEW_INSTANCE(CID, _BASE32, 1, resolved, _SHA2_256, digest)  # type: ignore[no-any-return]
    return CID("base32", 1, resolved, digest)


def raw_cid(data: bytes) -> CID:
    """The CID of a raw leaf."""
    return make_cid(RAW_CODEC, data)


def dag_pb_cid(data: bytes) -> CID:
    """The CID of an encoded dag-pb node."""
    return make_cid(DAG_PB_CODEC, data)


def parse_cid(value: str | bytes) -> CID:
    """A CID from its string or binary form; raises :class:`DecodeError` if it is not one."""
    try:
        return CID.decode(value).set(base="base32")
    except Exception as exc:  # multiformats raises several unrelated types
        raise DecodeError(f"invalid CID: {exc}") from exc


def verify_block(cid: CID, data: bytes) -> None:
    """Raise :class:`BlockMismatch` unless ``data`` is the block that ``cid`` names."""
    if cid.version != 1 or cid.hashfun.code != SHA2_256:
        raise BlockMismatch(f"unsupported CID {cid}")
    if cid.codec.code not in (RAW_CODEC, DAG_PB_CODEC):
        raise BlockMismatch(f"unsupported codec in CID {cid}")
    if hashlib.sha256(data).digest() != cid.raw_digest:
        raise BlockMismatch(f"block does not hash to {cid}", data={"cid": str(cid)})


# --- protobuf -------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative varint")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_unixfs_file_data(filesize: int, blocksizes: Iterable[int]) -> bytes:
    """UnixFS ``Data{Type=File, filesize, blocksizes}`` (no Data bytes, blocksizes unpacked)."""
    out = bytearray(_key(1, 0) + _varint(UNIXFS_FILE))
    out += _key(3, 0) + _varint(filesize)
    for size in blocksizes:
        out += _key(4, 0) + _varint(size)
    return bytes(out)


def encode_pblink(link: Link) -> bytes:
    """PBLink{Hash, Name="", Tsize} in field order."""
    return _len_field(1, bytes(link.cid)) + _len_field(2, b"") + _key(3, 0) + _varint(link.tsize)


def encode_file_node(links: Iterable[Link], blocksizes: Iterable[int]) -> bytes:
    """A dag-pb PBNode for a UnixFS file node: every Link, then Data."""
    sizes = list(blocksizes)
    out = bytearray()
    for link in links:
        out += _len_field(2, encode_pblink(link))
    out += _len_field(1, encode_unixfs_file_data(sum(sizes), sizes))
    return bytes(out)


class _Reader:
    """A strict protobuf reader: minimal varints, bounded lengths."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.buf)

    def varint(self) -> int:
        result = 0
        shift = 0
        start = self.pos
        while True:
            if self.pos >= len(self.buf):
                raise MalformedNode("truncated varint")
            byte = self.buf[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise MalformedNode("varint too long")
        if self.pos - start > 1 and self.buf[self.pos - 1] == 0:
            raise MalformedNode("non-minimal varint")
        if result >= 1 << 64:
            raise MalformedNode("varint overflows uint64")
        return result

    def key(self) -> tuple[int, int]:
        k = self.varint()
        return k >> 3, k & 7

    def peek_key(self) -> tuple[int, int]:
        pos = self.pos
        try:
            return self.key()
        finally:
            self.pos = pos

    def length_delimited(self) -> bytes:
        n = self.varint()
        end = self.pos + n
        if end > len(self.buf):
            raise MalformedNode("truncated field")
        out = self.buf[self.pos : end]
        self.pos = end
        return out


def _decode_link(buf: bytes) -> Link:
    r = _Reader(buf)
    if r.done() or r.key() != (1, 2):
        raise MalformedNode("PBLink must start with Hash")
    raw = r.length_delimited()
    try:
        cid = CID.decode(raw).set(base="base32")
    except Exception as exc:
        raise MalformedNode(f"PBLink Hash is not a CID: {exc}") from exc
    if bytes(cid) != raw:
        raise MalformedNode("PBLink Hash is not a canonical binary CID")
    if r.done() or r.key() != (2, 2) or r.length_delimited() != b"":
        raise MalformedNode("PBLink must carry an empty Name")
    if r.done() or r.key() != (3, 0):
        raise MalformedNode("PBLink must carry a Tsize")
    tsize = r.varint()
    if not r.done():
        raise MalformedNode("unexpected field in PBLink")
    return Link(cid, tsize)


def _decode_unixfs_file(buf: bytes) -> tuple[int, tuple[int, ...]]:
    r = _Reader(buf)
    if r.done() or r.key() != (1, 0) or r.varint() != UNIXFS_FILE:
        raise MalformedNode("UnixFS Data must be Type=File")
    if r.done() or r.key() != (3, 0):
        raise MalformedNode("UnixFS file node must carry filesize")
    filesize = r.varint()
    sizes: list[int] = []
    while not r.done():
        if r.key() != (4, 0):
            raise MalformedNode("unexpected field in UnixFS Data")
        sizes.append(r.varint())
    return filesize, tuple(sizes)


def decode_node(block: bytes) -> FileNode:
    """Strictly parse a dag-pb UnixFS file node as :func:`encode_file_node` writes it.

    Raises :class:`MalformedNode` on anything else: other field orders, unknown fields,
    non-minimal varints, a node with no links, or blocksizes that disagree with the links or
    the filesize.
    """
    r = _Reader(block)
    links: list[Link] = []
    while not r.done() and r.peek_key() == (2, 2):
        r.key()
        links.append(_decode_link(r.length_delimited()))
    if r.done() or r.key() != (1, 2):
        raise MalformedNode("PBNode must carry Data after its Links")
    filesize, sizes = _decode_unixfs_file(r.length_delimited())
    if not r.done():
        raise MalformedNode("unexpected field after PBNode Data")
    if not links:
        raise MalformedNode("file node without links")
    if len(links) > MAX_LINKS:
        raise MalformedNode("too many links")
    if len(sizes) != len(links):
        raise MalformedNode("blocksizes do not match links")
    if sum(sizes) != filesize:
        raise MalformedNode("filesize is not the sum of blocksizes")
    for link in links:
        if link.cid.version != 1 or link.cid.hashfun.code != SHA2_256:
            raise MalformedNode("link CID is not CIDv1 sha2-256")
        if link.cid.codec.code not in (RAW_CODEC, DAG_PB_CODEC):
            raise MalformedNode("link CID is neither raw nor dag-pb")
    return FileNode(tuple(links), filesize, sizes)


# --- ranges ---------------------------------------------------------------------------------


def leaf_range(start: int, end: int, chunk_size: int = CHUNK_SIZE) -> range:
    """Indices of the leaves (in file order) that hold bytes ``[start, end)``."""
    if start < 0 or end < start:
        raise ValueError("invalid byte range")
    if end == start:
        return range(0)
    return range(start // chunk_size, (end - 1) // chunk_size + 1)


def children_for_range(blocksizes: Iterable[int], start: int, end: int) -> list[tuple[int, int]]:
    """``(child index, child's first byte offset)`` of the children that overlap
    ``[start, end)``, given a node's blocksizes and offsets relative to that node."""
    if start < 0 or end < start:
        raise ValueError("invalid byte range")
    out: list[tuple[int, int]] = []
    if end == start:
        return out
    offset = 0
    for i, size in enumerate(blocksizes):
        if offset >= end:
            break
        if offset + size > start and size > 0:
            out.append((i, offset))
        offset += size
    return out


# --- builder --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pending:
    link: Link
    filesize: int


class UnixfsBuilder:
    """Streaming balanced-layout builder.

    ``feed(piece)`` takes data of any size and returns the blocks completed so far (leaves and
    any full nodes), in an order where each node follows its children; ``finish_blocks()``
    returns the root CID and the remaining blocks; ``finish()`` returns just the root CID.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._levels: list[list[_Pending]] = [[]]
        self._leaves = 0
        self._size = 0
        self._root: CID | None = None

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def feed(self, piece: bytes | bytearray | memoryview) -> list[Block]:
        if self._root is not None:
            raise RuntimeError("builder already finished")
        out: list[Block] = []
        if type(piece) is bytes and len(piece) == CHUNK_SIZE and not self._buf:
            # The common case of a file read 1 MiB at a time: the piece is the leaf, no copy.
            self._size += CHUNK_SIZE
            self._add_leaf(piece, out)
            return out
        view = memoryview(piece).cast("B")
        self._size += len(view)
        if not self._buf and len(view) >= CHUNK_SIZE:
            pos = 0
            while len(view) - pos >= CHUNK_SIZE:
                self._add_leaf(bytes(view[pos : pos + CHUNK_SIZE]), out)
                pos += CHUNK_SIZE
            self._buf += view[pos:]
            return out
        self._buf += view
        while len(self._buf) >= CHUNK_SIZE:
            leaf = bytes(self._buf[:CHUNK_SIZE])
            del self._buf[:CHUNK_SIZE]
            self._add_leaf(leaf, out)
        return out

    def _add_leaf(self, leaf: bytes, out: list[Block]) -> None:
        cid = raw_cid(leaf)
        out.append(Block(cid, leaf))
        self._leaves += 1
        self._push(0, _Pending(Link(cid, len(leaf)), len(leaf)), out)

    def _push(self, level: int, item: _Pending, out: list[Block]) -> None:
        while True:
            if level == len(self._levels):
                self._levels.append([])
            pending = self._levels[level]
            pending.append(item)
            if len(pending) < MAX_LINKS:
                return
            # A full group is final whatever follows: emit its node now.
            item = self._make_node(pending, out)
            pending.clear()
            level += 1

    @staticmethod
    def _make_node(children: list[_Pending], out: list[Block]) -> _Pending:
        sizes = [c.filesize for c in children]
        data = encode_file_node((c.link for c in children), sizes)
        cid = dag_pb_cid(data)
        out.append(Block(cid, data))
        tsize = len(data) + sum(c.link.tsize for c in children)
        return _Pending(Link(cid, tsize), sum(sizes))

    def finish_blocks(self) -> tuple[CID, list[Block]]:
        if self._root is not None:
            raise RuntimeError("builder already finished")
        out: list[Block] = []
        if self._buf or self._leaves == 0:
            self._add_leaf(bytes(self._buf), out)
            self._buf.clear()
        level = 0
        while True:
            pending = self._levels[level]
            higher = any(self._levels[level + 1 :])
            if not higher and len(pending) == 1:
                self._root = pending[0].link.cid
                return self._root, out
            if pending:
                node = self._make_node(pending, out)
                pending.clear()
                if level + 1 == len(self._levels):
                    self._levels.append([])
                self._levels[level + 1].append(node)
            level += 1

    def finish(self) -> CID:
        """The root CID (blocks produced by finishing are discarded; see finish_blocks)."""
        return self.finish_blocks()[0]


def build_chunks(chunks: Iterable[bytes]) -> tuple[CID, list[Block]]:
    """Root CID and every block of the file made of ``chunks`` (holds all blocks: small files)."""
    b = UnixfsBuilder()
    blocks: list[Block] = []
    for c in chunks:
        blocks.extend(b.feed(c))
    root, rest = b.finish_blocks()
    blocks.extend(rest)
    return root, blocks


def cid_of_chunks(chunks: Iterable[bytes]) -> CID:
    """Root CID of the file made of ``chunks``, streaming (no block is kept)."""
    b = UnixfsBuilder()
    for c in chunks:
        b.feed(c)
    return b.finish()


def cid_of_file(stream: BinaryIO, read_size: int = _READ_SIZE) -> CID:
    """Root CID of the rest of a binary stream, read ``read_size`` bytes at a time."""
    b = UnixfsBuilder()
    while piece := stream.read(read_size):
        b.feed(piece)
    return b.finish()


async def cid_of_file_async(stream: BinaryIO, read_size: int = _READ_SIZE) -> CID:
    """:func:`cid_of_file` in a worker thread, off the event loop."""
    return await asyncio.to_thread(cid_of_file, stream, read_size)
