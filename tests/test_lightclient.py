"""The standalone light-client verifier: vectors, strict parsing, and the canonical-form rules."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import lightclient
from node.lightclient import (
    EMPTY_HASH,
    ProofError,
    decode_proof,
    verify_inclusion,
    verify_non_inclusion,
    verify_proof,
    verify_proof_hashed,
)

VECTORS = json.loads((Path(__file__).resolve().parent / "vectors" / "smt_proofs.json").read_text())


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def unhex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def leaf(key: bytes, value: bytes) -> bytes:
    return sha(b"\x00" + sha(key) + sha(value))


def node(left: bytes, right: bytes) -> bytes:
    return sha(b"\x01" + left + right)


def encode(leaf_key_hash: bytes | None, leaf_value_hash: bytes | None, siblings: Any) -> bytes:
    raw: bytes = msgpack.packb((leaf_key_hash, leaf_value_hash, tuple(siblings)), use_bin_type=True)
    return raw


def test_module_is_standalone() -> None:
    """A wallet can copy the file alone: it imports only the standard library and msgpack."""
    source = Path(lightclient.__file__).read_text()
    imported: set[str] = set()
    for stmt in ast.walk(ast.parse(source)):
        if isinstance(stmt, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            assert stmt.level == 0, "no relative imports"
            assert stmt.module is not None
            imported.add(stmt.module.split(".")[0])
    assert imported - {"msgpack", "__future__"} <= set(sys.stdlib_module_names)


def test_proof_error_is_a_value_error() -> None:
    assert issubclass(ProofError, ValueError)


# --- vectors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_vector_proofs_verify(case: dict[str, Any]) -> None:
    root = bytes.fromhex(case["root"])
    values = {i["key"]: i["value"] for i in case["items"]}
    for entry in case["proofs"]:
        key = bytes.fromhex(entry["key"])
        value = unhex(entry["value"])
        proof = bytes.fromhex(entry["proof"])
        assert entry["value"] == values.get(entry["key"])
        verify_proof(root, key, value, proof)
        if value is None:
            verify_non_inclusion(root, key, proof)
            with pytest.raises(ProofError):
                verify_inclusion(root, key, b"", proof)
        else:
            verify_inclusion(root, key, value, proof)
            with pytest.raises(ProofError):
                verify_non_inclusion(root, key, proof)


@pytest.mark.parametrize("claim", VECTORS["invalid"], ids=lambda c: c["name"])
def test_vector_forgeries_are_rejected(claim: dict[str, Any]) -> None:
    with pytest.raises(ProofError):
        verify_proof(
            bytes.fromhex(claim["root"]),
            bytes.fromhex(claim["key"]),
            unhex(claim["value"]),
            bytes.fromhex(claim["proof"]),
        )


def test_vectors_cover_every_kind_of_proof() -> None:
    kinds = set()
    for case in VECTORS["cases"]:
        for entry in case["proofs"]:
            leaf_key_hash, _, siblings = decode_proof(bytes.fromhex(entry["proof"]))
            if entry["value"] is not None:
                kinds.add("inclusion")
            elif leaf_key_hash is None:
                kinds.add("non-inclusion, empty" + (" root" if not siblings else " subtree"))
            else:
                kinds.add("non-inclusion, other leaf")
    assert kinds == {
        "inclusion",
        "non-inclusion, empty root",
        "non-inclusion, empty subtree",
        "non-inclusion, other leaf",
    }


# --- hand-built trees --------------------------------------------------------------------------


def test_three_leaf_tree_by_hand() -> None:
    # Choose three keys by the first two bits of their hashes: 0x, 10, 11.
    names = [b"k%d" % i for i in range(200)]
    a = next(k for k in names if sha(k)[0] >> 7 == 0)
    b = next(k for k in names if sha(k)[0] >> 6 == 0b10)
    c = next(k for k in names if sha(k)[0] >> 6 == 0b11)
    la, lb, lc = leaf(a, b"A"), leaf(b, b"B"), leaf(c, b"C")
    root = node(la, node(lb, lc))
    verify_inclusion(root, a, b"A", encode(sha(a), sha(b"A"), [node(lb, lc)]))
    verify_inclusion(root, b, b"B", encode(sha(b), sha(b"B"), [la, lc]))
    verify_inclusion(root, c, b"C", encode(sha(c), sha(b"C"), [la, lb]))
    # A key starting with bit 0 is absent: the lone leaf `a` holds that half.
    d = next(k for k in names if sha(k)[0] >> 7 == 0 and k != a)
    verify_non_inclusion(root, d, encode(sha(a), sha(b"A"), [node(lb, lc)]))
    # ...but a's leaf is not on the path of a key starting with 1.
    e = next(k for k in names if sha(k)[0] >> 7 == 1 and k not in (b, c))
    with pytest.raises(ProofError, match="not on this key's path"):
        verify_non_inclusion(root, e, encode(sha(a), sha(b"A"), [node(lb, lc)]))
    # The non-compact form of the same data (a's leaf pushed one level down) is not this root,
    # and a proof that places an empty sibling deepest is rejected outright.
    with pytest.raises(ProofError, match="deepest sibling is empty"):
        verify_inclusion(root, a, b"A", encode(sha(a), sha(b"A"), [node(lb, lc), EMPTY_HASH]))


def test_empty_tree() -> None:
    verify_non_inclusion(EMPTY_HASH, b"k", encode(None, None, []))
    with pytest.raises(ProofError):
        verify_non_inclusion(sha(b"not empty"), b"k", encode(None, None, []))
    with pytest.raises(ProofError):
        verify_inclusion(EMPTY_HASH, b"k", b"", encode(None, None, []))


# --- strict parsing ----------------------------------------------------------------------------

GOOD = encode(b"\x01" * 32, b"\x02" * 32, [b"\x03" * 32, b"\x04" * 32])


@pytest.mark.parametrize(
    ("what", "raw"),
    [
        ("not bytes", "93c0c090"),
        ("empty", b""),
        ("two fields", msgpack.packb((None, ()))),
        ("four fields", msgpack.packb((None, None, (), None))),
        ("a map", msgpack.packb({0: None})),
        ("str hash", msgpack.packb(("x" * 32, b"\x02" * 32, ()), use_bin_type=True)),
        ("31-byte hash", encode(b"\x01" * 31, b"\x02" * 32, [])),
        ("33-byte sibling", encode(None, None, [b"\x01" * 33])),
        ("int sibling", msgpack.packb((None, None, (1,)))),
        ("siblings not an array", msgpack.packb((None, None, b"\x01" * 32), use_bin_type=True)),
        ("value hash alone", encode(None, b"\x02" * 32, [])),
        ("257 siblings", encode(None, None, [b"\x01" * 32] * 257)),
        ("bin16 hash", b"\x93\xc5\x00\x20" + b"\x01" * 32 + GOOD[35:]),
        ("array16 siblings", GOOD[:69] + b"\xdc\x00\x02" + GOOD[70:]),
        ("trailing", GOOD + b"\x00"),
        ("truncated", GOOD[:-1]),
        ("ext type", b"\x93\xc0\xc0\xd4\x01\x00"),
        ("too large", b"\x93" + b"\x00" * (lightclient.MAX_PROOF_BYTES + 1)),
    ],
)
def test_malformed_proofs_are_rejected(what: str, raw: Any) -> None:
    with pytest.raises(ProofError):
        decode_proof(raw)


def test_good_encoding_parses() -> None:
    assert GOOD[69] == 0x92  # the siblings' fixarray header the array16 case replaces
    assert decode_proof(GOOD) == (b"\x01" * 32, b"\x02" * 32, (b"\x03" * 32, b"\x04" * 32))
    assert decode_proof(bytearray(GOOD)) == decode_proof(GOOD)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_parser(raw: bytes) -> None:
    with contextlib.suppress(ProofError):
        decode_proof(raw)


@given(
    key=st.binary(max_size=8),
    value=st.one_of(st.none(), st.binary(max_size=8)),
    siblings=st.lists(st.binary(min_size=32, max_size=32), max_size=6),
    leaf_key=st.one_of(st.none(), st.binary(max_size=8)),
)
def test_random_proofs_do_not_verify_against_random_roots(
    key: bytes, value: bytes | None, siblings: list[bytes], leaf_key: bytes | None
) -> None:
    raw = encode(
        None if leaf_key is None else sha(leaf_key),
        None if leaf_key is None else sha(b"v"),
        siblings,
    )
    with pytest.raises(ProofError):
        verify_proof(sha(b"some root"), key, value, raw)


def test_argument_types_are_checked() -> None:
    proof = encode(None, None, [])
    with pytest.raises(ProofError):
        verify_proof(EMPTY_HASH[:31], b"k", None, proof)
    with pytest.raises(ProofError):
        verify_proof(EMPTY_HASH, "k", None, proof)  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_proof(EMPTY_HASH, b"k", "v", proof)  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_inclusion(EMPTY_HASH, b"k", None, proof)  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_proof_hashed(EMPTY_HASH, b"short", None, proof)


def test_bytes_like_arguments_are_accepted() -> None:
    case = next(c for c in VECTORS["cases"] if c["name"] == "single")
    entry = case["proofs"][0]
    verify_inclusion(
        bytearray.fromhex(case["root"]),
        memoryview(bytes.fromhex(entry["key"])),
        bytearray.fromhex(entry["value"]),
        bytearray.fromhex(entry["proof"]),
    )
