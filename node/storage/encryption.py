"""Per-chunk encryption of priced artifacts and fair-exchange key wrapping (DESIGN §8).

**Chunk encryption (the STREAM construction).** A priced artifact's data (everything after leaf 0,
the always-public safetensors header) is cut into chunks of ``PLAIN_CHUNK_BYTES`` = 1 MiB − 16 B
of plaintext; each becomes exactly 1 MiB of ciphertext (AES-256-GCM, 16-byte tag appended), so
data chunk ``i`` is UnixFS leaf ``i + 1`` and any byte range can be decrypted on its own.

    nonce(i) = salt (7 bytes) ‖ i (4 bytes, big-endian) ‖ last (1 byte: 1 on the final chunk only)

No associated data (pinned by ``tests/vectors/stream-encryption.json``). The index in the nonce
stops reordering; the last-chunk flag stops truncation (a stream cut after chunk ``i`` lacks a
chunk that authenticates with flag 1). Empty data has zero chunks; a chunk count of 2**32 or more
is refused. One random 32-byte key and 7-byte salt per artifact; the salt is recorded on chain,
together with ``key_check(salt, key)`` (a commitment the dispute check compares against) and the
plaintext sha-256.

**Key wrapping.** The buyer puts a one-off compressed secp256k1 public key in the purchase; the
owner posts ``wrap_key(content_key, buyer_pubkey, purchase_id)``:

    eph_pub (33) ‖ AES-256-GCM(k, nonce = 12 zero bytes, content_key, AD = context)   (81 bytes)
    k = HKDF-SHA256(IKM = ECDH(eph_priv, buyer_pub), salt = context,
                    info = b"NeuroSeed/key-wrap/v1", length 32)

ECDH is libsecp256k1's (``coincurve.PrivateKey.ecdh``): it returns sha256(0x02 | (y & 1) ‖ x)
of the shared point — the compressed point hashed — not the bare x coordinate. The zero nonce is
safe because ``k`` is fresh for every wrap (a new ephemeral key each time).

**Disputes.** ``check_dispute`` is the pure function the state transition runs when a buyer
reveals the one-off private key and one ciphertext chunk. Note that a dispute publishes the
content key (anyone can now unwrap it) — no worse than the buyer sharing the key it was sold.

Streaming functions read at most 1 MiB per call and never hold a whole file; async callers use the
``*_async`` wrappers, which run the work in a worker thread (AES and sha-256 are CPU-bound).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import coincurve
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.errors import StorageError

CIPHER_CHUNK_BYTES = 1 << 20
"""One encrypted data chunk: exactly one 1 MiB UnixFS leaf."""
TAG_BYTES = 16
PLAIN_CHUNK_BYTES = CIPHER_CHUNK_BYTES - TAG_BYTES
SALT_BYTES = 7
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_CHUNKS = (1 << 32) - 1
"""Largest chunk count: the index is a 4-byte counter and a count of 2**32 or more is refused."""

PUBLIC_KEY_BYTES = 33
"""A compressed secp256k1 public key (the buyer's one-off key, the ephemeral key)."""
PRIVATE_KEY_BYTES = 32
WRAPPED_KEY_BYTES = PUBLIC_KEY_BYTES + KEY_BYTES + TAG_BYTES  # 81
KEY_CHECK_BYTES = 32

KEY_CHECK_TAG = b"NeuroSeed/key-check/v1"
KEY_WRAP_INFO = b"NeuroSeed/key-wrap/v1"
_WRAP_NONCE = bytes(NONCE_BYTES)
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

Rng = Callable[[int], bytes]
"""``rng(n)`` returns ``n`` random bytes (``secrets.token_bytes`` unless a test injects one)."""


# --- errors (codes 1650–1659) ------------------------------------------------------------------


class EncryptionError(StorageError):
    """Base of the errors of artifact encryption and key wrapping."""

    code = 1650
    reason = "artifact encryption error"


class DecryptionFailed(EncryptionError):
    """A ciphertext chunk (or stream) that is not authentic under this key, salt and position."""

    code = 1651
    reason = "decryption failed"


class KeyUnwrapFailed(EncryptionError):
    """A wrapped key that does not open with this private key and context."""

    code = 1652
    reason = "key unwrap failed"


class PlaintextSizeMismatch(EncryptionError):
    """The plaintext source holds fewer or more bytes than the declared size."""

    code = 1653
    reason = "plaintext size does not match the declared size"


class CiphertextSizeMismatch(DecryptionFailed):
    """The ciphertext (stream or chunk) is not as long as the declared plaintext size implies."""

    code = 1654
    reason = "ciphertext size does not match the declared size"


class InvalidEncryptionParameter(EncryptionError, ValueError):
    """A key, salt, index, size or range the format cannot take."""

    code = 1655
    reason = "invalid encryption parameter"


class TooManyChunks(InvalidEncryptionParameter):
    """Data of 2**32 chunks or more: the 4-byte chunk counter of the nonce would wrap."""

    code = 1656
    reason = "too many chunks to encrypt"


class InvalidPublicKey(InvalidEncryptionParameter):
    """Bytes that are not a compressed secp256k1 public key."""

    code = 1657
    reason = "invalid public key"


class InvalidPrivateKey(InvalidEncryptionParameter):
    """Bytes that are not a secp256k1 private key (32 bytes, 0 < k < n)."""

    code = 1658
    reason = "invalid private key"


# --- sizes and nonces --------------------------------------------------------------------------


def _check_size(plain_size: int) -> None:
    if plain_size < 0:
        raise InvalidEncryptionParameter(f"plain size {plain_size} is negative")


def chunk_count(plain_size: int) -> int:
    """How many encrypted chunks ``plain_size`` bytes of data make (0 for empty data)."""
    _check_size(plain_size)
    count = -(-plain_size // PLAIN_CHUNK_BYTES)
    if count > MAX_CHUNKS:
        raise TooManyChunks(f"{plain_size} bytes make {count} chunks; at most {MAX_CHUNKS}")
    return count


def encrypted_size(plain_size: int) -> int:
    """The ciphertext size of ``plain_size`` bytes: one 16-byte tag per chunk."""
    return plain_size + TAG_BYTES * chunk_count(plain_size)


def plain_chunk_size(plain_size: int, index: int) -> int:
    """The plaintext length of chunk ``index`` of data of ``plain_size`` bytes."""
    count = chunk_count(plain_size)
    if not 0 <= index < count:
        raise InvalidEncryptionParameter(f"chunk {index} out of range: the data has {count}")
    return min(PLAIN_CHUNK_BYTES, plain_size - index * PLAIN_CHUNK_BYTES)


def is_last_chunk(plain_size: int, index: int) -> bool:
    """Whether chunk ``index`` is the final one of data of ``plain_size`` bytes.

    A verifier must take the last-chunk flag from here (from the registered size), never from the
    party that hands it a chunk: a wrong flag makes an authentic chunk fail to decrypt.
    """
    count = chunk_count(plain_size)
    if not 0 <= index < count:
        raise InvalidEncryptionParameter(f"chunk {index} out of range: the data has {count}")
    return index == count - 1


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise InvalidEncryptionParameter(f"a content key is {KEY_BYTES} bytes, got {len(key)}")


def _check_salt(salt: bytes) -> None:
    if len(salt) != SALT_BYTES:
        raise InvalidEncryptionParameter(f"a salt is {SALT_BYTES} bytes, got {len(salt)}")


def chunk_nonce(salt: bytes, index: int, last: bool) -> bytes:
    """The 12-byte GCM nonce of chunk ``index``: salt ‖ index (4 bytes BE) ‖ last flag (1 byte)."""
    _check_salt(salt)
    if not 0 <= index <= MAX_CHUNKS:
        raise InvalidEncryptionParameter(f"chunk index {index} does not fit in 4 bytes")
    return bytes(salt) + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def generate_content_key(rng: Rng | None = None) -> bytes:
    """A fresh random 32-byte content key."""
    return (rng or secrets.token_bytes)(KEY_BYTES)


def generate_salt(rng: Rng | None = None) -> bytes:
    """A fresh random 7-byte artifact salt."""
    return (rng or secrets.token_bytes)(SALT_BYTES)


def key_check(salt: bytes, key: bytes) -> bytes:
    """The key commitment recorded at registration: sha256(b"NeuroSeed/key-check/v1" ‖ salt ‖ key)."""
    _check_salt(salt)
    _check_key(key)
    return hashlib.sha256(KEY_CHECK_TAG + bytes(salt) + bytes(key)).digest()


# --- one chunk ---------------------------------------------------------------------------------


def encrypt_chunk(key: bytes, salt: bytes, index: int, last: bool, plaintext: bytes) -> bytes:
    """Encrypt data chunk ``index``: ciphertext ‖ 16-byte tag.

    A chunk that is not last holds exactly ``PLAIN_CHUNK_BYTES``; the last one 1 to
    ``PLAIN_CHUNK_BYTES`` (empty data has no chunk at all).
    """
    _check_key(key)
    nonce = chunk_nonce(salt, index, last)
    size = len(plaintext)
    if last and not 1 <= size <= PLAIN_CHUNK_BYTES:
        raise InvalidEncryptionParameter(
            f"the last chunk holds 1 to {PLAIN_CHUNK_BYTES} bytes, got {size}"
        )
    if not last and size != PLAIN_CHUNK_BYTES:
        raise InvalidEncryptionParameter(
            f"a chunk before the last holds exactly {PLAIN_CHUNK_BYTES} bytes, got {size}"
        )
    return AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), None)


def decrypt_chunk(key: bytes, salt: bytes, index: int, last: bool, ciphertext: bytes) -> bytes:
    """Decrypt and authenticate data chunk ``index``; ``DecryptionFailed`` if it is not authentic
    (wrong key, salt, position or last flag, altered bytes, or a size no chunk can have)."""
    _check_key(key)
    nonce = chunk_nonce(salt, index, last)
    size = len(ciphertext)
    if last and not TAG_BYTES < size <= CIPHER_CHUNK_BYTES:
        raise CiphertextSizeMismatch(
            f"chunk {index}: a last chunk is {TAG_BYTES + 1} to {CIPHER_CHUNK_BYTES} bytes, "
            f"got {size}"
        )
    if not last and size != CIPHER_CHUNK_BYTES:
        raise CiphertextSizeMismatch(
            f"chunk {index}: a chunk before the last is {CIPHER_CHUNK_BYTES} bytes, got {size}"
        )
    try:
        return AESGCM(bytes(key)).decrypt(nonce, bytes(ciphertext), None)
    except InvalidTag:
        raise DecryptionFailed(
            f"chunk {index} (last={last}) does not authenticate under this key and salt"
        ) from None


async def decrypt_chunk_async(
    key: bytes, salt: bytes, index: int, last: bool, ciphertext: bytes
) -> bytes:
    """``decrypt_chunk`` in a worker thread."""
    return await trio.to_thread.run_sync(decrypt_chunk, key, salt, index, last, ciphertext)


# --- streams -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncryptResult:
    """What a stream encryption (or decryption) saw: sizes and the plaintext sha-256."""

    plain_size: int
    plain_sha256: bytes
    cipher_size: int


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at end of stream), in reads of at most ``n`` bytes each."""
    first = src.read(n)
    if len(first) == n or not first:
        return first
    buf = bytearray(first)
    while len(buf) < n:
        more = src.read(n - len(buf))
        if not more:
            break
        buf += more
    return bytes(buf)


def _start_of(dst: BinaryIO) -> int | None:
    return dst.tell() if dst.seekable() else None


def _roll_back(dst: BinaryIO, start: int | None) -> None:
    """Remove what a failed call wrote to a seekable ``dst`` (no half-written output)."""
    if start is not None:
        dst.seek(start)
        dst.truncate()


def encrypt_stream(
    key: bytes, salt: bytes, src: BinaryIO, dst: BinaryIO, plain_size: int
) -> EncryptResult:
    """Encrypt exactly ``plain_size`` bytes of ``src`` into ``dst``, one chunk at a time.

    The size is needed up front to flag the last chunk. ``src`` holding fewer or more bytes raises
    ``PlaintextSizeMismatch``; then a seekable ``dst`` is truncated back to where it started
    (a non-seekable one holds a prefix the caller must discard).
    """
    _check_key(key)
    _check_salt(salt)
    count = chunk_count(plain_size)
    aead = AESGCM(bytes(key))
    digest = hashlib.sha256()
    start = _start_of(dst)
    try:
        for index in range(count):
            want = min(PLAIN_CHUNK_BYTES, plain_size - index * PLAIN_CHUNK_BYTES)
            plaintext = _read_exact(src, want)
            if len(plaintext) != want:
                got = index * PLAIN_CHUNK_BYTES + len(plaintext)
                raise PlaintextSizeMismatch(f"source ended after {got} of {plain_size} bytes")
            digest.update(plaintext)
            last = index == count - 1
            dst.write(aead.encrypt(chunk_nonce(salt, index, last), plaintext, None))
        if src.read(1):
            raise PlaintextSizeMismatch(f"source holds more than the declared {plain_size} bytes")
    except BaseException:
        _roll_back(dst, start)
        raise
    return EncryptResult(plain_size, digest.digest(), encrypted_size(plain_size))


def decrypt_stream(
    key: bytes,
    salt: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    plain_size: int,
    *,
    expected_sha256: bytes | None = None,
) -> EncryptResult:
    """Decrypt a whole ciphertext stream of ``plain_size`` bytes of plaintext into ``dst``.

    Raises ``DecryptionFailed`` on any unauthentic chunk, ``CiphertextSizeMismatch`` if ``src``
    is shorter or longer than ``encrypted_size(plain_size)``, and ``DecryptionFailed`` if
    ``expected_sha256`` (the registered plaintext hash) is given and differs. On failure a
    seekable ``dst`` is truncated back to where it started; a non-seekable one holds a prefix of
    authentic chunks that the caller must discard.
    """
    _check_key(key)
    _check_salt(salt)
    count = chunk_count(plain_size)
    aead = AESGCM(bytes(key))
    digest = hashlib.sha256()
    start = _start_of(dst)
    try:
        for index in range(count):
            want = min(PLAIN_CHUNK_BYTES, plain_size - index * PLAIN_CHUNK_BYTES) + TAG_BYTES
            ciphertext = _read_exact(src, want)
            if len(ciphertext) != want:
                raise CiphertextSizeMismatch(
                    f"ciphertext ended inside chunk {index} of {count} "
                    f"(expected {encrypted_size(plain_size)} bytes)"
                )
            last = index == count - 1
            try:
                plaintext = aead.decrypt(chunk_nonce(salt, index, last), ciphertext, None)
            except InvalidTag:
                raise DecryptionFailed(
                    f"chunk {index} of {count} does not authenticate under this key and salt"
                ) from None
            digest.update(plaintext)
            dst.write(plaintext)
        if src.read(1):
            raise CiphertextSizeMismatch(
                f"ciphertext longer than the expected {encrypted_size(plain_size)} bytes"
            )
        plain_sha256 = digest.digest()
        if expected_sha256 is not None and not hmac.compare_digest(plain_sha256, expected_sha256):
            raise DecryptionFailed("decrypted data does not match the registered plaintext hash")
    except BaseException:
        _roll_back(dst, start)
        raise
    return EncryptResult(plain_size, plain_sha256, encrypted_size(plain_size))


async def encrypt_stream_async(
    key: bytes, salt: bytes, src: BinaryIO, dst: BinaryIO, plain_size: int
) -> EncryptResult:
    """``encrypt_stream`` in a worker thread."""
    return await trio.to_thread.run_sync(encrypt_stream, key, salt, src, dst, plain_size)


async def decrypt_stream_async(
    key: bytes,
    salt: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    plain_size: int,
    *,
    expected_sha256: bytes | None = None,
) -> EncryptResult:
    """``decrypt_stream`` in a worker thread."""

    def work() -> EncryptResult:
        return decrypt_stream(key, salt, src, dst, plain_size, expected_sha256=expected_sha256)

    return await trio.to_thread.run_sync(work)


# --- random access -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkSlice:
    """Chunk ``index`` (with its last flag) covers plaintext range [begin, end) through
    ``plaintext[start:stop]`` of that chunk."""

    index: int
    last: bool
    start: int
    stop: int


def chunks_for_range(plain_size: int, begin: int, end: int) -> list[ChunkSlice]:
    """The chunks covering plaintext bytes [begin, end) and the slice each contributes."""
    count = chunk_count(plain_size)
    if not 0 <= begin <= end <= plain_size:
        raise InvalidEncryptionParameter(
            f"range [{begin}, {end}) is not within the data of {plain_size} bytes"
        )
    if begin == end:
        return []
    out = []
    for index in range(begin // PLAIN_CHUNK_BYTES, (end - 1) // PLAIN_CHUNK_BYTES + 1):
        base = index * PLAIN_CHUNK_BYTES
        out.append(
            ChunkSlice(
                index=index,
                last=index == count - 1,
                start=max(begin, base) - base,
                stop=min(end, base + PLAIN_CHUNK_BYTES) - base,
            )
        )
    return out


def decrypt_range(
    key: bytes,
    salt: bytes,
    plain_size: int,
    get_chunk: Callable[[int], bytes],
    begin: int,
    end: int,
) -> Iterator[bytes]:
    """Yield plaintext bytes [begin, end), decrypting only the chunks that cover them.

    ``get_chunk(i)`` returns ciphertext chunk ``i`` (UnixFS leaf ``i + 1``). A chunk of the wrong
    length for its position raises ``CiphertextSizeMismatch``; an unauthentic one
    ``DecryptionFailed``. The range is checked before any chunk is fetched.
    """
    _check_key(key)
    _check_salt(salt)
    plan = chunks_for_range(plain_size, begin, end)
    for part in plan:
        ciphertext = get_chunk(part.index)
        want = plain_chunk_size(plain_size, part.index) + TAG_BYTES
        if len(ciphertext) != want:
            raise CiphertextSizeMismatch(
                f"chunk {part.index} is {len(ciphertext)} bytes; its position needs {want}"
            )
        plaintext = decrypt_chunk(key, salt, part.index, part.last, ciphertext)
        yield plaintext[part.start : part.stop]


# --- key wrapping (fair exchange) --------------------------------------------------------------


def _public_key(pubkey: bytes) -> coincurve.PublicKey:
    if len(pubkey) != PUBLIC_KEY_BYTES or pubkey[0] not in (2, 3):
        raise InvalidPublicKey(
            f"expected a {PUBLIC_KEY_BYTES}-byte compressed secp256k1 public key, "
            f"got {len(pubkey)} bytes"
        )
    try:
        return coincurve.PublicKey(bytes(pubkey))
    except ValueError:
        raise InvalidPublicKey("the bytes are not a point of secp256k1") from None


def _private_key(privkey: bytes) -> coincurve.PrivateKey:
    if len(privkey) != PRIVATE_KEY_BYTES or not 0 < int.from_bytes(privkey, "big") < _SECP256K1_N:
        raise InvalidPrivateKey("a secp256k1 private key is 32 bytes, 0 < k < n")
    return coincurve.PrivateKey(bytes(privkey))


def is_valid_public_key(pubkey: bytes) -> bool:
    """Whether ``pubkey`` is a 33-byte compressed secp256k1 point (check it in the purchase)."""
    try:
        _public_key(pubkey)
    except InvalidPublicKey:
        return False
    return True


def public_key_of(privkey: bytes) -> bytes:
    """The 33-byte compressed public key of a 32-byte private key."""
    return bytes(_private_key(privkey).public_key.format(compressed=True))


def generate_wrap_keypair(rng: Rng | None = None) -> tuple[bytes, bytes]:
    """A one-off (private 32 B, compressed public 33 B) key pair for a purchase."""
    draw = rng or secrets.token_bytes
    while True:
        secret = draw(PRIVATE_KEY_BYTES)
        if len(secret) == PRIVATE_KEY_BYTES and 0 < int.from_bytes(secret, "big") < _SECP256K1_N:
            return secret, public_key_of(secret)


def _wrap_cipher(shared: bytes, context: bytes) -> AESGCM:
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=bytes(context), info=KEY_WRAP_INFO)
    return AESGCM(kdf.derive(shared))


def wrap_key(
    content_key: bytes, buyer_pubkey: bytes, context: bytes, *, rng: Rng | None = None
) -> bytes:
    """Wrap ``content_key`` to the buyer's one-off public key: 81 bytes (see the module doc).

    ``context`` is the purchase id; a fresh ephemeral key is drawn each time (from ``rng`` if
    given, so tests can be deterministic).
    """
    _check_key(content_key)
    buyer = _public_key(buyer_pubkey)
    eph_priv, eph_pub = generate_wrap_keypair(rng)
    shared = _private_key(eph_priv).ecdh(buyer.format(compressed=True))
    sealed = _wrap_cipher(shared, context).encrypt(_WRAP_NONCE, bytes(content_key), bytes(context))
    return eph_pub + sealed


def unwrap_key(wrapped: bytes, buyer_privkey: bytes, context: bytes) -> bytes:
    """Open a wrapped content key with the buyer's one-off private key; ``KeyUnwrapFailed`` if it
    is malformed or does not authenticate (wrong key, wrong context, altered bytes)."""
    buyer = _private_key(buyer_privkey)
    if len(wrapped) != WRAPPED_KEY_BYTES:
        raise KeyUnwrapFailed(f"a wrapped key is {WRAPPED_KEY_BYTES} bytes, got {len(wrapped)}")
    eph_pub, sealed = bytes(wrapped[:PUBLIC_KEY_BYTES]), bytes(wrapped[PUBLIC_KEY_BYTES:])
    try:
        _public_key(eph_pub)
    except InvalidPublicKey:
        raise KeyUnwrapFailed("the ephemeral public key is not a secp256k1 point") from None
    shared = buyer.ecdh(eph_pub)
    try:
        return _wrap_cipher(shared, context).decrypt(_WRAP_NONCE, sealed, bytes(context))
    except InvalidTag:
        raise KeyUnwrapFailed("the wrapped key does not open with this private key") from None


# --- disputes ----------------------------------------------------------------------------------


class DisputeVerdict(enum.IntEnum):
    """Outcome of a key dispute; the integer values are stable (they go into receipts)."""

    KEY_OK = 0
    """The posted key unwraps, matches the key check and decrypts the chunk: the buyer loses."""
    BAD_PRIVATE_KEY = 1
    """The revealed private key is not the purchase's public key: the dispute is invalid."""
    OWNER_FAULT_UNWRAP = 2
    """The posted wrapped key does not open."""
    OWNER_FAULT_CHECK = 3
    """It opens, but to a key other than the one committed at registration."""
    OWNER_FAULT_DECRYPT = 4
    """It is the committed key, but the given ciphertext chunk does not decrypt with it."""

    @property
    def owner_at_fault(self) -> bool:
        return self in (
            DisputeVerdict.OWNER_FAULT_UNWRAP,
            DisputeVerdict.OWNER_FAULT_CHECK,
            DisputeVerdict.OWNER_FAULT_DECRYPT,
        )


def check_dispute(
    *,
    wrapped: bytes,
    buyer_privkey: bytes,
    buyer_pubkey: bytes,
    context: bytes,
    salt: bytes,
    key_check_value: bytes,
    chunk: tuple[int, bool, bytes] | None,
) -> DisputeVerdict:
    """Judge a key dispute (pure; no I/O).

    ``chunk`` is (data chunk index, last flag, ciphertext) — data chunk ``i`` is UnixFS leaf
    ``i + 1``. The caller must have checked the leaf against the root CID (its path) and must
    derive the last flag from the registered data size (``is_last_chunk``), never take it from
    the buyer. Raises ``InvalidEncryptionParameter`` only for a salt or chunk index the format
    cannot have (the registration and the dispute transaction should already refuse those).
    """
    _check_salt(salt)
    if chunk is not None and not 0 <= chunk[0] <= MAX_CHUNKS:
        raise InvalidEncryptionParameter(f"chunk index {chunk[0]} does not fit in 4 bytes")
    try:
        matches = public_key_of(buyer_privkey) == bytes(buyer_pubkey)
    except InvalidPrivateKey:
        matches = False
    if not matches:
        return DisputeVerdict.BAD_PRIVATE_KEY
    try:
        content_key = unwrap_key(wrapped, buyer_privkey, context)
    except KeyUnwrapFailed:
        return DisputeVerdict.OWNER_FAULT_UNWRAP
    if len(content_key) != KEY_BYTES or not hmac.compare_digest(
        key_check(salt, content_key), bytes(key_check_value)
    ):
        return DisputeVerdict.OWNER_FAULT_CHECK
    if chunk is not None:
        index, last, ciphertext = chunk
        try:
            decrypt_chunk(content_key, salt, index, last, ciphertext)
        except DecryptionFailed:
            return DisputeVerdict.OWNER_FAULT_DECRYPT
    return DisputeVerdict.KEY_OK
