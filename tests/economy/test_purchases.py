"""Purchases with fair-exchange key delivery (node/economy/purchases.py, DESIGN §8): escrow, key
posted, dispute window, payment; refund when no key comes; disputes that refund the buyer and
slash the owner, or are rejected; pro-rata shares of composites; the per-block cap of the
purchase queue; every rejection with its specific error."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.consensus.state import Overlay, Supply
from node.consensus.transition import apply_transaction
from node.consensus.txs import MAX_BODY_BYTES, verify_transaction
from node.economy.api import Role
from node.economy.composite import (
    CompositeDefine,
    CompositePartSpec,
    CompositeUnderpriced,
    composite_id,
)
from node.economy.datasets import CompositeEntry, DatasetRecord, UnknownDataset, dataset_id
from node.economy.purchases import (
    PURCHASE_QUEUE,
    DisputeBadPrivateKey,
    DisputeChunk,
    DisputeNotOpen,
    DisputeProofMismatch,
    DisputeRejected,
    InvalidPurchaseBody,
    KeyDispute,
    KeyPost,
    KeyPostNotOpen,
    NotShareOwner,
    NotTheBuyer,
    PriceAboveMax,
    Purchase,
    PurchaseNotNeeded,
    ShareState,
    SupplierInactive,
    UnknownPurchase,
    UnknownShare,
    compute_shares,
    get_purchase,
    key_wrap_context,
    purchase_grants,
    purchase_id,
    verify_leaf_path,
)
from node.economy.roles import (
    MissingRole,
    RoleHasObligations,
    RoleResign,
)
from node.storage import encryption
from node.storage.unixfs import UnixfsBuilder, raw_cid
from node.types import Address, Amount, Hash32
from tests.economy.econ import (
    BUYER,
    BUYER2,
    BUYER_PRIV,
    BUYER_PUB,
    DISPUTE_WINDOW,
    DISTRIBUTOR,
    KEY_POST_HEIGHTS,
    PRICE,
    SLASH,
    SUPPLIER,
    SUPPLIER2,
    SUPPLIER_BOND,
    Market,
    addr,
    build_artifact,
    fixed_rng,
    header_json,
    leaf_with_path,
    priced_dataset,
    register_body,
    tx,
)

# --- the happy path and the deadline ---------------------------------------------------------------


def test_escrow_key_posted_window_paid() -> None:
    m = Market()
    buyer0, owner0 = m.c.balance(BUYER), m.c.balance(SUPPLIER)
    h = m.c.height
    pid = m.buy(BUYER, m.p.id)
    assert m.c.balance(BUYER) == buyer0 - PRICE - 10**8
    assert m.share(pid) == (ShareState.AWAITING_KEY, PRICE)
    record = get_purchase(m.c.view(), pid)
    assert record is not None and record.shares[0].deadline == h + KEY_POST_HEIGHTS
    assert m.obligations(SUPPLIER) == 1
    assert purchase_grants(m.c.view(), pid, addr(BUYER), m.p.root)
    assert not purchase_grants(m.c.view(), pid, addr(BUYER2), m.p.root)
    assert not purchase_grants(m.c.view(), pid, addr(BUYER), m.a.root)
    # The owner resigns? Not with a purchase open.
    m.c.reject(m.c.tx(SUPPLIER, RoleResign(int(Role.DATA_SUPPLIER))), RoleHasObligations)
    m.post(pid, m.p)
    posted = m.c.height - 1
    assert m.share(pid)[0] == ShareState.KEY_POSTED
    # The buyer opens the key and decrypts the data.
    record = get_purchase(m.c.view(), pid)
    assert record is not None
    key = encryption.unwrap_key(
        record.shares[0].wrapped_key, BUYER_PRIV, key_wrap_context(pid, m.p.id)
    )
    leaf, _ = m.p.leaf(1)
    assert encryption.decrypt_chunk(key, m.p.salt or b"", 0, True, leaf) == m.p.data
    m.c.advance_to(posted + DISPUTE_WINDOW)  # the last height a dispute is taken
    assert m.share(pid)[0] == ShareState.KEY_POSTED
    m.c.step()
    assert m.share(pid)[0] == ShareState.PAID
    assert m.c.balance(SUPPLIER) == owner0 - 10**8 + PRICE  # one fee: the key post
    assert m.obligations(SUPPLIER) == 0
    assert purchase_grants(m.c.view(), pid, addr(BUYER), m.p.root)
    m.c.check_economy_supply()
    m.c.reject(m.c.tx(BUYER, m.dispute(pid, m.p)), DisputeNotOpen)
    m.c.run(m.c.tx(SUPPLIER, RoleResign(int(Role.DATA_SUPPLIER))))


def test_no_key_by_the_deadline_is_refunded() -> None:
    m = Market()
    buyer0 = m.c.balance(BUYER)
    h = m.c.height
    pid = m.buy(BUYER, m.p.id)
    m.c.advance_to(h + KEY_POST_HEIGHTS)
    # still open at the deadline height itself (the refund runs at its end)
    assert m.share(pid)[0] == ShareState.AWAITING_KEY
    m.c.step()
    assert m.share(pid) == (ShareState.REFUNDED, PRICE)
    assert m.c.balance(BUYER) == buyer0 - 10**8
    assert m.obligations(SUPPLIER) == 0
    assert not purchase_grants(m.c.view(), pid, addr(BUYER), m.p.root)
    err = m.c.reject(m.c.tx(SUPPLIER, KeyPost(pid, m.p.id, m.wrapped(pid, m.p))), KeyPostNotOpen)
    assert "refunded" in err.message


def test_a_key_at_the_deadline_height_counts() -> None:
    m = Market()
    h = m.c.height
    pid = m.buy(BUYER, m.p.id)
    m.c.advance_to(h + KEY_POST_HEIGHTS)
    m.post(pid, m.p)
    assert m.share(pid)[0] == ShareState.KEY_POSTED


# --- disputes --------------------------------------------------------------------------------------


def _slashed_and_refunded(m: Market, pid: bytes, buyer0: int, burned0: int) -> None:
    assert m.share(pid) == (ShareState.OWNER_FAULT, PRICE)
    assert m.c.balance(BUYER) == buyer0 - 2 * 10**8  # the price came back; two fees paid
    assert m.bond(SUPPLIER) == SUPPLIER_BOND - SLASH
    assert m.obligations(SUPPLIER) == 0
    assert not purchase_grants(m.c.view(), pid, addr(BUYER), m.p.root)
    burned = m.c.supply().burned - burned0
    assert burned >= SLASH  # the slash, and the dispute's fee cost
    m.c.check_economy_supply()


@pytest.mark.parametrize(
    ("wrapped_of", "verdict"),
    [
        (lambda m, pid: m.wrapped(pid, m.p, key=b"\x55" * 32), "owner_fault_check"),
        (lambda m, pid: bytes([2]) + b"\x11" * 80, "owner_fault_unwrap"),
        # the right key wrapped for another purchase: it does not open here
        (lambda m, pid: m.wrapped(b"\x00" * 32, m.p), "owner_fault_unwrap"),
    ],
)
def test_a_bad_key_is_refunded_and_slashed(wrapped_of, verdict: str) -> None:  # type: ignore[no-untyped-def]
    m = Market()
    buyer0 = m.c.balance(BUYER)
    pid = m.buy(BUYER, m.p.id)
    m.post(pid, m.p, wrapped_of(m, pid))
    burned0 = m.c.supply().burned
    built = m.c.run(m.c.tx(BUYER, m.dispute(pid, m.p)))
    events = {e.name: {a.key: a.value for a in e.attributes} for e in built.result.receipts[0].events}
    assert events["key_dispute"]["verdict"] == verdict.encode()
    assert int.from_bytes(events["key_dispute"]["slashed"], "big") == SLASH
    _slashed_and_refunded(m, pid, buyer0, burned0)
    # settled: the queue's later entry for the window changes nothing
    m.c.advance_to(m.c.height + DISPUTE_WINDOW + 1)
    assert m.share(pid)[0] == ShareState.OWNER_FAULT
    m.c.check_economy_supply()
    # a slashed supplier cannot take new purchases until it registers its bond again
    m.c.reject(
        m.c.tx(BUYER2, Purchase(m.p.id, BUYER_PUB, Amount(PRICE))), SupplierInactive
    )


def test_an_honest_key_makes_the_dispute_invalid() -> None:
    m = Market()
    pid = m.buy(BUYER, m.p.id)
    m.post(pid, m.p)
    err = m.c.reject(m.c.tx(BUYER, m.dispute(pid, m.p)), DisputeRejected)
    assert "not at fault" in err.message
    err = m.c.reject(m.c.tx(BUYER, m.dispute(pid, m.p, leaf=1)), DisputeRejected)
    assert "decrypts the leaf" in err.message
    # a private key that is not the purchase's
    other, _ = encryption.generate_wrap_keypair(fixed_rng(8))
    m.c.reject(m.c.tx(BUYER, m.dispute(pid, m.p, priv=other)), DisputeBadPrivateKey)
    # only the buyer disputes
    m.c.reject(m.c.tx(BUYER2, m.dispute(pid, m.p)), NotTheBuyer)
    assert m.share(pid)[0] == ShareState.KEY_POSTED and m.bond(SUPPLIER) == SUPPLIER_BOND


def test_data_encrypted_under_another_key_loses_with_a_leaf() -> None:
    """The key matches the key check, but the stored ciphertext was made with another key: only
    a dispute carrying a leaf (checked against the root) shows it. Data of 1.5 MiB: leaf 1 is a
    full 1 MiB chunk, leaf 2 the short last one."""
    header = header_json({"x": ("U8", (1536, 1024))})
    data = bytes(i % 253 for i in range(1536 * 1024))
    key, salt = b"\x21" * 32, b"\x22" * 7
    p = build_artifact(header, data, key=key, salt=salt, encrypt_with=b"\x23" * 32)
    m = Market(p=p)
    buyer0 = m.c.balance(BUYER)
    pid = m.buy(BUYER, p.id)
    m.post(pid, p)
    m.c.reject(m.c.tx(BUYER, m.dispute(pid, p)), DisputeRejected)
    # the leaf or its position must match the root
    leaf2, path2 = p.leaf(2)
    for chunk in (
        DisputeChunk(1, leaf2, path2),  # leaf 2's bytes named leaf 1
        DisputeChunk(3, leaf2, path2),  # past the last data leaf
        DisputeChunk(2, leaf2[:-1] + bytes([leaf2[-1] ^ 1]), path2),
        DisputeChunk(2, leaf2, (path2[0][:-1] + bytes([path2[0][-1] ^ 1]),)),
    ):
        m.c.reject(m.c.tx(BUYER, KeyDispute(pid, p.id, BUYER_PRIV, chunk)), DisputeProofMismatch)
    # A full 1 MiB leaf does not fit in a transaction body (MAX_BODY_BYTES, ADR 0006).
    assert len(m.dispute(pid, p, leaf=1).encode()) > MAX_BODY_BYTES
    burned0 = m.c.supply().burned
    built = m.c.run(m.c.tx(BUYER, m.dispute(pid, p, leaf=2)))
    events = {e.name: {a.key: a.value for a in e.attributes} for e in built.result.receipts[0].events}
    assert events["key_dispute"]["verdict"] == b"owner_fault_decrypt"
    m.p = p
    _slashed_and_refunded(m, pid, buyer0, burned0)


def test_dispute_and_key_post_windows() -> None:
    m = Market()
    pid = m.buy(BUYER, m.p.id)
    m.c.reject(m.c.tx(BUYER, m.dispute(pid, m.p)), DisputeNotOpen)  # no key yet
    m.c.reject(m.c.tx(SUPPLIER2, KeyPost(pid, m.p.id, m.wrapped(pid, m.p))), NotShareOwner)
    m.post(pid, m.p, m.wrapped(pid, m.p, key=b"\x55" * 32))
    m.c.reject(m.c.tx(SUPPLIER, KeyPost(pid, m.p.id, m.wrapped(pid, m.p))), KeyPostNotOpen)
    posted = m.c.height - 1
    m.c.advance_to(posted + DISPUTE_WINDOW)
    # The window's last height still takes a dispute; one height later does not, whether or not
    # the queue has paid the share yet (the check is by height).
    late = verify_transaction(tx(BUYER, m.dispute(pid, m.p), nonce=m.c.nonce(BUYER)))
    assert not m.c.build([late]).rejected
    ctx = replace(m.c.ctx(), height=posted + DISPUTE_WINDOW + 1)
    with pytest.raises(DisputeNotOpen, match="window ended at height"):
        apply_transaction(Overlay(m.c.view()), late, ctx)
    m.c.step()
    assert m.share(pid)[0] == ShareState.PAID  # an unchallenged bad key is paid
    m.c.reject(m.c.tx(BUYER, m.dispute(pid, m.p)), DisputeNotOpen)
    m.c.reject(m.c.tx(BUYER, KeyDispute(Hash32(b"\x01" * 32), m.p.id, BUYER_PRIV, None)), UnknownPurchase)
    m.c.reject(m.c.tx(BUYER, KeyDispute(pid, m.a.id, BUYER_PRIV, None)), UnknownShare)


# --- what can be bought ------------------------------------------------------------------------------


def test_purchase_rejections() -> None:
    m = Market()
    m.c.reject(m.c.tx(BUYER, Purchase(m.a.id, BUYER_PUB, Amount(10))), PurchaseNotNeeded)
    err = m.c.reject(m.c.tx(BUYER, Purchase(m.p.id, BUYER_PUB, Amount(PRICE - 1))), PriceAboveMax)
    assert f"the price {PRICE} is above max_price {PRICE - 1}" in err.message
    m.c.reject(m.c.tx(BUYER, Purchase(Hash32(b"\x09" * 32), BUYER_PUB, Amount(PRICE))), UnknownDataset)
    err = m.c.reject(m.c.tx(SUPPLIER2, Purchase(m.p.id, BUYER_PUB, Amount(PRICE))), MissingRole)
    assert "CUSTOMER" in err.message
    for pub in (b"\x02" + b"\xff" * 32, BUYER_PUB[:32], b"\x04" + BUYER_PUB[1:]):
        with pytest.raises(InvalidPurchaseBody):
            verify_transaction(tx(BUYER, Purchase(m.p.id, pub, Amount(PRICE)), nonce=0))
    for body in (
        KeyPost(Hash32(b"\x01" * 32), m.p.id, b"\x02" * 80),
        KeyDispute(Hash32(b"\x01" * 32), m.p.id, b"\x02" * 31, None),
        KeyDispute(Hash32(b"\x01" * 32), m.p.id, BUYER_PRIV, DisputeChunk(0, b"x", (b"n",))),
        KeyDispute(Hash32(b"\x01" * 32), m.p.id, BUYER_PRIV, DisputeChunk(1, b"x", ())),
    ):
        with pytest.raises(InvalidPurchaseBody):
            verify_transaction(tx(BUYER, body, nonce=0))


def test_a_resigned_supplier_sells_nothing() -> None:
    m = Market()
    m.c.run(m.c.tx(SUPPLIER, RoleResign(int(Role.DATA_SUPPLIER))))
    err = m.c.reject(m.c.tx(BUYER, Purchase(m.p.id, BUYER_PUB, Amount(PRICE))), SupplierInactive)
    assert "DATA_SUPPLIER" in err.message


# --- composites: pro rata -------------------------------------------------------------------------------


def test_composite_purchase_pays_sources_pro_rata() -> None:
    m = Market()
    # Q: a second priced source, by SUPPLIER2
    q = priced_dataset(6, seed=5)
    m.c.run(m.c.tx(SUPPLIER2, register_body(q, name="Q", price=300)))
    cid = composite_id(addr(DISTRIBUTOR), m.c.nonce(DISTRIBUTOR))
    parts = (
        CompositePartSpec(m.p.id, 0, 4, ()),  # 4 rows of P (priced 1000 for 8 rows)
        CompositePartSpec(m.a.id, 0, 8, ()),  # 8 free rows
        CompositePartSpec(q.id, 0, 3, ()),  # 3 rows of Q
        CompositePartSpec(m.p.id, 4, 5, ()),  # P again: merged into P's share (5 rows)
    )
    # P's share (5 of 16 rows) must reach its price 1000: price * 5 // 16 >= 1000
    define = CompositeDefine("mix", "", "CC0", Amount(3_199), parts)
    err = m.c.reject(m.c.tx(DISTRIBUTOR, define), CompositeUnderpriced)
    assert "least price here is 3200" in err.message
    price = 3_203
    m.c.run(m.c.tx(DISTRIBUTOR, replace(define, price=Amount(price))))
    a_owner0, buyer0 = m.c.balance(SUPPLIER), m.c.balance(BUYER)
    pid = m.buy(BUYER, cid)
    record = get_purchase(m.c.view(), pid)
    assert record is not None
    # rows: P 5, A 8, Q 3 of 16; floor, the remainder (3203 - 1000 - 1601 - 600 = 2) to P
    assert [(s.source, s.amount, s.state) for s in record.shares] == [
        (m.p.id, 1000 + 2, ShareState.AWAITING_KEY),
        (m.a.id, 1601, ShareState.PAID),
        (q.id, 600, ShareState.AWAITING_KEY),
    ]
    assert sum(s.amount for s in record.shares) == price
    assert m.c.balance(SUPPLIER) == a_owner0 + 1601  # the free source's owner is paid at once
    assert m.c.balance(BUYER) == buyer0 - price - 10**8
    assert m.obligations(SUPPLIER) == 1 and m.obligations(SUPPLIER2) == 1
    for root in (m.p.root, m.a.root, q.root):
        assert purchase_grants(m.c.view(), pid, addr(BUYER), root)
    # P's key arrives, Q's does not: P paid after the window, Q refunded at the deadline.
    m.post(pid, m.p)
    m.c.advance_to(m.c.height + KEY_POST_HEIGHTS + DISPUTE_WINDOW)
    record = get_purchase(m.c.view(), pid)
    assert record is not None
    assert [s.state for s in record.shares] == [
        ShareState.PAID,
        ShareState.PAID,
        ShareState.REFUNDED,
    ]
    assert m.c.balance(BUYER) == buyer0 - price - 10**8 + 600
    assert m.obligations(SUPPLIER) == 0 and m.obligations(SUPPLIER2) == 0
    m.c.check_economy_supply()
    # a free composite has nothing to buy
    free = composite_id(addr(DISTRIBUTOR), m.c.nonce(DISTRIBUTOR))
    m.c.run(
        m.c.tx(
            DISTRIBUTOR,
            CompositeDefine("free", "", "", Amount(0), (CompositePartSpec(m.a.id, 0, 2, ()),)),
        )
    )
    m.c.reject(m.c.tx(BUYER, Purchase(free, BUYER_PUB, Amount(5))), PurchaseNotNeeded)


def _record(id_: bytes, price: int, entries: tuple[CompositeEntry, ...] = ()) -> DatasetRecord:
    return DatasetRecord(
        Hash32(id_), b"", b"", Address(b"\x00" * 20), "", "", "", (), 0, 0, Amount(price),
        None, None, None, 0, 1 if entries else 0, entries,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 10**6), min_size=1, max_size=12),
    st.integers(1, 10**30),
)
def test_pro_rata_shares_sum_to_the_price(rows: list[int], price: int) -> None:
    ids = [bytes([i]) * 32 for i in range(len(rows))]
    entries = tuple(CompositeEntry(Hash32(i), 0, r) for i, r in zip(ids, rows, strict=True))
    leaves = {i: _record(i, 0) for i in ids}
    shares = compute_shares(_record(b"\xff" * 32, price, entries), leaves)
    amounts = [a for _, a in shares]
    total = sum(rows)
    floors = [price * r // total for r in rows]
    assert sum(amounts) == price
    assert amounts[1:] == floors[1:]
    assert amounts[0] == floors[0] + (price - sum(floors))
    assert 0 <= amounts[0] - floors[0] < len(rows)
    assert [leaf.id for leaf, _ in shares] == ids


# --- the queue's per-block cap ------------------------------------------------------------------------


def test_the_purchase_queue_is_capped_per_block() -> None:
    m = Market(queue_work=2)
    h = m.c.height
    b0 = m.c.balance(BUYER)
    pids = [purchase_id(addr(BUYER), m.c.nonce(BUYER) + i) for i in range(3)]
    m.c.run(*(m.c.tx(BUYER, Purchase(m.p.id, BUYER_PUB, Amount(PRICE))) for _ in range(3)))
    deadline = h + KEY_POST_HEIGHTS
    m.c.advance_to(deadline)
    m.c.step()  # block `deadline`: two of the three are refunded
    states = [m.share(p)[0] for p in pids]
    assert states == [ShareState.REFUNDED, ShareState.REFUNDED, ShareState.AWAITING_KEY]
    assert PURCHASE_QUEUE.pending(m.c.view()) == 1
    # The deadline is by height: the third share takes no key although it is still queued.
    m.c.reject(m.c.tx(SUPPLIER, KeyPost(pids[2], m.p.id, m.wrapped(pids[2], m.p))), KeyPostNotOpen)
    m.c.step()
    assert m.share(pids[2])[0] == ShareState.REFUNDED
    assert m.c.balance(BUYER) == b0 - 3 * 10**8
    assert m.obligations(SUPPLIER) == 0
    m.c.check_economy_supply()


# --- the leaf-path check -------------------------------------------------------------------------------


def test_leaf_path_in_a_two_level_tree() -> None:
    """174 MiB + 1 byte: 175 leaves, a root over two dag-pb nodes (zeros: cheap to hash)."""
    builder = UnixfsBuilder()
    zero = bytes(1 << 20)
    # Only the dag-pb nodes are kept; the leaves are two distinct blocks.
    blocks = {bytes(raw_cid(zero)): zero}
    for piece in [zero] * 174 + [b"\x01"]:
        for b in builder.feed(piece):
            if b.cid.codec.name == "dag-pb":
                blocks[bytes(b.cid)] = b.data
    root_cid, rest = builder.finish_blocks()
    for b in rest:
        if b.cid.codec.name == "dag-pb":
            blocks[bytes(b.cid)] = b.data
    root = bytes(root_cid)
    blocks[bytes(raw_cid(b"\x01"))] = b"\x01"
    for index in (1, 173, 174):
        leaf, path = leaf_with_path(blocks, root, index)
        assert len(path) == 2
        verify_leaf_path(root, index, leaf, path)
    leaf, path = leaf_with_path(blocks, root, 174)
    with pytest.raises(DisputeProofMismatch):
        verify_leaf_path(root, 173, leaf, path)  # the second subtree's path for a first-subtree leaf
    with pytest.raises(DisputeProofMismatch):
        verify_leaf_path(root, 175, leaf, path)  # no such leaf
    with pytest.raises(DisputeProofMismatch):
        verify_leaf_path(root, 174, leaf, path[:1])  # stops above the leaf's parent
    assert dataset_id(root) != dataset_id(bytes(raw_cid(b"\x01")))


def test_supply_is_conserved_in_a_busy_market() -> None:
    m = Market()
    pid1 = m.buy(BUYER, m.p.id)
    pid2 = m.buy(BUYER2, m.p.id)
    m.post(pid1, m.p)
    m.post(pid2, m.p, m.wrapped(pid2, m.p, key=b"\x66" * 32))
    m.c.run(m.c.tx(BUYER2, m.dispute(pid2, m.p)))
    m.c.advance_to(m.c.height + DISPUTE_WINDOW + 2)
    assert [m.share(p)[0] for p in (pid1, pid2)] == [ShareState.PAID, ShareState.OWNER_FAULT]
    supply = m.c.supply()
    assert isinstance(supply, Supply) and supply.burned > SLASH
    m.c.check_economy_supply()
