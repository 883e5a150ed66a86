"""The chain service (DESIGN §1, §5, §7): genesis, build/validate/commit, restart, read views,
state proofs with history pruning, and crash atomicity — over MemoryKV and LevelDB."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from node import crypto, lightclient
from node.chain import ChainService
from node.consensus.blocks import Block, Commit
from node.consensus.state import SUPPLY_KEY, Account, Supply, account_key
from node.errors import (
    ConfigError,
    HistoryPruned,
    InvalidBlock,
    InvalidCommit,
    NotFound,
    StorageError,
)
from node.genesis import Genesis, build_genesis_state
from node.storage import LevelDB, MemoryKV
from node.storage.api import KVStore
from node.storage.smt import StateTree, compute_root
from node.types import ZERO_HASH, Amount, Nonce
from tests.helpers import (
    CHAIN_ID,
    DEFAULT_BALANCE,
    DEFAULT_FEE,
    GENESIS_TIME,
    addr,
    commit_next,
    make_commit,
    make_genesis,
    open_chain,
    vtransfer,
)

GEN = make_genesis(funded=4, validators=(0,))


class Store:
    """One database over MemoryKV or LevelDB that can be closed and opened again."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self.kv: KVStore = MemoryKV() if kind == "memory" else LevelDB(path)
        self.chains: list[ChainService] = []

    def chain(self, genesis: Genesis = GEN) -> ChainService:
        chain = ChainService(self.kv, genesis)
        self.chains.append(chain)
        chain.open()
        return chain

    def reopen(self) -> None:
        """Close every chain service over the store and open the store again (a restart)."""
        self.close_chains()
        if isinstance(self.kv, MemoryKV):
            self.kv = self.kv.crash_copy()
        else:
            self.kv.close()
            self.kv = LevelDB(self.path)

    def close_chains(self) -> None:
        while self.chains:
            self.chains.pop().close()

    def close(self) -> None:
        self.close_chains()
        self.kv.close()


@pytest.fixture(params=["memory", "leveldb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store(request.param, tmp_path / "chaindb")
    try:
        yield s
    finally:
        s.close()


def balance(chain: ChainService, i: int) -> int:
    return chain.read_view().get_account(addr(i)).balance


# --- opening -------------------------------------------------------------------------------------


def test_open_initialises_from_genesis(store: Store) -> None:
    chain = store.chain()
    assert chain.head is None and chain.head_height == 0
    assert chain.params == GEN.votable_params
    assert chain.validator_set() == GEN.validator_set()
    view = chain.read_view()
    assert view.head is None and view.head_height == 0
    assert view.get_account(addr(1)) == Account(Nonce(0), Amount(DEFAULT_BALANCE))
    assert view.get_account(addr(50)) == Account(Nonce(0), Amount(0))
    assert Supply.decode(view.get_state(SUPPLY_KEY) or b"") == Supply(GEN.total_supply, Amount(0))
    assert view.get_block(1) is None and view.get_commit(1) is None
    # The tree at height 0 is the genesis state's root.
    genesis_root = compute_root(build_genesis_state(GEN))
    assert chain.tree.root_at(0) == genesis_root
    proof = view.get_proof(account_key(addr(1)))
    assert (proof.height, proof.state_root) == (0, genesis_root)
    lightclient.verify_proof(genesis_root, proof.key, proof.value, proof.proof)


def test_open_twice_is_idempotent(store: Store) -> None:
    store.chain()
    store.reopen()
    chain = store.chain()
    assert chain.head is None
    assert balance(chain, 2) == DEFAULT_BALANCE


def test_build_and_commit_blocks(store: Store) -> None:
    chain = store.chain()
    tx1 = vtransfer(1, 2, 100, nonce=0)
    b1, r1 = commit_next(chain, [0], [tx1])
    assert chain.head == b1.header and chain.head_height == 1
    assert b1.header.time == GENESIS_TIME and b1.last_commit is None
    assert [r.tx_id for r in r1.receipts] == [tx1.tx_id]

    tx2 = vtransfer(2, 60, 7, nonce=0)
    b2, _ = commit_next(chain, [0], [tx2])
    b3, r3 = commit_next(chain)  # an empty block
    assert chain.head_height == 3 and r3.receipts == ()
    assert b2.header.parent_hash == b1.hash() and b3.header.parent_hash == b2.hash()
    # Each block's last commit is the seen commit stored with its parent; BFT time follows it.
    assert b2.last_commit == chain.store.get_commit(1)
    assert b3.header.time == b2.header.time + 1_000
    assert chain.tree.root_at(3) == b3.header.state_root
    assert balance(chain, 2) == DEFAULT_BALANCE + 100 - 7 - DEFAULT_FEE
    assert balance(chain, 60) == 7
    # The proposer (dev key 0, the only validator) got the tips.
    assert balance(chain, 0) == sum(
        r.fee_paid - r.burned for h in (1, 2) for r in chain.store.get_receipts(h) or ()
    )


def test_reopen_keeps_the_head_and_continues(store: Store) -> None:
    chain = store.chain()
    for n in range(3):
        commit_next(chain, [0], [vtransfer(1, 2, 1, nonce=n)])
    head = chain.head
    store.reopen()
    again = store.chain()
    assert again.head == head and again.head_height == 3
    assert again.read_view().get_account(addr(1)).nonce == 3
    block, _ = commit_next(again, [0], [vtransfer(1, 2, 1, nonce=3)])
    assert block.header.height == 4 and head is not None
    assert block.header.parent_hash == head.hash()
    assert block.last_commit == again.store.get_commit(3)


def test_a_different_genesis_is_refused(store: Store) -> None:
    chain = store.chain()
    commit_next(chain)
    store.reopen()
    other_balances = make_genesis(funded=4, balance=DEFAULT_BALANCE + 1)
    with pytest.raises(ConfigError, match="initialised from a different genesis file"):
        store.chain(other_balances)
    other_validator = make_genesis(funded=4, validators=(1,))
    with pytest.raises(ConfigError, match="different genesis"):
        store.chain(other_validator)
    other_chain = make_genesis(funded=4, chain_id=CHAIN_ID + 1)
    with pytest.raises(ConfigError, match=f"holds chain {CHAIN_ID}, the genesis file is for chain"):
        store.chain(other_chain)
    # The right genesis still opens it.
    assert store.chain().head_height == 1


# --- read views ----------------------------------------------------------------------------------


def test_read_view_answers_blocks_transactions_and_accounts(store: Store) -> None:
    chain = store.chain()
    txs = [vtransfer(1, 2, 5, nonce=0), vtransfer(3, 4, 6, nonce=0)]
    b1, r1 = commit_next(chain, [0], txs)
    view1 = chain.read_view()
    b2, _ = commit_next(chain, [0], [vtransfer(1, 2, 5, nonce=1)])
    view = chain.read_view()
    assert view.head == b2.header and view.head_height == 2
    assert view.get_block(1) == b1 and view.get_block(2) == b2
    assert view.get_block_by_hash(b1.hash()) == b1
    assert view.get_block_by_hash(crypto.sha256(b"unknown")) is None
    assert view.get_block(3) is None and view.get_block(0) is None
    commit1 = view.get_commit(1)
    assert isinstance(commit1, Commit) and commit1.block_hash == b1.hash()
    loc = view.get_transaction(txs[1].tx_id)
    assert loc is not None
    assert (loc.height, loc.index, loc.block_hash, loc.raw) == (1, 1, b1.hash(), txs[1].raw)
    assert loc.receipt == r1.receipts[1]
    assert view.get_transaction(crypto.sha256(b"unknown")) is None
    assert view.get_account(addr(1)) == Account(
        Nonce(2), Amount(DEFAULT_BALANCE - 10 - 2 * DEFAULT_FEE)
    )
    # An earlier view is a snapshot: it never sees later blocks.
    assert view1.head_height == 1 and view1.get_block(2) is None
    assert view1.get_block_by_hash(b2.hash()) is None
    assert view1.get_account(addr(1)).nonce == 1


def test_get_proof_verifies_with_the_light_client(store: Store) -> None:
    chain = store.chain()
    roots = {0: chain.tree.root_at(0)}
    for n in range(3):
        block, _ = commit_next(chain, [0], [vtransfer(1, 2, 1_000, nonce=n)])
        roots[block.header.height] = block.header.state_root
    view = chain.read_view()
    present = account_key(addr(1))
    missing = account_key(addr(99))
    for height in (None, 3, 2, 1, 0):
        h = 3 if height is None else height
        proof = view.get_proof(present, height)
        assert proof.height == h and proof.state_root == roots[h]
        assert (
            proof.value
            == Account(Nonce(h), Amount(DEFAULT_BALANCE - h * (1_000 + DEFAULT_FEE))).encode()
        )
        lightclient.verify_inclusion(roots[h], present, proof.value, proof.proof)
        absent = view.get_proof(missing, height)
        assert absent.value is None
        lightclient.verify_non_inclusion(roots[h], missing, absent.proof)
        # A proof never shows another value or the key's absence.
        with pytest.raises(lightclient.ProofError):
            lightclient.verify_inclusion(roots[h], present, b"forged", proof.proof)
        with pytest.raises(lightclient.ProofError):
            lightclient.verify_non_inclusion(roots[h], present, proof.proof)
    # A value proved at an earlier height does not verify against the head's root.
    old = view.get_proof(present, 1)
    with pytest.raises(lightclient.ProofError):
        lightclient.verify_inclusion(roots[3], present, old.value or b"", old.proof)
    with pytest.raises(NotFound, match="height 4 is above the head 3"):
        view.get_proof(present, 4)


def test_old_proofs_are_pruned_beyond_state_history_blocks(store: Store) -> None:
    genesis = make_genesis(funded=4, state_history_blocks=4)
    chain = store.chain(genesis)
    key = account_key(addr(1))
    early_view = None
    for n in range(20):
        commit_next(chain, [0], [vtransfer(1, 2, 1, nonce=n)])
        if chain.head_height == 10:
            early_view = chain.read_view()
    assert early_view is not None
    view = chain.read_view()
    assert view.head_height == 20
    # The last four heights are served and verify.
    for h in (17, 18, 19, 20):
        proof = view.get_proof(key, h)
        assert (
            proof.value
            == Account(Nonce(h), Amount(DEFAULT_BALANCE - h * (1 + DEFAULT_FEE))).encode()
        )
        header = view.get_block(h)
        assert header is not None and proof.state_root == header.header.state_root
        lightclient.verify_inclusion(proof.state_root, key, proof.value, proof.proof)
    # Older ones are refused, whether or not their nodes are physically gone yet.
    for h in (16, 13, 5, 0):
        with pytest.raises(
            HistoryPruned, match=f"height {h} is no longer kept.*oldest served is 17"
        ):
            view.get_proof(key, h)
    assert StateTree(store.kv, b"T").pruned_before() > 0  # the commit at height 16 pruned
    # A view taken before the pruning still serves its own window from its snapshot.
    for h in (7, 10):
        proof = early_view.get_proof(key, h)
        lightclient.verify_inclusion(proof.state_root, key, proof.value or b"", proof.proof)
    with pytest.raises(HistoryPruned):
        early_view.get_proof(key, 6)
    # After a restart the window is the same.
    store.reopen()
    reopened = store.chain(genesis).read_view()
    lightclient.verify_inclusion(
        reopened.get_proof(key, 17).state_root,
        key,
        reopened.get_proof(key, 17).value or b"",
        reopened.get_proof(key, 17).proof,
    )
    with pytest.raises(HistoryPruned):
        reopened.get_proof(key, 16)


# --- validation ----------------------------------------------------------------------------------


def _tampered(block: Block) -> list[tuple[str, Block]]:
    h = block.header
    other_txs = (*block.txs, vtransfer(3, 4, 1, nonce=0).raw)
    return [
        (
            "state root",
            Block(replace(h, state_root=crypto.sha256(b"x")), block.txs, (), block.last_commit),
        ),
        (
            "receipts root",
            Block(replace(h, receipts_root=crypto.sha256(b"x")), block.txs, (), block.last_commit),
        ),
        ("tx root", Block(h, other_txs, (), block.last_commit)),
        ("block time", Block(replace(h, time=h.time + 1), block.txs, (), block.last_commit)),
        (
            "wrong parent hash",
            Block(replace(h, parent_hash=ZERO_HASH), block.txs, (), block.last_commit),
        ),
        ("wrong proposer", Block(replace(h, proposer=addr(3)), block.txs, (), block.last_commit)),
    ]


def test_validate_accepts_another_nodes_block_and_rejects_tampered_ones(tmp_path: Path) -> None:
    proposer = open_chain(MemoryKV(), GEN)
    follower = open_chain(LevelDB(tmp_path / "follower"), GEN)
    try:
        commit_next(proposer, [0], [vtransfer(1, 2, 5, nonce=0)])
        follower.commit(proposer.read_view().get_block(1), proposer.store.get_commit(1))  # type: ignore[arg-type]
        built = proposer.build(
            0, addr(0), proposer.store.get_commit(1), [vtransfer(1, 2, 5, nonce=1)]
        )
        block = built.block
        for what, bad in _tampered(block):
            with pytest.raises(InvalidBlock, match=what):
                follower.validate(bad)
        assert follower.head_height == 1  # validation is speculative: nothing was written
        result = follower.validate(block)
        assert result == built.result
        commit = make_commit(block.hash(), 2, 0, [0], time_ms=block.header.time + 1_000)
        follower.commit(block, commit)
        proposer.commit(block, commit)
        assert follower.head == proposer.head
        assert follower.tree.root_at(2) == proposer.tree.root_at(2) == block.header.state_root
        # A block for a height that is already committed is no longer valid.
        with pytest.raises(InvalidBlock, match="block height 2, expected 3"):
            follower.validate(block)
    finally:
        follower.close()
        follower.kv.close()
        proposer.close()


def test_commit_validates_an_unknown_block_first(store: Store) -> None:
    builder = open_chain(MemoryKV(), GEN)
    built = builder.build(0, addr(0), None, [vtransfer(1, 2, 5, nonce=0)])
    chain = store.chain()
    block = built.block
    bad = Block(replace(block.header, state_root=crypto.sha256(b"x")), block.txs, (), None)
    with pytest.raises(InvalidBlock, match="state root"):
        chain.commit(bad, make_commit(bad.hash(), 1, 0, [0], time_ms=GENESIS_TIME + 1))
    assert chain.head_height == 0 and chain.store.get_block(1) is None
    chain.commit(block, make_commit(block.hash(), 1, 0, [0], time_ms=GENESIS_TIME + 1))
    assert chain.head == block.header
    builder.close()


def test_commit_refuses_a_commit_for_another_block(store: Store) -> None:
    chain = store.chain()
    block = chain.build(0, addr(0), None, []).block
    other = make_commit(crypto.sha256(b"other"), 1, 0, [0], time_ms=GENESIS_TIME + 1)
    with pytest.raises(InvalidCommit):
        chain.commit(block, other)
    assert chain.head_height == 0


@pytest.mark.parametrize("signers", [(), (5,)])
def test_commit_refuses_a_commit_without_the_validators_quorum(signers: tuple[int, ...]) -> None:
    """The stored seen commit is what the next block carries: it must finalize the block."""
    chain = open_chain(MemoryKV(), GEN)
    block = chain.build(0, addr(0), None, []).block
    forged = make_commit(block.hash(), 1, 0, signers, time_ms=GENESIS_TIME + 1)
    try:
        with pytest.raises(InvalidCommit):
            chain.commit(block, forged)
        early = make_commit(block.hash(), 1, 0, [0], time_ms=GENESIS_TIME)
        with pytest.raises(InvalidCommit, match="not after the block's time"):
            chain.commit(block, early)
        assert chain.head_height == 0 and chain.store.get_commit(1) is None
        chain.commit(block, make_commit(block.hash(), 1, 0, [0], time_ms=GENESIS_TIME + 1))
        assert chain.head_height == 1
    finally:
        chain.close()


# --- crashes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("after_ops", [0, 3, 10, 10_000])
def test_a_crash_inside_the_block_write_leaves_the_previous_head(after_ops: int) -> None:
    kv = MemoryKV()
    chain = open_chain(kv, GEN)
    commit_next(chain, [0], [vtransfer(1, 2, 5, nonce=0)])
    b2, _ = commit_next(chain, [0], [vtransfer(1, 2, 5, nonce=1)])
    tx3 = vtransfer(1, 2, 5, nonce=2)
    built = chain.build(0, addr(0), chain.store.get_commit(2), [tx3])
    commit3 = make_commit(built.block.hash(), 3, 0, [0], time_ms=built.block.header.time + 1_000)
    kv.fail_next_commit(after_ops)
    with pytest.raises(StorageError, match="injected write failure"):
        chain.commit(built.block, commit3)
    assert chain.head == b2.header  # the service did not move on

    # What a restarted process finds: exactly the state after block 2.
    restarted = open_chain(kv.crash_copy(), GEN)
    assert restarted.head == b2.header
    view = restarted.read_view()
    assert view.get_block(3) is None and view.get_transaction(tx3.tx_id) is None
    assert view.get_account(addr(1)).nonce == 2
    assert restarted.tree.latest_height() == 2
    # It continues: block 3 again (same transaction) and block 4.
    b3, _ = commit_next(restarted, [0], [tx3])
    b4, _ = commit_next(restarted, [0], [vtransfer(1, 2, 5, nonce=3)])
    assert b4.header.height == 4 and b3.header.parent_hash == b2.hash()
    assert restarted.read_view().get_account(addr(1)).nonce == 4
    # And survives another restart.
    again = open_chain(restarted.kv.crash_copy(), GEN)
    assert again.head == b4.header

    # The original service can also retry the failed write.
    chain.commit(built.block, commit3)
    assert chain.head == built.block.header
    for c in (chain, restarted, again):
        c.close()


def test_a_crash_before_the_first_block_keeps_the_genesis() -> None:
    kv = MemoryKV()
    chain = open_chain(kv, GEN)
    block = chain.build(0, addr(0), None, [vtransfer(1, 2, 5, nonce=0)]).block
    kv.fail_next_commit(2)
    with pytest.raises(StorageError):
        chain.commit(block, make_commit(block.hash(), 1, 0, [0], time_ms=GENESIS_TIME + 1))
    restarted = open_chain(kv.crash_copy(), GEN)
    assert restarted.head is None
    assert restarted.read_view().get_account(addr(1)).balance == DEFAULT_BALANCE
    commit_next(restarted, [0], [vtransfer(1, 2, 5, nonce=0)])
    assert restarted.head_height == 1
    chain.close()
    restarted.close()


def test_a_failed_genesis_write_leaves_an_empty_database() -> None:
    kv = MemoryKV()
    kv.fail_next_commit(1)
    with pytest.raises(StorageError):
        open_chain(kv, GEN)
    chain = open_chain(kv.crash_copy(), GEN)
    assert chain.head is None and balance(chain, 1) == DEFAULT_BALANCE
    chain.close()


@pytest.mark.parametrize("history", [1, 2, 5, 16, 17])
def test_every_height_in_the_history_window_verifies(history: int) -> None:
    """At every head, each height in [head - history + 1, head] proves (pruning runs every 16
    heights) and the height just below the window is refused."""
    genesis = make_genesis(funded=4, state_history_blocks=history)
    chain = open_chain(MemoryKV(), genesis)
    key = account_key(addr(1))
    for n in range(40):
        commit_next(chain, [0], [vtransfer(1, 2, 1, nonce=n)])
        view = chain.read_view()
        head = view.head_height
        oldest = max(0, head - history + 1)
        for h in range(oldest, head + 1):
            proof = view.get_proof(key, h)
            expected = Account(Nonce(h), Amount(DEFAULT_BALANCE - h * (1 + DEFAULT_FEE)))
            assert proof.value == expected.encode(), (head, h)
            lightclient.verify_inclusion(proof.state_root, key, proof.value, proof.proof)
            absent = view.get_proof(account_key(addr(99)), h)
            lightclient.verify_non_inclusion(absent.state_root, account_key(addr(99)), absent.proof)
        if oldest > 0:
            with pytest.raises(HistoryPruned):
                view.get_proof(key, oldest - 1)
    chain.close()


def test_admission_runs_a_kinds_state_rules_on_the_head_state() -> None:
    """``check_admission`` raises what the next block would (with its code) and leaves a later
    nonce to block building."""
    from node.economy.api import Role
    from node.economy.roles import RoleAlreadyHeld, RoleRegister
    from node.economy.tasks import TaskCancel, UnknownTask
    from node.storage import MemoryKV
    from tests.economy.econ import FEE, SUPPLIER, economy_genesis
    from tests.helpers import commit_next, open_chain, signed_tx, verified

    chain = open_chain(MemoryKV(), economy_genesis())
    commit_next(chain)
    root = chain.head.state_root if chain.head is not None else None
    register = verified(
        signed_tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER), b""), nonce=0, fee=FEE)
    )
    chain.check_admission(register)  # valid: no error
    # A rule of the kind's own, checked against state: cancelling a task nobody submitted.
    cancel = verified(signed_tx(SUPPLIER, TaskCancel(b"\x07" * 32), nonce=0, fee=FEE))
    with pytest.raises(UnknownTask):
        chain.check_admission(cancel)
    # A later nonce is not judged against the head state.
    later = verified(signed_tx(SUPPLIER, TaskCancel(b"\x07" * 32), nonce=1, fee=FEE))
    chain.check_admission(later)
    commit_next(chain, candidates=[register])
    assert chain.head is not None and chain.head.state_root != root
    again = verified(
        signed_tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER), b""), nonce=1, fee=FEE)
    )
    with pytest.raises(RoleAlreadyHeld):
        chain.check_admission(again)
