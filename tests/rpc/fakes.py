"""A fake ``NodeAPI`` for the RPC tests: a small chain of real records in memory.

Blocks hold real signed transfers (so ids, senders and bodies are genuine); roots and the SMT proof
bytes are placeholders, which the RPC layer only carries. Error injection:

* ``FakeNode.submit_error``: raised by the next ``submit_transaction`` calls;
* ``FakeReadView.account_error``: raised by ``get_account`` (read path);
* ``FakeNode.gate``: a ``trio.Event`` that ``submit_transaction`` waits on (concurrency tests);
  ``FakeNode.entered`` counts calls that reached the node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from node import crypto
from node.api import NodeStatus, StateProof, TxLocation
from node.consensus.blocks import Block, Commit, Header, SignedVote, Vote, VoteType
from node.consensus.params import ChainParams, FeeSchedule, VotableParams
from node.consensus.receipts import Attribute, Event, Receipt, ReceiptStatus
from node.consensus.state import EMPTY_ACCOUNT, Account, account_key
from node.consensus.txs import Transfer, TxKind, make_transaction, verify_transaction
from node.errors import AlreadyKnown, HistoryPruned, NonceTooLow, NotFound, WrongChain
from node.types import (
    NSD,
    Address,
    Amount,
    ChainId,
    Hash32,
    Height,
    Nonce,
    Round,
    TimestampMs,
)

CHAIN_ID = 4242
HISTORY = 3
ALICE = crypto.PrivateKey(bytes(31) + b"\x01")
BOB = crypto.PrivateKey(bytes(31) + b"\x02")
VALIDATOR = crypto.PrivateKey(bytes(31) + b"\x03")
UNKNOWN = Address(b"\x77" * 20)

FEES = FeeSchedule(
    kind=TxKind.TRANSFER,
    base=Amount(1000),
    per_byte=Amount(10),
    per_signature=Amount(100),
    per_new_account=Amount(5000),
)
PARAMS = VotableParams(
    timeout_propose_ms=1000,
    timeout_propose_delta_ms=500,
    timeout_prevote_ms=1000,
    timeout_prevote_delta_ms=500,
    timeout_precommit_ms=1000,
    timeout_precommit_delta_ms=500,
    timeout_commit_ms=1000,
    max_block_bytes=1 << 20,
    max_block_txs=1000,
    max_tx_bytes=64 * 1024,
    fees=(FEES,),
)
CHAIN = ChainParams(
    chain_id=ChainId(CHAIN_ID),
    genesis_time=TimestampMs(1_700_000_000_000),
    state_history_blocks=HISTORY,
    evidence_max_age=100,
    validator_floor=1,
)


def _h(tag: str, n: int) -> Hash32:
    return crypto.sha256(f"{tag}/{n}".encode())


def transfer(
    key: crypto.PrivateKey,
    nonce: int,
    to: Address,
    amount: int,
    fee: int = 10**15,
    chain_id: int = CHAIN_ID,
) -> bytes:
    return make_transaction(key, chain_id, nonce, fee, Transfer(to, Amount(amount), b"hi")).encode()


@dataclass
class FakeReadView:
    """Implements ``node.api.ChainReadView`` over dicts."""

    chain: ChainParams = CHAIN
    params: VotableParams = PARAMS
    head: Header | None = None
    blocks: dict[int, Block] = field(default_factory=dict)
    txs: dict[bytes, TxLocation] = field(default_factory=dict)
    # the state at each height; the head's is the current state
    states: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    account_error: Exception | None = None

    @property
    def state(self) -> dict[bytes, bytes]:
        return self.states[0 if self.head is None else int(self.head.height)]

    def get_block(self, height: int) -> Block | None:
        return self.blocks.get(height)

    def get_block_by_hash(self, block_hash: bytes) -> Block | None:
        return next((b for b in self.blocks.values() if b.hash() == block_hash), None)

    def get_commit(self, height: int) -> Commit | None:
        nxt = self.blocks.get(height + 1)
        return None if nxt is None else nxt.last_commit

    def get_transaction(self, tx_id: bytes) -> TxLocation | None:
        return self.txs.get(tx_id)

    def get_account(self, address: Address) -> Account:
        if self.account_error is not None:
            raise self.account_error
        raw = self.state.get(account_key(address))
        return EMPTY_ACCOUNT if raw is None else Account.decode(raw)

    def get_state(self, key: bytes) -> bytes | None:
        return self.state.get(key)

    def iter_state(
        self, prefix: bytes, *, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        for k in sorted(self.state):
            if k.startswith(prefix) and (after is None or k > after):
                yield k, self.state[k]

    def get_proof(self, key: bytes, height: int | None = None) -> StateProof:
        head = 0 if self.head is None else int(self.head.height)
        h = head if height is None else height
        if h > head:
            raise NotFound(f"height {h} is above the head {head}")
        if h < head - HISTORY or h not in self.states:
            raise HistoryPruned(f"state at height {h} is pruned (history {HISTORY})")
        value = self.states[h].get(key)
        return StateProof(key, value, Height(h), _h("root", h), b"\x93proof" + key)


def build_chain(n_blocks: int = 5) -> tuple[FakeReadView, list[bytes]]:
    """Blocks 1..n; block k holds one transfer ALICE -> BOB with nonce k-1. Returns the raw txs."""
    view = FakeReadView()
    alice, bob = Account(Nonce(0), Amount(100 * NSD)), EMPTY_ACCOUNT
    view.states[0] = {account_key(ALICE.address): alice.encode()}
    parent = Hash32(bytes(32))
    commit: Commit | None = None
    raws = []
    for height in range(1, n_blocks + 1):
        raw = transfer(ALICE, height - 1, BOB.address, NSD // 2)
        raws.append(raw)
        header = Header(
            chain_id=ChainId(CHAIN_ID),
            height=Height(height),
            round=Round(0),
            parent_hash=parent,
            time=TimestampMs(CHAIN.genesis_time + 1000 * height),
            proposer=VALIDATOR.address,
            tx_root=_h("tx", height),
            receipts_root=_h("rc", height),
            state_root=_h("root", height),
            validators_hash=_h("vals", 0),
            next_validators_hash=_h("vals", 0),
            last_commit_hash=_h("lc", height),
            evidence_root=_h("ev", height),
        )
        block = Block(header, (raw,), (), commit)
        view.blocks[height] = block
        tx_id = crypto.sha256(raw)
        receipt = Receipt(
            tx_id=tx_id,
            status=ReceiptStatus.SUCCESS,
            fee_paid=Amount(10**15),
            burned=Amount(2000),
            events=(Event("transfer", (Attribute("to", BOB.address),)),),
        )
        view.txs[tx_id] = TxLocation(tx_id, Height(height), 0, block.hash(), raw, receipt)
        alice = Account(Nonce(alice.nonce + 1), Amount(alice.balance - NSD // 2 - 10**15))
        bob = Account(bob.nonce, Amount(bob.balance + NSD // 2))
        view.states[height] = {
            account_key(ALICE.address): alice.encode(),
            account_key(BOB.address): bob.encode(),
        }
        vote = Vote(
            VoteType.PRECOMMIT,
            Height(height),
            Round(0),
            block.hash(),
            TimestampMs(header.time + 1),
            VALIDATOR.address,
        )
        sig = VALIDATOR.sign(crypto.TAG_VOTE, CHAIN_ID, vote.encode())
        commit = Commit(Height(height), Round(0), block.hash(), (SignedVote(vote, sig),))
        parent = block.hash()
        view.head = header
    return view, raws


class FakeNode:
    """Implements ``node.api.NodeAPI``: admits transfers with basic checks, records them."""

    def __init__(self, view: FakeReadView | None = None) -> None:
        self.view = view if view is not None else build_chain()[0]
        self.submitted: list[bytes] = []
        self.submit_error: Exception | None = None
        self.gate: trio.Event | None = None
        self.entered = 0
        self.cancelled = 0

    def read_view(self) -> FakeReadView:
        return self.view

    async def submit_transaction(self, raw: bytes) -> Hash32:
        self.entered += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if self.submit_error is not None:
            raise self.submit_error
        vtx = verify_transaction(raw, self.view.params.max_tx_bytes)
        if vtx.tx.chain_id != CHAIN_ID:
            raise WrongChain(f"transaction for chain {vtx.tx.chain_id}, this is {CHAIN_ID}")
        expected = self.view.get_account(vtx.sender).nonce
        if vtx.tx.nonce < expected:
            raise NonceTooLow(f"nonce {vtx.tx.nonce} is below the next nonce {expected}")
        if raw in self.submitted:
            raise AlreadyKnown(f"transaction {vtx.tx_id.hex()} is already in the mempool")
        self.submitted.append(raw)
        return vtx.tx_id

    async def status(self) -> NodeStatus:
        await trio.lowlevel.checkpoint()
        head = self.view.head
        assert head is not None
        return NodeStatus(
            chain_id=CHAIN_ID,
            node_version="0.1.0-test",
            head_height=int(head.height),
            head_hash=head.hash(),
            head_time_ms=int(head.time),
            validator_address=VALIDATOR.address,
            is_validator=True,
            mempool_size=len(self.submitted),
            mempool_bytes=sum(map(len, self.submitted)),
            peers=3,
            syncing=False,
            finalized_height=int(head.height),
            consensus_height=int(head.height) + 1,
            round=2,
            validators=((VALIDATOR.address, 1),),
        )

    async def pending_nonce(self, address: Address) -> int:
        await trio.lowlevel.checkpoint()
        nonces = [
            v.tx.nonce for v in map(verify_transaction, self.submitted) if v.sender == address
        ]
        return max([self.view.get_account(address).nonce, *(n + 1 for n in nonces)])

    def mine(self, raw: bytes) -> None:
        """Record ``raw`` as included (at the head) so a receipt exists for it."""
        head = self.view.head
        assert head is not None
        tx_id = crypto.sha256(raw)
        receipt = Receipt(tx_id, ReceiptStatus.SUCCESS, Amount(10**15), Amount(2000), ())
        self.view.txs[tx_id] = TxLocation(tx_id, head.height, 1, head.hash(), raw, receipt)
