"""Height-indexed queues (DESIGN §4 "Bounded protocol work") and the supply invariant with bonds,
exits, votes and slashing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.consensus.state import QUEUE_UNBONDING, DictView, HeightQueue, Overlay
from node.consensus.txs import VoteAction
from tests.consensus.authority_chain import (
    CANDIDATE,
    EVIDENCE_MAX_AGE,
    MIN_BOND,
    AuthorityChain,
    genesis4,
    merged,
)
from tests.helpers import bond_tx, make_evidence, transfer, unbond_tx, validator_vote_tx

PREFIX = b"\x7f\x01"


def run_block(
    state: dict[bytes, bytes],
    queue: HeightQueue,
    now: int,
    pushes: list[tuple[int, bytes]],
    cap: int,
) -> list[tuple[int, bytes]]:
    """One block at height ``now``: pushes during the block, then the end-of-block pop."""
    overlay = Overlay(DictView(state))
    for height, entry in pushes:
        queue.push(overlay, height, entry)
    out = queue.pop_due(overlay, now, cap)
    assert all(k.startswith(PREFIX) for k in overlay.changes)
    new = merged(state, overlay.changes)
    state.clear()
    state.update(new)
    return out


def test_entries_come_out_at_their_height_in_push_order() -> None:
    q = HeightQueue(PREFIX)
    state: dict[bytes, bytes] = {}
    assert run_block(state, q, 1, [(3, b"a"), (5, b"c"), (3, b"b")], 10) == []
    assert run_block(state, q, 2, [], 10) == []
    assert run_block(state, q, 3, [], 10) == [(3, b"a"), (3, b"b")]
    assert q.pending(DictView(state)) == 1
    assert run_block(state, q, 4, [], 10) == []
    assert run_block(state, q, 5, [(9, b"d")], 10) == [(5, b"c")]
    assert run_block(state, q, 9, [], 10) == [(9, b"d")]
    assert q.pending(DictView(state)) == 0
    assert set(state) == {PREFIX + b"\x00"}  # only the cursor is left


def test_an_empty_queue_reads_one_key_and_writes_nothing() -> None:
    q = HeightQueue(PREFIX)
    overlay = Overlay(DictView({}))
    assert q.pop_due(overlay, 100, 5) == []
    assert dict(overlay.changes) == {}


def test_work_per_block_is_capped_and_the_rest_follows() -> None:
    q = HeightQueue(PREFIX)
    state: dict[bytes, bytes] = {}
    run_block(state, q, 1, [(2, bytes([i])) for i in range(5)], 2)
    assert [e for _, e in run_block(state, q, 2, [], 2)] == [b"\x00", b"\x01"]
    assert [e for _, e in run_block(state, q, 3, [], 2)] == [b"\x02", b"\x03"]
    assert [e for _, e in run_block(state, q, 4, [], 2)] == [b"\x04"]
    # Empty heights count as work too: a far entry is reached a few heights per block.
    run_block(state, q, 5, [(6, b"x"), (20, b"y")], 2)
    assert run_block(state, q, 6, [], 2) == [(6, b"x")]
    got = []
    for now in range(7, 30):
        got += run_block(state, q, now, [], 2)
    assert got == [(20, b"y")]


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.lists(
        st.lists(st.tuples(st.integers(1, 8), st.binary(min_size=1, max_size=3)), max_size=5),
        min_size=1,
        max_size=12,
    ),
    cap=st.integers(1, 6),
)
def test_queue_never_early_never_lost_in_order(
    blocks: list[list[tuple[int, bytes]]], cap: int
) -> None:
    q = HeightQueue(PREFIX)
    state: dict[bytes, bytes] = {}
    pushed: list[tuple[int, int, bytes]] = []
    popped: list[tuple[int, bytes]] = []
    seq = 0
    for now, ops in enumerate([*blocks, *([[]] * 200)], start=1):
        pushes = []
        for delta, entry in ops:
            pushes.append((now + delta, entry))
            pushed.append((now + delta, seq, entry))
            seq += 1
        out = run_block(state, q, now, pushes, cap)
        assert len(out) <= cap
        assert all(h <= now for h, _ in out)
        popped += out
    assert popped == [(h, e) for h, _, e in sorted(pushed)]
    assert set(state) <= {PREFIX + b"\x00"}


def test_the_unbonding_queue_is_empty_at_genesis() -> None:
    c = AuthorityChain(genesis4())
    assert not any(k.startswith(QUEUE_UNBONDING) for k in c.state)


# === the supply invariant ==========================================================================

STAKERS = (0, 5, 6, 7, 1, 2, CANDIDATE)
_op = st.one_of(
    st.tuples(
        st.just("transfer"),
        st.sampled_from(STAKERS),
        st.sampled_from((1, 2, 3)),
        st.integers(0, 10**6),
    ),
    st.tuples(st.just("bond"), st.sampled_from(STAKERS), st.integers(MIN_BOND - 1, 2 * MIN_BOND)),
    st.tuples(st.just("unbond"), st.sampled_from(STAKERS)),
    st.tuples(
        st.just("vote"),
        st.sampled_from(STAKERS),
        st.sampled_from(STAKERS),
        st.sampled_from((VoteAction.ADD, VoteAction.REMOVE)),
    ),
    st.tuples(st.just("evidence"), st.sampled_from(STAKERS), st.integers(0, EVIDENCE_MAX_AGE)),
)


@settings(max_examples=30, deadline=None)
@given(blocks=st.lists(st.lists(_op, max_size=6), min_size=1, max_size=10))
def test_supply_invariant_with_bonds_exits_votes_and_slashing(blocks: list[list[tuple]]) -> None:  # type: ignore[type-arg]
    """balances + bonds + burned == issued after every block, whatever was rejected; the set
    never empties; a block's output always re-applies (AuthorityChain.step checks it)."""
    c = AuthorityChain(genesis4(funded=3))
    for ops in [*blocks, [], [], [], [], [], [], [], []]:
        nonces: dict[int, int] = {}
        txs: list[bytes] = []
        evidence = []

        def next_nonce(who: int, nonces: dict[int, int] = nonces) -> int:
            n = nonces.get(who, c.nonce(who))
            nonces[who] = n + 1
            return n

        for op in ops:
            kind = op[0]
            if kind == "transfer":
                txs.append(transfer(op[1], op[2], op[3], nonce=next_nonce(op[1])))
            elif kind == "bond":
                txs.append(bond_tx(op[1], op[2], nonce=next_nonce(op[1])))
            elif kind == "unbond":
                txs.append(unbond_tx(op[1], nonce=next_nonce(op[1])))
            elif kind == "vote":
                txs.append(validator_vote_tx(op[1], op[2], op[3], nonce=next_nonce(op[1])))
            else:
                height = max(1, c.height - op[2])
                evidence.append(make_evidence(op[1], height))
        c.step(txs, evidence=evidence, strict=False)
        c.check_supply()
        assert len(c.next_set()) >= 1
