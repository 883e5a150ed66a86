"""Priced-artifact encryption (DESIGN §8): per-chunk AES-GCM in the STREAM construction, the key
check, fair-exchange key wrapping and the dispute check — pinned by vectors computed
independently (pycryptodome, plain-Python secp256k1) in ``tests/vectors/gen_stream_encryption.py``."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import random
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import NeuroSeedError, StorageError
from node.storage import encryption as enc
from node.storage.encryption import (
    CIPHER_CHUNK_BYTES,
    KEY_BYTES,
    MAX_CHUNKS,
    PLAIN_CHUNK_BYTES,
    SALT_BYTES,
    TAG_BYTES,
    WRAPPED_KEY_BYTES,
    CiphertextSizeMismatch,
    DecryptionFailed,
    DisputeVerdict,
    EncryptionError,
    InvalidEncryptionParameter,
    InvalidPrivateKey,
    InvalidPublicKey,
    KeyUnwrapFailed,
    PlaintextSizeMismatch,
    TooManyChunks,
    check_dispute,
    chunk_count,
    chunk_nonce,
    chunks_for_range,
    decrypt_chunk,
    decrypt_range,
    decrypt_stream,
    decrypt_stream_async,
    encrypt_chunk,
    encrypt_stream,
    encrypt_stream_async,
    encrypted_size,
    generate_wrap_keypair,
    is_last_chunk,
    is_valid_public_key,
    key_check,
    plain_chunk_size,
    public_key_of,
    unwrap_key,
    wrap_key,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
P = PLAIN_CHUNK_BYTES
KEY = hashlib.sha256(b"test key").digest()
SALT = hashlib.sha256(b"test salt").digest()[:SALT_BYTES]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_stream_encryption", VECTORS / "gen_stream_encryption.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
VECTOR_DATA: dict[str, Any] = json.loads((VECTORS / "stream-encryption.json").read_text())


def _data(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _encrypt(data: bytes, key: bytes = KEY, salt: bytes = SALT) -> bytes:
    out = io.BytesIO()
    encrypt_stream(key, salt, io.BytesIO(data), out, len(data))
    return out.getvalue()


def _chunks(cipher: bytes) -> list[bytes]:
    return [cipher[i : i + CIPHER_CHUNK_BYTES] for i in range(0, len(cipher), CIPHER_CHUNK_BYTES)]


def _decrypt(cipher: bytes, plain_size: int, key: bytes = KEY, salt: bytes = SALT) -> bytes:
    out = io.BytesIO()
    decrypt_stream(key, salt, io.BytesIO(cipher), out, plain_size)
    return out.getvalue()


# --- sizes, nonces, errors ---------------------------------------------------------------------


def test_constants_fit_one_leaf() -> None:
    assert PLAIN_CHUNK_BYTES + TAG_BYTES == CIPHER_CHUNK_BYTES == 1 << 20
    assert (KEY_BYTES, SALT_BYTES, TAG_BYTES, WRAPPED_KEY_BYTES) == (32, 7, 16, 81)


@pytest.mark.parametrize(
    ("size", "chunks"),
    [(0, 0), (1, 1), (P - 1, 1), (P, 1), (P + 1, 2), (3 * P, 3), (3 * P + 5, 4)],
)
def test_chunk_count_and_encrypted_size(size: int, chunks: int) -> None:
    assert chunk_count(size) == chunks
    assert encrypted_size(size) == size + TAG_BYTES * chunks
    if chunks:
        assert is_last_chunk(size, chunks - 1)
        assert not any(is_last_chunk(size, i) for i in range(chunks - 1))
        assert sum(plain_chunk_size(size, i) for i in range(chunks)) == size


def test_chunk_count_limit() -> None:
    largest = MAX_CHUNKS * P
    assert chunk_count(largest) == 2**32 - 1
    with pytest.raises(TooManyChunks):
        chunk_count(largest + 1)
    with pytest.raises(TooManyChunks):
        encrypted_size(largest + 1)
    with pytest.raises(InvalidEncryptionParameter):
        chunk_count(-1)
    with pytest.raises(InvalidEncryptionParameter):
        is_last_chunk(P, 1)
    with pytest.raises(InvalidEncryptionParameter):
        plain_chunk_size(0, 0)


def test_nonce_layout() -> None:
    salt = bytes(range(1, 8))
    assert chunk_nonce(salt, 0, False) == salt + b"\x00\x00\x00\x00\x00"
    assert chunk_nonce(salt, 0x01020304, True) == salt + b"\x01\x02\x03\x04\x01"
    with pytest.raises(InvalidEncryptionParameter):
        chunk_nonce(salt, 2**32, False)
    with pytest.raises(InvalidEncryptionParameter):
        chunk_nonce(salt, -1, False)
    with pytest.raises(InvalidEncryptionParameter):
        chunk_nonce(salt[:6], 0, False)


def test_error_codes_in_range() -> None:
    classes = [
        EncryptionError,
        DecryptionFailed,
        KeyUnwrapFailed,
        PlaintextSizeMismatch,
        CiphertextSizeMismatch,
        InvalidEncryptionParameter,
        TooManyChunks,
        InvalidPublicKey,
        InvalidPrivateKey,
    ]
    codes = [cls.code for cls in classes]
    assert len(set(codes)) == len(codes)
    assert all(1650 <= code <= 1659 for code in codes)
    assert all(issubclass(cls, StorageError) for cls in classes)


def test_bad_key_and_salt_lengths() -> None:
    with pytest.raises(InvalidEncryptionParameter, match="content key"):
        encrypt_chunk(KEY[:31], SALT, 0, True, b"x")
    with pytest.raises(InvalidEncryptionParameter, match="salt"):
        encrypt_chunk(KEY, SALT + b"\x00", 0, True, b"x")
    with pytest.raises(InvalidEncryptionParameter):
        key_check(SALT, KEY + b"\x00")


def test_chunk_plaintext_sizes_are_checked() -> None:
    with pytest.raises(InvalidEncryptionParameter):
        encrypt_chunk(KEY, SALT, 0, True, b"")  # empty data has no chunk
    with pytest.raises(InvalidEncryptionParameter):
        encrypt_chunk(KEY, SALT, 0, False, b"x" * (P - 1))  # only the last chunk is short
    with pytest.raises(InvalidEncryptionParameter):
        encrypt_chunk(KEY, SALT, 0, True, b"x" * (P + 1))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, P - 1, P, P + 1, 3 * P + 7])
def test_stream_round_trip(size: int) -> None:
    data = _data(size)
    src, dst = io.BytesIO(data), io.BytesIO()
    result = encrypt_stream(KEY, SALT, src, dst, size)
    cipher = dst.getvalue()
    assert result.plain_size == size
    assert result.plain_sha256 == hashlib.sha256(data).digest()
    assert result.cipher_size == len(cipher) == encrypted_size(size)
    # Each 1 MiB of ciphertext is the chunk encrypted on its own: random access holds.
    chunks = _chunks(cipher)
    assert len(chunks) == chunk_count(size)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        plain = data[i * P : (i + 1) * P]
        assert chunk == encrypt_chunk(KEY, SALT, i, last, plain)
        assert decrypt_chunk(KEY, SALT, i, last, chunk) == plain
    out = io.BytesIO()
    back = decrypt_stream(
        KEY, SALT, io.BytesIO(cipher), out, size, expected_sha256=result.plain_sha256
    )
    assert out.getvalue() == data
    assert back == result


def test_chunk_position_changes_ciphertext() -> None:
    block = _data(P)
    variants = {
        encrypt_chunk(KEY, SALT, 0, False, block),
        encrypt_chunk(KEY, SALT, 0, True, block),
        encrypt_chunk(KEY, SALT, 1, False, block),
        encrypt_chunk(KEY, bytes(SALT_BYTES), 0, False, block),
    }
    assert len(variants) == 4


# --- tampering ---------------------------------------------------------------------------------


@functools.cache
def _three_chunks() -> tuple[bytes, bytes]:
    data = _data(2 * P + 1000, seed=3)
    return data, _encrypt(data)


def test_tampered_tag_is_detected() -> None:
    data, cipher = _three_chunks()
    bad = bytearray(cipher)
    bad[CIPHER_CHUNK_BYTES - 1] ^= 0x01  # last byte of chunk 0's tag
    with pytest.raises(DecryptionFailed, match="chunk 0"):
        _decrypt(bytes(bad), len(data))
    with pytest.raises(DecryptionFailed):
        decrypt_chunk(KEY, SALT, 0, False, bytes(bad[:CIPHER_CHUNK_BYTES]))


def test_tampered_body_is_detected() -> None:
    data, cipher = _three_chunks()
    bad = bytearray(cipher)
    bad[CIPHER_CHUNK_BYTES + 5] ^= 0x80
    with pytest.raises(DecryptionFailed, match="chunk 1"):
        _decrypt(bytes(bad), len(data))


def test_swapped_chunks_are_detected() -> None:
    data, cipher = _three_chunks()
    c = _chunks(cipher)
    with pytest.raises(DecryptionFailed, match="chunk 0"):
        _decrypt(c[1] + c[0] + c[2], len(data))
    with pytest.raises(DecryptionFailed):
        decrypt_chunk(KEY, SALT, 1, False, c[0])


def test_truncation_is_detected() -> None:
    data, cipher = _three_chunks()
    c = _chunks(cipher)
    # Dropping the last chunk while keeping the declared size: the stream is short.
    with pytest.raises(CiphertextSizeMismatch):
        _decrypt(c[0] + c[1], len(data))
    # Dropping it and claiming a smaller size: chunk 1 now has to carry the last flag, and its
    # tag was computed without it.
    with pytest.raises(DecryptionFailed, match="chunk 1"):
        _decrypt(c[0] + c[1], 2 * P)
    with pytest.raises(DecryptionFailed):
        decrypt_chunk(KEY, SALT, 1, True, c[1])
    # The real last chunk presented as a middle one fails too (size or tag).
    with pytest.raises(DecryptionFailed):
        decrypt_chunk(KEY, SALT, 2, False, c[2])
    # Extra trailing bytes.
    with pytest.raises(CiphertextSizeMismatch):
        _decrypt(cipher + b"\x00", len(data))


def test_wrong_key_or_salt_fails() -> None:
    data, cipher = _three_chunks()
    with pytest.raises(DecryptionFailed):
        _decrypt(cipher, len(data), key=bytes(32))
    with pytest.raises(DecryptionFailed):
        _decrypt(cipher, len(data), salt=bytes(SALT_BYTES))


def test_decrypt_stream_checks_registered_hash() -> None:
    data = _data(100)
    cipher = _encrypt(data)
    with pytest.raises(DecryptionFailed, match="plaintext hash"):
        decrypt_stream(KEY, SALT, io.BytesIO(cipher), io.BytesIO(), 100, expected_sha256=bytes(32))


def test_failed_streams_leave_no_partial_output(tmp_path: Path) -> None:
    data, cipher = _three_chunks()
    out_path = tmp_path / "out"
    out_path.write_bytes(b"keep")
    with out_path.open("r+b") as dst:
        dst.seek(0, io.SEEK_END)
        with pytest.raises(PlaintextSizeMismatch, match="ended after"):
            encrypt_stream(KEY, SALT, io.BytesIO(data[:-1]), dst, len(data))
        with pytest.raises(PlaintextSizeMismatch, match="more than"):
            encrypt_stream(KEY, SALT, io.BytesIO(data + b"!"), dst, len(data))
        bad = bytearray(cipher)
        bad[-1] ^= 1  # the final tag: every chunk before it was written, then rolled back
        with pytest.raises(DecryptionFailed):
            decrypt_stream(KEY, SALT, io.BytesIO(bytes(bad)), dst, len(data))
    assert out_path.read_bytes() == b"keep"


# --- random access -----------------------------------------------------------------------------


@functools.cache
def _artifact() -> tuple[bytes, list[bytes]]:
    data = _data(3 * P + 12345, seed=11)
    return data, _chunks(_encrypt(data))


def _range(begin: int, end: int) -> tuple[bytes, list[int]]:
    data, chunks = _artifact()
    fetched: list[int] = []

    def get_chunk(i: int) -> bytes:
        fetched.append(i)
        return chunks[i]

    return b"".join(decrypt_range(KEY, SALT, len(data), get_chunk, begin, end)), fetched


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_random_ranges_match_full_decrypt(draw: st.DataObject) -> None:
    data, _ = _artifact()
    begin = draw.draw(st.integers(0, len(data)))
    end = draw.draw(st.integers(begin, min(len(data), begin + 2 * P)))
    got, fetched = _range(begin, end)
    assert got == data[begin:end]
    expected = list(range(begin // P, (end - 1) // P + 1)) if end > begin else []
    assert fetched == expected


@pytest.mark.parametrize(
    ("begin", "end"),
    [(0, 0), (0, 1), (P - 1, P + 1), (P, 2 * P), (3 * P, 3 * P + 12345), (0, 3 * P + 12345)],
)
def test_edge_ranges(begin: int, end: int) -> None:
    data, _ = _artifact()
    got, fetched = _range(begin, end)
    assert got == data[begin:end]
    assert fetched == [s.index for s in chunks_for_range(len(data), begin, end)]


def test_bad_ranges_and_chunks() -> None:
    data, chunks = _artifact()
    size = len(data)
    for begin, end in ((-1, 5), (5, 4), (0, size + 1)):
        with pytest.raises(InvalidEncryptionParameter):
            list(decrypt_range(KEY, SALT, size, chunks.__getitem__, begin, end))
    # A chunk of the wrong length for its position.
    with pytest.raises(CiphertextSizeMismatch):
        list(decrypt_range(KEY, SALT, size + 1, chunks.__getitem__, 3 * P, 3 * P + 1))
    # The right length but another chunk's bytes.
    with pytest.raises(DecryptionFailed):
        list(decrypt_range(KEY, SALT, size, lambda i: chunks[0], P, P + 1))


# --- streaming memory --------------------------------------------------------------------------


class _Recorder:
    """A file wrapper that records the largest single read and write (and may read short)."""

    def __init__(self, f: BinaryIO, max_return: int | None = None) -> None:
        self._f = f
        self._max_return = max_return
        self.largest_read = 0
        self.largest_write = 0

    def read(self, n: int = -1) -> bytes:
        assert n >= 0, "whole-file read"
        self.largest_read = max(self.largest_read, n)
        return self._f.read(n if self._max_return is None else min(n, self._max_return))

    def write(self, b: bytes) -> int:
        self.largest_write = max(self.largest_write, len(b))
        return self._f.write(b)

    def seekable(self) -> bool:
        return False

    def io(self) -> BinaryIO:
        """This wrapper, typed as the file it stands in for."""
        return cast(BinaryIO, self)


def test_64_mib_streams_in_bounded_reads(tmp_path: Path) -> None:
    size = 64 * (1 << 20) + 3
    plain_path, cipher_path, out_path = tmp_path / "p", tmp_path / "c", tmp_path / "o"
    digest = hashlib.sha256()
    rng = random.Random(5)
    with plain_path.open("wb") as f:
        left = size
        while left:
            piece = rng.randbytes(min(left, 1 << 20))
            digest.update(piece)
            f.write(piece)
            left -= len(piece)
    tracemalloc.start()
    try:
        with plain_path.open("rb") as fi, cipher_path.open("wb") as fo:
            src, dst = _Recorder(fi), _Recorder(fo)
            result = encrypt_stream(KEY, SALT, src.io(), dst.io(), size)
        assert src.largest_read <= 1 << 20 and dst.largest_write <= 1 << 20
        with cipher_path.open("rb") as fi, out_path.open("wb") as fo:
            src, dst = _Recorder(fi), _Recorder(fo)
            back = decrypt_stream(
                KEY, SALT, src.io(), dst.io(), size, expected_sha256=digest.digest()
            )
        assert src.largest_read <= 1 << 20 and dst.largest_write <= 1 << 20
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * (1 << 20), f"peak {peak} bytes for a 64 MiB stream"
    assert result.plain_sha256 == back.plain_sha256 == digest.digest()
    assert cipher_path.stat().st_size == result.cipher_size == encrypted_size(size)
    assert out_path.stat().st_size == size


def test_short_reads_are_completed() -> None:
    data = _data(P + 77)
    src = _Recorder(io.BytesIO(data), max_return=4093)
    dst = io.BytesIO()
    encrypt_stream(KEY, SALT, src.io(), dst, len(data))
    assert dst.getvalue() == _encrypt(data)
    back = io.BytesIO()
    short = _Recorder(io.BytesIO(dst.getvalue()), max_return=999)
    decrypt_stream(KEY, SALT, short.io(), back, len(data))
    assert short.largest_read <= CIPHER_CHUNK_BYTES
    assert back.getvalue() == data


async def test_async_wrappers_round_trip() -> None:
    data = _data(P + 3)
    cipher = io.BytesIO()
    result = await encrypt_stream_async(KEY, SALT, io.BytesIO(data), cipher, len(data))
    out = io.BytesIO()
    await decrypt_stream_async(
        KEY,
        SALT,
        io.BytesIO(cipher.getvalue()),
        out,
        len(data),
        expected_sha256=result.plain_sha256,
    )
    assert out.getvalue() == data
    chunk = cipher.getvalue()[:CIPHER_CHUNK_BYTES]
    assert await enc.decrypt_chunk_async(KEY, SALT, 0, False, chunk) == data[:P]


# --- key wrapping ------------------------------------------------------------------------------

CONTEXT = hashlib.sha256(b"purchase id").digest()
CONTENT_KEY = hashlib.sha256(b"content key").digest()


def test_wrap_round_trip_and_fresh_ephemeral_keys() -> None:
    priv, pub = generate_wrap_keypair()
    assert len(pub) == 33 and public_key_of(priv) == pub and is_valid_public_key(pub)
    first = wrap_key(CONTENT_KEY, pub, CONTEXT)
    second = wrap_key(CONTENT_KEY, pub, CONTEXT)
    assert len(first) == len(second) == WRAPPED_KEY_BYTES
    assert first[:33] != second[:33] and first[33:] != second[33:]
    assert unwrap_key(first, priv, CONTEXT) == unwrap_key(second, priv, CONTEXT) == CONTENT_KEY


def test_wrap_is_deterministic_with_an_injected_rng() -> None:
    _, pub = generate_wrap_keypair()
    eph = hashlib.sha256(b"eph").digest()
    a = wrap_key(CONTENT_KEY, pub, CONTEXT, rng=lambda n: eph[:n])
    b = wrap_key(CONTENT_KEY, pub, CONTEXT, rng=lambda n: eph[:n])
    assert a == b and a[:33] == public_key_of(eph)
    # An out-of-range draw (0, then n) is skipped, not used.
    draws = iter([bytes(32), bytes.fromhex("ff" * 32), eph])
    assert wrap_key(CONTENT_KEY, pub, CONTEXT, rng=lambda n: next(draws)) == a


def test_unwrap_failures() -> None:
    priv, pub = generate_wrap_keypair()
    other, _ = generate_wrap_keypair()
    wrapped = wrap_key(CONTENT_KEY, pub, CONTEXT)
    with pytest.raises(KeyUnwrapFailed):
        unwrap_key(wrapped, other, CONTEXT)
    with pytest.raises(KeyUnwrapFailed):
        unwrap_key(wrapped, priv, bytes(32))
    for pos in (0, 1, 20, 33, 50, 64, 65, 80):
        bad = bytearray(wrapped)
        bad[pos] ^= 0x04
        with pytest.raises(KeyUnwrapFailed):
            unwrap_key(bytes(bad), priv, CONTEXT)
    with pytest.raises(KeyUnwrapFailed):
        unwrap_key(wrapped[:-1], priv, CONTEXT)
    with pytest.raises(KeyUnwrapFailed):
        unwrap_key(wrapped + b"\x00", priv, CONTEXT)
    # x = 5 is not on secp256k1 (5**3 + 7 = 132 is not a square mod p).
    off_curve = b"\x02" + (5).to_bytes(32, "big")
    assert not is_valid_public_key(off_curve)
    with pytest.raises(KeyUnwrapFailed, match="ephemeral"):
        unwrap_key(off_curve + wrapped[33:], priv, CONTEXT)


def test_bad_keys_are_refused() -> None:
    priv, pub = generate_wrap_keypair()
    uncompressed = b"\x04" + bytes(64)
    for bad in (pub[:32], uncompressed, b"\x05" + pub[1:], b"\x02" + (5).to_bytes(32, "big")):
        with pytest.raises(InvalidPublicKey):
            wrap_key(CONTENT_KEY, bad, CONTEXT)
    with pytest.raises(InvalidEncryptionParameter):
        wrap_key(CONTENT_KEY[:16], pub, CONTEXT)
    n = enc._SECP256K1_N
    for bad_priv in (bytes(32), n.to_bytes(32, "big"), priv[:31]):
        with pytest.raises(InvalidPrivateKey):
            unwrap_key(wrap_key(CONTENT_KEY, pub, CONTEXT), bad_priv, CONTEXT)
    assert issubclass(InvalidPrivateKey, NeuroSeedError)


# --- disputes ----------------------------------------------------------------------------------


def _dispute(**overrides: Any) -> DisputeVerdict:
    data, cipher = _three_chunks()
    chunks = _chunks(cipher)
    priv = hashlib.sha256(b"buyer one-off").digest()
    args: dict[str, Any] = {
        "wrapped": wrap_key(KEY, public_key_of(priv), CONTEXT),
        "buyer_privkey": priv,
        "buyer_pubkey": public_key_of(priv),
        "context": CONTEXT,
        "salt": SALT,
        "key_check_value": key_check(SALT, KEY),
        "chunk": (1, is_last_chunk(len(data), 1), chunks[1]),
    }
    args.update(overrides)
    return check_dispute(**args)


def test_dispute_key_ok() -> None:
    assert _dispute() is DisputeVerdict.KEY_OK
    assert _dispute(chunk=None) is DisputeVerdict.KEY_OK
    _, cipher = _three_chunks()
    assert _dispute(chunk=(2, True, _chunks(cipher)[2])) is DisputeVerdict.KEY_OK
    assert not DisputeVerdict.KEY_OK.owner_at_fault


def test_dispute_bad_private_key() -> None:
    other = hashlib.sha256(b"someone else").digest()
    assert _dispute(buyer_privkey=other) is DisputeVerdict.BAD_PRIVATE_KEY
    assert _dispute(buyer_privkey=bytes(32)) is DisputeVerdict.BAD_PRIVATE_KEY
    assert _dispute(buyer_privkey=b"short") is DisputeVerdict.BAD_PRIVATE_KEY
    assert not DisputeVerdict.BAD_PRIVATE_KEY.owner_at_fault


def test_dispute_owner_fault_unwrap() -> None:
    _, other_pub = generate_wrap_keypair()
    # Wrapped to a key the buyer never gave, for another purchase, or garbage.
    assert _dispute(wrapped=wrap_key(KEY, other_pub, CONTEXT)) is DisputeVerdict.OWNER_FAULT_UNWRAP
    priv = hashlib.sha256(b"buyer one-off").digest()
    wrong_ctx = wrap_key(KEY, public_key_of(priv), bytes(32))
    assert _dispute(wrapped=wrong_ctx) is DisputeVerdict.OWNER_FAULT_UNWRAP
    assert _dispute(wrapped=bytes(81)) is DisputeVerdict.OWNER_FAULT_UNWRAP
    assert _dispute(wrapped=b"") is DisputeVerdict.OWNER_FAULT_UNWRAP
    assert DisputeVerdict.OWNER_FAULT_UNWRAP.owner_at_fault


def test_dispute_owner_fault_check() -> None:
    priv = hashlib.sha256(b"buyer one-off").digest()
    wrong = wrap_key(bytes(32), public_key_of(priv), CONTEXT)
    assert _dispute(wrapped=wrong) is DisputeVerdict.OWNER_FAULT_CHECK
    assert _dispute(key_check_value=bytes(32)) is DisputeVerdict.OWNER_FAULT_CHECK
    assert DisputeVerdict.OWNER_FAULT_CHECK.owner_at_fault


def test_dispute_owner_fault_decrypt() -> None:
    data, cipher = _three_chunks()
    chunks = _chunks(cipher)
    # The owner committed to KEY and posted it, but the stored data is not encrypted with it.
    foreign = _chunks(_encrypt(data, key=bytes(32)))
    assert _dispute(chunk=(1, False, foreign[1])) is DisputeVerdict.OWNER_FAULT_DECRYPT
    bad = bytearray(chunks[0])
    bad[7] ^= 1
    assert _dispute(chunk=(0, False, bytes(bad))) is DisputeVerdict.OWNER_FAULT_DECRYPT
    assert _dispute(chunk=(0, False, chunks[0][:-1])) is DisputeVerdict.OWNER_FAULT_DECRYPT
    assert DisputeVerdict.OWNER_FAULT_DECRYPT.owner_at_fault
    with pytest.raises(InvalidEncryptionParameter):
        _dispute(chunk=(2**32, False, chunks[0]))


# --- vectors -----------------------------------------------------------------------------------


def test_vector_file_is_what_the_generator_writes() -> None:
    assert (VECTORS / "stream-encryption.json").read_text(encoding="utf-8") == GEN.render()


@pytest.mark.parametrize("case", VECTOR_DATA["nonces"], ids=lambda c: str(c["index"]))
def test_vector_nonces(case: dict[str, Any]) -> None:
    salt = bytes.fromhex(case["salt"])
    assert chunk_nonce(salt, case["index"], case["last"]).hex() == case["nonce"]


@pytest.mark.parametrize("case", VECTOR_DATA["streams"], ids=lambda c: c["name"])
def test_vector_streams(case: dict[str, Any]) -> None:
    key, salt, size = bytes.fromhex(case["key"]), bytes.fromhex(case["salt"]), case["plain_size"]
    data = GEN.plaintext(size)
    out = io.BytesIO()
    result = encrypt_stream(key, salt, io.BytesIO(data), out, size)
    cipher = out.getvalue()
    assert chunk_count(size) == case["chunk_count"]
    assert result.cipher_size == case["cipher_size"] == len(cipher)
    assert result.plain_sha256.hex() == case["plain_sha256"]
    assert hashlib.sha256(cipher).hexdigest() == case["cipher_sha256"]
    chunks = _chunks(cipher)
    assert [c[-TAG_BYTES:].hex() for c in chunks] == case["chunk_tags"]
    assert [hashlib.sha256(c).hexdigest() for c in chunks] == case["chunk_sha256"]
    assert key_check(salt, key).hex() == case["key_check"]
    if "ciphertext" in case:
        assert cipher.hex() == case["ciphertext"]
    assert _decrypt(cipher, size, key=key, salt=salt) == data


@pytest.mark.parametrize("case", VECTOR_DATA["wraps"], ids=lambda c: c["name"])
def test_vector_wraps(case: dict[str, Any]) -> None:
    h = bytes.fromhex
    eph = h(case["ephemeral_privkey"])
    assert public_key_of(h(case["buyer_privkey"])).hex() == case["buyer_pubkey"]
    wrapped = wrap_key(
        h(case["content_key"]), h(case["buyer_pubkey"]), h(case["context"]), rng=lambda n: eph[:n]
    )
    assert wrapped.hex() == case["wrapped"]
    assert unwrap_key(h(case["wrapped"]), h(case["buyer_privkey"]), h(case["context"])) == h(
        case["content_key"]
    )
