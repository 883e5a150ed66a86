"""The transaction index (schema 2): each entry holds the byte ranges of its transaction in the
stored body and of its receipt in the stored receipts, so a lookup decodes neither record.

Also: the receipts record written from ready encodings is byte-identical to
``BlockReceipts(receipts).encode()``; ``verify_head`` checks the head block's index entries; and
``ReadView.get_transaction`` answers what decoding the whole block would.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from node import crypto
from node.chain import ChainService
from node.consensus.blocks import Block, compute_tx_root
from node.consensus.receipts import Attribute, Event, Receipt
from node.errors import CorruptDatabase
from node.storage import BlockBody, BlockReceipts, ChainStore, MemoryKV, TxLocationRecord, schema
from node.storage.chain_store import _check_extra_keys
from node.types import Amount, Hash32
from tests.helpers import commit_next, make_genesis, open_chain, vtransfer
from tests.storage.test_chain_store import (
    BlockData,
    ChainBuilder,
    genesis_store,
    make_commit,
)

# Transaction sizes on each side of msgpack's bin 8 / bin 16 / bin 32 boundaries.
SIZES = [0, 1, 255, 256, 65535, 65536, 70_000]


def block_of(builder: ChainBuilder, txs: list[bytes]) -> BlockData:
    """``builder``'s next block with ``txs`` (arbitrary bytes: the store does not decode them)
    and receipts of varied sizes."""
    data = builder.next(n_txs=0)
    receipts = [
        Receipt(
            crypto.sha256(tx),
            i % 2,
            Amount(i),
            Amount(0),
            tuple(Event("e", (Attribute("k", b"v" * (i * 37 % 300)),)) for _ in range(i % 4)),
        )
        for i, tx in enumerate(txs)
    ]
    header = replace(data.block.header, tx_root=compute_tx_root(txs))
    block = Block(header, tuple(txs), (), data.block.last_commit)
    commit = make_commit(header)
    builder.parent = header
    builder.parent_commit = commit
    return BlockData(block, commit, receipts, data.changes, data.extra_puts, data.extra_deletes)


def stored_block(count: int, sizes: list[int], *, with_encodings: bool) -> tuple[
    ChainStore, MemoryKV, BlockData
]:
    store, kv = genesis_store()
    builder = ChainBuilder()
    txs = [bytes([i % 251]) * sizes[i % len(sizes)] + i.to_bytes(4, "big") for i in range(count)]
    data = block_of(builder, txs)
    store.commit_block(
        data.block, data.commit, data.receipts, data.changes, data.extra_puts,
        data.extra_deletes,
        receipt_encodings=[r.encode() for r in data.receipts] if with_encodings else None,
    )
    return store, kv, data


@pytest.mark.parametrize("count", [1, 15, 16, 40])
@pytest.mark.parametrize("with_encodings", [False, True])
def test_index_entries_point_at_each_transaction_and_receipt(
    count: int, with_encodings: bool
) -> None:
    store, kv, data = stored_block(count, SIZES, with_encodings=with_encodings)
    height = data.block.header.height
    assert kv.get(schema.receipts_key(height)) == BlockReceipts(tuple(data.receipts)).encode()
    assert kv.get(schema.body_key(height)) == BlockBody(
        data.block.txs, data.block.evidence, data.block.last_commit
    ).encode()
    for index, (tx, receipt) in enumerate(zip(data.block.txs, data.receipts, strict=True)):
        tx_id = crypto.sha256(tx)
        record = store.get_tx_record(tx_id)
        assert record is not None and (record.height, record.index) == (height, index)
        assert store.get_tx_location(tx_id) == (height, index)
        assert store.read_indexed(tx_id, record) == (tx, receipt)
        stored = kv.get(schema.tx_key(tx_id))
        assert stored == record.encode()
        assert TxLocationRecord.decode(stored) == record
    assert store.verify_head().height == height


def test_a_wrong_index_entry_is_corruption() -> None:
    store, kv, data = stored_block(3, [10, 300], with_encodings=True)
    tx_id = crypto.sha256(data.block.txs[1])
    record = store.get_tx_record(tx_id)
    assert record is not None
    for bad in (
        TxLocationRecord(record.height, record.index, record.tx_offset + 1, record.tx_size,
                         record.receipt_offset, record.receipt_size),
        TxLocationRecord(record.height, record.index, record.tx_offset, record.tx_size,
                         record.receipt_offset + 1, record.receipt_size),
        TxLocationRecord(record.height, 0, record.tx_offset, record.tx_size,
                         record.receipt_offset, record.receipt_size),
    ):
        kv.put(schema.tx_key(tx_id), bad.encode())
        with pytest.raises(CorruptDatabase, match="index"):
            store.verify_head()
    kv.put(schema.tx_key(tx_id), record.encode())
    assert store.verify_head().height == record.height
    kv.delete(schema.tx_key(tx_id))
    with pytest.raises(CorruptDatabase, match="not indexed"):
        store.verify_head()
    with pytest.raises(CorruptDatabase, match="transaction index entry"):
        store.read_indexed(tx_id, TxLocationRecord(record.height, 1, 0, 5, 0, 5))


def test_receipt_encodings_must_match_the_receipts() -> None:
    store, _ = genesis_store()
    data = block_of(ChainBuilder(), [b"a", b"b"])
    encodings = [r.encode() for r in data.receipts]
    for bad in (encodings[:1], encodings[::-1]):
        with pytest.raises(ValueError, match="receipt_encodings"):
            store.commit_block(
                data.block, data.commit, data.receipts, data.changes, data.extra_puts,
                data.extra_deletes, receipt_encodings=bad,
            )
    assert store.head_record() is None


def test_extra_keys_are_checked_in_order() -> None:
    _check_extra_keys([b"T1", b"T2"])
    _check_extra_keys({b"T1": b"x"})
    _check_extra_keys(iter([b"T1"]))
    _check_extra_keys([])
    with pytest.raises(TypeError, match="keys must be bytes"):
        _check_extra_keys([b"T1", "T2", b"s1"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="0x7331"):
        _check_extra_keys([b"T1", b"s1", "T2"])  # type: ignore[list-item]


def decode_whole_block(chain: ChainService, tx_id: bytes) -> tuple[object, ...]:
    """What ReadView.get_transaction answered before the index held byte ranges."""
    loc = chain.store.get_tx_location(tx_id)
    assert loc is not None
    height, index = loc
    block = chain.store.get_block(height)
    receipts = chain.store.get_receipts(height)
    assert block is not None and receipts is not None
    return (Hash32(tx_id), height, index, block.hash(), block.txs[index], receipts[index])


def test_read_view_get_transaction() -> None:
    genesis = make_genesis(funded=4)
    chain = open_chain(MemoryKV(), genesis)
    first = [vtransfer(1, 2, 5, nonce=0), vtransfer(2, 3, 6, nonce=0, memo=b"m" * 256)]
    second = [vtransfer(i, 1, 7, nonce=1 if i == 2 else 0) for i in (2, 3, 4)]
    commit_next(chain, candidates=first)
    view_before = chain.read_view()
    commit_next(chain, candidates=second)
    view = chain.read_view()
    for vtx in first + second:
        loc = view.get_transaction(vtx.tx_id)
        assert loc is not None
        assert (loc.tx_id, loc.height, loc.index, loc.block_hash, loc.raw, loc.receipt) == (
            decode_whole_block(chain, vtx.tx_id)
        )
    assert view_before.get_transaction(second[0].tx_id) is None
    assert view.get_transaction(crypto.sha256(b"unknown")) is None
    assert view.get_transaction(b"short") is None
    chain.close()
