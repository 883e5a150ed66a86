"""Block parts: splitting with Merkle proofs, and assembling in any order with typed errors."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.merkle import merkle_proof, merkle_root
from node.p2p.messages import MAX_BLOCK_PARTS, MAX_PART_BYTES, BlockPart, PartSetHeader
from node.p2p.parts import (
    BadPartProof,
    DuplicatePart,
    IncompletePartSet,
    InvalidPart,
    PartIndexOutOfRange,
    PartSetAssembler,
    PartSetTooLarge,
    WrongPartSet,
    make_part_set,
)
from node.types import Hash32, Height, Round


def _data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def _assembler(header: PartSetHeader, **kw: int) -> PartSetAssembler:
    return PartSetAssembler(header, height=7, round=1, **kw)


def test_split_matches_node_merkle() -> None:
    data = _data(10 * 1000 + 7)
    header, parts = make_part_set(data, height=7, round=1, part_size=1000)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert header == PartSetHeader(11, merkle_root(chunks))
    for i, part in enumerate(parts):
        assert part.index == i and part.data == chunks[i]
        assert (part.height, part.round, part.root) == (7, 1, header.root)
        assert list(part.proof) == merkle_proof(chunks, i)
        assert part.encode() and len(part.encode()) <= BlockPart.MAX_BYTES


@given(st.integers(1, 5000), st.integers(8, 700), st.randoms(use_true_random=False))
def test_any_order_reassembles(n: int, part_size: int, rnd: random.Random) -> None:
    data = _data(n, seed=n)
    header, parts = make_part_set(data, height=7, round=1, part_size=part_size)
    rnd.shuffle(parts)
    asm = _assembler(header)
    for k, part in enumerate(parts):
        assert not asm.is_complete()
        asm.add(part)
        assert asm.received == k + 1
        assert asm.get(part.index) == part and asm.has(part.index)
    assert asm.is_complete() and asm.missing() == []
    assert asm.block_bytes() == data
    assert asm.size == len(data)


def test_three_mib_block_in_default_parts() -> None:
    data = _data(3 << 20, seed=3)
    header, parts = make_part_set(data, height=7, round=1)
    assert header.total == 12 and all(len(p.data) == MAX_PART_BYTES for p in parts)
    asm = _assembler(header)
    for part in reversed(parts):
        asm.add(BlockPart.decode(part.encode()))  # through the wire form
    assert asm.block_bytes() == data


def test_missing_and_incomplete() -> None:
    header, parts = make_part_set(_data(5000), height=7, round=1, part_size=1000)
    asm = _assembler(header)
    for i in (0, 3):
        asm.add(parts[i])
    assert asm.missing() == [1, 2, 4]
    assert not asm.has(1) and asm.get(1) is None and asm.get(99) is None and not asm.has(-1)
    with pytest.raises(IncompletePartSet):
        asm.block_bytes()


def test_duplicates_are_not_invalid() -> None:
    header, parts = make_part_set(_data(3000), height=7, round=1, part_size=1000)
    asm = _assembler(header)
    asm.add(parts[1])
    with pytest.raises(DuplicatePart) as info:
        asm.add(parts[1])
    assert not isinstance(info.value, InvalidPart)
    assert asm.received == 1


def test_bad_parts_are_invalid() -> None:
    header, parts = make_part_set(_data(5000), height=7, round=1, part_size=1000)
    asm = _assembler(header)
    p = parts[2]
    bad_cases: list[tuple[BlockPart, type[InvalidPart]]] = [
        (replace(p, data=b"X" + p.data[1:]), BadPartProof),
        (replace(p, proof=p.proof[:-1]), BadPartProof),
        (replace(p, proof=(*p.proof, p.proof[0])), BadPartProof),
        (replace(p, proof=tuple(reversed(p.proof))), BadPartProof),
        (replace(p, index=3), BadPartProof),  # right data, wrong position
        (replace(p, index=5), PartIndexOutOfRange),
        (replace(p, height=Height(8)), WrongPartSet),
        (replace(p, round=Round(0)), WrongPartSet),
        (replace(p, root=Hash32(b"\x00" * 32)), WrongPartSet),
    ]
    for part, error in bad_cases:
        with pytest.raises(error):
            asm.add(part)
    assert asm.received == 0
    asm.add(p)  # the real one still goes in
    # A part of another block with a proof for its own root fails against this root.
    _, other = make_part_set(_data(5000, seed=9), height=7, round=1, part_size=1000)
    with pytest.raises(BadPartProof):
        asm.add(replace(other[0], root=header.root))


def test_total_size_is_bounded() -> None:
    header, parts = make_part_set(_data(5000), height=7, round=1, part_size=1000)
    asm = _assembler(header, max_bytes=2500)
    asm.add(parts[0])
    asm.add(parts[1])
    with pytest.raises(PartSetTooLarge):
        asm.add(parts[2])
    with pytest.raises(PartSetTooLarge):
        _assembler(PartSetHeader(10, header.root), max_bytes=5)
    with pytest.raises(PartIndexOutOfRange):
        _assembler(PartSetHeader(MAX_BLOCK_PARTS + 1, header.root))
    with pytest.raises(PartSetTooLarge):
        make_part_set(b"x" * (MAX_BLOCK_PARTS + 1), height=1, round=0, part_size=1)
    with pytest.raises(ValueError):
        make_part_set(b"", height=1, round=0)


def test_single_part() -> None:
    header, parts = make_part_set(b"tiny", height=7, round=1)
    assert header.total == 1 and parts[0].proof == ()
    asm = _assembler(header)
    asm.add(parts[0])
    assert asm.block_bytes() == b"tiny"
