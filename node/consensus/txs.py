"""Transactions: the signed envelope, kind dispatch and the body records (DESIGN §4).

``Transaction(chain_id, nonce, fee, kind, body)`` where ``body`` is the canonical encoding of the
kind's body record. The sender is recovered from the signature over
``sha256(b"NeuroSeed/tx/v1" || chain_id || encode(Transaction))``; the transaction id is
``sha256(encode(SignedTransaction))`` — unique because signatures are canonical (low-S, v ∈ {0,1}).

Kinds 1–19 are defined here (``TxKind``); the economy's kinds (``node.economy.api.EconomyKind``,
20 and up) come with their body records and stateless checks from ``node.economy.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from node import crypto
from node.consensus.params import VotableParams
from node.economy.registry import HANDLERS as ECONOMY_HANDLERS
from node.encoding import Record, limit, unpack_canonical
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
from node.types import UINT64_MAX, Address, Amount, ChainId, Hash32, Nonce, Signature

# Hard ceiling on one encoded signed transaction; the votable ``max_tx_bytes`` may only lower it.
MAX_TX_BYTES_HARD = 1 << 20
MAX_BODY_BYTES = MAX_TX_BYTES_HARD - 256
MAX_MEMO_BYTES = 256


class TxKind(IntEnum):
    TRANSFER = 1
    # The validator set and the votable parameters (DESIGN §5 "Authority"); 10..19 are kept for
    # validator-set kinds.
    BOND = 10
    UNBOND = 11
    VALIDATOR_VOTE = 12
    PARAM_VOTE = 13


class VoteAction(IntEnum):
    """What a ``ValidatorVote`` asks for its subject."""

    ADD = 1  # a bonded candidate joins the set
    REMOVE = 2  # a validator leaves the set (its bond stays locked; it remains a candidate)


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


@dataclass(frozen=True, slots=True)
class Bond(Record):
    """Lock ``amount`` from the sender's balance as (more) validator bond; it becomes a candidate
    once its bond reaches ``min_validator_bond``."""

    amount: Amount


@dataclass(frozen=True, slots=True)
class Unbond(Record):
    """Leave: a validator is removed at h+2 (floor permitting); the whole bond returns to the
    balance ``unbonding_heights`` after that."""


@dataclass(frozen=True, slots=True)
class ValidatorVote(Record):
    """A validator of this height votes to add (a bonded candidate) or remove (a validator)."""

    subject: Address
    action: int  # VoteAction


@dataclass(frozen=True, slots=True)
class ParamVote(Record):
    """A validator votes for new votable parameters, named by ``sha256(params.encode())``.

    The first vote for a hash must carry the record (it is kept in state with the tally); later
    votes may leave it out.
    """

    params_hash: Hash32
    params: VotableParams | None


BODY_TYPES: dict[int, type[Record]] = {
    TxKind.TRANSFER: Transfer,
    TxKind.BOND: Bond,
    TxKind.UNBOND: Unbond,
    TxKind.VALIDATOR_VOTE: ValidatorVote,
    TxKind.PARAM_VOTE: ParamVote,
    **{kind: handler.body for kind, handler in ECONOMY_HANDLERS.items()},
}
KNOWN_KINDS: frozenset[int] = frozenset(int(k) for k in BODY_TYPES)
"""Every transaction kind: each needs a fee schedule in the votable parameters."""


def hash_params(params: VotableParams) -> Hash32:
    """The name of a parameter proposal: sha256 of its canonical encoding."""
    return crypto.sha256(params.encode())


def _check_body(kind: int, body: Record) -> None:
    """Stateless rules of a decoded body beyond its encoding (InvalidBody)."""
    handler = ECONOMY_HANDLERS.get(kind)
    if handler is not None:
        if handler.check_body is not None:
            handler.check_body(body)
    elif isinstance(body, Bond):
        if body.amount == 0:
            raise InvalidBody("Bond: amount must be positive")
    elif isinstance(body, ValidatorVote):
        if body.action not in (VoteAction.ADD, VoteAction.REMOVE):
            raise InvalidBody(
                f"ValidatorVote: unknown action {body.action} (1 = add, 2 = remove)"
            )
    elif (
        isinstance(body, ParamVote)
        and body.params is not None
        and hash_params(body.params) != body.params_hash
    ):
        raise InvalidBody("ParamVote: params_hash is not the hash of the params carried")


def decode_body(tx: Transaction) -> Record:
    body_type = BODY_TYPES.get(tx.kind)
    if body_type is None:
        raise UnknownKind(f"unknown transaction kind {tx.kind}")
    try:
        body = body_type.decode(tx.body, max_size=MAX_BODY_BYTES)
    except DecodeError as exc:
        raise InvalidBody(f"{body_type.__name__}: {exc.message}") from exc
    if body_type is not Transfer:
        _check_body(tx.kind, body)
    return body


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
    fast = _decode_transfer(raw, max_bytes)
    if fast is None:
        # Every other kind, and every input the fast path does not take: the strict decoders
        # (which raise the specific error for a bad input).
        signed = decode_transaction(raw, max_bytes)
        body = decode_body(signed.tx)
        sender = recover_sender(signed)
    else:
        signed, body = fast
        # A canonical SignedTransaction is [tx, signature]: a 2-item array (the 1-byte header
        # 0x92, whatever the size), the Transaction's own canonical bytes, then the 65-byte
        # signature as bin 8 (0xc4 0x41 + 65 bytes). So the signed bytes are raw[1:-67] exactly;
        # the Transaction's inner headers (its body's bin 8/16/32) are inside that slice.
        sender = _recover(signed, raw[1 : len(raw) - _SIGNATURE_WIRE_BYTES])
    return VerifiedTransaction(raw, crypto.sha256(raw), signed, sender, body)


# The signature's msgpack form at the end of a SignedTransaction: bin 8 header (2 bytes) + 65.
_SIGNATURE_WIRE_BYTES = 2 + 65


def _decode_transfer(raw: object, max_bytes: int) -> tuple[SignedTransaction, Transfer] | None:
    """The fast path of ``decode_transaction`` + ``decode_body`` for a transfer.

    Returns what they would return, or None wherever they would raise or the transaction is
    not a transfer (the caller then takes the strict path, which raises the proper error): the
    same canonical unpacking of the envelope and the same checks on its tree, inline; the body
    is accepted only in its exact canonical byte layout.
    """
    if type(raw) is not bytes or len(raw) > max_bytes:
        return None
    try:
        tree = unpack_canonical(raw, max_size=max_bytes)
    except DecodeError:
        return None
    if type(tree) is not tuple or len(tree) != 2:
        return None
    wire_tx, signature = tree
    if type(wire_tx) is not tuple or len(wire_tx) != 5:
        return None
    if type(signature) is not bytes or len(signature) != 65:
        return None
    chain_id, nonce, fee, kind, body = wire_tx
    if (
        kind != TxKind.TRANSFER
        or type(kind) is not int
        or type(chain_id) is not int
        or type(nonce) is not int
        or not 0 <= chain_id <= UINT64_MAX
        or not 0 <= nonce <= UINT64_MAX
        or type(fee) is not bytes
        or len(fee) != 32
        or type(body) is not bytes
        or len(body) > MAX_BODY_BYTES
    ):
        return None
    # The body, read in place: a canonical Transfer with a memo under 256 bytes is exactly
    # 0x93, bin 8 of 20 bytes, bin 8 of 32 bytes, bin 8 of the memo (59 bytes + the memo).
    # Any other form (a longer memo's bin 16, or invalid bytes) takes the strict path.
    n = len(body)
    if (
        n < 59
        or body[57] != 0xC4
        or body[58] != n - 59
        or body[:3] != b"\x93\xc4\x14"
        or body[23:25] != b"\xc4\x20"
    ):
        return None
    to = body[3:23]
    amount = body[25:57]
    memo = body[59:]
    tx = Transaction(
        ChainId(chain_id), Nonce(nonce), Amount(int.from_bytes(fee, "big")), kind, body
    )
    return (
        SignedTransaction(tx, Signature(signature)),
        Transfer(Address(to), Amount(int.from_bytes(amount, "big")), memo),
    )


def recover_sender(signed: SignedTransaction) -> Address:
    return _recover(signed, signed.tx.encode())


def _recover(signed: SignedTransaction, encoded_tx: bytes) -> Address:
    """The sender of ``signed``, given the canonical encoding of ``signed.tx``."""
    try:
        return crypto.recover_signer(
            crypto.TAG_TX, signed.tx.chain_id, encoded_tx, signed.signature
        )
    except MalleableSignature as exc:
        raise MalleableTransactionSignature(exc.message) from exc
    except InvalidSignature as exc:
        raise TransactionSignatureError(exc.message) from exc


def tx_id(raw: bytes) -> Hash32:
    return crypto.sha256(raw)
