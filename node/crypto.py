"""Keys, signatures, addresses and hashes (DESIGN §3): every signature of the node goes through here
(``node.storage.encryption`` also uses coincurve, for the ECDH of key wrapping).

* Signatures are 65-byte recoverable secp256k1 signatures ``r || s || v`` over
  ``sha256(domain_tag || chain_id as 8-byte big-endian || encoded unsigned record)``.
  High-S signatures (``s > n/2``) and recovery ids other than 0/1 are rejected, so every signed
  record has exactly one valid signature byte form (and one id).
* Address = last 20 bytes of keccak-256 of the 64-byte ``X || Y`` public key (Ethereum's rule;
  keccak-256 is not ``hashlib.sha3_256``).
"""

from __future__ import annotations

import hashlib
import secrets

import coincurve
from Crypto.Hash import keccak as _keccak

from node.errors import InvalidSignature, MalleableSignature
from node.types import Address, ChainId, Hash32, Signature

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2

# One fixed ASCII domain tag per signed record type.
TAG_TX = b"NeuroSeed/tx/v1"
TAG_VOTE = b"NeuroSeed/vote/v1"
TAG_PROPOSAL = b"NeuroSeed/proposal/v1"


def sha256(data: bytes) -> Hash32:
    return Hash32(hashlib.sha256(data).digest())


def keccak256(data: bytes) -> bytes:
    return _keccak.new(digest_bits=256, data=data).digest()


def signing_digest(tag: bytes, chain_id: ChainId | int, encoded: bytes) -> Hash32:
    """The digest a signature covers: sha256(tag || chain_id (8 bytes BE) || encoded record)."""
    return Hash32(hashlib.sha256(tag + chain_id.to_bytes(8, "big") + encoded).digest())


def address_from_public_key(public_key_64: bytes) -> Address:
    if len(public_key_64) != 64:
        raise ValueError("expected a 64-byte X || Y public key")
    return Address(keccak256(public_key_64)[-20:])


class PrivateKey:
    """A secp256k1 signing key. Keep instances in memory only; on disk keys live in the keystore."""

    __slots__ = ("_key", "address", "public_key")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("a private key is 32 bytes")
        try:
            self._key = coincurve.PrivateKey(secret)
        except ValueError as exc:
            raise ValueError("private key out of range") from exc
        self.public_key: bytes = self._key.public_key.format(compressed=False)[1:]
        self.address: Address = address_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> PrivateKey:
        while True:
            secret = secrets.token_bytes(32)
            if 0 < int.from_bytes(secret, "big") < SECP256K1_N:
                return cls(secret)

    @property
    def secret(self) -> bytes:
        return bytes(self._key.secret)

    def sign_digest(self, digest: bytes) -> Signature:
        """Sign a 32-byte digest; libsecp256k1 always produces low-S with recovery id 0 or 1."""
        sig = self._key.sign_recoverable(digest, hasher=None)
        return Signature(sig)

    def sign(self, tag: bytes, chain_id: ChainId | int, encoded: bytes) -> Signature:
        return self.sign_digest(signing_digest(tag, chain_id, encoded))


def check_signature_form(signature: bytes) -> None:
    """Reject anything but a canonical 65-byte signature: 0 < r < n, 0 < s <= n/2, v in {0, 1}."""
    if type(signature) is not bytes or len(signature) != 65:
        raise InvalidSignature("a signature is 65 bytes (r || s || v)")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if not 0 < r < SECP256K1_N or not 0 < s < SECP256K1_N:
        raise InvalidSignature("signature r or s out of range")
    if s > SECP256K1_HALF_N:
        raise MalleableSignature("high-S signature (s > n/2) is not accepted")
    if v > 1:
        raise MalleableSignature(f"recovery id {v} is not accepted (only 0 or 1)")


def recover_public_key(digest: bytes, signature: bytes) -> bytes:
    """Recover the 64-byte public key that made ``signature`` over ``digest``."""
    check_signature_form(signature)
    try:
        pub = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)
    except (ValueError, TypeError) as exc:
        raise InvalidSignature("signature does not recover a public key") from exc
    return pub.format(compressed=False)[1:]


def recover_address(digest: bytes, signature: bytes) -> Address:
    return address_from_public_key(recover_public_key(digest, signature))


def recover_signer(
    tag: bytes, chain_id: ChainId | int, encoded: bytes, signature: bytes
) -> Address:
    return recover_address(signing_digest(tag, chain_id, encoded), signature)


def malleate(signature: bytes) -> bytes:
    """The high-S twin (r, n - s, v ^ 1) of a signature; used by tests and vectors only."""
    r = signature[:32]
    s = int.from_bytes(signature[32:64], "big")
    return r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([signature[64] ^ 1])
