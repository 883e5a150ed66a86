"""The chain store: blocks, seen commits, receipts, the tx index and latest state values.

``ChainStore`` is used by the chain service alone (the single writer, DESIGN §1). Each finalized
block — header, body, receipts, tx index entries, state changes, the state tree's node records,
the seen commit and the new head pointer — is written in **one** synced batch (DESIGN §5), so a
crash leaves either the previous head with all its data or the new one, never half a block.

``ChainReader`` has every read and works over any ``KVReader``: the live store, or a snapshot
that the RPC thread reads while the chain thread writes (``ChainStore.snapshot()``).

``verify_head`` runs at startup and checks that the head pointer, the stored header, body,
receipts and seen commit agree and that the last few blocks link to their parents.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TypeVar

from node import crypto
from node.consensus.blocks import (
    MAX_BLOCK_TXS_HARD,
    MAX_EVIDENCE,
    Block,
    Commit,
    DuplicateVoteEvidence,
    Header,
    compute_evidence_root,
    compute_last_commit_hash,
    compute_tx_root,
)
from node.consensus.receipts import Receipt
from node.encoding import Record, array_header, bin_header_size, limit, pack
from node.errors import CorruptDatabase, DecodeError, InvalidBlock, InvalidCommit, StorageError
from node.storage import schema
from node.storage.api import KVReader, KVStore, Snapshot
from node.types import UINT64_MAX, ZERO_HASH, ChainId, Hash32, Height

# Stored records are our own writes, so the limit only has to admit the largest legitimate one
# (a block body at the hard transaction cap), not defend against hostile input.
MAX_STORED_RECORD = 256 << 20

# The first block's parent hash; it matches node.consensus.transition.check_header, which links
# height 1 to the zero hash (the genesis hash is kept in meta, not in the header chain).
FIRST_BLOCK_PARENT_HASH = ZERO_HASH
FIRST_HEIGHT = 1

DEFAULT_VERIFY_DEPTH = 16

_NO_PUTS: Mapping[bytes, bytes] = MappingProxyType({})

_RESTORE_HINT = "restore the data directory from a backup, or remove it and resync from peers"


# --- stored records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenesisRecord(Record):
    chain_id: ChainId
    genesis_hash: Hash32


@dataclass(frozen=True, slots=True)
class HeadRecord(Record):
    height: Height
    block_hash: Hash32


@dataclass(frozen=True, slots=True)
class BlockBody(Record):
    """A block without its header; headers are stored apart so header scans stay cheap."""

    txs: tuple[bytes, ...] = field(metadata=limit(MAX_BLOCK_TXS_HARD))
    evidence: tuple[DuplicateVoteEvidence, ...] = field(metadata=limit(MAX_EVIDENCE))
    last_commit: Commit | None


@dataclass(frozen=True, slots=True)
class BlockReceipts(Record):
    receipts: tuple[Receipt, ...] = field(metadata=limit(MAX_BLOCK_TXS_HARD))


@dataclass(frozen=True, slots=True)
class HeightRecord(Record):
    height: Height


@dataclass(frozen=True, slots=True)
class TxLocationRecord(Record):
    """Where a committed transaction is: its block and position, and the byte ranges of its
    bytes in the stored block body and of its receipt's encoding in the stored receipts record,
    so that a lookup reads both without decoding the block or its receipts (schema 2)."""

    height: Height
    index: int
    tx_offset: int
    tx_size: int
    receipt_offset: int
    receipt_size: int


@dataclass(frozen=True, slots=True)
class HeadCheck:
    """What ``verify_head`` found: the head (None before the first block) and links checked."""

    height: Height | None
    block_hash: Hash32 | None
    header: Header | None
    blocks_checked: int


R = TypeVar("R", bound=Record)


def _corrupt(height: int, what: str) -> CorruptDatabase:
    return CorruptDatabase(
        f"chain database inconsistent at height {height}: {what}; {_RESTORE_HINT}"
    )


# --- reads ---------------------------------------------------------------------------------------


class ChainReader:
    """Every chain read, over the live store or a snapshot. Missing data reads as ``None``."""

    __slots__ = ("_kv",)

    def __init__(self, kv: KVReader) -> None:
        self._kv = kv

    @property
    def kv(self) -> KVReader:
        """The store or snapshot this reads (keys per node.storage.schema)."""
        return self._kv

    def _load(self, key: bytes, cls: type[R], what: str) -> R | None:
        raw = self._kv.get(key)
        if raw is None:
            return None
        try:
            return cls.decode(raw, max_size=MAX_STORED_RECORD)
        except DecodeError as exc:
            raise CorruptDatabase(
                f"stored {what} is unreadable ({exc.message}); {_RESTORE_HINT}"
            ) from exc

    # meta

    def is_initialized(self) -> bool:
        return self._kv.get(schema.META_GENESIS_KEY) is not None

    def _genesis(self) -> GenesisRecord:
        record = self._load(schema.META_GENESIS_KEY, GenesisRecord, "genesis record")
        if record is None:
            raise StorageError("the chain database has no genesis; initialise it first")
        return record

    def chain_id(self) -> ChainId:
        return self._genesis().chain_id

    def genesis_hash(self) -> Hash32:
        return self._genesis().genesis_hash

    def head_record(self) -> HeadRecord | None:
        return self._load(schema.META_HEAD_KEY, HeadRecord, "head pointer")

    def head_height(self) -> Height | None:
        head = self.head_record()
        return None if head is None else head.height

    def head(self) -> Header | None:
        """The header of the last committed block; None before the first block."""
        record = self.head_record()
        if record is None:
            return None
        header = self.get_header(record.height)
        if header is None:
            raise _corrupt(record.height, "the head pointer names a height with no stored header")
        return header

    # blocks

    def get_header(self, height: int) -> Header | None:
        return self._load(schema.header_key(height), Header, f"header at height {height}")

    def get_block_hash(self, height: int) -> Hash32 | None:
        header = self.get_header(height)
        return None if header is None else header.hash()

    def get_body(self, height: int) -> BlockBody | None:
        return self._load(schema.body_key(height), BlockBody, f"block body at height {height}")

    def get_block(self, height: int) -> Block | None:
        header = self.get_header(height)
        if header is None:
            return None
        body = self.get_body(height)
        if body is None:
            raise _corrupt(height, "a header is stored without its block body")
        return Block(header, body.txs, body.evidence, body.last_commit)

    def get_height(self, block_hash: bytes) -> Height | None:
        """The height of a committed block by its hash."""
        if len(block_hash) != 32:
            return None
        record = self._load(schema.block_hash_key(block_hash), HeightRecord, "block hash index")
        return None if record is None else record.height

    def get_block_by_hash(self, block_hash: bytes) -> Block | None:
        height = self.get_height(block_hash)
        if height is None:
            return None
        block = self.get_block(height)
        if block is None or block.hash() != block_hash:
            raise _corrupt(height, "the block hash index points at a different block")
        return block

    def get_commit(self, height: int) -> Commit | None:
        """The commit this node saw for the block at ``height`` (its precommits)."""
        return self._load(schema.commit_key(height), Commit, f"seen commit at height {height}")

    def get_receipts(self, height: int) -> tuple[Receipt, ...] | None:
        record = self._load(
            schema.receipts_key(height), BlockReceipts, f"receipts at height {height}"
        )
        return None if record is None else record.receipts

    def get_tx_location(self, tx_id: bytes) -> tuple[Height, int] | None:
        """(height, index in the block) of a committed transaction."""
        record = self.get_tx_record(tx_id)
        return None if record is None else (record.height, record.index)

    def get_tx_record(self, tx_id: bytes) -> TxLocationRecord | None:
        """The index entry of a committed transaction."""
        if len(tx_id) != 32:
            return None
        return self._load(schema.tx_key(tx_id), TxLocationRecord, "transaction index entry")

    def read_indexed(self, tx_id: bytes, record: TxLocationRecord) -> tuple[bytes, Receipt]:
        """The bytes and the receipt of the transaction ``record`` indexes: two byte ranges of
        the stored body and receipts, checked against ``tx_id``; no block is decoded."""
        height = record.height
        body = self._kv.get(schema.body_key(height))
        receipts = self._kv.get(schema.receipts_key(height))
        if body is None or receipts is None:
            raise CorruptDatabase(f"block {height} indexed for a transaction is missing")
        raw = body[record.tx_offset : record.tx_offset + record.tx_size]
        if len(raw) != record.tx_size or crypto.sha256(raw) != tx_id:
            raise _corrupt(height, "a transaction index entry does not point at its transaction")
        encoded = receipts[record.receipt_offset : record.receipt_offset + record.receipt_size]
        try:
            receipt = Receipt.decode(encoded, max_size=MAX_STORED_RECORD)
        except DecodeError as exc:
            raise _corrupt(
                height, f"a transaction index entry does not point at a receipt ({exc.message})"
            ) from exc
        if receipt.tx_id != tx_id:
            raise _corrupt(height, "a transaction index entry does not point at its receipt")
        return raw, receipt

    # state

    def get_state(self, key: bytes) -> bytes | None:
        """The latest committed value of state key ``key``."""
        return self._kv.get(schema.state_key(key))

    def iter_state(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Latest state entries whose key starts with ``prefix``, in key order."""
        skip = len(schema.PREFIX_STATE)
        for key, value in self._kv.iterate(prefix=schema.state_key(prefix)):
            yield key[skip:], value


class ChainSnapshot(ChainReader):
    """A ``ChainReader`` over a storage snapshot it owns; close it (or use ``with``)."""

    __slots__ = ("_snapshot",)

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__(snapshot)
        self._snapshot = snapshot

    def close(self) -> None:
        self._snapshot.close()

    def __enter__(self) -> ChainSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- the writer ----------------------------------------------------------------------------------


class ChainStore(ChainReader):
    """The chain service's handle on the chain DB. Checks the schema when opened."""

    __slots__ = ("_store",)

    def __init__(self, kv: KVStore) -> None:
        schema.check_schema(kv)
        super().__init__(kv)
        self._store = kv

    def snapshot(self) -> ChainSnapshot:
        """A consistent read view of what is committed now, for another thread."""
        return ChainSnapshot(self._store.snapshot())

    def init_genesis(
        self,
        chain_id: ChainId | int,
        genesis_hash: Hash32,
        state: Mapping[bytes, bytes],
        extra_puts: Mapping[bytes, bytes] = _NO_PUTS,
    ) -> None:
        """Write the chain identity and the genesis state (plus the tree's records) in one
        synced batch. Refuses a database that already has a genesis."""
        if self.is_initialized():
            raise StorageError(
                f"the chain database is already initialised (chain id {self.chain_id()}); "
                "use a fresh data directory for a new chain"
            )
        if len(genesis_hash) != 32:
            raise ValueError("the genesis hash is 32 bytes")
        _check_extra_keys(extra_puts)
        batch = self._store.batch()
        for key, value in state.items():
            batch.put(schema.state_key(key), value)
        for key, value in extra_puts.items():
            batch.put(key, value)
        batch.put(
            schema.META_GENESIS_KEY,
            GenesisRecord(ChainId(chain_id), Hash32(bytes(genesis_hash))).encode(),
        )
        batch.commit(sync=True)

    def commit_block(
        self,
        block: Block,
        commit: Commit,
        receipts: Sequence[Receipt],
        state_changes: Mapping[bytes, bytes | None],
        extra_puts: Mapping[bytes, bytes] = _NO_PUTS,
        extra_deletes: Iterable[bytes] = (),
        receipt_encodings: Sequence[bytes] | None = None,
    ) -> None:
        """Write a finalized block and everything that comes with it in one synced batch.

        ``state_changes`` are latest state values (None deletes); ``extra_puts`` and
        ``extra_deletes`` are the state tree's records (node/storage/smt.py);
        ``receipt_encodings``, if given, are ``r.encode()`` of each receipt (made once for the
        receipts root; they are not re-encoded here). Raises ``InvalidBlock`` unless the block is
        the head's child on this chain, ``InvalidCommit`` unless ``commit`` finalizes it, and
        ``InvalidBlock`` unless there is one receipt per transaction, in order.
        """
        header = block.header
        height = header.height
        block_hash = header.hash()
        chain_id = self.chain_id()
        if header.chain_id != chain_id:
            raise InvalidBlock(f"block for chain {header.chain_id}, this chain is {chain_id}")
        head = self.head_record()
        expected_height = FIRST_HEIGHT if head is None else head.height + 1
        if height != expected_height:
            raise InvalidBlock(f"cannot store block {height}: the next height is {expected_height}")
        expected_parent = FIRST_BLOCK_PARENT_HASH if head is None else head.block_hash
        if header.parent_hash != expected_parent:
            raise InvalidBlock(
                f"cannot store block {height}: its parent hash 0x{header.parent_hash.hex()} is not "
                f"the head's hash 0x{expected_parent.hex()}"
            )
        if commit.height != height or commit.block_hash != block_hash:
            raise InvalidCommit(
                f"the commit is for block 0x{commit.block_hash.hex()} at height {commit.height}, "
                f"not block 0x{block_hash.hex()} at height {height}"
            )
        if len(receipts) != len(block.txs):
            raise InvalidBlock(f"{len(receipts)} receipts for {len(block.txs)} transactions")
        tx_ids = [crypto.sha256(tx) for tx in block.txs]
        for index, (tx_id, receipt) in enumerate(zip(tx_ids, receipts, strict=True)):
            if receipt.tx_id != tx_id:
                raise InvalidBlock(f"receipt {index} is not for transaction {index}")
        if receipt_encodings is None:
            encodings: Sequence[bytes] = [r.encode() for r in receipts]
        else:
            encodings = receipt_encodings
            if len(encodings) != len(receipts) or any(
                enc[:3] != _RECEIPT_PREFIX or enc[3:35] != tx_id
                for enc, tx_id in zip(encodings, tx_ids, strict=True)
            ):
                raise ValueError("receipt_encodings are not the encodings of the receipts")
        deletes = list(extra_deletes)
        _check_extra_keys(extra_puts)
        _check_extra_keys(deletes)
        body = BlockBody(block.txs, block.evidence, block.last_commit).encode()
        if len(encodings) > MAX_BLOCK_TXS_HARD:
            BlockReceipts(tuple(receipts)).encode()  # raises its EncodeError
        # BlockReceipts(receipts).encode(), byte for byte, from the encodings at hand: the
        # 1-field record's array header, the receipts' array header, the receipts.
        receipts_header = b"\x91" + array_header(len(encodings))
        stored_receipts = receipts_header + b"".join(encodings)

        batch = self._store.batch()
        batch.put(schema.header_key(height), header.encode())
        batch.put(schema.body_key(height), body)
        batch.put(schema.block_hash_key(block_hash), HeightRecord(height).encode())
        batch.put(schema.receipts_key(height), stored_receipts)
        # Index entries with the byte ranges of each transaction in the body (a 3-field array
        # header, the transactions' array header, then each as bin 8/16/32) and of each receipt.
        put = batch.put
        tx_prefix = schema.PREFIX_TX  # + the tx id, a sha-256 output (schema.tx_key)
        tx_pos = 1 + len(array_header(len(block.txs)))
        receipt_pos = len(receipts_header)
        for index, (tx_id, tx, enc) in enumerate(zip(tx_ids, block.txs, encodings, strict=True)):
            tx_size = len(tx)
            tx_pos += 2 if tx_size < 256 else bin_header_size(tx_size)
            receipt_size = len(enc)
            put(
                tx_prefix + tx_id,
                _encode_location(height, index, tx_pos, tx_size, receipt_pos, receipt_size),
            )
            tx_pos += tx_size
            receipt_pos += receipt_size
        state_prefix = schema.PREFIX_STATE  # + the state key (schema.state_key)
        for key, value in state_changes.items():
            if value is None:
                batch.delete(state_prefix + key)
            else:
                put(state_prefix + key, value)
        for key in deletes:
            batch.delete(key)
        for key, value in extra_puts.items():
            put(key, value)
        batch.put(schema.commit_key(height), commit.encode())
        batch.put(schema.META_HEAD_KEY, HeadRecord(height, block_hash).encode())
        batch.commit(sync=True)

    def verify_head(self, depth: int = DEFAULT_VERIFY_DEPTH) -> HeadCheck:
        """Startup check of the head block and the parent links of the last ``depth`` blocks.

        Raises ``CorruptDatabase`` saying what is inconsistent; ``StorageError`` if the
        database has no genesis.
        """
        chain_id = self.chain_id()
        head = self.head_record()
        if head is None:
            if self._kv.get(schema.header_key(FIRST_HEIGHT)) is not None:
                raise _corrupt(FIRST_HEIGHT, "a block is stored but there is no head pointer")
            return HeadCheck(None, None, None, 0)
        height = head.height
        header = self.get_header(height)
        if header is None:
            raise _corrupt(height, "the head pointer names a height with no stored header")
        if header.height != height:
            raise _corrupt(height, f"the header stored there is for height {header.height}")
        if header.chain_id != chain_id:
            raise _corrupt(height, f"the head block is for chain {header.chain_id}, not {chain_id}")
        block_hash = header.hash()
        if block_hash != head.block_hash:
            raise _corrupt(height, "the head pointer's hash differs from the stored header's hash")
        if self.get_height(block_hash) != height:
            raise _corrupt(height, "the block hash index does not point at the head")
        self._check_body(header)
        commit = self.get_commit(height)
        if commit is None:
            raise _corrupt(height, "the seen commit of the head block is missing")
        if commit.height != height or commit.block_hash != block_hash:
            raise _corrupt(height, "the seen commit is not for the head block")
        if self._kv.get(schema.header_key(height + 1)) is not None:
            raise _corrupt(height + 1, "a block is stored above the head")

        checked = 1
        child = header
        while checked < depth and child.height > FIRST_HEIGHT:
            parent = self.get_header(child.height - 1)
            if parent is None:
                raise _corrupt(child.height - 1, "the header below the head is missing")
            parent_hash = parent.hash()
            if child.parent_hash != parent_hash:
                raise _corrupt(child.height, "the parent hash does not match the stored parent")
            if self.get_height(parent_hash) != parent.height:
                raise _corrupt(parent.height, "the block hash index does not point at the block")
            child = parent
            checked += 1
        if child.height == FIRST_HEIGHT and child.parent_hash != FIRST_BLOCK_PARENT_HASH:
            raise _corrupt(FIRST_HEIGHT, "the first block's parent hash is not the zero hash")
        return HeadCheck(height, block_hash, header, checked)

    def _check_body(self, header: Header) -> None:
        height = header.height
        body = self.get_body(height)
        if body is None:
            raise _corrupt(height, "the block body of the head is missing")
        if compute_tx_root(body.txs) != header.tx_root:
            raise _corrupt(height, "the stored transactions do not match the header's tx root")
        if compute_evidence_root(body.evidence) != header.evidence_root:
            raise _corrupt(height, "the stored evidence does not match the header's evidence root")
        if compute_last_commit_hash(body.last_commit) != header.last_commit_hash:
            raise _corrupt(height, "the stored last commit does not match the header")
        receipts = self.get_receipts(height)
        if receipts is None:
            raise _corrupt(height, "the receipts of the head block are missing")
        if len(receipts) != len(body.txs):
            raise _corrupt(height, f"{len(receipts)} receipts for {len(body.txs)} transactions")
        # The head block's transaction index: each entry there, pointing at its transaction and
        # its receipt (the two records are read once here, not once per entry).
        stored_body = self._kv.get(schema.body_key(height))
        stored_receipts = self._kv.get(schema.receipts_key(height))
        assert stored_body is not None and stored_receipts is not None  # decoded just above
        for index, (tx, receipt) in enumerate(zip(body.txs, receipts, strict=True)):
            record = self.get_tx_record(crypto.sha256(tx))
            if record is None:
                raise _corrupt(height, f"transaction {index} of the head block is not indexed")
            tx_end = record.tx_offset + record.tx_size
            receipt_end = record.receipt_offset + record.receipt_size
            if (
                (record.height, record.index) != (height, index)
                or stored_body[record.tx_offset : tx_end] != tx
                or stored_receipts[record.receipt_offset : receipt_end] != receipt.encode()
            ):
                raise _corrupt(height, f"the index entry of transaction {index} is wrong")


# Every encoded Receipt starts with its 6-field array header and its tx id's bin 8 header.
_RECEIPT_PREFIX = b"\x96\xc4\x20"


def _encode_location(
    height: int, index: int, tx_offset: int, tx_size: int, receipt_offset: int, receipt_size: int
) -> bytes:
    """``TxLocationRecord(...).encode()`` for in-range values, without building the record."""
    if height > UINT64_MAX:  # pragma: no cover - heights are uint64 (the rest fit by far)
        return TxLocationRecord(
            Height(height), index, tx_offset, tx_size, receipt_offset, receipt_size
        ).encode()  # raises its EncodeError
    return pack((height, index, tx_offset, tx_size, receipt_offset, receipt_size))


_FIRST_BYTE = operator.itemgetter(slice(0, 1))
_CHAIN_STORE_PREFIX_SET = frozenset(schema.CHAIN_STORE_PREFIXES)


def _check_extra_keys(keys: Iterable[bytes]) -> None:
    # Extra writes are the state tree's; one landing on a chain-store key would corrupt blocks.
    # Checked in bulk first (a block has ~10^4 of them); the loop below finds the first bad one.
    items = keys if isinstance(keys, list | tuple | dict) else list(keys)
    if set(map(type, items)) <= {bytes} and _CHAIN_STORE_PREFIX_SET.isdisjoint(
        map(_FIRST_BYTE, items)
    ):
        return
    for key in items:
        if type(key) is not bytes:
            raise TypeError("keys must be bytes")
        if schema.is_chain_store_key(key):
            raise ValueError(
                f"extra write to key 0x{key.hex()} collides with the chain store's keys"
            )
