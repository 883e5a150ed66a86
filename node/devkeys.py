"""Deterministic DEVELOPMENT keys for the devnet — publicly known, never for real value.

``secret_i = sha256(b"neuroseed-devnet-key-" + str(i))``. Anyone who reads this file can derive
every one of these keys and spend whatever they hold, so they exist only so that a fresh devnet
(``neuroseed devnet``, the repository's ``genesis.json``, tests) has a validator and funded
accounts without any setup. Dev key 0 is the devnet validator; dev keys 1..N are the funded
accounts of the devnet genesis. ``DEV_PASSWORD`` encrypts them in a devnet keystore and is just as
public: it protects nothing and only satisfies the keystore's file format.
"""

from __future__ import annotations

import hashlib

from node.crypto import SECP256K1_N, PrivateKey
from node.types import Address

DEV_KEY_PREFIX = b"neuroseed-devnet-key-"

# Public on purpose (see the module docstring): a devnet keystore needs *a* password.
DEV_PASSWORD = "neuroseed-devnet-insecure"

DEV_VALIDATOR_INDEX = 0


def dev_secret(i: int) -> bytes:
    """The 32-byte secret of dev key ``i`` (public; see the module docstring)."""
    if type(i) is not int or i < 0:
        raise ValueError("a dev key index is a non-negative integer")
    secret = hashlib.sha256(DEV_KEY_PREFIX + str(i).encode("ascii")).digest()
    # A sha-256 output is a valid secp256k1 scalar except with probability ~2^-128; fail loudly
    # rather than silently deriving something else, so the documented rule stays the rule.
    if not 0 < int.from_bytes(secret, "big") < SECP256K1_N:
        raise ValueError(f"dev key {i} is not a valid secp256k1 scalar")
    return secret


def dev_key(i: int) -> PrivateKey:
    """Dev key ``i``: 0 is the devnet validator, 1..N the funded devnet accounts."""
    return PrivateKey(dev_secret(i))


def dev_address(i: int) -> Address:
    return dev_key(i).address
