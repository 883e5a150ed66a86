"""ChainStore: one synced batch per block, reads over the store and snapshots, the startup head
check, crash atomicity (with MemoryKV's failure injection) and restart over LevelDB."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from node import crypto
from node.consensus.blocks import (
    Block,
    Commit,
    Header,
    Vote,
    VoteType,
    compute_evidence_root,
    compute_last_commit_hash,
    compute_tx_root,
    sign_vote,
)
from node.consensus.receipts import Attribute, Event, Receipt, ReceiptStatus
from node.consensus.state import Account, account_key
from node.consensus.txs import Transfer, make_transaction
from node.crypto import PrivateKey
from node.errors import CorruptDatabase, InvalidBlock, InvalidCommit, StorageError
from node.storage import (
    SCHEMA_VERSION,
    BlockBody,
    ChainReader,
    ChainStore,
    HeadRecord,
    LevelDB,
    MemoryKV,
    SchemaRecord,
    check_schema,
    schema,
)
from node.types import (
    ZERO_HASH,
    Address,
    Amount,
    ChainId,
    Height,
    Nonce,
    Round,
    TimestampMs,
)

CHAIN_ID = ChainId(7)
GENESIS_HASH = crypto.sha256(b"genesis document")
VALIDATOR = PrivateKey(b"\x01" * 32)
ALICE = PrivateKey(b"\x02" * 32)
BOB = Address(b"\xbb" * 20)
VALIDATORS_HASH = crypto.sha256(b"validator set")
GENESIS_STATE = {
    account_key(ALICE.address): Account(Nonce(0), Amount(10**24)).encode(),
    b"\x09\x01genesis-only": b"x",
}


@dataclass
class BlockData:
    block: Block
    commit: Commit
    receipts: list[Receipt]
    changes: dict[bytes, bytes | None]
    extra_puts: dict[bytes, bytes]
    extra_deletes: list[bytes] = field(default_factory=list)


class ChainBuilder:
    """Builds real, signed, linked blocks with transfers from ALICE and one-validator commits."""

    def __init__(self) -> None:
        self.parent: Header | None = None
        self.parent_commit: Commit | None = None
        self.nonce = 0

    def next(self, n_txs: int = 2) -> BlockData:
        height = 1 if self.parent is None else self.parent.height + 1
        txs = []
        for _ in range(n_txs):
            signed = make_transaction(ALICE, CHAIN_ID, self.nonce, 10**15, Transfer(BOB, Amount(5)))
            txs.append(signed.encode())
            self.nonce += 1
        receipts = [
            Receipt(
                crypto.sha256(raw),
                int(ReceiptStatus.SUCCESS),
                Amount(10**15),
                Amount(10**14),
                (Event("transfer", (Attribute("to", BOB),)),),
            )
            for raw in txs
        ]
        header = Header(
            chain_id=CHAIN_ID,
            height=Height(height),
            round=Round(0),
            parent_hash=ZERO_HASH if self.parent is None else self.parent.hash(),
            time=TimestampMs(1_700_000_000_000 + height * 1000),
            proposer=VALIDATOR.address,
            tx_root=compute_tx_root(txs),
            receipts_root=crypto.sha256(b"".join(r.encode() for r in receipts)),
            state_root=crypto.sha256(b"state %d" % height),
            validators_hash=VALIDATORS_HASH,
            next_validators_hash=VALIDATORS_HASH,
            last_commit_hash=compute_last_commit_hash(self.parent_commit),
            evidence_root=compute_evidence_root(()),
        )
        block = Block(header, tuple(txs), (), self.parent_commit)
        commit = make_commit(header)
        changes: dict[bytes, bytes | None] = {
            account_key(ALICE.address): Account(
                Nonce(self.nonce), Amount(10**24 - height)
            ).encode(),
            account_key(BOB): Account(Nonce(0), Amount(5 * self.nonce)).encode(),
            b"\x09\x01height-%d" % height: b"h",
        }
        if height == 2:
            changes[b"\x09\x01genesis-only"] = None
        extra_puts = {b"Tn" + crypto.sha256(b"node %d" % height): b"tree node %d" % height}
        extra_deletes = [b"Tn" + crypto.sha256(b"node %d" % (height - 1))] if height > 1 else []
        self.parent, self.parent_commit = header, commit
        return BlockData(block, commit, receipts, changes, extra_puts, extra_deletes)


def make_commit(header: Header, round_: int = 0) -> Commit:
    vote = Vote(
        int(VoteType.PRECOMMIT),
        header.height,
        Round(round_),
        header.hash(),
        TimestampMs(header.time + 1),
        VALIDATOR.address,
    )
    return Commit(
        header.height, Round(round_), header.hash(), (sign_vote(VALIDATOR, CHAIN_ID, vote),)
    )


def commit(store: ChainStore, data: BlockData) -> None:
    store.commit_block(
        data.block, data.commit, data.receipts, data.changes, data.extra_puts, data.extra_deletes
    )


def genesis_store(kv: MemoryKV | None = None) -> tuple[ChainStore, MemoryKV]:
    kv = kv if kv is not None else MemoryKV()
    store = ChainStore(kv)
    store.init_genesis(CHAIN_ID, GENESIS_HASH, GENESIS_STATE, {b"Tn-genesis": b"root"})
    return store, kv


def chain_of(n: int) -> tuple[ChainStore, MemoryKV, ChainBuilder, list[BlockData]]:
    store, kv = genesis_store()
    builder = ChainBuilder()
    blocks = []
    for _ in range(n):
        data = builder.next()
        commit(store, data)
        blocks.append(data)
    return store, kv, builder, blocks


# --- schema --------------------------------------------------------------------------------------


def test_prefixes_are_distinct_single_bytes() -> None:
    prefixes = list(schema.ALL_PREFIXES.values())
    assert all(len(p) == 1 for p in prefixes)
    assert len(set(prefixes)) == len(prefixes)
    assert set(schema.CHAIN_STORE_PREFIXES) <= set(prefixes)
    assert schema.PREFIX_TREE not in schema.CHAIN_STORE_PREFIXES


def test_height_keys_sort_numerically() -> None:
    keys = [schema.header_key(h) for h in (0, 1, 255, 256, 2**40, 2**64 - 1)]
    assert keys == sorted(keys)
    assert schema.decode_height(keys[3][1:]) == 256
    with pytest.raises(ValueError):
        schema.encode_height(2**64)


def test_schema_written_on_fresh_db_and_accepted_again() -> None:
    kv = MemoryKV()
    assert check_schema(kv) == SCHEMA_VERSION
    stored = kv.get(schema.META_SCHEMA_KEY)
    assert stored is not None
    assert SchemaRecord.decode(stored) == SchemaRecord(SCHEMA_VERSION, schema.SCHEMA_KIND)
    assert check_schema(kv) == SCHEMA_VERSION


@pytest.mark.parametrize(
    ("record", "error", "match"),
    [
        (SchemaRecord(SCHEMA_VERSION + 1, schema.SCHEMA_KIND).encode(), StorageError, "upgrade"),
        (SchemaRecord(0, schema.SCHEMA_KIND).encode(), StorageError, "resync"),
        (SchemaRecord(SCHEMA_VERSION, "blob-store").encode(), StorageError, "not a chain"),
        (b"\xc1garbage", CorruptDatabase, "unreadable"),
    ],
)
def test_schema_mismatch_refused(record: bytes, error: type[Exception], match: str) -> None:
    kv = MemoryKV({schema.META_SCHEMA_KEY: record})
    with pytest.raises(error, match=match):
        ChainStore(kv)


def test_non_empty_db_without_schema_refused() -> None:
    with pytest.raises(StorageError, match="not a NeuroSeed chain database"):
        ChainStore(MemoryKV({b"hello": b"world"}))


# --- genesis -------------------------------------------------------------------------------------


def test_fresh_store_has_no_genesis_and_no_head() -> None:
    store = ChainStore(MemoryKV())
    assert not store.is_initialized()
    assert store.head() is None and store.head_height() is None
    with pytest.raises(StorageError, match="no genesis"):
        store.chain_id()
    with pytest.raises(StorageError, match="no genesis"):
        store.verify_head()


def test_init_genesis_writes_identity_and_state_in_one_batch() -> None:
    kv = MemoryKV()
    store = ChainStore(kv)
    writes = kv.write_count
    store.init_genesis(CHAIN_ID, GENESIS_HASH, GENESIS_STATE, {b"Tn-genesis": b"root"})
    assert kv.write_count == writes + 1
    assert store.is_initialized()
    assert store.chain_id() == CHAIN_ID and store.genesis_hash() == GENESIS_HASH
    for key, value in GENESIS_STATE.items():
        assert store.get_state(key) == value
    assert kv.get(b"Tn-genesis") == b"root"
    assert store.head() is None
    check = store.verify_head()
    assert (check.height, check.block_hash, check.blocks_checked) == (None, None, 0)
    with pytest.raises(StorageError, match="already initialised"):
        store.init_genesis(CHAIN_ID, GENESIS_HASH, {})


def test_init_genesis_refuses_extra_writes_on_chain_keys() -> None:
    store = ChainStore(MemoryKV())
    with pytest.raises(ValueError, match="collides"):
        store.init_genesis(CHAIN_ID, GENESIS_HASH, {}, {schema.META_HEAD_KEY: b"x"})
    assert not store.is_initialized()


# --- commit and read -----------------------------------------------------------------------------


def test_commit_and_read_round_trip() -> None:
    store, kv = genesis_store()
    builder = ChainBuilder()
    blocks = []
    for i in range(4):
        data = builder.next(n_txs=i)  # includes an empty block
        writes = kv.write_count
        commit(store, data)
        assert kv.write_count == writes + 1, "a block must be exactly one write"
        blocks.append(data)

    head = store.head()
    assert head == blocks[-1].block.header
    assert store.head_height() == 4
    assert store.head_record() == HeadRecord(Height(4), blocks[-1].block.hash())
    for data in blocks:
        h = data.block.header.height
        assert store.get_header(h) == data.block.header
        assert store.get_block(h) == data.block
        assert Block.decode(data.block.encode()) == store.get_block(h)
        assert store.get_block_hash(h) == data.block.hash()
        assert store.get_block_by_hash(data.block.hash()) == data.block
        assert store.get_height(data.block.hash()) == h
        assert store.get_commit(h) == data.commit
        assert store.get_receipts(h) == tuple(data.receipts)
        for index, raw in enumerate(data.block.txs):
            assert store.get_tx_location(crypto.sha256(raw)) == (h, index)
    assert store.get_header(5) is None and store.get_block(5) is None
    assert store.get_commit(5) is None and store.get_receipts(5) is None
    assert store.get_block_by_hash(b"\x00" * 32) is None
    assert store.get_block_by_hash(b"short") is None
    assert store.get_tx_location(b"\x11" * 32) is None

    # Latest state: last writer wins, None deleted a genesis key.
    assert (
        store.get_state(account_key(ALICE.address))
        == blocks[-1].changes[account_key(ALICE.address)]
    )
    assert store.get_state(b"\x09\x01genesis-only") is None
    assert store.get_state(b"\x09\x01height-1") == b"h"
    assert [k for k, _ in store.iter_state(b"\x09\x01")] == [
        b"\x09\x01height-%d" % h for h in range(1, 5)
    ]
    # The tree's records: latest put, earlier ones deleted by the next block.
    tree = dict(kv.iterate(prefix=b"Tn"))
    assert tree == {b"Tn-genesis": b"root", **blocks[-1].extra_puts}


def test_reader_over_a_snapshot_sees_the_committed_past() -> None:
    store, kv, builder, blocks = chain_of(2)
    with store.snapshot() as snap:
        commit(store, builder.next())
        assert snap.head() == blocks[-1].block.header
        assert snap.get_header(3) is None
        assert store.head_height() == 3
        result: list[object] = []

        def read() -> None:
            result.append(snap.get_block(2))
            result.append(snap.get_state(account_key(ALICE.address)))

        thread = threading.Thread(target=read)
        thread.start()
        thread.join(timeout=10)
        assert result == [blocks[1].block, blocks[1].changes[account_key(ALICE.address)]]
    with pytest.raises(StorageError):
        snap.head()
    # A plain ChainReader over any KVReader works too.
    assert ChainReader(kv).head_height() == 3


# --- refusals ------------------------------------------------------------------------------------


def _reheader(data: BlockData, **changes: object) -> BlockData:
    header = replace(data.block.header, **changes)  # type: ignore[arg-type]
    return replace(data, block=replace(data.block, header=header), commit=make_commit(header))


MUTATIONS: dict[str, tuple[Callable[[BlockData], BlockData], type[Exception]]] = {
    "skips a height": (
        lambda d: _reheader(d, height=Height(d.block.header.height + 1)),
        InvalidBlock,
    ),
    "repeats the head height": (
        lambda d: _reheader(d, height=Height(d.block.header.height - 1)),
        InvalidBlock,
    ),
    "wrong parent": (lambda d: _reheader(d, parent_hash=crypto.sha256(b"other")), InvalidBlock),
    "wrong chain": (lambda d: _reheader(d, chain_id=ChainId(8)), InvalidBlock),
    "commit for another block": (
        lambda d: replace(d, commit=replace(d.commit, block_hash=crypto.sha256(b"x"))),
        InvalidCommit,
    ),
    "commit for another height": (
        lambda d: replace(d, commit=replace(d.commit, height=Height(99))),
        InvalidCommit,
    ),
    "missing receipt": (lambda d: replace(d, receipts=d.receipts[:-1]), InvalidBlock),
    "receipts out of order": (lambda d: replace(d, receipts=d.receipts[::-1]), InvalidBlock),
    "extra put on a block key": (
        lambda d: replace(d, extra_puts={schema.header_key(1): b"x"}),
        ValueError,
    ),
    "extra delete of the head": (
        lambda d: replace(d, extra_deletes=[schema.META_HEAD_KEY]),
        ValueError,
    ),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_commit_block_refuses(case: str) -> None:
    store, kv, builder, blocks = chain_of(2)
    good = builder.next()
    mutate, error = MUTATIONS[case]
    writes = kv.write_count
    with pytest.raises(error):
        commit(store, mutate(good))
    assert kv.write_count == writes
    assert store.head() == blocks[-1].block.header
    commit(store, good)  # the unmodified block still goes in
    assert store.head_height() == 3


def test_first_block_must_link_to_the_zero_hash() -> None:
    store, _ = genesis_store()
    data = ChainBuilder().next()
    header = replace(data.block.header, parent_hash=GENESIS_HASH)
    bad = replace(data, block=replace(data.block, header=header), commit=make_commit(header))
    with pytest.raises(InvalidBlock, match="parent hash"):
        commit(store, bad)
    commit(store, data)
    assert store.head_height() == 1


def test_commit_before_genesis_refused() -> None:
    store = ChainStore(MemoryKV())
    with pytest.raises(StorageError, match="no genesis"):
        commit(store, ChainBuilder().next())


# --- verify_head ---------------------------------------------------------------------------------


def test_verify_head_ok_and_depth() -> None:
    store, _, _, blocks = chain_of(5)
    check = store.verify_head()
    assert check.height == 5 and check.block_hash == blocks[-1].block.hash()
    assert check.header == blocks[-1].block.header
    assert check.blocks_checked == 5
    assert store.verify_head(depth=3).blocks_checked == 3


def _put(kv: MemoryKV, key: bytes, value: bytes | None) -> None:
    if value is None:
        kv.delete(key)
    else:
        kv.put(key, value)


def _corruptions(blocks: list[BlockData]) -> dict[str, dict[bytes, bytes | None]]:
    head = blocks[-1]
    h = head.block.header.height
    other_header = replace(head.block.header, time=TimestampMs(head.block.header.time + 5))
    return {
        "head pointer to a missing height": {
            schema.META_HEAD_KEY: HeadRecord(Height(h + 5), head.block.hash()).encode()
        },
        "head pointer hash differs": {
            schema.META_HEAD_KEY: HeadRecord(Height(h), crypto.sha256(b"x")).encode()
        },
        "header replaced": {schema.header_key(h): other_header.encode()},
        "body missing": {schema.body_key(h): None},
        "body transactions changed": {
            schema.body_key(h): BlockBody(
                head.block.txs[:-1], head.block.evidence, head.block.last_commit
            ).encode()
        },
        "receipts missing": {schema.receipts_key(h): None},
        "seen commit missing": {schema.commit_key(h): None},
        "seen commit for another block": {schema.commit_key(h): make_commit(other_header).encode()},
        "hash index missing": {schema.block_hash_key(head.block.hash()): None},
        "block above the head": {schema.header_key(h + 1): other_header.encode()},
        "broken parent link": {
            schema.header_key(h - 2): replace(blocks[-3].block.header, time=TimestampMs(1)).encode()
        },
        "parent header missing": {schema.header_key(h - 1): None},
        "undecodable header": {schema.header_key(h): b"\x93\x01"},
    }


CORRUPTION_CASES = [
    "head pointer to a missing height",
    "head pointer hash differs",
    "header replaced",
    "body missing",
    "body transactions changed",
    "receipts missing",
    "seen commit missing",
    "seen commit for another block",
    "hash index missing",
    "block above the head",
    "broken parent link",
    "parent header missing",
    "undecodable header",
]


@pytest.mark.parametrize("case", CORRUPTION_CASES)
def test_verify_head_detects_corruption(case: str) -> None:
    store, kv, _, blocks = chain_of(4)
    assert store.verify_head().height == 4
    for key, value in _corruptions(blocks)[case].items():
        _put(kv, key, value)
    with pytest.raises(CorruptDatabase) as info:
        store.verify_head()
    assert "resync" in info.value.message


def test_corruption_cases_are_all_listed() -> None:
    _, _, _, blocks = chain_of(4)
    assert sorted(_corruptions(blocks)) == sorted(CORRUPTION_CASES)


def test_head_pointer_missing_with_blocks_is_corrupt() -> None:
    store, kv, _, _ = chain_of(1)
    kv.delete(schema.META_HEAD_KEY)
    with pytest.raises(CorruptDatabase, match="no head pointer"):
        store.verify_head()


def test_corrupt_record_read_raises_typed_error() -> None:
    store, kv, _, _ = chain_of(1)
    kv.put(schema.commit_key(1), b"\x01")
    with pytest.raises(CorruptDatabase, match="seen commit at height 1"):
        store.get_commit(1)


# --- crash atomicity -----------------------------------------------------------------------------


def _ops_in_block(data: BlockData) -> int:
    # header, body, hash index, receipts, one per tx, state changes, tree writes, commit, head
    return (
        4
        + len(data.block.txs)
        + len(data.changes)
        + len(data.extra_puts)
        + len(data.extra_deletes)
        + 2
    )


def _snapshot_of(kv: MemoryKV) -> Mapping[bytes, bytes]:
    return dict(kv.iterate())


def test_a_failed_block_write_leaves_the_previous_head_intact() -> None:
    store, kv, builder, blocks = chain_of(3)
    before = _snapshot_of(kv)
    data = builder.next(n_txs=3)
    n_ops = _ops_in_block(data)
    for after_ops in range(n_ops + 1):
        kv.fail_next_commit(after_ops)
        with pytest.raises(StorageError, match="injected"):
            commit(store, data)
        # (b) the live store and a "restarted process" both show block 3 with all its data.
        assert _snapshot_of(kv) == before, f"partial write after {after_ops} ops"
        restarted = ChainStore(kv.crash_copy())
        for s in (store, restarted):
            check = s.verify_head()
            assert check.height == 3 and check.block_hash == blocks[-1].block.hash()
            assert s.get_block(4) is None and s.get_commit(4) is None
            assert s.get_tx_location(crypto.sha256(data.block.txs[0])) is None
            assert (
                s.get_state(account_key(ALICE.address))
                == blocks[-1].changes[account_key(ALICE.address)]
            )
            assert s.get_block(3) == blocks[-1].block
            assert s.get_receipts(3) == tuple(blocks[-1].receipts)
    commit(store, data)
    assert store.verify_head().height == 4
    assert ChainStore(kv.crash_copy()).verify_head().height == 4


# --- restart over LevelDB ------------------------------------------------------------------------


def test_restart_over_leveldb(tmp_path: Path) -> None:
    path = tmp_path / "chain"
    builder = ChainBuilder()
    blocks = []
    with LevelDB(path) as db:
        store = ChainStore(db)
        store.init_genesis(CHAIN_ID, GENESIS_HASH, GENESIS_STATE)
        for _ in range(3):
            data = builder.next()
            commit(store, data)
            blocks.append(data)

    with LevelDB(path, create=False) as db:
        store = ChainStore(db)
        check = store.verify_head()
        assert check.height == 3 and check.block_hash == blocks[-1].block.hash()
        assert store.chain_id() == CHAIN_ID and store.genesis_hash() == GENESIS_HASH
        for data in blocks:
            h = data.block.header.height
            assert store.get_block(h) == data.block
            assert store.get_commit(h) == data.commit
            assert store.get_receipts(h) == tuple(data.receipts)
        assert store.get_state(b"\x09\x01genesis-only") is None
        data = builder.next()
        commit(store, data)
        with store.snapshot() as snap:
            assert snap.head() == data.block.header

    with LevelDB(path, create=False) as db:
        assert ChainStore(db).verify_head().height == 4
