"""Generate ``smt_proofs.json``: state-tree roots and proofs that pin the format (DESIGN §4).

Each case is a fixed key/value set with its root and the canonical proof bytes for present and
absent keys; ``invalid`` lists claims (root, key, value, proof) that every verifier must reject.
``tests/storage/test_smt.py`` regenerates the file and requires it to be byte-identical, and
``tests/test_lightclient.py`` checks every vector with the standalone verifier.

Run from the repository root: ``.venv/bin/python tests/vectors/gen_smt_vectors.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgpack

from node.storage.memory import MemoryKV
from node.storage.smt import SmtProof, StateTree
from node.types import Hash32

OUT = Path(__file__).with_name("smt_proofs.json")
ZERO = b"\x00" * 32


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _account_key(i: int) -> bytes:
    # NS_ACCOUNT (0x01 0x01) + a 20-byte address, as in node/consensus/state.py.
    return b"\x01\x01" + _sha(b"address %d" % i)[:20]


def _cases() -> list[tuple[str, dict[bytes, bytes], list[bytes]]]:
    """(name, pairs, absent keys to prove)."""
    accounts = {
        _account_key(i): msgpack.packb((i, (10**18 * i).to_bytes(32, "big"))) for i in range(8)
    }
    many = {b"key-%03d" % i: b"value-%d" % (i * 7) for i in range(40)}
    return [
        ("empty", {}, [b"alice", b""]),
        ("single", {b"alice": b"\x01"}, [b"bob", b""]),
        ("empty key and value", {b"": b"", b"x": b"y"}, [b"z"]),
        ("accounts", accounts, [_account_key(i) for i in range(8, 12)]),
        # sha256 of these two agree on exactly the first 40 bits.
        (
            "shared prefix of 40 bits",
            {b"acct-652601": b"a", b"acct-1522750": b"b"},
            [b"acct-1", b"acct-2", b"acct-3"],
        ),
        ("forty keys", many, [b"key-%03d" % i for i in range(40, 52)]),
    ]


def _proof_entry(tree: StateTree, key: bytes) -> dict[str, Any]:
    value, proof = tree.get_proof(0, key)
    return {
        "key": key.hex(),
        "value": None if value is None else value.hex(),
        "proof": proof.encode().hex(),
    }


def _forged(root: bytes, proofs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Claims that must be rejected, derived from valid proofs of the "forty keys" case."""
    present = next(p for p in proofs if p["value"] is not None)
    absent_leaf = next(
        p
        for p in proofs
        if p["value"] is None and SmtProof.decode(bytes.fromhex(p["proof"])).leaf_key_hash
    )
    absent_empty = next(
        p
        for p in proofs
        if p["value"] is None and SmtProof.decode(bytes.fromhex(p["proof"])).leaf_key_hash is None
    )
    key = bytes.fromhex(present["key"])
    value = bytes.fromhex(present["value"])
    raw = bytes.fromhex(present["proof"])
    proof = SmtProof.decode(raw)
    sibs = proof.siblings
    flipped = Hash32(bytes([sibs[-1][0] ^ 0x80]) + sibs[-1][1:])
    other_key = bytes.fromhex(
        next(p["key"] for p in proofs if p["value"] is not None and p is not present)
    )

    def with_siblings(siblings: tuple[Hash32, ...]) -> bytes:
        return SmtProof(proof.leaf_key_hash, proof.leaf_value_hash, siblings).encode()

    tree = msgpack.unpackb(raw, use_list=False)
    claims: list[tuple[str, bytes, bytes, bytes | None, bytes]] = [
        ("flipped deepest sibling", root, key, value, with_siblings((*sibs[:-1], flipped))),
        (
            "flipped first sibling",
            root,
            key,
            value,
            with_siblings((Hash32(_sha(sibs[0])), *sibs[1:])),
        ),
        ("wrong value", root, key, value + b"!", raw),
        ("present key claimed absent", root, key, None, raw),
        ("truncated siblings", root, key, value, with_siblings(sibs[:-1])),
        ("extended siblings", root, key, value, with_siblings((*sibs, Hash32(_sha(b"x"))))),
        ("deepest sibling empty", root, key, value, with_siblings((*sibs, Hash32(ZERO)))),
        ("proof of another key", root, other_key, value, raw),
        ("another root", _sha(root), key, value, raw),
        (
            "absent key claimed present",
            root,
            bytes.fromhex(absent_empty["key"]),
            b"",
            bytes.fromhex(absent_empty["proof"]),
        ),
        (
            "non-inclusion leaf of the queried key",
            root,
            bytes.fromhex(absent_leaf["key"]),
            None,
            SmtProof(
                Hash32(_sha(bytes.fromhex(absent_leaf["key"]))),
                SmtProof.decode(bytes.fromhex(absent_leaf["proof"])).leaf_value_hash,
                SmtProof.decode(bytes.fromhex(absent_leaf["proof"])).siblings,
            ).encode(),
        ),
        # Encodings: the same fields in non-minimal or malformed byte forms.
        ("non-canonical array16 header", root, key, value, b"\xdc\x00\x03" + raw[1:]),
        (
            "non-canonical bin16 sibling",
            root,
            key,
            value,
            raw[: raw.index(sibs[0]) - 2] + b"\xc5\x00\x20" + raw[raw.index(sibs[0]) :],
        ),
        ("trailing byte", root, key, value, raw + b"\xc0"),
        ("four fields", root, key, value, msgpack.packb((*tree, None))),
        (
            "leaf key hash without value hash",
            root,
            key,
            value,
            msgpack.packb((tree[0], None, tree[2])),
        ),
        (
            "short sibling",
            root,
            key,
            value,
            msgpack.packb((tree[0], tree[1], (*tree[2][:-1], tree[2][-1][:31]))),
        ),
        (
            "257 siblings",
            root,
            key,
            None,
            msgpack.packb((None, None, (ZERO,) * 256 + (b"\x01" * 32,))),
        ),
        ("a map, not an array", root, key, value, msgpack.packb({"siblings": list(tree[2])})),
        ("empty bytes", root, key, value, b""),
    ]
    return [
        {
            "name": name,
            "root": r.hex(),
            "key": k.hex(),
            "value": None if v is None else v.hex(),
            "proof": p.hex(),
        }
        for name, r, k, v, p in claims
    ]


def build_vectors() -> dict[str, Any]:
    cases = []
    invalid: list[dict[str, Any]] = []
    for name, pairs, absent in _cases():
        kv = MemoryKV()
        tree = StateTree(kv)
        update = tree.apply(0, dict(pairs))
        batch = kv.batch()
        update.write_to(batch)
        batch.commit()
        proofs = [_proof_entry(tree, key) for key in [*sorted(pairs), *absent]]
        cases.append(
            {
                "name": name,
                "items": [{"key": k.hex(), "value": v.hex()} for k, v in sorted(pairs.items())],
                "root": update.root.hex(),
                "proofs": proofs,
            }
        )
        if name == "forty keys":
            invalid = _forged(update.root, proofs)
    return {
        "description": (
            "NeuroSeed state tree (compact sparse Merkle tree) roots and proofs; generated by "
            "gen_smt_vectors.py. All byte strings are hex."
        ),
        "hashing": (
            "key_hash = sha256(key); leaf = sha256(0x00 || key_hash || sha256(value)); "
            "internal = sha256(0x01 || left || right); empty = 32 zero bytes; key_hash bits "
            "MSB-first, 0 = left; a subtree with one leaf is that leaf"
        ),
        "proof_format": (
            "canonical msgpack [leaf_key_hash: bin32|nil, leaf_value_hash: bin32|nil, "
            "siblings: [bin32, ...] from the root downward, at most 256]"
        ),
        "cases": cases,
        "invalid": invalid,
    }


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2) + "\n"


def main() -> None:
    OUT.write_text(render(build_vectors()))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
