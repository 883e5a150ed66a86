"""Generate ``stream-encryption.json``: vectors that pin priced-artifact encryption (DESIGN §8).

Computed on an independent path from ``node/storage/encryption.py``: AES-GCM and HKDF from
pycryptodome (the module uses ``cryptography``), ECDH by plain-Python secp256k1 arithmetic hashed
as libsecp256k1 does (sha256 of the compressed shared point; the module uses coincurve), nonces
packed with ``struct``. Nothing here imports the node. ``tests/storage/test_encryption.py``
checks that the module reproduces every vector and that this script regenerates the file
byte for byte.

Run from the repository root: ``.venv/bin/python tests/vectors/gen_stream_encryption.py``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF

OUT = Path(__file__).with_name("stream-encryption.json")

CHUNK = 1 << 20
TAG = 16
PLAIN = CHUNK - TAG

# secp256k1 (SEC 2, §2.4.1)
P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
G = (
    0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
    0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
)

Point = tuple[int, int] | None


def _add(a: Point, b: Point) -> Point:
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        lam = 3 * a[0] * a[0] * pow(2 * a[1], -1, P) % P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, P) % P
    x = (lam * lam - a[0] - b[0]) % P
    return x, (lam * (a[0] - x) - a[1]) % P


def _mul(k: int, point: Point) -> Point:
    out: Point = None
    while k:
        if k & 1:
            out = _add(out, point)
        point = _add(point, point)
        k >>= 1
    return out


def _compress(point: Point) -> bytes:
    assert point is not None
    return bytes([2 | (point[1] & 1)]) + point[0].to_bytes(32, "big")


def _decompress(data: bytes) -> Point:
    x = int.from_bytes(data[1:], "big")
    y = pow((x * x * x + 7) % P, (P + 1) // 4, P)
    if (y & 1) != (data[0] & 1):
        y = P - y
    return x, y


def _scalar(label: bytes) -> bytes:
    k = int.from_bytes(hashlib.sha256(label).digest(), "big") % (N - 1) + 1
    return k.to_bytes(32, "big")


def _h(label: str, n: int) -> bytes:
    return hashlib.sha256(b"neuroseed-encryption-vector/" + label.encode()).digest()[:n]


def plaintext(size: int) -> bytes:
    """Deterministic test data: sha256(b"neuroseed-encryption" + k as 8 bytes BE), k = 0, 1, ..."""
    out = bytearray()
    k = 0
    while len(out) < size:
        out += hashlib.sha256(b"neuroseed-encryption" + k.to_bytes(8, "big")).digest()
        k += 1
    return bytes(out[:size])


def _nonce(salt: bytes, index: int, last: bool) -> bytes:
    return salt + struct.pack(">IB", index, 1 if last else 0)


def _encrypt_chunk(key: bytes, nonce: bytes, data: bytes) -> bytes:
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG)
    body, tag = cipher.encrypt_and_digest(data)
    return body + tag


def _stream_case(name: str, size: int) -> dict[str, Any]:
    key, salt = _h(name + "/key", 32), _h(name + "/salt", 7)
    data = plaintext(size)
    count = -(-size // PLAIN)
    chunks = [
        _encrypt_chunk(key, _nonce(salt, i, i == count - 1), data[i * PLAIN : (i + 1) * PLAIN])
        for i in range(count)
    ]
    cipher = b"".join(chunks)
    case: dict[str, Any] = {
        "name": name,
        "key": key.hex(),
        "salt": salt.hex(),
        "plain_size": size,
        "plain_sha256": hashlib.sha256(data).hexdigest(),
        "chunk_count": count,
        "cipher_size": len(cipher),
        "cipher_sha256": hashlib.sha256(cipher).hexdigest(),
        "chunk_tags": [c[-TAG:].hex() for c in chunks],
        "chunk_sha256": [hashlib.sha256(c).hexdigest() for c in chunks],
        "key_check": hashlib.sha256(b"NeuroSeed/key-check/v1" + salt + key).hexdigest(),
    }
    if size <= 64:
        case["ciphertext"] = cipher.hex()
    return case


def _wrap_case(name: str, context: bytes) -> dict[str, Any]:
    content_key = _h(name + "/content-key", 32)
    buyer_priv = _scalar(b"buyer/" + name.encode())
    eph_priv = _scalar(b"ephemeral/" + name.encode())
    buyer_pub = _compress(_mul(int.from_bytes(buyer_priv, "big"), G))
    eph_pub = _compress(_mul(int.from_bytes(eph_priv, "big"), G))
    shared_point = _mul(int.from_bytes(eph_priv, "big"), _decompress(buyer_pub))
    # libsecp256k1's default ECDH hash: sha256 of the compressed shared point.
    shared = hashlib.sha256(_compress(shared_point)).digest()
    k = HKDF(shared, 32, context, SHA256, context=b"NeuroSeed/key-wrap/v1")
    assert isinstance(k, bytes)
    cipher = AES.new(k, AES.MODE_GCM, nonce=bytes(12), mac_len=TAG)
    cipher.update(context)
    body, tag = cipher.encrypt_and_digest(content_key)
    return {
        "name": name,
        "content_key": content_key.hex(),
        "buyer_privkey": buyer_priv.hex(),
        "buyer_pubkey": buyer_pub.hex(),
        "context": context.hex(),
        "ephemeral_privkey": eph_priv.hex(),
        "ecdh_secret": shared.hex(),
        "wrap_key": k.hex(),
        "wrapped": (eph_pub + body + tag).hex(),
    }


def build() -> dict[str, Any]:
    salt = bytes.fromhex("00112233445566")
    nonces = [
        {"salt": salt.hex(), "index": i, "last": last, "nonce": _nonce(salt, i, last).hex()}
        for i, last in ((0, False), (0, True), (1, False), (258, True), (2**32 - 2, True))
    ]
    sizes = [
        ("empty", 0),
        ("one byte", 1),
        ("short", 33),
        ("chunk minus one", PLAIN - 1),
        ("one chunk", PLAIN),
        ("one chunk plus one", PLAIN + 1),
        ("three chunks", 2 * PLAIN + 1000),
    ]
    return {
        "description": (
            "NeuroSeed priced-artifact encryption (DESIGN §8); generated by "
            "gen_stream_encryption.py with pycryptodome and plain-Python secp256k1. "
            "All byte strings are hex."
        ),
        "chunking": (
            f"plaintext chunks of {PLAIN} bytes (1 MiB - 16); each chunk -> AES-256-GCM "
            "ciphertext || 16-byte tag, no associated data; nonce = salt (7) || chunk index "
            "(4, big-endian) || last flag (1 byte: 1 on the final chunk only); empty data -> "
            "zero chunks"
        ),
        "plaintext": (
            'stream of sha256(b"neuroseed-encryption" || k as 8-byte big-endian), k = 0, 1, ..., '
            "cut to plain_size"
        ),
        "key_check": 'sha256(b"NeuroSeed/key-check/v1" || salt || key)',
        "key_wrap": (
            "ephemeral compressed pubkey (33) || AES-256-GCM(k, nonce = 12 zero bytes, "
            "content_key, AD = context); k = HKDF-SHA256(IKM = ecdh_secret, salt = context, "
            'info = b"NeuroSeed/key-wrap/v1", 32 bytes); ecdh_secret = sha256(compressed '
            "shared point) (libsecp256k1's default)"
        ),
        "nonces": nonces,
        "streams": [_stream_case(name, size) for name, size in sizes],
        "wraps": [
            _wrap_case("purchase A", _h("purchase A/id", 32)),
            _wrap_case("purchase B", _h("purchase B/id", 32)),
            _wrap_case("empty context", b""),
        ],
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
