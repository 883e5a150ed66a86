"""Per-deal replicas (DESIGN §9): erasure code, masking, segment tree, proofs, challenges, store."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from node.errors import DecodeError, EncodeError, ProofError, StorageError
from node.storage import replica as rp
from node.storage.replica import (
    SEGMENT_BYTES,
    InvalidReplicaInput,
    InvalidSegmentProof,
    ProofTree,
    ReplicaCorrupt,
    ReplicaExists,
    ReplicaNotFound,
    ReplicaRootMismatch,
    ReplicaSizeMismatch,
    ReplicaStore,
    ReplicaUnrecoverable,
    SegmentProof,
    build_replica,
    build_replica_file,
    challenge_indexes,
    check_segment,
    deal_mask_key,
    merkle_root_of_file,
    recover_file,
    replica_size,
    segment_count,
    tree_depth,
    verify_segment,
)
from node.types import Hash32
from tests.threads import InlineThreads

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
KEY_A = deal_mask_key(b"owner secret for the tests", b"deal A")
KEY_B = deal_mask_key(b"owner secret for the tests", b"deal B")

# The parity rows of zfec's fec_new(8, 16), read off zfec 1.6.0.0 by encoding unit vectors.
ZFEC_PARITY_ROWS = (
    (137, 24, 208, 125, 146, 164, 245, 254),
    (54, 248, 208, 206, 37, 25, 251, 22),
    (95, 205, 163, 64, 80, 72, 246, 158),
    (237, 145, 36, 144, 220, 144, 87, 210),
    (128, 127, 239, 7, 233, 141, 12, 126),
    (216, 100, 203, 157, 185, 134, 217, 13),
    (115, 184, 29, 144, 153, 254, 123, 91),
    (76, 59, 164, 224, 121, 193, 103, 237),
)


def content(size: int, salt: bytes = b"") -> bytes:
    """Deterministic pseudo-random bytes."""
    blocks = (hashlib.sha256(salt + i.to_bytes(8, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def build(data: bytes, key: bytes = KEY_A) -> tuple[rp.ReplicaInfo, bytes]:
    out = io.BytesIO()
    info = build_replica(io.BytesIO(data), len(data), key, out)
    return info, out.getvalue()


def recover(replica: bytes, key: bytes, size: int, missing: set[int] | None = None) -> bytes:
    out = io.BytesIO()
    recover_file(io.BytesIO(replica), key, size, out, missing_segments=missing or set())
    return out.getvalue()


# --- independent references (small inputs, written for clarity, not speed) ---------------------


def gf_mul(a: int, b: int) -> int:
    result = 0
    while b:
        if b & 1:
            result ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return result


def ref_replica(data: bytes, key: bytes) -> bytes:
    """Stripe by stripe, byte by byte: code with ZFEC_PARITY_ROWS, then mask with AES-CTR."""
    stripes = max(1, -(-len(data) // 2048))
    padded = data + bytes(stripes * 2048 - len(data))
    coded = bytearray()
    for s in range(stripes):
        shares = [padded[s * 2048 + i * 256 : s * 2048 + (i + 1) * 256] for i in range(8)]
        coded += b"".join(shares)
        for row in ZFEC_PARITY_ROWS:
            parity = bytearray(256)
            for coef, share in zip(row, shares, strict=True):
                for p in range(256):
                    parity[p] ^= gf_mul(coef, share[p])
            coded += parity
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(len(coded)))
    return bytes(a ^ b for a, b in zip(coded, stream, strict=True))


def ref_levels(replica: bytes) -> list[list[bytes]]:
    """Every level of the padded segment tree, leaves first."""
    n = len(replica) // SEGMENT_BYTES
    width = 1
    while width < n:
        width *= 2
    level = [
        hashlib.sha256(b"\x00" + i.to_bytes(8, "big") + replica[i * 256 : (i + 1) * 256]).digest()
        for i in range(n)
    ] + [bytes(32)] * (width - n)
    levels = [level]
    while len(level) > 1:
        level = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level), 2)
        ]
        levels.append(level)
    return levels


def ref_proof(replica: bytes, index: int, levels: list[list[bytes]] | None = None) -> SegmentProof:
    levels = levels or ref_levels(replica)
    path = tuple(Hash32(levels[h][(index >> h) ^ 1]) for h in range(len(levels) - 1))
    return SegmentProof(index, replica[index * 256 : (index + 1) * 256], path)


# --- sizes ------------------------------------------------------------------------------------


def test_sizes() -> None:
    assert replica_size(0) == replica_size(1) == replica_size(2048) == 4096
    assert replica_size(2049) == 8192
    assert replica_size(10 * 2048) == 10 * 4096
    assert segment_count(4096) == 16
    assert segment_count(256) == 1
    assert [tree_depth(n) for n in (1, 2, 3, 4, 5, 16, 48, 64, 65)] == [0, 1, 2, 2, 3, 4, 6, 6, 7]
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(InvalidReplicaInput):
            replica_size(bad)  # type: ignore[arg-type]
    for bad_size in (0, 255, 257, -256):
        with pytest.raises(InvalidReplicaInput):
            segment_count(bad_size)
    with pytest.raises(InvalidReplicaInput):
        tree_depth(0)


def test_errors_are_storage_or_proof_errors() -> None:
    assert issubclass(rp.ReplicaError, StorageError)
    assert issubclass(InvalidSegmentProof, ProofError)
    codes = [
        cls.code
        for cls in (
            rp.ReplicaError,
            InvalidReplicaInput,
            ReplicaSizeMismatch,
            ReplicaRootMismatch,
            ReplicaUnrecoverable,
            ReplicaNotFound,
            ReplicaExists,
            ReplicaCorrupt,
            InvalidSegmentProof,
        )
    ]
    assert all(1660 <= c <= 1669 for c in codes) and len(set(codes)) == len(codes)


# --- the erasure code --------------------------------------------------------------------------


def test_parity_matrix_is_zfecs() -> None:
    assert rp._parity_matrix() == ZFEC_PARITY_ROWS


def test_python_code_matches_zfec() -> None:
    zfec = pytest.importorskip("zfec")
    shares = [content(1000, bytes([i])) for i in range(8)]
    expected = zfec.Encoder(8, 16).encode(shares, list(range(8, 16)))
    assert rp._python_parity(shares) == [bytes(b) for b in expected]
    assert rp._zfec_parity(shares) == rp._python_parity(shares)
    lost = {0: shares[0]} | {i: expected[i - 8] for i in range(9, 16)}
    assert rp._zfec_decode(lost) == rp._python_decode(lost) == shares


def test_any_eight_shares_of_sixteen_recover_the_data() -> None:
    shares = [content(64, bytes([i])) for i in range(8)]
    coded = shares + rp._python_parity(shares)
    rng = random.Random(7)
    subsets = [tuple(range(8)), tuple(range(8, 16)), tuple(range(0, 16, 2)), tuple(range(1, 16, 2))]
    subsets += [tuple(sorted(rng.sample(range(16), 8))) for _ in range(150)]
    for keep in subsets:
        assert rp._decode({i: coded[i] for i in keep}) == shares, keep
        assert rp._python_decode({i: coded[i] for i in keep}) == shares, keep


# --- build, masking and recovery -------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 255, 2047, 2048, 2049, 5000])
def test_replica_matches_the_reference_construction(size: int) -> None:
    data = content(size)
    info, replica = build(data)
    assert replica == ref_replica(data, KEY_A)
    assert info.replica_size == len(replica) == replica_size(size)
    assert info.segments == len(replica) // 256
    assert info.file_size == size
    assert info.root == ref_levels(replica)[-1][0]
    assert recover(replica, KEY_A, size) == data


# 256 stripes are coded per step: sizes around one and two steps cross the chunk boundaries, and
# 4 KiB of replica per stripe gives trees with partial last groups of 64 segments.
@pytest.mark.parametrize("size", [256 * 2048 - 1, 256 * 2048, 256 * 2048 + 1, 513 * 2048 + 77])
def test_streaming_root_equals_in_memory_root_across_chunks(size: int) -> None:
    data = content(size)
    info, replica = build(data)
    assert info.root == ref_levels(replica)[-1][0]
    assert merkle_root_of_file(io.BytesIO(replica), len(replica)) == info.root
    assert recover(replica, KEY_A, size) == data


def test_recovery_with_half_of_each_stripe_lost() -> None:
    size = 300 * 2048 + 1234  # crosses a chunk boundary
    data = content(size)
    info, replica = build(data)
    rng = random.Random(1)
    stripes = info.segments // 16
    missing = {s * 16 + i for s in range(stripes) for i in rng.sample(range(16), rng.randint(0, 8))}
    # What sits at a missing position does not matter: overwrite it with garbage.
    damaged = bytearray(replica)
    for index in missing:
        damaged[index * 256 : (index + 1) * 256] = content(256, index.to_bytes(8, "big"))
    assert recover(bytes(damaged), KEY_A, size, missing) == data
    all_data = {s * 16 + i for s in range(stripes) for i in range(8)}
    assert recover(replica, KEY_A, size, all_data) == data
    all_parity = {s * 16 + 8 + i for s in range(stripes) for i in range(8)}
    assert recover(replica, KEY_A, size, all_parity) == data


def test_recovery_fails_cleanly_past_half() -> None:
    data = content(3 * 2048)
    _, replica = build(data)
    with pytest.raises(ReplicaUnrecoverable, match="stripe 1"):
        recover(replica, KEY_A, len(data), {16 + i for i in range(9)})
    with pytest.raises(InvalidReplicaInput):
        recover(replica, KEY_A, len(data), {48})
    with pytest.raises(ReplicaSizeMismatch):
        recover(replica[:-1], KEY_A, len(data))


def test_wrong_key_does_not_recover() -> None:
    data = content(4000)
    _, replica = build(data)
    assert recover(replica, KEY_B, len(data)) != data


def test_two_deals_of_one_file_have_unrelated_replicas() -> None:
    data = content(7000)
    info_a, replica_a = build(data, KEY_A)
    info_b, replica_b = build(data, KEY_B)
    assert info_a.root != info_b.root
    segs_a = {replica_a[i : i + 256] for i in range(0, len(replica_a), 256)}
    segs_b = {replica_b[i : i + 256] for i in range(0, len(replica_b), 256)}
    assert not segs_a & segs_b
    for index in range(info_a.segments):
        proof = ref_proof(replica_a, index)
        assert verify_segment(info_a.root, info_a.segments, proof)
        assert not verify_segment(info_b.root, info_b.segments, proof)


def test_parity_cannot_be_recomputed_from_masked_data() -> None:
    """Masking after coding: the stored parity is not the code of the stored data shares."""
    _, replica = build(content(2048))
    masked_data = [replica[i * 256 : (i + 1) * 256] for i in range(8)]
    assert b"".join(rp._python_parity(masked_data)) != replica[2048:4096]


def test_build_rejects_bad_input_before_writing() -> None:
    out = io.BytesIO()
    with pytest.raises(InvalidReplicaInput):
        build_replica(io.BytesIO(b"abc"), 3, b"short key", out)
    with pytest.raises(InvalidReplicaInput):
        build_replica(io.BytesIO(b"abc"), -1, KEY_A, out)
    assert out.getvalue() == b""
    with pytest.raises(ReplicaSizeMismatch, match="ended 1 bytes early"):
        build_replica(io.BytesIO(b"abc"), 4, KEY_A, out)


class TrickleReader(io.RawIOBase):
    """A stream returning at most 1000 bytes per read (a socket-like short reader)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._data.read(min(size, 1000) if size >= 0 else 1000)


def test_short_reads_are_not_end_of_file() -> None:
    data = content(10_000)
    out = io.BytesIO()
    info = build_replica(TrickleReader(data), len(data), KEY_A, out)  # type: ignore[arg-type]
    assert info == build(data)[0]


def test_build_replica_file_is_all_or_nothing(tmp_path: Path) -> None:
    data = content(5000)
    target = tmp_path / "replica"
    info = build_replica_file(io.BytesIO(data), len(data), KEY_A, target)
    assert target.read_bytes() == build(data)[1]
    assert info.root == build(data)[0].root
    other = tmp_path / "other"
    with pytest.raises(ReplicaSizeMismatch):
        build_replica_file(io.BytesIO(data), len(data) + 1, KEY_A, other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica"]


def test_deal_mask_key() -> None:
    key = deal_mask_key(b"s" * 32, b"nonce 1")
    assert len(key) == 32
    assert key == deal_mask_key(b"s" * 32, b"nonce 1")
    assert key != deal_mask_key(b"s" * 32, b"nonce 2")
    assert key != deal_mask_key(b"t" * 32, b"nonce 1")
    with pytest.raises(InvalidReplicaInput):
        deal_mask_key(b"short", b"nonce")
    with pytest.raises(InvalidReplicaInput):
        deal_mask_key(b"s" * 32, b"")
    with pytest.raises(InvalidReplicaInput):
        deal_mask_key(b"s" * 32, b"n" * 256)


# --- the segment tree and proofs ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 2049, 5000, 70 * 2048])
def test_every_segment_proves_and_matches_the_reference(size: int, tmp_path: Path) -> None:
    info, replica = build(content(size))
    store = ReplicaStore(tmp_path)
    levels = ref_levels(replica)
    with store.put_replica(b"deal", io.BytesIO(replica), len(replica), info.root) as tree:
        assert tree.root == info.root and tree.segments == info.segments
        for index in range(info.segments):
            proof = tree.prove(index)
            assert proof == ref_proof(replica, index, levels)
            assert len(proof.path) == tree_depth(info.segments)
            check_segment(info.root, info.segments, proof)
            assert SegmentProof.decode(proof.encode()) == proof


def test_tampered_proofs_fail() -> None:
    info, replica = build(content(5000))
    root, n = info.root, info.segments
    for index in (0, 7, 8, 31, 47):
        proof = ref_proof(replica, index)
        seg, path = proof.segment, proof.path
        for bit in (0, 1000, 2047):
            flipped = bytearray(seg)
            flipped[bit // 8] ^= 1 << (bit % 8)
            assert not verify_segment(root, n, dataclasses.replace(proof, segment=bytes(flipped)))
        for level in range(len(path)):
            bad = Hash32(bytes([path[level][0] ^ 1]) + path[level][1:])
            tampered = dataclasses.replace(proof, path=(*path[:level], bad, *path[level + 1 :]))
            assert not verify_segment(root, n, tampered)
        for other in (index ^ 1, (index + 16) % n):
            assert not verify_segment(root, n, dataclasses.replace(proof, index=other))
        assert not verify_segment(root, n, dataclasses.replace(proof, path=path[:-1]))
        assert not verify_segment(root, n, dataclasses.replace(proof, path=(*path, path[0])))
        assert not verify_segment(root, n, dataclasses.replace(proof, path=tuple(reversed(path))))
        assert not verify_segment(hashlib.sha256(root).digest(), n, proof)
        assert not verify_segment(root, 2 * n, proof)
        assert verify_segment(root, n, proof)


def test_check_segment_says_why() -> None:
    info, replica = build(content(100))
    proof = ref_proof(replica, 3)
    with pytest.raises(InvalidSegmentProof, match=r"outside 0\.\.15"):
        check_segment(info.root, 16, dataclasses.replace(proof, index=16))
    with pytest.raises(InvalidSegmentProof, match="has 3 hashes, the tree needs 4"):
        check_segment(info.root, 16, dataclasses.replace(proof, path=proof.path[:3]))
    with pytest.raises(InvalidSegmentProof, match="256 bytes"):
        check_segment(info.root, 16, dataclasses.replace(proof, segment=b"x"))
    with pytest.raises(InvalidSegmentProof, match="do not lead to the root"):
        check_segment(info.root, 16, dataclasses.replace(proof, index=4))
    with pytest.raises(InvalidSegmentProof, match="32 bytes"):
        check_segment(info.root, 16, dataclasses.replace(proof, path=(b"x", *proof.path[1:])))  # type: ignore[arg-type]
    with pytest.raises(InvalidReplicaInput):
        check_segment(b"short root", 16, proof)
    with pytest.raises(InvalidReplicaInput):
        check_segment(info.root, 0, proof)


def test_padding_cannot_be_proven() -> None:
    """A 48-segment tree has 16 padding leaves; the zero leaf hash has no preimage to show."""
    info, replica = build(content(5000))
    proof = ref_proof(replica + bytes(256), 48)  # as if a 49th segment of zeros existed
    assert not verify_segment(info.root, 48, proof)
    assert not verify_segment(info.root, 49, proof)


def test_segment_proof_limits() -> None:
    with pytest.raises(EncodeError):
        SegmentProof(0, bytes(257), ()).encode()
    with pytest.raises(EncodeError):
        SegmentProof(0, bytes(256), (Hash32(bytes(32)),) * 65).encode()
    too_long = SegmentProof(0, bytes(256), ()).encode()[:-1] + b"\xc0"
    with pytest.raises(DecodeError):
        SegmentProof.decode(too_long)


# --- challenges ----------------------------------------------------------------------------------


@given(
    seed=st.binary(min_size=1, max_size=64),
    deal_id=st.binary(min_size=1, max_size=64),
    segments=st.integers(min_value=1, max_value=1 << 40),
    count=st.integers(min_value=0, max_value=64),
)
def test_challenge_indexes_properties(
    seed: bytes, deal_id: bytes, segments: int, count: int
) -> None:
    picked = challenge_indexes(seed, deal_id, segments, count)
    assert picked == challenge_indexes(seed, deal_id, segments, count)
    assert len(picked) == min(count, segments)
    assert list(picked) == sorted(set(picked))
    assert all(0 <= i < segments for i in picked)


@given(segments=st.integers(min_value=1, max_value=40), count=st.integers(0, 60))
def test_challenge_of_a_small_tree(segments: int, count: int) -> None:
    picked = challenge_indexes(b"seed", b"deal", segments, count)
    assert len(picked) == min(count, segments)
    assert len(set(picked)) == len(picked)


def test_challenge_depends_on_seed_and_deal() -> None:
    n = 1 << 20
    base = challenge_indexes(b"seed", b"deal", n, 8)
    assert challenge_indexes(b"seed2", b"deal", n, 8) != base
    assert challenge_indexes(b"seed", b"deal2", n, 8) != base
    # Length prefixes: moving a byte from the seed to the deal id changes the draw.
    assert challenge_indexes(b"seedd", b"eal", n, 8) != base


def test_challenge_rejects_words_that_would_bias_the_draw() -> None:
    """With n = 3·2**62, 2**64 = n + 2**62: plain ``w mod n`` would hit [0, 2**62) half of the
    time instead of a third. Rejection sampling keeps the draw uniform."""
    n = 3 << 62
    low = sum(
        challenge_indexes(i.to_bytes(4, "big"), b"deal", n, 1)[0] < 1 << 62 for i in range(900)
    )
    assert 240 < low < 360  # a third of 900 is 300; half would be 450


def test_challenge_rejects_bad_input() -> None:
    for args in [
        (b"", b"d", 16, 1),
        (b"s", b"", 16, 1),
        (b"s" * 256, b"d", 16, 1),
        (b"s", b"d", 0, 1),
        (b"s", b"d", 16, -1),
        (b"s", b"d", 16, rp.MAX_CHALLENGE_COUNT + 1),
    ]:
        with pytest.raises(InvalidReplicaInput):
            challenge_indexes(*args)


# --- the provider's store -------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[ReplicaStore, rp.ReplicaInfo, bytes]]:
    # 301 stripes: 4816 segments (depth 13, a last group of 16), 1.2 MiB read in two chunks.
    info, replica = build(content(300 * 2048 + 5))
    store = ReplicaStore(tmp_path / "store")
    store.put_replica(b"deal-1", io.BytesIO(replica), len(replica), info.root).close()
    yield store, info, replica


def test_store_answers_challenges(stored: tuple[ReplicaStore, rp.ReplicaInfo, bytes]) -> None:
    store, info, _ = stored
    assert store.has_replica(b"deal-1") and store.deal_ids() == [b"deal-1"]
    proofs = store.answer_challenge(b"deal-1", b"block hash", 16)
    expected = challenge_indexes(b"block hash", b"deal-1", info.segments, 16)
    assert tuple(p.index for p in proofs) == expected
    assert all(verify_segment(info.root, info.segments, p) for p in proofs)
    assert store.prove(b"deal-1", info.segments - 1).index == info.segments - 1
    with pytest.raises(InvalidReplicaInput):
        store.prove(b"deal-1", info.segments)
    with pytest.raises(ReplicaNotFound):
        store.prove(b"deal-2", 0)


def test_tree_is_small_and_a_proof_reads_little(
    stored: tuple[ReplicaStore, rp.ReplicaInfo, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, info, _ = stored
    with store.get_proof_tree(b"deal-1") as tree:
        assert tree.tree_size * 32 <= info.replica_size
        assert (store._deals / b"deal-1".hex() / "tree").stat().st_size == tree.tree_size
        reads: list[tuple[int, int]] = []
        real_pread = os.pread

        def counting_pread(fd: int, n: int, offset: int) -> bytes:
            reads.append((fd, n))
            return real_pread(fd, n, offset)

        monkeypatch.setattr(os, "pread", counting_pread)
        for index in (0, 63, 64, 2000, info.segments - 1):
            reads.clear()
            tree.prove(index)
            replica_bytes = sum(n for fd, n in reads if fd == tree._replica_fd)
            tree_reads = [n for fd, n in reads if fd == tree._tree_fd]
            assert 0 < replica_bytes <= 16 * 1024
            assert len(tree_reads) <= tree.depth - tree.group_log
            assert all(n == 32 for n in tree_reads)


def test_wrong_root_or_short_stream_leaves_nothing(tmp_path: Path) -> None:
    info, replica = build(content(9000))
    store = ReplicaStore(tmp_path)
    wrong = hashlib.sha256(info.root).digest()
    with pytest.raises(ReplicaRootMismatch):
        store.put_replica(b"d", io.BytesIO(replica), len(replica), wrong)
    with pytest.raises(ReplicaSizeMismatch):
        store.put_replica(b"d", io.BytesIO(replica[:-1]), len(replica), info.root)
    damaged = bytearray(replica)
    damaged[5000] ^= 1
    with pytest.raises(ReplicaRootMismatch):
        store.put_replica(b"d", io.BytesIO(bytes(damaged)), len(replica), info.root)
    with pytest.raises(InvalidReplicaInput):
        store.put_replica(b"d", io.BytesIO(replica), len(replica) - 256, info.root)
    assert not store.has_replica(b"d") and store.deal_ids() == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "deals").iterdir()) == []


def test_put_twice_and_remove(stored: tuple[ReplicaStore, rp.ReplicaInfo, bytes]) -> None:
    store, info, replica = stored
    with pytest.raises(ReplicaExists):
        store.put_replica(b"deal-1", io.BytesIO(replica), len(replica), info.root)
    tree = store.get_proof_tree(b"deal-1")
    with store.open_replica(b"deal-1") as f:
        assert f.read() == replica
    store.remove_replica(b"deal-1")
    assert not store.has_replica(b"deal-1")
    assert verify_segment(info.root, info.segments, tree.prove(5))  # open trees keep working
    tree.close()
    with pytest.raises(ReplicaNotFound):
        store.remove_replica(b"deal-1")
    with pytest.raises(ReplicaNotFound):
        store.open_replica(b"deal-1")
    with pytest.raises(InvalidReplicaInput):
        store.has_replica(b"")


def test_damaged_replica_is_reported(stored: tuple[ReplicaStore, rp.ReplicaInfo, bytes]) -> None:
    store, info, _ = stored
    path = store._deals / b"deal-1".hex() / "replica"
    with path.open("r+b") as f:
        f.seek(100 * 256 + 3)
        byte = f.read(1)
        f.seek(100 * 256 + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with store.get_proof_tree(b"deal-1") as tree:
        for index in (64, 100, 127):  # the group of segment 100
            with pytest.raises(ReplicaCorrupt, match=f"segment {index}"):
                tree.prove(index)
        assert verify_segment(info.root, info.segments, tree.prove(63))
        assert verify_segment(info.root, info.segments, tree.prove(128))


def test_damaged_tree_is_reported(stored: tuple[ReplicaStore, rp.ReplicaInfo, bytes]) -> None:
    store, info, _ = stored
    path = store._deals / b"deal-1".hex() / "tree"
    raw = bytearray(path.read_bytes())
    raw[rp._TREE_HEADER.size + 32 * 1] ^= 1  # the level-6 node of group 1
    path.write_bytes(bytes(raw))
    with store.get_proof_tree(b"deal-1") as tree:
        with pytest.raises(ReplicaCorrupt):
            tree.prove(0)  # group 1 is the sibling of group 0
        assert verify_segment(info.root, info.segments, tree.prove(64))
    path.write_bytes(bytes(raw[:-1]))
    with pytest.raises(ReplicaCorrupt, match="wrong size"):
        store.get_proof_tree(b"deal-1")
    path.write_bytes(b"not a tree")
    with pytest.raises(ReplicaCorrupt):
        store.get_proof_tree(b"deal-1")
    path.unlink()
    with pytest.raises(ReplicaNotFound):
        store.get_proof_tree(b"deal-1")


def test_tree_can_be_rebuilt_from_the_replica(
    stored: tuple[ReplicaStore, rp.ReplicaInfo, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, info, _ = stored
    monkeypatch.setattr(rp._LevelWriter, "_FLUSH", 96)  # many partial flushes per level
    where = store._deals / b"deal-1".hex()
    rebuilt = tmp_path / "rebuilt-tree"
    with ProofTree.build(where / "replica", rebuilt) as tree:
        assert tree.root == info.root
    assert rebuilt.read_bytes() == (where / "tree").read_bytes()


def test_store_clears_leftovers_on_open(tmp_path: Path) -> None:
    ReplicaStore(tmp_path)
    (tmp_path / "tmp" / "half-import").mkdir()
    (tmp_path / "tmp" / "half-import" / "replica").write_bytes(b"partial")
    (tmp_path / "tmp" / "stray").write_bytes(b"x")
    ReplicaStore(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_async_wrappers(tmp_path: Path, threads: InlineThreads) -> None:
    data = content(6000)
    src = io.BytesIO(data)
    out = io.BytesIO()
    info = await rp.build_replica_async(src, len(data), KEY_A, out)
    store = ReplicaStore(tmp_path)
    await store.put_replica_async(b"d", io.BytesIO(out.getvalue()), info.replica_size, info.root)
    proofs = await store.answer_challenge_async(b"d", b"seed", 3)
    assert len(proofs) == 3
    assert all(verify_segment(info.root, info.segments, p) for p in proofs)
    proof = await store.prove_async(b"d", 0)
    assert verify_segment(info.root, info.segments, proof)
    assert threads.calls == ["build_replica", "put_replica", "answer_challenge", "prove"]


# --- vectors -------------------------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_replica_vectors", VECTORS / "gen_replica_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vectors_are_reproduced_exactly() -> None:
    generator = load_generator()
    expected = (VECTORS / "replica-proofs.json").read_text()
    assert generator.render(generator.build_vectors()) == expected


def test_vectors_check_out_independently() -> None:
    v = json.loads((VECTORS / "replica-proofs.json").read_text())
    data = bytes.fromhex(v["file"])
    key = bytes.fromhex(v["mask_key"])
    assert len(data) == v["file_size"]
    assert deal_mask_key(bytes.fromhex(v["owner_secret"]), bytes.fromhex(v["deal_nonce"])) == key
    replica = ref_replica(data, key)
    assert len(replica) == v["replica_size"] == v["segments"] * 256
    assert hashlib.sha256(replica).hexdigest() == v["replica_sha256"]
    root = bytes.fromhex(v["root"])
    assert ref_levels(replica)[-1][0] == root
    for p in v["proofs"]:
        proof = SegmentProof.decode(bytes.fromhex(p["encoded"]))
        assert proof == SegmentProof(
            p["index"],
            bytes.fromhex(p["segment"]),
            tuple(Hash32(bytes.fromhex(h)) for h in p["path"]),
        )
        check_segment(root, v["segments"], proof)
    c = v["challenge"]
    seed, deal_id = bytes.fromhex(c["seed"]), bytes.fromhex(c["deal_id"])
    picked = challenge_indexes(seed, deal_id, c["segments"], c["count"])
    assert list(picked) == c["indexes"]
    for case in v["invalid"]:
        p = case["proof"]
        proof = SegmentProof(
            p["index"],
            bytes.fromhex(p["segment"]),
            tuple(Hash32(bytes.fromhex(h)) for h in p["path"]),
        )
        assert not verify_segment(bytes.fromhex(case["root"]), case["segments"], proof), case
