"""Transactions: the signed envelope, kind dispatch and the body records (DESIGN §4).

``Transaction(chain_id, nonce, fee, kind, body)`` where ``body`` is the canonical encoding of the
kind's body record. The sender is recovered from the signature over
``sha256(b"NeuroSeed/tx/v1" || chain_id || encode(Transaction))``; the transaction id is
``sha256(encode(SignedTransaction))`` — unique because signatures are canonical (low-S, v ∈ {0,1}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from node import crypto
from node.encoding import Record, limit
from node.errors import (
    DecodeError,
    InvalidBody,
    InvalidSignature,
    MalformedTransaction,
    MalleableSignature,
    MalleableTransactionSignature,
    TooLarge,
    TransactionSignatureError,
    TransactionTooLarge,
    UnknownKind,
)
from node.types import Address, Amount, ChainId, Hash32, Nonce, Signature

# Hard ceiling on one encoded signed transaction; the votable ``max_tx_bytes`` may only lower it.
MAX_TX_BYTES_HARD = 1 << 20
MAX_BODY_BYTES = MAX_TX_BYTES_HARD - 256
MAX_MEMO_BYTES = 256


class TxKind(IntEnum):
    TRANSFER = 1


@dataclass(frozen=True, slots=True)
class Transaction(Record):
    chain_id: ChainId
    nonce: Nonce
    fee: Amount
    kind: int
    body: bytes = field(metadata=limit(MAX_BODY_BYTES))


@dataclass(frozen=True, slots=True)
class SignedTransaction(Record):
    tx: Transaction
    signature: Signature


@dataclass(frozen=True, slots=True)
class Transfer(Record):
    """Move ``amount`` NSD base units from the sender to ``to``."""

    to: Address
    amount: Amount
    memo: bytes = field(default=b"", metadata=limit(MAX_MEMO_BYTES))


BODY_TYPES: dict[int, type[Record]] = {TxKind.TRANSFER: Transfer}


def decode_body(tx: Transaction) -> Record:
    body_type = BODY_TYPES.get(tx.kind)
    if body_type is None:
        raise UnknownKind(f"unknown transaction kind {tx.kind}")
    try:
        return body_type.decode(tx.body, max_size=MAX_BODY_BYTES)
    except DecodeError as exc:
        raise InvalidBody(f"{body_type.__name__}: {exc.message}") from exc


def make_transaction(
    key: crypto.PrivateKey,
    chain_id: int,
    nonce: int,
    fee: int,
    body: Record,
) -> SignedTransaction:
    kind = next((k for k, t in BODY_TYPES.items() if t is type(body)), None)
    if kind is None:
        raise TypeError(f"{type(body).__name__} is not a transaction body")
    tx = Transaction(ChainId(chain_id), Nonce(nonce), Amount(fee), int(kind), body.encode())
    return SignedTransaction(tx, key.sign(crypto.TAG_TX, chain_id, tx.encode()))


@dataclass(frozen=True, slots=True)
class VerifiedTransaction:
    """A decoded signed transaction with its sender recovered, its id and its decoded body."""

    raw: bytes
    tx_id: Hash32
    signed: SignedTransaction
    sender: Address
    body: Record

    @property
    def tx(self) -> Transaction:
        return self.signed.tx

    @property
    def size(self) -> int:
        return len(self.raw)


def decode_transaction(raw: bytes, max_bytes: int = MAX_TX_BYTES_HARD) -> SignedTransaction:
    if len(raw) > max_bytes:
        raise TransactionTooLarge(f"transaction of {len(raw)} bytes exceeds {max_bytes}")
    try:
        return SignedTransaction.decode(raw, max_size=max_bytes)
    except TooLarge as exc:
        raise TransactionTooLarge(exc.message) from exc
    except DecodeError as exc:
        raise MalformedTransaction(f"malformed transaction: {exc.message}") from exc


def verify_transaction(raw: bytes, max_bytes: int = MAX_TX_BYTES_HARD) -> VerifiedTransaction:
    """Decode strictly, dispatch the kind, recover the sender. No state is consulted."""
    signed = decode_transaction(raw, max_bytes)
    body = decode_body(signed.tx)
    sender = recover_sender(signed)
    return VerifiedTransaction(raw, crypto.sha256(raw), signed, sender, body)


def recover_sender(signed: SignedTransaction) -> Address:
    try:
        return crypto.recover_signer(
            crypto.TAG_TX, signed.tx.chain_id, signed.tx.encode(), signed.signature
        )
    except MalleableSignature as exc:
        raise MalleableTransactionSignature(exc.message) from exc
    except InvalidSignature as exc:
        raise TransactionSignatureError(exc.message) from exc


def tx_id(raw: bytes) -> Hash32:
    return crypto.sha256(raw)
