"""Standalone verifier of NeuroSeed state proofs (DESIGN §4), for light clients and wallets.

This module imports only the standard library and ``msgpack`` so that it can be copied alone into
a wallet. It checks that a state key has (or has not) a value under a block's ``state_root``.

The state tree
--------------
A compact (Jellyfish-style) sparse binary Merkle tree over ``key_hash = sha256(state_key)``:

* the bits of ``key_hash`` are read most significant first; bit ``i`` chooses the child at depth
  ``i`` (0 → left, 1 → right);
* ``leaf = sha256(0x00 || key_hash || sha256(value))``;
* ``internal = sha256(0x01 || left || right)``;
* the empty subtree is 32 zero bytes (the root of the empty tree too);
* a subtree holding exactly one leaf *is* that leaf: the leaf sits at the shallowest depth where
  its key-hash prefix is unique. So the root depends only on the set of (key, value) pairs.

Proof format
------------
The canonical msgpack encoding of a 3-element array::

    [leaf_key_hash: bin32 | nil, leaf_value_hash: bin32 | nil, siblings: [bin32, ...]]

``siblings`` lists, from the root downward, the hash of the sibling of each node on the path of
the queried key, so ``d = len(siblings)`` (at most 256) is the depth at which the path ends. The
path ends either in a leaf (``leaf_key_hash``/``leaf_value_hash`` set, both or neither) or in an
empty subtree (both nil). Meaning:

* **inclusion** of (key, value): the terminal leaf has ``leaf_key_hash == sha256(key)`` and
  ``leaf_value_hash == sha256(value)``;
* **non-inclusion** of key: the path ends in an empty subtree, or in a leaf of another key whose
  hash shares the first ``d`` bits with ``sha256(key)`` (that leaf is alone in the subtree the key
  would have to be in).

Verification recomputes the root bottom-up: start from the terminal node (the leaf hash, or the
zero hash), then for ``i = d-1 … 0`` hash it with ``siblings[i]`` on the side given by bit ``i``
of the queried key hash, and compare with the expected root. Proofs that no canonical tree can
produce are rejected too: if ``d > 0`` the deepest sibling must not be the empty hash (a leaf or
an empty subtree next to an empty sibling would have been collapsed into its parent). The bytes
must be the one canonical encoding (minimal msgpack, exact field count and types).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

__all__ = [
    "EMPTY_HASH",
    "MAX_DEPTH",
    "MAX_PROOF_BYTES",
    "BytesLike",
    "ProofError",
    "decode_proof",
    "verify_inclusion",
    "verify_non_inclusion",
    "verify_proof",
    "verify_proof_hashed",
]

EMPTY_HASH = b"\x00" * 32
MAX_DEPTH = 256  # key hashes have 256 bits, so no path is longer
# fixarray(3) + 2 * (bin8 header + 32) + array16 header + 256 * (bin8 header + 32)
MAX_PROOF_BYTES = 1 + 2 * 34 + 3 + MAX_DEPTH * 34

_sha256 = hashlib.sha256

BytesLike = bytes | bytearray | memoryview


class ProofError(ValueError):
    """The proof is malformed or does not show the claim against the given root."""


def decode_proof(proof: BytesLike) -> tuple[bytes | None, bytes | None, tuple[bytes, ...]]:
    """Parse the proof bytes strictly: ``(leaf_key_hash, leaf_value_hash, siblings)``."""
    if not isinstance(proof, bytes | bytearray | memoryview):
        raise ProofError("proof must be bytes")
    data = bytes(proof)
    if not data:
        raise ProofError("empty proof")
    if len(data) > MAX_PROOF_BYTES:
        raise ProofError(f"proof of {len(data)} bytes exceeds {MAX_PROOF_BYTES}")
    try:
        tree: Any = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=0,
            max_bin_len=32,
            max_array_len=MAX_DEPTH,
            max_map_len=0,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise ProofError("trailing bytes after the proof") from exc
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProofError(f"malformed proof encoding: {type(exc).__name__}") from exc
    if type(tree) is not tuple or len(tree) != 3:
        raise ProofError("a proof is an array of exactly 3 fields")
    leaf_key_hash, leaf_value_hash, siblings = tree
    for name, h in (("leaf_key_hash", leaf_key_hash), ("leaf_value_hash", leaf_value_hash)):
        if h is not None and (type(h) is not bytes or len(h) != 32):
            raise ProofError(f"{name} must be nil or 32 bytes")
    if (leaf_key_hash is None) != (leaf_value_hash is None):
        raise ProofError("leaf_key_hash and leaf_value_hash must be both set or both nil")
    if type(siblings) is not tuple:
        raise ProofError("siblings must be an array")
    if len(siblings) > MAX_DEPTH:
        raise ProofError(f"more than {MAX_DEPTH} siblings")
    for s in siblings:
        if type(s) is not bytes or len(s) != 32:
            raise ProofError("every sibling must be 32 bytes")
    # msgpack accepts non-minimal forms (bin16 for 32 bytes, array16 for 3 items, ...); one proof
    # must have exactly one byte form.
    if msgpack.packb(tree, use_bin_type=True) != data:
        raise ProofError("proof bytes are not the canonical encoding")
    return leaf_key_hash, leaf_value_hash, siblings


def _bit(key_hash: bytes, i: int) -> int:
    return (key_hash[i >> 3] >> (7 - (i & 7))) & 1


def _shares_prefix(a: bytes, b: bytes, nbits: int) -> bool:
    full, rest = divmod(nbits, 8)
    if a[:full] != b[:full]:
        return False
    if rest == 0:
        return True
    mask = (0xFF << (8 - rest)) & 0xFF
    return (a[full] & mask) == (b[full] & mask)


def _as_bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if type(value) is not bytes:
        raise ProofError(f"{name} must be bytes")
    return value


def _as_hash(name: str, value: object) -> bytes:
    h = _as_bytes(name, value)
    if len(h) != 32:
        raise ProofError(f"{name} must be 32 bytes")
    return h


def verify_proof_hashed(
    root: BytesLike, key_hash: BytesLike, value_hash: BytesLike | None, proof: BytesLike
) -> None:
    """Like ``verify_proof`` for a caller holding ``sha256(key)`` and ``sha256(value)`` only.

    ``value_hash`` None asks for non-inclusion. Raises ``ProofError`` unless the proof shows it.
    """
    root = _as_hash("root", root)
    key_hash = _as_hash("key_hash", key_hash)
    if value_hash is not None:
        value_hash = _as_hash("value_hash", value_hash)
    leaf_key_hash, leaf_value_hash, siblings = decode_proof(proof)
    depth = len(siblings)
    if depth and siblings[-1] == EMPTY_HASH:
        raise ProofError("non-canonical proof: the deepest sibling is empty")
    if value_hash is not None:
        if leaf_key_hash != key_hash:
            raise ProofError("the proof's leaf is not this key's")
        if leaf_value_hash != value_hash:
            raise ProofError("the proof's leaf holds another value")
    elif leaf_key_hash is not None:
        if leaf_key_hash == key_hash:
            raise ProofError("the proof shows the key is present")
        if not _shares_prefix(leaf_key_hash, key_hash, depth):
            raise ProofError("the proof's leaf is not on this key's path")
    if leaf_key_hash is None or leaf_value_hash is None:  # decode_proof: both or neither
        node = EMPTY_HASH
    else:
        node = _sha256(b"\x00" + leaf_key_hash + leaf_value_hash).digest()
    for i in range(depth - 1, -1, -1):
        if _bit(key_hash, i):
            node = _sha256(b"\x01" + siblings[i] + node).digest()
        else:
            node = _sha256(b"\x01" + node + siblings[i]).digest()
    if node != root:
        raise ProofError("the proof does not lead to the state root")


def verify_proof(
    root: BytesLike, key: BytesLike, value: BytesLike | None, proof: BytesLike
) -> None:
    """Check that ``key`` maps to ``value`` (None: is absent) in the tree with ``root``.

    Raises ``ProofError`` (a ``ValueError``) if the proof is malformed or does not show that.
    """
    key = _as_bytes("key", key)
    value_hash = None if value is None else _sha256(_as_bytes("value", value)).digest()
    verify_proof_hashed(root, _sha256(key).digest(), value_hash, proof)


def verify_inclusion(root: BytesLike, key: BytesLike, value: BytesLike, proof: BytesLike) -> None:
    """Check that ``key`` maps to ``value`` in the tree with ``root``; raises ``ProofError``."""
    if value is None:
        raise ProofError("an inclusion proof needs a value")
    verify_proof(root, key, value, proof)


def verify_non_inclusion(root: BytesLike, key: BytesLike, proof: BytesLike) -> None:
    """Check that ``key`` is absent from the tree with ``root``; raises ``ProofError``."""
    verify_proof(root, key, None, proof)
