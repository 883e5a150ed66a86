"""Block parts: a proposed block travels as a header plus parts ≤ 256 KiB (DESIGN §6).

``make_part_set(block_bytes, height=, round=)`` cuts the encoded block into parts of
``MAX_PART_BYTES`` (the last one shorter) and returns the ``PartSetHeader`` (count and Merkle root
over the parts, ``node.merkle``: leaf = sha256(0x00 ‖ data)) with every part and its proof.
Proofs are built from the leaf hashes once (each part is hashed once), not per part.

``PartSetAssembler`` collects parts of one part set in any order: each part's proof is checked
against the header's root before it is kept; duplicates, indices out of range, parts of another
part set, bad proofs and a total above ``max_bytes`` raise typed errors (``DuplicatePart`` is not
a peer fault — gossip duplicates; the others are). ``missing()`` lists what to pull with
``GetParts``; ``block_bytes()`` returns the block once complete. The caller still decodes the
block and checks its hash against the proposal's header: the part set header is not signed.
"""

from __future__ import annotations

from node.errors import ProofError
from node.merkle import leaf_hash, node_hash, verify_merkle_proof
from node.p2p.api import P2PError
from node.p2p.messages import MAX_BLOCK_PARTS, MAX_PART_BYTES, BlockPart, PartSetHeader
from node.types import Hash32, Height, Round

MAX_BLOCK_BYTES = MAX_BLOCK_PARTS * MAX_PART_BYTES


class PartSetError(P2PError):
    code = 2120
    reason = "block part error"


class DuplicatePart(PartSetError):
    """A part already held (gossip duplicates are normal: ignore, do not penalize)."""

    code = 2121
    reason = "duplicate block part"


class InvalidPart(PartSetError):
    """A part no honest peer sends for this part set: penalize the sender."""

    code = 2122
    reason = "invalid block part"


class PartIndexOutOfRange(InvalidPart):
    code = 2123
    reason = "block part index out of range"


class BadPartProof(InvalidPart):
    code = 2124
    reason = "block part proof does not lead to the part set root"


class WrongPartSet(InvalidPart):
    """The part names another (height, round, root): route it elsewhere or ignore it."""

    code = 2125
    reason = "block part of another part set"


class PartSetTooLarge(InvalidPart):
    code = 2126
    reason = "part set exceeds the block size limit"


class IncompletePartSet(PartSetError):
    code = 2127
    reason = "part set is not complete"


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _proofs(leaves: list[Hash32]) -> tuple[Hash32, list[list[Hash32]]]:
    """The root over ``leaves`` and, for each leaf, its audit path in ``node.merkle``'s order
    (the leaf's sibling first, the root's other child last)."""
    paths: list[list[Hash32]] = [[] for _ in leaves]

    def build(lo: int, hi: int) -> Hash32:
        if hi - lo == 1:
            return leaves[lo]
        mid = lo + _split(hi - lo)
        left = build(lo, mid)
        right = build(mid, hi)
        for i in range(lo, mid):
            paths[i].append(right)
        for i in range(mid, hi):
            paths[i].append(left)
        return node_hash(left, right)

    return build(0, len(leaves)), paths


def make_part_set(
    block_bytes: bytes,
    *,
    height: int,
    round: int,
    part_size: int = MAX_PART_BYTES,
) -> tuple[PartSetHeader, list[BlockPart]]:
    """Cut ``block_bytes`` into parts of ``part_size`` with proofs against their Merkle root."""
    if not block_bytes:
        raise ValueError("a block is never empty")
    if not 0 < part_size <= MAX_PART_BYTES:
        raise ValueError(f"part size must be in 1..{MAX_PART_BYTES}")
    chunks = [block_bytes[i : i + part_size] for i in range(0, len(block_bytes), part_size)]
    if len(chunks) > MAX_BLOCK_PARTS:
        raise PartSetTooLarge(f"{len(chunks)} parts exceed {MAX_BLOCK_PARTS}")
    root, paths = _proofs([leaf_hash(c) for c in chunks])
    header = PartSetHeader(len(chunks), root)
    parts = [
        BlockPart(Height(height), Round(round), root, i, chunk, tuple(path))
        for i, (chunk, path) in enumerate(zip(chunks, paths, strict=True))
    ]
    return header, parts


class PartSetAssembler:
    """Collects the parts of one part set (of the block proposed at ``height``/``round``)."""

    def __init__(
        self,
        header: PartSetHeader,
        *,
        height: int,
        round: int,
        max_bytes: int = MAX_BLOCK_BYTES,
    ) -> None:
        if not 1 <= header.total <= MAX_BLOCK_PARTS:
            raise PartIndexOutOfRange(f"part count {header.total} out of range")
        # Every part but the last carries at least one byte, so a count this large cannot fit.
        if header.total > max_bytes:
            raise PartSetTooLarge(f"{header.total} parts cannot fit {max_bytes} bytes")
        self.header = header
        self.height = Height(height)
        self.round = Round(round)
        self.max_bytes = max_bytes
        self._parts: list[BlockPart | None] = [None] * header.total
        self._count = 0
        self._bytes = 0

    @property
    def total(self) -> int:
        return self.header.total

    @property
    def received(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        """Bytes of block data held so far."""
        return self._bytes

    def is_complete(self) -> bool:
        return self._count == self.header.total

    def has(self, index: int) -> bool:
        return 0 <= index < self.header.total and self._parts[index] is not None

    def get(self, index: int) -> BlockPart | None:
        """A held part (to answer ``GetParts`` while still assembling), else None."""
        return self._parts[index] if 0 <= index < self.header.total else None

    def missing(self) -> list[int]:
        return [i for i, p in enumerate(self._parts) if p is None]

    def matches(self, part: BlockPart) -> bool:
        """Whether ``part`` names this part set (height, round and root)."""
        return (
            part.height == self.height
            and part.round == self.round
            and part.root == self.header.root
        )

    def add(self, part: BlockPart) -> None:
        """Verify and keep ``part``; raises ``DuplicatePart`` or an ``InvalidPart`` subclass."""
        if not self.matches(part):
            raise WrongPartSet(
                f"part of ({part.height}, {part.round}, {part.root.hex()[:16]}) for "
                f"({self.height}, {self.round}, {self.header.root.hex()[:16]})"
            )
        if not 0 <= part.index < self.header.total:
            raise PartIndexOutOfRange(f"index {part.index} of {self.header.total} parts")
        if self._parts[part.index] is not None:
            raise DuplicatePart(f"part {part.index} already held")
        if len(part.data) > MAX_PART_BYTES or not part.data:
            raise BadPartProof(f"part {part.index} has {len(part.data)} bytes")
        if self._bytes + len(part.data) > self.max_bytes:
            raise PartSetTooLarge(f"parts exceed {self.max_bytes} bytes")
        try:
            verify_merkle_proof(
                self.header.root, part.data, part.index, self.header.total, part.proof
            )
        except ProofError as exc:
            raise BadPartProof(f"part {part.index}: {exc.message}") from exc
        self._parts[part.index] = part
        self._count += 1
        self._bytes += len(part.data)

    def block_bytes(self) -> bytes:
        """The block's encoding once every part is held; raises ``IncompletePartSet`` before."""
        if not self.is_complete():
            raise IncompletePartSet(f"{len(self.missing())} of {self.header.total} parts missing")
        return b"".join(p.data for p in self._parts if p is not None)
