"""The chain service: the single writer of blocks and state (DESIGN §1, §5, §7).

It owns the chain store and the state tree. It builds proposals, validates proposed blocks on a
discardable overlay, and commits a decided block with its receipts, state changes, tree records
and seen commit in one synced batch. After each commit it publishes an immutable ``ReadView``
(head, params, a storage snapshot) that RPC reads use from their own thread.

Methods here are synchronous and CPU-bound; the consensus service calls them in a worker thread
one at a time (``trio.to_thread.run_sync``), so nothing else writes concurrently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from node.api import StateProof, TxLocation
from node.consensus.blocks import Block, Commit, DuplicateVoteEvidence, Header
from node.consensus.evidence import check_evidence
from node.consensus.params import AuthorityParams, ChainParams, VotableParams
from node.consensus.state import (
    AUTHORITY_PARAMS_KEY,
    PARAMS_KEY,
    VALIDATOR_SET_KEY,
    Account,
    Overlay,
    evidence_seen_key,
    get_account,
)
from node.consensus.transition import (
    BlockContext,
    BlockResult,
    BuiltBlock,
    ValidatorContext,
    apply_block,
    apply_transaction,
    build_block,
    check_commit,
)
from node.consensus.txs import TxKind, VerifiedTransaction
from node.consensus.validators import (
    ValidatorHistoryError,
    ValidatorSet,
    oldest_kept_height,
    validator_set_at,
)
from node.errors import ConfigError, CorruptDatabase, HistoryPruned, InvalidEvidence, NotFound
from node.genesis import Genesis, build_genesis_state, genesis_hash
from node.storage.api import KVStore, Snapshot
from node.storage.chain_store import ChainReader, ChainStore
from node.storage.schema import PREFIX_STATE
from node.storage.smt import StateTree, TreeUpdate
from node.types import Address, Hash32, Height

log = logging.getLogger(__name__)

TREE_PREFIX = b"T"
# Snapshots handed to the RPC thread stay open at least this long after being superseded.
VIEW_GRACE_SECONDS = 30.0
VIEWS_KEPT = 2


class _LiveState:
    """The latest committed state values, read from the store (chain thread only)."""

    __slots__ = ("_kv_get",)

    def __init__(self, reader: ChainReader) -> None:
        self._kv_get = reader.kv.get

    def get(self, key: bytes) -> bytes | None:
        # ChainReader.get_state, one call shorter: the hottest read of block execution.
        return self._kv_get(PREFIX_STATE + key)


class ReadView:
    """An immutable view of one committed head; safe to use from any thread until closed."""

    def __init__(
        self, snapshot: Snapshot, chain: ChainParams, params: VotableParams,
        head: Header | None, tree_prefix: bytes,
    ) -> None:
        self._kv = snapshot
        self._snap = ChainReader(snapshot)
        self.chain = chain
        self.params = params
        self.head = head
        self._tree_prefix = tree_prefix

    @property
    def head_height(self) -> int:
        return 0 if self.head is None else self.head.height

    def get_block(self, height: int) -> Block | None:
        if height > self.head_height:
            return None
        return self._snap.get_block(height)

    def get_block_by_hash(self, block_hash: bytes) -> Block | None:
        height = self._snap.get_height(block_hash)
        if height is None or height > self.head_height:
            return None
        return self._snap.get_block(height)

    def get_commit(self, height: int) -> Commit | None:
        if height > self.head_height:
            return None
        return self._snap.get_commit(height)

    def get_transaction(self, tx_id: bytes) -> TxLocation | None:
        # The index entry says where the transaction and its receipt sit in the stored block
        # records: a lookup decodes the header and one receipt, never the whole block.
        record = self._snap.get_tx_record(tx_id)
        if record is None or record.height > self.head_height:
            return None
        height = record.height
        header = self._snap.get_header(height)
        if header is None:
            raise CorruptDatabase(f"block {height} indexed for a transaction is missing")
        raw, receipt = self._snap.read_indexed(tx_id, record)
        return TxLocation(Hash32(bytes(tx_id)), height, record.index, header.hash(), raw, receipt)

    def get_account(self, address: Address) -> Account:
        return get_account(_LiveState(self._snap), address)

    def get_state(self, key: bytes) -> bytes | None:
        return self._snap.get_state(key)

    def iter_state(
        self, prefix: bytes, *, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """State entries whose key starts with ``prefix`` (non-empty), in key order, from the key
        just after ``after`` when given (pagination)."""
        if not prefix:
            raise ValueError("iter_state needs a non-empty prefix")
        if after is None:
            yield from self._snap.iter_state(prefix)
            return
        skip = len(PREFIX_STATE)
        stop = _prefix_end(PREFIX_STATE + prefix)
        start = PREFIX_STATE + after + b"\x00"
        for key, value in self._kv.iterate(start=start, stop=stop):
            if not key.startswith(PREFIX_STATE + prefix):
                break
            yield key[skip:], value

    def get_proof(self, key: bytes, height: int | None = None) -> StateProof:
        head = self.head_height
        h = head if height is None else height
        if h > head:
            raise NotFound(f"height {h} is above the head {head}")
        oldest = max(0, head - self.chain.state_history_blocks + 1)
        if h < oldest:
            raise HistoryPruned(
                f"state at height {h} is no longer kept (the oldest served is {oldest})"
            )
        tree = StateTree(self._kv, self._tree_prefix, cache_nodes=0)
        value, proof = tree.get_proof(h, key)
        return StateProof(key, value, Height(h), tree.root_at(h), proof.encode())

    def close(self) -> None:
        self._kv.close()


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key above every key starting with ``prefix`` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True, slots=True)
class Validated:
    """A block that passed ``validate``; kept so that committing it needs no re-execution."""

    block: Block
    result: BlockResult
    tree_update: TreeUpdate


class ChainService:
    """Single writer of the chain. Not thread-safe: one caller at a time."""

    def __init__(self, kv: KVStore, genesis: Genesis) -> None:
        self.kv = kv
        self.genesis = genesis
        self.chain: ChainParams = genesis.chain_params
        self.store = ChainStore(kv)
        self.tree = StateTree(kv, TREE_PREFIX)
        self._state = _LiveState(self.store)
        self._validated: dict[Hash32, Validated] = {}
        self._views: deque[tuple[float, ReadView]] = deque()
        self._view_lock = threading.Lock()
        self._view: ReadView | None = None
        self.head: Header | None = None
        self.params: VotableParams = genesis.votable_params
        self.authority: AuthorityParams = genesis.authority_params
        # Validator sets by height, read from the head state; cleared on every commit.
        self._sets: dict[int, ValidatorSet] = {}

    # --- opening -------------------------------------------------------------------------------

    def open(self) -> None:
        """Initialise from genesis on an empty database, else verify the head and the tree."""
        expected_hash = genesis_hash(self.genesis)
        if not self.store.is_initialized():
            state = build_genesis_state(self.genesis)
            update = self.tree.apply(0, state)
            self.store.init_genesis(self.chain.chain_id, expected_hash, state, update.puts)
            self.tree.committed(update)
            log.info("initialised chain %d from genesis", self.chain.chain_id)
        else:
            if self.store.chain_id() != self.chain.chain_id:
                raise ConfigError(
                    f"the database holds chain {self.store.chain_id()}, the genesis file is for "
                    f"chain {self.chain.chain_id}"
                )
            if self.store.genesis_hash() != expected_hash:
                raise ConfigError(
                    "the database was initialised from a different genesis file; use the "
                    "genesis it was created with or a fresh data directory"
                )
        check = self.store.verify_head()
        self.head = self.store.head()
        head_height = 0 if self.head is None else self.head.height
        tree_height = self.tree.latest_height()
        if tree_height != head_height:
            raise CorruptDatabase(
                f"the state tree is at height {tree_height} but the chain head is at "
                f"{head_height}; restore the data directory from a backup or resync"
            )
        if self.head is not None and self.tree.root_at(head_height) != self.head.state_root:
            raise CorruptDatabase(
                f"the state root at height {head_height} does not match the head block's"
            )
        self.params = self._load_params()
        raw_authority = self.store.get_state(AUTHORITY_PARAMS_KEY)
        if raw_authority is None:
            raise CorruptDatabase("the authority parameters are missing from state")
        self.authority = AuthorityParams.decode(raw_authority)
        self._sets.clear()
        self._publish_view()
        log.info("chain head at height %d (%s)", head_height, check)

    def _load_params(self) -> VotableParams:
        raw = self.store.get_state(PARAMS_KEY)
        if raw is None:
            raise CorruptDatabase("the votable parameters are missing from state")
        return VotableParams.decode(raw)

    # --- views ---------------------------------------------------------------------------------

    @property
    def head_height(self) -> int:
        return 0 if self.head is None else self.head.height

    def state_view(self) -> _LiveState:
        """The latest committed state (for the mempool and execution; chain thread only)."""
        return self._state

    def check_admission(self, vtx: VerifiedTransaction) -> None:
        """Run a transaction's state rules against the head state on a discardable overlay, as
        the next block would, so its submitter gets the rule it breaks (role missing, price below
        the offer, model already registered, …) with its error code now, instead of seeing it
        dropped at block building. Transfers are fully checked by the mempool already; a nonce
        other than the account's next one depends on transactions still in the pool, so it is
        left to block building. Chain thread only (like ``state_view``)."""
        if vtx.tx.kind == TxKind.TRANSFER:
            return
        state = self._state
        if vtx.tx.nonce != get_account(state, vtx.sender).nonce:
            return
        head = self.head
        ctx = BlockContext(
            chain=self.chain,
            params=self.params,
            height=self.head_height + 1,
            time_ms=self.chain.genesis_time if head is None else head.time,
            proposer=Address(b"\x00" * 20),
            parent_hash=Hash32(b"\x00" * 32) if head is None else head.hash(),
        )
        apply_transaction(Overlay(state), vtx, ctx)

    def read_view(self) -> ReadView:
        view = self._view
        assert view is not None, "open() publishes the first view"
        return view

    def _publish_view(self) -> None:
        view = ReadView(
            self.kv.snapshot(), self.chain, self.params, self.head, TREE_PREFIX
        )
        now = time.monotonic()
        with self._view_lock:
            self._view = view
            self._views.append((now, view))
            while len(self._views) > VIEWS_KEPT and now - self._views[0][0] > VIEW_GRACE_SECONDS:
                _, old = self._views.popleft()
                old.close()

    def close(self) -> None:
        with self._view_lock:
            while self._views:
                self._views.popleft()[1].close()
            self._view = None

    # --- validators ----------------------------------------------------------------------------

    def validator_set(self) -> ValidatorSet:
        """The set that signs the next block (height head + 1)."""
        raw = self.store.get_state(VALIDATOR_SET_KEY)
        if raw is None:
            raise CorruptDatabase("the validator set is missing from state")
        return ValidatorSet.decode(raw)

    def validator_set_at(self, height: int) -> ValidatorSet:
        """The set of ``height``, from the head state (DESIGN §5: changes apply at h+2).

        Known for heights from ``oldest_validator_height()`` (the last ``evidence_max_age``
        heights at least) up to head + 2; above that it is the latest set decided, which blocks
        not applied yet may still change. Raises ``HistoryPruned`` below the window.
        """
        if height < 1:
            raise NotFound(f"no validator set for height {height}")
        cached = self._sets.get(height)
        if cached is None:
            try:
                cached = validator_set_at(self._state, height)
            except ValidatorHistoryError as exc:
                raise HistoryPruned(str(exc)) from None
            if height <= self.head_height + 2:
                self._sets[height] = cached
        return cached

    def oldest_validator_height(self) -> int:
        """The lowest height whose validator set the head state still holds."""
        return oldest_kept_height(self._state)

    def validator_context(self, height: int) -> ValidatorContext:
        """(set(h), set(h+1), set(h−1)): what block ``height`` is checked against.

        Exact for heights up to head + 1 (the next block); for head + 2, ``next`` is provisional.
        """
        return ValidatorContext(
            self.validator_set_at(height),
            self.validator_set_at(height + 1),
            self.validator_set_at(height - 1) if height > 1 else None,
        )

    # --- evidence ------------------------------------------------------------------------------

    def check_evidence(self, evidence: DuplicateVoteEvidence) -> None:
        """Raise an ``InvalidEvidence`` unless ``evidence`` could go into the next block.

        The same checks as block execution (form, age, not processed, validator of its height,
        signatures) against the head state: what the evidence pool and the gossip validator run
        before keeping or relaying evidence (CPU: two signature recoveries; use a worker thread).
        """
        height = self.head_height + 1

        def validators_at(h: int) -> ValidatorSet:
            try:
                return self.validator_set_at(h)
            except HistoryPruned as exc:
                raise InvalidEvidence(exc.message) from None

        check_evidence(
            self.chain.chain_id,
            evidence,
            height=height,
            max_age=self.chain.evidence_max_age,
            validators_at=validators_at,
            seen=lambda key: self._state.get(evidence_seen_key(key)) is not None,
        )

    # --- blocks --------------------------------------------------------------------------------

    def _root_fn(self, height: int, sink: list[TreeUpdate]) -> object:
        def state_root(changes: Mapping[bytes, bytes | None]) -> Hash32:
            update = self.tree.apply(height, changes)
            sink.append(update)
            return update.root

        return state_root

    def build(
        self,
        round_: int,
        proposer: Address,
        last_commit: Commit | None,
        candidates: Sequence[VerifiedTransaction],
        evidence: Sequence[DuplicateVoteEvidence] = (),
    ) -> BuiltBlock:
        """Build the next block from ``evidence`` (pool order, invalid items left out, see
        ``BuiltBlock.rejected_evidence``) and ``candidates``."""
        height = self.head_height + 1
        sink: list[TreeUpdate] = []
        built = build_block(
            self._state,
            self.chain,
            self.params,
            self.head,
            round_,
            proposer,
            last_commit,
            self.validator_context(height),
            candidates,
            self._root_fn(height, sink),  # type: ignore[arg-type]
            evidence,
        )
        self._validated[built.block.hash()] = Validated(built.block, built.result, sink[-1])
        return built

    def validate(
        self, block: Block, verified: Sequence[VerifiedTransaction] | None = None
    ) -> BlockResult:
        """Execute ``block`` on a discardable overlay of the head state; raise ``InvalidBlock``."""
        block_hash = block.hash()
        known = self._validated.get(block_hash)
        if known is not None:
            return known.result
        height = self.head_height + 1
        sink: list[TreeUpdate] = []
        result = apply_block(
            self._state,
            self.chain,
            self.params,
            self.head,
            block,
            self.validator_context(height),
            self._root_fn(height, sink),  # type: ignore[arg-type]
            verified,
        )
        self._validated[block_hash] = Validated(block, result, sink[-1])
        return result

    def commit(self, block: Block, commit: Commit) -> BlockResult:
        """Write a decided block in one synced batch and publish a new read view.

        ``commit`` must finalize the block: signed precommits of more than two thirds of the
        power of the block's validator set (``InvalidCommit`` otherwise); it is stored as the
        seen commit.
        """
        block_hash = block.hash()
        header = block.header
        check_commit(
            self.chain.chain_id,
            commit,
            header.height,
            block_hash,
            self.validator_context(header.height).current,
            header.time,
        )
        if block_hash not in self._validated:
            self.validate(block)
        validated = self._validated[block_hash]
        update = validated.tree_update
        height = block.header.height
        prune_from = height - self.chain.state_history_blocks + 1
        prune = self.tree.prune(prune_from) if prune_from > 0 and height % 16 == 0 else None
        puts: Mapping[bytes, bytes] = update.puts
        deletes: Sequence[bytes] = update.deletes
        if prune is not None:
            puts = {**update.puts, **prune.puts}
            deletes = [*update.deletes, *prune.deletes]
        result = validated.result
        self.store.commit_block(
            block, commit, result.receipts, result.changes, puts, deletes,
            receipt_encodings=result.receipt_encodings,
        )
        self.tree.committed(update)
        if prune is not None:
            self.tree.committed(prune)
        self.head = block.header
        self._validated.clear()
        self._sets.clear()
        if PARAMS_KEY in validated.result.changes:
            self.params = self._load_params()
        self._publish_view()
        return validated.result
