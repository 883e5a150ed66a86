"""The fast paths of block validation give exactly what the strict, general code gives.

* ``verify_transaction`` decodes a transfer in place and recovers over ``raw[1:-67]``; every
  other input takes the strict decoders. Results and errors (class and message) are compared with
  the strict composition ``decode_transaction`` + ``decode_body`` + ``recover_sender``.
* ``account_fields`` / ``encode_account`` against ``Account.decode`` / ``Account.encode``.
* The receipts' encodings made during execution equal ``Receipt.encode()``.
* ``Overlay`` reads its base once per key.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import crypto
from node.consensus.state import (
    Account,
    DictView,
    Overlay,
    account_fields,
    account_key,
    decode_account,
    encode_account,
)
from node.consensus.transition import (
    BlockContext,
    ValidatorContext,
    apply_block,
    apply_transaction,
    build_block,
    execute_block,
)
from node.consensus.txs import (
    MAX_BODY_BYTES,
    SignedTransaction,
    Transaction,
    Transfer,
    decode_body,
    decode_transaction,
    recover_sender,
    verify_transaction,
)
from node.errors import NeuroSeedError
from node.genesis import build_genesis_state
from node.storage.smt import compute_root
from node.types import UINT64_MAX, UINT256_MAX, Address, Amount, ChainId, Nonce, Signature
from tests.helpers import (
    GENESIS_TIME,
    genesis_view,
    key,
    make_genesis,
    sign_raw_tx,
    transfer,
    validator_set_of,
    vtransfer,
)


def strict_verify(raw: Any, max_bytes: int = 1 << 20) -> tuple[Any, ...]:
    """What verify_transaction computed before its fast path, as comparable values."""
    signed = decode_transaction(raw, max_bytes)
    body = decode_body(signed.tx)
    return (raw, crypto.sha256(raw), signed, recover_sender(signed), body)


def outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    try:
        result = fn(*args)
    except NeuroSeedError as exc:
        return ("error", type(exc), exc.message)
    if isinstance(result, tuple):
        return ("ok", *result)
    return ("ok", result.raw, result.tx_id, result.signed, result.sender, result.body)


u64 = st.integers(0, UINT64_MAX)
u256 = st.integers(0, UINT256_MAX)
# Around every msgpack width boundary.
edgy_u64 = st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, UINT64_MAX])


@given(
    sender=st.integers(1, 8),
    to=st.binary(min_size=20, max_size=20),
    amount=u256,
    memo=st.binary(max_size=256),
    nonce=st.one_of(u64, edgy_u64),
    fee=u256,
    chain_id=st.one_of(u64, edgy_u64),
)
def test_verify_transaction_equals_the_strict_path(
    sender: int, to: bytes, amount: int, memo: bytes, nonce: int, fee: int, chain_id: int
) -> None:
    raw = transfer(sender, to, amount, nonce=nonce, fee=fee, chain_id=chain_id, memo=memo)
    assert outcome(verify_transaction, raw) == outcome(strict_verify, raw)
    assert verify_transaction(raw).sender == key(sender).address


@given(
    base=st.sampled_from(
        [
            transfer(1, 2, 5, nonce=0),
            transfer(3, 4, 10**18, nonce=300, memo=b"m" * 255),
            transfer(2, 1, 1, nonce=2**40, memo=b"x" * 256),
            sign_raw_tx(1, kind=1, body=b"\x93\xc4\x14" + b"a" * 20 + b"\xc4\x20" + b"b" * 32),
            sign_raw_tx(1, kind=2, body=Transfer(Address(b"a" * 20), Amount(1))),
        ]
    ),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 2))),
    max_bytes=st.sampled_from([1 << 20, 200, 150]),
)
def test_verify_transaction_errors_equal_the_strict_path(
    base: bytes, edits: list[tuple[int, int, int]], max_bytes: int
) -> None:
    data = bytearray(base)
    for pos, byte, op in edits:
        if not data:
            break
        i = pos % len(data)
        if op == 0:
            data[i] = byte
        elif op == 1:
            del data[i]
        else:
            data.insert(i, byte)
    raw = bytes(data)
    assert outcome(verify_transaction, raw, max_bytes) == outcome(strict_verify, raw, max_bytes)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x92",
        b"\xc0",
        bytearray(transfer(1, 2, 5, nonce=0)),
        memoryview(transfer(1, 2, 5, nonce=0)),
        # A high-S twin and a recovery id of 2.
        SignedTransaction(
            decode_transaction(transfer(1, 2, 5, nonce=0)).tx,
            Signature(crypto.malleate(decode_transaction(transfer(1, 2, 5, nonce=0)).signature)),
        ).encode(),
        transfer(1, 2, 5, nonce=0)[:-1] + b"\x02",
        # The same transfer with a non-minimal integer, and as a msgpack str body.
        b"\x92\xdc\x00\x05" + transfer(1, 2, 5, nonce=0)[2:],
        msgpack.packb(
            [list(msgpack.unpackb(transfer(1, 2, 5, nonce=0))[0]), b"s" * 65], use_bin_type=False
        ),
    ],
)
def test_verify_transaction_special_inputs(raw: Any) -> None:
    assert outcome(verify_transaction, raw) == outcome(strict_verify, raw)


@pytest.mark.parametrize("body_size", [0, 59, 255, 256, 65535, 65536, 70_000, MAX_BODY_BYTES])
@pytest.mark.parametrize("kind", [1, 2, 2**40])
def test_signed_bytes_are_the_envelope_without_its_header_and_signature(
    body_size: int, kind: int
) -> None:
    # verify_transaction recovers over raw[1:-67]: the envelope is a 2-item array (1-byte
    # header at any size) and the signature is bin 8 of 65 bytes; the body's own bin 8/16/32
    # header lies inside the slice.
    tx = Transaction(ChainId(7), Nonce(UINT64_MAX), Amount(UINT256_MAX), kind, b"\x01" * body_size)
    raw = SignedTransaction(tx, Signature(b"\x02" * 65)).encode()
    assert raw[0] == 0x92 and raw[-67:-65] == b"\xc4\x41"
    assert raw[1:-67] == tx.encode()


@given(nonce=st.one_of(u64, edgy_u64), balance=u256)
def test_account_codec_fast_paths(nonce: int, balance: int) -> None:
    encoded = Account(Nonce(nonce), Amount(balance)).encode()
    assert encode_account(nonce, balance) == encoded
    assert account_fields(encoded) == (nonce, balance)
    assert decode_account(encoded) == Account.decode(encoded)


@given(data=st.binary(max_size=50), nonce=st.one_of(u64, edgy_u64), flip=st.integers(0, 43))
def test_account_decode_errors_equal_the_strict_decoder(data: bytes, nonce: int, flip: int) -> None:
    encoded = bytearray(Account(Nonce(nonce), Amount(nonce * 3)).encode())
    encoded[flip % len(encoded)] ^= 0x55
    for raw in (data, bytes(encoded), bytes(encoded[:-1])):
        assert outcome(account_fields, raw)[:3] == outcome(
            lambda r: (Account.decode(r).nonce, Account.decode(r).balance), raw
        )[:3]


@pytest.mark.parametrize(
    "values", [(UINT64_MAX + 1, 0), (-1, 0), (0, UINT256_MAX + 1), (True, 0), (1.0, 0)]
)
def test_encode_account_errors_equal_the_record_encoder(values: tuple[Any, Any]) -> None:
    assert outcome(encode_account, *values) == outcome(
        lambda n, b: Account(n, b).encode(), *values
    )


def test_overlay_reads_its_base_once_per_key() -> None:
    reads: list[bytes] = []

    class Counting:
        def get(self, key: bytes) -> bytes | None:
            reads.append(key)
            return {b"a": b"1"}.get(key)

    overlay = Overlay(Counting())
    assert overlay.get(b"a") == b"1" and overlay.get(b"a") == b"1"
    assert overlay.get(b"b") is None and overlay.get(b"b") is None
    assert reads == [b"a", b"b"]
    overlay.put(b"a", b"2")
    overlay.delete(b"b")
    assert overlay.get(b"a") == b"2" and overlay.get(b"b") is None
    child = overlay.child()
    assert child.get(b"a") == b"2" and child.get(b"c") is None
    child.put(b"c", b"3")
    child.merge_into_parent()
    assert overlay.get(b"c") == b"3"
    assert reads == [b"a", b"b", b"c"]


def test_receipt_encodings_are_the_receipts_encodings() -> None:
    genesis = make_genesis(funded=4)
    genesis_state = build_genesis_state(genesis)
    view = DictView(genesis_state)
    vset = validator_set_of(genesis)
    context = ValidatorContext(vset, vset, None)
    candidates = [
        vtransfer(1, 2, 5, nonce=0),
        vtransfer(1, 1, 7, nonce=1, memo=b"self"),  # to oneself
        vtransfer(2, Address(b"\x77" * 20), 3, nonce=0),  # a new account
        vtransfer(3, 4, 10**30, nonce=0),  # rejected: insufficient funds
        vtransfer(4, 3, 1, nonce=0, memo=b"m" * 256),  # a memo that takes the strict decoder
    ]

    def root(changes: Any) -> Any:
        state = dict(genesis_state)
        for k, v in changes.items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
        return compute_root(state)

    built = build_block(
        view, genesis.chain_params, genesis.votable_params, None, 0,
        vset.proposer(1, 0), None, context, candidates, root,
    )
    assert len(built.block.txs) == 4 and len(built.rejected) == 1
    result = built.result
    assert result.receipt_encodings == tuple(r.encode() for r in result.receipts)
    applied = apply_block(
        view, genesis.chain_params, genesis.votable_params, None, built.block, context, root
    )
    assert applied == result
    assert applied.receipt_encodings == result.receipt_encodings
    encoded: list[bytes] = []
    _, receipts = execute_block(
        view, genesis.chain_params, genesis.votable_params, built.block.header,
        [c for c in candidates if c.raw in built.block.txs], encoded,
    )
    assert encoded == [r.encode() for r in receipts]
    proposer = vset.proposer(1, 0)
    ctx = BlockContext(genesis.chain_params, genesis.votable_params, 1, GENESIS_TIME, proposer)
    receipt = apply_transaction(Overlay(view), candidates[0], ctx)
    assert receipt == receipts[0]


def test_transfers_to_oneself_and_to_a_new_account() -> None:
    genesis = make_genesis(funded=2)
    ctx = BlockContext(
        genesis.chain_params, genesis.votable_params, 1, GENESIS_TIME, key(0).address
    )
    overlay = Overlay(genesis_view(genesis))
    before = Account.decode(overlay.get(account_key(key(1).address)) or b"")
    receipt = apply_transaction(overlay, vtransfer(1, 1, 5, nonce=0), ctx)
    apply_transaction(overlay, vtransfer(2, Address(b"\x55" * 20), 9, nonce=0), ctx)
    after = Account.decode(overlay.get(account_key(key(1).address)) or b"")
    assert after == Account(Nonce(1), Amount(before.balance - receipt.fee_paid))
    fresh = overlay.get(account_key(Address(b"\x55" * 20)))
    assert fresh is not None and Account.decode(fresh) == Account(Nonce(0), Amount(9))
