"""The authenticated state tree: a compact sparse Merkle tree versioned by height (DESIGN §4).

Hash semantics (fixed; the standalone verifier ``node.lightclient`` documents the same rules and
the proof format): ``key_hash = sha256(state_key)``, bits read most significant first (0 → left),
``leaf = sha256(0x00 || key_hash || sha256(value))``, ``internal = sha256(0x01 || left || right)``,
empty subtree = 32 zero bytes, and a subtree holding exactly one leaf is that leaf (placed at the
shallowest depth where its prefix is unique). The root depends only on the set of (key, value)
pairs, never on insertion order, deletions or how changes were split across heights.

Storage (Jellyfish-style)
-------------------------
The binary tree is stored in 16-ary *internal node* records, each covering 4 binary levels (one
nibble of the key hash). A slot of an internal node holds nothing (empty subtree), a leaf (the
subtree under that nibble has exactly one leaf) or a child internal node (two or more leaves).
A leaf's hash does not depend on its depth, so the binary compact root is recomputed inside each
record from its 16 slots, collapsing single-leaf halves, and storing leaves at nibble granularity
changes no hash. Nodes are immutable and versioned: a block at height ``h`` writes new records
for the internal nodes on changed paths (version ``h``) and lists the replaced ones in a stale
index, so the tree of every retained height stays readable. All keys start with the tree's
``prefix`` (``P``); integers in keys are 8-byte big-endian.

A *slot* is encoded as a msgpack value in one fixed form per kind, so that its fields sit at fixed
offsets and a changed record is spliced from the old one, never re-encoded:

* empty: ``nil`` (``c0``, 1 byte);
* child internal node: ``[hash: bin32, version: uint64, nil]`` =
  ``93 c4 20 <hash> cf <version: 8 bytes> c0`` (45 bytes);
* leaf: ``[hash: bin32, version: uint64, key_hash: bin32]`` =
  ``93 c4 20 <hash> cf <version: 8 bytes> c4 20 <key_hash>`` (78 bytes).

The version (the height at which the leaf or child node record was written) is always a msgpack
uint64 (``cf``): valid msgpack, not the minimal form. Any other form of a slot is rejected as
corrupt. Records:

* ``P "N" version path`` → internal node: ``dc 00 10`` (msgpack array16 header, 16 items)
  followed by the 16 slot encodings. ``path`` is the node's nibble path, one byte (0..15) per
  nibble, empty for the root node.
* ``P "L" key_hash version`` → leaf: canonical msgpack ``[state_key: bin, value: bin]`` set at
  ``version``. A leaf's record does not move when neighbours make its position deeper or
  shallower.
* ``P "R" height`` → the tree's root slot at ``height`` (a slot encoding as above; ``nil`` for
  the empty tree).
* ``P "S" stale_since "R" previous_height`` → ``b""``: the root slot record ``P "R"
  previous_height`` is not part of the trees at heights ≥ ``stale_since``.
* ``P "S" stale_since "B" chunk`` (``chunk``: 4-byte big-endian, from 0) → canonical msgpack array
  of bin: the full keys (``P "N" …``, ``P "L" …``) of the node and leaf records that the block at
  ``stale_since`` replaced, which are therefore not part of the trees at heights ≥
  ``stale_since``. One record per block (split every ``_STALE_CHUNK`` keys), not one per retired
  record; ``prune`` reads them.
* ``P "H"`` → uint: the latest height. ``P "P"`` → uint: heights below it were pruned.

``apply`` never writes: it returns a ``TreeUpdate`` (puts and deletes) that the caller adds to the
atomic batch committing the block, so a crash before that batch leaves the tree at the previous
height. ``committed(update)`` afterwards only feeds the bounded in-memory cache of decoded nodes;
it is an optimisation, not needed for correctness. Speculative ``apply`` calls (validators
executing a proposal before it is decided) may be made and discarded freely.

A ``StateTree`` instance and its cache belong to one thread (the chain service). Readers in
other threads (RPC) make their own ``StateTree`` over a storage snapshot.

In memory
---------
A decoded node is one ``bytearray`` (``_Node``, layout below): the node's binary heap (the hashes
and kinds of its 31 binary positions), the offsets of its slots, then its record. An update
copies the node, splices the changed slot into the record part, rehashes only the positions
above it and takes the record as the tail: a few C-level copies per changed node, no per-slot
objects and nothing the cyclic garbage collector tracks. Most of the cost of a block is Python
interpretation per changed node (about 3,600 nodes and 20,000 sha256 calls for 2,000 changed keys
over 100,000), so the hot loop in ``_Updater.update`` is written for few bytecodes rather than
for brevity.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate, islice, repeat
from operator import itemgetter, methodcaller
from typing import Any

import msgpack

from node import lightclient
from node.encoding import Record, limit, pack, unpack_canonical
from node.errors import (
    CorruptDatabase,
    DecodeError,
    HistoryPruned,
    NotFound,
    ProofError,
    StorageError,
)
from node.storage.api import KVReader, WriteBatch
from node.types import UINT64_MAX, ZERO_HASH, Hash32

__all__ = [
    "MAX_DEPTH",
    "SmtProof",
    "StateTree",
    "TreeHeightError",
    "TreeUpdate",
    "compute_root",
    "verify_proof",
]

MAX_DEPTH = lightclient.MAX_DEPTH
DEFAULT_CACHE_NODES = 65_536

_sha256 = hashlib.sha256
_digest = methodcaller("digest")
_ZERO = bytes(ZERO_HASH)
_LEAF_TAG = b"\x00"
_NIBBLE = [bytes((n,)) for n in range(16)]
# key_hash.hex() as ASCII → one byte (0..15) per nibble: the node paths of every depth at once.
_to_nibbles = methodcaller("translate", bytes.maketrans(b"0123456789abcdef", bytes(range(16))))
_STALE_CHUNK = 16_384  # retired keys per stale-index record

# --- slots (see the module docstring); in memory a slot is its encoding, its kind its length ---

_Slot = bytes
_NIL = b"\xc0"  # the empty slot; every empty slot handled in memory is this very object
_SLOT_HEAD = b"\x93\xc4\x20"  # fixarray(3), bin8(32): then the hash
_VERSION_TAG = b"\xcf"  # uint64: then 8 bytes
_KEY_HASH_TAG = b"\xc4\x20"  # bin8(32): then the key hash (leaf)
_NODE_LEN = 45
_LEAF_LEN = 78
_NODE_HEAD = b"\xdc\x00\x10"  # array16(16): then the 16 slots

# --- a node in memory -----------------------------------------------------------------------
#
# One bytearray (``_Node``):
#
# * ``[0, _KINDS)``: the binary heap's hashes. Heap position ``p`` (1 = the node's root,
#   ``2p``/``2p+1`` the children of ``p``, 16..31 the 16 slots) has its hash at ``_HASH[p]``.
#   The hashes are stored in pairs, pair ``j`` = ``0x01 || hash(2j) || hash(2j+1)`` at ``65 * j``
#   (``_PAIR[j]``): exactly the preimage of position ``j``'s hash, hashed without concatenation.
# * ``[_KINDS, _KINDS + 32)``: the kind of each position (``_EMPTY``, ``_LEAF``: a subtree of one
#   leaf, ``_INTERNAL``). Empty positions hold the zero hash, so the compact rule for a position
#   is: both children empty → empty; one child a lone leaf and the other empty → that leaf (it
#   moves up); otherwise → internal, ``sha256(its pair)``, an empty side hashing as zero.
# * ``[_UNITS, _UNITS + 16)``: slot offsets. Slot encodings are 1, 45 or 78 bytes long, so slot
#   ``n`` starts at ``_SLOT_AT[n] + 11 * u`` with ``u`` = 4 per internal and 7 per leaf slot
#   before it; byte ``n`` holds that ``u`` (at most 105).
# * ``[_REC, end)``: the record (``_NODE_HEAD`` and the 16 slot encodings).
#
# The 15 inner hashes are kept so that an update rehashes only the positions above changed slots.
# A bytearray is not tracked by the cyclic collector: tens of thousands of cached nodes cost a
# full collection nothing. Offsets used by the hot paths are slice objects (Python 3.11 builds a
# new slice object for every ``a[i:j]``).

_Node = bytearray
_EMPTY, _LEAF, _INTERNAL = 0, 1, 2
_KINDS = 16 * 65
_UNITS = _KINDS + 32
_REC = _UNITS + 16
_SLOT_AT = [_REC + 3 + _n for _n in range(16)]  # plus 11 * units
_SLOT_LEN = (1, _LEAF_LEN, _NODE_LEN)  # by kind
_UNITS_OF_KIND = bytes((0, 7, 4)) + bytes(253)  # for bytearray.translate
_EMPTY_NODE = b"".join(b"\x01" + bytes(64) for _ in range(16)) + bytes(32 + 16)  # no record
_HASH = [
    slice(65 * (_p >> 1) + 1 + 32 * (_p & 1), 65 * (_p >> 1) + 33 + 32 * (_p & 1))
    for _p in range(32)
]
_PAIR = [slice(65 * _p, 65 * _p + 65) for _p in range(16)]
_SLOT_HASH = _HASH[16:]
_ROOT_HASH = _HASH[1]
_TOP_PAIR = _PAIR[1]
_record_of = itemgetter(slice(_REC, None))

# Per slot ``n``, one climb from the slot to the node's root (positions ``s = 16 + n``,
# ``s >> 1``, ``s >> 2``, ``s >> 3``, 1): the slot's hash and kind offset, the kind offsets of the
# three positions above it, their hashes and pairs, and per level ``(pair, hash, kind at, sibling
# kind at, sibling hash)`` for the general rule.
_Level = tuple[slice, slice, int, int, slice]
_Climb = tuple[
    slice, int, int, int, int, slice, slice, slice, slice, slice, slice, tuple[_Level, ...]
]
_CLIMB: list[_Climb] = []
for _n in range(16):
    _s = 16 + _n
    _path = ((_s, _s >> 1), (_s >> 1, _s >> 2), (_s >> 2, _s >> 3), (_s >> 3, 1))
    _CLIMB.append(
        (
            _HASH[_s],
            _KINDS + _s,
            _KINDS + (_s >> 1),
            _KINDS + (_s >> 2),
            _KINDS + (_s >> 3),
            _HASH[_s >> 1],
            _PAIR[_s >> 1],
            _HASH[_s >> 2],
            _PAIR[_s >> 2],
            _HASH[_s >> 3],
            _PAIR[_s >> 3],
            tuple(
                (_PAIR[_p], _HASH[_p], _KINDS + _p, _KINDS + (_c ^ 1), _HASH[_c ^ 1])
                for _c, _p in _path
            ),
        )
    )
del _n, _s, _path


class TreeHeightError(StorageError):
    """``apply`` was asked for a height other than the one after the latest."""

    reason = "state tree height out of sequence"


@dataclass(frozen=True, slots=True)
class SmtProof(Record):
    """A state proof; its canonical encoding is what ``node.lightclient`` verifies.

    ``siblings`` run from the root downward; the path ends in the leaf given by
    (``leaf_key_hash``, ``leaf_value_hash``) or, when both are None, in an empty subtree.
    """

    leaf_key_hash: Hash32 | None
    leaf_value_hash: Hash32 | None
    siblings: tuple[Hash32, ...] = field(metadata=limit(MAX_DEPTH))

    def __post_init__(self) -> None:
        if (self.leaf_key_hash is None) != (self.leaf_value_hash is None):
            raise DecodeError("leaf_key_hash and leaf_value_hash must be both set or both nil")


def verify_proof(root: bytes, key: bytes, value: bytes | None, proof: SmtProof | bytes) -> None:
    """Check ``proof`` with the light-client verifier; raises ``node.errors.ProofError``."""
    raw = proof.encode() if isinstance(proof, SmtProof) else proof
    try:
        lightclient.verify_proof(root, key, value, raw)
    except lightclient.ProofError as exc:
        raise ProofError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class TreeUpdate:
    """Records to write in the block's atomic batch (``write_to``), then pass to ``committed``.

    ``height``/``root``: the tree the update produces (for ``prune``, the latest one; -1 and the
    empty root when the tree has no height yet). ``nodes`` (created) and ``retired`` (replaced)
    node keys only steer the cache on ``committed``: replaced nodes serve past heights only, so
    they leave the cache at once.
    """

    height: int
    root: Hash32
    puts: dict[bytes, bytes]
    deletes: list[bytes]
    nodes: dict[bytes, _Node] = field(default_factory=dict, repr=False, compare=False)
    retired: list[bytes] = field(default_factory=list, repr=False, compare=False)

    def write_to(self, batch: WriteBatch) -> None:
        for key, value in self.puts.items():
            batch.put(key, value)
        for key in self.deletes:
            batch.delete(key)


# --- rehashing a node ------------------------------------------------------------------------

# Per inner heap position: (pair, hash, kind at, left kind at, right kind at, left hash, right
# hash).
_Step = tuple[slice, slice, int, int, int, slice, slice]
_STEP_OF: dict[int, _Step] = {
    p: (
        _PAIR[p],
        _HASH[p],
        _KINDS + p,
        _KINDS + 2 * p,
        _KINDS + 2 * p + 1,
        _HASH[2 * p],
        _HASH[2 * p + 1],
    )
    for p in range(1, 16)
}
_ALL_INTERNAL = bytes([_INTERNAL]) * 15
# 8-bit b → 4-bit: bit j set where bit 2j or 2j+1 of b is (the parents of a set of positions).
_PARENTS = [sum(1 << j for j in range(4) if b >> (2 * j) & 3) for b in range(256)]


def _level_steps(first: int, count: int) -> list[tuple[_Step, ...]]:
    """Per bitmask of the ``count`` positions ``first + j``: their steps."""
    return [
        tuple(_STEP_OF[first + j] for j in range(count) if m >> j & 1) for m in range(1 << count)
    ]


def _dense(levels: list[tuple[_Step, ...]]) -> list[tuple[tuple[slice, slice], ...]]:
    """The same steps as (pair, hash) only."""
    return [tuple((step[0], step[1]) for step in steps) for steps in levels]


_LEVEL3, _LEVEL2, _LEVEL1 = _level_steps(8, 8), _level_steps(4, 4), _level_steps(2, 2)
_ROOT_STEP = (_STEP_OF[1],)
_DENSE3, _DENSE2, _DENSE1 = _dense(_LEVEL3), _dense(_LEVEL2), _dense(_LEVEL1)
_DENSE_ROOT = ((_TOP_PAIR, _ROOT_HASH),)


def _rehash(node: _Node, mask: int) -> None:
    """Recompute the heap positions above the slots in ``mask`` (bit n: slot n, whose hashes and
    kinds are set already), level by level from the slots up, with the compact rule."""
    m3 = _PARENTS[mask & 0xFF] | _PARENTS[mask >> 8] << 4
    m2 = _PARENTS[m3]
    m1 = _PARENTS[m2]
    sha = _sha256
    if node.find(_EMPTY, _KINDS + 16, _KINDS + 32) < 0:
        # All 16 slots non-empty: every position is internal, a plain hash of its pair.
        for pair, hash_ in _DENSE3[m3] + _DENSE2[m2] + _DENSE1[m1] + _DENSE_ROOT:
            node[hash_] = sha(node[pair]).digest()
        node[_KINDS + 1 : _KINDS + 16] = _ALL_INTERNAL
        return
    for pair, hash_, kind_at, left_at, right_at, left, right in (
        _LEVEL3[m3] + _LEVEL2[m2] + _LEVEL1[m1] + _ROOT_STEP
    ):
        kl = node[left_at]
        kr = node[right_at]
        if kl == _LEAF and not kr:  # a lone leaf moves up (compact collapse)
            node[hash_] = node[left]
            node[kind_at] = _LEAF
        elif kr == _LEAF and not kl:
            node[hash_] = node[right]
            node[kind_at] = _LEAF
        elif kl or kr:
            node[hash_] = sha(node[pair]).digest()
            node[kind_at] = _INTERNAL
        else:
            node[hash_] = _ZERO
            node[kind_at] = _EMPTY


def _set_slot(node: _Node, n: int, slot: _Slot) -> None:
    """Put the hash and kind of ``slot`` at slot ``n`` of the heap (not the record)."""
    if slot is _NIL:
        node[_SLOT_HASH[n]] = _ZERO
        node[_KINDS + 16 + n] = _EMPTY
    else:
        node[_SLOT_HASH[n]] = slot[3:35]
        node[_KINDS + 16 + n] = _LEAF if len(slot) == _LEAF_LEN else _INTERNAL


def _reindex(node: _Node) -> None:
    """Recompute the offset bytes after slot kinds changed."""
    units = node[_KINDS + 16 : _KINDS + 31].translate(_UNITS_OF_KIND)
    node[_UNITS : _UNITS + 16] = bytes(accumulate(units, initial=0))


def _slot_of(node: _Node, n: int) -> _Slot:
    """Slot ``n`` of ``node`` (a copy)."""
    kind = node[_KINDS + 16 + n]
    if kind == _EMPTY:
        return _NIL
    at = _SLOT_AT[n] + 11 * node[_UNITS + n]
    return bytes(node[at : at + _SLOT_LEN[kind]])


def _lone_leaf(node: _Node) -> _Slot:
    """The one slot of a node whose subtree holds a single leaf (all other slots are nil)."""
    n = node.index(_LEAF, _KINDS + 16, _KINDS + 32) - (_KINDS + 16)
    return bytes(node[_SLOT_AT[n] : _SLOT_AT[n] + _LEAF_LEN])


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _parse_slot(raw: bytes, at: int) -> int:
    """The end of the slot encoding at ``raw[at:]``; ``CorruptDatabase`` if it is malformed."""
    if raw[at : at + 1] == _NIL:
        return at + 1
    if raw[at : at + 3] != _SLOT_HEAD or raw[at + 35 : at + 36] != _VERSION_TAG:
        raise CorruptDatabase("state tree slot is not nil or [bin32, uint64, bin32|nil]")
    if raw[at + 44 : at + 45] == _NIL:
        return at + _NODE_LEN
    if raw[at + 44 : at + 46] == _KEY_HASH_TAG and len(raw) >= at + _LEAF_LEN:
        return at + _LEAF_LEN
    raise CorruptDatabase("state tree slot key hash is not bin32 or nil")


def _decode_slot(raw: bytes) -> _Slot:
    """A whole record holding one slot (the root slot of a height)."""
    if raw == _NIL:
        return _NIL
    if _parse_slot(raw, 0) != len(raw):
        raise CorruptDatabase("state tree slot has trailing bytes")
    return bytes(raw)


def _decode_node(raw: bytes, expected: _Slot) -> _Node:
    """The node for record ``raw``, checked against the hash in its parent's slot."""
    if raw[:3] != _NODE_HEAD:
        raise CorruptDatabase("state tree node is not a 16-array")
    node = bytearray(_EMPTY_NODE)
    at = 3
    for n in range(16):
        end = _parse_slot(raw, at)
        if end != at + 1:
            _set_slot(node, n, raw[at:end])
        at = end
    if at != len(raw):
        raise CorruptDatabase("state tree node has trailing bytes")
    _reindex(node)
    _rehash(node, 0xFFFF)
    if node[_KINDS + 1] != _INTERNAL or node[_ROOT_HASH] != expected[3:35]:
        raise CorruptDatabase("state tree node does not match its hash")
    node += raw
    return node


class _Updater:
    """One block's batch update: walks the sorted changed key hashes down the previous tree.

    Every internal node on a changed path is loaded once and its changed slots are updated over
    the contiguous run of key hashes under each nibble; a node with several changed slots is
    rehashed once over all of them, so shared paths are hashed once per block. Below the point
    where only one change remains (most of the nodes of a block) the walk is a loop, not a
    recursion.
    """

    __slots__ = (
        "cache_get",
        "fetch",
        "key_hashes",
        "leaf_hashes",
        "leaf_keys",
        "leaf_prefix",
        "leaf_records",
        "leaf_stems",
        "new_node_prefix",
        "new_slots",
        "nibbles",
        "node_prefix",
        "node_tail",
        "nodes",
        "pack",
        "puts",
        "stale_leaves",
        "stale_nodes",
    )

    def __init__(
        self,
        tree: StateTree,
        height: int,
        key_hashes: list[bytes],
        keys: list[bytes],
        values: list[bytes | None],
        leaf_hashes: list[bytes],
        new_slots: list[_Slot | None],
    ) -> None:
        """Change ``i`` sets ``keys[i]`` (hash ``key_hashes[i]``, sorted) to ``values[i]``:
        ``new_slots[i]`` is its new leaf slot (None: a deletion), ``leaf_hashes[i]`` its leaf
        hash (b"" for a deletion)."""
        version = _u64(height)
        self.node_tail = _VERSION_TAG + version + _NIL
        self.key_hashes = key_hashes
        self.nibbles = list(map(_to_nibbles, map(str.encode, map(bytes.hex, key_hashes))))
        self.leaf_hashes = leaf_hashes
        self.new_slots = new_slots
        prefix = tree.prefix
        self.node_prefix = prefix + b"N"
        self.new_node_prefix = self.node_prefix + version
        self.leaf_prefix = leaf_prefix = prefix + b"L"
        # P "L" key_hash: the leaf record keys without their version.
        self.leaf_stems = leaf_stems = list(map(leaf_prefix.__add__, key_hashes))
        self.leaf_keys = list(map(bytes.__add__, leaf_stems, repeat(version)))
        # One reusable packer (msgpack.packb builds one per call). The leaf records
        # [state_key, value] are packed up front: nearly all are written (a deletion's is not).
        self.pack = pack_ = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self.leaf_records: list[bytes] = list(map(pack_, zip(keys, values, strict=True)))
        self.cache_get = tree._cache.get
        self.fetch = tree._fetch_node
        self.puts: dict[bytes, bytes] = {}
        self.nodes: dict[bytes, _Node] = {}
        self.stale_nodes: list[bytes] = []
        self.stale_leaves: list[bytes] = []

    # --- records ---------------------------------------------------------------------------

    def new_leaf(self, i: int) -> _Slot:
        """Write the leaf record of change ``i`` (a put) and return its slot."""
        slot = self.new_slots[i]
        assert slot is not None
        self.puts[self.leaf_keys[i]] = self.leaf_records[i]
        return slot

    def finish(self, path: bytes, node: _Node) -> _Slot:
        """The slot for a rehashed node: empty, its lone leaf (collapse), or a new node record."""
        kind = node[_KINDS + 1]
        if kind == _INTERNAL:
            key = self.new_node_prefix + path
            self.nodes[key] = node
            return _SLOT_HEAD + node[_ROOT_HASH] + self.node_tail
        if kind == _LEAF:
            return _lone_leaf(node)
        return _NIL

    # --- the walk --------------------------------------------------------------------------

    def update(self, slot: _Slot, depth: int, path: bytes, lo: int, hi: int) -> _Slot:
        """The new slot for the subtree ``slot`` at nibble ``depth`` given the changes
        ``lo:hi``; returns ``slot`` itself (the same object) when nothing changed.

        A run of changes under one slot of a node recurses; a single change below a slot (most
        of them) is handled in line: down the internal nodes, the leaf, then back up, splicing
        one slot per node and rehashing the 4 positions above it."""
        if slot is _NIL:
            return self.build(
                depth,
                path,
                [
                    (self.key_hashes[i], self.new_leaf(i))
                    for i in range(lo, hi)
                    if self.new_slots[i] is not None  # deleting an absent key changes nothing
                ],
            )
        if len(slot) == _LEAF_LEN:
            return self.merge_leaf(slot, depth, path, lo, hi)
        node_prefix = self.node_prefix
        cache_get = self.cache_get
        top_slot = slot
        top_key = node_prefix + slot[36:44] + path
        top = cache_get(top_key)
        if top is None:
            top = self.fetch(top_key, slot)
        all_nibbles = self.nibbles
        key_hashes = self.key_hashes
        new_slots = self.new_slots
        leaf_keys = self.leaf_keys
        leaf_records = self.leaf_records
        leaf_hashes = self.leaf_hashes
        leaf_stems = self.leaf_stems
        puts = self.puts
        nodes = self.nodes
        stale_nodes = self.stale_nodes
        stale_leaves = self.stale_leaves
        new_node_prefix = self.new_node_prefix
        tail = self.node_tail
        sha = _sha256
        kinds = _KINDS + 16
        units = _UNITS
        # (nib, new slot, where the old slot starts, its length)
        changed: list[tuple[int, _Slot, int, int]] = []
        i = lo
        while i < hi:
            nibbles = all_nibbles[i]
            top_nib = nibbles[depth]
            if hi - i > 48:
                j = (
                    bisect_left(all_nibbles, path + _NIBBLE[top_nib + 1], i, hi)
                    if top_nib < 15
                    else hi
                )
            else:
                j = i + 1
                while j < hi and all_nibbles[j][depth] == top_nib:
                    j += 1
            kind = top[kinds + top_nib]
            top_at = _SLOT_AT[top_nib] + 11 * top[units + top_nib]
            top_length = _SLOT_LEN[kind]
            if j > i + 1:
                old = _NIL if kind == _EMPTY else bytes(top[top_at : top_at + top_length])
                new = self.update(old, depth + 1, path + _NIBBLE[top_nib], i, j)
                if new is not old:
                    changed.append((top_nib, new, top_at, top_length))
                i = j
                continue

            # One change, ``i``, below this slot. Down:
            node = top
            at = top_at
            sub = depth + 1  # the depth of the slot at ``at``
            chain: list[tuple[bytes, _Node, int, int, int, int]] = []
            while kind == _INTERNAL:
                key = node_prefix + node[at + 36 : at + 44] + nibbles[:sub]
                child = cache_get(key)
                if child is None:
                    child = self.fetch(key, bytes(node[at : at + _NODE_LEN]))
                node = child
                nib = nibbles[sub]
                kind = node[kinds + nib]
                at = _SLOT_AT[nib] + 11 * node[units + nib]
                chain.append((key, node, nib, sub, at, _SLOT_LEN[kind]))
                sub += 1

            # The bottom: an empty slot or a leaf (at ``at`` in ``node``).
            leaf = new_slots[i]
            if kind == _EMPTY:
                if leaf is None:
                    i = j
                    continue  # deleting an absent key
                puts[leaf_keys[i]] = leaf_records[i]
                new = leaf
            else:
                key_hash = key_hashes[i]
                if node.startswith(key_hash, at + 46):
                    if leaf is None:
                        new = _NIL
                    elif node.startswith(leaf_hashes[i], at + 3):
                        i = j
                        continue  # rewritten with the same value
                    else:
                        puts[leaf_keys[i]] = leaf_records[i]
                        new = leaf
                    stale_leaves.append(leaf_stems[i] + node[at + 36 : at + 44])
                elif leaf is None:
                    i = j
                    continue  # deleting an absent key
                else:
                    # Another key's leaf: both go one level down, into a new node.
                    puts[leaf_keys[i]] = leaf_records[i]
                    slot = bytes(node[at : at + _LEAF_LEN])
                    existing = slot[-32:]
                    new = self.build(
                        sub,
                        nibbles[:sub],
                        [(existing, slot), (key_hash, leaf)]
                        if existing < key_hash
                        else [(key_hash, leaf), (existing, slot)],
                    )

            # Back up.
            for key, old_node, nib, sub, slot_at, length in reversed(chain):
                node = old_node[:]
                node[slot_at : slot_at + length] = new
                stale_nodes.append(key)
                (
                    slot_hash,
                    kind_at,
                    kind3_at,
                    kind2_at,
                    kind1_at,
                    hash3,
                    pair3,
                    hash2,
                    pair2,
                    hash1,
                    pair1,
                    levels,
                ) = _CLIMB[nib]
                if len(new) == length:
                    # The slot keeps its kind (a leaf rewritten, a child node replaced), so every
                    # position keeps its kind: hash the internal ones, copy a lone leaf up.
                    h = new[3:35]
                    node[slot_hash] = h
                    if node[kind3_at] == _INTERNAL:  # then so is everything above it
                        node[hash3] = sha(node[pair3]).digest()
                        node[hash2] = sha(node[pair2]).digest()
                        node[hash1] = sha(node[pair1]).digest()
                    elif node[kind2_at] == _INTERNAL:  # our leaf alone in its pair of slots
                        node[hash3] = h
                        node[hash2] = sha(node[pair2]).digest()
                        node[hash1] = sha(node[pair1]).digest()
                    elif node[kind1_at] == _INTERNAL:
                        node[hash3] = h
                        node[hash2] = h
                        node[hash1] = sha(node[pair1]).digest()
                    else:  # alone in its half of the node
                        node[hash3] = h
                        node[hash2] = h
                        node[hash1] = h
                    h = sha(node[_TOP_PAIR]).digest()
                    node[_ROOT_HASH] = h
                    new_key = new_node_prefix + nibbles[:sub]
                    nodes[new_key] = node
                    new = _SLOT_HEAD + h + tail
                    continue
                if new is _NIL:
                    h = _ZERO
                    kind = _EMPTY
                else:
                    h = new[3:35]
                    kind = _LEAF if len(new) == _LEAF_LEN else _INTERNAL
                node[slot_hash] = h
                node[kind_at] = kind
                _reindex(node)
                for pair, hash_, kind_at, sibling_kind_at, sibling_hash in levels:
                    sibling = node[sibling_kind_at]
                    if sibling:
                        if kind or sibling == _INTERNAL:
                            h = sha(node[pair]).digest()
                            kind = _INTERNAL
                        else:  # the sibling is a lone leaf next to nothing: it moves up
                            h = bytes(node[sibling_hash])
                            kind = _LEAF
                    elif kind == _INTERNAL:
                        h = sha(node[pair]).digest()
                    # else: a lone leaf moves up, or nothing: ``h`` and ``kind`` stay
                    node[hash_] = h
                    node[kind_at] = kind
                if kind == _INTERNAL:
                    new_key = new_node_prefix + nibbles[:sub]
                    nodes[new_key] = node
                    new = _SLOT_HEAD + h + tail
                elif kind == _LEAF:
                    new = _lone_leaf(node)
                else:
                    new = _NIL
            changed.append((top_nib, new, top_at, top_length))
            i = j

        if not changed:
            return top_slot
        node = top[:]
        mask = 0
        moved = False
        # Highest slot first: a splice moves only the encodings after it.
        for nib, new, at, length in reversed(changed):
            node[at : at + length] = new
            if len(new) == length:
                node[_SLOT_HASH[nib]] = new[3:35]
            else:
                moved = True
                if new is _NIL:
                    node[_SLOT_HASH[nib]] = _ZERO
                    node[kinds + nib] = _EMPTY
                else:
                    node[_SLOT_HASH[nib]] = new[3:35]
                    node[kinds + nib] = _LEAF if len(new) == _LEAF_LEN else _INTERNAL
            mask |= 1 << nib
        if moved:
            _reindex(node)
        _rehash(node, mask)
        stale_nodes.append(top_key)
        return self.finish(path, node)

    def merge_leaf(self, slot: _Slot, depth: int, path: bytes, lo: int, hi: int) -> _Slot:
        """Changes landing on a slot that holds one leaf: rebuild that subtree from the union."""
        existing = slot[-32:]
        key_hashes = self.key_hashes
        new_slots = self.new_slots
        leaves: list[tuple[bytes, _Slot]] = []
        placed = False
        for i in range(lo, hi):
            key_hash = key_hashes[i]
            new = new_slots[i]
            if key_hash == existing:
                placed = True
                if new is not None and slot.startswith(new[:35]):
                    leaves.append((key_hash, slot))  # rewritten with the same value
                else:
                    self.stale_leaves.append(self.leaf_prefix + existing + slot[36:44])
                    if new is not None:
                        leaves.append((key_hash, self.new_leaf(i)))
                continue
            if not placed and key_hash > existing:
                leaves.append((existing, slot))
                placed = True
            if new is not None:
                leaves.append((key_hash, self.new_leaf(i)))
        if not placed:
            leaves.append((existing, slot))
        return self.build(depth, path, leaves)

    def build(self, depth: int, path: bytes, leaves: list[tuple[bytes, _Slot]]) -> _Slot:
        """A fresh subtree at ``path`` over ``leaves`` (sorted by key hash)."""
        n = len(leaves)
        if n == 0:
            return _NIL
        if n == 1:
            return leaves[0][1]
        node = bytearray(_EMPTY_NODE)
        slots = [_NIL] * 16
        byte_i = depth >> 1
        shift = 0 if depth & 1 else 4
        mask = 0
        i = 0
        while i < n:
            nib = (leaves[i][0][byte_i] >> shift) & 15
            j = i + 1
            while j < n and (leaves[j][0][byte_i] >> shift) & 15 == nib:
                j += 1
            if j == i + 1:
                child = leaves[i][1]
            else:
                # Two or more leaves share this nibble, so the subtree is an internal node.
                child = self.build(depth + 1, path + _NIBBLE[nib], leaves[i:j])
            slots[nib] = child
            _set_slot(node, nib, child)
            mask |= 1 << nib
            i = j
        _reindex(node)
        _rehash(node, mask)
        node += _NODE_HEAD
        node += b"".join(slots)
        return self.finish(path, node)


class _EmptyReader:
    """A store with nothing in it, for ``compute_root``."""

    def get(self, key: bytes) -> bytes | None:
        return None

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Any:
        return iter(())


class StateTree:
    """The versioned state tree over the records under ``prefix`` in ``reader``.

    ``reader`` is anything with ``get``/``iterate`` (``node.storage.api.KVReader``): the live
    database for the chain service, or a snapshot for a reader in another thread.

    The node cache is a plain dict in insertion order, evicted first-in first-out in bulk (an
    eighth of its size at a time) when it outgrows ``cache_nodes``: every block re-inserts the
    nodes on its changed paths (their new versions), so the hot upper levels stay young, and a
    hit costs one dict lookup (no LRU reordering).
    """

    def __init__(
        self, reader: KVReader, prefix: bytes = b"T", *, cache_nodes: int = DEFAULT_CACHE_NODES
    ) -> None:
        self._reader = reader
        self.prefix = bytes(prefix)
        self._node_prefix = self.prefix + b"N"
        self._leaf_prefix = self.prefix + b"L"
        self._root_prefix = self.prefix + b"R"
        self._stale_prefix = self.prefix + b"S"
        self._latest_key = self.prefix + b"H"
        self._pruned_key = self.prefix + b"P"
        self._cache: dict[bytes, _Node] = {}
        self._cache_nodes = max(0, cache_nodes)

    # Overridden only by tests that need chosen key hashes (long shared prefixes); the tree's
    # semantics are sha256(state_key).
    @staticmethod
    def _hash_key(key: bytes) -> bytes:
        return _sha256(key).digest()

    # --- heights -----------------------------------------------------------------------------

    def latest_height(self) -> int | None:
        """The height of the latest committed tree, or None before the first ``apply``."""
        raw = self._reader.get(self._latest_key)
        return None if raw is None else self._decode_u64(raw, "latest height")

    def pruned_before(self) -> int:
        """Heights below this were pruned (0 when nothing was)."""
        raw = self._reader.get(self._pruned_key)
        return 0 if raw is None else self._decode_u64(raw, "pruned height")

    def root_at(self, height: int) -> Hash32:
        slot = self._root_slot(height)
        return ZERO_HASH if slot is _NIL else Hash32(slot[3:35])

    # --- reads -------------------------------------------------------------------------------

    def get(self, height: int, key: bytes) -> bytes | None:
        """The value of ``key`` in the state at ``height`` (None if absent)."""
        key_hash = self._hash_key(key)
        slot = self._root_slot(height)
        path = b""
        depth = 0
        while slot is not _NIL:
            if len(slot) == _LEAF_LEN:
                if not slot.endswith(key_hash):
                    return None
                return self._read_leaf(slot, key)
            node = self._load_node(slot, path)
            nib = (key_hash[depth >> 1] >> (0 if depth & 1 else 4)) & 15
            slot = _slot_of(node, nib)
            path += _NIBBLE[nib]
            depth += 1
        return None

    def get_proof(self, height: int, key: bytes) -> tuple[bytes | None, SmtProof]:
        """The value of ``key`` at ``height`` and its (non-)inclusion proof against that root."""
        key_hash = self._hash_key(key)
        slot = self._root_slot(height)
        siblings: list[bytes] = []
        path = b""
        depth = 0
        leaf: _Slot | None = None
        while slot is not _NIL:
            if len(slot) == _LEAF_LEN:
                leaf = slot
                break
            heap = self._load_node(slot, path)
            nib = (key_hash[depth >> 1] >> (0 if depth & 1 else 4)) & 15
            idx = 1
            for level in range(4):
                if heap[_KINDS + idx] != _INTERNAL:
                    break
                child = (idx << 1) | ((nib >> (3 - level)) & 1)
                siblings.append(bytes(heap[_HASH[child ^ 1]]))
                idx = child
            kind = heap[_KINDS + idx]
            if kind == _EMPTY:
                break
            if kind == _LEAF:
                # A lone leaf in this part of the node: it sits at this binary depth.
                while idx < 16:
                    idx = idx << 1 if heap[_KINDS + (idx << 1)] != _EMPTY else (idx << 1) | 1
                leaf = _slot_of(heap, idx - 16)
                break
            slot = _slot_of(heap, idx - 16)
            path += _NIBBLE[nib]
            depth += 1
        if leaf is None:
            return None, SmtProof(None, None, tuple(Hash32(s) for s in siblings))
        stored_key, value = self._read_leaf_record(leaf)
        proof = SmtProof(
            Hash32(leaf[-32:]),
            Hash32(_sha256(value).digest()),
            tuple(Hash32(s) for s in siblings),
        )
        return (value if stored_key == key else None), proof

    # --- writes (as updates for the caller's batch) -------------------------------------------

    def apply(self, height: int, changes: Mapping[bytes, bytes | None]) -> TreeUpdate:
        """The records that take the latest tree to ``height`` with ``changes`` (None deletes).

        Reads the latest committed tree and writes nothing; ``height`` must be the latest + 1
        (any height ≥ 0 for the first). Calling it again for the same height is allowed
        (speculative execution); only the update whose batch is committed counts.
        """
        latest = self.latest_height()
        if latest is None:
            if not 0 <= height <= UINT64_MAX:
                raise TreeHeightError(f"height {height} is not a uint64")
            previous = _NIL
        else:
            if height != latest + 1:
                raise TreeHeightError(f"cannot apply height {height} on top of {latest}")
            previous = self._root_slot(latest)
        # The per-key work runs as C-level map() pipelines: one Python step per change is the
        # bulk of this part otherwise.
        sha = _sha256
        if type(self)._hash_key is StateTree._hash_key:
            hashed = list(map(_digest, map(sha, changes)))
        else:
            hashed = list(map(self._hash_key, changes))
        # Sorted by key hash, through an index order: no tuple per change (tuples are tracked by
        # the cyclic collector, and enough of them trigger collections during the update).
        order = sorted(range(len(hashed)), key=hashed.__getitem__)
        key_hashes: list[bytes] = list(map(hashed.__getitem__, order))
        keys: list[bytes] = list(map(list(changes).__getitem__, order))
        values: list[bytes | None] = list(map(list(changes.values()).__getitem__, order))
        version = _u64(height)
        leaf_tail = _VERSION_TAG + version + _KEY_HASH_TAG
        # A leaf's hash: sha256(0x00 || key_hash || sha256(value)); b"" for a deletion.
        leaf_hashes: list[bytes]
        new_slots: list[_Slot | None]
        if None in values:
            leaf_hashes = [
                b"" if v is None else sha(b"\x00" + kh + sha(v).digest()).digest()
                for kh, v in zip(key_hashes, values, strict=True)
            ]
            new_slots = [
                None if v is None else _SLOT_HEAD + lh + leaf_tail + kh
                for kh, v, lh in zip(key_hashes, values, leaf_hashes, strict=True)
            ]
        else:
            value_hashes = map(_digest, map(sha, values))  # type: ignore[arg-type]
            preimages = map(bytes.__add__, map(_LEAF_TAG.__add__, key_hashes), value_hashes)
            leaf_hashes = list(map(_digest, map(sha, preimages)))
            new_slots = list(
                map(
                    bytes.__add__,
                    map(bytes.__add__, map(_SLOT_HEAD.__add__, leaf_hashes), repeat(leaf_tail)),
                    key_hashes,
                )
            )
        updater = _Updater(self, height, key_hashes, keys, values, leaf_hashes, new_slots)
        root = updater.update(previous, 0, b"", 0, len(order)) if order else previous
        puts = updater.puts
        nodes = updater.nodes
        # The node records: each node's record part, copied out in one C-level pass.
        puts.update(zip(nodes, map(bytes, map(_record_of, nodes.values())), strict=True))
        puts[self._root_prefix + version] = root
        puts[self._latest_key] = pack(height)
        stale_prefix = self._stale_prefix + version
        if latest is not None:
            puts[stale_prefix + b"R" + _u64(latest)] = b""
        stale = updater.stale_nodes + updater.stale_leaves
        for chunk, at in enumerate(range(0, len(stale), _STALE_CHUNK)):
            puts[stale_prefix + b"B" + chunk.to_bytes(4, "big")] = updater.pack(
                stale[at : at + _STALE_CHUNK]
            )
        return TreeUpdate(
            height=height,
            root=ZERO_HASH if root is _NIL else Hash32(root[3:35]),
            puts=puts,
            deletes=[],
            nodes=updater.nodes,
            retired=updater.stale_nodes,
        )

    def prune(self, keep_from_height: int) -> TreeUpdate:
        """The deletes that drop every record only needed by heights below ``keep_from_height``.

        Proofs and reads at heights ≥ ``keep_from_height`` keep working. The height is capped
        at the latest (the latest tree is never pruned).
        """
        latest = self.latest_height()
        if latest is None:
            return TreeUpdate(height=-1, root=ZERO_HASH, puts={}, deletes=[])
        root = self.root_at(latest)
        keep = min(keep_from_height, latest)
        if keep <= self.pruned_before():
            return TreeUpdate(height=latest, root=root, puts={}, deletes=[])
        deletes: list[bytes] = []
        skip = len(self._stale_prefix) + 8
        # A record made stale at s belongs only to trees at heights < s; s ≤ keep is disposable.
        for entry, value in self._reader.iterate(
            start=self._stale_prefix, stop=self._stale_prefix + _u64(keep + 1)
        ):
            deletes.append(entry)
            tag = entry[skip : skip + 1]
            if tag == b"B":
                deletes.extend(self._decode_stale_batch(value))
            elif tag == b"R":  # the root slot record of the previous height
                deletes.append(self.prefix + entry[skip:])
            else:
                raise CorruptDatabase("state tree stale index entry of an unknown kind")
        return TreeUpdate(
            height=latest, root=root, puts={self._pruned_key: pack(keep)}, deletes=deletes
        )

    def committed(self, update: TreeUpdate) -> None:
        """Tell the tree that ``update``'s batch is durable: cache its nodes, forget deleted."""
        cache = self._cache
        if cache:
            # map() runs the loop in C; the popped nodes are freed here.
            deque(map(cache.pop, update.retired, repeat(None)), maxlen=0)
            deque(map(cache.pop, update.deletes, repeat(None)), maxlen=0)
        if self._cache_nodes:
            cache.update(update.nodes)
            if len(cache) > self._cache_nodes:
                self._evict()

    # --- internals -----------------------------------------------------------------------------

    def _evict(self) -> None:
        """Drop the oldest entries, down to 7/8 of the cache's capacity (in one pass)."""
        cache = self._cache
        excess = len(cache) - self._cache_nodes + self._cache_nodes // 8
        for key in list(islice(cache, excess)):
            del cache[key]

    def _decode_u64(self, raw: bytes, what: str) -> int:
        try:
            value = unpack_canonical(raw)
        except DecodeError as exc:
            raise CorruptDatabase(f"state tree {what}: {exc.message}") from exc
        if type(value) is not int or not 0 <= value <= UINT64_MAX:
            raise CorruptDatabase(f"state tree {what} is not a uint64")
        return value

    def _decode_stale_batch(self, raw: bytes) -> list[bytes]:
        try:
            keys = unpack_canonical(raw, max_size=len(raw))
        except DecodeError as exc:
            raise CorruptDatabase(f"state tree stale index: {exc.message}") from exc
        prefix = self.prefix
        if type(keys) is not tuple or not all(
            type(k) is bytes and k.startswith(prefix) for k in keys
        ):
            raise CorruptDatabase("state tree stale index is not a list of tree keys")
        return list(keys)

    def _root_slot(self, height: int) -> _Slot:
        if type(height) is not int or not 0 <= height <= UINT64_MAX:
            raise NotFound(f"no state tree at height {height!r}")
        raw = self._reader.get(self._root_prefix + _u64(height))
        if raw is None:
            latest = self.latest_height()
            if latest is None or height > latest:
                raise NotFound(f"no state tree at height {height} (latest is {latest})")
            pruned = self.pruned_before()
            if height < pruned:
                raise HistoryPruned(f"state at height {height} was pruned (kept from {pruned})")
            raise NotFound(f"no state tree at height {height} (before the first height)")
        return _decode_slot(raw)

    def _fetch_node(self, key: bytes, slot: _Slot) -> _Node:
        """The node record ``key`` (the internal-node ``slot`` points at) from the store."""
        raw = self._reader.get(key)
        if raw is None:
            version = int.from_bytes(slot[36:44], "big")
            raise CorruptDatabase(f"state tree node missing at version {version}")
        node = _decode_node(raw, slot)
        if self._cache_nodes:
            # Committed records are immutable under their versioned key, so caching is safe.
            cache = self._cache
            cache[key] = node
            if len(cache) > self._cache_nodes:
                self._evict()
        return node

    def _load_node(self, slot: _Slot, path: bytes) -> _Node:
        key = self._node_prefix + slot[36:44] + path
        node = self._cache.get(key)
        return self._fetch_node(key, slot) if node is None else node

    def _read_leaf_record(self, slot: _Slot) -> tuple[bytes, bytes]:
        key_hash = slot[-32:]
        raw = self._reader.get(self._leaf_prefix + key_hash + slot[36:44])
        if raw is None:
            version = int.from_bytes(slot[36:44], "big")
            raise CorruptDatabase(f"state tree leaf missing at version {version}")
        try:
            # Our own record, written from a value the state accepted: no size cap beyond it.
            tree = unpack_canonical(raw, max_size=len(raw))
        except DecodeError as exc:
            raise CorruptDatabase(f"state tree leaf: {exc.message}") from exc
        if (
            type(tree) is not tuple
            or len(tree) != 2
            or type(tree[0]) is not bytes
            or type(tree[1]) is not bytes
        ):
            raise CorruptDatabase("state tree leaf is not [key, value]")
        stored_key, value = tree
        leaf_hash = _sha256(b"\x00" + key_hash + _sha256(value).digest()).digest()
        if self._hash_key(stored_key) != key_hash or not slot.startswith(leaf_hash, 3):
            raise CorruptDatabase("state tree leaf does not match its hash")
        return stored_key, value

    def _read_leaf(self, slot: _Slot, key: bytes) -> bytes | None:
        stored_key, value = self._read_leaf_record(slot)
        return value if stored_key == key else None


def compute_root(pairs: Mapping[bytes, bytes]) -> Hash32:
    """The state root of a key → value map, computed from scratch (genesis, tests)."""
    return StateTree(_EmptyReader(), cache_nodes=0).apply(0, pairs).root
