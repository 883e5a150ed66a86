"""Keys, addresses and signatures: the committed vectors, malleability, Ethereum cross-checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import pytest
from eth_account import Account as EthAccount
from eth_keys.datatypes import Signature as EthSignature
from hypothesis import given
from hypothesis import strategies as st

from node import crypto, errors
from node.consensus.blocks import SignedVote, vote_signer
from node.consensus.txs import verify_transaction
from node.devkeys import DEV_KEY_PREFIX, DEV_PASSWORD, dev_address, dev_key, dev_secret
from node.errors import (
    InvalidSignature,
    MalleableSignature,
    MalleableTransactionSignature,
)
from tests.vectors import gen_vectors

VECTORS = json.loads(gen_vectors.SIGNATURES_FILE.read_text())
KEYS = [crypto.PrivateKey(bytes.fromhex(k["secret"])) for k in VECTORS["keys"]]


def test_vector_file_is_reproduced_exactly() -> None:
    assert gen_vectors.render(gen_vectors.build_signature_vectors()) == (
        gen_vectors.SIGNATURES_FILE.read_text()
    )


# --- keys and addresses ------------------------------------------------------------------------


@pytest.mark.parametrize("vec", VECTORS["keys"], ids=[k["name"] for k in VECTORS["keys"]])
def test_key_vector(vec: dict[str, Any]) -> None:
    key = crypto.PrivateKey(bytes.fromhex(vec["secret"]))
    assert key.public_key.hex() == vec["public_key"]
    assert key.address.hex() == vec["address"]
    assert crypto.address_from_public_key(key.public_key).hex() == vec["address"]


def test_published_ethereum_addresses() -> None:
    # Independent of our code and of eth-account: addresses published for these secrets.
    assert KEYS[0].address.hex() == "7e5f4552091a69125d5dfcb7b8c2659029395bdf"
    assert KEYS[1].address.hex() == "2c7536e3605d9c16a7a3d7b1898e529396a65c23"


@given(st.integers(1, crypto.SECP256K1_N - 1))
def test_address_matches_eth_account(secret_int: int) -> None:
    secret = secret_int.to_bytes(32, "big")
    ours = crypto.PrivateKey(secret).address
    assert ours.hex() == EthAccount.from_key(secret).address.lower()[2:]


def test_dev_keys_match_eth_account() -> None:
    for i in range(12):
        expected = EthAccount.from_key(dev_secret(i)).address
        assert dev_address(i).hex() == expected.lower()[2:]


def test_keccak_is_not_sha3() -> None:
    empty_keccak = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert crypto.keccak256(b"").hex() == empty_keccak
    assert hashlib.sha3_256(b"").hexdigest() != empty_keccak


def test_private_key_validation() -> None:
    for bad in (b"", b"\x01" * 31, b"\x00" * 32, crypto.SECP256K1_N.to_bytes(32, "big")):
        with pytest.raises(ValueError):
            crypto.PrivateKey(bad)


# --- dev keys ----------------------------------------------------------------------------------


def test_dev_key_rule() -> None:
    for i in (0, 1, 2, 10, 123):
        assert dev_secret(i) == hashlib.sha256(DEV_KEY_PREFIX + str(i).encode()).digest()
        assert dev_key(i).secret == dev_secret(i)
    assert DEV_KEY_PREFIX == b"neuroseed-devnet-key-"
    assert len({dev_address(i) for i in range(20)}) == 20
    assert isinstance(DEV_PASSWORD, str) and DEV_PASSWORD


def test_dev_key_pinned() -> None:
    # Pinned so an accidental change of the derivation (which would orphan every devnet) fails.
    assert dev_secret(0).hex() == hashlib.sha256(b"neuroseed-devnet-key-0").hexdigest()
    assert (
        dev_address(0).hex()
        == EthAccount.from_key(hashlib.sha256(b"neuroseed-devnet-key-0").digest()).address.lower()[
            2:
        ]
    )


@pytest.mark.parametrize("bad", [-1, True, "1", 1.0])
def test_dev_key_bad_index(bad: Any) -> None:
    with pytest.raises(ValueError):
        dev_secret(bad)


# --- signatures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vec", VECTORS["signatures"], ids=[s["name"] for s in VECTORS["signatures"]]
)
def test_signature_vector(vec: dict[str, Any]) -> None:
    key = KEYS[vec["key"]]
    message = bytes.fromhex(vec["message"])
    tag = vec["tag"].encode("ascii")
    digest = crypto.signing_digest(tag, vec["chain_id"], message)
    assert digest.hex() == vec["digest"]
    # The digest rule spelled out: sha256(tag || chain_id as 8-byte big-endian || message).
    assert digest == hashlib.sha256(tag + vec["chain_id"].to_bytes(8, "big") + message).digest()
    sig = key.sign(tag, vec["chain_id"], message)
    assert sig.hex() == vec["signature"]  # RFC 6979: deterministic
    assert crypto.recover_address(digest, sig).hex() == vec["address"]
    assert crypto.recover_signer(tag, vec["chain_id"], message, sig) == key.address
    assert crypto.recover_public_key(digest, sig) == key.public_key
    s = int.from_bytes(sig[32:64], "big")
    assert s <= crypto.SECP256K1_HALF_N and sig[64] in (0, 1)


@pytest.mark.parametrize(
    "vec", VECTORS["signatures"], ids=[s["name"] for s in VECTORS["signatures"]]
)
def test_malleated_signature_rejected(vec: dict[str, Any]) -> None:
    sig = bytes.fromhex(vec["signature"])
    twin = bytes.fromhex(vec["malleated"])
    assert twin == crypto.malleate(sig)
    assert twin[:32] == sig[:32]
    assert int.from_bytes(twin[32:64], "big") == crypto.SECP256K1_N - int.from_bytes(
        sig[32:64], "big"
    )
    assert twin[64] == sig[64] ^ 1
    digest = bytes.fromhex(vec["digest"])
    # The twin is a valid ECDSA signature for the same key (eth-keys recovers it); only our
    # low-S rule stops it from being a second byte form of the same signed record.
    other = EthSignature(twin).recover_public_key_from_msg_hash(digest)
    assert other.to_canonical_address().hex() == vec["address"]
    with pytest.raises(MalleableSignature):
        crypto.recover_address(digest, twin)
    with pytest.raises(MalleableSignature):
        crypto.recover_public_key(digest, twin)
    with pytest.raises(MalleableSignature):
        crypto.check_signature_form(twin)


@pytest.mark.parametrize(
    "vec", VECTORS["invalid_signatures"], ids=[s["name"] for s in VECTORS["invalid_signatures"]]
)
def test_invalid_signature_vector(vec: dict[str, Any]) -> None:
    expected = getattr(errors, vec["error"])
    with pytest.raises(InvalidSignature) as info:
        crypto.recover_address(bytes.fromhex(vec["digest"]), bytes.fromhex(vec["signature"]))
    assert type(info.value) is expected


def test_recovery_ids_2_and_3_are_covered() -> None:
    names = {v["name"] for v in VECTORS["invalid_signatures"]}
    assert {"high_s", "recovery_id_2", "recovery_id_3"} <= names


def test_wrong_digest_recovers_another_address() -> None:
    vec = VECTORS["signatures"][0]
    sig = bytes.fromhex(vec["signature"])
    other = crypto.sha256(b"something else")
    try:
        addr = crypto.recover_address(other, sig)
    except InvalidSignature:
        return
    assert addr.hex() != vec["address"]


@given(st.binary(min_size=32, max_size=32), st.integers(0, len(KEYS) - 1))
def test_sign_recover_property(digest: bytes, key_index: int) -> None:
    key = KEYS[key_index]
    sig = key.sign_digest(digest)
    assert crypto.recover_address(digest, sig) == key.address
    with pytest.raises(MalleableSignature):
        crypto.recover_address(digest, crypto.malleate(sig))


@given(st.binary(min_size=65, max_size=65), st.binary(min_size=32, max_size=32))
def test_random_signatures_raise_only_invalid_signature(sig: bytes, digest: bytes) -> None:
    with contextlib.suppress(InvalidSignature):
        crypto.recover_address(digest, sig)


# --- transactions and votes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "vec", VECTORS["transactions"], ids=[t["name"] for t in VECTORS["transactions"]]
)
def test_transaction_vector(vec: dict[str, Any]) -> None:
    raw = bytes.fromhex(vec["signed"])
    vtx = verify_transaction(raw)
    assert vtx.sender.hex() == vec["sender"]
    assert vtx.tx_id.hex() == vec["tx_id"]
    assert vtx.signed.tx.encode().hex() == vec["unsigned"]
    assert vtx.signed.signature.hex() == vec["signature"]
    digest = crypto.signing_digest(crypto.TAG_TX, vtx.tx.chain_id, vtx.tx.encode())
    assert digest.hex() == vec["digest"]
    # Re-signing reproduces the exact bytes, hence the exact id.
    assert KEYS[vec["key"]].sign_digest(digest).hex() == vec["signature"]


@pytest.mark.parametrize(
    "vec", VECTORS["transactions"], ids=[t["name"] for t in VECTORS["transactions"]]
)
def test_malleated_transaction_rejected(vec: dict[str, Any]) -> None:
    # The high-S twin would be a second valid byte string (and id) for one transaction.
    assert vec["malleated_tx_id"] != vec["tx_id"]
    with pytest.raises(MalleableTransactionSignature):
        verify_transaction(bytes.fromhex(vec["malleated_signed"]))
    with pytest.raises(MalleableTransactionSignature):
        verify_transaction(bytes.fromhex(vec["recovery_id_2_signed"]))


@pytest.mark.parametrize("vec", VECTORS["votes"], ids=[v["name"] for v in VECTORS["votes"]])
def test_vote_vector(vec: dict[str, Any]) -> None:
    signed = SignedVote.decode(bytes.fromhex(vec["signed"]))
    assert signed.vote.encode().hex() == vec["vote"]
    assert vote_signer(vec["chain_id"], signed) == KEYS[vec["key"]].address
    digest = crypto.signing_digest(crypto.TAG_VOTE, vec["chain_id"], signed.vote.encode())
    assert digest.hex() == vec["digest"]
    # Another chain id gives another digest, so a vote cannot be replayed across chains.
    assert vote_signer(vec["chain_id"] + 1, signed) != KEYS[vec["key"]].address
    twin = SignedVote.decode(bytes.fromhex(vec["malleated_signed"]))
    with pytest.raises(MalleableSignature):
        vote_signer(vec["chain_id"], twin)
