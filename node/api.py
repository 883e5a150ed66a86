"""The node facade: what the RPC server (and later the explorer) may ask of a running node.

Two halves (DESIGN §1):

* ``ChainReadView`` — an immutable view of the latest committed block (head header, votable
  params, a storage snapshot). The chain service publishes a new one after every commit; RPC
  read methods use it from the RPC thread directly, without crossing into trio. Implementations
  must be safe to call from any thread.
* ``NodeAPI`` — the live node. ``read_view()`` is cheap and thread-safe; the ``async`` methods
  run on the trio side and are called through ``rpc.bridge``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from node.consensus.blocks import Block, Commit, Header
from node.consensus.params import ChainParams, VotableParams
from node.consensus.receipts import Receipt
from node.consensus.state import Account
from node.types import Address, Hash32, Height


@dataclass(frozen=True, slots=True)
class TxLocation:
    tx_id: Hash32
    height: Height
    index: int
    block_hash: Hash32
    raw: bytes  # the encoded SignedTransaction
    receipt: Receipt


@dataclass(frozen=True, slots=True)
class StateProof:
    """A state value at ``height`` and its proof against that height's state root."""

    key: bytes
    value: bytes | None  # None: the key is absent (non-inclusion proof)
    height: Height
    state_root: Hash32
    proof: bytes  # canonical encoding of node.storage.smt.SmtProof


@dataclass(frozen=True, slots=True)
class NodeStatus:
    chain_id: int
    node_version: str
    head_height: int
    head_hash: Hash32
    head_time_ms: int
    validator_address: Address | None
    is_validator: bool
    mempool_size: int
    mempool_bytes: int
    peers: int
    syncing: bool
    finalized_height: int = 0  # every committed block is final (BFT): equals head_height
    consensus_height: int = 0  # the height being decided now
    round: int = 0  # its round
    validators: tuple[tuple[Address, int], ...] = ()  # the set of the next height: (address, power)


class ChainReadView(Protocol):
    chain: ChainParams
    params: VotableParams
    head: Header | None  # None only before the first block

    def get_block(self, height: int) -> Block | None: ...

    def get_block_by_hash(self, block_hash: bytes) -> Block | None: ...

    def get_commit(self, height: int) -> Commit | None: ...

    def get_transaction(self, tx_id: bytes) -> TxLocation | None: ...

    def get_account(self, address: Address) -> Account: ...

    def get_state(self, key: bytes) -> bytes | None: ...

    def iter_state(
        self, prefix: bytes, *, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Latest state entries under ``prefix`` in key order, after key ``after`` if given."""
        ...

    def get_proof(self, key: bytes, height: int | None = None) -> StateProof:
        """Raises ``HistoryPruned`` past ``state_history_blocks``, ``NotFound`` above the head."""
        ...


class ViewState:
    """A ``ChainReadView`` as the ``StateView`` (``get``) that the economy's read helpers take."""

    __slots__ = ("_view",)

    def __init__(self, view: ChainReadView) -> None:
        self._view = view

    def get(self, key: bytes) -> bytes | None:
        return self._view.get_state(key)


class NodeAPI(Protocol):
    def read_view(self) -> ChainReadView: ...

    async def submit_transaction(self, raw: bytes) -> Hash32:
        """Verify and admit into the mempool; raises a typed ``InvalidTransaction`` or
        ``MempoolRejected`` error."""
        ...

    async def status(self) -> NodeStatus: ...

    async def pending_nonce(self, address: Address) -> int:
        """The next nonce for ``address`` counting transactions waiting in the mempool."""
        ...
