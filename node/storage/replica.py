"""Per-deal storage replicas, their segment Merkle tree, challenges and proofs (DESIGN §9).

A storage deal is a paid backup for an artifact's owner. The owner turns the artifact file into a
**replica** that only they can read back, commits to it with a Merkle root, and the provider
proves from time to time that it can still produce randomly chosen pieces of it.

Replica layout (all integers big-endian):

* The file is cut into **stripes** of ``STRIPE_DATA_BYTES`` = 2048 bytes (the last one padded
  with zeros; a zero-byte file still has one stripe, so every deal can be challenged). Each stripe
  is 8 data shares of 256 bytes, erasure-coded into 8 more parity shares with the systematic
  Reed–Solomon code of zfec's ``fec_new(8, 16)`` (GF(2^8), polynomial 0x11d): any 8 of the 16
  shares recover the stripe. The coded stripe is its 8 data shares then its 8 parity shares
  (4096 bytes); stripes follow each other in order. ``zfec`` is used when installed; otherwise a
  table-driven implementation of the same code (byte-identical, about half as fast) runs.
* The coded bytes are **masked**: XOR with the AES-256-CTR keystream of the per-deal key
  (:func:`deal_mask_key`), the counter block starting at 0 at replica offset 0. Masking comes
  *after* coding on purpose: parity is then not a function of the stored data shares, so a
  provider cannot keep only half the replica and recompute the rest on demand, and two deals of
  one file share no bytes (one stored copy cannot answer for two deals).
* A **segment** is ``SEGMENT_BYTES`` = 256 bytes of the replica (one share); a replica of
  ``replica_size`` bytes has ``replica_size // 256`` segments, always a multiple of 16.

Merkle tree over the segments (RFC 6962 domain separation, as ``node/merkle.py``):
leaf ``i`` = sha256(0x00 ‖ i as 8 bytes ‖ segment i); internal = sha256(0x01 ‖ left ‖ right).
The leaves are padded to the next power of two with ``PAD_LEAF`` (32 zero bytes: no known
preimage, so a padding position can never be proven), and a tree of ``n`` segments has depth
``tree_depth(n) = ceil(log2 n)``; a proof's path lists the ``depth`` siblings from the leaf up.
Verifying costs ``depth + 1`` sha256 (:func:`check_segment`), cheap enough for the chain.

Challenges: :func:`challenge_indexes` derives distinct segment indexes from a seed (the previous
block hash) and the deal id. The provider keeps the replica plus a compact tree
(:class:`ProofTree`: the nodes from groups of 64 segments upward, 1/256 of the replica) and
answers with :class:`SegmentProof` records, each reading at most 16 KiB of the replica.

What this proves: **timely retrievability of a unique replica**, not that it sits on a disk
(a provider may fetch it from elsewhere in time). The erasure code is per stripe: a provider that
drops nine shares of a single stripe makes that stripe unrecoverable while failing only a small
fraction of challenges; the deal's collateral, not the code, makes deleting unprofitable.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from node.encoding import Record, limit
from node.errors import ProofError, StorageError
from node.types import Hash32

try:  # optional accelerator; the table-driven code below is byte-identical
    import zfec as _zfec
except ImportError:  # pragma: no cover - depends on the environment
    _zfec = None

# --- parameters ----------------------------------------------------------------------------------

SEGMENT_BYTES: Final = 256
"""Bytes per segment: the unit of the Merkle tree, of challenges and of erasure-code shares."""
DATA_SHARES: Final = 8
"""Data shares per stripe (``k``)."""
TOTAL_SHARES: Final = 16
"""Shares per coded stripe (``m``): ×2 expansion, any ``DATA_SHARES`` of them recover it."""
STRIPE_DATA_BYTES: Final = DATA_SHARES * SEGMENT_BYTES
"""File bytes per stripe (2 KiB)."""
STRIPE_BYTES: Final = TOTAL_SHARES * SEGMENT_BYTES
"""Replica bytes per stripe (4 KiB)."""
GROUP_LOG: Final = 6
"""A proof tree stores nodes from level 6 (groups of 64 segments = 16 KiB) upward."""
MAX_PATH_HASHES: Final = 64
"""Longest Merkle path a ``SegmentProof`` may carry (a tree of up to 2**64 segments)."""
MAX_CHALLENGE_COUNT: Final = 1024
"""Most indexes one challenge may ask for; bounds the chain's cost of drawing them."""
MAX_ID_BYTES: Final = 255
"""Longest deal id, seed or deal nonce (length-prefixed with one byte where hashed)."""
MASK_KEY_BYTES: Final = 32
PAD_LEAF: Final = Hash32(bytes(32))
"""The leaf hash of a padding position (the tree is padded to a power of two)."""

MASK_KEY_DOMAIN: Final = b"neuroseed/replica-mask/v1\x00"
CHALLENGE_DOMAIN: Final = b"neuroseed/replica-challenge/v1\x00"

_CHUNK_STRIPES: Final = 256  # stripes coded per step: 512 KiB of file, 1 MiB of replica
_READ_BYTES: Final = _CHUNK_STRIPES * STRIPE_BYTES  # replica bytes read per step
_TREE_MAGIC: Final = b"nsrtree1"
_TREE_HEADER: Final = struct.Struct(">8sBB6xQ32s")  # magic, group log, depth, segments, root
_U64: Final = struct.Struct(">Q")

_sha256 = hashlib.sha256


# --- errors (codes 1660-1669) ----------------------------------------------------------------------


class ReplicaError(StorageError):
    """Base of the replica errors."""

    code = 1660
    reason = "replica error"


class InvalidReplicaInput(ReplicaError):
    """A size, key, id, seed or count outside what the replica format allows."""

    code = 1661
    reason = "invalid replica parameter"


class ReplicaSizeMismatch(ReplicaError):
    """A stream ended before the size it was declared to have."""

    code = 1662
    reason = "stream shorter than its declared size"


class ReplicaRootMismatch(ReplicaError):
    """The replica bytes do not hash to the root the deal commits to."""

    code = 1663
    reason = "replica does not match the deal's root"


class ReplicaUnrecoverable(ReplicaError):
    """Fewer than half of some stripe's shares are left."""

    code = 1664
    reason = "too many segments lost to recover the file"


class ReplicaNotFound(ReplicaError):
    code = 1665
    reason = "no replica stored for this deal"


class ReplicaExists(ReplicaError):
    code = 1666
    reason = "a replica is already stored for this deal"


class ReplicaCorrupt(ReplicaError):
    """Stored replica or tree files that no longer match their root."""

    code = 1667
    reason = "stored replica is corrupt"


class InvalidSegmentProof(ProofError):
    """A segment proof that does not prove its segment against the deal's root."""

    code = 1668
    reason = "invalid segment proof"


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentProof(Record):
    """One challenged segment of a replica with its Merkle path (leaf's sibling first)."""

    index: int
    segment: bytes = field(metadata=limit(SEGMENT_BYTES))
    path: tuple[Hash32, ...] = field(metadata=limit(MAX_PATH_HASHES))


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """What the owner puts into a deal after building a replica."""

    root: Hash32
    file_size: int
    replica_size: int
    segments: int


# --- sizes -----------------------------------------------------------------------------------------


def replica_size(file_size: int) -> int:
    """Bytes of the replica of a ``file_size``-byte file: 2× its stripes, at least one stripe."""
    if type(file_size) is not int or file_size < 0:
        raise InvalidReplicaInput(f"file size must be a non-negative int, got {file_size!r}")
    stripes = max(1, -(-file_size // STRIPE_DATA_BYTES))
    return stripes * STRIPE_BYTES


def segment_count(replica_bytes: int) -> int:
    """Segments of a replica of ``replica_bytes`` bytes (a positive multiple of 256)."""
    if type(replica_bytes) is not int or replica_bytes <= 0 or replica_bytes % SEGMENT_BYTES:
        raise InvalidReplicaInput(
            f"replica size must be a positive multiple of {SEGMENT_BYTES}, got {replica_bytes!r}"
        )
    return replica_bytes // SEGMENT_BYTES


def tree_depth(segments: int) -> int:
    """Depth of the segment tree (= Merkle path length): ``ceil(log2(segments))``."""
    if type(segments) is not int or not 1 <= segments <= 1 << MAX_PATH_HASHES:
        raise InvalidReplicaInput(f"segment count out of range: {segments!r}")
    return (segments - 1).bit_length()


def _level_count(segments: int, level: int) -> int:
    """Nodes at ``level`` that cover at least one real segment (the rest are padding)."""
    return -(-segments >> level)


@functools.cache
def _empty_hashes() -> tuple[bytes, ...]:
    """``empty[L]``: the hash of a subtree of height L made only of padding."""
    out = [bytes(PAD_LEAF)]
    for _ in range(MAX_PATH_HASHES):
        out.append(_sha256(b"\x01" + out[-1] + out[-1]).digest())
    return tuple(out)


# --- Reed–Solomon over GF(2^8): the code of zfec's fec_new(8, 16) -------------------------------


@functools.cache
def _gf_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """exp (doubled, 510 entries) and log tables of GF(2^8) with polynomial 0x11d, generator 2."""
    exp = [0] * 510
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= 0x11D
    for i in range(255, 510):
        exp[i] = exp[i - 255]
    return tuple(exp), tuple(log)


def _gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    exp, log = _gf_tables()
    return exp[log[a] + log[b]]


def _gf_inv(a: int) -> int:
    exp, log = _gf_tables()
    return exp[255 - log[a]]


def _gf_invert(matrix: list[list[int]]) -> list[list[int]]:
    """Gauss–Jordan inverse of a square matrix over GF(2^8) (the caller passes invertible ones)."""
    n = len(matrix)
    rows = [[*row, *(int(i == j) for j in range(n))] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col])
        rows[col], rows[pivot] = rows[pivot], rows[col]
        inv = _gf_inv(rows[col][col])
        rows[col] = [_gf_mul(inv, v) for v in rows[col]]
        for r in range(n):
            factor = rows[r][col]
            if r != col and factor:
                rows[r] = [v ^ _gf_mul(factor, w) for v, w in zip(rows[r], rows[col], strict=True)]
    return [row[n:] for row in rows]


@functools.cache
def _parity_matrix() -> tuple[tuple[int, ...], ...]:
    """Rows 8..15 of the systematic generator, built as zfec's ``fec_new`` builds it.

    zfec starts from the 16×8 matrix whose row 0 is (1, 0, …, 0) and whose row r ≥ 1 is
    (α^((r-1)·c))_c, and multiplies its bottom rows by the inverse of its top 8×8 block, so the
    top becomes the identity (data shares are stored as they are).
    """
    exp, _ = _gf_tables()
    k, m = DATA_SHARES, TOTAL_SHARES
    vdm = [[int(c == 0) for c in range(k)]]
    vdm += [[exp[(r * c) % 255] for c in range(k)] for r in range(m - 1)]
    top_inv = _gf_invert(vdm[:k])
    parity = []
    for row in vdm[k:]:
        out = []
        for j in range(k):
            acc = 0
            for t in range(k):
                acc ^= _gf_mul(row[t], top_inv[t][j])
            out.append(acc)
        parity.append(tuple(out))
    return tuple(parity)


@functools.cache
def _mul_table(c: int) -> bytes:
    """``bytes.translate`` table multiplying every byte by ``c``."""
    return bytes(_gf_mul(c, x) for x in range(256))


def _combine(rows: Iterable[int], shares: list[bytes]) -> bytes:
    """Σ rows[i]·shares[i] over GF(2^8), bytewise: one translate and one big-int XOR per share."""
    size = len(shares[0])
    acc = 0
    for coef, share in zip(rows, shares, strict=True):
        if coef == 1:
            acc ^= int.from_bytes(share, "big")
        elif coef:
            acc ^= int.from_bytes(share.translate(_mul_table(coef)), "big")
    return acc.to_bytes(size, "big")


def _python_parity(data: list[bytes]) -> list[bytes]:
    return [_combine(row, data) for row in _parity_matrix()]


@functools.cache
def _decode_matrix(rows: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Inverse of the generator rows ``rows``: maps those 8 shares back to the data shares."""
    parity = _parity_matrix()
    gen = [
        [int(r == c) for c in range(DATA_SHARES)] if r < DATA_SHARES else list(parity[r - 8])
        for r in rows
    ]
    return tuple(tuple(row) for row in _gf_invert(gen))


def _python_decode(shares: dict[int, bytes]) -> list[bytes]:
    rows = tuple(sorted(shares)[:DATA_SHARES])
    chosen = [shares[r] for r in rows]
    inverse = _decode_matrix(rows)
    return [shares[d] if d in shares else _combine(inverse[d], chosen) for d in range(DATA_SHARES)]


@functools.cache
def _zfec_codec() -> tuple[Any, Any]:
    assert _zfec is not None
    return _zfec.Encoder(DATA_SHARES, TOTAL_SHARES), _zfec.Decoder(DATA_SHARES, TOTAL_SHARES)


def _zfec_parity(data: list[bytes]) -> list[bytes]:
    encoder, _ = _zfec_codec()
    out: list[bytes] = encoder.encode(data, list(range(DATA_SHARES, TOTAL_SHARES)))
    return [bytes(b) for b in out]


def _zfec_decode(shares: dict[int, bytes]) -> list[bytes]:
    _, decoder = _zfec_codec()
    rows = sorted(shares)[:DATA_SHARES]
    out = decoder.decode([shares[r] for r in rows], rows)
    return [bytes(b) for b in out]


ERASURE_BACKEND: Final = "zfec" if _zfec is not None else "python"
"""Which implementation codes stripes here (both give the same bytes)."""
_parity: Callable[[list[bytes]], list[bytes]] = _zfec_parity if _zfec else _python_parity
_decode: Callable[[dict[int, bytes]], list[bytes]] = _zfec_decode if _zfec else _python_decode


def _code_stripes(data: bytes) -> bytes:
    """Erasure-code whole stripes (``len(data)`` a multiple of 2048) into coded stripes."""
    stripes = len(data) // STRIPE_DATA_BYTES
    seg = SEGMENT_BYTES
    # Share i of every stripe, side by side: one coding call per chunk instead of one per stripe
    # (the code is bytewise, so coding the concatenations codes each stripe).
    starts = range(0, stripes * STRIPE_DATA_BYTES, STRIPE_DATA_BYTES)
    shares = [
        b"".join([data[at + i * seg : at + (i + 1) * seg] for at in starts])
        for i in range(DATA_SHARES)
    ]
    parity = _parity(shares)
    parts: list[bytes] = []
    for s in range(stripes):
        parts.append(data[s * STRIPE_DATA_BYTES : (s + 1) * STRIPE_DATA_BYTES])
        parts.extend(p[s * seg : (s + 1) * seg] for p in parity)
    return b"".join(parts)


# --- masking -----------------------------------------------------------------------------------


def deal_mask_key(owner_secret: bytes, deal_nonce: bytes) -> bytes:
    """The 32-byte mask key of one deal: HMAC-SHA256(owner_secret, domain ‖ deal_nonce).

    ``owner_secret`` never leaves the owner (e.g. derived from their keystore); ``deal_nonce``
    must differ between deals (the deal id, or 32 random bytes recorded in the deal), so that two
    deals of the same file get unrelated replicas.
    """
    if not isinstance(owner_secret, bytes) or len(owner_secret) < 16:
        raise InvalidReplicaInput("owner secret must be at least 16 bytes")
    if not isinstance(deal_nonce, bytes) or not 1 <= len(deal_nonce) <= MAX_ID_BYTES:
        raise InvalidReplicaInput(f"deal nonce must be 1..{MAX_ID_BYTES} bytes")
    return hmac.digest(owner_secret, MASK_KEY_DOMAIN + deal_nonce, "sha256")


def _check_mask_key(mask_key: bytes) -> None:
    if not isinstance(mask_key, bytes) or len(mask_key) != MASK_KEY_BYTES:
        raise InvalidReplicaInput(f"mask key must be {MASK_KEY_BYTES} bytes")


def _keystream(mask_key: bytes) -> Any:
    """A streaming AES-256-CTR encryptor whose output at replica offset 0 is keystream byte 0."""
    return Cipher(algorithms.AES(mask_key), modes.CTR(bytes(16))).encryptor()


# --- Merkle tree -------------------------------------------------------------------------------


def _group_roots(chunk: bytes, first_index: int, height: int) -> list[bytes]:
    """Roots of the height-``height`` subtrees over the segments of ``chunk``.

    ``first_index`` is aligned to ``2**height``; a last, partial group is padded with
    ``PAD_LEAF`` (only the tree's last chunk has one).
    """
    sha = _sha256
    seg = SEGMENT_BYTES
    count = len(chunk) // seg
    level = [
        sha(
            b"\x00" + (first_index + i).to_bytes(8, "big") + chunk[i * seg : (i + 1) * seg]
        ).digest()
        for i in range(count)
    ]
    group = 1 << height
    if count % group:
        level.extend([bytes(PAD_LEAF)] * (group - count % group))
    for _ in range(height):
        level = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level


class _MerkleAccumulator:
    """Root of the padded segment tree from subtree roots pushed left to right; O(log n) memory.

    ``on_node(level, hash)`` sees every node at or above the pushed level, in order per level,
    except nodes made only of padding.
    """

    def __init__(self, segments: int, on_node: Callable[[int, bytes], None] | None = None) -> None:
        self._depth = tree_depth(segments)
        self._stack: list[tuple[int, bytes]] = []
        self._on_node = on_node

    def push(self, level: int, digest: bytes) -> None:
        on_node = self._on_node
        if on_node is not None:
            on_node(level, digest)
        stack = self._stack
        while stack and stack[-1][0] == level:
            _, left = stack.pop()
            digest = _sha256(b"\x01" + left + digest).digest()
            level += 1
            if on_node is not None:
                on_node(level, digest)
        stack.append((level, digest))

    def finish(self) -> Hash32:
        empty = _empty_hashes()
        stack = self._stack
        while not (len(stack) == 1 and stack[0][0] == self._depth):
            # The top subtree is the last one of its level: its right sibling is all padding.
            level, digest = stack.pop()
            self.push(level + 1, _sha256(b"\x01" + digest + empty[level]).digest())
        return Hash32(stack[0][1])


def _read_exact(src: BinaryIO, size: int, what: str) -> bytes:
    data = src.read(size)
    if data is None:
        raise ReplicaSizeMismatch(f"{what}: non-blocking stream returned no data")
    if len(data) < size:
        # Some streams return short reads before EOF; keep reading until EOF.
        parts = [bytes(data)]
        got = len(data)
        while got < size:
            more = src.read(size - got)
            if not more:
                raise ReplicaSizeMismatch(f"{what}: stream ended {size - got} bytes early")
            parts.append(bytes(more))
            got += len(more)
        return b"".join(parts)
    return bytes(data)


def merkle_root_of_file(f: BinaryIO, size: int) -> Hash32:
    """Root of the segment tree of the next ``size`` bytes of ``f`` (streamed, O(log n) memory)."""
    segments = segment_count(size)
    height = min(GROUP_LOG, tree_depth(segments))
    acc = _MerkleAccumulator(segments)
    for offset in range(0, size, _READ_BYTES):
        chunk = _read_exact(f, min(_READ_BYTES, size - offset), "replica")
        for digest in _group_roots(chunk, offset // SEGMENT_BYTES, height):
            acc.push(height, digest)
    return acc.finish()


def check_segment(root: bytes, segments: int, proof: SegmentProof) -> None:
    """Raise :class:`InvalidSegmentProof` unless ``proof`` proves its segment under ``root``.

    Pure and cheap (``depth + 1`` sha256): what the chain runs on a challenge answer.
    ``segments`` is the deal's segment count; ``root`` its committed replica root.
    """
    if not isinstance(root, bytes) or len(root) != 32:
        raise InvalidReplicaInput("root must be 32 bytes")
    depth = tree_depth(segments)
    index = proof.index
    if type(index) is not int or not 0 <= index < segments:
        raise InvalidSegmentProof(f"segment index {index!r} is outside 0..{segments - 1}")
    segment = proof.segment
    if not isinstance(segment, bytes) or len(segment) != SEGMENT_BYTES:
        raise InvalidSegmentProof(f"a segment has {SEGMENT_BYTES} bytes")
    path = proof.path
    if len(path) != depth:
        raise InvalidSegmentProof(f"path has {len(path)} hashes, the tree needs {depth}")
    sha = _sha256
    digest = sha(b"\x00" + index.to_bytes(8, "big") + segment).digest()
    for level, sibling in enumerate(path):
        if not isinstance(sibling, bytes) or len(sibling) != 32:
            raise InvalidSegmentProof("a path hash has 32 bytes")
        if (index >> level) & 1:
            digest = sha(b"\x01" + sibling + digest).digest()
        else:
            digest = sha(b"\x01" + digest + sibling).digest()
    if not hmac.compare_digest(digest, root):
        raise InvalidSegmentProof(f"segment {index} and its path do not lead to the root")


def verify_segment(root: bytes, segments: int, proof: SegmentProof) -> bool:
    """True iff ``proof`` is valid (see :func:`check_segment`); bad parameters still raise."""
    try:
        check_segment(root, segments, proof)
    except InvalidSegmentProof:
        return False
    return True


# --- challenges ----------------------------------------------------------------------------------


def challenge_indexes(seed: bytes, deal_id: bytes, segments: int, count: int) -> tuple[int, ...]:
    """The ``min(count, segments)`` distinct segment indexes a challenge asks for, sorted.

    A stream of 64-bit words: sha256(CHALLENGE_DOMAIN ‖ len(seed) ‖ seed ‖ len(deal_id) ‖ deal_id
    ‖ counter), counter = 0, 1, … as 8 bytes, each digest giving four words in order. A word
    ``w`` is rejected if ``w ≥ segments · floor(2**64 / segments)`` (no modulo bias), else it
    draws ``w mod segments``; repeats are skipped until enough distinct indexes are drawn.
    """
    if not isinstance(seed, bytes) or not 1 <= len(seed) <= MAX_ID_BYTES:
        raise InvalidReplicaInput(f"challenge seed must be 1..{MAX_ID_BYTES} bytes")
    if not isinstance(deal_id, bytes) or not 1 <= len(deal_id) <= MAX_ID_BYTES:
        raise InvalidReplicaInput(f"deal id must be 1..{MAX_ID_BYTES} bytes")
    tree_depth(segments)  # range check
    if type(count) is not int or not 0 <= count <= MAX_CHALLENGE_COUNT:
        raise InvalidReplicaInput(f"challenge count must be 0..{MAX_CHALLENGE_COUNT}")
    wanted = min(count, segments)
    if wanted == segments:
        return tuple(range(segments))
    prefix = CHALLENGE_DOMAIN + bytes((len(seed),)) + seed + bytes((len(deal_id),)) + deal_id
    bound = (1 << 64) - (1 << 64) % segments
    chosen: set[int] = set()
    counter = 0
    while len(chosen) < wanted:
        digest = _sha256(prefix + _U64.pack(counter)).digest()
        counter += 1
        for word_at in range(0, 32, 8):
            word = int.from_bytes(digest[word_at : word_at + 8], "big")
            if word < bound:
                chosen.add(word % segments)
                if len(chosen) == wanted:
                    break
    return tuple(sorted(chosen))


# --- owner side: build and recover ------------------------------------------------------------


def build_replica(src: BinaryIO, file_size: int, mask_key: bytes, dst: BinaryIO) -> ReplicaInfo:
    """Code, mask and write the replica of the next ``file_size`` bytes of ``src`` to ``dst``.

    Streams (1 MiB of replica at a time) and returns the root to commit in the deal. On
    :class:`ReplicaSizeMismatch` ``dst`` holds a partial replica: use :func:`build_replica_file`
    to get all-or-nothing on disk.
    """
    total = replica_size(file_size)
    _check_mask_key(mask_key)
    segments = segment_count(total)
    height = min(GROUP_LOG, tree_depth(segments))
    acc = _MerkleAccumulator(segments)
    mask = _keystream(mask_key)
    step = _CHUNK_STRIPES * STRIPE_DATA_BYTES
    stripes = total // STRIPE_BYTES
    for first_stripe in range(0, stripes, _CHUNK_STRIPES):
        offset = first_stripe * STRIPE_DATA_BYTES
        want = max(0, min(step, file_size - offset))
        data = _read_exact(src, want, "file") if want else b""
        n = min(_CHUNK_STRIPES, stripes - first_stripe)
        data += bytes(n * STRIPE_DATA_BYTES - len(data))
        masked = mask.update(_code_stripes(data))
        dst.write(masked)
        for digest in _group_roots(masked, first_stripe * TOTAL_SHARES, height):
            acc.push(height, digest)
    return ReplicaInfo(acc.finish(), file_size, total, segments)


def build_replica_file(src: BinaryIO, file_size: int, mask_key: bytes, path: Path) -> ReplicaInfo:
    """:func:`build_replica` into ``path``, all or nothing (temporary file, fsync, rename)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            info = build_replica(src, file_size, mask_key, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return info


async def build_replica_async(
    src: BinaryIO, file_size: int, mask_key: bytes, dst: BinaryIO
) -> ReplicaInfo:
    """:func:`build_replica` in a worker thread (coding and hashing stay off the trio loop)."""
    return await trio.to_thread.run_sync(build_replica, src, file_size, mask_key, dst)


def recover_file(
    replica: BinaryIO,
    mask_key: bytes,
    file_size: int,
    dst: BinaryIO,
    *,
    missing_segments: Iterable[int] = frozenset(),
) -> None:
    """Unmask and decode a replica back into the ``file_size``-byte file, written to ``dst``.

    ``replica`` yields the whole replica; the bytes at ``missing_segments`` are ignored (lost or
    failed to verify). Each stripe needs 8 of its 16 shares, else :class:`ReplicaUnrecoverable`,
    raised before anything is written. A replica stream that ends early raises
    :class:`ReplicaSizeMismatch` with the stripes before it already written.
    """
    total = replica_size(file_size)
    _check_mask_key(mask_key)
    segments = segment_count(total)
    lost: dict[int, set[int]] = {}
    for index in missing_segments:
        if type(index) is not int or not 0 <= index < segments:
            raise InvalidReplicaInput(f"missing segment {index!r} is outside 0..{segments - 1}")
        lost.setdefault(index // TOTAL_SHARES, set()).add(index % TOTAL_SHARES)
    for stripe, gone_shares in lost.items():
        if len(gone_shares) > TOTAL_SHARES - DATA_SHARES:
            raise ReplicaUnrecoverable(
                f"stripe {stripe} (segments {stripe * TOTAL_SHARES}..) lost {len(gone_shares)} of "
                f"{TOTAL_SHARES} shares; at most {TOTAL_SHARES - DATA_SHARES} may be missing"
            )
    mask = _keystream(mask_key)
    left = file_size
    for offset in range(0, total, _READ_BYTES):
        coded = mask.update(_read_exact(replica, min(_READ_BYTES, total - offset), "replica"))
        first_stripe = offset // STRIPE_BYTES
        parts: list[bytes] = []
        for s in range(len(coded) // STRIPE_BYTES):
            base = s * STRIPE_BYTES
            gone = lost.get(first_stripe + s)
            if gone is None or min(gone) >= DATA_SHARES:
                parts.append(coded[base : base + STRIPE_DATA_BYTES])
                continue
            shares = {
                i: coded[base + i * SEGMENT_BYTES : base + (i + 1) * SEGMENT_BYTES]
                for i in range(TOTAL_SHARES)
                if i not in gone
            }
            parts.extend(_decode(shares))
        data = b"".join(parts)
        if left < len(data):
            data = data[:left]
        left -= len(data)
        if data:
            dst.write(data)


# --- provider side: the proof tree and the replica store -------------------------------------


class _LevelWriter:
    """Writes tree nodes of levels ``group_log..depth`` to their places in the tree file."""

    _FLUSH = 64 << 10

    def __init__(self, out: BinaryIO, segments: int, group_log: int, depth: int) -> None:
        self._out = out
        self._group_log = group_log
        self._offsets = _level_offsets(segments, group_log, depth)
        self._buffers = {lvl: bytearray() for lvl in range(group_log, depth + 1)}
        self._written = dict.fromkeys(self._buffers, 0)

    def on_node(self, level: int, digest: bytes) -> None:
        if level < self._group_log:
            return
        buf = self._buffers[level]
        buf += digest
        if len(buf) >= self._FLUSH:
            self._flush(level)

    def _flush(self, level: int) -> None:
        buf = self._buffers[level]
        self._out.seek(self._offsets[level] + self._written[level])
        self._out.write(buf)
        self._written[level] += len(buf)
        buf.clear()

    def close(self) -> None:
        for level in self._buffers:
            self._flush(level)


def _level_offsets(segments: int, group_log: int, depth: int) -> dict[int, int]:
    """Byte offset of each stored level in the tree file (header first, then levels upward)."""
    offsets: dict[int, int] = {}
    at = _TREE_HEADER.size
    for level in range(group_log, depth + 1):
        offsets[level] = at
        at += 32 * _level_count(segments, level)
    offsets[depth + 1] = at  # end of file
    return offsets


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_replica_and_tree(
    src: BinaryIO, size: int, replica_out: BinaryIO | None, tree_out: BinaryIO
) -> Hash32:
    """Copy ``size`` replica bytes from ``src`` (to ``replica_out`` unless None) and write their
    proof tree to ``tree_out``; return the root."""
    segments = segment_count(size)
    depth = tree_depth(segments)
    height = min(GROUP_LOG, depth)
    levels = _LevelWriter(tree_out, segments, height, depth)
    acc = _MerkleAccumulator(segments, levels.on_node)
    for offset in range(0, size, _READ_BYTES):
        chunk = _read_exact(src, min(_READ_BYTES, size - offset), "replica")
        if replica_out is not None:
            replica_out.write(chunk)
        for digest in _group_roots(chunk, offset // SEGMENT_BYTES, height):
            acc.push(height, digest)
    root = acc.finish()
    levels.close()
    tree_out.seek(0)
    tree_out.write(_TREE_HEADER.pack(_TREE_MAGIC, height, depth, segments, root))
    return root


class ProofTree:
    """A stored replica and its compact tree; answers :meth:`prove` for any segment.

    The tree file holds a header (magic, group level, depth, segment count, root) and every node
    from level ``group_log`` (64 segments, or the whole tree if smaller) to the root, level by
    level, left to right, padding-only nodes left out: 1/256 of the replica. A proof recomputes
    the segment's group from ≤ 16 KiB of the replica and reads one node per level above it.
    Safe to use from several threads (positional reads only).
    """

    def __init__(self, replica_path: Path, tree_path: Path) -> None:
        """Open and check the two files; :class:`ReplicaCorrupt` if they do not fit together."""
        self._replica_fd = -1
        self._tree_fd = -1
        try:
            self._replica_fd = os.open(replica_path, os.O_RDONLY)
            self._tree_fd = os.open(tree_path, os.O_RDONLY)
            header = os.pread(self._tree_fd, _TREE_HEADER.size, 0)
            if len(header) != _TREE_HEADER.size:
                raise ReplicaCorrupt(f"{tree_path.name}: truncated header")
            magic, group_log, depth, segments, root = _TREE_HEADER.unpack(header)
            if magic != _TREE_MAGIC or not 1 <= segments <= 1 << MAX_PATH_HASHES:
                raise ReplicaCorrupt(f"{tree_path.name}: not a replica tree")
            if depth != tree_depth(segments) or group_log != min(GROUP_LOG, depth):
                raise ReplicaCorrupt(f"{tree_path.name}: inconsistent header")
            self._offsets = _level_offsets(segments, group_log, depth)
            if os.fstat(self._tree_fd).st_size != self._offsets[depth + 1]:
                raise ReplicaCorrupt(f"{tree_path.name}: wrong size for {segments} segments")
            if os.fstat(self._replica_fd).st_size != segments * SEGMENT_BYTES:
                raise ReplicaCorrupt(f"{replica_path.name}: wrong size for {segments} segments")
            if os.pread(self._tree_fd, 32, self._offsets[depth]) != root:
                raise ReplicaCorrupt(f"{tree_path.name}: top level is not the root")
        except FileNotFoundError as exc:
            self.close()
            raise ReplicaNotFound(f"missing replica file {Path(exc.filename).name}") from exc
        except BaseException:
            self.close()
            raise
        self.root: Final = Hash32(root)
        self.segments: Final[int] = segments
        self.depth: Final[int] = depth
        self.group_log: Final[int] = group_log

    @classmethod
    def build(cls, replica_path: Path, tree_path: Path) -> ProofTree:
        """Write the tree of an existing replica file to ``tree_path`` (atomically) and open it."""
        replica_path, tree_path = Path(replica_path), Path(tree_path)
        size = replica_path.stat().st_size
        fd, tmp_name = tempfile.mkstemp(prefix=f".{tree_path.name}.", dir=tree_path.parent)
        try:
            with os.fdopen(fd, "w+b") as tree_out, replica_path.open("rb") as src:
                _write_replica_and_tree(src, size, None, tree_out)
                tree_out.flush()
                os.fsync(tree_out.fileno())
            os.replace(tmp_name, tree_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return cls(replica_path, tree_path)

    @property
    def replica_size(self) -> int:
        return self.segments * SEGMENT_BYTES

    @property
    def tree_size(self) -> int:
        """Bytes of the tree file."""
        return self._offsets[self.depth + 1]

    def prove(self, index: int) -> SegmentProof:
        """The proof of segment ``index``; :class:`ReplicaCorrupt` if the stored data is damaged."""
        if type(index) is not int or not 0 <= index < self.segments:
            raise InvalidReplicaInput(f"segment index {index!r} is outside 0..{self.segments - 1}")
        seg = SEGMENT_BYTES
        group = 1 << self.group_log
        first = index & ~(group - 1)
        count = min(group, self.segments - first)
        data = os.pread(self._replica_fd, count * seg, first * seg)
        if len(data) != count * seg:
            raise ReplicaCorrupt(f"replica truncated at segment {first}")
        level = _group_leaves(data, first, group)
        pos = index - first
        path: list[Hash32] = []
        for _ in range(self.group_log):
            path.append(Hash32(level[pos ^ 1]))
            level = [
                _sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)
            ]
            pos >>= 1
        empty = _empty_hashes()
        for lvl in range(self.group_log, self.depth):
            sibling = (index >> lvl) ^ 1
            if sibling < _level_count(self.segments, lvl):
                node = os.pread(self._tree_fd, 32, self._offsets[lvl] + 32 * sibling)
                if len(node) != 32:
                    raise ReplicaCorrupt("tree file truncated")
                path.append(Hash32(node))
            else:
                path.append(Hash32(empty[lvl]))
        offset = (index - first) * seg
        proof = SegmentProof(index, data[offset : offset + seg], tuple(path))
        if not verify_segment(self.root, self.segments, proof):
            # Answering with it would fail on chain: say so now, while there is time to act.
            raise ReplicaCorrupt(f"segment {index} no longer matches the replica root")
        return proof

    def prove_many(self, indexes: Iterable[int]) -> tuple[SegmentProof, ...]:
        return tuple(self.prove(i) for i in indexes)

    def close(self) -> None:
        for name in ("_replica_fd", "_tree_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> ProofTree:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _group_leaves(data: bytes, first: int, group: int) -> list[bytes]:
    """Leaf hashes of the segments in ``data`` (from index ``first``), padded to ``group``."""
    seg = SEGMENT_BYTES
    count = len(data) // seg
    leaves = [
        _sha256(b"\x00" + (first + i).to_bytes(8, "big") + data[i * seg : (i + 1) * seg]).digest()
        for i in range(count)
    ]
    leaves.extend([bytes(PAD_LEAF)] * (group - count))
    return leaves


class ReplicaStore:
    """The provider's replicas, one directory per deal, written all-or-nothing.

    Layout: ``<root>/deals/<deal id hex>/{replica,tree}`` and ``<root>/tmp/`` for imports in
    progress (cleared on open: a crash leaves nothing half-imported in ``deals/``).
    Methods are safe from any thread; under trio use the ``*_async`` ones.
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._deals = self._root / "deals"
        self._tmp = self._root / "tmp"
        self._deals.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for leftover in self._tmp.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()

    def _dir(self, deal_id: bytes) -> Path:
        if not isinstance(deal_id, bytes) or not 1 <= len(deal_id) <= MAX_ID_BYTES:
            raise InvalidReplicaInput(f"deal id must be 1..{MAX_ID_BYTES} bytes")
        return self._deals / deal_id.hex()

    def has_replica(self, deal_id: bytes) -> bool:
        return self._dir(deal_id).is_dir()

    def deal_ids(self) -> list[bytes]:
        """The deals with a stored replica, sorted."""
        out = []
        for entry in self._deals.iterdir():
            with contextlib.suppress(ValueError):
                out.append(bytes.fromhex(entry.name))
        return sorted(out)

    def put_replica(self, deal_id: bytes, src: BinaryIO, size: int, root: bytes) -> ProofTree:
        """Store the ``size`` replica bytes read from ``src`` for ``deal_id`` if they hash to
        ``root`` (the provider's check before signing the deal), and open their proof tree.

        :class:`ReplicaRootMismatch`, :class:`ReplicaSizeMismatch` or any error leaves nothing.
        """
        target = self._dir(deal_id)
        segment_count(size)
        if size % STRIPE_BYTES:
            raise InvalidReplicaInput(f"a replica is whole stripes of {STRIPE_BYTES} bytes")
        if not isinstance(root, bytes) or len(root) != 32:
            raise InvalidReplicaInput("root must be 32 bytes")
        if target.exists():
            raise ReplicaExists(f"deal {deal_id.hex()} already has a replica")
        work = Path(tempfile.mkdtemp(prefix=deal_id.hex()[:16] + ".", dir=self._tmp))
        try:
            with (work / "replica").open("wb") as rep, (work / "tree").open("w+b") as tree:
                got = _write_replica_and_tree(src, size, rep, tree)
                if got != root:
                    raise ReplicaRootMismatch(
                        f"replica hashes to {got.hex()}, the deal says {root.hex()}"
                    )
                for f in (rep, tree):
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(work)
            with self._lock:
                if target.exists():
                    raise ReplicaExists(f"deal {deal_id.hex()} already has a replica")
                os.rename(work, target)
                _fsync_dir(self._deals)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return self.get_proof_tree(deal_id)

    def get_proof_tree(self, deal_id: bytes) -> ProofTree:
        """Open a deal's proof tree (the caller closes it)."""
        where = self._dir(deal_id)
        if not where.is_dir():
            raise ReplicaNotFound(f"no replica for deal {deal_id.hex()}")
        return ProofTree(where / "replica", where / "tree")

    def open_replica(self, deal_id: bytes) -> BinaryIO:
        """The stored replica bytes (to hand back to the owner)."""
        where = self._dir(deal_id)
        try:
            return (where / "replica").open("rb")
        except FileNotFoundError as exc:
            raise ReplicaNotFound(f"no replica for deal {deal_id.hex()}") from exc

    def remove_replica(self, deal_id: bytes) -> None:
        """Drop a deal's replica (at once from ``deals/``; open proof trees keep working)."""
        where = self._dir(deal_id)
        with self._lock:
            if not where.is_dir():
                raise ReplicaNotFound(f"no replica for deal {deal_id.hex()}")
            grave = Path(tempfile.mkdtemp(prefix="removed.", dir=self._tmp))
            os.rename(where, grave / "deal")
            _fsync_dir(self._deals)
        shutil.rmtree(grave, ignore_errors=True)

    def prove(self, deal_id: bytes, index: int) -> SegmentProof:
        with self.get_proof_tree(deal_id) as tree:
            return tree.prove(index)

    def answer_challenge(self, deal_id: bytes, seed: bytes, count: int) -> tuple[SegmentProof, ...]:
        """Proofs for the indexes :func:`challenge_indexes` draws for this deal and seed."""
        with self.get_proof_tree(deal_id) as tree:
            return tree.prove_many(challenge_indexes(seed, deal_id, tree.segments, count))

    async def put_replica_async(
        self, deal_id: bytes, src: BinaryIO, size: int, root: bytes
    ) -> None:
        """:meth:`put_replica` in a worker thread (hashing off the trio loop)."""

        def put_replica() -> None:
            self.put_replica(deal_id, src, size, root).close()

        await trio.to_thread.run_sync(put_replica)

    async def prove_async(self, deal_id: bytes, index: int) -> SegmentProof:
        return await trio.to_thread.run_sync(self.prove, deal_id, index)

    async def answer_challenge_async(
        self, deal_id: bytes, seed: bytes, count: int
    ) -> tuple[SegmentProof, ...]:
        return await trio.to_thread.run_sync(self.answer_challenge, deal_id, seed, count)
