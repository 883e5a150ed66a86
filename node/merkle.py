"""Binary Merkle roots and inclusion proofs over ordered lists (transactions, receipts, evidence).

RFC 6962 shape with the same domain separation as the state tree: leaf = sha256(0x00 || item),
internal = sha256(0x01 || left || right); a list of n > 1 items splits at the largest power of two
below n. The empty list's root is 32 zero bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from node.errors import ProofError
from node.types import ZERO_HASH, Hash32

_sha = hashlib.sha256


def leaf_hash(item: bytes) -> Hash32:
    return Hash32(_sha(b"\x00" + item).digest())


def node_hash(left: bytes, right: bytes) -> Hash32:
    return Hash32(_sha(b"\x01" + left + right).digest())


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _root_of_leaves(leaves: Sequence[bytes]) -> bytes:
    level: list[bytes] = list(leaves)
    # Iterative form of the RFC 6962 recursion: pairing left to right and promoting an odd last
    # node gives the same tree as splitting at the largest power of two below n.
    sha = _sha
    while len(level) > 1:
        nxt: list[bytes] = [
            sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_root(items: Sequence[bytes]) -> Hash32:
    if not items:
        return ZERO_HASH
    sha = _sha
    return Hash32(_root_of_leaves([sha(b"\x00" + x).digest() for x in items]))


def merkle_proof(items: Sequence[bytes], index: int) -> list[Hash32]:
    """Audit path for ``items[index]``, from the leaf's sibling up to the root's children."""
    if not 0 <= index < len(items):
        raise IndexError("index out of range")
    path: list[Hash32] = []

    def rec(lo: int, hi: int) -> Hash32:
        if hi - lo == 1:
            return leaf_hash(items[lo])
        k = _split(hi - lo)
        mid = lo + k
        if index < mid:
            left = rec(lo, mid)
            right = _subroot(items[mid:hi])
            path.append(right)
        else:
            left = _subroot(items[lo:mid])
            right = rec(mid, hi)
            path.append(left)
        return node_hash(left, right)

    rec(0, len(items))
    return path


def _subroot(items: Sequence[bytes]) -> Hash32:
    return Hash32(_root_of_leaves([leaf_hash(x) for x in items]))


def verify_merkle_proof(
    root: bytes, item: bytes, index: int, count: int, path: Sequence[bytes]
) -> None:
    """Raise ``ProofError`` unless ``item`` is at ``index`` of a ``count``-item list with ``root``."""
    if not 0 <= index < count:
        raise ProofError("index out of range")

    def rec(lo: int, hi: int, depth: int) -> bytes:
        if hi - lo == 1:
            if depth != len(path):
                raise ProofError("proof length does not match the list size")
            return leaf_hash(item)
        if depth >= len(path):
            raise ProofError("proof too short")
        k = _split(hi - lo)
        mid = lo + k
        sibling = path[len(path) - 1 - depth]
        if index < mid:
            return node_hash(rec(lo, mid, depth + 1), sibling)
        return node_hash(sibling, rec(mid, hi, depth + 1))

    if rec(0, count, 0) != root:
        raise ProofError("merkle proof does not lead to the root")
