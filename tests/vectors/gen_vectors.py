"""Generate tests/vectors/encoding.json and signatures.json from fixed keys and inputs.

Run ``python tests/vectors/gen_vectors.py`` to rewrite both files, or with ``--check`` to fail if
they differ from what the code produces now. The files are the reference other implementations
(light clients, SDKs in other languages) test against; any change to them is a consensus change.

Everything here is deterministic: the keys are fixed, and libsecp256k1 signs with RFC 6979
nonces, so one (key, digest) pair always gives the same signature.

JSON forms of record fields: unsigned integers as JSON numbers, ``Amount`` (uint256) as a decimal
string, bytes (and ``Address`` / ``Hash32`` / ``Signature``) as lowercase hex without ``0x``,
``str`` as a string, ``None`` as null, tuples as lists, nested records as objects.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from node import crypto
from node.consensus.blocks import (
    Block,
    Commit,
    DuplicateVoteEvidence,
    Header,
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
    VoteType,
    sign_proposal,
    sign_vote,
)
from node.consensus.params import ChainParams, FeeSchedule, VotableParams
from node.consensus.receipts import Attribute, Event, Receipt
from node.consensus.state import Account, Supply
from node.consensus.txs import SignedTransaction, Transaction, Transfer, make_transaction
from node.encoding import Record
from node.types import (
    NSD,
    UINT64_MAX,
    UINT256_MAX,
    Address,
    Amount,
    ChainId,
    Hash32,
    Height,
    Nonce,
    Round,
    Signature,
    TimestampMs,
)

HERE = Path(__file__).resolve().parent
ENCODING_FILE = HERE / "encoding.json"
SIGNATURES_FILE = HERE / "signatures.json"

CHAIN_ID = 7310

# Fixed secrets. The first two are well-known Ethereum test keys whose addresses are published
# (secret 1 -> 0x7E5F…5BdF; eth-account's documentation key -> 0x2c75…5c23), pinning our
# address derivation to Ethereum's independently of our own code.
KEY_SECRETS: tuple[tuple[str, str, str | None], ...] = (
    (
        "one",
        "0000000000000000000000000000000000000000000000000000000000000001",
        "7e5f4552091a69125d5dfcb7b8c2659029395bdf",
    ),
    (
        "eth_account_docs",
        "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318",
        "2c7536e3605d9c16a7a3d7b1898e529396a65c23",
    ),
    ("vector_key_2", crypto.sha256(b"neuroseed-vector-key-2").hex(), None),
)

# Every record type that appears in the vectors, by name.
RECORD_TYPES: dict[str, type[Record]] = {
    t.__name__: t
    for t in (
        Transfer,
        Transaction,
        SignedTransaction,
        Vote,
        SignedVote,
        Proposal,
        SignedProposal,
        Header,
        Commit,
        DuplicateVoteEvidence,
        Block,
        Account,
        Supply,
        FeeSchedule,
        VotableParams,
        ChainParams,
        Attribute,
        Event,
        Receipt,
    )
}

_BYTES_TYPES: tuple[object, ...] = (bytes, Address, Hash32, Signature)
_INT_TYPES: tuple[object, ...] = (int, Height, Round, Nonce, ChainId, TimestampMs)


# --- JSON <-> record values -------------------------------------------------------------------


def _fields(cls: type[Record]) -> tuple[dataclasses.Field[Any], ...]:
    # Every Record subclass is a dataclass; the base class itself is not, hence the cast.
    return dataclasses.fields(typing.cast(Any, cls))


def to_json_value(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return None if value is None else to_json_value(inner, value)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return [to_json_value(item, v) for v in value]
    if tp is Amount:
        return str(value)
    if tp in _BYTES_TYPES:
        return bytes(value).hex()
    if tp in _INT_TYPES or tp in (bool, str):
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        hints = typing.get_type_hints(tp)
        return {f.name: to_json_value(hints[f.name], getattr(value, f.name)) for f in _fields(tp)}
    raise TypeError(f"no JSON form for {tp!r}")


def from_json_value(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return None if value is None else from_json_value(inner, value)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return tuple(from_json_value(item, v) for v in value)
    if tp is Amount:
        return Amount(int(value))
    if tp in _BYTES_TYPES:
        return bytes.fromhex(value)
    if tp in _INT_TYPES or tp in (bool, str):
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: from_json_value(hints[f.name], value[f.name]) for f in _fields(tp)})
    raise TypeError(f"no JSON form for {tp!r}")


def record_from_json(type_name: str, value: Any) -> Record:
    cls = RECORD_TYPES[type_name]
    record = from_json_value(cls, value)
    assert isinstance(record, Record)
    return record


# --- fixed inputs ------------------------------------------------------------------------------


def keys() -> list[crypto.PrivateKey]:
    return [crypto.PrivateKey(bytes.fromhex(secret)) for _, secret, _ in KEY_SECRETS]


def _h(label: str) -> Hash32:
    """A fixed, recognisable 32-byte value."""
    return crypto.sha256(b"vector:" + label.encode())


def _addr(label: str) -> Address:
    return Address(_h(label)[:20])


def sample_records() -> list[tuple[str, Record]]:
    k = keys()
    transfer = Transfer(_addr("bob"), Amount(5 * NSD), b"")
    transfer_memo = Transfer(_addr("carol"), Amount(1), b"invoice 42")
    transfer_max = Transfer(_addr("dave"), Amount(UINT256_MAX), b"\x00" * 32)
    tx = Transaction(ChainId(CHAIN_ID), Nonce(0), Amount(10**14), 1, transfer.encode())
    tx_big_nonce = Transaction(
        ChainId(CHAIN_ID), Nonce(UINT64_MAX), Amount(0), 1, transfer_memo.encode()
    )
    signed = make_transaction(k[0], CHAIN_ID, 0, 10**14, transfer)
    prevote_nil = Vote(
        int(VoteType.PREVOTE), Height(1), Round(0), None, TimestampMs(0), k[0].address
    )
    precommit = Vote(
        int(VoteType.PRECOMMIT),
        Height(42),
        Round(3),
        _h("block-42"),
        TimestampMs(1_735_689_600_123),
        k[1].address,
    )
    signed_vote = sign_vote(k[1], CHAIN_ID, precommit)
    header = Header(
        chain_id=ChainId(CHAIN_ID),
        height=Height(42),
        round=Round(3),
        parent_hash=_h("block-41"),
        time=TimestampMs(1_735_689_600_123),
        proposer=k[1].address,
        tx_root=_h("tx-root"),
        receipts_root=_h("receipts-root"),
        state_root=_h("state-root"),
        validators_hash=_h("validators"),
        next_validators_hash=_h("next-validators"),
        last_commit_hash=_h("last-commit"),
        evidence_root=_h("evidence-root"),
    )
    proposal = Proposal(Height(42), Round(3), header.hash(), None, k[1].address)
    proposal_pol = Proposal(Height(42), Round(4), header.hash(), 3, k[1].address)
    commit = Commit(
        Height(41),
        Round(0),
        _h("block-41"),
        (
            sign_vote(
                k[0],
                CHAIN_ID,
                Vote(
                    int(VoteType.PRECOMMIT),
                    Height(41),
                    Round(0),
                    _h("block-41"),
                    TimestampMs(1_735_689_599_000),
                    k[0].address,
                ),
            ),
        ),
    )
    conflicting = DuplicateVoteEvidence(
        sign_vote(
            k[2], CHAIN_ID, Vote(1, Height(7), Round(0), _h("a"), TimestampMs(1), k[2].address)
        ),
        sign_vote(
            k[2], CHAIN_ID, Vote(1, Height(7), Round(0), _h("b"), TimestampMs(1), k[2].address)
        ),
    )
    block = Block(header, (signed.encode(),), (), commit)
    fees = FeeSchedule(1, Amount(10**13), Amount(10**10), Amount(2 * 10**13), Amount(10**14))
    votable = VotableParams(3000, 500, 1000, 500, 1000, 500, 1000, 4 << 20, 5000, 64 << 10, (fees,))
    receipt = Receipt(
        _h("tx"),
        0,
        Amount(10**14),
        Amount(3 * 10**13),
        (Event("transfer", (Attribute("to", _addr("bob")), Attribute("amount", b"\x05"))),),
        "",
    )
    return [
        ("transfer", transfer),
        ("transfer_memo", transfer_memo),
        ("transfer_max_amount", transfer_max),
        ("transaction", tx),
        ("transaction_max_nonce", tx_big_nonce),
        ("signed_transaction", signed),
        ("vote_prevote_nil", prevote_nil),
        ("vote_precommit", precommit),
        ("signed_vote", signed_vote),
        ("header", header),
        ("proposal_no_pol", proposal),
        ("proposal_pol", proposal_pol),
        ("signed_proposal", sign_proposal(k[1], CHAIN_ID, proposal)),
        ("commit", commit),
        ("duplicate_vote_evidence", conflicting),
        ("block", block),
        ("account_empty", Account(Nonce(0), Amount(0))),
        ("account", Account(Nonce(5), Amount(1_000_000 * NSD))),
        ("supply", Supply(Amount(10 * 1_000_000 * NSD), Amount(12345))),
        ("fee_schedule", fees),
        ("votable_params", votable),
        (
            "chain_params",
            ChainParams(ChainId(CHAIN_ID), TimestampMs(1_735_689_600_000), 10_000, 100_000, 1),
        ),
        ("receipt", receipt),
    ]


def _account_hex(nonce_hex: str, balance: int = 1, bin_header: str = "c420") -> str:
    return "92" + nonce_hex + bin_header + balance.to_bytes(32, "big").hex()


def invalid_encodings() -> list[dict[str, Any]]:
    """Bytes every decoder must refuse, each with the error class it must raise."""
    one = (1).to_bytes(32, "big").hex()
    attr_ok = "92a3" + b"fee".hex() + "c400"  # Attribute("fee", b"")
    transfer_ok = Transfer(_addr("bob"), Amount(1), b"").encode().hex()
    k = keys()
    vote = Vote(1, Height(1), Round(0), None, TimestampMs(0), k[0].address)
    vote_hex = vote.encode().hex()
    nc, de, tl = "NonCanonicalEncoding", "DecodeError", "TooLarge"
    a, at, t, v = "Account", "Attribute", "Transfer", "Vote"
    fee = b"fee".hex()
    addr = k[0].address.hex()
    # (name, record type, hex, error class[, max_size])
    cases: list[tuple[Any, ...]] = [
        # Non-minimal forms msgpack itself would accept.
        ("uint8_where_fixint_fits", a, _account_hex("cc05"), nc),
        ("uint16_where_fixint_fits", a, _account_hex("cd0005"), nc),
        ("uint32_where_fixint_fits", a, _account_hex("ce00000005"), nc),
        ("uint64_where_fixint_fits", a, _account_hex("cf0000000000000005"), nc),
        ("int8_for_a_positive_value", a, _account_hex("d005"), nc),
        ("uint16_where_uint8_fits", a, _account_hex("cd00ff"), nc),
        ("bin16_header_for_32_byte_amount", a, _account_hex("05", 1, "c50020"), nc),
        ("bin32_header_for_32_byte_amount", a, _account_hex("05", 1, "c600000020"), nc),
        ("array16_header_for_2_fields", a, "dc0002" + "05c420" + one, nc),
        ("array32_header_for_2_fields", a, "dd00000002" + "05c420" + one, nc),
        ("str8_where_fixstr_fits", at, "92" + "d903" + fee + "c400", nc),
        ("str16_where_fixstr_fits", at, "92" + "da0003" + fee + "c400", nc),
        ("bin16_for_empty_bytes", at, "92" + "a3" + fee + "c50000", nc),
        ("float64_where_uint_expected", a, _account_hex("cb4014000000000000"), de),
        # Wrong shape.
        ("too_few_fields", a, "9105", de),
        ("too_many_fields", a, "93" + "05c420" + one + "c0", de),
        ("empty_array", t, "90", de),
        ("map_instead_of_array", a, "80", de),
        ("scalar_instead_of_array", a, "05", de),
        # Wrong types.
        ("bool_where_int", a, _account_hex("c3"), de),
        ("nil_where_int", a, _account_hex("c0"), de),
        ("negative_int_where_uint", a, _account_hex("ff"), de),
        ("uint_where_amount_bin", a, "920501", de),
        ("amount_of_31_bytes", a, "9205c41f" + "00" * 30 + "01", de),
        ("amount_of_33_bytes", a, "9205c421" + "00" * 32 + "01", de),
        ("str_where_bin", at, "92" + "a3" + fee + "a0", de),
        ("bin_where_str", at, "92" + "c403" + fee + "c400", de),
        ("address_of_19_bytes", t, "93c413" + "11" * 19 + "c420" + one + "c400", de),
        ("address_of_21_bytes", t, "93c415" + "11" * 21 + "c420" + one + "c400", de),
        ("bool_where_optional_hash", v, "96010100" + "c2" + "00" + "c414" + addr, de),
        ("invalid_utf8_in_str", at, "92" + "a2" + "c328" + "c400", de),
        # Framing.
        ("trailing_byte", at, attr_ok + "00", de),
        ("truncated", t, transfer_ok[:-2], de),
        ("empty_input", a, "", de),
        # Size limits.
        (
            "memo_over_field_limit",
            t,
            "93c414" + "11" * 20 + "c420" + one + "c50101" + "00" * 257,
            tl,
        ),
        ("input_over_max_size", a, _account_hex("05"), tl, 35),
    ]
    # Sanity of the hand-written bytes: the canonical forms they are built from do decode.
    Attribute.decode(bytes.fromhex(attr_ok))
    Account.decode(bytes.fromhex(_account_hex("05")))
    assert vote_hex == "96010100" + "c0" + "00" + "c414" + k[0].address.hex()
    out = []
    for name, type_name, encoded, error, *max_size in cases:
        entry = {"name": name, "type": type_name, "encoded": encoded, "error": error}
        if max_size:
            entry["max_size"] = max_size[0]
        out.append(entry)
    return out


def build_encoding_vectors() -> dict[str, Any]:
    records = []
    for name, record in sample_records():
        tp = type(record)
        entry: dict[str, Any] = {
            "name": name,
            "type": tp.__name__,
            "value": to_json_value(tp, record),
            "encoded": record.encode().hex(),
        }
        if isinstance(record, Header | Commit | Block):
            entry["hash"] = record.hash().hex()  # block id / commit hash = sha256(encoding)
        records.append(entry)
    return {
        "description": "Canonical msgpack encodings of NeuroSeed records (DESIGN §3). "
        "Generated by tests/vectors/gen_vectors.py; see its docstring for the JSON forms.",
        "records": records,
        "invalid": invalid_encodings(),
    }


# --- signatures --------------------------------------------------------------------------------


def build_signature_vectors() -> dict[str, Any]:
    k = keys()
    key_entries = []
    for (name, secret, published), key in zip(KEY_SECRETS, k, strict=True):
        entry: dict[str, Any] = {
            "name": name,
            "secret": secret,
            "public_key": key.public_key.hex(),
            "address": key.address.hex(),
        }
        if published is not None:
            assert key.address.hex() == published, f"{name}: address derivation changed"
        key_entries.append(entry)

    messages = [
        ("tx_empty_message", crypto.TAG_TX, CHAIN_ID, b""),
        (
            "tx_transaction",
            crypto.TAG_TX,
            CHAIN_ID,
            Transaction(
                ChainId(CHAIN_ID),
                Nonce(7),
                Amount(10**14),
                1,
                Transfer(_addr("bob"), Amount(NSD), b"").encode(),
            ).encode(),
        ),
        (
            "vote_other_chain",
            crypto.TAG_VOTE,
            1,
            Vote(2, Height(9), Round(1), _h("b9"), TimestampMs(5), k[1].address).encode(),
        ),
        (
            "proposal_max_chain_id",
            crypto.TAG_PROPOSAL,
            UINT64_MAX,
            Proposal(Height(9), Round(1), _h("b9"), 0, k[2].address).encode(),
        ),
    ]
    signatures = []
    for i, (name, tag, chain_id, message) in enumerate(messages):
        key_index = i % len(k)
        key = k[key_index]
        digest = crypto.signing_digest(tag, chain_id, message)
        sig = key.sign_digest(digest)
        signatures.append(
            {
                "name": name,
                "key": key_index,
                "tag": tag.decode("ascii"),
                "chain_id": chain_id,
                "message": message.hex(),
                "digest": digest.hex(),
                "signature": sig.hex(),
                "address": key.address.hex(),
                "malleated": crypto.malleate(sig).hex(),
            }
        )

    # Signatures that must be refused, over the first message's digest.
    first = signatures[0]
    good = bytes.fromhex(str(first["signature"]))
    r, s = good[:32], good[32:64]
    n = crypto.SECP256K1_N.to_bytes(32, "big")
    zero = b"\x00" * 32
    invalid = [
        ("high_s", crypto.malleate(good), "MalleableSignature"),
        ("recovery_id_2", r + s + b"\x02", "MalleableSignature"),
        ("recovery_id_3", r + s + b"\x03", "MalleableSignature"),
        ("recovery_id_27", r + s + b"\x1b", "MalleableSignature"),
        ("r_zero", zero + s + good[64:], "InvalidSignature"),
        ("s_zero", r + zero + good[64:], "InvalidSignature"),
        ("r_equals_n", n + s + good[64:], "InvalidSignature"),
        ("s_equals_n", r + n + good[64:], "InvalidSignature"),
        ("length_64", good[:64], "InvalidSignature"),
        ("length_66", good + b"\x00", "InvalidSignature"),
    ]
    invalid_entries = [
        {"name": name, "digest": first["digest"], "signature": bad.hex(), "error": error}
        for name, bad, error in invalid
    ]

    transactions = []
    tx_cases = [
        ("transfer_nonce_0", 0, 0, 10**14, Transfer(_addr("bob"), Amount(5 * NSD), b"")),
        ("transfer_memo", 1, 3, 2 * 10**14, Transfer(_addr("carol"), Amount(1), b"hello")),
        ("transfer_to_self_max", 2, UINT64_MAX, 0, Transfer(k[2].address, Amount(UINT256_MAX))),
    ]
    for name, key_index, nonce, fee, body in tx_cases:
        key = k[key_index]
        signed = make_transaction(key, CHAIN_ID, nonce, fee, body)
        raw = signed.encode()
        malleated = SignedTransaction(signed.tx, Signature(crypto.malleate(signed.signature)))
        bad_v = SignedTransaction(signed.tx, Signature(signed.signature[:64] + b"\x02"))
        transactions.append(
            {
                "name": name,
                "key": key_index,
                "unsigned": signed.tx.encode().hex(),
                "digest": crypto.signing_digest(crypto.TAG_TX, CHAIN_ID, signed.tx.encode()).hex(),
                "signature": signed.signature.hex(),
                "signed": raw.hex(),
                "tx_id": crypto.sha256(raw).hex(),
                "sender": key.address.hex(),
                # The same transaction with its high-S twin signature: a different byte string
                # (it would be a second tx id), which verify_transaction must refuse.
                "malleated_signed": malleated.encode().hex(),
                "malleated_tx_id": crypto.sha256(malleated.encode()).hex(),
                "recovery_id_2_signed": bad_v.encode().hex(),
            }
        )

    votes = []
    vote = Vote(
        2, Height(42), Round(3), _h("block-42"), TimestampMs(1_735_689_600_123), k[1].address
    )
    signed_vote = sign_vote(k[1], CHAIN_ID, vote)
    votes.append(
        {
            "name": "precommit",
            "key": 1,
            "chain_id": CHAIN_ID,
            "vote": vote.encode().hex(),
            "digest": crypto.signing_digest(crypto.TAG_VOTE, CHAIN_ID, vote.encode()).hex(),
            "signed": signed_vote.encode().hex(),
            "malleated_signed": SignedVote(vote, Signature(crypto.malleate(signed_vote.signature)))
            .encode()
            .hex(),
        }
    )
    return {
        "description": "secp256k1 recoverable signatures over sha256(tag || chain_id (8 bytes BE) "
        "|| encoded record) (DESIGN §3). Generated by tests/vectors/gen_vectors.py.",
        "curve_order": crypto.SECP256K1_N.to_bytes(32, "big").hex(),
        "keys": key_entries,
        "signatures": signatures,
        "invalid_signatures": invalid_entries,
        "transactions": transactions,
        "votes": votes,
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1) + "\n"


def main(argv: list[str]) -> int:
    outputs = {
        ENCODING_FILE: render(build_encoding_vectors()),
        SIGNATURES_FILE: render(build_signature_vectors()),
    }
    if "--check" in argv:
        stale = [p.name for p, text in outputs.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    for path, text in outputs.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
