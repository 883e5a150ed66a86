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
for the internal nodes on changed paths (version ``h``) and records the replaced ones in a stale
index, so the tree of every retained height stays readable. All keys start with the tree's
``prefix`` (``P``); integers are 8-byte big-endian:

* ``P "N" version path`` → internal node: msgpack array of 16 slots, each ``nil`` or
  ``[hash: bin32, version: uint, key_hash: bin32 | nil]`` (``key_hash`` set: the slot is a leaf
  created at ``version``; nil: a child internal node created at ``version``). ``path`` is the
  node's nibble path, one byte (0..15) per nibble, empty for the root node.
* ``P "L" key_hash version`` → leaf: msgpack ``[state_key: bin, value: bin]`` set at ``version``.
  A leaf's record does not move when neighbours make its position deeper or shallower.
* ``P "R" height`` → the tree's root slot at ``height``: ``nil`` (empty tree) or a slot as above.
* ``P "S" stale_since key_without_P`` → ``b""``: the record ``P key_without_P`` is not part of
  the trees at heights ≥ ``stale_since`` (a replaced node or leaf, or the root slot of the
  previous height).
* ``P "H"`` → uint: the latest height. ``P "P"`` → uint: heights below it were pruned.

``apply`` never writes: it returns a ``TreeUpdate`` (puts and deletes) that the caller adds to the
atomic batch committing the block, so a crash before that batch leaves the tree at the previous
height. ``committed(update)`` afterwards only feeds the bounded in-memory cache of decoded nodes;
it is an optimisation, not needed for correctness. Speculative ``apply`` calls (validators
executing a proposal before it is decided) may be made and discarded freely.

A ``StateTree`` instance and its cache belong to one thread (the chain service). Readers in
other threads (RPC) make their own ``StateTree`` over a storage snapshot.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
_ZERO = bytes(ZERO_HASH)
_NIBBLE = [bytes((n,)) for n in range(16)]

# A slot: (hash, version, key_hash) for a leaf, (hash, version, None) for an internal node.
_Slot = tuple[bytes, int, bytes | None]

# Kinds of a position in a node's binary heap.
_EMPTY, _LEAF, _INTERNAL = 0, 1, 2


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


# A decoded internal node: (heap, kinds, slots). ``heap`` holds 32 hashes of 32 bytes and ``kinds``
# their kinds, heap-ordered: position 1 is the node's root, ``2i``/``2i+1`` are the children of
# ``i``, positions 16..31 the 16 slots. The 15 inner hashes are kept so that an update rehashes
# only the paths above changed slots. A plain tuple of bytearrays and a tuple of slot tuples,
# because CPython's collector untracks tuples that hold no containers: tens of thousands of cached
# nodes then cost a full collection nothing (a class with a list of slots cost ~50 ms per pass).
_Node = tuple[bytearray, bytearray, tuple[_Slot | None, ...]]

_ONE_ZERO = b"\x01" + _ZERO
_CLIMB = {s: (s >> 1, s >> 2, s >> 3, 1) for s in range(16, 32)}
_ALL_POSITIONS = tuple(range(15, 0, -1))


def _positions_above(dirty: list[int]) -> Iterable[int]:
    """Heap positions above the ``dirty`` slots, each once, children before parents."""
    if len(dirty) == 1:
        return _CLIMB[dirty[0]]
    above: set[int] = set()
    for s in dirty:
        i = s >> 1
        while i and i not in above:
            above.add(i)
            i >>= 1
    return sorted(above, reverse=True)  # 2i and 2i+1 come before i


def _rehash(heap: bytearray, kinds: bytearray, positions: Iterable[int]) -> None:
    """Recompute heap ``positions`` (children first) with the compact-collapse rule."""
    sha = _sha256
    for i in positions:
        left = i << 1
        kl = kinds[left]
        kr = kinds[left + 1]
        at = i << 5
        lo = left << 5
        if kl == _EMPTY:
            if kr == _INTERNAL:
                heap[at : at + 32] = sha(_ONE_ZERO + heap[lo + 32 : lo + 64]).digest()
            else:  # empty, or a lone leaf that moves up (compact collapse)
                heap[at : at + 32] = heap[lo + 32 : lo + 64]
            kinds[i] = kr
        elif kr == _EMPTY:
            if kl == _INTERNAL:
                heap[at : at + 32] = sha(b"\x01" + heap[lo : lo + 32] + _ZERO).digest()
            else:
                heap[at : at + 32] = heap[lo : lo + 32]
            kinds[i] = kl
        else:
            heap[at : at + 32] = sha(b"\x01" + heap[lo : lo + 64]).digest()
            kinds[i] = _INTERNAL


def _set_slot(heap: bytearray, kinds: bytearray, s: int, slot: _Slot | None) -> None:
    at = s << 5
    if slot is None:
        heap[at : at + 32] = _ZERO
        kinds[s] = _EMPTY
    else:
        heap[at : at + 32] = slot[0]
        kinds[s] = _INTERNAL if slot[2] is None else _LEAF


def _decode_slot(item: Any) -> _Slot | None:
    if item is None:
        return None
    if type(item) is not tuple or len(item) != 3:
        raise CorruptDatabase("state tree slot is not a 3-array")
    h, version, key_hash = item
    if type(h) is not bytes or len(h) != 32:
        raise CorruptDatabase("state tree slot hash is not 32 bytes")
    if type(version) is not int or not 0 <= version <= UINT64_MAX:
        raise CorruptDatabase("state tree slot version is not a uint64")
    if key_hash is not None and (type(key_hash) is not bytes or len(key_hash) != 32):
        raise CorruptDatabase("state tree slot key hash is not 32 bytes")
    return (h, version, key_hash)


def _decode_node(raw: bytes, expected_hash: bytes) -> _Node:
    try:
        tree = unpack_canonical(raw)
    except DecodeError as exc:
        raise CorruptDatabase(f"state tree node: {exc.message}") from exc
    if type(tree) is not tuple or len(tree) != 16:
        raise CorruptDatabase("state tree node is not a 16-array")
    slots = tuple([_decode_slot(item) for item in tree])
    heap = bytearray(1024)
    kinds = bytearray(32)
    for n, slot in enumerate(slots):
        _set_slot(heap, kinds, 16 + n, slot)
    _rehash(heap, kinds, _ALL_POSITIONS)
    if kinds[1] != _INTERNAL or heap[32:64] != expected_hash:
        raise CorruptDatabase("state tree node does not match its hash")
    return (heap, kinds, slots)


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


class _Updater:
    """One block's batch update: walks the sorted changed key hashes down the previous tree.

    Every internal node on a changed path is loaded once, its changed slots are updated by
    recursion over the contiguous run of key hashes under each nibble, and its heap is rehashed
    once over all of them, so shared paths are hashed once per block.
    """

    __slots__ = (
        "height",
        "key_hashes",
        "keys",
        "leaf_hashes",
        "leaf_prefix",
        "new_node_prefix",
        "node_prefix",
        "nodes",
        "pack",
        "puts",
        "retired",
        "stale_node_prefix",
        "stale_prefix",
        "tree",
        "values",
        "version",
    )

    def __init__(
        self,
        tree: StateTree,
        height: int,
        key_hashes: list[bytes],
        keys: list[bytes],
        values: list[bytes | None],
        leaf_hashes: list[bytes | None],
    ) -> None:
        self.tree = tree
        self.height = height
        self.version = _u64(height)
        self.key_hashes = key_hashes
        self.keys = keys
        self.values = values
        self.leaf_hashes = leaf_hashes
        prefix = tree.prefix
        self.node_prefix = prefix + b"N"
        self.new_node_prefix = self.node_prefix + self.version
        self.leaf_prefix = prefix + b"L"
        self.stale_prefix = prefix + b"S" + self.version
        self.stale_node_prefix = self.stale_prefix + b"N"
        self.puts: dict[bytes, bytes] = {}
        self.nodes: dict[bytes, _Node] = {}
        self.retired: list[bytes] = []
        # One reusable packer: msgpack.packb builds a new one per call, a third of a small
        # node's encoding time.
        self.pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    # --- records ---------------------------------------------------------------------------

    def new_leaf(self, i: int, leaf_hash: bytes) -> _Slot:
        key_hash = self.key_hashes[i]
        self.puts[self.leaf_prefix + key_hash + self.version] = self.pack(
            (self.keys[i], self.values[i])
        )
        return (leaf_hash, self.height, key_hash)

    def stale_leaf(self, key_hash: bytes, version: int) -> None:
        self.puts[self.stale_prefix + b"L" + key_hash + _u64(version)] = b""

    def finish(
        self,
        old: _Slot | None,
        path: bytes,
        heap: bytearray,
        kinds: bytearray,
        slots: list[_Slot | None],
    ) -> _Slot | None:
        """The slot for a rehashed node: empty, its lone leaf (collapse), or a new node record.

        ``old`` is the internal node it replaces (None for a fresh one), now stale.
        """
        if old is not None:
            suffix = _u64(old[1]) + path
            self.puts[self.stale_node_prefix + suffix] = b""
            self.retired.append(self.node_prefix + suffix)
        kind = kinds[1]
        if kind == _EMPTY:
            return None
        if kind == _LEAF:
            for slot in slots:
                if slot is not None:
                    return slot
        key = self.new_node_prefix + path
        frozen = tuple(slots)
        self.puts[key] = self.pack(frozen)
        self.nodes[key] = (heap, kinds, frozen)
        return (bytes(heap[32:64]), self.height, None)

    # --- the walk --------------------------------------------------------------------------

    def update(self, slot: _Slot | None, depth: int, path: bytes, lo: int, hi: int) -> _Slot | None:
        """The new slot for the subtree ``slot`` at nibble ``depth`` given the changes
        ``lo:hi``; returns ``slot`` itself (the same object) when nothing changed."""
        if slot is None:
            leaf_hashes = self.leaf_hashes
            key_hashes = self.key_hashes
            leaves = []
            for i in range(lo, hi):
                leaf_hash = leaf_hashes[i]
                if leaf_hash is not None:  # deleting an absent key changes nothing
                    leaves.append((key_hashes[i], self.new_leaf(i, leaf_hash)))
            return self.build(depth, path, leaves)
        if slot[2] is not None:
            return self.merge_leaf(slot, depth, path, lo, hi)
        old_heap, old_kinds, old_slots = self.tree._load_node(slot, path)
        key_hashes = self.key_hashes
        byte_i = depth >> 1
        shift = 0 if depth & 1 else 4
        if hi - lo == 1:
            # One changed key below this node (most nodes of a block): one slot, one climb.
            nib = (key_hashes[lo][byte_i] >> shift) & 15
            old = old_slots[nib]
            new = self.update(old, depth + 1, path + _NIBBLE[nib], lo, hi)
            if new is old:
                return slot
            heap = old_heap[:]
            kinds = old_kinds[:]
            slots = list(old_slots)
            slots[nib] = new
            _set_slot(heap, kinds, 16 + nib, new)
            _rehash(heap, kinds, _CLIMB[16 + nib])
            return self.finish(slot, path, heap, kinds, slots)
        changed: list[tuple[int, _Slot | None]] = []
        i = lo
        while i < hi:
            nib = (key_hashes[i][byte_i] >> shift) & 15
            j = i + 1
            while j < hi and (key_hashes[j][byte_i] >> shift) & 15 == nib:
                j += 1
            old = old_slots[nib]
            new = self.update(old, depth + 1, path + _NIBBLE[nib], i, j)
            if new is not old:
                changed.append((nib, new))
            i = j
        if not changed:
            return slot
        heap = old_heap[:]
        kinds = old_kinds[:]
        slots = list(old_slots)
        dirty = []
        for nib, new in changed:
            slots[nib] = new
            _set_slot(heap, kinds, 16 + nib, new)
            dirty.append(16 + nib)
        _rehash(heap, kinds, _positions_above(dirty))
        return self.finish(slot, path, heap, kinds, slots)

    def merge_leaf(self, slot: _Slot, depth: int, path: bytes, lo: int, hi: int) -> _Slot | None:
        """Changes landing on a slot that holds one leaf: rebuild that subtree from the union."""
        existing = slot[2]
        assert existing is not None
        key_hashes = self.key_hashes
        leaf_hashes = self.leaf_hashes
        if hi - lo == 1 and key_hashes[lo] == existing:
            # The common case of a block of transfers: one existing key rewritten.
            leaf_hash = leaf_hashes[lo]
            if leaf_hash == slot[0]:
                return slot
            self.stale_leaf(existing, slot[1])
            return None if leaf_hash is None else self.new_leaf(lo, leaf_hash)
        leaves: list[tuple[bytes, _Slot]] = []
        placed = False
        for i in range(lo, hi):
            key_hash = key_hashes[i]
            leaf_hash = leaf_hashes[i]
            if key_hash == existing:
                placed = True
                if leaf_hash == slot[0]:
                    leaves.append((key_hash, slot))  # rewritten with the same value
                else:
                    self.stale_leaf(existing, slot[1])
                    if leaf_hash is not None:
                        leaves.append((key_hash, self.new_leaf(i, leaf_hash)))
                continue
            if not placed and key_hash > existing:
                leaves.append((existing, slot))
                placed = True
            if leaf_hash is not None:
                leaves.append((key_hash, self.new_leaf(i, leaf_hash)))
        if not placed:
            leaves.append((existing, slot))
        return self.build(depth, path, leaves)

    def build(self, depth: int, path: bytes, leaves: list[tuple[bytes, _Slot]]) -> _Slot | None:
        """A fresh subtree at ``path`` over ``leaves`` (sorted by key hash)."""
        n = len(leaves)
        if n == 0:
            return None
        if n == 1:
            return leaves[0][1]
        heap = bytearray(1024)
        kinds = bytearray(32)
        slots: list[_Slot | None] = [None] * 16
        byte_i = depth >> 1
        shift = 0 if depth & 1 else 4
        dirty = []
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
                sub = self.build(depth + 1, path + _NIBBLE[nib], leaves[i:j])
                assert sub is not None
                child = sub
            slots[nib] = child
            _set_slot(heap, kinds, 16 + nib, child)
            dirty.append(16 + nib)
            i = j
        _rehash(heap, kinds, _positions_above(dirty))
        return self.finish(None, path, heap, kinds, slots)


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
        self._cache: OrderedDict[bytes, _Node] = OrderedDict()
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
        return ZERO_HASH if slot is None else Hash32(slot[0])

    # --- reads -------------------------------------------------------------------------------

    def get(self, height: int, key: bytes) -> bytes | None:
        """The value of ``key`` in the state at ``height`` (None if absent)."""
        key_hash = self._hash_key(key)
        slot = self._root_slot(height)
        path = b""
        depth = 0
        while slot is not None:
            if slot[2] is not None:
                if slot[2] != key_hash:
                    return None
                return self._read_leaf(slot, key)
            node = self._load_node(slot, path)
            nib = (key_hash[depth >> 1] >> (0 if depth & 1 else 4)) & 15
            slot = node[2][nib]
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
        while slot is not None:
            if slot[2] is not None:
                leaf = slot
                break
            node = self._load_node(slot, path)
            nib = (key_hash[depth >> 1] >> (0 if depth & 1 else 4)) & 15
            heap, kinds, slots = node
            idx = 1
            for level in range(4):
                if kinds[idx] != _INTERNAL:
                    break
                child = (idx << 1) | ((nib >> (3 - level)) & 1)
                sibling = (child ^ 1) << 5
                siblings.append(bytes(heap[sibling : sibling + 32]))
                idx = child
            kind = kinds[idx]
            if kind == _EMPTY:
                break
            if kind == _LEAF:
                # A lone leaf in this part of the node: it sits at this binary depth.
                while idx < 16:
                    idx = idx << 1 if kinds[idx << 1] != _EMPTY else (idx << 1) | 1
                leaf = slots[idx - 16]
                break
            slot = slots[idx - 16]
            path += _NIBBLE[nib]
            depth += 1
        if leaf is None:
            return None, SmtProof(None, None, tuple(Hash32(s) for s in siblings))
        assert leaf[2] is not None
        stored_key, value = self._read_leaf_record(leaf)
        proof = SmtProof(
            Hash32(leaf[2]),
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
            previous: _Slot | None = None
        else:
            if height != latest + 1:
                raise TreeHeightError(f"cannot apply height {height} on top of {latest}")
            previous = self._root_slot(latest)
        hash_key = self._hash_key
        sha = _sha256
        items = sorted((hash_key(k), k, v) for k, v in changes.items())
        key_hashes = [it[0] for it in items]
        keys = [it[1] for it in items]
        values = [it[2] for it in items]
        leaf_hashes = [
            None if v is None else sha(b"\x00" + kh + sha(v).digest()).digest()
            for kh, _, v in items
        ]
        updater = _Updater(self, height, key_hashes, keys, values, leaf_hashes)
        root = updater.update(previous, 0, b"", 0, len(items)) if items else previous
        puts = updater.puts
        version = _u64(height)
        puts[self._root_prefix + version] = pack(root)
        puts[self._latest_key] = pack(height)
        if latest is not None:
            puts[self._stale_prefix + version + b"R" + _u64(latest)] = b""
        return TreeUpdate(
            height=height,
            root=ZERO_HASH if root is None else Hash32(root[0]),
            puts=puts,
            deletes=[],
            nodes=updater.nodes,
            retired=updater.retired,
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
        for entry, _ in self._reader.iterate(
            start=self._stale_prefix, stop=self._stale_prefix + _u64(keep + 1)
        ):
            deletes.append(entry)
            deletes.append(self.prefix + entry[skip:])
        return TreeUpdate(
            height=latest, root=root, puts={self._pruned_key: pack(keep)}, deletes=deletes
        )

    def committed(self, update: TreeUpdate) -> None:
        """Tell the tree that ``update``'s batch is durable: cache its nodes, forget deleted."""
        cache = self._cache
        for key in update.deletes:
            cache.pop(key, None)
        for key in update.retired:
            cache.pop(key, None)
        if not self._cache_nodes:
            return
        for key, node in update.nodes.items():
            cache[key] = node
        while len(cache) > self._cache_nodes:
            cache.popitem(last=False)

    # --- internals -----------------------------------------------------------------------------

    def _decode_u64(self, raw: bytes, what: str) -> int:
        try:
            value = unpack_canonical(raw)
        except DecodeError as exc:
            raise CorruptDatabase(f"state tree {what}: {exc.message}") from exc
        if type(value) is not int or not 0 <= value <= UINT64_MAX:
            raise CorruptDatabase(f"state tree {what} is not a uint64")
        return value

    def _root_slot(self, height: int) -> _Slot | None:
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
        try:
            tree = unpack_canonical(raw)
        except DecodeError as exc:
            raise CorruptDatabase(f"state tree root: {exc.message}") from exc
        return _decode_slot(tree)

    def _load_node(self, slot: _Slot, path: bytes) -> _Node:
        key = self._node_prefix + _u64(slot[1]) + path
        cache = self._cache
        node = cache.get(key)
        if node is not None:
            cache.move_to_end(key)
            return node
        raw = self._reader.get(key)
        if raw is None:
            raise CorruptDatabase(f"state tree node missing at version {slot[1]}")
        node = _decode_node(raw, slot[0])
        if self._cache_nodes:
            # Committed records are immutable under their versioned key, so caching is safe.
            cache[key] = node
            if len(cache) > self._cache_nodes:
                cache.popitem(last=False)
        return node

    def _read_leaf_record(self, slot: _Slot) -> tuple[bytes, bytes]:
        key_hash = slot[2]
        assert key_hash is not None
        raw = self._reader.get(self._leaf_prefix + key_hash + _u64(slot[1]))
        if raw is None:
            raise CorruptDatabase(f"state tree leaf missing at version {slot[1]}")
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
        if self._hash_key(stored_key) != key_hash or leaf_hash != slot[0]:
            raise CorruptDatabase("state tree leaf does not match its hash")
        return stored_key, value

    def _read_leaf(self, slot: _Slot, key: bytes) -> bytes | None:
        stored_key, value = self._read_leaf_record(slot)
        return value if stored_key == key else None


def compute_root(pairs: Mapping[bytes, bytes]) -> Hash32:
    """The state root of a key → value map, computed from scratch (genesis, tests)."""
    return StateTree(_EmptyReader(), cache_nodes=0).apply(0, pairs).root
