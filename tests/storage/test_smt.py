"""The versioned state tree: roots against an independent reference, proofs, history, pruning."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import lightclient
from node.errors import CorruptDatabase, HistoryPruned, NotFound, ProofError
from node.storage.smt import (
    SmtProof,
    StateTree,
    TreeHeightError,
    TreeUpdate,
    compute_root,
    verify_proof,
)
from node.types import Hash32

ZERO = b"\x00" * 32
VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- a minimal ordered in-memory store with atomic batches ------------------------------------


class DictKV:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def iterate(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        for key in sorted(self.data, reverse=reverse):
            if prefix is not None and not key.startswith(prefix):
                continue
            if (start is not None and key < start) or (stop is not None and key >= stop):
                continue
            yield key, self.data[key]

    def batch(self) -> DictBatch:
        return DictBatch(self)


class DictBatch:
    def __init__(self, kv: DictKV) -> None:
        self.kv = kv
        self.ops: list[tuple[bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append((key, value))

    def delete(self, key: bytes) -> None:
        self.ops.append((key, None))

    def commit(self, *, sync: bool = True) -> None:
        for key, value in self.ops:
            if value is None:
                self.kv.data.pop(key, None)
            else:
                self.kv.data[key] = value


def commit(tree: StateTree, kv: DictKV, update: TreeUpdate) -> None:
    batch = kv.batch()
    update.write_to(batch)
    batch.commit()
    tree.committed(update)


# --- an independent reference: the binary compact tree, recursively from the definition -------


def bit(key_hash: bytes, i: int) -> int:
    return (key_hash[i >> 3] >> (7 - (i & 7))) & 1


def ref_root_hashed(leaves: Mapping[bytes, bytes], depth: int = 0) -> bytes:
    """Root over key_hash -> leaf_hash: empty = zero, one leaf = that leaf, else split by bit."""
    if not leaves:
        return ZERO
    if len(leaves) == 1:
        return next(iter(leaves.values()))
    left = {k: v for k, v in leaves.items() if not bit(k, depth)}
    right = {k: v for k, v in leaves.items() if bit(k, depth)}
    return sha(b"\x01" + ref_root_hashed(left, depth + 1) + ref_root_hashed(right, depth + 1))


def ref_root(pairs: Mapping[bytes, bytes]) -> bytes:
    return ref_root_hashed({sha(k): sha(b"\x00" + sha(k) + sha(v)) for k, v in pairs.items()})


class RawKeyTree(StateTree):
    """Keys are their own 32-byte key hashes, so tests can choose long shared prefixes."""

    @staticmethod
    def _hash_key(key: bytes) -> bytes:
        return key


def ref_root_raw(pairs: Mapping[bytes, bytes]) -> bytes:
    return ref_root_hashed({k: sha(b"\x00" + k + sha(v)) for k, v in pairs.items()})


def apply_all(
    tree: StateTree, kv: DictKV, blocks: list[dict[bytes, bytes | None]], first: int = 0
) -> list[dict[bytes, bytes]]:
    """Apply and commit each block; the full state after each height."""
    states = []
    state: dict[bytes, bytes] = {}
    for offset, changes in enumerate(blocks):
        update = tree.apply(first + offset, changes)
        commit(tree, kv, update)
        for k, v in changes.items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
        states.append(dict(state))
        assert update.root == ref_root(state)
    return states


# --- strategies --------------------------------------------------------------------------------

# A small key space so that blocks update and delete keys inserted earlier.
keys_st = st.binary(min_size=0, max_size=3)
values_st = st.binary(min_size=0, max_size=8)
change_st = st.one_of(st.none(), values_st)
blocks_st = st.lists(st.dictionaries(keys_st, change_st, max_size=25), min_size=1, max_size=6)


# --- deterministic cases -------------------------------------------------------------------


def test_empty_tree_root_and_non_inclusion() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    assert tree.latest_height() is None
    with pytest.raises(NotFound):
        tree.root_at(0)
    update = tree.apply(0, {})
    assert update.root == ZERO
    commit(tree, kv, update)
    assert tree.root_at(0) == ZERO
    value, proof = tree.get_proof(0, b"anything")
    assert value is None
    assert proof == SmtProof(None, None, ())
    lightclient.verify_non_inclusion(ZERO, b"anything", proof.encode())
    with pytest.raises(lightclient.ProofError):
        lightclient.verify_inclusion(ZERO, b"anything", b"", proof.encode())
    assert compute_root({}) == ZERO


def test_single_key_root_is_its_leaf() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(5, {b"alice": b"100"}))
    leaf = sha(b"\x00" + sha(b"alice") + sha(b"100"))
    assert tree.root_at(5) == leaf
    value, proof = tree.get_proof(5, b"alice")
    assert value == b"100"
    assert proof == SmtProof(sha(b"alice"), sha(b"100"), ())  # type: ignore[arg-type]
    verify_proof(leaf, b"alice", b"100", proof)
    # Any other key is shown absent by the same lone leaf.
    value, other = tree.get_proof(5, b"bob")
    assert value is None and other == proof
    verify_proof(leaf, b"bob", None, other)
    with pytest.raises(ProofError):
        verify_proof(leaf, b"alice", None, proof)
    with pytest.raises(ProofError):
        verify_proof(leaf, b"alice", b"101", proof)


def test_two_keys_sharing_40_bits() -> None:
    # Found by a birthday search: their sha256 agree on exactly the first 40 bits.
    a, b = b"acct-652601", b"acct-1522750"
    ha, hb = sha(a), sha(b)
    assert (int.from_bytes(ha, "big") ^ int.from_bytes(hb, "big")).bit_length() == 256 - 40
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(0, {a: b"1", b: b"2"}))
    root = tree.root_at(0)
    assert root == ref_root({a: b"1", b: b"2"})
    value, proof = tree.get_proof(0, a)
    assert value == b"1"
    assert len(proof.siblings) == 41
    assert proof.siblings[:40] == (ZERO,) * 40
    assert proof.siblings[40] == sha(b"\x00" + hb + sha(b"2"))
    verify_proof(root, a, b"1", proof)
    # Keys that diverge earlier end in an empty subtree or at one of the two leaves.
    for other in (b"x", b"y", b"acct-1"):
        value, proof = tree.get_proof(0, other)
        assert value is None
        verify_proof(root, other, None, proof)
    # Deleting one moves the other back to the root.
    commit(tree, kv, tree.apply(1, {a: None}))
    assert tree.root_at(1) == sha(b"\x00" + hb + sha(b"2"))


def test_keys_sharing_255_bits_sit_at_depth_256() -> None:
    base = bytes(31) + b"\x00"
    twin = bytes(31) + b"\x01"
    kv = DictKV()
    tree = RawKeyTree(kv)
    pairs = {base: b"a", twin: b"b", b"\x80" + bytes(31): b"c"}
    commit(tree, kv, tree.apply(0, pairs))
    root = tree.root_at(0)
    assert root == ref_root_raw(pairs)
    value, proof = tree.get_proof(0, base)
    assert value == b"a"
    assert len(proof.siblings) == 256
    lightclient.verify_proof_hashed(root, base, sha(b"a"), proof.encode())
    # Non-inclusion of a key on the same long path: the path ends in an empty subtree.
    probe = bytes(30) + b"\x00\x02"
    value, proof = tree.get_proof(0, probe)
    assert value is None and proof.leaf_key_hash is None
    lightclient.verify_proof_hashed(root, probe, None, proof.encode())
    # Removing the twin collapses the 255-level chain: the leaf rises to depth 1.
    commit(tree, kv, tree.apply(1, {twin: None}))
    value, proof = tree.get_proof(1, base)
    assert len(proof.siblings) == 1
    assert tree.root_at(1) == ref_root_raw({base: b"a", b"\x80" + bytes(31): b"c"})


def test_delete_back_to_empty() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    keys = [b"k%d" % i for i in range(100)]
    commit(tree, kv, tree.apply(0, {k: k * 2 for k in keys}))
    commit(tree, kv, tree.apply(1, {k: None for k in keys[:50]}))
    assert tree.root_at(1) == ref_root({k: k * 2 for k in keys[50:]})
    commit(tree, kv, tree.apply(2, {k: None for k in keys[50:]}))
    assert tree.root_at(2) == ZERO
    assert tree.get(2, keys[0]) is None
    assert tree.get(0, keys[0]) == keys[0] * 2
    # Once everything older is pruned, only the bookkeeping records remain.
    commit(tree, kv, tree.prune(2))
    assert {k[:2] for k in kv.data} == {b"TR", b"TH", b"TP"}


def test_no_op_changes_write_no_nodes() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(0, {b"k%d" % i: b"v" for i in range(300)}))
    update = tree.apply(1, {b"k7": b"v", b"absent": None})
    assert update.root == tree.root_at(0)
    assert update.nodes == {}
    # Only the bookkeeping: the root slot of height 1, the latest height, and the stale mark
    # (since height 1) on height 0's root slot.
    one, zero = (1).to_bytes(8, "big"), (0).to_bytes(8, "big")
    assert set(update.puts) == {b"TR" + one, b"TH", b"TS" + one + b"R" + zero}


def test_heights_must_follow_the_latest() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(3, {b"a": b"1"}))
    for bad in (3, 5, 2):
        with pytest.raises(TreeHeightError):
            tree.apply(bad, {b"b": b"2"})
    with pytest.raises(NotFound):
        tree.root_at(4)
    with pytest.raises(NotFound):
        tree.get_proof(2, b"a")  # before the first height, never pruned
    with pytest.raises(NotFound):
        tree.root_at(-1)


def test_an_uncommitted_update_leaves_the_tree_at_the_previous_height() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(0, {b"a": b"1", b"b": b"2"}))
    # Two speculative proposals for height 1; the first is never committed (a crash, or
    # another block was decided), and may even be reported to committed() by mistake.
    lost = tree.apply(1, {b"a": b"lost", b"c": b"3", b"d": b"4"})
    tree.committed(lost)
    assert tree.latest_height() == 0
    with pytest.raises(NotFound):
        tree.root_at(1)
    decided = tree.apply(1, {b"b": None, b"e": b"5"})
    commit(tree, kv, decided)
    assert tree.root_at(1) == ref_root({b"a": b"1", b"e": b"5"})
    fresh = StateTree(kv)
    for key in (b"a", b"b", b"c", b"d", b"e"):
        value, proof = fresh.get_proof(1, key)
        assert value == {b"a": b"1", b"e": b"5"}.get(key)
        verify_proof(decided.root, key, value, proof)


def test_pruning_keeps_recent_heights_and_drops_the_rest() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    blocks: list[dict[bytes, bytes | None]] = [{b"k%d" % i: b"v0" for i in range(200)}]
    for h in range(1, 10):
        blocks.append({b"k%d" % (h * 7 + i): b"v%d" % h for i in range(20)})
    blocks.append({b"k%d" % i: None for i in range(0, 200, 3)})
    states = apply_all(tree, kv, blocks)
    size_before = len(kv.data)
    commit(tree, kv, tree.prune(6))
    assert tree.pruned_before() == 6
    assert len(kv.data) < size_before
    for h in range(6):
        with pytest.raises(HistoryPruned):
            tree.root_at(h)
        with pytest.raises(HistoryPruned):
            tree.get_proof(h, b"k1")
    fresh = StateTree(kv, cache_nodes=0)  # everything from the store, nothing from a cache
    for h in range(6, len(blocks)):
        root = fresh.root_at(h)
        assert root == ref_root(states[h])
        for key in [b"k%d" % i for i in range(0, 210, 9)]:
            value, proof = fresh.get_proof(h, key)
            assert value == states[h].get(key) == fresh.get(h, key)
            verify_proof(root, key, value, proof)
    # Pruning again below the mark is a no-op; above the latest it is capped at the latest.
    assert tree.prune(3).deletes == []
    commit(tree, kv, tree.prune(10**6))
    assert tree.pruned_before() == len(blocks) - 1
    assert_only_reachable(fresh, kv, len(blocks) - 1)


def assert_only_reachable(tree: StateTree, kv: DictKV, height: int) -> None:
    """After pruning up to ``height``, the store holds exactly the records of that tree."""
    node_keys = {k for k in kv.data if k[:2] in (b"TN", b"TL")}
    reachable: set[bytes] = set()
    root = msgpack.unpackb(kv.data[b"TR" + height.to_bytes(8, "big")], use_list=False)
    stack = [(root, b"")]
    while stack:
        slot, path = stack.pop()
        if slot is None:
            continue
        _, version, key_hash = slot
        if key_hash is not None:
            reachable.add(b"TL" + key_hash + version.to_bytes(8, "big"))
            continue
        key = b"TN" + version.to_bytes(8, "big") + path
        reachable.add(key)
        for nib, child in enumerate(msgpack.unpackb(kv.data[key], use_list=False)):
            stack.append((child, path + bytes((nib,))))
    assert node_keys == reachable
    assert not [k for k in kv.data if k.startswith(b"TS")]


def test_corrupt_records_are_detected() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(0, {b"k%d" % i: b"v" for i in range(50)}))
    node_key = next(k for k in kv.data if k.startswith(b"TN"))
    slots = list(msgpack.unpackb(kv.data[node_key], use_list=False))
    n = next(i for i, s in enumerate(slots) if s is not None)
    slots[n] = (b"\x11" * 32, *slots[n][1:])
    kv.data[node_key] = msgpack.packb(slots)
    fresh = StateTree(kv)
    with pytest.raises(CorruptDatabase):
        for i in range(50):
            fresh.get(0, b"k%d" % i)
    leaf_key = next(k for k in kv.data if k.startswith(b"TL"))
    kv.data[leaf_key] = msgpack.packb((b"wrong", b"v"))
    with pytest.raises(CorruptDatabase):
        for i in range(50):
            StateTree(kv).get_proof(0, b"k%d" % i)


def test_large_tree_matches_reference_with_and_without_cache() -> None:
    pairs = {sha(b"%d" % i)[:20]: b"%d" % (i * i) for i in range(3000)}
    changes: dict[bytes, bytes | None] = {k: b"new" for k in list(pairs)[::7]}
    changes.update({k: None for k in list(pairs)[1::11]})
    changes.update({b"fresh%d" % i: b"x" for i in range(200)})
    final = {k: v for k, v in {**pairs, **changes}.items() if v is not None}
    roots = []
    for cache_nodes in (0, 16, 100_000):
        kv = DictKV()
        tree = StateTree(kv, cache_nodes=cache_nodes)
        commit(tree, kv, tree.apply(0, pairs))
        commit(tree, kv, tree.apply(1, changes))
        roots.append((tree.root_at(0), tree.root_at(1)))
    assert roots[0] == roots[1] == roots[2]
    assert roots[0] == (ref_root(pairs), ref_root(final))
    assert compute_root(final) == roots[0][1]


# --- properties ------------------------------------------------------------------------------


@given(blocks=blocks_st, data=st.data())
def test_root_depends_only_on_the_final_set(
    blocks: list[dict[bytes, bytes | None]], data: st.DataObject
) -> None:
    kv = DictKV()
    tree = StateTree(kv)
    states = apply_all(tree, kv, blocks)
    final = states[-1]
    # The same final set built in one block, in another order, split differently.
    assert compute_root(final) == tree.root_at(len(blocks) - 1)
    items = data.draw(st.permutations(sorted(final.items())))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(items)), max_size=4)))
    regrouped: list[dict[bytes, bytes | None]] = []
    start = 0
    for cut in [*cuts, len(items)]:
        regrouped.append(dict(items[start:cut]))
        start = cut
    kv2 = DictKV()
    tree2 = StateTree(kv2)
    apply_all(tree2, kv2, regrouped, first=100)
    assert tree2.root_at(100 + len(regrouped) - 1) == tree.root_at(len(blocks) - 1)


@given(blocks=blocks_st, probes=st.lists(keys_st, max_size=8))
def test_every_proof_verifies_at_every_height(
    blocks: list[dict[bytes, bytes | None]], probes: list[bytes]
) -> None:
    kv = DictKV()
    tree = StateTree(kv, cache_nodes=64)
    states = apply_all(tree, kv, blocks)
    universe = set(probes).union(*blocks)
    for h, state in enumerate(states):
        root = tree.root_at(h)
        for key in universe:
            value, proof = tree.get_proof(h, key)
            assert value == state.get(key) == tree.get(h, key)
            raw = proof.encode()
            assert SmtProof.decode(raw) == proof
            lightclient.verify_proof(root, key, value, raw)
            if value is None:
                lightclient.verify_non_inclusion(root, key, raw)
            else:
                lightclient.verify_inclusion(root, key, value, raw)


@given(blocks=blocks_st, keep=st.integers(0, 6), probes=st.lists(keys_st, max_size=4))
def test_proofs_survive_pruning_at_retained_heights(
    blocks: list[dict[bytes, bytes | None]], keep: int, probes: list[bytes]
) -> None:
    kv = DictKV()
    tree = StateTree(kv)
    states = apply_all(tree, kv, blocks)
    commit(tree, kv, tree.prune(keep))
    keep = min(keep, len(blocks) - 1)
    fresh = StateTree(kv)
    universe = set(probes).union(*blocks)
    for h, state in enumerate(states):
        if h < keep:
            with pytest.raises(HistoryPruned):
                fresh.get_proof(h, b"")
            continue
        root = fresh.root_at(h)
        for key in universe:
            value, proof = fresh.get_proof(h, key)
            assert value == state.get(key)
            verify_proof(root, key, value, proof)
    if keep == len(blocks) - 1:
        assert_only_reachable(fresh, kv, keep)


def forgeries(
    root: bytes, key: bytes, value: bytes | None, proof: SmtProof, other_key: bytes
) -> Iterator[tuple[str, bytes, bytes, bytes | None, bytes]]:
    """(what, root, key, value, proof bytes) claims that must all be rejected."""
    raw = proof.encode()
    sibs = proof.siblings

    def with_siblings(siblings: tuple[Hash32, ...]) -> bytes:
        return SmtProof(proof.leaf_key_hash, proof.leaf_value_hash, siblings).encode()

    for i, s in enumerate(sibs):
        flipped = Hash32(bytes([s[0] ^ 1]) + s[1:])
        yield (
            f"flipped sibling {i}",
            root,
            key,
            value,
            with_siblings((*sibs[:i], flipped, *sibs[i + 1 :])),
        )
    if sibs:
        yield "truncated", root, key, value, with_siblings(sibs[:-1])
    yield "extended", root, key, value, with_siblings((*sibs, Hash32(sha(b"x"))))
    yield "extended with empty", root, key, value, with_siblings((*sibs, Hash32(ZERO)))
    yield "wrong value", root, key, (value or b"") + b"!", raw
    yield "other root", sha(root), key, value, raw
    if value is not None:
        yield "claimed absent", root, key, None, raw
    if other_key != key:
        yield "other key", root, other_key, value, raw
    # Non-minimal msgpack for the same proof: an array16 header instead of fixarray(3).
    yield "non-canonical", root, key, value, b"\xdc\x00\x03" + raw[1:]
    yield "trailing byte", root, key, value, raw + b"\x00"


@given(
    pairs=st.dictionaries(keys_st, values_st, min_size=1, max_size=30),
    probe=keys_st,
    other=keys_st,
)
def test_forged_proofs_are_rejected(pairs: dict[bytes, bytes], probe: bytes, other: bytes) -> None:
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(0, dict(pairs)))
    root = tree.root_at(0)
    for key in (probe, next(iter(pairs))):
        value, proof = tree.get_proof(0, key)
        verify_proof(root, key, value, proof)
        other_value = pairs.get(other)
        for what, r, k, v, raw in forgeries(root, key, value, proof, other):
            if what == "other key" and v == other_value:
                # e.g. both absent and shown by the same leaf or empty subtree: a valid proof.
                continue
            with pytest.raises(lightclient.ProofError):
                lightclient.verify_proof(r, k, v, raw)
            with pytest.raises(ProofError):
                verify_proof(r, k, v, raw)


# --- vectors -------------------------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_smt_vectors", VECTORS / "gen_smt_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vectors_are_reproduced_exactly() -> None:
    generator = load_generator()
    expected = (VECTORS / "smt_proofs.json").read_text()
    assert generator.render(generator.build_vectors()) == expected
    for case in json.loads(expected)["cases"]:
        pairs = {bytes.fromhex(i["key"]): bytes.fromhex(i["value"]) for i in case["items"]}
        assert bytes.fromhex(case["root"]) == ref_root(pairs)


# --- the record layout and the node cache ------------------------------------------------------


def random_blocks(seed: int, blocks: int, size: int) -> list[dict[bytes, bytes | None]]:
    """Blocks of updates, inserts and deletes (some of absent keys) over a growing key set."""
    import random

    rng = random.Random(seed)
    live: list[bytes] = []
    out: list[dict[bytes, bytes | None]] = []
    for _ in range(blocks):
        changes: dict[bytes, bytes | None] = {}
        for _ in range(size):
            roll = rng.random()
            if live and roll < 0.6:
                changes[rng.choice(live)] = rng.randbytes(rng.randrange(0, 12))
            elif live and roll < 0.75:
                changes[rng.choice(live)] = None
            elif roll < 0.8:
                changes[b"absent" + rng.randbytes(4)] = None
            else:
                key = rng.randbytes(rng.randrange(1, 6))
                changes[key] = rng.randbytes(rng.randrange(0, 12))
        for key, value in changes.items():
            if value is None:
                if key in live:
                    live.remove(key)
            elif key not in live:
                live.append(key)
        out.append(changes)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cached_and_decoded_nodes_give_identical_updates(seed: int) -> None:
    """Nodes built in memory by an update (then cached) and nodes decoded from their records
    (no cache) lead to byte-identical records and roots, block after block."""
    kv = DictKV()
    cached = StateTree(kv)
    uncached = StateTree(kv, cache_nodes=0)
    small = StateTree(kv, cache_nodes=7)  # evicts all the time
    state: dict[bytes, bytes] = {}
    for height, changes in enumerate(random_blocks(seed, 30, 40)):
        update = cached.apply(height, changes)
        for other in (uncached, small):
            twin = other.apply(height, changes)
            assert twin.puts == update.puts
            assert twin.root == update.root
        commit(cached, kv, update)
        uncached.committed(update)
        small.committed(update)
        assert len(small._cache) <= 7
        for key, value in changes.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        assert update.root == ref_root(state)
    for key in list(state)[:50]:
        value, proof = uncached.get_proof(height, key)
        assert value == state[key]
        verify_proof(update.root, key, value, proof)


def test_long_shared_prefixes_grow_and_collapse_across_blocks() -> None:
    """Keys that share 60 nibbles: chains of nodes one nibble apart appear and collapse."""
    base = bytes(30)
    keys = [base + bytes((a, b)) for a in (0, 1, 0x10) for b in (0, 1, 0x80)]
    kv = DictKV()
    tree = RawKeyTree(kv, cache_nodes=5)
    state: dict[bytes, bytes] = {}
    plan: list[dict[bytes, bytes | None]] = [
        {keys[0]: b"a"},
        {keys[1]: b"b"},  # a chain down to depth 63
        {keys[2]: b"c", keys[3]: b"d"},
        {keys[0]: None, keys[4]: b"e"},
        {keys[1]: None, keys[2]: None, keys[3]: b"D"},
        {k: b"all" for k in keys},
        {k: None for k in keys[1:]},  # back to one leaf at the root
        {keys[0]: None},
    ]
    for height, changes in enumerate(plan):
        update = tree.apply(height, changes)
        commit(tree, kv, update)
        for key, value in changes.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        assert update.root == ref_root_raw(state)
        fresh = RawKeyTree(kv, cache_nodes=0)
        for key in keys:
            value, proof = fresh.get_proof(height, key)
            assert value == state.get(key)
            lightclient.verify_proof_hashed(
                update.root, key, None if value is None else sha(value), proof.encode()
            )
    assert tree.root_at(len(plan) - 1) == ZERO


def test_stale_index_is_one_record_per_block_and_prune_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from node.storage import smt

    monkeypatch.setattr(smt, "_STALE_CHUNK", 5)  # several chunks per block
    kv = DictKV()
    tree = StateTree(kv)
    blocks = random_blocks(7, 12, 30)
    apply_all(tree, kv, [{k: v for k, v in b.items() if v is not None} for b in blocks[:1]])
    for height, changes in enumerate(blocks[1:], start=1):
        update = tree.apply(height, changes)
        stale = sorted(k for k in update.puts if k.startswith(b"TS"))
        prefix = b"TS" + height.to_bytes(8, "big")
        assert stale[-1] == prefix + b"R" + (height - 1).to_bytes(8, "big")
        chunks = stale[:-1]
        assert chunks == [prefix + b"B" + n.to_bytes(4, "big") for n in range(len(chunks))]
        listed = [k for c in chunks for k in msgpack.unpackb(update.puts[c])]
        assert all(len(msgpack.unpackb(update.puts[c])) <= 5 for c in chunks)
        assert len(listed) == len(set(listed))
        # Exactly the node and leaf records of the previous tree that this block replaced.
        assert all(k in kv.data and k[:2] in (b"TN", b"TL") for k in listed)
        commit(tree, kv, update)
    last = len(blocks) - 1
    commit(tree, kv, tree.prune(last // 2))
    fresh = StateTree(kv, cache_nodes=0)
    for h in range(last // 2, last + 1):
        assert fresh.root_at(h) == tree.root_at(h)
    commit(tree, kv, tree.prune(last))
    assert_only_reachable(fresh, kv, last)


def test_slots_must_have_the_fixed_form() -> None:
    kv = DictKV()
    tree = StateTree(kv)
    commit(tree, kv, tree.apply(0, {b"k%d" % i: b"v" for i in range(60)}))
    commit(tree, kv, tree.apply(1, {b"k1": b"w"}))
    root_key = b"TR" + (1).to_bytes(8, "big")
    node_key = next(k for k in kv.data if k.startswith(b"TN"))
    good_root, good_node = kv.data[root_key], kv.data[node_key]
    # Valid msgpack for the same values, but the minimal encoding of the versions.
    kv.data[root_key] = msgpack.packb(msgpack.unpackb(good_root))
    with pytest.raises(CorruptDatabase):
        StateTree(kv).root_at(1)
    kv.data[root_key] = good_root
    kv.data[node_key] = msgpack.packb(msgpack.unpackb(good_node))
    with pytest.raises(CorruptDatabase):
        for i in range(60):
            StateTree(kv, cache_nodes=0).get(1, b"k%d" % i)
    # One hash byte flipped in place: the layout parses, the hashes do not match.
    at = good_node.index(b"\x93\xc4\x20") + 3
    kv.data[node_key] = good_node[:at] + bytes([good_node[at] ^ 1]) + good_node[at + 1 :]
    with pytest.raises(CorruptDatabase):
        for i in range(60):
            StateTree(kv, cache_nodes=0).get(1, b"k%d" % i)
    # Trailing bytes.
    kv.data[node_key] = good_node + b"\xc0"
    with pytest.raises(CorruptDatabase):
        for i in range(60):
            StateTree(kv, cache_nodes=0).get(1, b"k%d" % i)
    kv.data[node_key] = good_node
    for i in range(60):
        assert StateTree(kv, cache_nodes=0).get(1, b"k%d" % i) == (b"w" if i == 1 else b"v")
