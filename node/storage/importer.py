"""Files in and out of the local blob store as UnixFS DAGs (DESIGN §7), streaming.

``import_file`` chunks a stream with :class:`~node.storage.unixfs.UnixfsBuilder` and stores each
block as soon as it is produced, so memory stays at about one leaf whatever the file size;
``export_file`` walks the DAG from the store and writes the file, or only a byte range of it
(fetching just the covering leaves); ``missing_blocks`` lists what a partial download still
lacks. The ``*_async`` wrappers run them in a worker thread: hashing and file I/O never block the
trio loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import trio

from node.errors import DecodeError
from node.storage.blobstore import BlobStore, BlockNotFound, QuotaExceeded
from node.storage.format_v1 import BadRange
from node.storage.unixfs import (
    CHUNK_SIZE,
    DAG_PB_CODEC,
    RAW_CODEC,
    Block,
    BlockMismatch,
    MalformedNode,
    UnixfsBuilder,
    children_for_range,
    decode_node,
    parse_cid,
    verify_block,
)

READ_BYTES = CHUNK_SIZE


@dataclass(frozen=True, slots=True)
class ImportResult:
    root: bytes
    """Binary CID of the file."""
    size: int
    blocks: int
    """Distinct blocks the file is made of."""


def verify_cid_block(cid: bytes, data: bytes) -> bool:
    """A :class:`BlobStore` verifier: True iff ``data`` is the raw/dag-pb block ``cid`` names."""
    try:
        verify_block(parse_cid(cid), data)
    except (BlockMismatch, DecodeError):
        return False
    return True


def import_file(
    store: BlobStore,
    src: BinaryIO,
    *,
    progress: Callable[[int], None] | None = None,
    pin: bool = True,
) -> ImportResult:
    """Chunk the rest of ``src`` into the store; pin the root with all its blocks if ``pin``.

    ``progress(bytes_read)`` is called after each piece. If the store's quota forced it to evict
    blocks of this very file before the pin, the pin is dropped and ``QuotaExceeded`` raised:
    the blocks left behind are unpinned cache, never a pinned half file.
    """
    builder = UnixfsBuilder()
    cids: dict[bytes, None] = {}  # insertion-ordered set

    def store_blocks(blocks: list[Block]) -> None:
        for block in blocks:
            cid = bytes(block.cid)
            store.put(cid, block.data)
            cids[cid] = None

    while piece := src.read(READ_BYTES):
        store_blocks(builder.feed(piece))
        if progress is not None:
            progress(builder.size)
    root_cid, rest = builder.finish_blocks()
    store_blocks(rest)
    root = bytes(root_cid)
    if pin:
        store.pin(root, cids)
        evicted = [cid for cid in cids if not store.has(cid)]
        if evicted:
            store.unpin(root)
            raise QuotaExceeded(
                f"the file does not fit in the blob quota: {len(evicted)} of its blocks were "
                "evicted while it was imported; unpin artifacts or raise the quota",
                data={"root": root.hex(), "evicted": len(evicted)},
            )
    return ImportResult(root, builder.size, len(cids))


def _get(store: BlobStore, cid: bytes) -> bytes:
    data = store.get(cid)
    if data is None:
        raise BlockNotFound(
            f"block {_show(cid)} is not in the local store", data={"cid": cid.hex()}
        )
    return data


def _show(cid: bytes) -> str:
    try:
        return str(parse_cid(cid))
    except DecodeError:
        return cid.hex()


def _codec(cid: bytes) -> int:
    code: int = parse_cid(cid).codec.code
    if code not in (RAW_CODEC, DAG_PB_CODEC):
        raise MalformedNode(f"{_show(cid)} is neither a raw leaf nor a dag-pb node")
    return code


def _leaves(
    store: BlobStore, cid: bytes, size: int | None, start: int, end: int
) -> Iterator[bytes]:
    """The bytes ``[start, end)`` (relative to this subtree) of the subtree under ``cid``.

    ``size`` is what the parent records for the subtree (None at the root).
    """
    data = _get(store, cid)
    if _codec(cid) == RAW_CODEC:
        if size is not None and len(data) != size:
            raise MalformedNode(f"leaf {_show(cid)} is {len(data)} bytes, its parent says {size}")
        yield data[start:end]
        return
    node = decode_node(data)
    if size is not None and node.filesize != size:
        raise MalformedNode(
            f"node {_show(cid)} holds {node.filesize} bytes, its parent says {size}"
        )
    for index, offset in children_for_range(node.blocksizes, start, end):
        child_size = node.blocksizes[index]
        lo = max(start - offset, 0)
        hi = min(end - offset, child_size)
        yield from _leaves(store, bytes(node.links[index].cid), child_size, lo, hi)


def file_size(store: BlobStore, root: bytes) -> int:
    """The size of the file under ``root`` (reads only the root block)."""
    data = _get(store, root)
    return len(data) if _codec(root) == RAW_CODEC else decode_node(data).filesize


def export_file(
    store: BlobStore, root: bytes, dst: BinaryIO, *, start: int = 0, end: int | None = None
) -> int:
    """Write bytes ``[start, end)`` of the file under ``root`` (default: all) into ``dst``.

    Reads only the blocks covering the range; raises ``BlockNotFound`` naming the first missing
    CID. Returns the bytes written.
    """
    size = file_size(store, root)
    stop = size if end is None else end
    if not 0 <= start <= stop <= size:
        raise BadRange(f"[{start}, {stop}) is not a byte range of a {size}-byte file")
    written = 0
    if start == stop:
        return 0
    for piece in _leaves(store, root, None, start, stop):
        dst.write(piece)
        written += len(piece)
    return written


def missing_blocks(store: BlobStore, root: bytes) -> list[bytes]:
    """CIDs of the file's blocks the store lacks, as far as the present nodes tell (a missing
    node hides its subtree: it is listed, its children are not). Empty means complete."""
    missing: list[bytes] = []
    seen: set[bytes] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        if _codec(cid) == RAW_CODEC:
            if not store.has(cid):
                missing.append(cid)
            continue
        data = store.get(cid)
        if data is None:
            missing.append(cid)
            continue
        stack.extend(bytes(link.cid) for link in reversed(decode_node(data).links))
    return missing


# --- async (trio) ------------------------------------------------------------------------------


async def import_file_async(
    store: BlobStore,
    src: BinaryIO,
    *,
    progress: Callable[[int], None] | None = None,
    pin: bool = True,
) -> ImportResult:
    """:func:`import_file` in a worker thread (``progress`` is called from that thread)."""
    return await trio.to_thread.run_sync(
        functools.partial(import_file, store, src, progress=progress, pin=pin)
    )


async def export_file_async(
    store: BlobStore, root: bytes, dst: BinaryIO, *, start: int = 0, end: int | None = None
) -> int:
    return await trio.to_thread.run_sync(
        functools.partial(export_file, store, root, dst, start=start, end=end)
    )


async def missing_blocks_async(store: BlobStore, root: bytes) -> list[bytes]:
    return await trio.to_thread.run_sync(missing_blocks, store, root)
