"""Leaf disputes posted in parts (node/economy/purchases.py, ADR 0006): a full 1 MiB ciphertext
leaf fits in no transaction, so the buyer opens the dispute (key and path) and posts the leaf in
32 KiB parts, each within the devnet's 64 KiB ``max_tx_bytes``. Garbage ciphertext refunds the
buyer and slashes the owner; an honest leaf closes the dispute against the buyer; parts out of
order, of the wrong size or from anyone else are refused; an abandoned dispute expires; every
state record of a dispute is gone when it ends, and the supply is conserved throughout
(``EconomyChain.run`` checks it after every block)."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import pytest

from node.consensus.fees import count_new_accounts
from node.consensus.state import Overlay
from node.consensus.transition import apply_transaction
from node.consensus.txs import MAX_BODY_BYTES, verify_transaction
from node.economy.api import NS_LEAF_DISPUTE
from node.economy.purchases import (
    DISPUTE_PART_BYTES,
    MAX_DISPUTE_PARTS,
    DisputeBadPrivateKey,
    DisputeChunk,
    DisputeNotOpen,
    DisputePartOutOfOrder,
    DisputePartSizeMismatch,
    DisputePartTooLarge,
    DisputeProofMismatch,
    InvalidPurchaseBody,
    KeyDispute,
    LeafDisputeOpen,
    LeafDisputePart,
    NoLeafDispute,
    NotTheBuyer,
    ShareState,
    UnknownPurchase,
    UnknownShare,
    get_leaf_dispute,
    get_purchase,
    purchase_grants,
)
from node.errors import TransactionTooLarge
from node.p2p.api import MAX_GOSSIP_PAYLOAD
from node.storage import encryption
from node.storage.format_v1 import make_leaf0, make_proof
from node.storage.unixfs import (
    CHUNK_SIZE,
    Link,
    dag_pb_cid,
    encode_file_node,
    raw_cid,
)
from node.types import Hash32
from tests.economy.econ import (
    BUYER,
    BUYER2,
    BUYER_PRIV,
    DISPUTE_WINDOW,
    FEE,
    LEAF_DISPUTE_HEIGHTS,
    PRICE,
    SLASH,
    SUPPLIER,
    SUPPLIER_BOND,
    Artifact,
    Market,
    addr,
    build_artifact,
    fixed_rng,
    header_json,
    tx,
)

DEVNET_MAX_TX = 64 << 10  # genesis.json's max_tx_bytes
KEY, SALT = b"\x21" * 32, b"\x22" * 7
# 1.5 MiB of data: leaf 1 is a full 1 MiB chunk, leaf 2 the short last one (512 KiB + 16).
HEADER = header_json({"x": ("U8", (1536, 1024))})
DATA = bytes(i % 253 for i in range(1536 * 1024))


def _artifact(*, garbage: bool) -> Artifact:
    """The 1.5 MiB dataset, committed to KEY; with ``garbage`` its data is encrypted under
    another key (the key check passes, nothing decrypts)."""
    return build_artifact(
        HEADER, DATA, key=KEY, salt=SALT, encrypt_with=b"\x23" * 32 if garbage else None
    )


GARBAGE = _artifact(garbage=True)
HONEST = _artifact(garbage=False)


def _opened(p: Artifact, wrapped_key: bytes | None = None) -> tuple[Market, Hash32, int]:
    """A market selling ``p`` under the devnet's transaction limit, bought and its key posted;
    returns it, the purchase and the height the key was posted at."""
    m = Market(p=p, max_tx_bytes=DEVNET_MAX_TX)
    pid = m.buy(BUYER, p.id)
    m.post(pid, p, wrapped_key)
    return m, pid, m.c.height - 1


def _open(pid: bytes, p: Artifact, leaf: int = 1, priv: bytes = BUYER_PRIV) -> LeafDisputeOpen:
    _, path = p.leaf(leaf)
    return LeafDisputeOpen(Hash32(pid), p.id, priv, leaf, path)


def _parts(pid: bytes, p: Artifact, leaf: int = 1) -> list[LeafDisputePart]:
    data, _ = p.leaf(leaf)
    return [
        LeafDisputePart(Hash32(pid), p.id, off, data[off : off + DISPUTE_PART_BYTES])
        for off in range(0, len(data), DISPUTE_PART_BYTES)
    ]


def _events(built: Any, i: int) -> dict[str, dict[str, bytes]]:
    receipt = built.result.receipts[i]
    return {e.name: {a.key: a.value for a in e.attributes} for e in receipt.events}


def _dispute_keys(m: Market) -> list[bytes]:
    return [k for k in m.c.state if k.startswith(NS_LEAF_DISPUTE)]


def test_a_full_garbage_leaf_in_parts_refunds_and_slashes() -> None:
    m, pid, _ = _opened(GARBAGE)
    buyer0 = m.c.balance(BUYER) + PRICE + FEE  # before the purchase (its price and fee)
    leaf, path = GARBAGE.leaf(1)
    assert len(leaf) == CHUNK_SIZE
    # The one-transaction dispute cannot carry this leaf under the devnet's limit.
    whole = KeyDispute(pid, GARBAGE.id, BUYER_PRIV, DisputeChunk(1, leaf, path))
    assert len(whole.encode()) > MAX_BODY_BYTES > DEVNET_MAX_TX
    # Open: the key-level checks pass (the key is the committed one).
    opened = m.c.run(m.c.tx(BUYER, _open(pid, GARBAGE)))
    event = _events(opened, 0)["leaf_dispute_open"]
    assert int.from_bytes(event["leaf_size"], "big") == CHUNK_SIZE
    assert m.share(pid)[0] == ShareState.LEAF_DISPUTE
    assert purchase_grants(m.c.view(), pid, addr(BUYER), GARBAGE.root)
    parts = _parts(pid, GARBAGE)
    assert len(parts) == MAX_DISPUTE_PARTS == 32
    raws = [m.c.tx(BUYER, part) for part in parts]
    assert all(len(r) <= DEVNET_MAX_TX and len(r) <= MAX_GOSSIP_PAYLOAD for r in raws)
    # Every part but the last is stored under the dispute's key; the fee counts one record each.
    assert count_new_accounts(m.c.view(), verify_transaction(raws[0])) == 1
    m.c.run(*raws[:-1])
    dispute = get_leaf_dispute(m.c.view(), pid, GARBAGE.id)
    assert dispute is not None and dispute.received == 31 * DISPUTE_PART_BYTES
    assert len(_dispute_keys(m)) == 1 + 31
    burned0 = m.c.supply().burned
    closed = m.c.run(raws[-1])
    event = _events(closed, 0)["leaf_dispute"]
    assert event["verdict"] == b"owner_fault_decrypt"
    assert int.from_bytes(event["refunded"], "big") == PRICE
    assert int.from_bytes(event["slashed"], "big") == SLASH
    assert m.share(pid) == (ShareState.OWNER_FAULT, PRICE)
    # The price came back; the buyer paid the purchase, open and 32 part fees.
    assert m.c.balance(BUYER) == buyer0 - (2 + MAX_DISPUTE_PARTS) * FEE
    assert m.bond(SUPPLIER) == SUPPLIER_BOND - SLASH
    assert m.obligations(SUPPLIER) == 0
    assert m.c.supply().burned - burned0 >= SLASH
    assert not purchase_grants(m.c.view(), pid, addr(BUYER), GARBAGE.root)
    assert _dispute_keys(m) == [] and get_leaf_dispute(m.c.view(), pid, GARBAGE.id) is None
    # The stale queue entries (the window's, the dispute's) change nothing later.
    m.c.advance_to(m.c.height + DISPUTE_WINDOW + LEAF_DISPUTE_HEIGHTS + 1)
    assert m.share(pid)[0] == ShareState.OWNER_FAULT
    m.c.check_economy_supply()


def test_an_honest_full_leaf_closes_the_dispute_against_the_buyer() -> None:
    m, pid, _ = _opened(HONEST)
    owner0 = m.c.balance(SUPPLIER)
    buyer0 = m.c.balance(BUYER)
    m.c.run(m.c.tx(BUYER, _open(pid, HONEST)))
    parts = _parts(pid, HONEST)
    # Parts over several blocks: what the dispute holds survives between them.
    m.c.run(*(m.c.tx(BUYER, p) for p in parts[:10]))
    m.c.run(*(m.c.tx(BUYER, p) for p in parts[10:31]))
    assert m.share(pid) == (ShareState.LEAF_DISPUTE, PRICE)
    closed = m.c.run(m.c.tx(BUYER, parts[31]))
    event = _events(closed, 0)["leaf_dispute"]
    assert event["verdict"] == b"key_ok"
    assert int.from_bytes(event["paid"], "big") == PRICE
    assert m.share(pid) == (ShareState.PAID, PRICE)
    assert m.c.balance(SUPPLIER) == owner0 + PRICE  # paid now, not at the deadline
    assert m.c.balance(BUYER) == buyer0 - (1 + MAX_DISPUTE_PARTS) * FEE
    assert m.bond(SUPPLIER) == SUPPLIER_BOND and m.obligations(SUPPLIER) == 0
    assert purchase_grants(m.c.view(), pid, addr(BUYER), HONEST.root)
    assert _dispute_keys(m) == []
    # The dispute has ended: neither kind of dispute is taken again.
    m.c.reject(m.c.tx(BUYER, _open(pid, HONEST)), DisputeNotOpen)
    m.c.reject(m.c.tx(BUYER, parts[0]), NoLeafDispute)


def test_a_short_leaf_in_parts_is_judged_too() -> None:
    """Leaf 2 (512 KiB + 32 bytes: 512 KiB − 16 + 32 of plaintext, a tag): 16 full parts and a
    last one of 32 bytes."""
    m, pid, _ = _opened(GARBAGE)
    # Under the devnet's limit even this leaf does not fit in one KeyDispute.
    leaf, path = GARBAGE.leaf(2)
    whole = KeyDispute(pid, GARBAGE.id, BUYER_PRIV, DisputeChunk(2, leaf, path))
    built = m.c.build([verify_transaction(tx(BUYER, whole, nonce=m.c.nonce(BUYER)))])
    assert [type(e) for _, e in built.rejected] == [TransactionTooLarge]
    m.c.run(m.c.tx(BUYER, _open(pid, GARBAGE, leaf=2)))
    parts = _parts(pid, GARBAGE, leaf=2)
    assert len(parts) == 17
    assert [len(p.data) for p in parts[-2:]] == [DISPUTE_PART_BYTES, 32]
    closed = m.c.run(*(m.c.tx(BUYER, p) for p in parts))
    assert _events(closed, len(parts) - 1)["leaf_dispute"]["verdict"] == b"owner_fault_decrypt"
    assert m.share(pid)[0] == ShareState.OWNER_FAULT and _dispute_keys(m) == []


def test_a_key_level_fault_settles_at_the_open() -> None:
    m = Market(p=HONEST, max_tx_bytes=DEVNET_MAX_TX)
    pid = m.buy(BUYER, HONEST.id)
    m.post(pid, HONEST, m.wrapped(pid, HONEST, key=b"\x55" * 32))  # not the committed key
    opened = m.c.run(m.c.tx(BUYER, _open(pid, HONEST)))
    assert _events(opened, 0)["leaf_dispute"]["verdict"] == b"owner_fault_check"
    assert m.share(pid) == (ShareState.OWNER_FAULT, PRICE)
    assert m.bond(SUPPLIER) == SUPPLIER_BOND - SLASH and m.obligations(SUPPLIER) == 0
    assert _dispute_keys(m) == []
    m.c.reject(m.c.tx(BUYER, _parts(pid, HONEST)[0]), NoLeafDispute)


def test_open_rejections() -> None:
    m = Market(p=HONEST, max_tx_bytes=DEVNET_MAX_TX)
    pid = m.buy(BUYER, HONEST.id)
    m.c.reject(m.c.tx(BUYER, _open(pid, HONEST)), DisputeNotOpen)  # no key yet
    m.post(pid, HONEST)
    m.c.reject(m.c.tx(BUYER2, _open(pid, HONEST)), NotTheBuyer)
    other, _ = encryption.generate_wrap_keypair(fixed_rng(8))
    m.c.reject(m.c.tx(BUYER, _open(pid, HONEST, priv=other)), DisputeBadPrivateKey)
    _, path = HONEST.leaf(1)
    _, garbage_path = GARBAGE.leaf(1)
    for body in (
        LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV, 3, path),  # past the last data leaf
        LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV, 1, (path[0][:-1] + b"\x00",)),
        LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV, 1, garbage_path),  # another file's root
    ):
        m.c.reject(m.c.tx(BUYER, body), DisputeProofMismatch)
    unknown = LeafDisputeOpen(Hash32(b"\x01" * 32), HONEST.id, BUYER_PRIV, 1, path)
    m.c.reject(m.c.tx(BUYER, unknown), UnknownPurchase)
    m.c.reject(m.c.tx(BUYER, _open(pid, GARBAGE)), UnknownShare)
    for body in (
        LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV, 0, path),  # leaf 0 is the public header
        LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV, 1, ()),
        LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV[:31], 1, path),
        LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV, 1, (bytes(65 << 10),)),
    ):
        with pytest.raises(InvalidPurchaseBody):
            verify_transaction(tx(BUYER, body, nonce=m.c.nonce(BUYER)))
    # The open pays for its path nodes, the key check, its record and its queue entry.
    raw = m.c.tx(BUYER, _open(pid, HONEST))
    assert count_new_accounts(m.c.view(), verify_transaction(raw)) == 3 + len(path)
    m.c.run(raw)
    # One leaf dispute per share, and no KeyDispute beside it.
    m.c.reject(m.c.tx(BUYER, _open(pid, HONEST, leaf=2)), DisputeNotOpen)
    err = m.c.reject(m.c.tx(BUYER, KeyDispute(pid, HONEST.id, BUYER_PRIV, None)), DisputeNotOpen)
    assert "leaf dispute is open" in err.message


def test_part_rejections() -> None:
    m, pid, _ = _opened(GARBAGE)
    parts = _parts(pid, GARBAGE)
    m.c.reject(m.c.tx(BUYER, parts[0]), NoLeafDispute)  # not opened yet
    m.c.run(m.c.tx(BUYER, _open(pid, GARBAGE)))
    # Foreign: another account, another purchase.
    m.c.reject(m.c.tx(BUYER2, parts[0]), NotTheBuyer)
    bogus = LeafDisputePart(Hash32(b"\x01" * 32), GARBAGE.id, 0, parts[0].data)
    m.c.reject(m.c.tx(BUYER, bogus), UnknownPurchase)
    # Out of order: a gap, then a repeat.
    err = m.c.reject(m.c.tx(BUYER, parts[1]), DisputePartOutOfOrder)
    assert "holds 0 of the leaf's 1048576 bytes" in err.message
    m.c.run(m.c.tx(BUYER, parts[0]))
    m.c.reject(m.c.tx(BUYER, parts[0]), DisputePartOutOfOrder)
    # Sizes: short before the end; oversized (refused before any state is read); empty.
    short = LeafDisputePart(pid, GARBAGE.id, DISPUTE_PART_BYTES, parts[1].data[:-1])
    m.c.reject(m.c.tx(BUYER, short), DisputePartSizeMismatch)
    big = LeafDisputePart(pid, GARBAGE.id, DISPUTE_PART_BYTES, parts[1].data + b"\x00")
    with pytest.raises(DisputePartTooLarge):
        verify_transaction(tx(BUYER, big, nonce=m.c.nonce(BUYER)))
    with pytest.raises(InvalidPurchaseBody):
        verify_transaction(
            tx(BUYER, LeafDisputePart(pid, GARBAGE.id, 0, b""), nonce=m.c.nonce(BUYER))
        )
    # A last part whose leaf does not hash to the CID from the path writes nothing; the buyer
    # may post the right one before the deadline.
    m.c.run(*(m.c.tx(BUYER, p) for p in parts[1:31]))
    last = parts[31]
    wrong = LeafDisputePart(pid, GARBAGE.id, last.offset, last.data[:-1] + b"\x00")
    if wrong.data == last.data:  # pragma: no cover - the ciphertext's last byte is not 0
        wrong = LeafDisputePart(pid, GARBAGE.id, last.offset, last.data[:-1] + b"\x01")
    m.c.reject(m.c.tx(BUYER, wrong), DisputeProofMismatch)
    too_long = LeafDisputePart(pid, GARBAGE.id, last.offset, last.data + b"\x00")
    with pytest.raises(DisputePartTooLarge):
        verify_transaction(tx(BUYER, too_long, nonce=m.c.nonce(BUYER)))
    assert m.share(pid)[0] == ShareState.LEAF_DISPUTE
    closed = m.c.run(m.c.tx(BUYER, last))
    assert _events(closed, 0)["leaf_dispute"]["verdict"] == b"owner_fault_decrypt"


def test_a_last_part_past_the_leaf_is_refused() -> None:
    m, pid, _ = _opened(GARBAGE)
    m.c.run(m.c.tx(BUYER, _open(pid, GARBAGE, leaf=2)))
    parts = _parts(pid, GARBAGE, leaf=2)
    m.c.run(*(m.c.tx(BUYER, p) for p in parts[:-1]))
    last = parts[-1]
    over = LeafDisputePart(pid, GARBAGE.id, last.offset, last.data + b"\x00")
    err = m.c.reject(m.c.tx(BUYER, over), DisputePartSizeMismatch)
    assert "a part of 33 bytes at offset 524288: expected 32" in err.message


def test_an_abandoned_dispute_expires_and_its_state_is_deleted() -> None:
    m, pid, posted = _opened(HONEST)
    owner0, buyer0 = m.c.balance(SUPPLIER), m.c.balance(BUYER)
    m.c.run(m.c.tx(BUYER, _open(pid, HONEST)))
    parts = _parts(pid, HONEST)
    window_end = posted + DISPUTE_WINDOW
    deadline = window_end + LEAF_DISPUTE_HEIGHTS
    record = get_purchase(m.c.view(), pid)
    assert record is not None and record.shares[0].deadline == deadline
    m.c.run(*(m.c.tx(BUYER, p) for p in parts[:3]))
    # The dispute window's end pays nothing now: the share waits for its parts.
    m.c.advance_to(window_end + 1)
    assert m.share(pid)[0] == ShareState.LEAF_DISPUTE
    assert m.obligations(SUPPLIER) == 1
    m.c.advance_to(deadline)
    assert len(_dispute_keys(m)) == 1 + 3
    built = m.c.run(m.c.tx(BUYER, parts[3]))  # the deadline height still takes a part ...
    assert int.from_bytes(_events(built, 0)["leaf_dispute_part"]["received"], "big") == (
        4 * DISPUTE_PART_BYTES
    )
    assert m.share(pid)[0] == ShareState.PAID  # ... and its end expires the dispute
    assert _dispute_keys(m) == []
    assert m.c.balance(SUPPLIER) == owner0 + PRICE
    assert m.c.balance(BUYER) == buyer0 - 5 * FEE
    assert m.obligations(SUPPLIER) == 0 and m.bond(SUPPLIER) == SUPPLIER_BOND
    m.c.reject(m.c.tx(BUYER, parts[4]), NoLeafDispute)
    m.c.check_economy_supply()


def test_a_late_part_is_refused_by_height() -> None:
    """With the queue capped the expiry may run late; a part past the deadline is refused
    whether or not it ran."""
    m, pid, posted = _opened(HONEST)
    m.c.run(m.c.tx(BUYER, _open(pid, HONEST)))
    deadline = posted + DISPUTE_WINDOW + LEAF_DISPUTE_HEIGHTS
    m.c.advance_to(deadline)
    late = verify_transaction(tx(BUYER, _parts(pid, HONEST)[0], nonce=m.c.nonce(BUYER)))
    assert not m.c.build([late]).rejected  # at the deadline height
    ctx = replace(m.c.ctx(), height=deadline + 1)
    with pytest.raises(DisputeNotOpen, match="due by height"):
        apply_transaction(Overlay(m.c.view()), late, ctx)


def test_a_leaf_of_the_wrong_size_is_an_owner_fault_at_the_open() -> None:
    """The owner built the DAG with leaf 1 eight bytes short (leaf 2 eight bytes long): the
    registration's checks (leaf 0, the file size, the first links) pass, and the path alone
    proves that no chunk at leaf 1's position can decrypt."""
    out = io.BytesIO()
    encryption.encrypt_stream(KEY, SALT, io.BytesIO(DATA), out, len(DATA))
    stored = out.getvalue()
    leaf0 = make_leaf0(HEADER)
    leaves = [leaf0, stored[: CHUNK_SIZE - 8], stored[CHUNK_SIZE - 8 :]]
    links = [Link(raw_cid(leaf), len(leaf)) for leaf in leaves]
    root_node = encode_file_node(links, [len(leaf) for leaf in leaves])
    root = bytes(dag_pb_cid(root_node))
    blocks = {bytes(raw_cid(leaf)): leaf for leaf in leaves} | {root: root_node}
    proof = make_proof(lambda c: blocks[c], root)
    p = Artifact(root, HEADER, proof, blocks, DATA, KEY, SALT)
    m, pid, _ = _opened(p)
    opened = m.c.run(m.c.tx(BUYER, _open(pid, p)))
    assert _events(opened, 0)["leaf_dispute"]["verdict"] == b"owner_fault_decrypt"
    assert m.share(pid) == (ShareState.OWNER_FAULT, PRICE)
    assert m.bond(SUPPLIER) == SUPPLIER_BOND - SLASH
    assert _dispute_keys(m) == []
    assert m.obligations(SUPPLIER) == 0
