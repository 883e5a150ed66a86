"""The record codec's error messages name the failing field by its path, and its bulk paths (a
tuple of plain bytes passed through, the reusable packer) give what the item-by-item ones give."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.consensus.blocks import Commit, SignedVote, Vote
from node.consensus.receipts import Attribute, Event, Receipt
from node.consensus.txs import SignedTransaction, Transaction
from node.encoding import array_header, bin_header_size, pack
from node.errors import DecodeError, EncodeError, TooLarge
from node.storage import BlockBody, BlockReceipts


def packed(tree: Any) -> bytes:
    return msgpack.packb(tree, use_bin_type=True)


TX = (7, 1, b"\x00" * 32, 1, b"body")
SIG = b"\x01" * 65


RECEIPT = (b"\x00" * 32, 0, b"\x00" * 32, b"\x00" * 32)
CASES: list[tuple[Any, Any, type, str]] = [
    (SignedTransaction, ((*TX[:4], 5), SIG), DecodeError,
     "SignedTransaction.tx.body: expected bytes"),
    (SignedTransaction, ((7, 1, b"\x00" * 31, 1, b""), SIG), DecodeError,
     "SignedTransaction.tx.fee: expected a 32-byte big-endian uint256"),
    (SignedTransaction, (TX, SIG[:64]), DecodeError,
     "SignedTransaction.signature: expected 65 bytes"),
    (SignedTransaction, (TX[:4], SIG), DecodeError,
     "SignedTransaction.tx: expected 5 fields, got 4"),
    (SignedTransaction, (5, SIG), DecodeError,
     "SignedTransaction.tx: expected an array of 5 fields"),
    (Transaction, (7, -1, b"\x00" * 32, 1, b""), DecodeError,
     "Transaction.nonce: expected an unsigned 64-bit integer"),
    (BlockBody, ((b"a", 5, b"c"), (), None), DecodeError, "BlockBody.txs[1]: expected bytes"),
    (BlockReceipts, (((*RECEIPT, (("e", (("k", b"v"), ("k", 5))),), ""),),), DecodeError,
     "BlockReceipts.receipts[0].events[0].attributes[1].value: expected bytes"),
    (Receipt, (*RECEIPT, (("e" * 65, ()),), ""), TooLarge,
     "Receipt.events[0].name: string exceeds 64 bytes"),
    (Event, ("e", (("k", b"v"),) * 65), TooLarge,
     "Event.attributes: 65 items exceed the limit of 64"),
    (Attribute, ("k", b"v" * 4097), TooLarge,
     "Attribute.value: 4097 bytes exceed the limit of 4096"),
]


@pytest.mark.parametrize(("cls", "tree", "error", "message"), CASES)
def test_errors_name_the_field_path(cls: Any, tree: Any, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        cls.decode(packed(tree))
    assert type(info.value) is error
    assert info.value.message == message


def test_a_block_with_a_bad_vote_names_it() -> None:
    vote = Vote(2, 1, 0, b"\x00" * 32, 5, b"\x00" * 20)  # type: ignore[arg-type]
    good = SignedVote(vote, b"\x01" * 65).to_wire()  # type: ignore[arg-type]
    commit = (1, 0, b"\x00" * 32, (good, (good[0], b"\x01" * 64)))
    with pytest.raises(DecodeError) as info:
        Commit.decode(packed(commit))
    assert info.value.message == "Commit.precommits[1].signature: expected 65 bytes"


@given(st.lists(st.binary(max_size=300), max_size=40))
def test_a_tuple_of_bytes_encodes_as_item_by_item(txs: list[bytes]) -> None:
    body = BlockBody(tuple(txs), (), None)
    encoded = body.encode()
    assert encoded == packed((tuple(txs), (), None))
    assert BlockBody.decode(encoded) == body
    # The byte offsets the transaction index relies on.
    pos = 1 + len(array_header(len(txs)))
    for tx in txs:
        pos += bin_header_size(len(tx))
        assert encoded[pos : pos + len(tx)] == tx
        pos += len(tx)


def test_a_tuple_of_bytes_with_a_bad_item_is_refused() -> None:
    with pytest.raises(EncodeError, match="expected bytes"):
        BlockBody((b"a", "b"), (), None).encode()  # type: ignore[arg-type]
    assert BlockBody([b"a", bytearray(b"b")], (), None).encode() == packed(  # type: ignore[arg-type]
        ((b"a", b"b"), (), None)
    )
    with pytest.raises(EncodeError, match="expected 65 bytes"):
        SignedTransaction(Transaction(1, 1, 1, 1, b""), b"x" * 64).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
def test_headers_match_msgpack(n: int) -> None:
    assert packed([None] * n)[: len(array_header(n))] == array_header(n)
    assert len(packed(b"\x00" * n)) - n == bin_header_size(n)


def test_the_packer_recovers_from_a_failed_pack() -> None:
    with pytest.raises(TypeError):
        pack((1, object()))
    with pytest.raises(OverflowError):
        pack((1, 2**64))
    assert pack((1, 2)) == b"\x92\x01\x02"
